"""The diagnose report, typed: one `DifficultyRow` per difficulty with its three axes, the verdicts
read from them, and the report's table and plots.

    report = diagnose_checkpoint(path)            # a DiagnoseReport
    report.rows[0].geometry.spectral_radius_max   # the numbers, by name
    write_json(report.to_dict(), "diagnose.json") # the JSON (docs/DIAGNOSE.md); from_dict reads it back

A number that could not be measured is nan (null in the JSON). What each field means:
docs/DIAGNOSE.md, whose tables follow these classes field by field.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

NAN = math.nan
POSITION_TOLS = (1, 3, 10, 30)  # per-position states are counted at these multiples of cluster_tol


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


class _Section:
    """to_dict / from_dict for the report's dataclasses: nested sections by their annotated type,
    JSON's null back to nan for a float field."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, kind = data[f.name], hints[f.name]
            if isinstance(kind, type) and issubclass(kind, _Section) and isinstance(value, dict):
                value = kind.from_dict(value)
            elif typing.get_origin(kind) is list and typing.get_args(kind) and isinstance(
                    typing.get_args(kind)[0], type) and issubclass(typing.get_args(kind)[0], _Section):
                value = [typing.get_args(kind)[0].from_dict(v) for v in value]
            elif kind is float and value is None:
                value = NAN
            values[f.name] = value
        return cls(**values)


@dataclass
class ReachabilityRow(_Section):
    """Does the solver reach z* from the model's z0, and from random starts?"""

    converged: float = NAN  # fraction of inputs converged from z0
    steps_mean: float = NAN  # solver steps of those
    steps_max: float = NAN
    decay_rate_median: float = NAN  # geometric decay of the residual per step
    start_converged: float = NAN  # fraction of random starts converged
    path_independent: float = NAN  # fraction of inputs whose random starts all reach the same z*
    path_distance_median: float = NAN
    path_distance_max: float = NAN
    acc: float = NAN  # exact accuracy at z* from z0
    acc_random_starts: float = NAN
    per_input: dict = field(default_factory=dict)
    trace: list = field(default_factory=list)  # residual per evaluation, per input


@dataclass
class InputDependenceRow(_Section):
    """Does z* depend on x, and how (sensitivity, shared and distinct fixed points)?"""

    shared_fixed_points: float = NAN  # fraction of z*_i that are fixed points for another input too
    cross_residual_median: float = NAN
    fixed_points: dict = field(default_factory=dict)  # countability of whole states
    position_states: list | None = None  # countability of single positions' states, per tolerance
    sensitivity_median: float = NAN  # ||dz*/dx v|| by the IFT
    relative_median: float = NAN  # the same over ||z*||
    direct_median: float = NAN  # ||df/dx v||
    fd_rel_error_max: float = NAN  # IFT against finite differences
    ift_converged: float = NAN
    fd_converged: float = NAN
    refined_converged: float = NAN  # float64 refinement of z*
    refined_residual_max: float = NAN
    at_fixed_point: float = NAN  # geometry inputs whose float64 z* is a fixed point at the model's tol
    per_input: dict = field(default_factory=dict)


@dataclass
class GeometryRow(_Section):
    """The Jacobian J = df/dz at z*: contraction and the conditioning of I - J."""

    spectral_radius_max: float = NAN  # nan if any input's was not resolved
    spectral_radius_median: float = NAN
    jacobian_norm_max: float = NAN
    sigma_min_min: float = NAN  # of I - J
    cond_max: float = NAN  # of I - J; nan if any input's was not resolved
    krylov_converged: float = NAN
    matvecs_mean: float = NAN
    adjoint_converged: float = NAN  # the IFT backward solve
    adjoint_steps_mean: float = NAN
    adjoint_max_iter: int = 0
    per_input: dict = field(default_factory=dict)


@dataclass
class DifficultyRow(_Section):
    difficulty: int = 0
    max_iter: int = 0  # the evaluation budget at this difficulty
    n_inputs: int = 0
    n_geometry: int = 0
    reachability: ReachabilityRow = field(default_factory=ReachabilityRow)
    input_dependence: InputDependenceRow = field(default_factory=InputDependenceRow)
    geometry: GeometryRow = field(default_factory=GeometryRow)
    verdicts: dict = field(default_factory=dict)  # axis -> verdict
    reasons: dict = field(default_factory=dict)  # axis -> the numbers behind it
    seconds: float = NAN
    not_measured: dict = field(default_factory=dict)  # measurement -> why not (the time budget)


@dataclass
class DiagnoseReport(_Section):
    checkpoint: str = ""
    task: str = ""
    step: int = 0
    deqloop_version: str = ""
    model: dict = field(default_factory=dict)  # recall, norm, z0, d_model, n_heads, window
    solver: str = ""
    tol: float = NAN
    b_solver: str = ""
    b_tol: float = NAN
    settings: dict = field(default_factory=dict)  # DiagnoseSettings
    thresholds: dict = field(default_factory=dict)
    difficulties: list = field(default_factory=list)
    rows: list[DifficultyRow] = field(default_factory=list)
    outlook: str = ""


# ------------------------------------------------------------------------------------- verdicts

def verdicts(row: DifficultyRow, th: dict = THRESHOLDS) -> tuple[dict, dict]:
    """A plain-language verdict per axis, and the numbers behind it, for one difficulty's row."""
    r, i, g = row.reachability, row.input_dependence, row.geometry
    if not r.converged >= th["unreachable"]:
        reach = "unreachable"
    elif r.converged < th["reachable"]:
        reach = "partly reachable"
    elif math.isnan(r.path_independent):
        reach = "reachable (no random starts)"
    elif r.path_independent >= th["path_independent"]:
        reach = "reachable from any start"
    else:
        reach = "reachable from z0 only"
    reach_why = (f"{_pct(r.converged)} of inputs converge from z0; random starts converge "
                 f"{_pct(r.start_converged)} and reach the same z* for {_pct(r.path_independent)}")

    shared, no_fixed_point = i.shared_fixed_points, i.at_fixed_point == 0
    if shared >= th["shared"] or i.relative_median < th["sensitivity"]:
        inp = "ignores x"
    elif "sensitivity" in row.not_measured:  # the IFT check could not be made: no verdict from shared alone
        inp = "not measured"
    elif no_fixed_point and math.isnan(shared):
        inp = "no fixed point"
    elif not i.fd_rel_error_max <= th["fd_agreement"]:
        inp = "IFT unreliable"
    elif shared <= 1 - th["shared"] or math.isnan(shared):  # nan: no input converged; the IFT alone decides
        inp = "depends on x"
    else:
        inp = "mixed"
    inp_why = (f"{_pct(i.shared_fixed_points)} of z* are fixed points for another input too; median "
               f"relative sensitivity {_num(i.relative_median)}; IFT vs FD disagree by "
               f"{_num(i.fd_rel_error_max)}")

    rho, cond = g.spectral_radius_max, g.cond_max
    if no_fixed_point:
        geo = "no fixed point"
    elif math.isnan(rho):
        geo = "not measured"
    elif rho >= th["spectral_radius"]:
        geo = "not contractive"
    elif g.adjoint_converged < 1:
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
               f"{_pct(g.adjoint_converged)} in {_num(g.adjoint_steps_mean)} steps; "
               f"{_pct(i.at_fixed_point)} of these inputs at a fixed point (float64 residual < tol)")
    return ({"reachability": reach, "input_dependence": inp, "geometry": geo},
            {"reachability": reach_why, "input_dependence": inp_why, "geometry": geo_why})


def outlook(rows: list[DifficultyRow]) -> str:
    """One line for predicting extrapolation: where the fixed points are reachable and stable, how
    x enters, and how the conditioning trends from the easiest to the hardest difficulty."""
    def where(pred) -> str:
        ds = [r.difficulty for r in rows if pred(r.verdicts)]
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
        line += (f"; from difficulty {first.difficulty} to {last.difficulty}: rho(J) "
                 f"{_num(first.geometry.spectral_radius_max)} -> {_num(last.geometry.spectral_radius_max)}, "
                 f"cond(I - J) {_num(first.geometry.cond_max)} -> {_num(last.geometry.cond_max)}")
    return line


# ------------------------------------------------------------------------------------- output

COLORS = {"reachable from any start": "green", "depends on x": "green", "well-conditioned": "green",
          "reachable from z0 only": "yellow", "reachable (no random starts)": "yellow", "partly reachable": "yellow",
          "ignores x": "yellow", "mixed": "yellow",
          "marginal": "yellow", "ill-conditioned": "yellow", "unreachable": "red", "IFT unreliable": "red",
          "not contractive": "red", "backward fails": "red",
          "not measured": "red", "no fixed point": "red"}


def print_table(report: DiagnoseReport, console: Console | None = None) -> None:
    """One row per difficulty; per axis a column with its verdict (bold) and the numbers behind it."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # redirected: do not squeeze the table into 80 columns
            console.width = max(console.width, 132)
    s = report.settings
    m, tol = report.model, s["cluster_tol"]
    table = Table(title=f"{report.task} @ step {report.step} (recall={m['recall']}, norm={m['norm']}, "
                        f"z0={m['z0']}): fixed-point diagnostics",
                  caption=f"{s['n_inputs']} inputs x (z0 + {s['n_starts']} random starts) per difficulty; "
                          f"sensitivity and geometry on {s['n_geometry']} of them in float64; position states "
                          f"counted at tol {'/'.join(f'{k * tol:g}' for k in POSITION_TOLS)}. "
                          "Meanings and thresholds: docs/DIAGNOSE.md")
    table.add_column("difficulty", justify="right")
    table.add_column("max_iter", justify="right")
    for axis in ("Reachability", "Input-dependence", "Geometry"):
        table.add_column(axis)
    for row in report.rows:
        r, i, g, v = row.reachability, row.input_dependence, row.geometry, row.verdicts
        fp, tok = i.fixed_points, i.position_states
        cells = [
            (v["reachability"], f"conv {_pct(r.converged)} in {_num(r.steps_mean)} st, "
                                f"rate {_num(r.decay_rate_median)}\n"
                                f"random: conv {_pct(r.start_converged)}, same z* {_pct(r.path_independent)}\n"
                                f"acc {_pct(r.acc)} (random starts {_pct(r.acc_random_starts)})"),
            (v["input_dependence"], f"|dz*/dx.v| {_num(i.sensitivity_median)}, vs FD {_num(i.fd_rel_error_max)}\n"
                                    f"shared z* {_pct(i.shared_fixed_points)}; distinct z* {fp['n_distinct']} of "
                                    f"{fp['n_points']} ({fp['n_inputs']} inputs)"
                                    + (f"\nposition states: {'/'.join(str(c['n_distinct']) for c in tok)} of "
                                       f"{tok[0]['n_points']}" if tok else "")),
            (v["geometry"], f"rho(J) {_num(g.spectral_radius_max)}, ||J|| {_num(g.jacobian_norm_max)}\n"
                            f"cond(I-J) {_num(g.cond_max)}, sigma_min {_num(g.sigma_min_min)}\n"
                            f"adjoint conv {_pct(g.adjoint_converged)} in {_num(g.adjoint_steps_mean)} st"),
        ]
        table.add_row(str(row.difficulty), str(row.max_iter),
                      *[f"[bold {COLORS[verdict]}]{verdict}[/]\n[dim]{numbers}[/dim]" for verdict, numbers in cells])
    console.print(table)
    for row in report.rows:
        if row.not_measured:
            console.print(f"difficulty {row.difficulty}, not measured: "
                          + "; ".join(f"{k}: {v}" for k, v in row.not_measured.items())
                          + f" (time budget {report.settings.get('budget_seconds')} s, --budget-seconds)")
    console.print(f"outlook: {report.outlook}")


PLOTS = ("residuals", "spectral_radius", "sensitivity")


def plot(report: DiagnoseReport, directory: str | Path, prefix: str = "diagnose_") -> list[Path]:
    """Three PNGs in `directory`: residual curves by difficulty, spectral radius histogram,
    IFT sensitivity against finite differences. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    paths = [directory / f"{prefix}{name}.png" for name in PLOTS]
    title = f"{report.task} @ step {report.step} (recall={report.model['recall']})"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {row.difficulty: colors[k % len(colors)] for k, row in enumerate(report.rows)}
    for draw, path in zip((_plot_residuals, _plot_spectral_radius, _plot_sensitivity), paths):
        fig = draw(plt, report, title, color)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return paths


def _plot_residuals(plt, report: DiagnoseReport, title: str, color: dict):
    """Residual curves from the model's z0: each input thin, the median bold."""
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for row in report.rows:
        trace = np.array([[np.nan if v is None else v for v in t] for t in row.reachability.trace], dtype=float)
        for t in trace:
            ax.plot(np.arange(1, len(t) + 1), t, color=color[row.difficulty], alpha=0.12, lw=0.7)
        with np.errstate(all="ignore"):
            running = np.sum(np.isfinite(trace), axis=0) > 0
            med = np.array([np.nanmedian(c) if ok else np.nan for c, ok in zip(trace.T, running)])
        ax.plot(np.arange(1, len(med) + 1), med, color=color[row.difficulty], lw=1.8, label=str(row.difficulty))
    ax.axhline(report.tol, color="k", ls=":", lw=1, label="tol")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation of f (from the model's z0)")
    ax.set_ylabel("relative residual ||f(z) - z|| / ||f(z)||")
    ax.set_title(f"{title}: residual curves\n(thin: each input; bold: median of those still running)", fontsize=9)
    ax.legend(title="difficulty", fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig


def _plot_spectral_radius(plt, report: DiagnoseReport, title: str, color: dict):
    """Histogram of rho(J) at z*, stacked by difficulty."""
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    values = [[v for v in row.geometry.per_input["spectral_radius"] if v is not None and math.isfinite(v)]
              for row in report.rows]
    flat = [v for vs in values for v in vs]
    if flat:
        lo, hi = min(min(flat), 0.9), max(max(flat), 1.05)
        ax.hist(values, bins=np.linspace(lo, hi, 30), stacked=True,
                color=[color[r.difficulty] for r in report.rows], label=[str(r.difficulty) for r in report.rows])
    ax.axvline(1.0, color="r", ls="--", lw=1, label="rho = 1")
    ax.set_xlabel("spectral radius of J = df/dz at z*")
    ax.set_ylabel("inputs")
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of inputs: no fractional ticks
    ax.set_title(f"{title}: spectral radius at the fixed point", fontsize=9)
    ax.legend(title="difficulty", fontsize=8)
    return fig


def _plot_sensitivity(plt, report: DiagnoseReport, title: str, color: dict):
    """IFT sensitivity against finite differences, and their disagreement per input."""
    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(10, 4.3), dpi=120)
    top, floor = 0.0, 1e-17  # exact agreement (0) is drawn at the floor of the log axis
    positions = {row.difficulty: k for k, row in enumerate(report.rows)}
    for row in report.rows:
        p = row.input_dependence.per_input
        ift, fd, err = (np.array([np.nan if v is None else v for v in p[key]], dtype=float)
                        for key in ("sensitivity", "fd_sensitivity", "fd_rel_error"))
        ax.scatter(fd, ift, color=color[row.difficulty], label=str(row.difficulty), zorder=3)
        top = max(top, np.nanmax(np.concatenate([ift, fd, [0.0]])))
        exact = err == 0  # IFT and FD agree exactly (both 0 when f ignores x): drawn at the floor, hollow
        ax_err.scatter(np.full(int((~exact).sum()), positions[row.difficulty]), err[~exact],
                       color=color[row.difficulty], zorder=3)
        ax_err.scatter(np.full(int(exact.sum()), positions[row.difficulty]), np.full(int(exact.sum()), floor),
                       facecolors="none", edgecolors=color[row.difficulty], zorder=3,
                       label="exactly 0" if exact.any() and "exactly 0" not in ax_err.get_legend_handles_labels()[1]
                       else None)
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
    ax_err.axhline(report.thresholds["fd_agreement"], color="r", ls="--", lw=1, label="verdict threshold")
    ax_err.set_yscale("log")
    ax_err.set_ylim(floor / 3, 10)
    ax_err.set_xticks(range(len(positions)), [str(d) for d in positions])
    ax_err.set_xlabel("difficulty")
    ax_err.set_ylabel("||t_IFT - t_FD|| / max(||t_IFT||, ||t_FD||)")
    ax_err.set_title(f"relative disagreement per input (at {floor:g}: exactly 0)", fontsize=9)
    ax_err.legend(fontsize=8)
    ax_err.grid(True, alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------- numbers

def _pct(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.0f}%"


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.3g}" if v != 0 else "0"
