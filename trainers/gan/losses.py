"""GAN losses shared by the StyleGAN2 methods.

* ``d_logistic_loss`` / ``g_nonsaturating_loss``: the logistic GAN loss of Goodfellow et al. 2014
  with the non-saturating generator objective (StyleGAN2's default, Karras et al. 2020, sec. 2.2):
  L_D = E[softplus(D(G(z)))] + E[softplus(−D(x))], L_G = E[softplus(−D(G(z)))].
* ``d_r1_loss``: R1 = E_x ||∇_x D(x)||² (Mescheder et al. 2018, eq. 9); the caller multiplies by
  γ/2 and, with lazy regularisation every k steps, by k (Karras et al. 2020, sec. 3.1).
* ``g_path_regularize``: path-length regularisation E_{w,y}(||J_wᵀ y||₂ − a)², y ~ N(0, I)/sqrt(HW),
  a an exponential moving average of the lengths (Karras et al. 2020, eq. 4).
* ``info_nce`` / ``info_nce_in_batch``: InfoNCE (van den Oord et al. 2018, eq. 4) with cosine
  similarity over temperature τ, as DCL uses it (Zhao et al. 2022): for anchor a with positive p
  and negatives n_1..n_K, L = −log exp(s(a,p)/τ) / (exp(s(a,p)/τ) + Σ_k exp(s(a,n_k)/τ)), i.e. the
  cross-entropy over the logits [s(a,p), s(a,n_1), ...]/τ with target 0. For uninformative
  features (all similarities equal) L = log(1 + K).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import autograd


def d_logistic_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_pred).mean()


def d_r1_loss(real_pred: torch.Tensor, real_img: torch.Tensor) -> torch.Tensor:
    """E ||∇_x D(x)||² over the batch; ``real_img`` must require grad and ``real_pred`` be its D
    output. ``create_graph`` so that the penalty can be back-propagated into D."""
    (grad,) = autograd.grad(outputs=real_pred.float().sum(), inputs=real_img, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def g_path_regularize(fake_img: torch.Tensor, latents: torch.Tensor, mean_path_length: torch.Tensor | float,
                      decay: float = 0.01, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (penalty, updated mean path length (detached), per-sample path lengths).
    ``latents`` is the [B, n_latent, style_dim] w+ the image was made from."""
    h, w = fake_img.shape[2], fake_img.shape[3]
    dev = generator.device if generator is not None else fake_img.device
    y = torch.randn(fake_img.shape, generator=generator, device=dev).to(fake_img) / math.sqrt(h * w)
    (grad,) = autograd.grad(outputs=(fake_img * y).sum(), inputs=latents, create_graph=True)
    path_lengths = torch.sqrt(grad.pow(2).sum(2).mean(1))
    path_mean = mean_path_length + decay * (path_lengths.mean() - mean_path_length)
    penalty = (path_lengths - path_mean).pow(2).mean()
    return penalty, path_mean.detach(), path_lengths


def _flat_unit(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, D] with unit L2 norm (a zero vector stays zero: similarity 0)."""
    return F.normalize(x.reshape(x.shape[0], -1).float(), dim=1, eps=1e-8)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE with cosine similarity, mean over the N anchors.

    anchor, positive: [N, ...] (row i of ``positive`` is anchor i's positive);
    negatives: [K, ...] shared by every anchor, or [N, K, ...] per anchor. Features are flattened
    per sample. Returns a scalar; equals log(1 + K) when every similarity is the same."""
    a = _flat_unit(anchor)
    p = _flat_unit(positive)
    n = anchor.shape[0]
    pos = (a * p).sum(1, keepdim=True)  # [N, 1]
    if negatives.ndim == anchor.ndim + 1:  # per-anchor negatives [N, K, ...]
        if negatives.shape[0] != n:
            raise ValueError(f"per-anchor negatives need {n} rows, got shape {tuple(negatives.shape)}")
        k = negatives.shape[1]
        neg = F.normalize(negatives.reshape(n, k, -1).float(), dim=2, eps=1e-8)
        neg_sim = torch.einsum("nd,nkd->nk", a, neg)
    else:
        neg_sim = a @ _flat_unit(negatives).t()  # [N, K]
    logits = torch.cat([pos, neg_sim], 1) / temperature
    target = torch.zeros(n, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def info_nce_in_batch(anchor: torch.Tensor, keys: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE where anchor i's positive is ``keys[i]`` and its negatives are the other keys
    ``keys[j]``, j ≠ i (in-batch negatives): cross-entropy of the [N, N] cosine-similarity matrix
    over τ with the diagonal as target. Equals log(N) for uninformative features."""
    a = _flat_unit(anchor)
    k = _flat_unit(keys)
    logits = a @ k.t() / temperature
    target = torch.arange(a.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)
