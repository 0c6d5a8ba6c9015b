#!/usr/bin/env python
"""Where plain iteration spends its evaluations on a trained loop, and what accelerating from there buys.

    python bench/solver_phases.py sudoku:0,2 chess:1,3 --n 256

Per checkpoint and difficulty, on the fixed test set and the task's evaluation budget: plain
iteration's relative residual ||f(z) - z|| / ||f(z)|| after every evaluation, and on the samples it
brings under the checkpoint's tolerance, the mean evaluations until the residual first falls under
each of --thresholds (the solve's phases). Then, per threshold tau, each sample switches from plain
iteration to Anderson (--m, the guard restarting without limit) at the first iterate whose residual
is under tau: total evaluations (plain's up to the switch plus Anderson's, within the same budget),
exact accuracy and converged fraction, over all samples and over those plain iteration converges.
A switch at a large tau accelerates the nonlinear phase; a switch at a small one only the linear tail.
Anderson gets the whole budget after the switch: evaluations are capped at the budget and a
sample that needs more counts as not converged, but its answer is read where Anderson stopped, so
the exact column of a switched solve can only flatter it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import solvers  # noqa: E402
from bench._checkpoints import load_specs  # noqa: E402
from deqloop.evaluate import eval_max_iter, test_set  # noqa: E402


def phases(model, task, batch, *, tol: float, budget: int, thresholds, m: int) -> list[str]:
    x = model.embed_input(batch.inputs)
    cell = model.cell(x)
    z = model.z_init(x)
    iterates, res = [], []
    for _ in range(budget):
        fz = cell(z)
        iterates.append(z)
        res.append((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1).clamp_min(1e-30))
        z = fz
    res = torch.stack(res, dim=1)  # (B, budget): residual of the iterate after k evaluations
    conv = (res < tol).any(dim=1)
    steps = torch.where(conv, (res < tol).float().argmax(dim=1) + 1, torch.tensor(budget)).double()
    def iterate_at(k: torch.Tensor) -> torch.Tensor:  # sample i's iterate after k[i] evaluations
        return torch.stack([iterates[int(k_i)][i] for i, k_i in enumerate(k)])

    # plain iteration's answer, as the solver returns it: the iterate that met tol, else the best one
    plain_z = iterate_at(torch.where(conv, steps.long() - 1, res.argmin(dim=1)))
    exact = task.exact_match(task.predict(model.head_logits(plain_z), batch.inputs), batch)
    lines = [f"plain: exact {exact.double().mean():.1%}  converged {conv.double().mean():.1%}  evaluations "
             f"{steps.mean():.1f}; on its converged samples, evaluations to residual "
             + ", ".join(f"{t:g}: {((res[conv] < t).float().argmax(dim=1) + 1).double().mean():.1f}"
                         for t in (*thresholds, tol))]
    for tau in thresholds:
        hit = res < tau
        switch = torch.where(hit.any(dim=1), hit.float().argmax(dim=1), torch.tensor(budget - 1))
        start = iterate_at(switch)
        r = solvers.solve(cell, start, method="anderson", m=m, max_restarts=None, tol=tol, max_iter=budget,
                          stop_mode="rel", subbatch=True)
        total = (switch + r.n_steps).clamp_max(budget).double()
        ok = task.exact_match(task.predict(model.head_logits(r.z), batch.inputs), batch)
        done = r.converged & (switch + r.n_steps <= budget)
        lines.append(f"anderson m {m} from residual {tau:<5g}: exact {ok.double().mean():6.1%}  converged "
                     f"{done.double().mean():6.1%}  evaluations {total.mean():6.1f} ({total.mean() / steps.mean():.2f}x) | "
                     f"on plain's converged: {total[conv].mean():6.1f} ({total[conv].mean() / steps[conv].mean():.2f}x), "
                     f"exact {ok[conv].double().mean():.1%} (plain {exact[conv].double().mean():.1%})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT[:D,D]",
                   help="checkpoint paths or shipped model names, each with its difficulties after a colon")
    p.add_argument("--n", type=int, default=256, help="test examples per difficulty (default: 256)")
    p.add_argument("--thresholds", default="0.3,0.1,0.03,0.01", help="residuals to switch at (default: 0.3,0.1,0.03,0.01)")
    p.add_argument("--m", type=int, default=5, help="Anderson's memory after the switch (default: 5)")
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    torch.set_grad_enabled(False)
    for run in load_specs(args.checkpoints):
        name, model, task, solve = run.name, run.model, run.task, run.solve
        for d in run.difficulties:
            budget = eval_max_iter(task, solve, d)
            head = f"{name} d={d} (n {args.n}, budget {budget}, tol {solve.tol:g})"
            for line in phases(model, task, test_set(task, d, args.n), tol=solve.tol, budget=budget,
                               thresholds=thresholds, m=args.m):
                print(f"{head}  {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
