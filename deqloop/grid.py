"""The paper's grid: recall x normalization x seeds on one task, trained, evaluated and diagnosed.

    spec = GRIDS["prefix_sums"]                         # or a GridSpec of your own
    run_grid(spec, "runs/grid", jobs=2)                 # resumable: finished cells are kept
    summary = summarize(spec, "runs/grid")              # per cell and per configuration
    write_report(spec, summary, "docs/results")         # markdown tables + plots

Each cell (recall, norm, seed) lives in <root>/<task>/<recall>-<norm>/seed<k>/: the training run
(its checkpoint.pt, metrics.jsonl), eval.json (accuracy per difficulty and test-time budget),
diagnose.json (the three axes) and, once all three are done, cell.json. A cell with cell.json is
never recomputed; a killed cell resumes its training from its last checkpoint. The settings every
cell shares are fixed in <root>/<task>/spec.json: running the grid again with other settings into
the same root is an error, not a silent mix. Cells run in child processes, `jobs` at a time, each
with cores / jobs threads; their output goes to the cell's log.txt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from deqloop.errors import UsageError
from deqloop.model import NORMS, RECALLS
from tasks import TaskInputError, get_task

GRID_VERSION = 1  # bump when the meaning of a cell's files changes


class GridError(UsageError):
    """A grid that cannot run as asked (settings differ from the root's, unknown names); one line."""


@dataclass(frozen=True)
class GridSpec:
    task: str
    recalls: tuple[str, ...] = RECALLS
    norms: tuple[str, ...] = NORMS
    seeds: tuple[int, ...] = (0, 1, 2)
    train: dict = field(default_factory=dict)  # TrainConfig fields (beyond task, seed, out_dir)
    model: dict = field(default_factory=dict)  # ModelConfig fields over the task's model_defaults
    solve: dict = field(default_factory=dict)  # SolveConfig fields over the task's solve_defaults
    eval_difficulties: tuple[int, ...] = ()  # () : the task's test difficulties
    iters: tuple[int, ...] = ()  # test-time budgets; () : training max_iter x 1, 2, 4, 8, 16
    eval_n: int = 64  # test examples per difficulty
    diagnose_difficulties: tuple[int, ...] = ()  # () : the eval difficulties
    diagnose: dict = field(default_factory=dict)  # DiagnoseSettings fields
    metric: str = "acc"  # the accuracy the report is about: acc (exact) or one of the task's metrics
    note: str = ""  # why this size: shown in the report

    def __post_init__(self):  # lists (from JSON or a caller) as tuples, so equal specs compare equal
        for name in ("recalls", "norms", "seeds", "eval_difficulties", "iters", "diagnose_difficulties"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def settings(self) -> dict:
        """What every cell shares (not the lists of recalls, norms, seeds, nor how they are reported)."""
        d = asdict(self)
        for key in ("recalls", "norms", "seeds", "metric", "note"):
            d.pop(key)
        return json.loads(json.dumps(d))  # tuples as lists, as read back from spec.json

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]

    def cells(self) -> list[tuple[str, str, int]]:
        """(recall, norm, seed), seed first: a grid stopped half way has every configuration once."""
        return [(r, n, s) for s in self.seeds for r in self.recalls for n in self.norms]


# Sizes that train on 2 CPU cores; docs/RESULTS.md says why each is chosen.
GRIDS = {
    "prefix_sums": GridSpec(
        task="prefix_sums", train={"steps": 1000, "eval_every": 0, "ckpt_every": 250},
        eval_difficulties=(32, 64, 128, 256), iters=(20, 40, 80, 160, 320), eval_n=64,
        diagnose_difficulties=(32, 128),
        note="1000 steps (the default recipe's 3000 take 13 min a run on 2 cores; 1000 already reach "
             "100% at 32-128 bits with the default model); lengths to 8x the longest training string, "
             "budgets to 16x the training depth of 20 iterations"),
    "sudoku": GridSpec(
        task="sudoku", norms=("pre", "outer"), train={"steps": 1000, "eval_every": 0, "ckpt_every": 250},
        iters=(16, 32, 64, 128), eval_n=64, diagnose_difficulties=(0, 3),
        diagnose={"n_inputs": 16}, metric="acc",
        note="recall x {pre, outer}: the paper's sudoku claim is about recall placement under outer "
             "normalization; 1000 steps of the default recipe (board-structured attention, loss along "
             "16 unrolled iterations, lr 2e-3: ~14 min a run on one CPU thread, 86% of bucket-0 grids "
             "at 1000 steps in the recipe's own run); budgets to 8x the training depth; the headline "
             "metric is exact whole grids"),
    "chess": GridSpec(
        task="chess", norms=("pre", "outer"), train={"steps": 1500, "eval_every": 0, "ckpt_every": 250},
        iters=(16, 32, 64, 128), eval_n=800, diagnose_difficulties=(1, 3),
        diagnose={"n_inputs": 16},
        note="recall x {pre, outer}, 1500 steps of the default recipe (d_model 128 with bf16 training "
             "steps where the CPU has native bf16, board-offset attention, the pair move head, loss "
             "along 12 unrolled iterations: 49.5% of mates in 1 at step 1400 and 51.5% at 2100 in the "
             "recipe's own 2800-step run); "
             "budgets to more than 8x the training depth (128 > 96); 800 test puzzles per mate depth (the test pool holds "
             "1092-3156); mate in 3, never trained on, is the headline"),
}


# ------------------------------------------------------------------------------------- running

def cell_dir(root: str | Path, task: str, recall: str, norm: str, seed: int) -> Path:
    return Path(root) / task / f"{recall}-{norm}" / f"seed{seed}"


def check_spec(spec: GridSpec) -> None:
    """Unknown task, recall or norm names fail here, before any cell runs."""
    try:
        get_task(spec.task)
    except TaskInputError as e:
        raise GridError(str(e)) from None
    for name, values, valid in (("recall", spec.recalls, RECALLS), ("norm", spec.norms, NORMS)):
        bad = [v for v in values if v not in valid]
        if bad:
            raise GridError(f"unknown {name} {bad[0]!r}; choose from {', '.join(valid)}")
    if not spec.seeds:
        raise GridError("no seeds")
    for section, known in setting_fields().items():
        bad = sorted(set(getattr(spec, section)) - known)
        if bad:
            raise GridError(f"unknown {section} setting {bad[0]!r}; choose from {', '.join(sorted(known))}")
    _build_configs(spec, spec.recalls[0], spec.norms[0], spec.seeds[0], "unused")  # a bad value: ConfigError here


def _build_configs(spec: GridSpec, recall: str, norm: str, seed: int, out: str):
    """The (model, solve, train) configs of one cell: the task's recipe, then the grid's settings."""
    from deqloop.diagnose import DiagnoseSettings
    from deqloop.model import task_configs
    from deqloop.train import TrainConfig

    task = get_task(spec.task)
    model_cfg, solve_cfg = task_configs(task, {**spec.model, "recall": recall, "norm": norm}, spec.solve)
    train_cfg = TrainConfig(task=spec.task, seed=seed, out_dir=out, **{**task.recipe()["train"], **spec.train})
    DiagnoseSettings(**spec.diagnose)
    return model_cfg, solve_cfg, train_cfg


def setting_fields() -> dict[str, set[str]]:
    """The fields a grid may set per section (`grid --set SECTION.FIELD=VALUE`): the configs' own."""
    from dataclasses import fields

    from deqloop.diagnose import DiagnoseSettings
    from deqloop.model import ModelConfig, SolveConfig
    from deqloop.train import TrainConfig

    per_cell = {"task", "seed", "out_dir", "recall", "norm"}  # the grid sets these itself
    return {section: {f.name for f in fields(cls)} - per_cell for section, cls in
            (("train", TrainConfig), ("model", ModelConfig), ("solve", SolveConfig), ("diagnose", DiagnoseSettings))}


def spec_changes(spec: GridSpec) -> list[str]:
    """SECTION.FIELD=VALUE for every setting where spec differs from its task's grid in GRIDS."""
    base = GRIDS.get(spec.task)
    if base is None:
        return []
    out = []
    for section in ("train", "model", "solve", "diagnose"):
        mine, theirs = getattr(spec, section), getattr(base, section)
        out += [f"{section}.{k}={mine[k]}" for k in sorted(mine) if k not in theirs or theirs[k] != mine[k]]
        out += [f"{section}.{k} (the task's default)" for k in sorted(set(theirs) - set(mine))]
    if spec.iters != base.iters:
        out.append("iters=" + ",".join(map(str, spec.iters)))
    return out


def with_settings(spec: GridSpec, settings: list[tuple[str, object]]) -> GridSpec:
    """spec with SECTION.FIELD=VALUE pairs laid over its train / model / solve / diagnose dicts."""
    changes = {}
    for key, value in settings:
        section, sep, name = key.partition(".")
        if not sep or section not in ("train", "model", "solve", "diagnose"):
            raise GridError(f"--set {key}={value}: expected SECTION.FIELD with SECTION one of train, model, "
                            "solve, diagnose (e.g. train.jac_reg=0.5)")
        changes.setdefault(section, dict(getattr(spec, section)))[name] = value
    return replace(spec, **changes)


def claim_root(spec: GridSpec, root: str | Path) -> Path:
    """Write <root>/<task>/spec.json, or check that the one there has the same settings."""
    base = Path(root) / spec.task
    path = base / "spec.json"
    mine = {"grid_version": GRID_VERSION, "fingerprint": spec.fingerprint(), "settings": spec.settings()}
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise GridError(f"{path}: unreadable ({e}); remove it or choose another root") from None
        if theirs.get("fingerprint") != mine["fingerprint"] or theirs.get("grid_version") != GRID_VERSION:
            changed = sorted(k for k in mine["settings"] if theirs.get("settings", {}).get(k) != mine["settings"][k])
            raise GridError(f"{base} holds a grid with other settings ({', '.join(changed) or 'grid version'} "
                            "differ); choose another root or remove it")
        return base
    from deqloop.io import write_json

    base.mkdir(parents=True, exist_ok=True)
    write_json(mine, path)
    return base


def run_grid(spec: GridSpec, root: str | Path = "runs/grid", *, jobs: int = 1, threads: int | None = None,
             progress=None, status=None) -> list[dict]:
    """Run every unfinished cell of `spec`; returns every cell's cell.json (finished or failed).

    `progress(done, total, cell_name)` is called as cells finish; `status(text)`, every few
    seconds, with the running cells' training steps ("none-pre/seed1 560/1000"). Each child runs
    with `threads` threads (OMP_NUM_THREADS, MKL_NUM_THREADS; default: the cores over `jobs`),
    whatever the environment says, and a line on stderr says so. Ctrl-C or SIGTERM stops the
    children, which save their training state; the next call resumes.
    """
    check_spec(spec)
    claim_root(spec, root)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, jobs)
    threads = threads or max(1, cores // jobs)
    todo = [c for c in spec.cells() if load_cell(spec, root, *c) is None]
    total, done = len(spec.cells()), len(spec.cells()) - len(todo)
    if progress:
        progress(done, total, "")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if todo:
        given = os.environ.get("OMP_NUM_THREADS")
        print(f"grid {spec.task}: {len(todo)} cells to run, {min(jobs, len(todo))} at a time, {threads} threads each "
              f"(OMP_NUM_THREADS={threads}" + (f"; the environment's {given} is not used" if given and given != str(threads)
                                                else "") + ")", file=sys.stderr, flush=True)
    last_status = 0.0
    running: list[tuple[subprocess.Popen, tuple, object]] = []
    failed, busy = [], []

    def stop(signum, frame):
        raise KeyboardInterrupt  # the handler below passes the stop on to the children

    # A shell's background job ignores SIGINT; SIGTERM must stop the grid as Ctrl-C does.
    old_term = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        while todo or running:
            while todo and len(running) < jobs:
                running.append(_launch(spec, root, todo.pop(0), env))
            time.sleep(0.2)
            if status and time.monotonic() - last_status > 5:
                last_status = time.monotonic()
                status(", ".join(f"{cell_name(*cell)} {_last_step(cell_dir(root, spec.task, *cell))}/{spec.train['steps']}"
                                 for _, cell, _ in running))
            for proc, cell, log in list(running):
                if proc.poll() is None:
                    continue
                running.remove((proc, cell, log))
                log.close()
                if proc.returncode == EXIT_BUSY:  # another grid process runs it
                    busy.append(cell)
                    continue
                if load_cell(spec, root, *cell) is None:  # a bug, not a diverged run: the others go on
                    failed.append((cell, proc.returncode))
                    continue
                done += 1
                if progress:
                    progress(done, total, cell_name(*cell))
    except BaseException:  # Ctrl-C or SIGTERM: each child saves its training state and stops
        for proc, _, _ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        raise
    finally:
        for proc, _, log in running:
            proc.wait()
            log.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if failed:
        (cell, code), more = failed[0], len(failed) - 1
        raise GridError(f"cell {cell_name(*cell)} failed (exit {code}; see {cell_dir(root, spec.task, *cell) / 'log.txt'})"
                        + (f" and {more} more" if more else "") + "; run the grid again to retry")
    if busy:
        raise GridError(f"{len(busy)} cells (first {cell_name(*busy[0])}) are being run by another process; "
                        "run the grid again when it is done")
    return [c for c in (load_cell(spec, root, *cell) for cell in spec.cells()) if c is not None]


def training_seconds(metrics: list[dict]) -> float | None:
    """Seconds in the training loop for the steps a run kept, summed over its sittings.

    Each train row's `time` counts from the start of its own sitting, and a resumed run's rows
    restart after a "resume" row (rows past the last checkpoint were dropped, their steps
    redone), so the sum is the cost of the finished steps. None without train rows.
    """
    total, last, seen = 0.0, 0.0, False
    for row in metrics:
        if row.get("kind") == "resume":
            total, last = total + last, 0.0
        elif row.get("kind") == "train" and "time" in row:
            last, seen = float(row["time"]), True
    return total + last if seen else None


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cell_name(recall: str, norm: str, seed: int | str) -> str:
    return f"{recall}-{norm}/seed{seed}"


def load_cell(spec: GridSpec, root: str | Path, recall: str, norm: str, seed: int) -> dict | None:
    """The cell's cell.json if it is finished with these settings, else None."""
    path = cell_dir(root, spec.task, recall, norm, seed) / "cell.json"
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cell if cell.get("fingerprint") == spec.fingerprint() else None


def spec_from_root(root: str | Path, task: str) -> GridSpec:
    """The grid settings stored in <root>/<task>/spec.json (for a child process)."""
    stored = json.loads((Path(root) / task / "spec.json").read_text())
    return GridSpec(**stored["settings"])


EXIT_BUSY = 3  # a child's exit code when another process holds the cell


class CellBusy(GridError):
    """Another process is running this cell (two grids on one root)."""


@contextlib.contextmanager
def _cell_lock(out: Path):
    """An exclusive lock on the cell for as long as this process works on it (released if it dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CellBusy(f"{out} is being run by another process") from None
        yield


def run_cell(spec: GridSpec, root: str | Path, recall: str, norm: str, seed: int) -> dict:
    """Train (or resume), evaluate and diagnose one cell; write and return its cell.json."""
    with _cell_lock(cell_dir(root, spec.task, recall, norm, seed)):
        return _run_cell(spec, root, recall, norm, seed)


def _run_cell(spec: GridSpec, root: str | Path, recall: str, norm: str, seed: int) -> dict:
    import torch

    from deqloop.checkpoint import load_checkpoint
    from deqloop.diagnose import DiagnoseSettings, diagnose_checkpoint
    from deqloop.evaluate import evaluate_checkpoint
    from deqloop.io import resolve_device, write_json
    from deqloop.model import autocast_dtype
    from deqloop.train import train

    out = cell_dir(root, spec.task, recall, norm, seed)  # the child's threads: OMP_NUM_THREADS, read by torch
    model_cfg, solve_cfg, train_cfg = _build_configs(spec, recall, norm, seed, str(out))
    ckpt_path = out / "checkpoint.pt"
    cell = {"grid_version": GRID_VERSION, "fingerprint": spec.fingerprint(), "task": spec.task,
            "recall": recall, "norm": norm, "seed": seed, "threads": torch.get_num_threads(),
            # where cells of one grid run on several machines: what "autocast auto" chose on this one
            "train_dtype": str(autocast_dtype(model_cfg.autocast, resolve_device(train_cfg.device)) or torch.float32)}

    t0 = time.time()
    done = load_checkpoint(ckpt_path)["step"] if ckpt_path.exists() else 0  # checkpoints are written atomically
    status = "finished"
    if done < train_cfg.steps:
        try:
            train(train_cfg, model_cfg, solve_cfg, resume=done > 0)
        except FloatingPointError as e:  # a diverged run is a result of the grid, not a crash
            status, cell["error"] = "diverged", str(e)
    metrics = read_metrics(out / "metrics.jsonl")
    # the loop's own clock, over every sitting: a resumed cell's wall time here would count only the last
    cell["train_seconds"] = training_seconds(metrics) or time.time() - t0
    rows = [m for m in metrics if m.get("kind") == "train"]
    cell["final_loss"] = rows[-1]["loss"] if rows else math.nan
    cell["train_acc"] = float(np.mean([m["acc"] for m in rows[-10:]])) if rows else math.nan
    cell["status"] = status
    if status == "finished":
        t1 = time.time()
        report = evaluate_checkpoint(ckpt_path, difficulties=list(spec.eval_difficulties) or None,
                                     iters=list(spec.iters) or None, n=spec.eval_n)
        write_json(report, out / "eval.json")
        cell["eval_seconds"] = time.time() - t1
        t2 = time.time()
        try:
            diag = diagnose_checkpoint(ckpt_path, settings=DiagnoseSettings(**spec.diagnose),
                                       difficulties=list(spec.diagnose_difficulties or spec.eval_difficulties) or None)
            write_json(diag.to_dict(), out / "diagnose.json")
        except Exception as e:  # noqa: BLE001 - a pathological model must not stop the grid; reported
            cell["diagnose_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc()
        cell["diagnose_seconds"] = time.time() - t2
    write_json(cell, out / "cell.json")
    return cell


def _launch(spec: GridSpec, root: str | Path, cell: tuple, env: dict) -> tuple[subprocess.Popen, tuple, object]:
    """Start one cell's child process, its output appended to the cell's log.txt."""
    out = cell_dir(root, spec.task, *cell)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a")
    cmd = [sys.executable, "-m", "deqloop.grid", str(root), spec.task, *map(str, cell)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), cell, log


def _last_step(out: Path) -> int:
    """The last logged training step of a running cell (0 before its first row)."""
    try:
        with open(out / "metrics.jsonl", "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
        rows = [json.loads(line) for line in lines[1:] or lines if line.startswith("{") and line.endswith("}")]
        return max((r.get("step", 0) for r in rows if r.get("kind") == "train"), default=0)
    except (OSError, ValueError):
        return 0


def _child(argv: list[str]) -> int:
    from deqloop.train import Interrupted

    root, task, recall, norm, seed = argv
    spec = spec_from_root(root, task)
    try:
        run_cell(spec, root, recall, norm, int(seed))
    except CellBusy as e:
        print(f"skipped: {e}")
        return EXIT_BUSY
    except Interrupted as e:  # training saved its step; the grid, not `train --resume`, continues it
        print(f"stopped after step {e.step}, saved; run the same grid command again to continue this cell", flush=True)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
