"""deqloop's solvers run inside torchdeq, checked against torchdeq itself and our own path."""

import math
import warnings

import pytest
import torch

from solvers import SOLVERS
from solvers.implicit import fixed_point
from solvers.torchdeq_adapter import register_torchdeq

warnings.filterwarnings("ignore", module="torchdeq")
torchdeq = pytest.importorskip("torchdeq")  # a declared dependency: installed by the README setup

F64 = torch.float64


@pytest.fixture(scope="module")
def names():
    return register_torchdeq()


def problem(seed=0, b=3, d=8):
    g = torch.Generator().manual_seed(seed)
    w = (0.6 * torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)).requires_grad_()
    x = torch.randn(b, d, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ w.T + x)), w, torch.zeros(b, d, dtype=F64)


def test_registered_names(names):
    assert names == [f"deqloop_{n}" for n in SOLVERS]
    from torchdeq.solver import get_solver as torchdeq_get_solver
    for name in names:
        assert callable(torchdeq_get_solver(name))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_forward_matches_torchdeq_own_solver(names, name):
    f, _, z0 = problem()
    ours = torchdeq.get_deq(f_solver=f"deqloop_{name}", f_tol=1e-12, f_max_iter=200, f_stop_mode="rel").eval()
    theirs = torchdeq.get_deq(f_solver="fixed_point_iter", f_tol=1e-12, f_max_iter=200, f_stop_mode="rel").eval()
    with torch.no_grad():
        (z_ours,), info = ours(f, z0)
        (z_theirs,), _ = theirs(f, z0)
    assert torch.allclose(z_ours, z_theirs, atol=1e-10)
    assert (info["rel_lowest"] < 1e-12).all()
    assert info["rel_trace"].shape[0] == 3 and info["nstep"].shape == (3,)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_ift_gradient_through_torchdeq_matches_ours(names, name):
    f, w, z0 = problem(seed=1)
    deq = torchdeq.get_deq(ift=True, f_solver=f"deqloop_{name}", b_solver=f"deqloop_{name}",
                           f_tol=1e-12, b_tol=1e-12, f_max_iter=200, b_max_iter=200,
                           f_stop_mode="rel", b_stop_mode="rel")
    zs, _ = deq(f, z0)
    zs[-1].sin().sum().backward()
    g_torchdeq = w.grad.clone()
    w.grad = None
    z, _ = fixed_point(f, z0, solver_options=dict(tol=1e-12, max_iter=200), b_solver_options=dict(tol=1e-12))
    z.sin().sum().backward()
    assert torch.allclose(zs[-1], z, atol=1e-10)
    assert float((g_torchdeq - w.grad).norm() / w.grad.norm()) < 1e-9


def test_torchdeq_option_names_are_rejected_not_ignored(names):
    f, _, z0 = problem()
    deq = torchdeq.get_deq(f_solver="deqloop_anderson").eval()
    with pytest.raises(TypeError, match="no option 'lam'.*valid options: .*reg"):
        deq(f, z0, solver_kwargs=dict(lam=1e-3))


def test_trajectory_states(names):
    f, _, z0 = problem()
    # The sliced core calls the solver once per state: supported.
    sliced = torchdeq.get_deq(core="sliced", f_solver="deqloop_anderson", n_states=2, f_max_iter=20).train()
    zs, _ = sliced(f, z0)
    assert len(zs) == 2 and all(z.shape == z0.shape for z in zs)
    # The indexing core wants intermediate states of one solve, which we do not keep: refused.
    indexing = torchdeq.get_deq(core="indexing", f_solver="deqloop_anderson", n_states=2, f_max_iter=20).train()
    with pytest.raises(ValueError, match="n_states=1"):
        indexing(f, z0)
