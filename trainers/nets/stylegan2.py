"""StyleGAN2 (Karras, Laine, Aittala, Hellsten, Lehtinen, Aila, "Analyzing and Improving the Image
Quality of StyleGAN", CVPR 2020, config E/F: weight demodulation, skip generator, residual
discriminator) in plain PyTorch.

The module tree and every parameter / buffer name follow rosinality/stylegan2-pytorch at commit bef283a
(2021-11-24; ``model.py``), so that its checkpoints (``g_ema``, ``g``, ``d`` state dicts) load with
``load_state_dict(strict=True)`` — e.g. ``style.1.weight``, ``input.input``, ``conv1.conv.weight``,
``convs.0.conv.modulation.weight``, ``convs.0.conv.blur.kernel``, ``to_rgbs.0.upsample.kernel``,
``noises.noise_0``; ``convs.0.0.weight``, ``convs.1.conv2.0.kernel``, ``final_linear.0.weight`` in
D. The code is our own (read, not copied); the custom CUDA ops of that repository (upfirdn2d,
fused bias + leaky ReLU) are written here with ordinary ``conv2d`` / ``leaky_relu`` so that the
networks run anywhere, and are exact, not approximations.

Differences from rosinality, all additive (defaults reproduce its networks):

* ``narrow`` scales the channel table (``narrow=1/32`` gives 16 channels at 4²–32²) and
  ``max_channels`` caps it, so tests and CPU demos can use tiny widths; any power-of-two size from
  8 to 1024 works.
* ``Generator.forward(..., return_features=True)`` also returns the per-layer activations (DCL,
  LFS-GAN), ``Discriminator.forward(x, return_features=True)`` its intermediate maps. Which
  activations, in which order, is documented on each method.
* The minibatch-stddev group is the largest divisor of the batch that is <= ``stddev_group`` (4):
  rosinality uses ``min(batch, 4)`` and fails for batches like 6; both agree whenever the
  batch is divisible by 4 or smaller than 4.
* Noise maps and the style-mixing cut-off can be passed explicitly (``noise=[...]``,
  ``inject_index``) so that training is reproducible from a seeded ``torch.Generator``;
  ``random_noise(batch, generator)`` draws a full set.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)

# Architecture presets for generators this project trains itself (GANPretrain). "tiny" is for
# tests, "small" for the CPU demo, "base" is rosinality's config-f (FFHQ: style 512, 8 MLP layers).
GAN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(style_dim=32, n_mlp=2, channel_multiplier=2, narrow=1 / 32),
    "small": dict(style_dim=128, n_mlp=4, channel_multiplier=2, narrow=1 / 8),
    "base": dict(style_dim=512, n_mlp=8, channel_multiplier=2, narrow=1.0),
}

ARCH_KEYS = ("size", "style_dim", "n_mlp", "channel_multiplier", "narrow", "max_channels", "lr_mlp")


def channel_table(channel_multiplier: int = 2, narrow: float = 1.0, max_channels: int = 512) -> dict[int, int]:
    """Channels per resolution: rosinality's table (512 up to 32², then 256·cm at 64², halving per
    octave) times ``narrow``, capped at ``max_channels`` and at least 1."""
    table = {}
    for log_res in range(2, 11):
        res = 2 ** log_res
        base = 512 if res <= 32 else (16384 // res) * channel_multiplier
        table[res] = max(1, min(int(max_channels), int(round(base * narrow))))
    return table


def make_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable FIR filter -> normalised 2-D kernel (sums to 1)."""
    k = torch.as_tensor(taps, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with ``kernel`` (true convolution), downsample by
    striding — the ``upfirdn2d`` primitive of StyleGAN2, in plain torch. ``pad`` = (before, after)
    on both axes (negative values crop)."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    if p0 or p1:
        x = F.pad(x, [p0, p1, p0, p1])
    kh, kw = kernel.shape
    weight = kernel.flip([0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float = 0.2,
                     scale: float = SQRT2) -> torch.Tensor:
    """Bias + leaky ReLU(0.2) + gain √2 (the 'lrelu' of StyleGAN2, keeping unit variance)."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int, bias: bool = True, negative_slope: float = 0.2, scale: float = SQRT2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class PixelNorm(nn.Module):
    """Normalise each latent to unit RMS (StyleGAN mapping-network input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """2× upsampling with the [1,3,3,1] filter (ToRGB skip path)."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor ** 2
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv with the equalised learning rate (Karras et al. 2018): N(0,1) weights scaled at run
    time by 1/sqrt(fan_in)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    """Linear layer with the equalised learning rate and a learning-rate multiplier ``lr_mul``
    (0.01 in the mapping network): weights are stored divided by lr_mul and scaled by
    lr_mul/sqrt(in_dim) at run time, the bias scaled by lr_mul."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}"


class ModulatedConv2d(nn.Module):
    """Modulated convolution with weight demodulation (Karras et al. 2020, eqs. 1-3):
    w'_{ijk} = s_i · w_{ijk}, w''_{ijk} = w'_{ijk} / sqrt(Σ_{i,k} w'_{ijk}² + ε), computed per sample
    and applied as a grouped convolution. ``upsample``: transposed conv (stride 2) + [1,3,3,1] blur;
    ``downsample``: blur + strided conv."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, downsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def extra_repr(self) -> str:
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, "
                f"upsample={self.upsample}, downsample={self.downsample}, demodulate={self.demodulate}")

    def modulated_weight(self, style: torch.Tensor) -> torch.Tensor:
        """The per-sample (de)modulated kernels, [B, out, in, k, k]."""
        b = style.shape[0]
        s = self.modulation(style).view(b, 1, self.in_channel, 1, 1)
        weight = self.scale * self.weight * s
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(b, self.out_channel, 1, 1, 1)
        return weight

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        weight = self.modulated_weight(style).to(x.dtype)
        if self.upsample:
            # conv_transpose2d weights are [in, out/groups, k, k] per group
            weight = weight.transpose(1, 2).reshape(b * c, self.out_channel, k, k)
            out = F.conv_transpose2d(x.reshape(1, b * c, h, w), weight, padding=0, stride=2, groups=b)
            out = out.view(b, self.out_channel, out.shape[-2], out.shape[-1])
            return self.blur(out)
        weight = weight.reshape(b * self.out_channel, c, k, k)
        if self.downsample:
            x = self.blur(x)
            h, w = x.shape[-2:]
            out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=0, stride=2, groups=b)
        else:
            out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=self.padding, groups=b)
        return out.view(b, self.out_channel, out.shape[-2], out.shape[-1])


class NoiseInjection(nn.Module):
    """Per-pixel noise scaled by a learned per-layer weight (zero-initialised)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            b, _, h, w = image.shape
            noise = image.new_empty(b, 1, h, w).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.input.repeat(latent.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    """ModulatedConv2d -> noise -> bias + lrelu (names: conv, noise, activate)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1), demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, demodulate=demodulate,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """1×1 modulated conv (no demodulation) to RGB, plus the upsampled RGB of the previous
    resolution (the skip architecture of StyleGAN2)."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def _check_size(size: int) -> int:
    log_size = int(round(math.log2(size))) if size > 0 else 0
    if size < 8 or 2 ** log_size != size or size > 1024:
        raise ValueError(f"StyleGAN2 size must be a power of two in [8, 1024], got {size}")
    return log_size


class Generator(nn.Module):
    """Mapping network (PixelNorm + ``n_mlp`` EqualLinear, lr_mul 0.01) and synthesis network
    (4×4 constant, one StyledConv at 4², two per higher resolution, ToRGB skips)."""

    def __init__(self, size: int, style_dim: int, n_mlp: int, channel_multiplier: int = 2,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), lr_mlp: float = 0.01, narrow: float = 1.0,
                 max_channels: int = 512):
        super().__init__()
        self.log_size = _check_size(size)
        self.size = size
        self.style_dim = style_dim
        self.arch = dict(size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier,
                         narrow=float(narrow), max_channels=int(max_channels), lr_mlp=float(lr_mlp))
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu") for _ in range(n_mlp)])
        self.channels = channel_table(channel_multiplier, narrow, max_channels)
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty; kept for rosinality's module tree
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = 2 ** ((layer_idx + 5) // 2)
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, res, res))
        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2 ** i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel
        self.n_latent = self.log_size * 2 - 2

    # -- latents and noise -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.input.input.device

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each entry of ``forward(..., return_features=True)``'s feature list:
        entry i is the output of StyledConv i (0 = ``conv1`` at 4², then ``convs[i-1]``),
        at resolution 2**((i + 5) // 2) — the same indexing as the noise maps."""
        out = []
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            out.append((self.channels[res], res, res))
        return out

    def make_noise(self) -> list[torch.Tensor]:
        """One fresh noise map per layer, batch 1 (rosinality's ``make_noise``)."""
        return self.random_noise(1)

    def random_noise(self, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One noise map per layer, [batch, 1, r, r], drawn from ``generator`` (on its device)."""
        device = generator.device if generator is not None else self.device
        return [torch.randn(batch, 1, r, r, generator=generator, device=device).to(self.device)
                for _, r, _ in self.feature_shapes()]

    @torch.no_grad()
    def mean_latent(self, n_latent: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean w over ``n_latent`` random z (the truncation centre), [1, style_dim]."""
        device = generator.device if generator is not None else self.device
        z = torch.randn(n_latent, self.style_dim, generator=generator, device=device).to(self.device)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.style(z)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, styles: Sequence[torch.Tensor], return_latents: bool = False,
                inject_index: int | None = None, truncation: float = 1.0,
                truncation_latent: torch.Tensor | None = None, input_is_latent: bool = False,
                noise: Sequence[torch.Tensor | None] | None = None, randomize_noise: bool = True,
                return_features: bool = False):
        """rosinality's interface: ``styles`` is a list of one or two z (or w with
        ``input_is_latent``) of shape [B, style_dim] (or one [B, n_latent, style_dim] w+);
        two styles mix at ``inject_index`` (random in [1, n_latent) when None). ``noise``: one map
        per layer (None entries draw fresh noise); without it, fresh noise when
        ``randomize_noise`` else the stored ``noises.noise_i``.

        Returns ``(image, latent or None)``, image in ~[-1, 1], [B, 3, size, size]; with
        ``return_features=True`` returns ``(image, latent or None, features)`` where ``features``
        is the list documented in :meth:`feature_shapes` (post-activation StyledConv outputs)."""
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            if randomize_noise:
                noise = [None] * self.num_layers
            else:
                noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (see mean_latent)")
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) < 2:
            s = styles[0]
            latent = s if s.ndim == 3 else s.unsqueeze(1).expand(-1, self.n_latent, -1)
        else:
            if inject_index is None:
                inject_index = int(torch.randint(1, self.n_latent, (1,)).item())
            latent = torch.cat([styles[0].unsqueeze(1).expand(-1, inject_index, -1),
                                styles[1].unsqueeze(1).expand(-1, self.n_latent - inject_index, -1)], 1)
        features = []
        out = self.input(latent)
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        features.append(out)
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv_up, conv, noise_up, noise_same, to_rgb in zip(
                self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs):
            out = conv_up(out, latent[:, i], noise=noise_up)
            features.append(out)
            out = conv(out, latent[:, i + 1], noise=noise_same)
            features.append(out)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        image = skip
        latent_out = latent if return_latents else None
        if return_features:
            return image, latent_out, features
        return image, latent_out


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU]; as an ``nn.Sequential`` so that the keys are
    ``N.weight`` like rosinality's (``convs.1.conv2.0.kernel``, ``.1.weight``, ``.2.bias``)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, padding=padding, stride=stride,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False, bias=False)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        h1 = self.conv1(x)
        h2 = self.conv2(h1)
        if features is not None:
            features += [h1, h2]
        return (h2 + self.skip(x)) / SQRT2


class Discriminator(nn.Module):
    """Residual discriminator: fromRGB (1×1), one ResBlock per octave down to 4², minibatch
    standard deviation, 3×3 conv, two linear layers."""

    def __init__(self, size: int, channel_multiplier: int = 2, blur_kernel: Sequence[float] = (1, 3, 3, 1),
                 narrow: float = 1.0, max_channels: int = 512, stddev_group: int = 4):
        super().__init__()
        log_size = _check_size(size)
        self.size = size
        self.arch = dict(size=size, channel_multiplier=channel_multiplier, narrow=float(narrow),
                         max_channels=int(max_channels))
        channels = channel_table(channel_multiplier, narrow, max_channels)
        self.channels = channels
        convs: list[nn.Module] = [ConvLayer(3, channels[size], 1)]
        in_channel = channels[size]
        for i in range(log_size, 2, -1):
            out_channel = channels[2 ** (i - 1)]
            convs.append(ResBlock(in_channel, out_channel, blur_kernel))
            in_channel = out_channel
        self.convs = nn.Sequential(*convs)
        self.stddev_group = stddev_group
        self.stddev_feat = 1
        self.final_conv = ConvLayer(in_channel + 1, channels[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(channels[4] * 4 * 4, channels[4], activation="fused_lrelu"),
            EqualLinear(channels[4], 1),
        )

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each entry of ``forward(x, return_features=True)``'s feature list: the
        fromRGB output at full resolution, then for every ResBlock its conv1 output (same
        resolution) and its conv2 output (half resolution, before the residual sum), then the
        final 3×3 conv output at 4² — as in the DCL release's ``model.py``."""
        c = self.channels
        out = [(c[self.size], self.size, self.size)]
        res = self.size
        while res > 4:
            out += [(c[res], res, res), (c[res // 2], res // 2, res // 2)]
            res //= 2
        out.append((c[4], 4, 4))
        return out

    def _group(self, batch: int) -> int:
        g = min(batch, self.stddev_group)
        while batch % g:
            g -= 1
        return g

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits [B, 1]; with ``return_features=True`` returns ``(logits, features)``."""
        features: list[torch.Tensor] | None = [] if return_features else None
        out = self.convs[0](x)
        if features is not None:
            features.append(out)
        for block in self.convs[1:]:
            out = block(out, features)
        b, c, h, w = out.shape
        group = self._group(b)
        # Minibatch standard deviation (Karras et al. 2018, sec. 3): std over groups of samples,
        # averaged over channels and pixels, appended as one extra feature map.
        std = out.view(group, -1, self.stddev_feat, c // self.stddev_feat, h, w)
        std = torch.sqrt(std.var(0, unbiased=False) + 1e-8)
        std = std.mean([2, 3, 4], keepdim=True).squeeze(2)
        std = std.repeat(group, 1, h, w)
        out = self.final_conv(torch.cat([out, std], 1))
        if features is not None:
            features.append(out)
        logits = self.final_linear(out.view(b, -1))
        if return_features:
            return logits, features
        return logits


def build_generator(arch: dict[str, Any]) -> Generator:
    """A Generator from an ``arch`` dict (keys of ``ARCH_KEYS``; missing ones take defaults)."""
    return Generator(arch["size"], arch["style_dim"], arch["n_mlp"],
                     channel_multiplier=arch.get("channel_multiplier", 2), lr_mlp=arch.get("lr_mlp", 0.01),
                     narrow=arch.get("narrow", 1.0), max_channels=arch.get("max_channels", 512))


def build_discriminator(arch: dict[str, Any]) -> Discriminator:
    return Discriminator(arch["size"], channel_multiplier=arch.get("channel_multiplier", 2),
                         narrow=arch.get("narrow", 1.0), max_channels=arch.get("max_channels", 512))


def preset_arch(preset: str, size: int) -> dict[str, Any]:
    if preset not in GAN_PRESETS:
        raise ValueError(f"unknown StyleGAN2 preset {preset!r}; expected one of {sorted(GAN_PRESETS)}")
    return dict(size=size, max_channels=512, lr_mlp=0.01, **GAN_PRESETS[preset])
