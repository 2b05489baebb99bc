"""`crystalline crawl`: flags to a CrawlConfig for `crystalline.crawl.run`,
with a progress line and notes on stderr and a summary on stdout."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from crystalline.crawl import CrawlConfig, Summary, run
from crystalline.crawl.crawler import RunStats
from crystalline.crawl.runner import patterns
from crystalline.crawl.store import Store
from crystalline.errors import UserError
from crystalline.estimate import duration

DEFAULTS = CrawlConfig(data_dir=Path())  # the flags' defaults are the library's


def crawl(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Directory for the page texts and crawl.sqlite3.")],
    start_urls: Annotated[Optional[list[str]], typer.Argument(help="URLs to start from (http or https).")] = None,
    delay: Annotated[float, typer.Option(help="Seconds between requests to one host (robots.txt may ask more).")] = (
        DEFAULTS.delay
    ),
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = DEFAULTS.timeout,
    max_redirects: Annotated[int, typer.Option(help="Redirects followed per page.")] = DEFAULTS.max_redirects,
    retries: Annotated[int, typer.Option(help="Retries on 429 and 5xx, with backoff (Retry-After honoured).")] = (
        DEFAULTS.retries
    ),
    max_pages: Annotated[Optional[int], typer.Option(help="Stop when the directory holds this many pages.")] = (
        DEFAULTS.max_pages
    ),
    max_depth: Annotated[int, typer.Option(help="Links followed from a start URL, at most.")] = DEFAULTS.max_depth,
    max_per_host: Annotated[int, typer.Option(help="URLs queued per host, at most (bounds link traps).")] = (
        DEFAULTS.max_per_host
    ),
    same_domain: Annotated[bool, typer.Option(help="Follow links only to the start URLs' domains.")] = (
        DEFAULTS.same_domain
    ),
    allow_private: Annotated[
        bool, typer.Option(help="Also fetch from loopback, private and link-local addresses (refused by default).")
    ] = DEFAULTS.allow_private,
    allow: Annotated[Optional[list[str]], typer.Option(help="Follow only URLs matching this regex (repeatable).")] = (
        None
    ),
    deny: Annotated[Optional[list[str]], typer.Option(help="Never follow URLs matching this regex (repeatable).")] = (
        None
    ),
    max_page_bytes: Annotated[int, typer.Option(help="Decoded bytes read per page; longer pages are truncated.")] = (
        DEFAULTS.max_page_bytes
    ),
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once (one per host).")] = (
        DEFAULTS.concurrency
    ),
    user_agent: Annotated[str, typer.Option(help="User-Agent header, also matched against robots.txt.")] = (
        DEFAULTS.user_agent
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
        allow_private=allow_private,
        allow=patterns("--allow", allow),
        deny=patterns("--deny", deny),
    )
    console = Console(stderr=True)
    live = Live(Text(""), console=console, transient=True, auto_refresh=False) if progress else None
    with live if live is not None else nullcontext():
        summary = run(
            config,
            resume,
            _progress_line(live, max_pages) if live is not None else None,
            lambda note: console.print(note, markup=False, highlight=False, soft_wrap=True),
        )
    _print_summary(summary, data_dir)


def _progress_line(live: Live, max_pages: int | None) -> Callable[[Store, RunStats], None]:
    """The live line: pages, bytes, pages/s, and the time left at this rate
    until --max-pages pages are stored (without it, until the queue is empty)."""
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
        rate, queued = stats.pages_per_second(), states.get("queued", 0)
        if rate and max_pages is not None:
            line += f", {max_pages} pages in about {duration(max(max_pages - store.stored_pages()[0], 0) / rate)}"
        elif rate:
            line += f", queue empty in about {duration(queued / rate)} (links found add to it)"
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
