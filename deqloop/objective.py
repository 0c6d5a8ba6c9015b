"""The training objective: how one training step solves, differentiates and scores the loop.

    objective = TrainingObjective(model, task, solve_cfg)       # DDP wraps this module
    loss, scored = objective(batch.inputs, batch.targets, generator)

The model's own forward gives the logits at the fixed point, differentiated by
solve.gradient (ift, phantom, unroll). The recipe of the training loss lives here:
- loss along the loop (unroll, loss_every=k): every k-th differentiated iterate is scored
  too, and every scored iterate weighs the same (Yang et al. 2023; Palm et al. 2018), or with
  loss_gamma the k-th of n weighs gamma^(n-1-k) (fixed-point correction, Bai et al. 2022);
- a random no-gradient prefix (detach_random): 0..detach_iters iterations without gradient,
  drawn per step, then the same differentiated segment;
- the progressive loss (backward="progressive", Bansal et al., "End-to-end Algorithm
  Synthesis with Recurrent Networks", NeurIPS 2022): n ~ U{0..max_iter-k} iterations without
  gradient, then k with, mixed with the unrolled loss by progressive_alpha; at alpha = 1 the
  full-depth loss has no weight and the fixed point is solved without gradient.
Every random draw comes from the step's `generator`, never from torch's global RNG: without
one, the random prefix is the whole prefix, and the progressive loss refuses to run.

With `pack`, a batch of strings of mixed lengths is solved packed end to end in fewer rows where
that gives the same loss (deqloop.packing: a causal local loop, the unrolled gradient, no
dropout or Jacobian terms), and its logits are put back in the batch's padded layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from deqloop.model import LoopedTransformer, SolveConfig
from deqloop.packing import pack as pack_batch
from solvers.regularize import fp_correction, fp_weights, jacobian_frobenius, spectral_radius_penalty
from solvers.result import SolverResult
from tasks import Task


@dataclass
class Scored:
    """What one training forward produced."""

    logits: Tensor  # (B, T, C) at the last iterate
    result: SolverResult  # the forward solve
    x: Tensor  # (B, T, d) the embedded input the loop was solved for
    along: Tensor | None = None  # (K, B, T, C): every loss_every-th differentiated iterate before the last
    progressive: Tensor | None = None  # (B, T, C): the progressive term's logits
    jacobian: Tensor | None = None  # Hutchinson ||J||_F^2 / numel at z* (jac_reg > 0), differentiable
    rho_penalty: Tensor | None = None  # mean relu(rho(J) - target)^2 at z* (rho_reg > 0), differentiable
    segments: Tensor | None = None  # (R, T) packed strings' ids where the batch was packed: x and result are per packed row

    def detached(self) -> Scored:
        """The same record without autograd history: what a step reads after its loss. (DDP walks a
        forward's outputs to find the parameters in use; the embedded input x would otherwise
        count as use of the embedding, also where no gradient reaches it.)"""
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


def training_forward(model: LoopedTransformer, tokens: Tensor, solve: SolveConfig,
                     generator: torch.Generator | None = None, segments: Tensor | None = None) -> Scored:
    """The loop solved as training differentiates it, with the logits the loss scores (segments:
    the ids of packed strings, deqloop.packing)."""
    x = model.embed_input(tokens)
    z0 = model.z_init(x)
    steps, detach = solve.max_iter, min(solve.detach_iters, solve.max_iter - 1)
    if solve.detach_random and torch.is_grad_enabled() and generator is not None:
        # without a generator: the whole prefix, so nothing draws from the global RNG
        drawn = int(torch.randint(0, detach + 1, (1,), generator=generator))
        steps, detach = steps - detach + drawn, drawn
    along = []
    every = solve.loss_every

    def score_along(i: int, z: Tensor) -> None:  # every k-th iterate before the last (that one is `logits`)
        if i % every == 0 and i < steps:
            along.append(model.head_logits(z))

    progressive = solve.backward == "progressive" and torch.is_grad_enabled()
    with torch.set_grad_enabled(torch.is_grad_enabled() and not (progressive and solve.progressive_alpha == 1)):
        z, result = model.solve(x, z0, solve, max_iter=steps, detach=detach,
                                on_iterate=score_along if every else None, generator=generator,
                                segments=segments)
        logits = model.head_logits(z)
    scored = Scored(logits, result, x, torch.stack(along) if along else None, segments=segments)
    if progressive:
        scored.progressive = progressive_logits(model, x, z0, steps, solve.phantom_steps, generator, segments)
    return scored


def progressive_logits(model: LoopedTransformer, x: Tensor, z0: Tensor, max_iter: int, k: int,
                       generator: torch.Generator | None, segments: Tensor | None = None) -> Tensor:
    """Deep thinking's progressive term: n ~ U{0..max_iter-k} iterations without gradient, then k with."""
    if generator is None:
        raise ValueError("the progressive loss draws its depth from a torch.Generator; pass one")
    n = int(torch.randint(0, max(max_iter - k, 0) + 1, (1,), generator=generator))
    z, mask = z0.detach(), model.window_mask(segments)
    with torch.no_grad():
        for _ in range(n):
            z = model.f(z, x, window_mask=mask)
    for _ in range(k):
        z = model.f(z, x, window_mask=mask)
    return model.head_logits(z)


def training_loss(task: Task, scored: Scored, targets: Tensor, solve: SolveConfig) -> Tensor:
    """The task's loss at the last iterate, averaged with the iterates along the loop, or mixed
    with the progressive term."""
    if scored.progressive is not None:
        prog = task.loss(scored.progressive, targets)
        return (1 - solve.progressive_alpha) * task.loss(scored.logits, targets) + solve.progressive_alpha * prog
    if scored.along is None:
        return task.loss(scored.logits, targets)
    states = [*scored.along, scored.logits]  # fixed-point correction's weights (all 1: loss_gamma None), sum 1
    weights = fp_weights(len(states), solve.loss_gamma)
    return fp_correction(lambda logits: task.loss(logits, targets), states, gamma=solve.loss_gamma) / sum(weights)


class TrainingObjective(nn.Module):
    """The loss of one training batch, as a module, so DistributedDataParallel can wrap it (its
    gradient hooks need the forward to go through the wrapper).

    jac_reg > 0 adds jac_reg * ||J||_F^2 / numel at the fixed point (Bai et al. 2021; Hutchinson with
    `jac_samples` vectors from the step's generator, solvers.regularize.jacobian_frobenius);
    rho_reg > 0 adds rho_reg * mean relu(rho(J) - rho_target)^2 (5 power iterations,
    solvers.regularize.spectral_radius_penalty).
    pack: solve a batch of mixed lengths packed into fewer rows where that is exact (`packs`).
    """

    def __init__(self, model: LoopedTransformer, task: Task, solve: SolveConfig, *, jac_reg: float = 0.0,
                 jac_samples: int = 1, rho_reg: float = 0.0, rho_target: float = 0.9, pack: bool = False):
        super().__init__()
        self.model, self.task, self.solve = model, task, solve
        self.jac_reg, self.jac_samples = jac_reg, jac_samples
        self.rho_reg, self.rho_target = rho_reg, rho_target
        self.pack = pack and self.packs(model, solve, jac_reg, rho_reg)

    @staticmethod
    def packs(model: LoopedTransformer, solve: SolveConfig, jac_reg: float = 0.0, rho_reg: float = 0.0) -> bool:
        """Whether packing gives this objective's loss: a causal local loop (LoopedTransformer.packable)
        with a fixed number of iterations per row (the unrolled gradient; a solve that stops each row
        at its tolerance would stop a packed row when all its strings have), no dropout (one mask
        per row) and no Jacobian terms (their per-row estimates would mix a row's strings)."""
        return (model.packable and solve.gradient == "unroll" and not model.cfg.dropout
                and jac_reg == 0 and rho_reg == 0)

    def forward(self, tokens: Tensor, targets: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Scored]:
        packing = pack_batch(tokens, targets) if self.pack else None
        if packing is None:
            scored = training_forward(self.model, tokens, self.solve, generator)
        else:
            scored = training_forward(self.model, packing.tokens, self.solve, generator, packing.segments)
            scored.logits = packing.unpack(scored.logits)
            if scored.along is not None:
                scored.along = packing.unpack(scored.along)
            if scored.progressive is not None:
                scored.progressive = packing.unpack(scored.progressive)
        loss = training_loss(self.task, scored, targets, self.solve)
        if self.jac_reg > 0 or self.rho_reg > 0:
            z = scored.result.z.detach().requires_grad_()
            fz = self.model.f(z, scored.x)
            if self.jac_reg > 0:
                scored.jacobian = jacobian_frobenius(fz, z, n_samples=self.jac_samples, generator=generator)
                loss = loss + self.jac_reg * scored.jacobian
            if self.rho_reg > 0:
                scored.rho_penalty = spectral_radius_penalty(fz, z, self.rho_target, one_sided=True,
                                                             generator=generator)
                loss = loss + self.rho_reg * scored.rho_penalty
        return loss, scored.detached()
