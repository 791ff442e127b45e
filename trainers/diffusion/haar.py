"""The one-level 2-D Haar wavelet transform, as fixed depthwise 2×2 stride-2 convolutions.

DDPM-PA (Zhu, Ma, Chen, Yuan, arXiv 2211.03264, Sec. "high-frequency details") decomposes an
image with the Haar wavelet into four sub-bands and keeps the three high-frequency ones:

    L = [1, 1] / √2,   H = [-1, 1] / √2
    LL = Lᵀ L,  LH = Lᵀ H,  HL = Hᵀ L,  HH = Hᵀ H        (2×2 outer products)
    hf(x) = LH(x) + HL(x) + HH(x)

Each filter is applied to every channel separately (depthwise, stride 2), so a [B, C, H, W]
image gives four [B, C, H/2, W/2] sub-bands. The four filters are an orthonormal basis of each
non-overlapping 2×2 block, so the synthesis (inverse) transform is the transposed convolution
with the same filters. ``Lᵀ H`` means rows (the vertical direction) are low-passed and columns
(horizontal) high-passed; for hf() the naming of LH vs HL does not matter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_FILTERS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def haar_filters(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The four 2×2 filters LL, LH, HL, HH stacked as a [4, 2, 2] tensor (cached per dtype/device)."""
    device = torch.device(device)
    key = (dtype, device)
    filt = _FILTERS.get(key)
    if filt is None:
        s = 1.0 / math.sqrt(2.0)
        low = torch.tensor([s, s], dtype=torch.float64)
        high = torch.tensor([-s, s], dtype=torch.float64)
        filt = torch.stack([torch.outer(low, low), torch.outer(low, high),
                            torch.outer(high, low), torch.outer(high, high)]).to(device, dtype)
        _FILTERS[key] = filt
    return filt


def _depthwise_weight(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # [4C, 1, 2, 2]: output channel 4c + k is sub-band k of input channel c (groups = C).
    return haar_filters(dtype, device).unsqueeze(1).repeat(channels, 1, 1, 1)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"Haar transform expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"Haar transform needs an even height and width, got {tuple(x.shape[-2:])}")


def haar_analysis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, C, H, W] -> (LL, LH, HL, HH), each [B, C, H/2, W/2]."""
    _check(x)
    b, c, h, w = x.shape
    out = F.conv2d(x, _depthwise_weight(c, x.dtype, x.device), stride=2, groups=c)
    out = out.view(b, c, 4, h // 2, w // 2)
    return out[:, :, 0], out[:, :, 1], out[:, :, 2], out[:, :, 3]


def haar_synthesis(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`haar_analysis`: four [B, C, h, w] sub-bands -> [B, C, 2h, 2w]."""
    b, c, h, w = ll.shape
    bands = torch.stack([ll, lh, hl, hh], dim=2).reshape(b, 4 * c, h, w)
    return F.conv_transpose2d(bands, _depthwise_weight(c, ll.dtype, ll.device), stride=2, groups=c)


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """hf(x) = LH(x) + HL(x) + HH(x) (DDPM-PA), [B, C, H/2, W/2]. One depthwise conv with the
    summed filter, which is the same linear map as summing the three sub-bands."""
    _check(x)
    c = x.shape[1]
    filt = haar_filters(x.dtype, x.device)
    weight = (filt[1] + filt[2] + filt[3]).expand(c, 1, 2, 2)
    return F.conv2d(x, weight, stride=2, groups=c)
