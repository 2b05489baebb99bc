"""Byte-level BPE tokenizer on top of Hugging Face `tokenizers`.

The tokenizer is GPT-2 style: text is split with the GPT-2 pre-tokenizer
regex, every byte maps to one of 256 base symbols, and merges are learned up
to the requested vocabulary size. It is saved as a plain `tokenizer.json`, so
`tokenizers.Tokenizer.from_file` and `transformers` load it as it is.

Because every byte has a symbol, encoding never fails and decoding the ids
gives back exactly the text that was encoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from crystalline.errors import UserError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary that cannot hold the 256 bytes plus the specials."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs "
            f"{BYTE_ALPHABET_SIZE} byte tokens plus {len(SPECIAL_TOKENS)} special token(s); "
            f"use --vocab-size {MIN_VOCAB_SIZE} or more"
        )


class Tokenizer:
    """A loaded byte-level BPE tokenizer with an end-of-text token."""

    def __init__(self, inner: _HFTokenizer) -> None:
        eot_id = inner.token_to_id(EOT)
        if eot_id is None:
            raise UserError(f"tokenizer has no {EOT} token; train one with `crystalline prepare`")
        self.inner = inner
        self.eot_id = eot_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn merges from a stream of texts (never held all at once)."""
        check_vocab_size(vocab_size)
        inner = _HFTokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        inner.train_from_iterator(texts, trainer)
        return cls(inner)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist")
        try:  # read here, not by the library, which cannot open a path that is not valid UTF-8
            inner = _HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as err:  # the library raises a bare Exception on bad JSON
            raise UserError(f"{path} is not a valid tokenizer.json ({err})") from None
        return cls(inner)

    def save(self, path: Path) -> None:
        """Write tokenizer.json (the bytes the library's own `save` writes, to
        any path the OS takes, not only UTF-8 ones)."""
        Path(path).write_text(self.inner.to_str(pretty=True), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> Iterator[list[int]]:
        """Encode many texts in parallel (Rust threads), yielding ids per text."""
        for encoding in self.inner.encode_batch_fast(texts, add_special_tokens=False):
            yield encoding.ids

    def decode(self, ids: Iterable[int]) -> str:
        ids, size = list(ids), self.vocab_size  # the size once, not once per id
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{size - 1})")
        return self.inner.decode(ids, skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self.inner.id_to_token(token_id)
