"""How close a learning signal is to the true gradient: the numbers that explain a run."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def compare(estimate: Tensor, truth: Tensor) -> dict[str, float]:
    """Cosine similarity, Pearson correlation, relative error `|g - d| / |d|` and the
    fraction of entries whose signs agree, between two gradients of the same shape."""
    g, d = estimate.flatten().double(), truth.flatten().double()
    tiny = torch.finfo(torch.float64).tiny
    gc, dc = g - g.mean(), d - d.mean()
    stats = torch.stack(
        [
            (g @ d) / (g.norm() * d.norm()).clamp_min(tiny),
            (gc @ dc) / (gc.norm() * dc.norm()).clamp_min(tiny),
            (g - d).norm() / d.norm().clamp_min(tiny),
            (torch.sign(g) == torch.sign(d)).double().mean(),
        ]
    ).tolist()
    return dict(zip(("cosine", "pearson", "rel_error", "sign_agreement"), stats))
