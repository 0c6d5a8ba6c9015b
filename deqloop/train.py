"""Train a looped transformer on a task: AdamW, linear warmup + cosine, gradient clipping.

    path = train(TrainConfig(task="prefix_sums"), model_cfg, solve_cfg)     # built by cli.py

Reads top to bottom: processes and device, data streams, model and optimizer (fresh or resumed
from out_dir/checkpoint.pt), then the loop. Every random draw is a function of (seed, step), so a
resumed run repeats the uninterrupted one exactly on CPU:
- the training batch of step s on process `rank`: np.random.default_rng([seed, s, rank]);
- the random depth of the progressive loss at step s: a torch.Generator seeded from (seed, s);
- the test sets: fixed, independent of the seed (deqloop.evaluate.test_set).
Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) the model runs in DistributedDataParallel and
each process draws batch_size / world_size examples; only rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from deqloop.checkpoint import configs, load_checkpoint, save_checkpoint
from deqloop.errors import CheckpointError, ConfigError
from deqloop.evaluate import eval_max_iter, evaluate, test_set
from deqloop.model import ModelConfig, SolveConfig, build_model, check_field_types
from solvers.result import Status
from tasks import Task, get_task

# Seed word of the progressive loss's random depth, in the place where the data stream has the
# rank, so the two streams never coincide (see deqloop.evaluate.EVAL_STREAM).
PROGRESSIVE_STREAM = 2**30


@dataclass
class TrainConfig:
    task: str  # task name, a key of tasks.TASKS
    seed: int = 0  # model init, training data and the progressive depth all derive from it
    steps: int = 3000  # optimizer steps
    batch_size: int = 64  # examples per optimizer step, summed over all processes
    lr: float = 1e-3  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.01  # AdamW decoupled decay (torch's default), on matrices and embeddings only
    warmup_steps: int = 100  # lr rises linearly from lr / warmup_steps to lr over these steps
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * lr on the last step
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    train_difficulties: tuple[int, ...] | None = None  # None: the task's train_difficulties
    test_difficulties: tuple[int, ...] | None = None  # None: the task's test_difficulties
    eval_every: int = 1000  # evaluate every this many steps and at the last (0: never)
    eval_size: int = 32  # test examples per difficulty: a progress check (the eval command uses 128)
    log_every: int = 10  # a train row in metrics.jsonl every this many steps and at the last
    ckpt_every: int = 500  # save out_dir/checkpoint.pt every this many steps and at the last (0: last only)
    keep_checkpoints: bool = False  # also keep out_dir/checkpoint_step{N}.pt of every save
    out_dir: str | None = None  # None: runs/<task>
    device: str = "auto"  # auto: cuda if available, else cpu (with torchrun: this process's GPU)

    def __post_init__(self):
        for name in ("train_difficulties", "test_difficulties"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(d) for d in value))
                if not value:
                    raise ConfigError(f"{name} is empty")
        check_field_types(self)
        for name in ("steps", "batch_size", "eval_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "warmup_steps", "eval_every", "ckpt_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.out_dir is None:
            self.out_dir = str(Path("runs") / self.task)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("train_difficulties", "test_difficulties"):
            d[name] = list(d[name]) if d[name] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**d)


# Fields a resumed run may change: they steer the run, not what it computes (`steps` changes the
# cosine schedule from the resumed step on, which is what extending a run means).
RUN_CONTROL = ("steps", "eval_every", "eval_size", "log_every", "ckpt_every", "keep_checkpoints",
               "out_dir", "device")


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after finishing a step and saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio * cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def compute_loss(task: Task, logits: Tensor, extra_logits: Tensor | None, targets: Tensor,
                 solve: SolveConfig) -> Tensor:
    """The task's loss at the last iterate, with the model's extra logits when it returns them:
    mixed with the progressive term (backward="progressive"), or averaged with the iterates along
    the loop (loss_every: every scored iterate weighs the same)."""
    loss = task.loss(logits, targets)
    if extra_logits is None:
        return loss
    if solve.backward == "progressive":
        prog = task.loss(extra_logits, targets)
        return (1 - solve.progressive_alpha) * loss + solve.progressive_alpha * prog
    along = [task.loss(step_logits, targets) for step_logits in extra_logits]
    return (loss + sum(along)) / (1 + len(along))


def stream_seed(*words: int) -> int:
    """A 64-bit seed for torch.Generator from integer words (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


def resolve_device(name: str, local_rank: int | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank or 0)
    return device


def check_resumable(ckpt: dict, cfg: TrainConfig, model_cfg: ModelConfig, solve_cfg: SolveConfig) -> None:
    """Raise ConfigError if the configs differ from the checkpoint's beyond the RUN_CONTROL fields."""
    saved_model, saved_solve = configs(ckpt)
    try:
        saved_train = TrainConfig.from_dict(ckpt["train_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt['path']}: its train config does not fit this deqloop "
                              f"({type(e).__name__}: {e})") from None
    pairs = [("model", saved_model.to_dict(), model_cfg.to_dict(), ()),
             ("solve", saved_solve.to_dict(), solve_cfg.to_dict(), ()),
             ("train", saved_train.to_dict(), cfg.to_dict(), RUN_CONTROL)]
    for kind, saved, given, free in pairs:
        for key in saved:
            if key not in free and saved[key] != given.get(key):
                raise ConfigError(f"cannot resume {ckpt['path']}: {kind} setting {key}={given.get(key)!r} differs "
                                 f"from the checkpoint's {saved[key]!r}; a resumed run keeps its settings "
                                 f"(only {', '.join(RUN_CONTROL)} may change)")


def train(cfg: TrainConfig, model_cfg: ModelConfig, solve_cfg: SolveConfig, *, resume: bool = False) -> Path:
    """Train, evaluating and checkpointing along the way; returns the final checkpoint's path.

    With `resume`, continue from out_dir/checkpoint.pt (same weights, optimizer and step); the
    configs must match the checkpoint's except RUN_CONTROL fields. Without it, an existing
    checkpoint in out_dir is an error rather than silently overwritten.
    """
    # -------------------------------------------------------------------- processes and device
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if distributed else None
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    progress, restore_signals, lock = None, None, None
    try:
        # ---------------------------------------------------------------- task and data streams
        task = get_task(cfg.task)
        cfg = replace(cfg, train_difficulties=cfg.train_difficulties or task.train_difficulties,
                      test_difficulties=cfg.test_difficulties or task.test_difficulties)
        if cfg.batch_size % world_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {world_size} processes")
        local_batch = cfg.batch_size // world_size
        evaluating = master and cfg.eval_every > 0
        test_sets = {d: test_set(task, d, cfg.eval_size) for d in cfg.test_difficulties} if evaluating else {}
        eval_iters = {d: eval_max_iter(task, solve_cfg, d) for d in test_sets}  # harder: more iterations
        out_dir = Path(cfg.out_dir)
        ckpt_path = out_dir / "checkpoint.pt"
        metrics_path = out_dir / "metrics.jsonl"

        # ---------------------------------------------------------------- model and optimizer
        model = build_model(model_cfg, seed=cfg.seed).to(device)
        # nanoGPT's rule: decay weight matrices and embeddings; not biases, norms, or vectors
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.999))
        step, metrics = 0, []
        if master:  # one training per directory: the second is refused before it writes anything
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = _lock_dir(out_dir)
        if resume:
            ckpt = load_checkpoint(ckpt_path)
            check_resumable(ckpt, cfg, model_cfg, solve_cfg)
            try:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"checkpoint {ckpt_path}: cannot restore the run "
                                      f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
            step, metrics = ckpt["step"], list(ckpt["metrics"])
            if ckpt["world_size"] != world_size and master:
                print(f"warning: the checkpoint was trained by {ckpt['world_size']} processes, now {world_size}: "
                      "the data of the remaining steps differs from the uninterrupted run")
            metrics.append({"kind": "resume", "step": step, "world_size": world_size})
        elif ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists; resume it (--resume) or choose another --out-dir")
        if master:
            # metrics.jsonl restarts from the checkpoint's rows: rows a killed run wrote after its
            # last checkpoint are dropped, since those steps are repeated.
            _write_rows(metrics_path, metrics)
            (out_dir / "config.json").write_text(json.dumps(
                {"task": cfg.task, "train": cfg.to_dict(), "model": model_cfg.to_dict(),
                 "solve": solve_cfg.to_dict()}, indent=1) + "\n")
        raw_model = model
        if distributed:
            # find_unused_parameters: with recall="none" nothing reaches the embedding through
            # the fixed point (IFT gives z0 no gradient), and DDP must not wait for its gradient.
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=True)

        def save(done: int) -> None:
            save_checkpoint(ckpt_path, model=raw_model, optimizer=optimizer, step=done, task=cfg.task,
                            model_cfg=model_cfg, solve_cfg=solve_cfg, train_cfg=cfg.to_dict(),
                            metrics=metrics, world_size=world_size)
            if cfg.keep_checkpoints:
                kept = out_dir / f"checkpoint_step{done}.pt"
                kept.unlink(missing_ok=True)
                try:
                    os.link(ckpt_path, kept)  # the next save replaces checkpoint.pt, not this file
                except OSError:
                    shutil.copyfile(ckpt_path, kept)

        def log(row: dict) -> None:
            row = strict_json(row)
            metrics.append(row)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row, allow_nan=False) + "\n")
            if not progress.console.is_terminal:  # no live bar in a log file: one line per row
                progress.console.print(json.dumps(row), soft_wrap=True)

        # ---------------------------------------------------------------- stop cleanly on a signal
        # SIGINT/SIGTERM finish the current step, save, and stop (a second SIGINT stops at once).
        stop_signal = []
        restore_signals = _catch_signals(stop_signal)

        if master:
            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            bar = progress.add_task(cfg.task, total=cfg.steps, completed=step, info="")
            progress.start()
        t_start = time.time()
        adjoint_failures = 0

        def warn(message: str) -> None:
            if master:
                (progress.console.print if progress.console.is_terminal else print)(
                    f"warning: {message}", **({} if progress.console.is_terminal else {"file": sys.stderr}))

        # ---------------------------------------------------------------- the loop
        model.train()
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = task.sample(local_batch, cfg.train_difficulties, np.random.default_rng([cfg.seed, step, rank]))
            batch = batch.to(device)
            generator = torch.Generator().manual_seed(stream_seed(cfg.seed, step, PROGRESSIVE_STREAM))

            logits, result, prog_logits = model(batch.inputs, solve_cfg, generator=generator)
            loss = compute_loss(task, logits, prog_logits, batch.targets, solve_cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
            if not math.isfinite(float(grad_norm)):  # the same on every process: DDP averaged the gradients
                raise FloatingPointError(f"the gradient norm is {float(grad_norm)} at step {step + 1}; the update "
                                         f"was not applied, and the last saved step is in {ckpt_path}, if any")
            optimizer.step()
            step += 1
            adjoint = raw_model.backward_result  # backward="ift": the adjoint solve of this step
            if adjoint is not None and adjoint.status is not Status.CONVERGED:
                adjoint_failures += 1
                if adjoint_failures == 1:
                    warn(f"step {step}: the IFT adjoint solve failed ({adjoint.message}); the gradient is "
                         "approximate (raise --b-max-iter, or try --b-solver anderson); counted in metrics.jsonl")

            # Statistics of this step, averaged (worst residual: max) over processes.
            with torch.no_grad():
                acc = task.exact_match(task.predict(logits, batch.inputs), batch).float().mean()
                residual = torch.nan_to_num(result.residual.max().float(), nan=math.inf)
                mean = torch.stack([loss.detach().float(), acc, result.n_steps.float().mean(),
                                    result.converged.float().mean()])
                worst = torch.stack([residual, torch.tensor(float(bool(stop_signal)), device=residual.device)])
            if distributed:
                dist.all_reduce(mean)
                mean /= world_size
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            loss_v, acc_v, steps_v, conv_v, residual_v, stop_v = torch.cat([mean, worst]).tolist()  # one sync
            stopping = stop_v > 0
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"loss is {loss_v} at step {step}; the last saved step is in "
                                         f"{ckpt_path}, if any")

            if master:
                if step % cfg.log_every == 0 or step == cfg.steps:
                    row = {"kind": "train", "step": step, "loss": loss_v, "acc": acc_v, "lr": lr,
                           "grad_norm": float(grad_norm), "solver_steps": steps_v, "converged": conv_v,
                           "max_residual": residual_v, "time": round(time.time() - t_start, 3)}
                    if adjoint is not None:
                        row.update(b_steps=float(adjoint.n_steps.float().mean()),
                                   b_converged=float(adjoint.converged.float().mean()),
                                   b_max_residual=float(adjoint.residual.max()), b_failures=adjoint_failures)
                    log(row)
                progress.update(bar, completed=step, info=f"loss {loss_v:.4f}  acc {acc_v:.3f}  "
                                f"steps {steps_v:.1f}  res {residual_v:.2g}")
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    cells = {str(d): evaluate(raw_model, task, solve_cfg, b, max_iter=eval_iters[d], device=device)
                             for d, b in test_sets.items()}
                    row = {"kind": "eval", "step": step}
                    for key in next(iter(cells.values())):  # acc, solver_steps, ... and the task's metrics
                        if key != "n" and not key.startswith("by_"):  # breakdowns: the eval command
                            row[key] = {d: c[key] for d, c in cells.items()}
                    row["max_iter"] = {str(d): k for d, k in eval_iters.items()}
                    log(row)
                    if progress.console.is_terminal:
                        progress.console.print(f"step {step}: eval acc " + "  ".join(
                            f"{d}: {a:.3f}" for d, a in row["acc"].items()))
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or stopping:
                    save(step)
            if stopping:
                signum = stop_signal[0] if stop_signal else signal.SIGTERM
                raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {step}; "
                                  f"{ckpt_path} holds it (continue with --resume)", signum)
        if master:
            losses = [r["loss"] for r in metrics if r.get("kind") == "train" and r.get("loss") is not None]
            tail = losses[-max(1, len(losses) // 4):]  # the last quarter of the logged steps
            if len(losses) >= 8 and sum(tail) / len(tail) > 1.25 * losses[0]:  # noise aside: clearly above
                warn(f"the training loss rose from {losses[0]:.4g} (first logged step) to {sum(tail) / len(tail):.4g} "
                     "(mean of the last quarter): the run diverged; try a lower --lr")
        if distributed:
            dist.barrier()  # every rank leaves together: none tears down gloo while another still uses it
        return ckpt_path
    finally:
        if lock is not None:
            lock.close()  # releases the flock
        if progress is not None:
            progress.stop()
        if restore_signals is not None:
            restore_signals()
        if distributed and dist.is_initialized():
            # DDP's reducer holds gloo work; free it before the group, not at interpreter exit,
            # where gloo's threads can abort the process ("terminate called without an active exception").
            model = None  # noqa: F841
            gc.collect()
            dist.destroy_process_group()


def strict_json(value):
    """`value` with every non-finite float as None, so metrics.jsonl is strict JSON (no NaN, Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Replace `path` by `rows` as JSON lines, atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in rows))
    os.replace(tmp, path)


def _lock_dir(out_dir: Path):
    """An exclusive lock on out_dir/.train.lock, held while the returned file stays open (the kernel
    drops it when the process dies, kill -9 included); FileExistsError if another process holds it."""
    fh = open(out_dir / ".train.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise FileExistsError(f"{out_dir} is in use by another training (pid {holder}); wait for it, or choose "
                              "another --out-dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


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
