"""What a run needs, checked in the driver and turned into artifacts before any worker starts.

``check_data`` and ``check_source`` run *before Ray starts*: a missing folder, too few or corrupt
images, a missing Parquet column, a source model that does not exist, belongs to the other family,
does not fit the method, or has another resolution than the task — each fails in one line naming
the key, the value and what was expected.

``prepare`` then publishes what the workers need to the run storage (decoded shots and reference
set, the source model, the domain encoder, optionally the reference statistics) and ``make_job``
puts the refs into a :class:`~orchestrator.runtime.job.Job`. A sweep prepares once and hands the same
refs to every trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.artifacts import ArtifactRef, fetch, publish, publish_array, publish_bytes
from orchestrator.core.config import InputError, ResolvedConfig, TaskConfig
from orchestrator.runtime.job import EvalTask, Job
from orchestrator.runs.sources import ResolvedSource, domain_encoder_for, resolve_source
from orchestrator.data.storage import data_cache_dir


@dataclass
class Inputs:
    source: ResolvedSource
    data: ArtifactRef
    reference: ArtifactRef | None
    domain_encoder: ArtifactRef | None
    reference_stats: ArtifactRef | None = None
    domain_classifier: ArtifactRef | None = None
    target_domain: str | None = None
    truth_classifier: ArtifactRef | None = None


def synthetic_domain(uri: str) -> str | None:
    """``sketch`` for ``synthetic:sketch``; None for any other data."""
    return uri.split(":", 1)[1] if uri.startswith("synthetic:") else None


def classifier_for(task: TaskConfig, storage: str) -> tuple[ArtifactRef | None, str | None]:
    """The shipped domain classifier and the task's target domain, when the task's target is a
    built-in synthetic domain at a resolution the classifier was shipped for."""
    from trainers.builtin import builtin_classifier

    domain = synthetic_domain(task.target.data)
    path = builtin_classifier(task.resolution) if domain is not None else None
    if path is None:
        return None, None
    return publish(path, storage), domain


def load_set(spec, count: int | None, seed: int, resolution: int) -> np.ndarray:
    from trainers.data import load_images

    return load_images(spec.data, resolution, count=count, seed=seed, image_column=spec.image_column,
                       cache_dir=data_cache_dir(), storage_options=spec.storage_options)


def check_data(task: TaskConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode (and cache) the shots and the reference set; ``DataError`` names the file or key."""
    t, ref = task.target, task.reference
    shots = load_set(t, t.shots, t.seed, task.resolution)
    if len(shots) < t.shots:
        raise InputError(f"target.data {t.data}: {len(shots)} decodable image(s), the task asks for "
                         f"target.shots = {t.shots}")
    reference = load_set(ref, ref.count, ref.seed, task.resolution) if ref is not None else None
    if reference is not None and len(reference) < 2:
        raise InputError(f"reference.data {ref.data}: {len(reference)} image(s); metrics need at least 2")
    return shots, reference


def check_metric_networks(cfg: ResolvedConfig) -> None:
    check_metric_names(cfg.run.metrics)


def check_metric_names(metrics: list[str]) -> None:
    """The weights of every feature network but the domain encoder are on disk (the encoder is
    resolved per task)."""
    from trainers.metrics import available_extractors

    others = [m for m in metrics if m != "domain"]
    if others:
        available_extractors(others)  # raises MissingWeightsError naming the files


def check_source(cfg: ResolvedConfig, path: Path | str | None, hub_id: str | None = None) -> None:
    """The source exists, belongs to the method's family, has the task's resolution and fits the
    method's settings (the method is built once on the CPU, which runs its own checks)."""
    from trainers.common import SourceModelError
    from trainers.gan.source import is_gan_source
    from trainers.registry import get_method, load_source_model

    family = cfg.task.source.family
    spec = str(path) if path is not None else hub_id
    where = f"source.model {cfg.task.source.model}"
    if path is not None:
        is_gan = is_gan_source(path)
        if family == "ddpm" and is_gan:
            raise InputError(f"{where}: a StyleGAN2 checkpoint, but {cfg.method} adapts DDPM sources "
                             "(wrong family: use a GAN method, or a diffusers folder / .pt UNet checkpoint)")
        if family == "stylegan2" and not is_gan and (Path(path) / "unet").exists():
            raise InputError(f"{where}: a diffusers DDPM folder, but {cfg.method} adapts StyleGAN2 sources "
                             "(wrong family: use a diffusion method, or a rosinality-format checkpoint)")
    try:
        source = load_source_model(family, spec, "cpu")
    except SourceModelError as exc:
        raise InputError(f"{where}: {exc}") from None
    if source.resolution != cfg.task.resolution:
        raise InputError(f"{where}: the source makes {source.resolution}px images, the task is at resolution "
                         f"{cfg.task.resolution}px; set the task's resolution: {source.resolution}, or "
                         "source.resize_to_source: true to resize the task's images to the source's")
    cls = get_method(cfg.method)
    try:
        cls(cls.Config.model_validate(cfg.method_config), source, "cpu", seed=0)
    except (ValueError, TypeError, SourceModelError) as exc:
        raise InputError(f"{where} with method {cfg.method}: {exc}") from None


def source_resolution(cfg: ResolvedConfig, path: Path | None, hub_id: str | None) -> int:
    from trainers.registry import load_source_model

    return load_source_model(cfg.task.source.family, str(path) if path is not None else hub_id, "cpu").resolution


def prepare(cfg: ResolvedConfig, *, storage: str, tracking_uri: str | None = None,
            source: ResolvedSource | None = None, encoder: ArtifactRef | None = None,
            stats: bool = False, lease: bool = True) -> Inputs:
    """Publish what the run's workers need (see the module docstring)."""
    task = cfg.task
    shots, reference = check_data(task)
    check_metric_networks(cfg)
    from trainers.registry import get_method

    if encoder is None and ("domain" in cfg.run.metrics or get_method(cfg.method).uses_domain_encoder):
        encoder = publish(domain_encoder_for(task), storage)
    if source is None:
        source = resolve_source(task, tracking_uri=tracking_uri, storage=storage, lease=lease)
        check_source(cfg, source.local, source.hub_id)
    from orchestrator.metrics.truth import truth_classifier

    classifier, domain = classifier_for(task, storage)
    data = publish_array(shots, storage)
    ref = publish_array(reference, storage) if reference is not None else None
    inputs = Inputs(source=source, data=data, reference=ref, domain_encoder=encoder, domain_classifier=classifier,
                    target_domain=domain,
                    truth_classifier=truth_classifier(cfg, data=data, reference=ref, source=source.ref,
                                                      storage=storage))
    if stats:
        inputs.reference_stats = reference_stats(cfg, inputs, storage)
    return inputs


def reference_stats(cfg: ResolvedConfig, inputs: Inputs, storage: str) -> ArtifactRef:
    """Features and statistics of the reference set and the shots under the run's feature
    networks, computed here once (``orchestrator.metrics.refstats``)."""
    import io

    import torch

    from orchestrator.metrics import refstats
    from orchestrator.runtime.loop import images_tensor, metric_extractors

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = str(fetch(inputs.domain_encoder)) if inputs.domain_encoder is not None else None
    extractors = metric_extractors(tuple(cfg.run.metrics), encoder, device)
    shots = images_tensor(inputs.data)
    ref = images_tensor(inputs.reference) if inputs.reference is not None else shots
    buf = io.BytesIO()
    torch.save(refstats.compute(extractors, ref, shots), buf)
    return publish_bytes(buf.getvalue(), storage, "reference_stats.pt")


def make_job(cfg: ResolvedConfig, inputs: Inputs, *, name: str, storage: str,
             previous: ArtifactRef | None = None, lifelong_eval: list[EvalTask] | None = None,
             checkpoint_at: list[int] | None = None, eval_at: list[int] | None = None,
             run_overrides: dict[str, Any] | None = None) -> Job:
    run = cfg.run.model_copy(update=run_overrides or {})
    return Job(kind="adapt", name=name, method=cfg.method, family=cfg.task.source.family,
               resolution=cfg.task.resolution, method_config=cfg.method_config, run=run, storage=storage,
               data=inputs.data, reference=inputs.reference, source=inputs.source.ref,
               source_hub_id=inputs.source.hub_id, domain_encoder=inputs.domain_encoder,
               domain_classifier=inputs.domain_classifier, target_domain=inputs.target_domain,
               truth_classifier=inputs.truth_classifier,
               reference_stats=inputs.reference_stats, previous=previous,
               lifelong_eval=lifelong_eval or [], checkpoint_at=checkpoint_at, eval_at=eval_at)


def data_sources(cfg: ResolvedConfig) -> dict[str, str]:
    """Where a run's inputs came from, as the task names them (for ``log_job_inputs``)."""
    t = cfg.task
    out = {"shots": t.target.data, "source": t.source.model}
    if t.reference is not None:
        out["reference"] = t.reference.data
    return out
