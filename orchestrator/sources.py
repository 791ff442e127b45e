"""Source models: the project's own pretrained DDPM is trained once per pretrain spec and cached;
any other source (diffusers folder, .pt, Hub id on disk) is used as given."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from orchestrator.config import RunSettings, TaskConfig
from orchestrator.launch import LaunchResult, run_job
from orchestrator.storage import data_cache_dir, sources_dir
from trainers.registry import pretrainer, source_ready


def pretrain_key(task: TaskConfig) -> str:
    spec, family = task.source.pretrain, task.source.family
    blob = json.dumps({"family": family, "resolution": task.resolution, **spec.model_dump(mode="json")},
                      sort_keys=True)
    return f"{family}-{task.resolution}px-{spec.preset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def cached_source_path(task: TaskConfig) -> Path:
    return sources_dir() / pretrain_key(task)


def is_ready(task: TaskConfig, folder: Path) -> bool:
    return source_ready(task.source.family, folder)


def pretrain_source(task: TaskConfig, *, tracking_uri: str | None = None, storage: str | None = None,
                    force: bool = False, run: RunSettings | None = None) -> tuple[Path, LaunchResult | None]:
    """Pretrain the task's source model (DDPM or StyleGAN2) on its source domain unless it is
    cached already. The pretraining is a Ray Train run recorded in the MLflow experiment
    ``pretrain-<family>``."""
    spec, family = task.source.pretrain, task.source.family
    folder = cached_source_path(task)
    if is_ready(task, folder) and not force:
        return folder, None
    settings = {"preset": spec.preset, "batch_size": spec.batch_size}
    if spec.lr is not None:
        settings["lr"] = spec.lr
    method_config = pretrainer(family).Config(**settings)
    run = run or RunSettings(steps=spec.steps, report_every=max(1, min(250, spec.steps)),
                             sample_every=max(1, min(500, spec.steps)), seed=spec.seed)
    name = folder.name
    print(f"[orchestrate] pretraining the {family} source model {name} on {spec.data} "
          f"({spec.steps} steps); it is cached in {folder} for later runs", flush=True)
    job = {
        "kind": "pretrain", "family": family, "method": pretrainer(family).key, "resolution": task.resolution,
        "method_config": method_config.model_dump(mode="json"), "run": run.model_dump(),
        "data": {"uri": spec.data, "count": spec.count, "seed": spec.seed},
        "cache_dir": str(data_cache_dir()), "export_dir": str(folder),
    }
    params = {f"pretrain.{k}": str(v) for k, v in spec.model_dump(mode="json").items()}
    params.update(resolution=str(task.resolution), family=family)
    result = run_job(job, name=name, experiment=f"pretrain-{family}", tracking_uri=tracking_uri, storage=storage,
                     params=params, tags={"orchestrate.kind": "pretrain"}, restart=force)
    if not is_ready(task, folder):
        # On a cluster the worker exported to its own node's disk: fetch the model artifact that
        # it logged to MLflow instead.
        _fetch_model_artifact(result, folder)
    if not is_ready(task, folder):
        raise RuntimeError(f"pretraining {name} finished but no model reached {folder}")
    return folder, result


def _fetch_model_artifact(result: LaunchResult, folder: Path) -> None:
    import shutil
    import tempfile

    from orchestrator import tracking

    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        local = tracking.client(result.tracking_uri).download_artifacts(result.run_id, "model", tmp)
        if folder.exists():
            shutil.rmtree(folder)
        Path(local).replace(folder)


def encoder_path(task: TaskConfig) -> Path:
    spec = task.source.pretrain
    blob = json.dumps({"data": spec.data, "count": spec.count, "seed": spec.seed, "steps": spec.encoder_steps,
                       "resolution": task.resolution}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return sources_dir() / f"encoder-{task.resolution}px-{key}" / "domain_encoder.pt"


def domain_encoder_for(task: TaskConfig) -> Path:
    """The domain encoder of the task's source domain: trained once, self-supervised (SimCLR), on
    the source-domain images of ``source.pretrain.data`` and cached beside the source models.
    Metrics named ``*_domain`` are computed in its feature space."""
    path = encoder_path(task)
    if path.is_file():
        return path
    print(f"[orchestrate] training the domain encoder of {task.source.pretrain.data} "
          f"({task.source.pretrain.encoder_steps} SimCLR steps); cached in {path.parent}", flush=True)
    import torch

    from trainers.data import load_images
    from trainers.metrics import train_domain_encoder

    spec = task.source.pretrain
    images = load_images(spec.data, task.resolution, count=min(spec.count, 2048), seed=spec.seed,
                         cache_dir=data_cache_dir())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = train_domain_encoder(images, steps=spec.encoder_steps, batch_size=128, device=device,
                                   seed=spec.seed, resolution=task.resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    encoder.save(tmp)
    tmp.replace(path)
    return path


def source_for(task: TaskConfig, **kwargs) -> str:
    """The path (or id) of the task's source model, pretraining it first when needed."""
    if task.source.model != "pretrained":
        return task.source.model
    folder, _ = pretrain_source(task, **kwargs)
    return str(folder)
