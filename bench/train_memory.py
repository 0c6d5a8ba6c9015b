"""Peak memory of one training step: IFT vs unrolled backprop at 10 and 100 forward iterations.

    .venv/bin/python bench/train_memory.py

Each configuration runs in a fresh process; the figure is the process's peak RSS during one step
minus its RSS after the model and batch were built (CPU, so RSS stands in for the allocator's peak).
The solve runs every iteration (tol 1e-30), so the iteration count is what is compared.
"""

import resource
import subprocess
import sys
from pathlib import Path

# The repo root first: bench/solvers.py would otherwise shadow the solvers package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

CONFIGS = [("ift", 10), ("ift", 100), ("unroll", 10), ("unroll", 100)]


def step(backward: str, iters: int) -> float:
    from deqloop.model import ModelConfig, SolveConfig, build_model
    from tasks import get_task
    torch.set_num_threads(2)
    task = get_task("prefix_sums")
    model = build_model(ModelConfig(vocab_size=2, n_classes=2, d_model=64, window=4), 0)
    batch = task.generate(64, 32, np.random.default_rng(0))
    solve = SolveConfig(solver="fixed_point_iter", max_iter=iters, tol=1e-30, backward=backward, b_max_iter=iters,
                        b_tol=1e-30, b_solver="fixed_point_iter")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits, result, _ = model(batch.inputs, solve)
    F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).backward()
    assert result.n_f_evals >= iters
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # MiB


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(step(sys.argv[1], int(sys.argv[2])))
    else:
        peaks = {}
        for backward, iters in CONFIGS:
            out = subprocess.run([sys.executable, __file__, backward, str(iters)], capture_output=True, text=True,
                                 check=True)
            peaks[backward, iters] = float(out.stdout.strip().splitlines()[-1])
            print(f"{backward:7s} {iters:4d} iterations: peak +{peaks[backward, iters]:8.1f} MiB")
        for backward in ("ift", "unroll"):
            print(f"{backward}: 100 / 10 iterations = {peaks[backward, 100] / max(peaks[backward, 10], 1e-9):.2f}x")
