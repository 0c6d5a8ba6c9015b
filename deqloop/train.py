"""Train a looped transformer on a task: AdamW, linear warmup + cosine, gradient clipping.

    path = train(TrainConfig(task="prefix_sums"), model_cfg, solve_cfg)     # built by cli.py

The pieces, each usable alone: `setup_distributed` (torchrun or one process), `build_optimizer`,
`train_step` (forward through deqloop.objective.TrainingObjective, backward, clip, step), and
`step_statistics` (one host sync); `train` strings them together with a deqloop.run.Run, which
owns the run's directory (lock, resume, metrics.jsonl, checkpoints, evaluation, progress).

Every random draw is a function of (seed, step), so a resumed run repeats the uninterrupted one
exactly on CPU:
- the training batch of step s on process `rank`: np.random.default_rng([seed, s, rank]);
- the random depth of the progressive loss at step s: a torch.Generator seeded from (seed, s);
- the test sets: fixed, independent of the seed (deqloop.evaluate.test_set).
Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the objective runs in DistributedDataParallel and
each process draws batch_size / world_size examples; only rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from deqloop.errors import ConfigError
from deqloop.io import resolve_device
from deqloop.model import LoopedTransformer, ModelConfig, SolveConfig, autocast_note, build_model
from deqloop.objective import Scored, TrainingObjective
from deqloop.run import Run
# the settings live in train_config; these names are importable from here too
from deqloop.train_config import RUN_CONTROL, TrainConfig, check_resumable, stored_configs  # noqa: F401
from solvers.regularize import jacobian_frobenius, spectral_radius_estimate
from tasks import Batch, Task, get_task

# Seed word of the progressive loss's random depth, in the place where the data stream has the
# rank, so the two streams never coincide (see deqloop.evaluate.EVAL_STREAM).
PROGRESSIVE_STREAM = 2**30
JACOBIAN_STREAM = 2**30 + 1  # the logged Jacobian estimates' own vectors (--jac-log-every): no other draw moves


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after finishing a step and saving a checkpoint."""

    def __init__(self, message: str, signum: int, step: int = 0):
        super().__init__(message)
        self.signum, self.step = signum, step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio * cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def stream_seed(*words: int) -> int:
    """A 64-bit seed for torch.Generator from integer words (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------------------ the pieces

@dataclass(frozen=True)
class Processes:
    """This process's place in the run: one plain process, or one of torchrun's."""

    distributed: bool
    rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:  # logs, evaluates and saves
        return self.rank == 0


def setup_distributed(device_name: str) -> Processes:
    """Join torchrun's process group if RANK / WORLD_SIZE are set (nccl on GPUs, gloo on CPUs)."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if distributed else None
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(distributed, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), device)


def teardown_distributed(procs: Processes) -> None:
    if procs.distributed and dist.is_initialized():
        # DDP's reducer holds gloo work; free it before the group, not at interpreter exit, where
        # gloo's threads can abort the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with nanoGPT's rule: decay weight matrices and embeddings; not biases, norms, or vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, cfg.beta2))


def train_step(objective: nn.Module, optimizer: torch.optim.Optimizer, params: list[Tensor], batch: Batch,
               generator: torch.Generator, lr: float, grad_clip: float) -> tuple[Tensor, Scored, float]:
    """One optimizer step on `batch`: the loss, what the forward scored, and the gradient norm of
    `params` (the trained parameters, in the model's order) before clipping. FloatingPointError,
    with the update not applied, if the gradient is not finite."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, scored = objective(batch.inputs, batch.targets, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf))
    if not math.isfinite(grad_norm):  # the same on every process: DDP averaged the gradients
        raise FloatingPointError(f"the gradient norm is {grad_norm}")
    optimizer.step()
    return loss, scored, grad_norm


def step_statistics(task: Task, batch: Batch, loss: Tensor, scored: Scored, stopping: bool,
                    procs: Processes) -> dict:
    """The step's loss, batch accuracy, solver steps, converged fraction and regularizer terms
    (jac_frobenius, rho_penalty; means over processes), worst residual and stop request (max
    over processes), with one host sync."""
    terms = {name: t for name, t in (("jac_frobenius", scored.jacobian), ("rho_penalty", scored.rho_penalty))
             if t is not None}
    with torch.no_grad():
        acc = task.exact_match(task.predict(scored.logits, batch.inputs), batch).float().mean()
        result = scored.result
        residual = torch.nan_to_num(result.residual.max().float(), nan=math.inf)
        mean = torch.stack([loss.detach().float(), acc, result.n_steps.float().mean(),
                            result.converged.float().mean(), *(t.detach().float() for t in terms.values())])
        worst = torch.stack([residual, torch.tensor(float(stopping), device=residual.device)])
    if procs.distributed:
        dist.all_reduce(mean)
        mean /= procs.world_size
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    loss_v, acc_v, steps_v, conv_v, *term_v, residual_v, stop_v = torch.cat([mean, worst]).tolist()  # the one sync
    return {"loss": loss_v, "acc": acc_v, "solver_steps": steps_v, "converged": conv_v,
            "max_residual": residual_v, "stop": stop_v > 0, **dict(zip(terms, term_v))}


def jacobian_at_fixed_point(model: LoopedTransformer, batch: Batch, scored: Scored, seed: int) -> dict:
    """The geometry axis during training, at the step's fixed point: rho(J) (largest power-iteration
    estimate over the batch, 20 products) and the Hutchinson ||J||_F^2 / numel (one vector)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        z = scored.result.z.detach().requires_grad_()  # per packed row where the batch was packed
        fz = model.f(z, scored.x.detach(), window_mask=model.window_mask(scored.segments))
        frob = jacobian_frobenius(fz, z, generator=generator, create_graph=False)
        rho = spectral_radius_estimate(fz, z, n_iters=20, generator=generator)
    return {"jac_frobenius": float(frob), "rho_estimate": float(rho.max())}


def may_leave_unused(model_cfg: ModelConfig) -> bool:
    """Whether a training step can leave a parameter without gradient, so DDP must search the
    graph for it every step: only without recall, where the input reaches the loop through z0
    alone, which the IFT / phantom gradient, a no-gradient prefix or the progressive term's
    detached start cut off. With recall the embedded input enters every iteration."""
    return model_cfg.recall == "none"


def compile_block(model: LoopedTransformer, objective: nn.Module, batch: Batch) -> str:
    """torch.compile the model's block for training, compiled now on one forward and backward of
    `batch` (no update, no RNG: the step's own draws are untouched); on a compiler error, eager
    again. Returns the one-line note to show."""
    import torch._dynamo

    t0 = time.time()
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # e.g. spectral norm's vectors
    model.compile_block()
    try:
        loss, _ = objective(batch.inputs, batch.targets, torch.Generator().manual_seed(0))
        loss.backward()
    except torch._dynamo.exc.TorchDynamoException as e:
        model.compile_block(False)
        torch._dynamo.reset()
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return f"--compile: torch.compile failed ({first[:160]}); training runs eager"
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return f"--compile: the loop block compiled in {time.time() - t0:.0f} s (a shape seen later compiles again)"


# ------------------------------------------------------------------------------------ the run

def train(cfg: TrainConfig, model_cfg: ModelConfig, solve_cfg: SolveConfig, *, resume: bool = False) -> Path:
    """Train, evaluating and checkpointing along the way; returns the final checkpoint's path.

    With `resume`, continue from out_dir/checkpoint.pt (same weights, optimizer and step); the
    configs must match the checkpoint's except RUN_CONTROL fields. Without it, an existing
    checkpoint in out_dir is an error rather than silently overwritten.
    """
    procs = setup_distributed(cfg.device)
    run, model, restore_signals = None, None, None
    try:
        task = get_task(cfg.task)
        cfg = replace(cfg, train_difficulties=cfg.train_difficulties or task.train_difficulties,
                      test_difficulties=cfg.test_difficulties or task.test_difficulties)
        if cfg.batch_size % procs.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {procs.world_size} processes")
        model = build_model(model_cfg, seed=cfg.seed).to(procs.device)
        optimizer = build_optimizer(model, cfg)
        run = Run(cfg, model_cfg, solve_cfg, procs, model, optimizer)
        run.open(resume)
        objective = TrainingObjective(model, task, solve_cfg, jac_reg=cfg.jac_reg, jac_samples=cfg.jac_reg_samples,
                                      rho_reg=cfg.rho_reg, rho_target=cfg.rho_target, pack=cfg.pack)
        packs = objective.pack and len(set(cfg.train_difficulties)) > 1
        if procs.distributed:
            objective = DistributedDataParallel(objective, device_ids=[procs.device.index] if procs.device.type == "cuda"
                                                else None, find_unused_parameters=may_leave_unused(model_cfg))
        stop_signal = []  # SIGINT/SIGTERM finish the step, save, and stop (a second SIGINT: at once)
        restore_signals = _catch_signals(stop_signal)
        run.start(task)
        note = autocast_note(model_cfg, procs.device)
        if note:
            run.warn(note[1], kind=note[0])
        if packs:
            run.warn("pack: each batch's strings run end to end in fewer rows (the same loss; --no-pack to "
                     "pad them instead)", kind="note")
        objective.train()
        local_batch = cfg.batch_size // procs.world_size
        params = [p for p in model.parameters() if p.requires_grad]  # the clip's order: the model's
        compile_pending = cfg.compile
        while run.step < cfg.steps:
            step = run.step
            rng = np.random.default_rng([cfg.seed, step, procs.rank])
            batch = task.sample(local_batch, cfg.train_difficulties, rng).to(procs.device)
            if compile_pending:
                compile_pending = False
                run.warn(compile_block(model, objective, batch))
            generator = torch.Generator().manual_seed(stream_seed(cfg.seed, step, PROGRESSIVE_STREAM))
            lr = lr_at(step, cfg)
            try:
                loss, scored, grad_norm = train_step(objective, optimizer, params, batch, generator, lr, cfg.grad_clip)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at step {step + 1}; the update was not applied, and the last saved "
                                         f"step is in {run.ckpt_path}, if any") from None
            stats = step_statistics(task, batch, loss, scored, bool(stop_signal), procs)
            if cfg.jac_log_every and (step + 1) % cfg.jac_log_every == 0 and procs.master:
                stats.update(jacobian_at_fixed_point(model, batch, scored, stream_seed(cfg.seed, step, JACOBIAN_STREAM)))
            run.finish_step(stats, grad_norm, lr, model.backward_result)
            if stats["stop"]:
                signum = stop_signal[0] if stop_signal else signal.SIGTERM
                raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {run.step}; "
                                  f"{run.ckpt_path} holds it (continue with --resume)", signum, run.step)
        run.warn_if_diverged()
        if procs.distributed:
            dist.barrier()  # every rank leaves together: none tears down gloo while another still uses it
        return run.ckpt_path
    finally:
        if run is not None:
            run.close()
        if restore_signals is not None:
            restore_signals()
        objective = model = None  # noqa: F841 (DDP's reducer must go before the process group)
        teardown_distributed(procs)


def _catch_signals(stop_signal: list) -> Callable[[], None]:
    """Record SIGINT/SIGTERM in `stop_signal` instead of dying; returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def handler(signum, frame):
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        stop_signal.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]
