"""Bounds for the learning tests, checked and recorded.

A learning test passes or fails on a number that depends on rounding: another CPU, another
kernel set (`DNI_KERNELS`, see conftest.py) or another thread count takes another trajectory.
So every learning test states its bound through `assert_below` / `assert_above`, which put the
measured value and the bound in the assertion message and in `MARGINS`; pytest prints the
list at the end of the session, so that a run under each kernel set shows how close each test
came to its bound, not only whether it passed.
"""

from __future__ import annotations

import logging

log = logging.getLogger("tests.margins")

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
