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
    """Exponential moving average of a module's parameters, one for both families: after each
    optimiser step ``ema ← d·ema + (1 − d)·θ``.

    ``decay`` means the same in every method: the per-step decay d at full strength (0 turns the
    EMA off, which the methods check before building one). ``warmup`` is the one place where the
    families' conventions differ, and it is a config knob (``ema_warmup``) rather than a silent
    second meaning:

    * ``warmup=True`` caps d at ``(1 + n) / (10 + n)`` on the n-th update (n counted from 1), the
      warm-up of improved-diffusion / diffusers' ``EMAModel``: the diffusion methods' default, so a
      few-shot run of a few hundred steps is not dominated by the source's weights.
    * ``warmup=False`` uses d from the first step: rosinality's ``accumulate`` and StyleGAN2-ADA, the
      GAN methods' default (their decay may also come per step from ``update(decay=...)``, e.g.
      ADA's ``0.5^(batch / ema_nimg)``).

    ``start``: the EMA's initial weights (a GAN's source ``g_ema``); by default a copy of ``module``.
    """

    def __init__(self, module: torch.nn.Module, decay: float, *, warmup: bool,
                 start: torch.nn.Module | None = None):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = (start if start is not None else copy.deepcopy(module)).eval().requires_grad_(False)

    def decay_now(self, decay: float | None = None) -> float:
        """The decay of the current update (``num_updates`` already counts it): ``decay`` (else the
        configured one), warmed up when ``warmup``."""
        d = self.decay if decay is None else decay
        return min(d, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else d

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float | None = None) -> None:
        self.num_updates += 1
        d = self.decay_now(decay)
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])


def generator_states(method: Any) -> dict[str, torch.Tensor]:
    """The state of every ``torch.Generator`` a method keeps as an attribute (noise, timesteps,
    latents, batches of its own). A method's ``state_dict`` leaves them out: the caller saves them
    once per process beside the weights (in data-parallel runs each rank's generators differ while
    one rank saves the weights), and restores them with :func:`load_generator_states`."""
    return {k: v.get_state() for k, v in vars(method).items() if isinstance(v, torch.Generator)}


def load_generator_states(method: Any, states: dict[str, torch.Tensor]) -> None:
    """Restore :func:`generator_states` wherever the tensors were loaded: ``Generator.set_state``
    accepts only a CPU ByteTensor, also for a CUDA generator. A name the method no longer has is
    skipped."""
    for name, state in states.items():
        gen = vars(method).get(name)
        if isinstance(gen, torch.Generator):
            gen.set_state(state.detach().to("cpu", torch.uint8))

