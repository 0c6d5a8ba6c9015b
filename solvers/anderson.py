"""Anderson acceleration (type II), per sample, with a ridge relative to the history's scale.

Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ._loop import (LoopOptions, State, after_plain_steps, check_gate, check_safeguard, contraction_gate, iterate,
                    safeguard_rejects, where_rows)
from .result import SolverResult

if TYPE_CHECKING:
    from typing_extensions import Unpack


def anderson(f: Callable[..., Tensor], z0: Tensor, *, m: int = 5, beta: float = 1.0, reg: float = 1e-8,
             block_size: int | None = None, safeguard: float | None = 1.0, max_restarts: int | None = 0,
             warmup: int = 0, gate: float | None = None, **options: Unpack[LoopOptions]) -> SolverResult:
    """Solve z = f(z) by Anderson mixing of the last `m` iterates, per sample.

    With g_k = f(z_k) - z_k and the differences dZ, dG of the last m iterates and residuals,
    gamma = argmin ||g_k - dG gamma||^2 + lam ||gamma||^2 and
    z_{k+1} = z_k + beta g_k - (dZ + beta dG) gamma.
    The ridge is relative, lam = reg * trace(dG^T dG), so it does not stall the tail when
    residuals get small; a least-squares system that is still singular falls back to the
    plain step for that sample instead of raising.

    block_size: mix each block of that many consecutive elements of a sample with its own
        coefficients (None: one set per sample). For a (B, T, d) sequence state, block_size=d
        gives every position its own gamma, which suits local or causal cells, where positions
        converge at different times and one set of coefficients for all of them fights that.
    safeguard: reject a mixed step whose residual norm exceeds `safeguard` times the residual
        at the iterate it started from: that sample forgets its history and takes the plain step
        z + beta g from there (None: never reject). Costs the evaluation of the rejected point.
    max_restarts: with `safeguard`, a sample rejected more than this many times stops mixing
        and finishes by plain steps (None: restart without limit; 0: the first rejection).
    warmup: take this many plain steps z <- f(z) first, then mix. On a trained loop with several
        attractors (the shipped sudoku model) plain iteration picks the right one more often;
        accelerating from there keeps it (docs/TRAINING.md, "Solvers on the trained loops").
    gate: a sample takes plain steps until plain iteration contracts it, its residual norm
        shrinking at a rate of at most `gate` per step over the last 4 (None, the default: mix
        from the start); the history fills from those steps all the same. See broyden.

    The defaults (safeguard 1, max_restarts 0) make Anderson fall back to plain iteration on a
    sample as soon as mixing makes its residual grow. Measured on the shipped prefix-sums loop
    (causal, window 4; bench/solvers_on_checkpoints.py, 64 strings of 512 bits, budget 600,
    docs/TRAINING.md): plain iteration 100% right in 339 evaluations, unguarded Anderson 31%
    after all 600, guarded 100% in 340. On the toy maps of bench/solvers.py the evaluation counts
    are unchanged. Pass safeguard=None for plain Anderson mixing.
    `options`: tol, max_iter, stop_mode, subbatch, divergence_ratio, snapshots (solvers.LoopOptions).
    """
    _check_options(m, beta, reg, safeguard, max_restarts, block_size)
    check_gate(gate)
    if block_size is not None and isinstance(z0, Tensor) and z0.dim() >= 1 and math.prod(z0.shape[1:]) % block_size:
        raise ValueError(f"block_size={block_size} does not divide the {math.prod(z0.shape[1:])} elements of a sample")

    def step(z: Tensor, fz: Tensor, g: Tensor, state: State) -> Tensor:
        rows = state.rows
        if gate is not None:
            opened = contraction_gate(rows, state.g_norm, gate)
        n, d = z.shape
        bs = d if block_size is None else block_size
        nb = d // bs  # blocks per sample, each mixed with its own coefficients
        if state.k == 0:  # no history yet: the plain step
            rows.update(
                dg=z.new_zeros(n, nb, m, bs),  # ring buffer of g_{i+1} - g_i, per block
                # ring buffer of (z_{i+1} - z_i) + beta (g_{i+1} - g_i): the step reads one history, not two
                dw=z.new_zeros(n, nb, m, bs),
                gram=torch.zeros(n, nb, m, m, dtype=torch.float64, device=z.device),  # dG dG^T per block
                mixed=torch.zeros(n, dtype=torch.bool, device=z.device),  # z came from a mixed step
                restarts=torch.zeros(n, dtype=torch.long, device=z.device),  # rejections so far
                z=z, g=g)
            return z + beta * g
        dg, dw, gram, mixed = rows["dg"], rows["dw"], rows["gram"], rows["mixed"]
        z_prev, g_prev = rows["z"], rows["g"]
        slot = (state.k - 1) % m
        retired = None  # rows rejected more than max_restarts times: plain steps from here on
        if safeguard is not None:
            bad = safeguard_rejects(rows, state.g_norm, safeguard)
            if max_restarts is None:
                any_bad, all_retired, any_retired = bool(bad.any()), False, False
            else:
                retired = rows["restarts"] > max_restarts
                flags = torch.stack((bad.any(), retired.all(), retired.any()))
                any_bad, all_retired, any_retired = flags.tolist()  # one host sync
            if any_bad:  # back to the previous z (bad rows were mixed); a restart forgets the history
                z = where_rows(bad, z_prev, z)
                g = where_rows(bad, g_prev, g)
                dg[bad], dw[bad], gram[bad] = 0, 0, 0
            if all_retired:  # nothing left to mix: the plain step, without the history's work
                rows.update(z=z, g=g, mixed=torch.zeros_like(mixed))
                return z + beta * g
        dg_new = dg[:, :, slot]
        torch.sub(g.view(n, nb, bs), g_prev.view(n, nb, bs), out=dg_new)
        torch.sub(z.view(n, nb, bs), z_prev.view(n, nb, bs), out=dw[:, :, slot]).add_(dg_new, alpha=beta)
        dgf, dwf = dg.view(n * nb, m, bs), dw.view(n * nb, m, bs)  # blocks as rows of one batched solve
        gb = g.view(n * nb, bs)
        # one pass over dG for both its new Gram row dg_new^T dG^T and the right-hand side g^T dG^T,
        # as (2, bs) x (bs, m) products: 3x faster on CPU than (m, bs) x (bs, 1) matrix-vector ones
        both = torch.bmm(torch.stack((dgf[:, slot], gb), dim=1), dgf.transpose(1, 2)).double()  # (n nb, 2, m)
        row = both[:, 0].view(n, nb, m)
        gram[:, :, slot, :] = row
        gram[:, :, :, slot] = row
        gamma = _mixing_coefficients(gram.view(n * nb, m, m), both[:, 1, :, None], reg)
        gamma = gamma.to(z.dtype)
        was_mixed = (gamma.view(n, nb * m) != 0).any(dim=1)
        # z + beta g - (dZ + beta dG) gamma: the plain step less one thin product over the combined history
        plain = torch.add(z, g, alpha=beta)
        z_next = torch.baddbmm(plain.view(n * nb, 1, bs), gamma.transpose(1, 2), dwf, alpha=-1).view(n, d)
        if retired is not None and any_retired:  # their history is stale, not cleared: masked, not zeroed each step
            z_next = where_rows(retired, plain, z_next, out=z_next)
            was_mixed &= ~retired
        if gate is not None:  # rows still behind the gate step plainly; their history keeps filling
            z_next = where_rows(~opened, plain, z_next, out=z_next)
            was_mixed &= opened
        rows.update(z=z, g=g, mixed=was_mixed)
        return z_next

    return iterate(f, z0, after_plain_steps(step, warmup), solver="anderson", **options)


def _mixing_coefficients(gram: Tensor, rhs: Tensor, reg: float) -> Tensor:
    """gamma = (G + lam I)^-1 rhs per row, lam = reg * trace(G); zero where the system is singular."""
    lam = reg * gram.diagonal(dim1=1, dim2=2).sum(1) + torch.finfo(torch.float64).tiny
    ridged = gram.clone()
    ridged.diagonal(dim1=1, dim2=2).add_(lam[:, None])
    chol, info = torch.linalg.cholesky_ex(ridged)
    gamma = torch.cholesky_solve(rhs, chol)  # (rows, m, 1)
    ok = (info == 0) & torch.isfinite(gamma).all(dim=(1, 2))
    return torch.where(ok[:, None, None], gamma, torch.zeros_like(gamma))


def _check_options(m, beta, reg, safeguard, max_restarts, block_size) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg!r}")
    check_safeguard(safeguard, max_restarts)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be an integer >= 1 or None, got {block_size!r}")
