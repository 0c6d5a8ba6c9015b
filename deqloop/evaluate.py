"""Exact-match accuracy per difficulty and test-time iteration budget, on fixed seeded test sets.

    report = evaluate_checkpoint("runs/prefix_sums/checkpoint.pt", iters=[40, 80, 160, 320])
    print_table(report); deqloop.io.write_json(report, "eval.json"); plot(report, "eval.png")

The question the grid answers (DESIGN §4): does a loop trained on easy examples solve harder
ones when it is allowed to iterate more? Rows are difficulties, columns `max_iter` budgets.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from deqloop.checkpoint import load_checkpoint, load_run
from deqloop.model import SolveConfig
from tasks import Batch, Task

EVAL_SEED = 0  # the test sets are the same for every run of a task, whatever its training seed
# Third word of the test sets' seed. Training data is seeded [seed, step, rank] with a small
# rank there, so the two streams never meet (numpy's SeedSequence also equates [a, b] and
# [a, b, 0]: a nonzero word keeps them apart).
EVAL_STREAM = 2**30 + 1
EVAL_N = 128  # examples per difficulty of the eval command (training's periodic evals use fewer)
EVAL_TOKENS = 32768  # examples per forward pass x their length: bounds the memory of evaluation


def test_set(task: Task, difficulty: int, n: int) -> Batch:
    """The fixed test set of `n` examples at `difficulty` (the first n of a larger one are the same)."""
    return task.generate(n, difficulty, np.random.default_rng([EVAL_SEED, difficulty, EVAL_STREAM]), "test")


def eval_max_iter(task: Task, solve: SolveConfig, difficulty: int) -> int:
    """The iteration budget at `difficulty`: the training budget, or more if the task asks for it."""
    return max(solve.max_iter, int(task.eval_max_iter(difficulty)))


def evaluate(model: nn.Module, task: Task, solve: SolveConfig, batch: Batch, *, max_iter: int,
             device: str | torch.device, max_tokens: int | None = None) -> dict:
    """Accuracy and solver statistics of `model` on `batch` with `max_iter`, in bounded-size chunks.

    Returns floats: acc (fraction exactly right), solver_steps (mean evaluations of f per example),
    converged (fraction whose solve reached tol), max_residual (worst residual; inf if
    any was not finite), n (examples), and the mean of each of the task's own `metrics`.
    """
    return evaluate_budgets(model, task, solve, batch, iters=[max_iter], device=device, max_tokens=max_tokens)[0]


@torch.no_grad()
def evaluate_budgets(model: nn.Module, task: Task, solve: SolveConfig, batch: Batch, *, iters,
                     device: str | torch.device, max_tokens: int | None = None,
                     on_chunk: Callable[[int], None] | None = None) -> list[dict]:
    """`evaluate` at each budget of `iters`, in that order, from one solve per chunk to the largest
    budget: the smaller ones are read along it (the solvers' `snapshots`, the same numbers as a
    solve of their own), so the cost is that of the largest budget alone. `on_chunk(examples
    done)` is called after each chunk."""
    iters = [int(k) for k in iters]
    if not iters or min(iters) < 1:
        raise ValueError(f"budgets must be integers >= 1, got {iters!r}")
    top = max(iters)
    snapshots = tuple(sorted({k for k in iters if k < top}))
    was_training = model.training
    model.eval()
    chunk = max(1, (max_tokens or EVAL_TOKENS) // max(1, batch.inputs.shape[1]))
    tallies = {k: _Tally() for k in set(iters)}
    for start in range(0, len(batch), chunk):
        rows = slice(start, start + chunk)
        part = Batch(batch.inputs[rows], batch.targets[rows], batch.difficulty[rows]).to(device)
        logits, result = model(part.inputs, solve, max_iter=top, snapshots=snapshots)
        tallies[top].add(task, part, logits, result)
        for k in snapshots:
            snap = result.snapshots[k]
            tallies[k].add(task, part, model.head_logits(snap.z), snap)
        if on_chunk is not None:
            on_chunk(min(start + chunk, len(batch)))
    model.train(was_training)
    return [tallies[k].report(len(batch)) for k in iters]


class _Tally:
    """Running sums of one budget's statistics over a batch's chunks (see `evaluate`)."""

    def __init__(self):
        self.correct, self.steps, self.converged, self.worst = 0, 0.0, 0, 0.0
        self.extra: dict[str, float] = {}
        self.by: dict[int, list[int]] = {}  # the task's breakdown value -> [right, n]
        self.label = None

    def add(self, task: Task, part: Batch, logits, result) -> None:
        pred = task.predict(logits, part.inputs)
        right = task.exact_match(pred, part)
        self.correct += int(right.sum())
        groups = task.breakdown(part)
        if groups is not None:
            self.label = groups[0]
            for value, ok in zip(groups[1].tolist(), right.tolist()):
                self.by.setdefault(value, [0, 0])[0] += ok
                self.by[value][1] += 1
        for name, values in task.metrics(pred, part, logits).items():
            self.extra[name] = self.extra.get(name, 0.0) + float(values.double().sum())
        self.steps += float(result.n_steps.double().sum())
        self.converged += int(result.converged.sum())
        res = result.residual
        self.worst = max(self.worst, float(res.max())) if bool(torch.isfinite(res).all()) else math.inf

    def report(self, n: int) -> dict:
        report = {"acc": self.correct / n, "solver_steps": self.steps / n, "converged": self.converged / n,
                  "max_residual": self.worst, "n": n, **{name: total / n for name, total in self.extra.items()}}
        if self.label is not None:  # e.g. "by_givens": {"24": {"acc": 0.5, "n": 10}, ...}
            report[f"by_{self.label}"] = {str(v): {"acc": r / k, "n": k} for v, (r, k) in sorted(self.by.items())}
        return report


def default_iters(solve: SolveConfig, task: Task, difficulties) -> list[int]:
    """Doubling budgets from the training max_iter to 8x it, plus the task's budget per difficulty."""
    iters = {solve.max_iter * 2**k for k in range(4)}
    iters |= {eval_max_iter(task, solve, d) for d in difficulties}
    return sorted(iters)


def evaluate_checkpoint(path: str | Path | dict, *, difficulties=None, iters=None, n: int | None = None,
                        device: str | torch.device = "cpu", progress=None, solver: str | None = None,
                        solver_options: dict | None = None) -> dict:
    """The accuracy grid (difficulty x max_iter) of a checkpoint (a path, a shipped model's name, or
    what load_checkpoint returned), as a plain dict (see deqloop.io.write_json).

    Defaults: the run's test difficulties, `default_iters`, EVAL_N examples per difficulty, and the
    run's forward solver (`solver`, `solver_options`: another, see checkpoint.with_solver).
    `progress(difficulty, max_iter, done, total)` is called before each difficulty's solve (to the
    largest budget, read at every budget along the way), after each of its chunks (`done` then
    counts the chunk's share, so it is not a whole number) and once at the end (difficulty None),
    with the work done and in all counted in iterations of that budget.
    """
    ckpt = path if isinstance(path, dict) else load_checkpoint(path)  # a dict: already loaded
    model, task, _, solve = load_run(ckpt, device, solver=solver, solver_options=solver_options)
    train_cfg = ckpt["train_config"]
    difficulties = list(difficulties or train_cfg.get("test_difficulties") or task.test_difficulties)
    iters = sorted(set(iters or default_iters(solve, task, difficulties)))
    n = int(n or EVAL_N)
    # one solve per difficulty to the largest budget, read at the others: work in its iterations
    top = max(iters)
    cells, done, total = [], 0, len(difficulties) * top
    for d in difficulties:
        batch = test_set(task, d, n)
        on_chunk = None
        if progress is not None:
            progress(d, top, done, total)

            def on_chunk(examples, d=d, start=done, size=len(batch)):  # this difficulty's share so far
                progress(d, top, start + top * examples / size, total)

        reports = evaluate_budgets(model, task, solve, batch, iters=iters, device=device, on_chunk=on_chunk)
        cells += [{"difficulty": d, "max_iter": k, **r} for k, r in zip(iters, reports)]
        done += top
    if progress is not None:
        progress(None, None, done, total)
    return {
        "checkpoint": ckpt["path"], "task": ckpt["task"], "step": ckpt["step"],
        "deqloop_version": ckpt["deqloop_version"], "solver": solve.solver,
        "solver_options": solve.solver_options, "tol": solve.tol,
        "train_max_iter": solve.max_iter, "n": n, "difficulties": difficulties, "iters": iters,
        "train_difficulties": list(train_cfg.get("train_difficulties") or task.train_difficulties),
        "eval_max_iter": {str(d): eval_max_iter(task, solve, d) for d in difficulties},
        "cells": cells,
    }


def print_table(report: dict, console: Console | None = None) -> None:
    """Rows: difficulties; columns: max_iter budgets; each cell accuracy, mean steps, converged."""
    console = console or Console()
    # Compact on purpose: the default grid (9 budgets) fits 100 columns without truncated headers.
    table = Table(title=f"{report['task']} @ step {report['step']}: exact-match accuracy, "
                        f"n={report['n']} per difficulty; columns: max_iter",
                  caption="below each accuracy: mean solver steps, and the % of examples converged "
                          "where not all did",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("difficulty", justify="right", no_wrap=True)
    for k in report["iters"]:
        table.add_column(str(k), justify="right")
    by_cell = {(c["difficulty"], c["max_iter"]): c for c in report["cells"]}
    for d in report["difficulties"]:
        row = []
        for k in report["iters"]:
            c = by_cell[(d, k)]
            conv = "" if c["converged"] == 1 else f" {100 * c['converged']:.0f}%"
            row.append(f"{100 * c['acc']:.1f}%\n[dim]{c['solver_steps']:.0f}{conv}[/dim]")
        table.add_row(str(d), *row)
    console.print(table)
    for d in report["difficulties"]:  # the task's second label, at the largest budget
        c = by_cell[(d, report["iters"][-1])]
        for key in (k for k in c if k.startswith("by_")):
            parts = [f"{v}: {100 * g['acc']:.0f}% of {g['n']}" for v, g in c[key].items()]
            console.print(f"difficulty {d}, max_iter {c['max_iter']}, exact by {key[3:]}: " + ", ".join(parts))


def plot(report: dict, path: str | Path) -> None:
    """Accuracy vs max_iter (log2 axis), one line per difficulty, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks import get_task

    name = get_task(report["task"]).difficulty_label
    trained = set(report.get("train_difficulties") or ())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for d in report["difficulties"]:
        cells = sorted((c for c in report["cells"] if c["difficulty"] == d), key=lambda c: c["max_iter"])
        ax.plot([c["max_iter"] for c in cells], [c["acc"] for c in cells], marker="o",
                ls="--" if d in trained else "-", label=name(d) + (" (trained)" if d in trained else ""))
    if report.get("train_max_iter"):
        ax.axvline(report["train_max_iter"], color="gray", ls=":", lw=1.2,
                   label=f"training depth ({report['train_max_iter']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["iters"], [str(k) for k in report["iters"]])
    ax.minorticks_off()
    ax.set_xlabel("max_iter (test-time iteration budget)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{report['task']} @ step {report['step']}")
    ax.legend(title="difficulty")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Training loss (log axis) and periodic exact-match accuracy per test difficulty against the
    step, from metrics.jsonl rows, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(True, alpha=0.3)
    for d in (evals[-1]["acc"] if evals else {}):
        pts = [(r["step"], r["acc"][d]) for r in evals if r["acc"].get(d) is not None]
        ax_acc.plot(*zip(*pts), marker="o", label=f"{d} (budget {evals[-1].get('max_iter', {}).get(d, '?')})")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("exact-match accuracy (test)")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.grid(True, alpha=0.3)
    if evals:
        ax_acc.legend(title="difficulty", fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no periodic evaluation (--eval-every 0)", ha="center", transform=ax_acc.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
