"""Prefix sums: a bit string in, its running parity cumsum(bits) % 2 out. Difficulty = length."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Batch, Task, TaskInputError


class PrefixSums(Task):
    name = "prefix_sums"
    vocab_size = 2
    n_classes = 2
    train_difficulties = (32,)
    test_difficulties = (32, 64, 128, 256, 512)
    # Causal local attention: position t sees t-3..t, so the cell is length-independent and the
    # answer at t needs about t/3 iterations to arrive, more for longer strings.
    model_defaults = {"window": 4, "causal": True, "n_positions": 0}

    def generate(self, n: int, difficulty: int, rng: np.random.Generator) -> Batch:
        bits = rng.integers(0, 2, size=(n, difficulty))
        inputs = torch.from_numpy(bits).long()
        targets = torch.from_numpy(np.cumsum(bits, axis=1) % 2).long()
        return Batch(inputs, targets, torch.full((n,), difficulty, dtype=torch.long))

    def decode(self, inputs: Tensor, pred: Tensor) -> str:
        return "".join(str(int(b)) for b in pred)

    def parse(self, text: str) -> Tensor:
        s = text.strip()
        if not s:
            raise TaskInputError("prefix_sums input is empty; give a string of 0s and 1s, e.g. 0110")
        bad = sorted(set(s) - {"0", "1"})
        if bad:
            raise TaskInputError(f"prefix_sums input must contain only 0 and 1; found {''.join(bad)!r}")
        return torch.tensor([[int(c) for c in s]], dtype=torch.long)
