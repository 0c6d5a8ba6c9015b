"""Regularizers of a fixed-point map's Jacobian, for training DEQs that stay stable.

    fz = f(z, x)                                   # z: the fixed point, detached, requires_grad
    loss = task_loss + w * jacobian_frobenius(fz, z, generator=g)

Bai, Koltun, Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021:
penalizing ||J||_F^2 (J = df/dz at the fixed point) keeps the forward and backward solves
contractive. Estimated without forming J, by Hutchinson: E_v ||v^T J||^2 = ||J||_F^2 for
v ~ N(0, I), one vector-Jacobian product per sample vector. Same normalization as torchdeq's
`jac_reg` (divided by the number of elements of z), but the vectors come from a
`torch.Generator` you pass, never from the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jacobian_frobenius(fz: Tensor, z: Tensor, *, n_samples: int = 1, generator: torch.Generator | None = None,
                       create_graph: bool = True) -> Tensor:
    """Hutchinson estimate of ||df/dz||_F^2 / z.numel() (a 0-d tensor), from fz = f(z) built with
    z.requires_grad. `create_graph=True` keeps it differentiable, to train on."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not z.requires_grad:
        raise ValueError("z must require grad, and fz be computed from it (z.requires_grad_() before f(z))")
    total = fz.new_zeros(())
    for k in range(n_samples):
        v = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
        (vjp,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph)
        total = total + vjp.pow(2).sum()
    return total / n_samples / z.numel()


def spectral_radius_estimate(fz: Tensor, z: Tensor, *, n_iters: int = 10,
                             generator: torch.Generator | None = None) -> Tensor:
    """Power iteration on J^T by vector-Jacobian products: per sample (B,), the geometric mean
    growth ||J^T v|| / ||v|| over the second half of the iterations, which tends to rho(J) also
    when the dominant eigenvalues are a complex pair. A cheap estimate for logging (no gradient)."""
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 2:
        raise ValueError(f"n_iters must be an integer >= 2, got {n_iters!r}")
    b = z.shape[0]
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
    logs = []
    for k in range(n_iters):
        norm = v.reshape(b, -1).norm(dim=1).clamp_min(1e-300)
        v = v / norm.reshape(-1, *[1] * (z.dim() - 1))
        (w,) = torch.autograd.grad(fz, z, v, retain_graph=True)
        logs.append(w.reshape(b, -1).norm(dim=1).clamp_min(1e-300).log())
        v = w.detach()
    return torch.stack(logs[n_iters // 2:]).mean(0).exp().detach()


def spectral_radius_penalty(fz: Tensor, z: Tensor, target: float, *, n_iters: int = 5, one_sided: bool = False,
                            generator: torch.Generator | None = None) -> Tensor:
    """A differentiable pull of rho(J) toward `target`: mean over samples of (s - target)^2, or of
    relu(s - target)^2 with one_sided, where s = ||J^T v|| for the unit vector v reached by
    `n_iters` power iterations on J^T (without gradient). s tends to |lambda_max| of J, so this
    shapes the loop's contraction rate itself, where the Frobenius norm only shrinks every
    direction at once."""
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
    if not z.requires_grad:
        raise ValueError("z must require grad, and fz be computed from it (z.requires_grad_() before f(z))")
    b = z.shape[0]
    shape = (-1, *[1] * (z.dim() - 1))
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
    for _ in range(n_iters):
        v = v / v.reshape(b, -1).norm(dim=1).clamp_min(1e-30).reshape(shape)
        (w,) = torch.autograd.grad(fz, z, v, retain_graph=True)
        v = w.detach()
    v = v / v.reshape(b, -1).norm(dim=1).clamp_min(1e-30).reshape(shape)
    (w,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=True)
    s = w.reshape(b, -1).norm(dim=1)
    gap = (s - target).clamp_min(0) if one_sided else s - target
    return gap.pow(2).mean()


def fp_correction(loss_fn, states: list, *, gamma: float | None = 0.8) -> Tensor:
    """Fixed-point correction (Bai et al., "Deep Equilibrium Optical Flow Estimation", CVPR 2022):
    the loss of every state of a sequence that converges to the fixed point, the k-th of n
    weighted gamma ** (n - 1 - k) (the last weighs 1; torchdeq's 'exp' weights), or equally
    with gamma=None (torchdeq's 'const'). `loss_fn(state)` scores one state. Returns the weighted
    sum; `fp_weights` gives the weights, e.g. to normalize by their sum."""
    if not states:
        raise ValueError("fp_correction needs at least one state")
    return sum(w * loss_fn(s) for w, s in zip(fp_weights(len(states), gamma), states))


def fp_weights(n: int, gamma: float | None) -> list[float]:
    """The weights of fp_correction for n states: gamma ** (n - 1 - k), or all 1 for gamma=None."""
    if gamma is not None and not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1] or None, got {gamma!r}")
    return [1.0 if gamma is None else gamma ** (n - 1 - k) for k in range(n)]
