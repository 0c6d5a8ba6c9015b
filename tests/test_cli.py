"""cli.py: flags build the configs, eval and solve work, every bad input is one line and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
from deqloop import cli
from deqloop.checkpoint import load_checkpoint
from deqloop.evaluate import print_table
from deqloop.model import ModelConfig, SolveConfig
from deqloop.train import TrainConfig
from tasks import get_task

TOY = ["--task", "prefix_sums", "--d-model", "16", "--heads", "2", "--batch-size", "8", "--max-iter", "10",
       "--train-difficulties", "8", "--test-difficulties", "8,12", "--eval-size", "8", "--log-every", "1"]




def run(capsys, *argv):
    """cli.main in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*argv, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_usage_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.main(["train", *TOY, "--steps", "2", "--eval-every", "2", "--out-dir", str(out)])
    assert code == 0
    return out / "checkpoint.pt"


def parse_train(*argv):
    return cli.train_configs(cli.build_parser().parse_args(["train", *map(str, argv)]))


def test_defaults_are_the_dataclass_defaults():
    cfg, model_cfg, solve_cfg = parse_train("--task", "prefix_sums")
    task = get_task("prefix_sums")
    assert cfg == TrainConfig(task="prefix_sums")
    assert cfg.steps == 3000 and cfg.batch_size == 64 and cfg.lr == 1e-3 and cfg.out_dir == "runs/prefix_sums"
    assert model_cfg == ModelConfig(vocab_size=task.vocab_size, n_classes=task.n_classes, **task.model_defaults)
    assert solve_cfg == SolveConfig(**getattr(task, "solve_defaults", {}))


def test_explicit_flags_win():
    cfg, model_cfg, solve_cfg = parse_train(
        "--task", "prefix_sums", "--window", "2", "--recall", "internal", "--norm", "pre", "--z0", "zeros",
        "--solver", "broyden", "--tol", "1e-5", "--backward", "phantom", "--train-difficulties", "16,24",
        "--seed", "7", "--device", "cpu")
    assert (model_cfg.window, model_cfg.recall, model_cfg.norm, model_cfg.z0) == (2, "internal", "pre", "zeros")
    assert (solve_cfg.solver, solve_cfg.tol, solve_cfg.backward) == ("broyden", 1e-5, "phantom")
    assert parse_train("--task", "prefix_sums", "--max-iter", "7")[2].max_iter == 7
    assert (cfg.train_difficulties, cfg.seed, cfg.device) == ((16, 24), 7, "cpu")
    assert parse_train("--task", "prefix_sums", "--window", "none")[1].window is None


def test_task_recipe_and_preset_then_flags():
    # The task's train_defaults fill what no flag gives; --preset goes over them; a flag wins over both.
    task = get_task("sudoku")
    cfg, model_cfg, solve_cfg = parse_train("--task", "sudoku")
    assert (cfg.steps, cfg.lr) == (task.train_defaults["steps"], task.train_defaults["lr"])
    assert (model_cfg.relations, solve_cfg.loss_every) == ("sudoku_peers", 1)
    long = task.presets["long"]["train"]
    cfg = parse_train("--task", "sudoku", "--preset", "long")[0]
    assert (cfg.steps, cfg.train_difficulties, cfg.lr) == (long["steps"], long["train_difficulties"], 2e-3)
    cfg = parse_train("--task", "sudoku", "--preset", "long", "--steps", "9", "--lr", "1e-4")[0]
    assert (cfg.steps, cfg.train_difficulties, cfg.lr) == (9, long["train_difficulties"], 1e-4)


def test_unknown_preset_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--task", "sudoku", "--preset", "short", "--out-dir", tmp_path)
    assert_usage_error(code, err, "no preset 'short'", "long")
    code, _, err = run(capsys, "train", "--task", "prefix_sums", "--preset", "long", "--out-dir", tmp_path)
    assert_usage_error(code, err, "no preset 'long'", "none")


def test_train_writes_checkpoint_and_metrics(ckpt):
    saved = load_checkpoint(ckpt)
    assert saved["step"] == 2 and saved["model_config"]["d_model"] == 16
    lines = [json.loads(x) for x in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["train", "train", "eval"]
    assert set(lines[-1]["acc"]) == {"8", "12"}


@pytest.mark.parametrize("argv,words", [
    (["--solver", "andersen"], ["unknown solver 'andersen'", "anderson"]),
    (["--b-solver", "nope"], ["unknown solver 'nope'"]),
    (["--d-model", "30", "--heads", "4"], ["not divisible"]),
    (["--steps", "0"], ["steps must be >= 1"]),
    (["--norm", "layer"], ["invalid choice"]),
    (["--train-difficulties", "8,x"], ["comma-separated integers"]),
])
def test_train_bad_flags(capsys, tmp_path, argv, words):
    assert_usage_error(*run(capsys, "train", "--task", "prefix_sums", "--out-dir", tmp_path, *argv)[::2], *words)


def test_train_unknown_task(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--task", "sudok", "--out-dir", tmp_path)
    assert_usage_error(code, err, "unknown task", "prefix_sums")


def test_train_existing_run_and_resume_errors(capsys, ckpt, tmp_path):
    out = ckpt.parent
    assert_usage_error(*run(capsys, "train", *TOY, "--out-dir", out)[::2], "exists", "--resume")
    code, _, err = run(capsys, "train", *TOY, "--out-dir", out, "--resume", "--lr", "0.5")
    assert_usage_error(code, err, "--lr 0.5 differs")
    assert_usage_error(*run(capsys, "train", "--task", "prefix_sums", "--out-dir", tmp_path, "--resume")[::2],
                       "no such file")


def test_resume_takes_settings_from_checkpoint(capsys, ckpt, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(ckpt.read_bytes())
    code, _, err = run(capsys, "train", "--task", "prefix_sums", "--out-dir", out, "--resume", "--steps", "3",
                       "--d-model", "16")  # repeating a stored value is fine
    assert code == 0, err
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["step"] == 3 and saved["train_config"]["batch_size"] == 8


def test_eval_writes_json_and_png(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, "eval", ckpt, "--iters", "2,4", "--n", "6", "--json", tmp_path / "e.json",
                         "--plot", tmp_path / "e.png", "--device", "cpu")
    assert code == 0, err
    assert "max_iter" in out and "difficulty" in out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["iters"] == [2, 4] and report["difficulties"] == [8, 12] and report["n"] == 6
    cells = {(c["difficulty"], c["max_iter"]): c for c in report["cells"]}
    assert set(cells) == {(8, 2), (8, 4), (12, 2), (12, 4)}
    assert all(0 <= c["acc"] <= 1 and 0 <= c["converged"] <= 1 and 1 <= c["solver_steps"] <= c["max_iter"]
               for c in cells.values())
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("solver", ["fixed_point_iter", "anderson"])
def test_eval_reads_every_budget_along_one_solve(ckpt, solver):
    """evaluate_budgets (what eval runs: one solve to the largest budget per chunk) gives each
    budget's report exactly as a solve of its own would, with samples stopping in between."""
    import dataclasses

    from deqloop.checkpoint import load_run
    from deqloop.evaluate import evaluate, evaluate_budgets, test_set

    model, task, _, solve = load_run(ckpt, solver=solver)
    batch = test_set(task, 12, 10)
    iters = [9, 2, 5]
    for tol in (0.2, 0.1, 0.05, 0.02):  # loose tolerances: the first at which strings stop in between
        loose = dataclasses.replace(solve, tol=tol)
        both = evaluate_budgets(model, task, loose, batch, iters=iters, device="cpu", max_tokens=4 * 12)  # chunks of 4, 4, 2
        by = dict(zip(iters, both))
        if 0 < by[5]["converged"] < 1 and 5 < by[9]["solver_steps"] < 9:
            break
    else:
        pytest.fail("no tolerance made this toy run's strings stop between the budgets")
    alone = [evaluate(model, task, loose, batch, max_iter=k, device="cpu", max_tokens=4 * 12) for k in iters]
    assert both == alone
    with pytest.raises(ValueError, match="budgets"):
        evaluate_budgets(model, task, solve, batch, iters=[0, 3], device="cpu")


def test_eval_progress_counts_every_chunk(ckpt, monkeypatch):
    """evaluate_checkpoint reports before each difficulty, after each chunk, and at the end; the
    work done only grows and ends at the total (budget units of the largest budget)."""
    import deqloop.evaluate as ev

    length = ev.test_set(get_task("prefix_sums"), 12, 1).inputs.shape[1]
    monkeypatch.setattr(ev, "EVAL_TOKENS", 3 * length)  # chunks of 3 strings at difficulty 12
    calls = []
    ev.evaluate_checkpoint(ckpt, difficulties=[8, 12], iters=[2, 4], n=7,
                           progress=lambda *a: calls.append(a))
    assert calls[0] == (8, 4, 0, 8) and calls[-1] == (None, None, 8, 8)
    done = [c[2] for c in calls]
    assert done == sorted(done)
    assert sum(1 for c in calls if c[0] == 12) == 1 + 3  # the start, then chunks of 3 + 3 + 1
    assert any(0 < x < 4 for x in done)  # a fraction of the first difficulty, after its first chunk


def test_eval_and_diagnose_share_the_inputs_flag(capsys, ckpt, tmp_path):
    """--n-inputs in both commands (eval's old --n and an --n in diagnose are the same flag)."""
    code, _, err = run(capsys, "eval", ckpt, "--iters", "2", "--n-inputs", "3", "--difficulties", "8",
                       "--json", tmp_path / "e.json", "--plot", tmp_path / "e.png", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 3
    code, _, err = run(capsys, "diagnose", ckpt, "--n", "2", "--n-starts", "0", "--n-geometry", "1",
                       "--difficulty", "8", "--json", tmp_path / "d.json", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "d.json").read_text())["settings"]["n_inputs"] == 2


def test_eval_table_fits_100_columns():
    """Nine budgets (the default grid's size), three difficulties: no header cut, no line over 100."""
    iters = [20, 40, 80, 160, 320, 512, 1024, 2048, 4096]
    cells = [{"difficulty": d, "max_iter": k, "acc": 0.999, "solver_steps": 4000.0, "converged": 0.875}
             for d in (32, 256, 4096) for k in iters]
    report = {"task": "prefix_sums", "step": 3000, "n": 128, "difficulties": [32, 256, 4096], "iters": iters,
              "cells": cells}
    console = Console(width=100, record=True, force_terminal=False)
    print_table(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text and all(str(k) in text for k in iters) and "99.9%" in text and "88%" in text


def test_eval_default_budgets_and_paths(capsys, ckpt):
    code, _, err = run(capsys, "eval", ckpt, "--n", "2", "--difficulties", "8", "--device", "cpu")
    assert code == 0, err
    report = json.loads((ckpt.parent / "eval.json").read_text())
    task_budget = get_task("prefix_sums").eval_max_iter(8)
    # the training max_iter 10 doubled up to 8x, and the task's budget at difficulty 8
    assert report["iters"] == sorted({10, 20, 40, 80, max(10, task_budget)})
    assert report["eval_max_iter"] == {"8": max(10, task_budget)}
    assert (ckpt.parent / "eval.png").exists()


def test_eval_bad_inputs(capsys, ckpt, tmp_path):
    assert_usage_error(*run(capsys, "eval", tmp_path / "none.pt")[::2], "no such file")
    assert_usage_error(*run(capsys, "eval", ckpt, "--iters", "0,4")[::2], "integers >= 1")
    assert_usage_error(*run(capsys, "eval", ckpt, "--json", tmp_path / "no" / "e.json")[::2], "does not exist")


def test_solve(capsys, ckpt):
    code, out, err = run(capsys, "solve", ckpt, "0110100", "--device", "cpu")
    assert code == 0, err
    answer, steps = out.splitlines()[:2]
    assert len(answer) == 7 and set(answer) <= {"0", "1"}
    assert steps.startswith("solver: ") and "residual" in steps and "status" in steps


def test_solve_budget_is_the_tasks_for_the_input_unless_given(capsys, ckpt):
    # prefix sums' budget for a 300-bit input is 300 > the training max_iter 10; --max-iter wins
    _, out, _ = run(capsys, "solve", ckpt, "01" * 150, "--device", "cpu")
    assert "(max_iter 300)" in out.splitlines()[1]
    _, out, _ = run(capsys, "solve", ckpt, "01" * 150, "--max-iter", "3", "--device", "cpu")
    assert "solver: 3 steps (max_iter 3)" in out.splitlines()[1]


def test_solve_bad_input_subprocess(ckpt):
    # The real entry point: exit code 2, one line on stderr, no traceback.
    r = run_subprocess("cli.py", "solve", ckpt, "01x2")
    assert_usage_error(r.returncode, r.stderr, "only 0 and 1")


def test_garbage_checkpoint_subprocess(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    r = run_subprocess("cli.py", "eval", bad)
    assert_usage_error(r.returncode, r.stderr, str(bad), "not a checkpoint")


def test_solve_bad_inputs(capsys, ckpt, tmp_path):
    assert_usage_error(*run(capsys, "solve", ckpt, "")[::2], "empty")
    assert_usage_error(*run(capsys, "solve", tmp_path / "none.pt", "01")[::2], "no such file")
    garbage = tmp_path / "g.pt"
    garbage.write_text("hello")
    assert_usage_error(*run(capsys, "solve", garbage, "01")[::2], "not a checkpoint")
    assert_usage_error(*run(capsys, "solve", ckpt)[::2], "required")
    assert_usage_error(*run(capsys, "frobnicate")[::2], "invalid choice")


@pytest.mark.parametrize("extra", [(), ("--recall", "none", "--backward", "ift", "--solver", "fixed_point_iter")])
def test_torchrun_two_processes(tmp_path, extra):
    """DDP on 2 processes; without recall an IFT step leaves the embedding without gradient, and
    DDP is told to look for unused parameters there (and only there)."""
    out = tmp_path / "ddp"
    r = run_subprocess("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "cli.py", "train",
                       *TOY, *extra, "--steps", "3", "--eval-every", "3", "--device", "cpu", "--out-dir", out,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["step"] == 3 and saved["world_size"] == 2
    train_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_rows if r["kind"] == "train"] == [1, 2, 3]  # rank 0 alone writes


def test_eval_solve_diagnose_take_another_solver(capsys, ckpt, tmp_path):
    code, out, err = run(capsys, "eval", ckpt, "--n", "4", "--iters", "10", "--solver", "anderson",
                         "--solver-option", "m=3", "--solver-option", "beta=0.5", "--json", tmp_path / "e.json",
                         "--plot", tmp_path / "e.png")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert (report["solver"], report["solver_options"]) == ("anderson", {"m": 3, "beta": 0.5})
    code, out, err = run(capsys, "solve", ckpt, "0110", "--solver", "broyden")
    assert code == 0 and "broyden:" in out, out + err
    code, out, err = run(capsys, "solve", ckpt, "0110", "--solver-option", "tau=0.5")  # the run's solver, damped
    assert code == 0 and "fixed_point_iter:" in out, out + err


@pytest.mark.parametrize("argv, words", [
    (["--solver", "nope"], ["unknown solver 'nope'", "anderson"]),
    (["--solver", "anderson", "--solver-option", "mm=3"], ["no option 'mm'", "did you mean 'm'"]),
    (["--solver-option", "m"], ["expected KEY=VALUE"]),
])
def test_a_bad_solver_override_is_one_line(capsys, ckpt, argv, words):
    for command in (["solve", ckpt, "0110"], ["eval", ckpt], ["diagnose", ckpt]):
        assert_usage_error(*run(capsys, *command, *argv)[::2], *words)


def test_a_solver_takes_the_tasks_options_for_trained_loops_under_the_users():
    from deqloop.checkpoint import with_solver
    from deqloop.cli_args import solver_option
    preset = get_task("sudoku").solver_options["broyden"]
    assert preset.get("gate") is not None  # the benchmark's choice for sudoku (docs/TRAINING.md)
    assert parse_train("--task", "sudoku", "--solver", "broyden")[2].solver_options == preset
    assert parse_train("--task", "sudoku")[2].solver_options is None  # plain iteration has none
    assert parse_train("--task", "prefix_sums", "--solver", "broyden")[2].solver_options is None
    off = parse_train("--task", "sudoku", "--solver", "broyden", "--solver-option", "gate=none",
                      "--solver-option", "m=7")[2].solver_options
    assert off == {**preset, "gate": None, "m": 7} and solver_option("gate=None") == ("gate", None)
    stored = SolveConfig(solver="fixed_point_iter", solver_options={"tau": 0.5})
    assert with_solver(stored, "broyden", task="sudoku").solver_options == preset
    assert with_solver(stored, "broyden", {"warmup": 0}, task="sudoku").solver_options == {**preset, "warmup": 0}
    assert with_solver(stored, "broyden").solver_options is None  # no task: the library's defaults
    assert with_solver(stored, "broyden", task="prefix_sums").solver_options is None
    assert with_solver(stored, options={"tau": 0.7}, task="sudoku").solver_options == {"tau": 0.7}
    mine = SolveConfig(solver="broyden", solver_options={"m": 3})  # a run's own options stay its own
    assert with_solver(mine, "broyden", task="sudoku").solver_options == {"m": 3}


def test_print_config_fed_back_with_config_is_the_same_run(capsys, tmp_path):
    argv = ["train", "--task", "sudoku", "--preset", "long", "--d-model", "32", "--solver-option", "tau=0.5",
            "--out-dir", tmp_path / "run"]
    code, out, err = run(capsys, *argv, "--print-config")
    assert code == 0, err
    printed = json.loads(out)
    assert printed["train"]["steps"] == get_task("sudoku").presets["long"]["train"]["steps"]
    assert printed["model"]["d_model"] == 32 and printed["solve"]["solver_options"] == {"tau": 0.5}
    (tmp_path / "c.json").write_text(out)
    assert parse_train("--config", tmp_path / "c.json") == parse_train(*map(str, argv[1:]))
    again = run(capsys, "train", "--config", tmp_path / "c.json", "--print-config")[1]
    assert json.loads(again) == printed
    # a flag still wins over the file
    assert parse_train("--config", tmp_path / "c.json", "--lr", "0.01")[0].lr == 0.01


def test_a_runs_config_json_is_accepted_back(ckpt):
    cfg, model_cfg, solve_cfg = parse_train("--config", ckpt.parent / "config.json")
    saved = load_checkpoint(ckpt)
    assert cfg.to_dict() == TrainConfig.from_dict(saved["train_config"]).to_dict()
    assert model_cfg.to_dict() == saved["model_config"] and solve_cfg.to_dict() == saved["solve_config"]


@pytest.mark.parametrize("content, words", [
    ("not json", "is not JSON"),
    ('{"task": "prefix_sums", "model": {"width": 3}}', "unknown model fields width"),
    ('{"train": {}}', "expected an object with a task"),
    ('{"task": "prefix_sums", "extra": {}}', "unknown sections extra"),
])
def test_a_bad_config_file_is_one_line(capsys, tmp_path, content, words):
    (tmp_path / "c.json").write_text(content)
    code, _, err = run(capsys, "train", "--config", tmp_path / "c.json", "--out-dir", tmp_path / "run")
    assert_usage_error(code, err, words)


def test_config_and_task_must_agree(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "train", "--task", "sudoku", "--config", ckpt.parent / "config.json",
                       "--out-dir", tmp_path)
    assert_usage_error(code, err, "differs", "prefix_sums")
    assert_usage_error(*run(capsys, "train", "--out-dir", tmp_path)[::2], "--task")


def test_a_finished_run_says_what_it_left_and_what_to_run_next(capsys, tmp_path):
    code, out, err = run(capsys, "train", *TOY, "--steps", "2", "--eval-every", "2", "--out-dir", tmp_path)
    assert code == 0, err
    assert (tmp_path / "training.png").stat().st_size > 1000
    for words in ("metrics.jsonl", "config.json", "training.png", "final step 2", "test accuracy (difficulty @ budget)",
                  f"eval {tmp_path / 'checkpoint.pt'}", "diagnose", "solve"):
        assert words in out, out


def test_a_shipped_model_answers_by_name(capsys):
    from deqloop.checkpoint import shipped_models

    assert "prefix_sums" in shipped_models()
    code, out, err = run(capsys, "solve", "prefix_sums", "0110100111")
    assert code == 0 and out.splitlines()[0] == "0100111010", out + err  # running parity
    code, _, err = run(capsys, "solve", "no_such_model", "0110")
    assert_usage_error(code, err, "no such file", "shipped models", "prefix_sums")


def test_the_shipped_sudoku_model_solves_puzzles_of_another_generator(capsys):
    # 6 puzzles of tasks/sudoku_alt.py (not the training generator), 24-32 givens: the shipped
    # model solved all 128 of its bench sample (docs/TRAINING.md); each answer must keep the rules.
    import numpy as np

    from tasks.sudoku_alt import alt_puzzle

    rng = np.random.default_rng(2026)
    solved = 0
    for givens in (24, 26, 28, 30, 32, 32):
        puzzle, _ = alt_puzzle(rng, givens)
        code, out, err = run(capsys, "solve", "sudoku", "".join(map(str, puzzle)))
        assert code == 0, err
        solved += "\nvalid: every row" in "\n" + out
    assert solved >= 5, solved  # 100% measured; one miss allowed


def test_only_usage_errors_become_one_line(capsys, monkeypatch, ckpt):
    """A UsageError anywhere below the CLI is one line and exit 2; any other exception, a ValueError
    included, is a bug and propagates with its traceback (no catch-all turns it into a usage line)."""
    from deqloop.errors import UsageError

    def fail(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setitem(cli.COMMANDS, "solve", (cli.COMMANDS["solve"][0], cli.add_solve, fail(UsageError("bad\nthing"))))
    assert cli.main(["solve", str(ckpt), "0101"]) == 2
    assert capsys.readouterr().err == "error: bad thing\n"
    monkeypatch.setitem(cli.COMMANDS, "solve", (cli.COMMANDS["solve"][0], cli.add_solve, fail(ValueError("a bug"))))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["solve", str(ckpt), "0101"])


def test_every_config_field_has_a_train_flag():
    """Each field of ModelConfig, SolveConfig and TrainConfig (but those the task sets) is reachable
    from the command line, under the flag TRAIN_FLAGS names."""
    from dataclasses import fields

    train_parser = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items()
                        if a[0] == "train")[1]
    dests = {a.dest for a in train_parser._actions}
    for kind, cls in cli.CONFIGS.items():
        for f in fields(cls):
            if f.name not in cli.SET_BY_TASK:
                dest = next(d for d, kn in cli.TRAIN_FLAGS.items() if kn == (kind, f.name))
                assert dest in dests, f"{kind}.{f.name} has no flag"
    cfg, model_cfg, _ = cli.train_configs(cli.build_parser().parse_args(
        ["train", "--task", "prefix_sums", "--no-causal", "--z0", "random", "--z0-seed", "7"]))
    assert (model_cfg.causal, model_cfg.z0, model_cfg.z0_seed) == (False, "random", 7)


def test_train_help_names_the_recipes_that_override_a_default():
    """--help shows each flag's dataclass default, and for a field some task's recipe sets, which
    tasks set it (chess trains 8 heads although ModelConfig says 4); --preset lists every task's."""
    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(train_parser.format_help().split())
    assert "attention heads (default: 4; set by the recipe of chess)" in text
    assert "optimizer steps (default: 3000; set by the recipe of sudoku, chess)" in text
    assert "AdamW weight decay (default: 0.01)" in text  # no recipe sets it
    assert "sudoku: long; chess: long" in text


def test_train_writes_a_tensorboard_log(capsys, tmp_path):
    """--tensorboard: every train and eval row as scalars at its step, readable by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *TOY, "--out-dir", out, "--steps", "3", "--eval-every", "3", "--tensorboard")
    assert code == 0, err
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "eval/acc/8", "eval/acc/12"} <= tags, tags
    loss = events.Scalars("train/loss")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in loss] == [r["step"] for r in rows if r["kind"] == "train"]
    assert loss[-1].value == pytest.approx([r["loss"] for r in rows if r["kind"] == "train"][-1], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    code, _, err = run(capsys, "train", *TOY, "--out-dir", tmp_path / "run", "--steps", "2", "--tensorboard")
    assert_usage_error(code, err, "pip install 'deqloop[tensorboard]'")
