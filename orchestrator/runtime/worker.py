"""The training loop as a launched worker runs it: with the recorder of its MLflow run.

``orchestrator.runtime.loop`` never imports MLflow; this module joins the loop to the run the driver
created. Every launcher goes through ``run``: the in-process launcher (``orchestrator.runtime.launch``),
a sweep trial in its Tune process (``orchestrator.search.sweep``) and ``train_loop``, the entry point of
each Ray Train worker (``TorchTrainer(train_loop, train_loop_config={"job": ...})``).
"""

from __future__ import annotations

from typing import Any

from orchestrator.records import tracking
from orchestrator.runtime.job import Job
from orchestrator.runtime.loop import LoopResult, run_loop
from orchestrator.records.recorder import NullRecorder, Recorder
from orchestrator.runtime.session import Session


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
    from orchestrator.runtime.session import TrainSession

    run(Job.model_validate(config["job"]), TrainSession())
