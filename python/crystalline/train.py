"""Training: the `Trainer` that drives the Rust kissing-sphere trainer over a
prepared dataset, with the learning-rate schedule, validation, metrics,
checkpoints, resume and a sample at the end. Its settings are a
`crystalline.config.TrainConfig`.

`crystalline train` is a thin layer over `TrainConfig` and `Trainer.run()`;
`crystalline.train(config)` runs one from Python.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from crystalline import _core, checkpoint, estimate, locks, tensorboard_log
from crystalline.atomic import DiskFull, disk_full_at
from crystalline.cluster import SYNC_INTERVAL, Solo, connect
from crystalline.config import WATCH_EPOCHS, TrainConfig, capped_threads, resume_config
from crystalline.data import corpus, sizing
from crystalline.data.prepare import Dataset, prepare_for_training
from crystalline.errors import UserError
from crystalline.guard import check_writable, core_refusals, ensure_memory
from crystalline.inference import Sampling, load, windows
from crystalline.precision import resolve as resolve_precision

# Seconds between looks at a --watch directory that holds too little data to train.
WATCH_POLL_S = 2.0


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr_ratio *
    peak at total_steps; constant after warmup when the end is unknown
    (a --watch run)."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if total_steps is None:
        return peak
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = peak * cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@dataclass
class Run:
    """What a finished (or interrupted) run did."""

    run_dir: Path
    steps: int
    losses: list[float]
    val_losses: list[tuple[int, float]]
    last_checkpoint: Path | None
    interrupted: bool = False
    sample: str | None = None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@dataclass
class EpochTally:
    """Node Zero's figures for the epoch so far (this session's steps of it),
    summed from the core's step reports."""

    spheres: list[dict]  # per sphere: sequences, busy_s, tokens, loss_sum
    groups: list[int]  # sequences the core dealt to each symmetry group
    losses: list[float] = field(default_factory=list)  # each step's loss
    wall: float = 0.0  # seconds of compute

    @classmethod
    def start(cls, threads: int) -> EpochTally:
        return cls([dict(sequences=0, busy_s=0.0, tokens=0, loss_sum=0.0) for _ in range(threads)],
                   [0] * _core.SYMMETRY_GROUPS)

    def add(self, report: dict) -> None:
        """Count one step's report from the core."""
        self.wall += report["compute_s"]
        self.losses.append(report["loss"])
        self.groups = [a + b for a, b in zip(self.groups, report["group_sequences"])]
        for total, sphere in zip(self.spheres, report["spheres"]):
            for key in total:
                total[key] += sphere[key]


def sphere_loss(sphere: dict) -> float:
    """Mean loss of the tokens a sphere (or its tally) scored."""
    return sphere["loss_sum"] / sphere["tokens"] if sphere["tokens"] else float("nan")


class Trainer:
    """Prepares data, builds the Rust trainer and runs the training loop."""

    def __init__(self, config: TrainConfig, console: Console | None = None) -> None:
        if not config.checkpoint_dir:
            config = replace(config, checkpoint_dir=str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
        self.cfg = config
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.run_dir = Path(config.checkpoint_dir)
        self.resume_from: Path | None = None
        self._stop = False  # save and stop after this step (Ctrl-C on any rank)
        self._interrupted = False  # Ctrl-C reached this process
        self._created_run_dir = False  # this run made its directory (removed again if setting up fails)
        self.cluster: Solo = Solo()  # the processes training together (`run` connects them)
        self._waiting = False  # a --watch run has said it waits for data
        self._order_cache: tuple[int, int, np.ndarray] | None = None  # (epoch, sequences, permutation)
        self.losses: list[float] = []  # each step's loss, this session
        self.val_losses: list[tuple[int, float]] = []  # (step, validation loss), this session
        self.val: float | None = None  # the latest validation loss
        self.last_checkpoint: Path | None = None
        self._tally = EpochTally.start(config.threads)  # what the core dealt and each sphere did, this epoch
        self._datasets = contextlib.ExitStack()  # holds the dataset in use (locks.using) while the run lasts
        self.estimate: estimate.Estimate | None = None  # the run's expected time, from a probe of its config
        self.dataset: Dataset | None = None  # the prepared data (set up by _load_data)

    # -- setup -------------------------------------------------------------

    @classmethod
    def resuming(cls, run_dir: Path | str, overrides: dict | None = None, console: Console | None = None) -> Trainer:
        """A trainer that continues the run in `run_dir` from its latest
        checkpoint, with its saved settings; `overrides` may change only how
        the run is watched, saved and how far it goes."""
        ckpt = checkpoint.resolve(Path(run_dir))
        saved = checkpoint.read_state(ckpt).config
        trainer = cls(resume_config(saved, overrides or {}, run_dir), console)
        trainer.resume_from = ckpt
        return trainer

    def setup(self) -> None:
        """Check the run directory (locked by `run`), prepare the data, pick
        the shape for --preset auto, build the Rust trainer (restoring a
        resumed run) and report the plan."""
        self._check_run_dir()
        auto = self.cfg.preset == "auto" and self.resume_from is None  # a resumed run keeps the shape it chose
        if not auto:  # before preparing any data; an auto shape is known only after
            self._check_memory()
        self._find_data()
        data_bytes = corpus.total_bytes(self.paths, self.extensions) if auto else 0
        if auto:  # the tokenizer needs its vocabulary first: the design table's for the data size
            self.cfg = replace(self.cfg, vocab_size=sizing.vocab_for(data_bytes))
        while self.cfg.watch and not self._has_text():
            self._wait(f"no text files in {self.cfg.watch} yet")
        self._load_data(progress=self.cfg.progress)
        if auto:
            rec = sizing.recommend(len(self.train_tokens), data_bytes)
            self.cfg = replace(self.cfg, n_embd=rec.n_embd, n_layer=rec.n_layer, n_head=rec.n_head)
            self._check_memory()
        self._check_data()
        self._report_plan()
        if self.cfg.estimate:
            self._estimate()
        self._build_trainer()

    def _check_memory(self) -> None:
        """Refuse a shape, batch and thread count whose training buffers
        need more memory than is available, before allocating them."""
        cfg = self.cfg
        with core_refusals():
            needed = cfg.model_config().training_memory_bytes(cfg.batch_size, cfg.seq_len, cfg.threads, cfg.cores,
                                                              resolve_precision(cfg.precision))
        ensure_memory(needed, f"training a model of {cfg.model_config().num_parameters():,} parameters",
                      "choose a smaller --embed-dim, --num-layers, --vocab-size, --batch-size or --seq-len")

    def _check_run_dir(self) -> None:
        if self.resume_from is None and checkpoint.list_checkpoints(self.run_dir):
            raise UserError(
                f"--checkpoint-dir {self.run_dir} already holds a run; add --resume to continue it "
                "or choose another --checkpoint-dir"
            )

    def _find_data(self) -> None:
        """The paths to train on, absolute so a resumed run finds them from any directory."""
        cfg = self.cfg = replace(self.cfg, data=[str(Path(p).expanduser().resolve()) for p in self.cfg.data],
                                 watch=str(Path(self.cfg.watch).resolve()) if self.cfg.watch else None)
        paths = [Path(p) for p in cfg.data] + ([Path(cfg.watch)] if cfg.watch else [])
        if not paths:
            paths = corpus.builtin_corpus_paths()
            where = os.path.commonpath([str(p) for p in paths])
            self.console.print(f"[Node Zero] No data given: training on the built-in corpus, "
                               f"the {len(paths):,} .py files of the standard library in {where}")
        self.paths = paths
        self.extensions = cfg.extensions or ([".py"] if not cfg.data and not cfg.watch else None)

    def _check_data(self) -> None:
        """Refuse a tokenizer larger than the vocabulary, or another than a
        resumed run's; refuse (or, watching, wait for) data too small for one
        step; warn about too few tokens per parameter."""
        cfg, ds = self.cfg, self.dataset
        if ds.vocab_size > cfg.vocab_size:
            raise UserError(
                f"--vocab-size {cfg.vocab_size} is smaller than the tokenizer's {ds.vocab_size} tokens; "
                f"use --vocab-size {ds.vocab_size} or another tokenizer"
            )
        while True:
            try:
                warnings = sizing.check_data(cfg.model_config(), len(self.train_tokens), cfg.batch_size, cfg.seq_len)
                break
            except UserError as err:
                if not cfg.watch:
                    raise
                self._wait_for_data(err)
        for warning in warnings:
            self.console.print(f"[yellow]warning:[/] {warning}")
        if self.resume_from and checkpoint.read_state(self.resume_from).tokenizer_hash != self.dataset.tokenizer_hash:
            raise UserError(
                f"the tokenizer of {self.resume_from} differs from the one the data was prepared with; "
                "resume with the same data and tokenizer"
            )

    def _build_trainer(self) -> None:
        cfg = self.cfg
        with core_refusals():
            self.trainer = _core.Trainer(**asdict(cfg.model_config()), threads=cfg.threads, cores=cfg.cores, seed=cfg.seed,
                                         weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
        self.step, self.epoch, self.pos = 0, 0, 0
        if self.resume_from is not None and self.cluster.leader:  # the other ranks take rank 0's weights
            self._restore(self.resume_from)
        self.trainer.set_precision(resolve_precision(cfg.precision))  # after a restore: it rounds the weights

    def _estimate(self) -> None:
        """Probe the config (before the real trainer exists, so the two never
        share memory) and say how long an epoch and the run will take, and
        what would shorten a long run."""
        cfg, mc = self.cfg, self.cfg.model_config()
        done = checkpoint.read_state(self.resume_from).step if self.resume_from else 0
        self.estimate = estimate.for_run(cfg, len(self.train_tokens), len(self.val_tokens), done)
        for label, line in zip(("estimate: ", ""), self.estimate.lines(cfg.batch_size * cfg.seq_len)):
            self.console.print(f"[Node Zero] {label}{line}", markup=False, highlight=False)
        smaller = sizing.recommend(len(self.train_tokens), self.dataset.source_bytes())
        smaller = replace(smaller, vocab_size=mc.vocab_size, block_size=cfg.seq_len)
        for line in estimate.advice(self.estimate, mc, cfg.seq_len, cfg.threads, cfg.batch_size, smaller, cfg.cores):
            self.console.print(f"[Node Zero] to shorten it: {line}", markup=False, highlight=False)

    def _report_plan(self) -> None:
        cfg, mc, c = self.cfg, self.cfg.model_config(), self.console
        c.print(
            f"[Node Zero] model: {mc.num_parameters():,} parameters (V={mc.vocab_size}, C={mc.n_embd}, "
            f"L={mc.n_layer}, NH={mc.n_head}, T={mc.block_size})"
        )
        planned = "until stopped" if self.total_steps is None else f"{self.total_steps:,} steps planned"
        c.print(
            f"[Node Zero] data: {len(self.train_tokens):,} training tokens, {len(self.val_tokens):,} validation; "
            f"{cfg.batch_size * cfg.seq_len:,} tokens per step, {self.steps_per_epoch:,} steps per epoch, {planned}"
        )
        mem = mc.training_memory_bytes(cfg.batch_size, cfg.seq_len, cfg.threads, cfg.cores,
                                       resolve_precision(cfg.precision))
        cores = cfg.cores or _core.available_cores()  # the trainer's (built after the estimate's probe)
        teams = _core.plan_teams(threads=cfg.threads, cores=cores, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
        c.print(f"[Node Zero] {cfg.threads} sphere threads (Node Zero + {max(cfg.threads - 1, 0)} workers) on "
                f"{cores} cores: {len(teams['cores'])} lanes, teams of {', '.join(map(str, teams['cores']))} cores; "
                f"training buffers need about {mem / 2**20:,.0f} MiB; matmuls in {resolve_precision(cfg.precision)}")

    def _load_data(self, progress: bool) -> bool:
        """(Re)prepare the data, incrementally; True when the training split changed."""
        cfg = self.cfg
        first = self.dataset is None
        self.dataset = prepare_for_training(
            self.paths,
            cfg.vocab_size,
            tokenizer=Path(cfg.tokenizer) if cfg.tokenizer else None,
            val_fraction=cfg.val_fraction,
            progress=progress,
            extensions=self.extensions,
            hold=self._datasets if first else None,
        )
        self.dataset.check_token_ids()
        return self._use_dataset(self.dataset)

    def _use_dataset(self, dataset: Dataset) -> bool:
        """Memory-map `dataset` and plan the epochs; True when the training split changed."""
        cfg = self.cfg
        self.dataset = dataset
        if dataset.vocab_size < cfg.vocab_size and self.resume_from is None:
            # the text had fewer tokens than asked: the model gets the tokenizer's
            # real vocabulary, not rows no token id can reach (a resumed run keeps its shape)
            cfg = self.cfg = replace(cfg, vocab_size=dataset.vocab_size)
        old = len(getattr(self, "train_tokens", ()))
        self.train_tokens = self.dataset.train_tokens()
        self.val_tokens = self.dataset.val_tokens()
        self.sequences = max(0, (len(self.train_tokens) - 1) // cfg.seq_len)
        self.steps_per_epoch = estimate.steps_per_epoch(cfg, len(self.train_tokens))
        self.total_steps = estimate.planned_steps(cfg, len(self.train_tokens))  # None: until stopped
        return len(self.train_tokens) != old

    def _has_text(self) -> bool:
        try:
            corpus.walk(self.paths, self.extensions)
        except UserError:
            return False
        return True

    def _wait(self, why: str) -> None:
        """A --watch run without enough data: say so once, look again soon."""
        if not self._waiting:
            self.console.print(f"[Node Zero] waiting for data in {self.cfg.watch}: {why}")
            self._waiting = True
        time.sleep(WATCH_POLL_S)

    def _wait_for_data(self, why: UserError) -> None:
        self._wait(str(why))
        self._load_data(progress=False)

    def _refresh_watched(self) -> bool:
        """Pick up files added to or changed in the watched directory (at the
        next chance when another run is preparing the same data)."""
        try:
            changed = self._load_data(progress=False)
        except locks.InUse:
            return False
        while self.steps_per_epoch == 0:  # files were removed: wait until one step fits again
            self._wait_for_data(UserError(f"{len(self.train_tokens):,} tokens are fewer than one step"))
            changed = True
        if changed:
            report = self.dataset.report
            files = report.files_encoded if report else 0
            self.console.print(
                f"[Node Zero] watch: {files} new or changed file(s); now {len(self.train_tokens):,} training tokens, "
                f"{self.steps_per_epoch:,} steps per epoch"
            )
        return changed

    def _finished(self) -> bool:
        if self.total_steps is not None and self.step >= self.total_steps:
            return True
        return self.epoch >= self.cfg.epochs

    def _restore(self, ckpt_path: Path) -> None:
        ck = checkpoint.load(ckpt_path)
        checkpoint.restore_into(ck, self.trainer)
        st = ck.state
        self.step, self.epoch, self.pos = st.step, st.epoch, st.epoch_step
        self.trainer.dealt = st.dealt
        self.console.print(f"[Node Zero] resumed from {ck.path} at step {self.step}")

    # -- data --------------------------------------------------------------

    def batch(self, epoch: int, i: int) -> np.ndarray:
        """The [B, T+1] windows of step i of `epoch`, which visits the
        sequences in a permutation seeded by (seed, epoch)."""
        cfg = self.cfg
        order = self._order(epoch)
        picks = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        starts = picks.astype(np.int64) * cfg.seq_len
        return self.train_tokens[starts[:, None] + np.arange(cfg.seq_len + 1)]

    def _order(self, epoch: int) -> np.ndarray:
        cached = self._order_cache
        if cached is None or cached[:2] != (epoch, self.sequences):
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.sequences)
            self._order_cache = (epoch, self.sequences, perm)
        return self._order_cache[2]

    def val_loss(self) -> float | None:
        """Mean loss over the first eval_batches batches of validation windows."""
        cfg = self.cfg
        weighted, n = 0.0, 0
        for batch in windows(self.val_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches * cfg.batch_size):
            weighted += self.trainer.eval(batch) * len(batch)
            n += len(batch)
        return weighted / n if n else None

    # -- reports -----------------------------------------------------------

    def _epoch_end(self, epoch: int) -> None:
        """What the core did in the epoch's steps of this session, in
        sequences (of --seq-len tokens): how many it dealt to each symmetry
        group (in rotation, so shares differ by at most one whatever the
        corpus) and each worker sphere's share and mean loss; then a fresh tally."""
        tally, c = self._tally, self.console
        tallies = self.cluster.gather(tally)  # every rank's, on rank 0
        self._tally = EpochTally.start(self.cfg.threads)
        if tallies is None:
            return
        first = self.step - len(tally.losses) + 1
        where = f" over {len(tallies)} ranks" if len(tallies) > 1 else ""
        c.print(f"[Node Zero] Distribution by symmetry group (epoch {self._epoch_name(epoch)}, "
                f"steps {first}-{self.step}), sequences dealt{where}:")
        groups = [sum(t.groups[g] for t in tallies) for g in range(_core.SYMMETRY_GROUPS)]
        dealt = sum(groups)
        for g, n in enumerate(groups):
            c.print(f"  Group {g:2d}: {n} sequences ({100 * n / max(dealt, 1):.1f}%)")
        if len(tallies) > 1 and self.cfg.verbose:
            for r, t in enumerate(tallies):
                ran = sum(s["sequences"] for s in t.spheres)
                loss = sum(s["loss_sum"] for s in t.spheres) / max(sum(s["tokens"] for s in t.spheres), 1)
                c.print(f"[Rank {r}] {ran} sequences, groups {t.groups}, loss={loss:.4f}")
        for i, s in enumerate(tally.spheres):
            if i == 0 and self.cfg.threads > 1:
                continue
            busy = 100 * s["busy_s"] / tally.wall if tally.wall > 0 else 0.0
            c.print(f"[Sphere {i}] {s['sequences']} sequences, busy {busy:.0f}%, loss={sphere_loss(s):.4f}")
        avg = sum(tally.losses) / len(tally.losses) if tally.losses else float("nan")
        c.print(f"Epoch {self._epoch_name(epoch)} complete, average loss: {avg:.4f}")

    def _epoch_name(self, epoch: int) -> str:
        return f"{epoch + 1}" if self.cfg.epochs == WATCH_EPOCHS else f"{epoch + 1}/{self.cfg.epochs}"

    # -- the loop ----------------------------------------------------------

    def _state(self) -> checkpoint.State:
        return checkpoint.State(
            config=self.cfg,
            model=self.cfg.model_config(),
            step=self.step,
            epoch=self.epoch,
            epoch_step=self.pos,
            optimizer_step=self.trainer.step_count,
            dealt=self.trainer.dealt,
            tokenizer_hash=self.dataset.tokenizer_hash,
            train_loss=self.losses[-1] if self.losses else None,
            val_loss=self.val,
        )

    def save(self) -> Path:
        m, v = self.trainer.optimizer_state()
        return checkpoint.save(self.run_dir, self.trainer.parameters(), m, v, self._state(),
                               self.dataset.tokenizer_path, self.cfg.keep)

    def run(self) -> Run:
        """Lock the run directory, set up, train until the plan is done or
        Ctrl-C (saving every --save-interval steps and at the end), then
        sample the model. Under MPI, rank 0 does all of that and the other
        ranks train with it (`_follow`)."""
        self.cfg.validate()
        self.cluster = connect()
        self.console.quiet = self.console.quiet or not self.cluster.leader
        self._check_cluster()
        if self.cfg.tensorboard:  # before any work: say which extra is missing
            tensorboard_log.require()
        threads, warning = capped_threads(self.cfg.threads)
        if warning:
            self.console.print(f"[yellow]warning:[/] {warning}")
            self.cfg = replace(self.cfg, threads=threads)
            self._tally = EpochTally.start(threads)
        if self.cfg.cores is not None and self.cfg.cores > _core.available_cores():
            self.console.print(f"[yellow]note:[/] --cores {self.cfg.cores} is more than the {_core.available_cores()} "
                               "this process may use; the teams share them (slower, with the results of "
                               f"{self.cfg.cores} cores)")
        if not self.cluster.leader:
            return self._follow()
        with contextlib.ExitStack() as lock, self._datasets:
            try:
                self.cluster.lead(lambda: self._lock_and_set_up(lock))
                self._join_cluster()
            except BaseException:
                if self._created_run_dir:
                    self._remove_run_dir()
                raise
            self._train_locked()
            return self._finish()

    def _lock_and_set_up(self, lock: contextlib.ExitStack) -> dict:
        """Check, make and lock (held by `lock`) the run directory, then set
        up; returns what the other ranks need, which they wait for."""
        check_writable(self.run_dir, "--checkpoint-dir")
        self._created_run_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock.enter_context(locks.locked(self.run_dir))
        self.setup()
        return dict(config=self.cfg, dataset=self.dataset, position=(self.step, self.epoch, self.pos))

    def _check_cluster(self) -> None:
        """Refuse what several ranks cannot do (checked alike on every rank)."""
        k, cfg = self.cluster.size, self.cfg
        if k == 1:
            return
        if cfg.watch is not None:
            raise UserError("--watch trains in one process; start it without mpiexec")
        if cfg.batch_size < k:
            raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {k} MPI ranks: each rank needs "
                            f"a sequence of every step; use --batch-size {k} or more")

    def _join_cluster(self) -> None:
        """Every rank builds its trainer (each refusal stops all), takes rank
        0's weights and optimizer state, and rank 0 names the ranks."""
        cluster = self.cluster
        cluster.together(self._build_follower if not cluster.leader else lambda: None)
        cluster.broadcast_weights(self.trainer)
        for line in cluster.describe(self.cfg.threads):
            self.console.print(line)

    def _build_follower(self) -> None:
        self._check_memory()
        self._build_trainer()

    def _follow(self) -> Run:
        """A rank other than 0: take rank 0's settings and prepared data (it
        prepares while the others wait), then train in step with it,
        printing and saving nothing."""
        shared = self.cluster.lead(self._lock_and_set_up)  # run by rank 0, not here
        self.cfg = shared["config"]
        self._use_dataset(shared["dataset"])
        self._join_cluster()
        self.step, self.epoch, self.pos = shared["position"]
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with self._progress_bar() as bar:
                self._train(None, bar, None)
        finally:
            signal.signal(signal.SIGINT, previous)
        return self._finish()

    def _remove_run_dir(self) -> None:
        """Remove the run directory this run made when setting up failed, if
        nothing but the lock file is in it."""
        if [p.name for p in self.run_dir.iterdir()] == [locks.LOCK_NAME]:
            (self.run_dir / locks.LOCK_NAME).unlink()
            self.run_dir.rmdir()

    def _train_locked(self) -> None:
        """The training loop, with metrics.jsonl cut back to the step it
        starts from (a crash may have left later records, or half of one)."""
        self.last_checkpoint = self.resume_from
        checkpoint.remove_temporaries(self.run_dir)
        metrics_path = self.run_dir / checkpoint.METRICS
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with disk_full_at(metrics_path):
                checkpoint.cut_metrics(self.run_dir, self.step)
                with (open(metrics_path, "a", buffering=1) as metrics, self._progress_bar() as bar,
                      tensorboard_log.opened(self.run_dir, self.step + 1, self.cfg.tensorboard) as board):
                    self._train(metrics, bar, board)
        except DiskFull as err:
            advice = "free some space, then start again"
            if self.last_checkpoint is not None:
                advice = (f"the last checkpoint, {self.last_checkpoint}, is intact: free some space, then continue "
                          f"with `crystalline train --resume {self.run_dir}`")
            raise UserError(f"{err}; {advice}") from None
        finally:
            signal.signal(signal.SIGINT, previous)

    def _progress_bar(self) -> Progress:
        return Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("left: epoch {task.fields[epoch_eta]}, run {task.fields[run_eta]}"),
            console=self.console, disable=not (self.cfg.progress and self.cluster.leader), transient=False,
        )

    def _train(self, metrics: TextIO | None, bar: Progress, board: tensorboard_log.TensorBoardLog | None) -> None:
        """Step until the plan is done or Ctrl-C: each step's record (to
        metrics.jsonl, and to TensorBoard with --tensorboard), then the end of
        the epoch and a checkpoint when they are due. Under MPI every rank
        steps; rank 0 alone validates, writes `metrics` and `board` and
        saves, while the others wait for it (and stop with it if that fails)."""
        cluster = self.cluster
        task = bar.add_task("train", total=self.total_steps, completed=self.step, epoch=self.epoch + 1,
                            loss="-", tps="-", epoch_eta="-", run_eta="-")
        # seconds per step (validations and checkpoints in), a moving average from the probe's step time
        # (or, without a probe, from the first step's); ranks other than 0 show no bar
        step_s = self.estimate.probe.step_s if self.estimate is not None else None
        # Ctrl-C's handler may run anywhere in the loop: read its flag once a
        # step, so that the step that sees it is the one that saves and ends
        stop = False
        while not self._finished() and not stop:
            t0 = time.perf_counter()
            record = self._step()
            last = self.total_steps is not None and self.step >= self.total_steps
            if self.step % SYNC_INTERVAL == 0 or last:
                cluster.check_in_sync(self.trainer, self.step)
            cluster.lead(lambda: self._record(record, last, metrics, board))
            bar.update(task, advance=1, epoch=self.epoch + 1, loss=f"{record['loss']:.4f}",
                       tps=f"{record['tokens_per_s']:,.0f}")
            if self._end_epoch_if_due(last):
                bar.update(task, total=self.total_steps)
            stop = self._stop
            if self.step % self.cfg.save_interval == 0 or self._finished() or stop:
                cluster.lead(self._save_checkpoint)
            took = time.perf_counter() - t0
            step_s = took if step_s is None else 0.9 * step_s + 0.1 * took
            bar.update(task, **self._etas(step_s))

    def _etas(self, step_s: float) -> dict:
        """The progress bar's times left in the epoch and the run at `step_s`
        seconds a step; a run that ends within the epoch ends the epoch's too."""
        epoch = self.steps_per_epoch - self.pos
        if self.total_steps is None:
            return dict(epoch_eta=estimate.duration(epoch * step_s), run_eta="open-ended")
        run = self.total_steps - self.step
        return dict(epoch_eta=estimate.duration(min(epoch, run) * step_s), run_eta=estimate.duration(run * step_s))

    def _record(self, record: dict, last: bool, metrics: TextIO,
                board: tensorboard_log.TensorBoardLog | None) -> None:
        """The validation loss when it is due, then the step's line in
        metrics.jsonl and its scalars in TensorBoard."""
        if self.step % self.cfg.eval_interval == 0 or last:
            self._validate(record)
        metrics.write(json.dumps(record) + "\n")
        if board is not None:
            board.add(record)

    def _save_checkpoint(self) -> None:
        self.last_checkpoint = self.save()

    def _step(self) -> dict:
        """One optimizer step on the next batch; returns its metrics record."""
        cfg = self.cfg
        if self.pos == 0:
            self.trainer.dealt = 0
        lr = lr_at(self.step, cfg, self.total_steps)
        batch = self.batch(self.epoch, self.pos)
        t0 = time.perf_counter()
        try:
            r, stop = self.cluster.step(self.trainer, batch, lr, self._interrupted)
        except FloatingPointError as err:
            where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise UserError(
                f"training diverged at step {self.step + 1}: {err}{where}. "
                "Lower --learning-rate or raise --warmup-steps", exit_code=3
            ) from None
        tps = cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
        self._stop = self._stop or stop
        self.step += 1
        self.pos += 1
        self.losses.append(r["loss"])
        self._tally.add(r)
        if cfg.verbose:
            for i, s in enumerate(r["spheres"]):
                if s["micro_batches"]:
                    self.console.print(f"[Sphere {i}] Forward pass complete, loss={sphere_loss(s):.4f}")
        record = {"step": self.step, "epoch": self.epoch + 1, "loss": r["loss"], "lr": lr, "grad_norm": r["grad_norm"],
                  "tokens_per_s": tps, "sphere_busy_s": [s["busy_s"] for s in r["spheres"]],
                  "compute_s": r["compute_s"], "group_sequences": r["group_sequences"]}
        if "allreduce_s" in r:  # several ranks: rank 0's seconds in the gradient sum
            record["allreduce_s"] = r["allreduce_s"]
        return record

    def _validate(self, record: dict) -> None:
        self.val = self.val_loss()
        if self.val is not None:
            self.val_losses.append((self.step, self.val))
            record["val_loss"] = self.val
            self.console.print(f"[Node Zero] step {self.step}: train loss {record['loss']:.4f}, "
                               f"val loss {self.val:.4f}")

    def _end_epoch_if_due(self, last: bool) -> bool:
        """End the epoch when its steps are done, the run is, or a watched
        directory grew (the next epoch then runs over the larger dataset);
        True when a new epoch begins."""
        cfg = self.cfg
        grew = (cfg.watch is not None and cfg.watch_interval is not None
                and self.step % cfg.watch_interval == 0 and self._refresh_watched())
        if not (self.pos >= self.steps_per_epoch or last or grew):
            return False
        self._epoch_end(self.epoch)
        if last:
            return False
        self.epoch, self.pos = self.epoch + 1, 0
        if cfg.watch is not None and not grew:
            self._refresh_watched()
        return True

    def _finish(self) -> Run:
        interrupted = self._stop and not self._finished()
        if interrupted:
            self.console.print(f"[Node Zero] interrupted: saved {self.last_checkpoint}; continue with "
                               f"`crystalline train --resume {shlex.quote(str(self.run_dir))}`")
        # the other ranks end with rank 0, not spinning in MPI's finalize while it samples
        sample = self.cluster.lead(lambda: self._final_sample(interrupted))
        if not self.cluster.leader:
            sample = None  # printed by rank 0 alone
        return Run(self.run_dir, self.step, self.losses, self.val_losses, self.last_checkpoint, interrupted, sample)

    def _final_sample(self, interrupted: bool) -> str | None:
        if interrupted or self.cfg.sample_tokens <= 0 or self.last_checkpoint is None:
            return None
        return self.sample(self.last_checkpoint, self.cfg.sample_tokens)

    def _on_sigint(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        if self.cluster.size == 1:  # several ranks stop after the step in which all of them learn of it
            self._stop = True

    def sample(self, checkpoint_path: Path, n_tokens: int, prompt: str = "import os\nimport sys\n\n\ndef ") -> str:
        """A short text from the trained model, with the KV-cache generator:
        the prompt's last tokens that fit in half the block size (so a short
        context still leaves room to generate), then what follows them."""
        model = load(checkpoint_path, threads=min(self.cfg.threads, _core.available_cores()))
        ids = model.tokenizer.encode(prompt)[-max(1, model.block_size // 2) :]
        sampling = Sampling(n_tokens, temperature=0.8, top_k=40, seed=self.cfg.seed)
        return model.tokenizer.decode(ids + model.generate_ids([ids], sampling)[0])


def train(config: TrainConfig, console: Console | None = None) -> Run:
    """Run training from Python; see TrainConfig for the settings."""
    return Trainer(config, console).run()


def resume(run_dir: Path | str, console: Console | None = None, **overrides) -> Run:
    """Continue the run in `run_dir` from its latest checkpoint (e.g. with a
    larger `max_steps` or `epochs`)."""
    return Trainer.resuming(run_dir, overrides, console).run()
