"""From the command line to the three configs of a training run, one source for each field:
an explicit flag, else --config FILE, else the task's --preset, else its recipe (Task.model_defaults,
solve_defaults, train_defaults), else the dataclass default. A resumed run takes its checkpoint's
configs, and a flag may only repeat them or change a RUN_CONTROL field (train_config.check_resumable).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields, replace
from pathlib import Path

from deqloop.checkpoint import load_checkpoint
from deqloop.cli_args import difficulty_list, none_or_float, none_or_str, one_line, solver_option, window_arg
from deqloop.errors import UsageError
from deqloop.model import BACKWARDS, NORMS, RECALLS, RELATIONS, Z0S, ModelConfig, SolveConfig, task_configs
from deqloop.train_config import TrainConfig, check_resumable, stored_configs
from tasks import TASKS, get_task


CONFIGS = {"model": ModelConfig, "solve": SolveConfig, "train": TrainConfig}


SET_BY_TASK = ("task", "vocab_size", "n_classes")  # fields no flag sets


def task_solver_options_text() -> str:
    """Task.solver_options as help text: 'sudoku broyden: gate=0.85 warmup=16'."""
    given = [f"{name} {solver}: " + " ".join(f"{k}={v}" for k, v in options.items())
             for name, task in TASKS.items() for solver, options in task.solver_options.items()]
    return "; ".join(given) or "none"


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


# --help of every training flag, by group: dest -> (help, argparse options). One entry per
# TRAIN_FLAGS key (tests/test_cli.py checks that every config field has its flag).
FLAG_HELP = {
    "model": {
        "recall": ("input injection", {"choices": RECALLS}),
        "norm": ("normalization placement", {"choices": NORMS}),
        "z0": ("initial state", {"choices": Z0S}),
        "d_model": ("width of the loop state", {"type": int}),
        "heads": ("attention heads", {"type": int}),
        "mlp_ratio": ("MLP width / d_model", {"type": int}),
        "window": ("local attention window, or 'none' for global attention",
                   {"type": window_arg, "shown": f"the task's, else {default(ModelConfig, 'window')}"}),
        "n_positions": ("learned absolute positions, 0 for none", {"type": int, "shown": "the task's, else 0"}),
        "relations": ("board-structured attention: " + ", ".join(RELATIONS) + ", or 'none'",
                      {"type": none_or_str, "shown": "the task's, else none"}),
        "causal": ("attend to earlier positions only (--no-causal: to all)",
                   {"action": argparse.BooleanOptionalAction, "shown": f"the task's, else {default(ModelConfig, 'causal')}"}),
        "z0_seed": ("seed of the random initial state (--z0 random)", {"type": int}),
        "cell_norm": ("normalize the loop block's linear layers: spectral, weight, or 'none' (solvers.normalize)",
                      {"type": none_or_str}),
        "autocast": ("bf16: the loop block's matmuls in bfloat16 in training steps (residuals and solver state "
                     "stay float32; evaluation solves in float32); auto: bf16 where the device runs it natively "
                     "(AVX512-BF16 / AMX CPUs, CUDA from Ampere), else float32; or 'none'", {"type": none_or_str}),
        "dropout": ("variational dropout on the block's residual branches, one mask per solve (0: off)",
                    {"type": float}),
    },
    "solver": {
        "solver": ("forward solver (see solvers.SOLVERS); every task's recipe takes fixed_point_iter: on "
                   "their trained loops no accelerated solver was as accurate and much faster at every "
                   "difficulty (bench/solvers_on_checkpoints.py, docs/TRAINING.md)", {}),
        "max_iter": ("forward iterations at most", {"type": int}),
        "tol": ("relative residual at which a sample stops", {"type": float}),
        "solver_options": ("a forward-solver option KEY=VALUE (anderson: m, beta, reg, block_size, safeguard, "
                           "max_restarts, warmup, gate; broyden: m, safeguard, max_restarts, warmup, gate; "
                           "fixed_point_iter: tau; none turns one off), repeatable; over the ones a task "
                           f"gives a solver on its trained loops ({task_solver_options_text()})",
                           {"type": solver_option, "action": "append", "metavar": "KEY=VALUE", "shown": "none",
                            "option": "--solver-option"}),
        "backward": ("gradient", {"choices": BACKWARDS}),
        "b_solver": ("solver of the IFT adjoint system", {}),
        "b_max_iter": ("adjoint iterations at most", {"type": int}),
        "b_tol": ("adjoint tolerance", {"type": float}),
        "phantom_steps": ("steps of the phantom gradient and of the progressive loss", {"type": int}),
        "progressive_alpha": ("weight of the progressive loss term", {"type": float}),
        "loss_every": ("unroll: also score every N-th iterate (loss along the loop), 0 for the last only",
                       {"type": int}),
        "loss_gamma": ("unroll with loss-every: weigh the k-th of n scored iterates gamma^(n-1-k) (fixed-point "
                       "correction; 'none': all alike)", {"type": none_or_float}),
        "detach_iters": ("unroll: the first N of the max-iter iterations run without gradient", {"type": int}),
        "detach_random": ("unroll: draw that no-gradient prefix from 0..N at every step (the differentiated "
                          "segment keeps its length)", {"action": "store_const", "const": True}),
    },
    "training": {
        "seed": ("seed of the init, the data and the progressive depth", {"type": int}),
        "steps": ("optimizer steps", {"type": int}),
        "batch_size": ("examples per step, over all processes", {"type": int}),
        "lr": ("peak learning rate", {"type": float}),
        "weight_decay": ("AdamW weight decay", {"type": float}),
        "beta2": ("AdamW second-moment decay", {"type": float}),
        "warmup_steps": ("linear warmup steps", {"type": int}),
        "min_lr_ratio": ("cosine floor as a fraction of lr", {"type": float}),
        "grad_clip": ("gradient norm clip, 0 for none", {"type": float}),
        "train_difficulties": ("comma-separated", {"shown": "the task's", "type": difficulty_list}),
        "test_difficulties": ("comma-separated", {"shown": "the task's", "type": difficulty_list}),
        "eval_every": ("evaluate every N steps, 0 for never", {"type": int}),
        "eval_size": ("test examples per difficulty", {"type": int}),
        "log_every": ("a metrics.jsonl train row every N steps", {"type": int}),
        "ckpt_every": ("save the checkpoint every N steps, 0 for the end only", {"type": int}),
        "keep_checkpoints": ("also keep checkpoint_step{N}.pt of every save", {"action": "store_const", "const": True}),
        "out_dir": ("output directory", {"shown": "runs/<task>", "metavar": "DIR"}),
        "device": ("auto, cpu, cuda, cuda:1 ...", {}),
        "jac_reg": ("weight of the Jacobian regularizer ||J||_F^2/numel at z* (Bai et al. 2021), 0 for off",
                    {"type": float}),
        "jac_reg_samples": ("Hutchinson vectors of the regularizer", {"type": int}),
        "jac_log_every": ("log rho(J) and ||J||_F^2/numel at z* every N steps, 0 for never", {"type": int}),
        "rho_reg": ("weight of the pull of rho(J) at z* toward --rho-target (one-sided), 0 for off", {"type": float}),
        "rho_target": ("the spectral radius --rho-reg aims at", {"type": float}),
        "compile": ("torch.compile the loop block for the training steps (needs a C++ compiler on CPU; "
                    "falls back to eager with a note)", {"action": "store_const", "const": True}),
        "pack": ("solve a batch of mixed lengths packed end to end in fewer rows where that gives the same loss "
                 "(a causal local loop unrolled, no dropout or Jacobian terms: prefix sums)",
                 {"action": argparse.BooleanOptionalAction}),
        "tensorboard": ("also log to <out-dir>/tensorboard (needs pip install 'deqloop[tensorboard]')",
                        {"action": "store_const", "const": True}),
    },
}
