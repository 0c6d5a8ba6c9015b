"""Checkpoints: a round trip rebuilds the same model; every damaged file is one clear CheckpointError."""

import dataclasses
import pickle
import zipfile

import pytest
import torch

import deqloop
from deqloop import checkpoint
from deqloop.checkpoint import CheckpointError, configs, load_checkpoint, load_model, save_checkpoint
from deqloop.model import ModelConfig, SolveConfig, build_model
from deqloop.train import TrainConfig
from tasks import get_task



MODEL_CFG = ModelConfig(vocab_size=2, n_classes=2, d_model=16, n_heads=2, window=4, recall="internal",
                        norm="post", z0="random", z0_seed=3)
SOLVE_CFG = SolveConfig(solver="broyden", max_iter=12, tol=1e-4, solver_options={"m": 7}, backward="phantom",
                        phantom_steps=2)
TRAIN_CFG = TrainConfig(task="prefix_sums", seed=5, steps=9, train_difficulties=(8, 12), test_difficulties=(8, 16),
                        out_dir="somewhere")
TOKENS = torch.randint(0, 2, (4, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model and optimizer one step into training, saved; returns (path, model, optimizer)."""
    model = build_model(MODEL_CFG, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits, _ = model(TOKENS, SOLVE_CFG)
    get_task("prefix_sums").loss(logits, TOKENS.cumsum(1) % 2).backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, step=1, task="prefix_sums", model_cfg=MODEL_CFG,
                    solve_cfg=SOLVE_CFG, train_cfg=TRAIN_CFG.to_dict(), metrics=[{"kind": "train", "step": 1}])
    return path, model, optimizer


def test_round_trip_same_logits(saved):
    path, model, _ = saved
    loaded, task = load_model(path)
    assert task.name == "prefix_sums" and not loaded.training
    with torch.no_grad():
        expected, _ = model(TOKENS, SOLVE_CFG)
        got, _ = loaded(TOKENS, SOLVE_CFG)
    assert torch.equal(got, expected)


def test_round_trip_configs_and_state(saved):
    path, _, optimizer = saved
    ckpt = load_checkpoint(path)
    assert configs(ckpt) == (MODEL_CFG, SOLVE_CFG)
    assert TrainConfig.from_dict(ckpt["train_config"]) == TRAIN_CFG
    assert ckpt["task"] == "prefix_sums" and ckpt["step"] == 1 and ckpt["data_seed"] == 5
    assert ckpt["deqloop_version"] == deqloop.__version__ and ckpt["torch_version"] == str(torch.__version__)
    assert ckpt["metrics"] == [{"kind": "train", "step": 1}]
    fresh = torch.optim.AdamW(build_model(MODEL_CFG, seed=1).parameters(), lr=1e-2)
    fresh.load_state_dict(ckpt["optimizer"])
    for a, b in zip(fresh.state.values(), optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_plain_values_saved(saved):
    # weights_only=True is what load_checkpoint uses; plain torch.load agrees on the content
    ckpt = torch.load(saved[0], weights_only=True)
    assert set(checkpoint.KEYS) <= set(ckpt)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, (str, int)) and plain(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return all(map(plain, v))
        return v is None or type(v) in (str, int, float, bool) or isinstance(v, torch.Tensor)

    assert plain(ckpt)


def test_atomic_write_leaves_old_file_on_failure(saved, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(saved[0].read_bytes())

    def broken_save(obj, fh):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=saved[1], optimizer=None, step=2, task="prefix_sums", model_cfg=MODEL_CFG,
                        solve_cfg=SOLVE_CFG, train_cfg=TRAIN_CFG.to_dict(), metrics=[])
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def rewrite(path, src, **changes):
    ckpt = torch.load(src, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return path


@dataclasses.dataclass
class NotPlain:
    x: int = 1


def damaged(kind, src, path):
    data = src.read_bytes()
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    writes = {
        "empty": b"",
        "garbage": b"this is not a checkpoint\n" * 10,
        "truncated": data[: len(data) // 2],
        "truncated_tail": data[:-10],
        "pickle": pickle.dumps({"format": checkpoint.FORMAT}),
    }
    if kind in writes:
        path.write_bytes(writes[kind])
        return path
    if kind == "state_dict_only":
        torch.save(build_model(MODEL_CFG, seed=0).state_dict(), path)
        return path
    if kind == "object":
        torch.save({"format": checkpoint.FORMAT, "x": NotPlain()}, path)
        return path
    if kind == "future_version":
        return rewrite(path, src, format_version=checkpoint.FORMAT_VERSION + 1)
    if kind == "incomplete":
        return rewrite(path, src, optimizer=None)
    if kind == "corrupt_member":  # a complete zip whose pickle record is damaged
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
            for item in zin.infolist():
                blob = zin.read(item)
                zout.writestr(item, blob[: len(blob) // 3] if item.filename.endswith("data.pkl") else blob)
        return path
    raise AssertionError(kind)


PROBLEMS = {
    "missing": "no such file",
    "directory": "not a file",
    "empty": "empty file",
    "garbage": "not a checkpoint",
    "truncated": "truncated or corrupt",
    "truncated_tail": "truncated or corrupt",
    "pickle": "not a checkpoint",
    "state_dict_only": "not a deqloop checkpoint",
    "object": "NotPlain",
    "future_version": "format version",
    "incomplete": "missing optimizer",
    "corrupt_member": "corrupt",
}


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
def test_bad_file_is_one_line_error(saved, tmp_path, kind):
    path = damaged(kind, saved[0], tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert str(path) in message and PROBLEMS[kind] in message, message


def test_configs_of_another_version(saved, tmp_path):
    ckpt = torch.load(saved[0], weights_only=True)
    ckpt["model_config"]["no_such_field"] = 1
    path = rewrite(tmp_path / "other.pt", saved[0], model_config=ckpt["model_config"])
    with pytest.raises(CheckpointError, match="do not fit this deqloop"):
        load_model(path)
    state = dict(ckpt["model"])
    state.pop("head.weight")
    path = rewrite(tmp_path / "other2.pt", saved[0], model=state)
    with pytest.raises(CheckpointError, match="weights do not fit") as info:
        load_model(path)
    assert "\n" not in str(info.value)
