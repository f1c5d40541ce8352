"""The batched DNI step against the per-interface one: the same losses and parameters, bit for
bit, for every variant the batched step serves; divergences still caught and named; resumes
across the two optimiser layouts exact."""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys

import pytest
import torch

from dni import (
    CNN,
    FCN,
    ConvSynthesizer,
    DecoupledNeuralInterfaces,
    LinearSynthesizer,
    MLPSynthesizer,
    OracleSynthesizer,
    synthetic,
)
from dni.cli.train import run
from dni.errors import CheckpointError, Divergence
from dni.guard import Guard
from dni.tracking import read_metrics
from tests.helpers import batches, compose_config

adam = functools.partial(torch.optim.Adam, lr=1e-3)
sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
trained_linear = functools.partial(LinearSynthesizer, zero_init=False)  # nonzero from step 1


class OwnAdam(torch.optim.Adam):
    """An optimiser from outside torch: never merged, stepped once per step as it is."""


trained_mlp = functools.partial(MLPSynthesizer, hidden=[16], zero_init=False)

STEPS = 20

# name -> DecoupledNeuralInterfaces options; every variant the batched step serves
VARIANTS = {
    "dni": dict(synthesizer=trained_linear),
    "cdni": dict(synthesizer=trained_linear, conditioned=True),
    "shipped dni (block_lr_scale 0.1)": dict(synthesizer=LinearSynthesizer, block_lr_scale=0.1),
    "mlp synthesizer": dict(synthesizer=trained_mlp),
    "p_update 0.5": dict(synthesizer=trained_linear, conditioned=True, p_update=[0.5, 0.7, 0.3]),
    "segments of several blocks": dict(synthesizer=trained_linear, interfaces=[2]),
    "block optimizer sgd": dict(synthesizer=trained_linear, block_optimizer=sgd, block_lr_scale=0.5),
    "warmup": dict(synthesizer=trained_linear, warmup_steps=5),
    "regression steps 3": dict(synthesizer=trained_linear, conditioned=True, regression_steps=3),
    "true targets": dict(synthesizer=trained_linear, true_targets=True),
    "oracle synthesizer": dict(synthesizer=OracleSynthesizer),
    "scale and sg weight": dict(synthesizer=trained_linear, scale=0.5, sg_loss_weight=2.0),
    "adam foreach": dict(synthesizer=trained_linear, optimizer=functools.partial(adam, foreach=True)),
    "optimizer from outside torch": dict(
        synthesizer=trained_linear, optimizer=functools.partial(OwnAdam, lr=1e-3)
    ),
    "forward unlock": dict(
        synthesizer=trained_linear, conditioned=True, forward_unlock=True, input_synthesizer=trained_mlp
    ),
    "forward unlock, p_update 0.5, regression steps 2": dict(
        synthesizer=trained_linear,
        conditioned=True,
        forward_unlock=True,
        input_synthesizer=trained_mlp,
        p_update=0.5,
        regression_steps=2,
    ),
    "forward unlock, segments of several blocks": dict(
        synthesizer=trained_linear, forward_unlock=True, input_synthesizer=trained_mlp, interfaces=[1, 3]
    ),
    "adam fused": dict(
        synthesizer=trained_linear, block_lr_scale=0.1, optimizer=functools.partial(adam, fused=True)
    ),
}


@pytest.fixture(scope="module")
def data():
    return synthetic(num_train=512, num_test=128, shape=(24,), separation=1.0)


def twins(dtype: torch.dtype, **options) -> tuple[DecoupledNeuralInterfaces, DecoupledNeuralInterfaces]:
    """A batched and a per-interface method from the same initial weights, in `dtype`."""
    torch.manual_seed(0)
    model = FCN((24,), 10, depth=3, width=32)
    made = []
    for batched in (True, False):
        torch.manual_seed(1)  # the synthesizers' initial weights
        settings = {"optimizer": adam, **options, "batched": batched}
        made.append(in_dtype(DecoupledNeuralInterfaces(copy.deepcopy(model), **settings), dtype))
    assert made[0].batched and not made[1].batched
    assert {p.dtype for m in made for p in m.parts.parameters()} == {dtype}
    return made[0], made[1]


def in_dtype(method: DecoupledNeuralInterfaces, dtype: torch.dtype) -> DecoupledNeuralInterfaces:
    """`method` with every parameter and buffer in `dtype` (in place: its optimisers hold the
    same parameters)."""
    method.parts.to(dtype)
    return method


def run_steps(method, data, dtype, steps=STEPS, seed=0, rng=7) -> list[dict]:
    torch.manual_seed(rng)  # the p_update draws
    outs = []
    for x, y in batches(data, steps, seed=seed):
        outs.append({k: v.clone() for k, v in method.step(x.to(dtype), y).items()})
    return outs


def assert_identical(a, b, outs_a, outs_b):
    for step, (oa, ob) in enumerate(zip(outs_a, outs_b), start=1):
        assert oa.keys() == ob.keys()
        for key in oa:
            assert torch.equal(oa[key], ob[key]), f"{key} differs at step {step}"
    for (name, p), q in zip(a.parts.named_parameters(), b.parts.parameters()):
        assert torch.equal(p, q), f"{name} differs"
    for (name, p), q in zip(a.parts.named_buffers(), b.parts.buffers()):
        assert torch.equal(p, q), f"buffer {name} differs"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_step_is_bit_identical_to_the_per_interface_step(variant, dtype, data):
    batched, reference = twins(dtype, **VARIANTS[variant])
    initial = [p.clone() for p in batched.parts.parameters()]
    outs_b = run_steps(batched, data, dtype)
    outs_r = run_steps(reference, data, dtype)
    assert_identical(batched, reference, outs_b, outs_r)
    assert not all(torch.equal(p, q) for p, q in zip(initial, batched.parts.parameters())), "nothing moved"
    batched.guard.check()  # nothing went bad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_batched_step_is_bit_identical_on_a_cnn_with_conv_synthesizers(dtype):
    conv = functools.partial(ConvSynthesizer, hidden_layers=1, channels=4)
    torch.manual_seed(0)
    model = CNN((1, 12, 12), 10, depth=3, channels=4)
    made = []
    for batched in (True, False):
        torch.manual_seed(1)
        method = DecoupledNeuralInterfaces(
            copy.deepcopy(model), adam, conv, conditioned=True, batched=batched
        )
        made.append(in_dtype(method, dtype))
    generator = torch.Generator().manual_seed(0)
    stream = [
        (
            torch.randn(8, 1, 12, 12, generator=generator, dtype=dtype),
            torch.randint(10, (8,), generator=generator),
        )
        for _ in range(STEPS)
    ]
    outs = [[{k: v.clone() for k, v in m.step(x, y).items()} for x, y in stream] for m in made]
    assert_identical(*made, *outs)


@pytest.mark.parametrize(
    "options",
    [
        dict(target_lambda=0.5),
        dict(guard=Guard("skip")),
    ],
    ids=["target_lambda", "guard skip"],
)
def test_variants_the_batched_step_does_not_serve_take_the_per_interface_one(options):
    model = FCN((24,), 10, depth=3, width=32)
    method = DecoupledNeuralInterfaces(model, adam, trained_linear, conditioned=True, **options)
    assert not method.batched and method.optimizers is method.part_optimizers


def test_a_divergence_in_the_batched_step_is_named_with_its_block_quantity_and_step(data):
    batched, _ = twins(torch.float32, synthesizer=trained_linear)
    stream = batches(data, 10)
    for _ in range(3):
        batched.step(*next(stream))
    with torch.no_grad():  # the third synthesizer starts predicting infinities from step 4
        batched.interfaces[2].synthesizer.net[-1].bias.fill_(float("inf"))
    for _ in range(3):
        batched.step(*next(stream))  # nothing is read on the host during these steps
    with pytest.raises(Divergence) as caught:
        batched.guard.check(step=6)
    assert caught.value.step == 4 and caught.value.where == "block3"
    assert caught.value.quantity == "synthetic gradient"
    assert "training diverged at step 4: synthetic gradient in block3 is inf" in str(caught.value)


def test_a_non_finite_loss_in_the_batched_step_is_named(data):
    batched, _ = twins(torch.float32, synthesizer=trained_linear)
    x, y = next(batches(data, 1))
    batched.step(x, y)
    batched.step(x * float("nan"), y)
    with pytest.raises(Divergence, match="at step 2: synthetic gradient in block1 is nan"):
        batched.guard.check(step=2)
    # the head alone: a loss of nan with finite synthetic gradients
    batched, _ = twins(torch.float32, synthesizer=trained_linear)
    with torch.no_grad():
        for p in batched.head.parameters():
            p.fill_(float("nan"))
    batched.step(x, y)
    with pytest.raises(Divergence, match="at step 1: loss is nan"):
        batched.guard.check(step=1)


def test_a_divergence_in_the_batched_forward_unlock_is_named_as_the_per_interface_step_names_it(data):
    """An input synthesizer predicting infinities: the per-interface step stops at once, the
    batched one at the next read, both naming the same block, quantity and step."""
    unlock = dict(
        synthesizer=trained_linear, conditioned=True, forward_unlock=True, input_synthesizer=trained_mlp
    )
    batched, reference = twins(torch.float32, **unlock)
    stream = list(batches(data, 3))
    for method in (batched, reference):
        method.step(*stream[0])
        with torch.no_grad():  # block3's input synthesizer predicts infinities from step 2
            method.interfaces[2].input_synthesizer.net[-1].bias.fill_(float("inf"))
    with pytest.raises(Divergence) as stopped:
        reference.step(*stream[1])
    for x, y in stream[1:]:
        batched.step(x, y)
    with pytest.raises(Divergence) as caught:
        batched.guard.check(step=3)
    assert caught.value.step == 2 and caught.value.where == stopped.value.where == "block3"
    assert caught.value.quantity == stopped.value.quantity, (str(caught.value), str(stopped.value))


def test_the_sg_norm_bound_is_checked_deferred(data):
    batched, _ = twins(torch.float32, synthesizer=trained_linear, scale=1e6)
    batched.guard.max_sg_norm = 1.0
    batched.step(*next(batches(data, 1)))
    with pytest.raises(Divergence, match=r"synthetic-gradient norm \(bound 1\) in block1"):
        batched.guard.check(step=1)


RESUMED = {
    "cdni, sgd blocks": dict(
        synthesizer=trained_linear, conditioned=True, block_optimizer=sgd, block_lr_scale=0.5
    ),
    "forward unlock": dict(
        synthesizer=trained_linear, conditioned=True, forward_unlock=True, input_synthesizer=trained_mlp
    ),
}


@pytest.mark.parametrize("variant", list(RESUMED))
@pytest.mark.parametrize("direction", ["per-interface to batched", "batched to per-interface"])
def test_resume_across_the_two_optimiser_layouts_is_exact(direction, variant, data):
    """A checkpoint of one step (a run saved before the batched step existed has the
    per-interface layout) resumes in the other exactly as in its own."""
    options = RESUMED[variant]
    batched, reference = twins(torch.float32, **options)
    saver, other = (reference, batched) if direction == "per-interface to batched" else (batched, reference)
    run_steps(saver, data, torch.float32, steps=5)
    state = copy.deepcopy(saver.state_dict())
    assert len(state["optimizers"]) == len(saver.optimizers)
    other.load_state_dict(state)
    outs_saver = run_steps(saver, data, torch.float32, steps=5, seed=1)
    outs_other = run_steps(other, data, torch.float32, steps=5, seed=1)
    assert_identical(saver, other, outs_saver, outs_other)
    # a schedule acts on the groups both layouts share
    for group in other.optimizers[0].param_groups:
        group["lr"] *= 0.5
    assert other.head_optimizer.param_groups[0]["lr"] == saver.head_optimizer.param_groups[0]["lr"] * 0.5


def test_batched_merges_the_optimisers_into_one_per_class():
    model = FCN((24,), 10, depth=3, width=32)
    method = DecoupledNeuralInterfaces(model, adam, LinearSynthesizer, block_optimizer=sgd)
    assert [type(o) for o in method.optimizers] == [torch.optim.Adam, torch.optim.SGD]
    assert len(method.part_optimizers) == 7
    assert method.optimizers[0].param_groups[0] is method.head_optimizer.param_groups[0]
    own = DecoupledNeuralInterfaces(model, functools.partial(OwnAdam, lr=1e-3), LinearSynthesizer)
    assert own.optimizers == own.part_optimizers


@pytest.mark.parametrize("bad_step", [None, 3, 9, 17])
def test_deferred_checks_of_a_loop_that_never_reads_them_keep_the_first_bad_step(bad_step):
    guard = Guard(max_sg_norm=10.0)
    guard.KEEP = 4  # rows are folded after 8 steps, then again after each further 4
    for step in range(1, 21):
        guard.defer("synthetic gradient", torch.tensor(1.0), "block1")
        guard.defer("loss", torch.tensor(float("nan") if step == bad_step else 2.0))
        guard.defer(
            "synthetic gradient", torch.tensor(20.0 if bad_step and step == bad_step + 1 else 1.0), "block2"
        )
        guard.end_checks()
    assert len(guard._rows) < 2 * guard.KEEP
    if bad_step is None:
        guard.check(step=20)
        return
    with pytest.raises(Divergence) as caught:
        guard.check(step=20)
    assert (caught.value.step, caught.value.quantity, caught.value.where) == (bad_step, "loss", "")
    guard.defer("synthetic gradient", torch.tensor(20.0), "block1")
    with pytest.raises(Divergence, match=r"at step 21: synthetic-gradient norm \(bound 10\) in block1 is 20"):
        guard.check(step=21)


def _run(tmp_path, name: str, *overrides: str):
    cfg = compose_config("debug=fast", "method=cdni", "trainer.progress=false", "device=cpu", *overrides)
    run(cfg, tmp_path / name)
    return tmp_path / name


def _final_parts(run_dir):
    (last,) = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1:]
    return torch.load(last, weights_only=False)["method"]["parts"]


def test_a_run_saved_by_the_per_interface_step_resumes_in_the_batched_one_exactly(tmp_path, caplog):
    """Runs saved before the batched step existed have the per-interface optimiser layout."""
    whole = _run(tmp_path, "whole", "method.batched=false")
    saved = whole / "checkpoints" / "step_000000010.pt"
    with caplog.at_level(logging.INFO):
        resumed = _run(tmp_path, "resumed", f"resume={saved}", "resume_accepts_changes=true")
    assert f"resuming from {saved} at step 10" in caplog.text
    expected, got = _final_parts(whole), _final_parts(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_scheduled_run_resumed_with_the_other_layout_is_refused_in_one_sentence(tmp_path):
    whole = _run(tmp_path, "whole", "method.batched=false", "scheduler=multistep")
    saved = whole / "checkpoints" / "step_000000010.pt"
    with pytest.raises(
        CheckpointError, match=r"holds the schedules of 7 optimisers and this run has 1; resume"
    ):
        _run(tmp_path, "resumed", f"resume={saved}", "resume_accepts_changes=true", "scheduler=multistep")


def test_a_run_diverging_in_the_batched_step_records_what_the_per_interface_step_records(tmp_path):
    """The same block, quantity and step, though the batched step's checks are read only at the
    next logging step."""
    records = []
    for batched in ("true", "false"):
        with pytest.raises(Divergence) as caught:
            _run(tmp_path, batched, "method.scale=1e30", f"method.batched={batched}")
        records.append((read_metrics(tmp_path / batched)["divergence"], str(caught.value)))
    assert records[0] == records[1]
    assert records[0][0]["where"].startswith("block") and records[0][0]["step"] % 5 != 0  # not a logging step


def test_the_batched_step_reads_nothing_on_the_host(data, monkeypatch):
    """No `item`, `tolist` or truth test of a tensor from the library during ordinary steps (the
    optimiser's own bookkeeping aside): what a device would have to wait for."""
    batched, _ = twins(torch.float32, synthesizer=trained_linear, conditioned=True)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}dni{os.sep}" in caller and f"{os.sep}tests{os.sep}" not in caller:
                reads.append((_name, caller, sys._getframe(1).f_lineno))
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for x, y in batches(data, 3):
        batched.step(x, y)
    assert reads == []
    batched.step(x * float("nan"), y)
    with pytest.raises(Divergence):
        batched.guard.check(step=4)
    assert reads, "the spy saw the check's read"


def test_optimisers_torch_cannot_merge_stay_as_they_are():
    lbfgs = functools.partial(torch.optim.LBFGS, lr=0.1)  # one param group only
    method = DecoupledNeuralInterfaces(
        FCN((24,), 10, depth=2, width=8), lbfgs, LinearSynthesizer, synthesizer_optimizer=adam
    )
    assert [type(o) for o in method.optimizers] == [torch.optim.LBFGS] * 3 + [torch.optim.Adam]
