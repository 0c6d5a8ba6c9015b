"""Peak memory of one training step: IFT vs unrolled backprop at 10 and 100 forward iterations.

    .venv/bin/python bench/train_memory.py

The model, batch and solve are the prefix-sums default (d_model 64, 64 strings of 32 bits), solved
by plain iteration with tol 1e-30, so every configuration runs exactly its iteration count, forward
and (IFT) backward. Each configuration runs in a fresh process and reports:

- alloc: peak bytes of live tensors during one step (after a warm-up step) above the level at its
  start (torch.profiler memory events, bench/_memory.py). What the algorithm holds, byte for byte.
- rss: the process's peak resident set (VmHWM) over three steps minus its resident set once the
  model and batch are built, (a) with glibc's default malloc and (b) with a fixed mmap threshold
  (MALLOC_MMAP_THRESHOLD_=65536). By default glibc raises its mmap threshold after large frees and
  then serves large tensors from a heap that fragments, so the resident set grows with the number
  of allocations (iterations) even when the live tensors do not: (b) shows the process without
  that effect.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

# The repo root first: bench/solvers.py would otherwise shadow the solvers package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._memory import peak_alloc_bytes  # noqa: E402

CONFIGS = [("ift", 10), ("ift", 100), ("unroll", 10), ("unroll", 100)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1))


def measure(backward: str, iters: int) -> tuple[float, float]:
    """(alloc MiB, rss MiB) of a training step (see the module doc)."""
    from deqloop.model import ModelConfig, SolveConfig, build_model
    from tasks import get_task
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    task = get_task("prefix_sums")
    model = build_model(ModelConfig(vocab_size=2, n_classes=2, d_model=64, window=4), 0)
    batch = task.generate(64, 32, np.random.default_rng(0))
    solve = SolveConfig(solver="fixed_point_iter", max_iter=iters, tol=1e-30, backward=backward,
                        b_solver="fixed_point_iter", b_max_iter=iters, b_tol=1e-30)

    def step():
        logits, result = model(batch.inputs, solve)
        task.loss(logits, batch.targets).backward()
        model.zero_grad(set_to_none=True)
        assert result.n_f_evals >= iters

    base = _status_kib("VmRSS")
    for _ in range(3):
        step()
    rss = (_status_kib("VmHWM") - base) / 1024
    alloc = peak_alloc_bytes(step) / 2**20
    return alloc, rss


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(*measure(sys.argv[1], int(sys.argv[2])))
        sys.exit()
    peaks = {}
    print(f"{'backward':8s} {'iters':>5s} {'alloc MiB':>10s} {'rss MiB (a)':>12s} {'rss MiB (b)':>12s}")
    for backward, iters in CONFIGS:
        row = []
        for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
            out = subprocess.run([sys.executable, __file__, backward, str(iters)], capture_output=True,
                                 text=True, check=True, env={**os.environ, **env})
            alloc, rss = (float(v) for v in out.stdout.split())
            row += [alloc, rss] if not row else [rss]
        peaks[backward, iters] = row
        print(f"{backward:8s} {iters:5d} {row[0]:10.1f} {row[1]:12.1f} {row[2]:12.1f}")
    for backward in ("ift", "unroll"):
        ratios = [b / max(a, 1e-9) for a, b in zip(peaks[backward, 10], peaks[backward, 100])]
        print(f"{backward}: 100 / 10 iterations: alloc {ratios[0]:.2f}x, rss (a) {ratios[1]:.2f}x, "
              f"rss (b) {ratios[2]:.2f}x")
