"""Shared fixtures (MNIST, the seed, the kernel set); the helpers the tests import live in
tests/helpers.py.

Kernel sets: `DNI_KERNELS=native|avx2|portable` pins the math kernels (MKL, oneDNN and
ATen's vectorised CPU code) for the whole session, including the runs the tests start in
subprocesses. Learning tests follow a rounding trajectory that differs from one CPU to the
next; pinning a set reproduces another machine's kind of trajectory here, e.g.

    DNI_KERNELS=portable python -m pytest -m slow

`native` (the default) leaves the environment as it is. The libraries read these variables
once, when torch is imported, so the switch must act before that.
"""

from __future__ import annotations

import os
import sys

import pytest

KERNELS = {
    "native": {},
    "avx2": {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "portable": {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"},
}


def _pin_kernels() -> tuple[str, str | None]:
    """Sets the chosen kernel set's variables; returns its name and what went wrong, if
    anything (reported by `pytest_configure`, where pytest shows it as one sentence)."""
    name = os.environ.get("DNI_KERNELS", "native")
    if name not in KERNELS:
        return name, f"DNI_KERNELS={name} is not a kernel set: use native, avx2 or portable."
    wanted = KERNELS[name]
    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in wanted.items()):
        settings = " ".join(f"{k}={v}" for k, v in wanted.items())
        return name, (
            f"DNI_KERNELS={name} came too late: torch was imported before the tests' conftest "
            f"(by a plugin or the calling process), so set {settings} in the environment instead."
        )
    os.environ.update(wanted)  # before torch is imported, and inherited by subprocesses
    return name, None


KERNEL_SET, KERNEL_PROBLEM = _pin_kernels()

import torch  # noqa: E402  (after the kernel set is pinned)

from tests.helpers import THREADS, data_root  # noqa: E402

# The tests' networks are small: one intra-op thread is as fast as several on an idle
# machine and far faster on a busy one, where threads of parallel processes thrash.
torch.set_num_threads(int(THREADS))


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST from the offline data root, loaded once per session."""
    from dni.data import vision

    root = data_root()
    if not (root / "MNIST" / "raw").is_dir():
        message = f"MNIST is not under {root}; set DNI_DATA_ROOT to a folder holding MNIST/raw"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return vision("mnist", root, download=False)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts from the same seed, and leaves torch's thread count as it found it
    (runs with `threads=1` set it for the whole process)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    if KERNEL_PROBLEM:
        raise pytest.UsageError(KERNEL_PROBLEM)
    # Quick tests whose bound depends on a training trajectory; CI runs them with the slow
    # ones once more under a pinned kernel set: python -m pytest -m "slow or learning".
    config.addinivalue_line("markers", "learning: a quick test that asserts a learning bound")


def pytest_report_header(config):
    pinned = "".join(f" {k}={v}" for k, v in KERNELS[KERNEL_SET].items())
    return f"kernels: {KERNEL_SET}{pinned} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()})"


def pytest_terminal_summary(terminalreporter):
    """Each learning test's measured value against its bound (tests/helpers.py)."""
    from tests.helpers import MARGINS

    if MARGINS:
        terminalreporter.section(f"learning-test margins, kernels: {KERNEL_SET}")
        for line in MARGINS:
            terminalreporter.write_line(line)
