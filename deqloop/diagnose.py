"""Diagnose a checkpoint's fixed points per difficulty: reachable, input-dependent, well-conditioned?

    report = diagnose_checkpoint("runs/prefix_sums/checkpoint.pt", settings=DiagnoseSettings(n_inputs=32))
    print_table(report); write_json(report.to_dict(), "diagnose.json"); plot(report, "plots/")

Per difficulty, on the run's fixed test set (`deqloop.evaluate.test_set`) at the evaluation
budget (`eval_max_iter`): reachability and countability on `n_inputs` inputs, in the model's own
dtype and solver; sensitivity and geometry on the first `n_geometry` of them, on a float64 copy
of the model at the fixed point refined to `refine_tol`. What every number means, and the
verdict thresholds (`THRESHOLDS`): docs/DIAGNOSE.md. The report's types, its verdicts, table and
plots: deqloop.diagnose_report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from deqloop import diagnostics as dx
from deqloop.checkpoint import load_checkpoint, load_run
from deqloop.errors import ConfigError
from deqloop.evaluate import eval_max_iter, test_set
from deqloop.model import build_model
from deqloop.diagnose_report import (POSITION_TOLS, THRESHOLDS, DiagnoseReport, DifficultyRow, GeometryRow,
                                     InputDependenceRow, ReachabilityRow, outlook, plot, print_table, verdicts)

__all__ = ["THRESHOLDS", "DiagnoseReport", "DiagnoseSettings", "diagnose_checkpoint", "plot", "print_table",
           "verdicts"]

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
    # Wall-clock cap of the measurements (None: none), shared out over the difficulties: each gets
    # what is left over the difficulties left. What did not fit is nan and named in not_measured.
    budget_seconds: float | None = 150.0

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
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ConfigError(f"budget_seconds must be > 0 or None, got {self.budget_seconds}")


Progress = Callable[[str, int, int], None]  # (description, steps done, steps in all)


def diagnose_checkpoint(path: str | Path | dict, *, difficulties=None, settings: DiagnoseSettings = DiagnoseSettings(),
                        device: str | torch.device = "cpu", progress: Progress | None = None,
                        solver: str | None = None, solver_options: dict | None = None) -> DiagnoseReport:
    """Every diagnostic of a checkpoint per difficulty (its JSON: report.to_dict()).

    Default difficulties: the run's test difficulties; default forward solver: the run's (see
    checkpoint.with_solver). Raises CheckpointError on a bad file.
    """
    ckpt = path if isinstance(path, dict) else load_checkpoint(path)  # a dict: already loaded
    model, task, model_cfg, solve = load_run(ckpt, device, solver=solver, solver_options=solver_options)
    difficulties = list(difficulties or ckpt["train_config"].get("test_difficulties") or task.test_difficulties)
    # float64 copy for the linearization: in float32, IFT and finite differences disagree by ~3e-2.
    model64 = _float64_copy(model)
    for p in [*model.parameters(), *model64.parameters()]:
        p.requires_grad_(False)
    s = settings
    steps_per = s.n_starts + 4 + min(s.n_geometry, s.n_inputs)
    done = [0]

    def tick(what: str) -> None:
        if progress is not None:
            progress(what, done[0], steps_per * len(difficulties))
        done[0] += 1

    end = None if s.budget_seconds is None else time.monotonic() + s.budget_seconds
    rows = []
    for k, d in enumerate(difficulties):  # each difficulty: its share of the time left
        deadline = None if end is None else time.monotonic() + (end - time.monotonic()) / (len(difficulties) - k)
        rows.append(_diagnose_difficulty(model, model64, task, solve, d, s, tick, deadline))
    if progress is not None:
        progress("done", done[0], steps_per * len(difficulties))
    return DiagnoseReport(
        checkpoint=str(ckpt["path"]), task=ckpt["task"], step=ckpt["step"], deqloop_version=ckpt["deqloop_version"],
        model={k: model_cfg.to_dict()[k] for k in ("recall", "norm", "z0", "d_model", "n_heads", "window")},
        solver=solve.solver, tol=solve.tol, b_solver=solve.b_solver, b_tol=solve.b_tol, settings=asdict(s),
        thresholds=dict(THRESHOLDS), difficulties=difficulties, rows=rows, outlook=outlook(rows))


def _diagnose_difficulty(model, model64, task, solve, d: int, s: DiagnoseSettings, tick,
                         deadline: float | None) -> DifficultyRow:
    start = time.time()
    late = lambda: deadline is not None and time.monotonic() > deadline
    not_measured = {}
    batch = test_set(task, d, s.n_inputs)  # a difficulty or size the task cannot serve: TaskInputError
    device = next(model.parameters()).device
    tokens = batch.inputs.to(device)
    budget = eval_max_iter(task, solve, d)
    # subbatch: f on the still-active samples only; the cell treats samples independently.
    options = {**solve.forward_options(max_iter=budget), "subbatch": True}
    with torch.no_grad():
        x = model.embed_input(tokens)
        reach = dx.reachability(model.f, x, model.z_init(x), n_starts=s.n_starts, seed=s.seed, method=solve.solver,
                                options=options, on_solve=lambda what: tick(f"{d}: solve {what}"), deadline=deadline)
        if reach.max_iter < budget:
            not_measured["solve from z0"] = f"max_iter cut to {reach.max_iter} of {budget} by the time budget"
        if s.n_starts and reach.start_max_iter < budget:
            not_measured["random starts"] = f"max_iter cut to {reach.start_max_iter} of {budget} by the time budget"
        if len(reach.start_z) < s.n_starts:
            not_measured["random starts"] = f"{len(reach.start_z)} of {s.n_starts} before the time budget ran out"
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
    try:
        refined = dx.solve_cell(dx.timed(model64.f, deadline), x64, reach.z_star[:g].double(), method=solve.solver,
                                options=tight)
        z64 = refined.z
    except dx.OutOfTime:  # the float32 z* stands in: what follows is measured there, and says so
        refined, z64 = None, reach.z_star[:g].double()
        not_measured["float64 refinement"] = "time budget; sensitivity and geometry at the float32 z*"
    at_fp = None if refined is None else refined.residual < solve.tol  # (g,) the geometry inputs at a fixed point
    tick(f"{d}: sensitivity (IFT vs finite differences)")
    sens = dx.sensitivity(model64.f, x64, z64, seed=s.seed, fd_eps=s.fd_eps, method=solve.solver, fd_options=tight,
                          deadline=deadline)
    if late():
        not_measured["sensitivity"] = "cut by the time budget (what is missing is nan)"
    geom = dx.geometry(model64.f, x64, z64, seed=s.seed, tol=s.krylov_tol, adjoint_method=solve.b_solver,
                       adjoint_options={"tol": solve.b_tol, "max_iter": max(solve.b_max_iter, budget)},
                       on_sample=lambda b: tick(f"{d}: geometry of input {b + 1}/{g}"), deadline=deadline,
                       at_fixed_point=at_fp)
    if at_fp is not None and not bool(at_fp.all()):
        k = int((~at_fp).sum())
        not_measured["cond(I - J)"] = f"skipped on {k} of {g} inputs not at a fixed point (rho(J) and ||J|| measured)"
    if late():
        not_measured["geometry"] = "cut by the time budget (what is missing is nan)"

    row = DifficultyRow(
        difficulty=d, max_iter=budget, n_inputs=s.n_inputs, n_geometry=g,
        reachability=_reachability_row(reach, acc, acc_starts, s),
        input_dependence=_input_row(reach, cross, seq, positions, sens, refined, solve.tol),
        geometry=_geometry_row(geom, max(solve.b_max_iter, budget)), not_measured=not_measured)
    row.verdicts, row.reasons = verdicts(row)
    row.seconds = time.time() - start
    return row


def _reachability_row(reach: dx.Reachability, acc: Tensor, acc_starts: list[Tensor], s: DiagnoseSettings
                      ) -> ReachabilityRow:
    conv = reach.converged
    return ReachabilityRow(
        converged=_mean(conv), steps_mean=_mean(reach.n_steps[conv]), steps_max=_max(reach.n_steps[conv]),
        decay_rate_median=_median(reach.decay_rate), start_converged=_mean(reach.start_converged),
        path_independent=_mean(reach.path_independent(s.cluster_tol)) if s.n_starts else math.nan,
        path_distance_median=_median(reach.path_distance), path_distance_max=_max(reach.path_distance),
        acc=_mean(acc), acc_random_starts=_mean(torch.stack(acc_starts)) if acc_starts else math.nan,
        per_input={
            "converged": _list(conv), "n_steps": _list(reach.n_steps), "residual": _list(reach.residual),
            "decay_rate": _list(reach.decay_rate), "start_converged": _list(reach.start_converged),
            "start_n_steps": _list(reach.start_n_steps), "path_distance": _list(reach.path_distance),
        },
        trace=_list(reach.trace))


def _input_row(reach: dx.Reachability, cross: Tensor, seq: dict, positions: list | None, sens: dx.Sensitivity,
               refined, tol: float) -> InputDependenceRow:
    conv = reach.converged
    return InputDependenceRow(
        shared_fixed_points=_mean(cross[conv] < tol) if bool(conv.any()) else math.nan,
        cross_residual_median=_median(cross[conv]), fixed_points=seq, position_states=positions,
        sensitivity_median=_median(sens.norm), relative_median=_median(sens.relative),
        direct_median=_median(sens.direct), fd_rel_error_max=_max(sens.rel_error),
        ift_converged=_mean(sens.ift_converged), fd_converged=_mean(sens.fd_converged),
        refined_converged=_mean(refined.converged) if refined else math.nan,
        refined_residual_max=_max(refined.residual) if refined else math.nan,
        # the geometry inputs whose float64 z* is a fixed point at the model's own tolerance
        at_fixed_point=_mean(refined.residual < tol) if refined else math.nan,
        per_input={
            "sensitivity": _list(sens.norm), "fd_sensitivity": _list(sens.fd_norm),
            "relative": _list(sens.relative), "direct": _list(sens.direct), "fd_rel_error": _list(sens.rel_error),
            "ift_converged": _list(sens.ift_converged), "ift_iters": _list(sens.ift_iters),
            "fd_converged": _list(sens.fd_converged), "eps": _list(sens.eps), "cross_residual": _list(cross),
        })


def _geometry_row(geom: dx.Geometry, adjoint_max_iter: int) -> GeometryRow:
    return GeometryRow(
        # nan-propagating: a sample whose Krylov solve failed must not vanish from the verdict
        spectral_radius_max=_max_all(geom.spectral_radius), spectral_radius_median=_median(geom.spectral_radius),
        jacobian_norm_max=_max(geom.jacobian_norm), sigma_min_min=_min(geom.sigma_min),
        # the max over the inputs where it was measured (at a fixed point); nan if none, or if one failed
        cond_max=_max_all(geom.cond[geom.cond_measured]) if geom.cond_measured is not None else _max_all(geom.cond),
        krylov_converged=_mean(geom.converged), matvecs_mean=_mean(geom.matvecs),
        adjoint_converged=_mean(geom.adjoint_converged), adjoint_steps_mean=_mean(geom.adjoint_steps),
        adjoint_max_iter=adjoint_max_iter,
        per_input={
            "spectral_radius": _list(geom.spectral_radius), "jacobian_norm": _list(geom.jacobian_norm),
            "sigma_max": _list(geom.sigma_max), "sigma_min": _list(geom.sigma_min), "cond": _list(geom.cond),
            "krylov_converged": _list(geom.converged), "matvecs": _list(geom.matvecs),
            "adjoint_converged": _list(geom.adjoint_converged),
            "adjoint_steps": _list(geom.adjoint_steps), "adjoint_residual": _list(geom.adjoint_residual),
        })


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


def _float64_copy(model):
    """A float64 copy built from the config and state dict (a deepcopy would fail on the
    derived weights of a normalized cell, which are not graph leaves); build_model leaves the
    global RNG alone, and the loaded state replaces what it drew."""
    copy64 = build_model(model.cfg, seed=0)
    copy64.load_state_dict(model.state_dict())
    return copy64.to(next(model.parameters()).device).double().train(model.training)
