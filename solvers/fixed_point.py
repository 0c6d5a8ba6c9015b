"""Plain and damped fixed-point iteration: z <- (1 - tau) z + tau f(z)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ._loop import Loop
from .result import SolverResult


def fixed_point_iter(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    tau: float = 1.0,
    subbatch: bool = False,
    divergence_ratio: float = 1e4,
) -> SolverResult:
    """Iterate z_{k+1} = (1 - tau) z_k + tau f(z_k) until ||f(z) - z|| < tol, per sample.

    The residual reported is that of the undamped map, ||f(z) - z||, for the returned z.
    `subbatch=True` calls `f(z, idx)` on the still-active samples only (see `solvers._loop.Loop`).
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    loop = Loop(f, z0, tol=tol, max_iter=max_iter, stop_mode=stop_mode, subbatch=subbatch,
                divergence_ratio=divergence_ratio, solver="fixed_point_iter")
    z = loop.z0
    while True:
        fz, g = loop(z)
        keep = loop.drop()
        if loop.done:
            break
        if keep is not None:
            z, fz, g = z[keep], fz[keep], g[keep]
        z = fz if tau == 1 else z + tau * g
    return loop.result()
