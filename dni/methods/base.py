"""What every learning rule offers the training loop, so the loop never asks which rule it runs."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.fidelity import compare
from dni.functional import forward_without_stat_updates
from dni.guard import Guard
from dni.losses import get_loss
from dni.models import BlockNet

if TYPE_CHECKING:
    from dni.distributed.stage import Stage


class Method:
    """A learning rule: one `step(x, y)` that trains `model` on a batch.

    Subclasses set `name`, build their optimisers into `self.optimizers`, put any module
    of their own (synthesizers, feedback weights) in `self.parts`, and implement `step`.
    `parameter_gradients` is the update direction the rule would take at the current
    parameters; the default is autograd's, which is right for backprop. `recurrent` says
    whether the rule trains a recurrent core (`dni.lstm`) or a feed-forward `BlockNet`.
    """

    name = "method"
    recurrent = False

    def __init__(self, model: BlockNet, loss: str = "cross_entropy", guard: Guard | None = None):
        if getattr(model, "recurrent", False) and not self.recurrent:
            raise ConfigError(
                f"this method trains feed-forward networks (model=fcn or cnn), but model={model.name} is "
                "a recurrent core; use method=bptt, rnn_dni or dni_aux with it"
            )
        if not self.recurrent and not isinstance(model, BlockNet):
            raise ConfigError(
                f"{type(self).__name__} trains a BlockNet, not a {type(model).__name__}; wrap your model "
                "with dni.BlockNet.from_sequential(model, input_shape) for an nn.Sequential, or "
                "dni.split(model, at=[...], input_shape=...) to cut any module at named submodules"
            )
        self.model = model
        self.loss = get_loss(loss)
        self.guard = guard or Guard()
        self.parts = nn.ModuleDict({"model": model})
        self.optimizers: list[torch.optim.Optimizer] = []
        # The weights the run started from, so diagnostics can say how far each block moved.
        self.initial_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}

    # -- training -----------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Train on one batch; return detached scalar tensors ("loss", "accuracy", ...)."""
        raise NotImplementedError

    def train(self) -> None:
        self.parts.train()

    def eval_models(self) -> dict[str, nn.Module]:
        """Models the loop evaluates on the test split, by log prefix."""
        return {"test": self.model}

    # -- compilation --------------------------------------------------------------------
    def compiled_modules(self) -> list[nn.Module]:
        """The modules `compile` compiles: every block of the model, the unit all feed-forward
        rules share (so compiled comparisons stay fair), plus what a rule adds of its own
        (synthesizers, auxiliary heads). A rule's step and optimiser stay eager."""
        if self.recurrent:
            raise ConfigError(
                f"compile=true compiles the blocks of feed-forward networks; method={self.name} "
                "trains a recurrent core, so set compile=false"
            )
        return list(self.model.blocks)

    def compile(self) -> None:
        """`torch.compile` every module of `compiled_modules` in place: parameters, buffers and
        state dicts stay as they are (checkpoints need no change), and the first calls of each
        module in training and in eval mode take the compilation. Results agree with eager
        ones to float tolerance, not bit for bit (the compiler fuses and reorders arithmetic)."""
        modules = self.compiled_modules()
        device = next(self.model.parameters()).device
        if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise ConfigError(
                "compile=true needs a C++ compiler (g++) on this machine, which torch.compile "
                "builds its CPU kernels with; install one or set compile=false"
            )
        if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
            # Measured with torch 2.14: the kernels inductor then writes do not build (at::vec).
            raise ConfigError(
                "compile=true cannot build CPU kernels while ATen runs without vector instructions "
                "(ATEN_CPU_CAPABILITY=default); unset that variable or set compile=false"
            )
        # Modules compiled in place share one code object in torch's cache, whose entries (one
        # per module kind, shape, train or eval mode, grad mode) count against a single limit;
        # past it torch would run the rest eagerly.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 8 * len(modules))
        for module in modules:
            module.compile()

    # -- pipelines ----------------------------------------------------------------------
    def pipeline_stage(self, index: int, boundaries: Sequence[int]) -> Stage:
        """Stage `index` of this rule split into pipeline stages after the blocks `boundaries`
        (`dni.distributed`): what one process trains, and whether anything travels back to the
        stage below. A rule whose blocks need each other's backward pass cannot be split and
        says so here, before a pipeline starts."""
        raise ConfigError(
            f"parallel=pipeline splits a decoupled method over processes, not {self.name!r}; "
            "set method=dni, cdni or dgl, and control=false"
        )

    # -- measurements -------------------------------------------------------------------
    def true_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Backprop's gradient of the loss for every parameter, at the current parameters and
        batch; changes neither the parameters, their `.grad` nor BatchNorm statistics."""
        params = dict(self.model.named_parameters())
        loss = self.loss(forward_without_stat_updates(self.model, x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        return dict(zip(params, grads))

    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The gradient this rule would apply to every parameter at the current parameters."""
        return self.true_gradients(x, y)

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Alignment of the rule's weight gradients with backprop's, per block (cosine,
        Pearson correlation, relative error, sign agreement), at the same parameters and batch;
        and `drift/blockK`, how far each block's weights moved from where the run started."""
        out = weight_alignment(self.model, self.parameter_gradients(x, y), self.true_gradients(x, y), "align")
        return {**out, **self.drift()}

    @torch.no_grad()
    def drift(self) -> dict[str, float]:
        """`drift/blockK`: `|W - W_0| / |W_0|` for each block's weights (`W_0` at the start)."""
        params = dict(self.model.named_parameters())
        return {
            f"drift/{block}": (
                (params[n] - self.initial_weights[n]).norm() / self.initial_weights[n].norm()
            ).item()
            for n, block in block_of(self.model).items()
            if n in self.initial_weights
        }

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "parts": self.parts.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "guard": self.guard.state_dict(),
            "initial_weights": self.initial_weights,
        }

    def load_state_dict(self, state: dict) -> None:
        self.parts.load_state_dict(state["parts"])
        self.load_optimizers(state["optimizers"])
        self.guard.load_state_dict(state["guard"])
        self.initial_weights = state.get("initial_weights", self.initial_weights)

    def load_optimizers(self, saved: list[dict]) -> None:
        """Load the optimisers' states, in the order of `self.optimizers`."""
        if len(saved) != len(self.optimizers):
            raise ValueError(f"{len(saved)} optimisers saved, {len(self.optimizers)} here")
        for optimizer, state in zip(self.optimizers, saved):
            optimizer.load_state_dict(state)

    def _outputs(self, logits: Tensor, y: Tensor, loss: Tensor) -> dict[str, Tensor]:
        return {"loss": loss.detach(), "accuracy": (logits.argmax(1) == y).float().mean()}


def block_of(model: BlockNet) -> dict[str, str]:
    """Name of the block ("block1", ...) that holds each weight matrix or kernel of `model`."""
    names = {}
    for k, block in enumerate(model.blocks, start=1):
        weights = [n for n, p in block.named_parameters() if p.dim() >= 2]
        for n in weights:
            names[f"blocks.{k - 1}.{n}"] = f"block{k}" if len(weights) == 1 else f"block{k}/{n}"
    return names


def weight_alignment(
    model: BlockNet, gradients: dict[str, Tensor], reference: dict[str, Tensor], prefix: str
) -> dict[str, float]:
    """`compare` each weight's gradient with a reference gradient, keyed `prefix/stat/blockK`."""
    out = {}
    for param, block in block_of(model).items():
        if param in gradients and param in reference:
            for stat, value in compare(gradients[param], reference[param]).items():
                out[f"{prefix}/{stat}/{block}"] = value
    return out
