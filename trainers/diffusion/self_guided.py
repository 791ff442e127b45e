"""``self_guided``: self-guided diffusion — Hu, Zhang, Asano, Burghouts, Snoek, "Self-Guided
Diffusion Models", CVPR 2023, arXiv 2210.06462. Reference code: dongzhuoyao/self-guided-diffusion-models
at commit be8f452 (2023-06-02) (read, not copied). Every choice and every difference from that release is
listed below.

The method. A self-supervised feature function f and a self-annotation function ξ (k-means)
give each training image a pseudo-label c = ξ(f(x)) (trainers/annotate.py). The DDPM is made
class-conditional, ε_θ(x_t, t, c), trained with L_simple (Ho et al. 2020, eq. 14) while c is
replaced by the null condition ∅ with probability p per sample (classifier-free guidance, Ho &
Salimans 2022), and sampled with the guided noise estimate (paper eq. 3, "Imagen" form)

    ε̃(x_t, c) = ε_θ(x_t, t, ∅) + w · (ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅))      (w = 0: unconditional,
                                                                           w = 1: conditional)

For few-shot adaptation the source model's UNet is made conditional (exactly equal to the source
at initialisation) and fine-tuned on the shots with their pseudo-labels.

Conditioning (``conditioning``):

* ``concat`` (default; the release's ``openaimodel.py``): one-hot(c) ∈ R^n → Linear(n, C) → SiLU →
  Linear(C, C), **concatenated** with the time embedding (T = 4·base channels) before every
  ResBlock's SiLU → Linear(T + C, ·); C = T/2 as the release (256 for T = 512; ``cond_dim``
  overrides). Built on diffusers' ``UNet2DModel`` without re-implementing its forward:
  ``time_embedding_dim = T + C`` and ``class_embed_type = "identity"``; the time MLP's extra
  output/hidden units are zero and frozen (their gradients are zeroed every step, so AdamW leaves
  them at exactly zero), so the time embedding is [e_t, 0], and the class embedding passed to
  ``class_labels`` is [0, MLP(c)]: diffusers' ``emb + class_emb`` is then exactly cat(e_t, e_c).
  The saved UNet is a plain diffusers folder that ``backbone.load_source`` reads back.
* ``add`` (diffusers' convention): the same MLP with output width T, **added** to the time
  embedding (``class_embed_type="identity"``). A different architecture from the release (the
  condition then passes through the ResBlocks' SiLU together with the time embedding).
* How a ResBlock takes the embedding (a difference from the release, found by running both on
  identical inputs): the release's ResBlocks use ``use_scale_shift_norm`` (the projected
  embedding is split into (scale, shift) and applied after the GroupNorm, h = norm(h)·(1 + scale)
  + shift); diffusers' ``ResnetBlock2D`` with the project's sources (``time_embedding_norm=
  "default"``) *adds* it, h = h + proj(emb), before the second norm. The condition path is the
  same up to that projection; the block is the source UNet's, kept so that the conditional model
  equals the source at initialisation (a scale-shift block cannot load an additive source's
  weights). Outputs of the two networks on identical weights therefore differ by design.

Null condition ∅: the all-zero one-hot, which still goes through the MLP (MLP(0) = W2·SiLU(b1) +
b2), as the release's frozen ``null_cond_emb`` buffer; no extra class index. Label dropout is per
sample with probability ``p`` (default 0.1, the release's ``cond_drop_prob``), drawn from the
method's seeded generator (resumes exactly); dropped rows get the zero one-hot.

From an ordinary unconditional source (a plain UNet2DModel): the conditional UNet copies every
source weight; the last Linear of the condition MLP is zero-initialised, so e_c = 0 for every
label and for ∅, and the model's output equals the source's for any label before training
(``add``: bit-exactly, emb + 0; ``concat``: up to float rounding, since the ResBlock projections
gain input columns that multiply zeros — bit-exact in the CPU tests). The new projection columns for e_c get PyTorch's default
Linear init U(±1/√(T+C)) (seeded), so the zero layer receives gradient at the first step
(zeroing both would leave the pair stuck at a saddle). The release has no pretrained-source
setting; it trains the conditional model from scratch.

From a self-guided source (``export`` of this method or of ``self_guided_pretrain``: a diffusers
folder + ``self_guided.json`` + ``cond_mlp.pt`` + ``annotator.pt``): the conditional UNet and MLP
are reused as they are, with the source's annotator (encoder + centroids).

Pseudo-labels of the shots (``prepare``, ``target_labels``):

* ``new_clusters`` (default; works with any source): spherical k-means with ``k_target``
  clusters (at most one per shot) on the shots' features, labels *appended after* the source's
  n_src labels (n_src = 0 for an unconditional source). The MLP's first layer gets k_target new
  input columns initialised to zero, so a new label starts as the null condition (= the
  unconditional model) and learns its own embedding. The features come from the source's
  annotator's encoder (so new and source centroids share one space), else from an ``encoder=``
  module given to the constructor, else from ``context.domain_encoder`` (the project's SimCLR
  encoder); with none of them ``prepare`` raises.
* ``nearest_source``: each shot takes the label of its nearest source centroid (the source's
  annotator, cosine); needs a self-guided source (an unconditional one is rejected at build time).

Labels are cached with ``annotate.cached_labels`` in ``context.cache_dir`` (keyed by the
encoder's sha256, the image bytes, k and the seed) and recomputed when either changes. k-means is
seeded by ``cluster_seed`` (not the run seed), so every trial of a sweep sees the same labels.
``prepare`` never touches weights or optimiser state, so it may run before or after
``load_state_dict``; the label space (the MLP's input width) is fixed at build time from the
source and the config. Horizontal flips of a shot keep its label (labels are computed on the
unflipped shots; the release does not flip ImageNet).

Training: L_simple (ε-MSE, t uniform over the training steps) on the source's noise schedule (the
project's DDPM-linear betas; the release uses LDM's sqrt-linear "linear" schedule); AdamW with
the release's weight decay 0.01 and lr 1e-4 (its ImageNet-64 value; 3e-4 at 32²); optional linear
warm-up from 1e-6·lr over ``warmup_steps`` (release: 500; default 0 here, like ``ddpm_finetune``
and ``ddpm_pretrain``, whose short few-shot/demo runs it would dominate); EMA as ddpm_finetune
(decay 0.999 with the usual warm-up; release 0.9999 for long from-scratch runs). Gradient clipping
as the project's ``grad_clip`` (release: none). ``train_step`` returns 0-dim tensors ``loss``,
``loss_simple``, ``dropped_fraction`` and ``grad_norm`` (the norm before clipping).

Sampling: DDIM (Song et al. 2021), η = 0, the project's DDIM timesteps (diffusers ``DDIMScheduler``
from the training schedule; the release uses LDM's grid 1, 21, …, 981 for 50 steps), x̂0 clipped to
[−1, 1] with the unclipped guided ε reused for the direction term (diffusers' default, as the
release). The last step differs from the release (found on identical inputs): it goes to
ᾱ_prev = 1 (diffusers' ``set_alpha_to_one=True``, so the output is the clipped x̂0 itself), where
the release's DDIM sampler takes ᾱ_prev = ᾱ_0 of the training schedule (1 − β_1 = 0.9999 with the
project's betas) and keeps a trace of the predicted noise; every earlier step agrees to float
rounding. Default w = 2 in the form above (the release's ``cond_scale=2``, ``scale_type="imagen"``;
= 1 in Ho & Salimans' (1 + w)ε_c − wε_u convention). The two estimates are combined as
(1 − w)·ε_∅ + w·ε_c, exactly ε_∅ at w = 0 and ε_c at w = 1; w = 0 and w = 1 run one forward pass,
other w one pass on a doubled batch (as the release). ``sample(n)`` draws each sample's label
from the prepared shots' labels uniformly with replacement (= the empirical label distribution,
as the release draws conditions from training images; seeded); before ``prepare`` it draws
uniformly over every label of the embedding. Sampling uses the EMA weights when ``ema_decay`` >
0 (the release samples its FID images with the raw weights — a quirk).

The condition's learning rate (``cond_lr_mult``, ours; default 10): from an unconditional source
the condition MLP's last layer starts at zero, so ε_c = ε_∅ and guidance changes nothing until the
MLP has grown. With one learning rate for all (the release's setting, which trains from scratch)
it grows too slowly for a few-shot budget: on the shipped 32² source, after 300 steps on sketch
‖ε_c − ε_∅‖/‖ε_∅‖ was 0.15% at 1x and 0.85% at 10x; after 3,000 steps the share of samples that
land in the requested pseudo-class rose from 0.20 (w = 0) to 0.475 (w = 2) at 10x, against 0.175
→ 0.30 at 1x. Hence the default 10x: the rest of the network keeps ``lr``, so the adapted model
still starts exactly at the source. At 300 steps (w = 2, 256 samples) 10x cost no fidelity:
fid_domain 0.231 vs 0.237 at 1x, the same intra-cluster diversity (0.111). Guidance needs
thousands of steps either way; at the demo's 300 it barely acts. ``cond_lr_mult: 1`` restores
the release's single rate.

Search space: lr, cond_lr_mult, p, w, k_target and k. ``k`` (the number of source clusters) only matters for
``self_guided_pretrain``; a fine-tuned model takes its source clusters from the source.

``self_guided_pretrain``: a conditional UNet of a preset shape trained from scratch on the source
images; its ``prepare`` runs spherical k-means with ``k`` clusters on the source images' features
(``context.domain_encoder`` required). The release clusters 1.28M ImageNet images into k = 5000
(~256 images per cluster); the default k = 32 keeps ~128 per cluster for the 4,096 synthetic
source images. Its export is a self-guided source for ``self_guided``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from pydantic import Field

from trainers.annotate import Annotator, as_encoder, cached_labels, encoder_digest, kmeans, load_domain_encoder
from trainers.base import PrepareContext
from trainers.common import SourceModelError, to_uint8
from trainers.diffusion.backbone import DiffusionSource, build_unet, default_scheduler, save_source
from trainers.diffusion.ddpm_finetune import DDPMFinetune, DDPMFinetuneConfig
from trainers.perf import DevicePerf

SPEC_FORMAT = "fewshot-self-guided/1"
SPEC_FILE = "self_guided.json"
MLP_FILE = "cond_mlp.pt"
ANNOTATOR_FILE = "annotator.pt"

Conditioning = Literal["concat", "add"]
TargetLabels = Literal["nearest_source", "new_clusters"]


class SelfGuidedConfig(DDPMFinetuneConfig):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (the release's 0.01)")
    k: int = Field(32, ge=1, description="source clusters; only used by self_guided_pretrain (a fine-tuned "
                                          "model takes them from its source)")
    k_target: int = Field(5, ge=1, description="new clusters of the shots (target_labels=new_clusters); at most "
                                                "one per shot is fitted")
    target_labels: TargetLabels = Field("new_clusters", description="new_clusters: k-means on the shots, labels "
                                        "after the source's; nearest_source: nearest source centroid")
    p: float = Field(0.1, ge=0, le=1, description="label dropout probability (per sample, to the null condition)")
    w: float = Field(2.0, description="guidance: eps_null + w (eps_c - eps_null); 0 unconditional, 1 conditional")
    conditioning: Conditioning = Field("concat", description="concat (release) or add (diffusers) the condition "
                                       "embedding to the time embedding; a self-guided source keeps its own")
    cond_dim: int | None = Field(None, ge=1, description="width of the condition MLP; None = time embedding / 2")
    kmeans_iters: int = Field(30, ge=0)
    cluster_seed: int = Field(0, description="seed of k-means (not the run seed: labels are a property of the data)")
    warmup_steps: int = Field(0, ge=0, description="linear lr warm-up from 1e-6 lr (release: 500)")
    cond_lr_mult: float = Field(10.0, gt=0, description="learning rate of the condition MLP, as a multiple of lr "
                                "(ours; the release: 1, one lr for all, from scratch). From an unconditional "
                                "source the MLP starts at zero and guidance acts only once it has grown; 10x "
                                "makes it grow within a few-shot budget (see the module docstring)")
    eval_guidance: list[float] = Field([0.0], description="guidance scales whose requested_share the final "
                                       "evaluation also records (requested_share_w<w>, on up to 64 samples); "
                                       "the run's own w is recorded at every evaluation (requested_share)")

    @classmethod
    def search_space(cls) -> dict[str, Any]:
        return {
            "lr": {"loguniform": [2e-5, 1e-3]},
            "cond_lr_mult": {"loguniform": [1.0, 30.0]},
            "p": {"uniform": [0.05, 0.3]},
            "w": {"uniform": [0.0, 4.0]},
            "k_target": {"choice": [1, 2, 5, 10]},
            "k": {"choice": [8, 16, 32, 64]},  # only self_guided_pretrain uses it
        }


# --------------------------------------------------------------------------------------------
# the conditional UNet
# --------------------------------------------------------------------------------------------
class ConditionalUNet(nn.Module):
    """A diffusers UNet2DModel (``class_embed_type="identity"``) plus the condition MLP
    one-hot(n) → Linear → SiLU → Linear; ``forward(x, t, cond)`` with ``cond`` the float one-hot
    [B, n] (all-zero rows = the null condition). See the module docstring for ``concat``."""

    def __init__(self, unet: UNet2DModel, num_classes: int, conditioning: str, cond_dim: int, time_dim: int):
        super().__init__()
        if conditioning not in ("concat", "add"):
            raise ValueError(f"conditioning must be 'concat' or 'add', got {conditioning!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        emb = unet.time_embedding.linear_2.out_features
        want = time_dim + cond_dim if conditioning == "concat" else time_dim
        if unet.config.class_embed_type != "identity" or emb != want:
            raise SourceModelError(
                f"UNet is not a {conditioning} self-guided UNet (class_embed_type="
                f"{unet.config.class_embed_type!r}, time embedding {emb}, expected 'identity' and {want})")
        self.unet = unet
        self.num_classes, self.conditioning = int(num_classes), conditioning
        self.cond_dim, self.time_dim = int(cond_dim), int(time_dim)
        out = self.cond_dim if conditioning == "concat" else self.time_dim
        self.cond_mlp = nn.Sequential(nn.Linear(self.num_classes, self.cond_dim), nn.SiLU(),
                                      nn.Linear(self.cond_dim, out))

    @property
    def config(self):
        return self.unet.config

    def spec(self) -> dict[str, Any]:
        return {"conditioning": self.conditioning, "num_classes": self.num_classes, "cond_dim": self.cond_dim,
                "time_dim": self.time_dim}

    def condition(self, labels: torch.Tensor, drop: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """Float one-hot [B, n] of ``labels`` (int [B]; −1 = the null condition); rows where
        ``drop`` is True become the null condition (all zero). ``check=False`` skips the range
        check, which reads the labels on the host (training: labels were checked in prepare)."""
        labels = labels.long()
        if check and labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [-1, {self.num_classes}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        classes = torch.arange(self.num_classes, device=labels.device)
        onehot = labels[:, None] == classes[None, :]  # a label of -1 matches no class: the zero row
        if drop is not None:
            onehot = onehot & ~drop.to(labels.device)[:, None]
        return onehot.float()

    def embed(self, cond: torch.Tensor) -> torch.Tensor:
        e = self.cond_mlp(cond)
        return F.pad(e, (self.time_dim, 0)) if self.conditioning == "concat" else e

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
        return self.unet(x, t, class_labels=self.embed(cond))

    @torch.no_grad()
    def zero_frozen_grads(self) -> None:
        """``concat``: the time MLP's extra units stay exactly zero (gradient zeroed)."""
        if self.conditioning != "concat":
            return
        te, T = self.unet.time_embedding, self.time_dim
        for p, sl in ((te.linear_1.weight, (slice(T, None),)), (te.linear_1.bias, (slice(T, None),)),
                      (te.linear_2.weight, (slice(T, None),)), (te.linear_2.weight, (slice(None), slice(T, None))),
                      (te.linear_2.bias, (slice(T, None),))):
            if p.grad is not None:
                p.grad[sl] = 0

    def frozen_values_max(self) -> torch.Tensor:
        """Largest |value| among the frozen time-MLP entries (0 for ``add``; a check)."""
        if self.conditioning != "concat":
            return torch.zeros(())
        te, T = self.unet.time_embedding, self.time_dim
        parts = [te.linear_1.weight[T:], te.linear_1.bias[T:], te.linear_2.weight[T:],
                 te.linear_2.weight[:, T:], te.linear_2.bias[T:]]
        return torch.stack([p.detach().abs().max() for p in parts]).max()

    @torch.no_grad()
    def extend_classes(self, num_classes: int) -> None:
        """Grow the label space to ``num_classes``: new one-hot columns of the first Linear are
        zero, so a new label embeds exactly as the null condition until it is trained."""
        if num_classes < self.num_classes:
            raise ValueError(f"cannot shrink the label space from {self.num_classes} to {num_classes}")
        if num_classes == self.num_classes:
            return
        old = self.cond_mlp[0]
        with torch.random.fork_rng(devices=[]):  # its init is overwritten: leave the global RNG alone
            new = nn.Linear(num_classes, self.cond_dim).to(old.weight.device, old.weight.dtype)
        new.weight.zero_()
        new.weight[:, :self.num_classes] = old.weight
        new.bias.copy_(old.bias)
        self.cond_mlp[0] = new
        self.num_classes = int(num_classes)


def conditional_from_unconditional(unet: UNet2DModel, num_classes: int, conditioning: str = "concat",
                                   cond_dim: int | None = None, zero_init: bool = True,
                                   seed: int = 0) -> ConditionalUNet:
    """The conditional UNet of an unconditional ``unet``: every source weight copied (the time
    MLP zero-padded for ``concat``), fresh ResBlock columns for the condition, and the MLP's last
    Linear zero when ``zero_init`` (output = source output for every label). Seeded; the global
    RNG is left untouched."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise SourceModelError("the source UNet is already class-conditional (class_embed_type="
                               f"{cfg.get('class_embed_type')!r}, num_class_embeds={cfg.get('num_class_embeds')!r}) "
                               "but is not a self-guided export (no self_guided.json)")
    time_dim = unet.time_embedding.linear_2.out_features
    cond_dim = int(cond_dim or time_dim // 2)
    cfg["class_embed_type"] = "identity"
    if conditioning == "concat":
        cfg["time_embedding_dim"] = time_dim + cond_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = UNet2DModel.from_config(cfg)
        net = ConditionalUNet(new, num_classes, conditioning, cond_dim, time_dim)
    src = unet.state_dict()
    dst = new.state_dict()
    if set(src) != set(dst):
        raise SourceModelError(f"unexpected UNet layout: {sorted(set(src) ^ set(dst))[:5]}")
    with torch.no_grad():
        for name, p in dst.items():
            s = src[name].to(p.dtype)
            if p.shape == s.shape:
                p.copy_(s)
            elif name.startswith("time_embedding.linear_"):  # [e_t, 0]: extra units zero
                p.zero_()
                p[tuple(slice(0, d) for d in s.shape)] = s
            elif name.endswith("time_emb_proj.weight") and p.shape[0] == s.shape[0] and p.shape[1] > s.shape[1]:
                p[:, :s.shape[1]] = s  # the remaining (condition) columns keep their fresh init
            else:
                raise SourceModelError(f"cannot map source weight {name} {tuple(s.shape)} to {tuple(p.shape)}")
        if zero_init:
            net.cond_mlp[2].weight.zero_()
            net.cond_mlp[2].bias.zero_()
    return net.to(unet.device)


# --------------------------------------------------------------------------------------------
# self-guided source folders
# --------------------------------------------------------------------------------------------
def is_self_guided_source(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def load_conditional_unet(unet: UNet2DModel, folder: str | os.PathLike) -> tuple[ConditionalUNet, dict[str, Any]]:
    """The conditional network of a self-guided folder around its already loaded ``unet`` (what
    sampling needs; no annotator), and the folder's ``self_guided.json``."""
    folder = Path(folder)
    spec = json.loads((folder / SPEC_FILE).read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise SourceModelError(f"{folder / SPEC_FILE}: format {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
    if not (folder / MLP_FILE).is_file():
        raise SourceModelError(f"self-guided source {folder} has no {MLP_FILE}")
    net = ConditionalUNet(unet, spec["num_classes"], spec["conditioning"], spec["cond_dim"], spec["time_dim"])
    net.cond_mlp.load_state_dict(torch.load(folder / MLP_FILE, map_location="cpu", weights_only=True))
    return net.to(next(unet.parameters()).device), spec


def load_self_guided_parts(unet: UNet2DModel, folder: str | os.PathLike, device, encoder: Any = None
                           ) -> tuple[ConditionalUNet, Annotator, dict[str, Any]]:
    """The conditional network (around the already loaded ``unet``) and the annotator of a
    self-guided source folder."""
    folder = Path(folder)
    net, spec = load_conditional_unet(unet, folder)
    if not (folder / ANNOTATOR_FILE).is_file():
        raise SourceModelError(f"self-guided source {folder} has no {ANNOTATOR_FILE}")
    if Annotator.embeds_encoder(folder / ANNOTATOR_FILE):
        encoder = None  # the annotator's own (embedded) encoder defines its label space
    try:
        annotator = Annotator.load(folder / ANNOTATOR_FILE, encoder=encoder, device=device)
    except (ValueError, FileNotFoundError) as exc:
        raise SourceModelError(f"self-guided source {folder}: {exc}") from exc
    if annotator.num_labels > net.num_classes:
        raise SourceModelError(f"{folder}: the annotator labels up to {annotator.num_labels} classes, "
                               f"the model has {net.num_classes}")
    return net.to(device), annotator, spec


# --------------------------------------------------------------------------------------------
# guided DDIM
# --------------------------------------------------------------------------------------------
def guidance_combine(eps_cond: torch.Tensor, eps_null: torch.Tensor, w: float) -> torch.Tensor:
    """ε̃ = ε_∅ + w (ε_c − ε_∅), computed as (1 − w) ε_∅ + w ε_c (the release's ``imagen`` form):
    exactly ε_∅ at w = 0 and ε_c at w = 1."""
    return (1.0 - w) * eps_null + w * eps_cond


def guided_eps(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """The guided noise estimate (fp32): one pass at w ∈ {0, 1}, else one doubled batch."""
    null = torch.zeros_like(cond)
    if w == 0:
        return net(x, t, null).sample.float()
    if w == 1:
        return net(x, t, cond).sample.float()
    both = net(torch.cat([x, x]), t, torch.cat([cond, null])).sample.float()
    eps_c, eps_u = both.chunk(2)
    return guidance_combine(eps_c, eps_u, w)


@torch.no_grad()
def guided_ddim_sample(net: ConditionalUNet, train_scheduler: DDPMScheduler, labels: torch.Tensor, resolution: int,
                       steps: int, device: torch.device, w: float, seed: int = 0, eta: float = 0.0,
                       batch_size: int = 64,
                       autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with the guided ε̃ (labels −1 = unconditional rows);
    the noise and the timesteps are drawn exactly as ``backbone.ddim_sample``; uint8 [n,3,H,W]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    labels = labels.long()
    out = []
    for start in range(0, len(labels), batch_size):
        b = min(batch_size, len(labels) - start)
        x = torch.randn(b, 3, resolution, resolution, generator=gen).to(device)
        out.append(guided_denoise(net, train_scheduler, x, labels[start:start + b], steps, w, eta=eta,
                                  generator=gen if eta > 0 else None, autocast=autocast))
    return torch.cat(out) if out else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)


@torch.no_grad()
def guided_denoise(net: ConditionalUNet, train_scheduler: DDPMScheduler, x: torch.Tensor, labels: torch.Tensor,
                   steps: int, w: float, eta: float = 0.0, generator=None,
                   autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """The DDIM chain of :func:`guided_ddim_sample` from the noise ``x`` [B,3,H,W] (on the net's
    device) to uint8 images; ``generator``: one CPU generator, or one per image (diffusers'
    schedulers accept a list), for η > 0."""
    device = x.device
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    was_training = net.training
    net.eval()
    try:
        cond = net.condition(labels.long().to(device))
        for t in scheduler.timesteps:
            with autocast if autocast is not None else contextlib.nullcontext():
                eps = guided_eps(net, x, t, cond, w)
            x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    finally:
        net.train(was_training)
    return to_uint8(x)


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------
class SelfGuided(DDPMFinetune):
    key = "self_guided"
    family = "diffusion"
    Config = SelfGuidedConfig
    wants_index = True
    uses_domain_encoder = True
    # ddpm_finetune's budget (2,000 steps): the same L_simple on the same UNet, and the same rates
    # where both were measured. From the shipped source at the defaults: target_rate 0.15 after 300
    # steps on `sketch`, 0.85 after 1,000 (requested pseudo-class share 0.59 at w = 2 against 0.45
    # unguided); on a ten-shot glyph folder task 0.23 and 0.64, fine-tuning 0.33 and 0.67 (0.85 at
    # 2,000; README "Every method's defaults")
    default_steps = 2000

    def __init__(self, config: SelfGuidedConfig, source: DiffusionSource, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None, encoder: Any = None):
        """``encoder``: an optional feature module (see annotate.ModuleEncoder) used for the
        pseudo-labels instead of ``context.domain_encoder``, and needed to load a self-guided
        source whose annotator was made with such a module."""
        device = torch.device(device)
        self.encoder = as_encoder(encoder) if encoder is not None else None
        if self.encoder is not None and isinstance(self.encoder, nn.Module):
            self.encoder.to(device)
        self.source_annotator: Annotator | None = None
        self.num_source_classes = 0
        net = self._build_network(config, source, device, seed)
        super().__init__(config, DiffusionSource(net, source.scheduler, source.origin), device, seed, perf)
        # Two parameter groups: the condition MLP learns at cond_lr_mult · lr (our knob; the release
        # trains everything at one lr). Adam's step does not scale with the gradient, so a per-group
        # learning rate, not a gradient scale, is what speeds up the condition path.
        mlp = {id(p) for p in self.unet.cond_mlp.parameters()}
        self.optimizer = self.perf.adamw(
            [{"params": [p for p in self.unet.parameters() if id(p) not in mlp], "lr_mult": 1.0},
             {"params": list(self.unet.cond_mlp.parameters()), "lr_mult": config.cond_lr_mult}],
            lr=config.lr, weight_decay=config.weight_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * group["lr_mult"]
        self.labels: torch.Tensor | None = None  # pseudo-labels of the prepared images, on the device
        self.annotator: Annotator | None = self.source_annotator if config.target_labels == "nearest_source" else None

    def check_unet(self, unet: torch.nn.Module) -> None:
        if not isinstance(unet, ConditionalUNet):  # the constructor has wrapped a plain source already
            raise SourceModelError(f"{self.key}: expected a class-conditional UNet (ConditionalUNet)")

    # -- building ---------------------------------------------------------------------------
    def _build_network(self, config: SelfGuidedConfig, source: DiffusionSource, device, seed: int) -> ConditionalUNet:
        origin = Path(str(source.origin))
        if origin.is_dir() and is_self_guided_source(origin):
            net, annotator, spec = load_self_guided_parts(source.unet, origin, device, encoder=self.encoder)
            self.source_annotator = annotator
            self.num_source_classes = net.num_classes
            if config.target_labels == "new_clusters":
                net.extend_classes(net.num_classes + config.k_target)
            return net
        if config.target_labels == "nearest_source":
            raise ValueError(
                f"target_labels='nearest_source' needs a self-guided source (an export of self_guided or "
                f"self_guided_pretrain, with {ANNOTATOR_FILE}); {source.origin} is an unconditional DDPM: "
                "use target_labels='new_clusters'")
        return conditional_from_unconditional(source.unet, config.k_target, config.conditioning, config.cond_dim,
                                              zero_init=True, seed=seed)

    @property
    def num_classes(self) -> int:
        return self.unet.num_classes

    # -- pseudo-labels ----------------------------------------------------------------------
    def _encoder(self, context: PrepareContext) -> tuple[Any, str]:
        if self.source_annotator is not None:
            return self.source_annotator.encoder, self.source_annotator.encoder_digest
        if self.encoder is not None:
            return self.encoder, encoder_digest(self.encoder)
        if context.domain_encoder is not None:
            enc = load_domain_encoder(context.domain_encoder, self.device)
            return enc, encoder_digest(enc)
        raise ValueError(
            f"{self.key} needs an image encoder for its pseudo-labels: the source is not a self-guided model "
            f"(no {ANNOTATOR_FILE}), PrepareContext.domain_encoder is None and no encoder= module was given")

    def _cluster(self, images: torch.Tensor, context: PrepareContext, k: int, tag: str) -> tuple[Any, str, dict]:
        encoder, digest = self._encoder(context)
        iters, seed = self.config.kmeans_iters, self.config.cluster_seed

        def fit(im: torch.Tensor) -> dict[str, torch.Tensor]:
            centroids, labels = kmeans(encoder.features(im), k, iters=iters, seed=seed)
            return {"labels": labels, "centroids": centroids}

        res = cached_labels(context.cache_dir, digest, images, fit, k=k, seed=seed, extra=f"{tag}|iters={iters}")
        return encoder, digest, res

    def prepare(self, images: torch.Tensor, context: PrepareContext | None = None) -> None:
        """Pseudo-label every training image (uint8 [N,3,H,W]); see the module docstring."""
        context = context or PrepareContext()
        images = images.to(self.device)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"prepare needs uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        if self.config.target_labels == "nearest_source":
            ann = self.source_annotator
            labels = cached_labels(context.cache_dir, ann.encoder_digest, images, ann.labels, k=ann.k, seed=0,
                                   extra=f"nearest_source|{ann.digest}")
            self.annotator = ann
        else:
            k = min(self.config.k_target, len(images))
            encoder, digest, res = self._cluster(images, context, k, "new_clusters")
            offset = self.num_source_classes
            labels = res["labels"] + offset
            ids = torch.arange(k) + offset
            centroids = res["centroids"]
            if self.source_annotator is not None:
                src = self.source_annotator
                centroids = torch.cat([src.centroids.cpu(), centroids])
                ids = torch.cat([src.ids.cpu(), ids])
            self.annotator = Annotator(encoder, centroids.to(self.device), digest, ids=ids,
                                       meta={"target_labels": "new_clusters", "k_target": k,
                                             "source_classes": offset})
        self._set_labels(labels)

    def _set_labels(self, labels: torch.Tensor) -> None:
        labels = labels.long().to(self.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"pseudo-labels outside [0, {self.num_classes})")
        self.labels = labels

    # -- training ---------------------------------------------------------------------------
    def drop_mask(self, batch_size: int) -> torch.Tensor:
        """Per-sample label dropout: True with probability p (the method's generator)."""
        return torch.rand(batch_size, generator=self.generator, device=self.device) < self.config.p

    def _lr_factor(self) -> float:
        n = self.config.warmup_steps
        if n <= 0 or self.step >= n:
            return 1.0
        return 1e-6 + (1.0 - 1e-6) * self.step / n  # the release's LambdaLinearScheduler (f_start 1e-6)

    def conditional_loss(self, x0: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L_simple (Ho et al. 2020, eq. 14) of the conditional model, labels dropped to ∅ with
        probability p per sample; returns (loss, drop mask)."""
        x_t, t, eps = self.noisy(x0)
        drop = self.drop_mask(x0.shape[0])
        cond = self.unet.condition(labels, drop, check=False)  # no host sync per step
        with self.perf.autocast():
            eps_hat = self.net(x_t, t, cond).sample
        return F.mse_loss(eps_hat.float(), eps), drop

    def losses(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DDPMFinetune's hook, conditional: ``labels`` None = every row the null condition."""
        if labels is None:
            labels = torch.full((x0.shape[0],), -1, dtype=torch.long, device=self.device)
        return {"loss_simple": self.conditional_loss(x0, labels)[0]}

    def train_step(self, batch: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if index is None:
            raise ValueError(f"{self.key} needs train_step(batch, index=...): the indices of the batch's images in "
                             "the prepared set (the method sets wants_index)")
        if self.labels is None:
            raise RuntimeError(f"{self.key}: call prepare(images, context) before training")
        labels = self.labels[index.to(self.labels.device)]
        loss, drop = self.conditional_loss(batch, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.unet.zero_frozen_grads()
        params = [p for p in self.unet.parameters() if p.grad is not None]
        if self.config.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        factor = self._lr_factor()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor * group["lr_mult"]
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.unet)
        self.step += 1
        loss = loss.detach()
        return {"loss": loss, "loss_simple": loss, "dropped_fraction": drop.float().mean(),
                "grad_norm": grad_norm.detach()}

    # -- sampling ---------------------------------------------------------------------------
    def draw_labels(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` labels from the prepared images' labels (uniform with replacement, seeded);
        before ``prepare``: uniform over the label space. On the CPU."""
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 0x5E1F) % (2 ** 63))
        if self.labels is not None and self.labels.numel():
            pool = self.labels.cpu()
            return pool[torch.randint(len(pool), (n,), generator=gen)]
        return torch.randint(self.num_classes, (n,), generator=gen)

    def sample_labels(self, labels: torch.Tensor, steps: int | None = None, seed: int = 0,
                      guidance: float | None = None) -> torch.Tensor:
        """Samples of the given labels (int [n]; −1 = unconditional) with guidance ``guidance``
        (default ``config.w``); uint8 [n,3,H,W] on the CPU."""
        w = self.config.w if guidance is None else float(guidance)
        return guided_ddim_sample(self.sampling_unet, self.scheduler, torch.as_tensor(labels), self.resolution,
                                  steps or self.config.sample_steps, self.device, w, seed=seed,
                                  autocast=self.perf.autocast()).cpu()

    def sample(self, n: int, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        return self.sample_labels(self.draw_labels(n, seed), steps=steps, seed=seed)

    def requested_share(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        """The share of ``samples`` (uint8, drawn for ``labels``) whose nearest pseudo-class
        centroid, among the classes requested, is the one requested: does guidance take a sample
        where it was asked to go? Chance is about 1/k; the classes are the annotator's (the
        shots' k-means, or the source's clusters under target_labels=nearest_source)."""
        from trainers.annotate import assign

        ann, labels = self.annotator, labels.cpu()
        ids = ann.ids.cpu()
        keep = torch.nonzero(torch.isin(ids, torch.unique(labels))).flatten()
        feats = ann.features(samples.to(self.device)).float().cpu()
        got = ids[keep][assign(feats, ann.centroids.float().cpu()[keep])]
        return float((got == labels).float().mean())

    def evaluation_extras(self, samples: torch.Tensor, n: int, steps: int | None, seed: int,
                          final: bool) -> dict[str, float]:
        """``requested_share`` of the evaluation's samples (the run's w, the labels ``sample``
        drew) at every evaluation; at the final one also at each ``eval_guidance`` scale, on the
        first (up to) 64 of the same labels and noise, so that a run shows whether its guidance
        acts (the paper's claim: guidance w draws samples of the requested pseudo-class)."""
        if self.annotator is None:
            return {}
        labels = self.draw_labels(n, seed)
        out = {"requested_share": self.requested_share(samples, labels)}
        if final:
            few = labels[:64]
            for w in self.config.eval_guidance:
                if float(w) != float(self.config.w):
                    drawn = self.sample_labels(few, steps=steps, seed=seed, guidance=w)
                    out[f"requested_share_w{float(w):g}"] = self.requested_share(drawn, few)
        return out

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state.get("num_classes")
        if n is not None and int(n) != self.num_classes:
            raise ValueError(f"checkpoint has {n} classes, this {self.key} model {self.num_classes} "
                             "(a different source, target_labels or k_target)")
        super().load_state_dict(state)

    def export(self, folder: str | Path) -> Path:
        """A self-guided source folder: the diffusers UNet (``save_source``), ``self_guided.json``,
        ``cond_mlp.pt`` and ``annotator.pt`` (EMA weights when there is an EMA); atomic."""
        annotator = self.annotator
        if annotator is None:
            raise RuntimeError(f"{self.key}: export needs prepare() first (the annotator of the label space "
                               "is made there)")
        folder = Path(folder)
        net = self.sampling_unet
        staging = folder.with_name(folder.name + ".sg-staging")
        if staging.exists():
            shutil.rmtree(staging)
        save_source(net.unet, self.scheduler, staging,
                    extra={"adapted_by": self.key, "adapted_from": self.source_label, "self_guided": True})
        spec = {"format": SPEC_FORMAT, **net.spec(), "null_condition": "zero one-hot",
                "guidance": "eps_null + w * (eps_cond - eps_null)", "w": self.config.w, "p": self.config.p,
                "source_classes": self.num_source_classes, "adapted_by": self.key}
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        torch.save({k: v.detach().cpu() for k, v in net.cond_mlp.state_dict().items()}, staging / MLP_FILE)
        annotator.save(staging / ANNOTATOR_FILE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
        return folder


# --------------------------------------------------------------------------------------------
# pretraining a self-guided source
# --------------------------------------------------------------------------------------------
class SelfGuidedPretrainConfig(SelfGuidedConfig):
    preset: str = Field("small", description="UNet shape: tiny | small | base")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    # ema_decay / ema_warmup: fine-tuning's (0.999, warmed up: trainers.common.EMA)


class SelfGuidedPretrain(SelfGuided):
    """A self-guided source from scratch: k-means with ``k`` clusters on the source images'
    features (``prepare``; ``context.domain_encoder`` needed) and the conditional model."""

    key = "self_guided_pretrain"
    family = "diffusion"
    Config = SelfGuidedPretrainConfig

    def __init__(self, config: SelfGuidedPretrainConfig, resolution: int, device: torch.device, seed: int = 0,
                 perf: DevicePerf | None = None, encoder: Any = None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights are part of the run's identity
            unet = build_unet(config.preset, resolution)
        source = DiffusionSource(unet=unet, scheduler=default_scheduler(), origin=f"scratch:{config.preset}")
        super().__init__(config, source, device, seed, perf, encoder=encoder)

    def _build_network(self, config, source, device, seed) -> ConditionalUNet:
        return conditional_from_unconditional(source.unet, config.k, config.conditioning, config.cond_dim,
                                              zero_init=False, seed=seed)

    def prepare(self, images: torch.Tensor, context: PrepareContext | None = None) -> None:
        context = context or PrepareContext()
        images = images.to(self.device)
        encoder, digest, res = self._cluster(images, context, self.config.k, "pretrain")
        self.annotator = Annotator(encoder, res["centroids"].to(self.device), digest,
                                   meta={"pretrain": True, "k": self.config.k, "seed": self.config.cluster_seed})
        self._set_labels(res["labels"])
