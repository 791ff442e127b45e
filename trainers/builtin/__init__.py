"""The small models this repository ships for the built-in synthetic domains.

Each file here is trained by the project's own commands (``scripts/ship_sources.sh``, with the
recipes in ``tasks/sources/``) and stored as safetensors: the domain encoder behind the
``*_domain`` metrics, the classifier of the six synthetic domains behind ``target_rate_domain``,
and the source generators that the built-in tasks and the demo adapt (``source.model: builtin``),
in the folders named in ``SOURCES``. Each source folder holds the ``recipe.json`` that made it
(its pretraining key, block and command; the recipe is ``tasks/sources/<folder>.yaml``). Where a
family's folder is not shipped, the built-in tasks pretrain a tiny source of that family
themselves (cached after the first run).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent

# (family, resolution) -> folder of the shipped source (used where it exists)
SOURCES: dict[tuple[str, int], str] = {("ddpm", 32): "ddpm-synthetic-32", ("stylegan2", 32): "stylegan2-synthetic-32"}
# resolution -> shipped domain encoder / domain classifier files of the synthetic domains
ENCODERS: dict[int, str] = {32: "encoder-synthetic-32.safetensors"}
CLASSIFIERS: dict[int, str] = {32: "classifier-synthetic-32.safetensors"}
SYNTHETIC_SOURCE = "synthetic:source"


def builtin_source(family: str, resolution: int, spec: str = "builtin") -> Path:
    from trainers.common import SourceModelError

    name = spec.split(":", 1)[1] if ":" in spec else SOURCES.get((family, resolution))
    if name is None or not (HERE / name).exists():
        have = ", ".join(f"{f} at {r}px" for f, r in sorted(SOURCES) if shipped_source(f, r)) or "none yet"
        raise SourceModelError(f"source.model {spec!r}: no built-in {family} source at {resolution}px "
                               f"(built-in sources: {have})")
    return HERE / name


def shipped_source(family: str, resolution: int) -> bool:
    name = SOURCES.get((family, resolution))
    return name is not None and (HERE / name).is_dir()


def builtin_encoder(task: Any) -> Path | None:
    """The shipped domain encoder when the task's source domain is the built-in synthetic one at a
    shipped resolution (else None: the caller trains one)."""
    spec = task.source.pretrain
    name = ENCODERS.get(task.resolution)
    if spec.data != SYNTHETIC_SOURCE or name is None or not (HERE / name).exists():
        return None
    return HERE / name


def builtin_classifier(resolution: int) -> Path | None:
    """The shipped classifier of the six synthetic domains at ``resolution`` (None when not shipped)."""
    name = CLASSIFIERS.get(resolution)
    return HERE / name if name is not None and (HERE / name).exists() else None


def sample_source(family: str, folder: Path, n: int, seed: int = 0, steps: int = 50) -> "torch.Tensor":
    """``n`` uint8 samples [n,3,H,W] of a source folder as the methods draw them before adapting:
    DDIM with ``steps`` steps from a DDPM, the EMA generator (no truncation) of a StyleGAN2."""
    import torch

    from trainers.common import to_uint8

    if family == "ddpm":
        from trainers.diffusion.backbone import ddim_sample, load_source

        src = load_source(str(folder))
        return ddim_sample(src.unet, src.scheduler, n, src.unet.config.sample_size, steps=steps,
                           device=torch.device("cpu"), seed=seed)
    from trainers.gan.source import load_gan_source

    g = load_gan_source(folder).g_ema.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, 64):
            b = min(64, n - start)
            z = torch.randn(b, g.style_dim, generator=gen)
            out.append(to_uint8(g([z], noise=g.random_noise(b, gen))[0]))
    return torch.cat(out)
