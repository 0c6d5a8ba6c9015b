"""deqloop.diagnostics on cells with known answers, in float64.

- a linear map z -> A z + B x: known spectral radius, norm, singular values of I - A and
  dz*/dx = (I - A)^{-1} B, by the Krylov path and by the dense one;
- an autonomous map with a known finite set of stable fixed points, which the count must find exactly;
- a looped transformer without recall, whose fixed points cannot move with x at all;
- IFT sensitivity against finite differences on nonlinear cells.
"""

import math

import numpy as np
import pytest
import torch

from deqloop import diagnostics as dx
from deqloop.model import ModelConfig, build_model

TIGHT = {"tol": 1e-12, "max_iter": 400, "stop_mode": "abs"}


def linear_problem(n=80, m=5, b=3, rho=0.7, seed=0):
    """f(z, x) = A z + B x with A = Q T Q^T, T upper triangular: eigenvalues known, A non-normal."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    diag = np.concatenate([[rho], rng.uniform(-0.4, 0.4, n - 1)])  # one dominant eigenvalue, well separated
    t = np.diag(diag) + np.triu(0.05 * rng.standard_normal((n, n)), 1)
    a = torch.tensor(q @ t @ q.T)
    bm = torch.tensor(rng.standard_normal((n, m)))
    x = torch.tensor(rng.standard_normal((b, m)))
    f = lambda z, x: z @ a.T + x @ bm.T
    return f, a, bm, x


def test_linear_map_geometry_krylov_and_dense():
    f, a, _, x = linear_problem()
    z_star = dx.solve_cell(f, x, torch.zeros(len(x), a.shape[0], dtype=torch.float64), options=TIGHT).z
    a_np = a.numpy()
    s = np.linalg.svd(np.eye(len(a_np)) - a_np, compute_uv=False)
    full = lambda v: torch.full((3,), float(v), dtype=torch.float64)
    for dense_max in (0, 10**6):  # Arnoldi/Lanczos/GMRES on products with J, then the exact dense Jacobian
        g = dx.geometry(f, x, z_star, dense_max=dense_max, tol=1e-8, adjoint_method="fixed_point_iter",
                        adjoint_options={"tol": 1e-8, "max_iter": 200})
        assert bool(g.converged.all())
        torch.testing.assert_close(g.spectral_radius, full(0.7), rtol=1e-6, atol=0)
        torch.testing.assert_close(g.jacobian_norm, full(np.linalg.norm(a_np, 2)), rtol=1e-6, atol=0)
        torch.testing.assert_close(g.sigma_max, full(s[0]), rtol=1e-6, atol=0)
        torch.testing.assert_close(g.sigma_min, full(s[-1]), rtol=1e-6, atol=0)
        torch.testing.assert_close(g.cond, full(s[0] / s[-1]), rtol=1e-5, atol=0)
        # the adjoint g = A^T g + w converges like the forward: about log(1e-8) / log(0.7) ~ 52 steps
        assert bool(g.adjoint_converged.all()) and int(g.adjoint_steps.max()) < 120
    assert int(g.matvecs[0]) == a.shape[0]  # dense: one product per column


def test_linear_map_sensitivity_is_exact():
    f, a, bm, x = linear_problem()
    z0 = torch.zeros(len(x), a.shape[0], dtype=torch.float64)
    z_star = dx.solve_cell(f, x, z0, options=TIGHT).z
    sens = dx.sensitivity(f, x, z_star, seed=3, fd_options=TIGHT)
    v = dx.unit_directions(x, 3)
    exact = torch.linalg.solve(torch.eye(a.shape[0], dtype=a.dtype) - a, (v @ bm.T).T).T  # (I - A)^{-1} B v
    torch.testing.assert_close(sens.tangent, exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sens.norm, exact.norm(dim=1))
    assert float(sens.rel_error.max()) < 1e-6  # linear: central differences are exact up to the solves
    assert bool(sens.ift_converged.all()) and bool(sens.fd_converged.all())
    torch.testing.assert_close(sens.direct, (v @ bm.T).norm(dim=1))


def test_linear_map_reachability():
    f, a, _, x = linear_problem()
    reach = dx.reachability(f, x, torch.zeros(len(x), a.shape[0], dtype=torch.float64), n_starts=3, seed=1,
                            options={"tol": 1e-10, "max_iter": 300})
    assert bool(reach.converged.all()) and bool(reach.start_converged.all())
    assert reach.start_z.shape == (3, *reach.z_star.shape)
    assert float(reach.path_distance.max()) < 1e-8  # one fixed point: every start finds it
    assert bool(reach.path_independent(1e-6).all())
    # the residual of plain iteration decays like the dominant eigenvalue
    torch.testing.assert_close(reach.decay_rate, torch.full((3,), 0.7, dtype=torch.float64), rtol=0.02, atol=0)


def test_unstable_linear_map_is_reported():
    """rho(A) = 1.3: the spectral radius says so and the adjoint iteration does not converge."""
    f, a, _, x = linear_problem(n=40, rho=1.3)
    g = dx.geometry(f, x, torch.zeros(len(x), 40, dtype=torch.float64), dense_max=0, tol=1e-8,
                    adjoint_method="fixed_point_iter", adjoint_options={"tol": 1e-6, "max_iter": 50})
    torch.testing.assert_close(g.spectral_radius, torch.full((3,), 1.3, dtype=torch.float64), rtol=1e-6, atol=0)
    assert not bool(g.adjoint_converged.any())


def grid_map(z, x):
    """Autonomous: z -> z - 0.3 sin(2 pi z) / (2 pi) per coordinate. Fixed points: the integer grid,
    stable (f' = 0.7); the half-integers are unstable (f' = 1.3)."""
    return z - 0.3 * torch.sin(2 * math.pi * z) / (2 * math.pi)


def test_countability_finds_exactly_the_fixed_points():
    # 13 x 13 starts in (-1.4, 1.4)^2, none on a half-integer: they fall into the 9 basins of {-1, 0, 1}^2
    axis = torch.linspace(-1.4, 1.4, 13, dtype=torch.float64)
    z0 = torch.cartesian_prod(axis, axis)  # (169, 2)
    x = torch.zeros(len(z0), 1, dtype=torch.float64)
    reach = dx.reachability(grid_map, x, z0, n_starts=0, options={"tol": 1e-12, "max_iter": 200, "stop_mode": "abs"})
    assert bool(reach.converged.all())
    count = dx.countability(reach.z_star, tol=1e-2)
    assert count.n_distinct == 9 and count.n_points == 169 and count.n_inputs == 169
    found = {tuple(int(round(v)) for v in reach.z_star[count.labels == c][0].tolist()) for c in range(9)}
    assert found == {(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)}
    assert float((reach.z_star - reach.z_star.round()).abs().max()) < 1e-9
    assert count.max_within < 1e-8 and count.min_between > 0.5
    assert sum(count.cluster_sizes) == 169 and count.n_shared == 9
    # the tolerance decides what counts as one point: a huge one joins everything
    assert [c.n_distinct for c in dx.count_at(reach.z_star, tols=(1e-2, 10.0))] == [9, 1]


def test_countability_labels_in_order_and_empty():
    pts = torch.tensor([[0.0], [1.0], [0.001], [1.002], [5.0]])
    c = dx.countability(pts, torch.tensor([0, 0, 1, 1, 2]), tol=1e-2)
    assert c.labels.tolist() == [0, 1, 0, 1, 2] and c.inputs_per_cluster == [2, 2, 1] and c.n_shared == 2
    assert dx.countability(torch.zeros(0, 3)).n_distinct == 0


def tiny_model(recall, norm="outer", window=3, **kw):
    cfg = ModelConfig(vocab_size=2, n_classes=2, d_model=8, n_heads=2, window=window, recall=recall, norm=norm, **kw)
    model = build_model(cfg, seed=0).double()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    x = model.embed_input(tokens)
    z_star = dx.solve_cell(model.f, x, model.z_init(x), options=TIGHT).z
    return model, x, z_star


def test_no_recall_cell_ignores_x_exactly():
    model, x, z_star = tiny_model("none")
    sens = dx.sensitivity(model.f, x, z_star, seed=0, fd_options=TIGHT)
    for name in ("norm", "fd_norm", "direct", "rel_error", "relative"):
        assert bool((getattr(sens, name) == 0).all()), name
    assert bool((sens.tangent == 0).all()) and bool(sens.fd_converged.all())
    # Every input's fixed point is a fixed point for every other input: the set does not depend on x.
    own = dx.norms(model.f(z_star, x) - z_star) / dx.norms(model.f(z_star, x))
    torch.testing.assert_close(dx.cross_residual(model.f, x, z_star), own, rtol=0, atol=1e-15)
    assert float(own.max()) < 1e-10


@pytest.mark.parametrize("recall", ["standard", "internal"])
def test_ift_sensitivity_matches_finite_differences_on_the_model(recall):
    model, x, z_star = tiny_model(recall)
    sens = dx.sensitivity(model.f, x, z_star, seed=1, fd_options=TIGHT)
    assert bool(sens.ift_converged.all()) and bool(sens.fd_converged.all())
    assert float(sens.norm.min()) > 1e-3  # with recall, z* moves with x
    assert float(sens.rel_error.max()) < 1e-6
    # and z*_i is not a fixed point for another input
    assert float(dx.cross_residual(model.f, x, z_star).min()) > 1e-3


def test_ift_sensitivity_matches_finite_differences_on_tanh_cell():
    g = torch.Generator().manual_seed(0)
    w = 0.9 * torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]  # ||W|| = 0.9
    u = torch.randn(12, 4, generator=g, dtype=torch.float64)
    f = lambda z, x: torch.tanh(z @ w.T + x @ u.T + 0.3)
    x = torch.randn(4, 4, generator=g, dtype=torch.float64)
    z_star = dx.solve_cell(f, x, torch.zeros(4, 12, dtype=torch.float64), options=TIGHT).z
    sens = dx.sensitivity(f, x, z_star, seed=2, fd_options=TIGHT)
    assert float(sens.rel_error.max()) < 1e-6 and float(sens.norm.min()) > 1e-2


def test_linearization_with_global_attention():
    """PyTorch's fused CPU attention has no double backward; the diagnostics must still work on it."""
    model, x, z_star = tiny_model("standard", window=None, n_positions=8)
    lin = dx.Linearization(model.f, x, z_star)
    u = dx.unit_directions(z_star, 4)
    eps = 1e-6
    fd = (model.f(z_star + eps * u, x) - model.f(z_star - eps * u, x)) / (2 * eps)
    torch.testing.assert_close(lin.jvp(u), fd, rtol=1e-6, atol=1e-8)
    w = dx.unit_directions(z_star, 5)
    # <w, J u> == <J^T w, u>
    torch.testing.assert_close((w * lin.jvp(u)).sum(), (lin.vjp(w) * u).sum(), rtol=1e-10, atol=1e-12)


def test_krylov_budget_bounds_the_work():
    """Near a singular I - J the Krylov iterations stop at the budget: nan and not converged, not a hang."""
    f, a, _, x = linear_problem(n=40, rho=1.0)  # eigenvalue exactly 1: I - A singular
    g = dx.geometry(f, x[:1], torch.zeros(1, 40, dtype=torch.float64), dense_max=0, tol=1e-8, max_matvecs=300,
                    adjoint_method="fixed_point_iter", adjoint_options={"tol": 1e-6, "max_iter": 20})
    assert not bool(g.converged[0]) and int(g.matvecs[0]) <= 3 * 301 + 4 * 300 + 1


def test_decay_rate_and_random_starts():
    nan = math.nan
    trace = torch.tensor([[1.0, 0.5, 0.25, 0.125, 0.0625, nan], [1.0, 0.1, nan, nan, nan, nan]])
    rate = dx.decay_rate(trace, torch.tensor([5, 2]))
    assert rate[0].item() == pytest.approx(0.5) and math.isnan(rate[1].item())
    like = torch.zeros(3, 4, 2)
    scale = torch.tensor([1.0, 2.0, 3.0])
    s1, s2 = dx.random_starts(like, 2, 7, scale), dx.random_starts(like, 2, 7, scale)
    assert torch.equal(s1, s2) and s1.shape == (2, 3, 4, 2)
    torch.testing.assert_close(s1.reshape(2, 3, -1).norm(dim=2), scale.expand(2, 3))
    assert not torch.equal(s1, dx.random_starts(like, 2, 8, scale))
