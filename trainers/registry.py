"""One registry: method key -> class. Adding a method = one file + one line here.

The table names each method's family and where its class lives, and a class is imported the
first time it is asked for: the command line answers ``--help``, ``check-task`` and a typo'd
method name without importing torch, diffusers or the seven methods (``tests/test_registry.py``
checks that the table agrees with the classes and that importing the registry imports no torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainers.base import AdaptationMethod

# key -> (family, "module:Class"); the family is also the class's own ``family``.
METHOD_TABLE: dict[str, tuple[str, str]] = {
    "ddpm_finetune": ("diffusion", "trainers.diffusion.ddpm_finetune:DDPMFinetune"),
    "ddpm_pa": ("diffusion", "trainers.diffusion.ddpm_pa:DDPMPA"),
    "dual_output": ("diffusion", "trainers.diffusion.dual_output:DualOutput"),
    "self_guided": ("diffusion", "trainers.diffusion.self_guided:SelfGuided"),
    "gan_finetune": ("gan", "trainers.gan.gan_finetune:GANFinetune"),
    "dcl": ("gan", "trainers.gan.dcl:DCL"),
    "lfs_gan": ("gan", "trainers.gan.lfs_gan:LFSGAN"),
}


def load_class(target: str) -> type:
    """``"package.module:Class"`` -> the class (imports its module)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


class _Methods(Mapping):
    """``METHODS``: a read-only mapping key -> class over :data:`METHOD_TABLE` that imports a
    method's module when its class is first looked up; iterating lists the keys without importing."""

    def __init__(self, table: dict[str, tuple[str, str]]) -> None:
        self._table = table
        self._loaded: dict[str, type] = {}

    def __getitem__(self, key: str) -> type[AdaptationMethod]:
        if key not in self._loaded:
            _, target = self._table[key]  # KeyError for an unknown key, as a dict
            self._loaded[key] = load_class(target)
        return self._loaded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


METHODS: Mapping[str, type[AdaptationMethod]] = _Methods(METHOD_TABLE)


def unknown_method(key: str) -> KeyError:
    """The error for a method key that is not registered, with the closest key as a suggestion."""
    import difflib

    close = difflib.get_close_matches(str(key), sorted(METHOD_TABLE), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return KeyError(f"unknown method {key!r}{hint}; available: {', '.join(sorted(METHOD_TABLE))}")


def get_method(key: str) -> type[AdaptationMethod]:
    if key not in METHOD_TABLE:
        raise unknown_method(key)
    return METHODS[key]


def method_family(key: str) -> str:
    """``"diffusion"`` or ``"gan"``, without importing the method."""
    if key not in METHOD_TABLE:
        raise unknown_method(key)
    return METHOD_TABLE[key][0]


# Source generators: the task file's `source.family` -> the method family that adapts it, how a
# source loads, what pretrains one from scratch, and how to tell that a cached one is complete.
SOURCE_FAMILIES: dict[str, str] = {"ddpm": "diffusion", "stylegan2": "gan"}


def check_family(method: str, source_family: str) -> None:
    family = method_family(method)
    if SOURCE_FAMILIES.get(source_family) != family:
        need = [f for f, fam in SOURCE_FAMILIES.items() if fam == family]
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
    key = key or DEFAULT_PRETRAINER[family]
    if key not in PRETRAINERS:
        raise KeyError(f"unknown pretrainer {key!r}; available: {', '.join(sorted(PRETRAINERS))}")
    fam, target = PRETRAINERS[key]
    if fam != family:
        raise ValueError(f"pretrainer {key} makes {fam} sources, not {family}")
    return load_class(target)


def source_ready(family: str, folder) -> bool:
    from pathlib import Path

    if family == "ddpm":
        return (Path(folder) / "unet" / "config.json").is_file()
    from trainers.gan.source import is_gan_source

    return is_gan_source(folder)
