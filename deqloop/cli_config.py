"""From the command line to the three configs of a training run, one source for each field:
an explicit flag, else --config FILE, else the task's --preset, else its recipe (Task.model_defaults,
solve_defaults, train_defaults), else the dataclass default. A resumed run takes its checkpoint's
configs, and a flag may only repeat them or change a RUN_CONTROL field (train_config.check_resumable).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, replace
from pathlib import Path

from deqloop.checkpoint import load_checkpoint
from deqloop.cli_args import one_line
from deqloop.errors import UsageError
from deqloop.model import ModelConfig, SolveConfig, task_configs
from deqloop.train_config import TrainConfig, check_resumable, stored_configs
from tasks import get_task


CONFIGS = {"model": ModelConfig, "solve": SolveConfig, "train": TrainConfig}


SET_BY_TASK = ("task", "vocab_size", "n_classes")  # fields no flag sets


# flag dest -> (config, field), for every field of the three configs: the field's own name,
# except --heads (add_train declares each; a test checks that none is missing)
TRAIN_FLAGS = {{"n_heads": "heads"}.get(f.name, f.name): (kind, f.name)
               for kind, cls in CONFIGS.items() for f in fields(cls) if f.name not in SET_BY_TASK}


def default(cls, name: str):
    (f,) = [f for f in fields(cls) if f.name == name]
    return f.default if f.default is not MISSING else f.default_factory()


def train_configs(args) -> tuple[TrainConfig, ModelConfig, SolveConfig]:
    """The configs from the flags: an explicit flag, else the task's model_defaults / solve_defaults,
    else the dataclass default."""
    given = {kind: {} for kind in CONFIGS}
    if getattr(args, "config", None):
        from_file = read_config(args.config)
        if args.task and from_file["task"] != args.task:
            raise UsageError(f"--task {args.task} differs from {args.config}'s task {from_file['task']!r}")
        args.task = from_file["task"]
        given = {kind: dict(from_file.get(kind) or {}) for kind in CONFIGS}
    if not args.task:
        raise UsageError("the following arguments are required: --task (or --config FILE)")
    task = get_task(args.task)
    for dest, (kind, name) in TRAIN_FLAGS.items():
        if hasattr(args, dest):  # an explicit flag wins over the file
            value = getattr(args, dest)
            given[kind][name] = dict(value) if dest == "solver_options" else value
    preset = getattr(args, "preset", None)
    recipe = task.recipe(preset)
    if args.resume:  # a repeated --preset must agree with the checkpoint, like a repeated flag
        over = task.presets.get(preset, {}) if preset else {}
        return resumed_configs(args.task, {kind: {**over.get(kind, {}), **values} for kind, values in given.items()})
    model_cfg, solve_cfg = task_configs(task, given["model"], given["solve"], preset)
    return TrainConfig(task=args.task, **{**recipe["train"], **given["train"]}), model_cfg, solve_cfg


def read_config(path: str) -> dict:
    """{"task", "train", "model", "solve"} from a config.json a run wrote (or --print-config's output)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"--config {path} is not JSON: {one_line(e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("task"), str):
        raise UsageError(f"--config {path}: expected an object with a task and train / model / solve sections")
    extra = sorted(set(data) - {"task", *CONFIGS})
    if extra:
        raise UsageError(f"--config {path}: unknown sections {', '.join(extra)} (expected task, {', '.join(CONFIGS)})")
    for kind, cls in CONFIGS.items():
        section = data.get(kind) or {}
        if not isinstance(section, dict):
            raise UsageError(f"--config {path}: {kind} is not an object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise UsageError(f"--config {path}: unknown {kind} fields {', '.join(unknown)}")
        for fixed in ("task", "vocab_size", "n_classes"):  # set by the task, not by a config
            section.pop(fixed, None)
        data[kind] = section
    return data


def config_json(cfg: TrainConfig, model_cfg: ModelConfig, solve_cfg: SolveConfig) -> str:
    """The configs as the JSON of a run's config.json (what --config reads back)."""
    return json.dumps({"task": cfg.task, "train": cfg.to_dict(), "model": model_cfg.to_dict(),
                       "solve": solve_cfg.to_dict()}, indent=1)


def recipe_text(task) -> str:
    """The task's training-recipe fields in one line, for --help."""
    recipe = task.recipe()
    text = ", ".join(f"{k}={v}" for kind in ("model", "solve", "train") for k, v in recipe[kind].items())
    if task.presets:
        text += " (presets: " + ", ".join(task.presets) + ")"
    return text


def resumed_configs(task: str, given: dict) -> tuple[TrainConfig, ModelConfig, SolveConfig]:
    """The checkpoint's configs; a flag may repeat a stored value or change a RUN_CONTROL field, nothing else."""
    out_dir = given["train"].get("out_dir") or str(Path("runs") / task)
    ckpt = load_checkpoint(Path(out_dir) / "checkpoint.pt")
    if ckpt["task"] != task:
        raise UsageError(f"{ckpt['path']} is a {ckpt['task']!r} run, not {task!r}")
    cfg, model_cfg, solve_cfg = stored_configs(ckpt)
    wanted = (replace(cfg, **{**given["train"], "out_dir": out_dir}), replace(model_cfg, **given["model"]),
              replace(solve_cfg, **given["solve"]))
    check_resumable(ckpt, *wanted, flag_of=lambda kind, name: "--" + next(
        d for d, kn in TRAIN_FLAGS.items() if kn == (kind, name)).replace("_", "-"))
    return wanted
