"""The driver side of one run: MLflow run lifecycle around a Ray Train ``TorchTrainer``.

Resuming is by name: a run's Ray storage folder and its MLflow run are both keyed by the run
name, so invoking the same run again continues from the last checkpoint (Ray Train V2 restores
``ray.train.get_checkpoint()`` from the run folder) and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestrator import tracking
from orchestrator.shipping import ship
from orchestrator.storage import remove_run_dir, storage_uri

# Train polls its workers every 2 s by default; metrics then arrive seconds late (STACK.md).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@dataclass
class LaunchResult:
    name: str
    run_id: str
    experiment_id: str
    status: str
    tracking_uri: str
    storage_path: str
    checkpoint_path: str | None = None
    resumed: bool = False
    already_finished: bool = False
    metrics: dict[str, Any] | None = None

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path}/{self.name}"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local instance sized to this
    machine. Returns True when this call started Ray (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    return True


def quiet_train_logs():
    """Ray Train's console logging at WARNING: its INFO lines ("Reporting training result ...",
    "Checkpoint successfully created ...", one each per report) drowned our progress lines.
    They are still in Ray Train's log files under the session's logs/train/."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def worker_cpus(run: dict[str, Any]) -> float:
    """CPUs per Train worker when ``run.cpus_per_worker`` is not set.

    A CPU worker computes with as many torch threads as it holds CPUs, so a single worker that
    held one CPU would leave the rest of a 2-core machine idle (the demo's pretraining ran at
    2.4 steps/s on one thread, 3.9 on two). Default: the cores of the largest alive node shared
    among the workers, never more than one node has (a worker cannot span nodes) and at least 1.
    With GPUs the CPU is only the data feeder: 1.
    """
    import ray

    if run.get("cpus_per_worker") is not None:
        return float(run["cpus_per_worker"])
    if run.get("use_gpu"):
        return 1.0
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    largest, total = max(node_cpus, default=0.0), sum(node_cpus)
    return float(max(1, int(min(largest, total // max(1, run["num_workers"])))))


def run_job(job: dict[str, Any], *, name: str, experiment: str, tracking_uri: str | None = None,
            storage: str | None = None, params: dict[str, str] | None = None,
            config_yaml: str | None = None, tags: dict[str, str] | None = None,
            restart: bool = False, parent_run_id: str | None = None) -> LaunchResult:
    """Run (or resume) one job as a Ray Train run recorded in one MLflow run."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.worker import train_loop

    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    storage = storage_uri(storage)
    exp_id = tracking.get_or_create_experiment(tracking_uri, experiment)
    existing = tracking.find_run(tracking_uri, exp_id, name, parent_run_id)
    if restart:
        remove_run_dir(storage, name)
        if existing is not None and existing.info.status == "RUNNING":
            tracking.end_run(tracking_uri, existing.info.run_id, "KILLED")
        existing = None
    if existing is not None and existing.info.status == "FINISHED":
        return LaunchResult(name, existing.info.run_id, exp_id, "FINISHED", tracking_uri, storage,
                            already_finished=True, metrics=dict(existing.data.metrics))
    resumed = existing is not None
    if resumed:
        run_id = existing.info.run_id
        tracking.reopen_run(tracking_uri, run_id)
    else:
        run_id = tracking.start_run(tracking_uri, exp_id, name, tags=tags, parent_run_id=parent_run_id)
        if params:
            tracking.log_params(tracking_uri, run_id, params)
        if config_yaml:
            tracking.log_text(tracking_uri, run_id, config_yaml, "config.yaml")

    job = {**ship(job), "name": name}  # the driver's local files reach workers on other nodes
    job["run"] = {**job["run"], "cpus_per_worker": worker_cpus(job["run"])}
    print(f"[orchestrate] {'resuming' if resumed else 'starting'} {name}: {job['run']['steps']} steps on "
          f"{job['run']['num_workers']} Ray Train worker(s) × {job['run']['cpus_per_worker']:g} CPU"
          f"{'+GPU' if job['run']['use_gpu'] else ''}; MLflow run {run_id} (experiment {experiment!r})",
          flush=True)
    run = job["run"]
    tracking.client(tracking_uri).set_tag(run_id, "orchestrate.cpus_per_worker", f"{run['cpus_per_worker']:g}")
    resources = {"CPU": run["cpus_per_worker"]}
    if run["use_gpu"]:
        resources["GPU"] = run["gpus_per_worker"]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**job, "run_id": run_id, "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(num_workers=run["num_workers"], use_gpu=run["use_gpu"],
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, logging_config=quiet_train_logs(),
                             checkpoint_config=CheckpointConfig(num_to_keep=run["keep_checkpoints"])),
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        tracking.end_run(tracking_uri, run_id, "KILLED")
        raise
    except BaseException:
        tracking.end_run(tracking_uri, run_id, "FAILED")
        raise
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    c = tracking.client(tracking_uri)
    if checkpoint:
        c.set_tag(run_id, "orchestrate.checkpoint", checkpoint)
    c.set_tag(run_id, "orchestrate.run_dir", f"{storage}/{name}")
    tracking.end_run(tracking_uri, run_id, "FINISHED")
    return LaunchResult(name, run_id, exp_id, "FINISHED", tracking_uri, storage, checkpoint,
                        resumed=resumed, metrics=dict(result.metrics or {}))
