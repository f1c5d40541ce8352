"""How much of the true gradient at each interface an ideal linear, label-free synthesizer can
predict, as the classifier above converges (the README's DNI study, H9).

An FCN at its initial weights (seed 0) reads the first 10,000 MNIST training images; its
linear classifier is then fitted by L-BFGS for 0, 30, 300 and 3000 iterations with the
hidden blocks fixed. At each interface (after every hidden block) the script fits the true
per-example gradient `g = B * dL/dh_k` by least squares on `(h_k, 1)` and prints
|fit| / |g|: the fraction of the gradient's norm a perfect linear synthesizer without the
label would predict. Below the classifier it goes to zero as the classifier converges
(docs/design.md); below one more ReLU block it does not.

    python -m experiments.linear_fit_below_head [--depth 3] [--examples 10000]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dni import FCN
from dni.data import vision


def explained(h: torch.Tensor, g: torch.Tensor) -> float:
    """|least-squares fit of g on (h, 1)| / |g|, in float64."""
    features = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1).double()
    fit = features @ torch.linalg.lstsq(features, g.double(), driver="gelsd").solution
    return float(fit.norm() / g.double().norm())


def fit_classifier(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, iterations: int) -> None:
    """The classifier towards a stationary point of its loss on fixed features."""
    lbfgs = torch.optim.LBFGS(head.parameters(), max_iter=iterations)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = F.cross_entropy(head(h), y)
        loss.backward()
        return loss

    lbfgs.step(closure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--examples", type=int, default=10_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = vision("mnist", download=True)
    x, y = data.x_train[: args.examples], data.y_train[: args.examples]
    model = FCN(data.input_shape, data.num_classes, depth=args.depth).eval()  # BatchNorm: fixed statistics
    *hidden, head = model.blocks
    with torch.no_grad():
        activations, h = [], x
        for block in hidden:
            h = block(h)
            activations.append(h)
    start = {k: v.clone() for k, v in head.state_dict().items()}
    print(
        f"FCN-{args.depth} at its initial weights, {len(y)} MNIST images; |linear fit| / |g| per interface:"
    )
    for iterations in (0, 30, 300, 3000):
        head.load_state_dict(start)
        if iterations:
            fit_classifier(head, activations[-1], y, iterations)
        fractions = []
        for k, h_k in enumerate(activations):
            h_k = h_k.clone().requires_grad_(True)
            z = h_k
            for block in hidden[k + 1 :]:
                z = block(z)
            (g,) = torch.autograd.grad(F.cross_entropy(head(z), y, reduction="sum"), h_k)
            fractions.append(explained(h_k.detach(), g))
        with torch.no_grad():
            loss = F.cross_entropy(head(activations[-1]), y).item()
        shown = "  ".join(f"block{k + 1} {f:.3f}" for k, f in enumerate(fractions))
        print(f"classifier after {iterations:4d} L-BFGS iterations (loss {loss:.4f}):  {shown}")


if __name__ == "__main__":
    main()
