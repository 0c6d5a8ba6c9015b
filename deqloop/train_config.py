"""The training settings (TrainConfig) and what a resumed run may change (RUN_CONTROL), in one place.

A resumed run keeps every setting of its checkpoint except the RUN_CONTROL fields; both the
command line (cli.resumed_configs) and deqloop.train.train check that with `check_resumable`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from deqloop.checkpoint import configs
from deqloop.errors import CheckpointError, ConfigError
from deqloop.model import ModelConfig, SolveConfig, check_field_types


@dataclass
class TrainConfig:
    task: str  # task name, a key of tasks.TASKS
    seed: int = 0  # model init, training data and the progressive depth all derive from it
    steps: int = 3000  # optimizer steps
    batch_size: int = 64  # examples per optimizer step, summed over all processes
    lr: float = 1e-3  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.01  # AdamW decoupled decay (torch's default), on matrices and embeddings only
    beta2: float = 0.999  # AdamW's second-moment decay (torch's default); lower forgets a quiet stretch's small gradients sooner
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
    jac_reg: float = 0.0  # weight of the Jacobian regularizer ||J||_F^2 / numel at z* (Bai et al. 2021; 0: off)
    jac_reg_samples: int = 1  # Hutchinson vectors of that estimate
    jac_log_every: int = 0  # log rho(J) (power estimate) and ||J||_F^2 / numel at z* every N steps (0: never)
    rho_reg: float = 0.0  # weight of the pull of rho(J) at z* toward rho_target (0: off)
    rho_target: float = 0.9  # the spectral radius that pull aims at (one-sided: only a larger rho is penalized)
    compile: bool = False  # torch.compile the loop block for training steps (eager fallback, with a note)
    pack: bool = True  # pack a batch of mixed lengths into fewer rows where the loss stays the same (deqloop.packing)
    tensorboard: bool = False  # also log every metrics row to out_dir/tensorboard (pip install 'deqloop[tensorboard]')

    def __post_init__(self):
        for name in ("train_difficulties", "test_difficulties"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(d) for d in value))
                if not value:
                    raise ConfigError(f"{name} is empty")
        check_field_types(self)
        for name in ("steps", "batch_size", "eval_size", "log_every", "jac_reg_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "warmup_steps", "eval_every", "ckpt_every", "grad_clip", "weight_decay", "jac_reg",
                     "jac_log_every", "rho_reg", "rho_target"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta2 must be in [0, 1), got {self.beta2}")
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
               "out_dir", "device", "tensorboard", "jac_log_every", "compile", "pack")


def stored_configs(ckpt: dict) -> tuple[TrainConfig, ModelConfig, SolveConfig]:
    """The configs a checkpoint was trained with; CheckpointError if they do not fit this deqloop."""
    model_cfg, solve_cfg = configs(ckpt)
    try:
        return TrainConfig.from_dict(ckpt["train_config"]), model_cfg, solve_cfg
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt['path']}: its train config does not fit this deqloop "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None


def check_resumable(ckpt: dict, cfg: TrainConfig, model_cfg: ModelConfig, solve_cfg: SolveConfig, *,
                    flag_of: Callable[[str, str], str] | None = None) -> None:
    """Raise ConfigError if the configs differ from the checkpoint's beyond the RUN_CONTROL fields;
    `flag_of(kind, field)` names the setting as the user gave it (cli: its --flag)."""
    pairs = zip(("train", "model", "solve"), stored_configs(ckpt), (cfg, model_cfg, solve_cfg))
    for kind, saved, given in pairs:
        saved, given = saved.to_dict(), given.to_dict()
        for key in saved:
            if saved[key] != given.get(key) and not (kind == "train" and key in RUN_CONTROL):
                value = given.get(key)
                what = f"{flag_of(kind, key)} {value}" if flag_of else f"{kind} setting {key}={value!r}"
                raise ConfigError(f"cannot resume {ckpt['path']}: {what} differs from the checkpoint's "
                                  f"{key}={saved[key]!r}; a resumed run keeps its settings "
                                  f"(only {', '.join(RUN_CONTROL)} may change)")
