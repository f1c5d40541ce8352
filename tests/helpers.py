"""What the tests share: the repository's paths, the data root, the composed config, the
command line in a subprocess, TensorBoard scalars read back, and the learning tests' bounds.

Nothing here imports torch at import time: conftest.py pins the kernel set first.

Bounds for the learning tests, checked and recorded.

A learning test passes or fails on a number that depends on rounding: another CPU, another
kernel set (`DNI_KERNELS`, see conftest.py) or another thread count takes another trajectory.
So every learning test states its bound through `assert_below` / `assert_above`, which put the
measured value and the bound in the assertion message and in `MARGINS`; pytest prints the
list at the end of the session, so that a run under each kernel set shows how close each test
came to its bound, not only whether it passed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("tests.margins")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "dni" / "conf"
# One intra-op thread in the tests and in the runs they start (see conftest.py).
THREADS = "1"


def data_root() -> Path:
    """$DNI_DATA_ROOT, else the shared offline copy beside the checkout."""
    return Path(os.environ.get("DNI_DATA_ROOT") or REPO.parent / "shared" / "data")


def compose_config(*overrides: str):
    """The real composed config (as `dni-train` sees it), with overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m dni <args>` (the same as `dni-train <args>`) in a subprocess from the
    repository's root, so that it runs this checkout's `dni`, with the data root set."""
    full_env = {
        **os.environ,
        "DNI_DATA_ROOT": str(data_root()),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": THREADS,
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "dni", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run folder's TensorBoard events, read back with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


MARGINS: list[str] = []


def _check(name: str, value: float, bound: float, below: bool) -> None:
    passed = value < bound if below else value > bound
    # The margin as a fraction of the bound: how far the value could move before failing.
    margin = (bound - value) / abs(bound) if below else (value - bound) / abs(bound)
    line = f"{name}: {value:.4g} {'<' if below else '>'} {bound:g} (margin {margin:+.0%})"
    MARGINS.append(("" if passed else "FAILED ") + line)
    log.info(line)
    assert passed, line


def assert_below(name: str, value: float, bound: float) -> None:
    """`value < bound`, recorded under `name`."""
    _check(name, float(value), bound, below=True)


def assert_above(name: str, value: float, bound: float) -> None:
    """`value > bound`, recorded under `name`."""
    _check(name, float(value), bound, below=False)


def batches(data, n: int, size: int = 64, seed: int = 0):
    """`n` random training batches of `data` (a `ClassificationData`), the same for every call
    with the same seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        index = torch.randint(len(data.y_train), (size,), generator=generator)
        yield data.x_train[index], data.y_train[index]
