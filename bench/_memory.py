"""Peak bytes the torch CPU allocator holds during a call, from torch.profiler's memory events.

Unlike the process's peak RSS, this counts live tensors only: no allocator caching, thread
pools or libraries loaded on first use, so two calls can be compared byte for byte.
"""

import contextlib
import json
import os
import sys
import tempfile
from typing import Callable


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ log lines on fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_alloc_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU bytes allocated by `fn` above the level at its start (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with _quiet_stderr():
            prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    level = peak = 0
    for e in mem:
        level += e["args"]["Bytes"]
        peak = max(peak, level)
    return peak
