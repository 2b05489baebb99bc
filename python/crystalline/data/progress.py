"""A progress bar for long data passes (bytes and files done, speed, ETA)
and warnings, both on stderr so that stdout stays clean for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as _RichProgress

_stderr = Console(stderr=True)


class Progress:
    """One bar per phase; a no-op when `enabled` is False."""

    def __init__(self, enabled: bool = True) -> None:
        self._rich = (
            _RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[files]}/{task.fields[total_files]} files"),
                TimeRemainingColumn(),
                console=_stderr,
                transient=False,
            )
            if enabled
            else None
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()

    def start(self, description: str, total_bytes: int, total_files: int) -> None:
        if self._rich is not None:
            self._task = self._rich.add_task(description, total=total_bytes, files=0, total_files=total_files)

    def advance(self, nbytes: int) -> None:
        """One more file of `nbytes` bytes is done."""
        if self._rich is not None and self._task is not None:
            files = self._rich.tasks[self._task].fields["files"] + 1
            self._rich.update(self._task, advance=nbytes, files=files)

    @staticmethod
    def warn(message: str) -> None:
        _stderr.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
