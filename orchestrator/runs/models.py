"""Which model a command means: ``MODEL`` of ``orchestrate sample`` and ``orchestrate evaluate``.

A model is named by any of:

* a path on this machine: an adapted run's exported folder, a diffusers DDPM or UNet folder, a
  ``.pt`` UNet checkpoint, a StyleGAN2 checkpoint (file or folder), an LFS-GAN export;
* a run's name or MLflow run id (any experiment of the tracking store): its exported model, from
  the run storage (the ``orchestrate.export`` tag) or, when that storage is out of reach, from the
  run's ``model/`` artifact in MLflow;
* ``models:/NAME/VERSION`` (or ``models:/NAME@ALIAS``): a version in MLflow's model registry.

Everything is decided in the driver before Ray starts; the model is then published to the run
storage (content-keyed, ``orchestrator.data.artifacts``) so that workers on any node fetch the same
bytes, and its digest keys a sampling job's manifest.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data.artifacts import ArtifactRef, digest_of_manifest, fetch, manifest_of, publish
from orchestrator.core.config import InputError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ResolvedModel:
    spec: str  # what the user typed
    local: Path  # a copy on this machine (the driver's)
    digest: str  # sha256 over the model's files (ArtifactRef digest)
    run_id: str | None = None  # the MLflow run that made it, when known
    run_name: str | None = None
    method: str | None = None
    task: str | None = None
    ref: ArtifactRef | None = None  # set by ``publish_model``

    def short(self) -> str:
        return f"{self.run_name or self.local.name}@{self.digest[:12]}"


def _local(spec: str, path: Path, **known) -> ResolvedModel:
    from trainers.common import SourceModelError
    from trainers.generate import model_kind

    try:
        model_kind(path)
    except SourceModelError as exc:
        raise InputError(f"MODEL {spec}: {exc}") from None
    return ResolvedModel(spec, path, digest_of_manifest(manifest_of(path)), **known)


def resolve_model(spec: str, tracking_uri: str | None = None) -> ResolvedModel:
    """The model ``spec`` names (see the module docstring); ``InputError`` in one line when none."""
    path = Path(spec).expanduser()
    if path.exists():
        return _local(spec, path.resolve())
    if spec.startswith("models:/"):
        return _registered(spec, tracking_uri)
    from orchestrator.records import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    run = find_run(spec, uri)
    if run is None:
        raise InputError(f"MODEL {spec}: not a model folder or file on this machine, and no run of that name "
                         f"or id in the MLflow store {uri} (see `orchestrate runs`)")
    tags = run.data.tags
    known = dict(run_id=run.info.run_id, run_name=tags.get(tracking.TAG_NAME) or run.info.run_name,
                 method=tags.get(tracking.TAG_METHOD), task=tags.get(tracking.TAG_TASK))
    raw = tags.get(tracking.TAG_EXPORT)
    if raw:
        ref = ArtifactRef.model_validate_json(raw)
        try:
            model = _local(spec, fetch(ref), **known)
            model.ref = ref
            return model
        except Exception:  # the run storage is out of reach from here: MLflow's copy below
            pass
    if run.info.status != "FINISHED" and not raw:
        raise InputError(f"MODEL {spec}: run {run.info.run_id} is {run.info.status} and exported no model yet")
    try:
        import mlflow.artifacts

        folder = Path(tempfile.mkdtemp(prefix="orchestrate-model-"))
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model",
                                                    dst_path=str(folder), tracking_uri=uri)
    except Exception as exc:
        raise InputError(f"MODEL {spec}: run {run.info.run_id} has no exported model in the run storage or in "
                         f"MLflow ({type(exc).__name__})") from None
    return _local(spec, Path(local), **known)


def find_run(spec: str, uri: str):
    """The MLflow run named ``spec`` (a run id, or the ``orchestrate.name`` tag: the newest FINISHED
    one, else the newest), or None."""
    from orchestrator.records import tracking

    c = tracking.client(uri)
    if RUN_ID.match(spec):
        try:
            return c.get_run(spec)
        except Exception:
            pass
    exps = [e.experiment_id for e in c.search_experiments()]
    if not exps:
        return None
    runs = c.search_runs(exps, filter_string=f"tags.`{tracking.TAG_NAME}` = '{spec}'",
                         order_by=["attributes.start_time DESC"], max_results=10)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return (finished or runs or [None])[0]


def _registered(spec: str, tracking_uri: str | None) -> ResolvedModel:
    import mlflow.artifacts

    from orchestrator.records import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    # named ``model`` as the run's artifact folder is: a model's digest covers its folder's name, so
    # a registered version has the digest of the run's export it was registered from
    folder = Path(tempfile.mkdtemp(prefix="orchestrate-model-")) / "model"
    folder.mkdir()
    try:
        import mlflow

        mlflow.set_registry_uri(uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(folder),
                                                         tracking_uri=uri))
    except Exception as exc:
        raise InputError(f"MODEL {spec}: not found in the model registry of {uri} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if (local / "model").is_dir():  # a registered run folder: its exported generator is model/
        local = local / "model"
    # MLflow's own bookkeeping of the download, not part of the model (the digest is the export's)
    (local / "registered_model_meta").unlink(missing_ok=True)
    return _local(spec, local)


def publish_model(model: ResolvedModel, storage: str) -> ArtifactRef:
    """The model in the run storage (a no-op when it is there), so every node can fetch it."""
    if model.ref is None or not model.ref.uri.startswith(storage):
        model.ref = publish(model.local, storage)
    return model.ref
