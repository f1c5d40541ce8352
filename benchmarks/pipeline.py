"""Throughput of decoupled DNI across K processes, against the same DNI and backprop in one process.

    python -m benchmarks.pipeline                     # K=2, FCN 4 x 1024, batch 256, ~2 min on 2 cores
    python -m benchmarks.pipeline --stages 1 2 4      # several K in one run (K=4 needs 4 cores)

Every configuration gets the same total number of cores, K: the pipeline runs K processes
with one intra-op thread each; the single-process runs use K threads. The model is chosen so
that the stages are balanced: every hidden block is 1024 -> 1024 (the synthetic input has
1024 features), so each of K stages holds 4/K blocks and their synthesizers, the last one
also the small head. Each configuration runs in fresh processes, one after another; only the
steps after `--warmup` are timed, and with `--repeats N` the best of N runs is kept (on a
shared machine the best run is the one least disturbed by others).

    scaling efficiency = throughput(K stages) / (K x throughput(1 stage, 1 thread))

The per-stage columns say where a stage's time went: computing (not waiting on a peer), of
which its main thread actually ran on a core (less when other jobs share the cores),
waiting for its input activation, waiting for targets (the staleness bound), and handing
messages to the sender thread. Numbers on a shared machine are noisy, the single-process
K-thread ones most of all (a parallel region waits for its slowest thread); re-run on a
quiet machine before quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# -- one measurement, in its own process ----------------------------------------------------
def build(rule: str, depth: int, width: int, num_train: int):
    import torch

    from dni.data import synthetic
    from dni.methods import Backprop, DecoupledNeuralInterfaces
    from dni.models import FCN
    from dni.synthesizers import LinearSynthesizer

    torch.manual_seed(0)
    data = synthetic(num_train=num_train, num_test=512, shape=(width,))
    model = FCN(data.input_shape, data.num_classes, depth=depth, width=width)
    adam = partial(torch.optim.Adam, lr=1e-4)
    if rule == "bprop":
        return Backprop(model, adam), data
    return DecoupledNeuralInterfaces(model, adam, LinearSynthesizer, conditioned=True), data


def measure_single(cfg: dict) -> dict:
    """The single-process step loop, timed after the warm-up."""
    import torch

    torch.set_num_threads(cfg["threads"])
    method, data = build(cfg["rule"], cfg["depth"], cfg["width"], cfg["num_train"])
    batches = data.batches(cfg["batch_size"], 0)
    method.train()
    for _ in range(cfg["warmup"]):
        method.step(*next(batches))
    began = time.perf_counter()
    for _ in range(cfg["steps"]):
        method.step(*next(batches))
    return {"samples_per_s": cfg["steps"] * cfg["batch_size"] / (time.perf_counter() - began)}


def measure_stage(cfg: dict) -> dict:
    """One rank of the pipeline; rank 0's run folder holds every stage's report windows."""
    import torch

    from dni.distributed import Pipeline
    from dni.training import Trainer

    torch.set_num_threads(1)
    method, data = build("dni", cfg["depth"], cfg["width"], cfg["num_train"])
    steps = cfg["warmup"] + cfg["steps"]
    # One report window for the warm-up, then windows of the same size until the end.
    trainer = Trainer(
        steps=steps, batch_size=cfg["batch_size"], eval_every=steps, log_every=cfg["warmup"], progress=False
    )
    Pipeline(staleness=cfg["staleness"], timeout=300).fit(method, data, trainer, cfg["out"])
    return {}


def steady_state(run_dir: str, stages: int, warmup: int) -> dict:
    """Throughput and time shares per stage, from the report windows after the warm-up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()

    def series(tag: str) -> list[float]:
        return [e.value for e in events.Scalars(tag) if e.step > warmup]

    result = {"stages": []}
    for k in range(stages):
        rates = series(f"pipeline/stage{k}/samples_per_s")
        times = [1.0 / r for r in rates]  # each window holds the same number of samples
        stage = {"samples_per_s": len(rates) / sum(times)}
        for share in ("compute_share", "cpu_share", "wait_input_share", "wait_target_share", "send_share"):
            values = series(f"pipeline/stage{k}/{share}")
            stage[share] = sum(v * t for v, t in zip(values, times)) / sum(times)
        result["stages"].append(stage)
    result["samples_per_s"] = result["stages"][-1]["samples_per_s"]  # what leaves the pipeline
    return result


# -- the driver -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(role: str, cfg: dict, world: int = 1, threads: int = 1) -> list[dict]:
    """Run `role` in `world` fresh processes (ranks of one job when world > 1); their results."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, __file__, "--role", role, "--cfg", json.dumps(cfg)]
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{role} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def pipeline_run(cfg: dict, stages: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        launch("stage", {**cfg, "out": out}, world=stages, threads=1)
        return steady_state(out, stages, cfg["warmup"])


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2], help="values of K to measure")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--depth", type=int, default=4, help="hidden blocks (divisible by every K)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the best is kept")
    parser.add_argument("--role", default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--cfg", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role != "driver":
        measure = {"single": measure_single, "stage": measure_stage}[args.role]
        print(json.dumps(measure(json.loads(args.cfg))))
        return

    cfg = {
        "steps": args.steps,
        "warmup": args.warmup,
        "depth": args.depth,
        "width": args.width,
        "batch_size": args.batch_size,
        "staleness": args.staleness,
        "num_train": args.batch_size * 64,
    }
    print(
        f"FCN {args.depth} x {args.width} (+ head), synthetic data of {args.width} features, batch "
        f"{args.batch_size}, cDNI with linear synthesizers, Adam; {args.warmup} warm-up + {args.steps} timed "
        f"steps; staleness bound {args.staleness}; {os.cpu_count()} cores visible\n",
        flush=True,
    )

    def best(run: Callable[[], dict]) -> dict:
        return max((run() for _ in range(args.repeats)), key=lambda r: r["samples_per_s"])

    def single(rule: str, k: int) -> float:
        measured = best(lambda: launch("single", {**cfg, "rule": rule, "threads": k}, threads=k)[0])
        return measured["samples_per_s"]

    def on_cpu(run: dict) -> float:
        return sum(s["cpu_share"] for s in run["stages"]) / len(run["stages"])

    one = best(lambda: pipeline_run(cfg, 1))
    base, base_cpu = one["samples_per_s"], on_cpu(one)
    bprop_base = single("bprop", 1)
    rows, breakdown = [], []
    for k in args.stages:
        bprop, dni = single("bprop", k), single("dni", k)
        piped = best(lambda k=k: pipeline_run(cfg, k)) if k > 1 else one
        rate = piped["samples_per_s"]
        rows.append(
            (k, f"{bprop:.0f}", f"{dni:.0f}", f"{rate:.0f}", f"{rate / dni:.2f}", f"{rate / (k * base):.2f}")
        )
        for s, stage in enumerate(piped["stages"]):
            keys = ("compute_share", "cpu_share", "wait_input_share", "wait_target_share", "send_share")
            shares = [f"{100 * stage[key]:.0f}%" for key in keys]
            breakdown.append((k, s, f"{stage['samples_per_s']:.0f}", *shares))
    header = ("K", "backprop 1 proc x K thr", "DNI 1 proc x K thr", "DNI K proc x 1 thr", "vs DNI 1 proc")
    header += ("efficiency",)
    print(
        f"samples/s with 1 process, 1 thread: DNI (1 stage) {base:.0f} (on CPU {100 * base_cpu:.0f}% of "
        f"the time), backprop {bprop_base:.0f}\n"
    )
    print(table(rows, header))
    print("\nwhere each stage's time goes (shares of its wall time; 'on CPU' well below 'compute'")
    print("means other jobs held the cores: re-run on a quiet machine)\n")
    columns = ("K", "stage", "samples/s", "compute", "on CPU", "wait input", "wait target", "send")
    print(table(breakdown, columns))


if __name__ == "__main__":
    main()
