"""Decoupled DNI across processes (`dni.distributed`): the same numbers as one process when the
schedule is synchronous, learning on MNIST with two gloo processes, and a quick, clear failure
when a rank dies or stalls. The multi-process tests spawn real processes on loopback."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dni import checkpoint
from dni.cli.train import run
from dni.distributed import Pipeline, balanced_boundaries
from dni.distributed.pipeline import disagreement
from dni.distributed.stage import check_boundaries
from dni.errors import CheckpointError, ConfigError
from dni.interface import DNI
from dni.methods import Backprop, Controlled, DecoupledGreedy, DecoupledNeuralInterfaces
from dni.models import FCN, CharTransformer
from dni.synthesizers import LinearSynthesizer, MLPSynthesizer, auto
from tests import pipeline_worker
from tests.helpers import REPO, compose_config, data_root, read_scalars


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in every rank: matrix products then sum in the same order, and
    a busy machine does not stall a parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, settings: dict, logs: Path) -> list[subprocess.Popen]:
    """`world` ranks of tests/pipeline_worker.py on loopback; stderr of rank r in logs/r.log."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        with open(logs / f"{rank}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.pipeline_worker", json.dumps(settings)],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar but the timings, which no two runs share, and the `result/` columns of the
    HPARAMS table, rewritten whenever metrics.json is (a checkpoint in one process, not in a
    pipeline)."""
    found = read_scalars(run_dir)
    return {
        tag: v
        for tag, v in found.items()
        if "samples_per_s" not in tag and "pipeline/" not in tag and not tag.startswith("result/")
    }


def single_process(settings: dict, out: Path) -> dict[str, list[tuple[int, float]]]:
    method, data, trainer = pipeline_worker.build(settings)
    trainer.fit(method, data, out)
    return scalars(out)


# -- splitting a method into stages ---------------------------------------------------------
@pytest.mark.parametrize("conditioned", [False, True])
def test_a_language_model_is_balanced_with_token_ids_and_a_label_at_every_position(conditioned):
    """The cost probe feeds the model what it takes (token ids, not floats) and cDNI's
    synthesizers a one-hot label at every position."""
    model = CharTransformer((16,), 11, depth=3, width=32, heads=4)
    method = DecoupledNeuralInterfaces(model, torch.optim.Adam, auto, conditioned=conditioned)
    cuts = balanced_boundaries(method, 2)
    assert len(cuts) == 1 and cuts[0] in method.cuts


def test_stages_are_balanced_by_compute_and_boundaries_are_checked():
    fcn = DecoupledNeuralInterfaces(FCN((1, 28, 28), 10), torch.optim.Adam, LinearSynthesizer)
    # Block 1 (784 -> 256) costs about as much as blocks 2 and 3 (256 -> 256) together.
    assert fcn.cuts == [1, 2, 3] and balanced_boundaries(fcn, 2) == [1]
    assert balanced_boundaries(fcn, 4) == [1, 2, 3] and balanced_boundaries(fcn, 1) == []
    even = DecoupledNeuralInterfaces(FCN((512,), 10, depth=4, width=512), torch.optim.Adam, LinearSynthesizer)
    assert balanced_boundaries(even, 2) == [2]
    assert check_boundaries([3], 2, fcn.cuts) == [3]
    # DGL's stages: blocks and auxiliary classifiers (a linear one costs little beside block 1).
    greedy = DecoupledGreedy(FCN((1, 28, 28), 10), torch.optim.Adam)
    assert balanced_boundaries(greedy, 2) == [1] and balanced_boundaries(greedy, 4) == [1, 2, 3]
    for stages, bad in ((2, [0]), (2, [4]), (3, [2, 1]), (3, [1, 1]), (3, [1])):
        with pytest.raises(ConfigError, match="^boundaries="):
            check_boundaries(bad, stages, fcn.cuts)
    with pytest.raises(ConfigError, match="at most 4 stages"):
        balanced_boundaries(fcn, 5)


def test_settings_that_cannot_work_stop_with_one_sentence(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    method, data, trainer = pipeline_worker.build({})
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=2"):
        Pipeline(stages=2).fit(method, data, trainer, tmp_path)
    with pytest.raises(ConfigError, match="not 'bprop'; set method=dni, cdni or dgl, and control=false"):
        Pipeline().fit(Backprop(method.model, torch.optim.Adam), data, trainer, tmp_path)
    twin = Backprop(copy.deepcopy(method.model), torch.optim.Adam)
    with pytest.raises(ConfigError, match="^control=true trains a backprop twin"):
        Pipeline().fit(Controlled(method, twin), data, trainer, tmp_path)
    method.true_targets = True  # the ablation needs the blocks above, which live on other ranks
    with pytest.raises(ConfigError, match="^true_targets=true needs the whole network"):
        Pipeline().fit(method, data, trainer, tmp_path)
    method.true_targets = False
    method.target_lambda = 0.5  # its targets wait for a backward pass through every stage above
    with pytest.raises(ConfigError, match="^target_lambda=0.5 sends targets down"):
        Pipeline().fit(method, data, trainer, tmp_path)
    method.target_lambda = 0.0
    trainer.compile = True
    with pytest.raises(ConfigError, match="^compile=true is not supported with parallel=pipeline"):
        Pipeline().fit(method, data, trainer, tmp_path)
    trainer.compile = False
    with pytest.raises(ConfigError, match="^staleness=-1"):
        Pipeline(staleness=-1)
    # Ranks started with different overrides would train on mismatched labels: refused.
    same = {"budget": (100, 32, 0), "activations": [(64,), (10,)]}
    assert disagreement([same, dict(same), dict(same)]) is None
    assert disagreement([same, same, {**same, "budget": (100, 32, 1)}]) == (
        "rank 2 differs from rank 0 in budget; launch every rank with the same command, overrides and data"
    )


# -- equivalence to one process -------------------------------------------------------------
def test_late_target_regresses_a_fresh_prediction():
    """A target that arrives after the synthesizer has stepped cannot use the graph of the old
    prediction (autograd refuses); `regress_late` predicts afresh, and on time it is the same."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU())
    interface = DNI(block, MLPSynthesizer((8,), hidden=[16]), torch.optim.Adam, torch.optim.Adam)
    twin = DNI(*_copies(interface), torch.optim.Adam, torch.optim.Adam)
    twin.load_state_dict(interface.state_dict())
    x, delta = torch.randn(5, 6), torch.randn(5, 8)
    out, out_twin = interface(x), twin(x)
    out.backward(delta)  # on time: the hook regresses the prediction made in forward
    twin.regress_late(out_twin, delta)
    for a, b in zip(interface.synthesizer.parameters(), twin.synthesizer.parameters()):
        torch.testing.assert_close(a, b)
    first, second = interface(x), interface(x)
    first.backward(delta)  # the synthesizer steps
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        second.backward(delta)
    before = [p.clone() for p in interface.synthesizer.parameters()]
    interface.regress_late(second, delta)
    assert any(not torch.equal(a, b) for a, b in zip(before, interface.synthesizer.parameters()))


def _copies(interface: DNI) -> tuple[torch.nn.Module, torch.nn.Module]:
    return copy.deepcopy(interface.block), copy.deepcopy(interface.synthesizer)


def test_one_stage_reproduces_the_single_process_run(tmp_path, monkeypatch, caplog):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    settings = {"steps": 20, "mlp": True}
    reference = single_process(settings, tmp_path / "single")
    method, data, trainer = pipeline_worker.build(settings)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dni.training"):
        result = Pipeline(stages=1).fit(method, data, trainer, tmp_path / "pipeline")
    assert result["status"] == "completed" and result["parallel"]["stages"] == 1
    assert scalars(tmp_path / "pipeline") == reference and len(reference["train/loss"]) == 20
    # Without a terminal the pipeline logs the loop's progress lines (ten a run by default).
    lines = re.findall(r"step (\d+)/20 \(\d+%\): loss [\d.]+, \d+ samples/s, ETA", caplog.text)
    assert [int(step) for step in lines] == list(range(2, 21, 2))


def test_synchronous_stages_reproduce_single_process_losses(tmp_path):
    """Staleness 0: every stage waits for batch t's target before batch t+1, which is exactly
    the order of the single-process step, so every logged number matches to float tolerance:
    the gradient-fidelity diagnostics too (`sg/cosine/...`, `align/...`, `drift/...`), measured
    on rank 0 from every stage's weights and synthesizers after the same steps, on the same
    batches. Three stages (a middle one sends and receives both ways), forward unlocking on
    (stages 1 and 2 train on a predicted input before the real one arrives)."""
    world = 3
    settings = {"forward_unlock": True, "steps": 24, "staleness": 0, "out": str(tmp_path / "pipeline")}
    settings["diagnostics_every"] = 6
    procs = spawn(world, settings, tmp_path / "logs")
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        stop(procs)
    assert codes == [0] * world, (tmp_path / "logs" / "0.log").read_text()[-2000:]
    got, expected = scalars(tmp_path / "pipeline"), single_process(settings, tmp_path / "single")
    assert got.keys() == expected.keys() and len(got["train/loss"]) == 24
    for tag in ("sg/cosine/block1", "sg/rel_error/block3", "align/cosine/block2", "drift/block4"):
        assert [s for s, _ in got[tag]] == [1, 7, 13, 19], tag
    for tag, values in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in values], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in values], rel=1e-5, abs=1e-7), tag
    metrics = json.loads((tmp_path / "pipeline" / "metrics.json").read_text())
    assert metrics["parallel"]["stages"] == world and metrics["stages"][0]["staleness_max"] == 0


# -- checkpoints and resume -----------------------------------------------------------------
def run_to_end(world: int, settings: dict, logs: Path) -> None:
    procs = spawn(world, settings, logs)
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        stop(procs)
    assert codes == [0] * world, (logs / "0.log").read_text()[-2000:]


def final_parts(run_dir: Path, world: int) -> list[dict[str, torch.Tensor]]:
    """Every stage's blocks and synthesizers in the checkpoint of the run's last step."""
    (last,) = checkpoint.checkpoints(run_dir)[-1:]
    step = checkpoint.step_of(last)
    shards = [None, *(f"stage{k}" for k in range(1, world))]
    return [
        torch.load(checkpoint.path_of(run_dir, step, shard), weights_only=False)["stage"]["parts"]
        for shard in shards
    ]


def comparable(metrics: dict) -> dict:
    """metrics.json without what measures time, which no two runs share."""
    kept = {k: v for k, v in metrics.items() if k not in ("wall_time_s", "samples_per_s", "stages")}
    kept["final"] = {
        k: v for k, v in metrics["final"].items() if "samples_per_s" not in k and "pipeline/" not in k
    }
    return kept


def test_resume_names_a_checkpoint_or_a_folder_and_refuses_another_split(tmp_path, monkeypatch):
    """`resume=` as in one process: a pipeline checkpoint file continues from exactly that step,
    into another folder, to the weights the run reached; a checkpoint of another number of
    stages is refused naming the difference."""
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    settings = {"steps": 20, "checkpoint_every": 10, "eval_every": 10}
    method, data, trainer = pipeline_worker.build(settings)
    whole = tmp_path / "whole"
    Pipeline(stages=1).fit(method, data, trainer, whole)
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(whole)] == [10, 20]

    method, data, trainer = pipeline_worker.build(settings)
    again = Pipeline(stages=1).fit(
        method, data, trainer, tmp_path / "again", resume=checkpoint.path_of(whole, 10)
    )
    assert again["status"] == "completed" and again["steps"] == 20
    (expected,), (got,) = final_parts(whole, 1), final_parts(tmp_path / "again", 1)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert comparable(again) == comparable(json.loads((whole / "metrics.json").read_text()))

    state = torch.load(checkpoint.path_of(whole, 20), weights_only=False)
    state["signature"]["stage"] = "0 of 2"  # as a 2-stage run would have written it
    checkpoint.save(tmp_path / "other", 20, state)
    method, data, trainer = pipeline_worker.build(settings)
    with pytest.raises(CheckpointError, match="belongs to another run .stage='0 of 2' there, '0 of 1' here"):
        Pipeline(stages=1).fit(method, data, trainer, tmp_path / "other")


def test_a_damaged_newest_pipeline_checkpoint_falls_back_to_the_one_before(tmp_path, monkeypatch, caplog):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    settings = {"steps": 20, "checkpoint_every": 10, "eval_every": 10}
    Pipeline(stages=1).fit(*pipeline_worker.build(settings), tmp_path)
    expected = final_parts(tmp_path, 1)[0]
    newest = checkpoint.path_of(tmp_path, 20)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # inside a tensor's bytes
    newest.write_bytes(bytes(data))

    result = Pipeline(stages=1).fit(*pipeline_worker.build(settings), tmp_path)  # the same run again
    assert result["status"] == "completed" and result["steps"] == 20
    assert f"checkpoint {newest} is corrupt or truncated" in caplog.text
    got = final_parts(tmp_path, 1)[0]  # steps 11-20 trained again, to the same weights
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_pipeline_killed_after_a_checkpoint_resumes_bit_for_bit(tmp_path):
    """Two gloo processes, staleness 0, a checkpoint every 10 steps: rank 1 is SIGKILLed after
    the checkpoint of step 20, rank 0 stops on the lost peer, and the same command started again
    resumes from the newest checkpoint both ranks hold. Its weights, synthesizers, metrics.json
    and every logged number equal an uninterrupted run's, bit for bit, each step logged once."""
    world, base = 2, {"steps": 40, "staleness": 0, "checkpoint_every": 10, "eval_every": 10}
    base["diagnostics_every"] = 10  # those after step 20, logged at 21, come from the checkpoint
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_to_end(world, {**base, "out": str(whole)}, tmp_path / "logs-whole")

    settings = {**base, "out": str(resumed)}
    procs = spawn(world, {**settings, "step_sleep": 0.05}, tmp_path / "logs-killed")
    try:
        saved = [checkpoint.path_of(resumed, 20), checkpoint.path_of(resumed, 20, "stage1")]
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in saved):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint"
            time.sleep(0.002)
        procs[1].send_signal(signal.SIGKILL)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        stop(procs)
    assert codes == [1, -signal.SIGKILL], codes
    killed = json.loads((resumed / "metrics.json").read_text())
    assert killed["status"] == "failed" and 20 <= killed["steps"] < 40

    logs = tmp_path / "logs-resumed"
    run_to_end(world, settings, logs)  # the same command, into the same folder
    assert f"resuming from {checkpoint.path_of(resumed, 20)} at step 20" in (logs / "0.log").read_text()
    assert (
        f"resuming from {checkpoint.path_of(resumed, 20, 'stage1')} at step 20"
        in (logs / "1.log").read_text()
    )

    for expected, got in zip(final_parts(whole, world), final_parts(resumed, world)):
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ours, theirs = (
        json.loads((resumed / "metrics.json").read_text()),
        json.loads((whole / "metrics.json").read_text()),
    )
    assert ours["status"] == "completed" and comparable(ours) == comparable(theirs)
    got, expected = scalars(resumed), scalars(whole)
    assert got == expected and [s for s, _ in got["train/loss"]] == list(range(1, 41))
    assert [s for s, _ in got["sg/cosine/block1"]] == [1, 11, 21, 31]


# -- decoupled greedy learning --------------------------------------------------------------
DGL = {"method": "dgl", "steps": 20, "checkpoint_every": 10, "eval_every": 10, "diagnostics_every": 5}


@pytest.fixture(scope="module")
def dgl_pipeline(tmp_path_factory) -> Path:
    """A 2-stage DGL run (4 blocks split where the compute balances, each block with its
    auxiliary classifier, the last with the head) whose ranks count every message they send."""
    folder = tmp_path_factory.mktemp("dgl")
    settings = {**DGL, "out": str(folder / "run"), "record_sends": str(folder / "sent")}
    run_to_end(2, settings, folder / "logs")
    return folder


def test_dgl_stages_reproduce_single_process_dgl_exactly(dgl_pipeline, tmp_path):
    """DGL has no staleness (nothing comes back to wait for), so two stages are the single-process
    step cut in two: every logged number (losses, each auxiliary classifier's loss, the test
    metrics of the assembled model, the diagnostics `align/...`, `drift/...`, `dgl/error/...`
    after the same steps) and every final parameter equal one process's bit for bit."""
    run = dgl_pipeline / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    boundaries = metrics["parallel"]["boundaries"]
    assert metrics["status"] == "completed" and len(boundaries) == 1
    got, expected = scalars(run), single_process(DGL, tmp_path / "single")
    assert got.keys() == expected.keys() and got == expected
    assert len(got["train/loss"]) == 20 and [s for s, _ in got["test/error"]] == [10, 20]
    assert {"dgl/loss/block1", "dgl/loss/block3", "dgl/error/block2", "align/cosine/block4"} <= got.keys()
    assert [s for s, _ in got["dgl/error/block1"]] == [1, 6, 11, 16]

    method, _, _ = pipeline_worker.build(DGL)
    for k, parts in enumerate(final_parts(run, 2)):
        method.pipeline_stage(k, boundaries).parts().load_state_dict(parts)
    (single,) = checkpoint.checkpoints(tmp_path / "single")[-1:]
    reference = torch.load(single, weights_only=False)["method"]["parts"]
    ours = method.parts.state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_no_dgl_message_goes_backward(dgl_pipeline):
    """No target link is even made: stage 0 sends one activation per step forward and nothing
    else; stage 1 sends rank 0 only its reports (one per logged step)."""
    first, second = (json.loads((dgl_pipeline / f"sent.rank{r}.json").read_text()) for r in (0, 1))
    links = ["activations 0 -> 1", "reports 1 -> 0"]
    assert first["links"] == second["links"] == links
    assert first["sent"] == {"activations 0 -> 1": 20} and second["sent"] == {"reports 1 -> 0": 20}
    assert "no targets sent back" in (dgl_pipeline / "logs" / "1.log").read_text()


def test_a_dgl_pipeline_resumed_from_a_checkpoint_ends_bit_for_bit(dgl_pipeline, tmp_path):
    """Two stages started again from the run's checkpoint of step 10, into another folder, reach
    the same weights, auxiliary classifiers, optimiser states' effect and record, bit for bit."""
    run, resumed = dgl_pipeline / "run", tmp_path / "resumed"
    settings = {**DGL, "out": str(resumed), "resume": str(checkpoint.path_of(run, 10))}
    run_to_end(2, settings, tmp_path / "logs")
    for expected, got in zip(final_parts(run, 2), final_parts(resumed, 2)):
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ours = json.loads((resumed / "metrics.json").read_text())
    assert ours["status"] == "completed" and comparable(ours) == comparable(
        json.loads((run / "metrics.json").read_text())
    )
    assert scalars(resumed) == {
        tag: [(s, v) for s, v in values if s > 10] for tag, values in scalars(run).items()
    }


# -- learning, through the runner -----------------------------------------------------------
def test_the_runner_takes_the_pipeline_path(tmp_path, monkeypatch):
    """`parallel=pipeline` in one process (no torchrun): one local stage, same record, with
    diagnostics (`debug=fast` takes them), checkpoints and the config they were trained with;
    the same command with a longer budget goes on from the last checkpoint, and one with
    another staleness bound is refused as in one process."""
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    overrides = [
        "debug=fast",
        "method=cdni",
        "parallel=pipeline",
        "trainer.progress=false",
        "device=cpu",
        "threads=1",
    ]
    result = run(compose_config(*overrides), tmp_path)
    assert result["status"] == "completed" and result["steps"] == 20 and result["test_error"] is not None
    assert result["parallel"] == {"stages": 1, "boundaries": [], "staleness": 1, "backend": "local"}
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"
    assert [checkpoint.step_of(p) for p in checkpoint.checkpoints(tmp_path)] == [10, 20]
    assert (tmp_path / "checkpoints" / "config.yaml").is_file()
    assert {"sg/cosine/block1", "align/cosine/block1"} <= read_scalars(tmp_path).keys()

    longer = run(compose_config(*overrides, "trainer.steps=30"), tmp_path)
    assert longer["status"] == "completed" and longer["steps"] == 30
    assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == list(range(5, 31, 5))  # each once
    with pytest.raises(ConfigError, match=r"parallel.staleness \(1 there, 0 here\)"):
        run(compose_config(*overrides, "trainer.steps=40", "parallel.staleness=0"), tmp_path)


@pytest.mark.slow
def test_two_gloo_processes_learn_mnist(tmp_path):
    """torchrun, 2 stages (block 1 | blocks 2-3 and the head), cDNI with the default staleness
    bound 1: at most 6% test error after 400 steps (one process: 3.6% at the same step)."""
    root = data_root()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST is not under {root}; set DNI_DATA_ROOT to a folder holding MNIST/raw")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [
        str(REPO / "experiments" / "train.py"),
        "experiment=mnist_fcn",
        "method=cdni",
        "parallel=pipeline",
    ]
    command += ["trainer.steps=400", "trainer.eval_every=200", "trainer.progress=false", "device=cpu"]
    # Microseconds in the folder name: the two ranks' Hydra would name different folders.
    command += [f"hydra.run.dir={tmp_path}/runs/${{now:%H-%M-%S-%f}}"]
    env = {**os.environ, "DNI_DATA_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # rank 1 wrote nothing, and left no folder behind
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 400
    assert metrics["parallel"] == {"stages": 2, "boundaries": [1], "staleness": 1, "backend": "gloo"}
    assert metrics["test_error"] <= 0.06, metrics["test_error"]
    logged = read_scalars(run)
    assert [s for s, _ in logged["test/error"]] == [200, 400] and len(logged["train/loss"]) == 8
    for stage in (0, 1):
        assert logged[f"pipeline/stage{stage}/samples_per_s"][-1][1] > 0
    assert 0 <= logged["pipeline/stage0/staleness_max"][-1][1] <= 1
    assert (
        run / ".hydra" / "config.yaml"
    ).is_file() and "stage 1 of 2: blocks 2-3 and the head," in result.stdout + result.stderr


# -- failure --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "how, expected, bound_s",
    [
        ("killed", "that rank crashed", 10),
        ("stalled", "raise parallel.timeout", 3 + 10),
        ("failed", "that rank crashed", 10),
    ],
    ids=["killed", "stalled", "failed"],
)
def test_a_lost_rank_stops_the_job_with_a_clear_error(how, expected, bound_s, tmp_path):
    """Rank 1 is killed, frozen, or stops on an error of its own mid-run: rank 0 must stop with
    status 1 and an error naming rank 1, at once for a closed connection, after `timeout` (3 s
    here) for silence; never hang. A rank that fails by itself while its messages are in
    flight must leave with status 1 too, not abort (SIGABRT) in the interpreter's teardown."""
    settings = {"steps": 10**6, "timeout": 3, "out": str(tmp_path / "run"), "eval_every": 10**6}
    if how == "failed":
        settings.update(fail_rank=1, fail_at=5)
    logs = tmp_path / "logs"
    procs = spawn(2, settings, logs)
    try:
        deadline = time.monotonic() + 90
        if how == "failed":
            procs[1].wait(timeout=90)
        else:
            while not all("stage" in (logs / f"{r}.log").read_text() for r in (0, 1)):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no start"
                time.sleep(0.1)
            time.sleep(1.0)  # well into training
            os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost_at = time.monotonic()
        code = procs[0].wait(timeout=bound_s + 30)
        elapsed = time.monotonic() - lost_at
    finally:
        if how == "stalled":
            os.kill(procs[1].pid, signal.SIGCONT)
        stop(procs)
    error = (logs / "0.log").read_text()
    assert code == 1 and "PipelineError" in error and "rank 1" in error, error[-2000:]
    assert expected in error, error[-2000:]
    assert elapsed < bound_s, f"rank 0 needed {elapsed:.1f} s to give up"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "rank 1" in metrics["error"]
    if how == "failed":  # the rank that failed says why, and leaves cleanly too
        assert procs[1].returncode == 1 and "injected failure" in (logs / "1.log").read_text()
