"""A training run's directory and output: what `deqloop.train.train` writes and prints.

    out_dir/checkpoint.pt   atomic, every ckpt_every steps and at the end (deqloop.checkpoint)
    out_dir/best.pt         the same kind of file, at the periodic evaluation with the highest mean
                            accuracy so far (replaced only by a strictly better one, also across
                            --resume): a run that collapses late keeps its best weights
    out_dir/metrics.jsonl   a train row every log_every steps, an eval row every eval_every
    out_dir/config.json     the three configs (train --config reads it back)
    out_dir/.train.lock     held while the run lives: a second training of the directory is refused
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from deqloop.checkpoint import load_checkpoint, save_checkpoint
from deqloop.errors import CheckpointError, ConfigError
from deqloop.evaluate import eval_max_iter, evaluate, test_set
from deqloop.io import lock_dir, progress_bar, strict_json, write_rows
from deqloop.model import LoopedTransformer, ModelConfig, SolveConfig
from deqloop.train_config import TrainConfig, check_resumable
from solvers.result import SolverResult, Status
from tasks import Task

if TYPE_CHECKING:
    from deqloop.train import Processes


class Run:
    """A training run's files and output: the out_dir lock, resume, config.json, metrics.jsonl,
    checkpoints, periodic evaluation, the progress bar and warnings. Only the master process
    writes or prints; the others keep the step count."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, solve_cfg: SolveConfig, procs: Processes,
                 model: LoopedTransformer, optimizer: torch.optim.Optimizer):
        self.cfg, self.model_cfg, self.solve_cfg, self.procs = cfg, model_cfg, solve_cfg, procs
        self.model, self.optimizer = model, optimizer
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self.best_path = self.out_dir / "best.pt"
        self.best_score: float | None = None  # eval_score of the evaluation best.pt holds
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.step, self.metrics, self.adjoint_failures = 0, [], 0
        self.warned_unconverged = False  # the forward-solve warning of implicit gradients, once a run
        self.lock, self.progress, self.bar, self.test_sets, self.eval_iters = None, None, None, {}, {}
        self.tb = None  # a torch.utils.tensorboard SummaryWriter with --tensorboard (master only)

    def open(self, resume: bool) -> None:
        """Lock out_dir, restore the checkpoint (resume) or refuse to overwrite one, write config.json."""
        cfg, master = self.cfg, self.procs.master
        if master:  # one training per directory: the second is refused before it writes anything
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.lock = lock_dir(self.out_dir)
        if resume:
            ckpt = load_checkpoint(self.ckpt_path)
            check_resumable(ckpt, cfg, self.model_cfg, self.solve_cfg)
            try:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"checkpoint {self.ckpt_path}: cannot restore the run "
                                      f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
            self.step, self.metrics = ckpt["step"], list(ckpt["metrics"])
            if ckpt["world_size"] != self.procs.world_size and master:
                print(f"warning: the checkpoint was trained by {ckpt['world_size']} processes, now "
                      f"{self.procs.world_size}: the data of the remaining steps differs from the uninterrupted run")
            self.metrics.append({"kind": "resume", "step": self.step, "world_size": self.procs.world_size})
            self.best_score = saved_best_score(self.best_path) if master else None  # only the master evaluates
        else:
            for path in (self.ckpt_path, self.best_path):
                if path.exists():
                    raise FileExistsError(f"{path} exists; resume it (--resume) or choose another --out-dir")
        if master:
            # metrics.jsonl restarts from the checkpoint's rows: rows a killed run wrote after its
            # last checkpoint are dropped, since those steps are repeated.
            write_rows(self.metrics_path, self.metrics)
            (self.out_dir / "config.json").write_text(json.dumps(
                {"task": cfg.task, "train": cfg.to_dict(), "model": self.model_cfg.to_dict(),
                 "solve": self.solve_cfg.to_dict()}, indent=1) + "\n")

    def start(self, task: Task) -> None:
        """The test sets of the periodic evaluation and the progress bar (master only)."""
        self.task, self.t_start = task, time.time()
        if not self.procs.master:
            return
        if self.cfg.eval_every > 0:
            self.test_sets = {d: test_set(task, d, self.cfg.eval_size) for d in self.cfg.test_difficulties}
            self.eval_iters = {d: eval_max_iter(task, self.solve_cfg, d) for d in self.test_sets}  # harder: more
        if self.cfg.tensorboard:
            self.tb = open_tensorboard(self.out_dir / "tensorboard")
        self.progress = progress_bar(info=True, console=Console())
        self.bar = self.progress.add_task(self.cfg.task, total=self.cfg.steps, completed=self.step, info="")
        self.progress.start()

    def finish_step(self, stats: dict, grad_norm: float, lr: float, adjoint: SolverResult | None) -> None:
        """Count the step; log, evaluate and save as the config asks (master)."""
        cfg = self.cfg
        self.step += 1
        step = self.step
        if adjoint is not None and adjoint.status is not Status.CONVERGED:  # backward="ift": its adjoint solve
            self.adjoint_failures += 1
            if self.adjoint_failures == 1:
                self.warn(f"step {step}: the IFT adjoint solve failed ({adjoint.message}); the gradient is "
                          "approximate (raise --b-max-iter, or try --b-solver anderson); counted in metrics.jsonl")
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"loss is {stats['loss']} at step {step}; the last saved step is in "
                                     f"{self.ckpt_path}, if any")
        if not self.procs.master:
            return
        if step % cfg.log_every == 0 or step == cfg.steps or "rho_estimate" in stats:  # rho: --jac-log-every
            row = {"kind": "train", "step": step, "loss": stats["loss"], "acc": stats["acc"], "lr": lr,
                   "grad_norm": grad_norm, "solver_steps": stats["solver_steps"], "converged": stats["converged"],
                   "max_residual": stats["max_residual"], "time": round(time.time() - self.t_start, 3)}
            row.update({k: stats[k] for k in ("jac_frobenius", "rho_estimate") if k in stats})
            if adjoint is not None:
                row.update(b_steps=float(adjoint.n_steps.float().mean()),
                           b_converged=float(adjoint.converged.float().mean()),
                           b_max_residual=float(adjoint.residual.max()), b_failures=self.adjoint_failures)
            self.log(row)
            self.warn_if_unconverged()
        self.progress.update(self.bar, completed=step, info=f"loss {stats['loss']:.4f}  acc {stats['acc']:.3f}  "
                             f"steps {stats['solver_steps']:.1f}  res {stats['max_residual']:.2g}")
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            self.evaluate()
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or stats["stop"]:
            self.save()

    def evaluate(self) -> None:
        """An eval row: each metric per test difficulty, at that difficulty's budget."""
        cells = {str(d): evaluate(self.model, self.task, self.solve_cfg, b, max_iter=self.eval_iters[d],
                                  device=self.procs.device) for d, b in self.test_sets.items()}
        row = {"kind": "eval", "step": self.step}
        for key in next(iter(cells.values())):  # acc, solver_steps, ... and the task's metrics
            if key != "n" and not key.startswith("by_"):  # breakdowns: the eval command
                row[key] = {d: c[key] for d, c in cells.items()}
        row["max_iter"] = {str(d): k for d, k in self.eval_iters.items()}
        score = eval_score(row)
        better = score is not None and (self.best_score is None or score > self.best_score)
        if better:
            row["best"] = True
        self.log(row)
        if better:  # after log: best.pt's metrics end with this row, which is how a resume reads its score
            self._save(self.best_path)
            self.best_score = score
        if self.progress.console.is_terminal:
            self.progress.console.print(f"step {self.step}: eval acc " + "  ".join(
                f"{d}: {a:.3f}" for d, a in row["acc"].items()) + ("  (best so far: best.pt)" if better else ""))

    def save(self) -> None:
        self._save(self.ckpt_path)
        if self.cfg.keep_checkpoints:
            kept = self.out_dir / f"checkpoint_step{self.step}.pt"
            kept.unlink(missing_ok=True)
            try:
                os.link(self.ckpt_path, kept)  # the next save replaces checkpoint.pt, not this file
            except OSError:
                shutil.copyfile(self.ckpt_path, kept)

    def _save(self, path: Path) -> None:
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, step=self.step,
                        task=self.cfg.task, model_cfg=self.model_cfg, solve_cfg=self.solve_cfg,
                        train_cfg=self.cfg.to_dict(), metrics=self.metrics, world_size=self.procs.world_size)

    def log(self, row: dict) -> None:
        row = strict_json(row)
        self.metrics.append(row)
        if self.tb is not None:
            _tensorboard_row(self.tb, row)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
        if not self.progress.console.is_terminal:  # no live bar in a log file: one readable line per row
            print(row_line(row, self.cfg.steps), flush=True)

    def warn(self, message: str, kind: str = "warning") -> None:
        if not self.procs.master:
            return
        if self.progress.console.is_terminal:
            self.progress.console.print(f"{kind}: {message}")
        else:
            print(f"{kind}: {message}", file=sys.stderr)

    def warn_if_unconverged(self, window: int = 5, below: float = 0.5) -> None:
        """Once a run: an implicit gradient (backward ift or phantom) is taken at the forward solve's
        last iterate, which is the loss's gradient only at a fixed point. Warn when the forward
        solve reached tol on fewer than `below` of the batch over the last `window` logged steps
        (the eighth session's IFT runs on prefix sums had their forward budget too small to converge)."""
        backward = self.solve_cfg.backward
        if backward not in ("ift", "phantom") or self.warned_unconverged:
            return
        recent = list(itertools.islice((r["converged"] for r in reversed(self.metrics) if r.get("kind") == "train"),
                                       window))  # the last `window` train rows, without a scan of the run
        if len(recent) == window and sum(recent) / window < below:
            self.warned_unconverged = True
            self.warn(f"step {self.step}: the forward solve reached tol on {100 * sum(recent) / window:.0f}% of the "
                      f"batch over the last {window} logged steps (max_iter {self.solve_cfg.max_iter}); a {backward} "
                      "gradient away from the fixed point is not the loss's gradient: raise --max-iter or --tol")

    def warn_if_diverged(self) -> None:
        losses = [r["loss"] for r in self.metrics if r.get("kind") == "train" and r.get("loss") is not None]
        tail = losses[-max(1, len(losses) // 4):]  # the last quarter of the logged steps
        if len(losses) >= 8 and sum(tail) / len(tail) > 1.25 * losses[0]:  # noise aside: clearly above
            self.warn(f"the training loss rose from {losses[0]:.4g} (first logged step) to {sum(tail) / len(tail):.4g} "
                      "(mean of the last quarter): the run diverged; try a lower --lr")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.lock is not None:
            self.lock.close()  # releases the flock
        if self.progress is not None:
            self.progress.stop()


def eval_score(row: dict) -> float | None:
    """What best.pt is chosen by: an eval row's exact accuracy, averaged over its test difficulties
    (those with a value); None if it has none. These are the periodic evaluation's test examples,
    so best.pt's accuracy on them is optimistic by the choice; a figure to publish comes from
    `eval` at a fixed step (the recipes' documented results are the final checkpoint.pt's)."""
    accs = [a for a in row.get("acc", {}).values() if a is not None]
    return sum(accs) / len(accs) if accs else None


def saved_best_score(path: Path) -> float | None:
    """The eval_score best.pt was saved for (its last eval row), or None without a usable best.pt:
    a damaged one is replaced by the next evaluation rather than stopping the resume."""
    if not path.exists():
        return None
    try:
        rows = load_checkpoint(path)["metrics"]
    except CheckpointError as e:
        print(f"warning: {e}; the next evaluation replaces it", file=sys.stderr)
        return None
    evals = [r for r in rows if r.get("kind") == "eval"]
    return eval_score(evals[-1]) if evals else None


def open_tensorboard(path: Path):
    """A SummaryWriter on `path`; ConfigError (one line) if the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'deqloop[tensorboard]'") from None
    return SummaryWriter(log_dir=str(path))


def _tensorboard_row(writer, row: dict) -> None:
    """A metrics row as scalars at its step: train/<name>, and eval/<name>/<difficulty>."""
    kind, step = row.get("kind"), row.get("step", 0)
    if kind not in ("train", "eval"):
        return
    for name, value in row.items():
        if name in ("kind", "step", "time"):
            continue
        values = value if isinstance(value, dict) else {"": value}
        for d, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                writer.add_scalar(f"{kind}/{name}" + (f"/{d}" if d else ""), v, step)
    writer.flush()


def row_line(row: dict, steps: int) -> str:
    """A metrics row as one line for a log file (metrics.jsonl keeps every number)."""
    num = lambda v, f: "n/a" if v is None else format(v, f)
    if row.get("kind") == "train":
        line = (f"step {row['step']}/{steps}  loss {num(row['loss'], '.4f')}  acc {num(row['acc'], '.3f')}  "
                f"lr {num(row['lr'], '.2e')}  grad {num(row['grad_norm'], '.3g')}  solver {num(row['solver_steps'], '.1f')} "
                f"steps, {num(row['converged'], '.0%')} converged  {row['time']:.0f} s")
        extra = [f"{k} {num(row[k], '.3g')}" for k in ("rho_estimate", "jac_frobenius", "b_steps") if k in row]
        return line + ("  " + "  ".join(extra) if extra else "")
    if row.get("kind") == "eval":
        return f"step {row['step']} eval acc: " + ", ".join(
            f"{d} {num(a, '.3f')} (@{row.get('max_iter', {}).get(d, '?')})" for d, a in row["acc"].items()) + (
            "  (best so far: best.pt)" if row.get("best") else "")
    return json.dumps(row)
