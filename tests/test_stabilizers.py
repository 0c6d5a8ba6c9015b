"""The DEQ stabilizers of solvers/ (regularize, normalize, dropout) against torchdeq's own on the
same inputs and against first principles, and the training options that use them."""

import pytest
import torch
from torch import nn

from deqloop.errors import ConfigError
from deqloop.model import ModelConfig, SolveConfig, build_model
from deqloop.objective import Scored, TrainingObjective, training_loss
from tasks import get_task


# ------------------------------------------------------------------ Jacobian regularization

def _cell(seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5
    return lambda z: torch.tanh(z @ W.T + 0.3)


def test_jacobian_frobenius_matches_torchdeq_on_the_same_vectors():
    from solvers.regularize import jacobian_frobenius
    from torchdeq.loss import jac_reg

    f = _cell()  # float32 z: torchdeq draws float32 vectors and casts them to z's dtype
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
    fz = f(z.double()).float()
    ours = jacobian_frobenius(fz, z, n_samples=3, generator=torch.Generator().manual_seed(7))
    with torch.random.fork_rng(devices=[]):  # torchdeq draws from the global RNG: the same seed, the same vectors
        torch.manual_seed(7)
        theirs = jac_reg(fz, z, vecs=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    ours.backward()  # differentiable (create_graph): the training loss can use it
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_jacobian_frobenius_estimates_the_dense_frobenius_norm():
    from solvers.regularize import jacobian_frobenius, spectral_radius_estimate

    f = _cell(seed=2)
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
    fz = f(z)
    jac = torch.stack([torch.autograd.functional.jacobian(f, z[b:b + 1].detach())[0, :, 0, :] for b in range(3)])
    exact = jac.pow(2).sum() / z.numel()
    est = jacobian_frobenius(fz, z, n_samples=4000, generator=torch.Generator().manual_seed(4), create_graph=False)
    assert abs(float(est) - float(exact)) < 0.05 * float(exact)  # Hutchinson: unbiased, std ~ 1/sqrt(samples)
    rho = spectral_radius_estimate(fz, z, n_iters=200, generator=torch.Generator().manual_seed(5))
    exact_rho = torch.linalg.eigvals(jac).abs().max(dim=1).values
    torch.testing.assert_close(rho, exact_rho, rtol=5e-2, atol=1e-6)
    with pytest.raises(ValueError, match="n_samples"):
        jacobian_frobenius(fz, z, n_samples=0)
    with pytest.raises(ValueError, match="require grad"):
        jacobian_frobenius(fz, z.detach())


# ------------------------------------------------------------------ spectral normalization

def test_spectral_norm_matches_torchdeq_and_normalizes():
    from solvers.normalize import apply_spectral_norm, remove_norm, reset_norm
    from torchdeq.norm import apply_norm
    from torchdeq.norm import reset_norm as td_reset

    def cell(seed):
        torch.manual_seed(seed)  # noqa: the layers' own init; the RNG state is restored by fork_rng below
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))

    with torch.random.fork_rng(devices=[]):
        ours, theirs = cell(0), cell(0)
        assert apply_spectral_norm(ours, generator=torch.Generator().manual_seed(1)) == ["0", "2"]
        apply_norm(theirs, "spectral_norm")
    for a, b in zip(ours, theirs):  # the same starting vectors, then the same update
        if isinstance(a, nn.Linear):
            b.weight_u.copy_(a.weight_u), b.weight_v.copy_(a.weight_v)
    ours.train(), theirs.train()
    for _ in range(3):
        reset_norm(ours), td_reset(theirs)
        for a, b in zip(ours, theirs):
            if isinstance(a, nn.Linear):
                torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    ours(x).sum().backward()  # gradients reach weight_orig and the learned scale
    assert ours[0].weight_orig.grad is not None and ours[0].weight_g.grad is not None
    for _ in range(200):  # with many power iterations sigma is the top singular value: rows of norm ~1
        reset_norm(ours)
    s = torch.linalg.svdvals(ours[2].weight.detach() / ours[2].weight_g.detach())
    assert abs(float(s.max()) - 1.0) < 1e-4
    before = ours(x).detach()
    remove_norm(ours)
    assert isinstance(ours[0].weight, nn.Parameter) and not hasattr(ours[0], "weight_orig")
    torch.testing.assert_close(ours(x), before)


def test_weight_norm_matches_torchdeq_and_keeps_the_function():
    from solvers.normalize import apply_weight_norm, remove_norm, reset_norm
    from torchdeq.norm import apply_norm
    from torchdeq.norm import reset_norm as td_reset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ours = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))
        theirs = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    before = ours(x).detach()
    assert apply_weight_norm(ours) == ["0", "2"]
    apply_norm(theirs, "weight_norm")
    torch.testing.assert_close(ours(x), before)  # g starts at the row norms: the same function
    with torch.no_grad():  # move the direction and the scale; both recompute the same weight
        for a, b in zip(ours, theirs):
            if isinstance(a, nn.Linear):
                a.weight_v.mul_(1.7).add_(0.1), a.weight_g.mul_(0.5)
                b.weight_v.copy_(a.weight_v), b.weight_g.copy_(a.weight_g)
    reset_norm(ours), td_reset(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(a, nn.Linear):
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.weight.norm(dim=1, keepdim=True), a.weight_g.detach())  # rows of norm g
    ours(x).sum().backward()
    assert ours[2].weight_v.grad is not None and ours[2].weight_g.grad is not None
    fixed = nn.Linear(4, 3)
    apply_weight_norm(fixed, learn_scale=False, target_norm=2.0, clip=1.5)  # factor 2/||row||, at most 1.5
    expect = fixed.weight_v * (2.0 / fixed.weight_v.norm(dim=1, keepdim=True)).clamp(max=1.5)
    torch.testing.assert_close(fixed.weight, expect)
    after = ours(x).detach()
    remove_norm(ours)
    assert isinstance(ours[0].weight, nn.Parameter) and not hasattr(ours[0], "weight_v")
    torch.testing.assert_close(ours(x), after)
    with pytest.raises(ValueError, match="target_norm"):
        apply_weight_norm(nn.Linear(2, 2), target_norm=0)


# ------------------------------------------------------------------ the spectral-radius pull

def test_spectral_radius_penalty_on_a_known_linear_map():
    from solvers.regularize import spectral_radius_penalty

    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = (q @ torch.diag(torch.tensor([0.95, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)) @ q.T)
    a = a.requires_grad_()
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    fz = z @ a.T  # J = A, symmetric: rho = 0.95, power iteration on A^T finds it
    pen = spectral_radius_penalty(fz, z, 0.5, n_iters=60, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(pen, torch.tensor(0.45 ** 2, dtype=torch.float64), rtol=1e-6, atol=0)
    pen.backward()  # differentiable in the map's parameters: the pull acts on A
    assert a.grad is not None and float(a.grad.norm()) > 0
    fz = z @ a.detach().T
    below = spectral_radius_penalty(fz, z, 0.99, n_iters=60, one_sided=True, generator=torch.Generator().manual_seed(2))
    assert float(below) == 0.0  # one-sided: a smaller rho is not pushed up
    two = spectral_radius_penalty(fz, z, 0.99, n_iters=60, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(two, torch.tensor(0.04 ** 2, dtype=torch.float64), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="n_iters"):
        spectral_radius_penalty(fz, z, 0.5, n_iters=0)


# ------------------------------------------------------------------ fixed-point correction

def test_fp_correction_matches_torchdeq():
    from solvers.regularize import fp_correction, fp_weights
    from torchdeq.loss import fp_correction as td_fp

    g = torch.Generator().manual_seed(0)
    states = [torch.randn(4, 5, generator=g) for _ in range(4)]
    target = torch.randn(4, 5, generator=g)
    crit = lambda s, y: (s - y).pow(2).mean()
    ours = fp_correction(lambda s: crit(s, target), states, gamma=0.7)
    torch.testing.assert_close(ours, td_fp(crit, (states, target), weight_func="exp", gamma=0.7))
    manual = sum(0.7 ** (3 - k) * crit(s, target) for k, s in enumerate(states))
    torch.testing.assert_close(ours, manual)
    assert fp_weights(3, None) == [1.0, 1.0, 1.0] and fp_weights(3, 0.5) == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="gamma"):
        fp_weights(3, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        fp_correction(lambda s: s, [])


def test_loss_gamma_weighs_the_iterates_along_the_loop():
    task = get_task("prefix_sums")
    logits = [torch.randn(2, 8, 2, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    targets = torch.randint(0, 2, (2, 8), generator=torch.Generator().manual_seed(9))
    scored = Scored(logits[-1], None, None, torch.stack(logits[:-1]))
    solve = SolveConfig(backward="unroll", max_iter=6, loss_every=2, loss_gamma=0.5)
    w = [0.25, 0.5, 1.0]
    expect = sum(wk * task.loss(lg, targets) for wk, lg in zip(w, logits)) / sum(w)
    torch.testing.assert_close(training_loss(task, scored, targets, solve), expect)
    flat = SolveConfig(backward="unroll", max_iter=6, loss_every=2)  # None: all alike, as before
    torch.testing.assert_close(training_loss(task, scored, targets, flat),
                               sum(task.loss(lg, targets) for lg in logits) / 3)
    with pytest.raises(ConfigError, match="loss_gamma"):
        SolveConfig(backward="unroll", max_iter=6, loss_gamma=0.5)  # nothing along the loop to weigh


# ------------------------------------------------------------------ variational dropout

def test_variational_dropout_matches_torchdeq_and_holds_its_mask():
    from solvers.dropout import VariationalDropout, reset_dropout
    from torchdeq.dropout import VariationalDropout1d

    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    ours, theirs = VariationalDropout(0.3, share=(1,)), VariationalDropout1d(0.3, token_first=True)
    ours.train(), theirs.train()
    reset_dropout(ours, torch.Generator().manual_seed(4))
    with torch.random.fork_rng(devices=[]):  # torchdeq draws from the global RNG: the same seed, the same mask
        torch.manual_seed(4)
        expect = theirs(x)
    first = ours(x)
    torch.testing.assert_close(first, expect)
    assert ours.mask.shape == (3, 1, 8)  # one mask per sample and feature, shared by the tokens
    torch.testing.assert_close(ours(x), first)  # the same mask at every call of the solve
    rows = torch.tensor([2, 0])
    torch.testing.assert_close(ours(x[rows], rows=rows), first[rows])  # a sub-batch: its own samples' masks
    reset_dropout(ours, torch.Generator().manual_seed(5))
    assert not torch.equal(ours(x), first)  # a new solve, a new mask
    fresh = VariationalDropout(0.3)
    with pytest.raises(RuntimeError, match="reset_dropout"):
        fresh(x)  # a forgotten reset is an error, not a reused mask
    fresh.eval()
    assert fresh(x) is x
    with pytest.raises(ValueError, match="probability"):
        VariationalDropout(1.0)


# ------------------------------------------------------------------ the model options

TOY = dict(vocab_size=3, n_classes=2, d_model=16, n_heads=2)


@pytest.mark.parametrize("option", [{"cell_norm": "spectral"}, {"cell_norm": "weight"}, {"dropout": 0.2}])
def test_model_stabilizer_options_train_save_and_load(option, tmp_path):
    from deqloop.checkpoint import load_model, save_checkpoint
    from deqloop.train import TrainConfig

    cfg = ModelConfig(**TOY, **option)
    model = build_model(cfg, seed=0)
    solve = SolveConfig(solver="fixed_point_iter", backward="unroll", max_iter=6)
    tokens = torch.randint(0, 3, (4, 10), generator=torch.Generator().manual_seed(1))
    model.train()
    x = model.embed_input(tokens)
    model.block.start_solve(torch.Generator().manual_seed(2))
    cell = model.cell(x)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cell(z), cell(z))  # one map for the whole solve: a fixed point can exist
    idx = torch.tensor([3, 1])
    torch.testing.assert_close(cell(z[idx], idx), cell(z)[idx])  # sub-batches see their own rows' masks
    objective = TrainingObjective(model, get_task("prefix_sums"), solve)
    targets = torch.randint(0, 2, (4, 10), generator=torch.Generator().manual_seed(4))
    loss, _ = objective(tokens, targets, torch.Generator().manual_seed(5))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        before, _ = model(tokens, solve)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=model, optimizer=None, step=1, task="prefix_sums", model_cfg=cfg, solve_cfg=solve,
                    train_cfg=TrainConfig(task="prefix_sums", out_dir=str(tmp_path)).to_dict(), metrics=[])
    loaded, _ = load_model(path)
    with torch.no_grad():
        after, _ = loaded(tokens, solve)
    torch.testing.assert_close(after, before)  # the normalized weights are recomputed from what was saved
    if option.get("cell_norm") == "spectral":
        for _ in range(100):  # sigma converges: the block's layers have spectral norm ~ their learned scale
            model.train(), model.block.start_solve(None)
        w = model.block.mlp[0]
        s = torch.linalg.svdvals((w.weight / w.weight_g).detach())
        assert abs(float(s.max()) - 1.0) < 1e-3


def test_model_stabilizer_options_are_checked():
    with pytest.raises(ConfigError, match="cell_norm"):
        ModelConfig(**TOY, cell_norm="layer")
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(**TOY, dropout=1.0)
    model = build_model(ModelConfig(**TOY, dropout=0.1), seed=0).train()
    with pytest.raises(ValueError, match="Generator"):
        model.block.start_solve(None)  # training dropout without a generator would use the global RNG


def test_rho_reg_adds_the_pull_at_the_fixed_point():
    from solvers.regularize import spectral_radius_penalty

    task = get_task("prefix_sums")
    solve = SolveConfig(solver="fixed_point_iter", backward="unroll", max_iter=6)
    tokens = torch.randint(0, 3, (4, 10), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 2, (4, 10), generator=torch.Generator().manual_seed(4))
    model = build_model(ModelConfig(**TOY, norm="none"), seed=0)
    plain, _ = TrainingObjective(model, task, solve)(tokens, targets, torch.Generator().manual_seed(5))
    loss, scored = TrainingObjective(model, task, solve, rho_reg=2.0, rho_target=0.0)(
        tokens, targets, torch.Generator().manual_seed(5))
    z = scored.result.z.detach().requires_grad_()
    expect = spectral_radius_penalty(model.f(z, scored.x), z, 0.0, one_sided=True,
                                     generator=torch.Generator().manual_seed(5))
    assert float(scored.rho_penalty.detach()) > 0
    torch.testing.assert_close(loss, plain + 2.0 * scored.rho_penalty)
    torch.testing.assert_close(scored.rho_penalty, expect, rtol=1e-4, atol=1e-6)


def test_diagnose_copies_a_normalized_model_in_float64():
    """diagnose's float64 copy works on a spectral-normalized cell (a deepcopy failed on its
    derived weights) and computes the same map, without touching the global RNG."""
    from deqloop.diagnose import _float64_copy

    model = build_model(ModelConfig(**TOY, cell_norm="spectral"), seed=0).eval()
    state = torch.random.get_rng_state()
    copy64 = _float64_copy(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(copy64.f(x.double(), x.double()).float(), model.f(x, x), rtol=1e-5, atol=1e-6)
