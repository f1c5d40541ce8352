"""No-Bprop, the paper's floor (Table 1's first column): hidden blocks never learn.

Only the last block (the classifier) is trained, from the true loss; every hidden block keeps
its initial weights, so the network is random features plus a trained readout. A decoupled
rule that ends above this has made its hidden blocks worse than leaving them alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dni.methods.bprop import Backprop


class NoBackprop(Backprop):
    """Backprop into `model.blocks[-1]` only; the blocks below run forward without a graph.

    BatchNorm layers of the hidden blocks still normalise with batch statistics in training
    mode (and keep their running averages), exactly as in a network whose blocks are
    decoupled but never apply an update (`p_update=0`).
    """

    name = "no_bprop"

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.blocks[-1].parameters()

    def logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            for block in self.model.blocks[:-1]:
                x = block(x)
        return self.model.blocks[-1](x)

    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Zero for every hidden parameter, the true gradient for the classifier's."""
        head = {
            f"blocks.{len(self.model.blocks) - 1}.{n}" for n, _ in self.model.blocks[-1].named_parameters()
        }
        return {n: g if n in head else torch.zeros_like(g) for n, g in self.true_gradients(x, y).items()}
