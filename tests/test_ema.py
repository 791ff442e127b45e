"""One EMA for both families (trainers.common.EMA): ``ema_decay`` is the same per-step decay in the
diffusion and the GAN methods; the only difference between the families is the warm-up, a named
knob (``ema_warmup``: on for diffusion as diffusers, off for GANs as rosinality/ADA). Checked on
the arithmetic and inside the methods, after a real training step."""

import copy

import pytest
import torch

from trainers.common import EMA, random_batch
from trainers.diffusion.backbone import DiffusionSource, build_unet, default_scheduler
from trainers.diffusion.ddpm_finetune import DDPMFinetune, DDPMFinetuneConfig
from trainers.gan.gan_finetune import ROSINALITY_EMA, GANFinetune, GANFinetuneConfig
from trainers.gan.source import GANSource
from trainers.nets.stylegan2 import build_discriminator, build_generator, preset_arch


def scalar_module(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


@pytest.mark.parametrize("warmup", [True, False])
def test_the_update_is_a_lerp_with_the_decay_of_the_step(warmup):
    target = scalar_module(1.0)
    ema = EMA(target, 0.9, warmup=warmup, start=scalar_module(0.0))
    expected = 0.0
    for n in range(1, 6):
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        expected = d * expected + (1 - d) * 1.0
        ema.update(target)
        assert ema.num_updates == n
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    # the warm-up caps the early decay (2/11 on the first step), so the EMA moves much faster
    assert (ema.module.weight.item() > 0.5) == warmup


def test_a_decay_given_per_step_replaces_the_configured_one():
    ema = EMA(scalar_module(1.0), 0.5, warmup=False, start=scalar_module(0.0))
    ema.update(scalar_module(1.0), decay=0.75)
    assert ema.module.weight.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"EMA decay must lie in \[0, 1\)"):
        EMA(scalar_module(0.0), 1.0, warmup=False)


def test_the_state_round_trips_and_a_resumed_ema_continues_identically():
    a = EMA(scalar_module(1.0), 0.9, warmup=True, start=scalar_module(0.0))
    for _ in range(3):
        a.update(scalar_module(1.0))
    b = EMA(scalar_module(1.0), 0.9, warmup=True, start=scalar_module(0.0))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.update(scalar_module(1.0))
    b.update(scalar_module(1.0))
    assert b.num_updates == 4 and torch.equal(a.module.weight, b.module.weight)


def test_both_families_use_the_one_ema_with_their_conventions():
    torch.manual_seed(0)
    diffusion = DDPMFinetune(DDPMFinetuneConfig(ema_decay=0.999),
                             DiffusionSource(build_unet("tiny", 16), default_scheduler(), "test"), "cpu")
    arch = preset_arch("tiny", 16)
    g = build_generator(arch)
    gan = GANFinetune(GANFinetuneConfig(ema_decay=ROSINALITY_EMA),
                      GANSource(g=g, g_ema=copy.deepcopy(g), d=build_discriminator(arch), arch=arch, origin="test"),
                      "cpu", seed=1)
    assert isinstance(diffusion.ema, EMA) and isinstance(gan.ema, EMA)
    assert diffusion.ema.warmup and not gan.ema.warmup  # the families' defaults
    assert gan.g_ema is gan.ema.module and gan.sampling_generator is gan.ema.module

    # the GAN's step is rosinality's accumulate with the configured d from the first step
    shots = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ema_before = [p.detach().clone() for p in gan.g_ema.parameters()]
    gan.train_step(random_batch(shots, 4, torch.Generator().manual_seed(0)))
    for e0, gp, e1 in zip(ema_before, gan.g.parameters(), gan.g_ema.parameters()):
        torch.testing.assert_close(e1, ROSINALITY_EMA * e0 + (1 - ROSINALITY_EMA) * gp.detach(), rtol=1e-5, atol=1e-6)

    # the diffusion step warms up: d = 2/11 on the first update, not 0.999
    e0 = [p.detach().clone() for p in diffusion.ema.module.parameters()]
    diffusion.train_step(random_batch(shots, 4, torch.Generator().manual_seed(0)))
    d = 2 / 11
    for a, p, b in zip(e0, diffusion.unet.parameters(), diffusion.ema.module.parameters()):
        torch.testing.assert_close(b, d * a + (1 - d) * p.detach(), rtol=1e-5, atol=1e-6)

    # and the warm-up is a knob of either family
    gan_warm = GANFinetune(GANFinetuneConfig(ema_decay=ROSINALITY_EMA, ema_warmup=True), gan_source_copy(gan), "cpu")
    diffusion_cold = DDPMFinetune(DDPMFinetuneConfig(ema_decay=0.999, ema_warmup=False),
                                  DiffusionSource(build_unet("tiny", 16), default_scheduler(), "test"), "cpu")
    assert gan_warm.ema.warmup and not diffusion_cold.ema.warmup


def gan_source_copy(m: GANFinetune) -> GANSource:
    arch = preset_arch("tiny", 16)
    return GANSource(g=copy.deepcopy(m.g), g_ema=copy.deepcopy(m.g_ema), d=copy.deepcopy(m.d), arch=arch, origin="test")


def test_a_gan_checkpoint_keeps_the_ema_count():
    arch = preset_arch("tiny", 16)
    torch.manual_seed(0)
    g = build_generator(arch)
    cfg = GANFinetuneConfig(ema_decay=0.9, ema_warmup=True)
    m = GANFinetune(cfg, GANSource(g=g, g_ema=copy.deepcopy(g), d=build_discriminator(arch), arch=arch,
                                   origin="test"), "cpu", seed=1)
    shots = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        m.train_step(random_batch(shots, 4, torch.Generator().manual_seed(i)))
    state = copy.deepcopy(m.state_dict())
    assert state["ema_updates"] == 2
    m2 = GANFinetune(cfg, gan_source_copy(m), "cpu", seed=1)
    m2.load_state_dict(state)
    assert m2.ema.num_updates == 2
