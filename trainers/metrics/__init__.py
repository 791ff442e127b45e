"""Metrics of few-shot generation: FID/KID, Intra-LPIPS / B-LPIPS and feature-space diversity,
with the feature networks that make them (each metric key names its network).

Plain PyTorch: no Ray, no MLflow, no downloads. See ``evaluate.py`` for the metric keys.
"""

from ._images import as_uint8_nchw
from .diversity import (
    ClusterDiversity,
    FeatureDistance,
    intra_cluster_diversity,
    pairwise_distance_matrix,
    pairwise_distances_condensed,
)
from .domain_encoder import DomainEncoder, train_domain_encoder
from .evaluate import EXTRACTOR_NAMES, ReferenceStats, available_extractors, evaluate
from .extractor import FeatureExtractor
from .fid import feature_statistics, fid_from_features, frechet_distance, kid
from .inception import FID_WEIGHTS_FILE, FIDInceptionV3, InceptionExtractor
from .lpips import LPIPS
from .weights import MissingWeightsError

__all__ = [
    "ClusterDiversity",
    "DomainEncoder",
    "EXTRACTOR_NAMES",
    "FID_WEIGHTS_FILE",
    "FIDInceptionV3",
    "FeatureDistance",
    "FeatureExtractor",
    "InceptionExtractor",
    "LPIPS",
    "MissingWeightsError",
    "ReferenceStats",
    "as_uint8_nchw",
    "available_extractors",
    "evaluate",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "intra_cluster_diversity",
    "kid",
    "pairwise_distance_matrix",
    "pairwise_distances_condensed",
    "train_domain_encoder",
]
