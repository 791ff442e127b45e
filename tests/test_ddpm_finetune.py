"""The ddpm_finetune method and the diffusion backbone, on tiny models on the CPU."""

import copy

import torch

from trainers.common import SourceModelError, generator_states, load_generator_states, random_batch
from trainers.diffusion.backbone import DiffusionSource, build_unet, default_scheduler, load_source, save_source
from trainers.diffusion.ddpm_finetune import DDPMFinetune, DDPMFinetuneConfig

import pytest


def tiny_source(resolution: int = 16, seed: int = 0) -> DiffusionSource:
    torch.manual_seed(seed)
    return DiffusionSource(build_unet("tiny", resolution), default_scheduler(), "test")


def shots(n: int = 4, res: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def test_loss_is_finite_and_falls_on_a_tiny_model():
    torch.set_num_threads(2)
    m = DDPMFinetune(DDPMFinetuneConfig(lr=2e-3, batch_size=8, ema_decay=0), tiny_source(), "cpu")
    images = shots(2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        out = m.train_step(random_batch(images, 8, gen))
        assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
        losses.append(out["loss"])
    assert sum(losses[-15:]) / 15 < 0.8 * sum(losses[:15]) / 15
    assert m.step == 60


def test_state_dict_resumes_bit_for_bit():
    images = shots()
    cfg = DDPMFinetuneConfig(batch_size=4, ema_decay=0.9)
    a = DDPMFinetune(cfg, tiny_source(), "cpu", seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.train_step(random_batch(images, 4, gen))
    state = copy.deepcopy(a.state_dict())  # as torch.save/torch.load would hand it back
    gens = copy.deepcopy(generator_states(a))  # the RNGs travel beside the state (trainers.common)
    b = DDPMFinetune(cfg, tiny_source(seed=1), "cpu", seed=99)
    b.load_state_dict(state)
    load_generator_states(b, gens)
    batch = random_batch(images, 4, gen)
    la, lb = a.train_step(batch.clone()), b.train_step(batch.clone())
    assert la["loss"] == lb["loss"]
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)


def test_sample_is_uint8_deterministic_and_uses_ema():
    m = DDPMFinetune(DDPMFinetuneConfig(ema_decay=0.99), tiny_source(), "cpu")
    s1, s2 = m.sample(3, steps=4, seed=5), m.sample(3, steps=4, seed=5)
    assert s1.dtype == torch.uint8 and s1.shape == (3, 3, 16, 16)
    assert torch.equal(s1, s2)
    assert m.sampling_unet is m.ema.module


def test_timestep_range_is_validated():
    with pytest.raises(ValueError, match="timestep range"):
        DDPMFinetune(DDPMFinetuneConfig(t_min=500, t_max=100), tiny_source(), "cpu")


def test_export_loads_back_as_a_source(tmp_path):
    m = DDPMFinetune(DDPMFinetuneConfig(ema_decay=0), tiny_source(), "cpu")
    folder = m.export(tmp_path / "model")
    src = load_source(str(folder))
    assert src.resolution == 16
    for (k, p), (_, q) in zip(m.unet.state_dict().items(), src.unet.state_dict().items()):
        assert torch.equal(p, q), k


def test_source_formats_and_errors(tmp_path):
    src = tiny_source()
    save_source(src.unet, src.scheduler, tmp_path / "pipe")
    assert load_source(str(tmp_path / "pipe")).resolution == 16
    src.unet.save_pretrained(tmp_path / "bare")  # a bare UNet folder
    assert load_source(str(tmp_path / "bare")).resolution == 16
    torch.save({"unet_config": dict(src.unet.config), "state_dict": src.unet.state_dict()}, tmp_path / "s.pt")
    assert load_source(str(tmp_path / "s.pt")).resolution == 16
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(SourceModelError, match="bad.pt must be a dict with keys"):
        load_source(str(tmp_path / "bad.pt"))
    with pytest.raises(SourceModelError, match="does not exist"):
        load_source(str(tmp_path / "missing"))
    with pytest.raises(SourceModelError, match="not a Hub id in the local"):
        load_source("nobody/no-such-model")
