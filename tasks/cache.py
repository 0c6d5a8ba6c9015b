"""On-disk cache of generated datasets, keyed by everything that determines their content.

    arrays = cached("sudoku", {"seed": 0, "size": 5000, "bucket": 1, "version": 1}, build)

`build()` returns a dict of numpy arrays; the first call writes them to
`<cache dir>/sudoku-<hash of the key>.npz` (atomically: a temporary file renamed into place),
later calls with the same key load that file. The cache directory is `$DEQLOOP_CACHE`, else
`~/.cache/deqloop`. A damaged cache file is rebuilt, not trusted: each file stores the sha256
of its arrays (files from before checksums are trusted once and given theirs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np


def cache_dir() -> Path:
    return Path(os.environ.get("DEQLOOP_CACHE") or Path.home() / ".cache" / "deqloop")


def cache_path(name: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.npz"


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the arrays' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, a.shape]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _load(path: Path, key: dict) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is damaged, foreign or not what it claims."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        stored_key = json.loads(str(arrays.pop("__key__")))
        digest = arrays.pop("__sha256__", None)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    if stored_key != key:
        return None
    if digest is None:  # written before checksums: trusted once, and given one
        _write(path, key, arrays)
        return arrays
    return arrays if str(digest) == checksum(arrays) else None


def _write(path: Path, key: dict, arrays: dict[str, np.ndarray]) -> None:
    write_npz(path, {"__key__": np.array(json.dumps(key, sort_keys=True)),
                     "__sha256__": np.array(checksum(arrays)), **arrays}, mode=0o600)


def write_npz(path: Path, arrays: dict[str, np.ndarray], mode: int = 0o644) -> None:
    """Write `arrays` to `path` (compressed npz) atomically: a temporary file beside it, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.chmod(tmp, mode)  # mkstemp makes it private
        if path.is_dir() and not path.is_symlink():  # something else took the file's name
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached(name: str, key: dict, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `build()` makes for `key`, from disk when they were made before. A file that does
    not load, belongs to another key, or whose contents fail their sha256 is rebuilt."""
    path = cache_path(name, key)
    if path.exists():
        arrays = _load(path, key)
        if arrays is not None:
            return arrays
    arrays = build()
    _write(path, key, arrays)
    return arrays
