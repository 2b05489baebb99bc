"""`mpiexec -n 2 crystalline train`, with real MPI (mpi4py and MPICH's
mpiexec): two ranks match one process to float rounding and are
bit-identical from run to run; only rank 0 prints and saves; bad input is
one message and exit 2 on every rank; a rank killed with kill -9 stops the
job, whose launcher names a lost process by a PID the ranks printed, and
the run resumes, also with another number of ranks; Ctrl-C saves once and exits 130; a failure on rank 0 alone (a
locked run directory, a full disk) stops every rank instead of leaving
them waiting; weights that fall apart stop the run; without mpi4py a
launched process says what to install; the README's two-node command runs.
Two ranks of one thread each fit CI's two cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from crystalline import _core, checkpoint, locks
from crystalline.cluster import rows
from commandline import LIMITED, cli
from test_train import TINY, latest_step, losses, poll_until

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install '.[mpi]')")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ARGS = ["train", str(STDLIB / "json"), *TINY, "--threads", "1", "--seed", "4"]


def mpiexec(k: int, args: list[str]) -> list[str]:
    """The command line that runs `crystalline ARGS` on k ranks."""
    return [MPIEXEC, "-n", str(k), sys.executable, "-m", "crystalline", *args]


def run_mpi(k: int, args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(mpiexec(k, args), env=env, capture_output=True, text=True, timeout=timeout)


def test_rows_split_the_batch_evenly_and_contiguously():
    for b, k in [(8, 2), (7, 3), (32, 16), (5, 5), (100, 7)]:
        spans = [rows(r, k, b) for r in range(k)]
        assert spans[0][0] == 0 and spans[-1][1] == b
        assert all(spans[r][1] == spans[r + 1][0] for r in range(k - 1))
        sizes = [hi - lo for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_two_ranks_match_one_process_to_rounding_and_repeat_bit_identically(tmp_path, env):
    steps = ["--max-steps", "30", "--eval-interval", "10"]
    one = cli([*ARGS, *steps, "--checkpoint-dir", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr
    runs = []
    for name in ("a", "b"):
        r = run_mpi(2, [*ARGS, *steps, "--checkpoint-dir", str(tmp_path / name)], env)
        assert r.returncode == 0, r.stderr + r.stdout
        runs.append(r)
    solo, a, b = losses(tmp_path / "one"), losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 30 and a == b
    assert a != solo, "two ranks group the sums differently, so rounding differs"
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, solo)), max(abs(x - y) / y for x, y in zip(a, solo))
    # rank 0 alone prints, once, and names every rank; its groups count the whole cluster
    err = runs[0].stderr
    assert err.count("[Node Zero] model:") == 1 and err.count("done: 30 steps") == 1
    assert re.search(r"\[Rank 0\] pid \d+ on .+\n\[Rank 1\] pid \d+ on ", err), err
    assert "sequences dealt over 2 ranks" in err
    dealt = sum(int(n) for n in re.findall(r"Group +\d+: (\d+) sequences", err))
    assert dealt == 30 * 8
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["allreduce_s"] >= 0 for r in records) and "val_loss" in records[9]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "a")] == ["ckpt-00000030"]


def test_verbose_adds_a_line_per_rank(tmp_path, env):
    r = run_mpi(2, [*ARGS, "--max-steps", "3", "--verbose", "--checkpoint-dir", str(tmp_path / "v")], env)
    assert r.returncode == 0, r.stderr
    lines = re.findall(r"\[Rank (\d)\] (\d+) sequences, groups \[", r.stderr)
    assert [rank for rank, _ in lines] == ["0", "1"] and sum(int(n) for _, n in lines) == 3 * 8


def test_bad_input_is_one_message_from_rank_0_and_every_rank_exits_2(tmp_path, env):
    new, taken = tmp_path / "new", tmp_path / "taken"
    assert cli([*ARGS, "--max-steps", "1", "--checkpoint-dir", str(taken)], env).returncode == 0
    cases = [
        (["train", str(tmp_path / "missing"), *TINY], new, "does not exist"),  # every rank finds it
        ([*ARGS, "--batch-size", "1"], new, "smaller than the 2 MPI ranks"),
        ([*ARGS, "--num-heads", "3"], new, "--num-heads"),
        (ARGS, taken, "already holds a run"),  # found by rank 0 alone, while it sets up
    ]
    for args, run, said in cases:
        r = run_mpi(2, [*args, "--checkpoint-dir", str(run)], env)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("error:") == 1 and said in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not new.exists()
    # rank 0 alone finds the run directory locked by another run: the others must not wait for it forever
    with locks.locked(taken):
        r = run_mpi(2, [*ARGS, "--resume", "--checkpoint-dir", str(taken)], env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "is in use by process" in r.stderr, r.stderr


def test_a_rank_killed_with_kill_9_stops_the_job_which_names_it_and_resume_goes_on_with_other_k(tmp_path, env):
    run = tmp_path / "run"
    args = [*ARGS, "--epochs", "200", "--save-interval", "5", "--checkpoint-dir", str(run)]
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(mpiexec(2, args), env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            pid = int(poll_until(lambda: re.search(r"\[Rank 1\] pid (\d+)", log.read_text()), "the ranks", proc)[1])
            poll_until(lambda: latest_step(run) >= 10, "two checkpoints", proc)
            os.kill(pid, signal.SIGKILL)
            start = time.monotonic()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert time.monotonic() - start < 30 and proc.returncode != 0
    said = log.read_text()
    # The launcher names a process it lost, and the ranks' lines say which
    # rank that was. Usually it names the killed one; now and then MPICH's
    # launcher names rank 0, which it killed while cleaning up, first.
    ranks = {int(p): int(r) for r, p in re.findall(r"\[Rank (\d+)\] pid (\d+) on", said)}
    named = re.search(r"BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\s*=\s*PID (\d+) ", said)
    assert ranks.get(pid) == 1 and named and int(named[1]) in ranks, said
    step = latest_step(run)
    assert checkpoint.load(checkpoint.resolve(run)).state.step == step
    # one process continues the run the two ranks saved, to the end of a shorter plan
    resumed = cli(["train", "--resume", str(run), "--max-steps", str(step + 6), "--no-progress"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert latest_step(run) == step + 6 and len(losses(run)) == step + 6


def test_ctrl_c_on_mpiexec_saves_once_exits_130_and_two_ranks_resume_bit_identically(tmp_path, env):
    # Enough steps that Ctrl-C lands before the end on an idle machine too (a tiny step takes about 2 ms).
    args = [*ARGS, "--epochs", "100", "--max-steps", "3000", "--save-interval", "10000", "--eval-interval", "10000"]
    full = run_mpi(2, [*args, "--checkpoint-dir", str(tmp_path / "full")], env)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "cut"
    proc = subprocess.Popen(mpiexec(2, [*args, "--checkpoint-dir", str(run)]), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    poll_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 20, "20 steps", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("interrupted: saved") == 1
    step = latest_step(run)
    assert 20 <= step < 3000 and len(checkpoint.list_checkpoints(run)) == 1
    resumed = run_mpi(2, ["train", "--resume", str(run), "--no-progress"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "full")



def test_a_full_disk_on_rank_0_mid_run_stops_every_rank_with_its_message(tmp_path, env):
    run = tmp_path / "run"
    ok = run_mpi(2, [*ARGS, "--max-steps", "10", "--save-interval", "5", "--checkpoint-dir", str(run)], env)
    assert ok.returncode == 0, ok.stderr
    ck = checkpoint.list_checkpoints(run)[-1]
    limit = ((ck / checkpoint.MODEL).stat().st_size + (ck / checkpoint.OPTIMIZER).stat().st_size) // 2
    resume = ["train", "--resume", str(run), "--max-steps", "20", "--save-interval", "5", "--no-progress"]
    # MPI starts before the limit, as its shared-memory files are larger than it
    limited = [sys.executable, "-c", "import mpi4py.MPI;" + LIMITED, str(limit)]
    r = subprocess.run([MPIEXEC, "-n", "2", *limited, *resume], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert f"disk full while writing {run / 'ckpt-00000015'}" in r.stderr and "Traceback" not in r.stderr
    assert checkpoint.load(run).state.step == 10

SYNC_CHECK = """
import sys
import numpy as np
from crystalline import _core
from crystalline.cluster import connect
from crystalline.errors import UserError
cluster = connect()
trainer = _core.Trainer(64, 16, 1, 2, 8, threads=1, seed=cluster.rank)  # each rank its own initial weights
cluster.broadcast_weights(trainer)
cluster.check_in_sync(trainer, 0)  # rank 0's weights everywhere
batch = np.arange(4 * 9).reshape(4, 9) % 64
for step in range(1, 3):
    report, stop = cluster.step(trainer, batch, 1e-2, interrupted=False)
    cluster.check_in_sync(trainer, step)
if cluster.rank == 1:
    trainer.parameters()["wte.weight"][0, 0] += 1e-3
try:
    cluster.check_in_sync(trainer, 2)
except UserError as err:  # a file per rank: lines the ranks print at once may interleave
    open(f"{sys.argv[1]}/rank{cluster.rank}", "w").write(str(err))
"""


def test_weights_that_fall_apart_stop_every_rank_with_an_error(tmp_path, env):
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", SYNC_CHECK, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    said = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    assert all("the weights of rank(s) 1 differ from rank 0's after step 2" in s for s in said), said


def test_a_launched_process_without_mpi4py_says_what_to_install_and_a_plain_run_never_imports_it(tmp_path, env):
    hidden = tmp_path / "no_mpi4py"
    (hidden / "mpi4py").mkdir(parents=True)
    (hidden / "mpi4py" / "__init__.py").write_text("raise ImportError('mpi4py is not installed')\n")
    path = os.pathsep.join([str(hidden), env.get("PYTHONPATH", "")])
    launched = dict(env, PYTHONPATH=path, PMI_RANK="0", PMI_SIZE="2")
    r = cli([*ARGS, "--checkpoint-dir", str(tmp_path / "r")], launched)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: install crystalline[mpi] to train on several processes (pip install 'crystalline-cllm[mpi]': "
        "mpi4py and MPICH)"), r.stderr
    assert not (tmp_path / "r").exists()
    plain = ("import sys; from crystalline.config import TrainConfig; import crystalline; "
             f"crystalline.train(TrainConfig(data=[{str(STDLIB / 'json')!r}], vocab_size=300, n_embd=32, n_layer=2, "
             f"n_head=2, batch_size=8, seq_len=32, max_steps=2, threads=1, progress=False, sample_tokens=0, "
             f"extensions=['.py'], checkpoint_dir={str(tmp_path / 'plain')!r})); "
             "assert 'mpi4py' not in sys.modules, 'imported'")
    r = subprocess.run([sys.executable, "-c", plain], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_the_readme_s_two_node_command_runs_on_two_local_ranks(tmp_path, env):
    """The README's `mpiexec -hosts a,b` line as written, with both hosts this
    one, its paths here, and flags added at the end for a tiny, short run."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("mpiexec -hosts a,b -n 2 crystalline train"))
    shutil.copytree(STDLIB / "json", tmp_path / "my_code")
    command = (line.replace("mpiexec", MPIEXEC, 1).replace("a,b", "localhost,localhost", 1)
               .replace(" crystalline ", f" {sys.executable} -m crystalline ", 1)
               .replace("/shared/runs/seed", str(tmp_path / "runs" / "seed")))
    tiny = ["--vocab-size", "300", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2", "--seq-len", "32",
            "--max-steps", "2", "--threads", "1", "--no-progress", "--sample-tokens", "0"]
    r = subprocess.run([*command.split(), *tiny], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[Rank 1] pid" in r.stderr and latest_step(tmp_path / "runs" / "seed") == 2


@pytest.mark.skipif(not _core.bf16_supported(), reason="--precision bf16 needs a CPU with avx512_bf16")
def test_under_bf16_the_other_ranks_round_the_weights_rank_0_gives_them(tmp_path, env):
    # Rank 1 builds its trainer from the seed, then takes rank 0's weights (here
    # resumed from a checkpoint): its matmuls must read those, rounded, not its own.
    args = [*ARGS, "--precision", "bf16", "--learning-rate", "3e-3", "--no-progress"]
    first = cli([*args, "--max-steps", "20", "--checkpoint-dir", str(tmp_path / "two")], env)
    assert first.returncode == 0, first.stderr
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    solo = cli(["train", "--resume", str(tmp_path / "one"), "--max-steps", "25", "--no-progress"], env)
    assert solo.returncode == 0, solo.stderr
    pair = run_mpi(2, ["train", "--resume", str(tmp_path / "two"), "--max-steps", "25", "--no-progress"], env)
    assert pair.returncode == 0, pair.stderr
    one, two = losses(tmp_path / "one")[20:], losses(tmp_path / "two")[20:]
    assert len(one) == len(two) == 5
    assert all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(two, one)), (one, two)
