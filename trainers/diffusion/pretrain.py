"""Pretraining of a source DDPM from scratch on a source domain (the synthetic one by default).

It is the same objective as ``ddpm_finetune`` (L_simple, Ho et al. 2020) starting from a freshly
initialised UNet of a preset shape, with the DDPM training recipe's Adam-style optimiser.
"""

from __future__ import annotations

import torch
from pydantic import Field

from trainers.diffusion.backbone import DiffusionSource, build_unet, default_scheduler
from trainers.diffusion.ddpm_finetune import DDPMFinetune, DDPMFinetuneConfig
from trainers.perf import DevicePerf


class DDPMPretrainConfig(DDPMFinetuneConfig):
    preset: str = Field("small", description="UNet shape: tiny | small | base")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    # ema_decay / ema_warmup: fine-tuning's (0.999, warmed up: trainers.common.EMA)


class DDPMPretrain(DDPMFinetune):
    key = "ddpm_pretrain"
    family = "diffusion"
    Config = DDPMPretrainConfig

    def __init__(self, config: DDPMPretrainConfig, resolution: int, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None):
        torch.manual_seed(seed)  # the initial weights are part of the run's identity
        source = DiffusionSource(unet=build_unet(config.preset, resolution), scheduler=default_scheduler(),
                                 origin=f"scratch:{config.preset}")
        super().__init__(config, source, device, seed, perf)
