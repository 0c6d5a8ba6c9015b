"""The on-disk dataset cache: built once, reloaded by key, rebuilt when damaged."""

import numpy as np

from tasks.cache import cache_path, cached


def test_second_call_loads_and_other_keys_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQLOOP_CACHE", str(tmp_path))
    calls = []

    def build(value):
        def run():
            calls.append(value)
            return {"a": np.arange(5) * value, "b": np.array(["x", "y"])}
        return run

    first = cached("toy", {"seed": 1}, build(1))
    again = cached("toy", {"seed": 1}, build(99))
    other = cached("toy", {"seed": 2}, build(2))
    assert calls == [1, 2]
    assert np.array_equal(first["a"], again["a"]) and np.array_equal(other["a"], np.arange(5) * 2)
    assert list(again["b"]) == ["x", "y"] and set(again) == {"a", "b"}


def test_damaged_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQLOOP_CACHE", str(tmp_path))
    cached("toy", {"seed": 1}, lambda: {"a": np.ones(3)})
    path = cache_path("toy", {"seed": 1})
    path.write_bytes(path.read_bytes()[:20])
    out = cached("toy", {"seed": 1}, lambda: {"a": np.zeros(3)})
    assert np.array_equal(out["a"], np.zeros(3))
    assert np.array_equal(cached("toy", {"seed": 1}, lambda: {"a": np.ones(3)})["a"], np.zeros(3))
