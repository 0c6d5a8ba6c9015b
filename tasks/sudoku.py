"""Sudoku: a 9x9 puzzle with a unique solution in, the digits of its blank cells out.

Difficulty = the number of guesses (branch nodes) the fixed solver `analyse` needs to solve a
puzzle AND prove its solution unique, bucketed:

    bucket 0: 0 guesses (naked + hidden singles solve it)    bucket 2: 3-9 guesses
    bucket 1: 1-2 guesses                                    bucket 3: 10+ guesses (rare, slow to fill)

The solver propagates naked and hidden singles to a fixpoint, then branches on the empty cell
with the fewest candidates (ties: lowest cell index) and counts every branch node of the WHOLE
search tree, stopping early only at a second solution. That singles closure does not depend on
the order deductions are made in, so the count is exactly invariant under relabelling the
digits (not under transposition or band swaps: they move the index tie-break), which makes
digit relabelling a free augmentation that keeps the label (`tests/test_sudoku.py` checks it).

Generation (`make_puzzle`): a random full grid (the same solver with a random value order), then
plain random digging: visit the 81 cells in random order and blank each one unless another
solution then exists (found by the solver searching with that cell's old digit excluded). One
pass leaves a minimal puzzle, of 21-28 givens (mostly 23-26); the number of givens is kept as a
second label (`pool(...)["givens"]`). Puzzle k of the (seed, split) stream draws from
`np.random.default_rng([seed, split word, k])`, so the stream does not depend on the number of
worker processes, and the train and test streams are disjoint by seed; loading both pools of a
bucket also checks that no test puzzle equals a training one up to digit relabelling.

Pools: training samples from a finite pool per (split, bucket) holding the first `size` puzzles
of that bucket in the stream ("the first n of a larger set are the same"). Pools are built on
first use (with a progress bar, over `workers` processes) and cached on disk (tasks/cache.py):
the stream in chunks of CHUNK puzzles (an interrupted build keeps its finished chunks, and every
bucket reuses them), the pools keyed by (seed, split, bucket, size).
- split "train": n puzzles drawn with replacement by `rng`, each under a random digit relabelling
  (`augment=True`, 9! variants of one puzzle, same label).
- split "test": the first n of the test pool, whatever `rng` (evaluation is deterministic).

Encoding: inputs (N, 81) tokens 0-9 (0 blank), row by row; targets (N, 81) = solution digit - 1
(9 classes) on blank cells and IGNORE on givens: copying a given teaches nothing, and `predict`
copies the givens from the input instead of trusting the model to repeat them. With givens
copied, "valid" (the grid satisfies the rules and keeps the givens) equals exact match on the
generated puzzles, whose solution is unique; it differs on user puzzles with several solutions.

Measured (bench/task_generation.py, 2000 puzzles, the 2-core machine shared with other jobs,
2026-11-22): 11 ms of CPU per puzzle (10 in bucket 0 to 14 in bucket 3), i.e. 5,400 puzzles a
minute on one idle core and 10,700 on two (2 worker processes; by CPU time, since the machine
was loaded: on the wall clock 4,500 with one process and 3,900 with two at load average ~3).
The stream is 41% / 32% / 24% / 3.5% buckets 0 / 1 / 2 / 3, so two idle cores yield about
4,400 / 3,400 / 2,600 / 390 puzzles a minute of each bucket. Default pools (DEFAULT_SIZES):
train 20000 / 20000 / 15000 / 2000, test 512 / 512 / 512 / 256 puzzles per bucket (fewer of the
rare bucket 3: its 256 test puzzles take a 7,000-puzzle stream); about 1.2 MB per 20000-puzzle
pool on disk. Building all of them (a 66,048-puzzle train stream, 7,680 test) took 10 min with
2 workers on 2 cores (2026-12-01, one training run beside it for most of that time); every
later run loads them from the cache. The train pools were 4000 / 4000 / 4000 / 500 before the
peer-attention recipe (relations="sudoku_peers", loss along 16 iterations): at 1500 steps, one
seed, the two sizes solved 70 / 52 / 55% and 77 / 53 / 53% of 64 test grids in buckets 0 / 1 / 2,
and the larger pools are there for the longer runs, which see each 4000-puzzle pool's puzzles
over 100 times.

User input (`parse`): 81 cells as digits 1-9 with 0 or . for blanks; whitespace and the grid
lines `| - +` that `decode` draws are skipped, so a printed grid can be pasted back. A wrong
count, another character or contradictory givens (a digit twice in a unit) raise TaskInputError
with one line. A consistent puzzle with no or several solutions is accepted: the model may try it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading

import numpy as np
import torch
from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from .base import IGNORE, Batch, Task, TaskInputError
from .cache import cached
from .sudoku_solver import BUCKETS, UNITS, analyse, bucket_of, canonical, make_puzzle  # noqa: F401 (analyse: re-exported)

# ------------------------------------------------------------------------------ pools

CHUNK = 512  # puzzles per cached piece of a stream
VERSION = 1  # part of every cache key: bump when generation or labelling changes
SPLIT_WORD = {"train": 1, "test": 2}  # second seed word of each split's stream
DEFAULT_SIZES = {"train": {0: 20000, 1: 20000, 2: 15000, 3: 2000}, "test": {0: 512, 1: 512, 2: 512, 3: 256}}
BUCKET_NAMES = {0: "0 guesses", 1: "1-2 guesses", 2: "3-9 guesses", 3: "10+ guesses"}


def _stream_item(args: tuple[int, int, int]) -> tuple[list[int], list[int], int]:
    seed, word, k = args
    return make_puzzle(np.random.default_rng([seed, word, k]))


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Builder:
    """Generates stream chunks on `workers` processes (started on first need), with a progress bar."""

    def __init__(self, workers: int, description: str, total: int):
        self.workers, self.description, self.total = workers, description, total
        self.pool = self.progress = None
        self.done = 0

    def advance(self, k: int) -> None:
        self.done = min(self.total, self.done + k)
        if self.progress is not None:
            self.progress.update(self.bar, completed=self.done)

    def chunk(self, seed: int, word: int, start: int, stop: int, bucket: int) -> dict[str, np.ndarray]:
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn())
            self.bar = self.progress.add_task(self.description, total=self.total, completed=self.done)
            try:
                self.progress.start()
            except LiveError:  # another live display on an older rich: go without the bar
                pass
        if self.pool is None and self.workers > 1:
            # fork where there is one: the workers run pure Python (no torch, which is unsafe to use
            # after a fork), and start in 0.1 s where spawn spends 3 s importing torch again
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ctx.Pool(self.workers, initializer=_worker_signals)
        jobs = [(seed, word, k) for k in range(start, stop)]
        items = self.pool.imap(_stream_item, jobs, chunksize=4) if self.pool else map(_stream_item, jobs)
        puzzles, solutions, guesses = [], [], []
        for puzzle, solution, g in items:
            puzzles.append(puzzle)
            solutions.append(solution)
            guesses.append(g)
            if bucket_of(g) == bucket:
                self.advance(1)
        return {"puzzles": np.array(puzzles, np.uint8), "solutions": np.array(solutions, np.uint8),
                "guesses": np.array(guesses, np.int32)}

    def close(self, finished: bool = True) -> None:
        """Stop the workers: let them finish (`finished`), else end them now (an error or a signal)."""
        if self.pool is not None:
            if finished:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
        if self.progress is not None:
            self.progress.stop()


def _worker_signals() -> None:
    # The parent decides what a Ctrl-C or SIGTERM means; a forked worker would otherwise inherit
    # its Python handlers (training's "stop after this step") and outlive it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _interruptible():
    """During a pool build, SIGINT and SIGTERM stop it at once (KeyboardInterrupt; the chunks
    already generated stay cached), whatever handler was installed: a build is not a training step
    that can be finished first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} while building a sudoku pool")

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def build_pool(seed: int, split: str, bucket: int, size: int, workers: int = 1,
               chunk_size: int = CHUNK) -> dict[str, np.ndarray]:
    """The first `size` puzzles of `bucket` in the (seed, split) stream, with their solutions and labels.

    Returns uint8 puzzles and solutions (size, 81), int32 guesses and givens, int64 index (position
    in the stream), each (size,). The stream is cached on disk in chunks of `chunk_size` puzzles
    (the granularity of caching; the pool does not depend on it).
    """
    word = SPLIT_WORD[split]
    builder = _Builder(workers, f"sudoku {split} pool, bucket {bucket} ({BUCKET_NAMES[bucket]})", size)
    parts, finished = [], False
    try:
        with _interruptible():
            finished = _fill(parts, builder, seed, split, word, bucket, size, chunk_size)
    finally:
        builder.close(finished)
    pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    pool["givens"] = (pool["puzzles"] > 0).sum(1).astype(np.int32)
    return pool


def _fill(parts: list, builder: _Builder, seed: int, split: str, word: int, bucket: int, size: int,
          chunk_size: int) -> bool:
    """Append the bucket's puzzles of successive stream chunks to `parts` until there are `size`."""
    have, c = 0, 0
    while have < size:
        start = c * chunk_size
        key = {"version": VERSION, "seed": seed, "split": split, "start": start, "stop": start + chunk_size}
        fresh = []  # set when the chunk is generated here rather than loaded from disk

        def generate_chunk():
            fresh.append(True)
            return builder.chunk(seed, word, start, start + chunk_size, bucket)

        chunk = cached("sudoku-stream", key, generate_chunk)
        rows = np.flatnonzero(bucket_of(chunk["guesses"]) == bucket)[: size - have]
        if not fresh:  # a generated chunk advanced the bar puzzle by puzzle
            builder.advance(len(rows))
        parts.append({k: v[rows] for k, v in chunk.items()} | {"index": (start + rows).astype(np.int64)})
        have += len(rows)
        c += 1
    return True


# ------------------------------------------------------------------------------ the task

class Sudoku(Task):
    """9x9 sudoku from cached pools; difficulty = guess bucket 0-3 (see the module docstring)."""

    name = "sudoku"
    vocab_size = 10  # 0 blank, 1-9 givens
    n_classes = 9  # digit - 1 of each blank cell
    # Trained on the puzzles that singles solve and those needing 1-2 guesses, which together
    # are three quarters of the stream; tested on all four buckets (harder: more guesses).
    train_difficulties = (0, 1)
    test_difficulties = (0, 1, 2, 3)
    # A cell attends to itself and its 20 peers (same row, column or box; ModelConfig.relations),
    # with a learned bias per head and relation and no absolute positions: the rules, not our
    # generator's layout. With this and the loop below, 1500 steps fill 70-89% of bucket-0 grids
    # (docs/TRAINING.md); the old recipe (global attention, 81 learned positions, loss on the last
    # of 8 iterations) filled 44% of blank cells and no whole grid. The training steps' matmuls run
    # in bf16 where the CPU or GPU has native bf16 (autocast auto, as chess): 0.65x a float32 step on
    # an AVX512-BF16 CPU, the same whole grids (docs/TRAINING.md); float32 elsewhere.
    model_defaults = {"window": None, "causal": False, "n_positions": 0, "relations": "sudoku_peers",
                      "autocast": "auto"}
    # Unrolled through 16 iterations of plain iteration with the loss on every iterate (loss
    # along the loop, Yang et al. 2023 / Palm et al. 2018): the last-iterate loss alone left the
    # old 8-iteration recipe at 44% of cells and no whole grid.
    solve_defaults = {"backward": "unroll", "max_iter": 16, "loss_every": 1, "solver": "fixed_point_iter"}
    # 1500 steps at lr 2e-3 (1e-3 reached 77% / 53% whole grids on buckets 0 / 1, 2e-3 89% / 73%):
    # 12-14 min on one thread of an AVX512-BF16 CPU beside another run (19-21 min in float32).
    train_defaults = {"steps": 1500, "lr": 2e-3, "eval_every": 500, "eval_size": 64}
    # The shipped model (deqloop/models/sudoku/): 4x the steps, also trained on bucket 2, in float32
    # as it was trained (--autocast auto with it: the default's bf16 steps).
    presets = {"long": {"model": {"autocast": None},
                        "train": {"steps": 6000, "warmup_steps": 200, "train_difficulties": (0, 1, 2),
                                  "eval_every": 1000, "eval_size": 128, "ckpt_every": 250}}}

    # The loop has several attractors and plain iteration's is the answer; a quasi-Newton step can
    # leave its basin. So on this task Broyden takes 16 plain steps, then accelerates a puzzle only
    # once plain iteration contracts it (gate: the residual shrinking at <= 0.85 a step over 4).
    # On the shipped model, 512 puzzles a bucket, budget 300: bucket-2 grids 68.2% -> 75.2% (plain
    # 75.6%) in 0.91x plain's evaluations, bucket 0 97.9% (plain 98.2%) in 0.63x. Anderson's
    # guarded default is already at least plain's accuracy here (76.8%), so it keeps it
    # (docs/TRAINING.md, "Solvers on the trained loops").
    solver_options = {"broyden": {"gate": 0.85, "warmup": 16}}

    def __init__(self, seed: int = 0, train_sizes: dict[int, int] | None = None,
                 test_sizes: dict[int, int] | None = None, augment: bool = True, workers: int | None = None,
                 chunk_size: int = CHUNK):
        """Pool sizes per bucket (merged over DEFAULT_SIZES); workers: generation processes (default:
        all CPUs); chunk_size: puzzles per cached piece of the stream (see build_pool)."""
        self.seed, self.augment = int(seed), bool(augment)
        self.sizes = {}
        for split, given in (("train", train_sizes), ("test", test_sizes)):
            sizes = {**DEFAULT_SIZES[split], **(given or {})}
            if set(sizes) != set(range(len(BUCKETS))) or any(int(n) < 1 for n in sizes.values()):
                raise ValueError(f"{split}_sizes maps buckets 0-3 to positive pool sizes, got {given}")
            self.sizes[split] = {b: int(n) for b, n in sizes.items()}
        self.workers = _default_workers() if workers is None else int(workers)
        self.chunk_size = int(chunk_size)
        if self.workers < 1 or self.chunk_size < 1:
            raise ValueError(f"workers and chunk_size must be >= 1, got {workers} and {chunk_size}")
        self._pools: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def eval_max_iter(self, difficulty: int) -> int:
        # 8x the 16 training iterations: with the default recipe whole grids rose from 47% at 32
        # iterations to 73% at 64 and 76% at 128 on bucket 0 (90% of puzzles converged by then);
        # harder buckets keep improving longer, so they get more room.
        return 128 + 32 * difficulty

    def pool(self, split: str, bucket: int) -> dict[str, np.ndarray]:
        """The (split, bucket) pool (see build_pool), built or loaded on first use."""
        if split not in SPLIT_WORD:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if bucket not in self.sizes[split]:
            raise TaskInputError(f"sudoku difficulty is a bucket id 0-3 (0, 1-2, 3-9, 10+ guesses); got {bucket}")
        if (split, bucket) not in self._pools:
            size = self.sizes[split][bucket]
            key = {"version": VERSION, "seed": self.seed, "split": split, "bucket": bucket, "size": size}
            pool = cached("sudoku-pool", key,
                          lambda: build_pool(self.seed, split, bucket, size, self.workers, self.chunk_size))
            other = self._pools.get(("test" if split == "train" else "train", bucket))
            if other is not None:
                _check_disjoint(pool, other, bucket)
            self._pools[(split, bucket)] = pool
        return self._pools[(split, bucket)]

    def generate(self, n: int, difficulty: int, rng: np.random.Generator, split: str = "train") -> Batch:
        pool = self.pool(split, difficulty)
        size = len(pool["puzzles"])
        if split == "test":
            if n > size:
                raise TaskInputError(f"the sudoku test pool of bucket {difficulty} holds {size} puzzles, {n} were asked "
                                 f"for; build Sudoku(test_sizes={{{difficulty}: {n}}})")
            rows = np.arange(n)
        else:
            rows = rng.integers(0, size, n)
        puzzles = pool["puzzles"][rows].astype(np.int64)  # (n, 81)
        solutions = pool["solutions"][rows].astype(np.int64)
        if split == "train" and self.augment:  # a random digit relabelling per puzzle keeps its label
            perms = rng.permuted(np.tile(np.arange(1, 10), (n, 1)), axis=1)  # (n, 9): new digit of 1..9
            lut = np.concatenate([np.zeros((n, 1), np.int64), perms], 1)  # blanks stay 0
            puzzles, solutions = np.take_along_axis(lut, puzzles, 1), np.take_along_axis(lut, solutions, 1)
        targets = np.where(puzzles == 0, solutions - 1, IGNORE)
        return Batch(torch.from_numpy(puzzles), torch.from_numpy(targets),
                     torch.full((n,), difficulty, dtype=torch.long))

    def predict(self, logits: Tensor, inputs: Tensor) -> Tensor:
        """Argmax on blank cells; givens are copied from the input (as class digit - 1)."""
        return torch.where(inputs > 0, inputs - 1, logits.argmax(-1))

    def metrics(self, pred: Tensor, batch: Batch, logits: Tensor | None = None) -> dict[str, Tensor]:
        """cell_acc: fraction of blank cells right; valid: the grid obeys the rules and keeps the givens."""
        blanks = batch.inputs == 0
        right = ((pred == batch.targets) & blanks).sum(1)
        cell_acc = right / blanks.sum(1).clamp_min(1)  # a full grid has nothing to get wrong
        return {"cell_acc": cell_acc.float(), "valid": valid_grids(pred + 1, batch.inputs).float()}

    def breakdown(self, batch: Batch) -> tuple[str, Tensor]:
        return "givens", (batch.inputs > 0).sum(1)

    def difficulty_label(self, difficulty: int) -> str:
        return BUCKET_NAMES.get(difficulty, str(difficulty))

    def verdict(self, inputs: Tensor, pred: Tensor) -> str:
        digits = torch.where(inputs > 0, inputs, pred + 1)[None]  # givens copied, as predict does
        broken = int(broken_units(digits).sum())
        if not broken:
            return "valid: every row, column and box holds 1-9 once, and the givens are kept"
        return f"NOT valid: {broken} of the 27 rows, columns and boxes miss a digit or repeat one"

    def decode(self, inputs: Tensor, pred: Tensor) -> str:
        digits = torch.where(inputs > 0, inputs, pred + 1).tolist()
        lines = []
        for r in range(9):
            if r in (3, 6):
                lines.append("------+-------+------")
            row = [str(d) for d in digits[9 * r: 9 * r + 9]]
            lines.append(" | ".join(" ".join(row[c: c + 3]) for c in (0, 3, 6)))
        return "\n".join(lines)

    def parse(self, text: str) -> Tensor:
        cells = [ch for ch in text if not ch.isspace() and ch not in "|-+"]
        bad = sorted(set(cells) - set("0123456789."))
        if bad:
            raise TaskInputError("sudoku input may hold only digits 1-9 and 0 or . for blanks; "
                                 f"found {''.join(bad)!r}")
        if len(cells) != 81:
            raise TaskInputError(f"sudoku input needs 81 cells (digits 1-9, 0 or . for blanks), got {len(cells)}")
        puzzle = [0 if ch == "." else int(ch) for ch in cells]
        kinds = ("row", "column", "box")
        for u, unit in enumerate(UNITS):
            digits = [puzzle[i] for i in unit if puzzle[i]]
            twice = sorted({d for d in digits if digits.count(d) > 1})
            if twice:
                raise TaskInputError(f"sudoku input is contradictory: digit {twice[0]} appears twice in "
                                     f"{kinds[u // 9]} {u % 9 + 1}")
        return torch.tensor([puzzle], dtype=torch.long)


def broken_units(digits: Tensor) -> Tensor:
    """(N, 27) bool: the units (rows, columns, boxes) of grids digits (N, 81) that do not hold 1-9 once each."""
    in_range = ((digits >= 1) & (digits <= 9))[..., None]
    onehot = torch.nn.functional.one_hot((digits - 1).clamp(0, 8), 9) * in_range  # (N, 81, 9)
    per_unit = onehot[:, torch.tensor(UNITS, device=digits.device)].sum(2)  # (N, 27, 9): each digit's count
    return (per_unit != 1).any(2)


def valid_grids(digits: Tensor, givens: Tensor) -> Tensor:
    """(N,) bool: grids digits (N, 81) in 1-9 hold every digit once per unit and agree with givens (0: blank)."""
    return ~broken_units(digits).any(1) & ((givens == 0) | (digits == givens)).all(1)


def _check_disjoint(a: dict, b: dict, bucket: int) -> None:
    """Raise if a puzzle of one pool equals one of the other up to digit relabelling."""
    seen = {row.tobytes() for row in canonical(a["puzzles"])}
    shared = sum(row.tobytes() in seen for row in canonical(b["puzzles"]))
    if shared:
        raise RuntimeError(f"sudoku train and test pools of bucket {bucket} share {shared} puzzles "
                           "(up to digit relabelling); use another seed")
