"""What recurrent DNI costs: step time relative to plain truncated BPTT, measured in one process.

    python -m benchmarks.recurrent_step_time                        # copy N=10 and Tiny Shakespeare, T=5
    python -m benchmarks.recurrent_step_time --truncation 2 --threads 1

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
from pathlib import Path

import torch
from hydra.utils import instantiate

from benchmarks.timing import compose_config, print_ratio_table, time_steps

REPO = Path(__file__).resolve().parents[1]


METHODS = ("bptt", "rnn_dni", "dni_aux")
EXPERIMENTS = {"copy": "copy_lstm", "text": "shakespeare_lstm"}


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
        print(f"\n{title}\n")
        print_ratio_table(times, "bptt", {name: m.name for name, m in methods.items()})


if __name__ == "__main__":
    main()
