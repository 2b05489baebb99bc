"""The dashboard's web app (FastAPI): the page and its script and stylesheet
from the package (nothing from the network), and a small JSON API that the
page polls while `train` runs.

    GET  /                      the page (static/index.html)
    GET  /static/...            its script and stylesheet
    GET  /api/runs              the runs under RUNS_DIR, with their latest figures
    GET  /api/run?name=RUN      a run's model, checkpoints (validation losses and
                                `crystalline validate` results) and the current
                                epoch's sphere and symmetry-group figures
    GET  /api/metrics?name=RUN&after=N&generation=G
                                the run's metric records past the N the page has
                                (all of them when metrics.jsonl was rewritten
                                since generation G, as a resumed run does)
    POST /api/sample            {"name", "prompt", "max_tokens", "temperature",
                                "seed"}: text from the run's latest checkpoint

Errors are `{"error": MESSAGE}` with 400 (bad input), 404 (no such run or
path) or 409 (no checkpoint yet).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from crystalline import checkpoint
from crystalline.dashboard import runs
from crystalline.errors import UserError
from crystalline.inference import LoadedModel, load

STATIC = Path(__file__).parent / "static"
# The fields of a metrics record that the page draws.
CURVE_FIELDS = ("step", "epoch", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s")
MAX_SAMPLE_TOKENS = 512


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


class SampleRequest(BaseModel):
    name: str
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=64, ge=1, le=MAX_SAMPLE_TOKENS)
    temperature: float = Field(default=0.8, ge=0, le=10)
    seed: int | None = Field(default=None, ge=0, lt=2**64)


@dataclass
class Dashboard:
    """The runs under `root`, each run's metrics tail, and the model that
    samples for the prompt box (the latest checkpoint of the run asked, kept
    loaded until another is asked for)."""

    root: Path
    threads: int | None = None
    _runs: dict[str, Path] = field(default_factory=dict)
    _tails: dict[str, runs.MetricsTail] = field(default_factory=dict)
    _model: LoadedModel | None = None
    _model_lock: threading.Lock = field(default_factory=threading.Lock)
    _runs_lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self) -> dict[str, Path]:
        found = runs.find_runs(self.root)
        with self._runs_lock:
            self._runs = found
        return found

    def run_dir(self, name: str) -> Path:
        """The run called `name` (a path relative to root, as /api/runs lists
        it); only listed runs are served, so no name reaches outside root."""
        found = self._runs.get(name) or self.refresh().get(name)
        if found is None:
            raise ApiError(404, f"no run {name!r} under {self.root}")
        return found

    def tail(self, name: str) -> runs.MetricsTail:
        run_dir = self.run_dir(name)
        with self._runs_lock:
            if name not in self._tails:
                self._tails[name] = runs.MetricsTail(run_dir / checkpoint.METRICS)
            return self._tails[name]

    def sample(self, req: SampleRequest) -> dict:
        """Text from the latest checkpoint of the run (loaded again when a
        newer one appears). A checkpoint deleted by --keep while it loads
        means one more try with the next latest."""
        run_dir = self.run_dir(req.name)
        with self._model_lock:
            for attempt in range(2):
                found = checkpoint.list_checkpoints(run_dir)
                if not found:
                    raise ApiError(409, f"{req.name} has no checkpoint yet; sampling needs one")
                try:
                    if self._model is None or self._model.path != found[-1]:
                        self._model = None
                        self._model = load(found[-1], threads=self.threads)
                    break
                except UserError:
                    if attempt or found[-1].exists():
                        raise
            text = self._model.generate(req.prompt, max_tokens=req.max_tokens, temperature=req.temperature,
                                        seed=req.seed)
            return {"text": text, "checkpoint": self._model.path.name, "step": self._model.state.step}


def _dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


def index(_request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


def list_runs(request: Request) -> dict:
    dash = _dashboard(request)
    listed = []
    for name, run_dir in dash.refresh().items():
        _, records = dash.tail(name).read()
        last = records[-1] if records else {}
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        listed.append({"name": name, "label": run_dir.name if name == runs.ROOT_NAME else name,
                       "steps": last.get("step", 0), "loss": last.get("loss"), "val_loss": vals[-1] if vals else None,
                       "checkpoints": len(checkpoint.list_checkpoints(run_dir)), "updated": _updated(run_dir)})
    return {"root": str(dash.root), "runs": listed}


def _updated(run_dir: Path) -> float | None:
    """When metrics.jsonl was last written, in seconds since the epoch."""
    try:
        return (run_dir / checkpoint.METRICS).stat().st_mtime
    except OSError:
        return None


def run_summary(name: str, request: Request) -> dict:
    dash = _dashboard(request)
    run_dir = dash.run_dir(name)
    tail = dash.tail(name)
    _, records = tail.read()
    return {"name": name, "path": str(run_dir), "model": runs.model_shape(run_dir),
            "checkpoints": runs.checkpoints(run_dir), "layout": runs.epoch_layout(records),
            "steps": records[-1]["step"] if records else 0, "bad_lines": tail.bad_lines, "updated": _updated(run_dir)}


def metrics(name: str, request: Request, after: int = 0, generation: int = -1) -> dict:
    generation_now, records = _dashboard(request).tail(name).read()
    start = after if generation == generation_now and 0 <= after <= len(records) else 0
    return {"generation": generation_now, "start": start,
            "records": [{k: r[k] for k in CURVE_FIELDS if k in r} for r in records[start:]]}


def sample(body: SampleRequest, request: Request) -> dict:
    return _dashboard(request).sample(body)


def _invalid(_request: Request, err: RequestValidationError) -> Response:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query"))
    return _error(400, f"{where or 'request body'}: {first['msg']}")


def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    if err.status_code == 404:
        return _error(404, f"no page {request.url.path}")
    return _error(err.status_code, f"{request.method} {request.url.path}: {err.detail}")


ROUTES = [("GET", "/", index), ("GET", "/api/runs", list_runs), ("GET", "/api/run", run_summary),
          ("GET", "/api/metrics", metrics), ("POST", "/api/sample", sample)]


def create_app(root: Path | str, threads: int | None = None) -> FastAPI:
    """The dashboard over the runs at or below `root` (a directory);
    `threads` for the sampling model (default: one per core)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root} does not exist; give the directory your runs are in (train writes them to runs/)")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the directory your runs are in")
    app = FastAPI(title="crystalline dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dashboard = Dashboard(root.resolve(), threads)
    app.add_exception_handler(ApiError, lambda _req, err: _error(err.status, str(err)))
    app.add_exception_handler(UserError, lambda _req, err: _error(400, str(err)))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
