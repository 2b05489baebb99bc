"""Using a trained model: `crystalline.load(path)` gives a `LoadedModel` that
generates text with the Rust key/value cache, scores token ids and held-out
text (`evaluate`: loss, perplexity, bits per byte) and saves itself as a new
run.

Generation feeds each prompt through the cache one position at a time
(sequences at the same position share one call), then runs one decode step
per new token for every unfinished sequence and samples from its logits.
A sequence stops at end-of-text or after `max_tokens` new tokens. When a
sequence's context reaches the model's block size, the window slides: its
cache is emptied and refilled with its last block_size // 2 tokens, so
generation can go on past the block size (with a shorter memory).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from crystalline import _core, checkpoint
from crystalline.atomic import new_directory
from crystalline.config import ModelConfig, TrainConfig, check_unsigned, flagged
from crystalline.data import corpus
from crystalline.data.tokenizer import Tokenizer
from crystalline.errors import UserError
from crystalline.guard import core_refusals, ensure_memory, fresh_directory, utf8, writing
from crystalline.precision import resolve as resolve_precision

# Called with (sequence index, text that became stable since the last call).
StreamCallback = Callable[[int, str], None]
# Windows scored per call in `LoadedModel.evaluate`.
EVAL_BATCH = 8


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: temperature 0 is greedy; top_k 0 and
    top_p 1 mean no cut-off."""

    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed

    def validate(self) -> None:
        """Refuse settings that cannot draw a token, naming the flag (the
        Rust sampler's own check, but for the count of new tokens)."""
        if self.max_tokens < 0:
            raise UserError(f"--max-tokens must not be negative, got {self.max_tokens}")
        try:
            check_unsigned("top_k", self.top_k)  # the core's own refusal would not name it
            if self.seed is not None:
                check_unsigned("seed", self.seed)
            _core.validate_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        except ValueError as err:
            raise flagged(err, ["temperature", "top_k", "top_p", "seed"]) from None


@dataclass(frozen=True)
class EvalResult:
    """A model's score on held-out text."""

    files: int  # documents read
    tokens: int  # tokens predicted: all but the first
    bytes: int  # UTF-8 bytes of the text
    nats: float  # summed cross-entropy of those predictions

    @property
    def loss(self) -> float:
        """Mean cross-entropy, nats per token."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Total loss in bits over the bytes of text: unlike the loss, it
        compares models with different tokenizers."""
        return self.nats / math.log(2) / max(self.bytes, 1)


def windows(tokens: np.ndarray, t: int, batch: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """[B <= batch, t+1] batches of the full non-overlapping windows of
    `tokens`: window i is tokens[i*t : i*t + t+1], so each token after the
    first is a target once. At most `limit` windows."""
    n = (len(tokens) - 1) // t
    if limit is not None:
        n = min(n, limit)
    for lo in range(0, n, batch):
        starts = np.arange(lo, min(lo + batch, n), dtype=np.int64) * t
        yield tokens[starts[:, None] + np.arange(t + 1)]


class TextStream:
    """Turns a growing list of token ids into the text not shown yet.

    Byte-level tokens can end inside a UTF-8 character, which decodes to
    U+FFFD until the rest arrives, so trailing U+FFFD is held back until a
    later token (or `finish`) settles it.

    Only the ids since the text last ended on a whole character are
    decoded again (the bytes before them decode the same whatever follows),
    so a stream of n tokens costs time linear in n, not quadratic."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.start = 0  # ids before it are settled and shown
        self.shown = 0  # characters shown of the text of ids[start:]

    def push(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(ids[self.start :])
        stable = len(text.rstrip("\ufffd"))
        new = text[self.shown : stable]
        if stable == len(text):  # ends on a whole character: settled
            self.start, self.shown = len(ids), 0
        else:
            self.shown = max(self.shown, stable)
        return new

    def finish(self, ids: Sequence[int]) -> str:
        new = self.tokenizer.decode(ids[self.start :])[self.shown :]
        self.start, self.shown = len(ids), 0
        return new


class LoadedModel:
    """A model, its tokenizer and where it came from."""

    def __init__(self, model: _core.Model, tokenizer: Tokenizer, config: ModelConfig, state: checkpoint.State,
                 path: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.state = state
        self.path = path

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def set_threads(self, threads: int) -> None:
        try:
            check_unsigned("threads", threads, minimum=1)
            self.model.set_threads(threads)  # refuses more than MAX_THREADS
        except ValueError as err:
            raise flagged(err, ["threads"]) from None

    def parameters(self) -> dict[str, np.ndarray]:
        return self.model.parameters()

    @property
    def precision(self) -> str:
        """What the matmuls run in: "fp32" or "bf16"."""
        return self.model.precision

    # -- scoring -----------------------------------------------------------

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Next-token logits after each position: ids [T] -> [T, V], or [B, T] -> [B, T, V]."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
            raise UserError("logits() takes a non-empty list of token ids, or a [batch, time] array")
        if arr.shape[-1] > self.block_size:
            raise UserError(f"{arr.shape[-1]} tokens are more than the model's block size {self.block_size}")
        out = self.model.forward(arr.reshape(-1, arr.shape[-1]))
        return out[0] if arr.ndim == 1 else out

    def evaluate(self, paths: Iterable[Path | str], extensions: list[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> EvalResult:
        """Score the text files under `paths`. Documents are joined with
        end-of-text, as in training, and scored in non-overlapping windows of
        the block size (the last one shorter), so every token but the first
        is predicted once. `progress(windows_done, windows)` hears of each batch."""
        files, _ = corpus.walk([Path(p) for p in paths], extensions)
        ids: list[int] = []
        n_bytes = 0
        for f in files:
            text = "".join(corpus.read_chunks(f.path, corpus.FileRead()))
            ids.extend(self.tokenizer.encode(text))
            ids.append(self.tokenizer.eot_id)
            n_bytes += len(text.encode())
        tokens = np.asarray(ids, dtype=np.int64)
        if len(tokens) < 2:
            raise UserError("the data holds too little text to score (at least one token is needed)")
        t = self.block_size
        full, total = (len(tokens) - 1) // t, -(-(len(tokens) - 1) // t)
        batches = list(windows(tokens, t, EVAL_BATCH))
        if full < total:  # the shorter last window
            batches.append(tokens[full * t :][None, :])
        nats, done = 0.0, 0
        for batch in batches:
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with core_refusals():  # the activations of a batch may not fit
                nats += self.model.loss(inputs, targets) * targets.size
            done += len(batch)
            if progress is not None:
                progress(done, total)
        return EvalResult(files=len(files), tokens=len(tokens) - 1, bytes=n_bytes, nats=nats)

    # -- generation --------------------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, refused when empty or longer than the block size."""
        if not prompt:
            raise UserError("the prompt is empty; give some text to continue")
        ids = self.tokenizer.encode(utf8(prompt, "the prompt"))
        if len(ids) > self.block_size:
            raise UserError(
                f"the prompt is {len(ids)} tokens, longer than the model's block size of {self.block_size} "
                "tokens; shorten it"
            )
        return ids

    def generate(self, prompt: str, max_tokens: int = 200, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 1.0, seed: int | None = None, stream: Callable[[str], None] | None = None) -> str:
        """The text the model writes after `prompt` (without the prompt).
        `stream` receives the text piece by piece as it is produced."""
        each = (lambda _i, text: stream(text)) if stream else None
        return self.generate_batch([prompt], max_tokens, temperature, top_k, top_p, seed, each)[0]

    def generate_batch(self, prompts: Sequence[str], max_tokens: int = 200, temperature: float = 0.8,
                       top_k: int = 40, top_p: float = 1.0, seed: int | None = None,
                       stream: StreamCallback | None = None) -> list[str]:
        """Continue several prompts at once (one batched decode step per
        token); `stream(i, text)` receives sequence i's text as it grows."""
        if not prompts:
            return []
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        sampling = Sampling(max_tokens, temperature, top_k, top_p, seed)
        streams = [TextStream(self.tokenizer) for _ in prompts]
        on_token = None
        if stream is not None:
            def on_token(i: int, ids: list[int]) -> None:
                text = streams[i].push(ids)
                if text:
                    stream(i, text)
        outs = self.generate_ids(prompt_ids, sampling, on_token)
        if stream is not None:
            for i, ids in enumerate(outs):
                rest = streams[i].finish(ids)
                if rest:
                    stream(i, rest)
        return [self.tokenizer.decode(ids) for ids in outs]

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: Sampling,
                     on_token: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """New token ids for each prompt of ids (end-of-text not included)."""
        sampling.validate()
        for ids in prompts:
            if not 0 < len(ids) <= self.block_size:
                raise UserError(f"a prompt must have 1 to {self.block_size} tokens, got {len(ids)}")
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        model, eot, window = self.model, self.tokenizer.eot_id, max(1, self.block_size // 2)
        self.check_generation_memory(len(prompts), sum(map(len, prompts)))
        with core_refusals():
            model.reset_cache(len(prompts), seed)
        context = [list(ids) for ids in prompts]
        filled = [0] * len(prompts)  # positions in each sequence's cache
        outs: list[list[int]] = [[] for _ in prompts]
        self._prefill({i: ids[:-1] for i, ids in enumerate(context)}, filled)
        active = list(range(len(prompts))) if sampling.max_tokens > 0 else []
        while active:
            full = [i for i in active if filled[i] >= self.block_size]
            if full:  # slide the window: keep the last `window` tokens, the pending one included
                for i in full:
                    model.clear_sequence(i)
                    filled[i] = 0
                self._prefill({i: context[i][-window:-1] for i in full}, filled)
            logits = model.decode(active, np.array([context[i][-1] for i in active], dtype=np.int64))
            logits[:, self.tokenizer.vocab_size :] = -np.inf  # ids the tokenizer cannot decode
            for i in active:
                filled[i] += 1
            picks = model.sample(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            still = []
            for i, tok in zip(active, picks):
                if tok == eot:
                    continue
                outs[i].append(tok)
                context[i].append(tok)
                if on_token is not None:
                    on_token(i, outs[i])
                if len(outs[i]) < sampling.max_tokens:
                    still.append(i)
            active = still
        return outs

    def check_generation_memory(self, sequences: int, prompt_tokens: int) -> None:
        """Refuse to generate `sequences` sequences from prompts of
        `prompt_tokens` tokens in all when their caches and logits need more
        memory than is available."""
        ensure_memory(self.config.generation_bytes(sequences, prompt_tokens), f"generating {sequences:,} sequences",
                      "ask for fewer samples")

    def _prefill(self, pending: dict[int, Sequence[int]], filled: list[int]) -> None:
        """Feed each sequence its tokens without computing logits, all in one
        decode call (a sequence listed k times takes k positions)."""
        seqs = [i for i, ids in pending.items() for _ in ids]
        if seqs:
            toks = np.array([t for ids in pending.values() for t in ids], dtype=np.int64)
            self.model.decode(seqs, toks, want_logits=False)
        for i, ids in pending.items():
            filled[i] += len(ids)

    # -- saving ------------------------------------------------------------

    def save(self, run_dir: Path | str) -> Path:
        """Write the weights and tokenizer as a new run directory (one
        checkpoint at step 0, fresh optimizer state) that `load` and
        `crystalline train --resume RUN_DIR` accept. Returns the checkpoint."""
        return write_run(Path(run_dir), self.parameters(), self.config, self.path / checkpoint.TOKENIZER,
                         self.state.config)


def load(path: Path | str, threads: int | None = None, precision: str = "fp32") -> LoadedModel:
    """Load a checkpoint directory, or a run directory's latest checkpoint,
    after checking that its tokenizer is the one the model was trained with.
    `precision` ("fp32", "bf16" or "auto", see `crystalline.precision`) is
    what the matmuls run in; bf16 keeps a bf16 copy of the weights, which
    halves the bytes read per generated token."""
    run_in = resolve_precision(precision)
    ckpt = checkpoint.resolve(Path(path))
    state = checkpoint.read_state(ckpt)
    ensure_memory(state.model.model_bytes(), f"the model in {ckpt}", "it cannot be loaded on this machine")
    tok_path = ckpt / checkpoint.TOKENIZER
    if not tok_path.is_file():
        raise UserError(f"checkpoint {ckpt} has no tokenizer: {tok_path} is missing (copy back the "
                        "tokenizer.json the model was trained with)")
    if state.tokenizer_hash != corpus.file_hash(tok_path):
        raise UserError(f"tokenizer {tok_path} is not the one the model was trained with "
                        f"(its sha256 differs from tokenizer_hash in {ckpt / checkpoint.STATE})")
    with core_refusals():
        model = _core.Model(**asdict(state.model))
    checkpoint.restore_into(checkpoint.load(ckpt, with_optimizer=False), model)
    model.set_precision(run_in)  # after the weights are in: it rounds them
    loaded = LoadedModel(model, Tokenizer.load(tok_path), state.model, state, ckpt)
    if threads is not None:
        loaded.set_threads(threads)
    return loaded


def write_run(run_dir: Path, params: dict[str, np.ndarray], cfg: ModelConfig, tokenizer_path: Path,
              train_config: TrainConfig | None = None) -> Path:
    """Create `run_dir` holding the tokenizer and one checkpoint at step 0
    with zero optimizer moments, so `crystalline train --resume RUN_DIR`
    fine-tunes from these weights with this tokenizer (and `train_config`'s
    other settings). The directory is built under a temporary name and
    renamed into place."""
    run_dir = fresh_directory(run_dir, "--out")
    with writing(run_dir, "--out"), new_directory(run_dir) as tmp:
        shutil.copyfile(tokenizer_path, tmp / checkpoint.TOKENIZER)
        train_cfg = replace(train_config or TrainConfig(), vocab_size=cfg.vocab_size, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, seq_len=cfg.block_size,
                            checkpoint_dir=str(run_dir), tokenizer=str(run_dir / checkpoint.TOKENIZER))
        zeros = {k: np.zeros_like(a) for k, a in params.items()}
        state = checkpoint.State(config=train_cfg, model=cfg, step=0, epoch=0, epoch_step=0, optimizer_step=0,
                                 dealt=0, tokenizer_hash=corpus.file_hash(tmp / checkpoint.TOKENIZER))
        checkpoint.save(tmp, params, zeros, zeros, state, tmp / checkpoint.TOKENIZER, keep=0)
    return checkpoint.list_checkpoints(run_dir)[-1]
