"""Intra-cluster diversity of generated samples (Intra-LPIPS and its balanced variant B-LPIPS).

Protocol of the few-shot generation literature (Ojha et al., "Few-shot Image Generation via
Cross-domain Correspondence", CVPR 2021, Sec. 4): assign every generated sample to the nearest of
the training shots, keep at most ``max_per_cluster`` samples per cluster, average the distance over
all unordered pairs inside each cluster, and average over the clusters with at least two members.
A generator that reproduces the shots scores ~0; a diverse one scores high.

Balanced variant (Seo, Kang, Park, "LFS-GAN", ICCV 2023, ``evaluate_b_lpips.py``): weights each
cluster's mean distance ``D_c`` by ``-p_c log10 p_c`` with ``p_c = n_c / N + 1e-5``, where ``n_c``
is the cluster size *before* capping and ``N`` the number of samples, so that a generator which
puts all samples near one shot is penalised even if that cluster is internally diverse:

    B = Σ_c -p_c · log10(p_c) · D_c

Our choice for clusters with fewer than two members: ``D_c = 0`` (they contribute nothing, as in
the reference script where their mean is NaN and skipped); the sum runs over all shots.

The distance is pluggable: any ``fn(a, b) -> Tensor[N]`` giving the distance between aligned pairs
``a[i], b[i]`` (LPIPS is such a function). A function may also carry a ``pairwise(a, b) ->
Tensor[len(a), len(b)]`` attribute as a fast path (feature-space distances, or LPIPS with features
computed once per image); ``pairwise_distance_matrix`` uses it when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F

DistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FeatureDistance:
    """Distance between feature vectors: ``"cosine"`` (1 - cos θ) or ``"l2"`` (Euclidean)."""

    def __init__(self, kind: str = "cosine"):
        if kind not in ("cosine", "l2"):
            raise ValueError(f"feature distance must be 'cosine' or 'l2', got {kind!r}")
        self.kind = kind

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.flatten(1).float(), b.flatten(1).float()
        if self.kind == "cosine":
            return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-12)
        return (a - b).norm(dim=1)

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.flatten(1).float(), b.flatten(1).float()
        if self.kind == "cosine":
            return 1.0 - F.normalize(a, dim=1, eps=1e-12) @ F.normalize(b, dim=1, eps=1e-12).T
        return torch.cdist(a, b)

    def __repr__(self) -> str:
        return f"FeatureDistance({self.kind!r})"


def pairwise_distance_matrix(
    a: torch.Tensor, b: torch.Tensor, fn: DistanceFn, batch_size: int = 256
) -> torch.Tensor:
    """``D[i, j] = fn(a[i], b[j])`` for all pairs, as a float32 tensor ``[len(a), len(b)]``.

    Uses ``fn.pairwise`` when the function provides it; otherwise evaluates ``fn`` on aligned
    batches of at most ``batch_size`` index pairs.
    """
    pairwise = getattr(fn, "pairwise", None)
    if callable(pairwise):
        return pairwise(a, b).float()
    na, nb = len(a), len(b)
    out = torch.empty(na * nb, dtype=torch.float32)
    ii = torch.arange(na).repeat_interleave(nb)
    jj = torch.arange(nb).repeat(na)
    for s in range(0, na * nb, batch_size):
        i, j = ii[s : s + batch_size], jj[s : s + batch_size]
        out[s : s + len(i)] = fn(a[i.to(a.device)], b[j.to(b.device)]).reshape(-1).float().cpu()
    return out.view(na, nb)


def pairwise_distances_condensed(x: torch.Tensor, fn: DistanceFn, batch_size: int = 256) -> torch.Tensor:
    """Distances over all unordered pairs ``i < j`` of ``x`` (``n(n-1)/2`` values, CPU float32)."""
    n = len(x)
    if n < 2:
        return torch.empty(0)
    iu = torch.triu_indices(n, n, offset=1)
    pairwise = getattr(fn, "pairwise", None)
    if callable(pairwise):
        return pairwise(x, x).float().cpu()[iu[0], iu[1]]
    out = torch.empty(iu.shape[1], dtype=torch.float32)
    for s in range(0, iu.shape[1], batch_size):
        i, j = iu[0, s : s + batch_size], iu[1, s : s + batch_size]
        out[s : s + len(i)] = fn(x[i.to(x.device)], x[j.to(x.device)]).reshape(-1).float().cpu()
    return out


@dataclass
class ClusterDiversity:
    """Result of :func:`intra_cluster_diversity`.

    ``intra``: mean over clusters with >= 2 kept members of the mean pairwise distance
    (NaN when no cluster has two members). ``balanced``: Σ_c -p_c log10(p_c) D_c.
    ``cluster_sizes``: samples assigned to each shot (before capping); ``kept_sizes``: after the
    cap; ``per_cluster``: D_c (NaN for clusters with < 2 kept members).
    """

    intra: float
    balanced: float
    cluster_sizes: list[int] = field(default_factory=list)
    kept_sizes: list[int] = field(default_factory=list)
    per_cluster: list[float] = field(default_factory=list)
    assignment: torch.Tensor | None = None

    @property
    def cluster_entropy(self) -> float:
        """Σ_c -p_c log10 p_c of the assignment (the weights of the balanced score, summed)."""
        n = max(sum(self.cluster_sizes), 1)
        p = np.asarray(self.cluster_sizes, dtype=np.float64) / n + 1e-5
        return float(-(p * np.log10(p)).sum())


def intra_cluster_diversity(
    samples: torch.Tensor,
    shots: torch.Tensor,
    distance: Union[DistanceFn, str] = "cosine",
    *,
    max_per_cluster: int = 50,
    seed: int = 0,
    batch_size: int = 256,
) -> ClusterDiversity:
    """Intra-cluster diversity (Ojha et al. 2021) and its balanced variant (LFS-GAN, 2023).

    ``samples`` and ``shots`` are whatever ``distance`` accepts: images (for LPIPS) or feature
    vectors ``[N, D]`` (pass ``"cosine"`` / ``"l2"`` or a :class:`FeatureDistance`).
    Each sample goes to its nearest shot (ties: the lowest shot index); each cluster is shuffled
    with a generator seeded by ``seed`` and truncated to ``max_per_cluster`` members.
    """
    fn: DistanceFn = FeatureDistance(distance) if isinstance(distance, str) else distance
    if len(shots) < 1 or len(samples) < 1:
        raise ValueError("need at least one sample and one shot")
    if max_per_cluster < 2:
        raise ValueError("max_per_cluster must be >= 2 for pairwise distances")
    d_to_shots = pairwise_distance_matrix(samples, shots, fn, batch_size)  # [N, S]
    assign = d_to_shots.argmin(dim=1).cpu()
    num_shots, n = len(shots), len(samples)
    gen = torch.Generator().manual_seed(int(seed))
    sizes, kept, per_cluster = [], [], []
    for c in range(num_shots):
        members = torch.nonzero(assign == c).flatten()
        sizes.append(int(members.numel()))
        members = members[torch.randperm(members.numel(), generator=gen)][:max_per_cluster]
        kept.append(int(members.numel()))
        if members.numel() < 2:
            per_cluster.append(float("nan"))
            continue
        d = pairwise_distances_condensed(samples[members.to(_device_of(samples))], fn, batch_size)
        per_cluster.append(float(d.double().mean()))
    dc = np.asarray(per_cluster, dtype=np.float64)
    valid = ~np.isnan(dc)
    intra = float(dc[valid].mean()) if valid.any() else float("nan")
    p = np.asarray(sizes, dtype=np.float64) / n + 1e-5
    weights = -p * np.log10(p)
    balanced = float((weights * np.where(valid, dc, 0.0)).sum())
    return ClusterDiversity(intra, balanced, sizes, kept, per_cluster, assign)


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
