"""deqloop.grid and `cli.py grid`: every cell trained, evaluated and diagnosed once, resumably;
settings cannot silently mix; the report's statistics are right on known numbers."""

import json
import math
from dataclasses import replace

import pytest

import deqloop.train
from deqloop.checkpoint import load_checkpoint
from deqloop.grid import (GridError, GridSpec, cell_dir, claim_root, load_cell, run_cell, run_grid,
                          training_seconds)
from deqloop.grid_report import correlations, summarize, write_report
from tests.test_cli import assert_usage_error, run

TINY = GridSpec(
    task="prefix_sums", recalls=("none", "standard"), norms=("outer",), seeds=(0,),
    train={"steps": 4, "eval_every": 0, "ckpt_every": 2, "batch_size": 8, "log_every": 1,
           "train_difficulties": (8,)},
    model={"d_model": 16, "n_heads": 2}, solve={"max_iter": 6},
    eval_difficulties=(8, 16), iters=(6, 12), eval_n=8, diagnose_difficulties=(16,),
    diagnose={"n_inputs": 4, "n_starts": 1, "n_geometry": 1})


@pytest.fixture(scope="module")
def grid_root(tmp_path_factory):
    """TINY run by run_grid in child processes, two at a time."""
    root = tmp_path_factory.mktemp("grid")
    seen = []
    cells = run_grid(TINY, root, jobs=2, threads=1, progress=lambda done, total, name: seen.append((done, total)))
    return root, cells, seen


def test_every_cell_is_trained_evaluated_and_diagnosed(grid_root):
    root, cells, seen = grid_root
    assert [(c["recall"], c["norm"], c["seed"]) for c in cells] == [("none", "outer", 0), ("standard", "outer", 0)]
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)
    for c in cells:
        out = cell_dir(root, "prefix_sums", c["recall"], c["norm"], c["seed"])
        assert c["status"] == "finished" and "diagnose_error" not in c
        assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
        ev = json.loads((out / "eval.json").read_text())
        assert {(x["difficulty"], x["max_iter"]) for x in ev["cells"]} == {(8, 6), (8, 12), (16, 6), (16, 12)}
        assert all(x["n"] == 8 for x in ev["cells"])
        diag = json.loads((out / "diagnose.json").read_text())
        assert [r["difficulty"] for r in diag["rows"]] == [16] and diag["model"]["recall"] == c["recall"]
        assert c["threads"] == 1
        from deqloop.model import cpu_has_bf16
        toy = json.loads((out / "config.json").read_text())["model"]["autocast"]
        bf16 = toy == "bf16" or (toy == "auto" and cpu_has_bf16())
        assert c["train_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")


def test_a_second_run_recomputes_nothing(grid_root):
    root, _, _ = grid_root
    files = sorted(root.rglob("cell.json"))
    before = [(p, p.stat().st_mtime_ns) for p in files]
    seen = []
    run_grid(TINY, root, jobs=2, progress=lambda done, total, name: seen.append((done, total)))
    assert seen == [(2, 2)]  # all done before anything ran
    assert [(p, p.stat().st_mtime_ns) for p in sorted(root.rglob("cell.json"))] == before


def test_more_seeds_reuse_the_finished_cells(grid_root):
    root, _, _ = grid_root
    bigger = GridSpec(**{**TINY.__dict__, "seeds": (0, 1)})
    assert bigger.fingerprint() == TINY.fingerprint()
    assert load_cell(bigger, root, "none", "outer", 0) is not None
    assert load_cell(bigger, root, "none", "outer", 1) is None


def test_other_settings_in_the_same_root_are_an_error(grid_root):
    root, _, _ = grid_root
    other = GridSpec(**{**TINY.__dict__, "train": {**TINY.train, "steps": 5}})
    with pytest.raises(GridError, match="train"):
        claim_root(other, root)


def test_a_killed_cell_resumes_its_training(tmp_path):
    """A cell whose training stopped at step 2 (its checkpoint) continues to step 4, not from 0."""
    short = GridSpec(**{**TINY.__dict__, "train": {**TINY.train, "steps": 2}})
    run_cell(short, tmp_path, "standard", "outer", 0)
    out = cell_dir(tmp_path, "prefix_sums", "standard", "outer", 0)
    (out / "cell.json").unlink()
    cell = run_cell(TINY, tmp_path, "standard", "outer", 0)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert cell["status"] == "finished" and ckpt["step"] == 4
    assert [m["step"] for m in ckpt["metrics"] if m["kind"] == "resume"] == [2]
    assert [m["step"] for m in ckpt["metrics"] if m["kind"] == "train"] == [1, 2, 3, 4]
    times = {m["step"]: m["time"] for m in ckpt["metrics"] if m["kind"] == "train"}
    assert cell["train_seconds"] == pytest.approx(times[2] + times[4])  # both sittings, not the last one


def test_training_seconds_sums_the_sittings():
    rows = [{"kind": "train", "step": 1, "time": 1.0}, {"kind": "train", "step": 2, "time": 2.5},
            {"kind": "resume", "step": 2}, {"kind": "eval", "step": 2},
            {"kind": "train", "step": 3, "time": 0.5}, {"kind": "train", "step": 4, "time": 1.25}]
    assert training_seconds(rows) == pytest.approx(3.75)
    assert training_seconds(rows[:2]) == pytest.approx(2.5)
    assert training_seconds([{"kind": "resume", "step": 0}]) is None


def test_a_diverged_run_is_a_result_not_a_crash(tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise FloatingPointError("loss is nan at step 3")

    spec = GridSpec(**{**TINY.__dict__, "recalls": ("none",)})
    run_cell(spec, tmp_path, "none", "outer", 0)  # a real run, then the same cell diverging for seed 1
    monkeypatch.setattr(deqloop.train, "train", diverge)
    cell = run_cell(spec, tmp_path, "none", "outer", 1)
    assert cell["status"] == "diverged" and "nan" in cell["error"]
    summary = summarize(GridSpec(**{**spec.__dict__, "seeds": (0, 1)}), tmp_path)
    (config,) = summary["configs"]
    assert config["n"] == 2 and config["n_diverged"] == 1 and config["harder_acc"]["n"] == 2
    good = next(c for c in summary["cells"] if c["seed"] == 0)
    assert not math.isnan(good["harder_acc"])
    assert config["harder_acc"]["mean"] == pytest.approx(good["harder_acc"] / 2)  # the diverged run counts as 0
    assert all(r["n"] <= 1 for r in summary["correlations"])  # and is not in the correlations


def test_summary_and_report(grid_root, tmp_path):
    root, _, _ = grid_root
    summary = summarize(TINY, root)
    assert summary["n_done"] == 2 and summary["train_difficulties"] == [8] and summary["harder_difficulties"] == [16]
    for c in summary["cells"]:
        acc = json.loads((cell_dir(root, "prefix_sums", c["recall"], "outer", 0) / "eval.json").read_text())["cells"]
        by = {(x["difficulty"], x["max_iter"]): x["acc"] for x in acc}
        assert c["train_level_acc"] == by[(8, 6)]  # training difficulty at the training budget
        assert c["harder_acc"] == by[(16, 12)]  # harder difficulty at the largest budget
        assert set(c["axes"]["16"]) >= {"converged", "shared", "distinct", "rho", "log10_cond"}
    paths = write_report(TINY, summary, tmp_path)
    names = {p.name for p in paths}
    assert names == {"prefix_sums.md", "prefix_sums_summary.json", "prefix_sums_accuracy.png", "prefix_sums_axes.png"}
    md = (tmp_path / "prefix_sums.md").read_text()
    assert "| none | outer | 1 |" in md and "| standard | outer | 1 |" in md
    assert json.loads((tmp_path / "prefix_sums_summary.json").read_text())["n_done"] == 2


def test_train_column_reads_the_first_budget_above_an_unevaluated_training_budget(grid_root, tmp_path):
    """A grid whose budgets skip the training budget (chess trains at 12, evaluates from 16): the
    *train* column reads the first budget above it, and the report says which."""
    import shutil

    root, _, _ = grid_root
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    for recall in TINY.recalls:
        path = cell_dir(copy, "prefix_sums", recall, "outer", 0) / "eval.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "train_max_iter": 5}))
    summary = summarize(TINY, copy)
    for c in summary["cells"]:
        acc = json.loads((cell_dir(copy, "prefix_sums", c["recall"], "outer", 0) / "eval.json").read_text())["cells"]
        by = {(x["difficulty"], x["max_iter"]): x["acc"] for x in acc}
        assert c["train_budget"] == 6 and c["train_level_acc"] == by[(8, 6)]
    write_report(TINY, summary, tmp_path)
    assert "(6 for 5)" in (tmp_path / "prefix_sums.md").read_text()


def test_correlations_on_known_ranks():
    def cell(x, acc):
        return {"status": "finished", "harder_acc": acc,
                "axes": {"8": {k: x for k in ("converged", "path_independent", "shared", "distinct",
                                              "sensitivity", "rho", "log10_cond")}}}

    rows = correlations([cell(x, a) for x, a in [(0.1, 0.0), (0.2, 0.3), (0.5, 0.4), (0.9, 1.0), (math.inf, 1.0)]])
    assert {r["axis"] for r in rows} == {"converged", "path_independent", "shared", "distinct", "sensitivity",
                                         "rho", "log10_cond"}
    for r in rows:  # ranks of x and acc agree except the tie at the top: rho just below 1
        assert r["n"] == 5 and 0.9 < r["rho"] < 1.0
    flat = correlations([cell(x, 0.5) for x in (0.1, 0.2, 0.3, 0.4)])
    assert all(math.isnan(r["rho"]) for r in flat)  # constant accuracy: no correlation to report


def test_cli_grid_bad_input_is_one_line(capsys, tmp_path):
    assert_usage_error(*run(capsys, "grid", "nosuch", "--root", tmp_path)[::2], "no grid for task", "prefix_sums")
    assert_usage_error(*run(capsys, "grid", "prefix_sums", "--recall", "sideways", "--report-only",
                            "--root", tmp_path)[::2], "sideways")
    code, _, err = run(capsys, "grid", "prefix_sums", "--seeds", "a,b")
    assert code == 2 and "0,1,2" in err


def test_cli_grid_report_only(capsys, grid_root, tmp_path):
    root, _, _ = grid_root
    code, out, _ = run(capsys, "grid", "prefix_sums", "--root", root, "--report-only", "--report-dir", tmp_path)
    assert code == 0 and "0 of 36 runs done" in out  # the preset grid's settings are not TINY's
    assert (tmp_path / "prefix_sums.md").exists()


def test_a_cell_runs_in_one_process_at_a_time(tmp_path):
    from deqloop.grid import CellBusy, _cell_lock

    with _cell_lock(cell_dir(tmp_path, "prefix_sums", "none", "outer", 0)):
        with pytest.raises(CellBusy, match="another process"):
            run_cell(TINY, tmp_path, "none", "outer", 0)
    assert not (cell_dir(tmp_path, "prefix_sums", "none", "outer", 0) / "checkpoint.pt").exists()


def test_a_running_cells_step_is_read_from_its_metrics(tmp_path):
    """The grid's status line reads a running cell's last train step; a half-written last row
    (the child is appending) and a missing file are not errors."""
    from deqloop.grid import _last_step

    assert _last_step(tmp_path) == 0
    rows = [{"kind": "train", "step": 10}, {"kind": "resume", "step": 10}, {"kind": "train", "step": 20},
            {"kind": "eval", "step": 20}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    assert _last_step(tmp_path) == 20


def test_cli_grid_set_changes_every_cell_and_is_checked(capsys, tmp_path):
    from deqloop.grid import GRIDS, spec_changes, with_settings

    spec = with_settings(GRIDS["prefix_sums"], [("train.jac_reg", 0.5), ("solve.backward", "ift")])
    assert spec.train["jac_reg"] == 0.5 and spec.train["steps"] == GRIDS["prefix_sums"].train["steps"]
    assert spec.fingerprint() != GRIDS["prefix_sums"].fingerprint()  # another root, never a silent mix
    assert spec_changes(spec) == ["train.jac_reg=0.5", "solve.backward=ift"]
    code, out, _ = run(capsys, "grid", "prefix_sums", "--set", "train.jac_reg=0.5", "--report-only",
                       "--root", tmp_path)
    assert code == 0
    report = (tmp_path / "prefix_sums" / "prefix_sums.md").read_text()
    assert "--set train.jac_reg=0.5" in report and "`train.jac_reg=0.5`" in report
    for bad, words in ((["--set", "jac_reg=1"], "SECTION.FIELD"), (["--set", "train.nosuch=1"], "nosuch"),
                       (["--set", "train.jac_reg=abc"], "jac_reg"), (["--set", "model.recall=none"], "recall")):
        assert_usage_error(*run(capsys, "grid", "prefix_sums", *bad, "--report-only", "--root", tmp_path)[::2], words)


def test_cli_grid_iters_sets_every_cells_budgets_and_is_checked(capsys, tmp_path):
    from deqloop.grid import GRIDS, spec_changes

    spec = replace(GRIDS["prefix_sums"], iters=(60, 960))
    assert spec.fingerprint() != GRIDS["prefix_sums"].fingerprint()  # another root, never a silent mix
    assert spec_changes(spec) == ["iters=60,960"]
    code, _, _ = run(capsys, "grid", "prefix_sums", "--iters", "60,960", "--set", "solve.max_iter=60",
                     "--report-only", "--root", tmp_path)
    assert code == 0
    report = (tmp_path / "prefix_sums" / "prefix_sums.md").read_text()
    assert "grid prefix_sums --set solve.max_iter=60 --iters 60,960`" in report and "`iters=60,960`" in report
    assert "(budgets here: 60,960, `--iters`)." in report  # the grid's size note names other budgets
    assert_usage_error(*run(capsys, "grid", "prefix_sums", "--iters", "0,20", "--report-only", "--root", tmp_path)[::2],
                       "16,32")
