"""Inception-v3 for FID, the "FID Inception" variant used by pytorch-fid, written in plain torch.

Architecture: Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR
2016. The FID variant is the TensorFlow graph of 2015-12-05 that the original FID code (Heusel et
al. 2017, TTUR) used; pytorch-fid ported its weights to ``pt_inception-2015-12-05-6726825d.pth``
in torchvision's ``Inception3`` layout (1008 classes, no aux head). That TF graph differs from
torchvision's network in its pooling, which matters for the numbers:

* Mixed_5b/5c/5d (A), Mixed_6b..6e (C), Mixed_7b (E_1): the pool branch averages with
  ``count_include_pad=False`` (padding does not count in the mean);
* Mixed_7c (E_2): the pool branch is a 3×3 *max* pool (stride 1, padding 1);
* Mixed_7b/7c (E): the 3×3 branches are split and concatenated as [1×3, 3×1].

Module names equal the checkpoint's keys (``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.*``,
``Mixed_5b.branch1x1.conv.weight``, ...). Preprocessing as in pytorch-fid: uint8 -> [0, 1],
bilinear resize to 299×299 (``align_corners=False``, no antialiasing), scale to [-1, 1]; features
are the 2048-d global average pool after Mixed_7c.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._images import to_unit
from .extractor import FeatureExtractor
from .weights import default_search_dirs, find_weight_file, load_state_dict_file

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # FID variant: padding is excluded from the average.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):  # Mixed_6a (grid reduction 35 -> 17)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):  # Mixed_7a (grid reduction 17 -> 8)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for m in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = m(b7)
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``, count_include_pad=False) and Mixed_7c (``pool="max"``)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        if self.pool == "avg":
            p = _avg3(x)
        else:
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 trunk up to the 2048-d pool features (no classifier)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, "avg")
        self.Mixed_7c = FIDInceptionE(2048, "max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float [-1, 1] at 299×299 -> ``[N, 2048]``."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean(dim=(2, 3))

    def load_fid_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the pytorch-fid checkpoint: classifier (``fc.*``) and aux keys are ignored;
        ``num_batches_tracked`` may be absent; anything else missing or extra is an error."""
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{source}: not an FID Inception checkpoint (missing {missing[:5]}..., "
                f"unexpected {unexpected[:5]}...)"
            )


class InceptionExtractor(FeatureExtractor):
    """2048-d pool features of the FID Inception (name ``"inception"``)."""

    name = "inception"
    feature_distance = "cosine"

    def __init__(self, batch_size: int = 50):
        super().__init__()
        self.net = FIDInceptionV3()
        self.batch_size = batch_size
        self.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        *,
        path: Path | str | None = None,
        weights_dir: Path | str | None = None,
        device: torch.device | str = "cpu",
    ) -> "InceptionExtractor":
        """Load ``pt_inception-2015-12-05-6726825d.pth`` from ``path`` (file or directory),
        ``weights_dir``, ``$ORCHESTRATE_WEIGHTS_DIR`` or the torch hub checkpoint directories."""
        how = (
            f"download {FID_WEIGHTS_URL} on a machine with internet (pytorch-fid fetches the same "
            f"file into $TORCH_HOME/hub/checkpoints on first use) and copy it to one of the "
            f"directories above (or pass its path)"
        )
        file = find_weight_file(FID_WEIGHTS_FILE, default_search_dirs([weights_dir]), how, path)
        model = cls()
        model.net.load_fid_state_dict(load_state_dict_file(file), source=str(file))
        return model.to(device)

    def _forward_batch(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = to_unit(images_uint8, self.device)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(2.0 * x - 1.0)
