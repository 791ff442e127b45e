"""Pieces that every method family uses: the source-model error, image conversions, the seeded
batch draw of the few-shot images, and an exponential moving average of a module's weights.

Plain PyTorch (no Ray, no MLflow), shared by the diffusion and the GAN methods.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class SourceModelError(ValueError):
    """A source model could not be found or loaded, or does not fit the method or the task; the
    message names the path or id and what was expected."""


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> float in [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 (values outside are clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def random_batch(images: torch.Tensor, batch_size: int, generator: torch.Generator,
                 hflip: bool = True, return_index: bool = False):
    """Sample a batch (with replacement when the shots are fewer than the batch) and randomly
    flip it horizontally; indices and flips come from ``generator`` only, so a run whose
    generator state is saved and restored draws exactly the same batches. With
    ``return_index`` also the indices of the drawn images (on the images' device)."""
    n = images.shape[0]
    idx = torch.randint(0, n, (batch_size,), generator=generator, device=generator.device)
    idx = idx.to(images.device)
    x = to_model_range(images[idx])
    if hflip:
        flip = torch.rand(batch_size, generator=generator, device=generator.device) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return (x, idx) if return_index else x


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up
    ``min(decay, (1 + n) / (10 + n))`` so that short few-shot runs are not dominated by the source
    weights (the warm-up is standard in improved-diffusion/diffusers style training)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])


def generator_state_to(generator: torch.Generator, state: torch.Tensor) -> None:
    """Restore a ``torch.Generator`` from a saved state wherever the state tensor was loaded:
    ``Generator.set_state`` accepts only a CPU ByteTensor, also for a CUDA generator."""
    generator.set_state(state.detach().to("cpu", torch.uint8))
