"""The loop's linearization at its fixed point, and Krylov methods on it.

`Linearization` gives products with J = df/dz (and df/dx) by reverse mode only; GMRES and
ARPACK's Arnoldi and Lanczos compute rho(J), sigma_max and sigma_min from such products, each
under a budget, so a nearly singular or marginal operator ends as "not converged", not as a run
that never stops.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigs, eigsh, svds
from scipy.sparse.linalg import gmres as scipy_gmres
from torch import Tensor

Cell = Callable[[Tensor, Tensor], Tensor]  # f(z, x)


def math_attention():
    """PyTorch's fused CPU attention has no double backward; its plain-ops version does."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: the default kernels
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class Linearization:
    """Products with J = df/dz and df/dx at (z, x), by reverse mode only.

    J^T w is one vector-Jacobian product; J u is the "double-vjp" trick: J^T w is linear in w,
    so J u = d<J^T w, u>/dw. It works for any cell autograd can differentiate twice (forward-mode
    AD does not cover PyTorch's fused CPU attention), and after the graph is built once a J u
    costs one backward pass. Shapes: every vector is shaped like z (B, ...), or x for `dfdx`.
    """

    def __init__(self, f: Cell, x: Tensor, z: Tensor):
        with torch.enable_grad(), math_attention():
            self._z = z.detach().requires_grad_()
            self._x = x.detach().requires_grad_()
            self.fz = f(self._z, self._x)
            self._w = torch.zeros_like(self.fz, requires_grad=True)
            jt_z, jt_x = torch.autograd.grad(self.fz, (self._z, self._x), self._w, create_graph=True,
                                             allow_unused=True)
        self._jt_z, self._jt_x = jt_z, jt_x

    def _grad(self, out: Tensor | None, wrt: Tensor, v: Tensor, like: Tensor) -> Tensor:
        if out is None or not out.requires_grad:  # f does not depend on that argument at all
            return torch.zeros_like(like)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(out, wrt, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(like) if g is None else g.detach()

    def jvp(self, u: Tensor) -> Tensor:
        """J u."""
        return self._grad(self._jt_z, self._w, u, self.fz)

    def vjp(self, w: Tensor) -> Tensor:
        """J^T w."""
        return self._grad(self.fz, self._z, w, self._z)

    def dfdx(self, v: Tensor) -> Tensor:
        """(df/dx) v: how one application of f moves when x moves along v."""
        return self._grad(self._jt_x, self._w, v, self.fz)



def linear_operator(n: int, matvec, rmatvec=None) -> LinearOperator:
    return LinearOperator((n, n), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)


def as_torch(fn, like: Tensor):
    """A numpy (n,) -> numpy (n,) function from a torch function on one sample shaped like `like`."""

    def apply(u: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(u, dtype=np.float64).reshape(like.shape))
        return fn(t.to(like.device, like.dtype)).reshape(-1).double().cpu().numpy()

    return apply


def gmres(matvec, b: np.ndarray, *, rtol: float, max_matvecs: int, restart: int = 200):
    """Solve A u = b by GMRES: (u, converged, iterations, relative residual ||b - Au|| / ||b||)."""
    n = b.size
    if not np.any(b):
        return np.zeros_like(b), True, 0, 0.0
    count = [0]
    restart = max(1, min(n, restart))

    def tick(_):
        count[0] += 1

    u, _ = scipy_gmres(linear_operator(n, matvec), b, rtol=rtol, atol=0.0, restart=restart,
                 maxiter=max(1, math.ceil(max_matvecs / restart)), callback=tick, callback_type="pr_norm")
    res = float(np.linalg.norm(b - matvec(u)) / np.linalg.norm(b))
    return u, res <= 10 * rtol, count[0], res


def start_vector(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(n)
    return v / np.linalg.norm(v)


class Exhausted(Exception):
    """A Krylov computation spent its budget of products with J, or an inner solve failed."""


class Budget:
    """Counts products with J or J^T; the one past `limit`, or one after `deadline` (a
    time.monotonic() value), raises `Exhausted`.

    Near rho(J) = 1 or a singular I - J, ARPACK and GMRES can iterate for a very long time;
    a budget keeps `diagnose` bounded and reports such a quantity as not converged.
    """

    def __init__(self, limit: int | None, deadline: float | None = None):
        self.used, self.limit, self.deadline = 0, limit, deadline  # limit None: the deadline alone

    def wrap(self, fn):
        def counted(u):
            self.used += 1
            if self.limit is not None and self.used > self.limit:
                raise Exhausted
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise Exhausted
            return fn(u)

        return counted


def spectral_radius(j_mv, n: int, seed: int, tol: float, budget: Budget) -> tuple[float, bool]:
    """Largest |eigenvalue| of J by implicitly restarted Arnoldi (ARPACK)."""
    k = min(3, n - 2)  # a few Ritz values: the dominant one of a real matrix may be a complex pair
    try:
        vals = eigs(linear_operator(n, budget.wrap(j_mv)), k=k, which="LM", v0=start_vector(n, seed), tol=tol,
                    maxiter=budget.limit, ncv=min(n, max(2 * k + 1, 30)), return_eigenvectors=False)
        return float(np.abs(vals).max()), True
    except ArpackNoConvergence as e:
        return (float(np.abs(e.eigenvalues).max()) if len(e.eigenvalues) else math.nan), False
    except (ArpackError, Exhausted):
        return math.nan, False


def sigma_max(mv, rmv, n: int, seed: int, tol: float, budget: Budget) -> tuple[float, bool]:
    """Largest singular value by Lanczos on A^T A (ARPACK through svds)."""
    try:
        s = svds(linear_operator(n, budget.wrap(mv), budget.wrap(rmv)), k=1, which="LM", v0=start_vector(n, seed),
                 tol=tol, maxiter=budget.limit, return_singular_vectors=False)
        return float(s.max()), True
    except ArpackNoConvergence as e:
        return (float(np.sqrt(np.abs(e.eigenvalues).max())) if len(e.eigenvalues) else math.nan), False
    except (ArpackError, Exhausted):
        return math.nan, False


SIGMA_MIN_RTOL = 1e-8  # inner GMRES tolerance of the sigma_min iteration (ample for a 1e-3 estimate)


def sigma_min(a_mv, at_mv, n: int, seed: int, *, tol: float, budget: Budget) -> tuple[float, bool]:
    """Smallest singular value of A: Lanczos (ARPACK) for the largest eigenvalue of (A^T A)^{-1}.

    Each product with (A^T A)^{-1} solves A y = w, then A^T w' = y, by GMRES; sigma_min =
    1 / sqrt(lambda_max). Lanczos, not plain inverse iteration: the two smallest singular values
    of the trained loops are often within a few percent, where power steps crawl. A GMRES solve
    that fails (I - J singular or nearly so) ends the computation: nan, not converged.
    """
    a_mv, at_mv = budget.wrap(a_mv), budget.wrap(at_mv)

    def inverse(w: np.ndarray) -> np.ndarray:
        y, ok, _, _ = gmres(a_mv, w.reshape(-1), rtol=SIGMA_MIN_RTOL, max_matvecs=budget.limit - budget.used)
        if not ok:
            raise Exhausted
        w_new, ok, _, _ = gmres(at_mv, y, rtol=SIGMA_MIN_RTOL, max_matvecs=budget.limit - budget.used)
        if not ok:
            raise Exhausted
        return w_new

    try:
        lam = eigsh(linear_operator(n, inverse), k=1, which="LM", ncv=min(n, 6), v0=start_vector(n, seed), tol=tol,
                    maxiter=budget.limit, return_eigenvectors=False)
        ok = True
    except ArpackNoConvergence as e:
        lam, ok = e.eigenvalues, False
    except (ArpackError, Exhausted):
        return math.nan, False
    lam = float(np.max(lam)) if len(lam) else math.nan
    return (1 / math.sqrt(lam) if lam > 0 else math.nan), ok
