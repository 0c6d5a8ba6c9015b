"""deqloop: looped transformers treated as deep equilibrium models.

The fixed-point solvers live in the standalone package `solvers`; tasks in `tasks`. PyPI has
unrelated distributions of those names: `tasks` (2.8.0, a task manager) installs a module
`tasks` that replaces ours; `solvers` (0.6) installs no module. So the two packages found on
the path are checked here, before anything imports them, and a foreign one is an ImportError
saying what to do, instead of a confusing failure deep in an import.
"""

import importlib.util as _util
from pathlib import Path as _Path

__version__ = "0.1.0"

_OURS = {"solvers": ("_loop.py", "implicit.py"), "tasks": ("base.py", "prefix_sums.py")}  # files only ours have


def _check_companion_packages() -> None:
    for name, files in _OURS.items():
        spec = _util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None:
            raise ImportError(f"deqloop needs its package '{name}', which is not installed; reinstall deqloop "
                              "(pip install deqloop, or pip install -e . in a checkout)")
        where = _Path(origin).parent
        if not all((where / f).is_file() for f in files):
            raise ImportError(f"the module '{name}' found at {where} is not deqloop's (another distribution of that "
                              f"name, e.g. PyPI's '{name}'): pip uninstall {name}, then reinstall deqloop")


_check_companion_packages()
