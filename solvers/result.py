"""The value every solver returns: `SolverResult`, and its `Status`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor


class Status(enum.Enum):
    """Outcome of a solve for the whole batch; each member carries a readable message."""

    CONVERGED = "every sample reached the tolerance"
    MAX_ITER = "some samples did not reach the tolerance within max_iter evaluations"
    DIVERGED = "some samples diverged (their norm or residual blew up)"
    NONFINITE = "some samples produced non-finite values (nan or inf)"

    @property
    def message(self) -> str:
        return self.value


class SolverError(RuntimeError):
    """Raised by `SolverResult.raise_for_status` when a solve did not converge."""


@dataclass(frozen=True)
class SolverResult:
    """A fixed-point solve, per sample.

    Shapes: B is the batch size, K the number of evaluations of `f` the solve made.

    z:            (B, ...) the best iterate of each sample (lowest residual in `stop_mode`).
    converged:    (B,) bool, the residual of `z` is below `tol`.
    diverged:     (B,) bool, the sample stopped because it blew up or became non-finite.
    nonfinite:    (B,) bool, subset of `diverged`: a nan or inf appeared.
    n_steps:      (B,) int64, evaluations of `f` made on this sample before it stopped.
    abs_residual: (B,) ||f(z) - z|| of the returned `z`.
    rel_residual: (B,) ||f(z) - z|| / ||f(z)|| of the returned `z`.
    trace:        (B, K) residual in `stop_mode` of each evaluated iterate; nan once the
                  sample has stopped, so `trace[b, :n_steps[b]]` is the sample's history.
    n_f_evals:    calls of `f`.
    n_f_rows:     samples passed to `f`, summed over calls (equals B * n_f_evals unless
                  the solve evaluated only the still-active samples).
    snapshots:    {k: the result this solve would have returned with max_iter=k} for each
                  budget k the `snapshots` option asked for (empty otherwise): one solve
                  read at several budgets, as an accuracy-against-budget curve needs.
    """

    z: Tensor
    converged: Tensor
    diverged: Tensor
    nonfinite: Tensor
    n_steps: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    trace: Tensor
    n_f_evals: int
    n_f_rows: int
    stop_mode: str
    tol: float
    solver: str
    snapshots: dict[int, SolverResult] = field(default_factory=dict)

    @property
    def residual(self) -> Tensor:
        """(B,) the residual of `z` in the solve's `stop_mode`."""
        return self.rel_residual if self.stop_mode == "rel" else self.abs_residual

    @property
    def status(self) -> Status:
        if bool(self.nonfinite.any()):
            return Status.NONFINITE
        if bool(self.diverged.any()):
            return Status.DIVERGED
        if bool(self.converged.all()):
            return Status.CONVERGED
        return Status.MAX_ITER

    @property
    def message(self) -> str:
        """One line: what happened, with counts and the worst residual."""
        b = self.converged.numel()
        n_conv = int(self.converged.sum())
        parts = [f"{self.solver}: {n_conv}/{b} samples converged to {self.stop_mode} tol {self.tol:g}"]
        n_div = int(self.diverged.sum())
        n_nan = int(self.nonfinite.sum())
        if n_nan:
            parts.append(f"{n_nan} hit non-finite values")
        if n_div - n_nan:
            parts.append(f"{n_div - n_nan} diverged")
        n_max = b - n_conv - n_div
        if n_max:
            parts.append(f"{n_max} stopped at max_iter")
        finite = self.residual[torch.isfinite(self.residual)]
        if finite.numel():
            parts.append(f"worst residual {float(finite.max()):.3g}")
        parts.append(f"{self.n_f_evals} evaluations of f")
        return f"{self.status.name}: " + ", ".join(parts)

    def raise_for_status(self) -> SolverResult:
        """Return self if every sample converged, else raise `SolverError` with the message."""
        if self.status is not Status.CONVERGED:
            raise SolverError(self.message)
        return self
