"""The byte-level BPE tokenizer and the chunked UTF-8 reader."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

import crystalline
from crystalline.data import corpus
from crystalline.data.stats import token_stats
from crystalline.data.tokenizer import EOT, MIN_VOCAB_SIZE, Tokenizer
from crystalline.errors import UserError

SAMPLE = [
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text, 日本語, emoji 🎉 and tabs\tand\r\nnewlines.\n",
    "the quick brown fox jumps over the lazy dog " * 20,
]


@lru_cache(maxsize=1)
def trained() -> Tokenizer:
    return Tokenizer.train(iter(SAMPLE * 5), 320)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_text(text):
    tok = trained()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_roundtrip_arbitrary_bytes_under_the_decode_policy(data):
    # Bytes become text with invalid UTF-8 replaced by U+FFFD; that text round-trips,
    # and valid UTF-8 comes back byte for byte.
    tok = trained()
    text = data.decode("utf-8", errors="replace")
    back = tok.decode(tok.encode(text))
    assert back == text
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert back.encode("utf-8") == data


def test_end_of_text_is_one_special_token():
    tok = trained()
    assert tok.vocab_size == 320
    assert tok.encode(EOT) == [tok.eot_id]
    ids = tok.encode("a" + EOT + "b")
    assert ids.count(tok.eot_id) == 1
    assert tok.decode(ids) == "a" + EOT + "b"


def test_saved_file_loads_in_plain_tokenizers(tmp_path):
    tok = trained()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    plain = tokenizers.Tokenizer.from_file(str(path))
    text = SAMPLE[1]
    assert plain.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert Tokenizer.load(path).encode(text) == tok.encode(text)


def test_vocab_smaller_than_bytes_plus_specials_is_refused():
    with pytest.raises(UserError, match=f"use --vocab-size {MIN_VOCAB_SIZE} or more"):
        Tokenizer.train(iter(SAMPLE), MIN_VOCAB_SIZE - 1)
    assert Tokenizer.train(iter(SAMPLE), MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE


def test_decode_refuses_ids_outside_the_vocabulary():
    with pytest.raises(UserError, match="outside the vocabulary"):
        trained().decode([1, 320])


def test_load_refuses_a_bad_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")


@settings(max_examples=200, deadline=None)
@given(st.text(), st.integers(min_value=4, max_value=64))
def test_read_chunks_splits_text_without_breaking_characters(tmp_path_factory, text, chunk):
    path = tmp_path_factory.mktemp("chunks") / "f.txt"
    data = text.encode("utf-8")
    path.write_bytes(data)
    result = corpus.FileRead()
    pieces = list(corpus.read_chunks(path, result, chunk))
    assert "".join(pieces) == text
    assert all(len(p.encode("utf-8")) <= chunk for p in pieces)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert not result.replaced


def test_read_chunks_replaces_invalid_utf8_and_says_so(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1") * 3)
    result = corpus.FileRead()
    text = "".join(corpus.read_chunks(path, result))
    assert text == "caf\ufffd\n" * 3
    assert result.replaced


def test_tokenize_command_encodes_decodes_and_counts_groups(tmp_path):
    trained().save(tmp_path / "tok.json")
    env = dict(os.environ, PYTHONPATH=str(Path(crystalline.__file__).resolve().parents[1]))

    def cli(*args):
        result = subprocess.run(
            [sys.executable, "-m", "crystalline", "tokenize", "--tokenizer", "tok.json", *args],
            cwd=tmp_path, env=env, capture_output=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.decode("utf-8")  # bytes: keep "\r\n" as printed

    text = SAMPLE[1]
    ids = json.loads(cli("--text", text, "--json"))
    assert ids == trained().encode(text)
    assert cli("--decode", "--text", json.dumps(ids)) == text
    assert cli("--decode", "--text", " ".join(map(str, ids))) == text
    (tmp_path / "in.txt").write_text(text)
    stats = json.loads(cli("in.txt", "--stats", "--json"))
    assert stats["tokens"] == len(ids) and stats["bytes"] == len(text.encode())
    assert stats["groups"] == [sum(1 for i in ids if i % 12 == g) for g in range(12)]
    assert stats["top"][0]["count"] == max(ids.count(i) for i in set(ids))


def test_token_stats_count_tokens_bytes_frequent_ids_and_groups():
    tok = trained()
    pieces = SAMPLE[:2]  # counted piece by piece, as a file's chunks are
    ids = [i for piece in pieces for i in tok.encode(piece)]
    got = token_stats(tok, pieces, top=3)
    assert got.tokens == len(ids) and got.bytes == sum(len(p.encode()) for p in pieces)
    assert got.bytes_per_token == got.bytes / got.tokens
    assert got.groups == [sum(1 for i in ids if i % 12 == g) for g in range(12)]
    counts = sorted(((ids.count(i), -i) for i in set(ids)), reverse=True)[:3]
    assert [(i, c) for i, _, c in got.top] == [(-i, c) for c, i in counts]
    assert got.top[0][1] == tok.decode([got.top[0][0]])
    assert token_stats(tok, []).bytes_per_token is None
