#!/usr/bin/env python
"""Benchmark deqloop's fixed-point solvers against torchdeq's, on the same problems.

    python bench/solvers.py                 # full run (~10 min on 2 CPU cores)
    python bench/solvers.py --quick         # smoke run (< 1 min)
    python bench/solvers.py --json out.json # also write every number

Every problem is built from its own seeded `torch.Generator`; the global RNG is never used.
See bench/README.md for the problems and the meaning of each column.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import solvers  # noqa: E402
from bench._memory import peak_alloc_bytes  # noqa: E402
from torchdeq import solver as tdsolver  # noqa: E402

DTYPE = torch.float32
TOLS = (1e-4, 1e-6)
CHECK_TOLS = (1e-4, 1e-6)


# --------------------------------------------------------------------------------------------
# Problems. Every f takes (z) or (z, idx): idx selects the per-sample parameters of the rows
# passed in, which is how our solvers' `subbatch=True` evaluates the active samples only.
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    key: str
    title: str
    f: Callable[..., Tensor]
    z0: Tensor
    max_iter: int


def _rows(t: Tensor, idx: Tensor | None) -> Tensor:
    return t if idx is None else t[idx]


def _spectral_unit(w: Tensor) -> Tensor:
    return w / torch.linalg.matrix_norm(w, ord=2)


def tanh_layer(seed: int = 0, d: int = 256, b: int = 64, norm: float = 0.9) -> Problem:
    """(a) f(z) = tanh(z W^T + c), ||W||_2 = norm, c ~ N(0, 1) per sample."""
    g = torch.Generator().manual_seed(seed)
    w = norm * _spectral_unit(torch.randn(d, d, generator=g, dtype=DTYPE))
    c = torch.randn(b, d, generator=g, dtype=DTYPE)

    def f(z, idx=None):
        return torch.tanh(z @ w.T + _rows(c, idx))

    return Problem("a", f"(a) contractive tanh layer, d={d}, B={b}, ||W||_2={norm}", f,
                   torch.zeros(b, d, dtype=DTYPE), max_iter=100)


def hard_map(seed: int = 1, d: int = 256, b: int = 64, eig: tuple = (-1.8, 0.9)) -> Problem:
    """(b) f(z) = tanh(z W + c), W = Q diag(linspace(eig)) Q^T symmetric, c ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    w = (q * torch.linspace(*eig, d, dtype=torch.float64)) @ q.T
    w = w.to(DTYPE)
    c = torch.randn(b, d, generator=g, dtype=DTYPE)

    def f(z, idx=None):
        return torch.tanh(z @ w + _rows(c, idx))

    return Problem("b", f"(b) hard map tanh(zW + c), eig(W) in [{eig[0]}, {eig[1]}], d={d}, B={b}",
                   f, torch.zeros(b, d, dtype=DTYPE), max_iter=200)


def expanding_map(seed: int = 0, d: int = 256, b: int = 64, gain: float = 1.5) -> Problem:
    """(e) f(z) = tanh(z W^T + c), W = gain * N(0, 1/d): not symmetric, spectral radius about
    `gain`, so plain iteration diverges or cycles on most samples; a generic map for the
    acceleration a residual safeguard must not throw away."""
    g = torch.Generator().manual_seed(seed)
    w = gain * torch.randn(d, d, generator=g, dtype=DTYPE) / math.sqrt(d)
    c = torch.randn(b, d, generator=g, dtype=DTYPE)

    def f(z, idx=None):
        return torch.tanh(z @ w.T + _rows(c, idx))

    return Problem("e", f"(e) expanding map tanh(zW^T + c), W ~ {gain} N(0, 1/d) non-symmetric, d={d}, B={b}", f,
                   torch.zeros(b, d, dtype=DTYPE), max_iter=300)


class PreNormBlock(nn.Module):
    """h + Attn(LN1(h)), then + MLP(LN2(.)); optionally LN_out on the block's output."""

    def __init__(self, d: int, heads: int, outer_norm: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln_out = nn.LayerNorm(d) if outer_norm else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.ln_out(h)


def _init_from(module: nn.Module, g: torch.Generator) -> nn.Module:
    """Fill every parameter from `g`: weights N(0, 1/fan_in), biases N(0, 0.02^2), LN (1, 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ln" in name.split(".")[0]:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def transformer(outer_norm: bool, seed: int = 2, d: int = 128, heads: int = 4, t: int = 32,
                b: int = 64) -> Problem:
    """(c)/(d) f(z) = [LN_out](Block(z + x)), pre-norm block, MLP 4x with GELU."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # no default init: it would draw from the global RNG
        block = PreNormBlock(d, heads, outer_norm)
    block = _init_from(block.to_empty(device="cpu"), g).eval()
    x = torch.randn(b, t, d, generator=g, dtype=DTYPE)

    def f(z, idx=None):
        return block(z + _rows(x, idx))

    key, what = ("c", "with outer LayerNorm") if outer_norm else ("d", "without outer LayerNorm")
    return Problem(key, f"({key}) pre-norm transformer block {what}, d={d}, heads={heads}, "
                   f"T={t}, B={b}", f, torch.zeros(b, t, d, dtype=DTYPE), max_iter=100)


def mixed_tanh_stack(seed: int = 3, d: int = 512, t: int = 16, b: int = 64, depth: int = 4,
                     n_fast: int = 48, fast: float = 0.2, slow: float = 0.97,
                     c_scale: float = 0.3) -> Problem:
    """Halting family on (B, T, d) tokens: f(z) = L_depth(...L_2(tanh(s_b z W_1^T + c_b))),
    L_k(h) = tanh(h W_k^T), every W_k orthogonal.

    Sample b's map is s_b-Lipschitz (s_b = `fast` for the first `n_fast` samples, `slow` for
    the rest) and, with small c, nearly that slow: tanh is close to the identity there.
    s is a (B, 1, 1) factor so f(z, idx) can select rows. Depth and T make f cost
    depth * T * d^2 multiply-adds per sample, so f dominates the solver's own work.
    """
    g = torch.Generator().manual_seed(seed)
    ws = [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))[0] for _ in range(depth)]
    c = c_scale * torch.randn(b, t, d, generator=g, dtype=DTYPE)
    s = torch.full((b, 1, 1), slow, dtype=DTYPE)
    s[:n_fast] = fast

    def f(z, idx=None):
        h = torch.tanh(_rows(s, idx) * (z @ ws[0].T) + _rows(c, idx))
        for w in ws[1:]:
            h = torch.tanh(h @ w.T)
        return h

    return Problem("halt", f"halting: {depth}-layer orthogonal tanh stack on (B={b}, T={t}, "
                   f"d={d}), per-sample Lipschitz {fast} ({n_fast} samples) / {slow} "
                   f"({b - n_fast} samples)", f, torch.zeros(b, t, d, dtype=DTYPE), max_iter=300)


# --------------------------------------------------------------------------------------------
# Solvers: one table of specs, one function that runs any of them.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverSpec:
    label: str
    lib: str  # "ours" | "torchdeq"
    method: str
    options: dict = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.lib == "ours"


SPECS = (
    SolverSpec("ours fixed_point_iter", "ours", "fixed_point_iter"),
    SolverSpec("ours anderson", "ours", "anderson"),
    SolverSpec("ours anderson restarts unlimited", "ours", "anderson", {"max_restarts": None}),
    SolverSpec("ours broyden", "ours", "broyden"),
    SolverSpec("torchdeq fixed_point_iter", "torchdeq", "fixed_point_iter"),
    SolverSpec("torchdeq anderson", "torchdeq", "anderson"),
    SolverSpec("torchdeq anderson lam=1e-8", "torchdeq", "anderson", {"lam": 1e-8}),
    SolverSpec("torchdeq broyden", "torchdeq", "broyden"),
)
SPEC = {s.label: s for s in SPECS}


@dataclass
class Solved:
    z: Tensor
    status: str  # ours: SolverResult.status name with per-sample counts; torchdeq: "-"


def run_solver(spec: SolverSpec, f: Callable, z0: Tensor, tol: float, max_iter: int,
               subbatch: bool = False) -> Solved:
    if spec.ours:
        res = solvers.solve(f, z0, method=spec.method, tol=tol, max_iter=max_iter,
                            stop_mode="rel", subbatch=subbatch, **spec.options)
        counts = f"conv {int(res.converged.sum())}, div {int(res.diverged.sum())}"
        return Solved(res.z, f"{res.status.name} ({counts})")
    z, _, _ = tdsolver.get_solver(spec.method)(f, z0, max_iter=max_iter, tol=tol,
                                                stop_mode="rel", **spec.options)
    return Solved(z, "-")


class CountedF:
    """Wraps f: counts calls and rows passed, and accumulates the time spent inside f."""

    def __init__(self, f: Callable):
        self.f = f
        self.reset()

    def reset(self) -> None:
        self.calls, self.rows, self.seconds = 0, 0, 0.0

    def __call__(self, z: Tensor, *idx: Tensor) -> Tensor:
        t0 = time.perf_counter()
        out = self.f(z, *idx)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += z.shape[0]
        return out


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def quality(f: Callable, z: Tensor) -> dict:
    """Per-sample rel residual of the returned z, recomputed with one (uncounted) call of f."""
    fz = f(z).flatten(1)
    zf = z.flatten(1)
    r = (fz - zf).norm(dim=1) / fz.norm(dim=1).clamp_min(torch.finfo(fz.dtype).tiny)
    out = {f"ok@{t:g}": float((r < t).float().mean()) for t in CHECK_TOLS}
    out["max_rel_res"] = float(r.max())
    out["max_znorm"] = float(zf.norm(dim=1).max())
    return out


def measure(spec: SolverSpec, prob: Problem, tol: float, repeats: int, warmup: int,
            subbatch: bool = False) -> dict:
    """Time `spec` on `prob` (median of `repeats` after `warmup`), count f, check the result."""
    max_iter = prob.max_iter
    fc = CountedF(prob.f)
    row = {"problem": prob.key, "solver": spec.label, "tol": tol, "max_iter": max_iter,
           "subbatch": subbatch}
    walls, in_f = [], []
    for i in range(warmup + repeats):
        fc.reset()
        t0 = time.perf_counter()
        try:
            out = run_solver(spec, fc, prob.z0, tol, max_iter, subbatch)
        except Exception as e:  # reported as a row, e.g. torchdeq's singular-matrix error
            return {**row, "evals": fc.calls, "error": f"{type(e).__name__}: {_first_line(e)}"}
        wall = time.perf_counter() - t0
        if i >= warmup:
            walls.append(wall)
            in_f.append(fc.seconds)
    b = prob.z0.shape[0]
    wall = statistics.median(walls)
    overhead = statistics.median(w - s for w, s in zip(walls, in_f))
    return {
        **row,
        "evals": fc.calls,
        "f_rows": fc.rows,
        "batch_equiv_evals": fc.rows / b,
        "wall_ms": 1e3 * wall,
        "in_f_ms": 1e3 * statistics.median(in_f),
        "overhead_ms": 1e3 * overhead,
        "overhead_pct": 100 * overhead / wall,
        "walls_ms": [1e3 * w for w in walls],
        "status": out.status,
        **quality(prob.f, out.z),
    }


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:90] if lines else ""




def broyden_memory(prob: Problem, tol: float) -> list[dict]:
    """Measured peak allocation of each Broyden solve on `prob`, next to its history size."""
    b, d = prob.z0.shape[0], prob.z0[0].numel()
    m = inspect.signature(solvers.broyden).parameters["m"].default
    history = {  # two (B, rank, D) float32 buffers each: ours U, V; torchdeq Us, VTs
        "ours broyden": 2 * b * m * d * 4,
        "torchdeq broyden": 2 * b * prob.max_iter * d * 4,
    }
    f_alone = peak_alloc_bytes(lambda: prob.f(prob.z0))
    rows = []
    for label, hist in history.items():
        spec = SPEC[label]
        peak = peak_alloc_bytes(lambda: run_solver(spec, prob.f, prob.z0, tol, prob.max_iter))
        rows.append({"problem": prob.key, "solver": label, "tol": tol, "max_iter": prob.max_iter,
                     "peak_alloc_MiB": peak / 2**20, "history_computed_MiB": hist / 2**20,
                     "one_f_call_peak_MiB": f_alone / 2**20})
    return rows


HALT_SOLVERS = ("anderson", "fixed_point_iter")
HALT_MODES = (  # (label, spec prefix, subbatch)
    ("ours subbatch", "ours", True),
    ("ours whole batch", "ours", False),
    ("torchdeq", "torchdeq", False),
)


def halting(prob: Problem, tol: float, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for method in HALT_SOLVERS:
        for mode, lib, subbatch in HALT_MODES:
            r = measure(SPEC[f"{lib} {method}"], prob, tol, repeats, warmup, subbatch=subbatch)
            rows.append({**r, "method": method, "mode": mode})
        base = next(r for r in rows if r["method"] == method and r["mode"] == "ours whole batch")
        for r in rows[-len(HALT_MODES):]:
            r["wall_ratio_vs_whole"] = r.get("wall_ms", math.nan) / base.get("wall_ms", math.nan)
    return rows


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def _find(rows: list[dict], problem: str, solver: str, tol: float) -> dict:
    for r in rows:
        if r["problem"] == problem and r["solver"] == solver and r["tol"] == tol:
            return r
    return {}


def _target(name: str, value: float, limit: float, fmt: str = "{:.3g}") -> dict:
    ok = value <= limit if math.isfinite(value) and math.isfinite(limit) else None
    return {"target": name, "value": value, "limit": limit, "pass": ok,
            "text": f"{fmt.format(value)} <= {fmt.format(limit)}"}


def targets(rows: list[dict], halt_rows: list[dict]) -> list[dict]:
    nan = math.nan
    out = []

    def get(problem: str, solver: str, tol: float, key: str) -> float:
        return _find(rows, problem, solver, tol).get(key, nan)

    if _find(rows, "c", "ours anderson", 1e-6):
        td = [r for r in rows if r["problem"] == "c" and r["tol"] == 1e-6
              and r["solver"].startswith("torchdeq") and r.get("ok@1e-06") == 1.0]
        best = min((r["evals"] for r in td), default=nan)
        out.append(_target("(c)@1e-6 ours anderson evals <= min evals of torchdeq reaching tol",
                           get("c", "ours anderson", 1e-6, "evals"), best, "{:.0f}"))
        out.append(_target("(c)@1e-6 ours anderson wall <= 0.5 x torchdeq anderson wall",
                           get("c", "ours anderson", 1e-6, "wall_ms"),
                           0.5 * get("c", "torchdeq anderson", 1e-6, "wall_ms"), "{:.1f} ms"))
        out.append(_target("(c)@1e-6 ours anderson overhead <= 15% of wall",
                           get("c", "ours anderson", 1e-6, "overhead_pct"), 15.0, "{:.1f}%"))
    if _find(rows, "b", "ours anderson", 1e-6):
        out.append(_target("(b)@1e-6 ours anderson evals <= 94",
                           get("b", "ours anderson", 1e-6, "evals"), 94, "{:.0f}"))
        out.append(_target("(b)@1e-6 ours broyden evals <= 43",
                           get("b", "ours broyden", 1e-6, "evals"), 43, "{:.0f}"))
        out.append(_target("(b)@1e-6 ours broyden wall <= 0.5 x torchdeq broyden wall",
                           get("b", "ours broyden", 1e-6, "wall_ms"),
                           0.5 * get("b", "torchdeq broyden", 1e-6, "wall_ms"), "{:.1f} ms"))
    ours_d = [r for r in rows if r["problem"] == "d" and r["solver"].startswith("ours")]
    if ours_d:
        errors = [f"{r['solver']}@{r['tol']:g}: {r['error']}" for r in ours_d if "error" in r]
        statuses = [f"{r['solver'].split()[1]}@{r['tol']:g}={r['status']}" for r in ours_d
                    if "status" in r]
        out.append({"target": "(d) no exception from ours, status reported",
                    "value": len(errors), "limit": 0, "pass": not errors,
                    "text": "; ".join(errors) if errors else ", ".join(statuses)})
    for method in HALT_SOLVERS:
        r = next((r for r in halt_rows if r["method"] == method and r["mode"] == "ours subbatch"),
                 None)
        if r is not None:
            out.append(_target(f"halting ({method}) subbatch wall <= 0.6 x whole-batch wall",
                               r["wall_ratio_vs_whole"], 0.6, "{:.2f}x"))
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _num(x, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["solver"], f"{r['tol']:g}", str(r["evals"])] + ["-"] * 8 + [r["error"]]
    return [
        r["solver"], f"{r['tol']:g}", str(r["evals"]), _num(r["batch_equiv_evals"], "{:.1f}"),
        _num(r["wall_ms"], "{:.1f}"), _num(r["in_f_ms"], "{:.1f}"),
        _num(r["overhead_pct"], "{:.0f}%"), _num(r["ok@0.0001"], "{:.2f}"),
        _num(r["ok@1e-06"], "{:.2f}"), _num(r["max_znorm"], "{:.3g}"),
        _num(r["max_rel_res"], "{:.1e}"), r["status"],
    ]


MAIN_COLS = ["solver", "tol", "evals", "batch-eq evals", "wall ms", "in-f ms", "overhead",
             "ok@1e-4", "ok@1e-6", "max||z||", "max rel res", "status/error"]
HALT_COLS = ["solver", "mode", "evals", "f rows", "batch-eq evals", "wall ms", "in-f ms",
             "in-f %", "ok@1e-4", "ok@1e-6", "wall / whole", "status/error"]
MEM_COLS = ["solver", "max_iter", "peak alloc MiB (measured)", "history MiB (computed)",
            "one f call MiB"]
TARGET_COLS = ["target", "measured", "result"]


def _halt_cells(r: dict) -> list[str]:
    head = [r["method"], r["mode"], str(r["evals"])]
    if "error" in r:
        return head + ["-"] * 8 + [r["error"]]
    return head + [
        str(r["f_rows"]), _num(r["batch_equiv_evals"], "{:.1f}"), _num(r["wall_ms"], "{:.1f}"),
        _num(r["in_f_ms"], "{:.1f}"), _num(100 - r["overhead_pct"], "{:.0f}%"),
        _num(r["ok@0.0001"], "{:.2f}"), _num(r["ok@1e-06"], "{:.2f}"),
        _num(r["wall_ratio_vs_whole"], "{:.2f}"), r["status"],
    ]


def _mem_cells(r: dict) -> list[str]:
    return [r["solver"], str(r["max_iter"]), f"{r['peak_alloc_MiB']:.2f}",
            f"{r['history_computed_MiB']:.2f}", f"{r['one_f_call_peak_MiB']:.2f}"]


def _target_cells(t: dict) -> list[str]:
    verdict = {True: "PASS", False: "MISS", None: "N/A"}[t["pass"]]
    return [t["target"], t["text"], verdict]


def print_table(title: str, cols: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for c in cols:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*r)
        Console(width=200).print(table)
    except Exception:  # plain text fallback
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 timing repeat, fewer configs")
    ap.add_argument("--json", type=Path, help="write every number to this file")
    args = ap.parse_args(argv)

    repeats, warmup = (1, 1) if args.quick else (5, 1)
    tols = (1e-6,) if args.quick else TOLS
    halt_tol = 1e-6
    t_start = time.perf_counter()

    problems = [tanh_layer(), hard_map(), transformer(outer_norm=True),
                transformer(outer_norm=False), expanding_map()]
    halt_prob = mixed_tanh_stack()
    load_start = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"stop_mode=rel, timing: median of {repeats} after {warmup} warm-up; "
          f"load average at start {load_start[0]:.2f}")

    rows: list[dict] = []
    with torch.no_grad():
        for prob in problems:
            prob_rows = [measure(spec, prob, tol, repeats, warmup)
                         for tol in tols for spec in SPECS]
            rows += prob_rows
            print_table(f"{prob.title}; max_iter={prob.max_iter}", MAIN_COLS,
                        [_cells(r) for r in prob_rows])

        hard = next(p for p in problems if p.key == "b")
        mem_rows = broyden_memory(hard, 1e-6)
        print_table(f"Broyden memory on (b), tol 1e-6 (peak bytes allocated during the solve, "
                    f"torch.profiler; includes f's temporaries)", MEM_COLS,
                    [_mem_cells(r) for r in mem_rows])

        halt_rows = halting(halt_prob, halt_tol, repeats, warmup)
        print_table(f"{halt_prob.title}; rel tol {halt_tol:g}, max_iter={halt_prob.max_iter}",
                    HALT_COLS, [_halt_cells(r) for r in halt_rows])

    tgt = targets(rows, halt_rows)
    print_table("Targets", TARGET_COLS, [_target_cells(t) for t in tgt])
    total = time.perf_counter() - t_start
    load_end = os.getloadavg()
    print(f"total run time {total:.1f} s; load average at end {load_end[0]:.2f} "
          f"(timings are only meaningful on an otherwise idle machine)")

    if args.json:
        report = {
            "config": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "dtype": str(DTYPE), "repeats": repeats, "warmup": warmup,
                       "tols": tols, "halt_tol": halt_tol, "quick": args.quick,
                       "specs": [asdict(s) for s in SPECS],
                       "problems": {p.key: {"title": p.title, "max_iter": p.max_iter}
                                    for p in problems + [halt_prob]}},
            "results": rows, "broyden_memory": mem_rows, "halting": halt_rows,
            "targets": tgt, "total_seconds": total,
            "load_average": {"start": load_start, "end": load_end},
        }
        args.json.write_text(json.dumps(_jsonable(report), indent=1))
        print(f"wrote {args.json}")


def _jsonable(x):
    """Strict JSON: nan/inf become null, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


if __name__ == "__main__":
    main()
