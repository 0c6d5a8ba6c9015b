"""Diagnose a checkpoint's fixed points per difficulty: reachable, input-dependent, well-conditioned?

    report = diagnose_checkpoint("runs/prefix_sums/checkpoint.pt", settings=DiagnoseSettings(n_inputs=32))
    print_table(report); write_json(report, "diagnose.json"); plot(report, "plots/")

Per difficulty, on the run's fixed test set (`deqloop.evaluate.test_set`) at the evaluation
budget (`eval_max_iter`): reachability and countability on `n_inputs` inputs, in the model's own
dtype and solver; sensitivity and geometry on the first `n_geometry` of them, on a float64 copy
of the model at the fixed point refined to `refine_tol`. What every number means, and the
verdict thresholds (`THRESHOLDS`): docs/DIAGNOSE.md.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from deqloop import diagnostics as dx
from deqloop.checkpoint import configs, load_checkpoint, load_model, with_solver
from deqloop.errors import ConfigError
from deqloop.evaluate import eval_max_iter, test_set, write_json

__all__ = ["THRESHOLDS", "DiagnoseSettings", "diagnose_checkpoint", "plot", "print_table", "verdicts", "write_json"]

# The verdicts' thresholds (docs/DIAGNOSE.md explains each); written into every report.
THRESHOLDS = {
    "reachable": 0.95,  # fraction of inputs converged from z0 for "reachable"
    "unreachable": 0.5,  # below this fraction converged from z0: "unreachable"
    "path_independent": 0.9,  # fraction of inputs whose random starts all reach z* for "from any start"
    "shared": 0.9,  # fraction of z*_i that are also fixed points for input x_j: "ignores x"
    "sensitivity": 1e-6,  # median relative sensitivity below this: "ignores x"
    "fd_agreement": 0.05,  # largest IFT vs finite-difference disagreement before "IFT unreliable"
    "spectral_radius": 1.0,  # rho(J) at or above: "not contractive"
    "marginal": 0.95,  # rho(J) at or above (and below 1): "marginal"
    "cond": 1e3,  # cond(I - J) at or above: "ill-conditioned"
}


@dataclass(frozen=True)
class DiagnoseSettings:
    n_inputs: int = 32  # test inputs per difficulty for reachability and countability
    n_starts: int = 2  # seeded random starts per input, besides the model's own z0
    n_geometry: int = 2  # inputs per difficulty (the first ones) for sensitivity and geometry
    seed: int = 0  # random starts, directions v, Krylov start vectors, position subsample
    cluster_tol: float = 1e-2  # fixed points closer than this times the median norm are one
    max_positions: int = 4096  # per-position states clustered at most (a seeded subsample)
    refine_tol: float = 1e-11  # float64 relative tolerance of the refined z* and of the FD solves
    fd_eps: float = 1e-4  # finite-difference step, relative to ||x||
    krylov_tol: float = 1e-3  # relative tolerance of the eigen/singular value iterations (ARPACK's tol)

    def __post_init__(self):
        for name in ("n_inputs", "n_geometry", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_inputs < 2:
            raise ConfigError("n_inputs must be >= 2 (the shared-fixed-point check pairs inputs)")
        if self.n_starts < 0:
            raise ConfigError(f"n_starts must be >= 0, got {self.n_starts}")
        for name in ("cluster_tol", "refine_tol", "fd_eps", "krylov_tol"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


Progress = Callable[[str, int, int], None]  # (description, steps done, steps in all)


def diagnose_checkpoint(path: str | Path | dict, *, difficulties=None, settings: DiagnoseSettings = DiagnoseSettings(),
                        device: str | torch.device = "cpu", progress: Progress | None = None,
                        solver: str | None = None, solver_options: dict | None = None) -> dict:
    """Every diagnostic of a checkpoint per difficulty, as a plain dict (see `write_json`).

    Default difficulties: the run's test difficulties; default forward solver: the run's (see
    checkpoint.with_solver). Raises CheckpointError on a bad file.
    """
    ckpt = path if isinstance(path, dict) else load_checkpoint(path)  # a dict: already loaded
    model, task = load_model(ckpt, device)
    model_cfg, solve = configs(ckpt)
    solve = with_solver(solve, solver, solver_options)
    difficulties = list(difficulties or ckpt["train_config"].get("test_difficulties") or task.test_difficulties)
    # float64 copy for the linearization: in float32, IFT and finite differences disagree by ~3e-2.
    model64 = copy.deepcopy(model).double()
    for p in [*model.parameters(), *model64.parameters()]:
        p.requires_grad_(False)
    s = settings
    steps_per = s.n_starts + 4 + min(s.n_geometry, s.n_inputs)
    done = [0]

    def tick(what: str) -> None:
        if progress is not None:
            progress(what, done[0], steps_per * len(difficulties))
        done[0] += 1

    rows = [_diagnose_difficulty(model, model64, task, solve, d, s, tick) for d in difficulties]
    if progress is not None:
        progress("done", done[0], steps_per * len(difficulties))
    return {
        "checkpoint": ckpt["path"], "task": ckpt["task"], "step": ckpt["step"],
        "deqloop_version": ckpt["deqloop_version"],
        "model": {k: model_cfg.to_dict()[k] for k in ("recall", "norm", "z0", "d_model", "n_heads", "window")},
        "solver": solve.solver, "tol": solve.tol, "b_solver": solve.b_solver, "b_tol": solve.b_tol,
        "settings": asdict(s), "thresholds": dict(THRESHOLDS), "difficulties": difficulties, "rows": rows,
        "outlook": outlook(rows),
    }


def _diagnose_difficulty(model, model64, task, solve, d: int, s: DiagnoseSettings, tick) -> dict:
    start = time.time()
    batch = test_set(task, d, s.n_inputs)  # a difficulty or size the task cannot serve: TaskInputError
    device = next(model.parameters()).device
    tokens = batch.inputs.to(device)
    budget = eval_max_iter(task, solve, d)
    # subbatch: f on the still-active samples only; the cell treats samples independently.
    options = {**solve.forward_options(max_iter=budget), "subbatch": True}
    with torch.no_grad():
        x = model.embed_input(tokens)
        reach = dx.reachability(model.f, x, model.z_init(x), n_starts=s.n_starts, seed=s.seed,
                                method=solve.solver, options=options, on_solve=lambda what: tick(f"{d}: solve {what}"))
        scored = batch.to(device)
        exact = lambda z: task.exact_match(task.predict(model.head_logits(z), tokens), scored).double()
        acc = exact(reach.z_star)
        acc_starts = [exact(z) for z in reach.start_z]
        tick(f"{d}: count fixed points")
        cross = dx.cross_residual(model.f, x, reach.z_star)
    seq, positions = _count(reach, s, d)

    # float64 part, on the first n_geometry inputs
    g = min(s.n_geometry, s.n_inputs)
    tick(f"{d}: refine z* in float64")
    with torch.no_grad():
        x64 = model64.embed_input(tokens[:g])
    tight = {**solve.forward_options(max_iter=budget, tol=s.refine_tol), "subbatch": True}
    refined = dx.solve_cell(model64.f, x64, reach.z_star[:g].double(), method=solve.solver, options=tight)
    z64 = refined.z
    tick(f"{d}: sensitivity (IFT vs finite differences)")
    sens = dx.sensitivity(model64.f, x64, z64, seed=s.seed, fd_eps=s.fd_eps, method=solve.solver, fd_options=tight)
    geom = dx.geometry(model64.f, x64, z64, seed=s.seed, tol=s.krylov_tol, adjoint_method=solve.b_solver,
                       adjoint_options={"tol": solve.b_tol, "max_iter": max(solve.b_max_iter, budget)},
                       on_sample=lambda b: tick(f"{d}: geometry of input {b + 1}/{g}"))

    conv = reach.converged
    row = {
        "difficulty": d, "max_iter": budget, "n_inputs": s.n_inputs, "n_geometry": g,
        "reachability": {
            "converged": _mean(conv), "steps_mean": _mean(reach.n_steps[conv]),
            "steps_max": _max(reach.n_steps[conv]), "decay_rate_median": _median(reach.decay_rate),
            "start_converged": _mean(reach.start_converged),
            "path_independent": _mean(reach.path_independent(s.cluster_tol)) if s.n_starts else math.nan,
            "path_distance_median": _median(reach.path_distance), "path_distance_max": _max(reach.path_distance),
            "acc": _mean(acc), "acc_random_starts": _mean(torch.stack(acc_starts)) if acc_starts else math.nan,
            "per_input": {
                "converged": _list(conv), "n_steps": _list(reach.n_steps), "residual": _list(reach.residual),
                "decay_rate": _list(reach.decay_rate), "start_converged": _list(reach.start_converged),
                "start_n_steps": _list(reach.start_n_steps), "path_distance": _list(reach.path_distance),
            },
            "trace": _list(reach.trace),
        },
        "input_dependence": {
            "shared_fixed_points": _mean(cross[conv] < solve.tol) if bool(conv.any()) else math.nan,
            "cross_residual_median": _median(cross[conv]),
            "fixed_points": seq, "position_states": positions,
            "sensitivity_median": _median(sens.norm), "relative_median": _median(sens.relative),
            "direct_median": _median(sens.direct), "fd_rel_error_max": _max(sens.rel_error),
            "ift_converged": _mean(sens.ift_converged), "fd_converged": _mean(sens.fd_converged),
            "refined_converged": _mean(refined.converged), "refined_residual_max": _max(refined.residual),
            # the geometry inputs whose float64 z* is a fixed point at the model's own tolerance
            "at_fixed_point": _mean(refined.residual < solve.tol),
            "per_input": {
                "sensitivity": _list(sens.norm), "fd_sensitivity": _list(sens.fd_norm),
                "relative": _list(sens.relative), "direct": _list(sens.direct), "fd_rel_error": _list(sens.rel_error),
                "ift_converged": _list(sens.ift_converged), "ift_iters": _list(sens.ift_iters),
                "fd_converged": _list(sens.fd_converged), "eps": _list(sens.eps),
                "cross_residual": _list(cross),
            },
        },
        "geometry": {
            # nan-propagating: a sample whose Krylov solve failed must not vanish from the verdict
            "spectral_radius_max": _max_all(geom.spectral_radius),
            "spectral_radius_median": _median(geom.spectral_radius),
            "jacobian_norm_max": _max(geom.jacobian_norm), "sigma_min_min": _min(geom.sigma_min),
            "cond_max": _max_all(geom.cond), "krylov_converged": _mean(geom.converged),
            "matvecs_mean": _mean(geom.matvecs),
            "adjoint_converged": _mean(geom.adjoint_converged), "adjoint_steps_mean": _mean(geom.adjoint_steps),
            "adjoint_max_iter": max(solve.b_max_iter, budget),
            "per_input": {
                "spectral_radius": _list(geom.spectral_radius), "jacobian_norm": _list(geom.jacobian_norm),
                "sigma_max": _list(geom.sigma_max), "sigma_min": _list(geom.sigma_min), "cond": _list(geom.cond),
                "krylov_converged": _list(geom.converged), "matvecs": _list(geom.matvecs),
                "adjoint_converged": _list(geom.adjoint_converged),
                "adjoint_steps": _list(geom.adjoint_steps), "adjoint_residual": _list(geom.adjoint_residual),
            },
        },
    }
    row["verdicts"], row["reasons"] = verdicts(row)
    row["seconds"] = time.time() - start
    return row


POSITION_TOLS = (1, 3, 10, 30)  # per-position states are counted at these multiples of cluster_tol


def _count(reach: dx.Reachability, s: DiagnoseSettings, d: int) -> tuple[dict, list[dict] | None]:
    """Countability of the converged fixed points: whole states from z0 and every random start, and
    (for (B, T, d) states) the states of single positions of the fixed points reached from z0."""
    n = reach.z_star.shape[0]
    points = torch.cat([reach.z_star[None], reach.start_z])  # (1 + S, N, ...)
    ok = torch.cat([reach.converged[None], reach.start_converged]).reshape(-1).cpu()
    inputs = torch.arange(n).repeat(points.shape[0])[ok]  # (P,) the input of each point
    points = points.reshape(-1, *points.shape[2:])[ok.to(points.device)]
    summary = lambda c: {k: v for k, v in asdict(c).items() if k != "labels"}
    seq = summary(dx.countability(points, inputs, tol=s.cluster_tol))
    z = reach.z_star[reach.converged.to(reach.z_star.device)]
    if z.dim() < 3 or len(z) == 0:
        return seq, None
    per_pos = z.reshape(-1, z.shape[-1])  # (N' * T, d): the state of each position
    pos_inputs = torch.arange(len(z)).repeat_interleave(per_pos.shape[0] // len(z))
    if len(per_pos) > s.max_positions:
        keep = torch.from_numpy(np.sort(np.random.default_rng([s.seed, d]).choice(len(per_pos), s.max_positions,
                                                                                replace=False)))
        per_pos, pos_inputs = per_pos[keep.to(per_pos.device)], pos_inputs[keep]
    return seq, [summary(c) for c in dx.count_at(per_pos, pos_inputs, tols=[k * s.cluster_tol for k in POSITION_TOLS])]


# ------------------------------------------------------------------------------------- verdicts

def verdicts(row: dict, th: dict = THRESHOLDS) -> tuple[dict, dict]:
    """A plain-language verdict per axis, and the numbers behind it, for one difficulty's row."""
    r, i, g = row["reachability"], row["input_dependence"], row["geometry"]
    if not r["converged"] >= th["unreachable"]:
        reach = "unreachable"
    elif r["converged"] < th["reachable"]:
        reach = "partly reachable"
    elif math.isnan(r["path_independent"]):
        reach = "reachable (no random starts)"
    elif r["path_independent"] >= th["path_independent"]:
        reach = "reachable from any start"
    else:
        reach = "reachable from z0 only"
    reach_why = (f"{_pct(r['converged'])} of inputs converge from z0; random starts converge "
                 f"{_pct(r['start_converged'])} and reach the same z* for {_pct(r['path_independent'])}")

    shared, no_fixed_point = i["shared_fixed_points"], i["at_fixed_point"] == 0
    if shared >= th["shared"] or i["relative_median"] < th["sensitivity"]:
        inp = "ignores x"
    elif no_fixed_point and math.isnan(shared):
        inp = "no fixed point"
    elif not i["fd_rel_error_max"] <= th["fd_agreement"]:
        inp = "IFT unreliable"
    elif shared <= 1 - th["shared"] or math.isnan(shared):  # nan: no input converged; the IFT alone decides
        inp = "depends on x"
    else:
        inp = "mixed"
    inp_why = (f"{_pct(i['shared_fixed_points'])} of z* are fixed points for another input too; median "
               f"relative sensitivity {_num(i['relative_median'])}; IFT vs FD disagree by "
               f"{_num(i['fd_rel_error_max'])}")

    rho, cond = g["spectral_radius_max"], g["cond_max"]
    if no_fixed_point:
        geo = "no fixed point"
    elif math.isnan(rho):
        geo = "not measured"
    elif rho >= th["spectral_radius"]:
        geo = "not contractive"
    elif g["adjoint_converged"] < 1:
        geo = "backward fails"
    elif math.isnan(cond):
        geo = "not measured"
    elif cond >= th["cond"]:
        geo = "ill-conditioned"
    elif rho >= th["marginal"]:
        geo = "marginal"
    else:
        geo = "well-conditioned"
    geo_why = (f"rho(J) <= {_num(rho)}, cond(I - J) <= {_num(cond)}, adjoint converged for "
               f"{_pct(g['adjoint_converged'])} in {_num(g['adjoint_steps_mean'])} steps; "
               f"{_pct(i['at_fixed_point'])} of these inputs at a fixed point (float64 residual < tol)")
    return ({"reachability": reach, "input_dependence": inp, "geometry": geo},
            {"reachability": reach_why, "input_dependence": inp_why, "geometry": geo_why})


def outlook(rows: list[dict]) -> str:
    """One line for predicting extrapolation: where the fixed points are reachable and stable, how
    x enters, and how the conditioning trends from the easiest to the hardest difficulty."""
    def where(pred) -> str:
        ds = [r["difficulty"] for r in rows if pred(r["verdicts"])]
        return "every difficulty" if len(ds) == len(rows) else (", ".join(map(str, ds)) or "no difficulty")

    stable = where(lambda v: v["reachability"].startswith("reachable")
                   and v["geometry"] in ("well-conditioned", "marginal"))
    depends = where(lambda v: v["input_dependence"] == "depends on x")
    ignores = where(lambda v: v["input_dependence"] == "ignores x")
    line = f"reachable and stable fixed points at {stable}; z* depends on x at {depends}"
    if ignores != "no difficulty":
        line += f"; z* ignores x at {ignores} (x acts only through z0, i.e. which basin the loop starts in)"
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        line += (f"; from difficulty {first['difficulty']} to {last['difficulty']}: rho(J) "
                 f"{_num(first['geometry']['spectral_radius_max'])} -> "
                 f"{_num(last['geometry']['spectral_radius_max'])}, "
                 f"cond(I - J) {_num(first['geometry']['cond_max'])} -> {_num(last['geometry']['cond_max'])}")
    return line


# ------------------------------------------------------------------------------------- output

COLORS = {"reachable from any start": "green", "depends on x": "green", "well-conditioned": "green",
          "reachable from z0 only": "yellow", "reachable (no random starts)": "yellow", "partly reachable": "yellow",
          "ignores x": "yellow", "mixed": "yellow",
          "marginal": "yellow", "ill-conditioned": "yellow", "unreachable": "red", "IFT unreliable": "red",
          "not contractive": "red", "backward fails": "red",
          "not measured": "red", "no fixed point": "red"}


def print_table(report: dict, console: Console | None = None) -> None:
    """One row per difficulty; per axis a column with its verdict (bold) and the numbers behind it."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # redirected: do not squeeze the table into 80 columns
            console.width = max(console.width, 132)
    s = report["settings"]
    m, tol = report["model"], s["cluster_tol"]
    table = Table(title=f"{report['task']} @ step {report['step']} (recall={m['recall']}, norm={m['norm']}, "
                        f"z0={m['z0']}): fixed-point diagnostics",
                  caption=f"{s['n_inputs']} inputs x (z0 + {s['n_starts']} random starts) per difficulty; "
                          f"sensitivity and geometry on {s['n_geometry']} of them in float64; position states "
                          f"counted at tol {'/'.join(f'{k * tol:g}' for k in POSITION_TOLS)}. "
                          "Meanings and thresholds: docs/DIAGNOSE.md")
    table.add_column("difficulty", justify="right")
    table.add_column("max_iter", justify="right")
    for axis in ("Reachability", "Input-dependence", "Geometry"):
        table.add_column(axis)
    for row in report["rows"]:
        r, i, g, v = row["reachability"], row["input_dependence"], row["geometry"], row["verdicts"]
        fp, tok = i["fixed_points"], i["position_states"]
        cells = [
            (v["reachability"], f"conv {_pct(r['converged'])} in {_num(r['steps_mean'])} st, "
                                f"rate {_num(r['decay_rate_median'])}\n"
                                f"random: conv {_pct(r['start_converged'])}, same z* {_pct(r['path_independent'])}\n"
                                f"acc {_pct(r['acc'])} (random starts {_pct(r['acc_random_starts'])})"),
            (v["input_dependence"], f"|dz*/dx.v| {_num(i['sensitivity_median'])}, vs FD {_num(i['fd_rel_error_max'])}\n"
                                    f"shared z* {_pct(i['shared_fixed_points'])}; distinct z* {fp['n_distinct']} of "
                                    f"{fp['n_points']} ({fp['n_inputs']} inputs)"
                                    + (f"\nposition states: {'/'.join(str(c['n_distinct']) for c in tok)} of "
                                       f"{tok[0]['n_points']}" if tok else "")),
            (v["geometry"], f"rho(J) {_num(g['spectral_radius_max'])}, ||J|| {_num(g['jacobian_norm_max'])}\n"
                            f"cond(I-J) {_num(g['cond_max'])}, sigma_min {_num(g['sigma_min_min'])}\n"
                            f"adjoint conv {_pct(g['adjoint_converged'])} in {_num(g['adjoint_steps_mean'])} st"),
        ]
        table.add_row(str(row["difficulty"]), str(row["max_iter"]),
                      *[f"[bold {COLORS[verdict]}]{verdict}[/]\n[dim]{numbers}[/dim]" for verdict, numbers in cells])
    console.print(table)
    console.print(f"outlook: {report['outlook']}")


PLOTS = ("residuals", "spectral_radius", "sensitivity")


def plot(report: dict, directory: str | Path, prefix: str = "diagnose_") -> list[Path]:
    """Three PNGs in `directory`: residual curves by difficulty, spectral radius histogram,
    IFT sensitivity against finite differences. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    paths = [directory / f"{prefix}{name}.png" for name in PLOTS]
    title = f"{report['task']} @ step {report['step']} (recall={report['model']['recall']})"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {row["difficulty"]: colors[k % len(colors)] for k, row in enumerate(report["rows"])}

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for row in report["rows"]:
        trace = np.array([[np.nan if v is None else v for v in t] for t in row["reachability"]["trace"]], dtype=float)
        for t in trace:
            ax.plot(np.arange(1, len(t) + 1), t, color=color[row["difficulty"]], alpha=0.12, lw=0.7)
        with np.errstate(all="ignore"):
            running = np.sum(np.isfinite(trace), axis=0) > 0
            med = np.array([np.nanmedian(c) if ok else np.nan for c, ok in zip(trace.T, running)])
        ax.plot(np.arange(1, len(med) + 1), med, color=color[row["difficulty"]], lw=1.8, label=str(row["difficulty"]))
    ax.axhline(report["tol"], color="k", ls=":", lw=1, label="tol")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation of f (from the model's z0)")
    ax.set_ylabel("relative residual ||f(z) - z|| / ||f(z)||")
    ax.set_title(f"{title}: residual curves\n(thin: each input; bold: median of those still running)", fontsize=9)
    ax.legend(title="difficulty", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[0])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    values = [[v for v in row["geometry"]["per_input"]["spectral_radius"] if v is not None and math.isfinite(v)]
              for row in report["rows"]]
    flat = [v for vs in values for v in vs]
    if flat:
        lo, hi = min(min(flat), 0.9), max(max(flat), 1.05)
        ax.hist(values, bins=np.linspace(lo, hi, 30), stacked=True,
                color=[color[r["difficulty"]] for r in report["rows"]],
                label=[str(r["difficulty"]) for r in report["rows"]])
    ax.axvline(1.0, color="r", ls="--", lw=1, label="rho = 1")
    ax.set_xlabel("spectral radius of J = df/dz at z*")
    ax.set_ylabel("inputs")
    ax.set_title(f"{title}: spectral radius at the fixed point", fontsize=9)
    ax.legend(title="difficulty", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1])
    plt.close(fig)

    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(10, 4.3), dpi=120)
    top, floor = 0.0, 1e-17  # exact agreement (0) is drawn at the floor of the log axis
    positions = {row["difficulty"]: k for k, row in enumerate(report["rows"])}
    for row in report["rows"]:
        p = row["input_dependence"]["per_input"]
        ift, fd, err = (np.array([np.nan if v is None else v for v in p[key]], dtype=float)
                        for key in ("sensitivity", "fd_sensitivity", "fd_rel_error"))
        ax.scatter(fd, ift, color=color[row["difficulty"]], label=str(row["difficulty"]), zorder=3)
        top = max(top, np.nanmax(np.concatenate([ift, fd, [0.0]])))
        ax_err.scatter(np.full(len(err), positions[row["difficulty"]]), np.maximum(err, floor),
                       color=color[row["difficulty"]], zorder=3)
    top = top * 1.1 if top > 0 else 1.0
    ax.plot([0, top], [0, top], "k:", lw=1, label="IFT = FD")
    ax.set_xlim(-0.02 * top, top)
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlabel("finite differences: ||z*(x + eps v) - z*(x - eps v)|| / 2 eps")
    ax.set_ylabel("IFT: ||(I - J)^-1 (df/dx) v||")
    note = "\n(all zero: f ignores x)" if top == 1.0 else ""
    ax.set_title(f"{title}\nsensitivity of z* to x along a unit v{note}", fontsize=9)
    ax.legend(title="difficulty", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax_err.axhline(report["thresholds"]["fd_agreement"], color="r", ls="--", lw=1, label="verdict threshold")
    ax_err.set_yscale("log")
    ax_err.set_ylim(floor / 3, 10)
    ax_err.set_xticks(range(len(positions)), [str(d) for d in positions])
    ax_err.set_xlabel("difficulty")
    ax_err.set_ylabel("||t_IFT - t_FD|| / max(||t_IFT||, ||t_FD||)")
    ax_err.set_title(f"relative disagreement per input (at {floor:g}: exactly 0)", fontsize=9)
    ax_err.legend(fontsize=8)
    ax_err.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[2])
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------- numbers

def _finite_stat(op):
    """A summary `op` of a tensor's finite values as a float, nan if it has none."""
    def stat(t: Tensor) -> float:
        t = t.detach().double().reshape(-1).cpu()
        t = t[torch.isfinite(t)]
        return float(op(t)) if t.numel() else math.nan
    return stat


_mean, _median, _max, _min = (_finite_stat(op) for op in (torch.mean, torch.median, torch.max, torch.min))


def _max_all(t: Tensor) -> float:
    """The max, or nan if any value is nan."""
    t = t.detach().double().reshape(-1).cpu()
    return math.nan if not t.numel() or bool(t.isnan().any()) else float(t.max())


def _list(t: Tensor) -> list:
    t = t.detach().cpu()
    return t.tolist() if t.dtype == torch.bool or not t.is_floating_point() else t.double().tolist()


def _pct(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.0f}%"


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.3g}" if v != 0 else "0"
