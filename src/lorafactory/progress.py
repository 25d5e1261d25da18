"""Progress reporting for long work: stages ask for a task bar; the CLI decides how to show it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class Task(Protocol):
    def advance(self, amount: int = 1) -> None: ...

    def complete(self) -> None:
        """The work ended here: the count so far is the whole (a total that was only an upper bound)."""


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Iterator[Task]: ...

    def note(self, message: str) -> None: ...


class _SilentTask:
    def advance(self, amount: int = 1) -> None:
        return None

    def complete(self) -> None:
        return None


class SilentProgress:
    """Shows nothing; for library use and tests."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _SilentTask()

    def note(self, message: str) -> None:
        return None


class RichProgress:
    """Progress bars on a rich console (stderr by default)."""

    def __init__(self, console) -> None:  # rich.console.Console
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)

            class _Task:
                def advance(self, amount: int = 1) -> None:
                    bar.advance(task_id, amount)

                def complete(self) -> None:
                    bar.update(task_id, total=bar.tasks[0].completed)

            yield _Task()

    def note(self, message: str) -> None:
        self.console.print(f"  {message}")
