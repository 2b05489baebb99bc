"""`crystalline dashboard` and `crystalline validate`: watching runs train in
a web page, and scoring what a trained model writes. The logic is in
`crystalline.dashboard` and `crystalline.validate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from crystalline import validate as validation
from crystalline.cli.infer import CHECKPOINT_HELP, MaxTokens, Seed, Temperature, Threads, TopK, TopP
from crystalline.cli.serve import SERVE_DEPENDENCIES
from crystalline.errors import UserError
from crystalline.inference import Sampling, load

Opt = typer.Option
Arg = typer.Argument
DEFAULTS = validation.DEFAULT_SAMPLING


def dashboard(
    runs_dir: Annotated[Path, Arg(metavar="RUNS_DIR", help="Where the runs are (searched recursively).")]
    = Path("runs"),
    host: Annotated[str, Opt(help="Address to listen on; anything but loopback lets other machines in.")]
    = "127.0.0.1",
    port: Annotated[int, Opt(min=0, max=65535, help="Port (0: any free one, printed).")] = 8001,
    threads: Threads = None,
) -> None:
    """A local web page that shows runs as they train: loss curves, learning
    rate, gradient norm, tokens/s, the kissing spheres' busy shares, the
    symmetry groups, checkpoints with their validation results, and a prompt
    box that samples from the latest checkpoint. Ctrl-C stops it."""
    try:
        from crystalline import dashboard as board
        from crystalline.serve import is_loopback, listen, serve_forever, url
    except ModuleNotFoundError as err:
        if err.name not in SERVE_DEPENDENCIES:
            raise
        raise UserError(f"crystalline dashboard needs {err.name}: pip install 'crystalline-cllm[serve]'") from None
    app = board.create_app(runs_dir, threads=threads)
    if not is_loopback(host):
        typer.echo(f"warning: listening on {host}: other machines that can reach this one can see the runs and "
                   "sample from their models", err=True)
    sock = listen(host, port)
    typer.echo(f"dashboard of {runs_dir} at {url(sock)}/")
    serve_forever(app, sock, access_log=False)


def validate(
    checkpoint_path: Annotated[Path, Arg(metavar="RUN", help=CHECKPOINT_HELP)],
    prompts: Annotated[Optional[Path], Opt(help="Prompts, one per line, or JSON Lines of {\"prompt\", \"kind\": "
                                                "\"code\" | \"text\"} (default: a built-in suite of Python "
                                                "function headers and questions).")] = None,
    samples: Annotated[int, Opt(help="Completions per prompt.")] = 4,
    data: Annotated[Optional[list[Path]], Opt("--data", help="Held-out text files or directories, for the "
                                                            "perplexity (repeatable).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print the report as JSON, completions included.")] = False,
    save: Annotated[bool, Opt(help="Save the report as CHECKPOINT/validate.json, where the dashboard shows "
                                   "it.")] = True,
    max_tokens: MaxTokens = DEFAULTS.max_tokens,
    temperature: Temperature = DEFAULTS.temperature,
    top_k: TopK = DEFAULTS.top_k,
    top_p: TopP = DEFAULTS.top_p,
    seed: Seed = DEFAULTS.seed,
    threads: Threads = None,
) -> None:
    """Score what a model writes: of each prompt's completions, the fraction
    of code that parses as Python (the header plus the completion, cut where
    the function ends), distinct-2 (repetition), and the mean log-likelihood
    per token; with --data, the held-out perplexity.

    Completions are at most what the context leaves after the longest
    prompt. The default seed makes the report reproducible."""
    sampling = Sampling(max_tokens, temperature, top_k, top_p, seed)
    sampling.validate()
    suite = validation.read_prompts(prompts) if prompts is not None else validation.DEFAULT_PROMPTS
    model = load(checkpoint_path, threads=threads)
    report = validation.validate(model, suite, samples, sampling, held_out=data)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        _print(report)
    if save:
        try:
            where = validation.save(report, model.path)
        except OSError as err:  # a read-only checkpoint, or one --keep deleted meanwhile
            typer.echo(f"warning: the report was not saved in {model.path} ({err.strerror or err})", err=True)
        else:
            typer.echo(f"saved {where}", err=True)


def _figure(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if percent else f"{value:.3f}"


def _print(report: validation.Report) -> None:
    table = Table(title=f"{report.checkpoint}: {report.samples} completion(s) of at most {report.max_tokens} "
                        f"tokens per prompt, temperature {report.temperature}")
    table.add_column("prompt", overflow="fold")
    for name in ("kind", "syntax rate", "distinct-2", "mean log-lik."):
        table.add_column(name, justify="right")
    for r in report.prompts:
        table.add_row(r.prompt, r.kind, _figure(r.syntax_rate, percent=True), _figure(r.distinct_2),
                      _figure(r.mean_log_likelihood))
    table.add_section()
    table.add_row("overall", "", _figure(report.syntax_rate, percent=True), _figure(report.distinct_2),
                  _figure(report.mean_log_likelihood), style="bold")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    if report.perplexity is not None:
        console.print(f"held-out perplexity {report.perplexity:.2f} ({', '.join(report.held_out or [])})")
