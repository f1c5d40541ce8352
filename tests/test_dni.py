"""The facts docs/design.md says must hold for synthetic gradients, each checked."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni import (
    CNN,
    DNI,
    FCN,
    Backprop,
    ConvSynthesizer,
    DecoupledNeuralInterfaces,
    LinearSynthesizer,
    MLPSynthesizer,
    OracleSynthesizer,
    synthetic,
)
from dni.cli.train import run
from dni.errors import ConfigError
from tests.helpers import assert_above, assert_below, batches, compose_config, read_scalars

adam = functools.partial(torch.optim.Adam, lr=1e-3)
frozen = functools.partial(torch.optim.SGD, lr=0.0)


@pytest.fixture
def data():
    return synthetic(num_train=512, num_test=128, shape=(24,), separation=1.0)


def twin_methods(depth=3, **dni_options):
    model = FCN((24,), 10, depth=depth, width=32)
    reference = Backprop(copy.deepcopy(model), adam)
    return DecoupledNeuralInterfaces(model, adam, OracleSynthesizer, **dni_options), reference


@pytest.mark.parametrize("interfaces", [None, [2]])
def test_oracle_step_gives_backprops_parameter_gradients(data, interfaces):
    dni, bprop = twin_methods(interfaces=interfaces)
    x, y = next(batches(data, 1))
    dni.step(x, y)
    bprop.step(x, y)
    for (name, p), q in zip(dni.model.named_parameters(), bprop.model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-5), name
        assert torch.allclose(p, q, atol=1e-6), name  # and the same update


@pytest.mark.learning
def test_oracle_training_follows_backprops_losses(data):
    dni, bprop = twin_methods()
    losses = [(dni.step(x, y)["loss"].item(), bprop.step(x, y)["loss"].item()) for x, y in batches(data, 20)]
    for ours, theirs in losses:
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    # it did train, so the comparison means something
    assert_below("oracle DNI loss, last step / first", losses[-1][0] / losses[0][0], 0.9)


@pytest.mark.parametrize(
    "synthesizer, shape",
    [
        (LinearSynthesizer, (32,)),
        (functools.partial(MLPSynthesizer, hidden=(16, 16)), (32,)),
        (functools.partial(ConvSynthesizer, hidden_layers=1, channels=4), (6, 5, 5)),
    ],
)
def test_fresh_synthesizers_predict_exactly_zero(synthesizer, shape):
    synth = synthesizer(shape=shape, context_dim=10)
    h, context = torch.randn(8, *shape), F.one_hot(torch.arange(8) % 10, 10).float()
    assert torch.equal(synth(h, context), torch.zeros(8, *shape))


def test_first_step_leaves_blocks_untouched_and_trains_the_head(data):
    model = FCN((24,), 10, depth=2, width=32)
    before = copy.deepcopy(model)
    method = DecoupledNeuralInterfaces(model, adam, LinearSynthesizer)
    method.step(*next(batches(data, 1)))
    for block, old in zip(model.blocks[:-1], before.blocks[:-1]):
        for p, q in zip(block.parameters(), old.parameters()):
            assert torch.equal(p, q)
    assert not torch.equal(model.blocks[-1].weight, before.blocks[-1].weight)


def test_synthesizer_targets_do_not_reach_the_block():
    block = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    interface = DNI(block, MLPSynthesizer((4,), hidden=(8,), zero_init=False), frozen, adam)
    out = interface(torch.randn(16, 5))
    injected = [p.grad.clone() for p in block.parameters()]
    synth_before = [p.clone() for p in interface.synthesizer.parameters()]
    out.backward(torch.randn_like(out))  # a target arrives: the synthesizer regresses on it
    assert all(torch.equal(p.grad, g) for p, g in zip(block.parameters(), injected))
    assert any(not torch.equal(p, q) for p, q in zip(interface.synthesizer.parameters(), synth_before))
    assert interface.last_target.requires_grad is False


def test_target_is_what_the_next_block_sends_back(data):
    """Bootstrapping: interface k's target is block k+1's backward of its own synthetic gradient."""
    torch.manual_seed(1)
    model = FCN((24,), 10, depth=3, width=32)
    synth = functools.partial(LinearSynthesizer, zero_init=False)
    # Nothing learns, so the same forward can be repeated afterwards to find the expected target.
    method = DecoupledNeuralInterfaces(model, frozen, synth, synthesizer_optimizer=frozen, p_update=0.0)
    x, y = next(batches(data, 1))
    method.step(x, y)
    lower, upper = method.interfaces[0], method.interfaces[1]
    x1 = lower.block(x).detach().requires_grad_()
    h2 = upper.block(x1)
    g2 = upper.synthesizer(h2.detach())
    (expected,) = torch.autograd.grad(h2, x1, g2 / len(x))
    assert torch.allclose(lower.last_target, expected * len(x), atol=1e-6)
    assert lower.last_target.abs().sum() > 0


def test_last_interface_regresses_on_the_true_gradient(data):
    model = FCN((24,), 10, depth=1, width=32)
    method = DecoupledNeuralInterfaces(model, frozen, LinearSynthesizer, p_update=0.0)
    x, y = next(batches(data, 1))
    method.step(x, y)
    h = model.blocks[0](x).detach().requires_grad_()
    (truth,) = torch.autograd.grad(F.cross_entropy(model.blocks[1](h), y), h)
    assert torch.allclose(method.interfaces[0].last_target, truth * len(x), atol=1e-6)


def test_p_update_zero_leaves_the_block_unchanged_while_others_learn(data):
    model = FCN((24,), 10, depth=1, width=32)
    synth = functools.partial(LinearSynthesizer, zero_init=False)
    method = DecoupledNeuralInterfaces(model, adam, synth, p_update=[0.0])
    frozen_block = copy.deepcopy(model.blocks[0])
    head = copy.deepcopy(model.blocks[1])
    for x, y in batches(data, 5):
        method.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.blocks[0].parameters(), frozen_block.parameters()))
    assert not torch.equal(model.blocks[1].weight, head.weight)


def test_p_update_one_half_updates_about_half_the_time(data):
    model = FCN((24,), 10, depth=1, width=32)
    method = DecoupledNeuralInterfaces(
        model, adam, functools.partial(LinearSynthesizer, zero_init=False), p_update=0.5
    )
    changes = 0
    for x, y in batches(data, 40):
        before = model.blocks[0][1].weight.clone()
        method.step(x, y)
        changes += not torch.equal(before, model.blocks[0][1].weight)
    assert 10 <= changes <= 30


def test_eval_mode_interface_is_just_the_block():
    block = nn.Linear(5, 4)
    interface = DNI(block, LinearSynthesizer((4,)), adam, adam).eval()
    x = torch.randn(3, 5)
    assert torch.equal(interface(x), block(x)) and interface(x).requires_grad


@pytest.mark.learning
def test_interface_in_a_plain_loop_learns(data):
    """The README's example: interfaces in a user's own loop, no runner involved."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(24, 32), nn.ReLU()), nn.Sequential(nn.Linear(32, 32), nn.ReLU())]
    interfaces = [DNI(b, LinearSynthesizer((32,), context_dim=10), adam, adam) for b in blocks]
    head = nn.Linear(32, 10)
    head_optimizer = adam(head.parameters())
    for x, y in batches(data, 300):
        h, context = x, F.one_hot(y, 10).float()
        for interface in interfaces:
            h = interface(h, context)
        loss = F.cross_entropy(head(h), y)
        head_optimizer.zero_grad()
        loss.backward()
        head_optimizer.step()
    with torch.no_grad():
        h = data.x_test
        for interface in interfaces:
            h = interface.eval()(h)
        error = (head(h).argmax(1) != data.y_test).float().mean().item()
    assert_below("interfaces in a plain loop, synthetic test error", error, 0.3)
    assert all(i.stats["loss"] > 0 for i in interfaces)


@pytest.mark.learning
def test_forward_unlocking_trains(data):
    torch.manual_seed(0)
    model = FCN((24,), 10, depth=3, width=32)
    unlock = functools.partial(MLPSynthesizer, hidden=(32,), zero_init=False)
    method = DecoupledNeuralInterfaces(
        model, adam, LinearSynthesizer, conditioned=True, forward_unlock=True, input_synthesizer=unlock
    )
    assert [i.input_synthesizer is None for i in method.interfaces] == [True, False, False]
    first = {}
    for _step, (x, y) in enumerate(batches(data, 300)):
        out = method.step(x, y)
        first = first or {k: v.item() for k, v in out.items()}
    ratio = out["sg/input_loss/block2"] / first["sg/input_loss/block2"]
    assert_below("forward unlocking, input synthesizer loss last / first", ratio, 0.5)
    assert_below("forward unlocking, synthetic test error", data.evaluate(model)["error"], 0.3)


def test_cnn_interfaces_use_conv_synthesizers():
    model = CNN((1, 12, 12), 10, depth=2, channels=4)
    conv = functools.partial(ConvSynthesizer, hidden_layers=1, channels=4)
    method = DecoupledNeuralInterfaces(model, adam, conv, conditioned=True)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(10, (8,))
    assert torch.isfinite(method.step(x, y)["loss"])
    with pytest.raises(ConfigError, match="synthesizer=conv"):
        DecoupledNeuralInterfaces(CNN((1, 12, 12), 10, depth=2, channels=4), adam, LinearSynthesizer)


@pytest.mark.parametrize("interfaces", [[0], [3], []])
def test_interfaces_must_follow_hidden_blocks(interfaces):
    with pytest.raises(ConfigError, match=r"choose from \[1, 2\]"):
        DecoupledNeuralInterfaces(FCN((24,), 10, depth=2), adam, LinearSynthesizer, interfaces=interfaces)


@pytest.mark.parametrize("p_update", [-0.1, 1.5])
def test_p_update_outside_the_unit_interval_is_refused(p_update):
    with pytest.raises(ConfigError, match=r"p_update=.* \[0, 1\]"):
        DecoupledNeuralInterfaces(FCN((24,), 10, depth=2), adam, LinearSynthesizer, p_update=p_update)


def test_fidelity_of_the_oracle_is_perfect(data):
    dni, _ = twin_methods()
    stats = dni.diagnostics(*next(batches(data, 1)))
    for k in (1, 2, 3):
        assert stats[f"sg/cosine/block{k}"] == pytest.approx(1.0)
        assert stats[f"sg/rel_error/block{k}"] == pytest.approx(0.0, abs=1e-6)
        assert stats[f"align/cosine/block{k}"] == pytest.approx(1.0)


@pytest.mark.slow
def test_cdni_learns_mnist_and_its_last_synthesizer_aligns(mnist, tmp_path, monkeypatch):
    """cDNI, FCN with 3 hidden layers, linear synthesizer: <= 4% test error in 1500 steps, and the
    last interface's synthetic gradient comes to point the way of the true one (cosine > 0.5)."""
    monkeypatch.setattr("dni.data.vision", lambda *a, **k: mnist)
    cfg = compose_config(
        "experiment=mnist_fcn",
        "method=cdni",
        "trainer.steps=1500",
        "trainer.eval_every=1500",
        "trainer.diagnostics_every=250",
        "trainer.progress=false",
        "device=cpu",
    )
    result = run(cfg, tmp_path)
    assert_below("cDNI MNIST test error, 1500 steps", result["test_error"], 0.04)
    cosines = [value for _, value in read_scalars(tmp_path)["sg/cosine/block3"]]
    assert cosines[0] == 0.0, cosines  # zero-initialised,
    assert_above("cDNI last synthesizer cosine, best of the run", max(cosines), 0.5)  # then aligned


def test_every_synthesizer_is_handed_the_rest_of_the_network_and_only_the_oracle_uses_it():
    """`attach` is the one hook for a synthesizer that predicts from what follows `h`: a learned
    one ignores it (keeping no reference, so it copies and saves as before); the oracle returns
    `B` times the gradient of what it was handed."""
    rest = lambda h, context: (h**2).sum() / 2  # noqa: E731 - its gradient at h is h itself
    linear = LinearSynthesizer((8,))
    linear.attach(rest)
    assert not linear.needs_downstream and "downstream" not in vars(linear)
    oracle = OracleSynthesizer((8,))
    oracle.attach(rest)
    h = torch.randn(4, 8)
    assert oracle.needs_downstream and torch.allclose(oracle(h), 4 * h)
