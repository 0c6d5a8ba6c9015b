"""Prefix sums: a bit string in, its running parity cumsum(bits) % 2 out. Difficulty = length."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Batch, Task, TaskInputError


# The longest string: 8x the longest test length, 128x the training length. Time and memory of
# a solve grow with the length times its budget (also the length): 99999 bits ran past 300 s at
# 4.2 GB in diagnose.
MAX_LENGTH = 4096


class PrefixSums(Task):
    name = "prefix_sums"
    vocab_size = 2
    n_classes = 2
    # A mix up to 32 bits: trained on 32-bit strings alone the loop had learned no whole string
    # after 1000 steps; with shorter ones beside them it learns (docs/TRAINING.md).
    train_difficulties = (8, 16, 24, 32)
    test_difficulties = (32, 64, 128, 256, 512)
    # Causal local attention: position t sees t-3..t, so the cell is length-independent and the
    # answer at t needs about t/3 iterations to arrive, more for longer strings.
    model_defaults = {"window": 4, "causal": True, "n_positions": 0}
    # Trained by backpropagating through 20 unrolled iterations, enough for information to cross
    # 32 bits three positions at a time; IFT training was unstable here (docs/TRAINING.md).
    # Solved by plain iteration: information arrives causally, a few positions per step, and
    # Anderson's mixing (one set of coefficients for all positions) leaves the trained loop's
    # basin; on the same model it converged on about half the samples where plain iteration
    # converged on all (docs/TRAINING.md).
    solve_defaults = {"backward": "unroll", "max_iter": 20, "solver": "fixed_point_iter"}

    def eval_max_iter(self, difficulty: int) -> int:
        # Information moves at most window - 1 = 3 positions per iteration; leave room to settle.
        return max(50, difficulty)

    def solve_max_iter(self, tokens: Tensor) -> int:
        return self.eval_max_iter(tokens.shape[1])

    def generate(self, n: int, difficulty: int, rng: np.random.Generator, split: str = "train") -> Batch:
        if not 1 <= difficulty <= MAX_LENGTH:
            raise TaskInputError(f"prefix_sums difficulty is a string length in 1..{MAX_LENGTH}; got {difficulty}")
        bits = rng.integers(0, 2, size=(n, difficulty))
        inputs = torch.from_numpy(bits).long()
        targets = torch.from_numpy(np.cumsum(bits, axis=1) % 2).long()
        return Batch(inputs, targets, torch.full((n,), difficulty, dtype=torch.long))

    def difficulty_label(self, difficulty: int) -> str:
        return f"{difficulty} bits"

    def decode(self, inputs: Tensor, pred: Tensor) -> str:
        return "".join(str(int(b)) for b in pred)

    def parse(self, text: str) -> Tensor:
        s = text.strip()
        if not s:
            raise TaskInputError("prefix_sums input is empty; give a string of 0s and 1s, e.g. 0110")
        bad = sorted(set(s) - {"0", "1"})
        if bad:
            raise TaskInputError(f"prefix_sums input must contain only 0 and 1; found {''.join(bad)!r}")
        if len(s) > MAX_LENGTH:
            raise TaskInputError(f"prefix_sums input has {len(s)} bits; at most {MAX_LENGTH}")
        return torch.tensor([[int(c) for c in s]], dtype=torch.long)
