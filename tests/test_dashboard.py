"""`crystalline dashboard`: the run files read as they grow (metrics.jsonl
incrementally, the epoch's sphere and symmetry-group figures checked against
what `train` itself prints), the JSON API of a real server on 127.0.0.1, its
refusals, and the page in headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium) while a real training run writes its
metrics, with every host but 127.0.0.1 unreachable."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from crystalline import checkpoint, load  # noqa: E402
from crystalline.dashboard import runs  # noqa: E402
from crystalline.dashboard.app import STATIC  # noqa: E402
from crystalline.serve import listen  # noqa: E402
from commandline import cli, started  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = ["--vocab-size", "300", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2", "--batch-size", "8",
        "--seq-len", "64", "--no-progress", "--sample-tokens", "0", "--ext", ".py"]
PAGE_S = 60  # deadline for the page to show what a test waits for


@pytest.fixture(scope="module")
def finished(tmp_path_factory, env) -> Path:
    """RUNS/done: a tiny run of two epochs on 12 sphere threads, with a
    validation report on its last checkpoint."""
    run = tmp_path_factory.mktemp("runs") / "done"
    r = cli(["train", str(STDLIB / "json"), *TINY, "--epochs", "2", "--threads", "12", "--eval-interval", "5",
             "--save-interval", "10", "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    (run / "train.log").write_text(r.stderr)
    v = cli(["validate", str(run), "--samples", "2", "--max-tokens", "16"], env)
    assert v.returncode == 0, v.stderr
    return run


@contextmanager
def dashboard(runs_dir: Path, env: dict, log: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`crystalline dashboard RUNS_DIR --port 0 FLAGS` until the block ends
    (yielding its address); then Ctrl-C must stop it with exit code 0."""
    with started(["dashboard", str(runs_dir), "--port", "0", *flags], env, log, r" at (http://\S+)/$") as running:
        yield running


# -- reading the run's files ---------------------------------------------------------


def record(step: int, epoch: int = 1, **extra) -> dict:
    return {"step": step, "epoch": epoch, "loss": 1.0 / step, **extra}


def test_the_metrics_tail_reads_whole_new_lines_and_starts_over_when_the_file_is_rewritten(tmp_path):
    path = tmp_path / checkpoint.METRICS
    tail = runs.MetricsTail(path)
    assert tail.read() == (0, [])  # not written yet
    lines = [json.dumps(record(s)) + "\n" for s in (1, 2, 3)]
    path.write_text(lines[0] + lines[1] + lines[2][:9])  # a line half written
    assert tail.read() == (0, [record(1), record(2)])
    with open(path, "a") as f:
        f.write(lines[2][9:])
    assert tail.read() == (0, [record(1), record(2), record(3)])
    checkpoint.cut_metrics(tmp_path, 2)  # what a resumed run does: a new file, cut back
    assert tail.read() == (1, [record(1), record(2)])
    with open(path, "a") as f:
        f.write("not json\n" + json.dumps(record(3, loss=9.0)) + "\n")
    assert tail.read() == (1, [record(1), record(2), record(3, loss=9.0)]) and tail.bad_lines == 1
    path.unlink()
    assert tail.read() == (2, [])


def test_epoch_layout_sums_the_latest_epoch_only():
    busy = [[0.0, 0.2, 0.1], [0.0, 0.3, 0.3]]
    records = [record(1, 1, sphere_busy_s=[0.0, 9.0, 9.0], compute_s=10.0, group_sequences=[9] * 12),
               record(2, 2, sphere_busy_s=busy[0], compute_s=0.4, group_sequences=list(range(12))),
               record(3, 2, sphere_busy_s=busy[1], compute_s=0.6, group_sequences=[1] * 12)]
    layout = runs.epoch_layout(records)
    assert layout["epoch"] == 2 and layout["steps"] == 2
    assert layout["busy_s"] == pytest.approx([0.0, 0.5, 0.4])
    assert layout["busy_share"] == pytest.approx([0.0, 0.5, 0.4])  # of 0.4 + 0.6 s of compute
    assert layout["groups"] == [g + 1 for g in range(12)]
    # records of versions that wrote neither the compute time nor the deal
    old = runs.epoch_layout([record(1, sphere_busy_s=[0.0, 0.5])])
    assert old["busy_s"] == [0.0, 0.5] and old["busy_share"] is None and old["groups"] is None
    assert runs.epoch_layout([]) is None


def test_the_layout_of_a_finished_run_is_what_train_printed_for_its_last_epoch(finished):
    layout = runs.epoch_layout(checkpoint.metrics_records(finished))
    printed = (finished / "train.log").read_text()
    last = printed[printed.rindex("Distribution by symmetry group (epoch 2/2"):]
    assert layout["epoch"] == 2 and len(layout["busy_s"]) == 12
    assert layout["groups"] == [int(n) for n in re.findall(r"Group +\d+: (\d+) sequences", last)]
    busy = {int(s): int(p) for s, p in re.findall(r"\[Sphere (\d+)\] \d+ sequences, busy (\d+)%", last)}
    assert sorted(busy) == list(range(1, 12))
    for sphere, percent in busy.items():  # the printed figure is the same share, rounded
        assert abs(100 * layout["busy_share"][sphere] - percent) <= 0.5 + 1e-9, (sphere, layout, busy)
    assert layout["busy_share"][0] == 0.0  # Node Zero runs no forward or backward pass


def test_find_runs_lists_runs_at_any_depth_by_their_relative_path(tmp_path, finished):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / checkpoint.METRICS).write_text(json.dumps(record(1)) + "\n")  # no checkpoint yet
    shutil.copytree(finished, tmp_path / "done")
    (tmp_path / "empty").mkdir()
    found = runs.find_runs(tmp_path)
    assert found == {"a/b": tmp_path / "a" / "b", "done": tmp_path / "done"}
    assert runs.find_runs(tmp_path / "done") == {runs.ROOT_NAME: tmp_path / "done"}  # RUNS_DIR itself a run
    ckpts = runs.checkpoints(tmp_path / "done")
    assert [c["name"] for c in ckpts] == [p.name for p in checkpoint.list_checkpoints(finished)]
    report = json.loads((checkpoint.list_checkpoints(finished)[-1] / "validate.json").read_text())
    assert ckpts[-1]["validate"] == {k: report[k] for k in ckpts[-1]["validate"]}
    assert all(c["validate"] is None for c in ckpts[:-1])


# -- the server ------------------------------------------------------------------------


def test_the_api_serves_runs_metrics_checkpoints_and_samples(finished, env, tmp_path):
    root = finished.parent
    records = checkpoint.metrics_records(finished)
    with dashboard(root, env, tmp_path / "dash.log") as (url, _):
        listed = httpx.get(f"{url}/api/runs").json()
        assert listed["root"] == str(root.resolve())
        assert [(r["name"], r["steps"], r["loss"]) for r in listed["runs"]] == [("done", len(records),
                                                                                 records[-1]["loss"])]
        m = httpx.get(f"{url}/api/metrics", params={"name": "done"}).json()
        assert m["start"] == 0 and [r["loss"] for r in m["records"]] == [r["loss"] for r in records]
        assert [r["step"] for r in m["records"] if "val_loss" in r] == [r["step"] for r in records if "val_loss" in r]
        gen = m["generation"]
        later = httpx.get(f"{url}/api/metrics", params={"name": "done", "after": 5, "generation": gen}).json()
        assert later["start"] == 5 and later["records"] == m["records"][5:]
        other = httpx.get(f"{url}/api/metrics", params={"name": "done", "after": 5, "generation": gen + 1}).json()
        assert other["start"] == 0 and other["records"] == m["records"]  # another generation: everything
        summary = httpx.get(f"{url}/api/run", params={"name": "done"}).json()
        assert summary["layout"] == runs.epoch_layout(records)
        assert summary["checkpoints"] == runs.checkpoints(finished)
        assert summary["model"]["threads"] == 12 and summary["model"]["n_embd"] == 32
        index = httpx.get(url + "/")
        assert index.status_code == 200 and "dashboard.js" in index.text
        assert httpx.get(f"{url}/static/dashboard.js").status_code == 200
        body = {"name": "done", "prompt": "def load(", "max_tokens": 12, "temperature": 0.8, "seed": 5}
        sampled = httpx.post(f"{url}/api/sample", json=body, timeout=60).json()
        latest = checkpoint.list_checkpoints(finished)[-1]
        assert sampled["checkpoint"] == latest.name
        assert sampled["text"] == load(latest).generate("def load(", max_tokens=12, temperature=0.8, seed=5)
        for params, status, says in [
            ({"name": "../done"}, 404, "no run '../done'"),
            ({"name": "nothing"}, 404, "no run 'nothing'"),
            ({}, 400, "name: Field required"),
        ]:
            r = httpx.get(f"{url}/api/run", params=params)
            assert r.status_code == status and says in r.json()["error"], (params, r.text)
        for change, status, says in [
            ({"prompt": ""}, 400, "prompt"),
            ({"max_tokens": 0}, 400, "max_tokens"),
            ({"temperature": -1}, 400, "temperature"),
            ({"prompt": "x" * 5000}, 400, "block size"),
            ({"name": "nope"}, 404, "no run 'nope'"),
        ]:
            r = httpx.post(f"{url}/api/sample", json={**body, **change}, timeout=60)
            assert r.status_code == status and says in r.json()["error"], (change, r.text)
        r = httpx.post(f"{url}/api/sample", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        assert httpx.get(f"{url}/no/such/page").status_code == 404


def test_sampling_before_the_first_checkpoint_says_so(env, tmp_path):
    (tmp_path / "runs" / "young").mkdir(parents=True)
    (tmp_path / "runs" / "young" / checkpoint.METRICS).write_text(json.dumps(record(1)) + "\n")
    with dashboard(tmp_path / "runs", env, tmp_path / "dash.log") as (url, _):
        r = httpx.post(f"{url}/api/sample", json={"name": "young", "prompt": "x"})
        assert r.status_code == 409 and "no checkpoint yet" in r.json()["error"]
        assert httpx.get(f"{url}/api/run", params={"name": "young"}).json()["checkpoints"] == []


def test_command_line_refusals(finished, env, tmp_path):
    for args, says in [([str(tmp_path / "missing")], "does not exist"),
                       ([str(finished / "train.log")], "is not a directory"),
                       ([str(finished.parent), "--port", "70000"], "--port"),
                       ([str(finished.parent), "--port", "-1"], "--port"),
                       ([str(finished.parent), "--host", "no.such.host.invalid"], "cannot listen")]:
        r = cli(["dashboard", *args], env, timeout=60)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    with listen("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        r = cli(["dashboard", str(finished.parent), "--port", port], env, timeout=60)
        assert r.returncode == 2 and f"error: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_the_page_loads_nothing_from_the_network():
    """Every script, stylesheet and image the page names is one of its own files."""
    files = {p.name: p.read_text() for p in STATIC.iterdir()}
    assert set(files) == {"index.html", "dashboard.js", "dashboard.css"}
    assert re.findall(r'(?:src|href)="([^"]*)"', files["index.html"]) == [
        "data:,", "/static/dashboard.css", "/static/dashboard.js"]
    for name, text in files.items():  # the only address anywhere: the SVG namespace, which is a name
        assert set(re.findall(r"\w+://[^\s\"'`)]+", text)) <= {"http://www.w3.org/2000/svg"}, name
        assert "@import" not in text and "url(" not in text, name


# -- the page in a real browser ---------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages, through chromedriver, that
    can reach 127.0.0.1 and nothing else."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def wait_for(browser, check, what: str):
    """check(browser)'s first true value, within PAGE_S seconds."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, PAGE_S, poll_frequency=0.1).until(check, message=f"the page never showed {what}")


def page(browser, expression: str):
    """The value of a JavaScript expression on the page, read in one go (the
    page redraws its charts every second, so elements found one by one may be
    gone by the time they are read)."""
    return browser.execute_script(f"return {expression};")


def points(browser) -> int:
    return page(browser, "Number(document.querySelector('#loss-chart .series-train')?.dataset.count || 0)")


def texts(browser, selector: str) -> list[str]:
    return page(browser, f"[...document.querySelectorAll({selector!r})].map((e) => e.textContent)")


def counts(browser, selector: str) -> list[int]:
    return page(browser, f"[...document.querySelectorAll({selector!r})].map((e) => Number(e.dataset.count))")


def test_the_page_follows_a_live_run_and_samples(browser, finished, env, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(finished, root / "done")
    live = root / "live"
    with dashboard(root, env, tmp_path / "dash.log") as (url, _):
        # a link to a run about to start waits for it, rather than showing the other run
        browser.get(f"{url}/#run=live")
        wait_for(browser, lambda b: page(b, "!document.getElementById('waiting').hidden"), "that it waits for live")
        assert page(browser, "document.getElementById('run').hidden") and texts(browser, "#waiting-name") == ["live"]
        # its output to a file: a pipe nobody reads fills after a few thousand
        # steps and stops the run mid-write (which a slow page once caught)
        with open(tmp_path / "train.log", "w") as train_log:
            trainer = subprocess.Popen([sys.executable, "-m", "crystalline", "train", str(STDLIB / "json"), *TINY,
                                        "--epochs", "1000", "--threads", "12", "--save-interval", "20",
                                        "--keep", "1000", "--eval-interval", "10", "--checkpoint-dir", str(live)],
                                       env=env, stdout=train_log, stderr=subprocess.STDOUT, text=True)
            try:
                wait_for(browser, lambda b: points(b) > 0, "the first points of the loss curve")
                assert texts(browser, "#run-name") == ["live"]
                assert page(browser, "document.getElementById('waiting').hidden")
                first = points(browser)
                wait_for(browser, lambda b: points(b) > first, "the loss curve growing")
                assert trainer.poll() is None, "the run should still be training"
                for chart in ("lr-chart", "grad-chart", "tps-chart"):
                    assert counts(browser, f"#{chart} polyline")[0] > 0, chart
                # the kissing spheres: Node Zero and the 11 workers, each with its busy share
                figures = wait_for(browser, lambda b: len(texts(b, "g.sphere .figure")) == 12
                                   and texts(b, "g.sphere .figure"), "12 spheres")
                assert all(re.fullmatch(r"\d+%", f) for f in figures), figures
                assert figures[0] == "0%" and any(f != "0%" for f in figures[1:]), figures
                assert texts(browser, "g.sphere .label") == ["Node Zero", *(f"sphere {i}" for i in range(1, 12))]
                bars = counts(browser, "#groups rect.group-bar")
                assert len(bars) == 12 and sum(bars) > 0
                wait_for(browser, lambda b: texts(b, "#checkpoints tbody tr"), "a checkpoint")
                # the prompt box samples from the latest checkpoint, as the library would
                prompt = browser.find_element("id", "prompt")
                prompt.clear()
                prompt.send_keys("def load(")
                browser.find_element("id", "seed").send_keys("7")
                browser.find_element("id", "sample-button").click()
                status = wait_for(browser, lambda b: re.search(r"from (ckpt-\d+)", texts(b, "#sample-status")[0]),
                                  "a sample")
                text = texts(browser, "#sample-text")[0]
                assert text and text == load(live / status[1]).generate("def load(", max_tokens=64, temperature=0.8, seed=7)
                browser.save_screenshot(str(tmp_path / "dashboard.png"))
                assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                # the other run: its checkpoints with the validation report's figures
                # the list is redrawn too
                page(browser, "document.querySelector('#runs li[data-name=done]').click()")
                report = json.loads((checkpoint.list_checkpoints(root / "done")[-1] / "validate.json").read_text())
                rate = f"{100 * report['syntax_rate']:.0f}%"
                wait_for(browser, lambda b: texts(b, "#checkpoints tbody tr:last-child td")[4:5] == [rate],
                         "the validation report")
                errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
                assert not errors, errors
            finally:
                trainer.send_signal(signal.SIGINT)
                trainer.wait(timeout=120)
    assert trainer.returncode == 130, (tmp_path / "train.log").read_text()[-3000:]
