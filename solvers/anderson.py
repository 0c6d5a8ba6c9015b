"""Anderson acceleration (type II), per sample, with a ridge relative to the history's scale.

Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._loop import Loop
from .result import SolverResult


def anderson(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    m: int = 5,
    beta: float = 1.0,
    reg: float = 1e-8,
    subbatch: bool = False,
    divergence_ratio: float = 1e4,
) -> SolverResult:
    """Solve z = f(z) by Anderson mixing of the last `m` iterates, per sample.

    With g_k = f(z_k) - z_k and the differences dZ, dG of the last m iterates and residuals,
    gamma = argmin ||g_k - dG gamma||^2 + lam ||gamma||^2 and
    z_{k+1} = z_k + beta g_k - (dZ + beta dG) gamma.
    The ridge is relative, lam = reg * trace(dG^T dG), so it does not stall the tail when
    residuals get small; a least-squares system that is still singular falls back to the
    plain step for that sample instead of raising.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg!r}")
    loop = Loop(f, z0, tol=tol, max_iter=max_iter, stop_mode=stop_mode, subbatch=subbatch,
                divergence_ratio=divergence_ratio, solver="anderson")
    z = loop.z0
    _, g = loop(z)
    keep = loop.drop()
    if loop.done:
        return loop.result()
    if keep is not None:
        z, g = z[keep], g[keep]
    n, d = z.shape
    dz = z.new_zeros(n, m, d)  # (n, m, D) ring buffer of z_{i+1} - z_i
    dg = z.new_zeros(n, m, d)  # (n, m, D) ring buffer of g_{i+1} - g_i
    gram = torch.zeros(n, m, m, dtype=torch.float64, device=z.device)  # dG dG^T
    eye = torch.eye(m, dtype=torch.float64, device=z.device)
    z_next = z + beta * g
    k = 0
    while True:
        _, g_next = loop(z_next)
        keep = loop.drop()
        if loop.done:
            break
        if keep is not None:
            z, g, z_next, g_next = z[keep], g[keep], z_next[keep], g_next[keep]
            dz, dg, gram = dz[keep], dg[keep], gram[keep]
        slot = k % m
        k += 1
        torch.sub(z_next, z, out=dz[:, slot])
        torch.sub(g_next, g, out=dg[:, slot])
        z, g = z_next, g_next
        row = torch.bmm(dg, dg[:, slot, :, None]).squeeze(2).double()  # (n, m)
        gram[:, slot, :] = row
        gram[:, :, slot] = row
        rhs = torch.bmm(dg, g[:, :, None]).double()  # (n, m, 1)
        trace = gram.diagonal(dim1=1, dim2=2).sum(1)  # (n,)
        lam = reg * trace + torch.finfo(torch.float64).tiny
        chol, info = torch.linalg.cholesky_ex(gram + lam[:, None, None] * eye)
        gamma = torch.cholesky_solve(rhs, chol)  # (n, m, 1)
        ok = (info == 0) & torch.isfinite(gamma).all(dim=(1, 2))
        gamma = torch.where(ok[:, None, None], gamma, torch.zeros_like(gamma)).to(z.dtype)
        gamma_t = gamma.transpose(1, 2)  # (n, 1, m): two thin products, no (n, m, D) temporary
        z_next = z + beta * (g - torch.bmm(gamma_t, dg).squeeze(1)) - torch.bmm(gamma_t, dz).squeeze(1)
    return loop.result()
