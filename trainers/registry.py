"""One registry: method key -> class. Adding a method = one file + one line here."""

from __future__ import annotations

from trainers.base import AdaptationMethod
from trainers.diffusion.ddpm_finetune import DDPMFinetune
from trainers.diffusion.ddpm_pa import DDPMPA

METHODS: dict[str, type[AdaptationMethod]] = {
    cls.key: cls
    for cls in (
        DDPMFinetune,
        DDPMPA,
    )
}


def get_method(key: str) -> type[AdaptationMethod]:
    try:
        return METHODS[key]
    except KeyError:
        raise KeyError(f"unknown method {key!r}; available: {', '.join(sorted(METHODS))}") from None
