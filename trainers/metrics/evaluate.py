"""One call that computes every metric of a set of generated samples against a target task.

``evaluate(samples, reference, shots, extractors)`` returns a flat ``dict[str, float]`` whose keys
name the network that produced each number (a number is never silently made with a
different network):

===========================  ==================================================================
``num_samples``              generated images evaluated (FID depends strongly on it: log it)
``num_reference``            reference (target) images
``fid_<name>``               Fréchet distance of the feature Gaussians (Heusel et al. 2017)
``kid_<name>``               KID, mean of the unbiased MMD² over subsets (Bińkowski et al. 2018)
``kid_std_<name>``           its standard deviation over the subsets
``intra_dist_<name>``        intra-cluster diversity in that feature space (cosine distance for
                             the domain encoder and Inception), clusters = nearest shot
``intra_dist_std_<name>``    its spread over draws of the samples (std over bootstrap resamples)
``b_dist_<name>``            its balanced (LFS-GAN) variant
``density_<name>``,          fidelity and diversity against the reference set (Naeem et al. 2020,
``coverage_<name>``          k = 5): noise, blur, shot copies and off-domain samples score low on
                             both, where an intra-cluster spread can still read high
``intra_lpips_<net>``        Intra-LPIPS (Ojha et al. 2021): LPIPS for clustering and distance
``b_lpips_<net>``            B-LPIPS (Seo et al. 2023)
===========================  ==================================================================

``<name>`` is the extractor's ``name`` (``domain``, ``inception``); ``<net>`` is ``vgg``/``alex``.
A diversity value is NaN when no cluster has two members (too few samples for the protocol).

Periodic evaluation calls this many times against the same reference set and shots; their
features and statistics are cached per extractor in a :class:`ReferenceStats` (a module-level
one by default), keyed on the identity of the image object and the extractor.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._images import ImageBatch, as_uint8_nchw
from .coverage import density_coverage, knn_radii
from .diversity import FeatureDistance, intra_cluster_diversity
from .domain_encoder import DomainEncoder
from .extractor import FeatureExtractor
from .fid import feature_statistics, frechet_distance, kid
from .inception import InceptionExtractor
from .lpips import LPIPS
from .weights import MissingWeightsError

EXTRACTOR_NAMES = ("domain", "inception", "lpips_vgg", "lpips_alex")


class ReferenceStats:
    """LRU cache of features, mean and covariance of fixed image sets, per extractor.

    An entry is keyed on ``(id(extractor), id(images))`` and holds weak references to both, so a
    new object that happens to reuse a freed id never gets stale numbers; for tensors the
    in-place version counter is checked too (a modified tensor is recomputed). Objects that
    cannot be weakly referenced are simply not cached.
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._entries.clear()

    def _lookup(self, extractor, images) -> dict[str, Any] | None:
        key = (id(extractor), id(images))
        entry = self._entries.get(key)
        if entry is None:
            return None
        if (
            entry["extractor_ref"]() is not extractor
            or entry["images_ref"]() is not images
            or entry["version"] != _version(images)
        ):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _store(self, extractor, images, entry: dict[str, Any]) -> dict[str, Any]:
        try:
            entry["extractor_ref"] = weakref.ref(extractor)
            entry["images_ref"] = weakref.ref(images)
        except TypeError:
            return entry
        entry["version"] = _version(images)
        self._entries[(id(extractor), id(images))] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def preload(self, extractor: FeatureExtractor, images: ImageBatch, features: torch.Tensor,
                mu: np.ndarray | None = None, sigma: np.ndarray | None = None) -> None:
        """Enter features (and statistics) computed elsewhere, e.g. once per sweep before its
        trials start, for ``images`` under ``extractor``."""
        entry: dict[str, Any] = {"features": features}
        if mu is not None and sigma is not None:
            entry["mu"], entry["sigma"] = mu, sigma
        self._store(extractor, images, entry)

    def radii(self, extractor: FeatureExtractor, images: ImageBatch, features: torch.Tensor) -> torch.Tensor:
        """k-NN radii of the reference features (density/coverage), computed once per set."""
        entry = self._lookup(extractor, images)
        if entry is not None and "radii" in entry:
            return entry["radii"]
        radii = knn_radii(features)
        if entry is not None:
            entry["radii"] = radii
        return radii

    def features(self, extractor: FeatureExtractor, images: ImageBatch, batch_size: int | None = None) -> torch.Tensor:
        entry = self._lookup(extractor, images)
        if entry is not None:
            self.hits += 1
            return entry["features"]
        self.misses += 1
        feats = extractor.features(images, batch_size)
        return self._store(extractor, images, {"features": feats})["features"]

    def statistics(
        self, extractor: FeatureExtractor, images: ImageBatch, batch_size: int | None = None
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(features, mean, covariance) of ``images`` under ``extractor``."""
        feats = self.features(extractor, images, batch_size)
        entry = self._lookup(extractor, images)
        if entry is not None and "mu" in entry:
            return feats, entry["mu"], entry["sigma"]
        mu, sigma = feature_statistics(feats)
        if entry is not None:
            entry["mu"], entry["sigma"] = mu, sigma
        return feats, mu, sigma


def _version(obj) -> int:
    return int(getattr(obj, "_version", 0)) if isinstance(obj, torch.Tensor) else 0


DEFAULT_CACHE = ReferenceStats()


def evaluate(
    samples: ImageBatch,
    reference: ImageBatch,
    shots: ImageBatch,
    extractors: Sequence[FeatureExtractor | LPIPS],
    *,
    max_per_cluster: int = 50,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 64,
    cache: ReferenceStats | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, float]:
    """All metrics of ``samples`` (generated) against ``reference`` (target set) and ``shots``
    (the training images, cluster centres for the diversity metrics); see the module docstring
    for the keys. Images: uint8 ``[N,3,H,W]`` tensors or ``[N,H,W,3]`` arrays; the sample counts
    are whatever is passed. ``details``, if given, receives per-extractor cluster sizes
    (``clusters_<name>``: samples per shot before the cap) for logging.
    """
    cache = DEFAULT_CACHE if cache is None else cache
    samples_t = as_uint8_nchw(samples)
    shots_t = as_uint8_nchw(shots)
    n_ref = len(as_uint8_nchw(reference))
    out: dict[str, float] = {"num_samples": float(len(samples_t)), "num_reference": float(n_ref)}
    for ext in extractors:
        if isinstance(ext, LPIPS):
            div = intra_cluster_diversity(
                samples_t, shots_t, ext, max_per_cluster=max_per_cluster, seed=seed, batch_size=batch_size
            )
            out[f"intra_lpips_{ext.net_name}"] = div.intra
            out[f"b_lpips_{ext.net_name}"] = div.balanced
            if details is not None:
                details[f"clusters_{ext.name}"] = div.cluster_sizes
            continue
        if not isinstance(ext, FeatureExtractor):
            raise TypeError(f"not a feature extractor or LPIPS: {type(ext).__name__}")
        name = ext.name
        _, mu_r, sigma_r = cache.statistics(ext, reference, batch_size)
        ref_feats = cache.features(ext, reference, batch_size)
        feats = ext.features(samples_t, batch_size)
        mu, sigma = feature_statistics(feats)
        out[f"fid_{name}"] = frechet_distance(mu, sigma, mu_r, sigma_r)
        k_mean, k_std = kid(feats, ref_feats, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        out[f"kid_{name}"] = k_mean
        out[f"kid_std_{name}"] = k_std
        shot_feats = cache.features(ext, shots, batch_size)
        div = intra_cluster_diversity(
            feats,
            shot_feats,
            FeatureDistance(ext.feature_distance),
            max_per_cluster=max_per_cluster,
            seed=seed,
            batch_size=max(batch_size, 256),
        )
        out[f"intra_dist_{name}"] = div.intra
        out[f"intra_dist_std_{name}"] = _bootstrap_intra(feats, shot_feats, ext, max_per_cluster, seed)
        out[f"b_dist_{name}"] = div.balanced
        if len(ref_feats) > 5:
            radii = cache.radii(ext, reference, ref_feats)
            out[f"density_{name}"], out[f"coverage_{name}"] = density_coverage(ref_feats, feats, radii=radii)
        if details is not None:
            details[f"clusters_{name}"] = div.cluster_sizes
    return {k: float(v) for k, v in out.items()}


def _bootstrap_intra(feats: torch.Tensor, shot_feats: torch.Tensor, ext, max_per_cluster: int, seed: int,
                     draws: int = 10) -> float:
    """Standard deviation of the intra-cluster diversity over bootstrap resamples of the samples:
    how much the number would move with another draw of the same size."""
    gen = torch.Generator().manual_seed(seed + 1)
    values = []
    for _ in range(draws):
        idx = torch.randint(0, len(feats), (len(feats),), generator=gen).to(feats.device)
        # resampling with replacement repeats samples: distance-0 pairs would bias the spread down
        idx = torch.unique(idx)
        v = intra_cluster_diversity(feats[idx], shot_feats, FeatureDistance(ext.feature_distance),
                                    max_per_cluster=max_per_cluster, seed=seed).intra
        if np.isfinite(v):
            values.append(v)
    return float(np.std(values)) if len(values) > 1 else float("nan")


def available_extractors(
    spec: Sequence[str],
    domain_encoder_path: Path | str | None = None,
    device: torch.device | str = "cpu",
    *,
    weights_dir: Path | str | None = None,
    lpips_resize: int | None = None,
) -> list[FeatureExtractor | LPIPS]:
    """Build the extractors named in ``spec`` (``"domain"``, ``"inception"``, ``"lpips_vgg"``,
    ``"lpips_alex"``), loading their weights from disk.

    Any weights that are missing are reported together in one :class:`MissingWeightsError`
    (file names, directories searched, how to obtain them); nothing is substituted.
    ``weights_dir`` is searched first for the Inception/VGG/AlexNet/LPIPS files.
    """
    unknown = [s for s in spec if s not in EXTRACTOR_NAMES]
    if unknown:
        raise ValueError(f"unknown extractor(s) {unknown}; choose from {list(EXTRACTOR_NAMES)}")
    built: list[FeatureExtractor | LPIPS] = []
    missing: list[MissingWeightsError] = []
    for s in dict.fromkeys(spec):  # de-duplicated, order kept
        try:
            if s == "domain":
                if domain_encoder_path is None:
                    raise MissingWeightsError(
                        ["<domain encoder file>"],
                        [],
                        "no domain_encoder_path was given: train one on the source domain with "
                        "trainers.metrics.train_domain_encoder(...) and .save() it",
                    )
                built.append(DomainEncoder.load(domain_encoder_path, device=device))
            elif s == "inception":
                built.append(InceptionExtractor.from_pretrained(weights_dir=weights_dir, device=device))
            else:
                net = s.split("_", 1)[1]
                built.append(LPIPS.from_pretrained(net, weights_dir=weights_dir, device=device, resize=lpips_resize))
        except MissingWeightsError as e:
            missing.append(e)
    if missing:
        if len(missing) == 1:
            raise missing[0]
        raise MissingWeightsError(
            [f for e in missing for f in e.filenames],
            list(dict.fromkeys(d for e in missing for d in e.searched)),
            " | ".join(e.how for e in missing),
        )
    return built
