"""``orchestrate lifelong``: a stream of few-shot tasks, forgetting measured on every earlier task.

Task k is one Ray Train run that starts from the generator exported after task k-1 (the
pretrained source for k = 0); at its end, rank 0 evaluates the model on tasks 0..k (for LFS-GAN
with each task's own modulators, for a shared-weight baseline with the one generator), which
fills row k of the matrix R[k, j] for every metric. From R: average final quality, forgetting per
task and overall, backward transfer (orchestrator/metrics/forgetting.py), and the parameter cost per task.

MLflow: a parent run for the sequence, a child run per task; the matrices as CSV and heatmap PNG
artifacts of the parent, the summary as its metrics. Resume: run the same command again; tasks
whose child run FINISHED are read back from MLflow, the first unfinished one continues from its
last checkpoint, and earlier exports are never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.core import interrupts
from orchestrator.records import tracking
from orchestrator.data.artifacts import ArtifactRef, publish
from orchestrator.core.config import (
    ConfigError, ReferenceSpec, RunSettings, SourceSpec, TargetSpec, TaskConfig, apply_overrides,
    format_validation_error, validate_resolved,
)
from orchestrator.metrics.forgetting import empty_matrix, summarize
from orchestrator.runs.inputs import Inputs, check_data, check_source, data_sources, make_job
from orchestrator.runtime.job import EvalTask
from orchestrator.runtime.launch import export_of, run_job
from orchestrator.runtime.runrecord import recorded_run
from orchestrator.core.names import DERIVED_MAX, Name, check_name
from orchestrator.core.redact import redact
from orchestrator.runs.sources import ResolvedSource, domain_encoder_for, resolve_source
from orchestrator.data.storage import storage_uri

RESULT_PREFIX = "r_"


class SequenceTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name = Field(..., description="the task's name (orchestrator.core.names)")
    target: TargetSpec
    reference: ReferenceSpec | None = None


class SequenceConfig(BaseModel):
    """A sequence file: the shared source, the tasks in order, and per-task run settings."""

    model_config = ConfigDict(extra="forbid")
    name: Name = Field(..., description="the sequence's name (orchestrator.core.names)")
    resolution: int = Field(32, ge=8, le=1024)
    source: SourceSpec = Field(default_factory=lambda: SourceSpec(family="stylegan2"))
    run: dict[str, Any] = Field(default_factory=dict, description="run settings for every task (run.KEY)")
    tasks: list[SequenceTask] = Field(..., min_length=1)

    def task(self, k: int) -> TaskConfig:
        t = self.tasks[k]
        return TaskConfig(name=f"{self.name}-{k}-{t.name}", resolution=self.resolution, source=self.source,
                          target=t.target, reference=t.reference)


def load_sequence(path: str | Path) -> SequenceConfig:
    from orchestrator.core.config import _resolve_local, read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path, "sequence", "keys name, resolution, source, run, tasks")
    raw.setdefault("name", path.stem)
    try:
        seq = SequenceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc, SequenceConfig)) from None
    base = path.parent.resolve()
    for t in seq.tasks:
        t.target.data = _resolve_local(t.target.data, base)
        if t.reference is not None:
            t.reference.data = _resolve_local(t.reference.data, base)
    if seq.source.model != "pretrained":
        local = _resolve_local(seq.source.model, base)
        if Path(local).exists():
            seq.source.model = local
    return seq


@dataclass
class LifelongResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    tasks: list[str]
    matrices: dict[str, np.ndarray]
    summary: dict[str, float]
    params_per_task: int


def task_configs(seq: SequenceConfig, method: str, overrides: dict[str, Any], where: str):
    """The resolved config of every task: the method's defaults, the sequence's run settings,
    then the command's overrides."""
    from trainers.registry import check_family, get_method

    try:
        check_family(method, seq.source.family)
    except ValueError as exc:
        raise ConfigError(f"{where}: source.family: {exc}") from None
    cls = get_method(method)
    out = []
    for k in range(len(seq.tasks)):
        cfg = validate_resolved({"method": method, "task": seq.task(k).model_dump(mode="json"),
                                 "method_config": cls.Config().model_dump(mode="json"),
                                 "run": RunSettings().model_dump()}, where)
        cfg = apply_overrides(cfg, {f"run.{k2}": v for k2, v in seq.run.items()}, where=f"{where}: run")
        cfg = apply_overrides(cfg, overrides) if overrides else cfg
        if "task_id" in cls.Config.model_fields:  # per-task state (LFS-GAN's modulators)
            cfg = apply_overrides(cfg, {"task_id": k})
        out.append(cfg)
    return out


def default_name(seq: SequenceConfig, method: str, overrides: dict[str, Any]) -> str:
    blob = json.dumps({"seq": seq.model_dump(mode="json"), "method": method, "overrides": overrides},
                      sort_keys=True, default=str)
    return f"{method}-{seq.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def experiment_name(seq: SequenceConfig) -> str:
    return f"lifelong-{seq.name}"


def task_run_name(name: str, seq: SequenceConfig, k: int) -> str:
    """The run (and storage folder) of task ``k`` of lifelong run ``name``."""
    return f"{name}-task{k}-{seq.tasks[k].name}"


def check_names(seq: SequenceConfig, method: str, overrides: dict[str, Any], name: str | None,
                storage: str) -> str:
    """Before anything starts: the lifelong run's name (``--name``, or the default) and every task
    run's name and storage folder follow the name rule (``orchestrator.core.names``); returns the name."""
    from orchestrator.data.storage import run_dir

    if name is not None:
        check_name(name, "--name")
    else:
        name = check_name(default_name(seq, method, overrides), "the default lifelong run name", DERIVED_MAX)
    for k in range(len(seq.tasks)):
        run_dir(storage, task_run_name(name, seq, k))
    return name


def prefix_summary(R: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """The summary of the tasks learned so far (rows and columns 0..k of every matrix): what a
    sweep's scheduler compares between sequences after the same number of tasks. At k = K-1 it
    is the sequence's final summary."""
    out: dict[str, float] = {}
    for metric, M in R.items():
        out.update(summarize(M[:k + 1, :k + 1], metric))
    return {key: v for key, v in out.items() if "_task" not in key}


@dataclass
class SequenceInputs:
    """What every task of a sequence needs, prepared once by the driver: the shared source and
    domain encoder, each task's published shots and reference set, and each task's truth check
    (``truths[k]``: task k's reference images against the source's samples; None when the run
    turns it off), so ``target_rate`` is recorded for every task and every earlier one."""

    source: ResolvedSource
    encoder: ArtifactRef | None
    tasks: list[tuple[ArtifactRef, ArtifactRef | None]]
    classifier: ArtifactRef | None = None
    domains: list[str | None] | None = None  # each task's built-in synthetic target domain
    truths: list[ArtifactRef | None] | None = None  # each task's truth classifier

    def domain(self, k: int) -> str | None:
        return self.domains[k] if self.domains else None

    def truth(self, k: int) -> ArtifactRef | None:
        return self.truths[k] if self.truths else None

    def inputs(self, k: int, source: ResolvedSource | None = None) -> Inputs:
        data, reference = self.tasks[k]
        return Inputs(source=source or self.source, data=data, reference=reference, domain_encoder=self.encoder,
                      domain_classifier=self.classifier if self.domain(k) else None, target_domain=self.domain(k),
                      truth_classifier=self.truth(k))

    def eval_tasks(self, upto: int) -> list[EvalTask]:
        return [EvalTask(index=j, task_id=j, shots=self.tasks[j][0], reference=self.tasks[j][1],
                         target_domain=self.domain(j), truth_classifier=self.truth(j)) for j in range(upto + 1)]

    def to_static(self) -> dict[str, Any]:
        def dump(r):
            return r.model_dump() if r is not None else None

        return {"source": dump(self.source.ref), "hub_id": self.source.hub_id, "encoder": dump(self.encoder),
                "tasks": [[dump(d), dump(r)] for d, r in self.tasks], "classifier": dump(self.classifier),
                "domains": self.domains, "truths": [dump(t) for t in self.truths] if self.truths else None}

    @classmethod
    def from_static(cls, d: dict[str, Any]) -> "SequenceInputs":
        def load(r):
            return ArtifactRef.model_validate(r) if r else None

        truths = d.get("truths")
        return cls(ResolvedSource(load(d["source"]), d.get("hub_id"), None), load(d["encoder"]),
                   [(load(a), load(b)) for a, b in d["tasks"]], load(d.get("classifier")), d.get("domains"),
                   [load(t) for t in truths] if truths else None)


def prepare_sequence(seq: SequenceConfig, configs: list, *, storage: str, tracking_uri: str | None,
                     lease: bool = True) -> SequenceInputs:
    """Check and publish every task's data, the shared source and the domain encoder, and train (or
    find, by content) each task's truth check against the source (driver)."""
    from orchestrator.data.artifacts import publish_array
    from orchestrator.runs.inputs import check_metric_networks

    tasks = []
    for cfg in configs:
        shots, reference = check_data(cfg.task)
        check_metric_networks(cfg)
        tasks.append((publish_array(shots, storage),
                      publish_array(reference, storage) if reference is not None else None))
    from trainers.registry import get_method

    encoder = None
    if "domain" in configs[0].run.metrics or get_method(configs[0].method).uses_domain_encoder:
        encoder = publish(domain_encoder_for(configs[0].task), storage)
    source = resolve_source(configs[0].task, tracking_uri=tracking_uri, storage=storage, lease=lease)
    check_source(configs[0], source.local, source.hub_id)
    from orchestrator.metrics.truth import truth_classifier
    from orchestrator.runs.inputs import classifier_for

    found = [classifier_for(cfg.task, storage) for cfg in configs]
    classifier = next((ref for ref, _ in found if ref is not None), None)
    # every task against the sequence's source domain (the model a task starts from is the previous
    # task's, but the question the check answers is "the task's domain, or still the source's?")
    truths = [truth_classifier(cfg, data=data, reference=reference, source=source.ref, storage=storage)
              for cfg, (data, reference) in zip(configs, tasks)]
    return SequenceInputs(source, encoder, tasks, classifier, [d for _, d in found], truths)


def run_lifelong(seq: SequenceConfig, method: str, *, overrides: dict[str, Any] | None = None,
                 name: str | None = None, tracking_uri: str | None = None, storage: str | None = None,
                 where: str = "sequence", parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None,
                 on_task: Callable[[int, dict[str, float]], None] | None = None,
                 inputs: SequenceInputs | None = None, lease: bool = True,
                 launcher: str = "train") -> LifelongResult:
    """Learn the sequence's tasks in order (resuming a run of the same name). ``parent_run_id``
    nests the sequence's MLflow run under another (a sweep's), ``on_task(k, prefix_summary)`` is
    called after each task (a sweep trial reports it to Tune). ``inputs``: prepared by the caller
    (a sweep prepares once for all its trials); ``lease``: this invocation owns the sequence;
    ``launcher``: how each task trains (``orchestrator.runtime.launch.run_job``)."""
    overrides = overrides or {}
    configs = task_configs(seq, method, overrides, where)
    storage = storage_uri(storage)
    name = check_names(seq, method, overrides, name, storage)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    exp_id = tracking.get_or_create_experiment(uri, experiment_name(seq))
    parent = tracking.find_run(uri, exp_id, name, parent_run_id)
    if lease:
        tasks_file = shlex.quote(where) if Path(where).is_file() else "<sequence file>"
        interrupts.current(f"lifelong run {name}", f"orchestrate lifelong --tasks {tasks_file} --method "
                           f"{shlex.quote(method)} --name {shlex.quote(name)}")

    def first_start(run_id: str) -> None:
        tracking.log_params(uri, run_id, {"method": method, "tasks": json.dumps([t.name for t in seq.tasks]),
                                          **{f"method_config.{k}": str(v)
                                             for k, v in configs[0].method_config.items() if k != "task_id"},
                                          **{f"run.{k}": str(v) for k, v in configs[0].run.model_dump().items()}})
        tracking.log_text(uri, run_id, yaml.safe_dump(redact(seq.model_dump(mode="json")), sort_keys=False),
                          "sequence.yaml")

    tags = {tracking.TAG_KIND: "lifelong", tracking.TAG_METHOD: method, "orchestrate.sequence": seq.name,
            tracking.TAG_TASK: seq.name, **(tags or {})}
    with recorded_run(uri, exp_id, name, existing=parent, parent_run_id=parent_run_id, tags=tags,
                      on_first_start=first_start, lease=f"lifelong run {name!r}" if lease else None) as record:
        if inputs is None:
            inputs = prepare_sequence(seq, configs, storage=storage, tracking_uri=uri, lease=lease)
        result = _learn(seq, method, configs, name=name, uri=uri, storage=storage, exp_id=exp_id,
                        parent_id=record.run_id, inputs=inputs, on_task=on_task, launcher=launcher)
    if on_task is not None:
        # a sweep's scheduler may stop the trial at this report: nothing may be left to do after it
        on_task(len(configs) - 1, prefix_summary(result.matrices, len(configs) - 1))
    return result


def _learn(seq: SequenceConfig, method: str, configs: list, *, name: str, uri: str, storage: str, exp_id: str,
           parent_id: str, inputs: SequenceInputs, on_task, launcher: str) -> LifelongResult:
    K = len(configs)
    metrics: list[str] = []
    R: dict[str, np.ndarray] = {}
    params_per_task = 0
    previous: ArtifactRef | None = None
    for k, cfg in enumerate(configs):
        child_name = task_run_name(name, seq, k)
        child = tracking.find_run(uri, exp_id, child_name, parent_id)
        export = _export_tag(child) if child is not None and child.info.status == "FINISHED" else None
        if export is not None:
            row = dict(child.data.metrics)
            print(f"[orchestrate] task {k} ({seq.tasks[k].name}) already learned: kept", flush=True)
        else:
            source = inputs.source if k == 0 else ResolvedSource(previous, None, None)
            job = make_job(cfg, inputs.inputs(k, source), name=child_name, storage=storage,
                           previous=previous, lifelong_eval=inputs.eval_tasks(k))
            res = run_job(job, experiment=experiment_name(seq), tracking_uri=uri, params=cfg.flat_params(),
                          config_yaml=cfg.to_yaml(), parent_run_id=parent_id, lease=False, launcher=launcher,
                          sources=data_sources(cfg),
                          tags={tracking.TAG_KIND: "lifelong-task", tracking.TAG_TASK: cfg.task.name,
                                tracking.TAG_METHOD: method, "orchestrate.task_index": str(k)})
            row = dict(res.metrics or {})
            export = res.export
            if export is None:
                raise RuntimeError(f"task {k} finished but recorded no exported model")
        params_per_task = max(params_per_task, int(row.get("trainable_parameters", 0)))
        for key, value in row.items():
            if key.startswith(RESULT_PREFIX) and "_task" in key:
                metric, j = key[len(RESULT_PREFIX):].rsplit("_task", 1)
                if metric not in R:
                    R[metric] = empty_matrix(K)
                    metrics.append(metric)
                R[metric][k, int(j)] = value
        previous = export
        partial = prefix_summary(R, k)
        buf = tracking.MetricBuffer(uri, parent_id)  # curves over "tasks learned" in MLflow
        buf.add({key: v for key, v in partial.items() if not math.isnan(v)}, k + 1)
        buf.flush()
        if on_task is not None and k < K - 1:  # the last one after everything is recorded
            try:
                on_task(k, partial)
            except BaseException:  # the caller stopped the sequence (Tune's scheduler): not a failure
                tracking.end_run(uri, parent_id, "KILLED")
                raise
    summary = {}
    for metric in metrics:
        summary.update(summarize(R[metric], metric))
    summary["trainable_parameters_per_task"] = float(params_per_task)
    _record(uri, parent_id, seq, R, summary)
    return LifelongResult(name, parent_id, uri, [t.name for t in seq.tasks], R, summary, params_per_task)


def _export_tag(run) -> ArtifactRef | None:
    return export_of({"export": run.data.tags.get(tracking.TAG_EXPORT)})


def _record(uri: str, parent_id: str, seq: SequenceConfig, R: dict[str, np.ndarray], summary: dict[str, float]) -> None:
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name for t in seq.tasks]
    buf = tracking.MetricBuffer(uri, parent_id)  # the overall figures were logged with the last task
    buf.add({k: v for k, v in summary.items() if not math.isnan(v) and ("_task" in k or k.startswith("trainable"))},
            len(names))
    buf.flush()
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        for metric, M in R.items():
            rows = ["after\\on," + ",".join(names)]
            rows += [names[k] + "," + ",".join("" if math.isnan(x) else f"{x:.6g}" for x in M[k])
                     for k in range(len(names))]
            c.log_text(parent_id, "\n".join(rows) + "\n", f"matrices/{metric}.csv")
            fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
            im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis_r" if metric.startswith(("fid", "kid")) else "viridis")
            for k in range(len(names)):
                for j in range(len(names)):
                    if not math.isnan(M[k, j]):
                        ax.text(j, k, f"{M[k, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=30)
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("evaluated on task")
            ax.set_ylabel("after learning task")
            ax.set_title(metric)
            fig.colorbar(im)
            fig.tight_layout()
            path = Path(tmp) / f"{metric}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            c.log_artifact(parent_id, str(path), "matrices")
