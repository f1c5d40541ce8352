"""Decoupled training across processes: a DNI method's interfaces split into pipeline stages,
one process per stage on torch.distributed, with no update locking between them."""

from dni.distributed.links import PipelineError
from dni.distributed.pipeline import Pipeline
from dni.distributed.stage import Stage, balanced_boundaries

__all__ = ["Pipeline", "PipelineError", "Stage", "balanced_boundaries"]
