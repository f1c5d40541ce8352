"""DNI and cDNI: every decoupled block learns from a synthetic gradient as soon as it has run."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.fidelity import compare
from dni.functional import forward_without_stat_updates
from dni.guard import Guard
from dni.interface import DNI, OptimizerFactory
from dni.losses import one_hot
from dni.methods.base import Method
from dni.models import BlockNet
from dni.synthesizers import OracleSynthesizer, Synthesizer, SynthesizerFactory

if TYPE_CHECKING:
    from dni.distributed.stage import DNIStage


class DecoupledNeuralInterfaces(Method):
    """The update-decoupled step (docs/design.md) over a `BlockNet`.

    Interfaces sit after the blocks listed in `interfaces` (1-based; all hidden blocks by
    default); the blocks between two interfaces form one segment trained by backprop
    within itself, with its own optimiser. The blocks after the last interface (the head)
    learn from the true loss, whose gradient also trains the last synthesizer; each lower
    synthesizer is regressed towards what the segment above sends back from its own
    synthetic gradient (bootstrapping).

    Args:
        model: the network.
        optimizer: builds one optimiser per segment (and the head's).
        synthesizer: builds `M_k` from `shape` (the activation's) and `context_dim`.
        synthesizer_optimizer: builds the synthesizers' optimisers; defaults to `optimizer`.
        conditioned: cDNI: the synthesizers also see the one-hot label.
        interfaces: block indices (1..K-1) followed by an interface; None for all.
        top_interface: False leaves the last hidden block without an interface: it learns with
            the head from the true loss, so no label-free synthesizer sits directly below a
            linear classifier, where its best linear prediction is zero (the DNI study, H9).
        p_update: probability that a segment applies its update on a step (one value, or one
            per interface).
        sg_loss_weight, scale: see `DNI`.
        forward_unlock: give every interface but the first an input synthesizer, built by
            `input_synthesizer` from the network input's shape, so its segment trains on a
            predicted input before the blocks below have run ("complete unlock").
        loss: "cross_entropy" or "mse".
        guard: divergence checks shared by all interfaces.
        block_optimizer: builds the optimisers of the decoupled segments; defaults to
            `optimizer`, which the head always uses (the head learns from the true loss).
        block_lr_scale: the segments' learning rate as a fraction of their optimiser's, so
            blocks can move slower than the synthesizers that steer them and the head.
        warmup_steps, regression_steps: see `DNI`.
        true_targets: ablation (one process only): every synthesizer regresses towards the
            true `dL/dh_k` at its activation, through the blocks above at their current
            parameters, instead of the target bootstrapped from the synthesizer above.
        target_lambda: targets as lambda-returns (see `DNI`): 0 bootstraps from the synthesizer
            above (the paper), 1 gives the true gradient; between, the synthesizers' targets
            mix both, each hop further up weighted by another factor lambda.
        synthesizer_ema: every synthetic gradient from a Polyak average of its synthesizer
            (see `DNI`); 0 (the paper) predicts with the synthesizer itself.
        batched: take the batched step where it serves the settings (see `batched_step`),
            else the per-interface one; both give bit-identical losses and parameters.

    The batched step serves dni and cdni, `p_update < 1`, `warmup_steps`, several blocks per
    segment, `block_optimizer` / `block_lr_scale`, `regression_steps > 1`, `true_targets`,
    `scale`, `sg_loss_weight`, the oracle synthesizer and `forward_unlock` (each unlocked
    block's update from its predicted input is still its own backward and optimiser step,
    taken before its real pass; the input synthesizers' regressions join the synthesizers').
    Left to the per-interface step (`DNI.forward`, one interface after the other):
    `target_lambda > 0` (its targets leave from a hook once `delta` arrives),
    `synthesizer_ema > 0` and `guard.action="skip"` (skipping an update must read the check at
    once). The batched step reads nothing on the host: its guard checks are deferred, and a
    divergence is raised when `guard.check` reads them (the training loop does at every logging
    step and before every checkpoint; a loop of your own calls it as often as it likes), naming
    the block, the quantity and the step it went bad at.
    """

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        synthesizer: SynthesizerFactory,
        synthesizer_optimizer: OptimizerFactory | None = None,
        conditioned: bool = False,
        interfaces: Sequence[int] | None = None,
        top_interface: bool = True,
        p_update: float | Sequence[float] = 1.0,
        sg_loss_weight: float = 1.0,
        scale: float = 1.0,
        forward_unlock: bool = False,
        input_synthesizer: SynthesizerFactory | None = None,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
        block_optimizer: OptimizerFactory | None = None,
        block_lr_scale: float = 1.0,
        warmup_steps: int = 0,
        regression_steps: int = 1,
        true_targets: bool = False,
        target_lambda: float = 0.0,
        synthesizer_ema: float = 0.0,
        batched: bool = True,
    ):
        super().__init__(model, loss, guard)
        self.name = ("cdni" if conditioned else "dni") + ("_unlocked" if forward_unlock else "")
        self.conditioned, self.true_targets, self.target_lambda = conditioned, true_targets, target_lambda
        shapes = model.activation_shapes()
        self.num_classes = shapes[-1][0]
        cuts = _interface_positions(interfaces, len(model.blocks), top_interface)
        p_updates = _per_interface("p_update", p_update, len(cuts))
        if not block_lr_scale > 0:
            raise ConfigError(f"block_lr_scale={block_lr_scale!r} is not allowed; it must be > 0")
        if forward_unlock and input_synthesizer is None:
            raise ConfigError("forward_unlock=true needs an input_synthesizer")
        synthesizer_optimizer = synthesizer_optimizer or optimizer
        device = next(model.parameters()).device

        self.interfaces = nn.ModuleList()
        # The true `B * dL/dh_k` at each interface, for the true-target ablation (by interface name).
        self.oracles: dict[str, OracleSynthesizer] = {}
        starts = [0, *cuts]
        for i, (start, end) in enumerate(zip(starts[:-1], cuts)):
            segment = _segment(model.blocks[start:end])
            m_k = synthesizer(shape=shapes[end - 1], context_dim=self.num_classes if conditioned else 0)
            i_k = None
            if forward_unlock and i > 0:
                i_k = _input_synthesizer(input_synthesizer, model.input_shape, shapes[start - 1])
            interface = DNI(
                segment,
                m_k.to(device),
                _scaled(block_optimizer or optimizer, block_lr_scale),
                synthesizer_optimizer,
                p_update=p_updates[i],
                scale=scale,
                sg_loss_weight=sg_loss_weight,
                input_synthesizer=i_k.to(device) if i_k is not None else None,
                guard=self.guard,
                name=f"block{end}",
                warmup_steps=warmup_steps,
                regression_steps=regression_steps,
                target_lambda=target_lambda,
                synthesizer_ema=synthesizer_ema,
            )
            downstream = self._downstream(_segment(model.blocks[end:]))
            m_k.attach(downstream)
            # The true gradient at this interface, for the ablation and the measurements.
            oracle = m_k if m_k.needs_downstream else OracleSynthesizer(shapes[end - 1])
            oracle.attach(downstream)
            self.interfaces.append(interface)
            self.oracles[interface.name] = oracle
        self.cuts = cuts  # the block (1-based) after which each interface sits
        self.head = _segment(model.blocks[cuts[-1] :])
        self.head_optimizer = optimizer(self.head.parameters())
        # Blocks share their modules with `model`, so only the synthesizers are saved apart.
        self.parts["synthesizers"] = nn.ModuleList(
            nn.ModuleList([i.synthesizer, *(m for m in (i.input_synthesizer, i.average) if m is not None)])
            for i in self.interfaces
        )
        # The per-interface step uses one optimiser per segment and synthesizer (`parts`); the
        # batched one steps them as one optimiser per class, their param groups (the same dicts)
        # concatenated (`merged`): the same update for every parameter, one `step` per class.
        self.part_optimizers = [self.head_optimizer]
        for i in self.interfaces:
            self.part_optimizers += [
                o for o in (i.optimizer, i.synthesizer_optimizer, i.input_optimizer) if o
            ]
        serves = target_lambda == 0 and synthesizer_ema == 0 and self.guard.action == "stop"
        self.batched = bool(batched) and serves
        self.merged_optimizers = _merge(self.part_optimizers)
        # The batched step's gradient inputs, listed once (a module's parameters() walks it).
        self._block_params = [list(i.block.parameters()) for i in self.interfaces]
        self._head_params = list(self.head.parameters())
        self.optimizers = self.merged_optimizers if self.batched else self.part_optimizers

    def _downstream(self, rest: nn.Module) -> Callable[[Tensor, Tensor | None], Tensor]:
        def loss(h: Tensor, labels: Tensor | None) -> Tensor:
            if labels is None:
                raise RuntimeError("the loss of the blocks above needs the labels as context")
            return self.loss(forward_without_stat_updates(rest, h), labels)

        return loss

    def compiled_modules(self) -> list[nn.Module]:
        """The blocks (see `Method`), every synthesizer and every input synthesizer; not the
        oracle, whose forward is a backward pass through the blocks above."""
        synthesizers = [
            m for i in self.interfaces for m in (i.synthesizer, i.input_synthesizer) if m is not None
        ]
        return [*super().compiled_modules(), *(m for m in synthesizers if m.compilable)]

    def context(self, interface: DNI, labels: Tensor) -> Tensor | None:
        """What `interface`'s synthesizer is conditioned on: the one-hot labels, or None."""
        return labels if self.conditioned or interface.synthesizer.needs_labels else None

    # The step in three parts, so that a pipeline stage (`dni.distributed`) can run a slice of it.
    def unlock(self, interface: DNI, x: Tensor, labels: Tensor) -> Tensor | None:
        """Forward unlocking: update `interface`'s block from a predicted input, before the blocks
        below have run; return the prediction (None for an interface without input synthesizer)."""
        if interface.input_synthesizer is None:
            return None
        return interface.unlocked_update(x, self.context(interface, labels))

    def advance(self, interface: DNI, h: Tensor, labels: Tensor, predicted: Tensor | None = None) -> Tensor:
        """Pass the real input `h` through `interface` (its block updates at once) and return its
        output; `predicted` is what `unlock` returned, if the block already trained on it."""
        context = self.context(interface, labels)
        if predicted is None:
            return interface(h, context, truth=self._truth(interface, labels))
        interface.learn_input(predicted, h)
        return interface(h, context, update=False)  # the real pass only delivers targets

    def _truth(self, interface: DNI, labels: Tensor) -> Callable[[Tensor], Tensor] | None:
        """For the true-target ablation: the map from `interface`'s activation to the true
        `dL/dh` (batch-mean scale), through the blocks above at their current parameters."""
        if not self.true_targets:
            return None
        oracle = self.oracles[interface.name]
        return lambda h: oracle(h, labels) / h.shape[0]  # the oracle predicts B * dL/dh

    def learn_head(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Train the head on the true loss; its gradient at `h` is the last interface's target."""
        logits = self.head(h)
        loss = self.loss(logits, y)
        if self.guard.finite("loss", loss):
            self.head_optimizer.zero_grad(set_to_none=True)
            loss.backward()  # trains the last synthesizer, through the hook on h
            self.head_optimizer.step()
        return logits, loss

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.batched:
            return self.batched_step(x, y)
        labels = one_hot(y, self.num_classes, like=x)
        h = x
        for interface in self.interfaces:
            h = self.advance(interface, h, labels, self.unlock(interface, x, labels))
        logits, loss = self.learn_head(h, y)
        out = self._outputs(logits, y, loss)
        for interface in self.interfaces:
            out.update({f"sg/{key}/{interface.name}": v for key, v in interface.stats.items()})
        return out

    def batched_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The per-interface step's updates, computed in a few calls: forward every segment and
        synthesizer; one backward from all roots (each activation with its injected gradient,
        and the loss) that fills every parameter gradient and delivers every target; one
        backward from all synthesizers' regression losses; one optimiser step per class. No
        parameter is used again in a step after its update, so this is the same arithmetic in
        another order, and the guard's checks are deferred (`Guard.defer`): nothing is read on
        the host. Random draws (`p_update`) happen in the per-interface step's order."""
        labels = one_hot(y, self.num_classes, like=x)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        roots, injections, inputs, cuts, pending = [], [], [], [], []
        input_losses = []
        h = x
        for interface, params in zip(self.interfaces, self._block_params):
            context = self.context(interface, labels)
            checks: list[tuple[str, Tensor, str]] = []
            pending.append(checks)
            update = interface.input_synthesizer is None and interface.draw_update()
            if interface.input_synthesizer is not None:
                # The block learns here (if drawn to); its real pass below delivers targets only.
                predicted = self._unlocked_update(interface, params, x, context, checks)
                error = F.mse_loss(predicted, h.detach())  # `DNI.learn_input`, stepped at the end
                interface.stats["input_loss"] = error.detach()
                checks.append(("input-synthesizer loss", error.detach(), interface.name))
                input_losses.append(error)
            interface.steps_seen += 1
            a = interface.block(h)
            g = interface.synthesizer(a.detach(), context)
            truth = self._truth(interface, labels)
            true_target = truth(a.detach()) if truth is not None else None
            injected = interface.injected(g)
            norm = injected.norm().detach()
            interface.stats["norm"] = norm
            checks.append(("synthetic gradient", norm, interface.name))
            wants = list(params) if update else []
            if h.requires_grad:
                wants.append(h)
            if wants:
                roots.append(a)
                injections.append(injected)
                inputs += wants
            h = a.detach().requires_grad_()  # the cut; its gradient is this interface's target
            cuts.append((interface, g, h, a.detach(), context, true_target))
        logits = self.head(h)
        loss = self.loss(logits, y)
        roots.append(loss)
        injections.append(None)
        inputs += [*self._head_params, h]
        torch.autograd.backward(roots, injections, inputs=inputs)

        # The synthesizers' regressions, each on its target (the per-interface `DNI._regress`).
        # A lower synthesizer's checks come after the synthetic gradient of the segment above,
        # the last after the loss, as the per-interface step makes them.
        pending.append([("loss", loss.detach(), "")])
        regressions, losses = [], []
        for k, (interface, g, cut, activation, context, true_target) in enumerate(cuts):
            delta = cut.grad if true_target is None else true_target
            target = delta.detach() * delta.shape[0]
            interface.last_target = target
            error = F.mse_loss(g, target)
            interface.stats["loss"] = error.detach()
            if interface.synthesizer_optimizer is not None:
                pending[k + 1].append(("synthesizer loss", error.detach(), interface.name))
                losses.append(interface.sg_loss_weight * error)
                regressions.append((interface, activation, context, target, pending[k + 1]))
        losses += input_losses
        if losses:
            torch.autograd.backward(losses)
        for optimizer in self.optimizers:
            optimizer.step()
        for _ in range(1, self.interfaces[0].regression_steps if regressions else 1):
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            losses = []
            for interface, activation, context, target, checks in regressions:
                prediction = forward_without_stat_updates(interface.synthesizer, activation, context)
                error = F.mse_loss(prediction, target)
                checks.append(("synthesizer loss", error.detach(), interface.name))
                losses.append(interface.sg_loss_weight * error)
            torch.autograd.backward(losses)
            for optimizer in self.optimizers:
                optimizer.step()
        for checks in pending:
            for quantity, value, where in checks:
                self.guard.defer(quantity, value, where)
        self.guard.end_checks()
        out = self._outputs(logits, y, loss)
        for interface in self.interfaces:
            out.update({f"sg/{key}/{interface.name}": v for key, v in interface.stats.items()})
        return out

    def _unlocked_update(
        self,
        interface: DNI,
        params: list[nn.Parameter],
        x: Tensor,
        context: Tensor | None,
        checks: list,
    ) -> Tensor:
        """`DNI.unlocked_update` in the batched step: the block learns from its synthetic gradient
        at a predicted input before its real pass, stepped now (only its parameters have
        gradients yet, so the optimisers step them alone), with the check deferred. Returns
        the prediction of the block's input."""
        predicted = interface.input_synthesizer(x)
        if interface.draw_update():  # after the prediction, as `DNI.unlocked_update` draws
            h = forward_without_stat_updates(interface.block, predicted.detach())
            synthetic = forward_without_stat_updates(interface.synthesizer, h.detach(), context)
            injected = interface.injected(synthetic)
            checks.append(("synthetic gradient", injected.norm().detach(), interface.name))
            torch.autograd.backward(h, injected, inputs=params)
            for optimizer in self.optimizers:
                optimizer.step()
            for p in params:
                p.grad = None
        return predicted

    def state_dict(self) -> dict:
        return {**super().state_dict(), "interface_steps": [i.steps_seen for i in self.interfaces]}

    def load_optimizers(self, saved: list[dict]) -> None:
        """Load optimiser states saved by either step: one per segment and synthesizer (the
        per-interface step, and every run saved before the batched step existed) or one per
        optimiser class (the batched step); the other layout takes over the same state."""
        layouts = (self.optimizers, self.part_optimizers, self.merged_optimizers)
        layout = next((o for o in layouts if len(o) == len(saved)), None)
        if layout is None:
            raise ValueError(
                f"{len(saved)} optimisers saved, {len(self.optimizers)} here (or {len(self.part_optimizers)} "
                "one per segment and synthesizer)"
            )
        for optimizer, state in zip(layout, saved):
            optimizer.load_state_dict(state)
        other = self.part_optimizers if layout is self.merged_optimizers else self.merged_optimizers
        _share(layout, other)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for interface, seen in zip(self.interfaces, state.get("interface_steps", [])):
            interface.steps_seen = seen

    def pipeline_stage(self, index: int, boundaries: Sequence[int]) -> DNIStage:
        """A stage of blocks with their interfaces (`dni.distributed.stage.DNIStage`), which sends
        the gradient at its input back as the target of the stage below."""
        from dni.distributed.stage import DNIStage  # the pipeline builds on the methods, not the reverse

        if any(i.synthesizer.needs_downstream for i in self.interfaces):
            raise ConfigError(
                "the oracle synthesizer needs the whole network in one process; use synthesizer=linear "
                "(or mlp, conv) with parallel=pipeline"
            )
        if self.true_targets:
            raise ConfigError(
                "true_targets=true needs the whole network in one process; set it to false with "
                "parallel=pipeline"
            )
        if self.target_lambda > 0:
            raise ConfigError(
                f"target_lambda={self.target_lambda} sends targets down through every stage in "
                "one backward pass, which a pipeline does not do; set it to 0 with parallel=pipeline"
            )
        return DNIStage(self, index, boundaries)

    # -- measurements -------------------------------------------------------------------
    def _synthetic(self, interface: DNI, h: Tensor, labels: Tensor) -> Tensor:
        """The gradient the interface would inject at activation `h` (batch-mean scale)."""
        context = self.context(interface, labels)
        return interface.injected(forward_without_stat_updates(interface.predictor, h.detach(), context))

    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        labels = one_hot(y, self.num_classes, like=x)
        names = {p: n for n, p in self.model.named_parameters()}
        grads: dict[str, Tensor] = {}
        h = x
        for interface in self.interfaces:
            h = forward_without_stat_updates(interface.block, h.detach())
            params = list(interface.block.parameters())
            found = torch.autograd.grad(h, params, self._synthetic(interface, h, labels))
            grads.update({names[p]: g for p, g in zip(params, found)})
        params = list(self.head.parameters())
        loss = self.loss(forward_without_stat_updates(self.head, h.detach()), y)
        grads.update({names[p]: g for p, g in zip(params, torch.autograd.grad(loss, params))})
        return grads

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Weight alignment (see `Method`) and, per interface, the synthetic gradient against
        the true `dL/dh_k` at the same parameters and batch: `sg/cosine/block2`, ..."""
        out = super().diagnostics(x, y)
        labels = one_hot(y, self.num_classes, like=x)
        activations, h = [], x
        for interface in self.interfaces:
            h = forward_without_stat_updates(interface.block, h)
            activations.append(h)
        loss = self.loss(forward_without_stat_updates(self.head, h), y)
        truths = torch.autograd.grad(loss, activations)
        for interface, h, truth in zip(self.interfaces, activations, truths):
            for stat, value in compare(self._synthetic(interface, h, labels), truth).items():
                out[f"sg/{stat}/{interface.name}"] = value
        return out


def _merge(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """One optimiser per class over the param groups of `optimizers` (the same group dicts, so
    a scheduler or a learning-rate change acts on both), in order of first appearance. Only
    torch's own optimisers are merged, whose update of a parameter depends on its group alone;
    any other stays as it is (and is still stepped once per step)."""
    classes: dict[type, list[torch.optim.Optimizer]] = {}
    for optimizer in optimizers:
        mergeable = type(optimizer).__module__.startswith("torch.optim.")
        classes.setdefault(type(optimizer) if mergeable else optimizer, []).append(optimizer)
    merged = []
    for cls, group in classes.items():
        if len(group) == 1:
            merged += group
            continue
        try:
            merged.append(cls([g for o in group for g in o.param_groups], **group[0].defaults))
        except (TypeError, ValueError):  # one group or none (LBFGS), or other arguments: as they are
            merged += group
    return merged


def _share(source: list[torch.optim.Optimizer], target: list[torch.optim.Optimizer]) -> None:
    """Give `target`'s optimisers the param groups and state of `source`'s, which hold the same
    parameters in the same groups, grouped into other optimisers."""
    group_of = {id(p): g for o in source for g in o.param_groups for p in g["params"]}
    state = {p: s for o in source for p, s in o.state.items()}
    for optimizer in target:
        if optimizer in source:
            continue
        optimizer.param_groups = [group_of[id(g["params"][0])] for g in optimizer.param_groups]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        optimizer.state = defaultdict(dict, {p: state[p] for p in params if p in state})


def _input_synthesizer(factory: SynthesizerFactory, shape: tuple, out_shape: tuple) -> Synthesizer:
    try:
        return factory(shape=shape, out_shape=out_shape)
    except ConfigError:
        raise ConfigError(
            f"forward unlocking needs an input synthesizer from {shape} to {out_shape}, which this "
            "one cannot give; for a convolutional model make method.input_synthesizer a "
            "dni.synthesizers.ConvSynthesizer"
        ) from None


def _scaled(factory: OptimizerFactory, scale: float) -> OptimizerFactory:
    """`factory` with every parameter group's learning rate multiplied by `scale`."""
    if scale == 1.0:
        return factory

    def build(params):
        optimizer = factory(params)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        return optimizer

    return build


def _segment(blocks: Sequence[nn.Module]) -> nn.Module:
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


def _interface_positions(interfaces: Sequence[int] | None, num_blocks: int, top: bool = True) -> list[int]:
    allowed = list(range(1, num_blocks))
    if not allowed:
        raise ConfigError("DNI needs at least one hidden block; set model.depth >= 1")
    if not top:
        if len(allowed) < 2:
            raise ConfigError(
                "top_interface=false leaves no interface with one hidden block; set model.depth >= 2 "
                "or top_interface=true"
            )
        if interfaces is not None and allowed[-1] in {int(k) for k in interfaces}:
            raise ConfigError(
                f"interfaces={list(interfaces)} puts one after block {allowed[-1]}, directly below the "
                f"head, but top_interface=false; drop {allowed[-1]} or set top_interface=true"
            )
        allowed = allowed[:-1]
    if interfaces is None:
        return allowed
    cuts = sorted({int(k) for k in interfaces})
    if not cuts or any(k not in allowed for k in cuts):
        raise ConfigError(
            f"interfaces={list(interfaces)} is not allowed; with {num_blocks} blocks choose "
            f"from {allowed} (an interface follows a hidden block), or null for all"
        )
    return cuts


def _per_interface(key: str, value: float | Sequence[float], count: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ConfigError(f"{key} has {len(values)} values but there are {count} interfaces")
    return values
