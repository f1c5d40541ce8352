"""What the step-time benchmarks share: composing configs, timing methods in alternation,
and printing the ratio table."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str):
    """The runner's config with these overrides, as `experiments/train.py` would see it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
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


def print_ratio_table(times: dict[str, list[float]], base: str, names: dict[str, str] | None = None) -> None:
    """A markdown table of each method's median step time relative to `base`'s; `names`
    relabels methods for display."""
    names = names or {}
    reference = statistics.median(times[base])
    ratio = f"ratio to {names.get(base, base)}"
    print(f"| method | {ratio} | ms per step (median) | spread (min-max of rounds) |")
    print("| --- | --- | --- | --- |")
    for label, samples in times.items():
        median = statistics.median(samples)
        print(
            f"| {names.get(label, label)} | {median / reference:.2f} | {1000 * median:.1f} | "
            f"{1000 * min(samples):.1f}-{1000 * max(samples):.1f} |"
        )
