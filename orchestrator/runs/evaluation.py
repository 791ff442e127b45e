"""``orchestrate evaluate``: a run's evaluation protocol, at paper scale, for any model or images.

The protocol is the training loop's (``trainers.metrics.evaluate``): FID and KID, intra-cluster
diversity (samples clustered by their nearest shot), density and coverage against the task's
reference set, each metric named by its feature network, ``target_rate_domain`` where the
task has a domain classifier, and the task's truth check (``target_rate``: the share of images
that a classifier of the task's reference images against its source model's samples calls
``target``; orchestrator.metrics.truth), which any task whose source needs no pretraining has (a
built-in or shipped source, a path; a task whose source is pretrained by the tool has it once that
source is in this node's cache). What changes is the scale and the source of the images:

* a model (anything ``orchestrate sample`` accepts) is sampled with ``sample``'s distributed path
  into ``<storage>/evaluations/<name>/samples.parquet`` (so a killed evaluation resumes its
  sampling by shard), ``n`` defaulting to the size of the task's reference set;
* images made elsewhere (a folder, a Parquet file, an ``s3://`` prefix) are scored as they are,
  resized to the task's resolution like the task's own data.

The reference set's features and statistics are cached on this node by content digest (the
reference images, the shots and the feature networks' weights), so a second evaluation against
the same task computes only its samples' features. The result is an MLflow run of kind
``evaluation`` in the model's method's experiment (``evaluations`` for outside images), tagged
with the run that made the model, so the UI and ``best`` show a run and its large-N evaluations
side by side.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.core.config import TaskConfig

TAG_EVALUATED_RUN = "orchestrate.evaluated_run"
TAG_MODEL = "orchestrate.model"
EXTERNAL_EXPERIMENT = "evaluations"


@dataclass
class Scorer:
    """The task's reference set, shots and feature networks, ready to score any samples."""

    task: TaskConfig
    reference: np.ndarray  # uint8 [N,H,W,3]
    shots: np.ndarray
    metrics: list[str]
    extractors: list[Any] = field(default_factory=list)
    classifier: Any = None
    target_domain: str | None = None
    cache: Any = None
    truth: Any = None  # the task's truth check (a DomainClassifier), when it has one

    @classmethod
    def for_task(cls, task: TaskConfig, metrics: list[str], device: str = "cpu",
                 truth_storage: str | None = None) -> "Scorer":
        """``truth_storage``: where the task's truth check is kept (found there by content, else
        trained and published); None: no truth check."""
        import torch

        from orchestrator.runs.inputs import check_data, synthetic_domain
        from orchestrator.runs.sources import domain_encoder_for
        from trainers.builtin import builtin_classifier
        from trainers.metrics import ReferenceStats, available_extractors

        shots, reference = check_data(task)
        reference = reference if reference is not None else shots
        encoder = str(domain_encoder_for(task)) if "domain" in metrics else None
        extractors = available_extractors(metrics, encoder, device)
        scorer = cls(task, reference, shots, metrics, extractors, cache=ReferenceStats())
        domain = synthetic_domain(task.target.data)
        path = builtin_classifier(task.resolution) if domain is not None else None
        if path is not None:
            from trainers.metrics.domain_classifier import DomainClassifier

            scorer.classifier, scorer.target_domain = DomainClassifier.load(path, device), domain
        scorer._preload(torch.from_numpy(reference).permute(0, 3, 1, 2).contiguous(),
                        torch.from_numpy(shots).permute(0, 3, 1, 2).contiguous(), encoder)
        if truth_storage is not None:
            scorer.truth = task_truth(task, reference, truth_storage, device)
        return scorer

    def _preload(self, ref, shots, encoder: str | None) -> None:
        """Reference statistics from this node's cache (keyed by content), else computed once."""
        import torch

        from orchestrator.metrics import refstats
        from orchestrator.data.storage import cache_home

        h = hashlib.sha256()
        for arr in (self.reference, self.shots):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps(sorted(self.metrics)).encode())
        if encoder is not None:
            h.update(Path(encoder).read_bytes())
        path = cache_home() / "refstats" / f"{h.hexdigest()[:32]}.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(self)}")
            torch.save(refstats.compute(self.extractors, ref, shots), tmp)
            tmp.replace(path)
        self._ref_t, self._shots_t = ref, shots
        refstats.preload(self.cache, path, self.extractors, ref, shots)

    def score(self, samples: np.ndarray, seed: int = 0) -> dict[str, float]:
        import torch

        from trainers.metrics import evaluate

        t = torch.from_numpy(np.ascontiguousarray(samples)).permute(0, 3, 1, 2).contiguous()
        out = evaluate(t, self._ref_t, self._shots_t, self.extractors, seed=seed,
                       kid_subset_size=min(1000, len(t), len(self._ref_t)), cache=self.cache)
        if self.classifier is not None:
            out["target_rate_domain"] = self.classifier.rate(t, self.target_domain)
        if self.truth is not None:
            from orchestrator.metrics.truth import truth_metrics

            out["target_rate"] = self.truth.rate(t, "target")
            out.update(truth_metrics(self.truth.train_info))  # read the rate against its separation
        return out


def task_truth(task: TaskConfig, reference: np.ndarray, storage: str, device: str = "cpu") -> Any:
    """The task's truth check against its source model, or None (said why) when the source would
    have to be pretrained first or is only a Hub id (this process does not load it)."""
    from orchestrator.data.artifacts import fetch, publish, publish_array
    from orchestrator.metrics.truth import SOURCE_STEPS, classifier_of
    from orchestrator.runs.sources import cached_source_path, is_ready, locate_source

    if task.source.model == "pretrained":
        path = cached_source_path(task)
        if not is_ready(task, path):
            print(f"[orchestrate] no truth check: task {task.name}'s source is pretrained by the tool and not "
                  "on this node yet (train or pretrain once on this task); target_rate is not recorded", flush=True)
            return None
    else:
        path, _ = locate_source(task)
        if path is None:
            print(f"[orchestrate] no truth check: task {task.name}'s source is a Hub id", flush=True)
            return None
    ref = classifier_of(publish_array(reference, storage), publish(path, storage), task.resolution, SOURCE_STEPS,
                       storage)
    if ref is None:
        return None
    from orchestrator.runtime.loop import load_domain_classifier

    return load_domain_classifier(str(fetch(ref)), device)


def evaluation_name(what: str, task: TaskConfig, n: int, extra: dict[str, Any]) -> str:
    """A stable name for one evaluation: the same model, task, count and options give the same
    run (a second invocation reports it instead of evaluating twice)."""
    blob = json.dumps({"what": what, "task": task.model_dump(mode="json"), "n": n, **extra}, sort_keys=True,
                      default=str)
    short = "".join(c if c.isalnum() or c in "-_." else "-" for c in what)[:48].strip("-.") or "images"
    return f"eval-{short}-{task.name}-n{n}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
