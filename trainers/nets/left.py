"""LeFT — Learnable Factorized Tensor modulators (Seo, Kang, Park, "LFS-GAN: Lifelong Few-Shot
Image Generation", ICCV 2023, Sec. 3): a small, rank-constrained, per-task tensor that modulates
the frozen weights of a pretrained generator. Our own code after the paper and the official
release (KHU-AGI/LFS-GAN at commit 17c12f7, 2024-01-03; ``lifelong_model.py``: ``LeFTWeightModulatorConv`` /
``...FC``).

Convolution weight W [C_out, C_in, k, k] (``LeFTConv``), rank r, with the factors

    A [C_out, r], B [r, r, k²], C [C_in, r]                      (multiplicative)
    A' [C_out, r], B' [k², r], C' [C_in, r], D' [k², r]           (additive, optional)

    M1 = ReLU( A @ B  +  (A' B'ᵀ) )     A @ B batched over B's first axis: M1[j] = A B[j] → [r, C_out, k²]
    M  = C @ M1                          M[o, i, s] = Σ_j C[i, j] M1[j, o, s]            → [C_out, C_in, k²]
    Ŵ  = W ⊙ M  +  (C' D'ᵀ)              the additive [C_in, k²] term broadcast over C_out

(ReLU optional, ``use_relu``; the additive terms optional, ``additive``.)

Linear weight W [out, in] and bias b [out] (``LeFTLinear``):

    Ŵ = W ⊙ (U Vᵀ) + U' V'ᵀ,    b̂ = b ⊙ b_mul + b_add        U, U' [out, r], V, V' [in, r]

Identity at initialisation (derivation). With every entry of A, B, C equal to c:
A @ B sums r products, M1 = r c²; C @ M1 sums r more, M = r · c · r c² = r² c³. M = 1 ⇔
c = r^(-2/3) — the official value. (ReLU is the identity on the positive M1.) For the linear
modulator U Vᵀ = r c² = 1 ⇔ c = r^(-1/2). b_mul starts at 1, every additive factor product at 0.
(b ⊙ b_mul cannot move a bias that is exactly 0, e.g. in an untrained mapping network; b_add can.)

Exactness in floating point: r^(-2/3) is not a binary fraction for r ∉ {1, 8, 64, ...}, so in
float32 M would be 1 ± a few ulps and Ŵ ≠ W in the last bits. We therefore keep the factors in
**float64** (``FACTOR_DTYPE``) and compute M there: r²c³ is then 1 to ~1e-16, which rounds to
exactly 1.0 when M is cast to the weight's dtype, so Ŵ == W bit for bit at init for every rank
(the generator's images are unchanged, tested). The factors are few (~108K per task for the 256²
generator), so the cost is negligible; the products are cast back before they touch W.

Two properties of the published parametrisation, documented rather than silently changed:

* Additive factors both at zero (the official code) get exactly zero gradient forever — the
  gradient of A'B'ᵀ w.r.t. A' is G B' = 0 and w.r.t. B' is Gᵀ A' = 0, and Adam does not move a
  parameter whose gradient is always 0 — so the released model's additive terms never train (only
  the bias ``b_add``, a plain vector, does). The paper adds them to be learned, so by default
  (``additive_init="lora"``) one factor of every additive pair starts random (N(0, 1/r), the
  channel side: A', C', V') and the other at zero (B', D', U'): the term is still exactly 0 at init
  but trainable, as in LoRA (Hu et al. 2021). ``additive_init="zeros"`` reproduces the release.
* Rank r > 1 with constant initial factors is symmetric in its r components: every component gets
  the same gradient, so they stay equal forever (checked: after training, A's, B's and C's r
  slices are bit-identical) and the modulator is rank 1 with another init scale and effective
  step size. The paper's default is r = 1, where this does not arise. ``rank_init="constant"``
  (default) keeps the paper's init; ``rank_init="perturbed"`` breaks the symmetry and keeps M = 1
  exactly: A and C stay c, while B[j, m, s] = c·(1 + ε[j, m, s]) with ε ~ U(−½, ½) made zero-mean
  over (j, m) for every s, so Σ_{j,m} B = r²c, M1 > 0 and M = c²·Σ_{j,m} B = r²c³ = 1; for a
  linear layer V[i, m] = c·(1 + ε[i, m]) with Σ_m ε[i, m] = 0, so U Vᵀ = c·Σ_m V = r c² = 1.
  For r = 1 both inits are the same (ε is zero-mean over a single entry: 0).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

FACTOR_DTYPE = torch.float64
AdditiveInit = Literal["lora", "zeros"]
RankInit = Literal["constant", "perturbed"]


def _standard(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """``t`` viewed as ``shape`` with standard (row-major) strides, size-1 axes included: a
    product with odd strides on size-1 axes would make ``W ⊙ M`` inherit them, and a conv on such
    a weight may take a different kernel path (last-bit differences)."""
    return t.reshape(-1).view(*shape)


def _zero_mean_noise(shape: tuple[int, ...], dims: tuple[int, ...], generator: torch.Generator | None
                     ) -> torch.Tensor:
    """U(−½, ½) noise (float64, CPU) made exactly zero-mean over ``dims``."""
    eps = torch.rand(shape, generator=generator, dtype=FACTOR_DTYPE) - 0.5
    return eps - eps.mean(dims, keepdim=True)


def _init_additive_pair(random_side: torch.Tensor, zero_side: torch.Tensor, mode: AdditiveInit,
                        rank: int, generator: torch.Generator | None) -> None:
    """Product exactly 0: ``zero_side`` = 0; ``random_side`` N(0, 1/r) ("lora") or 0 ("zeros")."""
    with torch.no_grad():
        zero_side.zero_()
        if mode == "zeros" or random_side.device.type == "meta":
            random_side.zero_()
        else:
            values = torch.randn(random_side.shape, generator=generator, dtype=random_side.dtype)
            random_side.copy_(values / math.sqrt(rank))


class LeFTConv(nn.Module):
    """LeFT for a convolution weight [C_out, C_in, k, k] (also [1, C_out, C_in, k, k], the shape of
    ``ModulatedConv2d.weight``): ``forward(weight) -> Ŵ`` of the same shape and dtype."""

    def __init__(self, out_channels: int, in_channels: int, kernel_size: int, rank: int = 1,
                 use_relu: bool = True, additive: bool = True, additive_init: AdditiveInit = "lora",
                 rank_init: RankInit = "constant", generator: torch.Generator | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LeFT rank must be >= 1, got {rank}")
        self.out_channels, self.in_channels, self.kernel_size = out_channels, in_channels, kernel_size
        self.rank, self.use_relu, self.additive, self.additive_init = rank, use_relu, additive, additive_init
        self.rank_init = rank_init
        kk = kernel_size * kernel_size
        f = dict(dtype=FACTOR_DTYPE, device=device)
        self.a_out = nn.Parameter(torch.empty(out_channels, rank, **f))     # A  [C_out, r]
        self.b_core = nn.Parameter(torch.empty(rank, rank, kk, **f))        # B  [r, r, k²]
        self.c_in = nn.Parameter(torch.empty(in_channels, rank, **f))       # C  [C_in, r]
        if additive:
            self.a_add = nn.Parameter(torch.empty(out_channels, rank, **f))  # A' [C_out, r]
            self.b_add = nn.Parameter(torch.empty(kk, rank, **f))            # B' [k², r]
            self.c_add = nn.Parameter(torch.empty(in_channels, rank, **f))   # C' [C_in, r]
            self.d_add = nn.Parameter(torch.empty(kk, rank, **f))            # D' [k², r]
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The identity modulator: A, B, C = r^(-2/3) (M = r²c³ = 1), additive products 0."""
        c = self.rank ** (-2.0 / 3.0)
        with torch.no_grad():
            for p in (self.a_out, self.b_core, self.c_in):
                p.fill_(c)
            if self.rank_init == "perturbed" and self.b_core.device.type != "meta":
                eps = _zero_mean_noise(tuple(self.b_core.shape), (0, 1), generator)
                self.b_core.copy_(c * (1.0 + eps))
        if self.additive:
            _init_additive_pair(self.a_add, self.b_add, self.additive_init, self.rank, generator)
            _init_additive_pair(self.c_add, self.d_add, self.additive_init, self.rank, generator)

    def multiplier(self) -> torch.Tensor:
        """M [C_out, C_in, k²] in float64."""
        m1 = torch.matmul(self.a_out, self.b_core)  # [C_out, r] @ [r, r, k²] -> [r, C_out, k²]
        if self.additive:
            m1 = m1 + (self.a_add @ self.b_add.T).unsqueeze(0)  # + A'B'ᵀ [C_out, k²], same for every j
        if self.use_relu:
            m1 = torch.relu(m1)
        return torch.einsum("ij,jos->ois", self.c_in, m1)  # M[o,i,s] = Σ_j C[i,j] M1[j,o,s]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        o, i, k = self.out_channels, self.in_channels, self.kernel_size
        if tuple(weight.shape[-4:]) != (o, i, k, k):
            raise ValueError(f"LeFTConv for [{o}, {i}, {k}, {k}] got a weight of shape {tuple(weight.shape)}")
        m = _standard(self.multiplier().to(weight.dtype), o, i, k, k)
        out = weight * m
        if self.additive:  # C'D'ᵀ [C_in, k²], broadcast over C_out
            out = out + _standard((self.c_add @ self.d_add.T).to(weight.dtype), 1, i, k, k)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, {self.kernel_size}, rank={self.rank}, "
                f"relu={self.use_relu}, additive={self.additive}")


class LeFTLinear(nn.Module):
    """LeFT for a linear weight [out, in] and its optional bias [out]:
    ``forward(weight, bias) -> (Ŵ, b̂)`` (b̂ None when ``bias`` is None)."""

    def __init__(self, out_features: int, in_features: int, rank: int = 1, bias: bool = True,
                 additive: bool = True, additive_init: AdditiveInit = "lora", rank_init: RankInit = "constant",
                 generator: torch.Generator | None = None, device: torch.device | str | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LeFT rank must be >= 1, got {rank}")
        self.out_features, self.in_features = out_features, in_features
        self.rank, self.has_bias, self.additive, self.additive_init = rank, bias, additive, additive_init
        self.rank_init = rank_init
        f = dict(dtype=FACTOR_DTYPE, device=device)
        self.u = nn.Parameter(torch.empty(out_features, rank, **f))        # U  [out, r]
        self.v = nn.Parameter(torch.empty(in_features, rank, **f))         # V  [in, r]
        if additive:
            self.u_add = nn.Parameter(torch.empty(out_features, rank, **f))  # U' [out, r]
            self.v_add = nn.Parameter(torch.empty(in_features, rank, **f))   # V' [in, r]
        if bias:
            self.b_mul = nn.Parameter(torch.empty(out_features, **f))
            if additive:
                self.b_add = nn.Parameter(torch.empty(out_features, **f))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The identity modulator: U, V = r^(-1/2) (U Vᵀ = r c² = 1), b_mul = 1, additive terms 0."""
        c = self.rank ** -0.5
        with torch.no_grad():
            self.u.fill_(c)
            self.v.fill_(c)
            if self.rank_init == "perturbed" and self.v.device.type != "meta":
                self.v.copy_(c * (1.0 + _zero_mean_noise(tuple(self.v.shape), (1,), generator)))
            if self.has_bias:
                self.b_mul.fill_(1.0)
                if self.additive:
                    self.b_add.zero_()
        if self.additive:
            _init_additive_pair(self.v_add, self.u_add, self.additive_init, self.rank, generator)

    def forward(self, weight: torch.Tensor, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"LeFTLinear for [{self.out_features}, {self.in_features}] got a weight of "
                             f"shape {tuple(weight.shape)}")
        shape = (self.out_features, self.in_features)
        w = weight * _standard((self.u @ self.v.T).to(weight.dtype), *shape)
        if self.additive:
            w = w + _standard((self.u_add @ self.v_add.T).to(weight.dtype), *shape)
        b = None
        if bias is not None:
            if not self.has_bias:
                raise ValueError("this LeFTLinear was built without a bias modulator")
            b = bias * self.b_mul.to(bias.dtype)
            if self.additive:
                b = b + self.b_add.to(bias.dtype)
        return w, b

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}, bias={self.has_bias}, "
                f"additive={self.additive}")


def left_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- a StyleGAN2 generator with LeFT on every conv and linear weight ----------------------------
def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys may not contain "."


class LeFTGenerator(nn.Module):
    """A frozen ``trainers.nets.stylegan2.Generator`` (``base``) whose every linear and conv weight
    is replaced, at call time, by its LeFT-modulated version: the mapping network's
    ``EqualLinear`` layers (weight and bias), every ``ModulatedConv2d`` (the StyledConvs and the
    ToRGB 1×1 convs) and its style affine ``modulation`` (an ``EqualLinear``, weight and bias) —
    the layers the official release modulates. The constant input, noise strengths and activation /
    ToRGB biases stay frozen, as there.

    The base is never written: ``forward`` computes the modulated weights and runs the base
    through ``torch.func.functional_call``, so one base can be shared by several LeFTGenerators
    (one per task) and its parameters keep ``requires_grad=False``. ``requires_grad_`` toggles
    the modulators only. The interface is the Generator's (``forward``, ``mean_latent``,
    ``get_latent``, ``random_noise``, ``n_latent``, ...), with the modulated mapping network.
    """

    def __init__(self, base: nn.Module, rank: int = 1, use_relu: bool = True, additive: bool = True,
                 additive_init: AdditiveInit = "lora", rank_init: RankInit = "constant",
                 generator: torch.Generator | None = None):
        from trainers.nets.stylegan2 import EqualConv2d, EqualLinear, ModulatedConv2d

        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.use_relu, self.additive, self.additive_init = rank, use_relu, additive, additive_init
        self.rank_init = rank_init
        device = next(base.parameters()).device
        mods: dict[str, nn.Module] = {}
        self.targets: list[tuple[str, str, str | None]] = []  # (modulator key, weight name, bias name)
        for name, m in base.named_modules():
            if isinstance(m, EqualLinear):
                out_f, in_f = m.weight.shape
                mods[_key(name)] = LeFTLinear(out_f, in_f, rank, bias=m.bias is not None, additive=additive,
                                              additive_init=additive_init, rank_init=rank_init,
                                              generator=generator, device=device)
                self.targets.append((_key(name), f"{name}.weight", f"{name}.bias" if m.bias is not None else None))
            elif isinstance(m, (ModulatedConv2d, EqualConv2d)):
                o, i, k = m.weight.shape[-4], m.weight.shape[-3], m.weight.shape[-1]
                mods[_key(name)] = LeFTConv(o, i, k, rank, use_relu=use_relu, additive=additive,
                                            additive_init=additive_init, rank_init=rank_init,
                                            generator=generator, device=device)
                self.targets.append((_key(name), f"{name}.weight", None))
        if not mods:
            raise ValueError("LeFTGenerator found no EqualLinear / ModulatedConv2d / EqualConv2d layer to modulate")
        self.modulators = nn.ModuleDict(mods)

    # -- modulators --------------------------------------------------------------------------
    def requires_grad_(self, requires_grad: bool = True) -> "LeFTGenerator":
        """Only the modulators train; the base stays frozen whatever is asked."""
        self.modulators.requires_grad_(requires_grad)
        return self

    def reset_modulators(self, generator: torch.Generator | None = None) -> None:
        """Back to the identity (a fresh task); ``generator`` draws the random additive factors."""
        for m in self.modulators.values():
            m.reset_parameters(generator)

    def modulator_count(self) -> int:
        return left_parameter_count(self.modulators)

    def modulated_parameters(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """{base parameter name: modulated tensor} for the targets whose name starts with ``prefix``."""
        out: dict[str, torch.Tensor] = {}
        for key, wname, bname in self.targets:
            if not wname.startswith(prefix):
                continue
            mod = self.modulators[key]
            weight = self.base.get_parameter(wname)
            if isinstance(mod, LeFTLinear):
                bias = self.base.get_parameter(bname) if bname is not None else None
                w, b = mod(weight, bias)
                out[wname] = w
                if bname is not None:
                    out[bname] = b
            else:
                out[wname] = mod(weight)
        return out

    @torch.no_grad()
    def merged_generator(self) -> nn.Module:
        """A plain Generator (a copy of the base) holding the modulated weights of the current
        modulators: it samples exactly what this LeFTGenerator samples."""
        import copy

        g = copy.deepcopy(self.base)
        for name, value in self.modulated_parameters().items():
            g.get_parameter(name).copy_(value)
        return g

    # -- the Generator interface -------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.base, self.modulated_parameters(), args, kwargs)

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        params = {k[len("style."):]: v for k, v in self.modulated_parameters("style.").items()}
        return torch.func.functional_call(self.base.style, params, (z,))

    @torch.no_grad()
    def mean_latent(self, n_latent: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.device
        z = torch.randn(n_latent, self.style_dim, generator=generator, device=device).to(self.device)
        return self.get_latent(z).mean(0, keepdim=True)

    def random_noise(self, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.base.random_noise(batch, generator)

    def make_noise(self) -> list[torch.Tensor]:
        return self.base.make_noise()

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        return self.base.feature_shapes()

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def style_dim(self) -> int:
        return self.base.style_dim

    @property
    def n_latent(self) -> int:
        return self.base.n_latent

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def arch(self) -> dict:
        return self.base.arch
