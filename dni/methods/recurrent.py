"""Recurrent DNI: truncated BPTT whose truncations hear from the future through a synthesizer.

A batch is a sequence (B, L, ...) that the core reads in truncations of `truncation` (T)
steps. The objective of a sequence is `J = sum_t loss_t / T` (`loss_t` the batch-mean loss
at step t), so that `J` is the sum of the truncations' own losses and the gradient a
truncation passes back is in the same units wherever it is cut.

For each truncation, from start state `s_a` (detached: no graph crosses a boundary) to
end state `s_b`:

```
logits, s_b = core(x[a:b], s_a)                 # graph over this truncation only
g_b = M(s_b.detach())                           # predicts B * dJ_future/ds_b
backward(loss_ab + <s_b, scale * g_b / B>)      # one pass: the future's error enters at s_b
step the core's optimiser
delta_a = B * (gradient that arrived at s_a)    # own error + the bootstrapped g_b
regress M(s_a) towards delta_a; step M's optimiser
```

At the end of a sequence whose future does not exist (an episode of the copy tasks) no
synthetic gradient is injected: the true future gradient there is zero. With
`carry_state` (a text stream cut into windows) the state is carried, detached, into the
next batch, and the window's end is a boundary like any other.

Without a synthesizer this is plain truncated BPTT, the baseline. The synthetic gradient
is predicted in per-example units (B times the gradient; see `dni.interface`).

`aux` (DNI + Aux, the paper's auxiliary task): the synthesizer has a second output, the
synthetic gradient that will be produced one truncation further ahead. It is read at
each boundary state *with* the core's graph, so its regression loss also trains the core
to carry information about its own future gradients: at the start of a truncation the
core's last step of the previous truncation is recomputed (at the current parameters)
to give `s_a` a graph of one step, and `a(s_a)` is regressed towards this truncation's
`g_b` inside the same backward pass. The auxiliary prediction is never injected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.fidelity import compare
from dni.functional import forward_without_stat_updates
from dni.guard import Guard
from dni.interface import OptimizerFactory
from dni.lstm import LN2, LSTMNet, State, flat, loss_steps, split, step_losses
from dni.methods.base import Method
from dni.synthesizers import Synthesizer, SynthesizerFactory

log = logging.getLogger(__name__)


class RecurrentDNI(Method):
    """Truncated BPTT over an `LSTMNet`, with synthetic gradients at the truncation boundaries.

    Args:
        model: the recurrent network.
        optimizer: builds the core's (and readout's) optimiser.
        truncation: T, the number of time steps backpropagated through per update.
        synthesizer: builds `M` from `shape=(2H,)` (the flat state `[h, c]`); None gives
            plain truncated BPTT.
        synthesizer_optimizer: builds the synthesizer's optimiser; defaults to `optimizer`.
        scale: factor on the injected synthetic gradient (the paper uses 0.1).
        sg_loss_weight: factor on the synthesizer's regression loss.
        aux: DNI + Aux: also predict the synthetic gradient one truncation ahead.
        aux_weight: factor on the auxiliary loss.
        carry_state: batches continue each other (a text stream): carry the final state
            into the next batch and inject a synthetic gradient at the window's end.
        clip_norm: clip the norm of the core's gradient per update (None: no clipping).
        guard: divergence checks.
    """

    recurrent = True

    def __init__(
        self,
        model: LSTMNet,
        optimizer: OptimizerFactory,
        truncation: int = 5,
        synthesizer: SynthesizerFactory | None = None,
        synthesizer_optimizer: OptimizerFactory | None = None,
        scale: float = 1.0,
        sg_loss_weight: float = 1.0,
        aux: bool = False,
        aux_weight: float = 1.0,
        carry_state: bool = False,
        clip_norm: float | None = None,
        guard: Guard | None = None,
    ):
        if not getattr(model, "recurrent", False):
            raise ConfigError(
                f"recurrent DNI and truncated BPTT need a recurrent model, but got model "
                f"{getattr(model, 'name', type(model).__name__)!r}; use model=lstm with dataset=copy, "
                "repeat_copy or text"
            )
        if not isinstance(truncation, int) or truncation < 1:
            raise ConfigError(f"truncation={truncation!r} is not allowed; it must be an integer >= 1")
        if aux and synthesizer is None:
            raise ConfigError("aux=true needs a synthesizer; use method=dni_aux, not method=bptt")
        if clip_norm is not None and not clip_norm > 0:
            raise ConfigError(f"clip_norm={clip_norm!r} is not allowed; give a value > 0 or null")
        super().__init__(model, "cross_entropy", guard)  # the loss follows the targets: see dni.lstm
        self.truncation, self.scale, self.sg_loss_weight = truncation, float(scale), float(sg_loss_weight)
        self.aux, self.aux_weight, self.carry_state = bool(aux), float(aux_weight), bool(carry_state)
        self.clip_norm = clip_norm
        self.name = "bptt" if synthesizer is None else ("dni_aux" if aux else "rnn_dni")
        self.optimizers = [optimizer(model.parameters())]
        self.synthesizer: Synthesizer | None = None
        self.synthesizer_optimizer = None
        self.state_size = model.state_size
        if synthesizer is not None:
            size = self.state_size
            m = synthesizer(shape=(size,), context_dim=0, out_shape=(2 * size,) if aux else None)
            if aux and m.needs_downstream:
                raise ConfigError(
                    "aux=true cannot use the oracle synthesizer; use method/synthesizer=linear or mlp"
                )
            self.synthesizer = m.to(next(model.parameters()))  # its device and dtype
            self.parts["synthesizer"] = self.synthesizer
            learned = list(self.synthesizer.parameters())
            if learned:
                self.synthesizer_optimizer = (synthesizer_optimizer or optimizer)(learned)
                self.optimizers.append(self.synthesizer_optimizer)
        self.carried: State | None = None  # the state handed to the next batch (carry_state)

    # -- the step --------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        state = self._start_state(x)
        totals: dict[str, list[Tensor]] = {}
        loss_sum = torch.zeros((), device=x.device)
        for stats, end in self._sequence(x, y, state, learn=True):
            loss_sum = loss_sum + stats.pop("loss_sum")
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
            state = end
        if self.carry_state:
            self.carried = (state[0].detach(), state[1].detach())
        steps = loss_steps(y).sum().clamp(min=1)
        loss = loss_sum / steps
        out = {"loss": loss, "bits": loss / LN2}
        names = {"sg_loss": "sg/loss/core", "sg_norm": "sg/norm/core", "aux_loss": "sg/aux_loss/core"}
        for key, values in totals.items():
            out[names[key]] = torch.stack(values).mean()
        return out

    def _start_state(self, x: Tensor) -> State:
        model: LSTMNet = self.model
        if self.carry_state and self.carried is not None and self.carried[0].shape[0] == x.shape[0]:
            return self.carried
        return model.initial_state(x.shape[0], x)

    def _bounds(self, length: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.truncation, length)) for a in range(0, length, self.truncation)]

    def _sequence(
        self, x: Tensor, y: Tensor, state: State, *, learn: bool
    ) -> Iterator[tuple[dict[str, Tensor], State]]:
        """Run the truncations of one sequence in order; yield each one's stats and end state.
        `learn=False` measures: it accumulates gradients in `.grad` and changes nothing else."""
        length = x.shape[1]
        previous = None  # (input, state) of the step that produced the next start state
        for a, b in self._bounds(length):
            inject = self.synthesizer is not None and (b < length or self.carry_state)
            stats, end, previous = self._truncation(x, y, a, b, state, previous, inject=inject, learn=learn)
            state = end
            yield stats, end

    def _truncation(
        self,
        x: Tensor,
        y: Tensor,
        a: int,
        b: int,
        start: State,
        previous: tuple[Tensor, State] | None,
        *,
        inject: bool,
        learn: bool,
    ) -> tuple[dict[str, Tensor], State, tuple[Tensor, State]]:
        model: LSTMNet = self.model
        batch = x.shape[0]
        wants_target = learn and self.synthesizer_optimizer is not None
        h0, c0 = (s.detach().requires_grad_(wants_target) for s in start)  # the cut
        xs, ys = x[:, a:b], y[:, a:b]
        if self.aux and b - a > 1:  # keep the state before the last step, for the next recompute
            logits_head, middle = model(xs[:, :-1], (h0, c0))
            logits_tail, end = model(xs[:, -1:], middle)
            logits = torch.cat([logits_head, logits_tail], dim=1)
        else:
            middle = (h0, c0)
            logits, end = model(xs, (h0, c0))
        per_step = step_losses(logits, ys)
        loss = per_step.sum() / self.truncation
        stats: dict[str, Tensor] = {"loss_sum": per_step.detach().sum()}
        objective, roots, grads = loss, [], []
        update = self.guard.finite("loss", loss)

        if inject:
            s_b = flat(end)
            g = self._predict(s_b, x, y, b, learn)
            injected = self.scale * g / batch
            stats["sg_norm"] = injected.norm()
            update = update and self.guard.synthetic_gradient(injected, "core")
            roots.append(s_b)
            grads.append(injected)
            if self.aux and previous is not None:
                # Recompute the step that produced s_a, so the auxiliary loss reaches the core.
                _, s_a = model(*previous)
                predicted_ahead = self.synthesizer(flat(s_a))[:, self.state_size :]
                # Per-example squared error summed over the state, batch mean: the task loss's units.
                aux_loss = (predicted_ahead - g).pow(2).sum(dim=1).mean()
                stats["aux_loss"] = aux_loss.detach()
                objective = objective + self.aux_weight * aux_loss

        if learn:
            self.optimizers[0].zero_grad(set_to_none=True)
            if self.synthesizer_optimizer is not None:
                self.synthesizer_optimizer.zero_grad(set_to_none=True)
        if update:
            torch.autograd.backward([objective, *roots], [None, *grads])
            if learn:
                if self.clip_norm is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
                self.optimizers[0].step()
            if wants_target:
                stats["sg_loss"] = self._regress(h0, c0, batch)
        end = (end[0].detach(), end[1].detach())
        if self.aux:
            previous = (xs[:, -1:], (middle[0].detach(), middle[1].detach()))
        return stats, end, previous

    def _predict(self, s: Tensor, x: Tensor, y: Tensor, position: int, learn: bool) -> Tensor:
        """The synthesizer's B * dJ/ds at boundary state `s`, detached. Measurements leave
        BatchNorm statistics (of an MLP synthesizer) alone."""
        rest_x, rest_y = x[:, position:], y[:, position:]
        # What follows this boundary: used by a synthesizer that predicts from it (the oracle).
        self.synthesizer.attach(lambda state, _: self._future_loss(state, rest_x, rest_y))
        if learn:
            g = self.synthesizer(s.detach())
        else:
            g = forward_without_stat_updates(self.synthesizer, s.detach())
        return g[:, : self.state_size].detach()

    def _future_loss(self, s: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """J of the rest of the sequence from state `s`, by full BPTT (for the oracle)."""
        if x.shape[1] == 0:
            return (s * 0).sum()
        logits, _ = self.model(x, split(s))
        return step_losses(logits, y).sum() / self.truncation

    def _regress(self, h0: Tensor, c0: Tensor, batch: int) -> Tensor:
        """Regress M(s_a) towards the gradient that arrived at the start state (times B)."""
        delta = torch.cat([h0.grad, c0.grad], dim=1) * batch
        prediction = self.synthesizer(torch.cat([h0, c0], dim=1).detach())[:, : self.state_size]
        loss = F.mse_loss(prediction, delta)
        if self.guard.finite("synthesizer loss", loss, "core"):
            (self.sg_loss_weight * loss).backward()  # adds to the auxiliary loss's gradient, if any
            self.synthesizer_optimizer.step()
        return loss.detach()

    # -- measurements -----------------------------------------------------------------------
    def true_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Full BPTT's gradient of J over the whole sequence (from the step's start state)."""
        params = dict(self.model.named_parameters())
        logits, _ = self.model(x, self._start_state(x))
        objective = step_losses(logits, y).sum() / self.truncation
        return dict(zip(params, torch.autograd.grad(objective, list(params.values()))))

    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The gradient this rule sends to the parameters over one sequence, summed over its
        truncations, at fixed parameters (no update, the synthesizer untouched)."""
        params = dict(self.model.named_parameters())
        saved = {n: p.grad for n, p in params.items()}
        for p in params.values():
            p.grad = None
        synthesizer_grads = [p.grad for p in self.synthesizer.parameters()] if self.synthesizer else []
        for _ in self._sequence(x, y, self._start_state(x), learn=False):
            pass
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        for n, p in params.items():
            p.grad = saved[n]
        if self.synthesizer is not None:  # the auxiliary loss reached the synthesizer: put it back
            for p, g in zip(self.synthesizer.parameters(), synthesizer_grads):
                p.grad = g
        return grads

    def boundary_gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """At every boundary inside the sequence: the injected synthetic gradient and full
        BPTT's true `dJ/ds` at the same state (both at batch-mean scale), stacked."""
        length, batch = x.shape[1], x.shape[0]
        state, states, positions = self._start_state(x), [], []
        objective = torch.zeros((), device=x.device)
        for a, b in self._bounds(length):
            logits, state = self.model(x[:, a:b], state)
            objective = objective + step_losses(logits, y[:, a:b]).sum() / self.truncation
            if b < length:
                s = flat(state)
                states.append(s)
                positions.append(b)
                state = split(s)  # the rest of the sequence depends on s, so dJ/ds is the full one
        if not states:
            return x.new_zeros(0), x.new_zeros(0)
        truths = torch.autograd.grad(objective, states)
        predicted = [
            self.scale * self._predict(s, x, y, b, learn=False) / batch for s, b in zip(states, positions)
        ]
        return torch.stack(predicted), torch.stack(truths)

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """`align/{stat}/core`: this rule's gradient for the whole network over one sequence
        against full BPTT's; with a synthesizer, `sg/{stat}/boundary`: the injected synthetic
        gradient against the true full-BPTT gradient at the same boundary states."""
        mine, truth = self.parameter_gradients(x, y), self.true_gradients(x, y)
        names = list(truth)
        out = {
            f"align/{k}/core": v
            for k, v in compare(
                torch.cat([mine[n].flatten() for n in names]), torch.cat([truth[n].flatten() for n in names])
            ).items()
        }
        if self.synthesizer is not None:
            predicted, true = self.boundary_gradients(x, y)
            if predicted.numel():
                out.update({f"sg/{k}/boundary": v for k, v in compare(predicted, true).items()})
        return out

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["carried"] = [s.cpu() for s in self.carried] if self.carried is not None else None
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        carried = state.get("carried")
        device = next(self.model.parameters()).device
        self.carried = tuple(s.to(device) for s in carried) if carried is not None else None
