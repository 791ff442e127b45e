"""A small self-supervised image encoder, trained by this project on the *source* domain.

Purpose: FID/KID/diversity need a feature network. Where the user has no Inception/LPIPS weights
(and on the embedded synthetic domains, where ImageNet features say little) the metrics use this
encoder instead, and say so in their key (``fid_domain``, ...). It is trained once per source
domain and saved next to the source model.

Training: SimCLR (Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020): two random augmentations of each image, an encoder f, a
projection head g (2-layer MLP), and the NT-Xent loss on z = g(f(x)) with temperature τ. The
augmentations (random resized crop, horizontal flip, colour jitter, random grayscale, optional
Gaussian blur) are written below in batched plain torch.

Metrics use the *pre-projection* representation h = f(x) (the global-average-pooled activations
of the four stages, each L2-normalised, concatenated; see :class:`DomainEncoder`). Chen et al. (Sec. 4.2, Fig. 8 and Tab. 3) show that h keeps much more
information than z: the contrastive loss makes z invariant to the augmentations (colour,
crop position), while h still linearly encodes them. Domain differences on the synthetic tasks
(night = dark and blue, pastel = washed-out, sketch = grey lines) are largely of that kind, so z
would throw away exactly what a domain metric needs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._images import ImageBatch, as_uint8_nchw, to_unit
from .extractor import FeatureExtractor
from .weights import MissingWeightsError

FORMAT = "fewshot-domain-encoder/1"
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------
# augmentations (batched, plain torch). Random parameters are drawn on the CPU from ``gen`` so
# that the result depends only on the seed, whatever the device.
# --------------------------------------------------------------------------------------------
def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def random_resized_crop_flip(
    x: torch.Tensor, size: int, gen: torch.Generator, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5
) -> torch.Tensor:
    """Crop a random box (area fraction in ``scale``, aspect ratio in ``ratio``), resize it to
    ``size``×``size`` and mirror it with probability ``flip_p``: one ``affine_grid`` +
    bilinear ``grid_sample`` for the whole batch."""
    n = x.shape[0]
    area = _uniform(gen, n, *scale)
    logr = _uniform(gen, n, math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)  # centre in normalised coords
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=gen) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(
    x: torch.Tensor, gen: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8
) -> torch.Tensor:
    """SimCLR colour distortion (strength 0.5 by default), applied to each image with prob. ``p``:
    brightness/contrast/saturation factors in [1-s, 1+s] and a hue rotation of up to ±hue·360°
    (done as a rotation of the chroma plane in YIQ space)."""
    n, dev = x.shape[0], x.device
    apply = (torch.rand(n, generator=gen) < p).float()

    def factor(s):  # identity where not applied
        return (1 + apply * _uniform(gen, n, -s, s)).to(dev, x.dtype).view(n, 1, 1, 1)

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    angle = (apply * _uniform(gen, n, -hue, hue) * 2 * math.pi).to(dev, x.dtype)
    x = x * fb
    m = _luma(x).mean(dim=(2, 3), keepdim=True)
    x = (x - m) * fc + m
    g = _luma(x)
    x = (x - g) * fs + g
    # hue: RGB -> YIQ, rotate (I, Q), back.
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev, dtype=x.dtype
    )
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
    c, s = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    i2 = c * yiq[:, 1] - s * yiq[:, 2]
    q2 = s * yiq[:, 1] + c * yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i2, q2], dim=1)
    x = torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq)
    return x.clamp(0.0, 1.0)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    sel = (torch.rand(x.shape[0], generator=gen) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(sel, _luma(x).expand_as(x), x)


def random_blur(x: torch.Tensor, gen: torch.Generator, p: float = 0.5, sigma=(0.1, 1.0)) -> torch.Tensor:
    """3×3 Gaussian blur with a per-image sigma, applied with probability ``p``."""
    if p <= 0:
        return x
    n = x.shape[0]
    sig = _uniform(gen, n, *sigma)
    apply = torch.rand(n, generator=gen) < p
    k1 = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]).view(1, 3) ** 2 / (2 * sig.view(n, 1) ** 2))
    k1 = torch.where(apply.view(n, 1), k1, torch.tensor([0.0, 1.0, 0.0]).view(1, 3))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).to(x.device, x.dtype)  # [n,3,3]
    w = k2.repeat_interleave(3, dim=0).unsqueeze(1)  # [n*3,1,3,3]
    y = F.conv2d(F.pad(x.reshape(1, n * 3, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"), w, groups=n * 3)
    return y.view_as(x)


def simclr_augment(
    x: torch.Tensor,
    size: int,
    gen: torch.Generator,
    *,
    crop_scale=(0.25, 1.0),
    jitter: float = 0.5,
    gray_p: float = 0.2,
    blur_p: float = 0.0,
) -> torch.Tensor:
    """One SimCLR view of a float [0, 1] batch. ``jitter`` is SimCLR's colour-distortion
    strength s (brightness/contrast/saturation 0.8·s, hue 0.2·s, applied with p = 0.8)."""
    x = random_resized_crop_flip(x, size, gen, scale=crop_scale)
    if jitter > 0:
        x = colour_jitter(x, gen, 0.8 * jitter, 0.8 * jitter, 0.8 * jitter, 0.2 * jitter)
    if gray_p > 0:
        x = random_grayscale(x, gen, p=gray_p)
    return random_blur(x, gen, p=blur_p)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1) for ``z = [z_a; z_b]`` with positives ``(i, i + n)``."""
    z = F.normalize(z, dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------
def default_strides(resolution: int, stages: int) -> tuple[int, ...]:
    """Stride 2 in every stage, except a stride-1 first stage for inputs of <= 16 px. A 32² input
    is thus processed at 16², 8², 4², 2²; a stride-1 first stage at 32² was measured 3-4x
    slower per training step on the CPU for no gain in domain separation."""
    first = 1 if resolution <= 16 else 2
    return (first,) + (2,) * (stages - 1)


class DomainEncoder(FeatureExtractor):
    """Four conv stages (3×3 conv, BatchNorm, ReLU; see :func:`default_strides`), each globally
    average-pooled; an MLP projection head on top, used only in training.

    Representation h (what the metrics use): the pooled activations of all four stages, each
    L2-normalised, concatenated and divided by √4 so that h has unit norm (352-d with the default
    widths (32, 64, 128, 128); 0.39M parameters, 0.24M of them in the conv stages).
    ``readout="last"`` keeps only the last stage (128-d). Why all stages: the low stages' pooled
    activations are first-order texture and colour statistics (the "style" that the target
    domains change; cf. the multi-layer feature statistics of Gatys et al. 2016 and of LPIPS),
    the last stage is more about content. Measured on the six synthetic domains (SimCLR on source
    only, 300 steps at 32²): nearest-centroid accuracy ≈0.72 with all stages vs ≈0.66 with the
    last stage alone, and larger FID ratios between domains. The projection head reads the
    concatenated (un-normalised) pooled features.

    ``features(images)`` resizes to ``resolution`` (bilinear, antialiased) first.
    """

    name = "domain"
    feature_distance = "cosine"

    def __init__(
        self,
        resolution: int = 32,
        widths=(32, 64, 128, 128),
        proj_dim: int = 64,
        strides=None,
        readout: str = "multi",
        batch_size: int = 256,
    ):
        super().__init__()
        if readout not in ("multi", "last"):
            raise ValueError(f"readout must be 'multi' or 'last', got {readout!r}")
        self.resolution = int(resolution)
        self.widths = tuple(int(w) for w in widths)
        if strides is None:
            strides = default_strides(self.resolution, len(self.widths))
        self.strides = tuple(int(s) for s in strides)
        if len(self.strides) != len(self.widths):
            raise ValueError("need one stride per stage")
        self.proj_dim = int(proj_dim)
        self.readout = readout
        self.batch_size = batch_size
        self.train_info: dict[str, Any] = {}
        stages: list[nn.Module] = []
        cin = 3
        for w, st in zip(self.widths, self.strides):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, w, 3, stride=st, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                )
            )
            cin = w
        self.stages = nn.ModuleList(stages)
        hid = sum(self.widths)
        self.projector = nn.Sequential(nn.Linear(hid, hid), nn.ReLU(inplace=True), nn.Linear(hid, self.proj_dim))

    @property
    def dim(self) -> int:
        """Dimension of :meth:`features`."""
        return sum(self.widths) if self.readout == "multi" else self.widths[-1]

    def config(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "widths": list(self.widths),
            "strides": list(self.strides),
            "proj_dim": self.proj_dim,
            "readout": self.readout,
            "train_info": dict(self.train_info),
        }

    def pooled(self, x01: torch.Tensor) -> list[torch.Tensor]:
        """Globally average-pooled activations of every stage for float [0, 1] images."""
        x = x01 * 2.0 - 1.0
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x.mean(dim=(2, 3)))
        return out

    def represent(self, x01: torch.Tensor) -> torch.Tensor:
        """Un-normalised concatenated pooled features (the projection head's input)."""
        return torch.cat(self.pooled(x01), dim=1)

    def _resize(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[-1] != self.resolution or x01.shape[-2] != self.resolution:
            x01 = F.interpolate(
                x01, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=True
            )
        return x01

    def _forward_batch(self, images_uint8: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(self._resize(to_unit(images_uint8, self.device)))
        if self.readout == "last":
            return F.normalize(pooled[-1], dim=1)
        return torch.cat([F.normalize(p, dim=1) for p in pooled], dim=1) / math.sqrt(len(pooled))

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: Path | str) -> Path:
        """Write ``{"format", "config", "state_dict"}`` (``torch.load(weights_only=True)``), or, for
        a ``.safetensors`` path, the tensors with the format and config in the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if path.suffix == ".safetensors":
            import json

            from safetensors.torch import save_file

            save_file(sd, str(path), metadata={"format": FORMAT, "config": json.dumps(self.config())})
        else:
            torch.save({"format": FORMAT, "config": self.config(), "state_dict": sd}, path)
        return path

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> "DomainEncoder":
        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(
                [path.name],
                [path.parent],
                "train one on the source domain with trainers.metrics.train_domain_encoder(...) "
                "and .save() it there (the orchestrator does this when it pretrains a source model)",
            )
        if path.suffix == ".safetensors":
            import json

            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            blob = {"format": meta.get("format"), "config": json.loads(meta.get("config", "{}")),
                    "state_dict": load_file(str(path))}
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path}: not a domain-encoder file (expected format {FORMAT!r})")
        cfg = blob["config"]
        enc = cls(
            resolution=cfg["resolution"],
            widths=tuple(cfg["widths"]),
            proj_dim=cfg["proj_dim"],
            strides=tuple(cfg["strides"]),
            readout=cfg.get("readout", "multi"),
        )
        enc.load_state_dict(blob["state_dict"])
        enc.train_info = dict(cfg.get("train_info", {}))
        return enc.to(device).eval().requires_grad_(False)


def train_domain_encoder(
    images_uint8: ImageBatch,
    steps: int = 300,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    resolution: int = 32,
    *,
    temperature: float = 0.2,
    lr: float = 2e-3,
    weight_decay: float = 1e-6,
    widths=(32, 64, 128, 128),
    proj_dim: int = 64,
    readout: str = "multi",
    crop_scale=(0.25, 1.0),
    jitter: float = 0.5,
    gray_p: float = 0.2,
    blur_p: float = 0.0,
    callback: Callable[[int, float], None] | None = None,
) -> DomainEncoder:
    """Train a :class:`DomainEncoder` with SimCLR on ``images_uint8`` (source-domain images,
    uint8 ``[N,3,H,W]`` tensor or ``[N,H,W,3]`` array) and return it frozen, in eval mode.

    Adam with a cosine learning-rate decay; ``batch_size`` images -> 2·batch_size views per
    step. Deterministic for a given seed on a given device. ``callback(step, loss)`` is called
    after every step (for logging by the caller).
    """
    device = torch.device(device)
    images = as_uint8_nchw(images_uint8)
    if len(images) < 2:
        raise ValueError("SimCLR needs at least 2 images")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = DomainEncoder(resolution, widths, proj_dim, readout=readout)
    enc.to(device).train()
    # Keep the data as uint8 on the device; resize once to at most 2x the training resolution
    # (crops are taken from it, then resampled to ``resolution``).
    data = images.to(device)
    if max(data.shape[-2:]) > 2 * resolution:
        data = (
            F.interpolate(to_unit(data), size=(2 * resolution, 2 * resolution), mode="bilinear",
                          align_corners=False, antialias=True)
            .mul(255).round().clamp(0, 255).to(torch.uint8)
        )
    gen = torch.Generator().manual_seed(seed + 1)

    def augment(x):
        return simclr_augment(
            x, resolution, gen, crop_scale=crop_scale, jitter=jitter, gray_p=gray_p, blur_p=blur_p
        )

    bs = min(batch_size, len(data))
    opt = torch.optim.Adam(enc.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    t0 = time.perf_counter()
    loss_v = float("nan")
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randperm(len(data), generator=gen)[:bs].to(device)
        x = to_unit(data[idx])
        views = torch.cat([augment(x), augment(x)])
        z = enc.projector(enc.represent(views))
        loss = nt_xent(z, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        losses.append(loss_v)
        if callback is not None:
            callback(step, loss_v)
    tail = losses[-max(1, min(20, len(losses))) :] if losses else [loss_v]
    enc.train_info = {
        "steps": int(steps),
        "batch_size": int(bs),
        "temperature": float(temperature),
        "jitter": float(jitter),
        "crop_scale": [float(crop_scale[0]), float(crop_scale[1])],
        "seed": int(seed),
        "num_images": int(len(images)),
        "final_loss": float(sum(tail) / len(tail)),
        "seconds": float(time.perf_counter() - t0),
    }
    return enc.eval().requires_grad_(False)
