"""The package as a user gets it: a wheel installed into a fresh virtual environment runs
`dni-train` from an empty folder, with the configs it ships; and nothing in the repository
edits `sys.path` to find its own code."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import dni
from tests.helpers import REPO, THREADS

log = logging.getLogger(__name__)


def test_version_is_the_installed_distributions_or_says_it_is_unknown():
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("dni")
    except PackageNotFoundError:
        expected = "0+unknown"
    assert dni.__version__ == expected


def test_no_file_edits_sys_path():
    """The package is installed (editable for development), so scripts, benchmarks and tests
    import it by name; `python -m` runs the ones that import their neighbours."""
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("dni", "experiments", "benchmarks", "tests")
        for path in (REPO / folder).rglob("*.py")
        if re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*\+?=", path.read_text())
        and path.name != "test_install.py"
    ]
    assert offenders == []


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment_trains_from_an_empty_folder(tmp_path):
    pytest.importorskip(
        "setuptools", minversion="77", reason="install the dev extra: pip install -e '.[dev]'."
    )

    started = time.perf_counter()
    # Build from a copy, so that the build's `build/` and `*.egg-info` never land in the
    # checkout (and two runs of the test cannot meet there).
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "data"
        ),
    )
    wheels = tmp_path / "wheels"
    # No build isolation and no index: the build uses this interpreter's setuptools, offline.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(wheels), str(source)])  # fmt: skip
    (wheel,) = wheels.glob("dni-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("dni/py.typed", "dni/conf/config.yaml", "dni/conf/debug/fast.yaml", "dni/cli/train.py"):
        assert shipped in names, f"{shipped} is not in {wheel.name}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    built = time.perf_counter()

    # A fresh environment that sees this interpreter's site-packages through a .pth file, for
    # torch, Hydra and the other dependencies: installing them from an index takes minutes
    # and needs the network. A .pth file only appends the folder to sys.path (its own .pth
    # files, such as an editable install of dni, are not run), and the environment's own
    # site-packages comes first, so `import dni` finds the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    (venv_site,) = (venv / "lib").glob("python3*/site-packages")
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-index", str(wheel)])  # fmt: skip
    installed = time.perf_counter()

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    env |= {"OMP_NUM_THREADS": THREADS, "PYTHONUNBUFFERED": "1"}
    where = _run(
        [str(python), "-c", "import dni; print(dni.__file__); print(dni.__version__)"], cwd=empty, env=env
    )
    module_file, version = where.stdout.split()
    assert Path(module_file).is_relative_to(venv_site), f"dni came from {module_file}, not the wheel"
    assert version != "0+unknown", "the installed wheel has no metadata for dni.__version__"

    checked = time.perf_counter()
    _run([str(venv / "bin" / "dni-train"), "debug=fast"],
         cwd=empty, env=env, timeout=300)  # fmt: skip
    (metrics_file,) = (empty / "outputs").glob("debug/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "completed"
    assert metrics["steps"] == 20
    assert (metrics_file.parent / ".hydra" / "config.yaml").is_file()
    trained = time.perf_counter()
    report_help = _run([str(venv / "bin" / "dni-report"), "--help"], cwd=empty, env=env)
    assert "usage: dni-report" in report_help.stdout
    finished = time.perf_counter()
    log.warning(
        "wheel test: build %.1f s, fresh environment and install %.1f s, import check %.1f s, "
        "dni-train debug=fast %.1f s, dni-report --help %.1f s",
        built - started,
        installed - built,
        checked - installed,
        trained - checked,
        finished - trained,
    )
