"""A chess checkpoint on each source of test puzzles, by mate depth and iteration budget.

    .venv/bin/python bench/chess_sources.py chess [--n 1000] [--iters 16,32,128] [--json out.json]

Sources (none of them trained on):
- `greedy`, `engine`: the dataset's test puzzles (tasks/data/chess/puzzles.npz) from
  greedy-vs-random games and from Stockfish self-play, told apart by their `source`;
- `human`: the held-out puzzles from human games on lichess.org (split "human",
  tasks/data/chess/human_puzzles.csv, proved by the project's search).
Per source and N (mate in N), the first `--n` puzzles (all, if fewer) at each budget: `exact` is
the task's metric (the predicted from/to squares are the key, raw, no legality mask), `legal
reading` the key is the legal move of highest from + to logit (Chess.best_legal), `legal` the raw
prediction is a legal move. The checkpoint argument may be a shipped model's name.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqloop.checkpoint import configs, load_checkpoint, load_model, resolve_checkpoint  # noqa: E402
from deqloop.evaluate import evaluate  # noqa: E402
from tasks import Batch, TaskInputError  # noqa: E402

SOURCES = ("greedy", "engine", "human")


def source_batch(task, source: str, n_mate: int, n: int) -> Batch | None:
    """The first n puzzles of one source and mate depth (None when there are none)."""
    split = "human" if source == "human" else "test"
    try:
        pool = task.puzzles(split, n_mate)
    except TaskInputError:  # a depth the file lacks: no row
        return None
    rows = np.arange(len(pool)) if source == "human" else np.flatnonzero(pool.source == source)
    rows = torch.from_numpy(rows[:n])
    if len(rows) == 0:
        return None
    return Batch(pool.inputs[rows], pool.targets[rows], torch.full((len(rows),), n_mate, dtype=torch.long))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint path or a shipped model's name")
    p.add_argument("--n", type=int, default=1000, help="puzzles per source and N (default 1000)")
    p.add_argument("--iters", default=None, help="budgets, comma-separated (default: training max_iter and 8x it)")
    p.add_argument("--mates", default="1,2,3", help="mate depths (default 1,2,3)")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model, task = load_model(ckpt, "cpu")
    if task.name != "chess":
        print(f"error: {args.checkpoint} is a {task.name} checkpoint, not chess", file=sys.stderr)
        return 2
    solve = configs(ckpt)[1]
    iters = [int(k) for k in args.iters.split(",")] if args.iters else [solve.max_iter, 8 * solve.max_iter]
    mates = [int(k) for k in args.mates.split(",")]
    rows, start = [], time.time()
    for source in SOURCES:
        for n_mate in mates:
            batch = source_batch(task, source, n_mate, args.n)
            if batch is None:
                continue
            for k in iters:
                r = evaluate(model, task, solve, batch, max_iter=k, device="cpu")
                rows.append({"source": source, "mate_in": n_mate, "max_iter": k, "n": r["n"], "exact": r["acc"],
                             "key_legal": r["key_legal"], "legal": r["legal"], "converged": r["converged"]})
                print(f"{source:>7}  mate in {n_mate}  iters {k:>4}  n {r['n']:>5}  exact {100 * r['acc']:5.1f}%  "
                      f"legal reading {100 * r['key_legal']:5.1f}%  legal {100 * r['legal']:5.1f}%  "
                      f"converged {100 * r['converged']:5.1f}%", flush=True)
    print(f"({time.time() - start:.0f} s; checkpoint {ckpt['path']}, step {ckpt['step']})")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(ckpt["path"]), "step": ckpt["step"], "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
