"""No-Bprop, the paper's floor (Table 1's first column): hidden blocks never learn.

Only the last block (the classifier) is trained, from the true loss; every hidden block keeps
its initial weights, so the network is random features plus a trained readout. A decoupled
rule that ends above this has made its hidden blocks worse than leaving them alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dni.guard import Guard
from dni.interface import OptimizerFactory
from dni.methods.base import Method
from dni.models import BlockNet


class NoBackprop(Method):
    """Trains `model.blocks[-1]` on the loss; the blocks below run forward only.

    BatchNorm layers of the hidden blocks still normalise with batch statistics in training
    mode (and keep their running averages), exactly as in a network whose blocks are
    decoupled but never apply an update (`p_update=0`).
    """

    name = "no_bprop"

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
    ):
        super().__init__(model, loss, guard)
        self.hidden, self.head = nn.Sequential(*model.blocks[:-1]), model.blocks[-1]
        self.optimizers = [optimizer(self.head.parameters())]

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        (optimizer,) = self.optimizers
        with torch.no_grad():
            h = self.hidden(x)
        logits = self.head(h)
        loss = self.loss(logits, y)
        if self.guard.finite("loss", loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return self._outputs(logits, y, loss)

    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Zero for every hidden parameter, the true gradient for the classifier's."""
        head = {f"blocks.{len(self.model.blocks) - 1}.{n}" for n, _ in self.head.named_parameters()}
        return {n: g if n in head else torch.zeros_like(g) for n, g in self.true_gradients(x, y).items()}
