"""``orchestrate train``: one adaptation run of a method on a task."""

from __future__ import annotations

import os
import shlex

from orchestrator.core import interrupts
from orchestrator.records import tracking
from orchestrator.core.config import ResolvedConfig, apply_overrides
from orchestrator.runs.inputs import (check_data, check_metric_networks, check_source, data_sources, make_job, prepare,
                                 source_resolution)
from orchestrator.runtime.launch import LaunchResult, alive_node_cpus, default_worker_cpus, run_job
from orchestrator.runtime.preflight import check_all
from orchestrator.runtime.raycluster import check_resources, cluster_shapes, local_shape
from orchestrator.runs.sources import locate_source, resolve_source


def run_resources(cfg: ResolvedConfig, node_cpus: list[float] | None = None) -> tuple[int, float, float]:
    """(workers, CPUs per worker, GPUs per worker) the run will ask for on nodes with ``node_cpus``
    (default: this machine alone), by the launcher's own formula."""
    run = cfg.run
    if run.cpus_per_worker is not None:
        cpus = run.cpus_per_worker
    else:
        cpus = default_worker_cpus(run.num_workers, run.use_gpu, node_cpus or [float(os.cpu_count() or 1)])
    return run.num_workers, cpus, (run.gpus_per_worker if run.use_gpu else 0.0)


def early_source_check(cfg: ResolvedConfig) -> ResolvedConfig:
    """Before Ray starts: a source given as a path, a Hub id or ``builtin`` is checked now (and,
    with ``source.resize_to_source``, the task takes its resolution)."""
    if cfg.task.source.model == "pretrained":
        return cfg
    path, hub_id = locate_source(cfg.task)
    if cfg.task.source.resize_to_source:
        res = source_resolution(cfg, path, hub_id)
        if res != cfg.task.resolution:
            cfg = apply_overrides(cfg, {"task.resolution": res}, where="source.resize_to_source")
    check_source(cfg, path, hub_id)
    return cfg


def check_run_name(cfg: ResolvedConfig, name: str | None, uri: str, storage: str) -> str:
    """Before Ray starts: the run's name (``--name``, or the default ``METHOD-TASK-HASH``) follows
    the name rule and its folder stays under the storage (``orchestrator.core.names``,
    ``orchestrator.data.storage.run_dir``), and no live invocation trains that run (its lease); creates
    nothing. Returns the name."""
    from orchestrator.records import lease
    from orchestrator.core.names import DERIVED_MAX, check_name
    from orchestrator.data.storage import run_dir

    if name is not None:
        check_name(name, "--name")
    else:
        name = check_name(cfg.default_name(), "the default run name", DERIVED_MAX)
    run_dir(storage, name)
    run = lease.find_existing(uri, cfg.method, name)
    if run is not None:
        lease.check_free(run, f"run {name!r} (MLflow run {run.info.run_id})")
    return name


def preflight(cfg: ResolvedConfig, *, tracking_uri: str | None, storage: str | None,
              address: str | None, name: str | None = None) -> tuple[ResolvedConfig, str, str]:
    """Every check that needs no Ray, before Ray starts: URIs, the run's name and lease, source
    model, data, metric weights, and (for a local instance) whether this machine can hold the run
    at all."""
    uri, storage = check_all(tracking_uri, storage)
    cfg = early_source_check(cfg)
    check_run_name(cfg, name, uri, storage)  # the default name depends on the checked config
    check_data(cfg.task)
    check_metric_networks(cfg)
    if not (address or os.environ.get("RAY_ADDRESS")):
        check_resources(*run_resources(cfg), local_shape(), what=f"run ({cfg.method})")
    return cfg, uri, storage


def train(cfg: ResolvedConfig, *, name: str | None = None, tracking_uri: str | None = None,
          storage: str | None = None, restart: bool = False) -> LaunchResult:
    """Ray is up (``preflight`` ran before it started)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    name = name or cfg.default_name()
    check_resources(*run_resources(cfg, alive_node_cpus()), cluster_shapes(), what=f"run {name}")
    source = resolve_source(cfg.task, tracking_uri=uri, storage=storage)
    if cfg.task.source.model == "pretrained":
        check_source(cfg, source.local, source.hub_id)
    inputs = prepare(cfg, storage=storage, tracking_uri=uri, source=source)
    interrupts.current(f"run {name}", f"orchestrate train {shlex.quote(cfg.method)} ... --name {shlex.quote(name)}")
    return run_job(
        make_job(cfg, inputs, name=name, storage=storage), experiment=cfg.method, tracking_uri=uri,
        params=cfg.flat_params(), config_yaml=cfg.to_yaml(), restart=restart, sources=data_sources(cfg),
        tags={tracking.TAG_KIND: "train", tracking.TAG_TASK: cfg.task.name,
              tracking.TAG_METHOD: cfg.method, "orchestrate.source": source.describe()},
    )
