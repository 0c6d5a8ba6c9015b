"""Attach gradients to a fixed point: the only place in `solvers` where autograd is used.

    z, result = fixed_point(cell, z0, grad="ift")      # cell: nn.Module or closure, (B, ...) -> (B, ...)
    loss(head(z)).backward()                            # exact implicit gradient

Three gradients, so they can be compared:
- "ift" (default, exact at the fixed point): with z* found without autograd, the backward pass
  solves the adjoint system g = J^T g + dL/dz (J = df/dz at z*) with a registered solver on
  vector-Jacobian products, then backpropagates g through one application of f.
  Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
- "phantom": k damped steps z <- (1 - tau) z + tau f(z) from z*, differentiated by autograd
  (k=1, tau=1 is the one-step / Jacobian-free gradient). An approximation of the IFT gradient.
  Geng et al., "On Training Implicit Models", NeurIPS 2021.
- "unroll": `unroll_steps` plain iterations from z0, differentiated (backprop through the
  loop; memory grows with the number of steps). The first `unroll_detach` of them run without
  gradient (truncated backprop: long trajectories at the memory of their last part), and
  `on_iterate(i, z)` sees every differentiated iterate, so a loss can be put along the loop.
Without autograd (evaluation) every mode returns the solver's fixed point.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from . import check_options, get_solver
from .fixed_point import fixed_point_iter
from .result import SolverResult

GRADS = ("ift", "phantom", "unroll")
BACKWARD_DEFAULTS = {"tol": 1e-6, "max_iter": 100}


def fixed_point(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    solver: str = "anderson",
    solver_options: dict | None = None,
    grad: str = "ift",
    b_solver: str = "anderson",
    b_solver_options: dict | None = None,
    phantom_steps: int = 1,
    phantom_tau: float = 1.0,
    unroll_steps: int = 30,
    unroll_detach: int = 0,
    on_iterate: Callable[[int, Tensor], None] | None = None,
    on_backward: Callable[[SolverResult], None] | None = None,
) -> tuple[Tensor, SolverResult]:
    """Solve z* = f(z*) and return (z, result) with z differentiable by `grad` (see module doc).

    `f` closes over its input and parameters; gradients reach them through f. With
    `solver_options={"subbatch": True}`, f must also accept `f(z, idx)` (see `solvers.Loop`).
    With "ift", z equals result.z; the backward solve's result is passed to `on_backward`
    (for logging its steps and residual). z0 gets no gradient: the fixed point does not
    depend on where the solver starts.
    """
    if grad not in GRADS:
        raise ValueError(f"unknown grad {grad!r}; valid choices: {', '.join(GRADS)}")
    solver_options = dict(solver_options or {})
    b_options = {**BACKWARD_DEFAULTS, **(b_solver_options or {})}
    check_options(solver, solver_options)
    check_options(b_solver, b_options)
    if b_options.get("subbatch"):
        raise ValueError("the backward solve evaluates the whole batch; subbatch is not supported there")
    if isinstance(phantom_steps, bool) or not isinstance(phantom_steps, int) or phantom_steps < 1:
        raise ValueError(f"phantom_steps must be an integer >= 1, got {phantom_steps!r}")
    if not 0 < phantom_tau <= 1:
        raise ValueError(f"phantom_tau must be in (0, 1], got {phantom_tau!r}")
    if isinstance(unroll_steps, bool) or not isinstance(unroll_steps, int) or unroll_steps < 1:
        raise ValueError(f"unroll_steps must be an integer >= 1, got {unroll_steps!r}")

    if isinstance(unroll_detach, bool) or not isinstance(unroll_detach, int) or not 0 <= unroll_detach < unroll_steps:
        raise ValueError(f"unroll_detach must be an integer in [0, unroll_steps), got {unroll_detach!r}")

    if grad == "unroll" and torch.is_grad_enabled():
        return _unroll(f, z0, unroll_steps, solver_options, unroll_detach, on_iterate)

    with torch.no_grad():
        result = get_solver(solver)(f, z0.detach(), **solver_options)
    z_star = result.z
    if not torch.is_grad_enabled():  # evaluation: the fixed point, whatever the training gradient
        return z_star, result

    if grad == "phantom":
        z = z_star
        for _ in range(phantom_steps):
            z = f(z) if phantom_tau == 1 else z + phantom_tau * (f(z) - z)
        return z, result

    z_in = z_star.detach().requires_grad_()
    fz = f(z_in)
    if not fz.requires_grad:  # nothing upstream needs a gradient
        return z_star, result
    b_solve = get_solver(b_solver)

    def adjoint(grad_out: Tensor) -> Tensor:
        # g = J^T g + grad_out, by vector-Jacobian products on the graph of fz = f(z_in).
        vjp = lambda g: torch.autograd.grad(fz, z_in, g, retain_graph=True)[0] + grad_out
        b_result = b_solve(vjp, torch.zeros_like(grad_out), **b_options)
        if on_backward is not None:
            on_backward(b_result)
        return b_result.z

    # The hook sits on a copy: a hook on fz itself would fire again inside the VJPs above.
    out = fz.clone()
    out.register_hook(adjoint)
    # Value z* exactly (training and evaluation agree); gradient through one application of f.
    return z_star + (out - out.detach()), result


def _unroll(f: Callable[..., Tensor], z0: Tensor, steps: int, solver_options: dict, detach: int = 0,
            on_iterate: Callable[[int, Tensor], None] | None = None) -> tuple[Tensor, SolverResult]:
    """`steps` iterations from z0, the last `steps - detach` differentiable (each passed to
    `on_iterate` with its 1-based index); the result scores the last iterate."""
    z = z0
    with torch.no_grad():
        for _ in range(detach):
            z = f(z)
    for i in range(detach, steps):
        z = f(z)
        if on_iterate is not None:
            on_iterate(i + 1, z)
    score = {k: solver_options[k] for k in ("tol", "stop_mode") if k in solver_options}
    with torch.no_grad():
        last = fixed_point_iter(f, z.detach(), max_iter=1, **score)
    result = replace(last, solver="unroll", n_steps=last.n_steps + steps, n_f_evals=steps + 1,
                     n_f_rows=last.n_f_rows * (steps + 1))
    return z, result
