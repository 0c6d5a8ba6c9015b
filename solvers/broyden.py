"""Limited-memory Broyden's method ("good" Broyden, inverse form) for f(z) - z = 0.

Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 1965.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._loop import Loop
from .result import SolverResult


def broyden(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    m: int = 20,
    subbatch: bool = False,
    divergence_ratio: float = 1e4,
) -> SolverResult:
    """Solve g(z) = f(z) - z = 0 with quasi-Newton steps z <- z - H g, per sample.

    H approximates the inverse Jacobian of g as -I + U V^T with at most `m` rank-one terms;
    when they are used up H restarts from -I (each term was built on the ones before it, so
    dropping only the oldest would leave an inconsistent H). Memory is O(m B D), whatever
    max_iter.
    Update after a step s with residual change y: H += (s - H y) (s^T H) / (s^T H y); a
    sample whose denominator is negligible skips its update.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    loop = Loop(f, z0, tol=tol, max_iter=max_iter, stop_mode=stop_mode, subbatch=subbatch,
                divergence_ratio=divergence_ratio, solver="broyden")
    z = loop.z0
    _, g = loop(z)
    keep = loop.drop()
    if loop.done:
        return loop.result()
    if keep is not None:
        z, g = z[keep], g[keep]
    n, d = z.shape
    u = z.new_zeros(n, m, d)  # (n, m, D)
    v = z.new_zeros(n, m, d)  # (n, m, D)
    eps = torch.finfo(z.dtype).eps
    step = g  # -H g with H = -I
    used = 0  # rank-one terms in use; the first `used` slots of u, v
    while True:
        z_next = z + step
        _, g_next = loop(z_next)
        keep = loop.drop()
        if loop.done:
            break
        if keep is not None:
            z, g, z_next, g_next, step, u, v = (t[keep] for t in (z, g, z_next, g_next, step, u, v))
        if used == m:  # memory full: restart from H = -I before this update
            used = 0
        s, y = step, g_next - g
        uu, vv = u[:, :used], v[:, :used]
        hy = -y + _lowrank(uu, vv, y)  # H y, (n, D)
        vt = -s + _lowrank(vv, uu, s)  # H^T s, (n, D)
        denom = (vt * y).sum(1, keepdim=True)  # s^T H y, (n, 1)
        ok = denom.abs() > eps * vt.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True)
        u[:, used] = torch.where(ok, (s - hy) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
        v[:, used] = torch.where(ok, vt, 0.0)
        used += 1
        z, g = z_next, g_next
        step = g - _lowrank(u[:, :used], v[:, :used], g)  # -H g
    return loop.result()


def _lowrank(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """sum_i a_i (b_i . x) for (n, m, D) a, b and (n, D) x."""
    coef = torch.bmm(b, x[:, :, None])  # (n, m, 1)
    return torch.bmm(coef.transpose(1, 2), a).squeeze(1)
