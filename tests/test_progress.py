"""What a run prints while it trains: progress lines where there is no terminal, no PyTorch
warning when blocks skip updates on purpose, and the loop's lines outside Hydra too."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO, compose_config, run_cli

FAST = ["debug=fast", "device=cpu", "trainer.diagnostics_every=0"]

# The README's "your own blocks" example, on synthetic data: no Hydra, no logging configured.
OWN_BLOCKS = """
from functools import partial
import torch, torch.nn as nn
import dni
from dni.training import Trainer

data = dni.synthetic(num_train=512, num_test=128, shape=(1, 8, 8), num_classes=4, seed=0)
blocks = [
    nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()),  # block 1: image -> features
    nn.Sequential(nn.Linear(32, 32), nn.ReLU()),                # block 2
    nn.Linear(32, 4),                                           # the classifier (last block)
]
model = dni.BlockNet(blocks, input_shape=data.input_shape, name="mine")
method = dni.DecoupledNeuralInterfaces(
    model,
    optimizer=partial(torch.optim.Adam, lr=1e-3),
    synthesizer=dni.LinearSynthesizer,
    conditioned=True,
)
trainer = Trainer(steps=20, batch_size=32, eval_every=10, progress_every=5)
result = trainer.fit(method, data, out_dir=OUT)
print("status", result["status"])
"""


def test_a_run_without_a_terminal_logs_a_progress_line_every_n_steps(tmp_path):
    result = run_cli(*FAST, "trainer.progress_every=5", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"step (\d+)/20 \((\d+)%\): loss [\d.]+, \d+ samples/s, ETA \d+:\d\d", result.stdout)
    assert [int(step) for step, _ in lines] == [5, 10, 15, 20]
    assert [int(share) for _, share in lines] == [25, 50, 75, 100]
    log_file = (tmp_path / "run" / "train.log").read_text()
    assert "step 15/20 (75%)" in log_file
    assert "it/s" not in result.stderr and "step/s" not in result.stderr  # no bar when not a terminal


def test_progress_lines_can_be_turned_off_and_bad_values_are_one_sentence(tmp_path):
    result = run_cli(*FAST, "trainer.progress_every=0", f"hydra.run.dir={tmp_path / 'off'}")
    assert result.returncode == 0, result.stderr
    assert "samples/s, ETA" not in result.stdout and "step 20/20: test error" in result.stdout
    result = run_cli(*FAST, "trainer.progress_every=-1", f"hydra.run.dir={tmp_path / 'bad'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "trainer.progress_every=-1 is not allowed; give an integer >= 0" in result.stderr


def test_blocks_that_skip_updates_raise_no_scheduler_warning(tmp_path):
    """PyTorch warns when a schedule steps before its optimiser has: with one optimiser per
    block (the unbatched DNI step), a block that skips its first update does exactly that."""
    settings = [*FAST, "method=cdni", "method.p_update=0.1", "scheduler=multistep", "seed=1"]
    if "batched" in compose_config(*settings).method:  # the batched step steps every optimiser
        settings.append("method.batched=false")
    result = run_cli(*settings, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "lr_scheduler.step()" not in result.stderr + result.stdout


def test_trainer_fit_outside_hydra_logs_to_the_console(tmp_path):
    script = f"OUT = {str(tmp_path / 'run')!r}\n" + OWN_BLOCKS
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "status completed" in result.stdout
    # The evaluation line is the run's (`dni.run`, the same for every loop), the progress the loop's.
    assert re.search(r"\[dni\.run\]\[INFO\] - step 10/20: test error [\d.]+%", result.stderr)
    assert "step 5/20 (25%)" in result.stderr  # the progress lines too: stderr is not a terminal
