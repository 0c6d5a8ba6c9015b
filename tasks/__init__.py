"""Easy-to-hard tasks generated locally from a seed."""

from __future__ import annotations

from .base import IGNORE, Batch, Task, TaskInputError
from .chess import Chess
from .prefix_sums import PrefixSums
from .sudoku import Sudoku

__all__ = ["IGNORE", "TASKS", "Batch", "Task", "TaskInputError", "get_task"]

TASKS: dict[str, type[Task]] = {"prefix_sums": PrefixSums, "sudoku": Sudoku, "chess": Chess}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise TaskInputError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None
