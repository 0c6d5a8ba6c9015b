"""The command line's argument types and checks: each turns one flag's text into a value, or
fails with the one-line message argparse prints (argparse.ArgumentTypeError), or a UsageError."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deqloop.errors import UsageError


def _int_list(text: str, low: int, example: str) -> tuple[int, ...]:
    parts = [v.strip() for v in text.split(",") if v.strip()]
    if not parts or not all(v.lstrip("-").isdigit() for v in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as {example}, got {text!r}")
    values = tuple(int(v) for v in parts)
    if any(v < low for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {low} such as {example}, got {text!r}")
    return values


def int_list(text: str) -> tuple[int, ...]:
    """'16,32,64' -> (16, 32, 64): positive integers (iteration budgets)."""
    return _int_list(text, 1, "16,32")


def difficulty_list(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1): difficulties may be 0 (sudoku's bucket 0); a task rejects those it has no data for."""
    return _int_list(text, 0, "0,1")


def int_at_least(low: int, what: str):
    """An argparse type: an integer >= low, else the error 'expected {what}'."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1, "a positive integer")


non_negative_int = int_at_least(0, "an integer >= 0")


def window_arg(text: str) -> int | None:
    if text.lower() in ("none", "global"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def none_or_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def none_or_float(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def solver_option(text: str) -> tuple[str, object]:
    """KEY=VALUE of --solver-option: VALUE as an int, a float, true/false, none (None), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. m=6), got {text!r}")
    value: object = raw.strip()
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        value = lowered == "true"
    elif lowered == "none":  # an option off (gate=none, safeguard=none)
        value = None
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
    return key.strip(), value


def check_outputs(files=(), dirs=()) -> None:
    """Fail before the work, not after it: each of `files` must be writable as a file, each of
    `dirs` usable as a directory (created later if missing)."""
    for path, want_dir in [(Path(f), False) for f in files] + [(Path(d), True) for d in dirs]:
        if not path.parent.is_dir():
            raise UsageError(f"cannot write {path}: directory {path.parent} does not exist")
        if path.exists() and path.is_dir() != want_dir:
            raise UsageError(f"cannot write {path}: it is {'a file' if want_dir else 'a directory'}, "
                             f"not {'a directory' if want_dir else 'a file'}")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise UsageError(f"cannot write {path}: permission denied")


def budget_arg(text: str) -> float | None:
    """A positive number of seconds, or none (no cap)."""
    if text.strip().lower() in ("none", "inf", "0"):
        return None
    return positive_float(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def seed_list(text: str) -> tuple[int, ...]:
    parts = [v.strip() for v in text.split(",") if v.strip()]
    if not parts or not all(v.isdigit() for v in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 such as 0,1,2, got {text!r}")
    return tuple(int(v) for v in parts)
