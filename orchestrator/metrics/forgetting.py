"""Lifelong metrics from the result matrix R[k, j] = metric on task j after learning task k.

Conventions (Lopez-Paz & Ranzato 2017, Chaudhry et al. 2018), made direction-aware so that one
set of formulas serves metrics where lower is better (FID, KID) and higher is better (diversity):
every quantity is reported so that **positive forgetting means worse** and **negative BWT means
worse**, whatever the metric's direction.

- average final quality: mean_j R[K-1, j] over all tasks;
- forgetting of task j < K-1: the drop from its best value while it was being learned or after,
  up to the last task, to its final value:  higher-is-better: max_{j<=k<K-1} R[k, j] - R[K-1, j];
  lower-is-better: R[K-1, j] - min_{j<=k<K-1} R[k, j]  (>= 0 by construction);
- overall forgetting: mean over j < K-1;
- backward transfer: mean_{j<K-1} (R[K-1, j] - R[j, j]) for higher-is-better, and the negative
  of that for lower-is-better.
Cells above the diagonal (tasks not yet learned) are NaN and never used.
"""

from __future__ import annotations

import math

import numpy as np

LOWER_IS_BETTER_PREFIXES = ("fid_", "kid_")


def lower_is_better(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER_PREFIXES)


def summarize(R: np.ndarray, metric: str) -> dict[str, float]:
    """Average final quality, forgetting per task and overall, and BWT of a K×K matrix."""
    R = np.asarray(R, dtype=float)
    K = R.shape[0]
    if R.shape != (K, K):
        raise ValueError(f"expected a square matrix, got {R.shape}")
    low = lower_is_better(metric)
    final = R[K - 1]
    out = {f"avg_final_{metric}": float(np.mean(final))}
    forgetting = []
    for j in range(K - 1):
        history = R[j:K - 1, j]
        f = final[j] - np.min(history) if low else np.max(history) - final[j]
        out[f"forgetting_{metric}_task{j}"] = float(f)
        forgetting.append(f)
    out[f"forgetting_{metric}"] = float(np.mean(forgetting)) if forgetting else 0.0
    if K > 1:
        diffs = [final[j] - R[j, j] for j in range(K - 1)]
        bwt = float(np.mean(diffs))
        out[f"bwt_{metric}"] = -bwt if low else bwt
    else:
        out[f"bwt_{metric}"] = 0.0
    return out


def empty_matrix(K: int) -> np.ndarray:
    return np.full((K, K), math.nan)
