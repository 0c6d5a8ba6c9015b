"""deqloop.diagnose and `cli.py diagnose`: table, JSON, plots and verdicts; every recall x norm
combination works; bad input is one line."""

import json
import math
from pathlib import Path

import pytest

from deqloop import cli
from deqloop.checkpoint import save_checkpoint
from deqloop.diagnose import THRESHOLDS, DiagnoseSettings, diagnose_checkpoint, verdicts
from deqloop.diagnose_report import (DiagnoseReport, DifficultyRow, GeometryRow, InputDependenceRow,
                                     ReachabilityRow)
from deqloop.io import write_json
from deqloop.model import NORMS, RECALLS, Z0S, ModelConfig, SolveConfig, build_model
from deqloop.train import TrainConfig
from tests.test_cli import assert_usage_error, run, run_subprocess

SMALL = DiagnoseSettings(n_inputs=2, n_starts=1, n_geometry=1)
VERDICTS = {
    "reachability": {"unreachable", "partly reachable", "reachable from any start", "reachable from z0 only",
                     "reachable (no random starts)"},
    "input_dependence": {"ignores x", "no fixed point", "IFT unreliable", "depends on x", "mixed", "not measured"},
    "geometry": {"no fixed point", "not measured", "not contractive", "backward fails", "ill-conditioned", "marginal",
                 "well-conditioned"},
}


def make_checkpoint(path: Path, *, recall="standard", norm="outer", z0="input", test_difficulties=(5, 12)) -> Path:
    """An untrained tiny model saved as a checkpoint (the diagnostics do not need a trained one)."""
    model_cfg = ModelConfig(vocab_size=2, n_classes=2, d_model=8, n_heads=2, window=3, recall=recall, norm=norm, z0=z0)
    solve_cfg = SolveConfig(solver="fixed_point_iter", max_iter=20, tol=1e-3)
    train_cfg = TrainConfig(task="prefix_sums", test_difficulties=test_difficulties, out_dir=str(path.parent))
    save_checkpoint(path, model=build_model(model_cfg, seed=0), optimizer=None, step=0, task="prefix_sums",
                    model_cfg=model_cfg, solve_cfg=solve_cfg, train_cfg=train_cfg.to_dict(), metrics=[])
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("std") / "checkpoint.pt")


@pytest.fixture(scope="module")
def ckpt_none(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("none") / "checkpoint.pt", recall="none")


def test_diagnose_writes_table_json_and_plots(capsys, ckpt, tmp_path):
    plots = tmp_path / "plots"  # created by the command
    code, out, err = run(capsys, "diagnose", ckpt, "--n-inputs", "3", "--n-starts", "1", "--n-geometry", "1",
                         "--seed", "4", "--json", tmp_path / "d.json", "--plots", plots, "--device", "cpu")
    assert code == 0, err
    for word in ("Reachability", "Input-dependence", "Geometry", "outlook:"):
        assert word in out
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["difficulties"] == [5, 12]  # the run's test difficulties
    assert report["settings"]["n_inputs"] == 3 and report["settings"]["seed"] == 4
    assert report["thresholds"] == THRESHOLDS and report["model"]["recall"] == "standard"
    for row, d in zip(report["rows"], (5, 12)):
        assert row["difficulty"] == d and row["max_iter"] == 50  # prefix sums' eval_max_iter at these lengths
        r, i, g = row["reachability"], row["input_dependence"], row["geometry"]
        assert len(r["per_input"]["converged"]) == 3 and len(r["trace"]) == 3
        assert len(r["per_input"]["path_distance"]) == 1 and len(r["per_input"]["path_distance"][0]) == 3
        assert len(g["per_input"]["spectral_radius"]) == 1 and len(i["per_input"]["sensitivity"]) == 1
        for axis, allowed in VERDICTS.items():
            assert row["verdicts"][axis] in allowed and row["reasons"][axis]
        # this untrained cell contracts (outer norm): every number is defined and consistent
        assert r["converged"] == 1.0 and 0 < g["spectral_radius_max"] < 1 and g["cond_max"] >= 1
        assert i["fd_rel_error_max"] < 1e-4 and i["sensitivity_median"] > 0 and i["shared_fixed_points"] == 0
        assert row["verdicts"]["input_dependence"] == "depends on x"
    # 12 positions x 8 = 96 numbers: the Krylov path, not the dense Jacobian
    assert report["rows"][1]["geometry"]["per_input"]["matvecs"][0] != 96
    for name in ("residuals", "spectral_radius", "sensitivity"):
        assert (plots / f"diagnose_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_recall_fixed_points_ignore_x(ckpt_none, tmp_path):
    report = diagnose_checkpoint(ckpt_none, difficulties=[5], settings=DiagnoseSettings(n_inputs=4, n_starts=1))
    (row,) = report.rows
    i = row.input_dependence
    assert row.verdicts["input_dependence"] == "ignores x"
    assert i.sensitivity_median == 0 and i.direct_median == 0 and i.fd_rel_error_max == 0
    assert i.shared_fixed_points == 1.0  # every input's z* is a fixed point for another input
    # defaults: the JSON and plots go beside the checkpoint
    code = cli.main(["diagnose", str(ckpt_none), "--difficulty", "5", "--n-inputs", "2", "--n-starts", "0"])
    assert code == 0
    saved = json.loads((ckpt_none.parent / "diagnose.json").read_text())
    assert saved["rows"][0]["verdicts"]["reachability"] == "reachable (no random starts)"
    assert (ckpt_none.parent / "diagnose_sensitivity.png").exists()


@pytest.mark.parametrize("recall,norm", [(r, n) for r in RECALLS for n in NORMS])
def test_every_recall_and_norm(tmp_path, recall, norm):
    z0 = Z0S[(RECALLS.index(recall) + NORMS.index(norm)) % len(Z0S)]
    path = make_checkpoint(tmp_path / "checkpoint.pt", recall=recall, norm=norm, z0=z0)
    steps = []
    report = diagnose_checkpoint(path, difficulties=[4], settings=SMALL, progress=lambda *a: steps.append(a))
    (row,) = report.rows
    for axis, allowed in VERDICTS.items():
        assert row.verdicts[axis] in allowed
    if recall == "none":  # whatever else happens, a cell that does not see x has zero sensitivity
        assert row.input_dependence.sensitivity_median == 0
    assert steps[-1][1] == steps[-1][2] and [s[1] for s in steps] == list(range(len(steps)))
    write_json(report.to_dict(), tmp_path / "d.json")  # strict JSON, whatever is nan or inf
    back = DiagnoseReport.from_dict(json.loads((tmp_path / "d.json").read_text()))
    # the JSON reads back to the same typed report; strict JSON has no inf, so a non-finite number is nan
    (again,) = back.rows
    assert isinstance(again.geometry, GeometryRow) and again.verdicts == row.verdicts
    for a, b in ((again.geometry.cond_max, row.geometry.cond_max), (again.reachability.acc, row.reachability.acc),
                 (again.input_dependence.relative_median, row.input_dependence.relative_median)):
        assert a == b or (math.isnan(a) and not math.isfinite(b))


def row_with(reach=None, inp=None, geo=None):
    r = {"converged": 1.0, "start_converged": 1.0, "path_independent": 1.0}
    i = {"shared_fixed_points": 0.0, "relative_median": 0.3, "fd_rel_error_max": 1e-7, "at_fixed_point": 1.0}
    g = {"spectral_radius_max": 0.5, "cond_max": 10.0, "adjoint_converged": 1.0, "adjoint_steps_mean": 12.0}
    return DifficultyRow(reachability=ReachabilityRow(**{**r, **(reach or {})}),
                         input_dependence=InputDependenceRow(**{**i, **(inp or {})}),
                         geometry=GeometryRow(**{**g, **(geo or {})}))


@pytest.mark.parametrize("change,axis,expected", [
    ({}, "reachability", "reachable from any start"),
    ({"reach": {"converged": 0.4}}, "reachability", "unreachable"),
    ({"reach": {"converged": 0.9}}, "reachability", "partly reachable"),
    ({"reach": {"path_independent": 0.5}}, "reachability", "reachable from z0 only"),
    ({"reach": {"path_independent": math.nan}}, "reachability", "reachable (no random starts)"),
    ({}, "input_dependence", "depends on x"),
    ({"inp": {"shared_fixed_points": 0.95}}, "input_dependence", "ignores x"),
    ({"inp": {"relative_median": 0.0}}, "input_dependence", "ignores x"),
    ({"inp": {"fd_rel_error_max": 0.2}}, "input_dependence", "IFT unreliable"),
    ({"inp": {"shared_fixed_points": 0.5}}, "input_dependence", "mixed"),
    ({"inp": {"shared_fixed_points": math.nan}}, "input_dependence", "depends on x"),
    ({"inp": {"shared_fixed_points": math.nan, "at_fixed_point": 0.0}}, "input_dependence", "no fixed point"),
    ({"inp": {"at_fixed_point": 0.0}}, "geometry", "no fixed point"),
    ({}, "geometry", "well-conditioned"),
    ({"geo": {"spectral_radius_max": math.nan}}, "geometry", "not measured"),
    ({"geo": {"spectral_radius_max": 1.0}}, "geometry", "not contractive"),
    ({"geo": {"adjoint_converged": 0.5}}, "geometry", "backward fails"),
    ({"geo": {"cond_max": 2e3}}, "geometry", "ill-conditioned"),
    ({"geo": {"cond_max": math.nan}}, "geometry", "not measured"),
    ({"geo": {"spectral_radius_max": 0.97}}, "geometry", "marginal"),
])
def test_verdict_thresholds(change, axis, expected):
    verdict, reasons = verdicts(row_with(**change))
    assert verdict[axis] == expected and set(reasons) == set(VERDICTS)


def test_diagnose_bad_inputs(capsys, ckpt, tmp_path):
    assert_usage_error(*run(capsys, "diagnose", tmp_path / "none.pt")[::2], "no such file")
    garbage = tmp_path / "g.pt"
    garbage.write_text("hello")
    assert_usage_error(*run(capsys, "diagnose", garbage)[::2], "not a checkpoint")
    assert_usage_error(*run(capsys, "diagnose", ckpt, "--n-inputs", "1")[::2], "n_inputs must be >= 2")
    assert_usage_error(*run(capsys, "diagnose", ckpt, "--n-starts", "-1")[::2], "integer >= 0")
    assert_usage_error(*run(capsys, "diagnose", ckpt, "--difficulty", "-1")[::2], "integers >= 0")
    assert_usage_error(*run(capsys, "diagnose", ckpt, "--difficulty", "0")[::2], "string length in 1..4096")
    assert_usage_error(*run(capsys, "diagnose", ckpt, "--cluster-tol", "nan")[::2], "positive number")
    assert_usage_error(*run(capsys, "diagnose", ckpt, "--json", tmp_path / "no" / "d.json")[::2], "does not exist")
    assert_usage_error(*run(capsys, "diagnose", ckpt, "--plots", tmp_path / "no" / "dir")[::2], "does not exist")


def test_truncated_checkpoint_subprocess(ckpt, tmp_path):
    # The real entry point: exit code 2, one line on stderr, no traceback and no progress bar.
    bad = tmp_path / "cut.pt"
    bad.write_bytes(ckpt.read_bytes()[:300])
    r = run_subprocess("cli.py", "diagnose", bad)
    assert_usage_error(r.returncode, r.stderr, str(bad), "truncated or corrupt")


def test_a_time_budget_bounds_diagnose_and_says_what_it_cut(ckpt, capsys):
    """With no time to spare every costly measurement is cut, and the report says so: nan numbers,
    'not measured' verdicts, each cut named; without a budget nothing is cut."""
    tiny = DiagnoseSettings(n_inputs=3, n_starts=1, n_geometry=1, budget_seconds=1e-4)
    (row,) = diagnose_checkpoint(ckpt, difficulties=[12], settings=tiny).rows
    assert {"random starts", "float64 refinement", "sensitivity", "geometry"} <= set(row.not_measured)
    assert row.reachability.per_input["n_steps"] and max(row.reachability.per_input["n_steps"]) < 20  # max_iter cut
    assert "solve from z0" in row.not_measured
    assert row.verdicts["input_dependence"] == "not measured" and row.verdicts["geometry"] == "not measured"
    assert math.isnan(row.geometry.spectral_radius_max) and math.isnan(row.input_dependence.fd_rel_error_max)
    full = DiagnoseSettings(n_inputs=3, n_starts=1, n_geometry=1, budget_seconds=None)
    (row,) = diagnose_checkpoint(ckpt, difficulties=[12], settings=full).rows
    assert row.not_measured == {} and row.verdicts["geometry"] == "well-conditioned"
    code, out, err = run(capsys, "diagnose", ckpt, "--difficulty", "5", "--n-inputs", "2", "--n-starts", "1",
                         "--budget-seconds", "0.0001", "--json", ckpt.parent / "budget.json")
    assert code == 0, err
    assert "not measured: " in out and "--budget-seconds" in out
    saved = json.loads((ckpt.parent / "budget.json").read_text())
    assert saved["settings"]["budget_seconds"] == 0.0001 and "geometry" in saved["rows"][0]["not_measured"]
    with pytest.raises(ValueError, match="budget_seconds"):
        DiagnoseSettings(budget_seconds=-1.0)
