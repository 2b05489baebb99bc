"""Benchmark `crystalline prepare` on the Python standard library's source.

Copies the stdlib .py files (about 30 MB) to a scratch directory, then times
a cold prepare at vocab 30000, a warm re-run with nothing changed, and a
re-run after touching one file; reports peak RSS of the cold run; and times
bare `tokenizers` training and encoding of the same files in the same run,
to give prepare's overhead over the library it is built on.

    PYTHONPATH=python python benches/prepare.py [--vocab-size 30000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crystalline.data.corpus import builtin_corpus_paths
from crystalline.data.prepare import prepare


def copy_stdlib(dest: Path) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    copies = []
    for src in builtin_corpus_paths():
        dst = dest / src.relative_to(stdlib)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        copies.append(dst)
    return copies


def bare_tokenizers(files: list[Path], vocab_size: int) -> tuple[float, int]:
    """Train and encode with `tokenizers` alone: the floor prepare builds on."""
    start = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (f.read_bytes().decode("utf-8", errors="replace") for f in files)
    tok.train_from_iterator(texts, trainer)
    tokens = 0
    for i in range(0, len(files), 64):
        batch = [f.read_bytes().decode("utf-8", errors="replace") for f in files[i : i + 64]]
        for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
            tokens += np.asarray(enc.ids, dtype=np.uint16).size
    return time.perf_counter() - start, tokens


def bare_in_child(files: list[Path], vocab_size: int) -> tuple[float, int]:
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(bare_tokenizers, (files, vocab_size))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=30000)
    parser.add_argument("--repeat", type=int, default=2, help="runs of the cold prepare and of bare tokenizers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        src, out = Path(scratch, "stdlib"), Path(scratch, "dataset")
        files = copy_stdlib(src)
        nbytes = sum(f.stat().st_size for f in files)
        run = lambda: prepare([src], out, args.vocab_size, progress=False)  # noqa: E731
        bare, bare_tokens = bare_in_child(sorted(files), args.vocab_size)
        cold = float("inf")
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            seconds, ds = timed(run)
            cold = min(cold, seconds)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        warm, again = timed(run)
        assert again.report.files_encoded == 0
        os.utime(files[len(files) // 2])
        touched, after = timed(run)
        (files[0]).write_text(files[0].read_text() + "\n# changed\n")
        changed, edited = timed(run)
        assert edited.report.files_encoded == 1 and not edited.report.tokenizer_trained
        for _ in range(args.repeat - 1):
            bare = min(bare, bare_in_child(sorted(files), args.vocab_size)[0])

    print(f"stdlib .py source: {len(files):,} files, {nbytes / 1e6:.1f} MB, vocab {args.vocab_size}, "
          f"{os.cpu_count()} cores; {ds.train_count + ds.val_count:,} tokens (bare: {bare_tokens:,})\n")
    print("| measurement | value | goal |")
    print("|---|---|---|")
    print(f"| cold prepare (best of {args.repeat}) | {cold:.2f} s | < 30 s |")
    print(f"| warm re-run, nothing changed | {warm:.2f} s | < 2 s |")
    print(f"| re-run after touching one file | {touched:.2f} s | |")
    print(f"| re-run after editing one file | {changed:.2f} s | |")
    print(f"| peak RSS (cold prepare) | {peak_rss / 2**20:.0f} MiB | < 1024 MiB |")
    print(f"| bare tokenizers train + encode (best of {args.repeat}) | {bare:.2f} s | |")
    print(f"| prepare overhead over bare | {(cold / bare - 1) * 100:+.1f}% | <= 20% |")


if __name__ == "__main__":
    main()
