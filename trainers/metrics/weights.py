"""Locating pretrained weight files on disk. Nothing here downloads anything, ever.

A metric is never silently computed with another network: when a file is missing,
:class:`MissingWeightsError` names the exact file(s), every directory searched and how to obtain
them, and the caller fails.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

#: Extra directory searched first for every weight file (all files may simply be put there).
WEIGHTS_ENV = "FEWSHOT_WEIGHTS_DIR"


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file that a metric needs is not on this machine."""

    def __init__(self, filenames: Sequence[str], searched: Sequence[Path | str], how: str):
        self.filenames = list(filenames)
        self.searched = [str(p) for p in searched]
        self.how = how
        dirs = "\n".join(f"  - {d}" for d in self.searched) or "  (no directory)"
        msg = (
            f"missing weight file(s): {', '.join(self.filenames)}\n"
            f"searched:\n{dirs}\n"
            f"how to obtain: {how}\n"
            f"(the metric is not computed with any other network instead)"
        )
        super().__init__(msg)


def torch_hub_checkpoint_dirs() -> list[Path]:
    """``$TORCH_HOME/hub/checkpoints`` (via ``torch.hub.get_dir``) and ``~/.cache/torch/hub/checkpoints``."""
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    th = os.environ.get("TORCH_HOME")
    if th:
        dirs.append(Path(th).expanduser() / "hub" / "checkpoints")
    dirs.append(Path("~/.cache/torch/hub/checkpoints").expanduser())
    return _unique(dirs)


def lpips_package_weight_dir() -> Path | None:
    """``<site-packages>/lpips/weights/v0.1`` when the ``lpips`` package is installed (not imported)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1"


def user_search_dirs(extra: Iterable[Path | str | None] = ()) -> list[Path]:
    """User-given directories, then ``$FEWSHOT_WEIGHTS_DIR`` when set."""
    dirs = [Path(d).expanduser() for d in extra if d]
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    return _unique(dirs)


def default_search_dirs(extra: Iterable[Path | str | None] = ()) -> list[Path]:
    """User-given directories, then ``$FEWSHOT_WEIGHTS_DIR``, then the torch hub checkpoint dirs."""
    return _unique(user_search_dirs(extra) + torch_hub_checkpoint_dirs())


def find_weight_file(
    filename: str,
    search_dirs: Sequence[Path | str],
    how: str,
    explicit: Path | str | None = None,
) -> Path:
    """Return the path of ``filename`` in the first directory of ``search_dirs`` that has it.

    ``explicit``: a file path (used as is) or a directory (searched first). Raises
    :class:`MissingWeightsError` otherwise.
    """
    dirs = [Path(d) for d in search_dirs]
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        if p.suffix and not p.is_dir():  # a file path that does not exist
            raise MissingWeightsError([p.name], [p.parent], how)
        dirs.insert(0, p)
    dirs = _unique(dirs)
    for d in dirs:
        candidate = d / filename
        if candidate.is_file():
            return candidate
    raise MissingWeightsError([filename], dirs, how)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` on the CPU; unwraps a ``{"state_dict": ...}`` wrapper."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _unique(paths: Iterable[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
