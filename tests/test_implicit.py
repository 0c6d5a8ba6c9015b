"""Gradients of a fixed point: IFT vs unrolled vs finite differences, in float64."""

import math

import pytest
import torch
from torch import nn

from solvers import SOLVERS
from solvers.implicit import fixed_point

F64 = torch.float64
TIGHT = dict(tol=1e-13, max_iter=300)


class TanhCell(nn.Module):
    """f(z) = tanh(z W^T + x U^T + b), contractive; closes over its input x."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.7 * torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d))
        self.u = nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d))
        self.b = nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=F64))
        self.x = None

    def forward(self, z, idx=None):
        x = self.x if idx is None else self.x[idx]
        return torch.tanh(z @ self.w.T + x @ self.u.T + self.b)


def setup(seed=0, b=3, d=6):
    cell = TanhCell(d, seed)
    g = torch.Generator().manual_seed(seed + 100)
    cell.x = torch.randn(b, d, generator=g, dtype=F64)
    target = torch.randn(b, d, generator=g, dtype=F64)
    return cell, target


def loss_of(z, target):
    return ((z - target) ** 2).sum() + z.sin().sum()


def grads(cell, target, **kw):
    cell.zero_grad()
    x = cell.x.clone().requires_grad_()
    cell.x = x
    z, result = fixed_point(cell, torch.zeros_like(x), **kw)
    loss_of(z, target).backward()
    out = {n: p.grad.clone() for n, p in cell.named_parameters()}
    out["x"] = x.grad.clone()
    cell.x = x.detach()
    return out, result


def rel_err(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def test_ift_matches_finite_differences():
    cell, target = setup()
    ift, _ = grads(cell, target, solver_options=TIGHT, b_solver_options=dict(tol=1e-13))
    eps = 1e-6
    with torch.no_grad():
        for name, p in cell.named_parameters():
            flat = p.view(-1)
            for i in range(0, flat.numel(), 5):  # every 5th coordinate keeps it fast
                old = flat[i].item()
                vals = []
                for sign in (1, -1):
                    flat[i] = old + sign * eps
                    z, r = fixed_point(cell, torch.zeros_like(cell.x), solver_options=TIGHT)
                    assert r.converged.all()
                    vals.append(loss_of(z, target).item())
                flat[i] = old
                fd = (vals[0] - vals[1]) / (2 * eps)
                assert abs(fd - ift[name].view(-1)[i].item()) < 1e-7 * max(1.0, abs(fd)), (name, i)


def test_ift_matches_unrolled_backprop():
    cell, target = setup(seed=1)
    ift, r = grads(cell, target, solver_options=TIGHT, b_solver_options=dict(tol=1e-13))
    unrolled, ur = grads(cell, target, grad="unroll", unroll_steps=150)
    assert r.converged.all() and ur.converged.all()
    assert rel_err(unrolled, ift) < 1e-9


@pytest.mark.parametrize("b_solver", sorted(SOLVERS))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_pair_gives_the_same_gradient(solver, b_solver):
    cell, target = setup(seed=2)
    ref, _ = grads(cell, target, solver_options=TIGHT, b_solver_options=dict(tol=1e-13))
    seen = []
    g, r = grads(cell, target, solver=solver, solver_options=TIGHT, b_solver=b_solver,
                 b_solver_options=dict(tol=1e-12, max_iter=300), on_backward=seen.append)
    assert r.converged.all()
    assert len(seen) == 1 and seen[0].converged.all() and seen[0].solver == b_solver
    assert rel_err(g, ref) < 1e-9


def test_phantom_is_an_approximation_that_improves_with_steps():
    cell, target = setup(seed=3)
    ift, _ = grads(cell, target, solver_options=TIGHT, b_solver_options=dict(tol=1e-13))
    one, _ = grads(cell, target, grad="phantom", solver_options=TIGHT)
    many, _ = grads(cell, target, grad="phantom", phantom_steps=80, solver_options=TIGHT)
    damped, _ = grads(cell, target, grad="phantom", phantom_steps=3, phantom_tau=0.5, solver_options=TIGHT)
    assert rel_err(one, ift) > 0.01  # one step is off by a visible margin
    assert rel_err(many, ift) < 1e-8  # k steps from z* is the truncated Neumann series
    assert rel_err(damped, ift) > 0.01


def test_output_value_is_the_fixed_point_and_no_grad_skips_graph():
    cell, _ = setup(seed=4)
    z, r = fixed_point(cell, torch.zeros_like(cell.x), solver_options=TIGHT)
    assert torch.equal(z.detach(), r.z) and z.requires_grad
    with torch.no_grad():
        z2, r2 = fixed_point(cell, torch.zeros_like(cell.x), solver_options=TIGHT)
    assert torch.equal(z2, r2.z) and not z2.requires_grad


def test_subbatch_forward_with_module_cell():
    cell, target = setup(seed=5, b=4)
    ref, _ = grads(cell, target, solver_options=TIGHT, b_solver_options=dict(tol=1e-13))
    sub, r = grads(cell, target, solver_options=dict(TIGHT, subbatch=True), b_solver_options=dict(tol=1e-13))
    assert r.n_f_rows <= 4 * r.n_f_evals
    assert rel_err(sub, ref) < 1e-9


def test_bad_arguments_fail_at_once():
    cell, _ = setup()
    z0 = torch.zeros_like(cell.x)
    with pytest.raises(ValueError, match="unknown grad 'implicit'.*ift, phantom, unroll"):
        fixed_point(cell, z0, grad="implicit")
    with pytest.raises(TypeError, match="no option 'tolerance'"):
        fixed_point(cell, z0, solver_options=dict(tolerance=1e-3))
    with pytest.raises(TypeError, match="no option 'lam'"):
        fixed_point(cell, z0, b_solver_options=dict(lam=1e-3))
    with pytest.raises(KeyError, match="unknown solver 'newton'"):
        fixed_point(cell, z0, b_solver="newton")
    with pytest.raises(ValueError, match="phantom_steps"):
        fixed_point(cell, z0, grad="phantom", phantom_steps=0)


def test_without_autograd_every_mode_returns_the_solvers_fixed_point():
    cell, _ = setup(seed=6)
    z0 = torch.zeros_like(cell.x)
    with torch.no_grad():
        ref, r = fixed_point(cell, z0, solver_options=TIGHT)
        for grad in ("phantom", "unroll"):
            z, rg = fixed_point(cell, z0, grad=grad, unroll_steps=2, solver_options=TIGHT)
            assert torch.equal(z, ref) and rg.solver == "anderson" and rg.converged.all()
