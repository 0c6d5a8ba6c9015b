"""On-disk cache of generated datasets, keyed by everything that determines their content.

    arrays = cached("sudoku", {"seed": 0, "size": 5000, "bucket": 1, "version": 1}, build)

`build()` returns a dict of numpy arrays; the first call writes them to
`<cache dir>/sudoku-<hash of the key>.npz` (atomically: a temporary file renamed into place),
later calls with the same key load that file. The cache directory is `$DEQLOOP_CACHE`, else
`~/.cache/deqloop`. A damaged cache file is rebuilt, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np


def cache_dir() -> Path:
    return Path(os.environ.get("DEQLOOP_CACHE") or Path.home() / ".cache" / "deqloop")


def cache_path(name: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.npz"


def cached(name: str, key: dict, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `build()` makes for `key`, from disk when they were made before."""
    path = cache_path(name, key)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            if json.loads(str(arrays.pop("__key__"))) == key:
                return arrays
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged or foreign: rebuild below
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, __key__=np.array(json.dumps(key, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return arrays
