"""A response body read up to a cap that counts decompressed bytes.

httpx's own decoding inflates a whole network read at once: 64 KB of gzip
can become 64 MB before anyone counts it, so a small page that inflates to
gigabytes (a decompression bomb) costs hundreds of MB. Here the raw bytes
are inflated with zlib's `max_length`, never past the cap, and reading stops
there. Only the encodings decoded here are asked for (ACCEPT_ENCODING).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import httpx

ACCEPT_ENCODING = "gzip, deflate"
MAX_EXPANSION = 100  # a body cut at the cap after inflating more than this is a bomb, not a long page


class UnsupportedEncoding(ValueError):
    """A Content-Encoding other than gzip, deflate or identity."""


@dataclass
class Body:
    data: bytes  # at most the cap, decoded
    truncated: bool  # the body held more than the cap
    expansion: float  # decoded bytes per raw byte read (1 without compression)

    @property
    def bomb(self) -> bool:
        return self.truncated and self.expansion > MAX_EXPANSION


async def read_body(response: httpx.Response, cap: int) -> Body:
    """Decode `response`'s body (gzip or deflate) into at most `cap` bytes,
    reading no further than needed. Raises UnsupportedEncoding, and
    zlib.error for a body that is not what its encoding says."""
    inflater = _Inflater(response.headers.get("content-encoding", ""))
    body, used = bytearray(), 0
    async for raw in response.aiter_raw():
        if inflater.eof:
            break  # bytes after the end of the compressed stream are not read
        while raw:  # each pass fills the cap, or consumes all of `raw`, or ends the stream
            out, rest = inflater.inflate(raw, cap + 1 - len(body))
            used += len(raw) - len(rest)
            body += out
            if len(body) > cap:
                return Body(bytes(body[:cap]), True, len(body) / max(used, 1))
            raw = rest
    return Body(bytes(body), False, len(body) / max(used, 1))


class _Inflater:
    """The decoder of one Content-Encoding; gzip ends at its first member,
    trailing bytes are ignored (as httpx does)."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        self.zlib = None
        self.may_be_raw = encoding == "deflate"  # some servers send raw deflate without the zlib header
        if encoding in ("gzip", "x-gzip"):
            self.zlib = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self.zlib = zlib.decompressobj(zlib.MAX_WBITS)
        elif encoding not in ("", "identity"):
            raise UnsupportedEncoding(encoding)

    @property
    def eof(self) -> bool:
        return self.zlib is not None and self.zlib.eof

    def inflate(self, raw: bytes, limit: int) -> tuple[bytes, bytes]:
        """At most `limit` decoded bytes from `raw`, and the part of `raw`
        not consumed yet."""
        if self.zlib is None:
            return raw[:limit], raw[limit:]
        try:
            out = self.zlib.decompress(raw, limit)
        except zlib.error:
            if not self.may_be_raw:
                raise
            self.zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self.zlib.decompress(raw, limit)
        self.may_be_raw = False
        return out, self.zlib.unconsumed_tail
