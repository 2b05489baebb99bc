"""Training on several processes at once: `mpiexec -n K crystalline train`.

Every process (MPI rank) runs its own kissing-sphere trainer on its share
of each step's batch: the global batch of B sequences is split into K
contiguous runs of rows, B // K each and one more for the first B % K
ranks, and each rank deals its rows into the 12 symmetry groups from the
slot its first row has in the global batch. The ranks' gradients, each
scaled for the mean loss over all B sequences, are summed in place in the
Rust gradient buffer with one MPI Allreduce; then every rank clips and
applies AdamW to the same sum, so the weights stay equal (checked every
`SYNC_INTERVAL` steps). Rank 0 is the cluster's Node Zero: it alone
prepares the data, prints, evaluates, writes metrics and checkpoints.

`Solo` is the one-process case and costs nothing; mpi4py is imported only
when the environment shows an MPI launcher (`connect`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np

from crystalline.errors import UserError

# Variables MPI launchers set in each process they start: MPICH's Hydra and
# Slurm's PMI (PMI_*), Open MPI (OMPI_COMM_WORLD_*), PMIx launchers (PMIX_RANK).
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
# Steps between checks that every rank holds the same weights.
SYNC_INTERVAL = 50
# Seconds between looks while the other ranks wait for rank 0, not spinning a
# core: from the first (a step's metrics line) doubling to the last (a save).
POLL_FIRST_S, POLL_S = 1e-5, 0.01
# Exit code when the ranks' weights fell apart.
OUT_OF_SYNC_EXIT = 1

T = TypeVar("T")


def launched_under_mpi() -> bool:
    """Whether an MPI launcher started this process (from its environment alone)."""
    return any(name in os.environ for name in (*RANK_VARIABLES, *SIZE_VARIABLES))


def launcher_rank() -> int:
    """This process's rank as the launcher's environment says (0 without one),
    without starting MPI: the command line prints errors only on rank 0."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def rows(rank: int, size: int, batch_size: int) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch of `batch_size` that `rank` of
    `size` trains on: contiguous, B // K each, one more for the first B % K."""
    base, extra = divmod(batch_size, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class Solo:
    """One process: every collective is the identity, and a step is the core's `step`."""

    rank, size, leader = 0, 1, True

    def step(self, trainer, batch: np.ndarray, lr: float, interrupted: bool) -> tuple[dict, bool]:
        """One optimizer step of the global `batch`; returns the core's report
        and whether any rank was interrupted (Ctrl-C), so all stop together."""
        return trainer.step(batch, lr), interrupted

    def lead(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 alone and hand its result (or its error) to
        every rank: all call it, the others wait."""
        return work()

    def together(self, work: Callable[[], None]) -> None:
        """Run `work` on every rank; an error on any stops all of them."""
        work()

    def gather(self, value: T) -> list[T] | None:
        """Every rank's `value` on rank 0, in rank order; None elsewhere."""
        return [value]

    def broadcast_weights(self, trainer) -> None:
        """Give every rank rank 0's weights, AdamW moments and counters."""

    def check_in_sync(self, trainer, step: int) -> None:
        """Stop with an error when a rank's weights differ from rank 0's."""

    def describe(self, threads: int) -> list[str]:
        """Lines naming each rank's process and host, for Node Zero's plan."""
        return []


class Cluster(Solo):
    """K > 1 MPI ranks on `comm` (mpi4py's COMM_WORLD)."""

    def __init__(self, comm) -> None:
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.leader = self.rank == 0

    def step(self, trainer, batch: np.ndarray, lr: float, interrupted: bool) -> tuple[dict, bool]:
        """This rank's rows forward and backward, the gradients summed in place
        over the ranks, then the same clipped AdamW step on every rank. The
        report's loss, grad_norm and stop flag are the cluster's."""
        b, t = batch.shape[0], batch.shape[1] - 1
        lo, hi = rows(self.rank, self.size, b)
        report = trainer.gradients(batch[lo:hi], batch_size=b, offset=lo)
        start = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, trainer.gradient())
        sums = np.array([report["loss_sum"], float(interrupted)])
        self.comm.Allreduce(self.MPI.IN_PLACE, sums)
        report["allreduce_s"] = time.perf_counter() - start
        report["loss"] = sums[0] / (b * t)
        report["grad_norm"] = trainer.apply(lr, report["loss"])
        return report, bool(sums[1])

    def lead(self, work: Callable[[], T]) -> T:
        """Rank 0 runs `work` while the others wait without spinning; its
        result, or its error, reaches every rank, so a bad input stops all
        of them with rank 0's message (which only rank 0 prints)."""
        outcome: tuple[str, object, int]
        if self.leader:
            try:
                outcome = ("ok", work(), 0)
            except UserError as err:
                outcome = ("error", str(err), err.exit_code)
            except KeyboardInterrupt:
                outcome = ("interrupted", "interrupted", 130)
            except BaseException as err:
                outcome = ("failed", f"rank 0 failed: {err!r}", 1)
                self._share(outcome)
                raise
            kind, value, code = self._share(outcome)
        else:
            with rank_0_decides():  # a Ctrl-C reaches rank 0 too, which says what comes of it
                kind, value, code = self._share(None)
        if kind == "ok":
            return value  # type: ignore[return-value]
        if kind == "interrupted":
            raise KeyboardInterrupt
        raise UserError(str(value), exit_code=code)

    def _share(self, outcome: tuple | None) -> tuple:
        self.wait_for_leader()
        return self.comm.bcast(outcome)

    def together(self, work: Callable[[], None]) -> None:
        """Every rank runs `work`; the first rank's error (by rank) stops all,
        with its message (printed by rank 0)."""
        try:
            work()
            mine = None
        except UserError as err:
            mine = (str(err), err.exit_code)
        errors = self.comm.allgather(mine)
        for rank, error in enumerate(errors):
            if error is not None:
                message, code = error
                raise UserError(message if rank == 0 else f"rank {rank}: {message}", exit_code=code)

    def wait_for_leader(self) -> None:
        """Wait until every rank is here, rank 0 last, sleeping between looks."""
        request, pause = self.comm.Ibarrier(), POLL_FIRST_S
        while not request.Test():
            time.sleep(pause)
            pause = min(2 * pause, POLL_S)

    def gather(self, value: T) -> list[T] | None:
        return self.comm.gather(value)

    def broadcast_weights(self, trainer) -> None:
        m, v = trainer.optimizer_state()
        for views in (trainer.parameters(), m, v):
            for view in views.values():
                self.comm.Bcast(view)
        trainer.step_count, trainer.dealt = self.comm.bcast((trainer.step_count, trainer.dealt))
        trainer.set_precision(trainer.precision)  # bf16: round the weights just received, as rank 0 did its own

    def check_in_sync(self, trainer, step: int) -> None:
        sums = self.comm.allgather(sum(float(p.sum(dtype=np.float64)) for p in trainer.parameters().values()))
        apart = [r for r, s in enumerate(sums) if s != sums[0]]
        if apart:
            raise UserError(
                f"the weights of rank(s) {', '.join(map(str, apart))} differ from rank 0's after step {step} "
                f"(checksums {', '.join(f'{s!r}' for s in sums)}); the ranks fell out of step, so the run stops "
                "here without saving: resume from the last checkpoint", exit_code=OUT_OF_SYNC_EXIT)

    def describe(self, threads: int) -> list[str]:
        where = self.comm.allgather((os.getpid(), socket.gethostname()))
        return [f"[Rank {r}] pid {pid} on {host}, {threads} sphere threads" for r, (pid, host) in enumerate(where)]


@contextlib.contextmanager
def rank_0_decides() -> Iterator[None]:
    """Ignore Ctrl-C in a rank waiting for rank 0 (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def connect() -> Solo:
    """The processes training together: `Solo` unless an MPI launcher
    started this one with others, then a `Cluster` over mpi4py (which must
    then be installed)."""
    if not launched_under_mpi():
        return Solo()
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("install crystalline[mpi] to train on several processes "
                        "(pip install 'crystalline-cllm[mpi]': mpi4py and MPICH)") from None
    comm = MPI.COMM_WORLD
    return Cluster(comm) if comm.Get_size() > 1 else Solo()
