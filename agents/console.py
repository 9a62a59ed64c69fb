"""Console output: progress bars on long work, one-line messages, no stack traces for users."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress bar; yields `advance(n=1, info="")`. Plain lines when not on a terminal."""
    if not console.is_terminal:
        done = 0
        step = max(1, total // 4)

        def advance_plain(n: int = 1, info: str = "") -> None:
            nonlocal done
            before, done = done, done + n
            if done // step != before // step or done == total:
                console.print(f"  {description}: {done}/{total} {info}".rstrip(), markup=False)

        yield advance_plain
        return
    with Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, info=info)

        yield advance


def percent(fraction: float | None) -> str:
    """A score in [0, 1] as a percentage with one decimal; '-' when there is none."""
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def one_line(text: str, limit: int = 200) -> str:
    """`text` with every whitespace run folded to one space, cut to `limit` characters."""
    line = " ".join(str(text)[: limit * 4].split())  # bounded work for an enormous text
    return line if len(line) <= limit else line[: limit - 3] + "..."


def say(message: str) -> None:
    console.print(message, markup=False)


def fail(message: str, code: int = 2) -> int:
    """Print a one-line user error and return the exit code to use."""
    print(f"error: {message}", file=sys.stderr)
    return code
