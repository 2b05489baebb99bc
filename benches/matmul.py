"""Time numpy's float32 `a @ b` against crystalline's `_core.matmul_forward`,
in float32 and, where the CPU has avx512_bf16, in bf16 (operands rounded to
bf16, f32 sums; the weight `b` is rounded once beforehand, as training does
once per step, and `a` as the product packs it).

Both run with the same number of threads (2 unless already set in the
environment): OMP_NUM_THREADS / OPENBLAS_NUM_THREADS for numpy's BLAS and
RAYON_NUM_THREADS for crystalline's rayon pool. These have to be set before
numpy and crystalline are imported, which this script does at the top.

    python benches/matmul.py                  # default: 15 repeats per case
    python benches/matmul.py --repeats 20
    # OpenBLAS tuned for another core type can slow numpy; compare with:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/matmul.py

Prints a markdown table of median and best GFLOP/s (2*m*n*k / time) per shape
and the ratios crystalline / numpy and bf16 / fp32. The runs are interleaved so
load from other processes falls on both alike; the script reports how much CPU
other processes used meanwhile (on a busy machine trust the "best" columns).
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repeats", type=int, default=15, help="timed runs per library and shape")
# OpenBLAS's idle worker threads keep spinning for roughly 0.1 s after a
# call; a crystalline call started inside that window gets half the cores
# (measured: ~250 instead of ~470 GFLOP/s at 2048^3 on 2 cores). Each block
# of timed calls therefore starts with a pause and an untimed call.
parser.add_argument("--pause", type=float, default=0.3, help="seconds of sleep before each block of calls")
parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per library (repeats split among them)")
parser.add_argument("--threads", type=int, default=2, help="threads for both libraries unless the env already sets them")
args = parser.parse_args()

# Thread counts must be in the environment before numpy / crystalline load.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(var, str(args.threads))

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import crystalline._core as core  # noqa: E402

try:
    import threadpoolctl  # noqa: E402
except ImportError:
    threadpoolctl = None

# (label, m, k, n): a[m,k] @ b[k,n]
SHAPES = [
    ("2048x2048 @ 2048x2048", 2048, 2048, 2048),
    ("4096x384 @ 384x1152", 4096, 384, 1152),
]


def os_threads() -> int:
    """Threads of this process right now (Linux), to check pool sizes."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies used by this process)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0, 0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    print("## Environment")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        val = os.environ.get(var)
        print(f"- {var} = {val!r}" + ("" if val is not None else " (not set)"))
    print(f"- numpy {np.__version__}, python {sys.version.split()[0]}, cpus {os.cpu_count()}")
    if threadpoolctl is not None:
        for info in threadpoolctl.threadpool_info():
            print(
                f"- threadpoolctl: {info.get('internal_api')} {info.get('version')} "
                f"arch={info.get('architecture')} threads={info.get('num_threads')} ({info.get('filepath')})"
            )
    else:
        print("- threadpoolctl not installed: numpy's BLAS threads taken from the env vars above")

    rng = np.random.default_rng(0)
    bf16 = core.bf16_supported()
    print(f"- avx512_bf16: {'yes' if bf16 else 'no (bf16 rows skipped)'}")
    rows = []
    threads_before = os_threads()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy0, own0 = cpu_jiffies()
    wall0 = time.perf_counter()
    for label, m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        # Same answer, so we know we time the same product.
        ref = a @ b
        got = core.matmul_forward(a, b)
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        assert err < 1e-4, f"{label}: crystalline differs from numpy by {err:.2e} (relative)"
        flops = 2.0 * m * n * k
        runs = {"numpy": lambda: a @ b, "crystalline": lambda: core.matmul_forward(a, b)}
        if bf16:
            b16 = core.to_bf16(b)
            got16 = core.matmul_forward(a, b16)
            err16 = float(np.linalg.norm(got16 - ref) / np.linalg.norm(ref))
            assert err16 < 1e-2, f"{label}: bf16 differs from numpy by {err16:.2e} (relative)"
            runs["bf16"] = lambda: core.matmul_forward(a, b16)
        for _ in range(2):  # warm-up: pools started, pages touched
            for fn in runs.values():
                fn()
        # Alternate blocks of the libraries (rotating which goes first) so
        # load from other processes falls on all alike. Each block starts
        # with a pause and an untimed call, so the other library's worker
        # threads have gone idle and this one's pool is awake before its
        # timed calls run back to back.
        times = {name: [] for name in runs}
        per_block = max(1, args.repeats // args.blocks)
        names = list(runs)
        for blk in range(args.blocks):
            for name in names[blk % len(names):] + names[:blk % len(names)]:
                time.sleep(args.pause)
                runs[name]()
                times[name].extend(timed(runs[name]) for _ in range(per_block))
        rows.append((label, {name: (flops / statistics.median(t) / 1e9, flops / min(t) / 1e9) for name, t in times.items()}))
    wall = time.perf_counter() - wall0
    busy1, own1 = cpu_jiffies()
    print(f"- process threads: {threads_before} after numpy import, {os_threads()} after crystalline's first call")
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / hz / wall
    print(f"- CPU used by other processes during the timing: {other:.2f} cores on average"
          + ("  <- the machine was busy: numbers are noisy, compare the 'best' columns" if other > 0.1 else ""))
    print(f"- load average now: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

    print()
    threads = f"BLAS {os.environ['OPENBLAS_NUM_THREADS']} / rayon {os.environ['RAYON_NUM_THREADS']} threads"
    print(f"## float32 matmul, {threads}, {max(1, args.repeats // args.blocks) * args.blocks} runs in {args.blocks} alternating blocks (GFLOP/s = 2*m*n*k / time)")
    print()
    print("| shape | numpy median | crystalline median | crystalline / numpy (median) "
          "| numpy best | crystalline best | crystalline / numpy (best) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, g in rows:
        (m_np, b_np), (m_cr, b_cr) = g["numpy"], g["crystalline"]
        print(f"| {label} | {m_np:.1f} | {m_cr:.1f} | {m_cr / m_np:.2f} | {b_np:.1f} | {b_cr:.1f} | {b_cr / b_np:.2f} |")
    print()
    if not bf16:
        print("bf16: skipped, this CPU lacks avx512_bf16")
        return 0
    print("## bf16 x bf16 -> f32 against crystalline's float32, same runs (GFLOP/s)")
    print()
    print("| shape | fp32 median | bf16 median | bf16 / fp32 (median) | fp32 best | bf16 best | bf16 / fp32 (best) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, g in rows:
        (m_cr, b_cr), (m_bf, b_bf) = g["crystalline"], g["bf16"]
        print(f"| {label} | {m_cr:.1f} | {m_bf:.1f} | {m_bf / m_cr:.2f} | {b_cr:.1f} | {b_bf:.1f} | {b_bf / b_cr:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
