"""The installed package: a wheel built from the repo runs the commands from outside the checkout,
with its data (chess puzzles, shipped models) found inside the package."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from deqloop.checkpoint import MODELS, shipped_models

ROOT = Path(__file__).resolve().parents[1]
FEN = "6k1/5ppp/8/8/8/8/8/R5K1 w - - 0 1"  # Ra8# (a back-rank mate in one)


def sh(*argv, cwd, timeout=300, env=None):
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv bin dir, a work directory outside the repository)."""
    tmp = tmp_path_factory.mktemp("pkg")
    try:
        import setuptools  # noqa: F401  (in the test venv: build without fetching a build env)
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    # from a copy of the files git would ship: setuptools builds in-tree (build/, *.egg-info)
    src = tmp / "src"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        for name in listed.stdout.split():
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
    else:  # not a git checkout: the tree without environments and build leftovers
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                 "__pycache__", ".pytest_cache"))
    sh(sys.executable, "-m", "pip", "wheel", src, "--no-deps", *isolation, "-q", "-w", tmp / "wheels", cwd=tmp)
    (wheel,) = (tmp / "wheels").glob("deqloop-*.whl")
    # the venv sees this one's torch & co. through a .pth line (no download; .pth files there,
    # such as this checkout's editable install, are not processed); deqloop comes from the wheel
    sh(sys.executable, "-m", "venv", tmp / "venv", cwd=tmp)
    bin_dir = tmp / "venv" / "bin"
    inner = sh(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp)
    (Path(inner.strip()) / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    return wheel, bin_dir, work


def test_the_wheel_holds_code_data_and_models(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"deqloop/cli.py", "deqloop/__main__.py", "tasks/data/chess/puzzles.npz"} <= names
    shipped = {f"deqloop/models/{m}/checkpoint.pt" for m in shipped_models()}
    assert shipped and shipped <= names, sorted(n for n in names if "models" in n)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "deqloop = deqloop.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_commands_run_outside_the_repository(installed):
    _, bin_dir, work = installed
    where = sh(bin_dir / "python", "-c", "import deqloop, tasks; print(deqloop.__file__); print(tasks.__file__)",
               cwd=work)
    assert all(str(bin_dir.parent) in line for line in where.split()), where  # not the checkout's copy
    sh(bin_dir / "deqloop", "train", "--task", "chess", "--steps", "2", "--eval-every", "0", "--d-model", "16",
       "--heads", "2", "--out-dir", work / "run", cwd=work)
    out = sh(bin_dir / "deqloop", "solve", work / "run" / "checkpoint.pt", FEN, cwd=work)
    assert "solver:" in out
    assert "usage: python -m deqloop" in sh(bin_dir / "python", "-m", "deqloop", "--help", cwd=work)


def test_a_shipped_model_is_usable_by_name(installed):
    _, bin_dir, work = installed
    name = shipped_models()[0]
    assert (MODELS / name / "checkpoint.pt").is_file()
    out = sh(bin_dir / "deqloop", "eval", name, "--n", "2", "--iters", "4", cwd=work)
    assert (work / "eval.json").is_file() and "wrote" in out  # outputs beside the name: the current directory


def test_a_foreign_tasks_module_is_a_clear_import_error(tmp_path):
    """PyPI's `tasks` distribution installs a module `tasks`; found first on the path, it must not
    break deqloop silently: importing deqloop says which module is foreign and what to do."""
    fake = tmp_path / "tasks"
    fake.mkdir()
    (fake / "__init__.py").write_text("# PyPI's tasks 2.8.0 has color.py, commands.py, model.py ...\n")
    (fake / "model.py").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", "import deqloop"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the module 'tasks' found at") and "pip uninstall tasks" in last, last
    ok = subprocess.run([sys.executable, "-c", "import deqloop, tasks; print(tasks.TASKS)"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "prefix_sums" in ok.stdout, ok.stderr
