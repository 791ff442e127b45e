"""Pretraining of a source StyleGAN2 from scratch on a source domain (the synthetic one by default).

The same iteration as ``gan_finetune`` (rosinality's ``train.py``: logistic non-saturating loss,
lazy R1, optional lazy path-length regularisation, EMA generator) starting from freshly
initialised networks of a preset shape (``trainers.nets.stylegan2.GAN_PRESETS``).

Choices:

* Adam lr 0.002, betas (0, 0.99) with the lazy-regularisation correction (StyleGAN2 appendix B),
  batch 16 (rosinality's per-GPU default), style mixing 0.9.
* R1 γ: ``r1=None`` (default here) uses StyleGAN2-ADA's heuristic γ = 0.0002·res²/batch (Karras et
  al. 2020b, the 'auto' config): γ = 10 (FFHQ-1024 config-f) over-regularises the small 16²–64²
  sources this project trains on the CPU. Set ``r1`` to fix it.
* EMA: rosinality's accumulate with the decay of StyleGAN2-ADA, 0.5^(batch/(ema_kimg·1000)),
  ema_kimg = 10 (rosinality's 0.5^(32/10⁴) at batch 32) and ADA's ramp-up 0.05
  (ema_nimg ≤ 0.05 × images seen) so that short CPU runs do not leave G_ema at its random init.
* Path-length regularisation off by default (``path_regularize=2`` is StyleGAN2's value).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field, field_validator

from trainers.gan.gan_finetune import GANFinetune, GANFinetuneConfig
from trainers.gan.source import GANSource
from trainers.nets.stylegan2 import GAN_PRESETS, build_discriminator, build_generator, preset_arch
from trainers.perf import DevicePerf


class GANPretrainConfig(GANFinetuneConfig):
    preset: str = Field("small", description="StyleGAN2 shape: " + " | ".join(GAN_PRESETS))
    lr: float = Field(0.002, gt=0)
    batch_size: int = Field(16, ge=1)
    r1: float | None = Field(None, ge=0, description="R1 γ; null: 0.0002·res²/batch (StyleGAN2-ADA)")
    ema_kimg: float | None = Field(10.0, gt=0)
    ema_rampup: float | None = Field(0.05, gt=0)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in GAN_PRESETS:
            raise ValueError(f"unknown StyleGAN2 preset {v!r}; expected one of {sorted(GAN_PRESETS)}")
        return v


class GANPretrain(GANFinetune):
    key = "gan_pretrain"
    family = "gan"
    Config = GANPretrainConfig

    def __init__(self, config: GANPretrainConfig, resolution: int, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None):
        if config.preset not in GAN_PRESETS:
            raise ValueError(f"unknown StyleGAN2 preset {config.preset!r}; expected one of {sorted(GAN_PRESETS)}")
        torch.manual_seed(seed)  # the initial weights are part of the run's identity
        arch = preset_arch(config.preset, resolution)
        g = build_generator(arch)
        g_ema = copy.deepcopy(g).eval().requires_grad_(False)
        source = GANSource(g=g, g_ema=g_ema, d=build_discriminator(arch), arch=arch,
                           origin=f"scratch:{config.preset}")
        super().__init__(config, source, device, seed, perf)
