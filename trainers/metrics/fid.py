"""Fréchet distance (FID) and kernel inception distance (KID) on feature vectors.

Both are extractor-agnostic: they take features ``[N, D]`` from any network, and the caller names
the network in the metric key (``fid_inception``, ``fid_domain``, ...).

* FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017. ``d² = |μ1-μ2|² + Tr(Σ1) + Tr(Σ2) - 2 Tr((Σ1 Σ2)^{1/2})``.
* KID: Bińkowski et al., "Demystifying MMD GANs", ICLR 2018: the unbiased estimator of the squared
  MMD with the cubic polynomial kernel ``k(x, y) = (xᵀy / d + 1)³``, averaged over random subsets.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _as_torch64(x: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device or x.device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)


# Linear algebra runs in torch (float64), not numpy: torch honours ``torch.set_num_threads`` and
# can use the features' device, while numpy's own OpenBLAS thread pool, competing with torch's
# threads on a small shared machine, was measured to slow a 352-d FID down by ~100x.


def feature_statistics(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, float64 numpy) of features ``[N, D]``."""
    f = _as_torch64(feats)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(dim=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    s = 0.5 * (s + s.T)
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0.0).sqrt()) @ v.T


def trace_sqrt_product(s1: ArrayLike, s2: ArrayLike) -> float:
    """``Tr((Σ1 Σ2)^{1/2})`` for covariance matrices ``Σ1, Σ2``.

    Why not ``scipy.linalg.sqrtm(Σ1 @ Σ2)`` (the pytorch-fid route)? ``Σ1 Σ2`` is not symmetric, so
    its Schur-based square root can come back complex or fail outright when the covariances are
    singular, which they always are when there are fewer samples than feature dimensions (50
    samples of a 2048-d Inception feature). The usual fix, adding ``eps·I`` and dropping imaginary
    parts, changes the value by an amount that depends on ``eps``.

    Instead: ``Σ1 Σ2 = Σ1^{1/2} (Σ1^{1/2} Σ2 Σ1^{1/2}) Σ1^{-1/2}`` is similar to the symmetric PSD
    matrix ``M = Σ1^{1/2} Σ2 Σ1^{1/2}`` (for singular Σ1 by continuity), so both have the same
    eigenvalues λ_i ≥ 0, and ``Tr((Σ1 Σ2)^{1/2}) = Σ_i sqrt(λ_i)``. Two symmetric eigendecompositions
    (``eigh``), real arithmetic throughout, with round-off negatives clipped to zero: stable and
    exact for singular covariances, no eps and no imaginary parts to discard.
    """
    t1 = _as_torch64(s1)
    t2 = _as_torch64(s2, t1.device)
    r1 = _psd_sqrt(t1)
    m = r1 @ t2 @ r1
    lam = torch.linalg.eigvalsh(0.5 * (m + m.T))
    return float(lam.clamp(min=0.0).sqrt().sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017)."""
    mu1, mu2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    # Round-off can leave a tiny negative number for identical distributions.
    return float(max(value, 0.0))


def fid_from_features(f1: ArrayLike, f2: ArrayLike) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]``."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def kid(
    f1: ArrayLike,
    f2: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel inception distance: mean and std of the unbiased MMD² over random subsets.

    Each of ``num_subsets`` rounds draws ``m = min(subset_size, N1, N2)`` vectors without
    replacement from each set and computes (Bińkowski et al. 2018, eq. for the unbiased estimator)

        MMD²_u = Σ_{i≠j} k(x_i,x_j)/(m(m-1)) + Σ_{i≠j} k(y_i,y_j)/(m(m-1)) - 2 Σ_{i,j} k(x_i,y_j)/m²

    The estimate is unbiased, so it can be slightly negative for identical distributions.
    Computed in float64 on the device of ``f1`` when it is a tensor, else on the CPU.
    """
    device = f1.device if isinstance(f1, torch.Tensor) else torch.device("cpu")
    x = torch.as_tensor(_as_float64(f1), device=device)
    y = torch.as_tensor(_as_float64(f2), device=device)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {tuple(x.shape)}, {tuple(y.shape)}")
    m = int(min(subset_size, x.shape[0], y.shape[0]))
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for s in range(num_subsets):
        ix = torch.as_tensor(rng.choice(x.shape[0], m, replace=False), device=device)
        iy = torch.as_tensor(rng.choice(y.shape[0], m, replace=False), device=device)
        a, b = x[ix], y[iy]
        kxx, kyy, kxy = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
        sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values[s] = float(sxx + syy - 2.0 * kxy.sum() / (m * m))
    return float(values.mean()), float(values.std())
