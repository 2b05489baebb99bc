"""Building a token dataset from text files (`crystalline prepare`).

A prepared dataset directory holds:

- `tokenizer.json`: the byte-level BPE tokenizer (see `tokenizer.py`);
- `train-<id>.bin`, `val-<id>.bin`: the token ids of every document, each
  document followed by `<|endoftext|>`, as raw little-endian uint16 (vocab
  <= 65535) or uint32, ready for `numpy.memmap`;
- `shards/<tokenizer hash>/`: the ids of each source file, named by the
  sha256 of its bytes, so a re-run encodes only new or changed files
  (renamed into place but not fsynced, one fsync per file cost seconds on
  the stdlib; a shard whose size disagrees with its token count is re-encoded);
- `manifest.json`: per source file its size, mtime, sha256, token count and
  split, plus the tokenizer hash and the names of the token files.

The manifest is written last, by rename, and names the token files it
describes; `load_dataset` checks the tokenizer hash and the file sizes
against it. A run that dies half-way therefore leaves either the previous
dataset or one that is refused, never one that is silently wrong.

The manifest's `"format": "crystalline-dataset/1"` is what makes a directory
a Crystalline dataset: `prepare` writes into a directory only when it is new,
empty, or holds such a manifest (a first run marks a new directory with a
manifest holding only that, before it writes anything else). Datasets made
before the marker existed have `"format": 1`; they count when their manifest
has exactly the keys those versions wrote, and get the marker on their next
`prepare`. Anything else is refused untouched. Even in a dataset, `prepare`
deletes only names it gives its own files: `train-`/`val-<12 hex>.bin`,
`shards/<16 hex>/<2 hex>/<sha256>.bin` and its temporaries.

One `prepare` at a time works in a directory (`crystalline.locks`, the lock
file `.crystalline.lock`): a second one is refused while the first runs.

The tokenizer already in the directory is reused when it was made for the
same `--vocab-size`: adding or changing files does not retrain it (pass
`--retrain-tokenizer` for that). The tokenizer is trained on at most
TRAIN_SAMPLE_BYTES of text (files in a fixed pseudo-random order): the
`tokenizers` trainer's memory grows with the text it is fed (about 1.5x), so
the cap is what keeps a large corpus within bounded memory (the progress
bar's file count stops short when the cap is reached). Files are split into train and validation
by a hash of their relative path, so adding files never moves old ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crystalline.data import corpus, sizing
from crystalline.data.corpus import FileRead, SourceFile
from crystalline.data.progress import Progress
from crystalline.data.corpus import file_hash
from crystalline.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, check_vocab_size
from crystalline import locks
from crystalline.atomic import copy_atomic, disk_full_at, is_temporary, temporary_name, write_atomic, write_json_atomic
from crystalline.errors import UserError

FORMAT = "crystalline-dataset/1"
# The manifests written before FORMAT: this "format", and exactly these keys.
LEGACY_FORMAT = 1
LEGACY_KEYS = frozenset({"format", "requested_vocab_size", "vocab_size", "tokenizer_hash", "eot_id", "dtype",
                         "val_fraction", "seed", "files", "train_file", "val_file", "train_count", "val_count"})
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
# In a dataset of the training cache: the inputs and vocabulary it was prepared for.
SOURCE = "source.json"
# Bytes of text per token, to foresee a dataset's size before preparing it;
# on the low side, so the size foreseen is rather more than less: the stdlib's
# source with 4,096 tokens has 3.4, and a 320 MB code corpus that made a
# 415 MB dataset with 30,000 tokens about 3.1.
BYTES_PER_TOKEN = 3.0
SHARDS = "shards"
# Text sent to the tokenizer in one parallel `encode_batch` call; the
# encodings cost about 200 bytes per token while they live.
BATCH_BYTES = 1 << 20
# Most text the tokenizer is trained on.
TRAIN_SAMPLE_BYTES = 256 << 20
# The names of the files prepare makes (besides MANIFEST and TOKENIZER), the
# only ones it ever deletes.
TOKEN_FILE = re.compile(r"(train|val)-[0-9a-f]{12}\.bin")
SHARD_DIR = re.compile(r"[0-9a-f]{16}")  # shards/<tokenizer hash[:16]>
SHARD_FILE = re.compile(r"[0-9a-f]{64}\.bin")  # shards/<tokenizer hash[:16]>/<sha256[:2]>/<sha256>.bin


@dataclass
class PrepareReport:
    """What one `prepare` run did (for messages and tests)."""

    files: int = 0
    bytes: int = 0
    files_encoded: int = 0
    files_reused: int = 0
    tokenizer_trained: bool = False
    files_with_replacements: int = 0
    skipped: corpus.WalkStats = field(default_factory=corpus.WalkStats)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    root: Path
    vocab_size: int
    tokenizer_path: Path
    tokenizer_hash: str
    eot_id: int
    dtype: str = "uint16"
    train_file: str = ""
    val_file: str = ""
    train_count: int = 0
    val_count: int = 0
    report: PrepareReport | None = None

    def train_tokens(self) -> np.ndarray:
        """All training documents, each followed by the end-of-text id (read-only memmap)."""
        return self._tokens(self.train_file, self.train_count)

    def val_tokens(self) -> np.ndarray:
        """The validation documents, laid out like `train_tokens` (may be empty)."""
        return self._tokens(self.val_file, self.val_count)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def source_bytes(self) -> int:
        """Bytes of the text the dataset was prepared from."""
        return sum(e["size"] for e in read_manifest(self.root)["files"])

    def _tokens(self, name: str, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.root / name, dtype=self.dtype, mode="r", shape=(count,))

    def check_token_ids(self) -> None:
        """Refuse token files holding an id outside the vocabulary (a corrupt
        dataset: the sizes `load_dataset` checks were right). One pass over
        the memory map."""
        for name, tokens in ((self.train_file, self.train_tokens()), (self.val_file, self.val_tokens())):
            top = int(tokens.max()) if len(tokens) else 0
            if top >= self.vocab_size:
                raise UserError(
                    f"the prepared dataset {self.root} is corrupt: {name} holds token id {top}, but the vocabulary "
                    f"has {self.vocab_size} tokens; delete {self.root} and run again to prepare it afresh"
                )


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def prepare(
    paths: list[Path],
    out_dir: Path,
    vocab_size: int | None,
    *,
    tokenizer: Path | None = None,
    extensions: list[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    retrain_tokenizer: bool = False,
) -> Dataset:
    """Build or update the dataset in `out_dir` from the text files under `paths`.

    `vocab_size` may be None only when `tokenizer` (a tokenizer.json) is given."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if tokenizer is None:
        if vocab_size is None:
            raise UserError("--vocab-size is required unless --tokenizer is given")
        check_vocab_size(vocab_size)
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir)
    files, skipped = corpus.walk(paths, extensions, exclude=out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {out_dir}: {err.strerror}") from None
    report = PrepareReport(files=len(files), bytes=sum(f.size for f in files), skipped=skipped)
    report.warnings.extend(skipped.warnings)
    with locks.locked(out_dir), disk_full_at(out_dir):
        if marked_manifest(out_dir) is None:  # new or empty: mark it as ours before anything else
            write_json_atomic(out_dir / MANIFEST, {"format": FORMAT})
        _remove_temporaries(out_dir)
        manifest = _update(out_dir, files, vocab_size, tokenizer, val_fraction, seed, progress, retrain_tokenizer,
                           report)

    report.files_with_replacements = sum(1 for e in manifest["files"] if e["replaced"])
    if report.files_with_replacements:
        report.warnings.append(
            f"{report.files_with_replacements} file(s) had invalid UTF-8; the bad bytes became U+FFFD"
        )
    for line in report.warnings:
        Progress.warn(line)
    return _dataset(out_dir, manifest, report)


def _update(
    out_dir: Path,
    files: list[SourceFile],
    vocab_size: int | None,
    tokenizer: Path | None,
    val_fraction: float,
    seed: int,
    progress: bool,
    retrain_tokenizer: bool,
    report: PrepareReport,
) -> dict:
    """Bring the dataset in `out_dir` (locked) up to date with `files`; its new manifest."""
    old = read_manifest(out_dir)
    with Progress(enabled=progress) as bar:
        tok, requested, hashes = _tokenizer_for(
            out_dir, files, vocab_size, tokenizer, retrain_tokenizer, old, bar, report
        )
        tok_hash = file_hash(out_dir / TOKENIZER)
        dtype = token_dtype(tok.vocab_size)
        shard_dir = out_dir / SHARDS / tok_hash[:16]
        entries = _file_entries(files, old, tok_hash, hashes, shard_dir, tok, dtype, bar, report)

    _assign_splits(entries, val_fraction, seed, report)
    manifest = {
        "format": FORMAT,
        "requested_vocab_size": requested,
        "vocab_size": tok.vocab_size,
        "tokenizer_hash": tok_hash,
        "eot_id": tok.eot_id,
        "dtype": dtype,
        "val_fraction": val_fraction,
        "seed": seed,
        "files": entries,
    }
    if old is not None and _same_layout(old, manifest) and _token_files_ok(out_dir, old):
        manifest.update({k: old[k] for k in ("train_file", "val_file", "train_count", "val_count")})
    else:
        _write_token_files(out_dir, shard_dir, entries, tok.eot_id, dtype, manifest)
    if manifest != old:
        write_json_atomic(out_dir / MANIFEST, manifest)
    _remove_unreferenced(out_dir, manifest, shard_dir)
    return manifest


def default_vocab_size(paths: list[Path], out_dir: Path, extensions: list[str] | None = None) -> int:
    """The vocab size `prepare` uses when given none: the one of the
    tokenizer already in `out_dir`, else the design table's for the amount
    of text."""
    manifest = read_manifest(Path(out_dir).expanduser())
    if manifest is not None:
        return manifest["requested_vocab_size"]
    return sizing.vocab_for(corpus.total_bytes(paths, extensions, exclude=out_dir))


def load_dataset(out_dir: Path) -> Dataset:
    """Open a prepared dataset, refusing one that is missing, half-written or corrupt."""
    out_dir = Path(out_dir).expanduser()
    if not out_dir.is_dir():
        raise UserError(f"dataset directory {out_dir} does not exist; create it with `crystalline prepare`")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise UserError(
            f"{out_dir} is not a complete dataset (no valid {MANIFEST}); "
            "run `crystalline prepare` again to rebuild it"
        )
    tok_path = out_dir / TOKENIZER
    if not tok_path.is_file() or file_hash(tok_path) != manifest["tokenizer_hash"]:
        raise UserError(
            f"{tok_path} is missing or does not match {MANIFEST}; run `crystalline prepare` again to rebuild it"
        )
    if not _token_files_ok(out_dir, manifest):
        raise UserError(
            f"the token files in {out_dir} are missing or truncated; run `crystalline prepare` again to rebuild them"
        )
    return _dataset(out_dir, manifest, None)


def cache_root() -> Path:
    """Crystalline's cache: $CRYSTALLINE_CACHE, else $XDG_CACHE_HOME/crystalline,
    else ~/.cache/crystalline."""
    own = os.environ.get("CRYSTALLINE_CACHE")
    if own:
        return Path(own).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crystalline"


def default_cache_dir() -> Path:
    """Where `train` and `size` prepare the datasets of raw text."""
    return cache_root() / "datasets"


def expected_bytes(data_bytes: int, vocab_size: int) -> int:
    """About what preparing `data_bytes` of text takes on disk: each token
    twice (its file's shard and the split's token file), at about
    BYTES_PER_TOKEN bytes of text per token."""
    return round(2 * np.dtype(token_dtype(vocab_size)).itemsize * data_bytes / BYTES_PER_TOKEN)


def _cache_key(paths: list[Path], vocab_size: int | None, tokenizer: Path | None,
               extensions: list[str] | None) -> dict:
    """What a cache dataset is prepared from; its directory is named by a hash of this."""
    resolved = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserError(f"input path {p} does not exist")
        resolved.append(str(path.resolve()))
    return {
        "paths": sorted(resolved),
        "vocab_size": vocab_size,
        "tokenizer": file_hash(Path(tokenizer)) if tokenizer is not None and Path(tokenizer).is_file() else None,
        "extensions": list(corpus.normalize_extensions(extensions) or []) or None,  # as JSON reads it back
    }


def cached_dataset(paths: list[Path], vocab_size: int | None, *, tokenizer: Path | None = None,
                   cache_dir: Path | None = None, extensions: list[str] | None = None) -> tuple[Path, int | None]:
    """(directory, vocab size to ask for) of the cache dataset that
    `prepare_for_training` uses for these inputs: the one keyed by them, or,
    when there is none yet, one prepared from the same inputs whose tokenizer
    was asked for more tokens than the text allowed and came out with
    exactly `vocab_size`, the tokenizer a request for `vocab_size` trains (so
    a run that now records the vocabulary its model really has finds its data)."""
    key = _cache_key(paths, vocab_size, tokenizer, extensions)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    exact = root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if exact.is_dir() or vocab_size is None or not root.is_dir():
        return exact, vocab_size
    for other in sorted(root.iterdir()):
        try:
            source = json.loads((other / SOURCE).read_text())
        except (OSError, ValueError):
            continue
        manifest = read_manifest(other)
        if (isinstance(source, dict) and source == dict(key, vocab_size=source.get("vocab_size"))
                and manifest is not None and manifest["vocab_size"] == vocab_size
                and manifest["requested_vocab_size"] == source["vocab_size"] > vocab_size):
            return other, source["vocab_size"]
    return exact, vocab_size


def prepare_for_training(
    paths: list[Path],
    vocab_size: int | None,
    *,
    tokenizer: Path | None = None,
    cache_dir: Path | None = None,
    val_fraction: float = 0.1,
    progress: bool = True,
    extensions: list[str] | None = None,
    hold: contextlib.ExitStack | None = None,
) -> Dataset:
    """Prepare raw text for `crystalline train` in a cache directory keyed by
    the resolved input paths and the vocabulary (see `cached_dataset`),
    updating it incrementally; it records its key in SOURCE. With `hold`,
    the dataset is marked in use (`locks.using`) from before it is prepared
    until the stack closes, so `crystalline cache clear` leaves it alone."""
    out_dir, vocab = cached_dataset(paths, vocab_size, tokenizer=tokenizer, cache_dir=cache_dir,
                                    extensions=extensions)
    key = _cache_key(paths, vocab, tokenizer, extensions)
    if hold is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the dataset cache {out_dir}: {err.strerror}") from None
        hold.enter_context(locks.using(out_dir))
    ds = prepare(
        paths,
        out_dir,
        vocab,
        tokenizer=tokenizer,
        extensions=extensions,
        val_fraction=val_fraction,
        progress=progress,
    )
    with disk_full_at(out_dir):
        if not (out_dir / SOURCE).is_file():
            write_json_atomic(out_dir / SOURCE, key)
    return ds


# --- tokenizer choice ---------------------------------------------------------


def _tokenizer_for(
    out_dir: Path,
    files: list[SourceFile],
    vocab_size: int | None,
    given: Path | None,
    retrain: bool,
    old: dict | None,
    bar: Progress,
    report: PrepareReport,
) -> tuple[Tokenizer, int, dict[str, str]]:
    """The tokenizer to use (saved as out_dir/tokenizer.json), the vocab size
    asked for, and the file hashes computed on the way (when it was trained)."""
    target = out_dir / TOKENIZER
    if given is not None:
        tok = Tokenizer.load(Path(given))
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise UserError(
                f"--tokenizer {given} has a vocabulary of {tok.vocab_size} but --vocab-size {vocab_size} "
                f"was asked; drop --vocab-size or pass --vocab-size {tok.vocab_size}"
            )
        if not target.is_file() or file_hash(target) != file_hash(Path(given)):
            copy_atomic(Path(given), target)
        return tok, tok.vocab_size, {}

    if not retrain and old is not None and target.is_file() and file_hash(target) == old["tokenizer_hash"]:
        if old["requested_vocab_size"] != vocab_size:
            raise UserError(
                f"{out_dir} already has a tokenizer for --vocab-size {old['requested_vocab_size']}, "
                f"not {vocab_size}; pass --vocab-size {old['requested_vocab_size']} to reuse it, "
                "add --retrain-tokenizer to replace it, or choose another --out"
            )
        return Tokenizer.load(target), vocab_size, {}

    hashes: dict[str, str] = {}
    sample = min(sum(f.size for f in files), TRAIN_SAMPLE_BYTES)
    bar.start("training tokenizer", sample, len(files))
    # Each merge shortens the text by a symbol, so the sample (at most 3 UTF-8
    # bytes per byte read, U+FFFD replacing a bad one) bounds the vocabulary;
    # the trainer reserves room for all it is asked (2**31: 141 GB, an abort).
    tok = Tokenizer.train(_texts(files, hashes, bar), min(vocab_size, MIN_VOCAB_SIZE + 3 * sample))
    if tok.vocab_size < vocab_size:
        report.warnings.append(
            f"the corpus only supports {tok.vocab_size} tokens, fewer than --vocab-size {vocab_size}; "
            f"the model will use {tok.vocab_size}"
        )
    write_atomic(target, tok.save)
    report.tokenizer_trained = True
    return tok, vocab_size, hashes


def _texts(files: list[SourceFile], hashes: dict[str, str], bar: Progress) -> Iterator[str]:
    """Stream text for the tokenizer trainer: all files, or when they exceed
    TRAIN_SAMPLE_BYTES, that much text from files in a fixed pseudo-random
    order. Records the hashes of the files read whole."""
    if sum(f.size for f in files) > TRAIN_SAMPLE_BYTES:
        files = sorted(files, key=lambda f: hashlib.sha256(f.name.encode()).digest())
    budget = TRAIN_SAMPLE_BYTES
    for f in files:
        result = FileRead()
        for piece in corpus.read_chunks(f.path, result):
            if budget <= 0:
                return
            budget -= len(piece)
            yield piece
        hashes[str(f.path)] = result.sha256
        bar.advance(f.size)


# --- per-file token shards ----------------------------------------------------


def _file_entries(
    files: list[SourceFile],
    old: dict | None,
    tok_hash: str,
    hashes: dict[str, str],
    shard_dir: Path,
    tok: Tokenizer,
    dtype: str,
    bar: Progress,
    report: PrepareReport,
) -> list[dict]:
    """Manifest entries for `files`, encoding only those with no shard yet."""
    old_files, old_by_sha = {}, {}
    if old is not None and old["tokenizer_hash"] == tok_hash:
        old_files = {e["path"]: e for e in old["files"]}
        old_by_sha = {e["sha256"]: e for e in old["files"]}
    entries = []
    to_encode = []
    for f in files:
        key = str(f.path)
        prev = old_files.get(key)
        if prev is not None and (prev["size"], prev["mtime_ns"]) == (f.size, f.mtime_ns):
            entry = dict(prev, name=f.name)
        else:
            sha = hashes.get(key) or file_hash(f.path)
            same = old_by_sha.get(sha, {})  # unchanged content, or a file moved or copied
            entry = {"path": key, "name": f.name, "size": f.size, "mtime_ns": f.mtime_ns, "sha256": sha}
            entry["tokens"] = same.get("tokens")
            entry["replaced"] = same.get("replaced")
        if entry["tokens"] is None or not _shard_ok(shard_dir, entry, dtype):
            to_encode.append((f, entry))
        entries.append(entry)
    report.files_reused = len(files) - len(to_encode)
    if to_encode:
        shard_dir.mkdir(parents=True, exist_ok=True)
        bar.start("encoding", sum(f.size for f, _ in to_encode), len(to_encode))
        _encode_files(to_encode, shard_dir, tok, dtype, bar)
        report.files_encoded = len(to_encode)
    return entries


def _encode_files(
    work: list[tuple[SourceFile, dict]], shard_dir: Path, tok: Tokenizer, dtype: str, bar: Progress
) -> None:
    """Encode files in parallel batches of about BATCH_BYTES of text, writing
    each file's ids to its shard as they come. Fills in the entries' sha256,
    token count and replacement flag."""
    batch: list[tuple[int, str | None]] = []  # (work index, text piece or None = end of file)
    batch_bytes = 0
    writers: dict[int, tuple[Path, object]] = {}
    results: dict[int, FileRead] = {}

    def flush() -> None:
        texts = [text for _, text in batch if text is not None]
        ids_iter = tok.encode_batch(texts)
        for index, text in batch:
            if text is not None:
                ids = np.asarray(next(ids_iter), dtype=dtype)
                if index not in writers:
                    tmp = temporary_name(shard_dir / "shard")
                    writers[index] = (tmp, open(tmp, "wb"))
                writers[index][1].write(ids.tobytes())
                work[index][1]["tokens"] += ids.size
            else:
                _finish_shard(shard_dir, writers.pop(index, None), work[index][1], results.pop(index))
                bar.advance(work[index][0].size)
        batch.clear()

    for index, (f, entry) in enumerate(work):
        entry["tokens"] = 0
        result = results[index] = FileRead()
        for text in corpus.read_chunks(f.path, result, min(corpus.CHUNK_BYTES, BATCH_BYTES // 4)):
            batch.append((index, text))
            batch_bytes += len(text)
            if batch_bytes >= BATCH_BYTES:
                flush()
                batch_bytes = 0
        batch.append((index, None))
    flush()


def _finish_shard(shard_dir: Path, writer: tuple[Path, object] | None, entry: dict, result: FileRead) -> None:
    entry["sha256"] = result.sha256
    entry["replaced"] = result.replaced
    final = _shard_path(shard_dir, result.sha256)
    if writer is None:  # no text at all: an empty shard
        final.parent.mkdir(exist_ok=True)
        final.touch()
        return
    tmp, fh = writer
    fh.close()  # no fsync: a shard is a cache (see _shard_ok), the token files are synced
    final.parent.mkdir(exist_ok=True)
    os.replace(tmp, final)


def _shard_path(shard_dir: Path, sha: str) -> Path:
    return shard_dir / sha[:2] / f"{sha}.bin"


def _shard_ok(shard_dir: Path, entry: dict, dtype: str) -> bool:
    """The file's shard exists and holds its token count (else re-encode it)."""
    try:
        size = _shard_path(shard_dir, entry["sha256"]).stat().st_size
    except FileNotFoundError:
        return False
    return size == entry["tokens"] * np.dtype(dtype).itemsize


# --- splits and token files ---------------------------------------------------


def _assign_splits(entries: list[dict], val_fraction: float, seed: int, report: PrepareReport) -> None:
    """Put a document in validation when the hash of (seed, name) falls
    below `val_fraction`; keep at least one training document."""
    for e in entries:
        u = int(hashlib.sha256(f"{seed}:{e['name']}".encode()).hexdigest()[:16], 16) / 2**64
        e["split"] = "val" if u < val_fraction else "train"
    if all(e["split"] == "val" for e in entries):
        for e in entries:
            e["split"] = "train"
    if val_fraction > 0 and not any(e["split"] == "val" for e in entries):
        report.warnings.append(
            f"the validation split is empty: {len(entries)} document(s) is too few for "
            f"--val-fraction {val_fraction}; split the text into more files to get one"
        )


def _write_token_files(
    out_dir: Path, shard_dir: Path, entries: list[dict], eot_id: int, dtype: str, manifest: dict
) -> None:
    """Concatenate the shards of each split, with an end-of-text after each document."""
    eot = np.asarray([eot_id], dtype=dtype).tobytes()
    generation = uuid.uuid4().hex[:12]
    for split in ("train", "val"):
        name = f"{split}-{generation}.bin"
        chosen = [e for e in entries if e["split"] == split]

        def write(tmp: Path, chosen: list[dict] = chosen) -> None:
            with open(tmp, "wb") as out:
                for e in chosen:
                    with open(_shard_path(shard_dir, e["sha256"]), "rb") as shard:
                        shutil.copyfileobj(shard, out, 1 << 20)
                    out.write(eot)

        write_atomic(out_dir / name, write)
        manifest[f"{split}_file"] = name
        manifest[f"{split}_count"] = sum(e["tokens"] + 1 for e in chosen)


def _same_layout(old: dict, new: dict) -> bool:
    """True when the token files of `old` hold exactly what `new` describes."""
    fields = ("path", "sha256", "split", "tokens")
    same_files = [tuple(e[k] for k in fields) for e in old["files"]] == [
        tuple(e[k] for k in fields) for e in new["files"]
    ]
    return same_files and old["tokenizer_hash"] == new["tokenizer_hash"] and old["dtype"] == new["dtype"]


def _token_files_ok(out_dir: Path, manifest: dict) -> bool:
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in ("train", "val"):
        path = out_dir / manifest[f"{split}_file"]
        if not path.is_file() or path.stat().st_size != manifest[f"{split}_count"] * itemsize:
            return False
    return True


# --- directory housekeeping ---------------------------------------------------


def _check_out_dir(out_dir: Path) -> None:
    """Refuse, touching nothing, an --out that is a file or a directory that
    is neither empty (but for a lock file) nor a Crystalline dataset."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory; choose a new or empty directory")
    if out_dir.is_dir() and {p.name for p in out_dir.iterdir()} - locks.LOCK_NAMES:
        if marked_manifest(out_dir) is None:
            raise UserError(
                f"--out {out_dir} is a non-empty directory that is not a crystalline dataset (no {MANIFEST} "
                f'with "format": "{FORMAT}"); nothing in it was changed: choose a new or empty directory'
            )


def marked_manifest(out_dir: Path) -> dict | None:
    """The manifest when it marks `out_dir` as a Crystalline dataset (see the
    module's docstring), complete or not; else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    legacy = manifest.get("format") == LEGACY_FORMAT and manifest.keys() == LEGACY_KEYS
    return manifest if legacy or manifest.get("format") == FORMAT else None


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest of a complete dataset, or None when missing, unreadable,
    from another format or only the mark of a first run not finished."""
    manifest = marked_manifest(out_dir)
    required = ("format", "tokenizer_hash", "requested_vocab_size", "files", "dtype", "train_file", "val_file")
    if manifest is None or any(k not in manifest for k in required):
        return None
    return manifest


def _dataset(out_dir: Path, manifest: dict, report: PrepareReport | None) -> Dataset:
    return Dataset(
        root=out_dir,
        vocab_size=manifest["vocab_size"],
        tokenizer_path=out_dir / TOKENIZER,
        tokenizer_hash=manifest["tokenizer_hash"],
        eot_id=manifest["eot_id"],
        dtype=manifest["dtype"],
        train_file=manifest["train_file"],
        val_file=manifest["val_file"],
        train_count=manifest["train_count"],
        val_count=manifest["val_count"],
        report=report,
    )


def _remove_temporaries(out_dir: Path) -> None:
    """Delete the temporaries a killed run left (the directory is locked: no
    other run is writing them)."""
    for tmp in out_dir.rglob(".*.tmp"):
        if is_temporary(tmp.name):
            tmp.unlink(missing_ok=True)


def _remove_unreferenced(out_dir: Path, manifest: dict, shard_dir: Path) -> None:
    """Delete the token files and shards the new manifest no longer uses;
    files under other names are never touched."""
    keep = {manifest["train_file"], manifest["val_file"]}
    for path in out_dir.glob("*.bin"):
        if TOKEN_FILE.fullmatch(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)
    for other in (out_dir / SHARDS).glob("*"):
        if other != shard_dir and SHARD_DIR.fullmatch(other.name):
            _remove_shards(other, set())
    _remove_shards(shard_dir, {_shard_path(shard_dir, e["sha256"]) for e in manifest["files"]})


def _remove_shards(tok_dir: Path, keep: set[Path]) -> None:
    """Delete the shards under shards/<hash>/ not in `keep`; with none kept,
    the folders too when nothing else is left in them."""
    for path in tok_dir.glob("*/*"):
        if SHARD_FILE.fullmatch(path.name) and path not in keep:
            path.unlink(missing_ok=True)
    if not keep:
        for folder in [*tok_dir.glob("*"), tok_dir]:
            with contextlib.suppress(OSError):
                folder.rmdir()


