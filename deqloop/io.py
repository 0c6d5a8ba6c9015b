"""Helpers every command shares: the device, atomic files, strict JSON, the directory lock, the
progress bar.

Atomic writes go to `.{name}.tmp-{pid}` beside the target and are renamed over it (os.replace
on one filesystem), so a reader, or a run killed mid-write, sees the old file or the new one.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """auto: cuda if available, else cpu; a bare "cuda" under torchrun is this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank or 0)
    return device


def temp_path(path: Path) -> Path:
    """The temporary file an atomic write of `path` goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, fsync: bool = False) -> Iterator[IO]:
    """A file to write that replaces `path` only once written and closed; on an error (a full
    disk) `path` keeps its old content and no temporary file is left."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def strict_json(value):
    """`value` with every non-finite float as None, so the JSON is strict (no NaN, Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(report: dict, path: str | Path) -> None:
    """Every number of the report as strict JSON (a non-finite value is written as null), atomically."""
    clean = json.loads(json.dumps(report), parse_constant=lambda _: None)
    with atomic_file(path) as fh:
        fh.write(json.dumps(clean, indent=1, allow_nan=False) + "\n")


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Replace `path` by `rows` as JSON lines, atomically."""
    with atomic_file(path) as fh:
        fh.write("".join(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in rows))


def lock_dir(out_dir: Path, what: str = "training") -> IO:
    """An exclusive lock on out_dir/.train.lock, held while the returned file stays open (the kernel
    drops it when the process dies, kill -9 included); FileExistsError if another process holds it."""
    fh = open(out_dir / ".train.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise FileExistsError(f"{out_dir} is in use by another {what} (pid {holder}); wait for it, or choose "
                              "another --out-dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def progress_bar(*, info: bool = False, eta: bool = True, transient: bool = False,
                 console: Console | None = None) -> Progress:
    """The one progress-bar layout: description, bar, done/total, [a live info field], elapsed, ETA.
    Not started; use it as a context manager or call start() / stop()."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns.append(TimeElapsedColumn())
    if eta:
        columns.append(TimeRemainingColumn())
    console = console or Console(stderr=True)
    # outside a terminal a bar is one truncated line at the end: the callers print plain lines instead
    return Progress(*columns, console=console, transient=transient, disable=not console.is_terminal)
