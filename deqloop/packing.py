"""Packing a padded training batch of a causal, local loop into fewer rows.

A batch of strings of mixed lengths is padded to its longest: prefix sums trains on 8, 16, 24 and
32 bits, so 37% of a (64, 32) batch is padding that every iteration of the loop pays for. In a
causal loop with local attention and no absolute positions, a position depends only on itself and
the positions before it in its own string, so a string's scored positions come out the same
wherever in a row the string sits, provided attention does not reach across the start of a string.
`pack` lays the strings end to end into rows of the batch's width (first fit, longest first), and
the attention (`Attention._local` with `Attention.window_mask(segments)`) shows each string's first positions the learned
boundary state where their window reaches before the string, as the padded layout does. The
logits are then put back in the padded layout (`Packing.unpack`), so the loss, the batch accuracy
and everything else a training step reads are the same numbers to float rounding (a test checks
loss and gradients against the padded batch). Only the solver's per-row statistics (residual,
converged) are then per packed row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tasks.base import IGNORE


@dataclass
class Packing:
    tokens: Tensor  # (R, T) the strings end to end, R <= N rows; token 0 after the last string of a row
    segments: Tensor  # (R, T) int64: which string a position belongs to (its row in the padded batch); -1 after the last
    index: Tensor  # (N, T) int64: where position t of string n went in the flattened (R * T) rows (0 past its end)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def unpack(self, a: Tensor) -> Tensor:
        """(..., R, T, C) per packed position -> (..., N, T, C) in the padded layout. Positions past
        a string's end read packed position 0: their targets are IGNORE, nothing scores them."""
        lead, (r, t) = a.shape[:-3], a.shape[-3:-1]
        flat = a.reshape(*lead, r * t, a.shape[-1])
        return flat[..., self.index.reshape(-1), :].reshape(*lead, *self.index.shape, a.shape[-1])


def scored_lengths(targets: Tensor) -> np.ndarray:
    """(N,) one past each row's last scored (non-IGNORE) position: what a causal loop must see."""
    scored = (targets != IGNORE).cpu().numpy()
    t = scored.shape[1]
    last = t - np.argmax(scored[:, ::-1], axis=1)  # one past the last True
    return np.where(scored.any(axis=1), last, 0)


def pack(tokens: Tensor, targets: Tensor) -> Packing | None:
    """The strings of a padded batch (N, T) packed into rows of width T, or None where packing saves
    no row (every string full length). A string's length is one past its last scored position; the
    positions after it are never scored, and in a causal loop never seen by one that is."""
    n, t = tokens.shape
    lengths = scored_lengths(targets)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in batch order: deterministic
    room: list[int] = []  # free positions left in each packed row
    place = np.zeros((n, 2), dtype=np.int64)  # (row, start) of each string
    for i in order:
        length = int(lengths[i])
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            row = len(room)
            room.append(t)
        place[i] = row, t - room[row]
        room[row] -= length
    if len(room) >= n:
        return None
    r = len(room)
    tokens_cpu = tokens.cpu()
    packed = torch.zeros(r, t, dtype=tokens.dtype)
    segments = torch.full((r, t), -1, dtype=torch.long)
    index = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        row, start = (int(v) for v in place[i])
        length = int(lengths[i])
        packed[row, start: start + length] = tokens_cpu[i, :length]
        segments[row, start: start + length] = i
        index[i, :length] = torch.arange(row * t + start, row * t + start + length)
    device = tokens.device
    return Packing(packed.to(device), segments.to(device), index.to(device))
