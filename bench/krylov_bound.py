#!/usr/bin/env python
"""How much faster than plain iteration any f-only Krylov solver can be on a trained loop, near z*.

    python bench/krylov_bound.py chess sudoku prefix_sums             # shipped models, by name
    python bench/krylov_bound.py chess:1,3 sudoku:0,2 prefix_sums:64 --json bench/results/krylov_bound.json

Near the fixed point the loop is linear: z_{k+1} - z* = J (z_k - z*), J = df/dz at z*. There,
plain iteration's k-th iterate, Anderson's at any memory, damping and regularization (one set of
coefficients a sample: per-block mixing, block_size, is outside this family), and Broyden's from a
scalar initial Jacobian all lie in z0 + K_k(I - J, r0), the Krylov space of the
first residual r0 = f(z0) - z0, one product with J per evaluation of f. GMRES takes the iterate
of least residual in that space, so no such solver needs fewer evaluations than GMRES needs
products to bring ||f(z) - z|| under tol * ||z*|| (the relative stopping rule of deqloop's
solvers). Anderson with unlimited memory is GMRES on a linear problem (Walker & Ni 2011), so the
ratio of GMRES's count to plain iteration's is the best acceleration the linear regime allows;
a solver may still gain or lose on the nonlinear way in, which the last columns show.

Per checkpoint and difficulty, on the fixed test set (deqloop.evaluate.test_set): each sample is
solved plainly to a tight tolerance (--z-tol) for z*; samples that do not get there are counted
and left out. At z*, per sample, from e0 = z0 - z* (the model's own start): plain iteration's
linear residuals ||J^k r0|| and GMRES's (batched Arnoldi on J u, a double-vjp product,
deqloop.krylov.Linearization; two Gram-Schmidt passes). Columns: "plain lin" and "gmres", the
products each needs to reach the tolerance (a sample that never does within --krylov products
counts --krylov + 1; "capped" says how many did not); "ratio", their quotient (means over
samples, and the median of the per-sample quotients); the median spectral radius of the Arnoldi
matrix (its Ritz values); and, for comparison, the evaluations that plain iteration and the
default Anderson really took from z0 at the checkpoint's tolerance (budget --z-iter). Writes a
plot of the median residual curves and the Ritz values (--plot) and every number (--json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import solvers  # noqa: E402
from bench._checkpoints import load_specs  # noqa: E402
from deqloop.evaluate import test_set  # noqa: E402
from deqloop.krylov import Linearization  # noqa: E402


def _dot(a: Tensor, b: Tensor) -> Tensor:  # per-sample inner product of (B, D) rows, in float64
    return (a.double() * b.double()).sum(dim=1)


def arnoldi(jv, r0: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k steps of Arnoldi on J from r0, per sample: H (B, k+1, k) with J V_k = V_{k+1} H, and beta
    (B,) = ||r0||. Rows are independent; a row whose space is exhausted gets zero columns."""
    b = r0.shape[0]
    beta = r0.double().norm(dim=1)
    v = [(r0.double() / beta.clamp_min(1e-300)[:, None]).to(r0.dtype)]
    h = torch.zeros(b, k + 1, k, dtype=torch.float64)
    for j in range(k):
        w = jv(v[j]).double()
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to float32 rounding
            for i, vi in enumerate(v):
                c = _dot(w, vi)
                h[:, i, j] += c
                w = w - c[:, None] * vi.double()
        nrm = w.norm(dim=1)
        h[:, j + 1, j] = nrm
        v.append((w / nrm.clamp_min(1e-300)[:, None]).to(r0.dtype))
    return h.numpy(), beta.numpy()


def gmres_residuals(h: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(B, k+1): GMRES's least residual norm on (I - J) e = r0 after 0..k products."""
    b, kp1, k = h.shape
    out = np.empty((b, kp1))
    out[:, 0] = beta
    for s in range(b):
        a = np.eye(kp1, k) - h[s]  # (I - J) V_j = V_{j+1} (I_bar - H_bar)
        rhs = np.zeros(kp1)
        rhs[0] = beta[s]
        for j in range(1, kp1):
            y, *_ = np.linalg.lstsq(a[: j + 1, :j], rhs[: j + 1], rcond=None)
            out[s, j] = np.linalg.norm(rhs[: j + 1] - a[: j + 1, :j] @ y)
    return out


def power_residuals(h: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(B, k+1): plain iteration's residual norms ||J^j r0||, j = 0..k, read from the Arnoldi matrix
    (J^j r0 = beta V_{j+1} H_j ... H_1 e_1 with V orthonormal), so they cost no product with J."""
    b, kp1, k = h.shape
    y = np.zeros((b, kp1))
    y[:, 0] = beta
    out = np.empty((b, kp1))
    out[:, 0] = beta
    for j in range(k):
        y = np.einsum("bij,bj->bi", h[:, :, : j + 1], y[:, : j + 1])  # H is upper Hessenberg
        out[:, j + 1] = np.linalg.norm(y, axis=1)
    return out


def first_below(curves: np.ndarray, thresh: np.ndarray) -> np.ndarray:
    """Per row, the first index at which the curve is at most thresh (the length if never)."""
    below = curves <= thresh[:, None]
    return np.where(below.any(axis=1), below.argmax(axis=1), curves.shape[1])


def bound_one(model, task, batch, *, tol: float, z_tol: float, z_iter: int, k: int) -> dict:
    x = model.embed_input(batch.inputs)
    z0 = model.z_init(x)
    cell = model.cell(x)
    tight = solvers.solve(cell, z0, method="fixed_point_iter", tol=z_tol, max_iter=z_iter, stop_mode="rel",
                          subbatch=True)
    below = tight.trace < tol  # plain iteration at tol is the head of the tight solve: read it off its trace
    real = {"fixed_point_iter": (torch.where(below.any(dim=1), below.int().argmax(dim=1) + 1, z_iter).double(),
                                 below.any(dim=1))}
    res = solvers.solve(cell, z0, method="anderson", tol=tol, max_iter=z_iter, stop_mode="rel", subbatch=True)
    real["anderson"] = (res.n_steps.double(), res.converged)
    keep = tight.converged
    n_kept = int(keep.sum())
    row = {"n": int(keep.numel()), "n_used": n_kept}
    if n_kept == 0:
        return row
    idx = keep.nonzero().squeeze(1)
    zs, xs, e0 = tight.z[idx], x[idx], (z0 - tight.z)[idx]
    lin = Linearization(lambda z, xx: model.f(z, xx), xs, zs)
    shape = zs.shape

    def jv(u: Tensor) -> Tensor:
        return lin.jvp(u.reshape(shape)).reshape(u.shape)

    flat = e0.reshape(n_kept, -1)
    r0 = jv(flat) - flat  # the linear model's first residual (J - I) e0
    h, beta = arnoldi(jv, r0, k)
    plain, gm = power_residuals(h, beta), gmres_residuals(h, beta)  # plain iteration's: ||J^j r0||
    thresh = tol * zs.reshape(n_kept, -1).double().norm(dim=1).numpy()
    k_plain, k_gm = first_below(plain, thresh), first_below(gm, thresh)
    ritz = [np.linalg.eigvals(h[s, :k, :k]) for s in range(n_kept)]
    per = k_gm / np.maximum(k_plain, 1)
    row.update({
        "plain_lin": float(k_plain.mean()), "gmres": float(k_gm.mean()),
        "ratio": float(k_gm.sum() / max(k_plain.sum(), 1)), "ratio_median": float(np.median(per)),
        "capped": int((k_plain >= k + 1).sum() + (k_gm >= k + 1).sum()),
        "ritz_radius_median": float(np.median([np.abs(r).max() for r in ritz])),
        "plain_real": float(real["fixed_point_iter"][0][idx].mean()),
        "anderson_real": float(real["anderson"][0][idx].mean()),
        "plain_real_all": float(real["fixed_point_iter"][0].mean()),
        "plain_conv_all": float(real["fixed_point_iter"][1].double().mean()),
        "curves": {"plain": np.median(plain / thresh[:, None], axis=0).tolist(),  # 1: the stopping rule
                   "gmres": np.median(gm / thresh[:, None], axis=0).tolist()},
        "ritz": [[float(v.real), float(v.imag)] for v in ritz[0]],
    })
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if "curves" in r]
    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 6.0), squeeze=False)
    for c, r in enumerate(rows):
        ax = axes[0, c]
        for name, style in (("plain", "-"), ("gmres", "--")):
            ax.semilogy(r["curves"][name], style, label="plain (linear)" if name == "plain" else "GMRES bound")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_ylim(1e-3, None)
        ax.set_xlim(0, 2.5 * max(r["plain_lin"], r["gmres"]))
        ax.set_title(f"{r['task']} d={r['difficulty']}: {r['ratio']:.2f}x", fontsize=9)
        ax.set_xlabel("products with J (= evaluations of f)", fontsize=8)
        if c == 0:
            ax.set_ylabel("median ||f(z_k) - z_k|| / (tol ||z*||)")
            ax.legend(fontsize=7)
        ax = axes[1, c]
        z = np.array(r["ritz"])
        t = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(t), np.sin(t), color="grey", lw=0.5)
        ax.scatter(z[:, 0], z[:, 1], s=6)
        ax.set_aspect("equal")
        ax.set_title("Ritz values of J, sample 0", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT[:D,D]",
                   help="checkpoint paths or shipped model names, each with its own difficulties after a colon")
    p.add_argument("--difficulties", help="comma-separated, for a checkpoint given without its own (default: the "
                                          "run's test difficulties)")
    p.add_argument("--n", type=int, default=32, help="test examples per difficulty (default: 32)")
    p.add_argument("--krylov", type=int, default=60, help="products with J per sample (default: 60)")
    p.add_argument("--tol", type=float, help="relative tolerance (default: the checkpoint's)")
    p.add_argument("--z-tol", type=float, default=1e-5, help="tolerance of the z* solve (default: 1e-5)")
    p.add_argument("--z-iter", type=int, default=1000, help="budget of the z* solve (default: 1000)")
    p.add_argument("--json", type=Path, help="write every row here")
    p.add_argument("--plot", type=Path, help="write the residual curves and Ritz values here (PNG)")
    args = p.parse_args(argv)
    rows = []
    for run in load_specs(args.checkpoints, args.difficulties):
        name, model, task = run.name, run.model, run.task
        tol = args.tol or run.solve.tol
        for d in run.difficulties:
            batch = test_set(task, d, args.n)
            with torch.no_grad():
                row = bound_one(model, task, batch, tol=tol, z_tol=args.z_tol, z_iter=args.z_iter, k=args.krylov)
            row = {"checkpoint": name, "task": task.name, "difficulty": d, "tol": tol, **row}
            rows.append(row)
            if "gmres" not in row:
                print(f"{name:>12} d={d:<4} no sample reached z-tol {args.z_tol}", flush=True)
                continue
            print(f"{name:>12} d={d:<4} used {row['n_used']:3d}/{row['n']:<3d} plain lin {row['plain_lin']:6.1f}  "
                  f"gmres {row['gmres']:6.1f}  ratio {row['ratio']:.2f} (median {row['ratio_median']:.2f})  "
                  f"ritz radius {row['ritz_radius_median']:.3f}  capped {row['capped']}  | real from z0: "
                  f"plain {row['plain_real']:6.1f}  anderson {row['anderson_real']:6.1f}  "
                  f"(plain on all: {row['plain_real_all']:.1f}, {row['plain_conv_all']:.0%} converged)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n": args.n, "krylov": args.krylov, "rows": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
