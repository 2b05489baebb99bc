"""`crystalline serve`: arguments in, the address out; the server itself is
`crystalline.serve` (FastAPI and uvicorn, the `serve` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from crystalline.cli.infer import CHECKPOINT_HELP, Threads
from crystalline.errors import UserError
from crystalline.inference import load

Opt = typer.Option
# What the `serve` extra installs (and what they bring).
SERVE_DEPENDENCIES = ("fastapi", "uvicorn", "starlette", "pydantic")


def serve(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="RUN", help=CHECKPOINT_HELP)],
    host: Annotated[str, Opt(help="Address to listen on; anything but loopback lets other machines in.")]
    = "127.0.0.1",
    port: Annotated[int, Opt(min=0, max=65535, help="Port (0: any free one, printed).")] = 8000,
    max_batch: Annotated[int, Opt(help="Sequences decoded together, each step (the KV cache's slots).")] = 8,
    max_queue: Annotated[int, Opt(help="Requests that may wait for a slot; more get 429.")] = 64,
    api_key: Annotated[Optional[str], Opt(envvar="CRYSTALLINE_API_KEY",
                                          help="Require `Authorization: Bearer KEY` (all but /health).")] = None,
    threads: Threads = None,
) -> None:
    """Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, /health.

    Concurrent requests share the model: every running sequence is decoded in
    one batched step, and requests join and leave between steps. A prompt
    longer than the model's context, or max_tokens beyond what the context
    leaves, is refused with 400 (not slid). Ctrl-C lets running requests
    finish for a few seconds, then exits."""
    try:
        from crystalline import serve as server
    except ModuleNotFoundError as err:
        if err.name not in SERVE_DEPENDENCIES:
            raise
        raise UserError(f"crystalline serve needs {err.name}: pip install 'crystalline-cllm[serve]'") from None
    warning = server.exposure_warning(host, api_key)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    model = load(checkpoint_path, threads=threads)
    app = server.create_app(model, max_batch=max_batch, max_queue=max_queue, api_key=api_key)
    sock = server.listen(host, port)
    typer.echo(f"serving {model.path} at {server.url(sock)}/v1")
    server.run(app, sock)
