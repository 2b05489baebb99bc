"""The `crystalline` command line: a thin typer layer over the Python API.

Every command turns bad input into one clear message on stderr and a
non-zero exit code; tracebacks are for bugs, not for user mistakes.
"""

from __future__ import annotations

import sys

import typer

from crystalline.cluster import launcher_rank
from crystalline.errors import UserError

app = typer.Typer(
    name="crystalline",
    help="Train small GPT-2 language models on your own text or code, on the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from crystalline.cli import data as data_commands  # noqa: E402

app.command("prepare")(data_commands.prepare)
app.command("tokenize")(data_commands.tokenize)
app.command("size")(data_commands.size)

from crystalline.cli import train as train_command  # noqa: E402

app.command("train")(train_command.train)
app.command("plot")(train_command.plot)

from crystalline.cli import infer as inference_command  # noqa: E402

app.command("generate")(inference_command.generate)
app.command("chat")(inference_command.chat)
app.command("eval")(inference_command.evaluate)
app.add_typer(inference_command.models_app, name="models")
app.command("export")(inference_command.export)
app.command("import")(inference_command.import_model)

from crystalline.cli import crawl as crawl_command  # noqa: E402

app.command("crawl")(crawl_command.crawl)

from crystalline.cli import serve as serve_command  # noqa: E402

app.command("serve")(serve_command.serve)

from crystalline.cli import monitor as monitor_commands  # noqa: E402

app.command("dashboard")(monitor_commands.dashboard)
app.command("validate")(monitor_commands.validate)


def main() -> None:
    """Console-script entry point: a UserError from any command, or a usage
    error typer finds in the arguments, becomes one line on stderr and its
    exit code (2 for bad input). Under MPI every rank exits with that code,
    and only rank 0 says why (the ranks meet the same error)."""
    say = typer.echo if launcher_rank() == 0 else lambda *args, **kw: None
    try:
        code = app(standalone_mode=False)
    except UserError as err:
        say(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except typer.TyperException as err:  # typer's usage errors, e.g. --top-k 1e23
        message = err.format_message()
        say(message if "\n" in message else f"error: {message} (see --help)", err=True)  # or the help
        sys.exit(err.exit_code)
    except typer.Abort:  # end of input at a confirmation
        typer.echo("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        say("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(code) returns its code
