"""The one public API of the tool: the CLI is a thin shell over it, benchmarks and tests call it.

=====================  =========================================================================
``pretrain_source``    a task's own source generator, trained once and cached (``sources``)
``adapt``              one adaptation run of a method on a task (``train``)
``sweep``              Ray Tune + Optuna over a method's space (``sweep``)
``lifelong``           a stream of tasks, forgetting measured (``lifelong``)
``sample``             n images from any model, spread over the cluster (``sampling``)
``evaluate``           the evaluation protocol for any model or folder of images (``evaluation``)
=====================  =========================================================================

``sample`` and ``evaluate`` come in two halves so that a caller can decide everything before Ray
starts: ``plan_sample`` / ``plan_evaluate`` check the input (the model, the destination, the
options, the task, the resources of a local instance) without Ray, and ``run_sample`` /
``run_evaluate`` do the work once Ray is up. ``sample`` and ``evaluate`` do both, starting (and
stopping) a local Ray instance when none is connected.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.core.config import ConfigError, InputError, TaskConfig
from orchestrator.runs.lifelong import run_lifelong as lifelong
from orchestrator.runs.models import ResolvedModel, find_run, publish_model, resolve_model
from orchestrator.runtime.sampling import Destination, SampleJob, SampleResult, check_destination, run_sampling
from orchestrator.runs.sources import pretrain_source
from orchestrator.search.sweep import run_sweep as sweep
from orchestrator.runs.train import train as adapt
from trainers.generate import SampleOptions

__all__ = ["pretrain_source", "adapt", "sweep", "lifelong", "sample", "plan_sample", "run_sample",
           "evaluate", "plan_evaluate", "run_evaluate", "SampleOptions", "SamplePlan", "EvaluatePlan",
           "EvaluationResult", "SampleResult", "register"]

Progress = Callable[[int, int], None]  # (images done, images in the job)


@dataclass
class SamplePlan:
    model: ResolvedModel
    job: SampleJob
    dest: Destination
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    storage: str
    address: str | None
    todo: int = 0  # images not yet written at the destination

    @property
    def needs_ray(self) -> bool:
        return self.todo > 0


def _worker_shape(workers: int, cpus_per_worker: float | None, gpus_per_worker: float,
                  address: str | None) -> tuple[float, float]:
    """(CPUs, GPUs) per sampling actor, checked against this machine when Ray is local."""
    from orchestrator.runtime.launch import default_worker_cpus
    from orchestrator.runtime.raycluster import check_resources, local_shape

    if workers < 1:
        raise InputError(f"--workers {workers}: expected >= 1")
    if gpus_per_worker < 0 or (cpus_per_worker is not None and cpus_per_worker <= 0):
        raise InputError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
    local = not (address or os.environ.get("RAY_ADDRESS"))
    # the launcher's one formula; a remote cluster's nodes are not asked here (no node: 1 CPU each)
    cpus = cpus_per_worker if cpus_per_worker is not None else default_worker_cpus(
        workers, gpus_per_worker > 0, [float(os.cpu_count() or 1)] if local else [])
    if local:
        check_resources(workers, cpus, gpus_per_worker, local_shape(), what="sampling")
    return cpus, gpus_per_worker


def plan_sample(model: str, n: int, out: str, *, options: SampleOptions | dict[str, Any] | None = None,
                seed: int = 0, batch_size: int = 32, shard_size: int | None = None, workers: int = 1,
                cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0,
                tracking_uri: str | None = None, storage: str | None = None,
                address: str | None = None) -> SamplePlan:
    """Everything about a sampling job that can be checked without Ray (see ``sample``)."""
    from orchestrator.runtime.sampling import plan
    from orchestrator.data.storage import storage_uri
    from trainers.generate import open_model

    if n < 1:
        raise InputError(f"--n {n}: expected >= 1")
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise InputError("--batch-size and --shard-size must be >= 1")
    options = _options(options)
    resolved = resolve_model(model, tracking_uri)
    try:
        options = open_model(resolved.local, "cpu").check(options)
    except ValueError as exc:
        raise InputError(f"MODEL {model}: {exc}") from None
    dest = check_destination(out)
    # a shard is a few batches: big enough to amortise a call, small enough to resume cheaply
    shard = shard_size or batch_size * max(1, min(8, -(-n // (batch_size * max(1, workers) * 2))))
    job = SampleJob(model_digest=resolved.digest, options=options, seed=seed, n=n, batch_size=batch_size,
                    shard_size=shard)
    plan(job, dest)  # a destination holding another job's images is refused now
    cpus, gpus = _worker_shape(workers, cpus_per_worker, gpus_per_worker, address)
    return SamplePlan(resolved, job, dest, workers, cpus, gpus, storage_uri(storage), address,
                      todo=sum(b - a for a, b in plan(job, dest)[1]))


def _options(options: SampleOptions | dict[str, Any] | None) -> SampleOptions:
    from pydantic import ValidationError

    if isinstance(options, SampleOptions):
        return options
    try:
        return SampleOptions.model_validate({k: v for k, v in (options or {}).items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"--{str(err['loc'][0]).replace('_', '-')} {err.get('input')!r}: {err['msg']}") from None


def run_sample(p: SamplePlan, progress: Progress | None = None) -> SampleResult:
    """Draw the plan's missing shards (Ray is up when ``p.needs_ray``)."""
    from orchestrator.runtime.raycluster import check_resources, cluster_shapes

    todo = _todo(p)
    if not todo:
        return run_sampling(p.job, p.model.ref, p.dest, model_name=p.model.short())  # marks it complete
    check_resources(p.workers, p.cpus_per_worker, p.gpus_per_worker, cluster_shapes(), what="sampling")
    ref = publish_model(p.model, p.storage)
    done = [0]
    total_done = p.job.n - sum(b - a for a, b in todo)

    def on_shard(a: int, b: int) -> None:
        done[0] += b - a
        if progress is not None:
            progress(total_done + done[0], p.job.n)

    if progress is not None:
        progress(total_done, p.job.n)
    return run_sampling(p.job, ref, p.dest, model_name=p.model.short(), workers=p.workers,
                        cpus_per_worker=p.cpus_per_worker, gpus_per_worker=p.gpus_per_worker, on_shard=on_shard)


def _todo(p: SamplePlan) -> list[tuple[int, int]]:
    from orchestrator.runtime.sampling import plan

    return plan(p.job, p.dest)[1]


def _with_ray(address: str | None, fn: Callable[[], Any]) -> Any:
    from orchestrator.runtime.raycluster import init_ray, shutdown

    started = init_ray(address)
    try:
        return fn()
    finally:
        shutdown(started)


def sample(model: str, n: int, out: str, *, progress: Progress | None = None, **kwargs: Any) -> SampleResult:
    """``n`` images of ``model`` (a path, a run name or id, ``models:/NAME/VERSION``) into ``out``
    (a folder of PNGs or a ``.parquet`` file, local or ``s3://``): image ``i`` depends only on the
    model, the options, ``seed`` and ``i``, whatever the number of workers; rerunning a killed job
    skips the shards already written. Keyword arguments: those of :func:`plan_sample`."""
    p = plan_sample(model, n, out, **kwargs)
    if not p.needs_ray:
        return run_sample(p, progress)
    return _with_ray(p.address, lambda: run_sample(p, progress))


# -- evaluate -----------------------------------------------------------------------------------
@dataclass
class EvaluatePlan:
    name: str
    task: TaskConfig
    model: ResolvedModel | None  # None: outside images
    images: str | None
    n: int | None
    sample: SamplePlan | None
    metrics: list[str]
    seed: int
    tracking_uri: str
    storage: str
    experiment: str
    address: str | None
    truth_check: bool = True


@dataclass
class EvaluationResult:
    name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, float]
    already_finished: bool = False
    samples: str | None = None


def _is_images(spec: str) -> bool:
    """A folder or Parquet file of images (not a model), or a remote prefix."""
    from pathlib import Path

    from trainers.common import SourceModelError
    from trainers.generate import model_kind

    if "://" in spec:
        return True
    path = Path(spec).expanduser()
    if not path.exists():
        return False
    try:
        model_kind(path)
        return False
    except SourceModelError:
        return True


def plan_evaluate(target: str, task: str | TaskConfig, *, n: int | None = None,
                  options: SampleOptions | dict[str, Any] | None = None, seed: int = 0,
                  metrics: list[str] | None = None, batch_size: int = 32, workers: int = 1,
                  cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0,
                  tracking_uri: str | None = None, storage: str | None = None,
                  address: str | None = None, truth_check: bool = True) -> EvaluatePlan:
    """Everything about an evaluation that can be checked without Ray (see ``evaluate``)."""
    from orchestrator.records import tracking
    from orchestrator.core.config import RunSettings, load_task
    from orchestrator.runs.evaluation import EXTERNAL_EXPERIMENT, evaluation_name
    from orchestrator.runs.inputs import check_data, check_metric_names
    from orchestrator.runtime.preflight import check_all

    uri, store = check_all(tracking_uri, storage)
    images = target if _is_images(target) else None
    model = None if images is not None else resolve_model(target, uri)
    if isinstance(task, TaskConfig):
        t = task
    else:
        family = "ddpm"
        if model is not None:
            from trainers.generate import GAN_KINDS, model_kind

            family = "stylegan2" if model_kind(model.local) in GAN_KINDS else "ddpm"
        t = load_task(task, family=family)
    metrics = list(metrics or RunSettings().metrics)
    try:
        RunSettings(metrics=metrics)
    except Exception as exc:
        raise ConfigError(f"--metrics {','.join(metrics)}: {exc}") from None
    shots, reference = check_data(t)
    check_metric_names(metrics)
    options = _options(options)
    if images is not None:
        if options.model_dump(exclude_none=True):
            raise InputError(f"{target}: sampling options apply to a model, not to a folder of images")
        what, extra = images, {"seed": seed, "metrics": metrics}
        experiment = EXTERNAL_EXPERIMENT
    else:
        n = n or len(reference if reference is not None else shots)
        what, extra = model.short(), {"options": options.model_dump(exclude_none=True), "seed": seed,
                                      "metrics": metrics}
        experiment = model.method or EXTERNAL_EXPERIMENT
    if not truth_check:  # only then: the names of evaluations with the check stay what they were
        extra["truth_check"] = False
    name = evaluation_name(what, t, n or 0, extra)
    sample_plan = None
    if model is not None:
        out = f"{store}/evaluations/{name}/samples.parquet"
        sample_plan = plan_sample(target, n, out, options=options, seed=seed, batch_size=batch_size,
                                  workers=workers, cpus_per_worker=cpus_per_worker,
                                  gpus_per_worker=gpus_per_worker, tracking_uri=uri, storage=store,
                                  address=address)
    return EvaluatePlan(name, t, model, images, n, sample_plan, metrics, seed, tracking.resolve_tracking_uri(uri),
                        store, experiment, address, truth_check)


def run_evaluate(p: EvaluatePlan, progress: Progress | None = None) -> EvaluationResult:
    """Sample (a model) or read (images), score, record (Ray is up for a model)."""
    import numpy as np

    from orchestrator.core import interrupts
    from orchestrator.records import tracking
    from orchestrator.runs.evaluation import TAG_EVALUATED_RUN, TAG_MODEL, Scorer
    from orchestrator.runtime.runrecord import recorded_run
    from orchestrator.runtime.sampling import load_images as load_samples

    uri = p.tracking_uri
    exp_id = tracking.get_or_create_experiment(uri, p.experiment)
    existing = tracking.find_run(uri, exp_id, p.name)
    if existing is not None and existing.info.status == "FINISHED":
        return EvaluationResult(p.name, existing.info.run_id, exp_id, uri, dict(existing.data.metrics),
                                already_finished=True)
    tags = {tracking.TAG_KIND: "evaluation", tracking.TAG_TASK: p.task.name}
    if p.model is not None:
        tags[TAG_MODEL] = p.model.short()
        if p.model.run_id:
            tags[TAG_EVALUATED_RUN] = p.model.run_id
        if p.model.method:
            tags[tracking.TAG_METHOD] = p.model.method
    else:
        tags["orchestrate.images"] = p.images

    def first_start(run_id: str) -> None:
        params = {"n": str(p.n), "seed": str(p.seed), "metrics": ",".join(p.metrics), "task": p.task.name,
                  "target": p.model.spec if p.model is not None else p.images}
        if p.sample is not None:
            params.update({f"options.{k}": str(v) for k, v in p.sample.job.options.model_dump().items()
                           if v is not None})
            params.update(batch_size=str(p.sample.job.batch_size), model_digest=p.model.digest)
        tracking.log_params(uri, run_id, params)

    interrupts.current(f"evaluation {p.name}", "the same `orchestrate evaluate` command")
    with recorded_run(uri, exp_id, p.name, existing=existing, tags=tags, on_first_start=first_start) as record:
        run_id = record.run_id
        t0 = time.perf_counter()
        if p.sample is not None:
            res = run_sample(p.sample, progress)
            samples = load_samples(res.dest)
        else:
            from orchestrator.data.storage import data_cache_dir
            from trainers.data import load_images

            samples = load_images(p.images, p.task.resolution, count=p.n, seed=p.seed, cache_dir=data_cache_dir())
        sampled = time.perf_counter() - t0
        scorer = Scorer.for_task(p.task, p.metrics, truth_storage=p.storage if p.truth_check else None)
        metrics = scorer.score(samples, seed=p.seed)
        metrics.update(eval_seconds=time.perf_counter() - t0, sample_seconds=sampled)
        buf = tracking.MetricBuffer(uri, run_id)
        buf.add(metrics, 0)
        buf.flush()
        grid = samples[np.linspace(0, len(samples) - 1, min(16, len(samples))).astype(int)]
        tracking.log_image_grid(uri, run_id, grid, "samples/evaluated.png")
    return EvaluationResult(p.name, run_id, exp_id, uri, metrics,
                            samples=p.sample.dest.uri if p.sample is not None else p.images)


def evaluate(target: str, task: str | TaskConfig, *, progress: Progress | None = None,
             **kwargs: Any) -> EvaluationResult:
    """Score ``target`` — a model (anything :func:`sample` accepts; sampled ``n`` times, by default
    as many as the task's reference images) or a folder / Parquet file / ``s3://`` prefix of
    images made elsewhere — with the training runs' evaluation protocol against ``task``'s
    reference set; recorded as an MLflow run of kind ``evaluation``. Keyword arguments: those of
    :func:`plan_evaluate`."""
    p = plan_evaluate(target, task, **kwargs)
    if p.sample is None or not p.sample.needs_ray:
        return run_evaluate(p, progress)
    return _with_ray(p.address, lambda: run_evaluate(p, progress))


def register(run: str, name: str, *, tracking_uri: str | None = None) -> str:
    """Register the exported model of ``run`` (a run name or MLflow run id) as a new version of the
    registered model ``name`` in MLflow's Model Registry; returns ``models:/NAME/VERSION``, which
    ``sample``, ``evaluate``, ``mlflow.pyfunc.load_model`` and a task's ``source`` accept."""
    from orchestrator.records import tracking
    from orchestrator.records.mlflow_model import MLMODEL
    from orchestrator.records.mlflow_model import register as register_version
    from orchestrator.core.names import check_name

    check_name(name, "--register")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    found = find_run(run, uri)
    if found is None:
        raise InputError(f"--register: no run named {run!r} in the MLflow store {uri}")
    run_id = found.info.run_id
    if found.info.status != "FINISHED":
        raise InputError(f"--register: run {run} ({run_id}) is {found.info.status}; only a FINISHED run's model "
                         "is registered")
    names = {a.path for a in tracking.client(uri).list_artifacts(run_id, "model")}
    if f"model/{MLMODEL}" not in names:
        raise InputError(f"--register: run {run} ({run_id}) has no MLflow model (no model/{MLMODEL} artifact: "
                         "not an adaptation run, or recorded by an older version of the tool)")
    return register_version(uri, run_id, name)
