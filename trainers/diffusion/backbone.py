"""The diffusion backbone shared by every DDPM method: a diffusers ``UNet2DModel`` and its noise
schedule, how a source model is loaded and saved, and DDIM sampling.

A source model is stored the way diffusers stores a ``DDPMPipeline`` (``unet/`` and
``scheduler/`` sub-folders), so real pretrained DDPM checkpoints (e.g. a Hub snapshot of
``google/ddpm-celebahq-256`` already on disk) and the ones this project pretrains load through
the same code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from trainers.common import SourceModelError, to_uint8

# Architecture presets for models this project trains itself. "tiny" is for tests, "small" is
# the embedded default (CPU demo), "base" is the improved-diffusion-like shape for real GPUs.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    "small": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    "base": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        dropout=0.1,
    ),
}


@dataclass
class DiffusionSource:
    """A pretrained DDPM: the UNet and the training noise schedule it was trained with."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    origin: str

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])


def build_unet(preset: str, resolution: int) -> UNet2DModel:
    if preset not in UNET_PRESETS:
        raise SourceModelError(f"unknown UNet preset {preset!r}; expected one of {sorted(UNET_PRESETS)}")
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, **UNET_PRESETS[preset])


def default_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    # Ho et al. 2020: linear betas 1e-4 -> 2e-2 over T = 1000, epsilon prediction.
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=2e-2,
        prediction_type="epsilon",
        clip_sample=True,
    )


def save_source(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | os.PathLike,
                extra: dict[str, Any] | None = None) -> Path:
    """Write a diffusers DDPMPipeline-style folder (``unet/``, ``scheduler/``); atomic per folder."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet.save_pretrained(tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(
        json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                    "scheduler": ["diffusers", type(scheduler).__name__], **(extra or {})}, indent=2)
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_source(spec: str, device: torch.device | str = "cpu") -> DiffusionSource:
    """Load a source DDPM from a diffusers folder (pipeline or bare UNet), a ``.pt`` checkpoint
    (``{"unet_config": dict, "state_dict": dict}``, optionally ``"scheduler_config"``), or a Hub id
    that is already in the local Hugging Face cache (no download is attempted)."""
    path = Path(spec).expanduser()
    if path.suffix in {".pt", ".pth", ".ckpt"}:
        if not path.is_file():
            raise SourceModelError(f"source checkpoint {path} does not exist")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or foreign file
            raise SourceModelError(f"cannot read source checkpoint {path}: {exc}") from exc
        if not isinstance(blob, dict) or "unet_config" not in blob or "state_dict" not in blob:
            raise SourceModelError(
                f"source checkpoint {path} must be a dict with keys 'unet_config' and 'state_dict' "
                f"(found {sorted(blob) if isinstance(blob, dict) else type(blob).__name__})"
            )
        unet = UNet2DModel.from_config(blob["unet_config"])
        unet.load_state_dict(blob["state_dict"])
        sched_cfg = blob.get("scheduler_config")
        scheduler = DDPMScheduler.from_config(sched_cfg) if sched_cfg else default_scheduler()
    elif path.is_dir():
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        if not (unet_dir / "config.json").is_file():
            raise SourceModelError(f"source folder {path} has no unet/config.json or config.json")
        unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False)
        sched_dir = path / "scheduler"
        scheduler = DDPMScheduler.from_pretrained(sched_dir) if sched_dir.is_dir() else default_scheduler()
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        try:  # a Hub id, from the local cache only: nothing is downloaded at run time
            unet = UNet2DModel.from_pretrained(spec, subfolder="unet", local_files_only=True,
                                               low_cpu_mem_usage=False)
            scheduler = DDPMScheduler.from_pretrained(spec, subfolder="scheduler", local_files_only=True)
        except Exception as exc:
            raise SourceModelError(
                f"source model {spec!r} is not a folder or .pt file, and not a Hub id in the local "
                f"Hugging Face cache ({exc.__class__.__name__}: {exc})"
            ) from exc
    else:
        raise SourceModelError(
            f"source model {spec} does not exist (expected a diffusers folder, a .pt checkpoint "
            "or a Hub id already in the local Hugging Face cache)"
        )
    return DiffusionSource(unet=unet.to(device), scheduler=scheduler, origin=str(spec))


@torch.no_grad()
def ddim_sample(unet: torch.nn.Module, train_scheduler: DDPMScheduler, n: int, resolution: int,
                steps: int, device: torch.device, seed: int = 0, eta: float = 0.0,
                batch_size: int = 64,
                autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) with ``steps`` steps; returns uint8 [n,3,H,W].
    ``autocast``: a (re-enterable) context for the UNet forwards, e.g. ``DevicePerf.autocast()``."""
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = unet.training
    unet.eval()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn(b, 3, resolution, resolution, generator=gen).to(device)
        for t in scheduler.timesteps:
            with autocast if autocast is not None else contextlib.nullcontext():
                eps = unet(x, t).sample
            x = scheduler.step(eps.float(), t, x, eta=eta, generator=gen if eta > 0 else None).prev_sample
        out.append(to_uint8(x))
    unet.train(was_training)
    return torch.cat(out)
