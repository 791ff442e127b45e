"""Helpers the method-comparison benchmarks share: reading a run of the one training loop
(``orchestrator.loop.run_loop``) into a table row, checking that the loop trained on the script's
images, reloading the trained method from its export, and the mean ± std over seeds."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from orchestrator.artifacts import ArtifactRef, fetch, load_array
from orchestrator.job import Job
from orchestrator.loop import method_class, perf_for
from orchestrator.sources import is_ready
from trainers.registry import load_source_model

# keys of a loop report that are neither metrics nor training terms
LOOP_KEYS = {"step", "steps_per_s", "images_per_s", "export", "trainable_parameters"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (std is NaN for fewer than two)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def run_row(final: dict[str, Any], metric_keys: set[str], steps: int, cpu_s_per_step: float) -> dict[str, Any]:
    """A run's row from the loop's final report: its evaluation's metrics, the time per step, and
    the training terms of its last report window as ``train_<term>``."""
    row = {k: v for k, v in final.items() if k in metric_keys}
    row.update(s_per_step=final["time_train_s"] / steps, cpu_s_per_step=cpu_s_per_step)
    row.update({f"train_{k}": v for k, v in final.items()
                if k not in metric_keys and k not in LOOP_KEYS and not k.startswith("time_")})
    return row


def same_images(ref: ArtifactRef, images: torch.Tensor, what: str) -> None:
    """The loop's copy of an image set (published by ``prepare``) is this script's set."""
    if not np.array_equal(load_array(ref), images.permute(0, 2, 3, 1).numpy()):
        raise RuntimeError(f"the loop's {what} differ from this script's")


def reload(job: Job, export: ArtifactRef, device: torch.device):
    """The trained method around its export (the loop's class, config and precision), for sampling."""
    cls = method_class(job)
    source = load_source_model(job.family, str(fetch(export)), device)
    return cls(cls.Config.model_validate(job.method_config), source, device, seed=job.run.seed,
               perf=perf_for(job, device, cls))


@contextlib.contextmanager
def node_cache(path: Path) -> Iterator[None]:
    """``ORCHESTRATE_CACHE`` at ``path`` meanwhile: what the loop publishes and fetches (data,
    source copies, exports) stays in this run's temporary folder, out of the CLI's cache (the
    source folder, encoder and decoded data a script shares with the CLI are located before)."""
    saved = os.environ.get("ORCHESTRATE_CACHE")
    os.environ["ORCHESTRATE_CACHE"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ORCHESTRATE_CACHE", None)
        else:
            os.environ["ORCHESTRATE_CACHE"] = saved


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_into_place(src: Path, folder: Path, ready: Callable[[], bool]) -> bool:
    """Copy ``src`` to ``folder`` atomically (written beside it, then renamed into place); False
    when ``ready()`` says another process (a CLI run, a concurrent script) put it there first."""
    if ready():
        return False
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    try:
        tmp.replace(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ready():
            raise
        return False
    return True


def install(export: Path, task: Any, folder: Path) -> None:
    """A copy of a pretraining export at ``folder``; when a CLI run finished the same spec
    meanwhile, theirs is kept."""
    if not copy_into_place(export, folder, lambda: is_ready(task, folder)):
        log(f"  {folder} appeared meanwhile; keeping it")
