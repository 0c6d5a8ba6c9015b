"""Shared by the tasks' smoke tests: a tiny model fitted to one fixed batch."""

import torch

from deqloop.model import build_model, task_configs


def fit_fixed_batch(task, batch, *, max_iter: int, steps: int, lr: float) -> list[float]:
    """Losses of `steps` Adam steps of a d_model=32 model with the task's defaults on `batch`."""
    cfg, solve = task_configs(task, {"d_model": 32, "n_heads": 2}, {"max_iter": max_iter})
    model = build_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits, _ = model(batch.inputs, solve)
        loss = task.loss(logits, batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
