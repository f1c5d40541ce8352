"""Plain backpropagation: the control every other rule is measured against."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from dni.guard import Guard
from dni.interface import OptimizerFactory
from dni.methods.base import Method
from dni.models import BlockNet


class Backprop(Method):
    """`loss.backward()` through the whole network, one optimiser over all parameters."""

    name = "bprop"

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
    ):
        super().__init__(model, loss, guard)
        self.optimizers = [optimizer(self.trained_parameters())]

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the loss trains: all of them."""
        return self.model.parameters()

    def logits(self, x: Tensor) -> Tensor:
        return self.model(x)

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        (optimizer,) = self.optimizers
        logits = self.logits(x)
        loss = self.loss(logits, y)
        if self.guard.finite("loss", loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return self._outputs(logits, y, loss)
