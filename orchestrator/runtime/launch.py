"""The driver side of one run: its MLflow run, its lease, and the launcher that trains it.

Resuming is by name: a run's checkpoints (``<storage>/<name>``) and its MLflow run are both keyed
by the run name, so invoking the same run again continues from the last checkpoint and keeps
logging into the same MLflow run. A FINISHED run is not trained again (``restart`` does).

Launchers (one loop, ``orchestrator.runtime.loop.run_loop``, behind each):

* ``"train"`` — a Ray Train ``TorchTrainer`` (any number of workers, on any node). Its
  ``FailureConfig`` restarts dead workers from the last checkpoint inside the same MLflow run
  (``run.max_failures``); a worker group that cannot be placed within ``run.start_timeout_s``
  fails the run instead of waiting forever.
* ``"inprocess"`` — the loop runs in the calling process (which already holds the resources: a
  Tune trial), checkpoints in the run storage (``StoreSession``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.records import tracking
from orchestrator.data.artifacts import ArtifactRef
from orchestrator.runtime.job import Job
from orchestrator.records.lease import Lease
from orchestrator.runtime.runrecord import log_job_inputs, recorded_run
from orchestrator.data.storage import remove_run_dir, run_dir, storage_uri

# Train polls its workers every 2 s by default; metrics then arrive seconds late.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@dataclass
class LaunchResult:
    name: str
    run_id: str
    experiment_id: str
    status: str
    tracking_uri: str
    storage_path: str
    export: ArtifactRef | None = None
    resumed: bool = False
    already_finished: bool = False
    metrics: dict[str, Any] | None = None

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path}/{self.name}"


def quiet_train_logs():
    """Ray Train's console logging at WARNING: its INFO lines ("Reporting training result ...",
    "Checkpoint successfully created ...", one each per report) drowned our progress lines.
    They are still in Ray Train's log files under the session's logs/train/."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def default_worker_cpus(num_workers: int, use_gpu: bool, node_cpus: list[float]) -> float:
    """CPUs per Train worker when ``run.cpus_per_worker`` is not set: the one formula that the
    launcher uses and that the preflight checks against (``orchestrator.runs.train.run_resources``).

    A CPU worker computes with as many torch threads as it holds CPUs, so a single worker that
    held one CPU would leave the rest of a 2-core machine idle (the demo's pretraining ran at
    2.4 steps/s on one thread, 3.9 on two). Default: the cores of all ``node_cpus`` shared among
    the workers, never more than the largest node has (a worker cannot span nodes) and at least 1.
    With GPUs the CPU is only the data feeder: 1.
    """
    if use_gpu:
        return 1.0
    largest, total = max(node_cpus, default=0.0), sum(node_cpus)
    return float(max(1, int(min(largest, total // max(1, num_workers)))))


def alive_node_cpus() -> list[float]:
    """The CPUs of every alive node of the connected Ray cluster."""
    import ray

    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def worker_cpus(run: dict[str, Any]) -> float:
    """CPUs per Train worker of ``run`` on the connected cluster (see ``default_worker_cpus``)."""
    if run.get("cpus_per_worker") is not None:
        return float(run["cpus_per_worker"])
    return default_worker_cpus(run["num_workers"], bool(run.get("use_gpu")), alive_node_cpus())


def export_of(metrics: dict[str, Any] | None) -> ArtifactRef | None:
    raw = (metrics or {}).get("export")
    return ArtifactRef.model_validate_json(raw) if raw else None


def _finished_export(run) -> ArtifactRef | None:
    raw = run.data.tags.get(tracking.TAG_EXPORT)
    return ArtifactRef.model_validate_json(raw) if raw else None


def run_job(job: Job, *, experiment: str, tracking_uri: str | None = None,
            params: dict[str, str] | None = None, config_yaml: str | None = None,
            tags: dict[str, str] | None = None, restart: bool = False, parent_run_id: str | None = None,
            lease: bool = True, launcher: Literal["train", "inprocess"] = "train",
            sources: dict[str, str] | None = None) -> LaunchResult:
    """Run (or resume) one job, recorded in one MLflow run. ``lease``: this invocation owns the
    run (a top-level command); runs nested in a sweep or a sequence are covered by their parent's."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    storage = storage_uri(job.storage)
    name = job.name
    folder = run_dir(storage, name)  # the name is checked, its folder stays under the storage root
    exp_id = tracking.get_or_create_experiment(uri, experiment)
    existing = tracking.find_run(uri, exp_id, name, parent_run_id)
    if restart and existing is not None:
        if lease:
            Lease(uri, existing.info.run_id, f"run {name}").acquire().release()  # refuse if live
        remove_run_dir(storage, name)
        if existing.info.status == "RUNNING":
            tracking.end_run(uri, existing.info.run_id, "KILLED")
        existing = None
    if existing is not None and existing.info.status == "FINISHED":
        return LaunchResult(name, existing.info.run_id, exp_id, "FINISHED", uri, storage,
                            export=_finished_export(existing), already_finished=True,
                            metrics=dict(existing.data.metrics))

    def first_start(run_id: str) -> None:
        if params:
            tracking.log_params(uri, run_id, params)
        if config_yaml:
            tracking.log_text(uri, run_id, config_yaml, "config.yaml")
        if sources is not None:
            log_job_inputs(uri, run_id, job, sources)

    with recorded_run(uri, exp_id, name, existing=existing, parent_run_id=parent_run_id, tags=tags,
                      on_first_start=first_start, lease=f"run {name!r}" if lease else None) as record:
        run_id, resumed = record.run_id, record.resumed
        job = job.model_copy(update={"tracking_uri": uri, "run_id": run_id, "storage": storage})
        if launcher == "inprocess":
            metrics = _run_in_process(job)
        else:
            metrics = _run_with_train(job, uri, run_id, experiment, resumed)
        export = export_of(metrics)
        tracking.client(uri).set_tag(run_id, "orchestrate.run_dir", folder)
    return LaunchResult(name, run_id, exp_id, "FINISHED", uri, storage, export=export, resumed=resumed,
                        metrics={k: v for k, v in (metrics or {}).items() if k != "export"})


def _run_in_process(job: Job) -> dict[str, Any]:
    import ray
    import torch

    from orchestrator.runtime.session import StoreSession
    from orchestrator.runtime.worker import run

    on_gpu = ray.is_initialized() and bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    session = StoreSession(job.storage, job.name, device="cuda:0" if on_gpu else "cpu",
                           keep=job.run.keep_checkpoints,
                           node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local")
    return run(job, session).metrics


def _run_with_train(job: Job, uri: str, run_id: str, experiment: str, resumed: bool) -> dict[str, Any]:
    run = job.run.model_copy(update={"cpus_per_worker": worker_cpus(job.run.model_dump())})
    job = job.model_copy(update={"run": run})
    print(f"[orchestrate] {'resuming' if resumed else 'starting'} {job.name}: {run.steps} steps on "
          f"{run.num_workers} Ray Train worker(s) × {run.cpus_per_worker:g} CPU"
          f"{f' + {run.gpus_per_worker:g} GPU' if run.use_gpu else ''}; MLflow run {run_id} "
          f"(experiment {experiment!r})", flush=True)
    tracking.client(uri).set_tag(run_id, "orchestrate.cpus_per_worker", f"{run.cpus_per_worker:g}")
    trainer = torch_trainer(job, storage_path=job.storage, cpus=run.cpus_per_worker,
                            gpus=run.gpus_per_worker if run.use_gpu else 0.0)
    from orchestrator.records.progress import ProgressPrinter

    with ProgressPrinter(uri, run_id, job.name, run.steps):
        result = fit_in_thread(trainer)
    return dict(result.metrics or {})


def torch_trainer(job: Job, *, storage_path: str, cpus: float, gpus: float, callbacks: list | None = None):
    """The one ``TorchTrainer`` setup: ``job.run.num_workers`` workers of ``cpus`` CPUs (and ``gpus``
    GPUs) each running ``orchestrator.runtime.worker.train_loop``. Dead workers (a killed process, a reclaimed
    node) restart from the last checkpoint (``run.max_failures``); a worker group that cannot be
    placed within ``run.start_timeout_s`` fails instead of retrying forever
    (``controller_failure_limit=0``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.runtime.worker import train_loop

    run = job.run
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    # Read by the Train controller (Ray propagates it with the trainer).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(run.start_timeout_s)
    return TorchTrainer(
        train_loop,
        train_loop_config={"job": job.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=RunConfig(
            name=job.name, storage_path=storage_path, logging_config=quiet_train_logs(), callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=run.max_failures, controller_failure_limit=0)),
    )


def fit_in_thread(trainer):
    """``trainer.fit()`` in a helper thread. Called in the main thread, Ray Train installs its own
    SIGINT handler, which turns Ctrl-C into a quiet "graceful abort" whose fit() may even return
    normally; ours (orchestrator.core.interrupts) must decide: the run is recorded KILLED and the
    command exits 130. The Train controller is an actor owned by this driver, so it stops when
    the driver shuts Ray down or disconnects."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # short waits: signals reach the main thread between them
    if "error" in box:
        raise box["error"]
    return box["result"]
