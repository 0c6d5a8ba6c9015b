"""The paper's three axes, measured on any loop cell f(z, x) (docs/DESIGN.md §3, docs/DIAGNOSE.md).

    reach = reachability(f, x, z0, n_starts=2, seed=0, method="fixed_point_iter", options={"tol": 1e-3})
    count = countability(points, inputs, tol=1e-2)          # distinct fixed points vs inputs
    shared = cross_residual(f, x, reach.z_star)               # is input i's z* a fixed point for input j?
    sens = sensitivity(f, x, z_star, seed=0, ...)             # dz*/dx . v by the IFT vs finite differences
    geom = geometry(f, x, z_star, seed=0, ...)                # rho(J), ||J||_2, sigma_min/cond of I - J, adjoint

`f(z, x)` maps a state z (B, ...) and an input x (B, ...) to the next state (B, ...); it must
treat samples independently (the diagnostics linearize it one sample at a time). An autonomous
map `g(z)` is `lambda z, x: g(z)`. Norms are per sample, over all non-batch dimensions.

Nothing here knows the model class. Sensitivity and geometry use products with J = df/dz and
df/dx only, never a dense Jacobian at real sizes. Run them on a float64 copy of the cell: on the
trained prefix-sums loop, IFT and finite differences agree to 4e-7 in float64 but only to 3e-2
in float32 (same step). Every random choice (starts, directions, Krylov start vectors) takes a seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from deqloop import krylov as kr
from deqloop.countability import Countability, count_at, countability  # noqa: F401 (this module's interface)
from deqloop.krylov import Linearization  # noqa: F401 (part of this module's interface)
from solvers import SolverResult, bind_input, solve

Cell = Callable[[Tensor, Tensor], Tensor]

DENSE_MAX = 64  # states of at most this many numbers get an exact dense Jacobian instead of Krylov methods


# ------------------------------------------------------------------------------------- helpers

def norms(t: Tensor) -> Tensor:
    """(B, ...) -> (B,) Euclidean norm over all non-batch dimensions."""
    return t.reshape(t.shape[0], -1).norm(dim=1)


def unit_directions(like: Tensor, seed: int) -> Tensor:
    """Seeded Gaussian directions shaped like `like` (B, ...), each sample of norm 1."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(like.shape, generator=g, dtype=torch.float64).to(like.device, like.dtype)
    return v / norms(v).clamp_min(torch.finfo(v.dtype).tiny).reshape(-1, *[1] * (v.dim() - 1))


def _rel(a: Tensor, b: Tensor) -> Tensor:
    """(B,) ||a - b|| / max(||a||, ||b||), 0 where both are exactly zero, nan where either is nan."""
    num, den = norms(a - b), torch.maximum(norms(a), norms(b))
    zero = torch.where(den.isnan(), den, torch.zeros_like(den))  # not measured stays nan, not "agree"
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), zero)


# ------------------------------------------------------------------------------------- reachability

@dataclass(frozen=True)
class Reachability:
    """Solves from the model's z0 and from `n_starts` seeded random starts, per sample.

    z_star:          (B, ...) the fixed point reached from z0 (the solver's best iterate).
    converged:       (B,) bool, reached tol from z0.
    n_steps:         (B,) evaluations of f from z0.
    residual:        (B,) final residual from z0, in the solve's stop_mode.
    trace:           (B, K) residual per evaluation from z0, nan after the sample stopped.
    decay_rate:      (B,) geometric mean of residual ratios over the second half of the trace:
                     an estimate of the contraction factor (nan with fewer than 3 residuals).
    start_z:         (S, B, ...) fixed points reached from the random starts.
    start_converged: (S, B) bool; start_n_steps (S, B).
    path_distance:   (S, B) ||z*_s - z*|| / ||z*||: 0 when every start finds the same point.
    """

    z_star: Tensor
    converged: Tensor
    n_steps: Tensor
    residual: Tensor
    trace: Tensor
    decay_rate: Tensor
    start_z: Tensor
    start_converged: Tensor
    start_n_steps: Tensor
    path_distance: Tensor
    max_iter: int = 0  # the budget the solve from z0 had (less than asked when a deadline cut it)
    start_max_iter: int = 0  # the budget each random start had

    def path_independent(self, tol: float) -> Tensor:
        """(B,) bool: converged from z0 and from every start, all within `tol` (relative) of z*."""
        ok = self.converged & self.start_converged.all(0)
        return ok & (self.path_distance <= tol).all(0)


def decay_rate(trace: Tensor, n_steps: Tensor) -> Tensor:
    """(B,) (r_last / r_mid) ** (1 / (last - mid)) over the second half of each sample's residuals."""
    out = torch.full((trace.shape[0],), math.nan, dtype=torch.float64)
    for b, n in enumerate(n_steps.tolist()):
        r = trace[b, :n].double()
        mid = n // 2
        if n >= 3 and bool((r[mid:] > 0).all()):
            out[b] = (r[n - 1] / r[mid]) ** (1.0 / (n - 1 - mid))
    return out


def random_starts(like: Tensor, n: int, seed: int, scale: Tensor) -> Tensor:
    """(n, B, ...) seeded Gaussian states, sample b of norm scale[b] (the state's own scale)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.randn((n, *like.shape), generator=g, dtype=torch.float64).to(like.device, like.dtype)
    r_norm = r.reshape(n, like.shape[0], like[0].numel()).norm(dim=2).clamp_min(torch.finfo(r.dtype).tiny)
    return r * (scale[None] / r_norm).reshape(n, like.shape[0], *[1] * (like.dim() - 1))


class OutOfTime(Exception):
    """A measurement ran past its deadline (diagnose --budget-seconds)."""


def timed(f: Cell, deadline: float | None) -> Cell:
    """f that raises OutOfTime when called after `deadline` (a time.monotonic() value; None: never)."""
    if deadline is None:
        return f

    def cell(z: Tensor, x: Tensor) -> Tensor:
        if time.monotonic() > deadline:
            raise OutOfTime
        return f(z, x)

    return cell


def solve_cell(f: Cell, x: Tensor, z0: Tensor, *, method: str = "fixed_point_iter",
               options: dict | None = None) -> SolverResult:
    """Solve z = f(z, x) from z0 with `solvers.solve(method, **options)`."""
    return solve(bind_input(f, x), z0, method=method, **dict(options or {}))


def reachability(f: Cell, x: Tensor, z0: Tensor, *, n_starts: int = 2, seed: int = 0,
                 method: str = "fixed_point_iter", options: dict | None = None,
                 on_solve: Callable[[str], None] | None = None, deadline: float | None = None) -> Reachability:
    """Solve z = f(z, x) from z0 and from `n_starts` random starts, with `solvers.solve(method, **options)`.

    The random starts are seeded Gaussians scaled to the norm of the fixed point reached from z0
    (or of z0 when that is zero), so they start where the state lives. `on_solve(what)` is
    called before each solve (progress reporting). With `subbatch=True` in options, f is called
    on the still-active samples only (valid since f treats samples independently). With a
    `deadline`, the solve from z0 gets at most 40% of the time left and the random starts 30% of
    what is left then (their max_iter cut to fit, timed on one evaluation, so they end as at
    max_iter), and random starts stop at the deadline; only the finished ones count.
    """
    if on_solve:
        on_solve("from z0")
    options = dict(options or {})
    asked = options.get("max_iter", 50)
    per = _seconds_per_call(lambda: f(z0, x)) if deadline is not None else 0.0
    fit = lambda share: int(max(1, min(asked, share * (deadline - time.monotonic()) / per)))
    if deadline is not None:  # the solve from z0 may take 40% of the time left, the random starts 30% of the rest
        options["max_iter"] = fit(0.4)
    res = solve_cell(f, x, z0, method=method, options=options)
    z0_max_iter = options.get("max_iter", 0)
    if deadline is not None and n_starts:
        options["max_iter"] = fit(0.3 / n_starts)
    z_star = res.z
    scale = norms(z_star)
    scale = torch.where(scale > 0, scale, norms(z0))
    scale = torch.where(scale > 0, scale, torch.full_like(scale, math.sqrt(z0[0].numel())))
    starts = random_starts(z0, n_starts, seed, scale)
    results: list[SolverResult] = []
    for s in range(n_starts):
        if on_solve:
            on_solve(f"from random start {s + 1}/{n_starts}")
        try:
            results.append(solve_cell(timed(f, deadline), x, starts[s], method=method, options=options))
        except OutOfTime:
            break
    start_z = torch.stack([r.z for r in results]) if results else z_star.new_zeros((0, *z_star.shape))
    ref = norms(z_star).clamp_min(torch.finfo(z_star.dtype).tiny)
    dist = torch.stack([norms(r.z - z_star) / ref for r in results]) if results else ref.new_zeros(0, len(ref))
    empty = torch.zeros(0, z0.shape[0], dtype=torch.long)
    return Reachability(
        z_star=z_star, converged=res.converged, n_steps=res.n_steps, residual=res.residual, trace=res.trace,
        decay_rate=decay_rate(res.trace, res.n_steps),
        start_z=start_z,
        start_converged=torch.stack([r.converged for r in results]) if results else empty.bool(),
        start_n_steps=torch.stack([r.n_steps for r in results]) if results else empty,
        path_distance=dist, max_iter=int(z0_max_iter), start_max_iter=int(options.get("max_iter", 0)),
    )


# ------------------------------------------------------------------------------------- input-dependence


def cross_residual(f: Cell, x: Tensor, z_star: Tensor, shift: int = 1) -> Tensor:
    """(B,) relative residual ||f(z*_b, x_c) - z*_b|| / ||f(z*_b, x_c)|| with c = b + shift (mod B).

    Small for every pair: input b's fixed point is also one for input c, so the set of fixed
    points does not depend on x (a no-recall cell gives exactly its own residual here).
    """
    with torch.no_grad():
        fz = f(z_star, torch.roll(x, -shift, dims=0))
    return norms(fz - z_star) / norms(fz).clamp_min(torch.finfo(fz.dtype).tiny)


@dataclass(frozen=True)
class Sensitivity:
    """dz*/dx . v for a seeded unit direction v per sample, by the IFT and by finite differences.

    tangent, fd_tangent: (B, ...) the two estimates of dz*/dx . v.
    norm, fd_norm:  (B,) their norms: the sensitivity of z* to x along v.
    relative:       (B,) norm * ||x|| / ||z*||: the relative change of z* per relative change of x.
    direct:         (B,) ||(df/dx) v||: the same for one application of f (zero: f ignores x).
    rel_error:      (B,) ||tangent - fd_tangent|| / max of the two norms (0 when both are zero).
    ift_converged, ift_iters, ift_residual: (B,) the GMRES solve of (I - J) u = (df/dx) v.
    fd_converged:   (B,) both perturbed solves reached their tolerance.
    eps:            (B,) the finite-difference step along v.
    """

    tangent: Tensor
    fd_tangent: Tensor
    norm: Tensor
    fd_norm: Tensor
    relative: Tensor
    direct: Tensor
    rel_error: Tensor
    ift_converged: Tensor
    ift_iters: Tensor
    ift_residual: Tensor
    fd_converged: Tensor
    eps: Tensor


def ift_tangent(f: Cell, x: Tensor, z_star: Tensor, v: Tensor, *, rtol: float = 1e-10,
                max_matvecs: int = 2000, deadline: float | None = None):
    """dz*/dx . v = (I - J)^{-1} (df/dx) v per sample, by GMRES on products with J.

    Returns (tangent (B, ...), direct (B, ...) = (df/dx) v, converged (B,), iterations (B,), residual (B,)).
    GMRES needs I - J nonsingular only, not rho(J) < 1. Past `deadline`, a sample is nan, not converged.
    """
    tangent, direct = torch.zeros_like(z_star), torch.zeros_like(z_star)
    conv = torch.zeros(len(z_star), dtype=torch.bool)
    iters = torch.zeros(len(z_star), dtype=torch.long)
    resid = torch.zeros(len(z_star), dtype=torch.float64)
    for b in range(len(z_star)):
        lin = kr.Linearization(f, x[b: b + 1], z_star[b: b + 1])
        rhs = lin.dfdx(v[b: b + 1])
        direct[b] = rhs[0]
        a = kr.Budget(None, deadline).wrap(kr.as_torch(lambda u: u - lin.jvp(u), rhs))  # GMRES counts its own
        try:
            u, conv[b], iters[b], resid[b] = kr.gmres(a, rhs.reshape(-1).double().cpu().numpy(), rtol=rtol,
                                                    max_matvecs=max_matvecs)
        except kr.Exhausted:  # out of time
            tangent[b], resid[b] = math.nan, math.nan
            continue
        tangent[b] = torch.as_tensor(u).reshape(rhs.shape[1:]).to(z_star)
    return tangent, direct, conv, iters, resid


def fd_tangent(f: Cell, x: Tensor, z_star: Tensor, v: Tensor, eps: Tensor, *,
               method: str = "fixed_point_iter", options: dict | None = None):
    """(z*(x + eps v) - z*(x - eps v)) / (2 eps), both solved from z* (same basin); (tangent, converged)."""
    e = eps.reshape(-1, *[1] * (x.dim() - 1)).to(x)
    sides = []
    for sign in (1.0, -1.0):
        xs = x + sign * e * v
        sides.append(solve_cell(f, xs, z_star, method=method, options=options))
    tangent = (sides[0].z - sides[1].z) / (2 * e)
    return tangent, sides[0].converged & sides[1].converged


def sensitivity(f: Cell, x: Tensor, z_star: Tensor, *, seed: int = 0, fd_eps: float = 1e-4,
                method: str = "fixed_point_iter", fd_options: dict | None = None,
                rtol: float = 1e-10, max_matvecs: int = 2000, deadline: float | None = None) -> Sensitivity:
    """Sensitivity of z* to x along a seeded unit direction, by the IFT and by central differences.

    The finite-difference step is fd_eps * max(||x||, 1) per sample; the perturbed fixed points
    are solved with `solvers.solve(method, **fd_options)` from z* (give a tight tol, in float64).
    Past `deadline`, what is left is nan and not converged.
    """
    v = unit_directions(x, seed)
    tangent, direct, conv, iters, resid = ift_tangent(f, x, z_star, v, rtol=rtol, max_matvecs=max_matvecs,
                                                      deadline=deadline)
    eps = fd_eps * norms(x).clamp_min(1.0)
    try:
        fd, fd_conv = fd_tangent(timed(f, deadline), x, z_star, v, eps, method=method, options=fd_options)
    except OutOfTime:
        fd, fd_conv = torch.full_like(z_star, math.nan), torch.zeros(len(z_star), dtype=torch.bool)
    norm = norms(tangent)
    return Sensitivity(
        tangent=tangent, fd_tangent=fd, norm=norm, fd_norm=norms(fd),
        relative=norm * norms(x) / norms(z_star).clamp_min(torch.finfo(z_star.dtype).tiny),
        direct=norms(direct), rel_error=_rel(tangent, fd), ift_converged=conv, ift_iters=iters,
        ift_residual=resid, fd_converged=fd_conv, eps=eps,
    )


# ------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Geometry:
    """The linearization at z*, per sample (all (B,)).

    spectral_radius: max |eigenvalue| of J (Arnoldi on J u; exact for states of <= DENSE_MAX numbers).
    jacobian_norm:   ||J||_2, the largest singular value.
    sigma_max, sigma_min: extreme singular values of I - J; cond = sigma_max / sigma_min.
    converged:       the Krylov iterations (all four quantities) met their tolerance within budget.
    matvecs:         (B,) int64, products with J or J^T spent on the four (n of them for a dense J).
    adjoint_converged, adjoint_steps, adjoint_residual: the solve of g = J^T g + w (the IFT
                     backward) with the package's solver, for a seeded unit w.
    """

    spectral_radius: Tensor
    jacobian_norm: Tensor
    sigma_max: Tensor
    sigma_min: Tensor
    cond: Tensor
    converged: Tensor
    matvecs: Tensor
    adjoint_converged: Tensor
    adjoint_steps: Tensor
    adjoint_residual: Tensor
    cond_measured: Tensor | None = None  # (B,) False where sigma of I - J was skipped (not at a fixed point)


def _dense_jacobian(lin: kr.Linearization, like: Tensor) -> np.ndarray:
    """(n, n) J of one sample from n products with basis vectors."""
    n = like.numel()
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return np.stack([lin.jvp(eye[i].reshape(like.shape)).reshape(-1).double().cpu().numpy() for i in range(n)],
                    axis=1)


def adjoint_solve(f: Cell, x: Tensor, z_star: Tensor, *, seed: int = 0, method: str = "anderson",
                  options: dict | None = None, deadline: float | None = None) -> SolverResult:
    """Solve g = J^T g + w for a seeded unit w (B, ...) with `solvers.solve`, as the IFT backward does;
    past `deadline` the solver stops as at max_iter (its best iterate, not converged)."""
    lin = kr.Linearization(f, x, z_star)
    w = unit_directions(z_star, seed)
    options = dict(options or {})
    if deadline is not None:  # remaining time as an iteration budget, measured on the first products
        options["max_iter"] = _iterations_until(deadline, lambda: lin.vjp(w), options.get("max_iter", 50))
    return solve(lambda g: lin.vjp(g) + w, torch.zeros_like(w), method=method, **options)


def _seconds_per_call(step: Callable[[], object]) -> float:
    t = time.monotonic()
    step()
    return max(time.monotonic() - t, 1e-6)


def _iterations_until(deadline: float, step: Callable[[], object], cap: int) -> int:
    """How many calls of `step` fit before `deadline` (at least 1, at most cap), timed on one call."""
    return int(max(1, min(cap, (deadline - time.monotonic()) / _seconds_per_call(step))))


def geometry(f: Cell, x: Tensor, z_star: Tensor, *, seed: int = 0, tol: float = 1e-3, max_matvecs: int = 2000,
             adjoint_method: str = "anderson", adjoint_options: dict | None = None,
             dense_max: int = DENSE_MAX, on_sample: Callable[[int], None] | None = None,
             deadline: float | None = None, at_fixed_point: Tensor | None = None) -> Geometry:
    """Spectral radius and norm of J at z*, singular values of I - J, and the adjoint solve; per sample.

    Krylov methods (ARPACK Arnoldi and Lanczos; GMRES inside the sigma_min iteration) on products
    with J, relative tolerance `tol`. Budget per sample: `max_matvecs` products with J or J^T for
    each of rho, ||J||_2 and sigma_max, four times that for sigma_min (two linear solves per
    Lanczos step); a quantity out of budget is nan and not converged. States of at most
    `dense_max` numbers use the exact dense Jacobian. `on_sample(b)` is called before sample b.
    Past `deadline` (time.monotonic()), a quantity is nan and not converged, like one out of budget.
    A sample whose `at_fixed_point` is False gets rho(J) and ||J|| only: the singular values of
    I - J matter to the IFT at a fixed point, and near a marginal J they are the costly part.
    """
    cols = {k: [] for k in ("rho", "jnorm", "smax", "smin", "ok", "used")}
    for b in range(len(z_star)):
        if on_sample:
            on_sample(b)
        if deadline is not None and time.monotonic() > deadline:
            for key, val in zip(cols, (math.nan,) * 4 + (False, 0)):
                cols[key].append(val)
            continue
        lin = kr.Linearization(f, x[b: b + 1], z_star[b: b + 1])
        like = z_star[b: b + 1]
        n = like.numel()
        if n <= dense_max:
            jac = _dense_jacobian(lin, like)
            s_a = np.linalg.svd(np.eye(n) - jac, compute_uv=False)
            vals = (np.abs(np.linalg.eigvals(jac)).max(), np.linalg.norm(jac, 2), s_a.max(), s_a.min(), True, n)
        else:
            j_mv, jt_mv = kr.as_torch(lin.jvp, like), kr.as_torch(lin.vjp, like)
            a_mv = kr.as_torch(lambda u: u - lin.jvp(u), like)  # I - J
            at_mv = kr.as_torch(lambda u: u - lin.vjp(u), like)
            budgets = [kr.Budget(max_matvecs, deadline) for _ in range(3)] + [kr.Budget(4 * max_matvecs, deadline)]
            rho, ok_rho = kr.spectral_radius(j_mv, n, seed, tol, budgets[0])
            jnorm, ok_j = kr.sigma_max(j_mv, jt_mv, n, seed, tol, budgets[1])
            if at_fixed_point is None or bool(at_fixed_point[b]):
                smax, ok_a = kr.sigma_max(a_mv, at_mv, n, seed, tol, budgets[2])
                smin, ok_m = kr.sigma_min(a_mv, at_mv, n, seed, tol=tol, budget=budgets[3])
            else:
                smax, smin, ok_a, ok_m = math.nan, math.nan, True, True  # skipped, not failed
            vals = (rho, jnorm, smax, smin, ok_rho and ok_j and ok_a and ok_m, sum(b.used for b in budgets))
        for key, val in zip(cols, vals):
            cols[key].append(val)
    adj = adjoint_solve(f, x, z_star, seed=seed, method=adjoint_method, options=adjoint_options, deadline=deadline)
    t = lambda key: torch.tensor(cols[key], dtype=torch.float64)
    return Geometry(
        spectral_radius=t("rho"), jacobian_norm=t("jnorm"), sigma_max=t("smax"), sigma_min=t("smin"),
        cond=t("smax") / t("smin"), converged=torch.tensor(cols["ok"], dtype=torch.bool),
        matvecs=torch.tensor(cols["used"], dtype=torch.long),
        adjoint_converged=adj.converged, adjoint_steps=adj.n_steps, adjoint_residual=adj.residual,
        cond_measured=torch.tensor([at_fixed_point is None or bool(at_fixed_point[b]) for b in range(len(z_star))]),
    )
