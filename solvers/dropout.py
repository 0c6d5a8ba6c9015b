"""Variational dropout for fixed-point maps: one mask per solve, the same at every iteration.

    drop = VariationalDropout(0.1, share=(1,))   # (B, T, d): one mask per sample and feature
    reset_dropout(cell, generator=g)             # before each solve: the next call draws a new mask
    y = drop(h)                                  # every iteration of this solve: the same mask
    y = drop(h, rows=idx)                        # a solver's active sub-batch: those samples' masks

Ordinary dropout draws a new mask at every call, so f changes between iterations and has no
fixed point; a mask held fixed for the whole solve keeps f one function (Gal & Ghahramani 2016;
the DEQ use as in torchdeq's `torchdeq.dropout`: `share=()` is its VariationalDropout, `share=(1,)`
its VariationalDropout1d with tokens first). Masks come from the generator given to
`reset_dropout`, never from the global RNG; without a reset in training mode the layer refuses to
run, so a forgotten reset is an error, not a silently reused mask. Identity in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VariationalDropout(nn.Module):
    def __init__(self, p: float, *, share: tuple[int, ...] = (1,)):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        if any(d < 1 for d in share):
            raise ValueError(f"share names dimensions after the batch (>= 1), got {share!r}")
        self.p, self.share = float(p), tuple(share)
        self.mask: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._armed = False

    def reset(self, generator: torch.Generator | None) -> None:
        """Forget the mask; the next call in training mode draws one from `generator`."""
        self.mask, self._generator, self._armed = None, generator, True

    def forward(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mask is None:
            if not self._armed:
                raise RuntimeError("VariationalDropout: call reset_dropout(module, generator) before each solve")
            if rows is not None:
                raise RuntimeError("VariationalDropout: the first call of a solve must see the whole batch")
            shape = [1 if d in self.share else n for d, n in enumerate(x.shape)]
            keep = torch.empty(shape, dtype=x.dtype, device="cpu").bernoulli_(1 - self.p, generator=self._generator)
            self.mask = (keep / (1 - self.p)).to(x.device)
        mask = self.mask if rows is None else self.mask[rows]
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, share={self.share}"


def reset_dropout(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Reset every VariationalDropout in `module`: new masks from `generator` at the next call."""
    for layer in module.modules():
        if isinstance(layer, VariationalDropout):
            layer.reset(generator)
