"""Limited-memory Broyden's method ("good" Broyden, inverse form) for f(z) - z = 0.

Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 1965.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ._loop import (LoopOptions, State, after_plain_steps, check_gate, check_safeguard, contraction_gate, iterate,
                    safeguard_rejects, where_rows)
from .result import SolverResult

if TYPE_CHECKING:
    from typing_extensions import Unpack


def broyden(f: Callable[..., Tensor], z0: Tensor, *, m: int = 20, warmup: int = 0,
            safeguard: float | None = None, max_restarts: int | None = 0, gate: float | None = None,
            **options: Unpack[LoopOptions]) -> SolverResult:
    """Solve g(z) = f(z) - z = 0 with quasi-Newton steps z <- z - H g, per sample.

    H approximates the inverse Jacobian of g as -I + U V^T with at most `m` rank-one terms;
    when they are used up H restarts from -I (each term was built on the ones before it, so
    dropping only the oldest would leave an inconsistent H). Memory is O(m B D), whatever
    max_iter.
    Update after a step s with residual change y: H += (s - H y) (s^T H) / (s^T H y); a
    sample whose denominator is negligible skips its update.
    warmup: take this many plain steps z <- f(z) first (see anderson).
    safeguard: reject a quasi-Newton step whose residual norm exceeds `safeguard` times the
        residual at the iterate it started from: that sample goes back to that iterate, H
        restarts from -I, and the next step is the plain one (None, the default: never reject).
        As in anderson, at the cost of evaluating the rejected point.
    max_restarts: with `safeguard`, a sample rejected more than this many times finishes by
        plain steps (None: restart without limit; 0: the first rejection).
    gate: a sample takes plain steps until plain iteration contracts it, its residual norm
        shrinking at a rate of at most `gate` per step over the last 4 (None, the default:
        quasi-Newton steps from the start). H is built from those plain steps all the same, so
        the first quasi-Newton step already uses what they measured. Made for trained loops,
        whose answer is the attractor plain iteration reaches: it leaves alone the samples where
        plain iteration is still wandering (docs/TRAINING.md, "Solvers on the trained loops").
        On a map whose fixed point repels plain iteration the gate never opens.
    `options`: tol, max_iter, stop_mode, subbatch, divergence_ratio, snapshots (solvers.LoopOptions).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    check_safeguard(safeguard, max_restarts)
    check_gate(gate)

    def step(z: Tensor, fz: Tensor, g: Tensor, state: State) -> Tensor:
        rows = state.rows
        if gate is not None:
            opened = contraction_gate(rows, state.g_norm, gate)
        if state.k == 0:  # H = -I: the first step is the plain one
            n, d = z.shape
            rows.update(u=z.new_zeros(n, m, d), v=z.new_zeros(n, m, d), g=g, step=g)
            if safeguard is not None:
                rows.update(z=z, mixed=torch.zeros(n, dtype=torch.bool, device=z.device),
                            restarts=torch.zeros(n, dtype=torch.long, device=z.device))
            return z + g
        u, v = rows["u"], rows["v"]
        used = (state.k - 1) % m  # rank-one terms in use before this update (a full memory restarts)
        bad = None
        if safeguard is not None:
            bad = safeguard_rejects(rows, state.g_norm, safeguard)
            if bool(bad.any()):  # back to the previous iterate with H = -I; y = 0 there skips the update
                z = where_rows(bad, rows["z"], z)
                g = where_rows(bad, rows["g"], g)
                u[bad], v[bad] = 0, 0
        s, y = rows["step"], g - rows["g"]
        uu, vv = u[:, :used], v[:, :used]
        hy = -y + _lowrank(uu, vv, y)  # H y, (n, D)
        vt = -s + _lowrank(vv, uu, s)  # H^T s, (n, D)
        denom = (vt * y).sum(1, keepdim=True)  # s^T H y, (n, 1)
        eps = torch.finfo(z.dtype).eps
        ok = denom.abs() > eps * vt.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True)
        if safeguard is not None and max_restarts is not None:
            # past the limit: no more terms, so H stays -I (emptied at the rejection) and steps are plain
            ok &= (rows["restarts"] <= max_restarts)[:, None]
        # rows without the update get zero terms; (n, 1) factors, not a where over (n, D) with a
        # broadcast mask, which runs several times slower on a CPU (solvers._loop.where_rows)
        keep = ok.to(z.dtype)
        u[:, used] = (s - hy) * (keep / torch.where(ok, denom, torch.ones_like(denom)))
        v[:, used] = vt * keep
        step = g - _lowrank(u[:, :used + 1], v[:, :used + 1], g)  # -H g
        if gate is not None:  # rows still behind the gate step plainly; their H keeps learning
            step = where_rows(opened, step, g)
        if safeguard is not None:
            # H != -I for the next step: this update was taken, or an earlier one still is in memory
            mixed = ok.squeeze(1) | (rows["mixed"] & ~bad & (used > 0))
            rows["mixed"] = mixed if gate is None else mixed & opened
            rows["z"] = z
        rows["g"] = g
        rows["step"] = step
        return z + step

    return iterate(f, z0, after_plain_steps(step, warmup), solver="broyden", **options)


def _lowrank(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """sum_i a_i (b_i . x) for (n, m, D) a, b and (n, D) x."""
    coef = torch.bmm(x[:, None, :], b.transpose(1, 2))  # (n, 1, m): faster on CPU than b @ x as (m, D) x (D, 1)
    return torch.bmm(coef, a).squeeze(1)
