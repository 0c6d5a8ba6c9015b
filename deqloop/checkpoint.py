"""Checkpoints: one file that rebuilds, evaluates and resumes a run without its command (DESIGN §5).

    save_checkpoint(path, model=..., optimizer=..., step=..., ...)   # atomic: temp file + os.replace
    ckpt = load_checkpoint(path)            # a validated plain dict; raises CheckpointError
    model, task = load_model(ckpt)          # weights loaded, in eval mode

The file is a `torch.save` of plain dicts, lists, strings, numbers and tensors only, so it loads
with `torch.load(weights_only=True)`: loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import deqloop
from deqloop.model import LoopedTransformer, ModelConfig, SolveConfig, build_model
from deqloop.errors import CheckpointError
from deqloop.io import atomic_file
from tasks import TASKS, Task, TaskInputError, get_task

FORMAT = "deqloop-checkpoint"  # the `format` key; tells a deqloop checkpoint from any other torch file
FORMAT_VERSION = 1  # bumped when the layout below changes incompatibly
KEYS = ("format", "format_version", "deqloop_version", "torch_version", "task", "model_config",
        "solve_config", "train_config", "model", "optimizer", "step", "data_seed", "world_size", "metrics")


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, task: str, model_cfg: ModelConfig, solve_cfg: SolveConfig,
                    train_cfg: dict, metrics: list[dict], world_size: int = 1) -> Path:
    """Write the run's state to `path` atomically: a reader sees the old file or the new one, never half.

    `step` counts finished optimizer steps (the next step to run); `train_cfg` is a plain dict
    (TrainConfig.to_dict()), so this module does not depend on the training loop.
    """
    path = Path(path)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a poisoned step must never replace the last good checkpoint
        raise FloatingPointError(f"not saving {path}: {len(bad)} model tensors hold nan or inf "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deqloop_version": str(deqloop.__version__),
        "torch_version": str(torch.__version__),
        "task": task,
        "model_config": model_cfg.to_dict(),
        "solve_config": solve_cfg.to_dict(),
        "train_config": dict(train_cfg),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "data_seed": int(train_cfg["seed"]),
        "world_size": int(world_size),
        "metrics": list(metrics),
    }
    # Same directory, so os.replace is a rename on one filesystem (atomic on POSIX).
    remove_stale_temps(path)
    with atomic_file(path, "wb", fsync=True) as fh:
        torch.save(state, fh)
    return path


def remove_stale_temps(path: str | Path) -> None:
    """Delete the `.{name}.tmp-PID` files of `path` left by processes that no longer run (a save
    killed with -9); those of live processes are theirs to finish."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# Trained checkpoints shipped with the package (deqloop/models/<name>/checkpoint.pt, in the
# wheel too): `cli.py solve sudoku ...` takes the name where no file of that name exists.
MODELS = Path(__file__).resolve().parent / "models"


def shipped_models() -> list[str]:
    return sorted(p.parent.name for p in MODELS.glob("*/checkpoint.pt"))


def resolve_checkpoint(path: str | Path) -> Path:
    """`path`, or the shipped model of that name when no such file exists."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and (MODELS / path.name / "checkpoint.pt").is_file():
        return MODELS / path.name / "checkpoint.pt"
    return path


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path` (or the shipped model named `path`, see resolve_checkpoint) as a
    plain dict, checked; raises `CheckpointError` naming the problem."""
    path = resolve_checkpoint(path)
    if not path.exists():
        names = ", ".join(shipped_models()) or "none"
        raise CheckpointError(f"checkpoint {path}: no such file (shipped models, usable by name: {names})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({e.strerror})") from None
    # torch.save writes a zip archive; classify the usual failures before torch's long messages.
    if not head:
        raise CheckpointError(f"checkpoint {path}: empty file")
    if head != b"PK\x03\x04":
        raise CheckpointError(f"checkpoint {path}: not a checkpoint (not a torch.save zip archive)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt (incomplete zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged record, or a pickled object weights_only refuses
        raise CheckpointError(f"checkpoint {path}: corrupt or not a deqloop checkpoint "
                              f"({_load_problem(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a deqloop checkpoint (no format={FORMAT!r} entry)")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {version!r}, this deqloop "
                              f"{deqloop.__version__} reads version {FORMAT_VERSION}")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path}: incomplete, missing {', '.join(missing)}")
    kinds = {"model": dict, "model_config": dict, "solve_config": dict, "train_config": dict, "task": str,
             "step": int, "world_size": int, "metrics": list}
    wrong = [f"{k} is a {type(ckpt[k]).__name__}, not a {kind.__name__}" for k, kind in kinds.items()
             if k in ckpt and (not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool))]
    if ckpt.get("optimizer") is not None and not isinstance(ckpt["optimizer"], dict):
        wrong.append(f"optimizer is a {type(ckpt['optimizer']).__name__}, not a dict")
    if isinstance(ckpt.get("model"), dict) and not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        wrong.append("model holds entries that are not tensors")
    if isinstance(ckpt.get("metrics"), list) and not all(isinstance(r, dict) for r in ckpt["metrics"]):
        wrong.append("metrics holds rows that are not dicts")
    if isinstance(ckpt.get("step"), int) and ckpt["step"] < 0:
        wrong.append(f"step is {ckpt['step']}")
    if wrong:
        raise CheckpointError(f"checkpoint {path}: damaged ({'; '.join(wrong)})")
    ckpt["path"] = str(path)
    return ckpt


def configs(ckpt: dict) -> tuple[ModelConfig, SolveConfig]:
    """The model and solve configs stored in a loaded checkpoint."""
    try:
        return ModelConfig(**ckpt["model_config"]), SolveConfig(**ckpt["solve_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt.get('path')}: its configs do not fit this deqloop "
                              f"{deqloop.__version__} (saved by {ckpt.get('deqloop_version')}): "
                              f"{_first_line(e)}") from None


def with_solver(solve: SolveConfig, solver: str | None = None, options: dict | None = None,
                task: str | None = None) -> SolveConfig:
    """`solve` with another forward solver and / or solver options (None: the checkpoint's). The
    options replace the stored ones when the solver changes, else go over them; a new solver starts
    from the options `task` (its name) gives it on a trained loop (Task.solver_options), and
    `options` go over those. ConfigError (naming the valid choices) on an unknown solver or option."""
    if solver is None and not options:
        return solve
    if solver in (None, solve.solver):
        base = solve.solver_options or {}
    else:  # an unknown task is load_model's error, with the file's name
        base = getattr(TASKS.get(task), "solver_options", {}).get(solver, {})
    return replace(solve, solver=solver or solve.solver, solver_options={**base, **(options or {})} or None)


def load_model(ckpt: dict | str | Path, device: str | torch.device = "cpu") -> tuple[LoopedTransformer, Task]:
    """The checkpoint's model (weights loaded, eval mode, on `device`) and its task."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    model_cfg, _ = configs(ckpt)
    try:
        task = get_task(ckpt["task"])
    except TaskInputError as e:
        raise CheckpointError(f"checkpoint {ckpt['path']}: {e}") from None
    model = build_model(model_cfg, seed=0)  # the init is overwritten by the saved weights
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt['path']}: its weights do not fit this deqloop "
                              f"{deqloop.__version__}'s model ({_first_line(e)})") from None
    return model.to(device).eval(), task


def load_run(ckpt: dict | str | Path, device: str | torch.device = "cpu", *, solver: str | None = None,
             solver_options: dict | None = None) -> tuple[LoopedTransformer, Task, ModelConfig, SolveConfig]:
    """What eval, solve and diagnose start from: the checkpoint's model (as load_model), its task,
    and its configs, with the forward solver overridden as `with_solver` does."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    model_cfg, solve_cfg = configs(ckpt)
    solve_cfg = with_solver(solve_cfg, solver, solver_options, ckpt.get("task"))  # fails before the weights load
    model, task = load_model(ckpt, device)
    return model, task, model_cfg, solve_cfg


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The exception as one line of at most `limit` characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _load_problem(e: BaseException) -> str:
    """What torch.load objected to, without its multi-paragraph advice."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e)) or re.search(r"unsupported GLOBAL (\S+)", str(e))
    if m:
        return (f"holds a pickled {m.group(1)} object, refused without running it; only tensors and plain "
                "containers are allowed")
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    return f"{type(e).__name__}: {m.group(1).strip()}" if m else _first_line(e, 160)
