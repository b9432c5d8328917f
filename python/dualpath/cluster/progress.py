"""Progress of long runs: rich's bars on a terminal, a plain line every tenth of a task anywhere else (a log file,
CI), where rich draws its bars only once they are done: a 17-minute A/B would print nothing until its table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

STEPS = 10


@dataclass
class _Task:
    description: str
    total: float
    done: float = 0.0
    started: float = field(default_factory=time.monotonic)


class LineProgress:
    """``rich.progress.Progress``'s ``add_task`` and ``advance``, printing ``[hh:mm:ss] task done/total (elapsed)``
    each time a task passes another tenth of its total."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        self._tasks.append(_Task(description.strip(), total or 0.0))
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self._tasks[task_id]
        before, task.done = task.done, task.done + advance
        if task.total and int(task.done * STEPS / task.total) > int(before * STEPS / task.total):
            self.console.print(f"[{datetime.now():%H:%M:%S}] {task.description} {task.done:g}/{task.total:g} "
                               f"({time.monotonic() - task.started:.0f} s)", highlight=False)


AnyProgress = Progress | LineProgress


def progress_for(console: Console) -> AnyProgress:
    """Bars where ``console`` is a terminal, lines elsewhere."""
    if console.is_terminal:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    return LineProgress(console)
