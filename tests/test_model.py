"""The looped transformer: recall and norm placements, attention locality, z0, config errors."""

import itertools

import pytest
import torch

from deqloop.errors import ConfigError, ConfigTypeError, UsageError
from deqloop import model as model_module
from deqloop.model import NORMS, RECALLS, ModelConfig, SolveConfig, autocast_note, build_model
from deqloop.objective import TrainingObjective, training_forward, training_loss

TOY = dict(vocab_size=3, n_classes=2, d_model=16, n_heads=2)


def toy(**kw):
    return build_model(ModelConfig(**{**TOY, **kw}), seed=0)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recall, norm", list(itertools.product(RECALLS, NORMS)))
def test_every_combination_builds_and_solves(recall, norm):
    model = toy(recall=recall, norm=norm)
    tokens = torch.randint(0, 3, (4, 7), generator=torch.Generator().manual_seed(1))
    logits, result = model(tokens, SolveConfig(max_iter=5))
    assert logits.shape == (4, 7, 2) and torch.isfinite(logits).all()
    assert result.z.shape == (4, 7, 16)
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
    prog = training_forward(model, tokens, solve, torch.Generator().manual_seed(0)).progressive
    assert prog is not None and prog.shape == (2, 5, 2) and prog.requires_grad
    with torch.no_grad():
        assert training_forward(model, tokens, solve, torch.Generator().manual_seed(0)).progressive is None
        logits, result = model(tokens, solve)  # the model itself: the fixed point, within max_iter
        assert logits.shape == (2, 5, 2) and int(result.n_steps.max()) <= 6


@pytest.mark.parametrize("bad, match", [
    (dict(recall="both"), "recall must be one of none, standard, internal"),
    (dict(norm="layer"), "norm must be one of"),
    (dict(z0="ones"), "z0 must be one of"),
    (dict(d_model=10, n_heads=4), "not divisible"),
    (dict(window=0), "window must be"),
])
def test_bad_model_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**TOY, **bad})


def test_bad_solve_config():
    """Every bad setting is a ConfigError (a UsageError: one line at the command line), whichever
    package found it; solvers' own KeyError / TypeError do not leak through."""
    with pytest.raises(ConfigError, match="did you mean 'anderson'.*valid solvers"):
        SolveConfig(solver="andersen")
    with pytest.raises(ConfigError, match="backward must be one of"):
        SolveConfig(backward="implicit")
    with pytest.raises(ConfigError, match="no option 'lam'"):
        SolveConfig(solver_options={"lam": 1e-4})
    with pytest.raises(ConfigTypeError, match="max_iter must be int"):
        SolveConfig(max_iter="40")
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigError, UsageError)


def test_progressive_alone_skips_the_full_depth_gradient():
    model = toy()
    tokens = torch.zeros(2, 5, dtype=torch.long)
    solve = SolveConfig(max_iter=6, backward="progressive", phantom_steps=2, progressive_alpha=1.0)
    scored = training_forward(model, tokens, solve, torch.Generator().manual_seed(0))
    assert not scored.logits.requires_grad and scored.result.solver == "anderson"  # the fixed point, for logging
    assert scored.progressive.requires_grad
    with pytest.raises(ValueError, match="progressive_alpha"):
        SolveConfig(progressive_alpha=1.5)


# ------------------------------------------------------------------ board-structured attention

def sudoku_toy(relations="sudoku_peers"):
    return build_model(ModelConfig(vocab_size=10, n_classes=9, d_model=16, n_heads=2, window=None,
                                   causal=False, n_positions=0, relations=relations), seed=0)


def test_sudoku_peers_attention_sees_only_row_column_and_box():
    model = sudoku_toy()
    with torch.no_grad():
        model.block.attn.relation_bias.normal_(generator=torch.Generator().manual_seed(0))
    h = rand(1, 81, 16, seed=7).requires_grad_()
    cell = 4 * 9 + 4  # the centre cell: row 4, column 4, box 4
    model.block.attn(h)[0, cell].sum().backward()
    seen = {j for j in range(81) if h.grad[0, j].abs().sum() > 0}
    peers = {j for j in range(81) if j // 9 == 4 or j % 9 == 4 or (j // 27 == 1 and j % 9 // 3 == 1)}
    assert seen == peers and len(peers) == 21


def test_relation_bias_is_shared_by_cells_with_the_same_relations():
    """Relabelling rows within a band (a sudoku symmetry) permutes the output the same way."""
    model = sudoku_toy("sudoku")
    with torch.no_grad():
        model.block.attn.relation_bias.normal_(generator=torch.Generator().manual_seed(1))
    perm_rows = [1, 0, 2, 5, 3, 4, 6, 8, 7]
    perm = torch.tensor([r * 9 + c for r in perm_rows for c in range(9)])
    h = rand(2, 81, 16, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model.block.attn(h)[:, perm], model.block.attn(h[:, perm]))
        # absolute positions break it: the same model with learned positions does not commute
        pos = build_model(ModelConfig(vocab_size=10, n_classes=9, d_model=16, n_heads=2, window=None,
                                      causal=False, n_positions=81), seed=0)
        x = torch.randint(1, 10, (1, 81), generator=torch.Generator().manual_seed(2))
        assert not torch.allclose(pos.embed_input(x)[:, perm], pos.embed_input(x[:, perm]))


def test_board_relations_are_rank_and_file_offsets():
    from deqloop.model import board_relations

    ids, n = board_relations(8, 8)
    assert n == 225 and ids.shape == (64, 64)
    sq = lambda rank, file: rank * 8 + file
    assert ids[sq(0, 0), sq(1, 2)] == ids[sq(5, 3), sq(6, 5)]  # the same knight jump anywhere
    assert ids[sq(0, 0), sq(1, 2)] != ids[sq(0, 0), sq(2, 1)]
    assert len(set(ids.flatten().tolist())) == 225


@pytest.mark.parametrize("relations", ["sudoku_peers", "board8"])
def test_relation_attention_is_softmax_of_scores_plus_bias(relations):
    """The written-out biased attention (Attention._biased) against its definition through
    scaled_dot_product_attention with the bias as an additive mask: the same output and the same
    gradients of the input and of the relation bias, on a scheme with masked pairs and one without."""
    import torch.nn.functional as F
    from einops import rearrange

    t = 81 if relations.startswith("sudoku") else 64
    model = build_model(ModelConfig(vocab_size=16, n_classes=9, d_model=16, n_heads=2, window=None, causal=False,
                                    n_positions=0, relations=relations), seed=0)
    attn = model.block.attn
    with torch.no_grad():
        attn.relation_bias.normal_(generator=torch.Generator().manual_seed(3))

    def reference(h):
        q, k, v = rearrange(attn.qkv(h), "b t (three h e) -> three b h t e", three=3, h=attn.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn._relation_mask(t))
        return attn.out(rearrange(y, "b h t e -> b t (h e)"))

    grads = []
    for fn in (attn, reference):
        h = rand(3, t, 16, seed=9).requires_grad_()
        out = fn(h)
        bias_grad, h_grad = torch.autograd.grad((out * rand(3, t, 16, seed=10)).sum(), (attn.relation_bias, h))
        grads.append((out.detach(), bias_grad, h_grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert grads[0][1].abs().sum() > 0  # the bias is trained


def test_relations_config_errors():
    with pytest.raises(ValueError, match="relations must be one of"):
        ModelConfig(**TOY, window=None, causal=False, relations="hexagon")
    with pytest.raises(ValueError, match="global, non-causal"):
        ModelConfig(**TOY, window=4, relations="sudoku")
    model = sudoku_toy()
    with pytest.raises(ValueError, match="does not fit the 81-position"):
        model(torch.zeros(1, 64, dtype=torch.long), SolveConfig(max_iter=2))


# ------------------------------------------------------------------ loss along the loop

def test_loss_along_the_loop_scores_every_kth_differentiated_iterate():
    model = toy(window=None, causal=False)
    tokens = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(3))
    solve = SolveConfig(solver="fixed_point_iter", backward="unroll", max_iter=8, loss_every=2, detach_iters=3)
    scored = training_forward(model, tokens, solve)
    logits, along = scored.logits, scored.along
    assert along.shape == (2, 2, 5, 2)  # iterates 4 and 6; the 8th is `logits`
    # the same iterates by hand: plain iteration from z0
    with torch.no_grad():
        x = model.embed_input(tokens)
        z, seen = model.z_init(x), {}
        for i in range(1, 9):
            z = model.f(z, x)
            seen[i] = model.head_logits(z)
    torch.testing.assert_close(along, torch.stack([seen[4], seen[6]]))
    torch.testing.assert_close(logits, seen[8])
    # the first detach_iters iterations carry no gradient: iterate 4's loss reaches the weights
    # through one application of f only, so it equals the gradient of f(z3) with z3 fixed
    along[0].sum().backward()
    g_along = model.block.mlp[0].weight.grad.clone()
    model.zero_grad()
    with torch.no_grad():
        z3 = model.z_init(x)
        for _ in range(3):
            z3 = model.f(z3, x)
    model.head_logits(model.f(z3, x)).sum().backward()
    torch.testing.assert_close(g_along, model.block.mlp[0].weight.grad)
    with torch.no_grad():  # evaluation: the fixed point only
        assert training_forward(model, tokens, solve).along is None


def test_loss_along_the_loop_in_the_training_loss():
    from tasks import get_task

    task = get_task("prefix_sums")
    model = toy(window=4)
    tokens = torch.randint(0, 2, (3, 6), generator=torch.Generator().manual_seed(4))
    targets = tokens.cumsum(1) % 2
    solve = SolveConfig(solver="fixed_point_iter", backward="unroll", max_iter=4, loss_every=1)
    scored = training_forward(model, tokens, solve)
    expected = sum(task.loss(l, targets) for l in [*scored.along, scored.logits]) / 4
    torch.testing.assert_close(training_loss(task, scored, targets, solve), expected)
    loss, _ = TrainingObjective(model, task, solve)(tokens, targets)  # the module DDP wraps: the same
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("bad, match", [
    (dict(backward="ift", loss_every=1), "belong to backward='unroll'"),
    (dict(backward="unroll", max_iter=4, detach_iters=4), "detach_iters < max_iter"),
    (dict(backward="unroll", loss_every=-1), "loss_every >= 0"),
])
def test_bad_loss_along_the_loop(bad, match):
    with pytest.raises(ValueError, match=match):
        SolveConfig(**bad)


def test_random_detach_keeps_the_differentiated_segment():
    model = toy(window=None, causal=False)
    tokens = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(5))
    solve = SolveConfig(solver="fixed_point_iter", backward="unroll", max_iter=10, loss_every=1,
                        detach_iters=6, detach_random=True)
    lengths = set()
    for seed in range(12):
        scored = training_forward(model, tokens, solve, torch.Generator().manual_seed(seed))
        result, along = scored.result, scored.along
        assert along.shape[0] == 3  # 4 differentiated iterates: 3 along the loop + the last
        lengths.add(int(result.n_steps[0]) - 1)  # the unrolled iterations (+1 scoring evaluation)
    assert lengths <= set(range(4, 11)) and len(lengths) > 2  # prefixes of 0..6 drawn
    result = training_forward(model, tokens, solve).result  # no generator: the whole prefix, no global RNG
    assert int(result.n_steps[0]) - 1 == 10


def test_bf16_autocast_block_is_close_to_float32_and_returns_float32():
    """autocast=bf16 runs the block's matmuls in bfloat16; the state the solver sees stays float32,
    within bfloat16's rounding of the float32 block (8 bits of mantissa: ~1e-2 after a few iterations)."""
    plain, half = toy(), toy(autocast="bf16")
    half.load_state_dict(plain.state_dict())
    x = rand(4, 10, 16)
    z_plain = z_half = x
    for _ in range(4):
        z_plain, z_half = plain.f(z_plain, x), half.f(z_half, x)
        assert z_half.dtype == torch.float32
    assert 0 < float((z_half - z_plain).abs().max()) < 0.1  # really another precision, and close to it
    tokens = torch.randint(0, 3, (4, 10), generator=torch.Generator().manual_seed(1))
    solve = SolveConfig(solver="anderson", max_iter=30, tol=1e-3)
    with torch.no_grad():  # a solve without gradient (evaluation) runs float32: the same as the plain model
        logits, result = half(tokens, solve)
        plain_logits, _ = plain(tokens, solve)
    assert result.abs_residual.dtype == torch.float32 and torch.equal(logits, plain_logits)
    half.eval()
    assert torch.equal(half.f(x, x), plain.f(x, x))  # eval mode too, with gradients on
    with pytest.raises(ConfigError, match="autocast"):
        ModelConfig(**TOY, autocast="fp8")


def test_autocast_note_warns_only_where_bf16_is_emulated(monkeypatch):
    """bf16 on a CPU without native bfloat16 is slower than float32: training says so in one line;
    float32, a CUDA device and a CPU with native bf16 get no note. auto says what it chose."""
    cfg, cpu = ModelConfig(**TOY, autocast="bf16"), torch.device("cpu")
    monkeypatch.setattr(model_module, "cpu_has_bf16", lambda: False)
    kind, note = autocast_note(cfg, cpu)
    assert kind == "warning" and "emulated" in note and "\n" not in note
    assert autocast_note(ModelConfig(**TOY), cpu) is None
    assert autocast_note(cfg, torch.device("cuda")) is None
    kind, note = autocast_note(ModelConfig(**TOY, autocast="auto"), cpu)
    assert kind == "note" and "float32" in note
    monkeypatch.setattr(model_module, "cpu_has_bf16", lambda: True)
    assert autocast_note(cfg, cpu) is None
    kind, note = autocast_note(ModelConfig(**TOY, autocast="auto"), cpu)
    assert kind == "note" and "bfloat16" in note


def test_autocast_auto_is_bf16_only_where_native(monkeypatch):
    """autocast=auto trains the block in bf16 where the CPU has native bfloat16 (the same numbers as
    autocast=bf16) and in float32 where it would be emulated (the same numbers as no autocast)."""
    plain, half, auto = toy(), toy(autocast="bf16"), toy(autocast="auto")
    half.load_state_dict(plain.state_dict())
    auto.load_state_dict(plain.state_dict())
    x = rand(4, 10, 16)
    for native, twin in ((False, plain), (True, half)):
        monkeypatch.setattr(model_module, "cpu_has_bf16", lambda: native)
        assert torch.equal(auto.f(x, x), twin.f(x, x)), native
    assert not torch.equal(plain.f(x, x), half.f(x, x))  # the two cases really differ
    assert model_module.autocast_dtype("auto", torch.device("meta")) is None
    assert model_module.autocast_dtype(None, torch.device("cpu")) is None


@pytest.mark.parametrize("recall, autocast", [("standard", None), ("internal", None), ("standard", "bf16")])
def test_cell_computes_the_recall_term_once_per_grad_mode(recall, autocast):
    """cell(x) reuses P x across iterations: the same iterates and gradients as f(z, x), which
    recomputes it, on the whole batch and on a sub-batch, and P x computed once per grad mode."""
    model = toy(recall=recall, autocast=autocast)
    model.train()
    calls = []
    model.block.inject.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    x0, z0 = rand(4, 6, 16, seed=1), rand(4, 6, 16, seed=2)
    idx = torch.tensor([0, 2])
    results = []
    for cached in (True, False):
        x = x0.clone().requires_grad_()
        calls.clear()
        cell = model.cell(x)
        f = cell if cached else (lambda z, rows=None: model.f(z, x if rows is None else x[rows], rows))
        with torch.no_grad():
            z = f(f(z0))
            sub = f(z[idx], idx)
        z1 = f(f(z))  # two differentiated iterations
        z_sub = f(z1[idx], idx)
        loss = (z1 * rand(4, 6, 16, seed=3)).sum() + z_sub.square().sum()
        grads = torch.autograd.grad(loss, (x, model.block.inject.weight))
        results.append((z, sub, z1.detach(), z_sub.detach(), *grads))
        if cached:
            assert calls == [False, True]  # once without gradient, once with: not at each of 6 iterations
    for i, (ours, ref) in enumerate(zip(*results)):
        if autocast and i >= 4:  # the gradients: summed in float32 once, not cast to bf16 per iteration
            torch.testing.assert_close(ours, ref, rtol=0.01, atol=0.01 * float(ref.abs().max()))
        else:  # the iterates: the same numbers
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
