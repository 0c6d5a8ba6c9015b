"""Training and solving speed of each task's recipe against the machine's matmul peak.

    .venv/bin/python bench/throughput.py                          # every task's default recipe
    .venv/bin/python bench/throughput.py --tasks sudoku,chess --presets default,long
    .venv/bin/python bench/throughput.py --steps 3 --json out.json

For each recipe, in one process, on the same threads (torch's count, or --threads):
- train: seconds per training step (forward + backward + AdamW on a fresh batch, the recipe's
  batch size and solve; the median of --steps timed steps after one warm-up), the FLOPs of the
  step (torch.utils.flop_counter: every matmul, bmm, einsum and attention kernel the step runs,
  forward and backward, counted once from the shapes), the achieved GFLOP/s, and that as a
  fraction of the matmul peak; peak bytes of live tensors during a step (bench/_memory.py).
- eval: one no-gradient solve of a test batch at the recipe's first test difficulty, with the
  training budget: f evaluations per second and GFLOP/s.
- peak: a 1024 x 1024 matmul (the best of several), the ceiling the achieved rates are divided
  by: float32, and bfloat16 where the CPU runs it natively; timed at the start and end of the
  run, and for each row just before and after its timed steps (the mean of the two, `row peak`
  in GFLOP/s, is what that row's fractions divide by: the rate drifted 10-15% within a run). A step
  whose block runs under bf16 autocast (the chess and sudoku defaults on such a CPU) is divided by the
  bfloat16 peak (`of peak`), and by the float32 one as well (`of fp32`); its head, loss and
  optimizer stay float32, so neither ceiling is exact for it.

Timings mean something only on an otherwise idle machine: the load average is printed at the
start and end. Every batch comes from a seeded numpy Generator; the global RNG is untouched.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# The repo root first: bench/solvers.py would otherwise shadow the solvers package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench._memory import peak_alloc_bytes  # noqa: E402


def matmul_peak(n: int = 1024, repeats: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls in `dtype` on the current threads."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class MatmulCalls(TorchDispatchMode):
    """Every matrix product a call runs (forward and backward), by op, operand shapes, strides and dtype."""

    OPS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            ops = args if name in ("mm", "bmm") else args[1:3]
            a, b = ops[0], ops[1]
            self.calls[(name, tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()), a.dtype)] += 1
        return func(*args, **(kwargs or {}))


def _strided_randn(shape, stride, dtype, generator) -> torch.Tensor:
    """Random values laid out with these strides (stride 0, an expanded operand, included)."""
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0)
    return torch.randn(extent, generator=generator).to(dtype).as_strided(shape, stride)


def matmul_seconds(calls: collections.Counter, repeats: int = 3) -> tuple[float, list[dict]]:
    """Seconds the same matrix products take alone (operands of the same shapes, strides and dtype, the
    best of `repeats` for each), the time a step would take if everything but its products were free;
    and per kind of product, its count, seconds and GFLOP/s, slowest first. Operands stay in cache
    between repeats, so this is a lower bound on the step's own product time."""
    g = torch.Generator().manual_seed(0)
    total, kinds = 0.0, []
    for (name, a_shape, a_stride, b_shape, b_stride, dtype), count in calls.items():
        a, b = (_strided_randn(shape, stride, dtype, g) for shape, stride in ((a_shape, a_stride), (b_shape, b_stride)))
        op = torch.mm if name in ("mm", "addmm") else torch.bmm
        op(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(count):
                op(a, b)
            best = min(best, time.perf_counter() - t0)
        total += best
        flops = 2 * count * math.prod(a_shape) * b_shape[-1]
        kinds.append({"op": name, "a": list(a_shape), "b": list(b_shape), "transposed": [a_stride[-1] != 1, b_stride[-1] != 1],
                      "dtype": str(dtype).removeprefix("torch."), "count": count, "seconds": best,
                      "gflops": flops / best / 1e9})
    return total, sorted(kinds, key=lambda k: -k["seconds"])


def recipe_parts(task_name: str, preset: str | None, seed: int = 0, model_over: dict | None = None,
                 train_over: dict | None = None):
    """The model, training objective, optimizer and configs of a task's recipe, as train() builds them
    (`model_over` / `train_over`: fields over the recipe's ModelConfig / TrainConfig)."""
    from deqloop.model import build_model, task_configs
    from deqloop.objective import TrainingObjective
    from deqloop.train import TrainConfig, build_optimizer
    from tasks import get_task

    task = get_task(task_name)
    model_cfg, solve_cfg = task_configs(task, model_over, preset=preset)
    train_fields = {**task.recipe(preset)["train"], **(train_over or {})}
    cfg = TrainConfig(task=task_name, seed=seed, out_dir=os.devnull, **train_fields)
    model = build_model(model_cfg, seed)
    objective = TrainingObjective(model, task, solve_cfg, jac_reg=cfg.jac_reg, jac_samples=cfg.jac_reg_samples,
                                  rho_reg=cfg.rho_reg, rho_target=cfg.rho_target, pack=cfg.pack)
    return task, model, objective, build_optimizer(model, cfg), cfg, solve_cfg


def _local_unfold(self, h):
    """The local attention before 2026-12-01 (unfolded (B, H, T, E, W) key / value windows), kept
    here only to measure the change side by side (--variants unfold)."""
    import math

    from einops import rearrange

    b, t, d = h.shape
    w = self.left + self.right + 1
    edge = self.boundary.expand(b, 1, d)
    h_pad = torch.cat([edge.expand(b, self.left, d), h, edge.expand(b, self.right, d)], dim=1)
    q, k, v = rearrange(self.qkv(h_pad), "b t (three h e) -> three b h t e", three=3, h=self.n_heads)
    q = q[:, :, self.left: self.left + t]
    scores = torch.einsum("bhte,bhtew->bhtw", q, k.unfold(2, w, 1)) / math.sqrt(q.shape[-1])
    return torch.einsum("bhtw,bhtew->bhte", (scores + self.rel_bias[:, None, :]).softmax(-1), v.unfold(2, w, 1))


def _biased_sdpa(self, q, k, v):
    """The relation-biased attention before 2026-12-03 (scaled_dot_product_attention with the bias
    as an additive float mask), kept here only to measure the change side by side (--variants sdpa)."""
    import torch.nn.functional as F

    # q comes scaled by 1/sqrt(E) (Attention._scaled_qkv), so SDPA's own scale is 1 here
    return F.scaled_dot_product_attention(q, k, v, attn_mask=self._relation_mask(q.shape[2]), scale=1.0)


def measure_recipe(task_name: str, preset: str | None, steps: int, peaks: dict[str, float], variant: str = "eager",
                   flops: int | None = None, ceiling: bool = False) -> dict:
    """One recipe in one variant: eager (the code as it is), compile (train --compile), bf16
    (--autocast bf16), fp32 (--autocast none), unfold (eager with the old local attention), sdpa (eager with the old
    relation-biased attention), jac (--jac-reg, one vector), rho (--rho-reg), nopack (--no-pack). `flops`: the count to use (the eager step's: the other variants do the same
    arithmetic; for jac and rho, the eager step's, so their fraction of peak reads as a slowdown).
    `peaks`: matmul FLOP/s by dtype name ("float32", and "bfloat16" where native). `ceiling`: also time
    the step's own matrix products alone (MatmulCalls, matmul_seconds): the fraction of peak the step
    would reach if nothing else cost time."""
    from deqloop import model as model_module
    from deqloop.train import train_step

    model_cfg = get_model_config(task_name, preset)
    parts = variant.split("+")
    if ("unfold" in parts and model_cfg.window is None) or ("sdpa" in parts and model_cfg.relations is None):
        return {}
    saved = model_module.Attention._local, model_module.Attention._biased
    if "unfold" in parts:
        model_module.Attention._local = _local_unfold
    if "sdpa" in parts:
        model_module.Attention._biased = _biased_sdpa
    try:
        return _measure(task_name, preset, steps, peaks, variant, flops, train_step, ceiling)
    finally:
        model_module.Attention._local, model_module.Attention._biased = saved


def get_model_config(task_name: str, preset: str | None):
    from deqloop.model import task_configs
    from tasks import get_task

    return task_configs(get_task(task_name), preset=preset)[0]


# variants that change the recipe's configs: (ModelConfig fields, TrainConfig fields) over it;
# jac and rho add the stabilizer's term to the step (one Hutchinson vector for jac)
OVERRIDES = {"bf16": ({"autocast": "bf16"}, None), "fp32": ({"autocast": None}, None), "nopack": (None, {"pack": False}),
             "jac": (None, {"jac_reg": 1.0, "jac_reg_samples": 1}),
             "rho": (None, {"rho_reg": 1.0, "rho_target": 0.9})}


def _measure(task_name, preset, steps, peaks, variant, flops, train_step, ceiling=False) -> dict:
    from deqloop.model import autocast_dtype

    parts = variant.split("+")  # a combination, e.g. bf16+compile
    model_over, train_over = {}, {}
    for part in parts:
        m_over, t_over = OVERRIDES.get(part, (None, None))
        model_over.update(m_over or {})
        train_over.update(t_over or {})
    model_over, train_over = model_over or None, train_over or None
    task, model, objective, optimizer, cfg, solve_cfg = recipe_parts(task_name, preset, model_over=model_over,
                                                                     train_over=train_over)
    step_dtype = autocast_dtype(model.cfg.autocast, torch.device("cpu")) or torch.float32
    step_dtype = str(step_dtype).removeprefix("torch.")
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(0)
    difficulties = cfg.train_difficulties or task.train_difficulties
    batches = [task.sample(cfg.batch_size, difficulties, rng) for _ in range(steps + 3)]

    def step(i: int):
        generator = torch.Generator().manual_seed(i)
        return train_step(objective, optimizer, params, batches[i], generator, cfg.lr, cfg.grad_clip)

    model.train()
    if "compile" in parts:
        model.compile_block()
    t0 = time.perf_counter()
    step(0)  # warm-up: first-call costs (allocator, kernels; the compilation with --variants compile)
    warmup_s = time.perf_counter() - t0
    if flops is None:
        flops = count_flops(lambda: step(1))
    else:
        step(1)
    peak_bytes = peak_alloc_bytes(lambda: step(2)) if "compile" not in parts else float("nan")
    # The row's own peaks, timed just before and after its steps: this CPU's matmul rate drifted
    # by 10-15% within one run (169 -> 189 GFLOP/s), more than some of the differences measured
    row_peaks = {k: matmul_peak(dtype=getattr(torch, k)) for k in peaks}
    times = []
    for i in range(3, 3 + steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    train_s = statistics.median(times)
    row_peaks = {k: (v + matmul_peak(dtype=getattr(torch, k))) / 2 for k, v in row_peaks.items()}
    peak = row_peaks.get(step_dtype, row_peaks["float32"])  # emulated bf16 (no bf16 peak) against float32
    matmul_s, matmul_kinds = float("nan"), []
    if ceiling and "compile" not in parts:
        recorder = MatmulCalls()
        with recorder:
            step(3)
        matmul_s, matmul_kinds = matmul_seconds(recorder.calls)

    model.eval()
    test_d = (cfg.test_difficulties or task.test_difficulties)[0]
    test = task.generate(cfg.eval_size if cfg.eval_size > 1 else 32, test_d, np.random.default_rng(1), split="test")
    with torch.no_grad():
        model(test.inputs, solve_cfg)  # warm-up
        eval_flops = count_flops(lambda: model(test.inputs, solve_cfg))
        eval_times, evals = [], 0
        for _ in range(max(steps, 3)):
            t0 = time.perf_counter()
            _, result = model(test.inputs, solve_cfg)
            eval_times.append(time.perf_counter() - t0)
            evals = int(result.n_f_evals)
    eval_s = statistics.median(eval_times)
    return {"task": task_name, "preset": preset or "default", "variant": variant, "warmup_s": warmup_s,
            "batch": cfg.batch_size,
            "max_iter": solve_cfg.max_iter, "backward": solve_cfg.backward,
            "train_step_s": train_s, "train_step_s_all": times, "train_flops": flops,
            "train_gflops": flops / train_s / 1e9, "train_dtype": step_dtype,
            "train_fraction_of_peak": flops / train_s / peak,
            "train_fraction_of_fp32_peak": flops / train_s / row_peaks["float32"], "row_peak_flops": row_peaks,
            "train_peak_alloc_mib": peak_bytes / 2 ** 20,
            "train_matmul_s": matmul_s, "train_ceiling_fraction": flops / matmul_s / peak, "train_matmuls": matmul_kinds,
            "eval_difficulty": test_d, "eval_batch": int(test.inputs.shape[0]), "eval_f_evals": evals,
            "eval_s": eval_s, "eval_f_evals_per_s": evals / eval_s, "eval_gflops": eval_flops / eval_s / 1e9,
            "eval_fraction_of_peak": eval_flops / eval_s / row_peaks["float32"]}  # solves run in float32


def print_row(r: dict) -> None:
    compiled = f" (first step {r['warmup_s']:.0f} s)" if "compile" in r["variant"].split("+") else ""
    low = r["train_dtype"] != "float32"
    fp32 = f" ({r['train_fraction_of_fp32_peak']:.2f} of fp32)" if low else ""
    ceiling = (f" | its products alone {r['train_matmul_s'] * 1e3:.1f} ms, ceiling {r['train_ceiling_fraction']:.2f} of peak"
               if r["train_matmul_s"] == r["train_matmul_s"] else "")
    print(f"{r['task']:>11} {r['preset']:<7} {r['variant']:<12} train {r['train_step_s'] * 1e3:7.1f} ms/step "
          f"{r['train_flops'] / 1e9:6.2f} GFLOP {r['train_gflops']:6.1f} GFLOP/s {r['train_fraction_of_peak']:.2f} "
          f"of {'bf16 ' if low else ''}peak{fp32} {r['train_peak_alloc_mib']:5.0f} MiB{compiled}{ceiling} "
          f"[row peak {' / '.join(f'{v / 1e9:.0f}' for v in r['row_peak_flops'].values())}] | "
          f"eval d={r['eval_difficulty']} "
          f"B={r['eval_batch']} {r['eval_f_evals_per_s']:6.1f} f/s {r['eval_gflops']:5.1f} GFLOP/s "
          f"({r['eval_fraction_of_peak']:.2f})", flush=True)
    for k in r["train_matmuls"][:4]:  # where the products' own time goes (--ceiling)
        shapes = " x ".join(f"{tuple(s)}{'^T' if t else ''}" for s, t in zip((k["a"], k["b"]), k["transposed"]))
        print(f"{'':>20} {k['count']:4d} x {k['op']:<7} {shapes:<36} {k['seconds'] * 1e3:7.1f} ms "
              f"{k['gflops']:6.1f} GFLOP/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="prefix_sums,sudoku,chess", help="comma-separated (default: %(default)s)")
    p.add_argument("--presets", default="default", help="comma-separated; 'default' is the task's own recipe")
    p.add_argument("--variants", default="eager",
                   help="comma-separated: eager, compile (train --compile), bf16 (--autocast bf16), fp32 (--autocast none), unfold (the old "
                        "local attention), sdpa (the old relation attention), jac (--jac-reg 1, one vector), rho (--rho-reg 1), "
                        "nopack (train --no-pack: mixed lengths padded); '+' combines them, e.g. bf16+compile")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per recipe (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ceiling", action="store_true",
                   help="also time each step's own matrix products alone (same shapes, strides, dtype): the "
                        "fraction of peak the step would reach if nothing else cost time")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number here")
    args = p.parse_args(argv)
    known = {"eager", "compile", "unfold", "sdpa", *OVERRIDES}
    unknown = sorted({part for v in args.variants.split(",") for part in v.split("+")} - known)
    if unknown:
        p.error(f"unknown variant {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tasks import get_task

    print(f"# bench/throughput.py, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    from deqloop.model import cpu_has_bf16

    peaks = {"float32": matmul_peak()}
    if cpu_has_bf16():
        peaks["bfloat16"] = matmul_peak(dtype=torch.bfloat16)
    print("matmul peak (1024^2): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
    rows = []
    for name in args.tasks.split(","):
        for preset in args.presets.split(","):
            preset = None if preset == "default" else preset
            if preset is not None and preset not in get_task(name).presets:
                continue
            eager_flops = None
            for variant in args.variants.split(","):
                # nopack pads, so it does more arithmetic than eager's packed step: its own count
                r = measure_recipe(name, preset, args.steps, peaks, variant, None if variant == "nopack" else eager_flops,
                                   ceiling=args.ceiling)
                if not r:
                    continue
                if variant == "eager":
                    eager_flops = r["train_flops"]
                rows.append(r)
                print_row(r)
    end_peaks = {k: matmul_peak(dtype=getattr(torch, k)) for k in peaks}
    print("matmul peak at the end: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in end_peaks.items())
          + f"; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peaks, "end_peak_flops": end_peaks,
                                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
