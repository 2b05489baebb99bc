"""Inference: KV-cache decoding against the full forward pass, greedy and
seeded sampling, the sliding window, top-k/top-p sets, streaming text,
evaluation against an independent cross-entropy, the Hugging Face round trip
(checked by a NumPy GPT-2 forward of our own, and by `transformers` itself),
the commands, bf16 weights against float32, and each refusal. One tiny
trained checkpoint serves the whole module."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from crystalline import _core, checkpoint, hf, load
from crystalline.inference import Sampling, TextStream
from commandline import cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = ["--vocab-size", "300", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2",
        "--batch-size", "8", "--seq-len", "32", "--no-progress", "--sample-tokens", "0", "--ext", ".py"]
PROMPT = "def load(path):\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, env) -> Path:
    run = tmp_path_factory.mktemp("run") / "tiny"
    r = cli(["train", str(STDLIB / "json"), *TINY, "--max-steps", "20", "--warmup-steps", "5", "--learning-rate", "1e-2",
             "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    return load(run_dir)


def test_kv_cache_decoding_matches_the_full_forward_at_every_position(model):
    ids = model.tokenizer.encode("import json\n\ndef dump(obj, fp):\n    return json.dumps(obj)\n" * 2)
    a, b = ids[: model.block_size], ids[3 : 3 + model.block_size - 5]
    full_a, full_b = model.logits(a), model.logits(b)
    m = model.model
    m.reset_cache(2, 0)
    for t in range(len(a)):
        seqs, toks = ([0, 1], [a[t], b[t]]) if t < len(b) else ([0], [a[t]])
        got = m.decode(seqs, np.array(toks))
        np.testing.assert_allclose(got[0], full_a[t], atol=1e-4, rtol=1e-4)
        if t < len(b):
            np.testing.assert_allclose(got[1], full_b[t], atol=1e-4, rtol=1e-4)
    assert m.cache_lengths() == [len(a), len(b)]


def test_greedy_generation_is_deterministic_and_follows_the_argmax(model):
    first = model.generate(PROMPT, max_tokens=12, temperature=0)
    assert model.generate(PROMPT, max_tokens=12, temperature=0, seed=99) == first
    ids = model.tokenizer.encode(PROMPT)
    for _ in range(5):
        nxt = int(np.argmax(model.logits(ids)[-1][: model.tokenizer.vocab_size]))
        if nxt == model.tokenizer.eot_id:
            break
        ids.append(nxt)
    expected = model.tokenizer.decode(ids[len(model.tokenizer.encode(PROMPT)) :])
    assert first.startswith(expected)


class NoEndOfText:
    """A model whose decoded logits never offer end-of-text, so generation
    runs to max_tokens; it keeps each step's logits."""

    def __init__(self, model: _core.Model, eot: int) -> None:
        self.model, self.eot, self.seen = model, eot, []

    def decode(self, seqs, tokens, want_logits: bool = True):
        logits = self.model.decode(seqs, tokens, want_logits)
        if logits is not None:
            logits[:, self.eot] = -np.inf
            self.seen.append(logits.copy())
        return logits

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def test_the_window_slides_to_its_last_half_past_the_block_size(run_dir):
    model = load(run_dir)
    tok, block = model.tokenizer, model.block_size
    model.model = decoder = NoEndOfText(model.model, tok.eot_id)
    prompt = tok.encode(PROMPT)
    new = model.generate_ids([prompt], Sampling(max_tokens=3 * block, temperature=0))[0]
    assert len(new) == 3 * block == len(decoder.seen)
    # each step decoded the window the full forward sees: all the context until it passes the
    # block size, then its last block_size // 2 tokens, growing to the block size again; greedy
    # picks that window's argmax
    context, start, slides = list(prompt), 0, 0
    for tok_id, decoded in zip(new, decoder.seen):
        if len(context) - start > block:
            start, slides = len(context) - block // 2, slides + 1
        full = model.logits(context[start:])[-1]
        full[tok.eot_id] = -np.inf
        np.testing.assert_allclose(decoded[0], full, atol=1e-4, rtol=1e-4, err_msg=f"window {start}:{len(context)}")
        assert tok_id == np.argmax(decoded[0][: tok.vocab_size])
        context.append(tok_id)
    assert slides >= 4
    assert max(model.model.cache_lengths()) <= block


def test_batched_generation_matches_one_prompt_at_a_time_when_greedy(model):
    prompts = [PROMPT, "class Encoder:\n    def", "x"]
    batch = model.generate_batch(prompts, max_tokens=40, temperature=0)
    assert batch == [model.generate(p, max_tokens=40, temperature=0) for p in prompts]


def crafted_logits(v: int = 10) -> np.ndarray:
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.02, 0.01, 0.01, 0.005, 0.005])[:v]
    perm = np.random.default_rng(0).permutation(v)  # the likeliest tokens are not the lowest ids
    logits = np.empty(v, dtype=np.float32)
    logits[perm] = np.log(probs)
    return np.repeat(logits[None, :], 4000, axis=0), perm


@pytest.mark.parametrize(("top_k", "top_p", "allowed"), [(3, 1.0, 3), (0, 0.6, 2), (0, 0.66, 3),
                                                         (1, 1.0, 1), (4, 0.5, 2)])
def test_top_k_and_top_p_never_pick_outside_their_set(top_k, top_p, allowed):
    logits, perm = crafted_logits()
    m = _core.Model(10, 8, 1, 2, 4)
    m.reset_cache(1, seed=7)
    picks = set(m.sample(logits, temperature=1.0, top_k=top_k, top_p=top_p))
    assert picks == set(perm[:allowed].tolist())


def test_text_stream_holds_back_a_partial_utf8_character(model):
    tok = model.tokenizer
    byte_ids = [tok.inner.token_to_id(c) for c in ("Ã", "©")]
    assert None not in byte_ids  # the byte-level symbols of "é" = b"\xc3\xa9"
    stream = TextStream(tok)
    assert stream.push(byte_ids[:1]) == ""
    assert stream.push(byte_ids) == "é"
    assert stream.finish(byte_ids) == ""
    dangling = TextStream(tok)
    assert dangling.push(byte_ids[:1]) == ""
    assert dangling.finish(byte_ids[:1]) == "\ufffd"


class CountingTokenizer:
    """The model's tokenizer, counting the ids it decodes."""

    def __init__(self, tok) -> None:
        self.tok, self.decoded = tok, 0

    def decode(self, ids) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids)


def whole_text_stream(tok, ids_by_push: list[list[int]]) -> list[str]:
    """What the stream must give: each push decodes every id so far and shows
    the new text up to any trailing U+FFFD; the end shows the rest."""
    shown, out = 0, []
    for ids in ids_by_push:
        text = tok.decode(ids)
        stable = len(text.rstrip("\ufffd"))
        out.append(text[shown:stable])
        shown = max(shown, stable)
    out.append(tok.decode(ids_by_push[-1])[shown:])
    return out


def test_text_stream_gives_the_whole_texts_increments_decoding_each_id_a_bounded_number_of_times(model):
    tok = model.tokenizer
    # the byte-level symbols of the bytes of characters of 2, 3 and 4 bytes,
    # so that pushes end inside characters (GPT-2's byte-to-symbol map:
    # printable Latin-1 bytes stand for themselves, the others for 256 + n)
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    symbol = {b: chr(b) if b in kept else chr(256 + others.index(b)) for b in range(256)}
    symbols = [tok.inner.token_to_id(symbol[b]) for b in "é€😀".encode()]
    assert None not in symbols
    assert tok.decode(symbols) == "é€😀"
    words = tok.encode("def f(x):\n    return 'café' + \"€\"\n")
    rng = np.random.default_rng(3)
    ids = [int(i) for i in rng.choice(symbols + words, size=3000)]
    prefixes = [ids[:k] for k in range(1, len(ids) + 1)]
    counting = CountingTokenizer(tok)
    stream = TextStream(counting)
    got = [stream.push(p) for p in prefixes] + [stream.finish(ids)]
    assert got == whole_text_stream(tok, prefixes)
    assert "".join(got) == tok.decode(ids)
    # a 3000-token stream: at most a few decodes per id (decoding everything
    # at every push would be 4.5 million)
    assert counting.decoded < 10 * len(ids), counting.decoded


def test_streamed_text_is_the_returned_text(model):
    pieces: list[str] = []
    text = model.generate(PROMPT, max_tokens=30, temperature=1.0, seed=4, stream=pieces.append)
    assert "".join(pieces) == text


def test_seeded_cli_samples_are_reproducible_and_seeds_differ(run_dir, env):
    args = ["generate", str(run_dir), "--prompt", PROMPT, "--max-tokens", "30", "--temperature", "1.0",
            "--top-k", "0", "--num-samples", "2"]
    a, b, c = (cli([*args, "--seed", s], env) for s in ("5", "5", "6"))
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.count("--- sample") == 2
    single = cli(["generate", str(run_dir), "--prompt", PROMPT, "--max-tokens", "30", "--seed", "5"], env)
    api = load(run_dir).generate(PROMPT, max_tokens=30, seed=5)
    assert single.stdout == PROMPT + api + "\n"


def test_prompt_from_stdin_and_from_a_file(run_dir, env, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT)
    base = ["generate", str(run_dir), "--max-tokens", "8", "--seed", "1"]
    from_file = cli([*base, "--prompt-file", str(f)], env)
    from_stdin = cli(base, env, input=PROMPT)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == from_stdin.stdout and from_file.stdout.startswith(PROMPT)


def test_chat_answers_each_line_and_exits_cleanly_at_end_of_input(run_dir, env):
    r = cli(["chat", str(run_dir), "--max-tokens", "5", "--seed", "2"], env, input="def\n\nclass\n")
    assert r.returncode == 0, r.stderr
    # each non-empty line is a prompt of its own, answered as generate() answers it with the turn's seed
    model = load(run_dir)
    replies = [model.generate(prompt, max_tokens=5, seed=seed) for prompt, seed in (("def", 2), ("class", 3))]
    assert all(replies) and replies[0] != replies[1]
    assert r.stdout == f"> def{replies[0]}\n> > class{replies[1]}\n> \n"


def test_chat_exits_cleanly_on_ctrl_c_at_the_prompt(run_dir, env):
    proc = subprocess.Popen([sys.executable, "-m", "crystalline", "chat", str(run_dir)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert "Ctrl-D to quit" in proc.stderr.readline()
    assert proc.stdout.read(2) == "> "  # waiting in input()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def reference_nats(model, ids: list[int]) -> float:
    """Summed cross-entropy of ids[1:], scored in float64 from the logits of
    non-overlapping windows of the block size (the last one shorter)."""
    nats, t = 0.0, model.block_size
    for start in range(0, len(ids) - 1, t):
        window = np.array(ids[start : start + t + 1])
        logits = model.logits(window[:-1]).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nats -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
    return nats


def test_eval_reports_loss_perplexity_and_bits_per_byte(run_dir, env, model):
    path = STDLIB / "json" / "encoder.py"
    r = cli(["eval", str(run_dir), str(path), "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    values = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()}
    text = path.read_text()
    ids = model.tokenizer.encode(text) + [model.tokenizer.eot_id]
    nats = reference_nats(model, ids)
    assert values["tokens"] == f"{len(ids) - 1:,}"
    assert float(values["loss"]) == pytest.approx(nats / (len(ids) - 1), abs=1e-4)
    assert float(values["perplexity"]) == pytest.approx(np.exp(nats / (len(ids) - 1)), abs=0.01)
    assert float(values["bits/byte"]) == pytest.approx(nats / np.log(2) / len(text.encode()), abs=1e-4)


def test_evaluate_predicts_every_token_once_with_the_models_own_loss(model, tmp_path):
    text = (STDLIB / "json" / "scanner.py").read_text()
    (tmp_path / "a.py").write_text(text)
    (tmp_path / "b.py").write_text("x")
    ids = model.tokenizer.encode(text) + [model.tokenizer.eot_id] + model.tokenizer.encode("x") + [model.tokenizer.eot_id]
    t = model.block_size
    assert (len(ids) - 1) % t, "the text should end in a shorter window"
    nats = reference_nats(model, ids)
    seen = []
    result = model.evaluate([tmp_path], progress=lambda done, total: seen.append((done, total)))
    assert (result.files, result.tokens, result.bytes) == (2, len(ids) - 1, len(text.encode()) + 1)
    assert result.nats == pytest.approx(nats, rel=1e-4)
    assert result.loss == pytest.approx(nats / (len(ids) - 1), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(nats / np.log(2) / result.bytes, rel=1e-4)
    windows = -(-(len(ids) - 1) // t)
    assert seen[-1] == (windows, windows) and len(seen) == -(-(windows - 1) // 8) + 1


def test_export_import_round_trip_is_bit_identical(run_dir, model, tmp_path, env):
    r = cli(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")], env)
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == model.block_size
    r = cli(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")], env)
    assert r.returncode == 0, r.stderr
    back = load(tmp_path / "back")
    ours, theirs = model.parameters(), back.parameters()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name
    assert back.generate(PROMPT, max_tokens=10, temperature=0) == model.generate(PROMPT, max_tokens=10, temperature=0)
    saved = back.save(tmp_path / "saved")
    assert checkpoint.load(saved).m.keys() == ours.keys()


def test_an_imported_run_resumes_training_from_its_weights(model, tmp_path, env):
    hf.export(model.path, tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run", data=[str(STDLIB / "json")])
    r = cli(["train", "--resume", str(tmp_path / "run"), "--max-steps", "2", "--no-progress",
             "--sample-tokens", "0"], env)
    assert r.returncode == 0, r.stderr
    assert checkpoint.list_checkpoints(tmp_path / "run")[-1].name == "ckpt-00000002"
    # fresh weights would score about ln V; the imported ones already know the json package
    first = json.loads((tmp_path / "run" / checkpoint.METRICS).read_text().splitlines()[0])
    trained = model.evaluate([STDLIB / "json"], [".py"]).loss
    assert first["loss"] < np.log(model.config.vocab_size) - 0.5 and first["loss"] == pytest.approx(trained, abs=0.3)


def numpy_gpt2_logits(weights: dict[str, np.ndarray], n_head: int, ids: list[int]) -> np.ndarray:
    """GPT-2's forward pass written out in float64 NumPy from the exported
    tensors (Conv1D weights [in, out], tied output head): [T] ids -> [T, V]."""
    w = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in weights.items()}

    def layer_norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def linear(x, name):
        return x @ w[f"{name}.weight"] + w[f"{name}.bias"]

    t = len(ids)
    x = w["wte.weight"][ids] + w["wpe.weight"][:t]
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for layer in range(sum(k.endswith(".ln_1.weight") for k in w)):
        h = f"h.{layer}"
        q, k, v = np.split(linear(layer_norm(x, f"{h}.ln_1"), f"{h}.attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(t, n_head, -1).transpose(1, 0, 2) for a in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + causal
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + linear((att @ v).transpose(1, 0, 2).reshape(t, -1), f"{h}.attn.c_proj")
        a = linear(layer_norm(x, f"{h}.ln_2"), f"{h}.mlp.c_fc")
        gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
        x = x + linear(gelu, f"{h}.mlp.c_proj")
    return layer_norm(x, "ln_f") @ w["wte.weight"].T


def test_a_numpy_gpt2_forward_of_the_export_gives_the_same_logits(model, tmp_path):
    out = hf.export(model.path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    ids = model.tokenizer.encode("import json\n\nclass Decoder:\n    def decode(self, s):\n" * 3)[: model.block_size]
    assert len(ids) == model.block_size
    ours = numpy_gpt2_logits(safetensors.numpy.load_file(out / "model.safetensors"), config["n_head"], ids)
    np.testing.assert_allclose(model.logits(ids), ours, atol=1e-4, rtol=0)


def test_transformers_loads_the_export_with_the_same_logits_and_tokens(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    out = hf.export(model.path, tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "import json\n\nclass Décodeur:\n    pass  # ünïcode → ok\n"
    ids = model.tokenizer.encode(text)[: model.block_size]
    assert tok(text)["input_ids"] == model.tokenizer.encode(text)
    with torch.no_grad():
        logits = theirs(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits, model.logits(ids), atol=1e-4, rtol=0)
    theirs.save_pretrained(tmp_path / "saved")  # transformers' own layout imports too
    tok.save_pretrained(tmp_path / "saved")
    back = load(hf.import_hf(tmp_path / "saved", tmp_path / "run"))
    for name, value in model.parameters().items():
        assert np.array_equal(value, back.parameters()[name]), name


def test_models_lists_shows_info_and_deletes_only_when_asked(run_dir, env, tmp_path):
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run_dir, copy)
    listed = cli(["models", str(tmp_path / "runs")], env)
    assert listed.returncode == 0, listed.stderr
    assert "ckpt-00000020" in listed.stdout and "V=300 C=32 L=2 H=2 T=32" in listed.stdout
    info = cli(["models", "info", str(copy)], env)
    assert info.returncode == 0 and "parameters" in info.stdout and "ckpt-00000020" in info.stdout
    kept = cli(["models", "delete", str(copy)], env, input="n\n")
    assert kept.returncode != 0 and copy.is_dir()
    gone = cli(["models", "delete", str(copy), "--yes"], env)
    assert gone.returncode == 0 and not copy.exists()
    refused = cli(["models", "delete", str(tmp_path), "--yes"], env)
    assert refused.returncode == 2 and tmp_path.is_dir()


def broken_tokenizer_checkpoints(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    missing, changed = tmp_path / "missing", tmp_path / "changed"
    ckpt = checkpoint.resolve(run_dir)
    shutil.copytree(ckpt, missing)
    shutil.copytree(ckpt, changed)
    (missing / "tokenizer.json").unlink()
    with open(changed / "tokenizer.json", "a") as f:
        f.write(" ")
    return missing, changed


def test_bad_input_gets_one_clear_message_and_a_nonzero_exit(run_dir, env, tmp_path):
    missing, changed = broken_tokenizer_checkpoints(run_dir, tmp_path)
    long_prompt = "x = [" + ", ".join(str(i) for i in range(200)) + "]"
    cases = [
        (["generate", str(tmp_path), "--prompt", "x"], "neither a checkpoint"),
        (["generate", str(missing), "--prompt", "x"], "tokenizer.json is missing"),
        (["generate", str(changed), "--prompt", "x"], "not the one the model was trained with"),
        (["generate", str(run_dir), "--prompt", ""], "prompt is empty"),
        (["generate", str(run_dir), "--prompt", long_prompt], "longer than the model's block size"),
        (["generate", str(run_dir), "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["generate", str(run_dir), "--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["generate", str(run_dir), "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["generate", str(run_dir), "--prompt", "x", "--num-samples", "0"], "--num-samples"),
        (["generate", str(run_dir), "--prompt", "x", "--precision", "fp16"], "--precision must be one of"),
        (["chat", str(missing)], "tokenizer.json is missing"),
        (["eval", str(changed), str(STDLIB / "json")], "not the one the model was trained with"),
        (["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")], "unknown --format"),
        (["export", str(run_dir), "--out", str(run_dir)], "not an empty directory"),
        (["import", str(run_dir), "--out", str(tmp_path / "y")], "no config.json"),
    ]
    for args, message in cases:
        r = cli(args, env)
        assert r.returncode != 0, args
        assert message in r.stderr and r.stderr.startswith("error:"), (args, r.stderr)
        assert "Traceback" not in r.stderr, args


def test_import_refuses_models_it_cannot_run(tmp_path, model):
    out = hf.export(model.path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    for change, message in [({"model_type": "llama"}, "only GPT-2"), ({"activation_function": "relu"}, "relu"),
                            ({"tie_word_embeddings": False}, "untied")]:
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(Exception, match=message):
            hf.import_hf(out, tmp_path / "never")
    assert not (tmp_path / "never").exists()


BF16 = pytest.mark.skipif(not _core.bf16_supported(),
                          reason="this CPU lacks avx512_bf16: bf16 weights are tested where the CPU has it")


@BF16
def test_bf16_weights_pick_fp32s_greedy_token_at_least_95_percent_of_the_time(run_dir, model):
    bf = load(run_dir, precision="bf16")
    assert (model.precision, bf.precision) == ("fp32", "bf16")
    text = (STDLIB / "json" / "decoder.py").read_text()
    ids = model.tokenizer.encode(text)
    t = model.block_size
    picks32, picks16 = [], []
    for start in range(0, 256, t):  # 256 next-token predictions, a window at a time
        window = ids[start:start + t]
        l32, l16 = model.logits(window), bf.logits(window)
        assert not np.array_equal(l32, l16), "bf16 must change the rounding"
        picks32 += list(np.argmax(l32, axis=-1))
        picks16 += list(np.argmax(l16, axis=-1))
    assert len(picks32) == 256
    agree = np.mean(np.array(picks32) == np.array(picks16))
    assert agree >= 0.95, f"bf16 picks fp32's greedy token at {agree:.1%} of 256 positions"


@BF16
def test_generate_and_eval_run_in_bf16_from_the_command_line(run_dir, env):
    args = ["generate", str(run_dir), "--prompt", PROMPT, "--max-tokens", "20", "--temperature", "0"]
    r = cli([*args, "--precision", "bf16"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + load(run_dir, precision="bf16").generate(PROMPT, max_tokens=20, temperature=0) + "\n"
    e = cli(["eval", str(run_dir), str(STDLIB / "json"), "--precision", "auto", "--no-progress"], env)
    assert e.returncode == 0 and "perplexity" in e.stdout, e.stderr


def test_auto_follows_the_cpu_and_the_environment_forces_fp32(run_dir, monkeypatch):
    assert load(run_dir, precision="auto").precision == ("bf16" if _core.bf16_supported() else "fp32")
    monkeypatch.setenv("CRYSTALLINE_FORCE_FP32", "1")
    assert load(run_dir, precision="auto").precision == "fp32"
    assert load(run_dir, precision="bf16").precision == "fp32"


@pytest.mark.skipif(_core.bf16_supported(), reason="this CPU has avx512_bf16, so bf16 is not refused")
def test_bf16_is_refused_with_the_reason_where_the_cpu_lacks_it(run_dir, env):
    r = cli(["generate", str(run_dir), "--prompt", PROMPT, "--precision", "bf16"], env)
    assert r.returncode == 2 and "needs a CPU with avx512_bf16" in r.stderr, r.stderr
