"""Fault injection: what a hostile or careless user can do to a run, and what must still hold.

Each case reproduces a fault once found (issue 17): a NaN step must not poison the checkpoint, a
failed adjoint solve must be reported, two trainings must not share a directory, a signal must
end a sudoku pool build at once, a damaged cache member must be rebuilt, a full disk or a damaged
checkpoint must give one line, leftovers of killed saves must go. Kill -9 during a run and exact
resume are in test_train.py, bad checkpoint files in test_checkpoint.py.
"""

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from deqloop import cli
from deqloop import checkpoint as ckpt_mod
from deqloop.checkpoint import CheckpointError, load_checkpoint
from deqloop.io import lock_dir
from solvers import anderson, fixed_point_iter
from tasks.cache import cache_path, cached

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--task", "prefix_sums", "--d-model", "16", "--heads", "2", "--batch-size", "8", "--max-iter", "10",
       "--train-difficulties", "8,16", "--test-difficulties", "8,16", "--eval-size", "8", "--log-every", "1",
       "--seed", "3"]


def run(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def strict_rows(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A finished toy run: its checkpoint."""
    out = tmp_path_factory.mktemp("good")
    assert cli.main(["train", *TOY, "--steps", "4", "--eval-every", "0", "--out-dir", str(out)]) == 0
    return out / "checkpoint.pt"


# ------------------------------------------------------------------ training

def test_a_nan_gradient_never_reaches_the_checkpoint(capsys, tmp_path):
    # lr 1000 without clipping: the weights blow up within ~25 steps, then the gradient is nan or inf.
    code, _, err = run(capsys, "train", *TOY, "--steps", "150", "--lr", "1000", "--grad-clip", "0",
                       "--ckpt-every", "1", "--out-dir", tmp_path)
    assert code == 1 and re.search(r"gradient norm is (nan|inf)", one_line_error(err)) and "not applied" in err
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert 0 < saved["step"] < 150
    assert all(bool(torch.isfinite(v).all()) for v in saved["model"].values())  # resumable weights
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == saved["step"]


def test_saving_nonfinite_weights_is_refused(good, tmp_path):
    model, _ = ckpt_mod.load_model(good)
    saved = load_checkpoint(good)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(good.read_bytes())
    with pytest.raises(FloatingPointError, match="nan or inf"):
        ckpt_mod.save_checkpoint(target, model=model, optimizer=None, step=99, task="prefix_sums",
                                 model_cfg=ckpt_mod.configs(saved)[0], solve_cfg=ckpt_mod.configs(saved)[1],
                                 train_cfg=saved["train_config"], metrics=[])
    assert load_checkpoint(target)["step"] == saved["step"]  # the good one, untouched


def test_a_failed_adjoint_solve_is_reported(capsys, tmp_path):
    code, _, err = run(capsys, "train", *TOY, "--steps", "3", "--eval-every", "0", "--backward", "ift",
                       "--b-solver", "fixed_point_iter", "--b-max-iter", "1", "--out-dir", tmp_path)
    assert code == 0 and "warning: step 1: the IFT adjoint solve failed" in err and "MAX_ITER" in err
    train_rows = [r for r in strict_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["b_failures"] for r in train_rows] == [1, 2, 3]
    assert all(r["b_converged"] == 0.0 and r["b_steps"] == 1.0 for r in train_rows)


def test_a_converged_adjoint_logs_its_solve_without_warning(capsys, tmp_path):
    code, _, err = run(capsys, "train", *TOY, "--steps", "2", "--eval-every", "0", "--backward", "ift",
                       "--out-dir", tmp_path)
    assert code == 0 and "warning" not in err, err
    row = [r for r in strict_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert row["b_failures"] == 0 and row["b_converged"] == 1.0 and row["b_max_residual"] < 1e-4


def test_a_run_that_diverges_to_a_finite_loss_says_so(capsys, tmp_path):
    code, _, err = run(capsys, "train", *TOY, "--steps", "60", "--lr", "10", "--eval-every", "0",
                       "--out-dir", tmp_path)
    assert code == 0 and "the run diverged" in err, err


def test_a_healthy_run_gives_no_divergence_warning(capsys, tmp_path):
    code, _, err = run(capsys, "train", *TOY, "--steps", "40", "--lr", "3e-3", "--eval-every", "0",
                       "--out-dir", tmp_path)
    assert code == 0 and "diverged" not in err, err


def test_two_trainings_cannot_share_an_out_dir(capsys, tmp_path):
    holder = lock_dir(tmp_path)  # as a running training holds it
    try:
        code, _, err = run(capsys, "train", *TOY, "--steps", "2", "--out-dir", tmp_path)
        assert code == 2 and f"in use by another training (pid {os.getpid()})" in one_line_error(err)
        assert not (tmp_path / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        holder.close()
    assert run(capsys, "train", *TOY, "--steps", "2", "--eval-every", "0", "--out-dir", tmp_path)[0] == 0


def test_the_lock_dies_with_its_process(tmp_path):
    # kill -9 releases the flock: the next training in the directory is not refused.
    script = f"from deqloop.io import lock_dir; import time; held = lock_dir(__import__('pathlib').Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(FileExistsError):
        lock_dir(tmp_path)
    child.kill()
    child.wait(10)
    lock_dir(tmp_path).close()


def test_disk_full_while_saving_is_one_line_and_keeps_the_old_checkpoint(capsys, good, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(good.read_bytes())
    before = load_checkpoint(out / "checkpoint.pt")["step"]

    def full(obj, fh):
        fh.write(b"PK\x03\x04 part of a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fh.name))

    monkeypatch.setattr(torch, "save", full)
    code, _, err = run(capsys, "train", *TOY, "--steps", "6", "--eval-every", "0", "--resume", "--out-dir", out)
    assert code == 1 and "No space left on device" in one_line_error(err)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint")) == []


def test_a_killed_saves_leftover_is_removed_by_the_next_save(capsys, good, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(good.read_bytes())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".checkpoint.pt.tmp-{int(dead.stdout)}"  # a pid that no longer runs
    stale.write_bytes(b"PK\x03\x04 half")
    mine = out / f".checkpoint.pt.tmp-{os.getppid()}"  # a live process's save in progress: left alone
    mine.write_bytes(b"PK\x03\x04 half")
    assert run(capsys, "train", *TOY, "--steps", "6", "--eval-every", "0", "--resume", "--out-dir", out)[0] == 0
    assert not stale.exists() and mine.exists()


# ------------------------------------------------------------------ checkpoints given to the commands

def test_a_malicious_pickle_runs_nothing(capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt_mod.FORMAT, "model": {"w": Payload()}}, path)
    for argv in (["solve", path, "0101"], ["eval", path], ["diagnose", path]):
        code, _, err = run(capsys, *argv)
        line = one_line_error(err)
        assert code == 2 and "system" in line and "refused without running it" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("field, value, words", [
    ("model", [1, 2], "model is a list, not a dict"),
    ("model", {"w": "text"}, "not tensors"),
    ("optimizer", "x", "optimizer is a str"),
    ("step", -3, "step is -3"),
    ("metrics", {"a": 1}, "metrics is a dict"),
])
def test_a_checkpoint_with_wrong_field_types_is_one_line(capsys, good, tmp_path, field, value, words):
    state = torch.load(good, weights_only=True)
    state[field] = value
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    for argv in (["solve", path, "0101"], ["eval", path, "--n", "2"], ["diagnose", path, "--n-inputs", "2"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and words in one_line_error(err), err


@pytest.mark.parametrize("section, field, value, words", [
    ("train_config", "steps", "%s", "steps must be int, got '%s'"),
    ("model_config", "d_model", "%s", "d_model must be int, got '%s'"),
    ("solve_config", "max_iter", "%d", "max_iter must be int, got '%d'"),
    ("metrics", None, [1, "x"], "rows that are not dicts"),
])
def test_garbage_inside_a_checkpoint_is_named(capsys, good, tmp_path, section, field, value, words):
    state = torch.load(good, weights_only=True)
    if field is None:
        state[section] = value
    else:
        state[section] = {**state[section], field: value}
    torch.save(state, tmp_path / "checkpoint.pt")
    code, _, err = run(capsys, "train", *TOY, "--out-dir", tmp_path, "--resume")
    assert code == 2 and words in one_line_error(err), err
    if section != "train_config":  # solve does not read the training settings
        code, _, err = run(capsys, "solve", tmp_path / "checkpoint.pt", "0101")
        assert code == 2 and words in one_line_error(err), err


def test_a_full_disk_while_writing_eval_json_is_one_line(capsys, good, tmp_path, monkeypatch):
    import deqloop.io

    class Full:  # a file on a full disk: it opens (the temp file exists), every write fails
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(deqloop.io, "open", lambda path, mode="r": Full(open(path, mode)), raising=False)
    code, _, err = run(capsys, "eval", good, "--n", "2", "--iters", "5", "--json", tmp_path / "e.json",
                       "--plot", tmp_path / "e.png")
    monkeypatch.undo()
    line = one_line_error(err)
    assert code == 2 and "No space left on device" in line and str(tmp_path / "e.json") in line, line
    assert [p.name for p in tmp_path.iterdir()] == []  # no empty temp file


def test_outputs_are_checked_before_the_work(capsys, good, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    cases = [(["eval", good, "--json", tmp_path / "a_dir"], "is a directory"),
             (["diagnose", good, "--plots", tmp_path / "a_file"], "is a file"),
             (["diagnose", good, "--json", tmp_path / "a_dir"], "is a directory")]
    for argv, words in cases:
        t0 = time.time()
        code, _, err = run(capsys, *argv)
        assert code == 2 and words in one_line_error(err) and time.time() - t0 < 5, err


def test_a_huge_difficulty_is_refused_before_the_work(capsys, good):
    for argv in (["diagnose", good, "--difficulty", "99999"], ["eval", good, "--difficulties", "99999"],
                 ["solve", good, "1" * 5000]):
        t0 = time.time()
        code, _, err = run(capsys, *argv)
        assert code == 2 and "4096" in one_line_error(err) and time.time() - t0 < 5, err


def test_a_negative_seed_is_one_line(capsys, good, tmp_path):
    assert_two = [run(capsys, "diagnose", good, "--seed", "-5"), run(capsys, "train", *TOY, "--seed", "-1",
                                                                       "--out-dir", tmp_path)]
    for code, _, err in assert_two:
        assert code == 2, err
        one_line_error(err)


# ------------------------------------------------------------------ solvers given odd maps

@pytest.mark.parametrize("solver", [fixed_point_iter, anderson])
def test_an_empty_batch_is_a_clear_error(solver):
    with pytest.raises(ValueError, match="at least one sample"):
        solver(lambda z: 0.5 * z, torch.zeros(0, 4))


@pytest.mark.parametrize("solver", [fixed_point_iter, anderson])
def test_a_map_into_another_shape_is_refused(solver):
    with pytest.raises(ValueError, match=r"maps a \(2, 6\) input to shape \(2, 3, 2\)"):
        solver(lambda z: 0.5 * z.reshape(2, 3, 2), torch.ones(2, 6))


# ------------------------------------------------------------------ the dataset cache

def _cached_toy(tmp_path, monkeypatch, value=1.0):
    monkeypatch.setenv("DEQLOOP_CACHE", str(tmp_path))
    return cached("toy", {"seed": 1}, lambda: {"a": np.full(64, value), "b": np.arange(64)})


def _rewrite_member(path, name, transform):
    with zipfile.ZipFile(path) as zin:
        members = [(item, zin.read(item)) for item in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for item, blob in members:
            if item.filename == name:
                blob = transform(blob)
            if blob is not None:
                zout.writestr(item, blob)


@pytest.mark.parametrize("damage", ["flipped_bytes", "directory", "missing_array", "garbage_contents"])
def test_a_damaged_cache_member_is_rebuilt(tmp_path, monkeypatch, damage):
    _cached_toy(tmp_path, monkeypatch)
    path = cache_path("toy", {"seed": 1})
    if damage == "flipped_bytes":  # inside the compressed member: zlib fails
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
        path.write_bytes(bytes(data))
    elif damage == "directory":
        path.unlink()
        path.mkdir()
        (path / "x").write_text("x")
    elif damage == "missing_array":
        _rewrite_member(path, "b.npy", lambda blob: None)
    else:  # a valid array of the right name and shape, other contents
        buf = __import__("io").BytesIO()
        np.save(buf, np.full(64, 7.0))
        _rewrite_member(path, "a.npy", lambda blob: buf.getvalue())
    rebuilt = []
    out = cached("toy", {"seed": 1}, lambda: rebuilt.append(1) or {"a": np.full(64, 2.0), "b": np.arange(64)})
    assert rebuilt == [1] and np.array_equal(out["a"], np.full(64, 2.0))
    assert path.is_file() and np.array_equal(cached("toy", {"seed": 1}, lambda: 1 / 0)["a"], np.full(64, 2.0))


def test_a_cache_file_from_before_checksums_is_kept_and_upgraded(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQLOOP_CACHE", str(tmp_path))
    path = cache_path("toy", {"seed": 1})
    np.savez_compressed(path, __key__=np.array(json.dumps({"seed": 1})), a=np.ones(3))
    assert np.array_equal(cached("toy", {"seed": 1}, lambda: 1 / 0)["a"], np.ones(3))
    with np.load(path) as data:
        assert "__sha256__" in data.files


# ------------------------------------------------------------------ signals during a sudoku pool build

def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid`, from /proc (the project runs on Linux: fcntl locks, fork pools)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_pool_build_at_once_without_orphans(tmp_path, signum):
    # under training's handlers (a first signal means "stop after this step"), as when a run
    # builds its pools on its first step
    script = ("from deqloop.train import _catch_signals; from tasks.sudoku import build_pool; "
              "_catch_signals([]); print('start', flush=True); "
              "build_pool(0, 'train', 3, 100000, workers=2, chunk_size=256)")
    env = {**os.environ, "DEQLOOP_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        assert child.stdout.readline().strip() == "start"
        deadline = time.time() + 30
        while len(_children(child.pid)) < 2 and time.time() < deadline:  # the workers are up
            time.sleep(0.1)
        workers = _children(child.pid)
        assert len(workers) >= 2
        time.sleep(0.5)
        t0 = time.time()
        child.send_signal(signum)
        child.wait(timeout=10)
        assert time.time() - t0 < 5 and child.returncode != 0
        time.sleep(0.3)
        assert [w for w in workers if Path(f"/proc/{w}").exists()] == []  # no orphan worker
    finally:  # a failing run must not leave its processes behind
        for pid in [child.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.wait()
