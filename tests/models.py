"""Tiny models made in memory (random weights, seconds on the CPU): sources of both families and
one export of every method, for tests that need a model but not a trained one."""

from __future__ import annotations

from pathlib import Path

import torch

from trainers.base import PrepareContext
from trainers.data import render
from trainers.diffusion.backbone import DiffusionSource, build_unet, default_scheduler
from trainers.gan.source import GANSource
from trainers.nets.stylegan2 import build_discriminator, build_generator, preset_arch

RES = 16


def ddpm_source(resolution: int = RES, seed: int = 0) -> DiffusionSource:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiffusionSource(build_unet("tiny", resolution), default_scheduler(), "tiny-random-ddpm")


def gan_source(resolution: int = RES, seed: int = 0) -> GANSource:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        arch = preset_arch("tiny", resolution)
        g = build_generator(arch)
        g_ema = build_generator(arch).eval().requires_grad_(False)
        return GANSource(g=g, g_ema=g_ema, d=build_discriminator(arch), arch=arch, origin="tiny-random-gan")


def images_of(domain: str, n: int, seed: int = 0, resolution: int = RES) -> torch.Tensor:
    """uint8 [n,3,H,W] images of a built-in synthetic domain."""
    return torch.from_numpy(render(domain, n, resolution, seed=seed)).permute(0, 3, 1, 2).contiguous()


def encoder_file(path: Path, seed: int = 0, resolution: int = RES) -> Path:
    """An untrained tiny DomainEncoder saved at ``path`` (enough for k-means pseudo-labels)."""
    from trainers.metrics.domain_encoder import DomainEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = DomainEncoder(resolution=resolution, widths=(8, 8, 16, 16))
    return enc.eval().save(path)


def export_method(method: str, folder: Path, steps: int = 1, seed: int = 0) -> Path:
    """``method`` built from a tiny random source, trained ``steps`` steps on synthetic sketches,
    exported to ``folder`` (what a finished run publishes)."""
    from trainers.common import random_batch
    from trainers.registry import get_method

    cls = get_method(method)
    family = cls.family
    overrides = {"batch_size": 3}
    if method == "self_guided":
        overrides["k_target"] = 2
    if method == "lfs_gan":
        overrides["fake_multiplier"] = 1
    cfg = cls.Config(**overrides)
    source = ddpm_source(seed=seed) if family == "diffusion" else gan_source(seed=seed)
    m = cls(cfg, source, "cpu", seed=seed)
    shots = images_of("sketch", 4)
    ctx = PrepareContext(domain_encoder=encoder_file(folder.parent / f"{method}-encoder.pt"),
                         cache_dir=folder.parent / "annotations")
    m.prepare(shots, ctx)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if m.wants_index:
            batch, index = random_batch(shots, 3, gen, return_index=True)
            m.train_step(batch, index=index)
        else:
            m.train_step(random_batch(shots, 3, gen))
    return m.export(folder)
