"""Density and coverage: fidelity and diversity that outliers cannot fool.

Naeem, Oh, Uh, Choi, Yoo, "Reliable Fidelity and Diversity Metrics for Generative Models", ICML
2020, eq. 5 and 6. With real (reference) features R_1..R_M, generated features F_1..F_N and r_i the
distance from R_i to its k-th nearest neighbour among the other real features:

    density  = 1/(kN) Σ_j Σ_i 1[‖F_j − R_i‖ ≤ r_i]       (≈ 1 for samples like the real ones)
    coverage = 1/M Σ_i 1[∃ j: ‖F_j − R_i‖ ≤ r_i]          (share of the real data that samples reach)

Noise, a blur, copies of a few shots or the source domain's images all land outside most real
neighbourhoods: low density *and* low coverage, where an intra-cluster diversity can still read
high (it measures spread, not whether the spread is in the target domain). k = 5 as in the paper.
"""

from __future__ import annotations

import torch


def knn_radii(real: torch.Tensor, k: int = 5, batch: int = 1024) -> torch.Tensor:
    """Distance of every real feature to its k-th nearest *other* real feature."""
    real = real.float()
    if len(real) <= k:
        raise ValueError(f"density/coverage need more than k={k} reference features, got {len(real)}")
    out = []
    for s in range(0, len(real), batch):
        d = torch.cdist(real[s:s + batch], real)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the +1 skips the point itself (distance 0)
    return torch.cat(out)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5,
                     radii: torch.Tensor | None = None) -> tuple[float, float]:
    real, fake = real.float(), fake.float().to(real.device)
    radii = knn_radii(real, k) if radii is None else radii.to(real.device)
    inside = torch.cdist(fake, real) <= radii[None, :]  # [N, M]
    density = inside.sum().item() / (k * len(fake))
    coverage = inside.any(dim=0).float().mean().item()
    return float(density), float(coverage)
