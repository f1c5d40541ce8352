"""The DNI interface: a block paired with a synthesizer, so the block learns at once.

Scale convention (stated once, here). Losses are batch means, so a true gradient
`dL/dh` carries a factor 1/B and its entries shrink with the batch size. A synthesizer
therefore predicts the per-example gradient `B * dL/dh`, which does not depend on B; it
is regressed towards the arriving gradient multiplied by B, and its prediction is divided
by B before it is injected. With Adam on both sides this matters: regressing the raw
batch-mean gradient trains far worse (see docs/design.md).

Used on its own, in a plain PyTorch loop::

    interfaces = [DNI(block, LinearSynthesizer(shape), adam, adam) for block, shape in ...]
    h = x
    for interface in interfaces:
        h = interface(h)       # block k updates here, from its synthetic gradient
    loss = F.cross_entropy(head(h), y)
    loss.backward()            # the true gradient trains the last synthesizer
    head_optimizer.step()

Each interface returns a detached copy of its activation; whatever gradient later reaches
that copy (the true one from the loss, or the one block k+1 sends back from its own
synthetic gradient) becomes the regression target of the synthesizer, through a hook.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.functional import forward_without_stat_updates
from dni.guard import Guard
from dni.synthesizers import Synthesizer

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class DNI(nn.Module):
    """Wraps block `f_k` and synthesizer `M_k` (and optionally an input synthesizer `I_k`).

    In training mode `forward(x)` computes `h = f_k(x)`, predicts `g = M_k(h, c)`,
    injects it with `h.backward(g / B)`, steps the block's optimiser at once, and returns
    `h` detached; the gradient that later arrives at the returned tensor is the target
    `delta` that `M_k` is regressed towards. In eval mode it is just the block.

    Args:
        block: the module `f_k`.
        synthesizer: predicts `B * dL/dh` from `h` (and a context for cDNI).
        optimizer: builds the block's optimiser from its parameters.
        synthesizer_optimizer: builds the synthesizers' optimiser (unused by the oracle).
        p_update: probability that the block applies its update on a step; forward (and
            the backward that delivers the target below) always runs.
        scale: factor on the injected synthetic gradient.
        sg_loss_weight: factor on the synthesizer's regression loss.
        input_synthesizer: `I_k`, predicting the block's input from the network input for
            forward unlocking (see `unlocked_update`).
        guard: checks synthetic gradients and regression losses; stops by default.
        name: used in logs and messages, e.g. "block2".
        warmup_steps: for its first `warmup_steps` training steps the block applies no update
            while the synthesizer already learns (and targets still flow down), so a block is
            never steered by a synthesizer that has not yet seen a target.
        regression_steps: optimiser steps of `M_k` on each target it receives (the first on
            the prediction that was injected, the others on fresh predictions at the same
            activation), letting the synthesizer keep up with a target that moves.
        target_lambda: what the block sends down as the target of the interface below,
            `J^T ((1 - lambda) g_hat + lambda delta)`: at 0 (the paper's DNI) its own injected
            synthetic gradient, sent at once; above 0 also the target `delta` that arrives
            here, so targets are lambda-returns as in TD(lambda) and at 1 equal the true
            gradient. Sending waits for `delta`, through the block at its current parameters:
            the synthesizers' learning (not the blocks') is then backward-locked.
        synthesizer_ema: above 0, every synthetic gradient (injected here, and so the target
            sent down) is predicted by a Polyak average of `M_k`'s weights, updated by this
            factor after each of its steps, as TD learning takes bootstrapped targets from a
            slowly moving target network; the regression still trains `M_k` itself.
    """

    def __init__(
        self,
        block: nn.Module,
        synthesizer: Synthesizer,
        optimizer: OptimizerFactory,
        synthesizer_optimizer: OptimizerFactory,
        *,
        p_update: float = 1.0,
        scale: float = 1.0,
        sg_loss_weight: float = 1.0,
        input_synthesizer: Synthesizer | None = None,
        guard: Guard | None = None,
        name: str = "block",
        warmup_steps: int = 0,
        regression_steps: int = 1,
        target_lambda: float = 0.0,
        synthesizer_ema: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= p_update <= 1.0:
            raise ConfigError(f"p_update={p_update!r} is not allowed; it must lie in [0, 1]")
        for key, value, least in (
            ("warmup_steps", warmup_steps, 0),
            ("regression_steps", regression_steps, 1),
        ):
            if not isinstance(value, int) or value < least:
                raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer >= {least}")
        if not 0.0 <= target_lambda <= 1.0:
            raise ConfigError(f"target_lambda={target_lambda!r} is not allowed; it must lie in [0, 1]")
        self.warmup_steps, self.regression_steps = warmup_steps, regression_steps
        self.target_lambda = float(target_lambda)
        if not 0.0 <= synthesizer_ema < 1.0:
            raise ConfigError(f"synthesizer_ema={synthesizer_ema!r} is not allowed; it must lie in [0, 1)")
        self.synthesizer_ema = float(synthesizer_ema)
        self.steps_seen = 0  # training passes so far; saved by the method with its checkpoints
        self.block, self.synthesizer, self.input_synthesizer = block, synthesizer, input_synthesizer
        synthesizer.where = name  # named in its own messages (a wrong shape, a missing context)
        # The Polyak average that predicts under `synthesizer_ema` (a synthesizer with nothing to
        # learn, the oracle, has nothing to average).
        self.average: Synthesizer | None = None
        if synthesizer_ema > 0 and next(iter(synthesizer.parameters()), None) is not None:
            self.average = copy.deepcopy(synthesizer).requires_grad_(False)
        self.p_update, self.scale, self.sg_loss_weight = float(p_update), float(scale), float(sg_loss_weight)
        self.guard = guard or Guard()
        self.name = name
        self.optimizer = optimizer(block.parameters())
        learned = list(synthesizer.parameters())
        self.synthesizer_optimizer = synthesizer_optimizer(learned) if learned else None
        self.input_optimizer = (
            synthesizer_optimizer(input_synthesizer.parameters()) if input_synthesizer is not None else None
        )
        # What the last step measured, as tensors (read them without forcing a sync).
        self.stats: dict[str, Tensor] = {}
        self.last_target: Tensor | None = None

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        update: bool | None = None,
        truth: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """`truth`, for the true-target ablation only, maps the activation to the true `dL/dh`
        (batch-mean scale); the synthesizer is then regressed towards it instead of the
        bootstrapped gradient that arrives."""
        if not self.training:
            return self.block(x)
        if update is None:
            update = self.draw_update()
        self.steps_seen += 1
        h = self.block(x)
        g = self.synthesizer(h.detach(), context)  # regressed towards the target that arrives
        true_target = truth(h.detach()) if truth is not None else None
        # What is injected comes from `predictor`: `g` itself, or the Polyak average's prediction.
        predictor = self.predictor
        injected = self.injected(g if predictor is self.synthesizer else predictor(h.detach(), context))
        # Under lambda-returns the target for the interface below leaves only once `delta` is here.
        sends_later = x.requires_grad and self.target_lambda > 0
        self.stats["norm"] = injected.norm().detach()
        accepted = self.guard.synthetic_gradient(injected, self.name, norm=self.stats["norm"])
        if accepted:
            # Only the input needs a gradient when the block skips its update: it carries
            # the bootstrapped target down to the interface below.
            wants = list(self.block.parameters()) if update else []
            if x.requires_grad and not sends_later:
                wants.append(x)
            if wants:
                self.optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(h, injected, inputs=wants)
            if update:
                self.optimizer.step()
        activation = h.detach()  # for further regression steps; the block's graph is not kept
        out = h.detach().requires_grad_()

        def arrived(delta: Tensor) -> None:
            self._regress(g, delta if true_target is None else true_target, activation, context)
            if sends_later and accepted:  # a skipped step sends nothing down, as without lambda
                self._send_down(x, injected, delta)

        out.register_hook(arrived)
        return out

    def _send_down(self, x: Tensor, injected: Tensor, delta: Tensor) -> None:
        """Send `J^T ((1 - lambda) g_hat + lambda delta)` to the input `x` (the interface below),
        through the block at its current parameters, without touching BatchNorm statistics."""
        with torch.enable_grad():  # hooks run inside a backward pass, where grad mode is off
            h = forward_without_stat_updates(self.block, x)
            mixed = (1.0 - self.target_lambda) * injected + self.target_lambda * delta.detach()
            torch.autograd.backward(h, mixed, inputs=[x])

    def draw_update(self) -> bool:
        """Whether the block applies its update this step: never during the warm-up, then
        always, or with probability `p_update` (the paper's random asynchronous updates)."""
        if self.steps_seen < self.warmup_steps:
            return False
        return self.p_update >= 1.0 or bool(torch.rand(()) < self.p_update)

    def injected(self, prediction: Tensor) -> Tensor:
        """The gradient injected at `h` for a prediction of `B * dL/dh`: scaled, divided by B."""
        scaled = prediction.detach() if self.scale == 1.0 else self.scale * prediction.detach()  # 1 * g is g
        return scaled / prediction.shape[0]

    def _regress(self, prediction: Tensor, delta: Tensor, h: Tensor, context: Tensor | None) -> None:
        """Regress `M_k` towards the arriving gradient `delta = dL/dh` (scaled by B) in
        `regression_steps` steps; steps after the first predict afresh at the activation `h`
        (leaving BatchNorm's running statistics to the first)."""
        target = delta.detach() * delta.shape[0]
        self.last_target = target
        for i in range(self.regression_steps):
            with torch.enable_grad():  # hooks run inside a backward pass, where grad mode is off
                if i > 0:
                    prediction = forward_without_stat_updates(self.synthesizer, h.detach(), context)
                loss = F.mse_loss(prediction, target)
                if i == 0:
                    self.stats["loss"] = loss.detach()  # the error of the gradient that was injected
                if self.synthesizer_optimizer is None or not self.guard.finite(
                    "synthesizer loss", loss, self.name
                ):
                    return
                self.synthesizer_optimizer.zero_grad(set_to_none=True)
                (self.sg_loss_weight * loss).backward()
            self.synthesizer_optimizer.step()
            self._update_average()

    @torch.no_grad()
    def _update_average(self) -> None:
        if self.average is not None:
            averaged, online = list(self.average.parameters()), list(self.synthesizer.parameters())
            torch._foreach_lerp_(averaged, online, 1.0 - self.synthesizer_ema)

    @property
    def predictor(self) -> Synthesizer:
        """The synthesizer whose predictions are injected: `M_k`, or its average."""
        return self.synthesizer if self.average is None else self.average

    def regress_late(self, h: Tensor, delta: Tensor, context: Tensor | None = None) -> None:
        """Regress `M_k` towards a target that arrives after `M_k` may have stepped (an
        asynchronous pipeline, `dni.distributed`). The prediction at the activation `h` is made
        afresh at the current parameters: the graph of the one made in `forward` refers to
        parameters that have since been changed in place."""
        with torch.enable_grad():
            prediction = forward_without_stat_updates(self.synthesizer, h.detach(), context)
        self._regress(prediction, delta, h, context)

    def unlocked_update(self, network_input: Tensor, context: Tensor | None = None) -> Tensor:
        """Forward unlocking: update the block from `I_k`'s prediction of its input, before the
        blocks below have run. Returns the prediction, for `learn_input` once the real input
        is known. BatchNorm statistics are left to the real inputs."""
        if self.input_synthesizer is None:
            raise RuntimeError(f"{self.name} has no input synthesizer; set forward_unlock=true")
        predicted = self.input_synthesizer(network_input)
        if self.draw_update():
            h = forward_without_stat_updates(self.block, predicted.detach())
            injected = self.injected(forward_without_stat_updates(self.predictor, h.detach(), context))
            if self.guard.synthetic_gradient(injected, self.name):
                self.optimizer.zero_grad(set_to_none=True)
                h.backward(injected)
                self.optimizer.step()
        return predicted

    def learn_input(self, predicted: Tensor, real_input: Tensor) -> None:
        """Regress `I_k` towards the block's real input."""
        loss = F.mse_loss(predicted, real_input.detach())
        self.stats["input_loss"] = loss.detach()
        if self.guard.finite("input-synthesizer loss", loss, self.name):
            self.input_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.input_optimizer.step()

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, p_update={self.p_update}, scale={self.scale}, "
            f"warmup_steps={self.warmup_steps}, regression_steps={self.regression_steps}, "
            f"target_lambda={self.target_lambda}, synthesizer_ema={self.synthesizer_ema}"
        )
