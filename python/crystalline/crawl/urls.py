"""URL normalisation and scope rules of the crawler.

Two URLs that differ only in the case of the scheme or host, a default port,
a fragment, an empty path or the order of query parameters name the same
page: `normalize` maps them to one string, the frontier's key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SUPPORTED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsupportedScheme(ValueError):
    """A URL whose scheme the crawler does not fetch (mailto:, ftp:, javascript:...)."""


def normalize(url: str) -> str:
    """The canonical form of an absolute http(s) URL.

    Raises UnsupportedScheme for other schemes and ValueError for a URL
    without a host or with a bad port."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if not scheme:
        raise ValueError("no scheme")
    if scheme not in SUPPORTED_SCHEMES:
        raise UnsupportedScheme(f"unsupported scheme {scheme or '(none)'!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("no host")
    port = parts.port  # raises ValueError for a port that is not a number in range
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def host_key(url: str) -> str:
    """The host (with a non-default port) of a normalised URL: the unit of
    politeness, robots.txt and the per-host page cap."""
    return urlsplit(url).netloc


@dataclass(frozen=True)
class Scope:
    """Which discovered URLs the crawl follows."""

    domains: tuple[str, ...]  # hosts of the start URLs, without "www."; empty: any host
    allow: tuple[re.Pattern[str], ...] = ()
    deny: tuple[re.Pattern[str], ...] = ()

    def reason_out(self, url: str) -> str | None:
        """None when `url` is in scope, otherwise the skip reason."""
        if self.domains:
            host = urlsplit(url).hostname or ""
            if not any(host == d or host.endswith("." + d) for d in self.domains):
                return "offsite"
        if self.allow and not any(p.search(url) for p in self.allow):
            return "filtered"
        if any(p.search(url) for p in self.deny):
            return "filtered"
        return None


def domain_of(url: str) -> str:
    """The host of `url` without a leading "www.", for --same-domain."""
    host = urlsplit(url).hostname or ""
    return host.removeprefix("www.")
