"""``orchestrate sweep``: Ray Tune + Optuna over a method's space; every trial is a Ray Train run.

Shape (the current Ray pattern, STACK.md): a Tune *function trainable* is the trial driver. It
holds a sliver of a CPU (so that it never starves its own workers on a small machine) and
launches a ``TorchTrainer`` whose workers report through ``TuneReportCallback``. Optuna (TPE, or
NSGA-II for several objectives) proposes configs, ASHA stops weak trials early.

MLflow: the sweep is a parent run; each trial is a child run (``mlflow.parentRunId``) created by
its trial driver and logged to by its rank-0 worker. A Tune callback in the sweep driver sets the
status of trials that Tune stopped (KILLED) or that errored (FAILED), since a stopped trial's
driver is killed before it could say so itself.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import tracking
from orchestrator.config import ConfigError, ResolvedConfig, apply_overrides
from orchestrator.launch import quiet_train_logs
from orchestrator.sources import source_for
from orchestrator.storage import storage_uri
from orchestrator.shipping import reuse_refs, ship
from orchestrator.train import adaptation_job, check_inputs

if TYPE_CHECKING:
    from orchestrator.lifelong import SequenceConfig

TAG_SWEEP = "orchestrate.sweep"
TAG_TRIAL = "orchestrate.trial_id"
# Tune writes its experiment state this often (s); a killed sweep resumes from it.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

# The objective a sweep optimises and `best` ranks by unless told otherwise: FID in the project's
# own domain-encoder feature space against the task's reference set (the shots when it has none).
DEFAULT_METRIC = ("fid_domain", "min")


def default_objective(base: ResolvedConfig) -> tuple[list[str], list[str]]:
    return [DEFAULT_METRIC[0]], [DEFAULT_METRIC[1]]


@dataclass
class SweepSettings:
    num_samples: int = 6
    max_concurrent: int = 2
    metrics: list[str] = field(default_factory=lambda: ["loss"])
    modes: list[str] = field(default_factory=lambda: ["min"])
    scheduler: str = "asha"  # asha | fifo
    grace_period: int | None = None  # steps before ASHA may stop a trial (default: 1/4 of the steps)
    reduction_factor: int = 2
    seed: int = 0
    cpus_per_trial: float | None = None  # per worker; default 0.99 on CPU, 1 with GPUs
    gpus_per_trial: float = 0.0  # per worker; fractions share a GPU (e.g. 0.25)

    def validate(self) -> None:
        if len(self.metrics) != len(self.modes):
            raise ConfigError(f"--metric and --mode: give one mode per metric (got {len(self.metrics)} "
                              f"metrics, {len(self.modes)} modes)")
        for m in self.modes:
            if m not in ("min", "max"):
                raise ConfigError(f"--mode {m!r}: expected min or max")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"--scheduler {self.scheduler!r}: expected asha or fifo")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError("--num-samples and --max-concurrent must be >= 1")
        if self.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial {self.gpus_per_trial}: expected >= 0")

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    path: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    settings: SweepSettings
    pareto: list[dict[str, Any]] | None = None
    progress: str = "step"  # what a trial's "step" column counts: steps, or tasks_learned


def _trial_status_callback(tracking_uri: str, experiment_id: str, parent_run_id: str, progress: "Progress"):
    """A Tune callback (built lazily so importing this module does not import Ray)."""
    from ray.tune import Callback

    class MlflowTrialStatus(Callback):
        def _close(self, trial, status: str) -> None:
            run = tracking.find_run(tracking_uri, experiment_id, trial.trial_id, parent_run_id)
            if run is not None:
                _end_open_runs(tracking_uri, experiment_id, run.info.run_id, status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # A trial whose last report is its final step has finished all its work (the worker
            # exports and logs before that report) even if the scheduler stopped it right then.
            done = (trial.last_result or {}).get(progress.attr) == progress.total
            self._close(trial, "FINISHED" if done else "KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED")

    return MlflowTrialStatus()


def trial_driver(params: dict[str, Any], *, static: dict[str, Any]) -> None:
    """The Tune function trainable: one trial = one Ray Train run + one MLflow child run."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.worker import train_loop

    trial_id = tune.get_context().get_trial_id()
    base = ResolvedConfig.model_validate(static["base"])
    cfg = apply_overrides(base, params, where="trial")
    uri, exp_id, parent = static["tracking_uri"], static["experiment_id"], static["parent_run_id"]
    existing = tracking.find_run(uri, exp_id, trial_id, parent)
    if existing is not None and existing.info.status == "FINISHED":
        # The trial finished (and said so in MLflow) but the sweep was killed before Tune saved
        # that in its state: give Tune the recorded result instead of training it again.
        tune.report({**existing.data.metrics, "step": cfg.run.steps})
        return
    if existing is not None:  # the trial is resumed after the sweep was interrupted
        run_id = existing.info.run_id
        tracking.reopen_run(uri, run_id)
    else:
        run_id = tracking.start_run(uri, exp_id, trial_id, parent_run_id=parent, tags={
            tracking.TAG_KIND: "trial", TAG_TRIAL: trial_id, TAG_SWEEP: static["sweep_name"],
            tracking.TAG_TASK: cfg.task.name, tracking.TAG_METHOD: cfg.method,
            "orchestrate.source": static["source"]})
        tracking.log_params(uri, run_id, cfg.flat_params())
        tracking.log_text(uri, run_id, cfg.to_yaml(), "config.yaml")
    job = {**reuse_refs(adaptation_job(cfg, static["source"], static["domain_encoder"]), static["shipped"]),
           "run_id": run_id, "tracking_uri": uri}
    # the worker sizes its torch threads from the CPUs it holds
    job["run"] = {**job["run"], "cpus_per_worker": static["cpus_per_worker"]}
    resources = {"CPU": static["cpus_per_worker"]}
    if static["gpus_per_worker"]:
        resources["GPU"] = static["gpus_per_worker"]
    trainer = TorchTrainer(
        train_loop, train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers,
                                               use_gpu=bool(static["gpus_per_worker"]),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=trial_id, logging_config=quiet_train_logs(), storage_path=static["trials_storage"], callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )
    # Only a normal end is recorded here: when Tune stops or loses a trial, this function is
    # interrupted in ways that look like errors, so the sweep driver's callback records those.
    trainer.fit()
    tracking.end_run(uri, run_id, "FINISHED")


@dataclass
class Progress:
    """What a trial's reports count and when it is complete: optimisation steps of one run, or
    tasks learned by a lifelong sequence (a sequence sweep)."""

    attr: str
    total: int


def sequence_trial(params: dict[str, Any], *, static: dict[str, Any]) -> None:
    """The Tune function trainable of a sequence sweep: one trial = the whole lifelong sequence
    with the trial's config (a Ray Train run per task), recorded as a lifelong MLflow run under
    the sweep's parent. After each task it reports the summary of the tasks learned so far
    (``avg_final_*``, ``forgetting_*``, ``bwt_*`` over tasks 0..k, ``tasks_learned`` = k+1), so
    the objective of a finished trial is computed over the whole sequence and ASHA compares
    trials after the same number of tasks. A resumed trial continues its sequence at the first
    unfinished task (``run_lifelong``'s resume)."""
    from ray import tune

    from orchestrator.lifelong import SequenceConfig, run_lifelong

    trial_id = tune.get_context().get_trial_id()
    seq = SequenceConfig.model_validate(static["sequence"])
    run_lifelong(seq, static["method"], overrides={**static["overrides"], **params}, name=trial_id,
                 tracking_uri=static["tracking_uri"], storage=static["trials_storage"],
                 parent_run_id=static["parent_run_id"], where=f"trial {trial_id}",
                 tags={tracking.TAG_KIND: "trial", TAG_TRIAL: trial_id, TAG_SWEEP: static["sweep_name"]},
                 on_task=lambda k, summary: tune.report({"tasks_learned": k + 1, **summary}))


def _searcher(settings: SweepSettings):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if settings.multi_objective:
        sampler = optuna.samplers.NSGAIISampler(seed=settings.seed)
        metric, mode = settings.metrics, settings.modes
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed)
        metric, mode = settings.metrics[0], settings.modes[0]
    return OptunaSearch(metric=metric, mode=mode, sampler=sampler)


def _scheduler(settings: SweepSettings, progress: Progress):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo" or settings.multi_objective:
        return FIFOScheduler()  # ASHA ranks trials by one metric only
    total = progress.total
    grace = settings.grace_period or max(1, total // 4)
    return ASHAScheduler(time_attr=progress.attr, metric=settings.metrics[0], mode=settings.modes[0],
                         max_t=total, grace_period=min(grace, total), reduction_factor=settings.reduction_factor)


def default_sweep_name(base: ResolvedConfig) -> str:
    return f"sweep-{base.method}-{base.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_sweep(base: ResolvedConfig, space: dict[str, Any], settings: SweepSettings, *,
              name: str | None = None, resume: bool = False, tracking_uri: str | None = None,
              storage: str | None = None, verbose: int = 1, sequence: SequenceConfig | None = None,
              overrides: dict[str, Any] | None = None) -> SweepResult:
    """Sweep ``space`` around ``base``. With ``sequence`` (a ``SequenceConfig``) every trial
    learns the whole lifelong sequence (``base`` is then its first task's config, ``overrides``
    the fixed ones of every task) and the objective is the sequence's summary
    (``avg_final_fid_domain`` by default): the sweep lives in the sequence's MLflow experiment."""
    from ray import tune

    from orchestrator.lifelong import SequenceConfig, experiment_name, task_configs  # noqa: F811
    from orchestrator.space import to_tune

    settings.validate()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    storage = storage_uri(storage)
    name = name or default_sweep_name(base)
    experiment = experiment_name(sequence) if sequence is not None else base.method
    exp_id = tracking.get_or_create_experiment(uri, experiment)
    parent = tracking.find_run(uri, exp_id, name)
    sweep_path = f"{storage}/{name}"
    if resume:
        if parent is None:
            hint = "" if sequence is not None else "; a sweep over a sequence also needs its --tasks FILE"
            raise ConfigError(f"--resume {name}: no sweep of that name in MLflow experiment {experiment} "
                              f"({uri}){hint}")
        if not tune.Tuner.can_restore(sweep_path):
            raise ConfigError(f"--resume {name}: no Tune state at {sweep_path}")
        state = json.loads(_download_text(uri, parent.info.run_id, "sweep.json"))
        base = ResolvedConfig.model_validate(state["base"])
        space = state["space"]
        settings = SweepSettings(**state["settings"])
        if state.get("sequence") is not None:
            sequence = SequenceConfig.model_validate(state["sequence"])
            overrides = state.get("overrides") or {}
        parent_id = parent.info.run_id
        tracking.reopen_run(uri, parent_id)
    elif parent is not None:
        raise ConfigError(f"--name {name}: a sweep of that name exists; use --resume {name} or another name")
    if sequence is not None:
        for cfg in task_configs(sequence, base.method, overrides or {}, f"sequence {sequence.name}"):
            encoder = check_inputs(cfg)  # every task's data, and the cached domain encoder
        progress = Progress("tasks_learned", len(sequence.tasks))
    else:
        encoder = check_inputs(base)
        progress = Progress("step", base.run.steps)
    source = source_for(base.task, tracking_uri=uri, storage=storage)
    if not resume:
        parent_id = tracking.start_run(uri, exp_id, name, tags={
            tracking.TAG_KIND: "sweep", tracking.TAG_TASK: sequence.name if sequence is not None else base.task.name,
            tracking.TAG_METHOD: base.method})
        params = {f"sweep.{k}": (json.dumps(v) if isinstance(v, list) else str(v))
                  for k, v in settings.__dict__.items()}
        params.update({f"space.{k}": json.dumps(v) for k, v in space.items()})
        params.update({f"base.{k}": v for k, v in base.flat_params().items()})
        tracking.log_params(uri, parent_id, params)
        tracking.log_text(uri, parent_id, json.dumps({
            "base": base.model_dump(mode="json"), "space": space, "settings": settings.__dict__,
            "sequence": sequence.model_dump(mode="json") if sequence is not None else None,
            "overrides": overrides or {}}, indent=2), "sweep.json")
        tracking.log_text(uri, parent_id, base.to_yaml(), "base_config.yaml")

    on_gpu = settings.gpus_per_trial > 0
    cpus = settings.cpus_per_trial if settings.cpus_per_trial is not None else (1.0 if on_gpu else 0.99)
    common = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id, "sweep_name": name,
              "trials_storage": f"{sweep_path}/trials"}
    if sequence is not None:
        # the trial's tasks run through run_job, which takes its resources from the run settings
        hardware = {"run.cpus_per_worker": cpus, "run.use_gpu": on_gpu}
        if on_gpu:
            hardware["run.gpus_per_worker"] = settings.gpus_per_trial
        static = {**common, "sequence": sequence.model_dump(mode="json"), "method": base.method,
                  "overrides": {**(overrides or {}), **hardware}}
        driver = sequence_trial
    else:
        static = {
            **common, "base": base.model_dump(mode="json"), "source": source, "domain_encoder": encoder,
            "shipped": ship(adaptation_job(base, source, encoder)),  # object refs of the driver's local files
            "cpus_per_worker": cpus, "gpus_per_worker": settings.gpus_per_trial,
        }
        driver = trial_driver
    # The trial driver holds 1% of a CPU: the rest is for its Train workers (STACK.md).
    trainable = tune.with_resources(functools.partial(driver, static=static), {"CPU": 0.01})
    callbacks = [_trial_status_callback(uri, exp_id, parent_id, progress)]
    try:
        if resume:
            tuner = tune.Tuner.restore(sweep_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=to_tune(space),
                tune_config=tune.TuneConfig(
                    # a space of constants only (e.g. repeated runs) needs no Optuna
                    search_alg=_searcher(settings) if any(isinstance(v, dict) for v in space.values()) else None,
                    scheduler=_scheduler(settings, progress), num_samples=settings.num_samples,
                    max_concurrent_trials=settings.max_concurrent, reuse_actors=False),
                run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                                          verbose=verbose,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
    except KeyboardInterrupt:
        _end_open_runs(uri, exp_id, parent_id, "KILLED")
        raise
    except BaseException:
        _end_open_runs(uri, exp_id, parent_id, "FAILED")
        raise
    trials = _collect_trials(grid, progress, settings)
    best = _best(trials, settings) if not settings.multi_objective else None
    pareto = pareto_front(trials, settings.metrics, settings.modes) if settings.multi_objective else None
    _record_parent(uri, parent_id, trials, best, pareto, settings)
    tracking.end_run(uri, parent_id, "FINISHED")
    return SweepResult(name, parent_id, exp_id, uri, sweep_path, trials, best, settings, pareto, progress.attr)


def _end_open_runs(uri: str, exp_id: str, parent_id: str, status: str) -> None:
    """Close a run and every descendant still RUNNING (a sweep's trials; a sequence trial's task
    runs) when their driver cannot: the sweep driver failed, or Tune stopped the trial."""
    c = tracking.client(uri)
    for run in c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
                                                     "and attributes.status = 'RUNNING'"):
        _end_open_runs(uri, exp_id, run.info.run_id, status)
    if c.get_run(parent_id).info.status == "RUNNING":
        tracking.end_run(uri, parent_id, status)


def _download_text(uri: str, run_id: str, artifact: str) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.load_text(f"{tracking.client(uri).get_run(run_id).info.artifact_uri}/{artifact}")


def _collect_trials(grid, progress: Progress, settings: SweepSettings) -> list[dict[str, Any]]:
    """One row per Tune trial. Tune's own trial objects carry the id even for a trial that failed
    before its first report (a ``Result`` would not); ``_experiment_analysis`` is where the
    ResultGrid keeps them."""
    out = []
    for trial in grid._experiment_analysis.trials:
        metrics = trial.last_result or {}
        step = metrics.get(progress.attr)
        if trial.status == "ERROR":
            status = "FAILED"
        else:
            status = "FINISHED" if step == progress.total else "KILLED"
        out.append({"trial_id": trial.trial_id, "status": status, "step": step, "config": dict(trial.config),
                    **{m: metrics.get(m) for m in settings.metrics}})
    return out


def _is_better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def _best(trials: list[dict[str, Any]], settings: SweepSettings) -> dict[str, Any] | None:
    metric, mode = settings.metrics[0], settings.modes[0]
    best = None
    for t in trials:
        if t["status"] != "FINISHED" or t.get(metric) is None:
            continue
        if best is None or _is_better(t[metric], best[metric], mode):
            best = t
    return best


def pareto_front(trials: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """Non-dominated FINISHED trials: no other trial is at least as good on every objective and
    strictly better on one."""
    sign = [1 if m == "min" else -1 for m in modes]
    pts = [t for t in trials if t["status"] == "FINISHED" and all(t.get(m) is not None for m in metrics)]

    def dominates(a, b) -> bool:
        va = [s * a[m] for s, m in zip(sign, metrics)]
        vb = [s * b[m] for s, m in zip(sign, metrics)]
        return all(x <= y for x, y in zip(va, vb)) and any(x < y for x, y in zip(va, vb))

    return [p for p in pts if not any(dominates(q, p) for q in pts if q is not p)]


def _record_parent(uri: str, parent_id: str, trials, best, pareto, settings: SweepSettings) -> None:
    import csv
    import io

    c = tracking.client(uri)
    keys = sorted({k for t in trials for k in t["config"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", "status", "step", *settings.metrics, *keys])
    for t in trials:
        w.writerow([t["trial_id"], t["status"], t["step"], *[t.get(m) for m in settings.metrics],
                    *[t["config"].get(k) for k in keys]])
    c.log_text(parent_id, buf.getvalue(), "results.csv")
    c.set_tag(parent_id, "orchestrate.num_trials", str(len(trials)))
    if best is not None:
        metrics = {f"best_{m}": best[m] for m in settings.metrics if best.get(m) is not None}
        buf = tracking.MetricBuffer(uri, parent_id)
        buf.add(metrics, 0)
        buf.flush()
        c.set_tag(parent_id, "orchestrate.best_trial", best["trial_id"])
        tracking.log_text(uri, parent_id, json.dumps(best["config"], indent=2), "best_config.json")
        tracking.log_params(uri, parent_id, {f"best.{k}": str(v) for k, v in best["config"].items()})
    if pareto is not None:
        tracking.log_text(uri, parent_id, json.dumps(pareto, indent=2, default=str), "pareto_front.json")
    _plot(uri, parent_id, trials, settings, pareto)


def _plot(uri: str, parent_id: str, trials, settings: SweepSettings, pareto) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if settings.multi_objective:
        mx, my = settings.metrics[:2]
        pts = [t for t in trials if t.get(mx) is not None and t.get(my) is not None]
        ax.scatter([t[mx] for t in pts], [t[my] for t in pts], c="grey", label="trials")
        front = sorted(pareto or [], key=lambda t: t[mx])
        ax.plot([t[mx] for t in front], [t[my] for t in front], "o-", c="C3", label="Pareto front")
        ax.set_xlabel(f"{mx} ({settings.modes[0]})")
        ax.set_ylabel(f"{my} ({settings.modes[1]})")
    else:
        m = settings.metrics[0]
        colours = {"FINISHED": "C0", "KILLED": "C1", "FAILED": "C3"}
        for i, t in enumerate(trials):
            if t.get(m) is not None:
                ax.scatter(i, t[m], c=colours[t["status"]])
        for status, colour in colours.items():
            ax.scatter([], [], c=colour, label=status)
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{m} (last reported, {settings.modes[0]})")
    ax.legend()
    ax.set_title("sweep")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metric_across_trials.png"
        fig.savefig(path, dpi=100)
        tracking.client(uri).log_artifact(parent_id, str(path))
    plt.close(fig)

