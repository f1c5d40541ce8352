"""The side-by-side control (`control=true`): a backprop twin from the same weights, on the
same batches, logged beside the method."""

from __future__ import annotations

import copy

import pytest
import torch

from dni.cli.train import run
from dni.methods import Backprop, Controlled, FeedbackAlignment
from dni.methods import control as control_module
from dni.models import FCN
from tests.helpers import compose_config, read_scalars

TINY = [
    "dataset=synthetic",
    "dataset.num_train=512",
    "dataset.num_test=128",
    "trainer.steps=20",
    "trainer.batch_size=64",
    "trainer.eval_every=10",
    "trainer.log_every=1",
    "trainer.diagnostics_every=5",
    "trainer.progress=false",
    "model.depth=2",
    "model.width=32",
    "device=cpu",
    "control=true",
]


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def net() -> FCN:
    return FCN((1, 28, 28), 10, depth=2, width=32)


def test_runner_gives_the_twin_the_same_initial_weights(tmp_path, monkeypatch):
    """What the runner hands to `Controlled`: a separate network equal to the method's, in
    every parameter and buffer, before the first step."""
    seen = []

    class Spy(control_module.Controlled):
        def __init__(self, method, control):
            seen.append((copy.deepcopy(method.model.state_dict()), copy.deepcopy(control.model.state_dict())))
            assert control.model is not method.model
            super().__init__(method, control)

    monkeypatch.setattr(control_module, "Controlled", Spy)
    assert run(compose_config("method=fa", *TINY), tmp_path)["status"] == "completed"
    ((mine, twins),) = seen
    assert mine.keys() == twins.keys() and len(mine) > 0
    assert all(torch.equal(mine[k], twins[k]) for k in mine)


def test_logs_carry_both_runs(tmp_path):
    """Losses and errors of the method and of its twin land in two TensorBoard runs under the
    same tags (`<run>` and `<run>/control`, so a chart draws them in two colours), both
    alignments in the method's; at the first diagnostics (before any update) the twin and the
    method sit at the same parameters, so their alignments agree and their distance is 0;
    later the two runs differ."""
    result = run(compose_config("method=fa", *TINY), tmp_path)
    assert result["status"] == "completed" and result["method"] == "fa"
    scalars, control = read_scalars(tmp_path), read_scalars(tmp_path / "control")
    for tag in ("train/loss", "train/accuracy", "test/error", "test/loss"):
        assert len(scalars[tag]) >= 2 and len(control[tag]) >= 2, tag
    assert not [t for t in scalars if t.startswith(("control/train", "control/test"))]
    for k in (1, 2, 3):
        for stat in ("cosine", "pearson"):
            exact, twin = scalars[f"align/{stat}/block{k}"], scalars[f"align_twin/{stat}/block{k}"]
            assert exact[0][0] == twin[0][0] == 1 and exact[0][1] == pytest.approx(twin[0][1], abs=1e-6)
    for k in (1, 2):  # later the twin has drifted: the two references differ
        step, exact = scalars[f"align/cosine/block{k}"][-1]
        twin_step, twin = scalars[f"align_twin/cosine/block{k}"][-1]
        assert step == twin_step > 1 and abs(exact - twin) > 1e-4
    distance = scalars["control/relative_distance"]
    assert distance[0] == (1, 0.0) and distance[-1][1] > 0
    ours, theirs = dict(scalars["train/loss"]), dict(control["train/loss"])
    assert ours[1] == pytest.approx(theirs[1]) and ours[20] != pytest.approx(theirs[20])
    assert {"test/error", "control/test/error"} <= result["final"].keys()


def test_a_backprop_method_and_its_twin_move_in_lockstep():
    """Same weights, same optimiser, same batches: a bprop method and its twin give the same
    loss at every step and perfectly aligned gradients, so the twin sees what the method sees."""
    model = net()
    pair = Controlled(Backprop(model, adam), Backprop(copy.deepcopy(model), adam))
    assert len(pair.optimizers) == 2 and pair.eval_models().keys() == {"test", "control/test"}
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(32, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (32,), generator=generator)
        out = pair.step(x, y)
        assert out["loss"] == out["control/train/loss"] and out["accuracy"] == out["control/train/accuracy"]
    diagnostics = pair.diagnostics(x, y)
    assert diagnostics["control/relative_distance"] == 0.0
    assert all(diagnostics[f"align_twin/cosine/block{k}"] == pytest.approx(1.0) for k in (1, 2, 3))


def test_state_dict_round_trip_restores_both_runs():
    """A checkpoint of the pair restores the method (with its feedback matrices) and the twin,
    and the restored pair continues exactly as the original does."""
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def pair(seed: int) -> Controlled:
        torch.manual_seed(seed)
        model = net()
        return Controlled(FeedbackAlignment(model, adam, seed=seed), Backprop(copy.deepcopy(model), adam))

    original, restored = pair(0), pair(1)
    for _ in range(3):
        original.step(x, y)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    after, again = original.step(x, y), restored.step(x, y)
    assert after.keys() == again.keys() and all(torch.equal(after[k], again[k]) for k in after)
    for a, b in zip(original.parts.state_dict().values(), restored.parts.state_dict().values()):
        assert torch.equal(a, b)


def test_a_twin_that_does_not_start_from_the_same_weights_is_refused():
    model = net()
    with pytest.raises(ValueError, match="deepcopy"):
        Controlled(Backprop(model, adam), Backprop(net(), adam))  # a fresh draw, not a copy
    with pytest.raises(ValueError, match="deepcopy"):
        Controlled(Backprop(model, adam), Backprop(model, adam))  # the model itself


def test_a_resumed_controlled_run_continues_exactly(tmp_path):
    """Interrupted at step 10 and resumed from its checkpoint, a dfa run with its twin ends
    where an uninterrupted run ends, for the method and the twin alike."""
    tiny = [*TINY, "method=dfa", "trainer.checkpoint_every=5", "trainer.diagnostics_every=0"]
    run(compose_config(*tiny, "trainer.steps=10"), tmp_path / "resumed")
    resumed = run(compose_config(*tiny), tmp_path / "resumed")["final"]
    straight = run(compose_config(*tiny), tmp_path / "straight")["final"]
    for key in ("train/loss", "control/train/loss", "test/loss", "control/test/loss"):
        assert resumed[key] == straight[key], key
