"""Source StyleGAN2 models: loading and saving the rosinality checkpoint format.

A checkpoint is a ``torch.save`` of a dict with the state dicts ``g_ema`` (required), ``g`` and
``d`` (optional) — the format of rosinality/stylegan2-pytorch's ``train.py`` (at commit bef283a, 2021-11-24)
and of the few-shot GAN papers built on it (CDC, DCL, AdAM, RSSA, LFS-GAN). Files written here add ``"arch"``
(size, style_dim, n_mlp, channel_multiplier, narrow, max_channels, lr_mlp) and provenance keys;
for foreign files without ``"arch"`` the architecture is inferred from the state-dict shapes.

A source may be given as the ``.pt`` file or as a folder holding ``stylegan2.pt`` (what
``save_gan_source`` / ``export()`` write), or a folder holding exactly one ``.pt`` file.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainers.common import SourceModelError
from trainers.nets.stylegan2 import ARCH_KEYS, Discriminator, Generator, build_discriminator, build_generator

CHECKPOINT_NAME = "stylegan2.pt"
FORMAT = "rosinality-stylegan2"

__all__ = ["CHECKPOINT_NAME", "GANSource", "SourceModelError", "checkpoint_file", "infer_arch",
           "is_gan_source", "load_gan_source", "save_gan_source"]


@dataclass
class GANSource:
    """A pretrained StyleGAN2: training generator ``g``, its moving average ``g_ema`` (the one to
    sample from), discriminator ``d`` (None when the file has none), the architecture dict."""

    g: Generator
    g_ema: Generator
    d: Discriminator | None
    arch: dict[str, Any]
    origin: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return int(self.arch["size"])


SAFETENSORS_NAME = "stylegan2.safetensors"


def checkpoint_file(spec: str | os.PathLike) -> Path:
    """The checkpoint file a source spec names (the file itself or the one inside a folder):
    ``stylegan2.pt`` (rosinality's torch format) or ``stylegan2.safetensors`` (the same state dicts
    as ``g.*``, ``g_ema.*``, ``d.*`` tensors, the arch in the metadata)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in (CHECKPOINT_NAME, SAFETENSORS_NAME):
            if (path / name).is_file():
                return path / name
        pts = sorted(p for p in path.iterdir()
                     if p.suffix in {".pt", ".pth", ".ckpt", ".safetensors"} and p.is_file())
        if len(pts) == 1:
            return pts[0]
        raise SourceModelError(
            f"GAN source folder {path} has no {CHECKPOINT_NAME}"
            + (f" and several checkpoints ({', '.join(p.name for p in pts)})" if pts else " and no .pt file"))
    if not path.is_file():
        raise SourceModelError(f"GAN source checkpoint {path} does not exist")
    return path


def is_gan_source(spec: str | os.PathLike) -> bool:
    try:
        checkpoint_file(spec)
        return True
    except SourceModelError:
        return False


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # (Distributed)DataParallel-saved dicts carry a "module." prefix on every key.
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _mismatch(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> list[str]:
    got = {k: tuple(v.shape) for k, v in state.items()}
    out = [f"missing {k}" for k in expected if k not in got]
    out += [f"unexpected {k}" for k in got if k not in expected]
    out += [f"{k}: {got[k]} != {v}" for k, v in expected.items() if k in got and got[k] != v]
    return out


def infer_arch(g_state: dict[str, torch.Tensor], d_state: dict[str, torch.Tensor] | None = None,
               where: str = "checkpoint") -> dict[str, Any]:
    """Infer the architecture dict of a rosinality generator from its state-dict shapes:
    size from the number of ToRGB layers, style_dim and n_mlp from the mapping network, the
    width factor from the 4² channels and the channel multiplier from the 64² channels.
    ``lr_mlp`` cannot be seen in the shapes: rosinality's 0.01 is assumed."""
    try:
        n_rgb = len({m.group(1) for k in g_state if (m := re.match(r"to_rgbs\.(\d+)\.", k))})
        n_mlp = len({m.group(1) for k in g_state if (m := re.match(r"style\.(\d+)\.weight$", k))})
        style_dim = int(g_state["conv1.conv.modulation.weight"].shape[1])
        c4 = int(g_state["input.input"].shape[1])
    except KeyError as exc:
        raise SourceModelError(f"{where}: the generator state dict has no {exc.args[0]!r}; "
                               "it is not a rosinality StyleGAN2 generator") from None
    size = 2 ** (n_rgb + 2)
    narrow = c4 / 512
    candidates = []
    if size >= 64:
        w = g_state.get(f"convs.{(6 - 3) * 2}.conv.weight")  # first conv at 64²
        if w is not None:
            c64 = int(w.shape[1])
            candidates.append(max(1, round(c64 / (256 * narrow))))
    candidates += [2, 1, 4]
    problems: list[str] = []
    for cm in dict.fromkeys(candidates):
        arch = dict(size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=cm, narrow=narrow,
                    max_channels=512, lr_mlp=0.01)
        with torch.device("meta"):
            g = build_generator(arch)
        problems = _mismatch(_shapes(g), g_state)
        if not problems:
            if d_state is not None:
                with torch.device("meta"):
                    d = build_discriminator(arch)
                d_problems = _mismatch(_shapes(d), d_state)
                if d_problems:
                    raise SourceModelError(f"{where}: discriminator 'd' does not match the generator's "
                                           f"architecture {arch}: {'; '.join(d_problems[:5])}")
            return arch
    raise SourceModelError(f"{where}: cannot infer the StyleGAN2 architecture from the shapes "
                           f"(size {size}, style_dim {style_dim}, n_mlp {n_mlp}): {'; '.join(problems[:5])}; "
                           "add an 'arch' dict to the checkpoint")


def _load_blob(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        # rosinality checkpoints also hold the argparse Namespace of their training run
        with torch.serialization.safe_globals([argparse.Namespace]):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceModelError(f"cannot read GAN source checkpoint {path}: {exc}") from exc
    if not isinstance(blob, dict):
        raise SourceModelError(f"GAN source checkpoint {path} must be a dict with key 'g_ema' "
                               f"(found {type(blob).__name__})")
    return blob


def load_gan_source(spec: str | os.PathLike, device: torch.device | str = "cpu") -> GANSource:
    """Load a rosinality-format StyleGAN2 checkpoint (file, or folder holding it) onto ``device``.
    ``g`` defaults to a copy of ``g_ema`` when absent; ``d`` is None when absent."""
    path = checkpoint_file(spec)
    blob = _load_blob(path)
    if "g_ema" not in blob and "g" not in blob:
        raise SourceModelError(f"GAN source checkpoint {path} must be a dict with key 'g_ema' (or 'g') "
                               f"holding a generator state dict (found {sorted(map(str, blob))})")
    g_ema_state = _strip_prefix(blob.get("g_ema") or blob["g"])
    g_state = _strip_prefix(blob["g"]) if blob.get("g") is not None else None
    d_state = _strip_prefix(blob["d"]) if blob.get("d") is not None else None
    arch = blob.get("arch")
    if arch is None:
        arch = infer_arch(g_ema_state, d_state, where=str(path))
    else:
        unknown = set(arch) - set(ARCH_KEYS)
        if unknown or not {"size", "style_dim", "n_mlp"} <= set(arch):
            raise SourceModelError(f"{path}: 'arch' must have size, style_dim, n_mlp (and optionally "
                                   f"{', '.join(ARCH_KEYS[3:])}); got {sorted(arch)}")
        arch = dict(arch)

    def load(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SourceModelError(f"{path}: '{name}' does not fit the architecture {arch}: {exc}") from exc
        return module.to(device)

    g_ema = load(build_generator(arch), g_ema_state, "g_ema").eval().requires_grad_(False)
    g = load(build_generator(arch), g_state, "g") if g_state is not None else copy.deepcopy(g_ema)
    g.requires_grad_(True).train()
    d = load(build_discriminator(arch), d_state, "d").train() if d_state is not None else None
    extra = {k: v for k, v in blob.items() if k in ("adapted_by", "adapted_from", "format")}
    return GANSource(g=g, g_ema=g_ema, d=d, arch=arch, origin=str(spec), extra=extra)


def _load_safetensors(path: Path) -> dict[str, Any]:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        flat = load_file(str(path))
    except Exception as exc:
        raise SourceModelError(f"cannot read GAN source checkpoint {path}: {exc}") from exc
    blob: dict[str, Any] = {}
    for key, tensor in flat.items():
        part, name = key.split(".", 1)
        blob.setdefault(part, {})[name] = tensor
    for key, value in meta.items():
        blob[key] = json.loads(value)
    return blob


def save_gan_source(path: str | os.PathLike, g: Generator, g_ema: Generator | None = None,
                    d: Discriminator | None = None, extra: dict[str, Any] | None = None,
                    safetensors: bool = False) -> Path:
    """Write a rosinality-format checkpoint (+ ``"arch"``) atomically. ``path`` ending in ``.pt``
    (or ``.safetensors``) is the file; otherwise it is a folder and the file is
    ``path/stylegan2.pt`` (``path/stylegan2.safetensors`` with ``safetensors``). Returns the path
    given (the folder or the file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        safetensors, target = True, path
    elif path.suffix in {".pt", ".pth", ".ckpt"}:
        target = path
    else:
        target = path / (SAFETENSORS_NAME if safetensors else CHECKPOINT_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    if safetensors:
        import json

        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v.detach().cpu().contiguous() for part, module in
                (("g", g), ("g_ema", g_ema or g), ("d", d)) if module is not None
                for k, v in module.state_dict().items()}
        meta = {"arch": json.dumps(dict(g.arch)), "format": json.dumps(FORMAT),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file(flat, str(tmp), metadata=meta)
        os.replace(tmp, target)
        return path
    blob: dict[str, Any] = {
        "g": {k: v.detach().cpu() for k, v in g.state_dict().items()},
        "g_ema": {k: v.detach().cpu() for k, v in (g_ema or g).state_dict().items()},
        "arch": dict(g.arch),
        "format": FORMAT,
        **(extra or {}),
    }
    if d is not None:
        blob["d"] = {k: v.detach().cpu() for k, v in d.state_dict().items()}
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, target)
    return path
