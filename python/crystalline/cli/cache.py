"""`crystalline cache`: list the datasets `train` and `size` prepared in the
user's cache, and clear them (asking first unless --yes)."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from crystalline.data import cache
from crystalline.data.prepare import default_cache_dir
from crystalline.errors import UserError

cache_app = typer.Typer(help="List and clear the datasets that `train` and `size` prepare in the cache "
                             "($CRYSTALLINE_CACHE, else $XDG_CACHE_HOME/crystalline, else ~/.cache/crystalline).",
                        no_args_is_help=False)


@cache_app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """`crystalline cache` alone lists."""
    if ctx.invoked_subcommand is None:
        list_cache()


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def _describe(e: cache.Entry, now: float) -> str:
    vocab = "-" if e.vocab_size is None else f"{e.vocab_size:,}"
    if e.requested_vocab_size not in (None, e.vocab_size):
        vocab += f" (asked {e.requested_vocab_size:,})"
    kind = "" if e.ours else "  [not a crystalline dataset: left alone]"
    return (f"{e.path.name:16}  {e.bytes / 1e6:10,.1f} MB  vocab {vocab:18}  used {_ago(now - e.last_used):12}  "
            f"{e.inputs}{kind}")


@cache_app.command("list")
def list_cache() -> None:
    """Each cached dataset: size, vocabulary, last use and inputs."""
    root = default_cache_dir()
    entries = cache.scan(root)
    if not entries:
        typer.echo(f"{root}: empty")
        return
    now = time.time()
    typer.echo(f"{root}:")
    for e in entries:
        typer.echo(_describe(e, now))
    typer.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
               f"{sum(e.bytes for e in entries) / 1e6:,.1f} MB")


@cache_app.command("clear")
def clear(
    older_than: Annotated[Optional[str], typer.Option(help="Only datasets unused for this long: 30d, 12h, 2w...")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete cached datasets (all, or those unused for --older-than); asks first unless --yes."""
    age = cache.parse_age(older_than) if older_than is not None else None
    root = default_cache_dir()
    entries = cache.scan(root)
    chosen = cache.select(entries, age)
    now = time.time()
    for e in entries:
        if not e.ours:
            typer.echo(f"left alone, not a crystalline dataset: {e.path}", err=True)
    if not chosen:
        typer.echo(f"nothing to delete in {root}")
        return
    for e in chosen:
        typer.echo(_describe(e, now))
    total = sum(e.bytes for e in chosen) / 1e6
    if not yes and not typer.confirm(f"Delete these {len(chosen)} dataset(s), {total:,.1f} MB?", default=False):
        raise UserError("nothing deleted", exit_code=1)
    freed, kept = 0, 0
    for e in chosen:
        try:
            cache.remove(e)
            freed += e.bytes
        except UserError as err:  # in use (locks.InUse), or files crystalline did not make
            kept += 1
            typer.echo(f"skipped: {err}", err=True)
    typer.echo(f"deleted {len(chosen) - kept} dataset(s), {freed / 1e6:,.1f} MB freed"
               + (f"; {kept} skipped" if kept else ""))
