"""Fixed-point solvers for deep equilibrium models, usable on their own.

    from solvers import anderson, solve
    result = anderson(f, z0, tol=1e-6)            # f: (B, ...) -> (B, ...)
    result = solve(f, z0, method="broyden", max_iter=100)
    result.z, result.converged, result.status, result.message

Convergence is judged per sample; see `SolverResult` for every returned field. Gradients are
attached separately, by `solvers.implicit.fixed_point`. Every solver is one `Step` run by the
one loop, `iterate` (solvers/_loop.py); a new solver is a step function:

    def my_step(z, fz, g, state):      # state.rows: per-sample memory, compacted for you
        return z + 0.5 * g
    result = iterate(f, z0, my_step, solver="half_step", tol=1e-6)
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from torch import Tensor

from ._loop import LOOP_DEFAULTS, LoopOptions, State, Step, bind_input, iterate
from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point_iter
from .result import SolverError, SolverResult, Status

__all__ = [
    "LOOP_DEFAULTS",
    "LoopOptions",
    "SOLVERS",
    "SolverError",
    "SolverResult",
    "State",
    "Status",
    "Step",
    "UnknownSolverError",
    "anderson",
    "bind_input",
    "broyden",
    "check_options",
    "fixed_point_iter",
    "get_solver",
    "iterate",
    "solve",
    "solver_options",
]

SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "fixed_point_iter": fixed_point_iter,
    "anderson": anderson,
    "broyden": broyden,
}


class UnknownSolverError(KeyError):
    """An unknown solver name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def get_solver(name: str) -> Callable[..., SolverResult]:
    """The solver registered as `name`; raises `UnknownSolverError` naming the valid choices."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        hint = difflib.get_close_matches(str(name), SOLVERS, n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UnknownSolverError(
            f"unknown solver {name!r}{did}; valid solvers: {', '.join(sorted(SOLVERS))}"
        ) from None


def solver_options(name: str) -> tuple[str, ...]:
    """The keyword options solver `name` accepts: its own, then the LoopOptions every solver shares."""
    params = inspect.signature(get_solver(name)).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY) + tuple(LOOP_DEFAULTS)


def check_options(name: str, options: dict) -> None:
    """Raise `TypeError` naming the valid options if `options` has a key solver `name` lacks."""
    valid = solver_options(name)
    for key in options:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise TypeError(
                f"solver {name!r} has no option {key!r}{did}; valid options: {', '.join(valid)}"
            )


def solve(f: Callable[..., Tensor], z0: Tensor, *, method: str = "anderson", **options) -> SolverResult:
    """Find z = f(z) with the registered solver `method`; unknown names or options raise."""
    solver = get_solver(method)
    check_options(method, options)
    return solver(f, z0, **options)
