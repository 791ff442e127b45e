"""The GAN methods (gan_finetune, dcl, GANPretrain) and their losses, on tiny 16² StyleGAN2s on
the CPU."""

import copy
import math

import pytest
import torch

from trainers.common import SourceModelError, generator_states, load_generator_states, random_batch
from trainers.gan.dcl import DCL, DCLConfig, select_layers
from trainers.gan.gan_finetune import ROSINALITY_EMA, GANFinetune, GANFinetuneConfig
from trainers.gan.losses import d_r1_loss, info_nce, info_nce_in_batch
from trainers.gan.pretrain import GANPretrain, GANPretrainConfig
from trainers.gan.source import GANSource, load_gan_source
from trainers.nets.stylegan2 import build_discriminator, build_generator, preset_arch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_source(resolution: int = 16, seed: int = 0) -> GANSource:
    torch.manual_seed(seed)
    arch = preset_arch("tiny", resolution)
    g = build_generator(arch)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    return GANSource(g=g, g_ema=g_ema, d=build_discriminator(arch), arch=arch, origin="test")


def shots(n: int = 4, res: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


# -- InfoNCE -------------------------------------------------------------------------------------
def test_info_nce_is_log_n_for_uninformative_features():
    n = 5
    same = torch.ones(n, 3, 4, 4)
    assert math.isclose(float(info_nce_in_batch(same, same)), math.log(n), rel_tol=1e-5)
    const = torch.randn(1, 7).expand(n, 7)
    assert math.isclose(float(info_nce_in_batch(const, const * 2)), math.log(n), rel_tol=1e-5)
    # shared negatives [K, ...] and per-anchor negatives [N, K, ...]: log(1 + K)
    assert math.isclose(float(info_nce(same, same, torch.ones(3, 3, 4, 4))), math.log(4), rel_tol=1e-5)
    assert math.isclose(float(info_nce(same, same, torch.ones(n, 6, 3, 4, 4))), math.log(7), rel_tol=1e-5)


def test_info_nce_falls_when_positives_align_with_anchors():
    torch.manual_seed(0)
    a = torch.randn(6, 32)
    keys_random = torch.randn(6, 32)
    aligned = info_nce_in_batch(a, a + 0.01 * torch.randn(6, 32), temperature=0.1)
    unaligned = info_nce_in_batch(a, keys_random, temperature=0.1)
    assert float(aligned) < 0.05 < math.log(6) * 0.5 < float(unaligned)
    negs = torch.randn(4, 32)
    assert float(info_nce(a, a, negs, 0.1)) < float(info_nce(a, keys_random, negs, 0.1))
    # lower temperature sharpens: an aligned positive gets an even smaller loss
    assert float(info_nce(a, a, negs, 0.05)) < float(info_nce(a, a, negs, 0.5))


def test_r1_is_the_squared_input_gradient():
    x = torch.randn(3, 2, requires_grad=True)
    pred = (x * torch.tensor([2.0, -1.0])).sum(1)  # gradient (2, -1) per sample: ||.||² = 5
    assert math.isclose(float(d_r1_loss(pred, x)), 5.0, rel_tol=1e-6)


# -- gan_finetune / dcl steps ----------------------------------------------------------------------
@pytest.mark.parametrize("cls,cfg", [
    (GANFinetune, GANFinetuneConfig(d_reg_every=2, path_regularize=2.0, g_reg_every=2, ema_decay=ROSINALITY_EMA)),
    (DCL, DCLConfig(d_reg_every=2, ema_decay=ROSINALITY_EMA)),
])
def test_train_steps_run_and_update_both_networks(cls, cfg):
    m = cls(cfg, tiny_source(), "cpu", seed=1)
    g0, d0 = params(m.g), params(m.d)
    gen = torch.Generator().manual_seed(0)
    images = shots()
    outs = [m.train_step(random_batch(images, 4, gen)) for _ in range(2)]
    for out in outs:
        assert all(math.isfinite(v) for v in out.values()), out
    assert "r1" in outs[0] and "d_adv" in outs[0] and "g_adv" in outs[0]
    if cls is DCL:
        assert {"d_cl", "g_cl", "g_cl_d"} <= set(outs[0])
    else:
        assert "path" in outs[0]
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, m.d.parameters()))
    # EMA moved a little towards G, but is not G
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.g_ema.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(m.g.parameters(), m.g_ema.parameters()))
    assert m.step == 2


def test_dcl_source_generator_is_frozen_and_gets_no_gradient():
    m = DCL(DCLConfig(), tiny_source(), "cpu")
    before = params(m.g_source)
    # at build time the source copy equals the adapted G (G_t starts from G_s)
    assert all(torch.equal(a, b) for a, b in zip(before, m.g.parameters()))
    m.train_step(random_batch(shots(), 4, torch.Generator().manual_seed(0)))
    assert all(not p.requires_grad and p.grad is None for p in m.g_source.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, m.g_source.parameters()))
    assert not m.g_source.training
    # the contrastive terms alone send gradients into the adapted G and nowhere into G_s
    m.g.zero_grad(set_to_none=True)
    lat = m.draw_latents(4)
    fake_t, _, feats_t = m.generate(m.g, lat, return_features=True)
    _, feats_s = m.source_forward(lat)
    assert all(not f.requires_grad for f in feats_s)
    m.cl_g(feats_t, feats_s).backward()
    grads = [p.grad for p in m.g.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in m.g_source.parameters())


def test_dcl_same_latents_give_identical_source_and_target_at_start():
    m = DCL(DCLConfig(mixing=0.9), tiny_source(), "cpu")
    lat = m.draw_latents(3)
    with torch.no_grad():
        img_t, _, f_t = m.generate(m.g, lat, return_features=True)
    img_s, f_s = m.source_forward(lat)
    assert torch.equal(img_t, img_s) and all(torch.equal(a, b) for a, b in zip(f_t, f_s))
    assert len(f_t) == m.g.num_layers


def test_dcl_layer_selection_and_terms():
    assert select_layers("all", 5) == [0, 1, 2, 3, 4]
    assert select_layers("early", 5) == [0, 1] and select_layers("late", 5) == [2, 3, 4]
    assert select_layers([0, -1], 5) == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_layers([7], 5)
    with pytest.raises(ValueError):
        DCLConfig(g_layers=[])
    m = DCL(DCLConfig(cl_d_updates="d", lambda_g=0.0, g_layers=[1, 2], d_layers="late"), tiny_source(), "cpu")
    assert m.g_layer_idx == [1, 2] and m.d_layer_idx == [3, 4, 5]
    out = m.train_step(random_batch(shots(), 4, torch.Generator().manual_seed(0)))
    assert "d_cl" in out and "g_cl" not in out and "g_cl_d" not in out
    space = DCLConfig.search_space()
    assert {"lambda_g", "lambda_d", "temperature", "g_layers", "d_layers", "lr"} <= set(space)
    # the baseline's training knobs, with the baseline's ranges: sweeps compare the two alike
    assert {k: space[k] for k in GANFinetuneConfig.search_space()} == GANFinetuneConfig.search_space()
    for key, spec in space.items():  # every corner of the space is a valid config
        kind, values = next(iter(spec.items()))
        for v in values if kind == "choice" else values[:2]:
            DCLConfig(**{key: v})


@pytest.mark.parametrize("cls,cfg", [
    (GANFinetune, GANFinetuneConfig(d_reg_every=2, path_regularize=2.0, g_reg_every=2, mixing=0.5,
                                    ema_decay=ROSINALITY_EMA)),
    (DCL, DCLConfig(d_reg_every=3, mixing=0.5, ema_decay=ROSINALITY_EMA)),
])
def test_state_dict_resumes_bit_for_bit(cls, cfg):
    images = shots()
    gen = torch.Generator().manual_seed(0)
    a = cls(cfg, tiny_source(), "cpu", seed=3)
    for _ in range(2):
        a.train_step(random_batch(images, 4, gen))
    state = copy.deepcopy(a.state_dict())  # as torch.save/torch.load would hand it back
    gens = copy.deepcopy(generator_states(a))  # the RNGs travel beside the state (trainers.common)
    b = cls(cfg, tiny_source(seed=1), "cpu", seed=99)
    b.load_state_dict(state)
    load_generator_states(b, gens)
    for _ in range(2):  # crosses an R1 step and a path-length step
        batch = random_batch(images, 4, gen)
        la, lb = a.train_step(batch.clone()), b.train_step(batch.clone())
        assert la == lb
    for ma, mb in [(a.g, b.g), (a.d, b.d), (a.g_ema, b.g_ema)]:
        for p, q in zip(ma.state_dict().values(), mb.state_dict().values()):
            assert torch.equal(p, q)
    assert torch.equal(a.sample(2, seed=1), b.sample(2, seed=1))


def test_sample_is_uint8_deterministic_and_uses_ema():
    m = GANFinetune(GANFinetuneConfig(ema_decay=ROSINALITY_EMA), tiny_source(), "cpu")
    s1, s2 = m.sample(3, seed=5), m.sample(3, seed=5)
    assert s1.dtype == torch.uint8 and s1.shape == (3, 3, 16, 16) and s1.device.type == "cpu"
    assert torch.equal(s1, s2) and not torch.equal(s1, m.sample(3, seed=6))
    assert m.sampling_generator is m.g_ema
    # off by default (short few-shot runs: see the module docstring); the trained G is sampled
    plain = GANFinetune(GANFinetuneConfig(), tiny_source(), "cpu")
    assert plain.g_ema is None and plain.sampling_generator is plain.g
    truncated = GANFinetune(GANFinetuneConfig(truncation=0.5), tiny_source(), "cpu").sample(3, seed=5)
    assert truncated.shape == s1.shape


def test_export_loads_back_with_identical_samples(tmp_path):
    cfg = DCLConfig()
    m = DCL(cfg, tiny_source(), "cpu")
    m.train_step(random_batch(shots(), 4, torch.Generator().manual_seed(0)))
    folder = m.export(tmp_path / "model")
    src = load_gan_source(str(folder))
    assert src.resolution == 16 and src.d is not None and src.extra["adapted_by"] == "dcl"
    again = GANFinetune(GANFinetuneConfig(), src, "cpu")
    assert torch.equal(again.sample(4, seed=2), m.sample(4, seed=2))
    for p, q in zip(src.g.state_dict().values(), m.g.state_dict().values()):
        assert torch.equal(p, q)


def test_a_source_without_discriminator_is_rejected():
    src = tiny_source()
    src.d = None
    with pytest.raises(SourceModelError, match="no discriminator"):
        GANFinetune(GANFinetuneConfig(), src, "cpu")


def test_pretrain_runs_and_its_export_loads(tmp_path):
    cfg = GANPretrainConfig(preset="tiny", batch_size=4)
    m = GANPretrain(cfg, 16, "cpu", seed=0)
    assert m.r1_gamma == pytest.approx(0.0002 * 16 ** 2 / 4)
    g0 = params(m.g_ema)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = m.train_step(random_batch(shots(8), 4, gen))
        assert all(math.isfinite(v) for v in out.values())
    # with ADA's ramp-up the EMA follows G closely at the start (it is not stuck at the init)
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.g_ema.parameters()))
    folder = m.export(tmp_path / "source")
    src = load_gan_source(str(folder))
    assert src.arch == preset_arch("tiny", 16) and src.origin == str(folder)
    # a fine-tuning with EMA samples the export's g_ema (the pretrain's sampled generator) at step 0
    ema = GANFinetuneConfig(ema_decay=ROSINALITY_EMA)
    assert torch.equal(GANFinetune(ema, src, "cpu").sample(2, seed=0), m.sample(2, seed=0))
    with pytest.raises(ValueError, match="unknown StyleGAN2 preset"):
        GANPretrainConfig(preset="huge")


def test_defaults_move_the_samples_to_a_new_domain_within_a_short_run():
    """The default config adapts within a short run (EMA off, see gan_finetune's docstring): ten
    dark shots pull the sampled images' brightness towards theirs; rosinality's EMA (0.99778 per
    step) keeps the sampled generator near the source over the same steps. GAN training
    oscillates, so the closest approach over the run is compared (checked every 30 steps)."""
    g = torch.Generator().manual_seed(0)
    dark = torch.randint(5, 40, (10, 3, 16, 16), generator=g, dtype=torch.uint8)
    dark[:, :, 7:9, 3:13] = 230  # a light stroke on each, as glyphs on a dark background
    target = float(dark.float().mean())

    def gaps(cfg: GANFinetuneConfig, steps: int = 120) -> list[float]:
        m = GANFinetune(cfg, tiny_source(), "cpu", seed=0)
        batches = torch.Generator().manual_seed(1)
        out = [abs(float(m.sample(32, seed=1).float().mean()) - target)]
        for step in range(1, steps + 1):
            m.train_step(random_batch(dark, 4, batches))
            if step % 30 == 0:
                out.append(abs(float(m.sample(32, seed=1).float().mean()) - target))
        return out

    default, ema = gaps(GANFinetuneConfig()), gaps(GANFinetuneConfig(ema_decay=ROSINALITY_EMA))
    assert default[0] == ema[0] > 20  # the same source, far from the target's brightness
    assert min(default[1:]) < 0.5 * default[0], default
    assert min(ema[1:]) > 0.8 * ema[0], ema  # 0.99778^120 ≈ 0.77: most of G_ema is still the source
