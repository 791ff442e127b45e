"""The small sources this repository ships for the built-in synthetic domains.

Each folder here was trained by the project's own ``orchestrate pretrain`` (the exact commands are
in ``README.md`` beside them) and is stored as safetensors: the embedded default adapts a source
that has learned its domain, and neither the demo nor the built-in tasks pretrain anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (family, resolution) -> folder of the shipped source
SOURCES: dict[tuple[str, int], str] = {}
# resolution -> shipped domain encoder / domain classifier files of the synthetic domains
ENCODERS: dict[int, str] = {32: "encoder-synthetic-32.safetensors"}
CLASSIFIERS: dict[int, str] = {32: "classifier-synthetic-32.safetensors"}
SYNTHETIC_SOURCE = "synthetic:source"


def builtin_source(family: str, resolution: int, spec: str = "builtin") -> Path:
    from trainers.common import SourceModelError

    name = spec.split(":", 1)[1] if ":" in spec else SOURCES.get((family, resolution))
    if name is None or not (HERE / name).exists():
        have = ", ".join(f"{f} at {r}px" for f, r in sorted(SOURCES)) or "none yet"
        raise SourceModelError(f"source.model {spec!r}: no built-in {family} source at {resolution}px "
                               f"(built-in sources: {have})")
    return HERE / name


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
