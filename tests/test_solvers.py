"""Every registered solver against problems with known answers, plus the failure modes."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from solvers import (SOLVERS, SolverError, Status, UnknownSolverError, get_solver, solve,
                     solver_options)

F64 = torch.float64
ALL = sorted(SOLVERS)
ACCELERATED = ["anderson", "broyden"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def residual(f, z):
    """Recomputed relative residual per sample, independent of the solver's bookkeeping."""
    fz = f(z)
    return ((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1))


def contractive_affine(b=4, d=6, lip=0.7, seed=0):
    """f(z) = z A^T + c with ||A||_2 = lip; z* = (I - A)^{-1} c exactly."""
    g = gen(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    a = lip * a / torch.linalg.matrix_norm(a, 2)
    c = torch.randn(b, d, generator=g, dtype=F64)
    z_star = torch.linalg.solve(torch.eye(d, dtype=F64) - a, c.T).T
    return (lambda z: z @ a.T + c), z_star


def tanh_layer(b=3, d=5, seed=1):
    g = gen(seed)
    w = 0.8 * torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    c = torch.randn(b, d, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ w.T + c)), w.numpy(), c.numpy()


@pytest.mark.parametrize("name", ALL)
def test_cos_fixed_point(name):
    z0 = torch.tensor([0.0, 1.0, -1.0], dtype=F64)  # batch of scalars, shape (B,)
    r = solve(torch.cos, z0, method=name, tol=1e-12, max_iter=300)
    assert r.status is Status.CONVERGED, r.message
    assert torch.allclose(r.z, torch.full_like(z0, 0.7390851332151607), atol=1e-11)
    assert r.z.shape == z0.shape


@pytest.mark.parametrize("name", ALL)
def test_contractive_affine_exact(name):
    f, z_star = contractive_affine()
    r = solve(f, torch.zeros_like(z_star), method=name, tol=1e-11, max_iter=300)
    assert r.converged.all(), r.message
    assert torch.allclose(r.z, z_star, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_tanh_layer_against_scipy_root(name):
    f, w, c = tanh_layer()
    r = solve(f, torch.zeros(c.shape, dtype=F64), method=name, tol=1e-12, max_iter=300)
    assert r.converged.all(), r.message
    for b in range(c.shape[0]):
        sol = scipy.optimize.root(lambda z: np.tanh(w @ z + c[b]) - z, np.zeros(c.shape[1]), tol=1e-14)
        assert sol.success
        np.testing.assert_allclose(r.z[b].numpy(), sol.x, atol=1e-10)


@pytest.mark.parametrize("name", ACCELERATED)
def test_accelerated_solvers_beat_plain_iteration_on_slow_map(name):
    """Symmetric A with eigenvalues up to 0.98: plain iteration needs ~900 steps for 1e-8."""
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(3), dtype=F64))
    a = q @ torch.diag(torch.linspace(0.0, 0.98, d, dtype=F64)) @ q.T
    c = torch.randn(4, d, generator=gen(4), dtype=F64)
    f = lambda z: z @ a + c
    z0 = torch.zeros(4, d, dtype=F64)
    plain = solve(f, z0, method="fixed_point_iter", tol=1e-8, max_iter=2000)
    fast = solve(f, z0, method=name, tol=1e-8, max_iter=2000)
    assert plain.converged.all() and fast.converged.all()
    assert fast.n_f_evals * 10 < plain.n_f_evals, (fast.n_f_evals, plain.n_f_evals)


def oscillating_tanh(b=4, d=32):
    """tanh(W z + c), W symmetric with eigenvalues down to -1.8: plain iteration oscillates."""
    g = gen(7)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    w = q @ torch.diag(torch.linspace(-1.8, 0.9, d, dtype=F64)) @ q.T
    c = torch.randn(b, d, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ w + c)), b, d


@pytest.mark.parametrize("name", ACCELERATED)
def test_hard_map_where_plain_iteration_fails(name):
    """tanh(W z + c), W symmetric with eigenvalues down to -1.8: plain iteration oscillates."""
    f, b, d = oscillating_tanh()
    plain = solve(f, torch.zeros(b, d, dtype=F64), method="fixed_point_iter", tol=1e-8, max_iter=200)
    assert plain.status is Status.MAX_ITER and not plain.converged.any()
    r = solve(f, torch.zeros(b, d, dtype=F64), method=name, tol=1e-8, max_iter=200)
    assert r.status is Status.CONVERGED, r.message
    assert (residual(f, r.z) < 1e-8).all()


def per_sample_speeds(b=6, d=16):
    """Sample i is z -> tanh(s_i A z + c_i), s_i from 0.05 to 0.95: very different speeds."""
    g = gen(11)
    a = torch.randn(d, d, generator=g, dtype=F64)
    a = a / torch.linalg.matrix_norm(a, 2)
    scale = torch.linspace(0.05, 0.95, b, dtype=F64)[:, None]
    c = torch.randn(b, d, generator=g, dtype=F64)
    calls = []

    def f(z, idx=None):
        calls.append(None if idx is None else idx.clone())
        s, cc = (scale, c) if idx is None else (scale[idx], c[idx])
        return torch.tanh(s * (z @ a.T) + cc)

    return f, calls


@pytest.mark.parametrize("name", ALL)
def test_per_sample_convergence_freezes_finished_samples(name):
    f, _ = per_sample_speeds()
    z0 = torch.zeros(6, 16, dtype=F64)
    batch = solve(f, z0, method=name, tol=1e-10, max_iter=500)
    assert batch.converged.all()
    steps = batch.n_steps.tolist()
    assert steps[0] < steps[-1], steps  # the most contractive sample stops first
    assert batch.trace.shape == (6, batch.n_f_evals)
    for i in range(6):
        assert torch.isfinite(batch.trace[i, : steps[i]]).all()
        assert torch.isnan(batch.trace[i, steps[i]:]).all()
    # A sample's answer and step count do not depend on the slower samples beside it.
    for i in (0, 5):
        alone = solve(lambda z: f(z, torch.tensor([i])), z0[i:i + 1], method=name, tol=1e-10, max_iter=500)
        assert alone.n_steps.item() == steps[i]
        assert torch.allclose(alone.z[0], batch.z[i], atol=1e-13, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_subbatch_evaluates_only_active_samples(name):
    f, calls = per_sample_speeds()
    z0 = torch.zeros(6, 16, dtype=F64)
    whole = solve(f, z0, method=name, tol=1e-10, max_iter=500)
    calls.clear()
    sub = solve(f, z0, method=name, tol=1e-10, max_iter=500, subbatch=True)
    assert torch.equal(sub.n_steps, whole.n_steps)
    assert torch.allclose(sub.z, whole.z, atol=1e-13, rtol=0)
    sizes = [len(idx) for idx in calls]
    assert sizes[0] == 6 and sizes[-1] < 6 and sizes == sorted(sizes, reverse=True), sizes
    assert sub.n_f_rows == sum(sizes) == int(sub.n_steps.sum())
    assert whole.n_f_rows == 6 * whole.n_f_evals > sub.n_f_rows
    # idx names exactly the samples still running.
    for k, idx in enumerate(calls):
        assert idx.tolist() == [i for i in range(6) if sub.n_steps[i] > k]


@pytest.mark.parametrize("name", ALL)
def test_reported_residual_is_that_of_returned_z(name):
    f, w, c = tanh_layer(b=4, d=8, seed=5)
    r = solve(f, torch.zeros(4, 8, dtype=F64), method=name, tol=1e-5, max_iter=40)
    fz = f(r.z)
    abs_res = (fz - r.z).norm(dim=1)
    torch.testing.assert_close(r.abs_residual, abs_res, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(r.rel_residual, abs_res / fz.norm(dim=1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(r.residual, r.rel_residual)


def test_damped_iteration_reports_true_residual_not_damped_step():
    f, z_star = contractive_affine(lip=0.5)
    r = solve(f, torch.zeros_like(z_star), method="fixed_point_iter", tau=0.3, tol=1e-9, max_iter=500)
    assert r.converged.all()
    # A damped step is tau times shorter than the residual: a solver that reported the step
    # would claim convergence at z with ||f(z) - z|| ~ 3x tol.
    assert (residual(f, r.z) < 1e-9).all()
    assert torch.allclose(r.z, z_star, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_stop_mode_is_honoured(name):
    """A map of scale 1e4 started 1 away from its fixed point: rel 1e-3 holds at once, abs does not."""
    f, z_star = contractive_affine(b=2, d=4, lip=0.6, seed=2)
    z0 = z_star + 1.0
    g = lambda z: f(z - 1e4) + 1e4  # fixed point z_star + 1e4
    z0 = z0 + 1e4
    rel = solve(g, z0, method=name, tol=1e-3, max_iter=500, stop_mode="rel")
    abs_ = solve(g, z0, method=name, tol=1e-3, max_iter=500, stop_mode="abs")
    assert rel.n_f_evals == 1 and rel.converged.all()
    assert (rel.abs_residual > 1e-3).all() and (rel.rel_residual < 1e-3).all()
    assert abs_.n_f_evals > 1 and abs_.converged.all() and (abs_.abs_residual < 1e-3).all()


@pytest.mark.parametrize("name", ALL)
def test_divergent_map_reports_divergence(name):
    r = solve(lambda z: 2.0 * z + 1.0, torch.zeros(3, 2, dtype=F64), method=name, max_iter=200)
    if r.status is Status.CONVERGED:  # z = -1 is a repelling fixed point Newton-like methods may find
        assert name != "fixed_point_iter"
        assert torch.allclose(r.z, torch.full_like(r.z, -1.0))
    else:
        assert r.status is Status.DIVERGED, r.message
        assert r.diverged.all() and not r.converged.any()
        assert "diverged" in r.message
        assert r.n_f_evals < 200  # stopped early, not at max_iter
        with pytest.raises(SolverError, match="DIVERGED"):
            r.raise_for_status()


@pytest.mark.parametrize("name", ALL)
def test_growing_map_with_no_fixed_point_is_not_called_converged(name):
    """z -> z + 1 has no fixed point, yet its relative residual 1/||z|| shrinks as z grows."""
    r = solve(lambda z: z + 1.0, torch.zeros(2, 3, dtype=F64), method=name, tol=1e-6, max_iter=100)
    assert not r.converged.any()
    assert r.status in (Status.DIVERGED, Status.MAX_ITER), r.message


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_values_are_caught_per_sample(name):
    def f(z):
        out = 0.5 * z + 1.0
        return torch.cat([out[:1], torch.sqrt(out[1:2] - 10.0), out[2:]])  # sample 1: nan

    r = solve(f, torch.zeros(3, 2, dtype=F64), method=name, tol=1e-10, max_iter=200)
    assert r.status is Status.NONFINITE, r.message
    assert r.nonfinite.tolist() == [False, True, False]
    assert r.converged.tolist() == [True, False, True]
    assert torch.isfinite(r.z).all()  # the nan never lands in the returned iterate
    assert torch.allclose(r.z[0], torch.full((2,), 2.0, dtype=F64))
    assert "non-finite" in r.message


def test_max_iter_status_and_message():
    f, z_star = contractive_affine(lip=0.9)
    r = solve(f, torch.zeros_like(z_star), method="fixed_point_iter", tol=1e-12, max_iter=5)
    assert r.status is Status.MAX_ITER
    assert r.n_f_evals == 5 and (r.n_steps == 5).all()
    assert "stopped at max_iter" in r.message and "0/4" in r.message
    with pytest.raises(SolverError):
        r.raise_for_status()


def test_unknown_solver_name_lists_choices():
    with pytest.raises(UnknownSolverError) as e:
        get_solver("andersen")
    msg = str(e.value)
    assert "did you mean 'anderson'" in msg
    for name in ALL:
        assert name in msg
    with pytest.raises(KeyError):  # still a KeyError for callers that catch that
        solve(torch.cos, torch.zeros(2), method="newton")


def test_misspelled_option_raises_with_valid_options():
    with pytest.raises(TypeError, match=r"no option 'stop_mod'.*did you mean 'stop_mode'"):
        solve(torch.cos, torch.zeros(2), method="anderson", stop_mod="rel")
    with pytest.raises(TypeError, match="valid options: .*tau"):
        solve(torch.cos, torch.zeros(2), method="fixed_point_iter", lam=1e-4)
    assert "reg" in solver_options("anderson") and "m" in solver_options("broyden")


@pytest.mark.parametrize("bad", [dict(tol=0), dict(tol=float("nan")), dict(max_iter=0),
                                 dict(max_iter=2.5), dict(stop_mode="relative"),
                                 dict(divergence_ratio=0.5)])
@pytest.mark.parametrize("name", ALL)
def test_bad_option_values_fail_at_once(name, bad):
    with pytest.raises(ValueError):
        solve(torch.cos, torch.zeros(2), method=name, **bad)


def test_bad_z0_fails_at_once():
    with pytest.raises(TypeError, match="floating-point"):
        solve(torch.cos, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch dimension"):
        solve(torch.cos, torch.tensor(0.0))


def test_anderson_survives_singular_least_squares():
    """Every sample sits in a 1-d affine subspace: residual differences are collinear."""
    c = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64).repeat(3, 1)
    r = solve(lambda z: 0.5 * z.sum(1, keepdim=True).expand_as(z) / 4 + c, torch.zeros(3, 4, dtype=F64),
              method="anderson", reg=0.0, tol=1e-10, max_iter=100)
    assert r.status is Status.CONVERGED, r.message


@pytest.mark.parametrize("name", ALL)
def test_blown_up_sample_is_never_called_converged(name):
    """g(z) = 1 + 0.1 tanh(z) has no root; quasi-Newton steps fly off to huge ||z||, where the
    relative residual ~1/||z|| is tiny. That is divergence, not convergence."""
    r = solve(lambda z: z + 1.0 + 0.1 * torch.tanh(z), torch.zeros(4, 3, dtype=F64), method=name,
              tol=1e-4, max_iter=200)
    assert not r.converged.any(), r.message
    assert r.status in (Status.DIVERGED, Status.MAX_ITER)
    if name != "fixed_point_iter":
        assert r.status is Status.DIVERGED


@pytest.mark.parametrize("m", [1, 2, 3])
def test_broyden_with_small_memory_restarts_and_converges(m):
    f, z_star = contractive_affine(b=3, d=12, lip=0.9, seed=9)
    r = solve(f, torch.zeros_like(z_star), method="broyden", m=m, tol=1e-10, max_iter=500)
    assert r.converged.all(), r.message
    assert r.n_f_evals > m + 1  # the memory really filled up and restarted
    assert torch.allclose(r.z, z_star, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_solvers_build_no_graph_even_with_grad_enabled(name):
    w = torch.nn.Parameter(0.5 * torch.eye(3, dtype=F64))
    r = solve(lambda z: torch.tanh(z @ w + 1.0), torch.ones(2, 3, dtype=F64), method=name, tol=1e-8)
    assert r.converged.all() and not r.z.requires_grad and r.z.grad_fn is None


@pytest.mark.parametrize("options", [{"block_size": 4}, {"safeguard": 1.0}, {"block_size": 4, "safeguard": 1.0}])
def test_anderson_variants_find_the_exact_fixed_point(options):
    # 12 coupled elements as 3 blocks of 4: mixing per block is no longer exact for a linear map
    # (it converges, more slowly: 1.9e-8 after 300 evaluations here), but it must get there.
    f, z_star = contractive_affine(b=4, d=12, lip=0.9, seed=3)
    r = solve(f, torch.zeros_like(z_star), method="anderson", tol=1e-7, max_iter=300, **options)
    assert r.converged.all(), r.message
    torch.testing.assert_close(r.z, z_star, atol=1e-5, rtol=0)


def _textbook_anderson(f, z0, m, beta, reg, n_evals):
    """Anderson type II written out sample by sample (Walker & Ni): the relative residual of each
    of n_evals iterates, (B, n_evals)."""
    zs, gs, norms = [z0], [], []
    for k in range(n_evals):
        fz = f(zs[-1])
        gs.append(fz - zs[-1])
        norms.append(gs[-1].norm(dim=1) / fz.norm(dim=1))
        if k == 0:
            zs.append(zs[-1] + beta * gs[-1])
            continue
        lo, nxt = max(0, k - m), []
        for b in range(z0.shape[0]):
            dz = torch.stack([zs[i + 1][b] - zs[i][b] for i in range(lo, k)], 1)  # (d, <= m)
            dg = torch.stack([gs[i + 1][b] - gs[i][b] for i in range(lo, k)], 1)
            gram = dg.T @ dg
            ridge = reg * gram.trace() * torch.eye(gram.shape[0], dtype=gram.dtype)
            gamma = torch.linalg.solve(gram + ridge, dg.T @ gs[-1][b])
            nxt.append(zs[-1][b] + beta * gs[-1][b] - (dz + beta * dg) @ gamma)
        zs.append(torch.stack(nxt))
    return torch.stack(norms, 1)


@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_anderson_iterates_are_the_textbook_ones(beta):
    # unguarded, so every step is a mixed one; the ring buffer, the Gram update and the combined
    # history must give the written-out least-squares step on every iterate, in float64
    f = tanh_layer(b=3, d=5, seed=1)[0]
    z0 = torch.randn(3, 5, generator=gen(7), dtype=F64)
    m, n = 3, 12
    r = solve(f, z0, method="anderson", m=m, beta=beta, reg=1e-6, safeguard=None, tol=1e-30, max_iter=n)
    want = _textbook_anderson(f, z0, m, beta, 1e-6, n)
    torch.testing.assert_close(r.trace, want, rtol=1e-7, atol=1e-14)


def test_one_block_is_plain_anderson():
    f, z_star = contractive_affine(b=3, d=8, lip=0.9, seed=4)
    a = solve(f, torch.zeros_like(z_star), method="anderson", tol=1e-10, max_iter=200)
    b = solve(f, torch.zeros_like(z_star), method="anderson", tol=1e-10, max_iter=200, block_size=8)
    assert torch.equal(a.n_steps, b.n_steps) and torch.allclose(a.z, b.z, atol=1e-12, rtol=0)


def test_safeguarded_anderson_still_converges_where_plain_iteration_fails():
    # The oscillating map of test_hard_map_where_plain_iteration_fails, where plain iteration
    # never converges: rejected mixed steps fall back to plain ones, and the safeguarded solve
    # must still converge like unguarded Anderson (the fallback does not trap it in oscillation).
    f, b, d = oscillating_tanh()
    plain = solve(f, torch.zeros(b, d, dtype=F64), method="anderson", tol=1e-8, max_iter=300)
    guarded = solve(f, torch.zeros(b, d, dtype=F64), method="anderson", tol=1e-8, max_iter=300, safeguard=1.0)
    assert plain.converged.all() and guarded.converged.all(), guarded.message
    assert (residual(f, guarded.z) < 1e-8).all()


def test_guarded_broyden_goes_back_and_finishes_by_plain_steps():
    """broyden(safeguard=1): at the first quasi-Newton step whose residual grows, the sample goes
    back to the iterate it came from and, with max_restarts 0, takes plain steps z <- f(z) from
    there: every point evaluated after the rejected one is f of the point before it."""
    g = gen(0)
    w = 1.5 * torch.randn(32, 32, generator=g, dtype=F64) / math.sqrt(32)  # not a contraction
    c = torch.randn(1, 32, generator=g, dtype=F64)
    seen = []

    def f(z):
        seen.append(z.clone())
        return torch.tanh(z @ w.T + c)

    r = solve(f, torch.zeros(1, 32, dtype=F64), method="broyden", tol=1e-8, max_iter=60, safeguard=1.0)
    trace, points = r.trace[0], list(seen)
    k = next(i for i in range(1, len(trace)) if trace[i] > trace[i - 1])  # the rejected point
    assert k > 2  # quasi-Newton steps were taken before it
    assert torch.allclose(points[k + 1], f(points[k - 1]))  # back one iterate, then the plain step
    assert all(torch.allclose(points[j + 1], f(points[j])) for j in range(k + 1, len(points) - 1))
    unguarded = solve(f, torch.zeros(1, 32, dtype=F64), method="broyden", tol=1e-8, max_iter=60)
    assert torch.equal(unguarded.trace[0, :k + 1], trace[:k + 1])  # the same solve until the rejection


def test_guarded_anderson_rows_finish_by_plain_steps_after_their_rejection():
    """anderson's default (safeguard 1, max_restarts 0) on a batch whose rows are rejected at
    different steps: each row goes back one iterate at its rejection and takes plain steps
    z <- f(z) from there, while the others still mix, and the solve is the unguarded one until
    the first rejection."""
    g = gen(0)
    w = 2.0 * torch.randn(32, 32, generator=g, dtype=F64) / math.sqrt(32)  # far from a contraction
    c = torch.randn(4, 32, generator=g, dtype=F64)
    seen = []

    def f(z):
        seen.append(z.clone())
        return torch.tanh(z @ w.T + c)

    r = solve(f, torch.zeros(4, 32, dtype=F64), method="anderson", tol=1e-12, max_iter=60)
    points = list(seen)  # f's calls below add to seen
    assert len(points) == 60 and all(p.shape == (4, 32) for p in points)  # the whole batch at every step
    firsts = []
    for i in range(4):
        trace = r.trace[i]
        # its rejected point: the first mixed step (step 0 is plain) whose residual grew
        k = next(j for j in range(2, len(trace)) if trace[j] > trace[j - 1])
        firsts.append(k)
        assert k > 2  # mixed steps were taken before it
        assert torch.allclose(points[k + 1][i], f(points[k - 1])[i])  # back one iterate, then plain
        assert all(torch.allclose(points[j + 1][i], f(points[j])[i]) for j in range(k + 1, len(points) - 1))
    assert len(set(firsts)) > 1  # the rows were rejected at different steps
    unguarded = solve(f, torch.zeros(4, 32, dtype=F64), method="anderson", tol=1e-12, max_iter=60, safeguard=None)
    k0 = min(firsts)
    assert torch.equal(unguarded.trace[:, :k0 + 1], r.trace[:, :k0 + 1])


@pytest.mark.parametrize("bad, words", [({"block_size": 5}, "does not divide"), ({"block_size": 0}, "block_size"),
                                        ({"safeguard": 0}, "safeguard"), ({"safeguard": "x"}, "safeguard")])
def test_anderson_bad_variant_options(bad, words):
    with pytest.raises(ValueError, match=words):
        solve(lambda z: 0.5 * z, torch.zeros(2, 12, dtype=F64), method="anderson", **bad)


@pytest.mark.parametrize("bad", [{"safeguard": 0}, {"safeguard": True}, {"max_restarts": -1}, {"max_restarts": 1.5}])
def test_broyden_bad_safeguard_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        solve(lambda z: 0.5 * z, torch.zeros(2, 12, dtype=F64), method="broyden", **bad)


@pytest.mark.parametrize("name", ACCELERATED)
def test_warmup_takes_plain_steps_first(name):
    """warmup=k: the first k iterates are plain iteration's (the same residual trace), then the
    solver accelerates from there to the same fixed point, in fewer evaluations than plain."""
    f, z_star = contractive_affine(lip=0.9)[:2]
    z0 = torch.zeros(4, 6, dtype=F64)
    plain = solve(f, z0, method="fixed_point_iter", tol=1e-10, max_iter=500)
    warm = solve(f, z0, method=name, tol=1e-10, max_iter=500, warmup=5)
    # iterates z_0 .. z_5 by the warmup, z_6 by the solver's own first (plain) step, z_7 mixed
    torch.testing.assert_close(warm.trace[:, :7], plain.trace[:, :7], rtol=1e-12, atol=0)
    assert not torch.allclose(warm.trace[:, 7], plain.trace[:, 7])  # mixing has started
    assert warm.converged.all() and warm.n_f_evals < plain.n_f_evals
    torch.testing.assert_close(warm.z, z_star, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="warmup"):
        solve(f, z0, method=name, warmup=-1)


def _fast_and_slow_affine(d=6, seed=0):
    """Two samples of z <- A_i z + c_i: A_0 of norm 0.8, A_1 = 0.98 Q with Q orthogonal, so plain
    iteration shrinks sample 1's residual by exactly 0.98 a step. `seen` records f's inputs."""
    g = gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    a = torch.randn(d, d, generator=g, dtype=F64)
    mats = torch.stack((0.8 * a / torch.linalg.matrix_norm(a, 2), 0.98 * q))
    c = torch.randn(2, d, generator=g, dtype=F64)
    seen = []

    def f(z):
        seen.append(z.clone())
        return torch.bmm(mats, z[:, :, None]).squeeze(2) + c
    return f, seen


@pytest.mark.parametrize("name", ACCELERATED)
def test_gate_accelerates_only_the_samples_plain_iteration_contracts(name):
    """gate=0.9: sample 0 (plain iteration contracts it at 0.8 a step or faster) opens its gate
    after 4 plain steps and converges in far fewer evaluations than plain iteration; sample 1
    (0.98 a step) never opens it, so every point it evaluates is f of the one before, exactly
    plain iteration's trace; without the gate the solver converges sample 1 as well."""
    f, seen = _fast_and_slow_affine()
    z0 = torch.zeros(2, 6, dtype=F64)
    plain = solve(f, z0, method="fixed_point_iter", tol=1e-10, max_iter=300)
    seen.clear()
    gated = solve(f, z0, method=name, tol=1e-10, max_iter=300, gate=0.9)
    points = [p[1] for p in seen]  # the slow sample (f sees the whole batch at every call)
    assert len(points) == 300
    assert gated.converged[0] and gated.n_steps[0] < plain.n_steps[0] / 2
    assert not gated.converged[1] and int(gated.n_steps[1]) == 300
    both = torch.stack((points[0], points[0]))  # f of one state, read at row 1
    assert all(torch.allclose(points[j + 1], f(both.copy_(points[j]))[1], rtol=1e-12, atol=1e-14)
               for j in range(len(points) - 1))
    torch.testing.assert_close(gated.trace[1], plain.trace[1], rtol=1e-9, atol=0)
    ungated = solve(f, z0, method=name, tol=1e-10, max_iter=300)
    assert ungated.converged.all()


@pytest.mark.parametrize("name", ACCELERATED)
def test_the_gate_stays_shut_where_plain_iteration_is_repelled(name):
    """z <- 1.2 Q z + c (Q orthogonal): plain iteration moves away from the fixed point, so the
    gate never opens and the gated solver is plain iteration, diverging at the same evaluation,
    while ungated Broyden solves the linear map (the price of the gate, why it is opt-in)."""
    g = gen(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    c = torch.randn(2, 6, generator=g, dtype=F64)
    z0 = torch.zeros(2, 6, dtype=F64)

    def f(z):
        return 1.2 * z @ q.T + c
    plain = solve(f, z0, method="fixed_point_iter", tol=1e-10, max_iter=300)
    gated = solve(f, z0, method=name, tol=1e-10, max_iter=300, gate=0.9)
    assert plain.status == gated.status == Status.DIVERGED
    assert torch.equal(gated.n_steps, plain.n_steps)
    if name == "broyden":
        assert solve(f, z0, method=name, tol=1e-10, max_iter=300).converged.all()


@pytest.mark.parametrize("name", ACCELERATED)
@pytest.mark.parametrize("bad", [0, 1, 1.5, True, "x"])
def test_gate_must_be_a_rate_below_one(name, bad):
    with pytest.raises(ValueError, match="gate"):
        solve(lambda z: 0.5 * z, torch.zeros(2, 12, dtype=F64), method=name, gate=bad)


def test_where_rows_refuses_out_aliasing_a():
    from solvers._loop import where_rows

    a, b = torch.ones(3, 2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="not a"):
        where_rows(torch.tensor([True, False, True]), a, b, out=a)


@pytest.mark.parametrize("pattern", ["none", "some", "all"])
def test_where_rows_is_torch_where(pattern):
    from solvers._loop import where_rows

    a, b = torch.randn(6, 10, generator=gen(1)), torch.randn(6, 10, generator=gen(2))
    mask = {"none": torch.zeros(6, dtype=torch.bool), "all": torch.ones(6, dtype=torch.bool),
            "some": torch.tensor([True, False, False, True, True, False])}[pattern]
    want = torch.where(mask[:, None], a, b)
    b_before = b.clone()
    got = where_rows(mask, a, b)
    assert torch.equal(got, want) and torch.equal(b, b_before)  # a new tensor, b untouched
    assert got.data_ptr() not in (a.data_ptr(), b.data_ptr())
    out = torch.empty_like(b)
    assert where_rows(mask, a, b, out=out) is out and torch.equal(out, want)
    assert where_rows(mask, a, b, out=b) is b and torch.equal(b, want)  # in place


def _textbook_broyden(f, z0, m, n_evals):
    """Broyden's good update of the inverse Jacobian, dense per sample, restarted from -I when its
    m rank-one terms are used up: the relative residual of each of n_evals iterates, (B, n_evals)."""
    b, d = z0.shape
    hs = [-torch.eye(d, dtype=z0.dtype) for _ in range(b)]
    z, g_prev, step, norms = z0, None, None, []
    for k in range(n_evals):
        fz = f(z)
        g = fz - z
        norms.append(g.norm(dim=1) / fz.norm(dim=1))
        if k == 0:
            step = g
        else:
            new_step = []
            for i in range(b):
                if (k - 1) % m == 0:
                    hs[i] = -torch.eye(d, dtype=z0.dtype)
                s, y, h = step[i], g[i] - g_prev[i], hs[i]
                hy, sh = h @ y, s @ h
                hs[i] = h + torch.outer(s - hy, sh) / (sh @ y)
                new_step.append(-hs[i] @ g[i])
            step = torch.stack(new_step)
        g_prev, z = g, z + step
    return torch.stack(norms, 1)


@pytest.mark.parametrize("m", [3, 20])
def test_broyden_iterates_are_the_textbook_ones(m):
    f = tanh_layer(b=3, d=5, seed=1)[0]
    z0 = torch.randn(3, 5, generator=gen(8), dtype=F64)
    r = solve(f, z0, method="broyden", m=m, tol=1e-30, max_iter=10)
    torch.testing.assert_close(r.trace, _textbook_broyden(f, z0, m, 10), rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("shape", [(6,), (6, 10), (6, 2, 3, 5)])
def test_take_rows_is_index_select(shape):
    from solvers._loop import take_rows

    t = torch.randn(*shape, generator=gen(3))
    idx = torch.tensor([4, 0, 5])
    assert torch.equal(take_rows(t, idx), t[idx])
    strided = torch.randn(*shape[:1], 7, *shape[1:], generator=gen(4)).select(1, 2)  # not contiguous
    assert torch.equal(take_rows(strided, idx), strided[idx])


def _same_result(a, b):
    for name in ("z", "converged", "diverged", "nonfinite", "n_steps", "abs_residual", "rel_residual"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.trace.isnan(), b.trace.isnan())
    assert torch.equal(a.trace.nan_to_num(), b.trace.nan_to_num())
    assert (a.n_f_evals, a.n_f_rows) == (b.n_f_evals, b.n_f_rows)


@pytest.mark.parametrize("subbatch", [False, True])
@pytest.mark.parametrize("name", ["fixed_point_iter", "anderson", "broyden"])
def test_snapshots_are_the_shorter_solves(name, subbatch):
    """Each snapshot of one long solve is, bit for bit, the solve with that max_iter, for samples
    that stop before, between and after the budgets (rows drop out of the solver's state)."""
    g = gen(5)
    b, d = 6, 12
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    w = w / torch.linalg.matrix_norm(w, 2)
    scale = torch.tensor([0.05, 0.5, 0.9, 0.97, 0.995, 0.7], dtype=torch.float64)[:, None]
    c = 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)

    def f(z, idx=None):
        s, cc = (scale, c) if idx is None else (scale[idx], c[idx])
        return torch.tanh(s * (z @ w.T) + cc)

    z0 = torch.zeros(b, d, dtype=torch.float64)
    opts = dict(tol=1e-8, subbatch=subbatch)
    long = solve(f, z0, method=name, max_iter=60, snapshots=(30, 8, 16), **opts)
    assert sorted(long.snapshots) == [8, 16, 30]
    assert int(long.n_steps.min()) < 8 and int(long.n_steps.max()) > 16
    for k, snap in long.snapshots.items():
        _same_result(snap, solve(f, z0, method=name, max_iter=k, **opts))
    _same_result(long, solve(f, z0, method=name, max_iter=60, **opts))
    assert not long.snapshots[8].converged.all() and long.snapshots[8].converged.any()


def test_snapshots_after_every_sample_stopped_are_the_final_result():
    f = lambda z: 0.5 * z + 1.0  # noqa: E731
    res = solve(f, torch.zeros(3, 4), method="fixed_point_iter", tol=1e-3, max_iter=100, snapshots=(2, 50))
    assert res.converged.all() and res.n_f_evals < 50
    _same_result(res.snapshots[50], res)
    assert res.snapshots[2].n_f_evals == 2 and not res.snapshots[2].converged.any()


@pytest.mark.parametrize("bad", [(0,), (10,), (3.0,), "5", 7, (True,)])
def test_snapshots_must_be_budgets_below_max_iter(bad):
    with pytest.raises(ValueError, match="snapshots"):
        solve(lambda z: 0.5 * z, torch.ones(2, 3), method="anderson", max_iter=10, snapshots=bad)
