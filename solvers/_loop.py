"""The one solver loop, and the per-sample bookkeeping every solver shares.

A solver is a `Step`: given the point z just evaluated, f(z), the residual g = f(z) - z and
its `State`, it returns the next point to evaluate. `iterate` runs the loop around it:

    z = z0
    repeat:  f(z), g  = evaluate f on the active samples      (Loop.__call__: scores z)
             retire the samples that stopped                  (Loop.drop: converged, diverged, max_iter)
             compact z, f(z), g and the state's rows to the samples left
             z = step(z, f(z), g, state)

A solver keeps its memory (history, Jacobian estimate) for the *active* samples only, as rows
of (n, ...) tensors in `State.rows`, which the loop compacts; so a solver never sees a sample
that has stopped, and writes no bookkeeping of its own.

Nothing a solver does depends on max_iter, so the solve with max_iter = k is this loop's first k
evaluations; the `snapshots` option reads the result at such budgets k along one longer solve.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, TypedDict

import torch
from torch import Tensor

from .result import SolverResult

STOP_MODES = ("abs", "rel")


class LoopOptions(TypedDict, total=False):
    """The options every solver takes, besides its own (defaults in LOOP_DEFAULTS)."""

    tol: float  # a sample stops when its residual (in stop_mode) is below this
    max_iter: int  # evaluations of f at most
    stop_mode: str  # "rel": ||f(z) - z|| / ||f(z)||; "abs": ||f(z) - z||
    subbatch: bool  # call f(z, idx) on the active samples only (see Loop)
    divergence_ratio: float  # see Loop
    snapshots: tuple[int, ...]  # budgets k < max_iter to return the max_iter=k result at too (SolverResult.snapshots)


LOOP_DEFAULTS: LoopOptions = {"tol": 1e-3, "max_iter": 50, "stop_mode": "rel", "subbatch": False,
                              "divergence_ratio": 1e4, "snapshots": ()}


@dataclass
class State:
    """A solver's memory between evaluations.

    rows:   tensors with one row per active sample; the loop compacts them as samples stop.
    k:      steps taken so far (the same for every active sample, so ring-buffer slots are shared).
    g_norm: (n,) ||g|| of the point just evaluated, as the loop scored it (set before each step).
    """

    rows: dict[str, Tensor] = field(default_factory=dict)
    k: int = 0
    g_norm: Tensor | None = None


# (z, f(z), g = f(z) - z, state) -> the next z to evaluate; all (n, D) over the active samples
Step = Callable[[Tensor, Tensor, Tensor, State], Tensor]


def check_safeguard(safeguard, max_restarts) -> None:
    """The residual safeguard's options of anderson and broyden: a number > 0 or None, an int >= 0 or None."""
    if safeguard is not None and (isinstance(safeguard, bool) or not isinstance(safeguard, (int, float))
                                  or not safeguard > 0):
        raise ValueError(f"safeguard must be a number > 0 or None, got {safeguard!r}")
    if max_restarts is not None and (isinstance(max_restarts, bool) or not isinstance(max_restarts, int)
                                     or max_restarts < 0):
        raise ValueError(f"max_restarts must be an integer >= 0 or None, got {max_restarts!r}")


def safeguard_rejects(rows: dict, g_norm: Tensor, safeguard: float) -> Tensor:
    """(n,) bool, the residual safeguard of anderson and broyden: the rows whose accelerated step
    (rows["mixed"]) left a residual norm above `safeguard` times that of the iterate it started
    from (rows["g"]), counted in rows["restarts"]. The solver sends them back to rows["z"] and
    keeps rows["g"] for them. g_norm: ||g|| of the new point (State.g_norm, the loop's); rows["g_norm"]
    holds the norm of the residual each row keeps (none before the first call, when no row is
    mixed yet, so the comparison's other side does not matter there)."""
    prev = rows.get("g_norm", g_norm)
    bad = rows["mixed"] & (g_norm > safeguard * prev)
    rows["restarts"] += bad
    rows["g_norm"] = torch.where(bad, prev, g_norm)
    return bad


GATE_WINDOW = 4  # steps over which contraction_gate measures plain iteration's rate


def check_gate(gate) -> None:
    """The contraction gate's option of anderson and broyden: a number in (0, 1) or None."""
    if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate < 1):
        raise ValueError(f"gate must be a number in (0, 1) or None, got {gate!r}")


def contraction_gate(rows: dict, g_norm: Tensor, gate: float) -> Tensor:
    """(n,) bool, the rows allowed to accelerate: those whose residual norm has shrunk by
    gate ** GATE_WINDOW or more over the last GATE_WINDOW evaluations (a per-step rate of at most
    `gate` on average), and every row that did so once (the gate latches open). Before that a
    row's solver takes plain steps. rows["gate_norms"] keeps each row's last GATE_WINDOW
    residual norms, oldest first; rows["gate_open"] the latch."""
    norms = rows.get("gate_norms")
    if norms is None:
        norms = g_norm.new_zeros(g_norm.shape[0], GATE_WINDOW)  # no row opens before GATE_WINDOW norms
        rows["gate_open"] = torch.zeros_like(g_norm, dtype=torch.bool)
    opened = rows["gate_open"] | (g_norm <= gate ** GATE_WINDOW * norms[:, 0])
    rows["gate_norms"] = torch.cat((norms[:, 1:], g_norm[:, None]), dim=1)
    rows["gate_open"] = opened
    return opened


def where_rows(mask: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """torch.where(mask[:, None], a, b) for an (n,) bool mask and (n, D) a, b, into `out` (which
    may be b) or a new tensor.

    On a CPU, where with a broadcast (n, 1) mask runs several times slower than a copy (an
    (64, 4096) float32 pair: about 600 against 75 us), and the solvers take it once or twice an
    evaluation; so there the rows `mask` selects are copied over (which reads the mask on the
    host, free on a CPU). Elsewhere it is torch.where, without a host sync."""
    if out is not None and out is a:  # the copy of b into out would overwrite the rows to take from a
        raise ValueError("where_rows: out may be b or a new tensor, not a")
    if a.device.type != "cpu":
        return torch.where(mask[:, None], a, b, out=out)
    n_true = int(mask.sum())
    if n_true == mask.numel():
        return a.clone() if out is None else out.copy_(a)
    if out is None:
        out = b.clone()
    elif out is not b:
        out.copy_(b)
    if n_true:
        idx = mask.nonzero().squeeze(1)
        out.index_copy_(0, idx, a.index_select(0, idx))
    return out


def take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """t[idx] along the first dimension, as the loop compacts a solver's rows.

    index_select, not t[idx] (3-4x faster on a CPU for the (n, nb, m, bs) histories), and on a
    contiguous tensor of more than two dimensions through its (n, -1) view: on a CPU that is
    another 2.9x for a (64, 1, 5, 4096) float32 history (833 against 287 us, 2 threads)."""
    if t.dim() > 2 and t.is_contiguous():
        return t.view(t.shape[0], -1).index_select(0, idx).view(idx.numel(), *t.shape[1:])
    return t.index_select(0, idx)


def after_plain_steps(step: Step, n: int) -> Step:
    """`step` after n plain steps z <- f(z): its history starts at the n-th iterate (a solver that
    accelerates from where plain iteration has already chosen its basin)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {n!r}")
    if n == 0:
        return step

    def warmed(z: Tensor, fz: Tensor, g: Tensor, state: State) -> Tensor:
        if state.k < n:
            return fz
        # the same rows and norms: compacted by the loop
        return step(z, fz, g, State(rows=state.rows, k=state.k - n, g_norm=state.g_norm))

    return warmed


def bind_input(f: Callable[[Tensor, Tensor], Tensor], x: Tensor) -> Callable[..., Tensor]:
    """f(., x) as a solver calls it: z -> f(z, x), and with subbatch=True (z, idx) -> f(z, x[idx])
    on the active rows only."""
    return lambda z, idx=None: f(z, x if idx is None else x[idx])


def iterate(f: Callable[..., Tensor], z0: Tensor, step: Step, *, solver: str, **options) -> SolverResult:
    """Run `step` from z0 until every sample has stopped; `options` are LoopOptions."""
    unknown = sorted(set(options) - set(LOOP_DEFAULTS))
    if unknown:
        raise TypeError(f"{solver}: unknown option {unknown[0]!r}")
    options = {**LOOP_DEFAULTS, **options}
    snapshot_budgets = options.pop("snapshots")
    loop = Loop(f, z0, solver=solver, **options)  # checks the common options first
    pending = check_snapshots(snapshot_budgets, loop.max_iter)
    state = State()
    z = loop.z0
    snapshots: dict[int, SolverResult] = {}
    while True:
        fz, g = loop(z)
        if pending and loop.n_f_evals == pending[0]:
            # what a solve with max_iter = this budget returns: the same iterates up to here
            snapshots[pending.pop(0)] = loop.result(at_budget=True)
        state.g_norm = loop.g_norm
        keep = loop.drop()
        if loop.done:
            final = loop.result()
            # every sample stopped before the later budgets: a longer budget changes nothing
            snapshots.update((k, final) for k in pending)
            return dataclasses.replace(final, snapshots=snapshots) if snapshots else final
        if keep is not None:
            z, fz, g, state.g_norm = (take_rows(t, keep) for t in (z, fz, g, state.g_norm))
            state.rows = {name: take_rows(row, keep) for name, row in state.rows.items()}
        z = step(z, fz, g, state)
        state.k += 1


def check_snapshots(snapshots, max_iter) -> list[int]:
    """The `snapshots` option as a sorted list of distinct budgets, each in [1, max_iter)."""
    if isinstance(snapshots, (str, bytes)) or not hasattr(snapshots, "__iter__"):
        raise ValueError(f"snapshots must be a sequence of integer budgets, got {snapshots!r}")
    budgets = list(snapshots)
    for k in budgets:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < max_iter:
            raise ValueError(f"snapshots must be integers in [1, max_iter={max_iter}), got {k!r}")
    return sorted(set(budgets))


def check_common(z0: Tensor, tol: float, max_iter: int, stop_mode: str, divergence_ratio: float) -> None:
    """Fail at once, with the offending value, on options every solver shares."""
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() < 1:
        raise ValueError("z0 must have a leading batch dimension, got a 0-d tensor")
    if z0.shape[0] == 0 or z0.numel() == 0:
        raise ValueError(f"z0 must hold at least one sample with at least one element, got shape {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got {z0.dtype}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(divergence_ratio, (int, float)) and divergence_ratio > 1):
        raise ValueError(f"divergence_ratio must be a number > 1, got {divergence_ratio!r}")


class Loop:
    """Evaluate `f` on the active samples and keep score; see the module docstring.

    f:        maps (B, ...) to (B, ...). With `subbatch=True` it is called as `f(z, idx)` on the
              active rows only, `idx` (n,) holding their positions in the original batch, so a
              cell that closes over per-sample inputs can select `x[idx]`.
    divergence_ratio: a sample is declared diverged when its norm exceeds this many times
              max(||z0||, ||f(z0)||), or its absolute residual this many times its first one.
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        z0: Tensor,
        *,
        tol: float,
        max_iter: int,
        stop_mode: str,
        subbatch: bool,
        divergence_ratio: float,
        solver: str,
    ):
        check_common(z0, tol, max_iter, stop_mode, divergence_ratio)
        self.f, self.tol, self.max_iter, self.stop_mode = f, float(tol), max_iter, stop_mode
        self.subbatch, self.divergence_ratio, self.solver = subbatch, float(divergence_ratio), solver
        self.shape = z0.shape
        b = z0.shape[0]
        z0 = z0.detach().reshape(b, -1)  # (B, D)
        dev = z0.device
        self.z0 = z0
        self.active = torch.arange(b, device=dev)  # (n,) positions of the active rows
        self.best_z = z0.clone()
        self.best = torch.full((b,), math.inf, dtype=z0.dtype, device=dev)  # residual in stop_mode
        self.best_abs = torch.full_like(self.best, math.inf)
        self.best_rel = torch.full_like(self.best, math.inf)
        self.n_steps = torch.zeros(b, dtype=torch.long, device=dev)
        self.converged = torch.zeros(b, dtype=torch.bool, device=dev)
        self.diverged = torch.zeros_like(self.converged)
        self.nonfinite = torch.zeros_like(self.converged)
        self.scale = torch.zeros_like(self.best)  # max(||z0||, ||f(z0)||)
        self.abs0 = torch.zeros_like(self.best)  # first absolute residual
        self.trace: list[Tensor] = []
        self.n_f_evals = 0
        self.n_f_rows = 0
        # Without sub-batching f sees the whole batch; stopped rows sit at their best iterate.
        self._full = None if subbatch else z0.clone()
        self._stop: Tensor | None = None
        self.g_norm: Tensor | None = None  # ||f(z) - z|| of the rows last evaluated

    @property
    def done(self) -> bool:
        return self.active.numel() == 0

    @torch.no_grad()  # solvers never build a graph; gradients are attached by solvers.implicit
    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """f(z) and g = f(z) - z on the active rows z (n, D); scores z, marks rows that must stop."""
        n = z.shape[0]
        if self.subbatch:
            fz = self._checked(self.f(z.reshape(n, *self.shape[1:]), self.active), (n, *self.shape[1:]))
            fz = fz.reshape(n, -1)
        elif n == self.shape[0]:
            fz = self._checked(self.f(z.reshape(self.shape)), self.shape).reshape(n, -1)
        else:
            self._full[self.active] = z
            fz = self._checked(self.f(self._full.reshape(self.shape)), self.shape)
            fz = fz.reshape(self.shape[0], -1)[self.active]
        self.n_f_evals += 1
        self.n_f_rows += n if self.subbatch else self.shape[0]
        g = fz - z
        self._score(z, fz, g)
        return fz, g

    def _checked(self, fz, shape) -> Tensor:
        """f's output, which must be a tensor of z's shape (a fixed point maps a space to itself)."""
        if not isinstance(fz, Tensor):
            raise TypeError(f"{self.solver}: f must return a torch.Tensor, got {type(fz).__name__}")
        if fz.shape != shape:
            raise ValueError(f"{self.solver}: f maps a {tuple(shape)} input to shape {tuple(fz.shape)}; "
                             "a fixed-point map must return its input's shape")
        return fz

    def _score(self, z: Tensor, fz: Tensor, g: Tensor) -> None:
        full = z.shape[0] == self.shape[0]  # every sample active: plain tensor ops, no indexing
        act = slice(None) if full else self.active
        fz_norm = fz.norm(dim=1)
        abs_res = g.norm(dim=1)
        self.g_norm = abs_res  # the solver's steps reuse it (State.g_norm)
        rel_res = abs_res / fz_norm.clamp_min(torch.finfo(fz.dtype).tiny)
        rel_res = torch.where(abs_res == 0, torch.zeros_like(rel_res), rel_res)
        res = rel_res if self.stop_mode == "rel" else abs_res
        self.n_steps[act] += 1

        if full:
            self.trace.append(res.clone())
        else:
            row = torch.full((self.shape[0],), math.nan, dtype=res.dtype, device=res.device)
            row[act] = res
            self.trace.append(row)

        if self.n_f_evals == 1:
            self.scale[act] = torch.maximum(z.norm(dim=1), fz_norm)
            self.abs0[act] = abs_res
        better = res < self.best[act]  # nan compares False
        if full:
            where_rows(better, z, self.best_z, out=self.best_z)
            for best, new in ((self.best, res), (self.best_abs, abs_res), (self.best_rel, rel_res)):
                torch.where(better, new, best, out=best)
        else:
            got_better = better.nonzero().squeeze(1)
            upd = act[got_better]
            self.best_z.index_copy_(0, upd, z.index_select(0, got_better))
            self.best[upd] = res[got_better]
            self.best_abs[upd] = abs_res[got_better]
            self.best_rel[upd] = rel_res[got_better]

        nonfinite = ~(torch.isfinite(abs_res) & torch.isfinite(fz_norm))
        scale = self.scale[act]
        # ||f(z)|| stands in for ||z||: within one residual of it, and already computed.
        blew_up = ((scale > 0) & (fz_norm > self.divergence_ratio * scale)) | (
            abs_res > self.divergence_ratio * self.abs0[act]
        )
        div = nonfinite | blew_up  # checked first: a blown-up z can have a tiny relative residual
        conv = (res < self.tol) & ~div
        self.converged[act] = conv
        self.diverged[act] = div
        self.nonfinite[act] = nonfinite
        stop = conv | div
        if self.n_f_evals >= self.max_iter:
            stop = torch.ones_like(stop)
        self._stop = stop

    def drop(self) -> Tensor | None:
        """Retire the rows marked by the last evaluation.

        Returns the positions (into the current active rows) of the rows that stay, for the
        solver to index its own state with, or None when every row stays.
        """
        stop = self._stop
        if stop is None or not bool(stop.any()):
            return None
        keep = (~stop).nonzero().squeeze(1)
        if self._full is not None:
            gone = self.active[stop]
            self._full.index_copy_(0, gone, self.best_z.index_select(0, gone))
        self.active = self.active[keep]
        return keep

    def result(self, at_budget: bool = False) -> SolverResult:
        """The solve so far. at_budget: as if max_iter were reached now, from copies of the
        per-sample tensors (the loop goes on updating its own)."""
        b = self.shape[0]
        trace = torch.stack(self.trace, dim=1) if self.trace else self.best.new_zeros(b, 0)
        own = (self.best_z, self.converged, self.diverged, self.nonfinite, self.n_steps, self.best_abs, self.best_rel)
        best_z, converged, diverged, nonfinite, n_steps, best_abs, best_rel = (
            tuple(t.clone() for t in own) if at_budget else own)
        return SolverResult(
            z=best_z.reshape(self.shape),
            converged=converged,
            diverged=diverged,
            nonfinite=nonfinite,
            n_steps=n_steps,
            abs_residual=best_abs,
            rel_residual=best_rel,
            trace=trace,
            n_f_evals=self.n_f_evals,
            n_f_rows=self.n_f_rows,
            stop_mode=self.stop_mode,
            tol=self.tol,
            solver=self.solver,
        )
