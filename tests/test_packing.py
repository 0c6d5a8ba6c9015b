"""Packing a training batch of mixed lengths end to end (deqloop.packing): the same loss, fewer rows."""

import numpy as np
import pytest
import torch

from deqloop.model import ModelConfig, SolveConfig, build_model, task_configs
from deqloop.objective import TrainingObjective
from deqloop.packing import pack, scored_lengths
from tasks import get_task
from tasks.base import IGNORE


def prefix_batch(n=48, seed=3, difficulties=(8, 16, 24, 32)):
    return get_task("prefix_sums").sample(n, difficulties, np.random.default_rng(seed))


def test_pack_lays_every_string_end_to_end_in_fewer_rows_and_unpack_puts_them_back():
    batch = prefix_batch()
    packing = pack(batch.inputs, batch.targets)
    lengths = scored_lengths(batch.targets)
    n, t = batch.inputs.shape
    assert packing.rows < n
    assert packing.rows >= int(np.ceil(lengths.sum() / t))  # no row holds more than its width
    # each string's positions are one contiguous run of its id, in one row
    for i in range(n):
        where = (packing.segments == i).nonzero()
        assert len(where) == lengths[i]
        assert where[:, 0].unique().numel() == 1
        cols = where[:, 1]
        assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[0]) + int(lengths[i])))
    # unpack of the packed tokens (as a trailing feature) gives back every scored token
    back = packing.unpack(packing.tokens[..., None].double())[..., 0].long()
    scored = batch.targets != IGNORE
    assert torch.equal(back[scored], batch.inputs[scored])
    # leading dimensions (the loss along the loop's stacked iterates) pass through
    stacked = torch.stack([packing.tokens, 2 * packing.tokens])[..., None].double()
    assert torch.equal(packing.unpack(stacked)[1, ..., 0].long()[scored], 2 * batch.inputs[scored])


def test_pack_gives_none_when_every_string_fills_its_row():
    batch = prefix_batch(difficulties=(32,))
    assert pack(batch.inputs, batch.targets) is None


def test_scored_lengths_ends_at_the_last_scored_position():
    targets = torch.tensor([[0, 1, IGNORE, IGNORE], [IGNORE, 1, IGNORE, 0], [IGNORE] * 4])
    assert scored_lengths(targets).tolist() == [2, 4, 0]


def _loss_and_grads(model, task, solve, batch, pack_it):
    model.zero_grad(set_to_none=True)
    objective = TrainingObjective(model, task, solve, pack=pack_it)
    assert objective.pack == pack_it
    loss, scored = objective(batch.inputs, batch.targets, torch.Generator().manual_seed(7))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], scored


@pytest.mark.parametrize("solve_over", [{}, {"loss_every": 4, "loss_gamma": 0.8},
                                        {"backward": "progressive", "phantom_steps": 3}])
def test_a_packed_batch_has_the_padded_batchs_loss_and_gradients(solve_over):
    task = get_task("prefix_sums")
    model_cfg, solve = task_configs(task, {"recall": "internal"})
    solve = SolveConfig(**{**solve.to_dict(), **solve_over})
    model = build_model(model_cfg, seed=1).double().train()
    batch = prefix_batch()
    loss_pad, grads_pad, scored_pad = _loss_and_grads(model, task, solve, batch, False)
    loss_pack, grads_pack, scored_pack = _loss_and_grads(model, task, solve, batch, True)
    assert scored_pack.result.z.shape[0] < scored_pad.result.z.shape[0]  # it did pack
    assert torch.allclose(loss_pack, loss_pad, rtol=1e-12, atol=0)
    for g_pad, g_pack in zip(grads_pad, grads_pack):
        assert torch.allclose(g_pack, g_pad, rtol=1e-9, atol=1e-12)
    scored = batch.targets != IGNORE
    assert torch.allclose(scored_pack.logits[scored], scored_pad.logits[scored], rtol=1e-10, atol=1e-12)
    # the batch accuracy a step logs reads the unpacked logits
    assert torch.equal(task.exact_match(task.predict(scored_pack.logits, batch.inputs), batch),
                       task.exact_match(task.predict(scored_pad.logits, batch.inputs), batch))


def test_without_the_boundary_at_each_strings_start_packing_would_leak_between_strings():
    # the test above must be able to fail: attention across the seam changes the loss
    task = get_task("prefix_sums")
    model_cfg, solve = task_configs(task)
    model = build_model(model_cfg, seed=1).double().train()
    batch = prefix_batch()
    packing = pack(batch.inputs, batch.targets)
    x = model.embed_input(packing.tokens)
    cell_seamed, cell_leaky = model.cell(x, packing.segments), model.cell(x)
    z_seamed, z_leaky = cell_seamed(x), cell_leaky(x)
    seam = (packing.segments != torch.nn.functional.pad(packing.segments, (1, 0), value=-1)[:, :-1])
    seam[:, 0] = False  # a row's first position sees the boundary either way
    assert seam.any()
    assert not torch.allclose(z_seamed[seam], z_leaky[seam])
    # while a row's first string, whose window never reaches another, is the same either way
    first = packing.segments == packing.segments[:, :1]
    assert torch.allclose(z_seamed[first], z_leaky[first], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_over, solve_over, terms", [
    ({"causal": False}, {}, {}),  # a later position would see the next string
    ({"window": None, "n_positions": 32}, {}, {}),  # global attention, absolute positions
    ({}, {"backward": "ift"}, {}),  # a row stops at its tolerance
    ({"dropout": 0.1}, {}, {}),  # one mask per row
    ({}, {}, {"rho_reg": 1.0}),  # a row's rho is its strings' largest
    ({}, {}, {"jac_reg": 1.0}),
])
def test_packing_stays_off_where_it_would_change_the_loss(model_over, solve_over, terms):
    task = get_task("prefix_sums")
    model_cfg, solve = task_configs(task, model_over)
    solve = SolveConfig(**{**solve.to_dict(), **solve_over})
    model = build_model(model_cfg, seed=0)
    assert not TrainingObjective(model, task, solve, pack=True, **terms).pack


def test_packed_segments_need_local_attention():
    model = build_model(ModelConfig(vocab_size=2, n_classes=2, window=None, causal=True), seed=0)
    with pytest.raises(ValueError, match="local attention"):
        model.window_mask(torch.zeros(2, 8, dtype=torch.long))
