"""Run deqloop's solvers inside torchdeq.

    from solvers.torchdeq_adapter import register_torchdeq
    names = register_torchdeq()                   # ['deqloop_anderson', 'deqloop_broyden', ...]
    deq = torchdeq.get_deq(f_solver="deqloop_anderson", b_solver="deqloop_anderson")

torchdeq calls a solver as `solver(func, x0, max_iter=, tol=, stop_mode=, indexing=, **kwargs)`
and expects `(z, trajectory, SolverStat)`. The wrapper translates both ways; options torchdeq
passes through `solver_kwargs` must be deqloop option names (`reg`, not torchdeq's `lam`),
and an unknown one raises instead of being ignored.
"""

from __future__ import annotations

from typing import Callable

from . import SOLVERS, check_options, get_solver

PREFIX = "deqloop_"


def as_torchdeq_solver(name: str) -> Callable:
    """Wrap registered solver `name` in torchdeq's solver calling convention."""
    solver = get_solver(name)

    def torchdeq_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, **options):
        from torchdeq.solver.stat import SolverStat

        check_options(name, options)
        if indexing is not None and len(indexing) > 1:
            raise ValueError(
                f"{PREFIX}{name} returns the solution only, not intermediate states; "
                f"use n_states=1 (got indexing={list(indexing)})"
            )
        result = solver(func, x0, max_iter=int(max_iter), tol=float(tol), stop_mode=stop_mode, **options)
        other = "abs" if stop_mode == "rel" else "rel"
        other_final = result.abs_residual if other == "abs" else result.rel_residual
        info = SolverStat(**{
            "abs_lowest": result.abs_residual,
            "rel_lowest": result.rel_residual,
            f"{stop_mode}_trace": result.trace,  # (B, K), nan once a sample stopped
            f"{other}_trace": other_final[:, None],  # only the final value is recorded
            "nstep": result.n_steps.to(result.z.dtype),
        })
        return result.z, ([result.z] if indexing else []), info

    torchdeq_solver.__name__ = f"{PREFIX}{name}"
    torchdeq_solver.__doc__ = f"deqloop's {name} in torchdeq's calling convention.\n\n{solver.__doc__}"
    return torchdeq_solver


def register_torchdeq(prefix: str = PREFIX) -> list[str]:
    """Register every deqloop solver in torchdeq's registry as `prefix + name`; returns the names."""
    from torchdeq.solver import register_solver

    names = []
    for name in SOLVERS:
        register_solver(prefix + name, as_torchdeq_solver(name))
        names.append(prefix + name)
    return names
