"""The typed description of one run that the driver hands to the training loop.

Everything in it is either plain settings or an :class:`~orchestrator.data.artifacts.ArtifactRef`:
no local path of the driver's machine ever reaches a worker (the worker may run on another
node); files come through the run storage and the node-local cache (``orchestrator.data.artifacts``).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.data.artifacts import ArtifactRef
from orchestrator.core.config import RunSettings


def checkpoint_schedule(run: RunSettings, rungs: Iterable[int] = ()) -> list[int]:
    """The steps at which a run checkpoints, besides its last one (which always does); only a report
    step can checkpoint. ``run.checkpoint_every`` when set; else, for a sweep trial (``rungs``: its
    ASHA rungs), the first report at or after each rung, where the scheduler may stop it; else
    every report. The one place this is decided: the driver puts the list in the job."""
    every = run.report_every
    if run.checkpoint_every is not None:  # a multiple of report_every (RunSettings checks)
        return list(range(run.checkpoint_every, run.steps, run.checkpoint_every))
    rungs = list(rungs)
    if rungs:
        return sorted({-(-r // every) * every for r in rungs})
    return list(range(every, run.steps, every))


def eval_schedule(run: RunSettings, rungs: Iterable[int] = ()) -> list[int]:
    """The steps at which a run evaluates besides its last one (which always does, with the final
    protocol); only a report step can evaluate. ``run.eval_every`` when set (0: none); else, for
    a sweep trial under ASHA (``rungs``), the first report at or after each rung, so that what the
    scheduler compares was measured at that step and never carried over from an earlier one; else
    ``k = max(1, steps // 500)`` evenly spaced points (the middle of a run up to 999 steps, its
    thirds up to 1,499, ...), each the first report at or after it. An evaluation costs the same
    in a short and a long run, so its count grows with the budget, not its interval: on 2 CPU
    cores a 300-step DDPM run spends under a quarter of its time in periodic evaluations (the
    step-0 baseline and one midpoint; README "Every method's defaults"). The driver puts the list
    in the job."""
    every = run.report_every
    if run.eval_every is not None:  # a multiple of report_every (RunSettings checks)
        return list(range(run.eval_every, run.steps, run.eval_every)) if run.eval_every else []
    k = max(1, run.steps // 500)
    marks = list(rungs) or [run.steps * i // (k + 1) for i in range(1, k + 1)]
    return sorted({s for s in (-(-max(m, 1) // every) * every for m in marks) if s < run.steps})


class EvalTask(BaseModel):
    """An earlier task of a lifelong stream, evaluated after the current one (row k of R[k, j])."""

    model_config = ConfigDict(extra="forbid")
    index: int
    task_id: int
    shots: ArtifactRef
    reference: ArtifactRef | None = None
    target_domain: str | None = None
    truth_classifier: ArtifactRef | None = None  # task j's truth check (orchestrator.metrics.truth)


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
    truth_classifier: ArtifactRef | None = Field(None, description="the task's truth classifier "
                                                 "(orchestrator.metrics.truth): target vs source samples vs neither")
    reference_stats: ArtifactRef | None = Field(None, description="precomputed features and statistics of "
                                                "the reference set and the shots (orchestrator.metrics.refstats)")
    previous: ArtifactRef | None = Field(None, description="lifelong: the export of the previous task")
    lifelong_eval: list[EvalTask] = Field(default_factory=list)

    tracking_uri: str | None = None
    run_id: str | None = None
    checkpoint_at: list[int] | None = Field(None, description="steps that take a checkpoint besides the last "
                                            "(checkpoint_schedule); not given: the run's own schedule")
    eval_at: list[int] | None = Field(None, description="steps that evaluate besides the last "
                                      "(eval_schedule); not given: the run's own schedule")

    @model_validator(mode="after")
    def _schedule(self) -> "Job":
        if self.checkpoint_at is None:
            self.checkpoint_at = checkpoint_schedule(self.run)
        return self

    def wants_evaluation(self, step: int) -> bool:
        at = self.eval_at if self.eval_at is not None else eval_schedule(self.run)
        return step == self.run.steps or step in at

    def wants_checkpoint(self, step: int) -> bool:
        return step == self.run.steps or (step % self.run.report_every == 0 and step in self.checkpoint_at)
