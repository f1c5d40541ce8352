"""What recurrent DNI costs: step time relative to plain truncated BPTT, measured in one process.

    python benchmarks/recurrent_step_time.py                        # copy N=10 and Tiny Shakespeare, T=5
    python benchmarks/recurrent_step_time.py --truncation 2 --threads 1

The methods (bptt, rnn_dni, dni_aux) are built from the experiments' own configs
(experiment=copy_lstm, shakespeare_lstm), from the same initial weights, and stepped on the
same batches. They are timed in alternation, a few steps each per round, so drifts of a
shared machine hit them all alike; the table gives the median per-step time and its ratio
to bptt. A step is one whole batch: every truncation's forward, backward and update.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("bptt", "rnn_dni", "dni_aux")
EXPERIMENTS = {"copy": "copy_lstm", "text": "shakespeare_lstm"}


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def setting(task: str, truncation: int, copy_length: int) -> tuple[dict, list, str]:
    """The methods of one experiment, from the same initial weights, and 20 batches."""
    experiment = f"experiment={EXPERIMENTS[task]}"
    cfg = compose_config(experiment)
    data = instantiate(cfg.dataset)
    if task == "copy":
        data.length = copy_length
    torch.manual_seed(0)
    model = instantiate(cfg.model)(input_shape=data.input_shape, num_classes=data.num_classes)
    methods = {}
    for name in METHODS:
        cfg = compose_config(experiment, f"method={name}", f"method.truncation={truncation}")
        methods[name] = instantiate(cfg.method)(model=copy.deepcopy(model), optimizer=instantiate(cfg.optim))
    stream = data.batches(cfg.trainer.batch_size, seed=0)
    batches = [next(stream) for _ in range(20)]
    x = batches[0][0]
    shape = f"batch {x.shape[0]} x {x.shape[1]} steps, LSTM {cfg.model.hidden_size}"
    return methods, batches, f"{data.name} ({shape}), T={truncation}"


def time_steps(methods: dict, batches: list, rounds: int, per_round: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():  # warm-up: allocator, Adam state
        for x, y in batches[:3]:
            method.step(x, y)
    for r in range(rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            started = time.perf_counter()
            for i in range(per_round):
                methods[name].step(*batches[(r * per_round + i) % len(batches)])
            times[name].append((time.perf_counter() - started) / per_round)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--truncation", type=int, default=5)
    parser.add_argument("--copy-length", type=int, default=10, help="N of the copy batches (sequence 2N+1)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("DNI_DATA_ROOT", str(REPO.parent / "shared" / "data"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"median of {args.rounds} rounds x {args.per_round} steps, methods in alternation")
    for task in args.tasks:
        methods, batches, title = setting(task, args.truncation, args.copy_length)
        times = time_steps(methods, batches, args.rounds, args.per_round)
        base = statistics.median(times["bptt"])
        print(f"\n{title}\n")
        print("| method | ratio to bptt | ms per step (median) | spread (min-max of rounds) |")
        print("| --- | --- | --- | --- |")
        for name, samples in times.items():
            median = statistics.median(samples)
            print(
                f"| {methods[name].name} | {median / base:.2f} | {1000 * median:.1f} | "
                f"{1000 * min(samples):.1f}-{1000 * max(samples):.1f} |"
            )


if __name__ == "__main__":
    main()
