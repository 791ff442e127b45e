"""Source models and the domain encoder, resolved once by the driver into content-keyed artifacts.

A task's ``source.model`` is one of:

* ``builtin`` — the small sources this repository ships for the built-in synthetic domains
  (``trainers/builtin``: trained by ``orchestrate pretrain``, recipe beside them);
* ``pretrained`` — the project's own source, trained from ``source.pretrain`` once: looked up in
  this node's cache, then under its pretraining key in the run storage (``named/sources/<key>``,
  so another machine sharing the storage finds it), and only then pretrained (a Ray Train run on
  any node; its export comes back through the storage);
* a diffusers folder, a ``.pt`` checkpoint or a StyleGAN2 checkpoint on the driver's disk;
* a Hugging Face Hub id already in every node's local HF cache.

Whatever the driver has on its disk is published to the run storage; jobs carry the artifact ref
(``orchestrator.data.artifacts``), so every trial of a sweep trains from the very same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.data.artifacts import ArtifactRef, fetch, lookup, point, publish, publish_array
from orchestrator.core.config import InputError, RunSettings, TaskConfig
from orchestrator.runtime.launch import LaunchResult, run_job
from orchestrator.data.storage import data_cache_dir, sources_dir, storage_uri
from trainers.registry import pretrainer, source_ready

if TYPE_CHECKING:
    from orchestrator.runtime.job import Job


@dataclass
class ResolvedSource:
    ref: ArtifactRef | None
    hub_id: str | None
    local: Path | None  # a copy on the driver's node, for checks

    def describe(self) -> str:
        return self.hub_id or (self.ref.short() if self.ref else "?")


# Fields of the pretrain block that only the domain encoder reads (see ``encoder_path``).
ENCODER_ONLY = frozenset({"encoder_steps", "encoder_data"})


def pretrain_key(task: TaskConfig) -> str:
    """The cache and run name of a task's own source model: a hash of what decides the generator's
    training. Not the encoder's fields (a new encoder setting must not retrain the source), and
    not optional fields left unset (None, empty): a field added later that is unset by default
    keeps every existing key, so sources (and half-finished pretraining runs) stay found."""
    spec, family = task.source.pretrain, task.source.family
    fields = {k: v for k, v in spec.model_dump(mode="json").items()
              if k not in ENCODER_ONLY and v not in (None, [], {})}
    blob = json.dumps({"family": family, "resolution": task.resolution, **fields}, sort_keys=True)
    return f"{family}-{task.resolution}px-{spec.preset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


RECIPE_FILE = "recipe.json"


def write_recipe(task: TaskConfig, folder: Path, task_file: str) -> dict:
    """``recipe.json`` beside an exported source: the pretraining key and block that made it and
    the command that makes it again, so a shipped or shared source says where it came from (and a
    test can check that the recipe file in the repository still names these weights)."""
    record = {"pretrain_key": pretrain_key(task), "family": task.source.family, "resolution": task.resolution,
              "pretrain": task.source.pretrain.model_dump(mode="json"),
              "command": f"orchestrate pretrain {task.source.family} --task {task_file} --export {folder}"}
    (Path(folder) / RECIPE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def cached_source_path(task: TaskConfig) -> Path:
    return sources_dir() / pretrain_key(task)


def is_ready(task: TaskConfig, folder: Path) -> bool:
    return source_ready(task.source.family, folder)


def pretrain_source(task: TaskConfig, *, tracking_uri: str | None = None, storage: str | None = None,
                    force: bool = False, run: RunSettings | None = None,
                    lease: bool = True) -> tuple[ArtifactRef, LaunchResult | None]:
    """The task's own source model (DDPM or StyleGAN2, pretrained on its source domain), as an
    artifact in the run storage: from this node's cache, from the storage, or trained now (a Ray
    Train run recorded in the MLflow experiment ``pretrain-<family>``)."""
    spec, family = task.source.pretrain, task.source.family
    storage = storage_uri(storage)
    key = pretrain_key(task)
    folder = cached_source_path(task)
    if not force:
        if is_ready(task, folder):
            ref = publish(folder, storage)
            point(storage, f"sources/{key}", ref)
            return ref, None
        ref = lookup(storage, f"sources/{key}")
        if ref is not None:
            enter_local(fetch(ref), folder)
            return ref, None
    print(f"[orchestrate] pretraining the {family} source model {key} on {spec.data} ({spec.steps} steps); "
          f"kept in the run storage and in {folder} for later runs", flush=True)
    job = pretrain_job(task, storage, run=run)
    params = {f"pretrain.{k}": str(v) for k, v in spec.model_dump(mode="json").items()}
    params.update(resolution=str(task.resolution), family=family)
    result = run_job(job, experiment=f"pretrain-{family}", tracking_uri=tracking_uri, params=params,
                     tags={"orchestrate.kind": "pretrain"}, restart=force, lease=lease)
    if result.export is None:
        raise RuntimeError(f"pretraining {key} finished but recorded no exported model")
    point(storage, f"sources/{key}", result.export)
    enter_local(fetch(result.export), folder)
    return result.export, result


def pretrain_job(task: TaskConfig, storage: str, *, run: RunSettings | None = None, name: str | None = None,
                 encoder: Path | None = None) -> "Job":
    """The job that pretrains ``task``'s source from ``task.source.pretrain``: its pretrainer with the
    spec's preset, batch size and lr (unset: the pretrainer's own), the spec's images published to
    ``storage``, and the domain encoder when the pretrainer uses one (``encoder``, else the task's,
    trained now when missing). ``run`` defaults to the spec's steps and seed; ``name`` to the
    pretraining key. The CLI's ``pretrain``, the tests and the benchmarks all start here."""
    from orchestrator.runtime.job import Job
    from trainers.data import load_images

    spec, family = task.source.pretrain, task.source.family
    cls = pretrainer(family, spec.pretrainer)
    settings = {"preset": spec.preset, "batch_size": spec.batch_size}
    if spec.lr is not None:
        settings["lr"] = spec.lr
    run = run or RunSettings(steps=spec.steps, report_every=max(1, min(250, spec.steps)),
                             sample_every=max(1, min(500, spec.steps)), seed=spec.seed)
    images = load_images(spec.data, task.resolution, count=spec.count, seed=spec.seed, cache_dir=data_cache_dir())
    domain_encoder = None
    if cls.uses_domain_encoder:
        domain_encoder = publish(encoder or domain_encoder_for(task), storage)
    return Job(kind="pretrain", name=name or pretrain_key(task), method=cls.key, family=family,
               resolution=task.resolution, method_config=cls.Config(**settings).model_dump(mode="json"), run=run,
               storage=storage, data=publish_array(images, storage), domain_encoder=domain_encoder)


def enter_local(src: Path, folder: Path) -> None:
    """A copy of a fetched source under its pretraining key in this node's cache."""
    if folder.exists():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        tmp.mkdir(parents=True)
        shutil.copy2(src, tmp / src.name)
    tmp.replace(folder)


def _is_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not Path(spec).exists()


def locate_source(task: TaskConfig) -> tuple[Path | None, str | None]:
    """(path on this node, Hub id) of a source that needs no pretraining: ``builtin``, a path, or
    a Hub id; ``InputError`` when it is none of them."""
    model = task.source.model
    if model == "builtin" or model.startswith("builtin:"):
        from trainers.builtin import builtin_source
        from trainers.common import SourceModelError

        try:
            return builtin_source(task.source.family, task.resolution, model), None
        except SourceModelError as exc:
            raise InputError(str(exc)) from None
    path = Path(model).expanduser()
    if path.exists():
        return path, None
    if _is_hub_id(model):
        return None, model
    raise InputError(f"source.model: {model} does not exist (expected 'builtin', 'pretrained', a diffusers "
                     "folder, a .pt checkpoint, a StyleGAN2 checkpoint, or a Hub id in the local cache)")


def resolve_source(task: TaskConfig, *, tracking_uri: str | None = None, storage: str | None = None,
                   lease: bool = True) -> ResolvedSource:
    """The task's source model as an artifact (or a Hub id), pretraining it first when needed."""
    storage = storage_uri(storage)
    if task.source.model == "pretrained":
        ref, _ = pretrain_source(task, tracking_uri=tracking_uri, storage=storage, lease=lease)
        return ResolvedSource(ref, None, fetch(ref))
    path, hub_id = locate_source(task)
    if path is not None:
        return ResolvedSource(publish(path, storage), None, path)
    return ResolvedSource(None, hub_id, None)


def encoder_path(task: TaskConfig) -> Path:
    spec = task.source.pretrain
    key = {"data": spec.data, "count": spec.count, "seed": spec.seed, "steps": spec.encoder_steps,
           "resolution": task.resolution}
    if spec.encoder_data:
        key["extra"] = sorted(spec.encoder_data)
    blob = json.dumps(key, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return sources_dir() / f"encoder-{task.resolution}px-{key}" / "domain_encoder.pt"


def domain_encoder_for(task: TaskConfig) -> Path:
    """The domain encoder of the task's source domain (on this node): the shipped one of the
    built-in synthetic domains, else trained once, self-supervised (SimCLR), on the images of
    ``source.pretrain.data`` and cached beside the source models. Metrics named ``*_domain`` are
    computed in its feature space."""
    from trainers.builtin import builtin_encoder

    shipped = builtin_encoder(task) if not task.source.pretrain.encoder_data else None
    if shipped is not None:
        return shipped
    path = encoder_path(task)
    if path.is_file():
        return path
    print(f"[orchestrate] training the domain encoder of {task.source.pretrain.data} "
          f"({task.source.pretrain.encoder_steps} SimCLR steps); cached in {path.parent}", flush=True)
    import torch

    from trainers.data import load_images
    from trainers.metrics import train_domain_encoder

    import numpy as np

    spec = task.source.pretrain
    images = load_images(spec.data, task.resolution, count=min(spec.count, 2048), seed=spec.seed,
                         cache_dir=data_cache_dir())
    if spec.encoder_data:  # as many images from each extra set as it has (at most as many as the source)
        extra = [load_images(uri, task.resolution, count=min(spec.count, 2048), seed=spec.seed,
                             cache_dir=data_cache_dir()) for uri in spec.encoder_data]
        images = np.concatenate([images, *extra])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = train_domain_encoder(images, steps=spec.encoder_steps, batch_size=128, device=device,
                                   seed=spec.seed, resolution=task.resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    encoder.save(tmp)
    tmp.replace(path)
    return path
