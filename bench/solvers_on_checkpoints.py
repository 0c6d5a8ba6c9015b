#!/usr/bin/env python
"""Every forward solver, ours and torchdeq's, on trained checkpoints: the loops users really solve.

    python bench/solvers_on_checkpoints.py prefix_sums sudoku          # shipped models, by name
    python bench/solvers_on_checkpoints.py runs/chess/checkpoint.pt --difficulties 1,3 --n 64
    python bench/solvers_on_checkpoints.py prefix_sums --json bench/results/solvers_on_checkpoints.json

Per checkpoint, difficulty and solver, on the same fixed test set (deqloop.evaluate.test_set) and
the same weights: exact-match accuracy of the returned z, fraction of samples whose relative
residual ||f(z) - z|| / ||f(z)|| is below the tolerance (recomputed here, the same way
for every solver), evaluations of f (rows passed over the batch size: ours solve on the active
sub-batch, as the model does, so this is the mean over samples of the evaluations until each
stops; torchdeq's solve the whole batch until its last sample stops), mean evaluations per
sample until each stops (ours only; torchdeq does not report them), and wall time. Every solver gets the same
budget: the task's evaluation budget for that difficulty (deqloop.evaluate.eval_max_iter), or
--max-iter, and the same tolerance: the checkpoint's, or --tol. Time it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import solvers  # noqa: E402
from bench._checkpoints import load_specs  # noqa: E402
from deqloop.evaluate import eval_max_iter, test_set  # noqa: E402
from torchdeq import solver as tdsolver  # noqa: E402

# (label, library, method, options); "D" in an option value is replaced by the model's width
SOLVERS = [
    ("fixed_point_iter", "ours", "fixed_point_iter", {}),
    ("anderson", "ours", "anderson", {}),  # the default: safeguard 1, max_restarts 0
    ("anderson unguarded", "ours", "anderson", {"safeguard": None}),
    ("anderson guarded 2 restarts", "ours", "anderson", {"max_restarts": 2}),
    ("anderson guarded restarts unlimited", "ours", "anderson", {"max_restarts": None}),
    ("anderson per position", "ours", "anderson", {"block_size": "D", "safeguard": None}),
    ("anderson warmup 16", "ours", "anderson", {"warmup": 16}),
    ("anderson warmup 32", "ours", "anderson", {"warmup": 32}),
    ("broyden", "ours", "broyden", {}),
    ("broyden warmup 32", "ours", "broyden", {"warmup": 32}),
    ("broyden guarded", "ours", "broyden", {"safeguard": 1.0}),  # anderson's default guard
    ("broyden gate 0.9", "ours", "broyden", {"gate": 0.9}),
    ("broyden gate 0.85", "ours", "broyden", {"gate": 0.85}),
    ("broyden gate 0.9 warmup 16", "ours", "broyden", {"gate": 0.9, "warmup": 16}),
    ("broyden gate 0.95 warmup 16", "ours", "broyden", {"gate": 0.95, "warmup": 16}),
    ("broyden gate 0.85 warmup 16", "ours", "broyden", {"gate": 0.85, "warmup": 16}),
    ("broyden gate 0.8 warmup 16", "ours", "broyden", {"gate": 0.8, "warmup": 16}),
    ("broyden gate 0.85 warmup 32", "ours", "broyden", {"gate": 0.85, "warmup": 32}),
    ("broyden guarded warmup 16", "ours", "broyden", {"safeguard": 1.0, "warmup": 16}),
    ("anderson gate 0.85 warmup 16", "ours", "anderson", {"gate": 0.85, "warmup": 16}),
    ("anderson m 20", "ours", "anderson", {"m": 20}),
    ("anderson m 20 restarts unlimited", "ours", "anderson", {"m": 20, "max_restarts": None}),
    ("anderson m 20 gate 0.85 warmup 16", "ours", "anderson", {"m": 20, "gate": 0.85, "warmup": 16}),
    ("anderson m 20 gate 0.85 warmup 16 restarts unlimited", "ours", "anderson",
     {"m": 20, "gate": 0.85, "warmup": 16, "max_restarts": None}),
    ("broyden guarded x2 restarts unlimited", "ours", "broyden", {"safeguard": 2.0, "max_restarts": None}),
    ("torchdeq fixed_point_iter", "torchdeq", "fixed_point_iter", {}),
    ("torchdeq anderson", "torchdeq", "anderson", {}),
    ("torchdeq broyden", "torchdeq", "broyden", {}),
]


class Counted:
    """f with a count of the samples it was given (sum over calls of the rows passed)."""

    def __init__(self, f):
        self.f, self.rows = f, 0

    def __call__(self, z, *idx):
        self.rows += z.shape[0]
        return self.f(z, *idx)


def run_one(model, task, batch, lib, method, options, tol, max_iter) -> dict:
    x = model.embed_input(batch.inputs)
    z0 = model.z_init(x)
    cell = model.cell(x)
    f = Counted(cell)
    t0 = time.perf_counter()
    steps = None  # per-sample evaluations: ours report them, torchdeq's do not
    if lib == "ours":
        result = solvers.solve(f, z0, method=method, tol=tol, max_iter=max_iter, stop_mode="rel", subbatch=True,
                               **options)
        z, steps = result.z, float(result.n_steps.float().mean())
    else:
        z, _, _ = tdsolver.get_solver(method)(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel", **options)
    wall = time.perf_counter() - t0
    fz = cell(z)
    rel = (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1).clamp_min(1e-30)
    pred = task.predict(model.head_logits(z), batch.inputs)
    exact = task.exact_match(pred, batch).float()
    return {"exact": float(exact.mean()), "converged": float((rel < tol).float().mean()),
            "f_evals": f.rows / batch.inputs.shape[0], "mean_steps": steps, "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT[:D,D]",
                   help="checkpoint paths or shipped model names, each with its own difficulties after a colon")
    p.add_argument("--difficulties", help="comma-separated, for a checkpoint given without its own (default: the "
                                          "run's test difficulties)")
    p.add_argument("--n", type=int, default=64, help="test examples per difficulty (default: 64)")
    p.add_argument("--max-iter", type=int, help="budget of every solver (default: the task's, per difficulty)")
    p.add_argument("--solvers", help="comma-separated labels of SOLVERS (default: all)")
    p.add_argument("--tol", type=float, help="relative tolerance of every solver, and of the converged column "
                                             "(default: the checkpoint's)")
    p.add_argument("--json", type=Path, help="write every row here")
    args = p.parse_args(argv)
    chosen = [s for s in SOLVERS if not args.solvers or s[0] in args.solvers.split(",")]
    rows = []
    torch.set_grad_enabled(False)
    for run in load_specs(args.checkpoints, args.difficulties):
        name, model, task, solve = run.name, run.model, run.task, run.solve
        d_model = model.cfg.d_model
        tol = args.tol or solve.tol
        for d in run.difficulties:
            batch = test_set(task, d, args.n)
            budget = args.max_iter or eval_max_iter(task, solve, d)
            for label, lib, method, options in chosen:
                options = {k: d_model if v == "D" else v for k, v in options.items()}
                try:
                    row = run_one(model, task, batch, lib, method, options, tol, budget)
                except Exception as e:  # a row, not a crash: torchdeq's singular systems, for one
                    row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                row = {"checkpoint": name, "task": task.name, "difficulty": d, "max_iter": budget, "tol": tol,
                       "solver": label, **row}
                rows.append(row)
                if "error" in row:
                    print(f"{name:>12} d={d:<4} {label:<36} {row['error']}", flush=True)
                else:
                    mean = "      -" if row["mean_steps"] is None else f"{row['mean_steps']:7.1f}"
                    print(f"{name:>12} d={d:<4} {label:<36} exact {row['exact']:6.1%}  conv {row['converged']:6.1%}  "
                          f"f evals {row['f_evals']:7.1f}  per sample {mean}  {row['wall_s']:7.2f} s  (budget {budget})",
                          flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n": args.n, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
