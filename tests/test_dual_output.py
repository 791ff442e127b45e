"""The dual_output method (Benny & Wolf, CVPR 2022): mixing, gradient routing, posterior mean,
widening of an ε source, sampling, resume and export, on tiny models on the CPU."""

import copy
import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from trainers.common import SourceModelError, generator_states, load_generator_states, random_batch
from trainers.diffusion.backbone import (UNET_PRESETS, DiffusionSource, build_unet, ddim_sample,
                                         default_scheduler, load_source)
from trainers.diffusion.dual_output import (DiffusionCoefficients, DualOutput, DualOutputConfig,
                                            DualOutputPretrain, DualOutputPretrainConfig, build_dual_unet,
                                            dual_loss_terms, is_dual_output, mix_weight, mix_x0,
                                            respaced_timesteps, split_output, widen_unet)
from trainers.perf import DevicePerf

# The CPUs are shared: more than one intra-op thread only spins against the other work.
torch.set_num_threads(1)


def tiny_source(resolution: int = 16, seed: int = 0) -> DiffusionSource:
    torch.manual_seed(seed)
    return DiffusionSource(build_unet("tiny", resolution), default_scheduler(), "test")


def tiny_dual_source(resolution: int = 16, seed: int = 0) -> DiffusionSource:
    torch.manual_seed(seed)
    return DiffusionSource(build_dual_unet("tiny", resolution), default_scheduler(), "test-dual")


def shots(n: int = 4, res: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def method(source=None, precision="auto", seed=0, **kw) -> DualOutput:
    kw.setdefault("ema_decay", 0.0)
    kw.setdefault("batch_size", 5)
    return DualOutput(DualOutputConfig(**kw), source or tiny_source(), "cpu", seed=seed,
                      perf=DevicePerf("cpu", precision=precision))


def noisy_inputs(b: int = 4, seed: int = 0, t=None, res: int = 8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, res, res, generator=g) * 2 - 1
    eps = torch.randn(b, 3, res, res, generator=g)
    t = torch.tensor(t if t is not None else [0, 1, 5, 40][:b])
    abar = default_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    return x0, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t, eps


# --- the pure pieces --------------------------------------------------------------------------

def test_mix_is_the_eps_estimate_at_s0_and_the_direct_one_at_s1():
    g = torch.Generator().manual_seed(0)
    x0_direct, x0_eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g) * 50
    zeros, ones = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert torch.equal(mix_x0(x0_direct, x0_eps, zeros), x0_eps)
    assert torch.equal(mix_x0(x0_direct, x0_eps, ones), x0_direct)
    s = torch.full((2, 1, 4, 4), 0.25)
    assert torch.allclose(mix_x0(x0_direct, x0_eps, s), 0.25 * x0_direct + 0.75 * x0_eps)
    # one r map shared by the three colour channels
    s = torch.rand(2, 1, 4, 4, generator=g)
    mixed = mix_x0(x0_direct, x0_eps, s)
    for c in range(3):
        assert torch.allclose(mixed[:, c:c + 1], s * x0_direct[:, c:c + 1] + (1 - s) * x0_eps[:, c:c + 1])
    # the widening bias: 1 − sigmoid(−30) is exactly 1 in float32, sigmoid(0) = 1/2
    assert float(1 - mix_weight(torch.tensor(-30.0))) == 1.0 and float(mix_weight(torch.tensor(0.0))) == 0.5
    out = torch.arange(7.0).view(1, 7, 1, 1)
    a, b, r = split_output(out)
    assert a.flatten().tolist() == [0, 1, 2] and b.flatten().tolist() == [3, 4, 5] and r.flatten().tolist() == [6]


@pytest.mark.parametrize("mix_loss", ["posterior_mean", "x0"])
def test_each_head_gets_gradient_only_from_its_own_term(mix_loss):
    coef = DiffusionCoefficients(default_scheduler())
    x0, x_t, t, eps = noisy_inputs()
    out = torch.randn(4, 7, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    terms = dual_loss_terms(out, x0, x_t, t, eps, coef, mix_loss)
    channels = {"loss_x0": slice(0, 3), "loss_eps": slice(3, 6), "loss_mu": slice(6, 7)}
    for name, own in channels.items():
        (g,) = torch.autograd.grad(terms[name], out, retain_graph=True)
        assert g[:, own].abs().sum() > 0, name
        others = torch.ones(7, dtype=torch.bool)
        others[own] = False
        assert torch.count_nonzero(g[:, others]) == 0, name  # exactly zero, not just small
    assert not terms["mix_mean"].requires_grad and 0 < float(terms["mix_mean"]) < 1
    assert all(v.dim() == 0 for v in terms.values())


def test_gradient_routing_through_a_real_unet():
    """On a real UNet: the μ term reaches conv_out only through the r row; the trunk gets it too."""
    m = method(tiny_dual_source())
    x0 = random_batch(shots(), 3, torch.Generator().manual_seed(0))
    x_t, _, eps = m.noisy(x0)
    t = torch.tensor([0, 2, 7])
    abar = m.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    rows = {"loss_x0": slice(0, 3), "loss_eps": slice(3, 6), "loss_mu": slice(6, 7)}
    for name, own in rows.items():
        m.unet.zero_grad(set_to_none=True)
        dual_loss_terms(m.predict(x_t, t), x0, x_t, t, eps, m.coef)[name].backward()
        w = m.unet.conv_out.weight.grad
        assert w[own].abs().sum() > 0, name
        mask = torch.ones(7, dtype=torch.bool)
        mask[own] = False
        assert torch.count_nonzero(w[mask]) == 0, name
        assert m.unet.conv_in.weight.grad.abs().sum() > 0, name  # the shared trunk learns from every term


def test_posterior_mean_is_the_ddpm_posterior():
    sched = default_scheduler()
    coef = DiffusionCoefficients(sched)
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([1, 2, 10, 500, 999])
    mu = coef.posterior_mean(x0, x_t, t).double()
    # independently: q(x_{t−1}|x0) = N(sqrt(ᾱ_{t−1}) x0, 1 − ᾱ_{t−1}) times q(x_t|x_{t−1}) =
    # N(sqrt(α_t) x_{t−1}, β_t), a product of Gaussians in x_{t−1}, all in float64
    betas = sched.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    for i, ti in enumerate(t.tolist()):
        a_prev, alpha, beta = abar[ti - 1], 1 - betas[ti], betas[ti]
        precision = 1 / (1 - a_prev) + alpha / beta
        ref = (a_prev.sqrt() * x0[i].double() / (1 - a_prev) + alpha.sqrt() * x_t[i].double() / beta) / precision
        assert torch.allclose(mu[i], ref, rtol=1e-5, atol=1e-6), ti
    # t = 0: the posterior collapses on x0 (ᾱ_{−1} = 1)
    assert coef.post_coef1[0] == 1 and coef.post_coef2[0] == 0
    assert torch.equal(coef.posterior_mean(x0, x_t, torch.zeros(5, dtype=torch.long)), x0)
    # diffusers' DDPM step with an x0 prediction: its noise term is cancelled by a second step with
    # the same generator seed on zero inputs (the noise scale depends on t only). diffusers works
    # from the float32 ᾱ, so it is only ~2e-4 accurate at small t (1 − ᾱ_1 ≈ 3e-4)
    ddpm = DDPMScheduler.from_config(sched.config, prediction_type="sample", clip_sample=False)
    for i, ti in enumerate(t.tolist()):
        step = ddpm.step(x0[i:i + 1], ti, x_t[i:i + 1], generator=torch.Generator().manual_seed(3)).prev_sample
        noise = ddpm.step(torch.zeros_like(x0[i:i + 1]), ti, torch.zeros_like(x_t[i:i + 1]),
                          generator=torch.Generator().manual_seed(3)).prev_sample
        assert torch.allclose(mu[i:i + 1].float(), step - noise, rtol=1e-3, atol=1e-4), ti


# --- widening an ε source ---------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_widened_source_starts_exactly_at_the_source(precision):
    src = tiny_source()
    before = copy.deepcopy(src.unet.state_dict())
    m = method(src, precision=precision)
    assert m.widened and is_dual_output(m.unet) and not is_dual_output(src.unet)
    assert src.unet.config.out_channels == 3  # the source object is left as it was
    for k, v in src.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    _, x_t, t, _ = noisy_inputs(t=[0, 10, 500, 999], res=16)
    with torch.no_grad():
        out = m.predict(x_t, t)
        x0_direct, eps_hat, r = split_output(out)
        assert torch.count_nonzero(x0_direct) == 0 and torch.all(r == -30)
        mixed = m.mixed_x0(out, x_t, t)
        # the construction: the mix is bit-for-bit the ε-derived x̂0 of the widened net
        assert torch.equal(mixed, m.coef.x0_from_eps(x_t, t, eps_hat))
        # ... which is the source's own ε-derived x̂0 up to conv rounding
        with m.perf.autocast():
            eps_src = src.unet(x_t, t).sample.float()
        assert torch.allclose(eps_hat, eps_src, rtol=1e-5, atol=1e-5 if precision == "fp32" else 2e-2)
        if precision == "fp32":
            x0_src = m.predict_x0(x_t, t, eps_src)
            scale = x0_src.abs().amax(dim=(1, 2, 3), keepdim=True)
            assert torch.all((mixed - x0_src).abs() <= 1e-5 * scale)


@pytest.mark.parametrize("steps", [5, 10])
def test_widened_samples_equal_the_source_ddim_samples(steps):
    src = tiny_source()
    m = method(src)
    ours = m.sample(6, steps=steps, seed=4)
    theirs = ddim_sample(src.unet, src.scheduler, 6, 16, steps, torch.device("cpu"), seed=4)
    assert ours.dtype == torch.uint8 and ours.shape == (6, 3, 16, 16)
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_widening_rejects_other_layouts_and_keeps_the_rng():
    torch.manual_seed(0)
    learned_var = UNet2DModel(sample_size=16, in_channels=3, out_channels=6, **UNET_PRESETS["tiny"])
    with pytest.raises(SourceModelError, match="out_channels=6"):
        DualOutput(DualOutputConfig(), DiffusionSource(learned_var, default_scheduler(), "six"), "cpu")
    with pytest.raises(SourceModelError, match="3 output channels"):
        widen_unet(learned_var)
    unet = tiny_source().unet
    torch.manual_seed(5)
    widen_unet(unet)
    after_widen = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_widen)  # widening draws nothing from the global RNG


# --- sampling ---------------------------------------------------------------------------------

def test_respacing_matches_the_official_modes_for_divisors():
    for n in (5, 10, 25, 50, 100):
        assert respaced_timesteps(1000, n, "leading") == sorted(range(0, 1000, 1000 // n), reverse=True)
        # the code's 'ddodm': list(reversed(range(T-1, 0, -T//N))) with (-T)//N as Python parses it
        assert respaced_timesteps(1000, n, "trailing") == sorted(range(999, 0, (-1000) // n), reverse=True)
        assert len(respaced_timesteps(1000, n, "linspace")) == n
    assert respaced_timesteps(1000, 3, "leading") == [666, 333, 0]  # the code keeps 4 here (documented)
    with pytest.raises(ValueError, match="sampling steps"):
        respaced_timesteps(1000, 0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_is_deterministic_for_a_seed(sampler):
    m = method(tiny_dual_source(), sampler=sampler, ema_decay=0.9)
    assert m.sampling_unet is m.ema.module
    for steps in (5, 10):
        a, b = m.sample(3, steps=steps, seed=7), m.sample(3, steps=steps, seed=7)
        assert a.dtype == torch.uint8 and a.shape == (3, 3, 16, 16) and a.device.type == "cpu"
        assert torch.equal(a, b)
        assert not torch.equal(a, m.sample(3, steps=steps, seed=8))
    assert m.unet.training  # sampling leaves the trained net in train mode


def test_sampler_options_change_the_chain():
    m = method(tiny_dual_source(), ema_decay=0.0)
    base = m.sample(2, steps=5, seed=1)
    for change in ({"timestep_spacing": "trailing"}, {"clip_mixed": False}, {"sampler": "ddpm"},
                   {"sampler": "ddpm", "ddpm_variance": "fixedsmall"}):
        for k, v in change.items():
            setattr(m.config, k, v)
        assert not torch.equal(m.sample(2, steps=5, seed=1), base), change
        m.config = DualOutputConfig(ema_decay=0.0, batch_size=5)


# --- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dual_source", [False, True])
def test_odd_batch_and_bf16_steps_are_finite(precision, dual_source):
    m = method(tiny_dual_source() if dual_source else None, precision=precision, ema_decay=0.99)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        out = m.train_step(random_batch(shots(), 5, gen))
    assert set(out) == {"loss", "loss_x0", "loss_eps", "loss_mu", "mix_mean", "grad_norm", "grad_r"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert all(math.isfinite(float(v)) for v in out.values())
    assert math.isclose(float(out["loss"]), float(out["loss_x0"] + out["loss_eps"] + out["loss_mu"]) / 3,
                        rel_tol=1e-5)
    assert 0 <= float(out["mix_mean"]) <= 1
    if not dual_source:
        assert float(out["mix_mean"]) < 1e-12  # the exact widening keeps s ≈ 0
    assert m.step == 2
    images = m.sample(3, steps=5, seed=0)  # sampling under the same autocast
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)


def test_loss_weights_and_mix_loss():
    x = random_batch(shots(), 5, torch.Generator().manual_seed(0))
    m = method(tiny_dual_source(), loss_weight_x0=2.0, loss_weight_eps=0.5, loss_weight_mu=0.0, grad_clip=None)
    out = m.train_step(x)
    assert "grad_norm" not in out
    expect = (2.0 * out["loss_x0"] + 0.5 * out["loss_eps"]) / 3
    assert math.isclose(float(out["loss"]), float(expect), rel_tol=1e-6)
    assert torch.count_nonzero(m.unet.conv_out.weight.grad[6]) == 0  # no μ term: r gets nothing
    a = method(tiny_dual_source()).losses(x)["loss_mu"]
    b = method(tiny_dual_source(), mix_loss="x0").losses(x)["loss_mu"]
    assert b > a  # the x0-space term lacks the c1_t² <= 1 factor


def test_loss_falls_on_a_fixed_batch():
    m = DualOutputPretrain(DualOutputPretrainConfig(preset="tiny", lr=3e-3, batch_size=8, ema_decay=0), 16, "cpu")
    x = random_batch(shots(2), 8, torch.Generator().manual_seed(1))
    losses, x0_losses = [], []
    for _ in range(30):
        out = m.train_step(x)
        losses.append(float(out["loss"]))
        x0_losses.append(float(out["loss_x0"]))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert sum(x0_losses[-8:]) / 8 < 0.9 * sum(x0_losses[:8]) / 8


def test_an_exact_widening_freezes_r_and_a_live_bias_trains_it():
    """The trade-off of the widening (module docstring): ∂x̂0_mix/∂r = (1 − s)(x̂0_mix − x̂0(ε̂))."""
    x = random_batch(shots(), 5, torch.Generator().manual_seed(0))
    moved = {}
    for bias in (-30.0, -4.0):
        m = method(widen_r_bias=bias, lr=1e-3, mix_open_steps=0)
        start = m.unet.conv_out.bias[6].item()
        for _ in range(3):
            m.train_step(x)
        moved[bias] = abs(m.unet.conv_out.bias[6].item() - start)
    assert moved[-30.0] < 1e-6 and moved[-4.0] > 1e-4  # r's gradient at −30 sits below Adam's ε


def test_the_opening_schedule_starts_at_the_source_and_then_the_mix_learns():
    """The default for an ε source: the first step runs exactly at the source (s ≈ 1e-13, r's
    gradient below Adam's ε); the r bias is then moved to 0 over ``mix_open_steps`` and from there
    the mixing map trains (its gradient is orders of magnitude larger and its weights move)."""
    x = random_batch(shots(), 5, torch.Generator().manual_seed(0))
    m = method(mix_open_steps=4, mix_open_bias=0.0, lr=1e-3)
    assert m.unet.conv_out.bias[6].item() == -30.0
    outs = [m.train_step(x) for _ in range(4)]
    assert float(outs[0]["mix_mean"]) < 1e-12 and float(outs[0]["grad_r"]) < 1e-9
    assert abs(m.unet.conv_out.bias[6].item()) < 4 * 1e-3 + 1e-6  # opened; Adam moved it <= lr per step
    w_open = m.unet.conv_out.weight[6].clone()
    later = [m.train_step(x) for _ in range(4)]
    assert 0.2 < float(later[-1]["mix_mean"]) < 0.8
    assert float(later[-1]["grad_r"]) > 1e4 * float(outs[0]["grad_r"])
    assert (m.unet.conv_out.weight[6] - w_open).abs().max() > 1e-4  # the map itself learns
    off = method(mix_open_steps=0, lr=1e-3)
    for _ in range(4):
        off.train_step(x)
    assert off.unet.conv_out.bias[6].item() == -30.0  # off: r stays where the widening put it


def test_state_dict_resumes_exactly():
    images = shots()
    cfg = DualOutputConfig(batch_size=5, ema_decay=0.9, widen_r_bias=-4.0)
    a = DualOutput(cfg, tiny_source(), "cpu", seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.train_step(random_batch(images, 5, gen))
    state = copy.deepcopy(a.state_dict())  # as torch.save/torch.load would hand it back
    gens = copy.deepcopy(generator_states(a))  # the RNGs travel beside the state (trainers.common)
    b = DualOutput(cfg, tiny_source(), "cpu", seed=99)
    b.load_state_dict(state)
    load_generator_states(b, gens)
    for _ in range(2):
        x = random_batch(images, 5, gen)
        la, lb = a.train_step(x.clone()), b.train_step(x.clone())
        assert {k: float(v) for k, v in la.items()} == {k: float(v) for k, v in lb.items()}
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.module.parameters(), b.ema.module.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a.sample(2, steps=5), b.sample(2, steps=5))


def test_export_loads_back_as_a_dual_output_source(tmp_path):
    m = method(ema_decay=0.9)
    m.train_step(random_batch(shots(), 5, torch.Generator().manual_seed(0)))
    folder = m.export(tmp_path / "model")
    assert json.loads((folder / "model_index.json").read_text())["dual_output"] is True
    src = load_source(str(folder))
    assert is_dual_output(src.unet) and src.resolution == 16
    for (k, p), (_, q) in zip(m.ema.module.state_dict().items(), src.unet.state_dict().items()):
        assert torch.equal(p, q), k
    again = method(src)
    assert not again.widened
    assert torch.equal(again.sample(2, steps=5, seed=1), m.sample(2, steps=5, seed=1))


def test_pretrain_builds_a_dual_output_source():
    cfg = DualOutputPretrainConfig(preset="tiny", batch_size=3)
    m = DualOutputPretrain(cfg, 16, "cpu", seed=1)
    assert DualOutputPretrain.key == "dual_output_pretrain" and DualOutputPretrain.family == "diffusion"
    assert is_dual_output(m.unet) and not m.widened and m.resolution == 16
    twin = DualOutputPretrain(cfg, 16, "cpu", seed=1)
    for p, q in zip(m.unet.parameters(), twin.unet.parameters()):
        assert torch.equal(p, q)  # the initial weights follow the seed
    out = m.train_step(random_batch(shots(), 3, torch.Generator().manual_seed(0)))
    assert 0.05 < float(out["mix_mean"]) < 0.95  # a fresh r head starts near s = 1/2
    with pytest.raises(SourceModelError, match="unknown UNet preset"):
        build_dual_unet("huge", 16)


def test_config_and_search_space():
    assert DualOutput.key == "dual_output" and DualOutput.family == "diffusion"
    cfg = DualOutputConfig()
    assert (cfg.loss_weight_x0, cfg.loss_weight_eps, cfg.loss_weight_mu) == (1.0, 1.0, 1.0)
    assert cfg.sampler == "ddim" and cfg.clip_mixed and cfg.timestep_spacing == "leading"
    assert cfg.mix_loss == "posterior_mean" and not cfg.ddim_eps_from_clipped and cfg.grad_clip == 1.0
    assert cfg.ddpm_variance == "fixedlarge" and cfg.widen_r_bias <= -17.4
    assert DualOutputPretrainConfig().lr == 2e-4
    space = DualOutputConfig.search_space()
    assert {"lr", "run.eval_sample_steps", "sampler", "mix_loss", "loss_weight_mu", "widen_r_bias",
            "mix_open_steps", "mix_open_bias"} <= set(space)
    assert space["run.eval_sample_steps"] == {"choice": [5, 10, 25, 50]}
    for key, spec in space.items():
        (kind, args), = spec.items()
        if key.startswith("run."):
            continue
        assert key in DualOutputConfig.model_fields, key
        for v in (args if kind == "choice" else args[:2]):
            DualOutputConfig(**{key: v})  # every edge of the space is a valid config
