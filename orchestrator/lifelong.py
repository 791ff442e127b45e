"""``orchestrate lifelong``: a stream of few-shot tasks, forgetting measured on every earlier task.

Task k is one Ray Train run that starts from the generator exported after task k-1 (the
pretrained source for k = 0); at its end, rank 0 evaluates the model on tasks 0..k (for LFS-GAN
with each task's own modulators, for a shared-weight baseline with the one generator), which
fills row k of the matrix R[k, j] for every metric. From R: average final quality, forgetting per
task and overall, backward transfer (orchestrator/forgetting.py), and the parameter cost per task.

MLflow: a parent run for the sequence, a child run per task; the matrices as CSV and heatmap PNG
artifacts of the parent, the summary as its metrics. Resume: run the same command again; tasks
whose child run FINISHED are read back from MLflow, the first unfinished one continues from its
last checkpoint, and earlier exports are never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator import tracking
from orchestrator.config import (
    ConfigError, ReferenceSpec, RunSettings, SourceSpec, TargetSpec, TaskConfig, apply_overrides,
    format_validation_error, validate_resolved,
)
from orchestrator.forgetting import empty_matrix, summarize
from orchestrator.launch import run_job
from orchestrator.sources import source_for
from orchestrator.storage import cache_home
from orchestrator.train import _data, adaptation_job

RESULT_PREFIX = "r_"


class SequenceTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    target: TargetSpec
    reference: ReferenceSpec | None = None


class SequenceConfig(BaseModel):
    """A sequence file: the shared source, the tasks in order, and per-task run settings."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    resolution: int = Field(32, ge=8, le=1024)
    source: SourceSpec = Field(default_factory=lambda: SourceSpec(family="stylegan2"))
    run: dict[str, Any] = Field(default_factory=dict, description="run settings for every task (run.KEY)")
    tasks: list[SequenceTask] = Field(..., min_length=1)

    def task(self, k: int) -> TaskConfig:
        t = self.tasks[k]
        return TaskConfig(name=f"{self.name}-{k}-{t.name}", resolution=self.resolution, source=self.source,
                          target=t.target, reference=t.reference)


def load_sequence(path: str | Path) -> SequenceConfig:
    from orchestrator.config import _resolve_local, read_yaml_mapping

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


def prefix_summary(R: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """The summary of the tasks learned so far (rows and columns 0..k of every matrix): what a
    sweep's scheduler compares between sequences after the same number of tasks. At k = K-1 it
    is the sequence's final summary."""
    out: dict[str, float] = {}
    for metric, M in R.items():
        out.update(summarize(M[:k + 1, :k + 1], metric))
    return {key: v for key, v in out.items() if "_task" not in key}


def run_lifelong(seq: SequenceConfig, method: str, *, overrides: dict[str, Any] | None = None,
                 name: str | None = None, tracking_uri: str | None = None, storage: str | None = None,
                 where: str = "sequence", parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None,
                 on_task: Callable[[int, dict[str, float]], None] | None = None) -> LifelongResult:
    """Learn the sequence's tasks in order (resuming a run of the same name). ``parent_run_id``
    nests the sequence's MLflow run under another (a sweep's), ``on_task(k, prefix_summary)`` is
    called after each task (a sweep trial reports it to Tune)."""
    from orchestrator.train import check_inputs

    overrides = overrides or {}
    configs = task_configs(seq, method, overrides, where)
    name = name or default_name(seq, method, overrides)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    exp_id = tracking.get_or_create_experiment(uri, experiment_name(seq))
    parent = tracking.find_run(uri, exp_id, name, parent_run_id)
    if parent is None:
        parent_id = tracking.start_run(uri, exp_id, name, parent_run_id=parent_run_id, tags={
            tracking.TAG_KIND: "lifelong", tracking.TAG_METHOD: method, "orchestrate.sequence": seq.name,
            tracking.TAG_TASK: seq.name, **(tags or {})})
        tracking.log_params(uri, parent_id, {"method": method, "tasks": json.dumps([t.name for t in seq.tasks]),
                                             **{f"method_config.{k}": str(v)
                                                for k, v in configs[0].method_config.items() if k != "task_id"},
                                             **{f"run.{k}": str(v) for k, v in configs[0].run.model_dump().items()}})
        tracking.log_text(uri, parent_id, yaml.safe_dump(seq.model_dump(mode="json"), sort_keys=False),
                          "sequence.yaml")
    else:
        parent_id = parent.info.run_id
        tracking.reopen_run(uri, parent_id)

    try:
        encoder = None
        for cfg in configs:
            encoder = check_inputs(cfg) or encoder
        previous = source_for(configs[0].task, tracking_uri=uri, storage=storage)
        K = len(configs)
        metrics: list[str] = []
        R: dict[str, np.ndarray] = {}
        params_per_task = 0
        exports = cache_home() / "lifelong" / name
        for k, cfg in enumerate(configs):
            child_name = f"{name}-task{k}-{seq.tasks[k].name}"
            export_dir = exports / f"task{k}"
            child = tracking.find_run(uri, exp_id, child_name, parent_id)
            if child is not None and child.info.status == "FINISHED" and export_dir.exists():
                row = dict(child.data.metrics)
                print(f"[orchestrate] task {k} ({seq.tasks[k].name}) already learned: kept", flush=True)
            else:
                job = adaptation_job(cfg, previous, encoder)
                job.update(export_dir=str(export_dir), lifelong_previous=previous if k > 0 else None,
                           lifelong_eval=[{"index": j, "task_id": j, **_eval_sets(configs[j])} for j in range(k + 1)])
                res = run_job(job, name=child_name, experiment=experiment_name(seq), tracking_uri=uri,
                              storage=storage, params=cfg.flat_params(), config_yaml=cfg.to_yaml(),
                              parent_run_id=parent_id,
                              tags={tracking.TAG_KIND: "lifelong-task", tracking.TAG_TASK: cfg.task.name,
                                    tracking.TAG_METHOD: method, "orchestrate.task_index": str(k)})
                row = dict(res.metrics or {})
                if not export_dir.exists():
                    raise RuntimeError(f"task {k} finished but its model is not at {export_dir}")
            params_per_task = max(params_per_task, int(row.get("trainable_parameters", 0)))
            for key, value in row.items():
                if key.startswith(RESULT_PREFIX) and "_task" in key:
                    metric, j = key[len(RESULT_PREFIX):].rsplit("_task", 1)
                    if metric not in R:
                        R[metric] = empty_matrix(K)
                        metrics.append(metric)
                    R[metric][k, int(j)] = value
            previous = str(export_dir)
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
    except KeyboardInterrupt:
        tracking.end_run(uri, parent_id, "KILLED")
        raise
    except BaseException:
        if tracking.client(uri).get_run(parent_id).info.status == "RUNNING":
            tracking.end_run(uri, parent_id, "FAILED")
        raise
    tracking.end_run(uri, parent_id, "FINISHED")
    if on_task is not None:
        # a sweep's scheduler may stop the trial at this report: nothing may be left to do after it
        on_task(K - 1, prefix_summary(R, K - 1))
    return LifelongResult(name, parent_id, uri, [t.name for t in seq.tasks], R, summary, params_per_task)


def _eval_sets(cfg) -> dict[str, Any]:
    t, ref = cfg.task.target, cfg.task.reference
    return {"data": _data(t, t.shots, t.seed), "reference": _data(ref, ref.count, ref.seed) if ref else None}


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
