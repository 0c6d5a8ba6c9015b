"""deqloop's command line: train, eval, solve, diagnose, grid. The same program runs as
`deqloop ...` (installed), `python -m deqloop ...` and `python cli.py ...` (from a checkout).

    python cli.py train --task prefix_sums [--recall internal --norm outer ...] [--resume]
    torchrun --nproc_per_node 2 cli.py train --task prefix_sums --device cpu
    python cli.py eval runs/prefix_sums/checkpoint.pt [--iters 40,80,160] [--json out.json] [--plot out.png]
    python cli.py solve runs/prefix_sums/checkpoint.pt 0110101
    python cli.py diagnose runs/prefix_sums/checkpoint.pt [--difficulty 32,512] [--n-inputs 32] [--plots dir]
    python cli.py grid prefix_sums [--jobs 2] [--seeds 0,1,2] [--report-only]

A subcommand is one entry of COMMANDS: `add_<name>(parser)` declares its flags, `run_<name>(args)`
does the work and returns the exit code. A bad input (unknown name, bad value, bad checkpoint,
malformed INPUT) raises a `deqloop.errors.UsageError` (or the tasks' TaskInputError) wherever it
is found, and `main` prints it as one line `error: ...` on stderr with exit code 2; nothing here
turns other exceptions into usage errors, so a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from deqloop.checkpoint import configs, load_checkpoint, load_run, with_solver
from deqloop.diagnose import DiagnoseSettings, diagnose_checkpoint
from deqloop.diagnose import plot as plot_diagnose
from deqloop.diagnose import print_table as print_diagnose
from deqloop.evaluate import EVAL_N, evaluate_checkpoint, plot, plot_training, print_table
from deqloop.cli_args import (budget_arg, check_outputs, difficulty_list, int_list, name_list, non_negative_int,
                              none_or_str, one_line, positive_float, positive_int, seed_list, solver_option,
                              window_arg)
from deqloop.cli_config import (CONFIGS, FLAG_HELP, SET_BY_TASK, TRAIN_FLAGS, config_json, default,  # noqa: F401
                                recipe_text, task_solver_options_text, train_configs)
from deqloop.model import SolveConfig
from deqloop.run import eval_score
from deqloop.errors import USER_ERRORS, UsageError
from deqloop.io import progress_bar, resolve_device, write_json
from deqloop.train import RUN_CONTROL, Interrupted, TrainConfig, train
from tasks import TASKS

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (argparse prints the usage first)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def device_arg(name: str) -> torch.device:
    try:
        device = resolve_device(name, None)
    except RuntimeError as e:
        raise UsageError(f"bad device {name!r}: {one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: CUDA is not available")
    return device


# ------------------------------------------------------------------------------------- train


def add_train(p: argparse.ArgumentParser) -> None:
    def flag(group, dest, help, shown=None, option=None, **kw):
        # A flag not given leaves no attribute (SUPPRESS), so "not given" differs from any value.
        kind, name = TRAIN_FLAGS[dest]
        if shown is None:
            shown = default(CONFIGS[kind], name)
            setters = [task for task, cls in TASKS.items() if name in cls.recipe()[kind]]
            if setters:  # the dataclass default alone would mislead: say whose recipe overrides it
                shown = f"{shown}; set by the recipe of {', '.join(setters)}"
        if not {"choices", "action", "metavar"} & set(kw):
            metavars = {int: "N", float: "X", int_list: "N,N,..", difficulty_list: "N,N,..", window_arg: "N|none",
                        none_or_str: "NAME|none"}
            kw["metavar"] = metavars.get(kw.get("type"), "NAME")
        group.add_argument(option or "--" + dest.replace("_", "-"), dest=dest, default=argparse.SUPPRESS,
                           help=f"{help} (default: {shown})", **kw)

    p.epilog = ("Flags not given take the task's recipe where it sets them (model_defaults, solve_defaults, "
                "train_defaults, with --preset over them), else the defaults shown. Recipes: "
                + "; ".join(f"{name}: {recipe_text(cls)}" for name, cls in TASKS.items()) + ".")
    p.add_argument("--task", metavar="NAME", help=f"the task: {', '.join(TASKS)} (required unless --config names it)")
    p.add_argument("--config", metavar="FILE", help="a run's config.json (or --print-config's output): its "
                   "values stand for flags not given")
    p.add_argument("--print-config", action="store_true",
                   help="print the configs this command would train with, as JSON, and exit")
    p.add_argument("--preset", metavar="NAME", help="a named recipe of the task over its defaults ("
                   + "; ".join(f"{name}: {', '.join(cls.presets)}" for name, cls in TASKS.items() if cls.presets) + ")")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out-dir>/checkpoint.pt with its settings; only "
                        + ", ".join("--" + f.replace("_", "-") for f in RUN_CONTROL) + " may be given anew")
    for title, group in FLAG_HELP.items():
        g = p.add_argument_group(title)
        for dest, (help, options) in group.items():
            flag(g, dest, help, **options)


def run_train(args) -> int:
    cfg, model_cfg, solve_cfg = train_configs(args)
    if args.print_config:
        print(config_json(cfg, model_cfg, solve_cfg))
        return 0
    if cfg.device != "auto":
        device_arg(cfg.device)
    try:
        path = train(cfg, model_cfg, solve_cfg, resume=args.resume)
    except FileExistsError as e:  # another training holds --out-dir, or a checkpoint is there already
        raise UsageError(one_line(e)) from None
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except FloatingPointError as e:  # the loss became nan or inf
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # torchrun's rank; a plain process is rank 0
        print(f"saved {path}")
        print_run_summary(path, cfg)
    return 0


def print_run_summary(path: Path, cfg: TrainConfig) -> None:
    """What the run left and what to run next: files, the last evaluation, commands."""
    import json

    out = path.parent
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    try:
        plot_training(rows, out / "training.png", f"{cfg.task}: {out}")
        curve = f"  {out / 'training.png'}  loss and test accuracy against the step\n"
    except Exception as e:  # a plot must not fail a finished run
        curve = f"  (no training.png: {one_line(e)})\n"
    last = train_rows[-1] if train_rows else {}
    text = (f"  {out / 'metrics.jsonl'}  {len(train_rows)} train rows, {len(evals)} evaluations\n"
            f"  {out / 'config.json'}  the configs (train --config reads it back)\n{curve}")
    if last:
        text += f"final step {last['step']}: loss {last['loss']:.4g}, batch accuracy {last['acc']:.3f}\n"
    if evals:
        budgets = evals[-1].get("max_iter", {})
        text += ("test accuracy (difficulty @ budget): " + ", ".join(
            f"{d} @ {budgets.get(d, '?')}: {a:.1%}" for d, a in evals[-1]["acc"].items() if a is not None) + "\n")
        best = [r for r in evals if r.get("best")]
        if best and (out / "best.pt").exists():
            where = "the last evaluation" if best[-1] is evals[-1] else f"the last is {eval_score(evals[-1]):.1%}"
            text += (f"best evaluation: step {best[-1]['step']}, mean test accuracy {eval_score(best[-1]):.1%} "
                     f"({where}), in {out / 'best.pt'}\n")
    prog = program_name()
    text += (f"next: {prog} eval {path}    (accuracy against difficulty and iterations)\n"
             f"      {prog} diagnose {path}    (reachability, input-dependence, geometry)\n"
             f"      {prog} solve {path} INPUT")
    print(text)


# ------------------------------------------------------------------------------------- eval


def checked_solver(ckpt: dict, args) -> SolveConfig:
    """The checkpoint's solve config with the command's solver override; ConfigError on an unknown
    solver or option."""
    return with_solver(configs(ckpt)[1], **solver_override(args), task=ckpt.get("task"))


def add_solver_override(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", help="forward solver instead of the run's (see solvers.SOLVERS), with the options "
                                    f"its task gives it on trained loops ({task_solver_options_text()})")
    p.add_argument("--solver-option", dest="solver_options", type=solver_option, action="append", metavar="KEY=VALUE",
                   help="a forward-solver option (anderson: m, beta, reg, warmup, gate; fixed_point_iter: tau ...; "
                        "KEY=none turns one off), over the run's or the task's, repeatable")


def solver_override(args) -> dict:
    """The eval / solve / diagnose solver override as keyword arguments of checkpoint.with_solver."""
    return {"solver": args.solver, "options": dict(args.solver_options or [])}


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint.pt written by train")
    p.add_argument("--difficulties", type=difficulty_list, metavar="N,N,..",
                   help="comma-separated (default: the run's test difficulties)")
    p.add_argument("--iters", type=int_list, metavar="N,N,..",
                   help="comma-separated max_iter budgets (default: the training max_iter doubled up to 8x, "
                        "plus the task's budget per difficulty)")
    p.add_argument("--n-inputs", "--n", dest="n", type=positive_int, metavar="N",
                   help=f"test examples per difficulty (default: {EVAL_N}); --n is the old spelling")
    p.add_argument("--json", metavar="PATH",
                   help="write every number here (default: eval.json beside the checkpoint)")
    p.add_argument("--plot", metavar="PATH", help="write the plot here (default: eval.png beside the checkpoint)")
    add_solver_override(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default: auto)")


def run_eval(args) -> int:
    json_path = Path(args.json) if args.json else Path(args.checkpoint).parent / "eval.json"
    plot_path = Path(args.plot) if args.plot else Path(args.checkpoint).parent / "eval.png"
    check_outputs(files=(json_path, plot_path))
    device = device_arg(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    checked_solver(ckpt, args)  # a bad file or override: one line, before any work
    console = Console(stderr=True)
    with progress_bar(console=console, transient=True) as bar:
        job = bar.add_task("evaluating", total=None)

        started = set()

        def progress(d, k, done, total):
            what = "evaluated" if d is None else f"difficulty {d}, max_iter up to {k}"
            bar.update(job, description=what, completed=done, total=total)
            if not console.is_terminal and d is not None and d not in started:  # a log: a line a difficulty
                started.add(d)
                print(f"evaluating {what} ({done / total:.0%} of the work done)", file=sys.stderr, flush=True)

        report = evaluate_checkpoint(
            ckpt, difficulties=args.difficulties, iters=args.iters, n=args.n, device=device,
            progress=progress, solver=args.solver, solver_options=dict(args.solver_options or []))
    print_table(report)
    try:
        write_json(report, json_path)
        plot(report, plot_path)
    except OSError as e:
        raise UsageError(f"cannot write {e.filename or json_path}: {e.strerror or one_line(e)}") from None
    print(f"wrote {json_path} and {plot_path}")
    return 0


# ------------------------------------------------------------------------------------- solve

def add_solve(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint.pt written by train")
    p.add_argument("input", metavar="INPUT", help="one problem in the task's text form (prefix_sums: 0110...)")
    p.add_argument("--max-iter", type=positive_int,
                   help="solver budget (default: the larger of the training max_iter and the task's budget "
                        "for this input; the solver stops earlier once it converges)")
    add_solver_override(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default: auto)")


def run_solve(args) -> int:
    device = device_arg(args.device)
    model, task, _, solve_cfg = load_run(args.checkpoint, device, solver=args.solver,
                                         solver_options=dict(args.solver_options or []))
    tokens = task.parse(args.input).to(device)  # a malformed INPUT: TaskInputError, one line from main
    max_iter = args.max_iter or max(solve_cfg.max_iter, task.solve_max_iter(tokens))
    with torch.no_grad():  # an input longer than a fixed-size model's positions: InputError
        logits, result = model(tokens, solve_cfg, max_iter=max_iter)
    pred = task.predict(logits, tokens)
    print(task.decode(tokens[0].cpu(), pred[0].cpu()))
    verdict = task.verdict(tokens[0].cpu(), pred[0].cpu())
    if verdict:
        print(verdict)
    print(f"solver: {int(result.n_steps[0])} steps (max_iter {max_iter}), "
          f"residual {float(result.residual[0]):.3g} ({result.stop_mode}), status {result.status.name}")
    print(result.message)
    return 0


# ------------------------------------------------------------------------------------- diagnose


def add_diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint.pt written by train")
    p.add_argument("--difficulty", "--difficulties", dest="difficulties", type=difficulty_list, metavar="N,N,..",
                   help="comma-separated (default: the run's test difficulties)")
    p.add_argument("--n-inputs", "--n", dest="n_inputs", type=positive_int,
                   default=default(DiagnoseSettings, "n_inputs"), metavar="N",
                   help="test inputs per difficulty, at least 2 (default: %(default)s; --n, as in eval)")
    p.add_argument("--n-starts", type=non_negative_int, default=default(DiagnoseSettings, "n_starts"), metavar="N",
                   help="seeded random starts per input besides the model's z0 (default: %(default)s)")
    p.add_argument("--n-geometry", type=positive_int, default=default(DiagnoseSettings, "n_geometry"), metavar="N",
                   help="inputs per difficulty for sensitivity and geometry, the costly part (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=default(DiagnoseSettings, "seed"), metavar="N",
                   help="seed of the random starts and directions (default: %(default)s)")
    p.add_argument("--cluster-tol", type=positive_float, default=default(DiagnoseSettings, "cluster_tol"),
                   metavar="X", help="fixed points closer than X times their median norm are one "
                                     "(default: %(default)s)")
    p.add_argument("--budget-seconds", type=budget_arg, default=default(DiagnoseSettings, "budget_seconds"),
                   metavar="X|none", help="cap on the measurements' wall time, shared out over the difficulties; "
                   "what does not fit is reported as not measured (default: %(default)s; none: no cap)")
    p.add_argument("--json", metavar="PATH",
                   help="write every number here (default: diagnose.json beside the checkpoint)")
    p.add_argument("--plots", metavar="DIR",
                   help="write diagnose_{residuals,spectral_radius,sensitivity}.png here, creating DIR "
                        "(default: beside the checkpoint)")
    add_solver_override(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default: auto)")


def _diagnose_progress(bar, job):
    """The bar's update; outside a terminal also one plain line as each difficulty starts."""
    state = {"difficulty": None, "t0": time.monotonic()}

    def update(what: str, done: int, total: int) -> None:
        bar.update(job, description=what, completed=done, total=total)
        d = what.split(":")[0]
        if not bar.console.is_terminal and d != state["difficulty"]:
            state["difficulty"] = d
            elapsed = time.monotonic() - state["t0"]
            eta = f", about {elapsed * (total - done) / done:.0f} s left" if done else ""
            print(f"diagnose: {what} ({done}/{total} steps, {elapsed:.0f} s{eta})", file=sys.stderr, flush=True)

    return update


def run_diagnose(args) -> int:
    json_path = Path(args.json) if args.json else Path(args.checkpoint).parent / "diagnose.json"
    plot_dir = Path(args.plots) if args.plots else Path(args.checkpoint).parent
    check_outputs(files=(json_path,), dirs=(plot_dir,))
    settings = DiagnoseSettings(n_inputs=args.n_inputs, n_starts=args.n_starts, n_geometry=args.n_geometry,
                                seed=args.seed, cluster_tol=args.cluster_tol, budget_seconds=args.budget_seconds)
    device = device_arg(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    checked_solver(ckpt, args)  # a bad file or override: one line, before the progress bar
    with progress_bar(transient=True) as bar:
        job = bar.add_task("diagnosing", total=None)
        report = diagnose_checkpoint(
            ckpt, difficulties=args.difficulties, settings=settings, device=device,
            progress=_diagnose_progress(bar, job), solver=args.solver, solver_options=dict(args.solver_options or []))
    print_diagnose(report)
    try:
        plot_dir.mkdir(exist_ok=True)
        write_json(report.to_dict(), json_path)
        paths = plot_diagnose(report, plot_dir)
    except OSError as e:
        raise UsageError(f"cannot write {e.filename or json_path}: {e.strerror or one_line(e)}") from None
    print(f"wrote {json_path} and {', '.join(map(str, paths))}")
    return 0


# ------------------------------------------------------------------------------------- grid


def add_grid(p: argparse.ArgumentParser) -> None:
    from deqloop.grid import GRIDS

    p.add_argument("task", help=f"the grid of this task: {', '.join(GRIDS)} (sizes in deqloop/grid.py GRIDS)")
    p.add_argument("--root", default="runs/grid", metavar="DIR",
                   help="cells go to DIR/<task>/<recall>-<norm>/seed<k>/ (default: %(default)s)")
    p.add_argument("--recall", type=name_list, metavar="A,B,..", help="these recalls only (default: the grid's)")
    p.add_argument("--norm", type=name_list, metavar="A,B,..", help="these norms only (default: the grid's)")
    p.add_argument("--seeds", type=seed_list, metavar="N,N,..", help="these seeds (default: the grid's, 0,1,2)")
    p.add_argument("--steps", type=positive_int, metavar="N",
                   help="training steps per run (default: the grid's; another value needs another --root)")
    p.add_argument("--set", dest="settings", type=solver_option, action="append", metavar="SECTION.FIELD=VALUE",
                   help="a setting over the grid's for every cell, e.g. train.jac_reg=0.5 or solve.gradient=ift "
                        "(SECTION: train, model, solve, diagnose; repeatable; another value needs another --root)")
    p.add_argument("--iters", type=int_list, metavar="N,N,..",
                   help="test-time budgets of every cell's eval (default: the grid's, in deqloop/grid.py GRIDS; e.g. "
                        "16x a --set solve.max_iter that is not the grid's; another value needs another --root)")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="runs at once, each with cores/N threads (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads per run (default: the cores over --jobs; e.g. 1 to run two grids side by side)")
    p.add_argument("--report-dir", default=None, metavar="DIR",
                   help="write <task>.md, plots and summary JSON here (default: DIR/<task>/ of --root)")
    p.add_argument("--report-only", action="store_true", help="do not run anything; report the cells done so far")


def run_grid_command(args) -> int:
    from dataclasses import replace

    from deqloop.grid import GRIDS, check_spec, run_grid, with_settings
    from deqloop.grid_report import summarize, write_report

    if args.task not in GRIDS:
        raise UsageError(f"no grid for task {args.task!r}; choose from {', '.join(GRIDS)}")
    spec = GRIDS[args.task]
    changes = {k: getattr(args, a) for k, a in (("recalls", "recall"), ("norms", "norm"), ("seeds", "seeds"),
                                                 ("iters", "iters")) if getattr(args, a)}
    if args.steps:
        changes["train"] = {**spec.train, "steps": args.steps}
    spec = with_settings(replace(spec, **changes), args.settings or [])
    check_spec(spec)  # GridError (a UsageError) on unknown names, before any work
    if not args.report_only:
        with progress_bar() as bar:
            job = bar.add_task(f"grid {spec.task}", total=len(spec.cells()))
            def cell_done(done: int, total: int, name: str) -> None:
                bar.update(job, completed=done, total=total, description=f"grid {spec.task}" + (f" ({name} done)" if name else ""))
                if name and not bar.console.is_terminal:
                    print(f"grid {spec.task}: {name} done, {done}/{total} cells", file=sys.stderr, flush=True)

            run_grid(spec, args.root, jobs=args.jobs, threads=args.threads, progress=cell_done,
                status=lambda text: bar.update(job, description=f"grid {spec.task}: running {text}"))
    summary = summarize(spec, args.root)
    out = Path(args.report_dir) if args.report_dir else Path(args.root) / spec.task
    paths = write_report(spec, summary, out)
    print(f"{summary['n_done']} of {summary['n_cells']} runs done; wrote {', '.join(map(str, paths))}")
    return 0


# ------------------------------------------------------------------------------------- main

COMMANDS = {  # name: (help, add its flags, run it)
    "train": ("train a model; writes <out-dir>/checkpoint.pt and metrics.jsonl", add_train, run_train),
    "eval": ("accuracy per difficulty x iteration budget of a checkpoint", add_eval, run_eval),
    "solve": ("answer one INPUT with a checkpoint's model", add_solve, run_solve),
    "diagnose": ("are a checkpoint's fixed points reachable, input-dependent, well-conditioned? (per difficulty)",
                 add_diagnose, run_diagnose),
    "grid": ("train, evaluate and diagnose recall x norm x seeds on a task, resumably; then tables and plots",
             add_grid, run_grid_command),
}


def build_parser() -> Parser:
    parser = Parser(prog=program_name(), description="deqloop: looped transformers as deep equilibrium models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add(p)
        p.set_defaults(run=run)
    return parser


def program_name() -> str:
    """How the user called us, for usage lines: deqloop, python -m deqloop, or cli.py."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if path.name == "__main__.py" and path.parent.name == "deqloop":
        return "python -m deqloop"
    return "cli.py" if path.name == "cli.py" else "deqloop"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:  # deqloop's UsageError and the tasks' TaskInputError (bad INPUT, unknown difficulty)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as e:  # the machine's side: disk full, permissions, a directory where a file goes
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or one_line(e)}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
