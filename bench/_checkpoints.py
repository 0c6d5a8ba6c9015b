"""Checkpoints named on a bench's command line as CKPT[:D,D]: each with its own difficulties."""

from __future__ import annotations

from dataclasses import dataclass

from deqloop.checkpoint import configs, load_checkpoint, load_model
from deqloop.model import LoopedTransformer, SolveConfig
from tasks import Task


@dataclass
class Loaded:
    name: str
    model: LoopedTransformer  # in eval mode (load_model)
    task: Task
    solve: SolveConfig
    difficulties: list[int]


def load_specs(specs: list[str], default: str | None = None) -> list[Loaded]:
    """"sudoku:0,2" -> the shipped sudoku model at buckets 0 and 2. Without a colon: `default`
    (comma-separated), else the run's test difficulties."""
    out = []
    for spec in specs:
        name, _, own = spec.rpartition(":") if ":" in spec else (spec, "", "")
        ckpt = load_checkpoint(name)
        model, task = load_model(ckpt)
        _, solve = configs(ckpt)
        given = own or default
        diffs = ([int(d) for d in given.split(",")] if given
                 else list(ckpt["train_config"].get("test_difficulties") or task.test_difficulties))
        out.append(Loaded(name, model, task, solve, diffs))
    return out
