"""``dual_output``: Dynamic Dual-Output Diffusion Models — Benny & Wolf, CVPR 2022.
Reference code: yanivbenny/dual_diffusion at commit bd785e1 (2022-11-26): ``src/diffusion.py``
(``GaussianDiffusion.predict_dualx``, ``training_losses``), ``src/respace.py`` and ``compute_fid.py``
(read, not copied; every choice and difference is listed below).

The UNet predicts, from x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, three things at once (paper, Fig. 3:
"x_θ, ε_θ, r_θ ... combined into a mean vector μ_θ"):

    out = UNet(x_t, t), 7 channels, in the official order
        x̂0 = out[:, 0:3]       direct clean-image prediction (raw, no activation)
        ε̂  = out[:, 3:6]       noise prediction (raw)
        r   = out[:, 6:7]       mixing logit, one map shared over RGB

    x̂0(ε̂)  = sqrt(1/ᾱ_t) x_t − sqrt(1/ᾱ_t − 1) ε̂                   (Ho et al. 2020, eq. 15 rearranged)
    s       = sigmoid(r)
    x̂0_mix  = s · sg(x̂0) + (1 − s) · sg(x̂0(ε̂))                    (sg = stop-gradient; x0-space mix)
    μ̃(x0, x_t, t) = c1_t x0 + c2_t x_t,   c1_t = β_t sqrt(ᾱ_{t−1})/(1 − ᾱ_t),
                                           c2_t = sqrt(α_t)(1 − ᾱ_{t−1})/(1 − ᾱ_t)   (DDPM eq. 7)

    L = [ w_x0 ‖x̂0 − x0‖² + w_ε ‖ε̂ − ε‖² + w_μ ‖μ̃(x̂0_mix, x_t) − μ̃(x0, x_t)‖² ] / 3

Because both branches of the mix are detached, L_x0 trains only the x̂0 head, L_ε only the ε̂ head
and L_μ only the r map (the shared trunk gets gradients from all three), exactly as in the code.

Choices, and where we differ from the release:

* Output layout, activation and stop-gradients: as released (``predict_dualx``): channels
  [x̂0 | ε̂ | r], r is one channel per pixel, s = sigmoid(r) with no temperature or clamp, both
  mixed branches detached. The split is done here, on a plain diffusers ``UNet2DModel`` with
  ``out_channels=7`` (the code also slices a 7-channel output inside the diffusion class).
* Loss: the released loss is the mean over the 9·H·W elements of cat(x0, ε, μ̃) − cat(x̂0, ε̂, μ̃_mix)
  per sample, then over the batch, i.e. (L_x0 + L_ε + L_μ)/3 with per-element MSEs. We keep that
  exactly with the weights ``loss_weight_x0 = loss_weight_eps = loss_weight_mu = 1`` (the weights
  are ours, the code has none). The returned ``loss_x0``/``loss_eps``/``loss_mu`` are the
  *unweighted* MSEs, like the code's logged ``loss_x_0``/``loss_noise``/``loss_mean``; ``loss`` is
  the weighted total above. No VLB term, no per-t weighting, t uniform (as released).
* The μ term equals c1_t² · MSE(x̂0_mix, x0) (c2_t x_t cancels), so r gets almost no gradient at
  large t (c1² ≈ 1.6e-8 at t = 999). ``mix_loss="x0"`` (ours, off by default) trains r on
  MSE(x̂0_mix, x0) instead: same per-(x_t, t) optimum, no c1² down-weighting. The released code
  trains r on the DDPM posterior mean even though it samples with DDIM by default; the optimum of r
  is the same, only the per-t weight differs.
* No clipping of anything in training (the code calls ``predict_dualx`` with ``fn=None`` there).
* Coefficients: the posterior-mean coefficients c1_t, c2_t are computed in float64 from the
  scheduler's β (ᾱ = cumprod(1 − β) in float64, ᾱ_{−1} = 1) and stored in float32, as the code
  builds its buffers (float64, ``register`` as float32); c1_0 = 1 and c2_0 = 0. Building them from
  the float32 ᾱ instead would cost ~2e-4 relative error at t = 2 (1 − ᾱ_1 ≈ 3e-4). x̂0(ε̂) uses the
  project's float32 ᾱ and arithmetic (``DDPMFinetune.predict_x0``, diffusers' DDIM), and the
  sampler's respaced β' come from the float32 ᾱ, as the code's ``SpacedDiffusion`` does.
* Sampling (``sample``): ``sampler="ddim"`` (default; the code's ``is_implicit: True`` and FID
  default) is DDIM with η = 0 only (the code has no η):
  x_{t'} = sqrt(ᾱ_{t'}) clip(x̂0_mix) + sqrt(1 − ᾱ_{t'}) ε_mix with ε_mix re-derived from the
  *unclipped* mix, as released (``ddim_eps_from_clipped=True`` re-derives it from the clipped one,
  the improved-diffusion/GLIDE convention). ``sampler="ddpm"`` is ancestral sampling with the
  posterior mean of clip(x̂0_mix) and the respaced β' as variance (``ddpm_variance="fixedlarge"``,
  the code's config default) or the posterior variance β̃' (``"fixedsmall"``); no noise at the
  last step, whose output is clip(x̂0_mix). ``clip_mixed=False`` turns the clip off (the code's
  ``clip_denoised``, default on). Only the mixed x̂0 is clipped, never the heads (as released).
  All noise (the initial x_T and every DDPM step) comes from a CPU ``torch.Generator`` seeded by
  ``seed`` (as ``backbone.ddim_sample``), so samples are deterministic for a seed.
* Respacing: the kept timesteps come from diffusers' ``DDIMScheduler.set_timesteps`` with
  ``timestep_spacing``; the step from τ_i to the next kept τ_{i−1} (ᾱ = 1 after the last) uses
  β'_i = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}}, the improved-diffusion recipe of ``respace.py``. The UNet sees the
  raw integer τ (no rescaling), as released.
  - ``"leading"`` (default): 0, T//N, 2·T//N, ... — the code's ``'ddim'`` respacing (the FID
    default) whenever N divides T (N = 5, 10, 25, 50, 100 all do). When N does not divide T the
    code keeps *more* than N steps (N = 3 → 0, 333, 666, 999); we keep exactly N (0, 333, 666).
    With s = 0 this is the very chain of ``backbone.ddim_sample``.
  - ``"trailing"``: T − 1, T − 1 − T/N, ..., rounded — the code's ``'ddodm'`` (its training-time
    visualisation) when N divides T (N = 10 → 99, 199, ..., 999); ±1 elsewhere. Unlike diffusers'
    own DDIM step (prev = t − T//N), the previous step is always the next *kept* one.
  - ``"linspace"``: round(linspace(0, T − 1, N)) (diffusers; not in the code).
* Defaults for few-shot adaptation vs the paper's CIFAR-10 pretraining (``config/cifar10_train.yaml``):
  Adam lr 2e-4, batch 128, 1M iterations, EMA 0.9999 (hard copy at the start), grad-clip 1.0,
  dropout 0.1, fp32. ``DualOutput`` keeps the project's fine-tuning defaults (lr 1e-4, batch 8,
  EMA 0.999 with the warm-up of ``common.EMA``, the source's own dropout) so that it compares with
  ``ddpm_finetune``; AdamW with weight_decay 0 is exactly Adam; grad-clip 1.0 as released.
  ``DualOutputPretrain`` uses the paper's lr 2e-4 and the project's pretraining batch/EMA.
* Init of a dual-output network built from scratch (``build_dual_unet``): diffusers' default
  ``conv_out`` init (PyTorch's default Conv2d init), like the code's plain ``Conv2d``; r starts
  small, so s ≈ 0.5.
* Widening an ε source (ours; the paper trains from scratch only): the project's sources predict
  ε with a 3-channel ``conv_out``. ``widen_unet`` builds the same UNet with ``out_channels=7``,
  loads every other weight unchanged and builds the new ``conv_out`` as
      rows 3:6  = the source's conv_out (weight and bias)  -> ε̂ is the source's ε prediction
      rows 0:3  = 0 (weight and bias)                       -> x̂0 ≡ 0, exactly, for finite features
      row  6    = weight 0, bias ``r_bias`` (default −30)    -> r ≡ −30, s = sigmoid(−30) ≈ 9.4e-14.
  Exactness: in float32, 1 − s rounds to exactly 1 whenever s < 2⁻²⁵ (r < −17.3), and s · x̂0 =
  s · 0 = 0, so x̂0_mix = 0 + 1 · x̂0(ε̂) is *bit-for-bit* the ε-derived x̂0 of the widened net's ε
  channels (also under bf16 autocast: −30 and 0 are exact in bf16 and the mix runs in float32).
  The only difference from the source is the rounding of a 7- vs 3-row convolution (~1e-7 rel.).
  Making x̂0 itself equal x̂0(ε̂) is impossible in one conv (it needs x_t and 1/sqrt(ᾱ_t)).
  The price — unavoidable with a sigmoid mix of detached branches: ∂x̂0_mix/∂r =
  s(1 − s)(x̂0 − x̂0(ε̂)) = (1 − s)(x̂0_mix − x̂0(ε̂)), so the sensitivity of the mix to r is bounded
  by its deviation from the source's estimate. An exact start therefore means a practically
  frozen r: its gradient carries a factor s(1 − s) ≈ 9e-14 and mostly sits below Adam's ε = 1e-8
  (tiny preset, lr 1e-4, 100 steps: the r bias does not move with the default μ loss and moves
  ~2e-5 with ``mix_loss="x0"``, against ~8e-3 — about lr per step — from −8 or −4). The widened
  model then adapts as ε-fine-tuning with an auxiliary x̂0 head on the shared trunk.
  ``widen_r_bias`` trades exactness for a live mix (−8: s ≈ 3.4e-4; −4: s ≈ 0.018, x̂0_mix =
  0.982·x̂0(ε̂) at the start; 0: s = 0.5, the from-scratch regime) and is in the search space.
  A source that already has 7 output channels is used as it is.
* Opening the mix (ours; default): both at once — an exact start and a mix that learns — by a
  schedule instead of an initialisation. The widening starts exactly at the source (r ≡ −30);
  after each of the first ``mix_open_steps`` (100) optimiser steps the r bias is moved by
  (``mix_open_bias`` − ``widen_r_bias``)/``mix_open_steps``, on top of what the optimiser does, so
  it reaches ``mix_open_bias`` (0: s = 1/2 where the r weights are 0, the from-scratch regime)
  at step 100. Meanwhile the x̂0 head, trained by L_x0 from the first step whatever s is, has
  learned the target, and once s is large enough r's gradient is no longer below Adam's ε and the
  map learns. Measured on the shipped 32² source on sketch (300 steps, lr 1e-4, EMA 0.999;
  ``run.eval_every`` 150, 256 samples at 50 DDIM steps; README "dual_output's mix"):
  - ``mix_open_steps: 0`` (the exact widening alone): mean s 9.4e-14 and ‖∇r‖ ≈ 2e-19 at every
    step; target_rate 0.004, target_rate_domain 0, fid_domain 0.195 — sketch strokes on the
    source's tinted backgrounds, an ε-fine-tuned model;
  - the default: mean s 9.4e-14 at step 1 (the samples of step 0 are the source's), 0.48 when
    opened, then learned down to 0.39 at step 150 and 0.29 at 300; ‖∇r‖ 1e-7 to 1e-6 after the
    opening; target_rate 1.00, target_rate_domain 0.996, fid_domain 0.106 — light backgrounds
    and grey strokes, softer than the shots', and lower intra-cluster diversity (0.030 vs 0.038).
  Training losses are the same in both runs to the printed digits (L_x0 and L_ε do not depend on
  s; only the small μ term does): the difference is what the sampler mixes. The move of the bias
  is deterministic, so a resumed run continues it exactly; ``mix_open_steps`` and
  ``mix_open_bias`` are in the search space. A run shorter than ``mix_open_steps`` ends half-open.
* Export: ``save_source`` with ``"dual_output": true`` in ``model_index.json``; the scheduler config
  is the source's (its ``prediction_type="epsilon"`` describes the ε head only: diffusers'
  ``DDPMPipeline`` cannot sample a dual-output UNet, this module's ``dual_sample`` can).
* Not checked: the paper's tables (step counts, FIDs) could not be read; the code is the authority.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from pydantic import Field

from trainers.common import SourceModelError, to_uint8
from trainers.diffusion.backbone import UNET_PRESETS, DiffusionSource, default_scheduler, save_source
from trainers.diffusion.ddpm_finetune import DDPMFinetune, DDPMFinetuneConfig
from trainers.perf import DevicePerf

DUAL_OUT_CHANNELS = 7  # [x̂0 (3) | ε̂ (3) | r (1)], the order of predict_dualx
Sampler = Literal["ddim", "ddpm"]
Spacing = Literal["leading", "trailing", "linspace"]
Variance = Literal["fixedlarge", "fixedsmall"]
MixLoss = Literal["posterior_mean", "x0"]


class DualOutputConfig(DDPMFinetuneConfig):
    # lr, batch_size, ema_decay, grad_clip: the project's fine-tuning defaults (see the docstring)
    loss_weight_x0: float = Field(1.0, ge=0, description="weight of ||x̂0 − x0||² (official: 1)")
    loss_weight_eps: float = Field(1.0, ge=0, description="weight of ||ε̂ − ε||² (official: 1)")
    loss_weight_mu: float = Field(1.0, ge=0, description="weight of the mixing term, trains r only (official: 1)")
    mix_loss: MixLoss = Field(
        "posterior_mean", description="posterior_mean = ||μ̃(x̂0_mix) − μ̃(x0)||² (official); "
        "x0 = ||x̂0_mix − x0||² (no c1_t² down-weighting at large t)")
    sampler: Sampler = Field("ddim", description="ddim (η = 0, official default) or ddpm (ancestral)")
    timestep_spacing: Spacing = Field(
        "leading", description="respacing of the sampling steps: leading = the code's 'ddim' mode, "
        "trailing = its 'ddodm' mode (when the step count divides T)")
    clip_mixed: bool = Field(True, description="clip the mixed x̂0 to [-1, 1] when sampling (official)")
    ddim_eps_from_clipped: bool = Field(
        False, description="DDIM: re-derive ε from the clipped mix (False = from the unclipped one, official)")
    ddpm_variance: Variance = Field("fixedlarge", description="ddpm sampler: β' (fixedlarge, official) or β̃'")
    widen_r_bias: float = Field(
        -30.0, description="ε sources only: initial r of the widened net; <= -17.4 starts exactly at the "
        "source but freezes r (see the module docstring), larger values start the mix alive")
    mix_open_steps: int = Field(
        100, ge=0, description="ε sources only: over the first N steps the r head's bias moves linearly from "
        "widen_r_bias to mix_open_bias (on top of what the optimiser does), so the run starts exactly at the "
        "source and the mix then learns; 0 = off (r stays where widen_r_bias put it)")
    mix_open_bias: float = Field(0.0, description="where the opening schedule takes the r head's bias "
                                 "(0: s = 1/2 where the r weights are 0, the from-scratch regime)")

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        return {
            "lr": {"loguniform": [2e-5, 1e-3]},
            "ema_decay": {"choice": [0.0, 0.99, 0.999]},
            "loss_weight_mu": {"loguniform": [0.1, 10.0]},
            "mix_loss": {"choice": ["posterior_mean", "x0"]},
            "sampler": {"choice": ["ddim", "ddpm"]},
            "timestep_spacing": {"choice": ["leading", "trailing"]},
            "clip_mixed": {"choice": [True, False]},
            "widen_r_bias": {"choice": [-30.0, -8.0, -4.0, 0.0]},
            "mix_open_steps": {"choice": [0, 50, 100, 200]},
            "mix_open_bias": {"uniform": [-4.0, 2.0]},
            "run.eval_sample_steps": {"choice": [5, 10, 25, 50]},
        }


# --- the network ------------------------------------------------------------------------------

def is_dual_output(unet: torch.nn.Module) -> bool:
    """True for a UNet with the dual-output layout (3 input channels, 7 output channels)."""
    unet = getattr(unet, "module", unet)  # DDP / DataParallel
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile
    config = getattr(unet, "config", None)
    if config is None:
        return False
    return getattr(config, "in_channels", None) == 3 and getattr(config, "out_channels", None) == DUAL_OUT_CHANNELS


def build_dual_unet(preset: str, resolution: int) -> UNet2DModel:
    """A freshly initialised dual-output UNet of a preset shape (``backbone.UNET_PRESETS``)."""
    if preset not in UNET_PRESETS:
        raise SourceModelError(f"unknown UNet preset {preset!r}; expected one of {sorted(UNET_PRESETS)}")
    return UNet2DModel(sample_size=resolution, in_channels=3, out_channels=DUAL_OUT_CHANNELS, **UNET_PRESETS[preset])


@torch.no_grad()
def widen_unet(unet: UNet2DModel, r_bias: float = -30.0) -> UNet2DModel:
    """A 7-channel copy of an ε-predicting UNet (``out_channels=3``): every weight but ``conv_out``
    is copied, the ε head is the source's ``conv_out``, the x̂0 head is zero and the r head is the
    constant ``r_bias`` (see the module docstring for why the mix is then exactly the source's
    ε-derived x̂0 for ``r_bias`` <= -17.4). The input UNet is left untouched."""
    cfg = unet.config
    if cfg.in_channels != 3 or cfg.out_channels != 3:
        raise SourceModelError(
            f"only an ε-predicting UNet with 3 input and 3 output channels can be widened, got "
            f"in_channels={cfg.in_channels}, out_channels={cfg.out_channels}")
    old_out = unet.conv_out
    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not move the caller's RNG
        wide = UNet2DModel.from_config(cfg, out_channels=DUAL_OUT_CHANNELS)
    trunk = {k: v for k, v in unet.state_dict().items() if not k.startswith("conv_out.")}
    missing, unexpected = wide.load_state_dict(trunk, strict=False)
    if set(missing) != {"conv_out.weight", "conv_out.bias"} or unexpected:
        raise SourceModelError(f"cannot widen this UNet: missing {missing}, unexpected {unexpected}")
    new_out = wide.conv_out
    if new_out.bias is None or old_out.bias is None or new_out.weight.shape[1:] != old_out.weight.shape[1:]:
        raise SourceModelError("cannot widen this UNet: conv_out is not a biased Conv2d of matching shape")
    new_out.weight.zero_()
    new_out.bias.zero_()
    new_out.weight[3:6].copy_(old_out.weight)
    new_out.bias[3:6].copy_(old_out.bias)
    new_out.bias[6] = r_bias
    param = next(unet.parameters())
    wide.to(param.device)
    if param.dtype != torch.float32:
        wide.to(param.dtype)
    return wide.train(unet.training)


def split_output(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂, r) from a 7-channel output, the official channel order (``predict_dualx``)."""
    if out.shape[1] != DUAL_OUT_CHANNELS:
        raise ValueError(f"a dual-output prediction has {DUAL_OUT_CHANNELS} channels, got {out.shape[1]}")
    return out[:, 0:3], out[:, 3:6], out[:, 6:7]


def mix_weight(r: torch.Tensor) -> torch.Tensor:
    """s = sigmoid(r), in float32 (``diffusion.py:301``)."""
    return torch.sigmoid(r.float())


def mix_x0(x0_direct: torch.Tensor, x0_from_eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x̂0_mix = s · sg(x̂0) + (1 − s) · sg(x̂0(ε̂)): both branches detached, so only s gets a
    gradient (``predict_dualx``, the paper's dynamic combination). s = 1 selects the x̂0 head,
    s = 0 the ε head."""
    return s * x0_direct.detach() + (1 - s) * x0_from_eps.detach()


class DiffusionCoefficients:
    """The per-timestep quantities of the training schedule, on a device."""

    def __init__(self, scheduler: DDPMScheduler, device: torch.device | str = "cpu"):
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(device, torch.float32)
        betas = scheduler.betas.detach().to("cpu", torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # DDPM posterior q(x_{t−1} | x_t, x_0) mean coefficients (Ho et al. 2020, eq. 7)
        self.post_coef1 = (betas * abar_prev.sqrt() / (1 - abar)).float().to(device)
        self.post_coef2 = ((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)).float().to(device)

    @staticmethod
    def _at(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v[t].view(-1, 1, 1, 1)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂0(ε) = (x_t − sqrt(1 − ᾱ_t) ε)/sqrt(ᾱ_t) (``predict_start_from_noise``); the same
        arithmetic as ``DDPMFinetune.predict_x0``."""
        abar = self._at(self.alphas_cumprod, t)
        return (x_t - (1 - abar).sqrt() * eps.float()) / abar.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε(x̂0) = (x_t − sqrt(ᾱ_t) x̂0)/sqrt(1 − ᾱ_t) (``predict_noise_from_start``)."""
        abar = self._at(self.alphas_cumprod, t)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """μ̃_t(x_t, x0) = c1_t x0 + c2_t x_t (DDPM eq. 7, ``q_posterior_mean``)."""
        return self._at(self.post_coef1, t) * x0 + self._at(self.post_coef2, t) * x_t


def dual_loss_terms(out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor, coef: DiffusionCoefficients,
                    mix_loss: MixLoss = "posterior_mean") -> dict[str, torch.Tensor]:
    """The three official loss terms (``training_losses`` with ``mean_type=dualx``), unweighted,
    from the raw 7-channel network output, plus the mean mixing weight (detached)."""
    x0_direct, eps_hat, r = split_output(out.float())
    s = mix_weight(r)
    x0_mix = mix_x0(x0_direct, coef.x0_from_eps(x_t, t, eps_hat), s)
    if mix_loss == "posterior_mean":
        loss_mu = F.mse_loss(coef.posterior_mean(x0_mix, x_t, t), coef.posterior_mean(x0, x_t, t))
    elif mix_loss == "x0":
        loss_mu = F.mse_loss(x0_mix, x0)
    else:
        raise ValueError(f"mix_loss must be 'posterior_mean' or 'x0', got {mix_loss!r}")
    return {
        "loss_x0": F.mse_loss(x0_direct, x0),
        "loss_eps": F.mse_loss(eps_hat, eps),
        "loss_mu": loss_mu,
        "mix_mean": s.mean().detach(),
    }


# --- sampling ---------------------------------------------------------------------------------

def respaced_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing = "leading") -> list[int]:
    """The kept timesteps, descending, from diffusers' ``DDIMScheduler.set_timesteps`` spacing."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must lie in [1, {num_train_timesteps}], got {steps}")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {spacing!r}")
    sched = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    return sorted({int(t) for t in sched.timesteps}, reverse=True)


@torch.no_grad()
def dual_sample(unet: torch.nn.Module, train_scheduler: DDPMScheduler, n: int, resolution: int, steps: int,
                device: torch.device | str, seed: int = 0, *, sampler: Sampler = "ddim",
                timestep_spacing: Spacing = "leading", clip: bool = True, ddim_eps_from_clipped: bool = False,
                ddpm_variance: Variance = "fixedlarge", batch_size: int = 64,
                autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Sample a dual-output UNet with the mixed x̂0; returns uint8 [n,3,H,W] on ``device``.

    ``sampler="ddim"``: x_{t'} = sqrt(ᾱ_{t'}) clip(x̂0_mix) + sqrt(1 − ᾱ_{t'}) ε_mix (η = 0,
    ``q_posterior_mean_implicit``). ``"ddpm"``: x_{t'} = μ̃'(clip(x̂0_mix), x_t) + σ' z with the
    respaced β' (``p_sample``). See the module docstring for the respacing and the options."""
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn(b, 3, resolution, resolution, generator=gen).to(device)
        images.append(dual_denoise(unet, train_scheduler, x, steps,
                                   lambda shape: torch.randn(shape, generator=gen), sampler=sampler,
                                   timestep_spacing=timestep_spacing, clip=clip,
                                   ddim_eps_from_clipped=ddim_eps_from_clipped, ddpm_variance=ddpm_variance,
                                   autocast=autocast))
    return torch.cat(images)


@torch.no_grad()
def dual_denoise(unet: torch.nn.Module, train_scheduler: DDPMScheduler, x: torch.Tensor, steps: int,
                 draw_noise, *, sampler: Sampler = "ddim", timestep_spacing: Spacing = "leading",
                 clip: bool = True, ddim_eps_from_clipped: bool = False, ddpm_variance: Variance = "fixedlarge",
                 autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """The sampling chain of :func:`dual_sample` from the noise ``x`` [B,3,H,W] (on the UNet's
    device) to uint8 images; ``draw_noise(shape)`` gives the DDPM sampler's per-step noise on the
    CPU (one seeded generator for a batch, or one per image: ``trainers.generate``)."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if ddpm_variance not in ("fixedlarge", "fixedsmall"):
        raise ValueError(f"ddpm_variance must be 'fixedlarge' or 'fixedsmall', got {ddpm_variance!r}")
    device = x.device
    b = x.shape[0]
    abar_all = train_scheduler.alphas_cumprod.to(device, torch.float32)
    one = torch.ones((), device=device)
    ts = respaced_timesteps(int(train_scheduler.config.num_train_timesteps), steps, timestep_spacing)
    was_training = unet.training
    unet.eval()
    try:
        for i, t in enumerate(ts):
            last = i + 1 == len(ts)
            abar_t = abar_all[t]
            abar_prev = one if last else abar_all[ts[i + 1]]
            with autocast if autocast is not None else contextlib.nullcontext():
                out = unet(x, torch.full((b,), t, device=device, dtype=torch.long)).sample
            x0_direct, eps_hat, r = split_output(out.float())
            x0_eps = (x - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()
            s = mix_weight(r)
            x0_mix = s * x0_direct + (1 - s) * x0_eps
            x0_used = x0_mix.clamp(-1, 1) if clip else x0_mix
            if sampler == "ddim":
                eps_src = x0_used if ddim_eps_from_clipped else x0_mix
                eps_mix = (x - abar_t.sqrt() * eps_src) / (1 - abar_t).sqrt()
                x = abar_prev.sqrt() * x0_used + (1 - abar_prev).sqrt() * eps_mix
            else:
                beta = 1 - abar_t / abar_prev  # the respaced β' of this step
                c1 = abar_prev.sqrt() * beta / (1 - abar_t)
                c2 = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)
                x = c1 * x0_used + c2 * x
                if not last:
                    var = beta if ddpm_variance == "fixedlarge" else beta * (1 - abar_prev) / (1 - abar_t)
                    z = draw_noise(tuple(x.shape)).to(device)
                    x = x + var.sqrt() * z
    finally:
        unet.train(was_training)
    return to_uint8(x)


# --- the methods ------------------------------------------------------------------------------

class DualOutput(DDPMFinetune):
    key = "dual_output"
    family = "diffusion"
    Config = DualOutputConfig
    # its opened mix reaches the target in 300 steps (target_rate 1.00 on `sketch` and on a glyph
    # folder task, README "Every method's defaults"); longer runs only lower its diversity further
    default_steps = 300

    def __init__(self, config: DualOutputConfig, source: DiffusionSource, device: torch.device,
                 seed: int = 0, perf: DevicePerf | None = None):
        cfg = source.unet.config
        if cfg.in_channels != 3 or cfg.out_channels not in (3, DUAL_OUT_CHANNELS):
            raise SourceModelError(
                f"dual_output needs a UNet with 3 input channels and either 3 output channels (ε "
                f"prediction; widened at build time) or {DUAL_OUT_CHANNELS} (x̂0 | ε̂ | r); source "
                f"{source.origin} has in_channels={cfg.in_channels}, out_channels={cfg.out_channels}")
        self.widened = cfg.out_channels == 3
        if self.widened:
            source = DiffusionSource(unet=widen_unet(source.unet, config.widen_r_bias),
                                     scheduler=source.scheduler, origin=source.origin)
        super().__init__(config, source, device, seed, perf)
        self.coef = DiffusionCoefficients(self.scheduler, self.device)

    def check_unet(self, unet: torch.nn.Module) -> None:
        if not is_dual_output(unet):  # the constructor has widened an ε source already
            raise SourceModelError(f"{self.key}: expected a {DUAL_OUT_CHANNELS}-channel dual-output UNet")

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The raw 7-channel output of the trained network (autocast, as float32)."""
        with self.perf.autocast():
            return self.net(x_t, t).sample.float()

    def mixed_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0_direct, eps_hat, r = split_output(out.float())
        return mix_x0(x0_direct, self.coef.x0_from_eps(x_t, t, eps_hat), mix_weight(r))

    def losses(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        x_t, t, eps = self.noisy(x0)
        return dual_loss_terms(self.predict(x_t, t), x0, x_t, t, eps, self.coef, self.config.mix_loss)

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fine-tuning step, then the mix-opening schedule's move of the r bias; reports
        ``grad_r``, the norm of the r head's gradient (row 6 of ``conv_out``, after clipping)."""
        out = super().train_step(batch)
        head = self.unet.conv_out
        if head.weight.grad is not None and head.bias.grad is not None:
            out["grad_r"] = torch.sqrt(head.weight.grad[6].float().pow(2).sum() + head.bias.grad[6].float() ** 2)
        cfg = self.config
        if self.widened and cfg.mix_open_steps and self.step <= cfg.mix_open_steps:
            with torch.no_grad():
                head.bias[6] += (cfg.mix_open_bias - cfg.widen_r_bias) / cfg.mix_open_steps
        return out

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """(w_x0 L_x0 + w_ε L_ε + w_μ L_μ)/3: the official 9-channel mean for unit weights."""
        cfg = self.config
        return (cfg.loss_weight_x0 * terms["loss_x0"] + cfg.loss_weight_eps * terms["loss_eps"]
                + cfg.loss_weight_mu * terms["loss_mu"]) / 3

    def sample(self, n: int, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        cfg = self.config
        return dual_sample(self.sampling_unet, self.scheduler, n, self.resolution, steps or cfg.sample_steps,
                           self.device, seed=seed, sampler=cfg.sampler, timestep_spacing=cfg.timestep_spacing,
                           clip=cfg.clip_mixed, ddim_eps_from_clipped=cfg.ddim_eps_from_clipped,
                           ddpm_variance=cfg.ddpm_variance, autocast=self.perf.autocast()).cpu()

    def export(self, folder: str | Path) -> Path:
        """The adapted (EMA) dual-output UNet as a diffusers folder; loads back with
        ``backbone.load_source`` as a 7-channel source that ``DualOutput`` accepts."""
        return save_source(self.sampling_unet, self.scheduler, folder,
                           extra={"adapted_by": self.key, "adapted_from": self.source_label,
                                  "dual_output": True, "dual_sampling": self.sampling_settings()})

    def sampling_settings(self) -> dict[str, Any]:
        """How this model's samples are drawn besides the sampler and step count (what
        ``trainers.generate`` reads back from an export)."""
        c = self.config
        return {"timestep_spacing": c.timestep_spacing, "clip": c.clip_mixed,
                "ddim_eps_from_clipped": c.ddim_eps_from_clipped, "ddpm_variance": c.ddpm_variance}


class DualOutputPretrainConfig(DualOutputConfig):
    preset: str = Field("small", description="UNet shape: tiny | small | base")
    lr: float = Field(2e-4, gt=0, description="the paper's pretraining lr")
    batch_size: int = Field(32, ge=1, description="the project's pretraining batch (paper: 128)")
    # ema_decay / ema_warmup: fine-tuning's, 0.999 warmed up (trainers.common.EMA; paper: 0.9999)


class DualOutputPretrain(DualOutput):
    """A dual-output source trained from scratch with the same objective (the paper's setting)."""

    key = "dual_output_pretrain"
    family = "diffusion"
    Config = DualOutputPretrainConfig

    def __init__(self, config: DualOutputPretrainConfig, resolution: int, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None):
        torch.manual_seed(seed)  # the initial weights are part of the run's identity
        source = DiffusionSource(unet=build_dual_unet(config.preset, resolution), scheduler=default_scheduler(),
                                 origin=f"scratch:{config.preset}:dual_output")
        super().__init__(config, source, device, seed, perf)
