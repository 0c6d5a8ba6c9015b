"""Tables, rank correlations and plots of a grid run by deqloop.grid.

    summary = summarize(spec, "runs/grid")      # plain dict, also written as summary.json
    write_report(spec, summary, "docs/results")  # <task>.md, <task>_accuracy.png, <task>_axes.png

Accuracy terms: "train acc" is the accuracy at the training difficulties (those of the eval
difficulties the task trains on) with the training iteration budget; "harder acc" is the mean
accuracy over the harder eval difficulties at the largest test-time budget: the extrapolation the
paper asks about. A diverged run counts as 0 accuracy in its configuration's mean (it solves
nothing) and is left out of the correlations (it has no checkpoint to diagnose).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from deqloop.grid import GridSpec, cell_dir, load_cell, read_metrics, spec_changes, training_seconds
from deqloop.diagnose_report import DiagnoseReport, DifficultyRow
from deqloop.io import write_json
from deqloop.model import NORMS, RECALLS
from tasks import get_task

# The axes, per diagnosed difficulty: (key, label, where in a diagnose row, transform)
def _distinct(row: DifficultyRow) -> float:
    fp = row.input_dependence.fixed_points
    return fp["n_distinct"] / fp["n_inputs"] if fp.get("n_points") else math.nan  # no fixed point to count


def _log10(v: float) -> float:
    return math.log10(v) if v > 0 and math.isfinite(v) else (math.inf if v == math.inf else math.nan)


# axis key -> (the paper's axis, label, its value in a diagnose row)
AXES = {
    "converged": ("reachability", "reached from z0 (fraction)", lambda r: r.reachability.converged),
    "path_independent": ("reachability", "same z* from random starts (fraction)",
                         lambda r: r.reachability.path_independent),
    "shared": ("input-dependence", "z* shared with another input (fraction)",
               lambda r: r.input_dependence.shared_fixed_points),
    "distinct": ("input-dependence", "distinct fixed points per input", _distinct),
    "sensitivity": ("input-dependence", "median relative sensitivity ||dz*/dx v|| / ||z*||",
                    lambda r: r.input_dependence.relative_median),
    "rho": ("geometry", "spectral radius of J (median)", lambda r: r.geometry.spectral_radius_median),
    "log10_cond": ("geometry", "log10 cond(I - J) (max)", lambda r: _log10(r.geometry.cond_max)),
}


def cell_summary(spec: GridSpec, root: str | Path, recall: str, norm: str, seed: int) -> dict | None:
    """One finished cell: status, accuracies per (difficulty, budget), axes per diagnosed difficulty."""
    cell = load_cell(spec, root, recall, norm, seed)
    if cell is None:
        return None
    out = cell_dir(root, spec.task, recall, norm, seed)
    s = {k: cell.get(k) for k in ("recall", "norm", "seed", "status", "final_loss", "train_acc", "train_seconds",
                                   "eval_seconds", "diagnose_seconds", "error", "diagnose_error", "train_dtype")}
    # from the metrics, not cell.json: cells written before training_seconds counted their last sitting only
    seconds = training_seconds(read_metrics(out / "metrics.jsonl"))
    if seconds is not None:
        s["train_seconds"] = seconds
    s["acc"], s["exact"], s["axes"] = {}, {}, {}
    if cell["status"] != "finished":
        return s
    report = json.loads((out / "eval.json").read_text())
    s["train_max_iter"] = report["train_max_iter"]
    for c in report["cells"]:
        if spec.metric not in c:
            raise KeyError(f"{out / 'eval.json'} has no metric {spec.metric!r}; it has {', '.join(c)}")
        s["acc"].setdefault(str(c["difficulty"]), {})[str(c["max_iter"])] = c[spec.metric]
        s["exact"].setdefault(str(c["difficulty"]), {})[str(c["max_iter"])] = c["acc"]
    if (out / "diagnose.json").exists():
        diag = DiagnoseReport.from_dict(json.loads((out / "diagnose.json").read_text()))
        for row in diag.rows:
            s["axes"][str(row.difficulty)] = {k: float(value(row)) for k, (_, _, value) in AXES.items()}
            s["axes"][str(row.difficulty)]["verdicts"] = row.verdicts
    return s


def summarize(spec: GridSpec, root: str | Path) -> dict:
    """Every finished cell, and per configuration the mean and spread over seeds; rank correlations."""
    from tasks import get_task

    task = get_task(spec.task)
    cells = [c for c in (cell_summary(spec, root, *cell) for cell in spec.cells()) if c is not None]
    finished = [c for c in cells if c["status"] == "finished"]
    difficulties = sorted({int(d) for c in finished for d in c["acc"]})
    iters = sorted({int(k) for c in finished for row in c["acc"].values() for k in row})
    trained = tuple(spec.train.get("train_difficulties") or task.train_difficulties)
    train_d = [d for d in difficulties if d in trained]
    harder = [d for d in difficulties if d not in trained]
    top = str(max(iters)) if iters else None
    for c in cells:
        if c["status"] != "finished":
            c["train_level_acc"] = c["harder_acc"] = 0.0
            continue
        # the training budget, or the first evaluated budget above it (chess trains at 12, evaluates from 16)
        c["train_budget"] = min((k for k in iters if k >= c["train_max_iter"]), default=max(iters))
        k_train = str(c["train_budget"])
        c["train_level_acc"] = _mean([c["acc"][str(d)].get(k_train, math.nan) for d in train_d])
        c["harder_acc"] = _mean([c["acc"][str(d)][top] for d in harder])
        c["exact_harder_acc"] = _mean([c["exact"][str(d)][top] for d in harder])
    configs = []
    for recall in spec.recalls:
        for norm in spec.norms:
            mine = [c for c in cells if c["recall"] == recall and c["norm"] == norm]
            if not mine:
                continue
            ok = [c for c in mine if c["status"] == "finished"]
            row = {"recall": recall, "norm": norm, "n": len(mine), "n_diverged": len(mine) - len(ok),
                   "train_level_acc": _stats([c["train_level_acc"] for c in mine]),
                   "harder_acc": _stats([c["harder_acc"] for c in mine]),
                   "exact_harder_acc": _stats([c.get("exact_harder_acc", 0.0) for c in mine]),
                   "acc": {str(d): {str(k): _stats([c["acc"][str(d)].get(str(k), math.nan) for c in ok] +
                                                   [0.0] * (len(mine) - len(ok)))
                                    for k in iters} for d in difficulties},
                   "axes": {}}
            for d in sorted({d for c in ok for d in c["axes"]}, key=int):
                row["axes"][d] = {k: _stats([c["axes"][d][k] for c in ok if d in c["axes"]]) for k in AXES}
            configs.append(row)
    return {"task": spec.task, "fingerprint": spec.fingerprint(), "settings": spec.settings(), "note": spec.note,
            "metric": spec.metric, "changes": spec_changes(spec),
            "n_cells": len(spec.cells()), "n_done": len(cells), "difficulties": difficulties, "iters": iters,
            "train_difficulties": train_d, "harder_difficulties": harder, "cells": cells, "configs": configs,
            "correlations": correlations(cells)}


def _train_budget_words(summary: dict) -> str:
    """Where the *train* column is read: the training budget, or the first budget above it."""
    pairs = sorted({(c["train_max_iter"], c["train_budget"]) for c in summary["cells"] if "train_budget" in c})
    if all(trained == read for trained, read in pairs):
        return "the training budget"
    return ("the first evaluated budget at or above the training budget ("
            + ", ".join(f"{read} for {trained}" for trained, read in pairs) + ")")


def correlations(cells: list[dict]) -> list[dict]:
    """Spearman's rank correlation of each axis (per diagnosed difficulty) with harder accuracy,
    over the finished, diagnosed cells."""
    from scipy.stats import spearmanr

    rows = []
    diagnosed = [c for c in cells if c["status"] == "finished" and c["axes"]]
    for d in sorted({d for c in diagnosed for d in c["axes"]}, key=int):
        for key in AXES:
            pairs = [(c["axes"][d][key], c["harder_acc"]) for c in diagnosed if d in c["axes"]]
            pairs = [(x, y) for x, y in pairs if not math.isnan(x) and not math.isnan(y)]
            row = {"difficulty": int(d), "axis": key, "n": len(pairs), "rho": math.nan, "p": math.nan}
            xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            if len(pairs) >= 4 and np.ptp(ys) > 0 and np.ptp(np.nan_to_num(xs, posinf=1e300)) > 0:
                res = spearmanr(np.nan_to_num(xs, posinf=1e300), ys)  # ranks: inf is simply the largest
                row["rho"], row["p"] = float(res.statistic), float(res.pvalue)
            rows.append(row)
    return rows


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _stats(values) -> dict:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    a = np.array(values)
    with np.errstate(invalid="ignore"):
        return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                "min": float(a.min()), "max": float(a.max()), "n": len(a)}


# ------------------------------------------------------------------------------------- writing

def _pm(s: dict, pct: bool = True) -> str:
    """'mean ± sd' (percent, or 3 significant digits); the mean alone for a single run."""
    if s["n"] == 0 or math.isnan(s["mean"]):
        return "-"
    if not pct and math.isinf(s["mean"]):
        return "inf"
    fmt = (lambda v: f"{100 * v:.0f}") if pct else (lambda v: f"{v:.3g}")
    return fmt(s["mean"]) + (f" ± {fmt(s['std'])}" if s["n"] > 1 else "")


def write_report(spec: GridSpec, summary: dict, out_dir: str | Path, root_label: str = "runs/grid") -> list[Path]:
    """<task>.md (tables), <task>_accuracy.png, <task>_axes.png and <task>_summary.json in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = summary["task"]
    paths = [out / f"{task}_summary.json"]
    write_json(summary, paths[0])
    if summary["configs"]:
        paths += [plot_accuracy(summary, out / f"{task}_accuracy.png")]
        if any(c["axes"] for c in summary["cells"]):
            paths += [plot_axes(summary, out / f"{task}_axes.png")]
    md = out / f"{task}.md"
    md.write_text(markdown(summary, [p.name for p in paths[1:]]))
    return [md, *paths]


def _flag(change: str) -> str:
    """A spec_changes entry as the grid command's flag: iters=... is --iters, the rest --set."""
    return f" --iters {change.removeprefix('iters=')}" if change.startswith("iters=") else f" --set {change}"


def markdown(summary: dict, figures: list[str]) -> str:
    task, iters = summary["task"], summary["iters"]
    hard = ", ".join(map(str, summary["harder_difficulties"]))
    changes = summary.get("changes") or []  # summaries written before grid --set have none
    metric = ("exact-match accuracy" if summary["metric"] == "acc"
              else f"`{summary['metric']}` (the task's metric; exact accuracy in the column *exact harder*)")
    lines = [f"# Grid: {task}", "",
             f"Written by `python cli.py grid {task}{''.join(_flag(c) for c in changes if '=' in c)}` (or `--report-only`); {summary['n_done']} of {summary['n_cells']} cells "
             f"done (settings fingerprint `{summary['fingerprint']}`).", "",
             f"Size: {summary['note']}" + "".join(f" (budgets here: {c.removeprefix('iters=')}, `--iters`)" for c in changes
                                                 if c.startswith("iters=")) + "." if summary["note"] else "", "",
             *([f"Settings over the grid's: {', '.join(f'`{c}`' for c in changes)}.", ""] if changes else []),
             f"Metric: {metric}. Values in %, mean ± standard deviation over seeds (a diverged run counts as 0; "
             "*div* in the last column). "
             f"*train*: training difficulties {summary['train_difficulties']} at {_train_budget_words(summary)}; "
             f"*harder*: mean over difficulties {hard} at the largest budget ({iters[-1] if iters else '-'} "
             "iterations).", ""]
    exact_col = summary["metric"] != "acc"
    head = (["recall", "norm", "runs", "train", "harder"] + (["exact harder"] if exact_col else [])
            + [f"d={d} @{iters[-1]}" for d in summary["difficulties"]] + ["harder per seed"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in summary["configs"]:
        runs = f"{c['n']}" + (f" ({c['n_diverged']} diverged)" if c["n_diverged"] else "")
        per_d = [_pm(c["acc"][str(d)][str(iters[-1])]) for d in summary["difficulties"]]
        exact = [_pm(c["exact_harder_acc"])] if exact_col else []
        mine = sorted((x for x in summary["cells"] if (x["recall"], x["norm"]) == (c["recall"], c["norm"])),
                      key=lambda x: x["seed"])
        seeds = " / ".join(f"s{x['seed']} " + ("div" if x["status"] == "diverged" else f"{100 * x['harder_acc']:.0f}")
                           for x in mine)
        lines.append("| " + " | ".join([c["recall"], c["norm"], runs, _pm(c["train_level_acc"]),
                                        _pm(c["harder_acc"]), *exact, *per_d, seeds]) + " |")
    lines += ["", "## Accuracy against the test-time budget", "",
              "Mean accuracy (%) over seeds at each budget, per difficulty: `d: acc@k1 / acc@k2 / ...` for "
              f"budgets {' / '.join(map(str, iters))}.", ""]
    lines += ["| recall | norm | " + " | ".join(f"d={d}" for d in summary["difficulties"]) + " |",
              "|---|---|" + "---|" * len(summary["difficulties"])]
    for c in summary["configs"]:
        cols = [" / ".join(_fmt_pct(c["acc"][str(d)][str(k)]["mean"]) for k in iters) for d in summary["difficulties"]]
        lines.append(f"| {c['recall']} | {c['norm']} | " + " | ".join(cols) + " |")
    diag_d = sorted({d for c in summary["configs"] for d in c["axes"]}, key=int)
    if diag_d:
        lines += ["", "## The three axes", "",
                  "Mean ± sd over seeds (a single run: its value), measured by `deqloop.diagnose` on the same checkpoints "
                  "(docs/DIAGNOSE.md), at difficulties " + ", ".join(diag_d) + ".", ""]
        keys = list(AXES)
        lines += ["| recall | norm | d | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
        for c in summary["configs"]:
            for d in diag_d:
                if d in c["axes"]:
                    vals = [_pm(c["axes"][d][k], pct=False) for k in keys]
                    lines.append(f"| {c['recall']} | {c['norm']} | {d} | " + " | ".join(vals) + " |")
        lines += ["", "Columns: " + "; ".join(f"`{k}`: {AXES[k][1]} ({AXES[k][0]})" for k in keys) + ".", "",
                  "## Each axis against extrapolation", "",
                  "Spearman's rank correlation between the axis (per diagnosed difficulty) and the harder "
                  "accuracy of the same run, over all finished runs (n).", "",
                  "| axis | d | n | Spearman rho | p |", "|---|---|---|---|---|"]
        for r in summary["correlations"]:
            rho = "-" if math.isnan(r["rho"]) else f"{r['rho']:+.2f}"
            p = "-" if math.isnan(r["p"]) else f"{r['p']:.2g}"
            lines.append(f"| {r['axis']} | {r['difficulty']} | {r['n']} | {rho} | {p} |")
    problems = [c for c in summary["cells"] if c.get("error") or c.get("diagnose_error")]
    if problems:
        lines += ["", "## Runs with problems", ""]
        lines += [f"- {c['recall']}-{c['norm']} seed {c['seed']}: {c.get('error') or c.get('diagnose_error')}"
                  for c in problems]
    secs = [c.get("train_seconds", 0) + (c.get("eval_seconds") or 0) + (c.get("diagnose_seconds") or 0)
            for c in summary["cells"]]
    if secs:
        lines += ["", f"Wall time per run (train + eval + diagnose): median {np.median(secs) / 60:.1f} min, "
                      f"total {sum(secs) / 3600:.2f} h of run time."]
        dtypes = Counter((c.get("train_dtype") or "not recorded").replace("torch.", "") for c in summary["cells"])
        lines[-1] += " Training precision: " + ", ".join(f"{k} {n}" for k, n in sorted(dtypes.items())) + "."
    lines += [""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def _fmt_pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.0f}"


def _y_top(values) -> float:
    """The top of an accuracy axis: 1, or a tighter round top when every value is far below it
    (chess at a few percent would otherwise be a flat line at the bottom)."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    peak = max(finite, default=1.0)
    return 1.0 if peak > 0.5 else max(0.05, math.ceil(peak * 1.15 * 20) / 20)


def plot_accuracy(summary: dict, path: Path) -> Path:
    """Accuracy vs budget, one panel per (recall, norm), one line per difficulty (mean, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recalls = list(dict.fromkeys(c["recall"] for c in summary["configs"]))
    norms = list(dict.fromkeys(c["norm"] for c in summary["configs"]))
    iters = summary["iters"]
    name = get_task(summary["task"]).difficulty_label
    top = _y_top([s["max"] for c in summary["configs"] for per in c["acc"].values() for s in per.values()])
    fig, axes = plt.subplots(len(recalls), len(norms), figsize=(2.8 * len(norms), 2.3 * len(recalls)),
                             dpi=110, sharex=True, sharey=True, squeeze=False)
    by = {(c["recall"], c["norm"]): c for c in summary["configs"]}
    for i, r in enumerate(recalls):
        for j, n in enumerate(norms):
            ax = axes[i][j]
            c = by.get((r, n))
            if c is not None:
                for d in summary["difficulties"]:
                    st = [c["acc"][str(d)][str(k)] for k in iters]
                    mean = [s["mean"] for s in st]
                    ax.plot(iters, mean, marker="o", ms=3, label=name(d))
                    ax.fill_between(iters, [s["min"] for s in st], [s["max"] for s in st], alpha=0.15)
            else:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_xscale("log", base=2)
            ax.set_xticks(iters, [str(k) for k in iters], fontsize=7)
            ax.minorticks_off()
            ax.set_ylim(-0.03 * top, 1.03 * top)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"recall {r}, norm {n}", fontsize=9)
            if j == 0:
                ax.set_ylabel("exact accuracy" if summary["metric"] == "acc" else summary["metric"])
            if i == len(recalls) - 1:
                ax.set_xlabel("test-time iterations")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="difficulty", loc="lower center", ncol=max(1, len(labels)), fontsize=8,
               title_fontsize=8)
    fig.suptitle(f"{summary['task']}: accuracy vs iterations (mean over seeds, band: min-max)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_axes(summary: dict, path: Path) -> Path:
    """One panel per axis: the axis at the hardest diagnosed difficulty against harder accuracy, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in summary["cells"] if c["status"] == "finished" and c["axes"]]
    d = max({d for c in cells for d in c["axes"]}, key=int)
    ran = {c["recall"] for c in cells}, {c["norm"] for c in cells}
    top = _y_top([c["harder_acc"] for c in cells])
    keys = list(AXES)
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=110, squeeze=False)
    colors = {r: c for r, c in zip(RECALLS, ("tab:red", "tab:blue", "tab:green")) if r in ran[0]}
    markers = {n: m for n, m in zip(NORMS, "xos^") if n in ran[1]}  # the legend names what the grid ran
    corr = {(r["axis"], str(r["difficulty"])): r for r in summary["correlations"]}
    for ax, key in zip(axes.flat, keys):
        xs, measured = [], False
        for c in cells:
            if d in c["axes"]:
                x = c["axes"][d][key]
                x = np.nan if x is None else min(x, 1e6)  # an infinite condition number is drawn at 1e6
                xs.append(x)
                measured = measured or bool(np.isfinite(x))
                ax.scatter([x], [c["harder_acc"]], s=22,
                           color=colors.get(c["recall"], "k"), marker=markers.get(c["norm"], "o"))
        xs = np.array([x for x in xs if np.isfinite(x) and x > 0])
        if len(xs) and xs.max() > 1e3 * max(np.median(xs), 1e-12):  # one outlier would squash the rest
            ax.set_xscale("symlog", linthresh=max(float(np.min(xs)), 1e-6))
        r = corr.get((key, d))
        spearman = f"Spearman {r['rho']:+.2f}" if r and not math.isnan(r["rho"]) else "Spearman -"
        ax.set_title(f"{AXES[key][1]}\n{spearman}", fontsize=8)
        if not measured:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_ylim(-0.03 * top, 1.03 * top)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
        for name, color in colors.items():
            ax.scatter([], [], color=color, label=f"recall {name}")
        for name, m in markers.items():
            ax.scatter([], [], color="gray", marker=m, label=f"norm {name}")
        ax.legend(fontsize=7, loc="center")
    axes[0][0].set_ylabel("harder accuracy" if summary["metric"] == "acc" else f"harder {summary['metric']}")
    fig.suptitle(f"{summary['task']}: each diagnose axis at difficulty {d} against harder accuracy, one point per run "
                 "(harder accuracy: mean over the test difficulties\nthe task does not train on, at the largest "
                 "budget; Spearman: rank correlation over runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
