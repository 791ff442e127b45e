"""The typed description of one run that the driver hands to the training loop.

Everything in it is either plain settings or an :class:`~orchestrator.artifacts.ArtifactRef`:
no local path of the driver's machine ever reaches a worker (the worker may run on another
node); files come through the run storage and the node-local cache (``orchestrator.artifacts``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.artifacts import ArtifactRef
from orchestrator.config import RunSettings


class EvalTask(BaseModel):
    """An earlier task of a lifelong stream, evaluated after the current one (row k of R[k, j])."""

    model_config = ConfigDict(extra="forbid")
    index: int
    task_id: int
    shots: ArtifactRef
    reference: ArtifactRef | None = None
    target_domain: str | None = None


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["adapt", "pretrain"]
    name: str = Field(..., description="the run name: keys its checkpoints and its MLflow run")
    method: str = Field(..., description="a method key, or the pretrainer key for kind=pretrain")
    family: str = Field(..., description="the source family: ddpm | stylegan2")
    resolution: int
    method_config: dict[str, Any]
    run: RunSettings
    storage: str = Field(..., description="the run storage (exports are published there)")

    data: ArtifactRef = Field(..., description="the training images, uint8 [N,H,W,3] (.npy)")
    reference: ArtifactRef | None = Field(None, description="the metrics' reference set (.npy); None: the shots")
    source: ArtifactRef | None = None
    source_hub_id: str | None = Field(None, description="a Hub id each node resolves from its own HF cache")
    domain_encoder: ArtifactRef | None = None
    domain_classifier: ArtifactRef | None = Field(None, description="the built-in synthetic domains' classifier")
    target_domain: str | None = Field(None, description="the task's built-in synthetic target domain, if any")
    reference_stats: ArtifactRef | None = Field(None, description="precomputed features and statistics of "
                                                "the reference set and the shots (orchestrator.refstats)")
    previous: ArtifactRef | None = Field(None, description="lifelong: the export of the previous task")
    lifelong_eval: list[EvalTask] = Field(default_factory=list)

    tracking_uri: str | None = None
    run_id: str | None = None
    checkpoint_at: list[int] | None = Field(None, description="steps that take a checkpoint (besides the "
                                            "last); None: run.checkpoint_every, else every report")

    def wants_checkpoint(self, step: int) -> bool:
        if step == self.run.steps:
            return True
        if step % self.run.report_every:
            return False
        if self.checkpoint_at is not None:
            return step in self.checkpoint_at
        every = self.run.checkpoint_every or self.run.report_every
        return step % every == 0
