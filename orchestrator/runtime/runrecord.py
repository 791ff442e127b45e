"""One MLflow run's life on the driver, written once: start it or reopen it, hold its lease, record
what it is on its first start (params, config, and its inputs: ``log_job_inputs``), and end it
with the status that says what happened.

Every command that records a run goes through :func:`recorded_run`: a training run
(``orchestrator.runtime.launch``), a sweep and each of its trials (``orchestrator.search.sweep``), a lifelong
sequence (``orchestrator.runs.lifelong``; its tasks are training runs) and an evaluation
(``orchestrator.api``). Finding the run and deciding what a FINISHED one means stay with the caller
(a finished training run is kept, a finished sweep takes ``--more``), because that differs.

End status: FINISHED when the body returns; KILLED on Ctrl-C / SIGTERM (``KeyboardInterrupt``, or
an error raised while an interrupt was being handled: ``orchestrator.core.interrupts``); FAILED on any
other error. A run that the body ended itself (a sequence stopped by a sweep's scheduler is KILLED
inside it) keeps its status. Nothing is left RUNNING, except on purpose: a sweep trial
(``end_on_error=False``) is closed by the sweep driver, which knows whether Tune stopped it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from orchestrator.core import interrupts
from orchestrator.records import tracking
from orchestrator.records.lease import Lease

if TYPE_CHECKING:
    from orchestrator.runtime.job import Job


@dataclass(frozen=True)
class RunRecord:
    tracking_uri: str
    experiment_id: str
    name: str
    run_id: str
    resumed: bool  # an existing run reopened (a resume, or a restart after a fault)


def end_if_running(tracking_uri: str, run_id: str, status: str) -> None:
    """End the run with ``status`` unless it has ended already (its status is then kept)."""
    if tracking.client(tracking_uri).get_run(run_id).info.status == "RUNNING":
        tracking.end_run(tracking_uri, run_id, status)


@contextlib.contextmanager
def recorded_run(tracking_uri: str, experiment_id: str, name: str, *, existing: Any | None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 on_first_start: Callable[[str], None] | None = None, lease: str | None = None,
                 end_on_error: bool = True,
                 on_error: Callable[[str, str], None] | None = None) -> Iterator[RunRecord]:
    """The run ``name``: ``existing`` (an MLflow run found by the caller) reopened, or a new one
    started with ``tags`` (under ``parent_run_id``). ``lease``: what the run is, for the lease that
    refuses a second live driver of it (None: covered by a parent's lease). ``on_first_start(run_id)``
    records params, config and inputs, once. ``on_error(run_id, status)`` replaces the default
    ending on an error (a sweep also closes its open trials)."""
    resumed = existing is not None
    if resumed:
        run_id = existing.info.run_id
    else:
        run_id = tracking.start_run(tracking_uri, experiment_id, name, tags=tags, parent_run_id=parent_run_id)
    held = Lease(tracking_uri, run_id, f"{lease} (MLflow run {run_id})").acquire() if lease else None
    try:
        try:
            if resumed:
                tracking.reopen_run(tracking_uri, run_id)
            elif on_first_start is not None:
                on_first_start(run_id)
            yield RunRecord(tracking_uri, experiment_id, name, run_id, resumed)
        except BaseException as exc:
            if end_on_error:
                status = "KILLED" if isinstance(exc, KeyboardInterrupt) else interrupts.status_after_error()
                (on_error or (lambda rid, st: end_if_running(tracking_uri, rid, st)))(run_id, status)
            raise
        end_if_running(tracking_uri, run_id, "FINISHED")
    finally:
        if held is not None:
            held.release()


def log_job_inputs(tracking_uri: str, run_id: str, job: Job, sources: dict[str, str]) -> None:
    """The run's inputs in MLflow's Datasets panel: the shots and the reference set (the sha256 of
    their published ``.npy``, i.e. of the decoded uint8 images, and their count) and the source
    model (the digest of its files); ``sources`` says where each came from."""
    import numpy as np

    from orchestrator.data.artifacts import fetch, manifest_of

    for name, ref, context in (("shots", job.data, "training"), ("reference", job.reference, "evaluation")):
        if ref is None:
            continue
        path = fetch(ref)
        count = int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        digest = manifest_of(path)["files"][path.name]
        tracking.log_dataset(tracking_uri, run_id, name, digest, sources.get(name, ref.uri), count, context,
                             resolution=job.resolution)
    if job.source is not None:
        tracking.log_dataset(tracking_uri, run_id, "source", job.source.digest, sources.get("source", job.source.uri),
                             0, "source", artifact=job.source.short(), family=job.family)
