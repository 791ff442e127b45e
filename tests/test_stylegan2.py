"""The StyleGAN2 networks (trainers/nets/stylegan2.py) and the rosinality checkpoint format
(trainers/gan/source.py), on tiny widths on the CPU."""

import argparse
import math

import pytest
import torch

from trainers.gan.source import CHECKPOINT_NAME, SourceModelError, infer_arch, load_gan_source, save_gan_source
from trainers.nets.stylegan2 import (
    Discriminator, Generator, Upsample, build_discriminator, build_generator, channel_table, preset_arch, upfirdn2d,
)


@pytest.fixture(autouse=True)
def one_thread():
    # the CPU is shared: one intra-op thread is much faster for these tiny convolutions
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(size, style_dim=16, n_mlp=2, narrow=1 / 32, seed=0):
    torch.manual_seed(seed)
    return (Generator(size, style_dim, n_mlp, narrow=narrow),
            Discriminator(size, narrow=narrow))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_output_shapes(size):
    g, d = tiny(size)
    z = torch.randn(3, 16)
    img, latent = g([z], return_latents=True)
    assert img.shape == (3, 3, size, size)
    assert latent.shape == (3, g.n_latent, 16) and g.n_latent == 2 * int(math.log2(size)) - 2
    logits = d(img)
    assert logits.shape == (3, 1)
    # two styles mix at inject_index: the first layers see z1, the rest z2
    _, mixed = g([z, torch.randn(3, 16)], inject_index=1, return_latents=True)
    assert torch.equal(mixed[:, 0], g.style(z)) and not torch.equal(mixed[:, 1], g.style(z))


def test_64_smoke_and_batch_not_divisible_by_four():
    g, d = tiny(64, narrow=1 / 64)
    img, _ = g([torch.randn(6, 16)])
    assert img.shape == (6, 3, 64, 64) and torch.isfinite(img).all()
    assert d(img).shape == (6, 1)  # rosinality's min(batch, 4) group would fail for 6


def test_invalid_sizes_are_rejected():
    for size in (4, 12, 2048):
        with pytest.raises(ValueError, match="power of two"):
            Generator(size, 8, 1)


# rosinality/stylegan2-pytorch model.py, Generator(8, style_dim, n_mlp=2) and Discriminator(8)
ROSINALITY_G8 = [
    "style.1.weight", "style.1.bias", "style.2.weight", "style.2.bias",
    "input.input",
    "conv1.conv.weight", "conv1.conv.modulation.weight", "conv1.conv.modulation.bias",
    "conv1.noise.weight", "conv1.activate.bias",
    "to_rgb1.bias", "to_rgb1.conv.weight", "to_rgb1.conv.modulation.weight", "to_rgb1.conv.modulation.bias",
    "convs.0.conv.weight", "convs.0.conv.blur.kernel", "convs.0.conv.modulation.weight",
    "convs.0.conv.modulation.bias", "convs.0.noise.weight", "convs.0.activate.bias",
    "convs.1.conv.weight", "convs.1.conv.modulation.weight", "convs.1.conv.modulation.bias",
    "convs.1.noise.weight", "convs.1.activate.bias",
    "to_rgbs.0.bias", "to_rgbs.0.upsample.kernel", "to_rgbs.0.conv.weight",
    "to_rgbs.0.conv.modulation.weight", "to_rgbs.0.conv.modulation.bias",
    "noises.noise_0", "noises.noise_1", "noises.noise_2",
]
ROSINALITY_D8 = [
    "convs.0.0.weight", "convs.0.1.bias",
    "convs.1.conv1.0.weight", "convs.1.conv1.1.bias",
    "convs.1.conv2.0.kernel", "convs.1.conv2.1.weight", "convs.1.conv2.2.bias",
    "convs.1.skip.0.kernel", "convs.1.skip.1.weight",
    "final_conv.0.weight", "final_conv.1.bias",
    "final_linear.0.weight", "final_linear.0.bias", "final_linear.1.weight", "final_linear.1.bias",
]


def test_key_names_match_rosinality():
    g, d = tiny(8, style_dim=8)
    assert list(g.state_dict()) == ROSINALITY_G8
    assert list(d.state_dict()) == ROSINALITY_D8
    # shapes of the rosinality layout (weights [1, out, in, k, k], blur kernels 4×4, noise maps)
    sd = g.state_dict()
    assert sd["convs.0.conv.weight"].shape == (1, 16, 16, 3, 3)
    assert sd["to_rgbs.0.conv.weight"].shape == (1, 3, 16, 1, 1)
    assert sd["noises.noise_2"].shape == (1, 1, 8, 8)
    # at 32²: 2 convs, 1 ToRGB and 2 noise maps per octave above 4², 4 ResBlocks in D
    g, d = tiny(32)
    keys = list(g.state_dict())
    assert len({k.split(".")[1] for k in keys if k.startswith("convs.")}) == 6
    assert len({k.split(".")[1] for k in keys if k.startswith("to_rgbs.")}) == 3
    assert sum(k.startswith("noises.") for k in keys) == 7
    assert keys[-1] == "noises.noise_6" and keys[0] == "style.1.weight"
    dkeys = list(d.state_dict())
    assert len({k.split(".")[1] for k in dkeys if k.startswith("convs.")}) == 4
    assert dkeys[-4:] == ROSINALITY_D8[-4:]


def test_full_width_channel_table_is_rosinalitys():
    assert channel_table(2) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    assert channel_table(1)[256] == 64
    with torch.device("meta"):
        g = Generator(256, 512, 8, channel_multiplier=2)  # FFHQ-256 config-f, no memory used
    assert g.state_dict()["convs.10.conv.weight"].shape == (1, 128, 256, 3, 3)


def test_demodulation_normalises_every_output_kernel():
    torch.manual_seed(0)
    g, _ = tiny(16)
    style = torch.randn(5, 16) * 3
    for conv in [g.conv1.conv, *(c.conv for c in g.convs)]:
        w = conv.modulated_weight(style)  # [B, out, in, k, k]
        norms = w.pow(2).sum([2, 3, 4]).sqrt()
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    w = g.to_rgb1.conv.modulated_weight(style)  # ToRGB is modulated but not demodulated
    assert not torch.allclose(w.pow(2).sum([2, 3, 4]).sqrt(), torch.ones(5, 3), atol=1e-2)
    # scaling a style scales the input channels' weights but demodulation cancels a global scale
    conv = g.convs[1].conv
    out1 = conv(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), style[:2])
    conv.modulation.bias.data.mul_(5)
    conv.modulation.weight.data.mul_(5)
    out2 = conv(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), style[:2])
    assert torch.allclose(out1, out2, atol=1e-4)


def test_upsampling_filters_keep_constants():
    x = torch.full((1, 2, 4, 4), 3.0)
    up = Upsample([1, 3, 3, 1])(x)
    assert up.shape == (1, 2, 8, 8)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))
    down = upfirdn2d(torch.full((1, 1, 8, 8), 2.0), torch.full((2, 2), 0.25), down=2)
    assert down.shape == (1, 1, 4, 4) and torch.allclose(down, torch.full_like(down, 2.0))


def test_intermediate_features_have_the_documented_shapes():
    g, d = tiny(32)
    z = torch.randn(2, 16)
    noise = g.random_noise(2, torch.Generator().manual_seed(0))
    img, latent, feats = g([z], noise=noise, return_features=True)
    assert latent is None
    assert [tuple(f.shape[1:]) for f in feats] == g.feature_shapes()
    assert [f.shape[-1] for f in feats] == [4, 8, 8, 16, 16, 32, 32] and len(feats) == g.num_layers
    img2, _ = g([z], noise=noise)
    assert torch.equal(img, img2)  # features do not change the image
    logits, dfeats = d(img, return_features=True)
    assert [tuple(f.shape[1:]) for f in dfeats] == d.feature_shapes()
    assert [f.shape[-1] for f in dfeats] == [32, 32, 16, 16, 8, 8, 4, 4]
    assert torch.equal(logits, d(img))


def test_explicit_noise_and_truncation():
    g, _ = tiny(16)
    z = torch.randn(2, 16)
    a, _ = g([z], randomize_noise=False)
    b, _ = g([z], randomize_noise=False)
    assert torch.equal(a, b)
    g.conv1.noise.weight.data.fill_(1.0)  # noise matters once its weight is non-zero
    assert not torch.equal(g([z], noise=g.random_noise(2))[0], g([z], noise=g.random_noise(2))[0])
    center = g.mean_latent(256, generator=torch.Generator().manual_seed(0))
    noise = g.random_noise(2, torch.Generator().manual_seed(0))
    at_center, _ = g([z], truncation=0.0 + 1e-9, truncation_latent=center, noise=noise)
    same, _ = g([center.expand(2, -1)], input_is_latent=True, noise=noise)
    assert torch.allclose(at_center, same, atol=1e-4)


def test_checkpoint_round_trip_in_rosinality_format(tmp_path):
    g, d = tiny(16, seed=1)
    g_ema, _ = tiny(16, seed=2)
    path = save_gan_source(tmp_path / "model.pt", g, g_ema, d)
    blob = torch.load(path, weights_only=True)
    assert set(blob) >= {"g", "g_ema", "d", "arch"}
    src = load_gan_source(str(path))
    assert src.resolution == 16 and src.arch == g.arch
    z = torch.randn(3, 16)
    noise = g.random_noise(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(src.g_ema([z], noise=noise)[0], g_ema([z], noise=noise)[0])
        assert torch.equal(src.g([z], noise=noise)[0], g([z], noise=noise)[0])
        x = torch.randn(4, 3, 16, 16)
        assert torch.equal(src.d(x), d(x))
    # a folder source (what export() writes)
    folder = save_gan_source(tmp_path / "exported", g, g_ema, d)
    assert (folder / CHECKPOINT_NAME).is_file()
    assert load_gan_source(str(folder)).resolution == 16


def test_foreign_checkpoint_without_arch_is_inferred(tmp_path):
    # a rosinality train.py checkpoint: g, d, g_ema, optimisers and the argparse Namespace
    torch.manual_seed(0)
    g = Generator(64, 24, 3, channel_multiplier=1, narrow=1 / 32)
    d = Discriminator(64, channel_multiplier=1, narrow=1 / 32)
    torch.save({"g": g.state_dict(), "d": d.state_dict(), "g_ema": g.state_dict(),
                "args": argparse.Namespace(size=64, latent=24)}, tmp_path / "010000.pt")
    src = load_gan_source(str(tmp_path / "010000.pt"))
    assert src.arch["size"] == 64 and src.arch["style_dim"] == 24 and src.arch["n_mlp"] == 3
    assert src.arch["channel_multiplier"] == 1
    z = torch.randn(2, 24)
    with torch.no_grad():
        assert torch.equal(src.g_ema([z], randomize_noise=False)[0], g([z], randomize_noise=False)[0])
    assert infer_arch(Generator(32, 8, 1).state_dict())["narrow"] == 1.0


def test_source_errors_name_the_file(tmp_path):
    with pytest.raises(SourceModelError, match="does not exist"):
        load_gan_source(str(tmp_path / "missing.pt"))
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(SourceModelError, match="bad.pt must be a dict with key 'g_ema'"):
        load_gan_source(str(tmp_path / "bad.pt"))
    g, d = tiny(16)
    sd = g.state_dict()
    del sd["input.input"]
    torch.save({"g_ema": sd}, tmp_path / "broken.pt")
    with pytest.raises(SourceModelError, match=r"broken.pt.*'input.input'"):
        load_gan_source(str(tmp_path / "broken.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceModelError, match="no stylegan2.pt"):
        load_gan_source(str(tmp_path / "empty"))
    arch = preset_arch("tiny", 16)
    d32 = build_discriminator(preset_arch("tiny", 32))
    torch.save({"g_ema": build_generator(arch).state_dict(), "d": d32.state_dict(), "arch": arch},
               tmp_path / "mismatch.pt")
    with pytest.raises(SourceModelError, match="mismatch.pt: 'd' does not fit"):
        load_gan_source(str(tmp_path / "mismatch.pt"))
