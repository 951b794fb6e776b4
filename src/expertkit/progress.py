"""Progress for every long step: a rich bar on a terminal, a plain line every 10% in logs and CI."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int):
    """Yield an `advance(n=1, info="")` callable; `info` (say, the loss) is shown beside the bar."""
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
