"""A supervised classifier over the built-in synthetic domains: the truth check of the embedded
default.

FID-like numbers in a learned feature space can be fooled (a speckled sample can sit closer to the
target's feature statistics than a clean one). On the built-in synthetic domains the truth is
known: every image was rendered in one of six styles. This small CNN is trained, with labels, on
rendered images of all six domains (``source`` and the five targets), and

    target_rate_domain = share of generated samples that it assigns to the task's target domain

is reported at every evaluation, next to the same rate of the real target images (its ceiling)
and of the source model's samples before adaptation (its floor). It answers "do the adapted
samples *look like* the target domain" with a number a reader can check by eye.

Architecture: four 3×3 conv stages (32, 64, 128, 128 channels; strides as the domain encoder's),
GroupNorm, SiLU, global average pooling, one linear layer; inputs resized to the training
resolution. Stored as safetensors (weights) plus the config in the file's metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._images import ImageBatch, as_uint8_nchw, to_unit
from .domain_encoder import default_strides
from .weights import MissingWeightsError

FORMAT = "fewshot-domain-classifier/1"


class DomainClassifier(nn.Module):
    def __init__(self, classes: Sequence[str], resolution: int = 32, widths=(32, 64, 128, 128)):
        super().__init__()
        self.classes = list(classes)
        self.resolution = int(resolution)
        self.widths = tuple(int(w) for w in widths)
        strides = default_strides(self.resolution, len(self.widths))
        layers: list[nn.Module] = []
        cin = 3
        for w, s in zip(self.widths, strides):
            layers += [nn.Conv2d(cin, w, 3, stride=s, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, len(self.classes))
        self.train_info: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[-1] != self.resolution or x01.shape[-2] != self.resolution:
            x01 = F.interpolate(x01, size=(self.resolution, self.resolution), mode="bilinear",
                                align_corners=False, antialias=True)
        return self.head(self.body(x01 * 2 - 1).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """Class index per image (uint8 images [N,3,H,W] or [N,H,W,3])."""
        images = as_uint8_nchw(images)
        was = self.training
        self.eval()
        try:
            out = [self.logits(to_unit(images[i:i + batch_size], self.device)).argmax(1).cpu()
                   for i in range(0, len(images), batch_size)]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def rate(self, images: ImageBatch, domain: str) -> float:
        """Share of ``images`` classified as ``domain``."""
        if domain not in self.classes:
            raise KeyError(f"domain {domain!r} is not one of the classifier's {self.classes}")
        pred = self.predict(images)
        return float((pred == self.classes.index(domain)).float().mean()) if len(pred) else float("nan")

    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "classes": self.classes, "resolution": self.resolution, "widths": list(self.widths),
                "train_info": self.train_info}

    def save(self, path: Path | str) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"config": json.dumps(self.config())})
        return path

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> "DomainClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError([path.name], [path.parent], "train it with orchestrate pretrain classifier")
        with safe_open(str(path), framework="pt") as f:
            cfg = json.loads((f.metadata() or {}).get("config", "{}"))
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{path}: not a domain-classifier file (expected format {FORMAT!r})")
        model = cls(cfg["classes"], cfg["resolution"], tuple(cfg["widths"]))
        model.load_state_dict(load_file(str(path)))
        model.train_info = cfg.get("train_info", {})
        return model.to(device).eval().requires_grad_(False)


def train_domain_classifier(images: dict[str, ImageBatch], *, resolution: int = 32, steps: int = 600,
                            batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                            device: torch.device | str = "cpu",
                            held_out: dict[str, ImageBatch] | None = None,
                            balanced: bool = False, shift: int = 0) -> DomainClassifier:
    """Supervised training on ``{domain: uint8 images}`` (horizontal flips as augmentation);
    with ``held_out`` images, their accuracy is stored in ``train_info``. ``balanced``: every
    batch draws each class equally often (a ten-image class beside a thousand-image one);
    otherwise images are drawn uniformly, so classes weigh by their counts. ``shift``: each image
    also moved by up to that many pixels in x and y (reflected at the border), which a class of a
    few images needs to generalise."""
    torch.manual_seed(seed)
    classes = list(images)
    model = DomainClassifier(classes, resolution).to(device)
    data = [as_uint8_nchw(images[c]) for c in classes]
    x_all = torch.cat(data)
    y_all = torch.cat([torch.full((len(d),), i, dtype=torch.long) for i, d in enumerate(data)])
    sizes = torch.tensor([len(d) for d in data])
    if balanced and bool((sizes == 0).any()):
        raise ValueError(f"balanced training needs images of every class, got {dict(zip(classes, sizes.tolist()))}")
    offsets = torch.cumsum(sizes, 0) - sizes
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        if balanced:
            cls = torch.randint(0, len(classes), (batch_size,), generator=gen)
            idx = offsets[cls] + (torch.rand(batch_size, generator=gen) * sizes[cls]).long()
        else:
            idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x = to_unit(x_all[idx], device)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        if shift:
            x = _shifted(x, shift, gen)
        loss = F.cross_entropy(model.logits(x), y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    info: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "balanced": balanced,
                            "shift": shift,
                            "train_images_per_class": {c: len(d) for c, d in zip(classes, data)},
                            "seconds": round(time.perf_counter() - t0, 1), "final_loss": float(loss.detach())}
    if held_out:
        info["held_out_accuracy"] = {c: model.rate(held_out[c], c) for c in held_out}
        info["held_out_accuracy_mean"] = sum(info["held_out_accuracy"].values()) / len(held_out)
    model.train_info = info
    return model


def _shifted(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Every image moved by its own random (dx, dy) in [-shift, shift], reflected at the border."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    dx, dy = (torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist() for _ in range(2))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def confusion(model: DomainClassifier, images: dict[str, ImageBatch]) -> dict[str, dict[str, float]]:
    """{true domain: {predicted domain: share}}."""
    out = {}
    for c, imgs in images.items():
        pred = model.predict(imgs)
        out[c] = {k: float((pred == i).float().mean()) for i, k in enumerate(model.classes)}
    return out


__all__ = ["DomainClassifier", "confusion", "train_domain_classifier"]
