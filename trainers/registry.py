"""One registry: method key -> class. Adding a method = one file + one line here."""

from __future__ import annotations

from trainers.base import AdaptationMethod
from trainers.diffusion.ddpm_finetune import DDPMFinetune
from trainers.diffusion.ddpm_pa import DDPMPA
from trainers.diffusion.dual_output import DualOutput
from trainers.diffusion.self_guided import SelfGuided
from trainers.gan.dcl import DCL
from trainers.gan.gan_finetune import GANFinetune
from trainers.gan.lfs_gan import LFSGAN

METHODS: dict[str, type[AdaptationMethod]] = {
    cls.key: cls
    for cls in (
        DDPMFinetune,
        DDPMPA,
        DualOutput,
        SelfGuided,
        GANFinetune,
        DCL,
        LFSGAN,
    )
}


def get_method(key: str) -> type[AdaptationMethod]:
    try:
        return METHODS[key]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(key), sorted(METHODS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise KeyError(f"unknown method {key!r}{hint}; available: {', '.join(sorted(METHODS))}") from None


# Source generators: the task file's `source.family` -> the method family that adapts it, how a
# source loads, what pretrains one from scratch, and how to tell that a cached one is complete.
SOURCE_FAMILIES: dict[str, str] = {"ddpm": "diffusion", "stylegan2": "gan"}


def check_family(method: str, source_family: str) -> None:
    cls = get_method(method)
    if SOURCE_FAMILIES.get(source_family) != cls.family:
        need = [f for f, fam in SOURCE_FAMILIES.items() if fam == cls.family]
        raise ValueError(f"method {method} adapts {'/'.join(need)} sources, but the task's source.family "
                         f"is {source_family!r}")


def load_source_model(family: str, spec: str, device):
    if family == "ddpm":
        from trainers.diffusion.backbone import load_source

        return load_source(spec, device)
    from trainers.gan.source import load_gan_source

    return load_gan_source(spec, device)


# Pretrainers: key -> (source family, "module:Class"). A method whose source differs from a plain
# noise-predicting DDPM (a dual-output or self-guided one) adds its pretrainer here.
PRETRAINERS: dict[str, tuple[str, str]] = {
    "ddpm_pretrain": ("ddpm", "trainers.diffusion.pretrain:DDPMPretrain"),
    "gan_pretrain": ("stylegan2", "trainers.gan.pretrain:GANPretrain"),
    "dual_output_pretrain": ("ddpm", "trainers.diffusion.dual_output:DualOutputPretrain"),
    "self_guided_pretrain": ("ddpm", "trainers.diffusion.self_guided:SelfGuidedPretrain"),
}
DEFAULT_PRETRAINER = {"ddpm": "ddpm_pretrain", "stylegan2": "gan_pretrain"}


def pretrainer(family: str, key: str | None = None) -> type[AdaptationMethod]:
    """The class that trains a source of ``family`` from scratch (``key``: a specific pretrainer,
    e.g. a dual-output DDPM; default: the family's plain one)."""
    import importlib

    key = key or DEFAULT_PRETRAINER[family]
    if key not in PRETRAINERS:
        raise KeyError(f"unknown pretrainer {key!r}; available: {', '.join(sorted(PRETRAINERS))}")
    fam, target = PRETRAINERS[key]
    if fam != family:
        raise ValueError(f"pretrainer {key} makes {fam} sources, not {family}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def source_ready(family: str, folder) -> bool:
    from pathlib import Path

    if family == "ddpm":
        return (Path(folder) / "unet" / "config.json").is_file()
    from trainers.gan.source import is_gan_source

    return is_gan_source(folder)
