"""The training loop: one loop for every method, for source pretraining, and for every launcher.

``run_loop(job, session)`` builds the method from the typed :class:`~orchestrator.runtime.job.Job`, fetches
what it needs into the node's cache (source, encoder, images: ``orchestrator.data.artifacts``), and
steps it. Every ``report_every`` steps it reports metrics (and, when due, a checkpoint) through the
session — Ray Train, Tune, or a storage folder (``orchestrator.runtime.session``) — and records the run
through a recorder (``orchestrator.records.recorder``: the MLflow run the driver created, in production;
memory in tests and benchmarks); this module never imports MLflow. A restarted run continues from
the newest checkpoint *exactly*: weights, optimisers, EMA, step, and every RNG
(``orchestrator.core.rng``) are in it.

Device performance is set here, once, for every method (``trainers.perf.DevicePerf``):
precision, fused optimisers, channels_last, TF32, compile. ``train_step`` returns tensors that
stay on the device; the loop reads them at reports only (one host sync per report, which also
checks that every loss was finite), never per step.

Metrics of re-run steps are not logged twice: the recorder keeps the last step logged (an MLflow
run: its ``orchestrate.logged_step`` tag, sent with the metrics) and, after a resume, the loop skips
what is logged already (the resumed run recomputes exactly the same values).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.data.artifacts import ArtifactRef, fetch, load_array, publish
from orchestrator.core.config import ConfigError
from orchestrator.runtime.job import Job
from orchestrator.records.recorder import NullRecorder, Recorder
from orchestrator.core.rng import capture, load_state, restore, seed_everything
from orchestrator.runtime.session import Session
from orchestrator.data.storage import cache_home

STATE_FILE = "state.pt"


class CheckpointError(ConfigError):
    """A checkpoint that the loop cannot resume from (a file missing: written by an older layout,
    or copied only in part). Raised before anything is trained, so nothing recorded is touched."""


def _checkpoint_file(folder: Path, name: str, origin: str | None) -> Path:
    """``folder/name`` of a checkpoint copied to ``folder`` from ``origin`` (named in the error)."""
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"checkpoint {origin or folder}: no {name} (found: {', '.join(present) or 'nothing'}); a checkpoint of this "
            f"version holds {STATE_FILE} and one rng_rank<N>.pt per rank. It was written by another version "
            "of the tool or copied only in part: delete that checkpoint folder to resume from the one before "
            "it, or start the run again (--restart)")
    return path


@dataclass
class LoopResult:
    metrics: dict[str, Any]
    export: ArtifactRef | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


# -- what the loop builds (cached per process: in-process trials reuse them) ---------------------
@lru_cache(maxsize=4)
def _source_on_cpu(family: str, key: str, path: str):
    from trainers.registry import load_source_model

    return load_source_model(family, path, "cpu")


def load_source(job: Job, device: torch.device):
    """The job's source model on ``device`` (a fresh copy: the method trains it in place)."""
    import copy

    if job.source is not None:
        src = _source_on_cpu(job.family, job.source.digest, str(fetch(job.source)))
    elif job.source_hub_id is not None:
        src = _source_on_cpu(job.family, job.source_hub_id, job.source_hub_id)
    else:
        raise ValueError(f"job {job.name}: no source model")
    src = copy.deepcopy(src)
    return _to_device(src, device)


def _to_device(src, device: torch.device):
    for name in ("unet", "g", "g_ema", "d"):
        module = getattr(src, name, None)
        if isinstance(module, torch.nn.Module):
            setattr(src, name, module.to(device))
    return src


def perf_for(job: Job, device: torch.device, method_cls) -> Any:
    from trainers.perf import DevicePerf

    precision = job.run.precision
    if precision == "auto" and device.type == "cuda":
        precision = getattr(method_cls, "cuda_precision", "bf16")
    return DevicePerf(device, precision=precision, channels_last=job.run.channels_last,
                      compile=job.run.compile, tf32=job.run.tf32)


def method_class(job: Job):
    from trainers.registry import get_method, pretrainer

    return pretrainer(job.family, job.method) if job.kind == "pretrain" else get_method(job.method)


def build_method(job: Job, device: torch.device, seed: int):
    """The job's trainer object (an adaptation method or a source pretrainer) on ``device``."""
    cls = method_class(job)
    cfg = cls.Config.model_validate(job.method_config)
    perf = perf_for(job, device, cls)
    perf.apply_global()
    if job.kind == "pretrain":
        method = cls(cfg, job.resolution, device, seed=seed, perf=perf)
    else:
        method = cls(cfg, load_source(job, device), device, seed=seed, perf=perf)
        method.source_label = job.source.short() if job.source is not None else str(job.source_hub_id)
        if job.previous is not None:  # a later task of a lifelong stream: earlier tasks' state
            method.continue_from(fetch(job.previous))
    return method, perf


@lru_cache(maxsize=4)
def metric_extractors(metrics: tuple[str, ...], encoder: str | None, device: str):
    """The feature networks of ``metrics`` (``available_extractors``), built once per process and arguments."""
    from trainers.metrics import available_extractors

    return available_extractors(list(metrics), encoder, device)


@lru_cache(maxsize=16)  # the built-in domains' and the truth checks of a sequence's tasks
def load_domain_classifier(path: str, device: str):
    """The domain classifier saved at ``path`` on ``device``, loaded once per process and arguments."""
    from trainers.metrics.domain_classifier import DomainClassifier

    return DomainClassifier.load(path, device)


def images_tensor(ref: ArtifactRef) -> torch.Tensor:
    """uint8 [N,3,H,W] (CPU) of a published image array [N,H,W,3]."""
    return torch.from_numpy(np.array(load_array(ref))).permute(0, 3, 1, 2).contiguous()


BASELINE_SAMPLES = 32  # samples of the source's floor at step 0 (Evaluator.baselines)


class Evaluator:
    """Rank 0's periodic and final evaluation: samples from the method, metrics against the task's
    reference set (or the shots), each metric named by its feature network (trainers.metrics)."""

    def __init__(self, job: Job, shots: torch.Tensor, device: torch.device):
        from trainers.metrics import ReferenceStats

        self.job, self.run, self.device = job, job.run, device
        encoder = str(fetch(job.domain_encoder)) if job.domain_encoder is not None else None
        self.extractors = metric_extractors(tuple(self.run.metrics), encoder, str(device))
        self.shots = shots.cpu()
        self.reference = images_tensor(job.reference) if job.reference is not None else self.shots
        self.cache = ReferenceStats()
        self.classifier = None
        if job.domain_classifier is not None and job.target_domain is not None:
            self.classifier = load_domain_classifier(str(fetch(job.domain_classifier)), str(device))
        self.truth = None
        if job.truth_classifier is not None:
            self.truth = load_domain_classifier(str(fetch(job.truth_classifier)), str(device))
        if job.reference_stats is not None:
            from orchestrator.metrics.refstats import preload

            preload(self.cache, fetch(job.reference_stats), self.extractors, self.reference, self.shots)

    def due(self, step: int, last: bool) -> bool:
        return last or self.job.wants_evaluation(step)

    def protocol(self, last: bool) -> tuple[int, int | None]:
        """(samples, sampling steps) of an evaluation: a periodic one, or the final one of record
        (more samples, the same sampler: ``RunSettings``; None steps = the method's own)."""
        run = self.run
        if last:
            return run.final_eval_samples or run.eval_samples, run.final_eval_sample_steps or run.eval_sample_steps
        return run.eval_samples, run.eval_sample_steps

    def __call__(self, method, last: bool) -> dict[str, float]:
        from trainers.metrics import evaluate

        run = self.run
        n, steps = self.protocol(last)
        t0 = time.perf_counter()
        samples = method.sample(n, steps=steps, seed=run.seed + 12345)  # the seed: evaluation_extras's too
        metrics = evaluate(samples, self.reference, self.shots, self.extractors, seed=run.seed,
                           kid_subset_size=min(1000, n, len(self.reference)), cache=self.cache)
        if self.classifier is not None:
            metrics["target_rate_domain"] = self.classifier.rate(samples, self.job.target_domain)
        if self.truth is not None:
            metrics["target_rate"] = self.truth.rate(samples, "target")
        metrics.update(method.evaluation_extras(samples, n, steps, run.seed + 12345, last))
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics

    def baselines(self, method) -> dict[str, float]:
        """Before the first step: the domain classifier's target rate of the real target images
        (its ceiling) and of the untrained model's samples, i.e. the source (its floor); the truth
        classifier's floor on the same samples and its held-out accuracies (orchestrator.metrics.truth).
        A floor is a rate near 0, so it is measured on at most ``BASELINE_SAMPLES`` samples: the
        source's baseline then costs half a periodic evaluation (self_guided samples with
        guidance, two network passes per step)."""
        if self.classifier is None and self.truth is None:
            return {}
        n, steps = self.protocol(False)
        samples = method.sample(min(n, BASELINE_SAMPLES), steps=steps, seed=self.run.seed + 12345)
        out: dict[str, float] = {}
        if self.classifier is not None:
            out.update(target_rate_domain_reference=self.classifier.rate(self.reference, self.job.target_domain),
                       target_rate_domain_source=self.classifier.rate(samples, self.job.target_domain))
        if self.truth is not None:
            from orchestrator.metrics.truth import truth_metrics

            out.update(target_rate_source=self.truth.rate(samples, "target"), **truth_metrics(self.truth.train_info))
        return out

    def earlier_tasks(self, method) -> dict[str, float]:
        """Row k of the lifelong matrices: the model after task k on every task j <= k, sampled
        with task j's own state (``sample_task``; one generator for shared-weight methods)."""
        from trainers.metrics import evaluate

        run, out = self.run, {}
        n, steps = self.protocol(True)
        for spec in self.job.lifelong_eval:
            shots = images_tensor(spec.shots)
            ref = images_tensor(spec.reference) if spec.reference is not None else shots
            samples = method.sample_task(spec.task_id, n, steps=steps, seed=run.seed + 12345)
            metrics = evaluate(samples, ref, shots, self.extractors, seed=run.seed,
                               kid_subset_size=min(1000, n, len(ref)), cache=self.cache)
            if self.classifier is not None and spec.target_domain is not None:
                metrics["target_rate_domain"] = self.classifier.rate(samples, spec.target_domain)
            if spec.truth_classifier is not None:  # task j's own truth check
                truth = load_domain_classifier(str(fetch(spec.truth_classifier)), str(self.device))
                metrics["target_rate"] = truth.rate(samples, "target")
            out.update({f"r_{k}_task{spec.index}": v for k, v in metrics.items() if not k.startswith("num_")})
        return out


class _ReportLogFilter(logging.Filter):
    """Ray Train logs "Reporting training result ..." (every metric of every report) at INFO;
    our own progress line says the same in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith("Reporting training result"))


def _quiet_ray_train_logs() -> None:
    flt = _ReportLogFilter()
    for logger in [logging.getLogger(), *[lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger)]]:
        for handler in logger.handlers:
            if not any(isinstance(f, _ReportLogFilter) for f in handler.filters):
                handler.addFilter(flt)


class _Phases:
    """Wall seconds per phase of a run (what the final report and MLflow record as
    ``time_<phase>_s``): where the time of a short few-shot trial goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": v for k, v in self.seconds.items()}


class _Window:
    """Loss terms of the steps since the last report, kept on the device until the report."""

    def __init__(self) -> None:
        self.terms: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.steps: list[int] = []
        self.t0 = time.perf_counter()
        self.excluded = 0.0  # seconds of grids and evaluations inside the window

    def add(self, step: int, out: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        for k, v in out.items():
            v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.terms.setdefault(k, []).append((step, v.float().reshape(())))

    def read(self) -> dict[str, tuple[list[int], np.ndarray]]:
        """{key: (steps, values)} — one host sync for all of them."""
        if not self.terms:
            return {}
        keys = sorted(self.terms)
        flat = torch.cat([torch.stack([v.to(self.terms[keys[0]][0][1].device) for _, v in self.terms[k]])
                          for k in keys]).cpu().numpy()
        out, i = {}, 0
        for k in keys:
            n = len(self.terms[k])
            out[k] = ([s for s, _ in self.terms[k]], flat[i:i + n])
            i += n
        return out


def run_loop(job: Job, session: Session, recorder: Recorder | None = None) -> LoopResult:
    """Train ``job`` to ``job.run.steps``, resuming from the session's newest checkpoint, recording
    through ``recorder`` (default: nothing; a job that names an MLflow run needs its recorder,
    ``orchestrator.runtime.worker.recorder_for``)."""
    if recorder is None:
        if job.run_id is not None and session.rank == 0:
            raise ValueError(f"job {job.name} records to MLflow run {job.run_id}: pass its recorder "
                             "(orchestrator.runtime.worker.run does)")
        recorder = NullRecorder()
    from trainers.common import random_batch
    from trainers.base import PrepareContext

    _quiet_ray_train_logs()
    phases = _Phases()
    rank, world = session.rank, session.world_size
    run = job.run
    device = session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(run.cpus_per_worker or 1)))
    seed = int(run.seed) + 1000 * rank
    seed_everything(seed)

    with phases("build"):  # fetch the source, build the method
        method, perf = build_method(job, device, seed)
    with phases("data"):
        cpu_images = images_tensor(job.data)
        images = cpu_images.to(device)
    if world > 1:
        import ray.train.torch

        method.parallelize(lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    perf.prepare(method.networks())
    batch_gen = torch.Generator(device=device).manual_seed(seed + 7)

    start = 0
    with phases("restore"), session.latest_checkpoint() as folder:
        if folder is not None:
            origin = session.checkpoint_origin
            state_file = _checkpoint_file(folder, STATE_FILE, origin)
            rng_file = _checkpoint_file(folder, f"rng_rank{rank}.pt", origin)
            method.load_state_dict(load_state(state_file)["method"])
            restore(load_state(rng_file), method, batch_gen)
            start = int(method.step)
    with phases("prepare"):
        encoder_path = fetch(job.domain_encoder) if job.domain_encoder is not None else None
        method.prepare(images, PrepareContext(domain_encoder=encoder_path, cache_dir=cache_home() / "annotations"))

    rec = recorder if rank == 0 else NullRecorder()
    log = rec.active
    logged_through = rec.logged_through() if log else -1

    def grid(step: int, sampling_steps: int) -> None:
        with phases("grids"):
            samples = method.sample(run.grid_size, steps=sampling_steps, seed=run.seed)
            rec.log_grid(samples.numpy(), f"samples/step_{step:06d}.png", step=step)

    with phases("mlflow"):
        if log:  # where this attempt runs, and what it resumed from (a restart after a fault, a resume)
            tags = {"orchestrate.node_id": session.node_id}
            if start > 0:
                tags["orchestrate.restored_from_step"] = str(start)
            rec.set_tags(tags)
        if log and start == 0:
            rec.log_params({"trainable_parameters": str(method.trainable_parameters()),
                            "world_size": str(world), "device": str(device),
                            "precision": str(perf.amp_dtype or "fp32"), "node_id": session.node_id})
    if log and start == 0 and logged_through < 0:
        grid(0, run.grid_sample_steps)

    with phases("metric_networks"):  # the feature networks and the reference set's statistics
        evaluator = Evaluator(job, cpu_images, device) if rank == 0 and job.kind == "adapt" else None
    if evaluator is not None and log and start == 0 and logged_through < 0:
        with phases("eval"):
            baselines = evaluator.baselines(method)
        if baselines:
            with phases("mlflow"):
                rec.add_metrics(baselines, 0)
                rec.flush()
    last_eval: dict[str, float] = {}
    steps, every = run.steps, run.report_every
    batch_size, hflip = method.config.batch_size, method.config.hflip
    window = _Window()
    reports: list[dict[str, Any]] = []
    export: ArtifactRef | None = None
    for step in range(start, steps):
        if method.wants_index:
            batch, index = random_batch(images, batch_size, batch_gen, hflip=hflip, return_index=True)
            out = method.train_step(perf.batch(batch), index=index)
        else:
            out = method.train_step(perf.batch(random_batch(images, batch_size, batch_gen, hflip=hflip)))
        window.add(step + 1, out)
        last = step + 1 == steps
        if log and ((step + 1) % run.sample_every == 0 or last) and step + 1 > logged_through:
            t = time.perf_counter()
            grid(step + 1, run.grid_sample_steps)
            window.excluded += time.perf_counter() - t
        if (step + 1) % every and not last:
            continue

        # -- a report: read the window (the one host sync), evaluate, checkpoint -----------------
        values = window.read()
        seconds = max(time.perf_counter() - window.t0 - window.excluded, 1e-9)
        phases.add("train", seconds)
        bad = {k: at[int(np.argmax(~np.isfinite(v)))] for k, (at, v) in values.items() if not np.isfinite(v).all()}
        if bad:
            raise FloatingPointError("non-finite training metrics: " +
                                     ", ".join(f"{k} at step {s}" for k, s in sorted(bad.items())))
        n_steps = len(window.steps)
        report: dict[str, Any] = {k: float(v.mean()) for k, (_, v) in values.items()}
        report.update(step=step + 1, steps_per_s=n_steps / seconds,
                      images_per_s=n_steps * batch_size * world / seconds)
        if log:
            for k, (at, v) in values.items():
                for s, x in zip(at, v):
                    if s > logged_through:
                        rec.add_metrics({k: float(x)}, s)
        if evaluator is not None and evaluator.due(step + 1, last):
            with phases("eval"):
                last_eval = evaluator(method, last)
            if log and step + 1 > logged_through:
                rec.add_metrics(last_eval, step + 1)
        report.update(last_eval)  # between evaluations, the last values (schedulers need them)
        if log and step + 1 > logged_through:
            rec.add_metrics({"steps_per_s": report["steps_per_s"], "images_per_s": report["images_per_s"]}, step + 1)
        if last and rank == 0:
            # Before the final report: a scheduler may stop the trial as soon as it sees it.
            with phases("export"):
                export = finish(job, method, rec)
            report["export"] = export.model_dump_json()
            if job.lifelong_eval:
                with phases("eval"):
                    rows = evaluator.earlier_tasks(method)
                report.update(rows)
                if log:
                    rec.add_metrics(rows, step + 1)
            report["trainable_parameters"] = float(method.trainable_parameters())
            report.update(phases.metrics())
            if log:
                rec.add_metrics(phases.metrics(), step + 1)
        with phases("mlflow"):
            if log:
                rec.flush(max(step + 1, logged_through))  # metrics and how far they go, together
        reports.append(report)
        with phases("checkpoint" if job.wants_checkpoint(step + 1) else "report"), \
                tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if job.wants_checkpoint(step + 1):
                checkpoint = Path(tmp)
                if rank == 0:
                    torch.save({"method": method.state_dict(), "step": step + 1}, checkpoint / STATE_FILE)
                rng = capture(method, batch_gen)
                if last:  # every rank's weights at the end: data-parallel ranks must agree
                    rng["weights_sha256"] = weights_digest(method)
                torch.save(rng, checkpoint / f"rng_rank{rank}.pt")
            session.report(report, checkpoint)
        window = _Window()
    return LoopResult(reports[-1] if reports else {}, export, reports)


def weights_digest(method) -> str:
    """sha256 of every trained network's parameters (what data-parallel ranks must share)."""
    import hashlib

    h = hashlib.sha256()
    for name, module in sorted(method.networks().items()):
        for pname, p in module.state_dict().items():
            h.update(f"{name}.{pname}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                     if p.dtype != torch.bool else p.cpu().numpy().tobytes())
    return h.hexdigest()


def finish(job: Job, method, recorder: Recorder) -> ArtifactRef:
    """Rank 0, after the last step: export the generator to the run storage (content-keyed, so
    the driver and any later task can fetch it on any node), the final grid, the model artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = method.export(Path(tmp) / "model")
        if job.kind == "adapt":  # an adapted generator is also an MLflow model (registrable)
            from orchestrator.records.mlflow_model import write_mlmodel

            write_mlmodel(folder)
        ref = publish(folder, job.storage)
        if recorder.active:
            samples = method.sample(job.run.grid_size, seed=job.run.seed)
            recorder.log_grid(samples.numpy(), "samples/final.png")
            recorder.log_model(folder, ref.model_dump_json())
    return ref
