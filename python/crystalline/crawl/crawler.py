"""The crawl loop: fetch pages concurrently but politely, store their text.

Politeness: at most one request in flight per host, and `delay` seconds (or
the host's robots.txt crawl-delay, if longer, up to MAX_CRAWL_DELAY) between the end of one request
and the start of the next; 429 and 5xx answers are retried with backoff,
waiting as long as Retry-After asks (up to MAX_RETRY_WAIT).

robots.txt is read once per host per run and honoured as RFC 9309 says:
protego applies `*` and `$` wildcards and the longest matching rule;
redirects are followed; a 4xx means no rules; a 5xx or an unreachable host
means nothing of that host is fetched this run (its pages fail).

Every page ends in one state with a reason, recorded in the store: nothing a
page or a server does stops the crawl (an unexpected error fails its URL as
"unexpected error (its type)" and goes to `on_note`). Links are followed
breadth first, up to `max_depth`, within the scope (same domain,
--allow/--deny), and each host gets at most `max_per_host` URLs, which
bounds link traps. Hosts that resolve to loopback, private or link-local
addresses are refused unless `allow_private` (net.py), on every redirect
hop too: such a page fails as "private address". A body is read up to `max_page_bytes` decoded bytes
(body.py): a longer page is stored truncated, unless it got there by
inflating more than MAX_EXPANSION-fold: that is skipped as "too large".
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin

import httpx
from protego import Protego

import crystalline
from crystalline.atomic import DiskFull
from crystalline.crawl import extract
from crystalline.crawl.body import ACCEPT_ENCODING, UnsupportedEncoding, read_body
from crystalline.crawl.net import PrivateAddress
from crystalline.crawl.store import Link, Page, Store, content_hash
from crystalline.crawl.urls import Scope, UnsupportedScheme, host_key, normalize

MAX_RETRY_WAIT = 60.0  # seconds; a longer Retry-After is cut to this
ROBOTS_REDIRECTS = 5  # followed for robots.txt, as RFC 9309 asks at least
MAX_CRAWL_DELAY = 60.0  # seconds; a longer robots.txt Crawl-delay is cut to this (with a note)


@dataclass
class CrawlConfig:
    data_dir: Path
    start_urls: list[str] = field(default_factory=list)
    user_agent: str = f"Crystalline-crawler/{crystalline.__version__} (+crystalline)"
    delay: float = 1.0
    timeout: float = 10.0
    max_redirects: int = 5
    retries: int = 2
    max_pages: int | None = None
    max_depth: int = 5
    max_per_host: int = 1000
    max_page_bytes: int = 2 << 20
    concurrency: int = 4
    same_domain: bool = True  # follow links only to the start URLs' domains
    allow_private: bool = False  # connect to loopback and private addresses too (net.py)
    allow: tuple[re.Pattern[str], ...] = ()
    deny: tuple[re.Pattern[str], ...] = ()


class Outcome(Exception):
    """Why a URL ends without a stored page: `state` is failed or skipped."""

    def __init__(self, state: str, reason: str, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason
        self.http_status = http_status


def failed(reason: str, http_status: int | None = None) -> Outcome:
    return Outcome("failed", reason, http_status)


def skipped(reason: str) -> Outcome:
    return Outcome("skipped", reason)


@dataclass
class Fetched:
    url: str  # the URL answered, after redirects
    status: int
    content_type: str
    charset: str | None
    body: bytes
    truncated: bool
    location: str | None = None  # of a redirect


@dataclass
class Robots:
    """What one host's robots.txt says to this run."""

    rules: Protego
    unavailable: str | None = None  # why nothing of the host is fetched (its robots.txt: 5xx or unreachable)
    asked_delay: float = 0.0  # its Crawl-delay for our user agent, in seconds
    delay: float = 0.0  # the one kept: asked_delay, at most MAX_CRAWL_DELAY

    @classmethod
    def parse(cls, text: str, user_agent: str) -> Robots:
        rules = Protego.parse(text)
        asked = float(rules.crawl_delay(user_agent) or 0.0)
        return cls(rules, None, asked, min(asked, MAX_CRAWL_DELAY))


@dataclass
class RunStats:
    """What this run did, for the progress line."""

    started: float = field(default_factory=time.monotonic)
    fetched: int = 0
    bytes: int = 0

    def pages_per_second(self) -> float:
        return self.fetched / max(time.monotonic() - self.started, 1e-9)


class Crawler:
    def __init__(
        self,
        config: CrawlConfig,
        store: Store,
        client: httpx.AsyncClient,
        on_change: Callable[[], None],
        on_note: Callable[[str], None],
    ) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.scope = Scope(store.start_domains() if config.same_domain else (), config.allow, config.deny)
        self.on_change = on_change
        self.on_note = on_note  # a message for the user, one line
        self.stats = RunStats()
        self.stored = store.stored_pages()[0]
        self.in_flight = 0
        self.busy: set[str] = set()  # hosts with a request in flight
        self.next_time: dict[str, float] = {}  # host -> earliest start of its next request
        self.robots: dict[str, Robots] = {}
        self.changed = asyncio.Event()

    async def run(self) -> None:
        """Crawl until nothing is queued (or max_pages); an exception (DiskFull)
        stops the other workers: their URLs stay `fetching`, requeued on resume."""
        workers = [asyncio.create_task(self._worker()) for _ in range(self.config.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()
        self.on_change()

    async def _worker(self) -> None:
        limit = self.config.max_pages
        while True:
            now = time.monotonic()
            self.next_time = {h: t for h, t in self.next_time.items() if t > now}
            room = limit is None or self.stored + self.in_flight < limit
            job = self.store.claim(self.busy | set(self.next_time)) if room else None
            if job is None:
                if self.in_flight == 0 and not (room and self.store.has_queued()):
                    self._notify()  # let the other workers see the end too
                    return
                wait = min(self.next_time.values(), default=now + 3600) - now
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=wait)
                except TimeoutError:
                    pass
                continue
            url, depth = job
            host = host_key(url)
            self.busy.add(host)
            self.in_flight += 1
            try:
                await self._process(url, depth)
            finally:
                self.busy.discard(host)
                self.in_flight -= 1
                self._notify()

    async def _process(self, url: str, depth: int) -> None:
        try:
            fetched = await self._fetch(url)
            page, links = self._read(url, fetched)
            digest = content_hash(page.text)
            if self.store.has_content(digest):
                raise skipped("duplicate content")
            self.stats.bytes += self.store.save(page, digest, self._links(links, depth), self.config.max_per_host)
        except Outcome as outcome:
            self.store.finish(url, outcome.state, outcome.reason, outcome.http_status)
            return
        except DiskFull:  # the crawl stops; the URL is fetched again on resume
            with contextlib.suppress(DiskFull):  # the database may be out of space too: `fetching` is requeued
                self.store.finish(url, "queued", "disk full")
            raise
        except Exception as err:  # a bug or a case not foreseen costs this URL, not the crawl
            reason = f"unexpected error ({type(err).__name__})"
            self.on_note(f"{url}: {reason}: {err}")
            self.store.finish(url, "failed", reason)
            return
        self.stats.fetched += 1
        self.stored += 1

    def _links(self, found: list[str], depth: int) -> list[Link]:
        links = []
        for raw in found:
            try:
                url = normalize(raw)
            except UnsupportedScheme:
                links.append(Link(raw, depth + 1, "unsupported scheme"))
                continue
            except ValueError:
                links.append(Link(raw, depth + 1, "invalid url"))
                continue
            skip = "depth" if depth + 1 > self.config.max_depth else self.scope.reason_out(url)
            links.append(Link(url, depth + 1, skip))
        return links

    def _read(self, url: str, fetched: Fetched) -> tuple[Page, list[str]]:
        is_html = fetched.content_type in extract.HTML_TYPES
        text = extract.decode(fetched.body, fetched.charset, is_html)
        links: list[str] = []
        if is_html:
            text, links = extract.html_to_text(text, fetched.url)
        text = text.strip()
        if not text:
            raise skipped("no text")
        page = Page(url, fetched.url, fetched.status, fetched.content_type, text + "\n", fetched.truncated)
        return page, links

    async def _fetch(self, url: str) -> Fetched:
        """GET `url`, following redirects within the scope and robots.txt."""
        chain = {url}
        current = url
        while True:
            robots = await self._robots(current)
            if robots.unavailable:
                raise failed(robots.unavailable)
            if not robots.rules.can_fetch(current, self.config.user_agent):
                raise skipped("robots")
            fetched = await self._get(current)
            if fetched.status not in (301, 302, 303, 307, 308):
                return fetched
            try:
                target = normalize(urljoin(current, fetched.location or ""))
            except UnsupportedScheme:
                raise skipped("unsupported scheme") from None
            except ValueError:
                raise failed("invalid redirect", fetched.status) from None
            if target in chain:
                raise failed("redirect loop", fetched.status)
            if len(chain) > self.config.max_redirects:
                raise failed("redirect limit", fetched.status)
            reason = self.scope.reason_out(target)
            if reason:
                raise skipped(reason)
            if self.store.has_url(target):  # fetched or queued on its own
                raise skipped("duplicate url")
            chain.add(target)
            current = target

    async def _robots(self, url: str) -> Robots:
        """The robots.txt of `url`'s host, read once per run."""
        host = host_key(url)
        if host not in self.robots:
            robots = await self._read_robots(url.split("/", 3)[0] + "//" + host + "/robots.txt")
            if robots.delay < robots.asked_delay:
                self.on_note(
                    f"{host}: robots.txt asks a Crawl-delay of {robots.asked_delay:g} s; waiting {robots.delay:g} s"
                )
            self.robots[host] = robots
        return self.robots[host]

    async def _read_robots(self, url: str) -> Robots:
        """RFC 9309 §2.3.1: redirects are followed (to any host), up to
        ROBOTS_REDIRECTS; a 4xx answer, more redirects or a bad one mean no
        rules; a 5xx answer or an unreachable host mean nothing of the host is
        fetched this run."""
        no_rules = Robots.parse("", self.config.user_agent)
        for _ in range(ROBOTS_REDIRECTS + 1):
            try:
                fetched = await self._get(url, robots=True)
            except Outcome as outcome:
                status = outcome.http_status or 0
                if 400 <= status < 500:
                    return no_rules
                return Robots(no_rules.rules, "robots.txt server error" if status >= 500 else outcome.reason)
            if fetched.location is None:
                return Robots.parse(extract.decode(fetched.body, fetched.charset, False), self.config.user_agent)
            try:
                url = normalize(urljoin(url, fetched.location))
            except ValueError:  # also an unsupported scheme
                return no_rules
        return no_rules

    async def _get(self, url: str, robots: bool = False) -> Fetched:
        """One polite GET (with retries on 429 and 5xx). A redirect comes back
        unfollowed; a page of a type we do not read is skipped before its body
        is downloaded."""
        host = host_key(url)
        for attempt in range(self.config.retries + 1):
            await self._wait_turn(host)
            retry_wait = None
            try:
                async with asyncio.timeout(self.config.timeout):
                    async with self.client.stream("GET", url, headers={"Accept-Encoding": ACCEPT_ENCODING}) as response:
                        status = response.status_code
                        if (status == 429 or status >= 500) and attempt < self.config.retries:
                            retry_wait = _retry_after(response, attempt, self.config.delay)
                        else:
                            return await self._answer(url, response, robots)
            except httpx.TimeoutException:
                raise failed("timeout") from None
            except TimeoutError:
                raise failed("timeout") from None
            except httpx.ConnectError as err:
                raise failed(_connect_failure(err)) from None
            except httpx.TooManyRedirects:
                raise failed("redirect limit") from None
            except httpx.TransportError:
                raise failed("connection error") from None
            finally:
                self.next_time[host] = time.monotonic() + self._delay(host)
            await asyncio.sleep(retry_wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _answer(self, url: str, response: httpx.Response, robots: bool) -> Fetched:
        status = response.status_code
        if response.is_redirect:
            return Fetched(url, status, "", None, b"", False, location=response.headers["location"])
        if status >= 400:
            raise failed("http error", status)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not robots and content_type not in extract.HTML_TYPES + extract.TEXT_TYPES:
            raise skipped("content type")
        try:
            body = await read_body(response, self.config.max_page_bytes)
        except UnsupportedEncoding:
            raise failed("content encoding", status) from None
        except zlib.error:
            raise failed("bad compression", status) from None
        if body.bomb:
            raise skipped("too large")
        return Fetched(url, status, content_type, response.charset_encoding, body.data, body.truncated)

    async def _wait_turn(self, host: str) -> None:
        wait = self.next_time.get(host, 0.0) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _delay(self, host: str) -> float:
        robots = self.robots.get(host)
        return max(self.config.delay, robots.delay if robots is not None else 0.0)


def _retry_after(response: httpx.Response, attempt: int, delay: float) -> float:
    """Seconds to wait before retrying: Retry-After (seconds or an HTTP
    date) when given, else exponential backoff; at most MAX_RETRY_WAIT."""
    value = response.headers.get("retry-after", "").strip()
    wait = None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        wait = float(value)
    elif value:
        try:
            wait = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            wait = None
    if wait is None:
        wait = max(delay, 0.5) * 2**attempt
    return min(max(wait, 0.0), MAX_RETRY_WAIT)


def _connect_failure(err: BaseException) -> str:
    """The reason for a failed connection, from the chain of causes."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, PrivateAddress):
            return "private address"
        if isinstance(seen, socket.gaierror):
            return "dns failure"
        seen = seen.__cause__ or seen.__context__
    return "connection error"
