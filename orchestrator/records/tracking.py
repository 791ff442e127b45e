"""MLflow: the one record of every run.

The driver creates the tracking store, the experiment and the run before any Ray worker starts
(two processes creating a fresh SQLite store at once race); workers only log into
the run id they are given and never end it. The driver ends it FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import io
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

# MLflow draws a progress bar for every artifact download (sweep.json on resume ...): not ours to show.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TAG_NAME = "orchestrate.name"
TAG_KIND = "orchestrate.kind"
TAG_TASK = "orchestrate.task"
TAG_METHOD = "orchestrate.method"
TAG_LOGGED = "orchestrate.logged_step"  # the last step whose metrics a run recorded
TAG_EXPORT = "orchestrate.export"  # where the run's exported generator lives (an ArtifactRef as JSON)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the working dir.
    A relative sqlite path is made absolute so that Ray workers (other cwd) find the same file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif "://" not in uri:  # a plain folder: the file store
        uri = str(Path(uri).expanduser().resolve())
    return uri


def default_artifact_root(tracking_uri: str) -> str | None:
    """With a local SQLite store, keep artifacts in ``mlartifacts/`` beside the database (an
    absolute location, so workers in other folders write to the same place)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    _quiet_store_logs()
    return MlflowClient(tracking_uri=tracking_uri)


def _quiet_store_logs() -> None:
    """MLflow logs "Creating initial MLflow database tables..." and its migrations at INFO when a
    SQLite store is new: not the user's business (failures still show)."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


# MLflow 3's UI opens an experiment by its kind: a model-training one shows the runs table, the
# metric and image charts (runs' grids side by side at a step) and the models; without the tag
# the UI guesses, and on an experiment with no traces it may open the GenAI overview instead.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if not all(exp.tags.get(k) for k in EXPERIMENT_KIND):  # one made by an older version
            for k, v in EXPERIMENT_KIND.items():
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    location = artifact_location or default_artifact_root(tracking_uri)
    if location and location.startswith("file:"):
        location = location.rstrip("/") + "/" + name
    try:
        return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another driver
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(tracking_uri: str, experiment_id: str, name: str, parent_run_id: str | None = None):
    """The newest run tagged with ``name`` (optionally under a parent), or None."""
    c = client(tracking_uri)
    flt = f"tags.`{TAG_NAME}` = '{name}'"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = c.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                         max_results=1)
    return runs[0] if runs else None


@lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """MLflow's default source tags, which ``MlflowClient.create_run`` leaves out (only the fluent
    ``mlflow.start_run`` sets them): who ran it, what command, which commit of this tool, so the
    UI's "User" and "Source" columns and the run page's git commit are filled for every run."""
    import getpass
    import subprocess
    import sys

    tags = {"mlflow.source.type": "LOCAL", "orchestrate.version": _version()}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name on this node (a container without passwd entry)
        pass
    argv = [Path(sys.argv[0]).name, *sys.argv[1:3]] if sys.argv and sys.argv[0] else []
    entry = " ".join(a for a in argv if a and not a.startswith("-"))[:250]
    if entry:
        tags["mlflow.source.name"] = entry  # e.g. "orchestrate train ddpm_pa"
    repo = Path(__file__).resolve().parents[2]  # orchestrator/records/tracking.py
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        if len(commit) == 40:
            tags["mlflow.source.git.commit"] = commit
    except Exception:  # no git, or not a checkout (an installed package): no commit to name
        pass
    return tags


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fewshot-orchestrator")
    except Exception:
        return "unknown"


def start_run(tracking_uri: str, experiment_id: str, name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    c = client(tracking_uri)
    all_tags = {**source_tags(), TAG_NAME: name, "mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id, tags=all_tags, run_name=name)
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run that is being resumed as RUNNING again (it keeps its metrics and artifacts)."""
    c = client(tracking_uri)
    c.update_run(run_id, status="RUNNING")
    resumed = c.get_run(run_id).data.tags.get("orchestrate.resumed", "0")
    c.set_tag(run_id, "orchestrate.resumed", str(int(resumed) + 1))


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def log_params(tracking_uri: str, run_id: str, params: dict[str, str]) -> None:
    """Params in batches of 100 (MLflow's limit per call); values longer than MLflow allows are
    cut (the full config is also logged as config.yaml)."""
    from mlflow.entities import Param

    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    items = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(tracking_uri).log_text(run_id, text, artifact_file)


class MetricBuffer:
    """Collects metrics by step and sends them in batches (one call per flush, not per number)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._pending: list[Any] = []

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items()
                             if v is not None and np.isfinite(v))

    def flush(self, tags: dict[str, str] | None = None) -> None:
        """Send the pending metrics; ``tags`` travel in the same ``log_batch`` request as the last
        of them. A tag that records how far the metrics go (``orchestrate.logged_step``) is then
        never behind them: were it set in a call of its own, a worker killed between the two calls
        leaves metrics recorded that the tag does not cover, and its restart logs those steps twice."""
        from mlflow.entities import RunTag

        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if not self._pending and not run_tags:
            return
        size = 1000 - len(run_tags)  # MLflow's limit: 1000 metrics, params and tags in one batch
        chunks = [self._pending[i:i + size] for i in range(0, len(self._pending), size)] or [[]]
        c = client(self.tracking_uri)
        for j, chunk in enumerate(chunks):
            c.log_batch(self.run_id, metrics=chunk, tags=run_tags if j == len(chunks) - 1 else [])
        self._pending = []


class MlflowRecorder:
    """The training loop's recorder (``orchestrator.records.recorder``) for one MLflow run: rank 0 of a
    run that the driver created. Metrics are buffered and sent by ``flush`` in one ``log_batch``
    request with the ``orchestrate.logged_step`` tag (see ``MetricBuffer.flush``)."""

    active = True

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._buffer = MetricBuffer(tracking_uri, run_id)

    def logged_through(self) -> int:
        return logged_step(self.tracking_uri, self.run_id, TAG_LOGGED)

    def set_tags(self, tags: dict[str, str]) -> None:
        c = client(self.tracking_uri)
        for k, v in tags.items():
            c.set_tag(self.run_id, k, v)

    def log_params(self, params: dict[str, str]) -> None:
        log_params(self.tracking_uri, self.run_id, params)

    def add_metrics(self, values: dict[str, float], step: int) -> None:
        self._buffer.add(values, step)

    def flush(self, logged_through: int | None = None) -> None:
        self._buffer.flush(tags=None if logged_through is None else {TAG_LOGGED: str(logged_through)})

    def log_grid(self, images: np.ndarray, name: str, step: int | None = None) -> None:
        log_image_grid(self.tracking_uri, self.run_id, images, name, step=step)

    def log_model(self, folder: Path, export: str) -> None:
        log_artifacts(self.tracking_uri, self.run_id, folder, "model")
        client(self.tracking_uri).set_tag(self.run_id, TAG_EXPORT, export)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N,H,W,3] or [N,3,H,W] -> one uint8 [rows*H, cols*W, 3] grid with white padding."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images [N,H,W,3], got shape {images.shape}")
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    n, h, w, _ = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def png_bytes(grid: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def log_image_grid(tracking_uri: str, run_id: str, images: np.ndarray, artifact_file: str,
                   step: int | None = None, key: str = "samples") -> None:
    """Log a sample grid as a PNG artifact (upscaled so that tiny models' 32² samples are visible)
    and, with ``step``, as MLflow 3's image of ``key`` at that step too: the UI then lines up
    several runs' grids at the same step (the run comparison's image view)."""
    import tempfile

    from PIL import Image

    grid = image_grid(images)
    scale = max(1, 256 // images.shape[-2] if images.shape[-1] == 3 else 256 // images.shape[-1])
    data = png_bytes(grid, scale=min(scale, 4))
    c = client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_bytes(data)
        parent = str(Path(artifact_file).parent)
        c.log_artifact(run_id, str(path), None if parent == "." else parent)
    if step is not None:
        c.log_image(run_id, Image.open(io.BytesIO(data)), key=key, step=int(step))


def log_dataset(tracking_uri: str, run_id: str, name: str, digest: str, source: str, count: int,
                context: str, **profile: object) -> None:
    """Record a run input (MLflow's Datasets panel): ``name`` (shots, reference, source), the
    sha256 of its bytes (the published ``.npy`` of the decoded images, or the model's files; first
    36 hex digits, MLflow's limit), where it came from and how many images."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=name, digest=digest[:36], source_type="orchestrate", source=json.dumps({"uri": source}),
                 profile=json.dumps({"num_images": count, **profile}))
    client(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


def log_artifacts(tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def logged_step(tracking_uri: str, run_id: str, tag: str) -> int:
    """The last step whose metrics a run recorded (its ``tag``), -1 when none."""
    value = client(tracking_uri).get_run(run_id).data.tags.get(tag)
    return int(value) if value is not None else -1


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(tracking_uri).get_metric_history(run_id, key)]


def ui_hint(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to browse a run. MLflow 3's UI opens an experiment on its GenAI overview unless the
    link asks for the training-runs view (``?workflowType=machine_learning`` after the
    experiment's fragment), so every link we print does."""
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
    else:
        base = None
    path = ""
    if experiment_id is not None:
        path = f"/#/experiments/{experiment_id}"
        if run_id is not None:
            path += f"/runs/{run_id}"
        path += "?workflowType=machine_learning"
    if base is not None:
        return f"open {base}{path}"
    where = f", then open http://127.0.0.1:5000{path}" if path else ""
    return f"mlflow ui --backend-store-uri {tracking_uri}{where}"

