"""``orchestrate sweep``: Ray Tune + Optuna over a method's space; every trial is one training run.

Shape: a Tune *function trainable* is the trial. A single-worker trial (the common few-shot case)
runs the training loop (``orchestrator.runtime.loop``) right in the trial's own process, which holds the
worker's CPU/GPU (a fraction of a GPU is fine): no worker group per trial, imports, the source
model and the metric networks stay loaded between trials (``reuse_actors``), and it reports and
checkpoints through Tune. A multi-worker trial launches a ``TorchTrainer`` from the trial (its
workers report through ``TuneReportCallback``). Optuna (TPE, or NSGA-II for several objectives)
proposes configs, ASHA stops weak trials early.

Work done once per sweep, before any trial starts: the shots and the reference set are decoded
and published, the source model and the domain encoder are resolved to one artifact each, and
the reference statistics are computed (``orchestrator.runs.inputs``); every trial gets the same refs.

Faults: Tune retries a trial whose process or node died from its last checkpoint
(``--max-failures``, default 2); ``--resume NAME`` continues a killed sweep and resumes errored
trials too. MLflow: the sweep is a parent run (holding the sweep's lease); each trial a child
run (``mlflow.parentRunId``) created by the trial and logged to by its rank 0. A Tune callback in
the sweep driver sets the status of trials that Tune stopped (KILLED) or that failed for good
(FAILED).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from orchestrator.core import interrupts
from orchestrator.records import tracking
from orchestrator.core.config import ConfigError, ResolvedConfig, TaskConfig, apply_overrides
from orchestrator.runs.inputs import Inputs, data_sources, make_job, prepare
from orchestrator.runtime.job import checkpoint_schedule, eval_schedule
from orchestrator.runtime.runrecord import log_job_inputs, recorded_run
from orchestrator.runtime.launch import torch_trainer
from orchestrator.core.redact import has_redacted, redact
from orchestrator.search.space import pareto_front
from orchestrator.search.report import TRIALS_FILE, report_on_run
from orchestrator.data.storage import run_dir, storage_uri

if TYPE_CHECKING:
    from orchestrator.runs.lifelong import SequenceConfig

TAG_SWEEP = "orchestrate.sweep"
TAG_TRIAL = "orchestrate.trial_id"
# Rounds of --more run after the first; round k's Tune state is <sweep>/round<k>.
TAG_ROUNDS = "orchestrate.rounds"
TAG_WARM_START = "orchestrate.warm_start"
# Tune writes its experiment state this often (s); a killed sweep resumes from it.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# Ctrl-C is ours (orchestrator.core.interrupts): the sweep is recorded KILLED and can be resumed.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

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
    cpus_per_trial: float | None = None  # per worker; default 1
    gpus_per_trial: float = 0.0  # per worker; fractions share a GPU (e.g. 0.25)
    max_failures: int = 2  # retries of a trial whose process or node died

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
        if not math.isfinite(self.gpus_per_trial) or self.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial {self.gpus_per_trial}: expected a finite number >= 0")
        if self.cpus_per_trial is not None and (not math.isfinite(self.cpus_per_trial) or self.cpus_per_trial <= 0):
            raise ConfigError(f"--cpus-per-trial {self.cpus_per_trial}: expected a finite number > 0")

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def cpus(self) -> float:
        return self.cpus_per_trial if self.cpus_per_trial is not None else 1.0


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
    study_url: str | None = None  # the kept Optuna study (orchestrator.search.study)


@dataclass
class Progress:
    """What a trial's reports count and when it is complete: optimisation steps of one run, or
    tasks learned by a lifelong sequence (a sequence sweep)."""

    attr: str
    total: int


def _trial_status_callback(tracking_uri: str, experiment_id: str, parent_run_id: str, progress: Progress,
                           trial_ids: dict[str, str]):
    """A Tune callback (built lazily so importing this module does not import Ray)."""
    from ray.tune import Callback

    class MlflowTrialStatus(Callback):
        def _close(self, trial, status: str) -> None:
            run = tracking.find_run(tracking_uri, experiment_id, trial.trial_id, parent_run_id)
            if run is not None:
                _end_open_runs(tracking_uri, experiment_id, run.info.run_id, status)

        def on_trial_start(self, iteration, trials, trial, **info):
            trial_ids[str(trial.path)] = trial.trial_id

        def on_trial_complete(self, iteration, trials, trial, **info):
            # A trial whose last report is its final step has finished all its work (the loop
            # exports and logs before that report) even if the scheduler stopped it right then.
            done = (trial.last_result or {}).get(progress.attr) == progress.total
            self._close(trial, "FINISHED" if done else "KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            # called once the trial's retries (--max-failures) are used up
            self._close(trial, "FAILED")

    return MlflowTrialStatus()


class TrialSetup(BaseModel):
    """What the sweep driver hands every trial, computed once per sweep (and again on ``--resume``):
    where to record, where the trials keep their state, and the resources of one trial. Picklable
    and typed, so a field a trial reads is checked where the driver builds it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    trials_storage: str
    cpus: float
    gpus: float


class RunTrialSetup(TrialSetup):
    """A trial that is one training run: the sweep's base config (secrets redacted), the published
    inputs every trial shares (``inputs_to``), and the steps the driver chose for checkpoints (ASHA's
    rungs and the run's cadence) and evaluations."""

    base: dict[str, Any]
    inputs: dict[str, Any]
    source_name: str
    checkpoint_at: list[int]
    eval_at: list[int]


class SequenceTrialSetup(TrialSetup):
    """A trial that is a whole lifelong sequence (``sequence_trial``)."""

    sequence: dict[str, Any]
    method: str
    overrides: dict[str, Any]
    sequence_inputs: dict[str, Any]


def inputs_from(inputs: dict[str, Any]) -> Inputs:
    from orchestrator.data.artifacts import ArtifactRef
    from orchestrator.runs.sources import ResolvedSource

    plain = ("hub_id", "target_domain")  # strings, not artifact refs
    refs = {k: ArtifactRef.model_validate(v) if v else None for k, v in inputs.items() if k not in plain}
    # .get: inputs published before the classifier travelled with the trials resume without it
    return Inputs(source=ResolvedSource(refs["source"], inputs.get("hub_id"), None), data=refs["data"],
                  reference=refs["reference"], domain_encoder=refs["domain_encoder"],
                  reference_stats=refs["reference_stats"], domain_classifier=refs.get("domain_classifier"),
                  target_domain=inputs.get("target_domain"),
                  truth_classifier=refs.get("truth_classifier"))


def inputs_to(inputs: Inputs) -> dict[str, Any]:
    def dump(ref):
        return ref.model_dump() if ref is not None else None

    return {"source": dump(inputs.source.ref), "hub_id": inputs.source.hub_id, "data": dump(inputs.data),
            "reference": dump(inputs.reference), "domain_encoder": dump(inputs.domain_encoder),
            "reference_stats": dump(inputs.reference_stats), "domain_classifier": dump(inputs.domain_classifier),
            "target_domain": inputs.target_domain, "truth_classifier": dump(inputs.truth_classifier)}


def trial_driver(params: dict[str, Any], *, setup: RunTrialSetup) -> None:
    """The Tune function trainable: one trial = one training run + one MLflow child run."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    base = ResolvedConfig.model_validate(setup.base)
    cfg = apply_overrides(base, params, where="trial")
    uri, exp_id, parent = setup.tracking_uri, setup.experiment_id, setup.parent_run_id
    existing = tracking.find_run(uri, exp_id, trial_id, parent)
    if existing is not None and existing.info.status == "FINISHED":
        # The trial finished (and said so in MLflow) but the sweep was killed before Tune saved
        # that in its state: give Tune the recorded result instead of training it again.
        tune.report({**existing.data.metrics, "step": cfg.run.steps})
        return
    job = make_job(cfg, inputs_from(setup.inputs), name=trial_id, storage=setup.trials_storage,
                   checkpoint_at=setup.checkpoint_at, eval_at=setup.eval_at,
                   run_overrides={"cpus_per_worker": setup.cpus})

    def first_start(run_id: str) -> None:
        tracking.log_params(uri, run_id, cfg.flat_params())
        tracking.log_text(uri, run_id, cfg.to_yaml(), "config.yaml")
        log_job_inputs(uri, run_id, job, data_sources(cfg))

    tags = {tracking.TAG_KIND: "trial", TAG_TRIAL: trial_id, TAG_SWEEP: setup.sweep_name,
            tracking.TAG_TASK: cfg.task.name, tracking.TAG_METHOD: cfg.method,
            "orchestrate.source": setup.source_name}
    # A resumed trial (sweep interrupted, or its process died) reopens its run. Only a normal end
    # is recorded here (end_on_error=False): when Tune stops or loses a trial, this function is
    # interrupted in ways that look like errors, so the sweep driver's callback records those.
    with recorded_run(uri, exp_id, trial_id, existing=existing, parent_run_id=parent, tags=tags,
                      on_first_start=first_start, end_on_error=False) as record:
        job = job.model_copy(update={"tracking_uri": uri, "run_id": record.run_id})
        if cfg.run.num_workers == 1:
            from orchestrator.runtime.session import TuneSession
            from orchestrator.runtime.worker import run

            run(job, TuneSession())
        else:
            _fit_torch_trainer(job, setup)


def _fit_torch_trainer(job, setup: RunTrialSetup) -> None:
    """A multi-worker trial: a TorchTrainer launched from the trial, reporting through Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = torch_trainer(job, storage_path=setup.trials_storage, cpus=setup.cpus, gpus=setup.gpus,
                            callbacks=[TuneReportCallback()])
    trainer.fit()  # inside a Tune trial: not the main thread, Ray Train installs no signal handler


def sequence_trial(params: dict[str, Any], *, setup: SequenceTrialSetup) -> None:
    """The Tune function trainable of a sequence sweep: one trial = the whole lifelong sequence
    with the trial's config (each task run in this process, checkpointed in the run storage),
    recorded as a lifelong MLflow run under the sweep's parent. After each task it reports the
    summary of the tasks learned so far (``avg_final_*``, ``forgetting_*``, ``bwt_*`` over tasks
    0..k, ``tasks_learned`` = k+1), so the objective of a finished trial is computed over the
    whole sequence and ASHA compares trials after the same number of tasks. A resumed trial
    continues its sequence at the first unfinished task (``run_lifelong``'s resume)."""
    from ray import tune

    from orchestrator.runs.lifelong import SequenceConfig, SequenceInputs, run_lifelong

    trial_id = tune.get_context().get_trial_id()
    seq = SequenceConfig.model_validate(setup.sequence)
    inputs = SequenceInputs.from_static(setup.sequence_inputs)
    run_lifelong(seq, setup.method, overrides={**setup.overrides, **params}, name=trial_id,
                 tracking_uri=setup.tracking_uri, storage=setup.trials_storage,
                 parent_run_id=setup.parent_run_id, where=f"trial {trial_id}",
                 tags={tracking.TAG_KIND: "trial", TAG_TRIAL: trial_id, TAG_SWEEP: setup.sweep_name},
                 on_task=lambda k, summary: tune.report({"tasks_learned": k + 1, **summary}),
                 inputs=inputs, lease=False, launcher="inprocess")


def _searcher(settings: SweepSettings, study: dict[str, Any] | None = None, round_no: int = 0,
              points: list[dict[str, Any]] | None = None):
    """Optuna in Tune, writing to the sweep's kept study (orchestrator.search.study) when it has one.
    Round k of ``--more`` seeds its sampler with seed + k: the same seed would draw the same
    random start-up configs as round 0 again."""
    from orchestrator.search.samplers import sweep_sampler
    from orchestrator.search.searcher import KeptStudySearch
    from orchestrator.search.study import open_storage

    kwargs: dict[str, Any] = {"sampler": sweep_sampler(settings.multi_objective, settings.seed + round_no)}
    if study is not None:
        kwargs.update(storage=open_storage(study["url"]), study_name=study["name"])
    if points:
        kwargs["points_to_evaluate"] = points  # enqueued: the study's first trials (--warm-start)
    if settings.multi_objective:
        return KeptStudySearch(metric=settings.metrics, mode=settings.modes, **kwargs)
    return KeptStudySearch(metric=settings.metrics[0], mode=settings.modes[0], **kwargs)


def _rungs(settings: SweepSettings, progress: Progress) -> list[int]:
    """ASHA's milestones (where it compares trials), or none for FIFO."""
    if settings.scheduler == "fifo" or settings.multi_objective:
        return []
    total = progress.total
    grace = min(settings.grace_period or max(1, total // 4), total)
    out, t = [], grace
    while t < total:
        out.append(int(t))
        t *= settings.reduction_factor
    return out


def _scheduler(settings: SweepSettings, progress: Progress):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo" or settings.multi_objective:
        return FIFOScheduler()  # ASHA ranks trials by one metric only
    total = progress.total
    grace = settings.grace_period or max(1, total // 4)
    return ASHAScheduler(time_attr=progress.attr, metric=settings.metrics[0], mode=settings.modes[0],
                         max_t=total, grace_period=min(grace, total), reduction_factor=settings.reduction_factor)


def checkpoint_steps(base: ResolvedConfig, settings: SweepSettings, progress: Progress) -> list[int]:
    """Steps that checkpoint in a sweep trial (``orchestrator.runtime.job.checkpoint_schedule``): the first
    report at or after each ASHA rung unless ``run.checkpoint_every`` says otherwise."""
    return checkpoint_schedule(base.run, _rungs(settings, progress))


def default_sweep_name(base: ResolvedConfig) -> str:
    return f"sweep-{base.method}-{base.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_sweep(name: str | None, *, resume: bool, base: ResolvedConfig, sequence: SequenceConfig | None,
                tracking_uri: str | None, storage: str | None, more: int | None = None,
                warm_start: str | None = None) -> str:
    """Every refusal a sweep can decide before Ray starts, creating nothing: its name (``--resume``,
    ``--name`` or the default) follows the name rule (``orchestrator.core.names``) and its folder stays
    under the run storage; ``--resume`` names a sweep that MLflow and Tune's state both know; a new
    ``--name`` is not taken; no live invocation holds the sweep's lease; ``--more`` continues a
    FINISHED sweep that kept its study; ``--warm-start`` names a sweep with recorded trials. Returns the name
    (``run_sweep`` checks again once Ray is up: another invocation may have come in between)."""
    from orchestrator.records import lease
    from orchestrator.runs.lifelong import experiment_name
    from orchestrator.core.names import DERIVED_MAX, check_name

    if name is not None:
        check_name(name, "--resume" if resume else "--name")
    else:
        name = check_name(default_sweep_name(base), "the default sweep name", DERIVED_MAX)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    sweep_path = run_dir(storage_uri(storage), name)
    experiment = experiment_name(sequence) if sequence is not None else base.method
    parent = lease.find_existing(uri, experiment, name)
    if resume:
        if parent is None:
            hint = "" if sequence is not None else "; a sweep over a sequence also needs its --tasks FILE"
            raise ConfigError(f"--resume {name}: no sweep of that name in MLflow experiment {experiment} "
                              f"({uri}){hint}")
        lease.check_free(parent, f"sweep {name!r} (MLflow run {parent.info.run_id})")
        from ray.tune import Tuner  # reads the storage only: Ray is not started

        if not Tuner.can_restore(sweep_path):
            raise ConfigError(f"--resume {name}: no Tune state at {sweep_path}")
        if more is not None:
            state = json.loads(_download_text(uri, parent.info.run_id, "sweep.json"))
            check_more(name, parent, state.get("study"), state["space"], more)
    elif more is not None:
        raise ConfigError(f"--more {more}: adds trials to a sweep: give --resume NAME")
    elif parent is not None:
        lease.check_free(parent, f"sweep {name!r} (MLflow run {parent.info.run_id})")
        raise ConfigError(f"--name {name}: a sweep of that name exists; use --resume {name} or another name")
    if warm_start is not None:
        if resume:
            raise ConfigError(f"--warm-start {warm_start}: starts a new sweep; a resumed one keeps its own history")
        from orchestrator.search.report import ReportError, recorded_trials

        try:
            recorded_trials(uri, warm_start)
        except ReportError as exc:
            raise ConfigError(f"--warm-start {warm_start}: {exc}") from None
    return name


def _restore_secrets(stored: ResolvedConfig, task: TaskConfig | None, where: str) -> ResolvedConfig:
    """A resumed sweep's stored base config has its secrets redacted; the task file given again
    supplies them."""
    if not has_redacted(stored.task.model_dump(mode="json")):
        return stored
    if task is None:
        raise ConfigError(f"{where}: the sweep's task holds storage_options, which are never recorded; "
                          "give its task file again with --task FILE")
    return stored.model_copy(update={"task": task})


def run_sweep(base: ResolvedConfig, space: dict[str, Any], settings: SweepSettings, *,
              name: str | None = None, resume: bool = False, tracking_uri: str | None = None,
              storage: str | None = None, verbose: int = 1, sequence: SequenceConfig | None = None,
              overrides: dict[str, Any] | None = None, task: TaskConfig | None = None,
              study_storage: str | None = None, more: int | None = None, warm_start: str | None = None,
              warm_top: int = 3) -> SweepResult:
    """Sweep ``space`` around ``base``. With ``sequence`` (a ``SequenceConfig``) every trial
    learns the whole lifelong sequence (``base`` is then its first task's config, ``overrides``
    the fixed ones of every task) and the objective is the sequence's summary
    (``avg_final_fid_domain`` by default): the sweep lives in the sequence's MLflow experiment.
    ``task``: on ``resume``, the task file given again (it restores redacted storage options).
    ``study_storage``: the Optuna study's database URL (default: SQLite beside the sweep, see
    orchestrator.search.study); ``more``: with ``resume``, a new round of that many trials in the same
    study; ``warm_start``: a recorded sweep whose ``warm_top`` best configs are evaluated first."""
    from ray import tune

    from orchestrator.search import study as studies

    from orchestrator.runs.lifelong import SequenceConfig, experiment_name

    settings.validate()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    storage = storage_uri(storage)
    name = name or default_sweep_name(base)
    experiment = experiment_name(sequence) if sequence is not None else base.method
    exp_id = tracking.get_or_create_experiment(uri, experiment)
    parent = tracking.find_run(uri, exp_id, name)
    sweep_path = run_dir(storage, name)  # a checked name's own folder under the storage root
    if resume:
        if parent is None:
            hint = "" if sequence is not None else "; a sweep over a sequence also needs its --tasks FILE"
            raise ConfigError(f"--resume {name}: no sweep of that name in MLflow experiment {experiment} "
                              f"({uri}){hint}")
        if not tune.Tuner.can_restore(sweep_path):
            raise ConfigError(f"--resume {name}: no Tune state at {sweep_path}")
        state = json.loads(_download_text(uri, parent.info.run_id, "sweep.json"))
        study = state.get("study")
        check_more(name, parent, study, state["space"], more)
        if study_storage is not None and (study is None or study_storage != study["url"]):
            raise ConfigError(f"--study-storage: sweep {name} keeps its study at "
                              f"{study['url'] if study else '(none: an older sweep)'}; a resumed sweep cannot move it")
        round_no = int(parent.data.tags.get(TAG_ROUNDS, "0"))
        points = None
        base = _restore_secrets(ResolvedConfig.model_validate(state["base"]), task, f"--resume {name}")
        space = state["space"]
        settings = SweepSettings(**state["settings"])
        if state.get("sequence") is not None:
            stored = SequenceConfig.model_validate(state["sequence"])
            if has_redacted(stored.model_dump(mode="json")):
                if sequence is None:
                    raise ConfigError(f"--resume {name}: the sequence holds storage_options, which are never "
                                      "recorded; give its sequence file again with --tasks FILE")
            else:
                sequence = stored
            overrides = state.get("overrides") or {}
    elif parent is not None:
        raise ConfigError(f"--name {name}: a sweep of that name exists; use --resume {name} or another name")
    else:
        round_no = 0
        study = None
        if any(isinstance(v, dict) for v in space.values()):  # a space of constants needs no Optuna
            url, copy = ((studies.check_study_url(study_storage), None) if study_storage
                         else studies.default_location(sweep_path))
            study = {"url": url, "copy": copy, "name": name}
        points = None
        if warm_start is not None:
            points = warm_start_config(uri, warm_start, warm_top, space, base, settings)
    interrupts.current(f"sweep {name}", f"orchestrate sweep {shlex.quote(base.method)} --resume {shlex.quote(name)}"
                       + (" --tasks <sequence file>" if sequence is not None else ""))

    def first_start(parent_id: str) -> None:
        params = {f"sweep.{k}": (json.dumps(v) if isinstance(v, list) else str(v))
                  for k, v in settings.__dict__.items()}
        params.update({f"space.{k}": json.dumps(v) for k, v in space.items()})
        params.update({f"base.{k}": v for k, v in base.flat_params().items()})
        tracking.log_params(uri, parent_id, params)
        tracking.log_text(uri, parent_id, json.dumps(redact({
            "base": base.model_dump(mode="json"), "space": space, "settings": settings.__dict__,
            "sequence": sequence.model_dump(mode="json") if sequence is not None else None,
            "overrides": overrides or {}, "study": study,
            "warm_start": {"sweep": warm_start, "top": warm_top, "points": points} if warm_start else None}),
            indent=2), "sweep.json")
        tracking.log_text(uri, parent_id, base.to_yaml(), "base_config.yaml")

    def on_error(parent_id: str, status: str) -> None:
        _end_open_runs(uri, exp_id, parent_id, status)  # the trials still open too
        _save_study(study)

    tags = {tracking.TAG_KIND: "sweep", tracking.TAG_TASK: sequence.name if sequence is not None else base.task.name,
            tracking.TAG_METHOD: base.method, **({TAG_WARM_START: warm_start} if warm_start else {})}
    with recorded_run(uri, exp_id, name, existing=parent if resume else None, tags=tags,
                      on_first_start=first_start, lease=f"sweep {name!r}", on_error=on_error) as record:
        parent_id = record.run_id
        if study is not None:
            studies.pull_copy(study["url"], study["copy"])  # a resume on another machine
        if more:
            round_no += 1
            tracking.client(uri).set_tag(parent_id, TAG_ROUNDS, str(round_no))
        result = _fit(base, space, settings, name=name, resume=resume and not more, uri=uri, storage=storage,
                      exp_id=exp_id, parent_id=parent_id, sweep_path=sweep_path, verbose=verbose,
                      sequence=sequence, overrides=overrides or {}, study=study, round_no=round_no,
                      more=more, points=points)
        _save_study(study)
    return result


def _save_study(study: dict[str, Any] | None) -> None:
    """Copy a driver-local SQLite study to the sweep's remote folder (orchestrator.search.study)."""
    if study is None or not study.get("copy"):
        return
    from orchestrator.search.study import push_copy

    try:
        push_copy(study["url"], study["copy"])
    except Exception as exc:  # noqa: BLE001 (the sweep's outcome stands; say what was not copied)
        print(f"[orchestrate] warning: the study {study['url']} was not copied to {study['copy']} "
              f"({type(exc).__name__}: {exc})", flush=True)


def check_more(name: str, parent, study: dict[str, Any] | None, space: dict[str, Any], more: int | None) -> None:
    """``--more N`` continues a FINISHED sweep that keeps its study (an older sweep's sampler
    history is lost with its driver: it can seed a new sweep with --warm-start instead)."""
    if not more:
        return
    if more < 1:
        raise ConfigError(f"--more {more}: expected a number of trials >= 1")
    if parent.info.status != "FINISHED":
        raise ConfigError(f"--resume {name} --more {more}: the sweep is {parent.info.status}, not FINISHED; "
                          f"resume it first without --more")
    if study is None and any(isinstance(v, dict) for v in space.values()):
        raise ConfigError(f"--more: sweep {name} kept no Optuna study (it ran before studies were kept); "
                          f"start a new sweep with --warm-start {name}")


def warm_start_config(uri: str, old: str, top: int, space: dict[str, Any], base: ResolvedConfig,
                      settings: SweepSettings) -> list[dict[str, Any]]:
    """The old sweep's ``top`` best configs as this sweep's first points (orchestrator.search.study)."""
    from orchestrator.search.report import ReportError, rank_trials, recorded_trials
    from orchestrator.search.study import warm_start_points

    if top < 1:
        raise ConfigError(f"--top {top}: expected >= 1")
    if top > settings.num_samples:
        raise ConfigError(f"--warm-start {old} --top {top}: more configs than --num-samples {settings.num_samples}")
    if not any(isinstance(v, dict) for v in space.values()):
        raise ConfigError(f"--warm-start {old}: this sweep's space samples nothing")
    try:
        trials, state = recorded_trials(uri, old)
    except ReportError as exc:
        raise ConfigError(f"--warm-start {old}: {exc}") from None
    old_settings = state["settings"]
    ranked = rank_trials(trials, list(old_settings["metrics"]), list(old_settings["modes"]), top)
    if not ranked:
        raise ConfigError(f"--warm-start {old}: the sweep has no FINISHED trial with {old_settings['metrics'][0]}")
    points, notes = warm_start_points(ranked, space, base.flat_params())
    for note in notes:
        print(f"[orchestrate] --warm-start {old}: {note}", flush=True)
    return points


def _fit(base: ResolvedConfig, space: dict[str, Any], settings: SweepSettings, *, name: str, resume: bool,
         uri: str, storage: str, exp_id: str, parent_id: str, sweep_path: str, verbose: int,
         sequence, overrides: dict[str, Any], study: dict[str, Any] | None = None, round_no: int = 0,
         more: int | None = None, points: list[dict[str, Any]] | None = None) -> SweepResult:
    from ray import tune

    from orchestrator.runs.lifelong import prepare_sequence, task_configs
    from orchestrator.search.space import to_tune

    gpus = settings.gpus_per_trial
    common = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id, "sweep_name": name,
              "trials_storage": f"{sweep_path}/trials", "cpus": settings.cpus, "gpus": gpus}
    setup: TrialSetup
    if sequence is not None:
        configs = task_configs(sequence, base.method, overrides, f"sequence {sequence.name}")
        seq_inputs = prepare_sequence(sequence, configs, storage=storage, tracking_uri=uri, lease=False)
        progress = Progress("tasks_learned", len(sequence.tasks))
        # each task runs in the trial's process: it holds the CPU/GPU its runs compute with
        hardware = {"run.cpus_per_worker": settings.cpus}
        setup = SequenceTrialSetup(**common, sequence=redact(sequence.model_dump(mode="json")), method=base.method,
                                   overrides={**overrides, **hardware}, sequence_inputs=seq_inputs.to_static())
        driver, workers = sequence_trial, 1
    else:
        inputs = prepare(base, storage=storage, tracking_uri=uri, stats=True, lease=False)
        progress = Progress("step", base.run.steps)
        setup = RunTrialSetup(**common, base=base.public_dump(), inputs=inputs_to(inputs),
                              source_name=inputs.source.describe(),
                              checkpoint_at=checkpoint_steps(base, settings, progress),
                              eval_at=eval_schedule(base.run, _rungs(settings, progress)))
        driver, workers = trial_driver, base.run.num_workers
    if workers == 1:
        # the trial's own process trains: it holds the worker's resources
        resources = {"CPU": settings.cpus, **({"GPU": gpus} if gpus else {})}
    else:
        resources = {"CPU": 0.01}  # the trial only drives its TorchTrainer's workers
    trainable = tune.with_resources(functools.partial(driver, setup=setup), resources)
    trial_ids: dict[str, str] = {}
    callbacks = [_trial_status_callback(uri, exp_id, parent_id, progress, trial_ids)]
    # round 0 is Tune's experiment <storage>/<name>; round k of --more is <storage>/<name>/round<k>
    round_path, round_name, round_root = ((sweep_path, name, storage) if round_no == 0 else
                                          (f"{sweep_path}/round{round_no}", f"round{round_no}", sweep_path))
    if resume:
        tuner = tune.Tuner.restore(round_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=to_tune(space),
            tune_config=tune.TuneConfig(
                # a space of constants only (e.g. repeated runs) needs no Optuna
                search_alg=(_searcher(settings, study, round_no, points)
                            if any(isinstance(v, dict) for v in space.values()) else None),
                scheduler=_scheduler(settings, progress), num_samples=more or settings.num_samples,
                max_concurrent_trials=settings.max_concurrent, reuse_actors=workers == 1),
            run_config=tune.RunConfig(name=round_name, storage_path=round_root, callbacks=callbacks,
                                      verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
        )
    grid = tuner.fit()
    trials = _collect_trials(grid, progress, settings, trial_ids)
    if round_no > 0:  # the earlier rounds' trials, as the last round recorded them
        this = {t["trial_id"] for t in trials}
        try:
            earlier = json.loads(_download_text(uri, parent_id, TRIALS_FILE))
        except Exception:  # noqa: BLE001 (a sweep recorded before trials.json existed: its table is Tune's)
            earlier = []
            print(f"[orchestrate] sweep {name}: no {TRIALS_FILE} from earlier rounds; the table lists this round's "
                  "trials", flush=True)
        trials = [t for t in earlier if t["trial_id"] not in this] + trials
    if resume or round_no > 0:
        # a trial that never reported is known by its folder, whose name holds its id
        known = [t["trial_id"] for t in trials] + [Path(str(grid[i].path)).name for i in range(len(grid))]
        retire_orphans(uri, exp_id, parent_id, known)
    if study is not None:
        _close_orphan_study_trials(study)
        _complete_study(study, trials, space, settings)
    best = _best(trials, settings) if not settings.multi_objective else None
    pareto = pareto_front(trials, settings.metrics, settings.modes) if settings.multi_objective else None
    _record_parent(uri, parent_id, trials, best, pareto, settings)
    _report(uri, exp_id, parent_id, name, trials, space, settings)
    tracking.end_run(uri, parent_id, "FINISHED")
    return SweepResult(name, parent_id, exp_id, uri, sweep_path, trials, best, settings, pareto, progress.attr,
                       study["url"] if study else None)


def retire_orphans(uri: str, exp_id: str, parent_id: str, known: list[str]) -> None:
    """Trials that started (and opened an MLflow run) after Tune's last experiment-state save
    before the sweep driver was killed: the restored Tune run does not know them, so their config
    was proposed again as a new trial. Their MLflow runs are closed KILLED, tagged, and moved to
    MLflow's deleted lifecycle stage, so the sweep lists every Tune trial exactly once; nothing is
    erased (``mlflow runs restore --run-id ID`` brings one back)."""
    c = tracking.client(uri)
    for run in c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        trial_id = run.data.tags.get(TAG_TRIAL)
        if trial_id is None or any(trial_id in k for k in known):
            continue
        _end_open_runs(uri, exp_id, run.info.run_id, "KILLED")
        c.set_tag(run.info.run_id, "orchestrate.orphaned",
                  "the sweep driver was killed before Tune recorded this trial; it was not resumed")
        c.delete_run(run.info.run_id)
        print(f"trial {trial_id}: started just before the sweep was killed and unknown to Tune's saved "
              f"state; its MLflow run {run.info.run_id} is marked deleted (restorable)")


def _close_orphan_study_trials(study: dict[str, Any]) -> None:
    """Once Tune has no trial left running, a RUNNING trial in the study is one that the killed
    driver asked Optuna for after Tune's last saved state (Tune proposes it again as a new
    trial): it is told FAIL so the study and the dashboard do not show it running forever."""
    from optuna.trial import TrialState

    from orchestrator.search.study import load

    st = load(study["url"], study["name"])
    for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        st.tell(t.number, state=TrialState.FAIL)


def _complete_study(study: dict[str, Any], trials, space: dict[str, Any], settings: SweepSettings) -> None:
    """Every FINISHED trial of the sweep is COMPLETE in its study (orchestrator.search.study.record_missing)."""
    from orchestrator.search.study import record_missing

    try:
        added = record_missing(study["url"], study["name"], trials, space, settings.metrics)
    except Exception as exc:  # noqa: BLE001 (e.g. a distribution Ray converted otherwise; the sweep stands)
        print(f"[orchestrate] warning: the study {study['url']} may lack trials of the resumed sweep "
              f"({type(exc).__name__}: {exc})", flush=True)
        return
    if added:
        print(f"[orchestrate] {added} trial(s) resumed after the kill were added to the study {study['url']} "
              "(their first Optuna record was closed before they finished)", flush=True)


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
    """A text artifact of a run, through a client of ``uri``: ``mlflow.artifacts.load_text`` would
    resolve an ``mlflow-artifacts:`` location against the process's default tracking URI instead
    (a driver given --tracking-uri http://... in a folder without MLFLOW_TRACKING_URI then fails)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return Path(tracking.client(uri).download_artifacts(run_id, artifact, tmp)).read_text()


def _collect_trials(grid, progress: Progress, settings: SweepSettings,
                    trial_ids: dict[str, str]) -> list[dict[str, Any]]:
    """One row per Tune trial, from the public ``ResultGrid``. A trial that failed before its first
    report has no ``trial_id`` in its metrics: the status callback saw it start (``trial_ids``,
    keyed by the trial's storage path)."""
    out = []
    for i in range(len(grid)):
        result = grid[i]
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or trial_ids.get(str(result.path)) or Path(str(result.path)).name
        step = metrics.get(progress.attr)
        if result.error is not None:
            status = "FAILED"
        else:
            status = "FINISHED" if step == progress.total else "KILLED"
        out.append({"trial_id": trial_id, "status": status, "step": step, "config": dict(result.config or {}),
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
    # the same, typed (orchestrate report reads it back into an Optuna study)
    tracking.log_text(uri, parent_id, json.dumps(trials, indent=1, default=str), TRIALS_FILE)
    c.set_tag(parent_id, "orchestrate.num_trials", str(len(trials)))
    if best is not None:
        metrics = {f"best_{m}": best[m] for m in settings.metrics if best.get(m) is not None}
        buf = tracking.MetricBuffer(uri, parent_id)
        buf.add(metrics, 0)
        buf.flush()
        c.set_tag(parent_id, "orchestrate.best_trial", best["trial_id"])
        tracking.log_text(uri, parent_id, json.dumps(best["config"], indent=2), "best_config.json")
        for k, v in best["config"].items():  # tags, not params: a round of --more may change the best
            c.set_tag(parent_id, f"best.{k}", str(v))
    if pareto is not None:
        tracking.log_text(uri, parent_id, json.dumps(pareto, indent=2, default=str), "pareto_front.json")
    _plot(uri, parent_id, trials, settings, pareto)


def _report(uri: str, exp_id: str, parent_id: str, name: str, trials, space: dict[str, Any],
            settings: SweepSettings) -> None:
    """The sweep's report (orchestrator.search.report) on its parent run. The trials are recorded
    already: a report that cannot be drawn is a warning, not a failed sweep."""
    try:
        report_on_run(uri, exp_id, parent_id, name, trials, space, settings.metrics, settings.modes)
    except Exception as exc:  # noqa: BLE001 (matplotlib/Optuna edge cases must not fail a finished sweep)
        print(f"[orchestrate] warning: the report of sweep {name} was not written ({type(exc).__name__}: {exc}); "
              f"orchestrate report {name} tries again", flush=True)


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

