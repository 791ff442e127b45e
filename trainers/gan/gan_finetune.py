"""``gan_finetune``: the baseline of the few-shot GAN papers (Wang et al., "Transferring GANs",
ECCV 2018; the "TGAN" row of CDC/DCL/AdAM/RSSA tables) — a pretrained StyleGAN2's generator and
discriminator are both fine-tuned on the shots with StyleGAN2's own objective.

One ``train_step`` is one iteration of rosinality/stylegan2-pytorch's ``train.py`` loop (at commit bef283a,
2021-11-24):

1. D step: L_D = softplus(D(G(z))) + softplus(−D(x)) (logistic loss, ``losses.d_logistic_loss``).
2. Lazy R1 every ``d_reg_every`` (16) D steps: (γ/2)·||∇_x D(x)||²·d_reg_every, γ = ``r1`` (10).
3. G step: L_G = softplus(−D(G(z))) (non-saturating).
4. Optional lazy path-length regularisation every ``g_reg_every`` (4) G steps, weight
   ``path_regularize``·g_reg_every on a batch shrunk by ``path_batch_shrink`` (off by default:
   the few-shot papers fine-tune without it for 1–3k iterations; StyleGAN2 uses 2).
5. Optional EMA of G (rosinality's ``accumulate``: g_ema ← d·g_ema + (1 − d)·g; off by default, below),
   through ``trainers.common.EMA``, the EMA of both families: ``ema_decay`` is the same per-step d
   as in the diffusion methods, without their warm-up (``ema_warmup`` False, as rosinality/ADA).

Choices (and why):

* Adam lr 0.002, betas (0, 0.99), batch 4: the setting of CDC (Ojha et al. 2021) and of the methods
  built on it. StyleGAN2's lazy-regularisation correction
  (Karras et al. 2020, appendix B: lr·c, betas**c with c = k/(k+1)) is applied to D when R1 is on
  and to G when path-length regularisation is on (rosinality applies it to G always; without any
  G regulariser there is nothing to correct for).
* Style mixing with probability ``mixing`` = 0.9, as in rosinality's ``train.py`` and CDC's
  training script, which the few-shot papers inherit; 0 switches it off.
* EMA: **off by default** (``ema_decay`` = 0; *departs from* CDC's and DCL's scripts, which keep
  rosinality's ``accum`` = 0.5^(32/10⁴) ≈ 0.99778, ``ROSINALITY_EMA``). That decay has a half-life
  of 312 steps at any batch size: right for the papers' 5,000+ iterations, but after this
  project's default 300 steps half of G_ema's weights (0.99778^300 ≈ 0.51) are the source's.
  Measured on the shipped 32² source (``benchmarks/pareto.py --pair gan``, 32 trials of both
  methods): every trial with that EMA stayed at the source (≤ 3% of samples classified as the
  target), every trial that reached the target (70–100%) had EMA off; a ten-shot folder task of
  light glyphs on dark backgrounds likewise kept the source's look with it and moved to the
  target without it. Set ``ema_decay`` to ``ROSINALITY_EMA`` for paper-length runs (it is in the
  sweep space); the EMA starts from the source's ``g_ema``. Alternatively ``ema_kimg`` gives
  StyleGAN2-ADA's form d = 0.5^(B/(ema_kimg·1000)) with optional ``ema_rampup``
  (ema_nimg = min(ema_kimg·1000, images seen · rampup)), used by ``GANPretrain``.
* The adapted G starts from the source's ``g`` (training generator), G_ema from its ``g_ema``, as in
  CDC's training script; D from the source's ``d`` (required).
* Randomness (z, mixing, noise maps, path-length probes) comes from the method's seeded
  generators, never from Python's ``random`` or the global torch RNG, so that ``state_dict`` resumes
  exactly and every noise map is passed explicitly to G.
* ``sample()`` uses G_ema when EMA is on, else G (which starts from the source's ``g``, as above); z and noise from a CPU generator seeded by
  ``seed``; truncation ψ = ``truncation`` (1 = none) around the mean w of 4096 z's.
* ``grad_clip`` defaults to None (GANs are not clipped in the reference code); when set it clips
  G's and D's gradients separately. Precision comes from the run (``run.precision``,
  ``trainers/perf.py``): the G/D forwards run under its autocast, R1 and the losses in fp32; with
  ``auto`` the GAN family stays in fp32 on CUDA too (``cuda_precision``: StyleGAN2's equalised-lr
  layers and R1 were tuned in fp32), ``run.precision=bf16`` asks for bf16.
* The returned ``loss`` is the generator objective (adversarial + method terms); ``d_loss`` the
  discriminator's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import Field

from trainers.base import AdaptationMethod, MethodConfig
from trainers.common import EMA, SourceModelError, to_uint8
from trainers.gan.losses import d_logistic_loss, d_r1_loss, g_nonsaturating_loss, g_path_regularize
from trainers.gan.source import GANSource, save_gan_source
from trainers.nets.stylegan2 import Generator
from trainers.perf import DevicePerf

ROSINALITY_EMA = 0.5 ** (32 / 10_000)


class GANFinetuneConfig(MethodConfig):
    lr: float = Field(0.002, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_clip: float | None = Field(None, description="max gradient norm per network; null: no clipping")
    r1: float | None = Field(10.0, ge=0, description="R1 weight γ; null: StyleGAN2-ADA's 0.0002·res²/batch")
    d_reg_every: int = Field(16, ge=1, description="lazy R1 interval (D steps)")
    path_regularize: float = Field(0.0, ge=0, description="path-length weight; 0 disables")
    g_reg_every: int = Field(4, ge=1, description="lazy path-length interval (G steps)")
    path_batch_shrink: int = Field(2, ge=1)
    mixing: float = Field(0.9, ge=0, le=1, description="style-mixing probability")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="per-step G EMA decay (trainers.common.EMA); 0 (default) "
                             "disables EMA; 0.99778 = rosinality's, for paper-length runs")
    ema_warmup: bool = Field(False, description="cap the EMA decay at (1+n)/(10+n) on step n; off as in rosinality/ADA")
    ema_kimg: float | None = Field(None, gt=0, description="if set: decay 0.5^(batch/(ema_kimg·1000))")
    ema_rampup: float | None = Field(None, gt=0, description="ADA's EMA ramp-up (with ema_kimg)")
    truncation: float = Field(1.0, gt=0, le=1, description="truncation ψ used by sample()")

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        return {
            "lr": {"loguniform": [2e-4, 5e-3]},
            "r1": {"choice": [1.0, 10.0]},
            "mixing": {"choice": [0.0, 0.9]},
            "ema_decay": {"choice": [0.0, ROSINALITY_EMA]},
        }


@dataclass
class Latents:
    """One batch of generator inputs: z's (two when mixing), the mixing cut-off, noise maps."""

    styles: list[torch.Tensor]
    inject_index: int | None
    noise: list[torch.Tensor]


def _adam(perf: DevicePerf, params, lr: float, reg_every: int, lazy: bool) -> torch.optim.Adam:
    """Adam with StyleGAN2's lazy-regularisation correction (appendix B): lr and betas raised to
    c = k/(k+1) when the regulariser runs every k steps."""
    c = reg_every / (reg_every + 1) if lazy else 1.0
    return perf.adam(params, lr=lr * c, betas=(0.0 ** c, 0.99 ** c))


class GANFinetune(AdaptationMethod):
    key = "gan_finetune"
    family = "gan"
    Config = GANFinetuneConfig
    cuda_precision = "fp32"

    def __init__(self, config: GANFinetuneConfig, source: GANSource, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None):
        super().__init__(config, source, device, seed, perf)
        if not isinstance(source, GANSource):
            raise TypeError(f"{self.key} needs a GANSource (trainers.gan.source.load_gan_source), "
                            f"got {type(source).__name__}")
        if source.d is None:
            raise SourceModelError(f"GAN source {source.origin} has no discriminator 'd'; "
                                   f"{self.key} fine-tunes G and D and needs one")
        g = source.g if source.g is not source.g_ema else copy.deepcopy(source.g)
        self.g: Generator = g.to(self.device).train().requires_grad_(True)
        self.d = source.d.to(self.device).train().requires_grad_(True)
        self.g_net: torch.nn.Module = self.g  # DDP-wrapped when parallelized
        self.d_net: torch.nn.Module = self.d
        self.use_ema = config.ema_decay > 0 or config.ema_kimg is not None
        # G_ema starts from the source's g_ema (below); the one EMA of both families
        self.ema = (EMA(self.g, config.ema_decay, warmup=config.ema_warmup, start=source.g_ema.to(self.device))
                    if self.use_ema else None)
        self.g_ema: Generator | None = self.ema.module if self.ema is not None else None
        self.r1_gamma = (config.r1 if config.r1 is not None
                         else 0.0002 * self.resolution ** 2 / config.batch_size)
        self.g_optim = _adam(self.perf, self.g.parameters(), config.lr, config.g_reg_every, config.path_regularize > 0)
        self.d_optim = _adam(self.perf, self.d.parameters(), config.lr, config.d_reg_every, self.r1_gamma > 0)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # z, noise, path probes
        self.cpu_generator = torch.Generator().manual_seed(seed + 7919)  # mixing decisions (host side)
        self.mean_path_length = torch.zeros((), device=self.device)
        self.images_seen = 0

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.source.resolution

    @property
    def style_dim(self) -> int:
        return self.g.style_dim

    def parallelize(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        self.g_net = wrap(self.g)
        self.d_net = wrap(self.d)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for m in (self.g, self.d) for p in m.parameters())

    def networks(self) -> dict[str, torch.nn.Module]:
        nets = {"g": self.g, "d": self.d}
        if self.g_ema is not None:
            nets["g_ema"] = self.g_ema
        return nets

    def draw_latents(self, batch: int) -> Latents:
        cfg = self.config
        mix = cfg.mixing > 0 and float(torch.rand((), generator=self.cpu_generator)) < cfg.mixing
        styles = [torch.randn(batch, self.style_dim, generator=self.generator, device=self.device)
                  for _ in range(2 if mix else 1)]
        inject = int(torch.randint(1, self.g.n_latent, (1,), generator=self.cpu_generator)) if mix else None
        return Latents(styles, inject, self.g.random_noise(batch, self.generator))

    def generate(self, net: torch.nn.Module, lat: Latents, **kwargs):
        """``net(lat)`` under the method's autocast; returns what the Generator returns."""
        with self.perf.autocast():
            return net(lat.styles, inject_index=lat.inject_index, noise=lat.noise, **kwargs)

    def discriminate(self, net: torch.nn.Module, images: torch.Tensor, **kwargs):
        with self.perf.autocast():
            return net(images, **kwargs)

    # -- the losses (methods extend these) ---------------------------------------------------
    def d_losses(self, real: torch.Tensor, lat: Latents) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Weighted D-step loss terms (summed for the D update) and logged scalars."""
        with torch.no_grad():
            fake = self.generate(self.g, lat)[0]
        fake_pred = self.discriminate(self.d_net, fake).float()
        real_pred = self.discriminate(self.d_net, real).float()
        stats = {"real_score": real_pred.detach().mean(), "fake_score": fake_pred.detach().mean()}
        return {"d_adv": d_logistic_loss(real_pred, fake_pred)}, stats

    def g_losses(self, real: torch.Tensor, lat: Latents) -> dict[str, torch.Tensor]:
        """Weighted G-step loss terms. D is frozen (requires_grad False) and called unwrapped:
        its parameters get no gradient here, only G's through the fake images."""
        fake = self.generate(self.g_net, lat)[0]
        fake_pred = self.discriminate(self.d, fake).float()
        return {"g_adv": g_nonsaturating_loss(fake_pred)}

    # -- one iteration -----------------------------------------------------------------------
    def _update(self, optim: torch.optim.Optimizer, module: torch.nn.Module, loss: torch.Tensor) -> None:
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip)
        optim.step()

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        real = batch.to(self.device, torch.float32)
        b = real.shape[0]
        out: dict[str, torch.Tensor] = {}

        # 1. discriminator
        self.g.requires_grad_(False)
        self.d.requires_grad_(True)
        d_terms, stats = self.d_losses(real, self.draw_latents(b))
        d_total = sum(d_terms.values())
        self._update(self.d_optim, self.d, d_total)
        out.update({k: v.detach() for k, v in d_terms.items()}, **stats)
        out["d_loss"] = d_total.detach()

        # 2. lazy R1 (Mescheder et al. 2018; Karras et al. 2020 sec. 3.1)
        if self.r1_gamma > 0 and self.step % cfg.d_reg_every == 0:
            real_r = real.detach().requires_grad_(True)
            real_pred = self.d_net(real_r)  # fp32: second-order gradients
            r1 = d_r1_loss(real_pred, real_r)
            # 0·pred keeps every D output in the graph (DDP expects all outputs used)
            self._update(self.d_optim, self.d, self.r1_gamma / 2 * r1 * cfg.d_reg_every + 0 * real_pred[0, 0])
            out["r1"] = r1.detach()

        # 3. generator
        self.g.requires_grad_(True)
        self.d.requires_grad_(False)
        g_terms = self.g_losses(real, self.draw_latents(b))
        g_total = sum(g_terms.values())
        self._update(self.g_optim, self.g, g_total)
        out.update({k: v.detach() for k, v in g_terms.items()})
        out["g_loss"] = g_total.detach()

        # 4. lazy path-length regularisation (Karras et al. 2020, eq. 4)
        if cfg.path_regularize > 0 and self.step % cfg.g_reg_every == 0:
            lat = self.draw_latents(max(1, b // cfg.path_batch_shrink))
            fake, latents = self.g_net(lat.styles, inject_index=lat.inject_index, noise=lat.noise,
                                       return_latents=True)
            penalty, self.mean_path_length, lengths = g_path_regularize(
                fake, latents, self.mean_path_length, generator=self.generator)
            self._update(self.g_optim, self.g,
                         cfg.path_regularize * cfg.g_reg_every * penalty + 0 * fake[0, 0, 0, 0])
            out["path"] = penalty.detach()
            out["path_length"] = lengths.detach().mean()
        self.d.requires_grad_(True)

        # 5. EMA
        self.images_seen += b
        self.update_ema(b)
        self.step += 1
        out["loss"] = out["g_loss"]
        return out

    def ema_decay_now(self, batch: int) -> float:
        cfg = self.config
        if cfg.ema_kimg is None:
            return cfg.ema_decay
        ema_nimg = cfg.ema_kimg * 1000
        if cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.images_seen * cfg.ema_rampup)
        return 0.5 ** (batch / max(ema_nimg, 1e-8))

    def update_ema(self, batch: int) -> None:
        if self.ema is not None:
            self.ema.update(self.g, decay=self.ema_decay_now(batch))

    # -- sampling and state ------------------------------------------------------------------
    @property
    def sampling_generator(self) -> Generator:
        return self.g_ema if self.g_ema is not None else self.g

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        """``n`` uint8 images [n,3,H,W] on the CPU from fixed seeded z and noise (``steps`` is
        ignored: a GAN samples in one pass)."""
        net = self.sampling_generator
        gen = torch.Generator().manual_seed(seed)
        center = None
        if self.config.truncation < 1:
            center = net.mean_latent(4096, generator=torch.Generator().manual_seed(seed + 1))
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            z = torch.randn(b, net.style_dim, generator=gen).to(self.device)
            noise = net.random_noise(b, gen)
            with self.perf.autocast():
                img = net([z], noise=noise, truncation=self.config.truncation, truncation_latent=center)[0]
            out.append(to_uint8(img.float()).cpu())
        return torch.cat(out) if out else torch.zeros(0, 3, self.resolution, self.resolution, dtype=torch.uint8)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "g": self.g.state_dict(),
            "d": self.d.state_dict(),
            "g_ema": self.g_ema.state_dict() if self.g_ema is not None else None,
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
            "g_optim": self.g_optim.state_dict(),
            "d_optim": self.d_optim.state_dict(),
            "mean_path_length": self.mean_path_length.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.images_seen = int(state.get("images_seen", 0))
        self.g.load_state_dict(state["g"])
        self.d.load_state_dict(state["d"])
        if self.g_ema is not None and state.get("g_ema") is not None:
            self.g_ema.load_state_dict(state["g_ema"])
            self.ema.num_updates = int(state.get("ema_updates", self.step))  # one update per step
        self.g_optim.load_state_dict(state["g_optim"])
        self.d_optim.load_state_dict(state["d_optim"])
        self.mean_path_length = state["mean_path_length"].to(self.device)

    def export(self, folder: str | Path) -> Path:
        """The adapted G, G_ema (G when EMA is off) and D as a rosinality-format checkpoint
        ``folder/stylegan2.pt`` (with "arch"): it loads back with ``load_gan_source(folder)``."""
        return save_gan_source(folder, self.g, self.sampling_generator, self.d,
                               extra={"adapted_by": self.key, "adapted_from": self.source_label})
