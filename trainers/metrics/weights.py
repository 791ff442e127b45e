"""Pretrained weight files of the standard metric networks: found on disk, or fetched on first use.

A file is looked for in the given directories, ``$ORCHESTRATE_WEIGHTS_DIR`` and the torch hub cache.
When it is not there and the machine is online, it is downloaded once from its official address
(:data:`REMOTE`: pytorch-fid's FID Inception weights, torchvision's VGG16/AlexNet, the ``lpips``
package's linear layers) into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and its
sha256 is checked before it is used (the full digest where we know it, else the prefix that the
file name carries, as torch hub does). Offline (``ORCHESTRATE_OFFLINE=1``, or the address cannot be
reached) nothing is fetched.

A metric is never silently computed with another network: when a file is missing and cannot be
fetched, :class:`MissingWeightsError` names the exact file(s), every directory searched, the
address tried and how to obtain them, and the caller fails. A download whose hash does not match
is deleted and is an error too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

#: Extra directory searched first for every weight file (all files may simply be put there).
WEIGHTS_ENV = "ORCHESTRATE_WEIGHTS_DIR"


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


#: Set to 1 to never download weight files.
OFFLINE_ENV = "ORCHESTRATE_OFFLINE"


@dataclass(frozen=True)
class RemoteWeight:
    url: str
    sha256: str  # the full digest, or the prefix the file name carries (torch hub's convention)
    cache_name: str | None = None  # the name in the hub cache when the file's own name is generic


_LPIPS = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1"

#: Where each weight file comes from and its sha256 (lpips' from the lpips 0.1.4 wheel on PyPI).
REMOTE: dict[str, RemoteWeight] = {
    "pt_inception-2015-12-05-6726825d.pth": RemoteWeight(
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "6726825d"),
    "vgg16-397923af.pth": RemoteWeight("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"),
    "alexnet-owt-7be5be79.pth": RemoteWeight("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"),
    "vgg.pth": RemoteWeight(f"{_LPIPS}/vgg.pth",
                            "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868", "lpips-v0.1-vgg.pth"),
    "alex.pth": RemoteWeight(f"{_LPIPS}/alex.pth",
                             "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0", "lpips-v0.1-alex.pth"),
}


class WeightHashError(ValueError):
    """A downloaded weight file does not match its known sha256."""


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weight(filename: str, timeout: float = 30.0) -> tuple[Path | None, str]:
    """Download ``filename`` (a key of :data:`REMOTE`) into the torch hub cache and check its
    sha256. Returns (path, "") on success, (None, why) when offline or unreachable; raises
    :class:`WeightHashError` when the bytes are not the expected ones."""
    remote = REMOTE.get(filename)
    if remote is None:
        return None, "no known download address"
    if offline():
        return None, f"offline ({OFFLINE_ENV}=1)"
    target_dir = torch_hub_checkpoint_dirs()[0]
    target = target_dir / (remote.cache_name or filename)
    if target.is_file():
        return target, ""
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with urllib.request.urlopen(remote.url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        return None, f"could not download {remote.url} ({getattr(exc, 'reason', exc)})"
    digest = _sha256(tmp)
    if not digest.startswith(remote.sha256):
        tmp.unlink(missing_ok=True)
        raise WeightHashError(f"downloaded {remote.url}: sha256 {digest[:16]}... does not match the expected "
                              f"{remote.sha256[:16]}...; the file was deleted (a corrupt download, or the file "
                              "changed at its source)")
    os.replace(tmp, target)
    return target, ""


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
    """User-given directories, then ``$ORCHESTRATE_WEIGHTS_DIR`` when set."""
    dirs = [Path(d).expanduser() for d in extra if d]
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    return _unique(dirs)


def default_search_dirs(extra: Iterable[Path | str | None] = ()) -> list[Path]:
    """User-given directories, then ``$ORCHESTRATE_WEIGHTS_DIR``, then the torch hub checkpoint dirs."""
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
    cache_name = REMOTE[filename].cache_name if filename in REMOTE else None
    for d in dirs:
        for name in (filename, cache_name):
            if name and (d / name).is_file():
                return d / name
    if explicit is None or Path(explicit).is_dir():
        fetched, why = fetch_weight(filename)
        if fetched is not None:
            return fetched
        how = f"{how}; automatic download: {why}"
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
