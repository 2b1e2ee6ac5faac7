"""Progress for long conversions: rich bars over bytes on a terminal, plain lines with --verbose."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ConvertProgress:
    """Implements glm5conv.writer.Progress; bars only when stderr is a terminal and not quiet/json."""

    def __init__(self, *, bars: bool, verbose: bool) -> None:
        self.verbose = verbose
        self.console = Console(stderr=True)
        self.bars: Progress | None = None
        if bars and sys.stderr.isatty():
            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
        self._total: TaskID | None = None
        self._file: TaskID | None = None

    def __enter__(self) -> ConvertProgress:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def begin(self, total_bytes: int) -> None:
        if self.bars is not None:
            self._total = self.bars.add_task("total", total=total_bytes)

    def file(self, name: str, nbytes: int) -> None:
        if self.bars is not None:
            if self._file is not None:
                self.bars.remove_task(self._file)
            self._file = self.bars.add_task(name, total=nbytes)

    def advance(self, nbytes: int) -> None:
        if self.bars is not None:
            for task in (self._total, self._file):
                if task is not None:
                    self.bars.advance(task, nbytes)

    def say(self, message: str) -> None:
        if self.verbose:
            self.console.print(f"glm5conv: {message}", highlight=False, markup=False)
