"""A sudoku checkpoint on puzzles from other sources, by number of givens, beside our own test pools.

    .venv/bin/python bench/sudoku_sources.py runs/sudoku/checkpoint.pt [--n 256] [--max-iter 128]

Sources:
- `ours`: the project's test pools (tasks.sudoku, minimal puzzles of 21-28 givens), buckets 0-3;
- `alt`: tasks.sudoku_alt, a generator built differently (a shuffled pattern grid, symmetric
  digging to a target of 24-40 givens), labelled with our solver's bucket so that equal
  difficulty can be compared;
- `dokusan`: the PyPI package's `generators.random_sudoku` (random 1-2 cell removals that keep
  the solution unique), if it is installed (`pip install dokusan`; it is not a dependency). It
  draws from Python's global `random`, which this script seeds per puzzle.
Exact = the whole grid right (every blank cell; givens are copied), the task's metric. Prints
one table; `--json` writes every number.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqloop.checkpoint import configs, load_checkpoint, load_model  # noqa: E402
from deqloop.evaluate import test_set  # noqa: E402
from tasks import IGNORE, Batch  # noqa: E402
from tasks.sudoku import analyse, bucket_of  # noqa: E402
from tasks.sudoku_alt import alt_pool  # noqa: E402


def batch_of(puzzles: np.ndarray, solutions: np.ndarray) -> Batch:
    p, s = torch.from_numpy(puzzles.astype(np.int64)), torch.from_numpy(solutions.astype(np.int64))
    return Batch(p, torch.where(p == 0, s - 1, IGNORE), torch.zeros(len(p), dtype=torch.long))


def dokusan_pool(n: int, seed: int) -> dict[str, np.ndarray] | None:
    try:
        from dokusan import generators
    except ImportError:
        return None
    puzzles, solutions = [], []
    for k in range(n):
        random.seed(seed * 1_000_003 + k)
        board = generators.random_sudoku(avg_rank=int(random.choice([60, 100, 150, 250])))
        puzzle = [int(ch) for ch in str(board)]  # row by row, 0 blank
        result = analyse(puzzle)
        if result.n_solutions == 1:
            puzzles.append(puzzle)
            solutions.append(list(result.solution))
    return {"puzzles": np.array(puzzles, np.uint8), "solutions": np.array(solutions, np.uint8)}


def score(model, task, solve, batch: Batch, max_iter: int) -> np.ndarray:
    """(N,) bool: the whole grid right."""
    out = []
    with torch.no_grad():
        for start in range(0, len(batch), 256):
            part = Batch(batch.inputs[start:start + 256], batch.targets[start:start + 256],
                         batch.difficulty[start:start + 256])
            logits, _ = model(part.inputs, solve, max_iter=max_iter)
            out.append(task.exact_match(task.predict(logits, part.inputs), part).numpy())
    return np.concatenate(out)


def rows_by(source: str, right: np.ndarray, givens: np.ndarray, buckets: np.ndarray) -> list[dict]:
    rows = []
    for b in sorted(set(buckets.tolist())):
        for lo, hi in ((17, 23), (24, 28), (29, 33), (34, 40), (41, 81)):
            sel = (buckets == b) & (givens >= lo) & (givens <= hi)
            if sel.sum():
                rows.append({"source": source, "bucket": int(b), "givens": f"{lo}-{hi}", "n": int(sel.sum()),
                             "exact": float(right[sel].mean())})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=256, help="puzzles per source (ours: per bucket)")
    p.add_argument("--max-iter", type=int, default=None, help="solver budget (default: the task's per bucket)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model, task = load_model(ckpt, "cpu")
    _, solve = configs(ckpt)
    budget = lambda b: args.max_iter or max(solve.max_iter, task.eval_max_iter(int(b)))
    rows, t0 = [], time.time()
    for b in range(4):
        batch = test_set(task, b, min(args.n, 256 if b == 3 else 512))
        right = score(model, task, solve, batch, budget(b))
        givens = (batch.inputs > 0).sum(1).numpy()
        rows += rows_by("ours", right, givens, np.full(len(batch), b))
    others = {"alt": alt_pool(args.n, (24, 40), seed=12345), "dokusan": dokusan_pool(args.n, seed=777)}
    for name, pool in others.items():
        if pool is None or not len(pool["puzzles"]):
            print(f"{name}: not installed, skipped")
            continue
        buckets = np.array([bucket_of(analyse(pz).guesses) for pz in pool["puzzles"]])
        batch = batch_of(pool["puzzles"], pool["solutions"])
        right = np.zeros(len(batch), bool)
        for b in set(buckets.tolist()):  # each puzzle at its bucket's budget, as ours
            sel = np.flatnonzero(buckets == b)
            sub = Batch(batch.inputs[sel], batch.targets[sel], batch.difficulty[sel])
            right[sel] = score(model, task, solve, sub, budget(b))
        rows += rows_by(name, right, (pool["puzzles"] > 0).sum(1), buckets)
    print(f"{args.checkpoint} (step {ckpt['step']}), {time.time() - t0:.0f} s")
    print(f"{'source':8} {'bucket':>6} {'givens':>7} {'n':>5} {'exact':>7}")
    for r in rows:
        print(f"{r['source']:8} {r['bucket']:>6} {r['givens']:>7} {r['n']:>5} {100 * r['exact']:>6.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "step": ckpt["step"], "rows": rows},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
