"""The task interface, on prefix sums."""

import numpy as np
import pytest
import torch

from tasks import IGNORE, TaskInputError, get_task


@pytest.fixture
def task():
    return get_task("prefix_sums")


def test_generation_is_deterministic_by_seed(task):
    a = task.generate(5, 16, np.random.default_rng(3))
    b = task.generate(5, 16, np.random.default_rng(3))
    c = task.generate(5, 16, np.random.default_rng(4))
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)


def test_targets_are_running_parity(task):
    batch = task.generate(50, 33, np.random.default_rng(0))
    assert batch.inputs.shape == batch.targets.shape == (50, 33)
    assert (batch.difficulty == 33).all()
    for bits, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        parity = 0
        for bit, t in zip(bits, target):
            parity ^= bit
            assert t == parity


def test_sample_mixes_difficulties_and_pads_targets_with_ignore(task):
    batch = task.sample(40, (4, 8), np.random.default_rng(1))
    assert batch.inputs.shape == (40, 8)
    short = batch.difficulty == 4
    assert 0 < int(short.sum()) < 40
    assert (batch.targets[short, 4:] == IGNORE).all() and (batch.targets[~short] != IGNORE).all()
    # exact match ignores the padding, and checks every scored position
    pred = batch.targets.clamp_min(0)
    assert task.exact_match(pred, batch).all()
    pred[~short, -1] ^= 1
    assert task.exact_match(pred, batch).tolist() == short.tolist()


def test_parse_and_decode(task):
    tokens = task.parse(" 0110\n")
    assert tokens.tolist() == [[0, 1, 1, 0]]
    assert task.decode(tokens[0], torch.tensor([0, 1, 0, 0])) == "0100"


@pytest.mark.parametrize("text, match", [("", "empty"), ("01a1", "only 0 and 1.*'a'"), ("0 1", "' '")])
def test_parse_rejects_bad_input_with_one_line(task, text, match):
    with pytest.raises(TaskInputError, match=match) as e:
        task.parse(text)
    assert "\n" not in str(e.value)


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'prefix_sum'.*prefix_sums"):
        get_task("prefix_sum")
