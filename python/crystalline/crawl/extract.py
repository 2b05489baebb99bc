"""From a fetched body to training text and links.

Decoding: the charset the server declared, else one an HTML page declares in
a <meta> tag, else the one charset-normalizer detects; bytes that still do
not decode become U+FFFD, so a wrong guess costs characters, never the page.
A declared name counts only if it is a text charset: Python also knows
codecs from bytes to bytes (hex, base64, zlib...) and from text to text
(rot13), and host-name codecs (idna, punycode) that are no charset at all.

HTML becomes its main content by trafilatura (navigation, scripts, headers,
footers and boilerplate dropped); links are read from the same lxml tree.
Plain text is kept as it is.
"""

from __future__ import annotations

import codecs
import re
from urllib.parse import urljoin

import charset_normalizer
import lxml.html
import trafilatura
from lxml import etree

HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_PARSER = lxml.html.HTMLParser(encoding="utf-8", remove_comments=True)
_NOT_CHARSETS = ("idna", "punycode", "undefined")  # text codecs by Python's flag, but not for documents


def decode(body: bytes, declared: str | None, is_html: bool) -> str:
    """The body as text; see the module docstring for the order of choices."""
    encoding = _known(declared)
    if encoding is None and is_html:
        found = _META_CHARSET.search(body[:4096])
        encoding = _known(found.group(1).decode("ascii")) if found else None
    if encoding is None:
        best = charset_normalizer.from_bytes(body).best()
        encoding = best.encoding if best is not None else "utf-8"
    return body.decode(encoding, errors="replace")


def _known(name: str | None) -> str | None:
    if not name:
        return None
    try:
        info = codecs.lookup(name)
    except LookupError:
        return None
    if not info._is_text_encoding or info.name in _NOT_CHARSETS:  # the stdlib's own flag (bytes.decode checks it)
        return None
    return info.name


def html_to_text(html: str, url: str) -> tuple[str, list[str]]:
    """The main text of an HTML page ("" when it has none) and the absolute
    URLs of its links, in page order. Malformed markup is parsed as browsers
    would; markup lxml cannot parse at all gives ("", [])."""
    try:
        tree = lxml.html.document_fromstring(html.encode("utf-8"), parser=_PARSER)
    except (etree.ParserError, ValueError):  # e.g. "Document is empty"
        return "", []
    base = url
    for href in tree.xpath("//base/@href"):
        base = urljoin(url, href.strip())
        break
    links = [urljoin(base, href.strip()) for href in tree.xpath("//a/@href | //area/@href") if href.strip()]
    text = trafilatura.extract(tree, url=url, include_comments=False, include_tables=True)
    return (text or "").strip(), links
