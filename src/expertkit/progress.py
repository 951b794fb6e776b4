"""Progress for every long step: a rich bar on a terminal, a plain line every 10% in logs and CI."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int, disable: bool = False):
    """Yield an `advance(n=1, info="")` callable; `info` (say, the loss) is shown beside the bar."""
    if disable:
        yield lambda n=1, info="": None
        return
    if not console.is_terminal:
        yield _log_lines(description, total)
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance


def _log_lines(description: str, total: int):
    """Rich cannot redraw a bar in a log file, so print one line per 10% instead."""
    started, state = time.time(), {"done": 0, "next": max(1, total // 10)}

    def advance(n: int = 1, info: str = "") -> None:
        state["done"] += n
        if state["done"] >= state["next"] or state["done"] == total:
            state["next"] = state["done"] + max(1, total // 10)
            console.print(f"{description}: {state['done']}/{total} {info} ({time.time() - started:.0f}s)",
                          highlight=False)

    return advance


@contextmanager
def progress_board():
    """Several bars updated to absolute values: jobs running in parallel elsewhere report their step counts.

    Yields a board with `add(description, total) -> key` and `update(key, completed, info="")`; a
    job restarted from a checkpoint may move its bar back.
    """
    if not console.is_terminal:
        yield _LogBoard()
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        yield _RichBoard(progress)


class _RichBoard:
    def __init__(self, progress: Progress):
        self.progress = progress

    def add(self, description: str, total: int):
        return self.progress.add_task(description, total=total, info="")

    def update(self, key, completed: int, info: str = "") -> None:
        self.progress.update(key, completed=completed, info=info)


class _LogBoard:
    """One line per bar every 10% (and at the end), as `progress_bar` does in logs."""

    def __init__(self):
        self.started = time.time()
        self.bars: dict[int, dict] = {}

    def add(self, description: str, total: int) -> int:
        key = len(self.bars)
        self.bars[key] = {"description": description, "total": total, "next": max(1, total // 10)}
        return key

    def update(self, key: int, completed: int, info: str = "") -> None:
        bar = self.bars[key]
        if completed >= bar["next"]:
            bar["next"] = completed + max(1, bar["total"] // 10)
            console.print(f"{bar['description']}: {completed}/{bar['total']} {info} "
                          f"({time.time() - self.started:.0f}s)", highlight=False)
