"""Common surface of the feature extractors used by FID/KID and feature-space diversity."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._images import ImageBatch, as_uint8_nchw


class FeatureExtractor(nn.Module):
    """A frozen network mapping uint8 images ``[N,3,H,W]`` to features ``[N, D]``.

    ``name`` goes into the metric keys (``fid_<name>``, ``kid_<name>``, ``intra_dist_<name>``);
    ``feature_distance`` (``"cosine"`` or ``"l2"``) is the distance used for the intra-cluster
    diversity in this feature space. Subclasses implement ``_forward_batch``.
    """

    name: str = "features"
    feature_distance: str = "cosine"
    batch_size: int = 64

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _forward_batch(self, images_uint8: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: ImageBatch, batch_size: int | None = None) -> torch.Tensor:
        """Features ``[N, D]`` (float32, on the extractor's device), computed in eval mode."""
        images = as_uint8_nchw(images)
        bs = batch_size or self.batch_size
        was_training = self.training
        self.eval()
        try:
            out = [self._forward_batch(images[s : s + bs]).float() for s in range(0, len(images), bs)]
        finally:
            self.train(was_training)
        if not out:
            raise ValueError("no images given")
        return torch.cat(out)
