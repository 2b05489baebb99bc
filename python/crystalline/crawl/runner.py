"""The crawler's entry point for Python: `run` checks the settings and start
URLs, locks the data directory, runs the crawl loop and returns a `Summary`
of what the directory holds afterwards."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from crystalline.atomic import DiskFull
from crystalline.crawl.crawler import CrawlConfig, Crawler, RunStats
from crystalline.crawl.net import GuardedTransport
from crystalline.crawl.store import DB_NAME, Link, Store
from crystalline.crawl.urls import UnsupportedScheme, normalize
from crystalline.errors import UserError
from crystalline.locks import locked

# Most requests in flight: each is a worker task, so --concurrency 10**30 ran out of memory.
MAX_CONCURRENCY = 1024


@dataclass
class Summary:
    """The state of the crawl in a directory after a run."""

    stored: int  # pages in the directory, all runs
    bytes: int
    fetched: int  # pages stored by this run
    states: dict[str, int]  # frontier rows per state
    reasons: dict[str, int]  # frontier rows per failure or skip reason


def run(
    config: CrawlConfig,
    resume: bool = False,
    on_progress: Callable[[Store, RunStats], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Summary:
    """Crawl into `config.data_dir` and return what it holds afterwards.
    `on_progress` is called whenever a page ends, `on_note` with each
    message for the user (one line, e.g. an unexpected error on a URL).

    Raises UserError for bad settings, a directory that cannot be used, a
    crawl already there without `resume` (or none there with it and no
    start URLs), or a disk that fills up (the crawl stops, its database
    intact, and resumes where it stopped)."""
    starts = _check(config)
    data_dir = config.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file; give a directory (it is created if missing)")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --data-dir {data_dir}: {err.strerror}") from None
    had_crawl = (data_dir / DB_NAME).exists()
    if had_crawl and not resume:
        raise UserError(f"{data_dir} already holds a crawl; pass --resume to continue it, or use another --data-dir")
    if resume and not had_crawl and not starts:
        raise UserError(f"{data_dir} holds no crawl to resume; give start URLs")
    with locked(data_dir):
        store = Store(data_dir)
        try:
            try:
                store.requeue_interrupted()
                store.add(starts, config.max_per_host)
                stats = asyncio.run(_crawl(config, store, on_progress, on_note or (lambda note: None)))
            except DiskFull as err:
                raise UserError(f"{err}; free some space, then continue with --resume") from None
            stored, total = store.stored_pages()
            return Summary(stored, total, stats.fetched, store.counts(), store.reasons())
        finally:
            store.close()


async def _crawl(
    config: CrawlConfig,
    store: Store,
    on_progress: Callable[[Store, RunStats], None] | None,
    on_note: Callable[[str], None],
) -> RunStats:
    async with httpx.AsyncClient(
        headers={"User-Agent": config.user_agent},
        timeout=config.timeout,
        follow_redirects=False,
        transport=GuardedTransport(config.allow_private, httpx.Limits(max_connections=config.concurrency * 2)),
    ) as client:
        crawler: Crawler

        def changed() -> None:
            if on_progress is not None:
                on_progress(store, crawler.stats)

        crawler = Crawler(config, store, client, changed, on_note)
        await crawler.run()
        return crawler.stats


def _check(config: CrawlConfig) -> list[Link]:
    """Validate the numbers and start URLs; the start URLs as frontier links."""
    for name, value, least in (
        ("--delay", config.delay, 0),
        ("--timeout", config.timeout, 1e-3),
        ("--max-redirects", config.max_redirects, 0),
        ("--retries", config.retries, 0),
        ("--max-depth", config.max_depth, 0),
        ("--max-per-host", config.max_per_host, 1),
        ("--max-page-bytes", config.max_page_bytes, 1),
        ("--concurrency", config.concurrency, 1),
    ):
        if value < least:
            raise UserError(f"{name} must be at least {least}, not {value}")
    if config.concurrency > MAX_CONCURRENCY:
        raise UserError(f"--concurrency must be at most {MAX_CONCURRENCY}, not {config.concurrency}")
    if not (config.user_agent.isascii() and config.user_agent.isprintable()):  # an HTTP header is ASCII
        raise UserError(f"--user-agent must be printable ASCII, not {config.user_agent!r}")
    if config.max_pages is not None and config.max_pages < 1:
        raise UserError(f"--max-pages must be at least 1, not {config.max_pages}")
    links = []
    for raw in config.start_urls:
        try:
            links.append(Link(normalize(raw), 0))
        except UnsupportedScheme as err:
            raise UserError(f"start URL {raw!r}: {err}; only http:// and https:// are crawled") from None
        except ValueError:
            raise UserError(f"start URL {raw!r} is not a valid URL; write it as https://host/path") from None
    return links


def patterns(option: str, values: list[str] | None) -> tuple[re.Pattern[str], ...]:
    """`values` compiled for CrawlConfig.allow or .deny; a bad regex is a
    UserError naming `option`."""
    compiled = []
    for value in values or []:
        try:
            compiled.append(re.compile(value))
        except re.error as err:
            raise UserError(f"{option} {value!r} is not a valid regular expression: {err}") from None
    return tuple(compiled)
