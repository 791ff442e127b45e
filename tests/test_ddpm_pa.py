"""The ddpm_pa method (DDPM pairwise adaptation) and the Haar transform, on tiny models on the CPU."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from trainers.common import generator_states, load_generator_states, random_batch
from trainers.perf import DevicePerf
from trainers.diffusion.backbone import UNET_PRESETS, DiffusionSource, build_unet, default_scheduler
from trainers.diffusion.ddpm_pa import DDPMPA, DDPMPAConfig, hf_mse, pairwise_cosine, pairwise_kl
from trainers.diffusion.haar import haar_analysis, haar_synthesis, high_frequency
from trainers.registry import get_method

torch.set_num_threads(2)


def tiny_source(resolution: int = 16, seed: int = 0) -> DiffusionSource:
    torch.manual_seed(seed)
    return DiffusionSource(build_unet("tiny", resolution), default_scheduler(), "test")


def shots(n: int = 4, res: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def batch(b: int, seed: int = 0) -> torch.Tensor:
    return random_batch(shots(), b, torch.Generator().manual_seed(seed))


def method(**kw) -> DDPMPA:
    seed = kw.pop("seed", 0)
    perf = DevicePerf("cpu", precision=kw.pop("precision", "auto"))
    kw.setdefault("ema_decay", 0.0)
    kw.setdefault("batch_size", 5)
    # every timestep, as the released code: the tests of the terms draw random t; the SNR gate
    # (default pair_min_snr=4) has its own tests, which ask for it
    kw.setdefault("pair_min_snr", 0.0)
    return DDPMPA(DDPMPAConfig(**kw), tiny_source(), "cpu", seed=seed, perf=perf)


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


# --- Haar transform ---------------------------------------------------------------------------

def test_haar_is_invertible_and_orthonormal():
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    bands = haar_analysis(x)
    assert all(b.shape == (2, 3, 4, 3) for b in bands)
    assert torch.allclose(haar_synthesis(*bands), x, atol=1e-5)
    # orthonormal: energy is preserved
    assert torch.allclose(sum((b ** 2).sum() for b in bands), (x ** 2).sum(), rtol=1e-5)
    # hf = LH + HL + HH
    assert torch.allclose(high_frequency(x), bands[1] + bands[2] + bands[3], atol=1e-6)


def test_high_frequency_of_a_constant_image_is_zero():
    assert high_frequency(torch.full((2, 3, 8, 8), 0.37)).abs().max() < 1e-6
    # a horizontal ramp: only high frequencies along x, no vertical detail
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    ll, lh, hl, hh = haar_analysis(ramp)
    assert hl.abs().max() < 1e-6 and hh.abs().max() < 1e-6 and lh.abs().min() > 0.5
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    assert high_frequency(checker.float().expand(1, 3, 8, 8)).abs().min() > 0.5
    with pytest.raises(ValueError, match="even height and width"):
        high_frequency(torch.zeros(1, 3, 7, 8))


# --- loss functions ---------------------------------------------------------------------------

def test_pairwise_cosine_leaves_out_the_diagonal():
    z = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    s = pairwise_cosine(z)
    assert s.shape == (4, 3)
    for i in range(4):
        others = [j for j in range(4) if j != i]
        for c, j in enumerate(others):
            assert torch.allclose(s[i, c], F.cosine_similarity(z[i].flatten(), z[j].flatten(), dim=0), atol=1e-6)


def test_pairwise_kl_direction_temperature_and_normalisation():
    g = torch.Generator().manual_seed(0)
    s_src, s_ada = torch.rand(3, 2, generator=g) * 2 - 1, torch.rand(3, 2, generator=g) * 2 - 1
    p, q = F.softmax(s_src, dim=1), F.softmax(s_ada, dim=1)
    forward = (p * (p.log() - q.log())).sum() / 6  # nn.KLDivLoss() "mean" over the 3×2 entries
    reverse = (q * (q.log() - p.log())).sum() / 6
    assert torch.allclose(pairwise_kl(s_src, s_ada), forward, atol=1e-7)
    with warnings.catch_warnings():  # torch warns that "mean" is not "batchmean": that is the point
        warnings.simplefilter("ignore")
        assert torch.allclose(F.kl_div(q.log(), p, reduction="mean"), forward, atol=1e-7)  # the code's form
    assert torch.allclose(pairwise_kl(s_src, s_ada, direction="adapted_to_source"), reverse, atol=1e-7)
    assert not torch.allclose(forward, reverse)
    assert pairwise_kl(s_src, s_src) == 0 and pairwise_kl(s_src, s_src, direction="adapted_to_source") == 0
    # a larger temperature flattens both distributions; τ -> ∞ gives zero
    values = [float(pairwise_kl(s_src, s_ada, temperature=tau)) for tau in (0.1, 1.0, 10.0, 1e6)]
    assert values[0] > values[1] > values[2] > 0 and values[3] < 1e-10
    with pytest.raises(ValueError, match="kl_direction"):
        pairwise_kl(s_src, s_ada, direction="sideways")


def test_hf_mse_is_zero_when_the_prediction_is_the_image():
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert hf_mse(x0.clone(), x0) == 0
    assert hf_mse(x0 + 0.3, x0) < 1e-10  # a brightness shift has no high frequencies
    assert hf_mse(x0 + 0.1 * torch.randn_like(x0), x0) > 0


# --- the method -------------------------------------------------------------------------------

@pytest.mark.parametrize("pair_size", [3, 0])
def test_pairwise_terms_are_zero_for_the_source_and_positive_after_a_change(pair_size):
    m = method(pair_size=pair_size)
    x0 = batch(5)
    out = m.losses(x0)
    assert out["loss_img"] == 0 and out["loss_hf"] == 0
    assert out["loss_simple"] > 0 and out["loss_hfmse"] > 0
    perturb(m.unet)
    out = m.losses(x0)
    assert out["loss_img"] > 0 and out["loss_hf"] > 0
    assert all(torch.isfinite(v) for v in out.values())


def test_direction_and_temperature_in_the_method():
    x0 = batch(5)
    values = {}
    for direction in ("source_to_adapted", "adapted_to_source"):
        for tau in (1.0, 1e6):
            m = method(kl_direction=direction, temperature=tau)
            perturb(m.unet)
            values[direction, tau] = float(m.losses(x0)["loss_img"])
    assert values["source_to_adapted", 1.0] > 0 and values["adapted_to_source", 1.0] > 0
    assert values["source_to_adapted", 1.0] != values["adapted_to_source", 1.0]
    assert values["source_to_adapted", 1e6] < 1e-12 and values["adapted_to_source", 1e6] < 1e-12


def test_a_bf16_step_runs_and_keeps_the_source_frozen():
    m = method(precision="bf16")
    out = m.train_step(batch(5))
    assert all(math.isfinite(v) for v in out.values())
    assert all(p.grad is None for p in m.source_unet.parameters())


def test_no_gradient_reaches_the_source_model():
    m = method()
    before = copy.deepcopy(m.source_unet.state_dict())
    images = shots()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        out = m.train_step(random_batch(images, 5, gen))
    assert out["loss_img"] >= 0 and out["loss_hf"] >= 0
    assert all(p.grad is None and not p.requires_grad for p in m.source_unet.parameters())
    assert not m.source_unet.training and m.unet.training
    for k, v in m.source_unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is not None for p in m.unet.parameters())
    # the pairwise term alone gives the adapted model a gradient once it differs from the source
    perturb(m.unet)
    m.unet.zero_grad(set_to_none=True)
    m.losses(batch(5))["loss_img"].backward()
    assert sum(float(p.grad.abs().sum()) for p in m.unet.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in m.source_unet.parameters())


@pytest.mark.parametrize("batch_size,pair_size", [(2, 0), (2, 2), (3, 3), (5, 3), (5, 0)])
def test_train_steps_run_for_small_batches(batch_size, pair_size):
    m = method(batch_size=batch_size, pair_size=pair_size, ema_decay=0.99)
    images = shots()
    gen = torch.Generator().manual_seed(0)
    m.train_step(random_batch(images, batch_size, gen))
    for _ in range(3):
        out = m.train_step(random_batch(images, batch_size, gen))
    assert set(out) >= {"loss", "loss_simple", "loss_img", "loss_hf", "loss_hfmse", "grad_norm"}
    assert all(math.isfinite(v) for v in out.values())
    total = out["loss_simple"] + out["loss_img"] + out["loss_hf"] + out["loss_hfmse"]
    assert math.isclose(out["loss"], total, rel_tol=1e-5)
    assert m.step == 4


def fixed_timesteps(m: DDPMPA, values: list[int]) -> None:
    """Make ``m.noisy`` draw its noise as usual but use the timesteps ``values``."""
    real = type(m).noisy.__get__(m)

    def fixed(x):
        x_t, _, eps = real(x)
        t = torch.tensor(values)
        abar = m.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * x + (1 - abar).sqrt() * eps, t, eps
    m.noisy = fixed


def test_timestep_range_gates_the_pa_terms():
    m = method(pair_t_min=500, pair_t_max=1000, pair_min_snr=0.0)
    perturb(m.unet)
    x0 = batch(5)

    def with_t(values):
        fixed_timesteps(m, values)
        return m.losses(x0)

    out = with_t([10, 600, 700, 800, 900])  # four in range: pairs among them
    assert out["loss_img"] > 0 and out["loss_hf"] > 0 and out["loss_hfmse"] > 0
    out = with_t([10, 20, 30, 40, 999])  # one in range: no pair, still L_hfmse
    assert out["loss_img"] == 0 and out["loss_hf"] == 0 and out["loss_hfmse"] > 0
    out = with_t([10, 20, 30, 40, 499])  # none in range
    assert out["loss_img"] == 0 and out["loss_hf"] == 0 and out["loss_hfmse"] == 0 and out["loss_simple"] > 0


def test_the_default_snr_gate_keeps_the_pa_terms_where_snr_is_at_least_four():
    """pair_min_snr=4 (the default): the PA terms see exactly the samples with ᾱ_t/(1 − ᾱ_t) ≥ 4,
    t < 145 on the linear schedule (1: t < 259); pair_min_snr=0 is the released code's every
    timestep."""
    default = DDPMPAConfig().pair_min_snr
    m = method(pair_min_snr=default)
    abar = m.alphas_cumprod.double()
    snr = abar / (1 - abar)
    assert default == 4.0 and snr[144] >= 4 > snr[145] and m.pair_t_range == (0, 145)
    assert snr[258] >= 1 > snr[259] and method(pair_min_snr=1.0).pair_t_range == (0, 259)
    assert method(pair_min_snr=0.0).pair_t_range == (0, 1000)
    perturb(m.unet)
    x0 = batch(5)
    fixed_timesteps(m, [10, 100, 144, 145, 999])  # three in the gate
    state = m.generator.get_state()
    inside = m.losses(x0)
    assert inside["loss_img"] > 0 and inside["loss_hf"] > 0 and inside["loss_hfmse"] > 0
    # L_hfmse is the mean over the gated samples alone (the same noise drawn again)
    m.generator.set_state(state)
    x_t, t, _ = m.noisy(x0)
    with torch.no_grad():
        eps_hat = m.unet(x_t, t).sample
        expected = m.config.lambda_hfmse * hf_mse(m.predict_x0(x_t[:3], t[:3], eps_hat[:3]), x0[:3])
    assert torch.allclose(inside["loss_hfmse"].detach(), expected, rtol=1e-4)
    fixed_timesteps(m, [145, 258, 600, 800, 999])  # none: L_simple only
    outside = m.losses(x0)
    assert outside["loss_img"] == outside["loss_hf"] == outside["loss_hfmse"] == 0 and outside["loss_simple"] > 0


def test_bad_batch_and_pair_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"batch_size >= 3.*batch_size=2, pair_size=3"):
        method(batch_size=2, pair_size=3)
    with pytest.raises(ValueError, match=r"batch_size >= 2.*batch_size=1, pair_size=0"):
        method(batch_size=1, pair_size=0)
    with pytest.raises(ValueError, match="pair_size=1"):
        method(batch_size=4, pair_size=1)
    with pytest.raises(ValueError, match="pairwise timestep range"):
        method(pair_t_min=600, pair_t_max=300)
    with pytest.raises(ValueError, match="does not overlap"):
        method(t_max=200, pair_t_min=500, pair_min_snr=0.0)
    with pytest.raises(ValueError, match=r"cut at t < 259 by pair_min_snr=1.0, does not overlap"):
        method(pair_t_min=300, pair_min_snr=1.0)  # SNR >= 1 leaves t < 259
    with pytest.raises(ValueError, match=r"cut at t < 145 by pair_min_snr=4.0, does not overlap"):
        method(pair_t_min=200, pair_min_snr=DDPMPAConfig().pair_min_snr)  # the default leaves t < 145
    with pytest.raises(ValueError, match=r"pair_min_snr=1000000.0: no timestep"):
        method(pair_min_snr=1e6)
    torch.manual_seed(0)
    learned_var = UNet2DModel(sample_size=16, in_channels=3, out_channels=6, **UNET_PRESETS["tiny"])
    with pytest.raises(ValueError, match="L_vlb"):
        DDPMPA(DDPMPAConfig(), DiffusionSource(learned_var, default_scheduler(), "test"), "cpu")


def test_state_dict_resumes_bit_for_bit():
    images = shots()
    cfg = DDPMPAConfig(batch_size=5, ema_decay=0.9, pair_min_snr=0.0)  # every t: the pairwise terms act
    a = DDPMPA(cfg, tiny_source(), "cpu", seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.train_step(random_batch(images, 5, gen))
    state = copy.deepcopy(a.state_dict())  # as torch.save/torch.load would hand it back
    gens = copy.deepcopy(generator_states(a))  # the RNGs travel beside the state (trainers.common)
    assert not any("source" in k for k in state)
    b = DDPMPA(cfg, tiny_source(), "cpu", seed=99)  # the source is rebuilt from the same model
    b.load_state_dict(state)
    load_generator_states(b, gens)
    for _ in range(2):
        x = random_batch(images, 5, gen)
        la, lb = a.train_step(x.clone()), b.train_step(x.clone())
        assert la == lb
        assert la["loss_img"] > 0
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.module.parameters(), b.ema.module.parameters()):
        assert torch.equal(p, q)


def test_registry_and_search_space():
    assert get_method("ddpm_pa") is DDPMPA and DDPMPA.family == "diffusion"
    space = DDPMPAConfig.search_space()
    assert {"lr", "lambda_img", "lambda_hf", "lambda_hfmse", "pair_size", "kl_direction",
            "temperature", "pair_t_max", "pair_min_snr"} <= set(space)
    for key, spec in space.items():
        assert key in DDPMPAConfig.model_fields
        (kind, args), = spec.items()
        values = args if kind == "choice" else args[:2]
        for v in values:
            DDPMPAConfig(**{key: v})  # every edge of the space is a valid config
    assert DDPMPAConfig().lambda_img == 4.0 and DDPMPAConfig().lambda_hf == 4.0
    assert DDPMPAConfig().lambda_hfmse == 1.0 and DDPMPAConfig().pair_size == 3
    assert DDPMPAConfig().pair_min_snr == 4.0  # our one departure from the released defaults
    assert DDPMPA.default_steps == 3000  # the glyph folder task's budget (module docstring)


def test_each_pa_term_changes_the_gradient_at_the_default_weights():
    """The paper's own knobs are live: at the default lambdas each extra term (L_img, L_hf,
    L_hfmse) adds its own gradient to the UNet's, on top of L_simple's."""
    m = method(pair_min_snr=DDPMPAConfig().pair_min_snr)
    perturb(m.unet)  # the pairwise terms are 0 (with no gradient) while the UNet equals the source
    x0 = batch(5)
    fixed_timesteps(m, [20, 50, 80, 110, 140])  # inside the default SNR gate (t < 145)
    state = m.generator.get_state()

    def grad_of(key: str) -> torch.Tensor:
        m.generator.set_state(state)  # the same timesteps, noise and pairs for every term
        m.unet.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.losses(x0)[key].backward()
        return torch.cat([p.grad.flatten() for p in m.unet.parameters() if p.grad is not None])

    simple = grad_of("loss_simple")
    for key in ("loss_img", "loss_hf", "loss_hfmse"):
        g = grad_of(key)
        assert g.norm() > 1e-6 * simple.norm(), key
        cos = F.cosine_similarity(g, simple, dim=0)
        assert cos < 0.99, (key, cos)  # not L_simple's gradient rescaled
