"""Decoupled training across processes: a DNI or DGL method's blocks split into pipeline stages,
one process per stage on torch.distributed, with no update locking between them."""

from dni.distributed.links import PipelineError
from dni.distributed.pipeline import Pipeline
from dni.distributed.stage import DNIStage, GreedyStage, Stage, balanced_boundaries

__all__ = ["DNIStage", "GreedyStage", "Pipeline", "PipelineError", "Stage", "balanced_boundaries"]
