"""Reference statistics computed once per sweep, not once per trial.

Every trial of a sweep compares its samples with the same reference set and shots under the same
feature networks. The sweep driver computes their features (and the reference set's mean and
covariance, for FID) before any trial starts, publishes them as one content-keyed artifact, and
each trial preloads them into its evaluator's cache instead of recomputing them. LPIPS needs no
reference statistics (it only compares samples with each other and with the shots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch


def compute(extractors: Sequence[Any], reference: torch.Tensor, shots: torch.Tensor) -> dict[str, Any]:
    from trainers.metrics import FeatureExtractor, feature_statistics

    out: dict[str, Any] = {}
    for ext in extractors:
        if not isinstance(ext, FeatureExtractor):
            continue
        ref = ext.features(reference)
        mu, sigma = feature_statistics(ref)
        out[ext.name] = {"reference": ref.cpu(), "mu": mu, "sigma": sigma, "shots": ext.features(shots).cpu(),
                         "num_reference": len(reference), "num_shots": len(shots)}
    return out


def save(stats: dict[str, Any], path: Path) -> Path:
    torch.save(stats, path)
    return path


def preload(cache, path: Path, extractors: Sequence[Any], reference: torch.Tensor, shots: torch.Tensor) -> None:
    """Enter the stored statistics into an evaluator's ``ReferenceStats`` cache, for the very
    ``reference`` and ``shots`` tensor objects the evaluator will pass to ``evaluate``."""
    stats = torch.load(path, map_location="cpu", weights_only=False)
    for ext in extractors:
        entry = stats.get(getattr(ext, "name", None))
        if entry is None:
            continue
        if entry["num_reference"] != len(reference) or entry["num_shots"] != len(shots):
            raise ValueError(f"reference statistics {path} were computed for {entry['num_reference']} reference "
                             f"images and {entry['num_shots']} shots, not {len(reference)} and {len(shots)}")
        device = ext.device
        cache.preload(ext, reference, entry["reference"].to(device), entry["mu"], entry["sigma"])
        cache.preload(ext, shots, entry["shots"].to(device))
