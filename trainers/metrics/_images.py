"""Image-format helpers shared by the metric modules.

Convention of the project: images are ``torch.uint8`` tensors ``[N,3,H,W]``. Numpy arrays in the
``[N,H,W,3]`` layout (what ``trainers.data.render`` returns) are accepted everywhere and converted
here, so that every metric entry point takes either.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ImageBatch = Union[torch.Tensor, np.ndarray]


def as_uint8_nchw(images: ImageBatch) -> torch.Tensor:
    """Return ``images`` as a uint8 tensor ``[N,3,H,W]`` (no copy when it already is one).

    Accepts a uint8 tensor ``[N,3,H,W]`` or a uint8 numpy array ``[N,H,W,3]`` (a single image
    without the batch axis is promoted). Anything else is an error rather than a guess.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 [N,H,W,3], got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be [N,H,W,3], got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"image tensors must be uint8 [N,3,H,W], got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image tensors must be [N,3,H,W], got shape {tuple(images.shape)}")
    return images


def to_unit(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` -> float32 in [0, 1] on ``device``."""
    return images.to(device=device, non_blocking=True).float().div_(255.0)


def to_signed(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` -> float32 in [-1, 1] on ``device`` (floats are assumed already so)."""
    if images.dtype == torch.uint8:
        return images.to(device=device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return images.to(device=device, dtype=torch.float32)
