"""The switches of the DNI study (issue: unconditioned DNI that trains), each checked for
what it claims: No-Bprop, the true-target ablation, the warm-up, several regression steps,
a separate block optimiser, and the weight-drift diagnostic."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from dni import DNI, FCN, DecoupledNeuralInterfaces, LinearSynthesizer, MLPSynthesizer, NoBackprop, synthetic
from dni.cli.train import run
from dni.errors import ConfigError
from dni.functional import forward_without_stat_updates
from dni.guard import Guard
from tests.helpers import CONF, assert_below, batches, compose_config

adam = functools.partial(torch.optim.Adam, lr=1e-3)
frozen = functools.partial(torch.optim.SGD, lr=0.0)
trained_linear = functools.partial(LinearSynthesizer, zero_init=False)


@pytest.fixture
def data():
    return synthetic(num_train=512, num_test=128, shape=(24,), separation=1.0)


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_no_bprop_trains_only_the_classifier(data):
    model = FCN((24,), 10, depth=3, width=32)
    start = copy.deepcopy(model)
    method = NoBackprop(model, adam)
    for x, y in batches(data, 5):
        method.step(x, y)
    assert all(same(block, old) for block, old in zip(model.blocks[:-1], start.blocks[:-1]))
    assert not same(model.blocks[-1], start.blocks[-1])
    grads = method.parameter_gradients(x, y)
    assert all(g.abs().sum() == 0 for n, g in grads.items() if not n.startswith("blocks.3."))
    assert grads["blocks.3.weight"].abs().sum() > 0
    drift = method.drift()
    assert drift["drift/block1"] == 0.0 and drift["drift/block4"] > 0.0


def test_true_targets_are_autograds_gradient_at_each_activation(data):
    """With nothing learning, the target each synthesizer receives under `true_targets` must be
    `B * dL/dh_k` from full backprop; the bootstrapped target of a lower interface is not."""
    torch.manual_seed(1)
    x, y = next(batches(data, 1))

    def targets(true_targets: bool) -> list[torch.Tensor]:
        torch.manual_seed(2)
        model = FCN((24,), 10, depth=3, width=32)
        method = DecoupledNeuralInterfaces(
            model, frozen, LinearSynthesizer, synthesizer_optimizer=frozen, true_targets=true_targets
        )
        method.step(x, y)
        activations, h = [], x
        for interface in method.interfaces:
            h = forward_without_stat_updates(interface.block, h)
            activations.append(h)
        loss = F.cross_entropy(forward_without_stat_updates(method.head, h), y)
        truths = torch.autograd.grad(loss, activations)
        return [i.last_target for i in method.interfaces], [t * len(x) for t in truths]

    received, truths = targets(true_targets=True)
    for got, truth in zip(received, truths):
        assert torch.allclose(got, truth, atol=1e-6)
    bootstrapped, _ = targets(true_targets=False)
    assert bootstrapped[0].abs().sum() == 0  # the zero-initialised synthesizer above sends nothing
    assert torch.allclose(bootstrapped[-1], truths[-1], atol=1e-6)  # the last one is true either way


def test_lambda_returns_at_1_are_the_true_targets_and_at_0_the_bootstrapped_ones(data):
    """`target_lambda` mixes what arrives with the synthetic gradient; at 1 the targets are the
    true gradients (as `true_targets` gives them), at 0 exactly the paper's bootstrapped ones,
    and between, each lower target is the block's transpose applied to the mix."""
    torch.manual_seed(1)
    x, y = next(batches(data, 1))

    def targets(**switch) -> tuple[list[torch.Tensor], DecoupledNeuralInterfaces]:
        torch.manual_seed(2)
        model = FCN((24,), 10, depth=3, width=32)
        # Trained synthesizers, frozen: their predictions are not zero, and nothing moves.
        method = DecoupledNeuralInterfaces(
            model, frozen, trained_linear, synthesizer_optimizer=frozen, **switch
        )
        method.step(x, y)
        return [i.last_target for i in method.interfaces], method

    truths, _ = targets(true_targets=True)
    for got, truth in zip(targets(target_lambda=1.0)[0], truths):
        assert torch.allclose(got, truth, atol=1e-6)
    bootstrapped, _ = targets()
    assert all(torch.equal(a, b) for a, b in zip(targets(target_lambda=0.0)[0], bootstrapped))
    assert not torch.allclose(bootstrapped[0], truths[0], atol=1e-3)

    mixed, method = targets(target_lambda=0.25)
    assert torch.allclose(mixed[-1], truths[-1], atol=1e-6)  # the head sends the true gradient
    upper = method.interfaces[1]
    h1 = forward_without_stat_updates(method.interfaces[0].block, x).detach().requires_grad_()
    h2 = forward_without_stat_updates(upper.block, h1)
    injected = upper.injected(forward_without_stat_updates(upper.synthesizer, h2.detach()))
    (expected,) = torch.autograd.grad(h2, h1, 0.75 * injected + 0.25 * mixed[1] / len(x))
    assert torch.allclose(mixed[0], expected * len(x), atol=1e-6)


@pytest.mark.parametrize("target_lambda", [0.0, 0.5])
def test_a_skipped_synthetic_gradient_sends_no_target_down_with_or_without_lambda(data, target_lambda):
    """Under `guard.action=skip` a rejected synthetic gradient neither moves its block nor
    reaches the synthesizer below, whether targets are bootstrapped or lambda-returns."""
    torch.manual_seed(3)
    x, y = next(batches(data, 1))
    model = FCN((24,), 10, depth=2, width=32)
    guard = Guard(action="skip", max_sg_norm=1e-12)  # rejects every nonzero synthetic gradient
    method = DecoupledNeuralInterfaces(
        model, adam, trained_linear, guard=guard, target_lambda=target_lambda, batched=False
    )
    method.step(x, y)
    lower, upper = method.interfaces
    assert upper.last_target is not None  # the head's true gradient still arrives
    assert lower.last_target is None and guard.skipped == 2


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_target_lambda_outside_0_1_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^target_lambda=.* must lie in \[0, 1\]"):
        model = FCN((24,), 10, depth=2, width=8)
        DecoupledNeuralInterfaces(model, adam, LinearSynthesizer, target_lambda=value)


def test_synthesizer_ema_predicts_with_the_polyak_average_and_sends_its_transpose_down(data):
    """Under `synthesizer_ema` the synthesizer itself is regressed, but what is injected (and so
    what the block above sends down as the target below) is predicted by the average of its
    weights, updated by the factor after every synthesizer step."""
    torch.manual_seed(4)
    x, y = next(batches(data, 1))
    model = FCN((24,), 10, depth=2, width=32)
    # Blocks and head frozen, synthesizers learning: only the averages and the targets move.
    method = DecoupledNeuralInterfaces(
        model, frozen, trained_linear, synthesizer_optimizer=adam, synthesizer_ema=0.75
    )
    assert not method.batched  # the per-interface step serves it
    lower, upper = method.interfaces
    expected = [p.detach().clone() for p in upper.synthesizer.parameters()]  # the average starts as M_k
    for _ in range(3):
        method.step(x, y)
        for avg, p in zip(expected, upper.synthesizer.parameters()):
            avg.mul_(0.75).add_(0.25 * p.detach())
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(upper.average.parameters(), expected))
    assert not same(upper.average, upper.synthesizer)

    before = copy.deepcopy(upper.average)  # what the next step predicts with
    method.step(x, y)
    h1 = forward_without_stat_updates(lower.block, x).detach().requires_grad_()
    h2 = forward_without_stat_updates(upper.block, h1)
    for predictor, matches in ((before, True), (upper.synthesizer, False)):
        injected = upper.injected(forward_without_stat_updates(predictor, h2.detach()))
        (sent,) = torch.autograd.grad(h2, h1, injected, retain_graph=True)
        assert torch.allclose(lower.last_target, sent * len(x), atol=1e-6) == matches

    state = method.state_dict()  # the averages are saved with the synthesizers
    fresh = DecoupledNeuralInterfaces(
        copy.deepcopy(model), frozen, trained_linear, synthesizer_optimizer=adam, synthesizer_ema=0.75
    )
    fresh.load_state_dict(state)
    assert same(fresh.interfaces[1].average, upper.average)


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_an_interface_injects_what_its_predictor_predicts(ema):
    """`DNI.forward` injects the prediction of `predictor` (the one definition, shared with
    forward unlocking and the diagnostics): `M_k` itself, or under `synthesizer_ema` its average,
    which here is made to differ from `M_k`."""
    torch.manual_seed(5)
    block = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU())
    interface = DNI(block, trained_linear((16,)), frozen, frozen, synthesizer_ema=ema)
    assert (interface.predictor is interface.synthesizer) == (ema == 0.0)
    if ema:
        with torch.no_grad():
            for p in interface.predictor.parameters():
                p.add_(torch.randn_like(p))
    x = torch.randn(32, 12)
    interface(x)  # the block's optimiser has learning rate 0: its gradients stay to be read
    h = block(x)
    for source, matches in ((interface.predictor, True), (interface.synthesizer, ema == 0.0)):
        injected = interface.injected(source(h.detach()))
        expected = torch.autograd.grad(h, list(block.parameters()), injected, retain_graph=True)
        assert all(torch.equal(p.grad, e) for p, e in zip(block.parameters(), expected)) == matches


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_synthesizer_ema_outside_0_1_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^synthesizer_ema=.* must lie in \[0, 1\)"):
        model = FCN((24,), 10, depth=2, width=8)
        DecoupledNeuralInterfaces(model, adam, LinearSynthesizer, synthesizer_ema=value)


def test_warmup_keeps_blocks_still_while_synthesizers_learn(data):
    model = FCN((24,), 10, depth=2, width=32)
    method = DecoupledNeuralInterfaces(model, adam, trained_linear, warmup_steps=3)
    start = copy.deepcopy(model)
    synthesizers = copy.deepcopy(method.parts["synthesizers"])
    steps = batches(data, 4)
    for _ in range(3):
        method.step(*next(steps))
    assert all(same(block, old) for block, old in zip(model.blocks[:-1], start.blocks[:-1]))
    assert not same(method.parts["synthesizers"], synthesizers)
    assert all(p.grad is None for block in model.blocks[:-1] for p in block.parameters())  # nothing injected
    method.step(*next(steps))
    assert all(not same(block, old) for block, old in zip(model.blocks[:-1], start.blocks[:-1]))


def test_warmup_counts_survive_a_checkpoint(data):
    model = FCN((24,), 10, depth=2, width=32)
    method = DecoupledNeuralInterfaces(model, adam, trained_linear, warmup_steps=3)
    for x, y in batches(data, 2):
        method.step(x, y)
    state = method.state_dict()
    fresh = DecoupledNeuralInterfaces(copy.deepcopy(model), adam, trained_linear, warmup_steps=3)
    fresh.load_state_dict(state)
    assert [i.steps_seen for i in fresh.interfaces] == [2, 2]


def test_regression_steps_take_that_many_synthesizer_steps_on_one_target(data):
    x, y = next(batches(data, 1))
    losses = {}
    for n in (1, 4):
        torch.manual_seed(3)
        model = FCN((24,), 10, depth=1, width=32)
        synth = functools.partial(MLPSynthesizer, hidden=(16,), batch_norm=True)
        method = DecoupledNeuralInterfaces(
            model, frozen, synth, synthesizer_optimizer=adam, regression_steps=n
        )
        interface = method.interfaces[0]
        running = copy.deepcopy(list(interface.synthesizer.buffers()))
        method.step(x, y)
        (state,) = [s for s in interface.synthesizer_optimizer.state.values()][:1]
        assert state["step"] == n
        # BatchNorm's running statistics move once per step, not once per regression step.
        running_after = list(interface.synthesizer.buffers())
        assert running_after[-1] == running[-1] + 1  # num_batches_tracked
        h = model.blocks[0](x).detach()
        prediction = forward_without_stat_updates(interface.synthesizer, h)
        losses[n] = F.mse_loss(prediction, interface.last_target).item()
    assert losses[4] < losses[1]


def test_block_optimizer_moves_blocks_and_optimizer_moves_the_head(data):
    model = FCN((24,), 10, depth=2, width=32)
    start = copy.deepcopy(model)
    method = DecoupledNeuralInterfaces(model, adam, trained_linear, block_optimizer=frozen)
    for x, y in batches(data, 3):
        method.step(x, y)
    assert all(same(block, old) for block, old in zip(model.blocks[:-1], start.blocks[:-1]))
    assert not same(model.blocks[-1], start.blocks[-1])


@pytest.mark.parametrize("key", ["warmup_steps", "regression_steps"])
def test_bad_counts_are_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"^{key}=-1"):
        DecoupledNeuralInterfaces(FCN((24,), 10, depth=1, width=8), adam, LinearSynthesizer, **{key: -1})


def test_next_character_windows_hold_the_characters_before_their_label(tmp_path):
    from dni.tasks import next_character

    (tmp_path / "corpus.txt").write_text("abcabcabd" * 50)
    data = next_character(str(tmp_path), "corpus.txt", context=3, num_train=40, num_test=5)
    vocabulary = 4  # a, b, c, d
    assert data.x_train.shape == (40, 3 * vocabulary) and data.num_classes == vocabulary
    previous = data.x_train.view(40, 3, vocabulary).argmax(2)
    text = "abcabcabd"
    for window, label in zip(previous.tolist(), data.y_train.tolist()):
        # every window of this corpus is followed by the character that continues the cycle
        joined = "".join("abcd"[i] for i in [*window, label])
        assert joined in text * 3


def test_block_lr_scale_slows_the_blocks_only_and_a_schedule_keeps_the_ratio(data):
    model = FCN((24,), 10, depth=2, width=32)
    method = DecoupledNeuralInterfaces(model, adam, LinearSynthesizer, block_lr_scale=0.1)
    blocks = [i.optimizer for i in method.interfaces]
    assert [o.param_groups[0]["lr"] for o in blocks] == pytest.approx([1e-4, 1e-4])
    assert method.head_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert all(
        i.synthesizer_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3) for i in method.interfaces
    )
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(o, [1], gamma=0.1) for o in method.optimizers]
    method.step(*next(batches(data, 1)))
    for s in schedulers:
        s.step()
    assert blocks[0].param_groups[0]["lr"] == pytest.approx(1e-5)
    assert method.head_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="^block_lr_scale=0"):
        DecoupledNeuralInterfaces(model, adam, LinearSynthesizer, block_lr_scale=0)


@pytest.mark.parametrize("variant", sorted(p.stem for p in (CONF / "variant").glob("*.yaml")))
def test_every_study_arm_runs_on_a_tiny_budget(variant, tmp_path):
    cfg = compose_config(
        "experiment=dni_study",
        f"+variant={variant}",
        "dataset=synthetic",
        "dataset.num_train=256",
        "dataset.num_test=64",
        "model.depth=2",
        "trainer.steps=4",
        "trainer.batch_size=32",
        "trainer.eval_every=4",
        "trainer.diagnostics_every=2",
        "device=cpu",
    )
    result = run(cfg, tmp_path)
    assert result["status"] == "completed" and result["steps"] == 4


@pytest.mark.slow
def test_shipped_dni_beats_no_bprop_its_own_control_and_an_interface_below_the_classifier_at_depth_4(
    mnist, tmp_path, monkeypatch
):
    """The study's headlines, pinned: DNI as shipped (`method=dni`, no overrides) trains the
    hidden blocks of an FCN-4 into something far better than leaving them at their initial
    weights (before the study, DNI at depth 6 ended above No-Bprop: 35.4% against 27.8%); its
    synthetic gradients teach the blocks below the last one what the last one and the head
    alone cannot (`+variant=last_block_only`); and it is clearly better than with an
    interface directly below the classifier as well (H9)."""
    monkeypatch.setattr("dni.data.vision", lambda *a, **k: mnist)
    errors = {}
    for name, overrides in {
        "no_bprop": ["method=no_bprop"],
        "dni": ["method=dni"],
        "every_layer": ["method=dni", "method.top_interface=true"],
        "last_block_only": ["method=dni", "method.p_update=0.0"],
    }.items():
        cfg = compose_config(
            *overrides,
            "model.depth=4",
            "trainer.steps=800",
            "trainer.eval_every=800",
            "trainer.progress=false",
            "device=cpu",
        )
        errors[name] = run(cfg, tmp_path / name)["test_error"]
    assert_below(
        "DNI / No-Bprop test error, MNIST FCN-4, 800 steps", errors["dni"] / errors["no_bprop"], 0.45
    )
    assert_below(
        "DNI / DNI with an interface below the classifier, MNIST FCN-4, 800 steps",
        errors["dni"] / errors["every_layer"],
        0.8,
    )
    assert_below(
        "DNI / its blocks below the last frozen, MNIST FCN-4, 800 steps",
        errors["dni"] / errors["last_block_only"],
        0.8,
    )


def test_without_the_top_interface_dni_is_every_interface_but_the_one_below_the_head(data):
    def run_steps(**kwargs) -> tuple[list[float], DecoupledNeuralInterfaces]:
        torch.manual_seed(0)
        method = DecoupledNeuralInterfaces(
            FCN((24,), 10, depth=3, width=32), adam, LinearSynthesizer, **kwargs
        )
        return [method.step(x, y)["loss"].item() for x, y in batches(data, 5)], method

    losses, method = run_steps(top_interface=False)
    assert method.cuts == [1, 2]
    # The last hidden block learns with the classifier, from the true loss.
    assert {id(p) for p in method.head.parameters()} == {
        id(p) for b in method.model.blocks[2:] for p in b.parameters()
    }
    assert losses == run_steps(interfaces=[1, 2])[0]
    with pytest.raises(
        ConfigError, match=r"^interfaces=\[1, 3\] puts one after block 3, directly below the head"
    ):
        DecoupledNeuralInterfaces(
            FCN((24,), 10, depth=3), adam, LinearSynthesizer, interfaces=[1, 3], top_interface=False
        )
    with pytest.raises(ConfigError, match="^top_interface=false leaves no interface with one hidden block"):
        DecoupledNeuralInterfaces(FCN((24,), 10, depth=1), adam, LinearSynthesizer, top_interface=False)


def test_long_budget_is_the_papers_scaled_down_tenfold():
    cfg = compose_config("method=dni", "budget=long")
    assert cfg.trainer.steps == 50_000 and cfg.optim.lr == 1e-3 and cfg.trainer.batch_size == 256
    assert list(cfg.scheduler.milestones) == [30_000, 40_000] and cfg.trainer.checkpoint_every == 2500


def _best_linear_prediction(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The least-squares fit of g on (h, 1): what an ideal linear, label-free synthesizer predicts."""
    features = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
    return features @ torch.linalg.lstsq(features, g).solution


def test_a_linear_unconditioned_synthesizer_below_a_converged_softmax_head_can_only_predict_zero():
    # Why the chain of synthesizers starts from nothing (README, DNI study, H9): at a stationary
    # point of a softmax head W, sum_i (p_i - y_i) (h_i, 1)^T = 0, so g_i = W^T (p_i - y_i) has zero
    # covariance with (h_i, 1) and its best linear fit is zero. One ReLU block further down the
    # gradient is no longer linear in the activation, and a linear fit keeps part of it.
    torch.manual_seed(0)
    x, y = torch.randn(400, 12, dtype=torch.float64), torch.randint(0, 5, (400,))
    block = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU()).double()
    with torch.no_grad():
        h = block(x)
    head = torch.nn.Linear(8, 5).double()

    def gradients() -> tuple[torch.Tensor, torch.Tensor]:
        x_ = x.clone().requires_grad_(True)
        h_ = block(x_)
        g_h, g_x = torch.autograd.grad(F.cross_entropy(head(h_), y, reduction="sum"), [h_, x_])
        return g_h.detach(), g_x.detach()

    def explained(h: torch.Tensor, g: torch.Tensor) -> float:
        return float(_best_linear_prediction(h, g).norm() / g.norm())

    before = explained(h, gradients()[0])
    lbfgs = torch.optim.LBFGS(head.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=0)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = F.cross_entropy(head(h), y)
        loss.backward()
        return loss

    lbfgs.step(closure)
    g_h, g_x = gradients()
    assert before > 0.1
    assert explained(h, g_h) < 1e-6
    assert explained(x, g_x) > 0.05
