"""What a learning rule costs: step time relative to backprop, measured in one process.

    python -m benchmarks.step_time                 # FCN-3, batch 256, MNIST (or same-shape noise)
    python -m benchmarks.step_time --depth 6 --threads 1
    python -m benchmarks.step_time --threads 1 --methods bprop "dni (linear)" --compile

Every method is built from the same configs the runner uses, from the same initial
weights, and stepped on the same batches. Methods are timed in alternation, a few steps
each per round, so drifts of the machine (other processes, clock changes) hit them all
alike; the table reports the median per-step time and its ratio to bprop. Beside each
ratio stands its FLOP limit: the matmul FLOPs of one step of the method over those of one
backprop step, counted by `torch.utils.flop_counter` on a step of the model itself (forward
2·B·in·out and backward 4·B·in·out per linear layer, less input gradients autograd never
computes; per interface the synthesizer's forward and its weight gradient), so a method at
its limit would show measured / limit = 1. The load average of the machine is printed
before and after. Then it measures the data pipeline's share of a backprop step and the
samples per second of the default run (`dni-train`, shortened).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from benchmarks.timing import compose_config, flop_limits, print_ratio_table, time_steps
from dni.cli.train import run
from dni.data import synthetic, vision

REPO = Path(__file__).resolve().parents[1]


VARIANTS = {  # label -> config overrides
    "bprop": ["method=bprop"],
    "dni (linear)": ["method=dni", "synthesizer=linear"],
    "cdni (linear)": ["method=cdni", "synthesizer=linear"],
    "dni (linear, per-interface)": ["method=dni", "synthesizer=linear", "method.batched=false"],
    # The paper's placement, an interface after every hidden block (shipped DNI leaves out the
    # one below the classifier): the placement the README's FLOP-limit tables were measured with.
    "dni (linear, every layer)": ["method=dni", "synthesizer=linear", "method.top_interface=true"],
    "dni (linear, every layer, per-interface)": [
        "method=dni",
        "synthesizer=linear",
        "method.top_interface=true",
        "method.batched=false",
    ],
    "cdni (linear, per-interface)": ["method=cdni", "synthesizer=linear", "method.batched=false"],
    "dni (mlp)": ["method=dni", "synthesizer=mlp"],
    "cdni (mlp)": ["method=cdni", "synthesizer=mlp"],
    "cdni_unlocked (linear)": ["method=cdni_unlocked", "synthesizer=linear"],
    "cdni_unlocked (linear, per-interface)": [
        "method=cdni_unlocked",
        "synthesizer=linear",
        "method.batched=false",
    ],
    # A cheaper input synthesizer (hidden 256 instead of 1024): about half the step, and at a
    # 3000-step budget 0.1-0.2 points more test error than the default (README, complete unlock).
    "cdni_unlocked (linear, input hidden 256)": [
        "method=cdni_unlocked",
        "synthesizer=linear",
        "method.input_synthesizer.hidden=[256]",
    ],
    "backward_net": ["method=backward_net"],
    "fa": ["method=fa"],
    "dfa": ["method=dfa"],
}


def load_data():
    root = os.environ.get("DNI_DATA_ROOT") or REPO.parent / "shared" / "data"
    try:
        return vision("mnist", root, download=False)
    except Exception:  # no MNIST here: noise of the same shape times the same
        return synthetic(num_train=60000, num_test=1000, shape=(1, 28, 28))


def build_methods(data, depth: int, labels: list[str], overrides: tuple[str, ...] = ()) -> dict:
    """The methods under `labels`, each with `overrides` added to its config (e.g. the same
    optimiser implementation for all)."""
    torch.manual_seed(0)
    cfg = compose_config(f"model.depth={depth}")
    model = instantiate(cfg.model)(input_shape=data.input_shape, num_classes=data.num_classes)
    methods = {}
    for label in labels:
        if not (REPO / "dni" / "conf" / "method" / f"{VARIANTS[label][0].split('=')[1]}.yaml").exists():
            continue
        cfg = compose_config(f"model.depth={depth}", *VARIANTS[label], *overrides)
        factory = instantiate(cfg.method)
        methods[label] = factory(model=copy.deepcopy(model), optimizer=instantiate(cfg.optim))
    return methods


def data_share(data, batch_size: int, steps: int = 200) -> float:
    """Share of a backprop step spent fetching its batch (index, gather), as the loop does."""
    method = build_methods(data, 3, ["bprop"])["bprop"]
    stream = data.batches(batch_size, seed=0)
    fetch = train = 0.0
    for _ in range(steps):
        began = time.perf_counter()
        x, y = next(stream)
        fetched = time.perf_counter()
        method.step(x, y)
        ended = time.perf_counter()
        fetch, train = fetch + fetched - began, train + ended - fetched
    return fetch / (fetch + train)


def default_run_throughput(steps: int) -> dict:
    cfg = compose_config(f"trainer.steps={steps}", f"trainer.eval_every={steps}", "trainer.progress=false")
    with tempfile.TemporaryDirectory() as out:
        return run(cfg, Path(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--override", nargs="*", default=[], help="config overrides for every method, e.g. optim.fused=true"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time every method compiled (trainer.compile=true: its blocks and synthesizers) and "
        "print compiled / eager per method",
    )
    parser.add_argument("--default-run-steps", type=int, default=1000, help="0 to skip that measurement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_data()
    stream = data.batches(args.batch_size, seed=0)
    batches = [next(stream) for _ in range(50)]
    methods = build_methods(data, args.depth, args.methods, tuple(args.override))
    limits = flop_limits(methods, batches[0], "bprop")
    if args.compile:  # twins from the same weights, compiled as `Trainer(compile=True)` does
        for label in list(methods):
            twin = build_methods(data, args.depth, [label], tuple(args.override))[label]
            twin.compile()
            methods[f"{label}, compiled"], limits[f"{label}, compiled"] = twin, limits[label]
    load_before = os.getloadavg()
    times = time_steps(methods, batches, args.rounds, args.per_round)
    load_after = os.getloadavg()

    print(
        f"\nStep time, FCN with {args.depth} hidden layers of 256, batch {args.batch_size}, "
        f"{data.name}, {torch.get_num_threads()} threads, device cpu, torch {torch.__version__}"
        + (f", every method with {' '.join(args.override)}" if args.override else "")
    )
    print(
        f"median of {args.rounds} rounds x {args.per_round} steps, methods in alternation; load average "
        f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} CPUs\n"
    )
    print_ratio_table(times, "bprop", limits=limits)
    if args.compile:
        print("\n| method | compiled / eager (median step time) |\n| --- | --- |")
        for label in args.methods:
            if f"{label}, compiled" in times:
                ratio = statistics.median(times[f"{label}, compiled"]) / statistics.median(times[label])
                print(f"| {label} | {ratio:.2f} |")

    share = data_share(data, args.batch_size)
    print(f"\nData pipeline: {100 * share:.2f}% of a backprop step (FCN-3, batch {args.batch_size})")
    if args.default_run_steps:
        result = default_run_throughput(args.default_run_steps)
        print(
            f"Default run (bprop, FCN-3, MNIST, batch 256), {args.default_run_steps} steps: "
            f"{result['samples_per_s']:.0f} samples/s, data share {100 * result['data_time_share']:.2f}%, "
            f"test error {100 * result['test_error']:.2f}%"
        )


if __name__ == "__main__":
    main()
