"""What a crawl keeps in its data directory, and how it survives being killed.

Layout of DIR:
- `pages/<host>/<sha1 of the URL>.txt`: the text of each stored page, written
  atomically (a hidden temp file, fsync, rename), so a reader never sees half
  a page and the data walker (which skips hidden names) never sees the temp;
- `crawl.sqlite3` (WAL mode): the frontier (every URL met, with its depth and
  state: queued, fetching, done, failed or skipped, and why) and one row per
  stored page (URL, final URL, time, HTTP status, content hash, size).

Every page is committed on its own: its file is renamed into place first, then
one transaction records the page, marks its URL done and queues its links.
Killed at any moment, the crawl loses at most the pages in flight: on resume
rows left in `fetching` go back to `queued`, and a URL marked done is never
fetched again. A file renamed into place whose row was not committed yet is
rewritten under the same name when its URL is fetched again. A page that
cannot be written for lack of space raises DiskFull: the crawl stops, and
the URL goes back to `queued` for the resumed run. So does a database that
cannot grow: SQLite rolls the transaction back, and nothing committed is lost.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from crystalline.atomic import DiskFull, disk_full_at, write_atomic
from crystalline.crawl.urls import domain_of, host_key

DB_NAME = "crawl.sqlite3"
PAGES_DIR = "pages"
# SQLite's result codes for a write the disk had no room for: SQLITE_FULL on
# ENOSPC; a file size limit or a full quota reaches it as SQLITE_IOERR_WRITE.
NO_ROOM = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE})

SCHEMA = """
CREATE TABLE IF NOT EXISTS frontier (
    id INTEGER PRIMARY KEY,
    url TEXT NOT NULL UNIQUE,
    host TEXT NOT NULL,
    depth INTEGER NOT NULL,
    state TEXT NOT NULL,  -- queued, fetching, done, failed, skipped
    reason TEXT,          -- why failed or skipped
    http_status INTEGER
);
CREATE INDEX IF NOT EXISTS frontier_queue ON frontier (state, depth, id);
CREATE TABLE IF NOT EXISTS pages (
    url TEXT PRIMARY KEY,
    final_url TEXT NOT NULL,
    path TEXT NOT NULL,   -- relative to the data directory
    fetched_at TEXT NOT NULL,
    http_status INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    truncated INTEGER NOT NULL
);
"""



@dataclass(frozen=True)
class Link:
    """A URL to add to the frontier; `skip` is the reason it is not followed."""

    url: str
    depth: int
    skip: str | None = None


@dataclass(frozen=True)
class Page:
    url: str
    final_url: str
    http_status: int
    content_type: str
    text: str
    truncated: bool


def page_files(data_dir: Path | str) -> list[Path]:
    """The text files of the pages stored in `data_dir`, oldest first.

    Only pages whose database row is committed are listed, so every path
    exists and holds a whole page. Safe to call while a crawl is writing
    (WAL readers do not block the writer). A directory without a crawl
    database gives an empty list."""
    root = Path(data_dir)
    db = root / DB_NAME
    if not db.is_file():
        return []
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("SELECT path FROM pages ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:  # a database created but not initialised yet
        return []
    finally:
        conn.close()
    return [root / path for (path,) in rows]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Store:
    """The crawl database and page files of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.conn = sqlite3.connect(data_dir / DB_NAME, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed; only
        # a power cut may lose the last few.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        self.host_counts: Counter[str] = Counter(
            dict(self.conn.execute("SELECT host, count(*) FROM frontier WHERE state != 'skipped' GROUP BY host"))
        )

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, committed at the end of the block; a
        database that cannot grow rolls it back and raises DiskFull."""
        try:
            with self.conn:
                yield
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode in NO_ROOM:
                raise DiskFull(self.root / DB_NAME) from err
            raise

    def is_empty(self) -> bool:
        return self.conn.execute("SELECT count(*) FROM frontier").fetchone()[0] == 0

    def requeue_interrupted(self) -> int:
        """Rows a killed crawl left in `fetching` go back to `queued`."""
        with self._transaction():
            return self.conn.execute("UPDATE frontier SET state = 'queued' WHERE state = 'fetching'").rowcount

    def add(self, links: list[Link], host_cap: int) -> None:
        """Add URLs not seen before (in one transaction). A URL to follow
        becomes `queued` unless its host already has `host_cap` URLs, then it
        is skipped for the page cap."""
        with self._transaction():
            self._add(links, host_cap)

    def _add(self, links: list[Link], host_cap: int) -> None:
        for link in links:
            host = host_key(link.url)
            if self.conn.execute("SELECT 1 FROM frontier WHERE url = ?", (link.url,)).fetchone():
                continue
            skip = link.skip
            if skip is None and self.host_counts[host] >= host_cap:
                skip = "page cap"
            self.conn.execute(
                "INSERT INTO frontier (url, host, depth, state, reason) VALUES (?, ?, ?, ?, ?)",
                (link.url, host, link.depth, "skipped" if skip else "queued", skip),
            )
            if skip is None:
                self.host_counts[host] += 1

    def start_domains(self) -> tuple[str, ...]:
        """The domains of the start URLs of every run (depth 0), for --same-domain."""
        urls = self.conn.execute("SELECT url FROM frontier WHERE depth = 0").fetchall()
        return tuple(sorted({domain_of(url) for (url,) in urls}))

    def claim(self, busy_hosts: set[str]) -> tuple[str, int] | None:
        """The next queued URL (shallowest first) whose host is not busy,
        marked `fetching`; None when there is none."""
        marks = ",".join("?" * len(busy_hosts))
        row = self.conn.execute(
            "SELECT id, url, depth FROM frontier WHERE state = 'queued'"
            + (f" AND host NOT IN ({marks})" if busy_hosts else "")
            + " ORDER BY depth, id LIMIT 1",
            tuple(busy_hosts),
        ).fetchone()
        if row is None:
            return None
        with self._transaction():
            self.conn.execute("UPDATE frontier SET state = 'fetching' WHERE id = ?", (row[0],))
        return row[1], row[2]

    def has_queued(self) -> bool:
        return self.conn.execute("SELECT 1 FROM frontier WHERE state = 'queued' LIMIT 1").fetchone() is not None

    def has_url(self, url: str) -> bool:
        return self.conn.execute("SELECT 1 FROM frontier WHERE url = ?", (url,)).fetchone() is not None

    def has_content(self, digest: str) -> bool:
        return self.conn.execute("SELECT 1 FROM pages WHERE content_hash = ?", (digest,)).fetchone() is not None

    def finish(self, url: str, state: str, reason: str | None = None, http_status: int | None = None) -> None:
        """Record that `url` failed or was skipped (or redirected elsewhere)."""
        with self._transaction():
            self.conn.execute(
                "UPDATE frontier SET state = ?, reason = ?, http_status = ? WHERE url = ?",
                (state, reason, http_status, url),
            )

    def save(self, page: Page, digest: str, links: list[Link], host_cap: int) -> int:
        """Store a page: its file atomically, then in one transaction its row,
        its URL (and the URL it redirected to) marked `done`, and its links.
        Returns the bytes written; raises DiskFull."""
        data = page.text.encode("utf-8")
        rel = Path(PAGES_DIR) / _safe_host(host_key(page.url)) / (hashlib.sha1(page.url.encode()).hexdigest() + ".txt")
        with disk_full_at(self.root / rel):
            _write_atomic(self.root / rel, data)
        with self._transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO pages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    page.url,
                    page.final_url,
                    rel.as_posix(),
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    page.http_status,
                    page.content_type,
                    digest,
                    len(data),
                    int(page.truncated),
                ),
            )
            self.conn.execute(
                "UPDATE frontier SET state = 'done', reason = ?, http_status = ? WHERE url = ?",
                ("truncated" if page.truncated else None, page.http_status, page.url),
            )
            if page.final_url != page.url:  # so that links to it are not fetched again
                self.conn.execute(
                    "INSERT OR IGNORE INTO frontier (url, host, depth, state, reason)"
                    " SELECT ?, ?, depth, 'done', 'redirect target' FROM frontier WHERE url = ?",
                    (page.final_url, host_key(page.final_url), page.url),
                )
            self._add(links, host_cap)
        return len(data)

    def counts(self) -> dict[str, int]:
        """Rows per state."""
        return dict(self.conn.execute("SELECT state, count(*) FROM frontier GROUP BY state").fetchall())

    def reasons(self) -> dict[str, int]:
        """Rows per failure or skip reason (and `truncated` for pages stored cut)."""
        return dict(
            self.conn.execute(
                "SELECT reason, count(*) FROM frontier WHERE reason IS NOT NULL GROUP BY reason ORDER BY reason"
            ).fetchall()
        )

    def stored_pages(self) -> tuple[int, int]:
        """Pages stored and their total bytes."""
        count, total = self.conn.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM pages").fetchone()
        return count, total


def _safe_host(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", host)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
