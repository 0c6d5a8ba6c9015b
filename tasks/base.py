"""The interface every task follows: seeded generation with a difficulty per example."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # target value of positions that are not scored (cross_entropy's ignore_index)


class TaskInputError(ValueError):
    """A user's input or request the task cannot serve (a malformed puzzle, a difficulty it has no
    data for, a missing dataset file); the message is one line and the CLI prints it as an error."""


@dataclass(frozen=True)
class Batch:
    """inputs (N, T) token ids; targets (N, T) class ids or IGNORE; difficulty (N,)."""

    inputs: Tensor
    targets: Tensor
    difficulty: Tensor

    def to(self, device) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.difficulty.to(device))

    def __len__(self) -> int:
        return self.inputs.shape[0]


class Task(ABC):
    """Subclasses set the class attributes and implement `generate`, `decode`, `parse`."""

    name: str
    vocab_size: int  # input tokens are in [0, vocab_size)
    n_classes: int  # output classes per position
    train_difficulties: tuple[int, ...]  # default easy split
    test_difficulties: tuple[int, ...]  # default harder split (includes the training difficulty)
    model_defaults: dict = {}  # ModelConfig fields this task needs (window, causal, n_positions)
    solve_defaults: dict = {}  # SolveConfig fields of the task's training recipe (backward, max_iter)
    train_defaults: dict = {}  # TrainConfig fields of the task's training recipe (steps, lr)
    # Named recipes over the defaults: {name: {"model": {..}, "solve": {..}, "train": {..}}}
    # (`cli.py train --preset NAME`; explicit flags still win).
    presets: dict = {}
    # Per forward solver, the options it takes on this task's trained loops unless told otherwise
    # ({"broyden": {"gate": 0.85}}), chosen by bench/solvers_on_checkpoints.py: filled in when a
    # run is trained with that solver or a checkpoint is evaluated with it (checkpoint.with_solver);
    # explicit --solver-option values go over them. The solvers' own defaults stay the library's.
    solver_options: dict = {}

    @classmethod
    def recipe(cls, preset: str | None = None) -> dict[str, dict]:
        """{"model", "solve", "train"}: the fields of the task's defaults with `preset` over them."""
        if preset is not None and preset not in cls.presets:
            names = ", ".join(cls.presets) or "none"
            raise TaskInputError(f"{cls.name} has no preset {preset!r} (presets: {names})")
        over = cls.presets.get(preset, {}) if preset is not None else {}
        return {kind: {**base, **over.get(kind, {})} for kind, base in
                (("model", cls.model_defaults), ("solve", cls.solve_defaults), ("train", cls.train_defaults))}

    def eval_max_iter(self, difficulty: int) -> int:
        """Iteration budget the loop needs at `difficulty`; harder examples need more."""
        return 50

    def solve_max_iter(self, tokens: Tensor) -> int:
        """Iteration budget for a user's input (`cli.py solve`), whose difficulty is unknown: the
        budget of the hardest test difficulty. Tasks that can tell the difficulty from the tokens
        (prefix sums: the length) override it."""
        return max(self.eval_max_iter(d) for d in self.test_difficulties)

    @abstractmethod
    def generate(self, n: int, difficulty: int, rng: np.random.Generator, split: str = "train") -> Batch:
        """n examples of one difficulty from `split` ("train" or "test").

        Tasks that draw from a finite generated pool (sudoku, chess) keep the two splits disjoint;
        tasks that generate fresh examples on the fly (prefix sums) may ignore `split`.
        """

    def sample(self, n: int, difficulties, rng: np.random.Generator, split: str = "train") -> Batch:
        """n examples, each at a difficulty drawn uniformly from `difficulties`; padded by IGNORE."""
        counts = np.bincount(rng.integers(0, len(difficulties), n), minlength=len(difficulties))
        parts = [self.generate(int(c), d, rng, split) for c, d in zip(counts, difficulties) if c]
        return concat(parts)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Training loss of logits (N, T, C) against targets (N, T): mean cross-entropy per scored position."""
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def predict(self, logits: Tensor, inputs: Tensor) -> Tensor:
        """Class ids from logits (N, T, C) -> (N, T)."""
        return logits.argmax(-1)

    def metrics(self, pred: Tensor, batch: Batch, logits: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example metrics beside exact match, each (N,) float; evaluation reports their means.
        `logits` (N, T, C), when given, allows metrics of another reading of the output."""
        return {}

    def exact_match(self, pred: Tensor, batch: Batch) -> Tensor:
        """(N,) bool: every scored position right."""
        scored = batch.targets != IGNORE
        return ((pred == batch.targets) | ~scored).all(dim=1)

    def breakdown(self, batch: Batch) -> tuple[str, Tensor] | None:
        """A second label to report accuracy by, beside the difficulty: (name, (N,) int values)
        (sudoku: the number of givens); None where the task has none."""
        return None

    def difficulty_label(self, difficulty: int) -> str:
        """How plots and tables name a difficulty (prefix sums: "32 bits")."""
        return str(difficulty)

    def verdict(self, inputs: Tensor, pred: Tensor) -> str | None:
        """A one-line check of one predicted answer that needs no label (sudoku: are the rules kept?),
        printed by `cli.py solve`; None where the task has none."""
        return None

    @abstractmethod
    def decode(self, inputs: Tensor, pred: Tensor) -> str:
        """A readable answer from one example's inputs (T,) and predicted classes (T,)."""

    @abstractmethod
    def parse(self, text: str) -> Tensor:
        """A user's input as tokens (1, T); raises TaskInputError with a one-line message."""


def concat(parts: list[Batch]) -> Batch:
    """Stack batches of different lengths, padding inputs with 0 and targets with IGNORE."""
    t = max(p.inputs.shape[1] for p in parts)
    pad = lambda a, v: torch.nn.functional.pad(a, (0, t - a.shape[1]), value=v)
    return Batch(torch.cat([pad(p.inputs, 0) for p in parts]),
                 torch.cat([pad(p.targets, IGNORE) for p in parts]),
                 torch.cat([p.difficulty for p in parts]))
