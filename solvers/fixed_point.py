"""Plain and damped fixed-point iteration: z <- (1 - tau) z + tau f(z)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import Tensor

from ._loop import LoopOptions, State, iterate
from .result import SolverResult

if TYPE_CHECKING:
    from typing_extensions import Unpack


def fixed_point_iter(f: Callable[..., Tensor], z0: Tensor, *, tau: float = 1.0,
                     **options: Unpack[LoopOptions]) -> SolverResult:
    """Iterate z_{k+1} = (1 - tau) z_k + tau f(z_k) until ||f(z) - z|| < tol, per sample.

    The residual reported is that of the undamped map, ||f(z) - z||, for the returned z.
    `options`: tol, max_iter, stop_mode, subbatch, divergence_ratio, snapshots (solvers.LoopOptions);
    `subbatch=True` calls `f(z, idx)` on the still-active samples only (see `solvers._loop.Loop`).
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")

    def step(z: Tensor, fz: Tensor, g: Tensor, state: State) -> Tensor:
        return fz if tau == 1 else z + tau * g

    return iterate(f, z0, step, solver="fixed_point_iter", **options)
