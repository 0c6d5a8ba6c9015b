"""The looped transformer: recall and norm placements, attention locality, z0, config errors."""

import itertools

import pytest
import torch

from deqloop.model import NORMS, RECALLS, ModelConfig, SolveConfig, build_model

TOY = dict(vocab_size=3, n_classes=2, d_model=16, n_heads=2)


def toy(**kw):
    return build_model(ModelConfig(**{**TOY, **kw}), seed=0)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recall, norm", list(itertools.product(RECALLS, NORMS)))
def test_every_combination_builds_and_solves(recall, norm):
    model = toy(recall=recall, norm=norm)
    tokens = torch.randint(0, 3, (4, 7), generator=torch.Generator().manual_seed(1))
    logits, result, prog = model(tokens, SolveConfig(max_iter=5))
    assert logits.shape == (4, 7, 2) and torch.isfinite(logits).all()
    assert result.z.shape == (4, 7, 16) and prog is None
    logits.sum().backward()
    assert model.head.weight.grad is not None


@pytest.mark.parametrize("recall", RECALLS)
def test_recall_decides_whether_f_sees_the_input(recall):
    model = toy(recall=recall)
    z, x1, x2 = rand(2, 5, 16, seed=1), rand(2, 5, 16, seed=2), rand(2, 5, 16, seed=3)
    with torch.no_grad():
        same = torch.allclose(model.f(z, x1), model.f(z, x2))
    assert same == (recall == "none")


def test_outer_norm_normalizes_the_loop_state():
    model = toy(norm="outer")
    with torch.no_grad():
        out = model.f(10 * rand(2, 5, 16, seed=4), rand(2, 5, 16, seed=5))
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)
    with torch.no_grad():
        pre = toy(norm="pre").f(10 * rand(2, 5, 16, seed=4), rand(2, 5, 16, seed=5))
    assert pre.std(-1).mean() > 5  # pre-norm leaves the state's scale alone


@pytest.mark.parametrize("causal, window, visible", [
    (True, 3, lambda t, s: t - 2 <= s <= t),
    (False, 3, lambda t, s: t - 1 <= s <= t + 1),
    (True, None, lambda t, s: s <= t),
    (False, None, lambda t, s: True),
])
def test_attention_sees_exactly_its_window(causal, window, visible):
    model = toy(window=window, causal=causal)
    h = rand(1, 8, 16, seed=6).requires_grad_()
    y = model.block.attn(h)
    for t in range(8):
        (g,) = torch.autograd.grad(y[0, t].sum(), h, retain_graph=True)
        seen = [s for s in range(8) if g[0, s].abs().sum() > 0]
        assert seen == [s for s in range(8) if visible(t, s)], t


def test_sequence_start_is_visible_to_local_attention():
    """'1' and '1 1' must differ at the last position: parity depends on where the string starts.
    (Masking the window's out-of-range part made them equal: softmax averages identical values.)"""
    model = toy(window=2)
    one, two = torch.tensor([[1]]), torch.tensor([[1, 1]])
    with torch.no_grad():
        a = model.f(model.embed_input(one), model.embed_input(one))[0, -1]
        b = model.f(model.embed_input(two), model.embed_input(two))[0, -1]
    assert not torch.allclose(a, b, atol=1e-4)


def test_local_model_runs_at_any_length_and_absolute_positions_do_not():
    local = toy(window=3)
    with torch.no_grad():
        for t in (1, 8, 300):
            assert local(torch.zeros(2, t, dtype=torch.long), SolveConfig(max_iter=3))[0].shape == (2, t, 2)
    board = toy(window=None, causal=False, n_positions=9)
    with torch.no_grad():
        board(torch.zeros(1, 9, dtype=torch.long), SolveConfig(max_iter=2))
        with pytest.raises(ValueError, match="exceeds n_positions=9"):
            board(torch.zeros(1, 10, dtype=torch.long), SolveConfig(max_iter=2))


def test_z0_policies():
    x = rand(2, 4, 16, seed=7)
    assert torch.equal(toy(z0="zeros").z_init(x), torch.zeros_like(x))
    assert torch.equal(toy(z0="input").z_init(x), x)
    r1, r2 = toy(z0="random", z0_seed=1).z_init(x), toy(z0="random", z0_seed=1).z_init(x)
    assert torch.equal(r1, r2) and not torch.equal(r1, toy(z0="random", z0_seed=2).z_init(x))


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = toy(), toy(), build_model(ModelConfig(**TOY), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)


def test_progressive_term_only_in_training():
    model = toy()
    tokens = torch.zeros(2, 5, dtype=torch.long)
    solve = SolveConfig(max_iter=6, backward="progressive", phantom_steps=2)
    _, _, prog = model(tokens, solve, generator=torch.Generator().manual_seed(0))
    assert prog is not None and prog.shape == (2, 5, 2) and prog.requires_grad
    with torch.no_grad():
        assert model(tokens, solve)[2] is None


@pytest.mark.parametrize("bad, match", [
    (dict(recall="both"), "recall must be one of none, standard, internal"),
    (dict(norm="layer"), "norm must be one of"),
    (dict(z0="ones"), "z0 must be one of"),
    (dict(d_model=10, n_heads=4), "not divisible"),
    (dict(window=0), "window must be"),
])
def test_bad_model_config(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TOY, **bad})


def test_bad_solve_config():
    with pytest.raises(KeyError, match="valid solvers"):
        SolveConfig(solver="andersen")
    with pytest.raises(ValueError, match="backward must be one of"):
        SolveConfig(backward="implicit")
    with pytest.raises(TypeError, match="no option 'lam'"):
        SolveConfig(solver_options={"lam": 1e-4})


def test_progressive_alone_skips_the_full_depth_gradient():
    model = toy()
    tokens = torch.zeros(2, 5, dtype=torch.long)
    solve = SolveConfig(max_iter=6, backward="progressive", phantom_steps=2, progressive_alpha=1.0)
    logits, result, prog = model(tokens, solve, generator=torch.Generator().manual_seed(0))
    assert not logits.requires_grad and result.solver == "anderson"  # the fixed point, for logging
    assert prog.requires_grad
    with pytest.raises(ValueError, match="progressive_alpha"):
        SolveConfig(progressive_alpha=1.5)
