"""Where the training loop reports: a recorder object, so that the loop never imports MLflow.

The loop (``orchestrator.runtime.loop.run_loop``) calls these methods and nothing else to record a run:

* ``logged_through()``: the last step whose metrics are already recorded (-1: none). A restarted
  worker reads it so that no step is logged twice;
* ``set_tags`` / ``log_params``: where the attempt runs, what the run trains;
* ``add_metrics(values, step)`` buffers; ``flush(logged_through)`` sends the buffered metrics and
  the new high-water step together (one request: see ``tracking.MlflowRecorder``);
* ``log_grid(images, name, step)``: a sample grid (with ``step``, an image by step too);
* ``log_model(folder, export)``: the exported generator's files and where the export lives.

Implementations: ``tracking.MlflowRecorder`` (production: an MLflow run), :class:`MemoryRecorder`
(tests and benchmarks: everything kept in lists, inspectable), :class:`NullRecorder` (ranks other
than 0, and loops without a run: records nothing). ``orchestrator.runtime.worker.recorder_for`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Recorder(Protocol):
    active: bool  # False: nothing is recorded (the loop skips work done only to record it)

    def logged_through(self) -> int: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_params(self, params: dict[str, str]) -> None: ...

    def add_metrics(self, values: dict[str, float], step: int) -> None: ...

    def flush(self, logged_through: int | None = None) -> None: ...

    def log_grid(self, images: np.ndarray, name: str, step: int | None = None) -> None: ...

    def log_model(self, folder: Path, export: str) -> None: ...


class NullRecorder:
    """Records nothing (a data-parallel rank other than 0, or a loop run without a run)."""

    active = False

    def logged_through(self) -> int:
        return -1

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def add_metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def flush(self, logged_through: int | None = None) -> None:
        pass

    def log_grid(self, images: np.ndarray, name: str, step: int | None = None) -> None:
        pass

    def log_model(self, folder: Path, export: str) -> None:
        pass


@dataclass
class MemoryRecorder:
    """Keeps everything in memory: metrics by key as (step, value) lists, grids by name, the model's
    file names. ``logged_through`` follows ``flush`` as an MLflow run's tag does, so a loop resumed
    with the same recorder skips the steps it already recorded."""

    active: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    grids: dict[str, np.ndarray] = field(default_factory=dict)
    grid_steps: list[int] = field(default_factory=list)
    model_files: list[str] = field(default_factory=list)
    export: str | None = None
    _pending: list[tuple[str, float, int]] = field(default_factory=list)
    _through: int = -1

    def logged_through(self) -> int:
        return self._through

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_params(self, params: dict[str, str]) -> None:
        for k, v in params.items():
            self.params.setdefault(k, v)  # as MLflow: a param, once logged, keeps its value

    def add_metrics(self, values: dict[str, float], step: int) -> None:
        self._pending.extend((k, float(v), step) for k, v in values.items() if v is not None and np.isfinite(v))

    def flush(self, logged_through: int | None = None) -> None:
        for k, v, s in self._pending:
            self.metrics.setdefault(k, []).append((s, v))
        self._pending = []
        if logged_through is not None:
            self._through = logged_through

    def log_grid(self, images: np.ndarray, name: str, step: int | None = None) -> None:
        self.grids[name] = np.asarray(images).copy()
        if step is not None:
            self.grid_steps.append(step)

    def log_model(self, folder: Path, export: str) -> None:
        self.model_files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        self.export = export

    def history(self, key: str) -> list[tuple[int, float]]:
        return list(self.metrics.get(key, []))

    def latest(self) -> dict[str, Any]:
        """Each metric's value at its last recorded step."""
        return {k: v[-1][1] for k, v in self.metrics.items() if v}
