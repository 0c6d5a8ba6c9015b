#!/usr/bin/env python
"""Throughput of the tasks' data generators, one section per task.

    python bench/task_generation.py sudoku                      # 600 puzzles on 1 and 2 processes (~1 min idle)
    python bench/task_generation.py sudoku --n 2000 --workers 1,2 --json out.json

sudoku: generates `n` puzzles of a benchmark stream (seed BENCH_SEED, never cached, so the
on-disk pools are untouched) in one process, timing each puzzle, then with a pool of each
`--workers` count. Reports puzzles per minute, the share and rate of each difficulty bucket,
givens per bucket, and the size of each default pool (stream length needed, time at the measured
rate, file size where it is cached). Rates depend on the load: the script prints the load average
at its start and end; other busy processes on a 2-core machine slow it down a lot.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import sudoku as sd  # noqa: E402
from tasks.cache import cache_path  # noqa: E402

BENCH_SEED = 12345  # a stream of its own, not the pools' (seed 0)


def _timed_item(k: int) -> tuple[int, int, float, float]:
    """Puzzle k of the benchmark stream: guesses, givens, wall seconds, CPU seconds of this process."""
    t, c = time.perf_counter(), time.process_time()
    puzzle, _, guesses = sd.make_puzzle(np.random.default_rng([BENCH_SEED, 1, k]))
    return guesses, sum(map(bool, puzzle)), time.perf_counter() - t, time.process_time() - c


def sudoku(n: int, workers: list[int]) -> dict:
    load_start = os.getloadavg()
    report = {"n": n, "load_start": load_start, "runs": {}}
    for w in workers:
        t0 = time.perf_counter()
        if w == 1:
            items = [_timed_item(k) for k in range(n)]
        else:
            with multiprocessing.get_context("fork").Pool(w) as pool:
                items = pool.map(_timed_item, range(n), chunksize=4)
        wall = time.perf_counter() - t0
        cpu = sum(item[3] for item in items)
        # per_min: what the wall clock saw; per_min_cpu: n over the CPU time the workers got, per
        # process, i.e. the rate of `w` idle cores, which a loaded machine does not give
        report["runs"][w] = {"wall_s": wall, "per_min": 60 * n / wall, "cpu_s": cpu, "per_min_cpu": 60 * n * w / cpu}
        if w == workers[0]:
            guesses = np.array([item[0] for item in items])
            givens = np.array([item[1] for item in items])
            secs = np.array([item[3] for item in items])
    buckets = sd.bucket_of(guesses)
    rate = report["runs"][workers[0]]["per_min_cpu"] / workers[0]  # one idle core
    report["buckets"] = {}
    for b in range(len(sd.BUCKETS)):
        rows = buckets == b
        share = float(rows.mean())
        report["buckets"][b] = {
            "name": sd.BUCKET_NAMES[b], "count": int(rows.sum()), "share": share,
            **{f"per_min_{w}proc": r["per_min"] * share for w, r in report["runs"].items()},
            "per_min_1core_cpu": rate * share,
            "cpu_ms_per_puzzle": 1000 * float(secs[rows].mean()) if rows.any() else None,
            "givens_mean": float(givens[rows].mean()) if rows.any() else None,
            "givens_range": [int(givens[rows].min()), int(givens[rows].max())] if rows.any() else None,
            "max_guesses": int(guesses[rows].max()) if rows.any() else None,
        }
    report["givens_hist"] = {int(k): int(v) for k, v in zip(*np.unique(givens, return_counts=True))}
    report["pools"] = []
    for split, sizes in sd.DEFAULT_SIZES.items():
        for b, size in sizes.items():
            share = report["buckets"][b]["share"]
            key = {"version": sd.VERSION, "seed": 0, "split": split, "bucket": b, "size": size}
            path = cache_path("sudoku-pool", key)
            report["pools"].append({
                "split": split, "bucket": b, "size": size,
                "stream_needed": round(size / share) if share else None,
                "minutes_1core": size / share / rate if share else None,
                "file_bytes": path.stat().st_size if path.exists() else None,
            })
    report["load_end"] = os.getloadavg()
    return report


def print_sudoku(r: dict) -> None:
    print(f"sudoku: {r['n']} puzzles; load average {r['load_start'][0]:.2f} at start, {r['load_end'][0]:.2f} at end")
    for w, run in r["runs"].items():
        print(f"  {w} process(es): {run['wall_s']:.1f} s wall, {run['per_min']:.0f} puzzles/min; by CPU time "
              f"{run['per_min_cpu']:.0f} puzzles/min on {w} idle core(s)")
    procs = list(r["runs"])
    print(f"  {'bucket':<16}{'share':>7}" + "".join(f"{f'/min {w}p':>11}" for w in procs)
          + f"{'/min 1core':>11}{'cpu ms':>8}{'givens':>14}{'max guesses':>13}")
    for b, s in r["buckets"].items():
        rates = "".join(f"{s[f'per_min_{w}proc']:>11.0f}" for w in procs)
        ms = f"{s['cpu_ms_per_puzzle']:.1f}" if s["cpu_ms_per_puzzle"] is not None else "-"
        giv = f"{s['givens_mean']:.1f} {s['givens_range']}" if s["givens_mean"] is not None else "-"
        print(f"  {b} ({s['name']}){'':<{16 - 4 - len(s['name'])}}{s['share']:>7.3f}{rates}"
              f"{s['per_min_1core_cpu']:>11.0f}{ms:>8}{giv:>14}"
              f"{s['max_guesses'] if s['max_guesses'] is not None else '-':>13}")
    print(f"  givens histogram: {r['givens_hist']}")
    print("  /min: puzzles of the bucket per minute (wall clock, w processes; 1core: one idle core, by CPU time)")
    print("  default pools: split bucket size | stream needed | minutes on 1 idle core | cached file")
    for p in r["pools"]:
        mins = f"{p['minutes_1core']:.1f}" if p["minutes_1core"] is not None else "-"
        size = f"{p['file_bytes'] / 1e3:.0f} kB" if p["file_bytes"] else "not cached"
        stream = p["stream_needed"] or "-"
        print(f"    {p['split']:<5} {p['bucket']} {p['size']:>5} | {stream:>6} | {mins:>5} | {size}")


SECTIONS = {"sudoku": (sudoku, print_sudoku)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", choices=list(SECTIONS), help="which task's generator")
    p.add_argument("--n", type=int, default=600, help="examples per run (default: 600)")
    p.add_argument("--workers", default="1,2", help="comma-separated process counts; the first one is "
                   "timed per example (default: 1,2)")
    p.add_argument("--json", metavar="PATH", help="also write every number here")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip().isdigit()]
    if args.n < 1 or len(workers) != len(args.workers.split(",")) or min(workers) < 1:
        p.error("--n and every --workers count must be >= 1")
    run, show = SECTIONS[args.section]
    report = run(args.n, workers)
    show(report)
    if args.json:
        Path(args.json).write_text(json.dumps({args.section: report}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
