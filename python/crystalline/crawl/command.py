"""`crystalline crawl`: fetch web pages into a directory of training text.

`run` is the Python API (it checks the input, locks the directory, runs the
crawl loop and returns the final counts); `crawl` is the typer command over
it, with a progress line on stderr and a summary on stdout.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

import crystalline
from crystalline.crawl.crawler import CrawlConfig, Crawler, RunStats
from crystalline.crawl.store import DB_NAME, Link, Store
from crystalline.crawl.urls import UnsupportedScheme, normalize
from crystalline.errors import UserError

DEFAULT_USER_AGENT = f"Crystalline-crawler/{crystalline.__version__} (+crystalline)"
LOCK_NAME = ".crawl.lock"


@dataclass
class Summary:
    """The state of the crawl in a directory after a run."""

    stored: int  # pages in the directory, all runs
    bytes: int
    fetched: int  # pages stored by this run
    states: dict[str, int]  # frontier rows per state
    reasons: dict[str, int]  # frontier rows per failure or skip reason


def run(
    config: CrawlConfig, resume: bool = False, on_progress: Callable[[Store, RunStats], None] | None = None
) -> Summary:
    """Crawl into `config.data_dir` and return what it holds afterwards.

    Raises UserError for bad settings, a directory that cannot be used, or a
    crawl already there without `resume` (or none there with it and no
    start URLs)."""
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
    with _locked(data_dir):
        store = Store(data_dir)
        try:
            store.requeue_interrupted()
            store.add(starts, config.max_per_host)
            stats = asyncio.run(_crawl(config, store, on_progress))
            stored, total = store.stored_pages()
            return Summary(stored, total, stats.fetched, store.counts(), store.reasons())
        finally:
            store.close()


async def _crawl(config: CrawlConfig, store: Store, on_progress: Callable[[Store, RunStats], None] | None) -> RunStats:
    async with httpx.AsyncClient(
        headers={"User-Agent": config.user_agent},
        timeout=config.timeout,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=config.concurrency * 2),
    ) as client:
        crawler: Crawler

        def changed() -> None:
            if on_progress is not None:
                on_progress(store, crawler.stats)

        crawler = Crawler(config, store, client, changed)
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


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """One crawl per directory at a time (the lock dies with the process)."""
    fd = os.open(data_dir / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another crawl is writing to {data_dir}") from None
        yield
    finally:
        os.close(fd)


def _patterns(option: str, values: list[str] | None) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for value in values or []:
        try:
            compiled.append(re.compile(value))
        except re.error as err:
            raise UserError(f"{option} {value!r} is not a valid regular expression: {err}") from None
    return tuple(compiled)


def crawl(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Directory for the page texts and crawl.sqlite3.")],
    start_urls: Annotated[Optional[list[str]], typer.Argument(help="URLs to start from (http or https).")] = None,
    delay: Annotated[float, typer.Option(help="Seconds between requests to one host (robots.txt may ask more).")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = 10.0,
    max_redirects: Annotated[int, typer.Option(help="Redirects followed per page.")] = 5,
    retries: Annotated[int, typer.Option(help="Retries on 429 and 5xx, with backoff (Retry-After honoured).")] = 2,
    max_pages: Annotated[Optional[int], typer.Option(help="Stop when the directory holds this many pages.")] = None,
    max_depth: Annotated[int, typer.Option(help="Links followed from a start URL, at most.")] = 5,
    max_per_host: Annotated[int, typer.Option(help="URLs queued per host, at most (bounds link traps).")] = 1000,
    same_domain: Annotated[bool, typer.Option(help="Follow links only to the start URLs' domains.")] = True,
    allow: Annotated[Optional[list[str]], typer.Option(help="Follow only URLs matching this regex (repeatable).")] = (
        None
    ),
    deny: Annotated[Optional[list[str]], typer.Option(help="Never follow URLs matching this regex (repeatable).")] = (
        None
    ),
    max_page_bytes: Annotated[int, typer.Option(help="Bytes read per page; longer pages are truncated.")] = 2 << 20,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once (one per host).")] = 4,
    user_agent: Annotated[str, typer.Option(help="User-Agent header, also matched against robots.txt.")] = (
        DEFAULT_USER_AGENT
    ),
    resume: Annotated[bool, typer.Option(help="Continue the crawl already in --data-dir.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress line.")] = True,
) -> None:
    """Fetch web pages politely and store their main text under --data-dir for training."""
    starts = start_urls or []
    if not starts and not resume:
        raise UserError("no start URL given; pass one or more http(s) URLs, or --resume")
    config = CrawlConfig(
        data_dir=data_dir,
        start_urls=starts,
        user_agent=user_agent,
        delay=delay,
        timeout=timeout,
        max_redirects=max_redirects,
        retries=retries,
        max_pages=max_pages,
        max_depth=max_depth,
        max_per_host=max_per_host,
        max_page_bytes=max_page_bytes,
        concurrency=concurrency,
        same_domain=same_domain,
        allow=_patterns("--allow", allow),
        deny=_patterns("--deny", deny),
    )
    console = Console(stderr=True)
    live = Live(Text(""), console=console, transient=True, auto_refresh=False) if progress else None
    with live if live is not None else nullcontext():
        summary = run(config, resume, _progress_line(live) if live is not None else None)
    _print_summary(summary, data_dir)


def _progress_line(live: Live) -> Callable[[Store, RunStats], None]:
    last = [0.0]

    def update(store: Store, stats: RunStats) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2:
            return
        last[0] = now
        states = store.counts()
        line = (
            f"crawl: {stats.fetched} fetched, {states.get('queued', 0)} queued, "
            f"{states.get('skipped', 0)} skipped, {states.get('failed', 0)} failed, "
            f"{stats.bytes / 1e6:.1f} MB, {stats.pages_per_second():.1f} pages/s"
        )
        live.update(Text(line), refresh=True)

    return update


def _print_summary(summary: Summary, data_dir: Path) -> None:
    states = summary.states
    typer.echo(
        f"{data_dir}: {summary.stored} pages stored ({summary.bytes / 1e6:.2f} MB of text), "
        f"{summary.fetched} by this run; {states.get('queued', 0)} queued, "
        f"{states.get('skipped', 0)} skipped, {states.get('failed', 0)} failed"
    )
    for reason, count in summary.reasons.items():
        typer.echo(f"  {reason}: {count}")
