"""The truth check of a run: the per-task classifier (trainers.metrics.task_classifier), trained
once per (task, source) before any worker starts and cached by content.

``prepare`` calls :func:`truth_classifier` in the driver (once per ``train``, once per sweep for
all its trials). It draws the source model's samples (the ``source`` class) with the same
generator code as ``orchestrate sample``, trains the three-class classifier against the task's
reference images (or its shots) on the driver's device, and publishes it to the run storage
under a named pointer whose key is the content: the recipe, the target images' digest, the
source's digest, the resolution and the sampling steps. A rerun, a resumed run, another sweep on
the same task and source, or a run on another node of the same storage finds it instead of
training it again; a node-local copy under the cache spares the retraining when the storage is
new (e.g. every test's own folder).

The run's evaluator then records ``target_rate`` (share of samples classified ``target``) at
every evaluation, ``target_rate_source`` before the first step (the source model's own samples
from the run's evaluation seed, drawn after the classifier's: its floor) and the classifier's
held-out accuracies (``truth_accuracy_target``, ``_source``, ``_neither``, and ``truth_separation``,
the balanced accuracy of target vs source): a run whose ``truth_separation`` is low has a rate
that says little.

Off with ``run.truth_check: false``, and skipped for a source named only by a Hub id (the driver
does not load it). A check that cannot be trained (e.g. too few target images) is skipped with a
warning that names the error: it is an auxiliary metric and must not stop the run it checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

from orchestrator.data.artifacts import ArtifactRef, fetch, load_array, lookup, point, publish
from orchestrator.data.storage import cache_home

if TYPE_CHECKING:
    from orchestrator.core.config import ResolvedConfig

RECIPE = "truth-check/1"  # bump when the classes, the training or the source sampling change
SOURCE_TRAIN = 96  # source samples it learns from; the next SOURCE_HELD_OUT indices are held out
SOURCE_HELD_OUT = 32
SOURCE_SEED = 0  # fixed, not the run's: one classifier serves every trial and seed of a sweep
# DDIM steps for a diffusion source's samples when the run sets no eval_sample_steps: the check
# asks "source domain or not", which 25 steps answer as well as 50 at half the cost (on the CPU
# the demo's 128 source samples take ~25 s at 25 steps)
SOURCE_STEPS = 25


def truth_key(target: ArtifactRef, source: ArtifactRef, resolution: int, sample_steps: int) -> str:
    blob = json.dumps({"recipe": RECIPE, "target": target.digest, "source": source.digest,
                       "resolution": resolution, "sample_steps": sample_steps}, sort_keys=True)
    return "truth-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def truth_classifier(cfg: "ResolvedConfig", *, data: ArtifactRef, reference: ArtifactRef | None,
                     source: ArtifactRef | None, storage: str) -> ArtifactRef | None:
    """The task's truth classifier in the run storage (trained here when no copy exists), or None
    when the run turns the check off or its source is a Hub id."""
    if not cfg.run.truth_check or source is None:
        return None
    target = reference if reference is not None else data
    return classifier_of(target, source, cfg.task.resolution, cfg.run.eval_sample_steps or SOURCE_STEPS, storage)


def classifier_of(target: ArtifactRef, source: ArtifactRef, resolution: int, steps: int,
                  storage: str) -> ArtifactRef | None:
    """The truth classifier of ``target`` images against ``source``'s samples (a diffusion source
    samples with ``steps`` DDIM steps), from the storage's pointer, this node's cache, or trained
    now; None (with a warning) when it cannot be trained."""
    key = truth_key(target, source, resolution, steps)
    ref = lookup(storage, key)
    if ref is not None:
        return ref
    local = cache_home() / "truth" / f"{key}.safetensors"
    if not local.is_file():
        try:
            model = _train(target, source, resolution, steps)
        except Exception as exc:  # noqa: BLE001 (an auxiliary metric must not stop the run it checks)
            print(f"[orchestrate] warning: no truth check for this run (training its classifier failed: "
                  f"{type(exc).__name__}: {exc}); target_rate is not recorded", flush=True)
            return None
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(f".{os.getpid()}.tmp")
        model.save(tmp)
        tmp.replace(local)  # atomic: a concurrent driver never reads half a file
    ref = publish(local, storage)
    point(storage, key, ref)
    return ref


def _train(target: ArtifactRef, source: ArtifactRef, resolution: int, steps: int):
    import numpy as np
    import torch

    from trainers.generate import DIFFUSION_KINDS, SampleOptions, open_model
    from trainers.metrics.task_classifier import train_task_classifier

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = open_model(fetch(source), device)
    options = SampleOptions(steps=steps) if model.kind in DIFFUSION_KINDS else SampleOptions()
    drawn = []
    with torch.no_grad():
        for start in range(0, SOURCE_TRAIN + SOURCE_HELD_OUT, 64):
            stop = min(start + 64, SOURCE_TRAIN + SOURCE_HELD_OUT)
            drawn.append(model.generate(range(start, stop), SOURCE_SEED, options))
    samples = torch.cat(drawn)
    images = torch.from_numpy(np.array(load_array(target))).permute(0, 3, 1, 2).contiguous()
    return train_task_classifier(images, samples[:SOURCE_TRAIN], source_held_out=samples[SOURCE_TRAIN:],
                                 resolution=resolution, device=device)


def truth_metrics(train_info: dict) -> dict[str, float]:
    """The classifier's held-out accuracies, as the run records them before its first step."""
    acc = train_info.get("held_out_accuracy", {})
    out = {f"truth_accuracy_{c}": float(v) for c, v in acc.items()}
    if "separation" in train_info:
        out["truth_separation"] = float(train_info["separation"])
    return out

