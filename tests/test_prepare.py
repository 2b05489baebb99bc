"""`crystalline prepare`: walking, encoding, incremental rebuilds, atomicity,
bounded memory and the bad-input messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from crystalline.data import corpus
from crystalline.data import prepare as prep
from crystalline.data.prepare import load_dataset, prepare, prepare_for_training
from crystalline.data.tokenizer import EOT
from crystalline.errors import UserError

VOCAB = 300
WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "x", "y", "élan", "日本"]
PYTHON_DIR = str(Path(prep.__file__).resolve().parents[2])


def doc(seed: int, lines: int = 40) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, 10)) + f" {seed}\n" for _ in range(lines))


def make_corpus(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(doc(i))
    return root


def documents(ds, split: str) -> list[str]:
    ids = (ds.train_tokens() if split == "train" else ds.val_tokens()).tolist()
    text = ds.tokenizer().decode(ids)
    return text.split(EOT)[:-1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "crystalline", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_prepare_writes_documents_joined_by_end_of_text(tmp_path):
    src = make_corpus(tmp_path / "src")
    ds = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    assert ds.vocab_size == VOCAB and ds.dtype == "uint16"
    assert ds.tokenizer_path == tmp_path / "ds" / "tokenizer.json"
    train, val = documents(ds, "train"), documents(ds, "val")
    expected = {doc(i) for i in range(12)}
    assert set(train) | set(val) == expected and len(train) + len(val) == 12
    assert ds.train_tokens()[-1] == ds.eot_id
    assert isinstance(ds.train_tokens(), np.memmap)

    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    entry = manifest["files"][0]
    assert {"size", "mtime_ns", "sha256", "tokens", "split"} <= entry.keys()
    assert sum(e["tokens"] + 1 for e in manifest["files"] if e["split"] == "train") == ds.train_count

    again = load_dataset(tmp_path / "ds")
    np.testing.assert_array_equal(again.train_tokens(), ds.train_tokens())
    assert again.tokenizer_hash == ds.tokenizer_hash


def test_token_dtype_widens_past_uint16():
    assert prep.token_dtype(65535) == "uint16"
    assert prep.token_dtype(65536) == "uint32"


def test_rerun_encodes_only_new_or_changed_files(tmp_path):
    src = make_corpus(tmp_path / "src")
    first = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    assert first.report.files_encoded == 12 and first.report.tokenizer_trained

    same = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    assert same.report.files_encoded == 0 and not same.report.tokenizer_trained
    assert same.train_file == first.train_file  # nothing rewritten

    (src / "pkg0" / "f0.txt").write_text(doc(100))
    (src / "pkg1" / "new.txt").write_text(doc(101))
    changed = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    assert changed.report.files_encoded == 2 and changed.report.files_reused == 11
    assert changed.tokenizer_hash == first.tokenizer_hash  # tokenizer reused, not retrained
    docs = set(documents(changed, "train")) | set(documents(changed, "val"))
    assert doc(100) in docs and doc(101) in docs and doc(0) not in docs

    shard = next((tmp_path / "ds" / "shards").glob("*/*/*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])  # a damaged cache entry is re-encoded
    assert prepare([src], tmp_path / "ds", VOCAB, progress=False).report.files_encoded == 1

    os.utime(src / "pkg2" / "f2.txt", ns=(1, 1))  # new mtime, same bytes
    touched = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    assert touched.report.files_encoded == 0

    (src / "pkg2" / "f5.txt").unlink()
    removed = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    assert removed.report.files_encoded == 0
    assert doc(5) not in set(documents(removed, "train")) | set(documents(removed, "val"))


def test_split_is_by_document_and_stable_when_files_are_added(tmp_path):
    src = make_corpus(tmp_path / "src", n=30)
    ds = prepare([src], tmp_path / "ds", VOCAB, val_fraction=0.3, progress=False)
    before = {e["name"]: e["split"] for e in prep.read_manifest(ds.root)["files"]}
    assert "val" in before.values() and "train" in before.values()
    for i in range(30, 40):
        (src / f"extra{i}.txt").write_text(doc(i))
    ds = prepare([src], tmp_path / "ds", VOCAB, val_fraction=0.3, progress=False)
    after = {e["name"]: e["split"] for e in prep.read_manifest(ds.root)["files"]}
    assert {k: after[k] for k in before} == before


def test_vocab_change_needs_retrain_and_given_tokenizer_must_match(tmp_path):
    src = make_corpus(tmp_path / "src")
    ds = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    ds.tokenizer().save(tmp_path / "given.json")
    with pytest.raises(UserError, match=f"pass --vocab-size {VOCAB} to reuse it.*--retrain-tokenizer"):
        prepare([src], tmp_path / "ds", VOCAB + 5, progress=False)
    retrained = prepare([src], tmp_path / "ds", VOCAB + 5, retrain_tokenizer=True, progress=False)
    assert retrained.report.tokenizer_trained and retrained.vocab_size == VOCAB + 5
    assert len(list((tmp_path / "ds" / "shards").iterdir())) == 1  # old tokenizer's shards dropped

    given = tmp_path / "given.json"  # saved before the retrain
    with pytest.raises(UserError, match=f"drop --vocab-size or pass --vocab-size {VOCAB}"):
        prepare([src], tmp_path / "ds2", VOCAB + 1, tokenizer=given, progress=False)
    used = prepare([src], tmp_path / "ds2", None, tokenizer=given, progress=False)
    assert not used.report.tokenizer_trained and used.vocab_size == VOCAB


def test_prepare_for_training_caches_by_inputs_and_vocab(tmp_path):
    src = make_corpus(tmp_path / "src")
    cache = tmp_path / "cache"
    first = prepare_for_training([src], VOCAB, cache_dir=cache, progress=False)
    again = prepare_for_training([src], VOCAB, cache_dir=cache, progress=False)
    assert again.root == first.root and again.report.files_encoded == 0
    other = prepare_for_training([src], VOCAB + 10, cache_dir=cache, progress=False)
    assert other.root != first.root and other.report.tokenizer_trained


def test_half_written_dataset_is_never_trusted(tmp_path, monkeypatch):
    src = make_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    old = prepare([src], out, VOCAB, progress=False)
    old_docs = documents(old, "train")

    (src / "pkg0" / "f0.txt").write_text(doc(100))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, VOCAB, progress=False)
    monkeypatch.undo()
    # The crash came before the manifest: the previous dataset is still whole.
    assert documents(load_dataset(out), "train") == old_docs
    assert prepare([src], out, VOCAB, progress=False).report.files_encoded == 1

    ds = load_dataset(out)
    (out / ds.train_file).write_bytes((out / ds.train_file).read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        load_dataset(out)
    ds.tokenizer_path.write_text(ds.tokenizer_path.read_text().replace("alpha", "ALPHA"))
    with pytest.raises(UserError, match="does not match"):
        load_dataset(out)
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a complete dataset"):
        load_dataset(out)
    # without its manifest nothing marks the directory as a dataset: prepare leaves it alone
    with pytest.raises(UserError, match="not a crystalline dataset"):
        prepare([src], out, VOCAB, progress=False)


def test_walk_skips_hidden_binary_other_extensions_and_survives_link_loops(tmp_path):
    src = make_corpus(tmp_path / "src", n=3)
    (src / ".hidden.txt").write_text("secret")
    (src / ".git").mkdir()
    (src / ".git" / "config.txt").write_text("x")
    (src / "blob.txt").write_bytes(b"\x00\x01\x02 binary")
    (src / "empty.txt").write_text("")
    (src / "notes.md").write_text("# notes\n")
    (src / "pkg0" / "loop").symlink_to(src, target_is_directory=True)
    (src / "alias.txt").symlink_to(src / "pkg0" / "f0.txt")
    files, stats = corpus.walk([src], extensions=["txt"])
    # the link loop is entered once; f0.txt and its alias are one document
    assert sorted(f.name for f in files) == ["alias.txt", "pkg1/f1.txt", "pkg2/f2.txt"]
    assert (stats.hidden, stats.binary, stats.empty, stats.other_extension) == (2, 1, 1, 1)
    files, _ = corpus.walk([src])
    assert "notes.md" in {f.name for f in files}


def test_unreadable_file_is_a_warning_and_the_rest_continues(tmp_path, monkeypatch):
    src = make_corpus(tmp_path / "src", n=3)
    locked = src / "pkg1" / "f1.txt"
    if os.geteuid() == 0:  # root reads anything: simulate the refusal
        real_sniff = corpus._sniff

        def sniff(path):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied")
            return real_sniff(path)

        monkeypatch.setattr(corpus, "_sniff", sniff)
    else:
        locked.chmod(0)
    ds = prepare([src], tmp_path / "ds", VOCAB, progress=False)
    assert ds.report.skipped.unreadable == 1 and ds.report.files == 2
    assert any("f1.txt: Permission denied" in w for w in ds.report.warnings)


def test_bad_utf8_is_replaced_and_counted(tmp_path):
    src = make_corpus(tmp_path / "src", n=3)
    (src / "latin1.txt").write_bytes("naïve café\n".encode("latin-1") * 50)
    ds = prepare([src], tmp_path / "ds", VOCAB, val_fraction=0, progress=False)
    assert ds.report.files_with_replacements == 1
    assert "na\ufffdve caf\ufffd\n" * 50 in documents(ds, "train")


def test_builtin_corpus_is_the_stdlib_python_source():
    files = corpus.builtin_corpus_paths()
    assert len(files) > 500
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert any(f.name == "os.py" for f in files)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "input path missing does not exist"),
        ("emptydir", "no text files found in emptydir"),
        ("binary", "skipped: 2 binary"),
        ("vocab", "--vocab-size 100 is too small"),
        ("outfile", "is a file, not a directory"),
        ("foreign", "not a crystalline dataset"),
    ],
)
def test_bad_input_gives_one_message_and_exit_2(tmp_path, case, message):
    make_corpus(tmp_path / "src", n=2)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "binary").mkdir()
    for name in ("a.bin", "b.dat"):
        (tmp_path / "binary" / name).write_bytes(bytes(range(256)))
    (tmp_path / "outfile").write_text("I am a file")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("precious")
    data, out, vocab = "src", "ds", "300"
    if case in ("missing", "emptydir", "binary"):
        data = case
    elif case == "vocab":
        vocab = "100"
    else:
        out = case
    result = run_cli("prepare", data, "--out", out, "--vocab-size", vocab, "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / out / "manifest.json").exists()
    assert not (tmp_path / "ds").exists()  # nothing half-made
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "precious"


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from crystalline.data import corpus, prepare as prep
    corpus.CHUNK_BYTES = prep.BATCH_BYTES = 256 << 10
    prep.TRAIN_SAMPLE_BYTES = 2 << 20
    ds = prep.prepare([Path(sys.argv[1])], Path(sys.argv[2]), 300, progress=False)
    assert ds.report.files_encoded > 0
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


def test_memory_stays_bounded_on_a_corpus_far_larger_than_the_chunk_cap(tmp_path):
    def peak_rss(mb: int) -> int:
        src = tmp_path / f"src{mb}"
        src.mkdir()
        line = "".join(doc(1, 1)).encode()
        block = line * ((1 << 20) // len(line))
        with open(src / "big.txt", "wb") as fh:  # one file much larger than a chunk
            for _ in range(mb // 2):
                fh.write(block)
        for i in range(mb // 2):
            (src / f"part{i}.txt").write_bytes(block)
        script = tmp_path / "measure.py"
        script.write_text(MEMORY_SCRIPT)
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        out = subprocess.run(
            [sys.executable, str(script), str(src), str(tmp_path / f"ds{mb}")],
            env=env, capture_output=True, text=True, check=True,
        )
        return int(out.stdout.split()[-1])

    small, large = peak_rss(2), peak_rss(24)  # 8x and 96x the 256 KiB chunk cap
    # Holding the corpus would cost well over 22 MB more (text plus token lists).
    assert large - small < 12 << 20, (small, large)
