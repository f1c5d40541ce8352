"""What the step-time benchmarks share: composing configs, timing methods in alternation,
and printing the ratio table."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str):
    """The runner's config with these overrides, as `dni-train` would see it."""
    with initialize_config_dir(config_dir=str(REPO / "dni" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def time_steps(methods: dict, batches: list, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per step of every method, one sample per round. The methods take turns, a few
    steps each per round, in an order reversed every other round, so that drifts of a shared
    machine (other processes, clock changes) hit them all alike."""
    times: dict[str, list[float]] = {label: [] for label in methods}
    for method in methods.values():  # warm-up: allocator, Adam state, lazy inits
        for x, y in batches[:3]:
            method.step(x, y)
    for r in range(rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for label in order:
            started = time.perf_counter()
            for i in range(per_round):
                x, y = batches[(r * per_round + i) % len(batches)]
                methods[label].step(x, y)
            times[label].append((time.perf_counter() - started) / per_round)
    return times


def step_flops(method, batch) -> int:
    """Matmul and convolution FLOPs of one step of `method` on `batch` (forward and backward),
    counted on a copy, so the method itself does not move."""
    method = copy.deepcopy(method)
    with FlopCounterMode(display=False) as counter:
        method.step(*batch)
    return counter.get_total_flops()


def flop_limits(methods: dict, batch, base: str) -> dict[str, float]:
    """Each method's FLOP limit: its step's FLOPs over `base`'s, the step-time ratio a method
    would reach if time went only to matmul FLOPs at one rate."""
    reference = step_flops(methods[base], batch)
    return {label: step_flops(method, batch) / reference for label, method in methods.items()}


def print_ratio_table(
    times: dict[str, list[float]],
    base: str,
    names: dict[str, str] | None = None,
    limits: dict[str, float] | None = None,
) -> None:
    """A markdown table of each method's median step time relative to `base`'s; `names`
    relabels methods for display; with `limits` (see `flop_limits`), the FLOP limit and the
    measured ratio over it stand beside each ratio."""
    names = names or {}
    reference = statistics.median(times[base])
    ratio = f"ratio to {names.get(base, base)}"
    extra = " FLOP limit | measured / limit |" if limits else ""
    print(f"| method | {ratio} |{extra} ms per step (median) | spread (min-max of rounds) |")
    print("| --- | --- |" + (" --- | --- |" if limits else "") + " --- | --- |")
    for label, samples in times.items():
        median = statistics.median(samples)
        measured = median / reference
        columns = f" {limits[label]:.2f} | {measured / limits[label]:.2f} |" if limits else ""
        print(
            f"| {names.get(label, label)} | {measured:.2f} |{columns} {1000 * median:.1f} | "
            f"{1000 * min(samples):.1f}-{1000 * max(samples):.1f} |"
        )
