"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
CVPR 2018), version 0.1, written here in plain torch.

    d(x, y) = Σ_l mean_{h,w} Σ_c w_{l,c} (x̂_l - ŷ_l)²_{c,h,w}

with x, y in [-1, 1] shifted/scaled by the ScalingLayer constants, x̂_l the backbone activations at
layer l unit-normalised along channels, and w_l the learned non-negative 1×1 "lin" weights.

Weights (never downloaded here; see :class:`~trainers.metrics.weights.MissingWeightsError`):

* backbone: torchvision's ImageNet checkpoints ``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``
  (what ``torchvision.models.vgg16(weights="IMAGENET1K_V1")`` / ``alexnet(...)`` store in
  ``$TORCH_HOME/hub/checkpoints``). Our backbone modules reproduce torchvision's ``features``
  Sequential layer by layer, so the keys ``features.<i>.weight|bias`` load unchanged; the
  ``classifier.*`` keys are ignored.
* lin layers: ``vgg.pth`` / ``alex.pth`` from the ``lpips`` package (``lpips/weights/v0.1/``):
  a state dict with ``lin{l}.model.1.weight`` of shape ``[1, C_l, 1, 1]`` for l = 0..4 (index 1
  because the package puts a Dropout at index 0 of each lin Sequential), no biases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._images import as_uint8_nchw, to_signed
from .weights import (
    MissingWeightsError,
    default_search_dirs,
    user_search_dirs,
    find_weight_file,
    load_state_dict_file,
    lpips_package_weight_dir,
)

# Per backbone: torchvision checkpoint name, lin-weights file name, channel counts of the five
# taps, and the index (in torchvision's ``features``) of the ReLU after which each tap is taken.
_NETS = {
    "vgg": {
        "backbone_file": "vgg16-397923af.pth",
        "lin_file": "vgg.pth",
        "channels": (64, 128, 256, 512, 512),
        "taps": (3, 8, 15, 22, 29),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        "min_size": 16,  # four 2x2 max-pools before relu5_3
    },
    "alex": {
        "backbone_file": "alexnet-owt-7be5be79.pth",
        "lin_file": "alex.pth",
        "channels": (64, 192, 384, 256, 256),
        "taps": (1, 4, 7, 9, 11),  # relu1 .. relu5
        "min_size": 31,  # stride-4 conv1 and two 3x3/2 max-pools before relu3
    },
}

# ScalingLayer of LPIPS v0.1: maps [-1, 1] inputs to (approximately) ImageNet-normalised ones.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    """Same layers, order and indices as ``torchvision.models.vgg16().features`` (config "D")."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


def _alexnet_features() -> nn.Sequential:
    """Same layers and indices as ``torchvision.models.alexnet().features``."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class _Backbone(nn.Module):
    """Holds ``features`` under that attribute name so torchvision's keys map one to one."""

    def __init__(self, net: str):
        super().__init__()
        self.features = _vgg16_features() if net == "vgg" else _alexnet_features()
        self.taps = _NETS[net]["taps"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
            if i == last:
                break
        return outs


class _Lin(nn.Module):
    """1×1 conv to one channel, stored at ``model.1`` like the ``lpips`` package's NetLinLayer."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalise(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 or AlexNet backbone.

    Call it as ``lpips(x, y) -> Tensor[N]`` on aligned batches (uint8 ``[N,3,H,W]`` images or
    floats in [-1, 1]); ``pairwise(a, b)`` gives the full ``[len(a), len(b)]`` matrix computing
    each image's features once. ``resize``: if set, inputs are bilinearly resized to that square
    size first (the LFS-GAN evaluation uses 256); by default images are compared as they are.
    Build it with :meth:`from_pretrained`; the constructor alone gives random weights.
    """

    def __init__(self, net: str = "vgg", resize: int | None = None, batch_size: int = 32):
        super().__init__()
        if net not in _NETS:
            raise ValueError(f"LPIPS backbone must be one of {sorted(_NETS)}, got {net!r}")
        self.net_name = net
        self.name = f"lpips_{net}"
        self.resize = resize
        self.batch_size = batch_size
        self.backbone = _Backbone(net)
        self.lins = nn.ModuleList([_Lin(c) for c in _NETS[net]["channels"]])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    # -- weights -----------------------------------------------------------------------------
    @staticmethod
    def weight_files(net: str) -> tuple[str, str]:
        """(backbone file name, lin file name) for ``net``."""
        return _NETS[net]["backbone_file"], _NETS[net]["lin_file"]

    @classmethod
    def from_pretrained(
        cls,
        net: str = "vgg",
        *,
        weights_dir: Path | str | None = None,
        backbone_path: Path | str | None = None,
        lin_path: Path | str | None = None,
        device: torch.device | str = "cpu",
        resize: int | None = None,
    ) -> "LPIPS":
        """Load backbone and lin weights from disk.

        Search order for the backbone: ``backbone_path`` (file or dir), ``weights_dir``,
        ``$ORCHESTRATE_WEIGHTS_DIR``, the torch hub checkpoint dirs. For the lin weights:
        ``lin_path``, ``weights_dir``, ``$ORCHESTRATE_WEIGHTS_DIR``, the installed ``lpips`` package's
        ``weights/v0.1``. Missing files -> :class:`MissingWeightsError` naming all of them.
        """
        if net not in _NETS:
            raise ValueError(f"LPIPS backbone must be one of {sorted(_NETS)}, got {net!r}")
        bfile, lfile = cls.weight_files(net)
        tv = "vgg16" if net == "vgg" else "alexnet"
        how_b = (
            f"run `torchvision.models.{tv}(weights='IMAGENET1K_V1')` once on a machine with internet "
            f"(it saves {bfile} to $TORCH_HOME/hub/checkpoints), or download "
            f"https://download.pytorch.org/models/{bfile}, and copy it to one of the directories "
            f"above (or pass its path)"
        )
        how_l = (
            f"`pip install lpips` (the package ships lpips/weights/v0.1/{lfile}), or copy {lfile} "
            f"from https://github.com/richzhang/PerceptualSimilarity (lpips/weights/v0.1/) into "
            f"one of the directories above (or pass its path)"
        )
        b_dirs = default_search_dirs([weights_dir])
        pkg = lpips_package_weight_dir()
        # The lin files have generic names (vgg.pth), so the shared hub cache is not searched.
        l_dirs = user_search_dirs([weights_dir])
        if pkg is not None:
            l_dirs.append(pkg)
        found, missing = {}, []
        for key, fname, dirs, explicit, how in (
            ("backbone", bfile, b_dirs, backbone_path, how_b),
            ("lin", lfile, l_dirs, lin_path, how_l),
        ):
            try:
                found[key] = find_weight_file(fname, dirs, how, explicit)
            except MissingWeightsError as e:
                missing.append(e)
        if missing:
            if pkg is None and "lin" not in found:
                missing[-1].searched.append("(lpips package not installed, so not searched)")
            raise MissingWeightsError(
                [f for e in missing for f in e.filenames],
                [d for e in missing for d in e.searched],
                " | ".join(e.how for e in missing),
            )
        model = cls(net, resize=resize)
        model.load_backbone(load_state_dict_file(found["backbone"]), source=str(found["backbone"]))
        model.load_lins(load_state_dict_file(found["lin"]), source=str(found["lin"]))
        return model.to(device)

    def load_backbone(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load torchvision-format weights (``features.*``; ``classifier.*`` ignored)."""
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            raise ValueError(f"{source}: no 'features.*' keys; not a torchvision {self.net_name} checkpoint")
        missing, unexpected = self.backbone.load_state_dict(feats, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")

    def load_lins(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load ``lin{l}.model.1.weight`` tensors (lpips v0.1 format)."""
        state = {k: v for k, v in state.items() if k.startswith("lin")}
        sd = {f"{i}.model.1.weight": state.get(f"lin{i}.model.1.weight") for i in range(len(self.lins))}
        absent = [f"lin{i}.model.1.weight" for i in range(len(self.lins)) if sd[f"{i}.model.1.weight"] is None]
        if absent:
            raise ValueError(f"{source}: missing LPIPS lin keys {absent}")
        self.lins.load_state_dict(sd, strict=True)

    # -- computation -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.shift.device

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = as_uint8_nchw(x)
        x = to_signed(x, self.device)
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if min(x.shape[-2:]) < _NETS[self.net_name]["min_size"]:
            raise ValueError(
                f"LPIPS-{self.net_name} needs images of at least {_NETS[self.net_name]['min_size']} px, "
                f"got {tuple(x.shape[-2:])}; pass resize=... to upsample them"
            )
        return (x - self.shift) / self.scale

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channel-unit-normalised activations of the five taps for a batch."""
        return [_unit_normalise(f) for f in self.backbone(self._prepare(x))]

    def distance_from_features(self, fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor]) -> torch.Tensor:
        """LPIPS from :meth:`features` outputs (broadcast along the batch axis) -> ``[N]``."""
        total = None
        for lin, a, b in zip(self.lins, fa, fb):
            d = lin((a - b).pow(2)).mean(dim=(1, 2, 3))
            total = d if total is None else total + d
        return total

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS between aligned pairs ``x[i], y[i]`` -> float tensor ``[N]`` on the model's device."""
        if len(x) != len(y):
            raise ValueError(f"LPIPS needs aligned batches, got {len(x)} and {len(y)}")
        out = []
        for s in range(0, len(x), self.batch_size):
            fa = self.features(x[s : s + self.batch_size])
            fb = self.features(y[s : s + self.batch_size])
            out.append(self.distance_from_features(fa, fb))
        return torch.cat(out) if out else torch.empty(0, device=self.device)

    @torch.no_grad()
    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Matrix ``[len(a), len(b)]`` of LPIPS distances; features of ``b`` are computed once and
        held in memory, ``a`` goes through in batches (so pass the smaller set as ``b``)."""
        fb = [self.features(b[s : s + self.batch_size]) for s in range(0, len(b), self.batch_size)]
        fb = [torch.cat(t) for t in zip(*fb)] if fb else []
        rows = []
        for s in range(0, len(a), self.batch_size):
            fa = self.features(a[s : s + self.batch_size])
            cols = [
                self.distance_from_features(fa, [f[j : j + 1] for f in fb]) for j in range(len(b))
            ]
            rows.append(torch.stack(cols, dim=1))
        return torch.cat(rows).float()
