"""How the one training loop talks to whoever launched it: one loop, several launchers.

* :class:`TrainSession` — inside a Ray Train worker (``TorchTrainer``): ``ray.train.report`` and
  ``ray.train.get_checkpoint``; Train restarts dead workers from the last checkpoint
  (``FailureConfig``). Used by ``train``, ``pretrain``, lifelong tasks and multi-worker trials.
* :class:`TuneSession` — inside a Tune trial's own process (a single-worker sweep trial, the
  common few-shot case): ``tune.report`` and ``tune.get_checkpoint``; Tune retries the trial from
  its last checkpoint when its process or node dies. No worker group is started per trial.
* :class:`StoreSession` — no Ray reporting at all: checkpoints in a folder of the run storage
  keyed by the run name (local or ``s3://``), resumed from the newest one. Used for lifelong
  tasks inside a sequence-sweep trial, and by benchmarks and tests that run the loop in process.

A checkpoint is a folder: ``state.pt`` (rank 0: the method's state, step) and ``rng_rank<r>.pt``
(every rank: its RNG states), loaded on the CPU first (``orchestrator.core.rng``).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from orchestrator.data.storage import filesystem, join, run_dir

_CKPT = re.compile(r"checkpoint_(\d{6,})$")
COMPLETE = "COMPLETE"


class Session:
    rank: int = 0
    world_size: int = 1
    #: where the checkpoint that ``latest_checkpoint`` yields lives (its URL or path), for messages
    checkpoint_origin: str | None = None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def node_id(self) -> str:
        return "local"

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """The newest checkpoint's folder (a local copy), or None."""
        yield None

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Hand ``metrics`` (and the checkpoint folder, when one was written) to the launcher."""


@contextlib.contextmanager
def _local_copy(session: Session, checkpoint) -> Iterator[Path | None]:
    """A Ray (Train or Tune) checkpoint as a local folder, or None."""
    if checkpoint is None:
        yield None
        return
    session.checkpoint_origin = str(checkpoint.path)
    with checkpoint.as_directory() as d:
        yield Path(d)


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class TrainSession(Session):
    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    @property
    def node_id(self) -> str:
        return _ray_node_id()

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        return _local_copy(self, ray.train.get_checkpoint())

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint))
                         if checkpoint is not None else None)


class TuneSession(Session):
    """A single-worker run inside the Tune trial's process; the GPU (or fraction of one) the trial
    holds is the one Ray made visible to this process."""

    @property
    def device(self) -> torch.device:
        import ray

        if ray.get_gpu_ids() and torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")

    @property
    def node_id(self) -> str:
        return _ray_node_id()

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        from ray import tune

        return _local_copy(self, tune.get_checkpoint())

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint))
                    if checkpoint is not None else None)


class StoreSession(Session):
    """Checkpoints in ``<storage>/<name>/checkpoint_<step>`` (any fsspec URL), the newest
    ``keep`` kept; ``on_report(metrics)`` receives every report."""

    def __init__(self, storage: str, name: str, *, device: torch.device | str = "cpu", keep: int = 2,
                 on_report: Callable[[dict[str, Any]], None] | None = None, node_id: str = "local"):
        self.uri = run_dir(storage, name)  # a checked name's own folder, never another run's
        self._device = torch.device(device)
        self.keep = keep
        self.on_report = on_report
        self._node = node_id
        self.reports: list[dict[str, Any]] = []

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def node_id(self) -> str:
        return self._node

    def checkpoints(self) -> list[str]:
        """Complete checkpoints (their ``COMPLETE`` marker, written last, is there), oldest first."""
        fs, root = filesystem(self.uri)
        if not fs.exists(root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        names = [n for n in names if _CKPT.match(n) and fs.exists(join(root, n, COMPLETE))]
        return sorted(names, key=lambda n: int(_CKPT.match(n).group(1)))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        if not found:
            yield None
            return
        fs, root = filesystem(self.uri)
        with tempfile.TemporaryDirectory() as tmp:
            src = join(root, found[-1])
            self.checkpoint_origin = src
            for path in fs.ls(src, detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if name != COMPLETE:
                    fs.get_file(path, str(Path(tmp) / name))
            yield Path(tmp)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            # Object stores have no atomic folder rename: the files go to their final place and
            # a COMPLETE marker is written last; a checkpoint without it is ignored (and replaced).
            fs, root = filesystem(self.uri)
            target = join(root, f"checkpoint_{int(metrics['step']):06d}")
            if fs.exists(target):
                fs.rm(target, recursive=True)
            fs.makedirs(target, exist_ok=True)
            for f in sorted(Path(checkpoint).iterdir()):
                fs.put_file(str(f), join(target, f.name))
            with fs.open(join(target, COMPLETE), "wb") as marker:
                marker.write(b"ok")
            for old in self.checkpoints()[:-self.keep]:
                fs.rm(join(root, old), recursive=True)
        if self.on_report is not None:
            self.on_report(dict(metrics))
