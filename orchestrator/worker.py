"""The training loop as a launched worker runs it: with the recorder of its MLflow run.

``orchestrator.loop`` never imports MLflow; this module joins the loop to the run the driver
created. Every launcher goes through ``run``: the in-process launcher (``orchestrator.launch``),
a sweep trial in its Tune process (``orchestrator.sweep``) and ``train_loop``, the entry point of
each Ray Train worker (``TorchTrainer(train_loop, train_loop_config={"job": ...})``).
"""

from __future__ import annotations

from typing import Any

from orchestrator import tracking
from orchestrator.job import Job
from orchestrator.loop import LoopResult, run_loop
from orchestrator.recorder import NullRecorder, Recorder
from orchestrator.session import Session


def recorder_for(job: Job, rank: int) -> Recorder:
    """Rank 0 of a job with an MLflow run records into it; any other rank, or a job without a run,
    records nothing."""
    if rank != 0 or job.run_id is None:
        return NullRecorder()
    return tracking.MlflowRecorder(job.tracking_uri, job.run_id)


def run(job: Job, session: Session) -> LoopResult:
    return run_loop(job, session, recorder_for(job, session.rank))


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point."""
    from orchestrator.session import TrainSession

    run(Job.model_validate(config["job"]), TrainSession())
