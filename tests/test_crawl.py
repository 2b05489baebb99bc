"""`crystalline crawl` against a generated site served on 127.0.0.1 by a
server the tests start themselves (so crawls pass allow_private, except those
testing the refusal); nothing here touches the outside network (the
DNS-failure case uses the `.invalid` TLD, which never resolves)."""

from __future__ import annotations

import gzip
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from crystalline import cli
from crystalline.crawl import CrawlConfig, extract, net, page_files, run
from crystalline.crawl.crawler import MAX_CRAWL_DELAY, Robots
from crystalline.crawl.urls import normalize
from crystalline.data import corpus
from commandline import cli_limited


def prose(topic: str, sentences: int = 6) -> str:
    """A few distinct sentences, enough for the main-content extractor."""
    return " ".join(
        f"Sentence {i} of the article about {topic} explains one more detail of {topic} in plain words."
        for i in range(sentences)
    )


def html(title: str, body: str, links: list[str] = (), charset: str = "utf-8") -> bytes:
    anchors = "".join(f'<li><a href="{href}">link</a></li>' for href in links)
    return (
        f"<!doctype html><html><head><meta charset='{charset}'><title>{title}</title>"
        f"<script>var tracking = 'script text must not appear';</script><style>p {{color: red}}</style></head>"
        f"<body><nav><a href='/'>Home</a> navigation menu</nav><article><h1>{title}</h1><p>{body}</p></article>"
        f"<ul>{anchors}</ul><footer>footer text</footer></body></html>"
    ).encode(charset)


class Site:
    """Routes of the test site: path -> handler(request) setting the answer."""

    def __init__(self) -> None:
        self.routes: dict[str, object] = {}
        self.requests: list[str] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.robots = "User-agent: *\nDisallow: /private/\n"
        self.page_sleep = 0.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fetched(self) -> Counter[str]:
        with self.lock:
            return Counter(self.requests)


def make_handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8", **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            with site.lock:
                site.requests.append(self.path)
            site.times.append(time.monotonic())
            if self.path == "/robots.txt" and self.path not in site.routes:
                return self.send(200, site.robots.encode(), "text/plain")
            route = site.routes.get(self.path.split("?")[0])
            if route is None and self.path.startswith("/trap/"):
                route = site.routes.get("/trap/")
            if route is None:
                return self.send(404, b"not found", "text/plain")
            time.sleep(site.page_sleep)
            try:
                route(self)
            except (BrokenPipeError, ConnectionResetError):  # the crawler gave up waiting
                pass

    return Handler


@pytest.fixture
def site():
    s = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(s))
    server.daemon_threads = True
    s.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield s
    server.shutdown()
    server.server_close()


def page(title: str, links: list[str] = (), body: str | None = None):
    return lambda h: h.send(200, html(title, body or prose(title), links))


def config(tmp_path: Path, *starts: str, **kw) -> CrawlConfig:
    kw.setdefault("delay", 0.0)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("allow_private", True)
    return CrawlConfig(data_dir=tmp_path / "crawl", start_urls=list(starts), **kw)


def db_rows(data_dir: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(data_dir / "crawl.sqlite3")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_normalize_url_variants():
    assert normalize("HTTP://Example.COM:80/a?b=2&a=1#frag") == "http://example.com/a?a=1&b=2"
    assert normalize("https://example.com:443") == "https://example.com/"
    assert normalize("https://example.com:8443/x") == "https://example.com:8443/x"


def test_site_crawl_robots_dedup_and_text(site, tmp_path):
    site.routes["/"] = page(
        "Home",
        [
            "/a",
            "/private/secret",
            "/dup-1",
            "/dup-2",
            "/a?y=2&x=1",
            "/a?x=1&y=2#part",
            f"HTTP://127.0.0.1:{site.port}/a?y=2&x=1#top",
            "/plain.txt",
        ],
    )
    site.routes["/a"] = lambda h: h.send(200, html("Apples", prose(f"Apples at {h.path}")))
    site.routes["/private/secret"] = page("Secret")
    site.routes["/dup-1"] = page("Same", body=prose("duplicates"))
    site.routes["/dup-2"] = page("Same", body=prose("duplicates"))
    site.routes["/plain.txt"] = lambda h: h.send(200, b"plain text kept as it is\n", "text/plain")
    summary = run(config(tmp_path, site.url("/")))
    fetched = site.fetched()
    assert "/private/secret" not in fetched
    assert summary.reasons["robots"] == 1
    assert fetched["/a?x=1&y=2"] == 1 and fetched["/a"] == 1
    assert max(fetched.values()) == 1
    assert summary.reasons["duplicate content"] == 1
    assert summary.stored == 5  # /, /a, /a?x=1&y=2, one of the dups, plain.txt
    texts = {p.name: p.read_text() for p in page_files(tmp_path / "crawl")}
    assert len(texts) == 5 and all(name.endswith(".txt") for name in texts)
    joined = "".join(texts.values())
    assert "Sentence 3 of the article about Apples" in joined
    assert "plain text kept as it is\n" in texts.values()
    assert "script text must not appear" not in joined and "navigation menu" not in joined
    # the trainer's walker sees exactly the page files (the database is binary, the lock hidden)
    files, _ = corpus.walk([tmp_path / "crawl"])
    assert sorted(f.path.name for f in files) == sorted(texts)


def test_robots_crawl_delay(site, tmp_path):
    site.robots = "User-agent: crystalline\nCrawl-delay: 1\nDisallow: /no/\n"
    site.routes["/"] = page("Slow home", ["/next", "/no/page"])
    site.routes["/next"] = page("Slow next")
    summary = run(config(tmp_path, site.url("/")))
    assert summary.stored == 2 and summary.reasons["robots"] == 1
    assert site.requests == ["/robots.txt", "/", "/next"]
    assert site.times[2] - site.times[1] >= 0.95


def test_delay_flag_spaces_the_requests_to_a_host(site, tmp_path):
    site.routes["/"] = page("Home", ["/next"])
    site.routes["/next"] = page("Next")
    delay = 1.2 * CrawlConfig.delay  # longer than the default, so a flag ignored would show
    r = subprocess.run([sys.executable, "-m", "crystalline", "crawl", site.url("/"), "--data-dir", str(tmp_path / "crawl"),
                        "--delay", str(delay), "--no-progress", "--allow-private"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert site.requests == ["/robots.txt", "/", "/next"]
    # each request starts at least --delay after the one before it ended (monotonic clock, either process)
    assert min(b - a for a, b in zip(site.times, site.times[1:])) >= 0.95 * delay


def test_robots_behind_redirects_and_unavailable(site, tmp_path):
    """robots.txt after five redirects is obeyed; a 403 means no rules; a 5xx
    means nothing of the host is fetched this run (robots.txt asked once)."""
    site.routes["/robots.txt"] = lambda h: h.send(301, b"", Location="/policy/1")
    for hop in range(1, 5):
        site.routes[f"/policy/{hop}"] = lambda h, hop=hop: h.send(302, b"", Location=f"/policy/{hop + 1}")
    site.routes["/policy/5"] = lambda h: h.send(200, b"User-agent: *\nDisallow: /secret\n", "text/plain")
    site.routes["/"] = page("Home", ["/secret", "/open"])
    site.routes["/secret"] = page("Secret")
    site.routes["/open"] = page("Open")
    summary = run(config(tmp_path / "redirect", site.url("/")))
    assert "/secret" not in site.fetched() and site.fetched()["/open"] == 1
    assert summary.stored == 2 and summary.reasons == {"robots": 1}

    site.routes["/robots.txt"] = lambda h: h.send(403, b"forbidden", "text/plain")
    summary = run(config(tmp_path / "forbidden", site.url("/")))
    assert summary.stored == 3 and summary.reasons == {}

    with site.lock:
        site.requests.clear()
    site.routes["/robots.txt"] = lambda h: h.send(503, b"down", "text/plain")
    summary = run(config(tmp_path / "down", site.url("/"), site.url("/open"), retries=0))
    assert site.fetched() == {"/robots.txt": 1}
    assert summary.stored == 0 and summary.reasons == {"robots.txt server error": 2}


def test_crawl_delay_is_capped_with_a_note(site, tmp_path):
    """Crawl-delay: 100000 would stall the crawl for a day per page: it is
    cut to MAX_CRAWL_DELAY, with one note for the host; a crawl whose queue
    is empty ends without waiting out the delay."""
    robots = Robots.parse("User-agent: *\nCrawl-delay: 100000\n", "crystalline")
    assert robots.asked_delay == 100000 and robots.delay == MAX_CRAWL_DELAY == 60
    site.robots = "User-agent: *\nCrawl-delay: 100000\n"
    site.routes["/"] = page("Patient home")
    notes = []
    summary = run(config(tmp_path, site.url("/")), on_note=notes.append)
    assert summary.stored == 1
    assert notes == [f"127.0.0.1:{site.port}: robots.txt asks a Crawl-delay of 100000 s; waiting 60 s"]


def test_robots_wildcards_and_longest_match(site, tmp_path):
    """RFC 9309: `*` and `$` match, and the longest matching rule wins
    whatever the order of the lines."""
    site.robots = "User-agent: *\nDisallow: /*.pdf$\nDisallow: /docs/\nAllow: /docs/public/\n"
    site.routes["/"] = page("Library", ["/files/report.pdf", "/docs/internal", "/docs/public/guide", "/files/notes"])
    for path in ("/files/report.pdf", "/docs/internal", "/docs/public/guide", "/files/notes"):
        site.routes[path] = page(f"Document {path}")
    summary = run(config(tmp_path, site.url("/")))
    fetched = site.fetched()
    assert "/files/report.pdf" not in fetched and "/docs/internal" not in fetched
    assert fetched["/docs/public/guide"] == 1 and fetched["/files/notes"] == 1
    assert summary.stored == 3 and summary.reasons["robots"] == 2


def test_depth_and_page_limits(site, tmp_path):
    for i in range(10):
        site.routes[f"/chain/{i}"] = page(f"Chain {i}", [f"/chain/{i + 1}"])
    summary = run(config(tmp_path, site.url("/chain/0"), max_depth=2))
    assert summary.stored == 3 and summary.reasons["depth"] == 1
    assert "/chain/3" not in site.fetched()

    summary = run(config(tmp_path / "b", site.url("/chain/0"), max_pages=4, concurrency=3))
    assert summary.stored == 4 and summary.states["queued"] == 1


def test_hostile_pages_are_counted_not_fatal(site, tmp_path):
    links = [
        "/malformed", "/latin1", "/big", "/trap/0", "/loop-a", "/hang", "/image.png", "/missing",
        "/flaky", "/error", "mailto:someone@example.com", "ftp://example.com/file", "javascript:alert(1)",
        "/redirect", "/empty", "/hop?n=0", "/target",
    ]  # fmt: skip
    site.routes["/"] = page("Hostile home", links)
    site.routes["/malformed"] = lambda h: h.send(
        200, b"<html><body><div><p>" + prose("broken markup").encode() + b"<b><i></p></div></span><table><tr><td>"
    )
    site.routes["/latin1"] = lambda h: h.send(
        200, html("Caf\u00e9", prose("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"), charset="latin-1"), "text/html"
    )
    site.routes["/big"] = lambda h: h.send(200, ("big page line\n" * 20000).encode(), "text/plain")
    site.routes["/trap/"] = lambda h: h.send(200, html("Trap", prose(h.path), [h.path + "/0", h.path + "/1"]))
    site.routes["/loop-a"] = lambda h: h.send(302, b"", Location="/loop-b")
    site.routes["/loop-b"] = lambda h: h.send(302, b"", Location="/loop-a")
    site.routes["/redirect"] = lambda h: h.send(301, b"", Location="/target")
    site.routes["/target"] = page("Redirect target")
    hops = itertools.count(1)
    site.routes["/hop"] = lambda h: h.send(302, b"", Location=f"/hop?n={next(hops)}")
    site.routes["/hang"] = lambda h: (time.sleep(5), h.send(200, b"late"))
    site.routes["/image.png"] = lambda h: h.send(200, b"\x89PNG\r\n\x1a\n\0\0", "image/png")
    flaky = iter([503, 200])
    site.routes["/flaky"] = lambda h: (
        h.send(503, b"busy", Retry_After="0") if next(flaky) == 503 else page("Flaky")(h)
    )
    site.routes["/error"] = lambda h: h.send(500, b"boom", "text/plain", Retry_After="0")
    site.routes["/empty"] = lambda h: h.send(200, b"<html><body><script>x()</script></body></html>")
    start = time.monotonic()
    summary = run(
        config(
            tmp_path, site.url("/"), "http://nonexistent.invalid/", timeout=0.5, retries=1,
            max_page_bytes=10_000, max_per_host=25, max_depth=8,
        )
    )  # fmt: skip
    assert time.monotonic() - start < 15
    reasons = summary.reasons
    assert reasons["timeout"] == 1
    assert reasons["dns failure"] == 1
    assert reasons["redirect loop"] == 1
    assert reasons["redirect limit"] == 1 and site.fetched()["/hop?n=0"] == 1
    assert reasons["unsupported scheme"] == 3
    assert reasons["content type"] == 1
    assert reasons["truncated"] == 1
    assert reasons["no text"] == 1
    assert reasons["http error"] == 2  # /missing (404) and /error (500 after a retry)
    assert reasons["page cap"] >= 1
    fetched = site.fetched()
    assert fetched["/flaky"] == 2 and fetched["/error"] == 2 and fetched["/target"] == 1
    assert sum(n for path, n in fetched.items() if path.startswith("/trap/")) <= 25
    texts = "".join(p.read_text() for p in page_files(tmp_path / "crawl"))
    assert "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e" in texts
    assert "broken markup" in texts and "Redirect target" in texts and "Flaky" in texts
    big = [p for p in page_files(tmp_path / "crawl") if p.read_text().startswith("big page line")]
    assert len(big) == 1 and big[0].stat().st_size <= 10_001


def test_compressed_pages_and_a_decompression_bomb(site, tmp_path):
    """The page cap counts decoded bytes while reading: a gzip body inflating
    to 8 GB (32 MB per 32 KB member, the server sending 256 MB of them) is
    skipped as too large after a few KB, with memory bounded and the rest of
    the body never read; ordinary gzip and deflate pages are decoded, and a
    long compressed page is truncated as an uncompressed one is."""
    member = gzip.compress(bytes(32 << 20))
    members = (256 << 20) // len(member)
    sent = []

    def bomb(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(member) * members))
        h.end_headers()
        for _ in range(members):
            h.wfile.write(member)
            sent.append(len(member))

    long_text = os.urandom(40_000).hex().encode()  # compresses about 2:1
    site.routes["/bomb"] = bomb
    site.routes["/"] = page("Home", ["/bomb", "/gzipped", "/deflated", "/long.txt"])
    gzipped, deflated = gzip.compress(html("Gzipped", prose("gzip"))), zlib.compress(html("Deflated", prose("deflate")))
    site.routes["/gzipped"] = lambda h: h.send(200, gzipped, Content_Encoding="gzip")
    site.routes["/deflated"] = lambda h: h.send(200, deflated, Content_Encoding="deflate")
    site.routes["/long.txt"] = lambda h: h.send(200, gzip.compress(long_text), "text/plain", Content_Encoding="gzip")
    tracemalloc.start()
    try:
        summary = run(config(tmp_path, site.url("/"), max_page_bytes=10_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and sum(sent) < len(member) * members
    assert summary.reasons == {"too large": 1, "truncated": 1} and summary.stored == 4
    texts = "".join(p.read_text() for p in page_files(tmp_path / "crawl"))
    assert "article about gzip" in texts and "article about deflate" in texts
    assert long_text[:10_000].decode() + "\n" in texts


NOT_TEXT_CODECS = ("hex", "base64", "zlib", "rot13", "bz2", "uu", "quopri", "idna", "punycode")


def test_non_text_charsets_fall_back_to_detection_also_on_resume(site, tmp_path):
    """A page declaring a codec that is no text charset (in its header and its
    <meta>) is decoded by detection; the first run leaves them queued, the
    resumed run must get through them all."""
    site.routes["/"] = page("Codec index", [f"/codec/{name}" for name in NOT_TEXT_CODECS])
    for name in NOT_TEXT_CODECS:
        text = prose(f"caf\u00e9 {name}")
        doc = f"<html><head><meta charset='{name}'></head><body><p>{text}</p></body></html>".encode()
        site.routes[f"/codec/{name}"] = lambda h, doc=doc, name=name: h.send(200, doc, f"text/html; charset={name}")
    summary = run(config(tmp_path, site.url("/"), max_pages=1))
    assert summary.stored == 1 and summary.states["queued"] == len(NOT_TEXT_CODECS)
    summary = run(config(tmp_path), resume=True)
    assert summary.stored == 1 + len(NOT_TEXT_CODECS), summary.reasons
    texts = "".join(p.read_text() for p in page_files(tmp_path / "crawl"))
    assert all(f"caf\u00e9 {name}" in texts for name in NOT_TEXT_CODECS)


def test_unexpected_error_fails_its_url_only(site, tmp_path, monkeypatch):
    """Any exception on one URL (here injected into the extractor, since a
    real one is a bug not yet known) fails that URL with its type as the
    reason, and the crawl goes on."""
    real = extract.html_to_text

    def html_to_text(text: str, url: str) -> tuple[str, list[str]]:
        if url.endswith("/poison"):
            raise RuntimeError("extractor bug")
        return real(text, url)

    monkeypatch.setattr(extract, "html_to_text", html_to_text)
    site.routes["/"] = page("Index", ["/poison", "/after"])
    site.routes["/poison"] = page("Poison")
    site.routes["/after"] = page("After")
    notes = []
    summary = run(config(tmp_path, site.url("/")), on_note=notes.append)
    assert summary.stored == 2 and summary.reasons == {"unexpected error (RuntimeError)": 1}
    assert notes == [f"{site.url('/poison')}: unexpected error (RuntimeError): extractor bug"]


def test_private_addresses_refused_unless_allowed(site, tmp_path, monkeypatch):
    """Without allow_private, a host on a loopback address is refused (robots.txt
    included) and counted; so is a redirect from an allowed host to a refused
    one. No public host is reachable here, so for the redirect 127.0.0.1 is
    let through and 0.0.0.0 (which would connect to this machine) refused."""
    assert all(map(net.forbidden, ["127.0.0.1", "10.1.2.3", "169.254.169.254", "0.0.0.0", "224.0.0.1", "::1"]))
    assert not any(map(net.forbidden, ["93.184.215.14", "2606:4700::6810:84e5"]))
    site.routes["/"] = page("Local home")
    summary = run(config(tmp_path / "local", site.url("/"), allow_private=False))
    assert site.fetched() == {} and summary.stored == 0 and summary.reasons == {"private address": 1}

    monkeypatch.setattr(net, "forbidden", lambda address: address == "0.0.0.0")
    site.routes["/jump"] = lambda h: h.send(302, b"", Location=f"http://0.0.0.0:{site.port}/inside")
    site.routes["/inside"] = page("Inside")
    summary = run(config(tmp_path / "hop", site.url("/jump"), allow_private=False, same_domain=False))
    assert site.fetched() == {"/robots.txt": 1, "/jump": 1}
    assert summary.stored == 0 and summary.reasons == {"private address": 1}


def test_resume_after_kill_stores_each_page_once(site, tmp_path):
    count = 40
    site.routes["/"] = page("Index", [f"/p/{i}" for i in range(count)])
    for i in range(count):
        site.routes[f"/p/{i}"] = page(f"Page number {i}")
    site.page_sleep = 0.03
    data_dir = tmp_path / "crawl"
    args = [sys.executable, "-m", "crystalline", "crawl", site.url("/"), "--data-dir", str(data_dir)]
    args += ["--delay", "0", "--timeout", "2", "--no-progress", "--allow-private"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (data_dir / "crawl.sqlite3").exists() and len(page_files(data_dir)) >= 8:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = site.fetched()
    done = {url for (url,) in db_rows(data_dir, "SELECT url FROM pages")}
    in_flight = {url for (url,) in db_rows(data_dir, "SELECT url FROM frontier WHERE state = 'fetching'")}
    assert 8 <= len(done) < count + 1
    files, _ = corpus.walk([data_dir])  # the killed crawl's WAL files are binary: only pages are text
    assert {f.path.suffix for f in files} == {".txt"}

    with site.lock:
        site.requests.clear()
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    after = site.fetched()
    assert not {site.url(path) for path in after} & done  # nothing stored was fetched again
    twice = {path for path in before if path in after and path != "/robots.txt"}
    assert {site.url(path) for path in twice} <= in_flight  # only what was in flight at the kill
    rows = db_rows(data_dir, "SELECT url, path FROM pages")
    assert len(rows) == count + 1 and len({p for _, p in rows}) == count + 1
    assert sorted(p.name for p in page_files(data_dir)) == sorted(p.name for p in (data_dir / "pages").rglob("*.txt"))
    assert db_rows(data_dir, "SELECT count(*) FROM frontier WHERE state != 'done'") == [(0,)]


def test_disk_full_stops_cleanly_and_resumes(site, tmp_path):
    big = "".join(f"line {i} of a page larger than the space left\n" for i in range(30_000)).encode()
    site.routes["/"] = page("Index", ["/a", "/big.txt", "/c"])
    site.routes["/a"] = page("Page a")
    site.routes["/big.txt"] = lambda h: h.send(200, big, "text/plain")
    site.routes["/c"] = page("Page c")
    data_dir = tmp_path / "crawl"
    args = ["crawl", site.url("/"), "--data-dir", str(data_dir), "--delay", "0", "--no-progress", "--allow-private"]
    full = cli_limited(args, None, len(big) // 2, timeout=60)
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert f"disk full while writing {data_dir / 'pages'}" in full.stderr
    assert db_rows(data_dir, "PRAGMA integrity_check") == [("ok",)]
    big_row = db_rows(data_dir, "SELECT state, reason FROM frontier WHERE url LIKE '%/big.txt'")
    assert big_row == [("queued", "disk full")]
    assert not list((data_dir / "pages").rglob(".*"))  # no temp file left behind

    resumed = subprocess.run([sys.executable, "-m", "crystalline", *args, "--resume"], capture_output=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert db_rows(data_dir, "SELECT state, count(*) FROM frontier GROUP BY state") == [("done", 4)]
    assert big.decode() in [p.read_text() for p in page_files(data_dir)]


def test_a_database_that_cannot_grow_stops_cleanly_and_resumes(site, tmp_path):
    count = 40  # a chain of pages, each linking to the next: one small commit each
    site.routes["/"] = page("Index", ["/p/0"])
    for i in range(count):
        site.routes[f"/p/{i}"] = page(f"Page number {i}", [f"/p/{i + 1}"] if i + 1 < count else [])
    data_dir = tmp_path / "crawl"
    args = ["crawl", site.url("/"), "--data-dir", str(data_dir), "--delay", "0", "--no-progress", "--allow-private",
            "--max-depth", str(count)]
    # Each page file is a few hundred bytes; every commit adds 4 KiB pages to the database's WAL.
    full = cli_limited(args, None, 256 * 1024, timeout=60)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert f"disk full while writing {data_dir / 'crawl.sqlite3'}" in full.stderr
    assert db_rows(data_dir, "PRAGMA integrity_check") == [("ok",)]
    stored = db_rows(data_dir, "SELECT count(*) FROM pages")[0][0]
    assert 0 < stored < count + 1

    resumed = subprocess.run([sys.executable, "-m", "crystalline", *args, "--resume"], capture_output=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert db_rows(data_dir, "SELECT state, count(*) FROM frontier GROUP BY state") == [("done", count + 1)]
    assert len(page_files(data_dir)) == count + 1


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no start URL"),
        (["not a url"], "not a valid URL"),
        (["http://"], "not a valid URL"),
        (["ftp://example.com/"], "unsupported scheme"),
        (["http://example.com/", "--max-pages", "0"], "--max-pages must be at least 1"),
        (["http://example.com/", "--delay", "-1"], "--delay must be at least 0"),
        (["http://example.com/", "--concurrency", "0"], "--concurrency must be at least 1"),
        (["http://example.com/", "--deny", "("], "not a valid regular expression"),
        (["--resume"], "holds no crawl to resume"),
    ],
)
def test_bad_input_is_one_message(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["crystalline", "crawl", *argv, "--data-dir", str(tmp_path / "d")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_data_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    monkeypatch.setattr(sys, "argv", ["crystalline", "crawl", "http://example.com/", "--data-dir", str(target)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and "is a file" in capsys.readouterr().err


def test_existing_crawl_needs_resume(site, tmp_path):
    site.routes["/"] = page("Only page")
    run(config(tmp_path, site.url("/")))
    with pytest.raises(Exception, match="--resume"):
        run(config(tmp_path, site.url("/")))
    assert run(config(tmp_path), resume=True).fetched == 0
