"""bench/throughput.py --ceiling: the products it records are the step's, counted as the flop counter counts them."""

import math

import torch
from torch import nn

from bench.throughput import MatmulCalls, count_flops, matmul_seconds


def _step(model: nn.Module, x: torch.Tensor) -> None:
    q = model(x)  # (B, T, d)
    scores = torch.bmm(q, q.transpose(1, 2))  # attention-like (B, T, T)
    scores.softmax(-1).bmm(q).sum().backward()


def test_recorded_products_carry_the_flop_counters_flops():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(4, 5, 8, generator=g)
    flops = count_flops(lambda: _step(model, x))
    recorder = MatmulCalls()
    with recorder:
        _step(model, x)
    recorded = sum(2 * n * math.prod(a) * b[-1] for (_, a, _, b, _, _), n in recorder.calls.items())
    assert recorded == flops
    ops = {key[0] for key in recorder.calls}
    assert {"addmm", "mm", "bmm"} <= ops  # the Linear layers forward, their backward, the batched products
    seconds, kinds = matmul_seconds(recorder.calls, repeats=1)
    assert seconds > 0 and sum(k["count"] for k in kinds) == sum(recorder.calls.values())
    assert [k["seconds"] for k in kinds] == sorted((k["seconds"] for k in kinds), reverse=True)


def test_transposed_operands_are_replayed_with_their_strides():
    a = torch.randn(6, 4).t()  # (4, 6), column-major
    b = torch.randn(6, 3)
    recorder = MatmulCalls()
    with recorder:
        torch.mm(a, b)
    ((key, count),) = recorder.calls.items()
    assert key[:5] == ("mm", (4, 6), (1, 4), (6, 3), (3, 1)) and count == 1
    _, kinds = matmul_seconds(recorder.calls, repeats=1)
    assert kinds[0]["transposed"] == [True, False]
