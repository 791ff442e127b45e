"""Self-annotation: pseudo-labels from a self-supervised image encoder and k-means, plain torch.

The "self-labeled" guidance signal of Hu et al., "Self-Guided Diffusion Models" (CVPR 2023,
arXiv 2210.06462), Sec. 3: a feature function f (a self-supervised backbone) and a
self-annotation function ξ (k-means) give every training image x a pseudo-label
k_ξ(x) = ξ(f(x)), used as the class of a classifier-free-guided diffusion model.
Reference code: dongzhuoyao/self-guided-diffusion-models at commit be8f452 (2023-06-02): ``clustering/``;
read, not copied.
Choices and differences from the release:

* **Features are L2-normalised** before clustering (release: ``feat /= norm`` before faiss), and,
  unlike the release, also before *assignment*: the release assigns unnormalised features to
  centroids learned on normalised ones (``cluster_standard.py``, the trainval copy is taken
  before the in-place normalisation), which favours tight high-norm centroids. Here
  :func:`assign` always normalises.
* **Spherical k-means** (cosine / dot-product assignment, centroids re-normalised after each
  mean), the natural fit for unit-norm features. The release runs faiss with
  ``spherical=False``: mean centroids of norm < 1 and nearest-L2 assignment, i.e. argmax of
  x·c − ||c||²/2 instead of x·c/||c||. The two agree on well-separated data; they differ slightly
  for clusters of different spread.
* **Initialisation: k-means++** (Arthur & Vassilvitskii 2007) with the squared chord distance
  2 − 2·x·c on the sphere, drawn from a CPU ``torch.Generator`` seeded with ``seed`` (so the
  result does not depend on the device's RNG); one run (faiss: a random sample of k points,
  seed 1234, nredo 1). 30 iterations by default (the release's ``--niter 30``), stopping early
  when no assignment changes. No sub-sampling (faiss keeps at most 256·k training points).
* **Empty clusters** are re-seeded, deterministically, with the points farthest from their
  current centroid (faiss splits a large cluster instead).
* All arithmetic is fp32 on the features' device; the centroid sums are a one-hot matmul
  (deterministic on GPUs, unlike ``index_add_``), which needs N·k floats: fine for the few-shot
  sets and source sets of a few thousand images this project clusters.

Encoders. :class:`Annotator` takes any object with ``features(images_uint8) -> [N, D]``:

* the project's :class:`~trainers.metrics.domain_encoder.DomainEncoder` (SimCLR on the source
  domain; the default — :func:`load_domain_encoder` reads it and hashes its file), embedded in
  a saved annotator so that ``annotator.pt`` is self-contained;
* any ``torch.nn.Module`` feature function, wrapped by :class:`ModuleEncoder` (resize, ImageNet
  normalisation, ``module(x)`` -> flattened features). This is how the release's DINO ViT-B/16
  (CLS token after the final norm, images upsampled to 224 and ImageNet-normalised) or a timm
  backbone is used, **from weights already on disk — nothing is downloaded**::

      model = torch.hub.load("/path/to/facebookresearch_dino_checkout", "dino_vitb16",
                             source="local", pretrained=False)          # code on disk
      model.load_state_dict(torch.load("/path/to/dino_vitbase16_pretrain.pth", map_location="cpu"))
      encoder = ModuleEncoder(model, size=224, weights_file="/path/to/dino_vitbase16_pretrain.pth")
      # or: timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0,
      #                       checkpoint_path="/path/to/weights.safetensors")

  A module encoder is not embedded in ``annotator.pt`` (it may be 86M parameters); the file
  records its digest, and :meth:`Annotator.load` needs the module passed back in and checks
  the digest.

Encoder identity: the sha256 of the encoder's weights file when there is one
(:func:`file_digest`), else of its state dict (:func:`module_digest`). The pseudo-label cache
(:func:`cached_labels`) is keyed by that digest, the image bytes, k and the seed.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT = "fewshot-self-guided-annotator/1"
CACHE_FORMAT = "fewshot-self-guided-labels/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LabelResult = Union[torch.Tensor, dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# k-means on the unit sphere
# --------------------------------------------------------------------------------------------
def normalize(features: torch.Tensor) -> torch.Tensor:
    """Rows of ``features`` [N, D] scaled to unit L2 norm (fp32)."""
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    return F.normalize(features.float(), dim=1, eps=1e-12)


@torch.no_grad()
def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors ``x``: the first centre uniformly, each next one with
    probability ∝ D(x)² = min_c ||x − c||² = 2 − 2 max_c x·c. Returns k distinct row indices."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    best = x @ x[chosen[0]]  # cosine to the nearest chosen centre
    taken = torch.zeros(n, dtype=torch.bool)
    taken[chosen[0]] = True
    for _ in range(1, k):
        d2 = (2.0 - 2.0 * best).clamp_min(0.0).double().cpu()
        d2[taken] = 0.0
        if float(d2.sum()) <= 0.0:  # every remaining point coincides with a centre
            free = (~taken).nonzero().flatten()
            nxt = int(free[torch.randint(len(free), (1,), generator=gen)])
        else:
            nxt = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))
        chosen.append(nxt)
        taken[nxt] = True
        best = torch.maximum(best, x @ x[nxt])
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def _assign_normalised(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (x @ centroids.T).argmax(dim=1)


@torch.no_grad()
def _update(x: torch.Tensor, labels: torch.Tensor, k: int, old: torch.Tensor) -> torch.Tensor:
    """Spherical mean step: normalised member sums; empty clusters take the farthest points."""
    onehot = F.one_hot(labels, k).to(x.dtype)  # [N, k]
    sums = onehot.T @ x  # [k, D]
    counts = onehot.sum(dim=0)
    norms = sums.norm(dim=1, keepdim=True)
    centroids = torch.where(norms > 1e-12, sums / norms.clamp_min(1e-12), old)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        sim_own = (x * centroids[labels]).sum(dim=1)
        order = sim_own.argsort()  # farthest (lowest cosine) first; a stable, deterministic order
        for j, i in zip(empty, order[: len(empty)].tolist()):
            centroids[j] = x[i]
    return centroids


@torch.no_grad()
def kmeans(features: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on the L2-normalised rows of ``features`` [N, D].

    Returns ``(centroids [k, D] unit-norm fp32, labels [N] int64)``, both on the features'
    device, with ``labels == assign(features, centroids)``. k-means++ seeding from a CPU
    generator seeded with ``seed``; at most ``iters`` Lloyd iterations (early stop when stable).
    """
    x = normalize(features)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    gen = torch.Generator().manual_seed(int(seed))
    centroids = x[_kmeans_pp(x, k, gen)].clone()
    labels = _assign_normalised(x, centroids)
    for _ in range(iters):
        centroids = _update(x, labels, k, centroids)
        new = _assign_normalised(x, centroids)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels


def assign(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by cosine similarity: both sides L2-normalised (see the module
    docstring for the release's unnormalised assignment, deliberately not reproduced)."""
    c = normalize(centroids).to(features.device)
    return _assign_normalised(normalize(features), c)


# --------------------------------------------------------------------------------------------
# encoder identity
# --------------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the identity of an encoder saved in that file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values), for encoders that
    were not read from a file."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ModuleEncoder(nn.Module):
    """Any ``torch.nn.Module`` as a feature function on uint8 images: x/255, bilinear
    (antialiased) resize to ``size``×``size`` (None: keep), ``(x − mean)/std`` (None: skip),
    ``module(x)``, flattened to [N, D] fp32. Defaults are the release's DINO preprocessing
    (Resize(224), ImageNet mean/std). ``digest`` is the sha256 of ``weights_file`` when given
    (the identity the label cache uses), else of the module's state dict."""

    def __init__(self, module: nn.Module, size: int | None = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 batch_size: int = 64, weights_file: str | os.PathLike | None = None):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.size = size
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.batch_size = batch_size
        self.digest = file_digest(weights_file) if weights_file is not None else module_digest(module)

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def spec(self) -> dict[str, Any]:
        return {"kind": "module", "module": type(self.module).__name__, "size": self.size,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        from trainers.metrics._images import as_uint8_nchw

        images = as_uint8_nchw(images)
        out = []
        for s in range(0, len(images), self.batch_size):
            x = images[s:s + self.batch_size].to(self.device).float().div_(255.0)
            if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=True)
            if self.mean is not None:
                m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
                sd = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
                x = (x - m) / sd
            y = self.module(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            out.append(y.flatten(1).float())
        if not out:
            raise ValueError("no images given")
        return torch.cat(out)


def encoder_digest(encoder: Any) -> str:
    """The identity of an encoder object: its ``digest`` attribute (ModuleEncoder, or set by
    :func:`load_domain_encoder`), else the sha256 of its state dict."""
    digest = getattr(encoder, "digest", None) or getattr(encoder, "_self_guided_digest", None)
    if digest:
        return str(digest)
    if isinstance(encoder, nn.Module):
        return module_digest(encoder)
    raise TypeError(f"cannot identify encoder {type(encoder).__name__}: give it a 'digest' attribute")


_digest_of = encoder_digest  # the name the Annotator uses (its arguments shadow encoder_digest)


def as_encoder(encoder: Any) -> Any:
    """An object with ``features(uint8) -> [N, D]``: kept as it is when it has one (the
    DomainEncoder, a ModuleEncoder), else a plain ``nn.Module`` wrapped in :class:`ModuleEncoder`
    with the release's preprocessing."""
    if callable(getattr(encoder, "features", None)):
        return encoder
    if isinstance(encoder, nn.Module):
        return ModuleEncoder(encoder)
    raise TypeError(f"an encoder must have features(images) or be a torch.nn.Module, got {type(encoder).__name__}")


def load_domain_encoder(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The project's DomainEncoder from its file, tagged with the file's sha256 as its identity."""
    from trainers.metrics.domain_encoder import DomainEncoder

    enc = DomainEncoder.load(path, device)
    enc._self_guided_digest = file_digest(path)
    return enc


def _domain_encoder_blob(encoder: Any) -> dict[str, Any] | None:
    from trainers.metrics.domain_encoder import FORMAT as ENCODER_FORMAT, DomainEncoder

    if not isinstance(encoder, DomainEncoder):
        return None
    sd = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    return {"format": ENCODER_FORMAT, "config": encoder.config(), "state_dict": sd}


def _domain_encoder_from_blob(blob: dict[str, Any], device) -> Any:
    from trainers.metrics.domain_encoder import FORMAT as ENCODER_FORMAT, DomainEncoder

    if blob.get("format") != ENCODER_FORMAT:
        raise ValueError(f"embedded encoder has format {blob.get('format')!r}, expected {ENCODER_FORMAT!r}")
    cfg = blob["config"]
    enc = DomainEncoder(resolution=cfg["resolution"], widths=tuple(cfg["widths"]), proj_dim=cfg["proj_dim"],
                        strides=tuple(cfg["strides"]), readout=cfg.get("readout", "multi"))
    enc.load_state_dict(blob["state_dict"])
    enc.train_info = dict(cfg.get("train_info", {}))
    return enc.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# the annotator
# --------------------------------------------------------------------------------------------
class Annotator:
    """Encoder + centroids: ``labels(images)`` = nearest centroid (cosine) of each image's
    features. ``encoder_digest`` is the encoder's identity (see the module docstring)."""

    def __init__(self, encoder: Any, centroids: torch.Tensor, encoder_digest: str | None = None,
                 meta: dict[str, Any] | None = None, ids: torch.Tensor | None = None):
        self.encoder = as_encoder(encoder)
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids must be [k, D] with k >= 1, got {tuple(centroids.shape)}")
        self.centroids = normalize(centroids).detach()
        # the label of each centroid row (default: its row number); lets an annotator describe a
        # label space with gaps, e.g. source clusters followed by new target clusters
        if ids is None:
            ids = torch.arange(self.centroids.shape[0])
        ids = torch.as_tensor(ids, dtype=torch.long).to(self.centroids.device)
        if ids.shape != (self.centroids.shape[0],) or len(set(ids.tolist())) != len(ids) or int(ids.min()) < 0:
            raise ValueError("ids must hold one distinct non-negative label per centroid")
        self.ids = ids
        self.encoder_digest = encoder_digest or _digest_of(self.encoder)
        self.meta = dict(meta or {})

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def num_labels(self) -> int:
        """Size of the label space the annotator's labels index (max id + 1)."""
        return int(self.ids.max()) + 1

    @property
    def digest(self) -> str:
        """Identity of the labelling function: encoder digest + centroid values + label ids."""
        return hashlib.sha256((self.encoder_digest + tensor_digest(self.centroids, self.ids)).encode()).hexdigest()

    @classmethod
    def fit(cls, encoder: Any, images: torch.Tensor, k: int, iters: int = 30, seed: int = 0,
            encoder_digest: str | None = None) -> "Annotator":
        """k-means with ``k`` clusters on the encoder's features of ``images``."""
        encoder = as_encoder(encoder)
        centroids, _ = kmeans(encoder.features(images), k, iters=iters, seed=seed)
        return cls(encoder, centroids, encoder_digest, meta={"iters": iters, "seed": seed})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(images)

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels [N] (int64, on the encoder's device) of uint8 images [N,3,H,W]: the id
        of the nearest centroid by cosine similarity."""
        feats = self.features(images)
        return self.ids.to(feats.device)[assign(feats, self.centroids)]

    def to(self, device) -> "Annotator":
        if isinstance(self.encoder, nn.Module):
            self.encoder.to(device)
        self.centroids = self.centroids.to(device)
        self.ids = self.ids.to(device)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """``{"format", "k", "centroids", "ids", "encoder_digest", "encoder", "meta"}`` (weights_only
        loadable); a DomainEncoder is embedded, any other encoder is only described."""
        path = Path(path)
        blob = _domain_encoder_blob(self.encoder)
        spec = ({"kind": "domain", "embedded": blob} if blob is not None else
                self.encoder.spec() if hasattr(self.encoder, "spec") else {"kind": type(self.encoder).__name__})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "k": self.k, "centroids": self.centroids.detach().cpu(),
                    "ids": self.ids.detach().cpu(), "encoder_digest": self.encoder_digest, "encoder": spec,
                    "meta": self.meta}, tmp)
        os.replace(tmp, path)
        return path

    @staticmethod
    def embeds_encoder(path: str | os.PathLike) -> bool:
        """Whether the annotator file at ``path`` carries its own (DomainEncoder) encoder."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        spec = blob.get("encoder", {}) if isinstance(blob, dict) else {}
        return spec.get("kind") == "domain" and "embedded" in spec

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Any = None, device: torch.device | str = "cpu") -> "Annotator":
        """Read :meth:`save`'s file. The embedded DomainEncoder is rebuilt; an annotator made
        with another encoder needs that encoder passed in (its digest must match)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"annotator file {path} does not exist")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path}: not a self-guided annotator (expected format {FORMAT!r})")
        digest = blob["encoder_digest"]
        if encoder is None:
            spec = blob["encoder"]
            if spec.get("kind") != "domain" or "embedded" not in spec:
                raise ValueError(f"{path}: its encoder ({spec.get('kind')}, digest {digest[:12]}) is not embedded; "
                                 "pass the same encoder module as encoder=")
            encoder = _domain_encoder_from_blob(spec["embedded"], device)
            encoder._self_guided_digest = digest
        else:
            encoder = as_encoder(encoder)
            got = _digest_of(encoder)
            if got != digest:
                raise ValueError(f"{path}: the encoder passed in has digest {got[:12]}, the annotator was made "
                                 f"with {digest[:12]}")
            if isinstance(encoder, nn.Module):
                encoder.to(device)
        ann = cls(encoder, blob["centroids"].to(device), digest, meta=blob.get("meta"), ids=blob.get("ids"))
        if ann.k != int(blob["k"]):
            raise ValueError(f"{path}: k={blob['k']} but {ann.k} centroids")
        return ann


# --------------------------------------------------------------------------------------------
# the pseudo-label cache
# --------------------------------------------------------------------------------------------
def labels_key(encoder_digest: str, images: torch.Tensor, k: int, seed: int, extra: str = "") -> str:
    """sha256(format, encoder digest, k, seed, extra, image shape/dtype and bytes)."""
    h = hashlib.sha256()
    h.update(f"{CACHE_FORMAT}|{encoder_digest}|k={int(k)}|seed={int(seed)}|{extra}|".encode())
    h.update(tensor_digest(images).encode())
    return h.hexdigest()


def cached_labels(cache_dir: str | os.PathLike | None, encoder_digest: str, images: torch.Tensor,
                  fn: Callable[[torch.Tensor], LabelResult], *, k: int, seed: int = 0,
                  extra: str = "") -> LabelResult:
    """``fn(images)`` (labels [N], or a dict of tensors such as labels + centroids), stored in
    ``cache_dir/self_guided_labels/<key>.pt`` with key = sha256(encoder digest + image bytes +
    k + seed + ``extra``) and read back instead of calling ``fn`` when the same encoder, images
    and settings come again. Results come back on the CPU. ``cache_dir=None``: no cache."""
    if cache_dir is None:
        return _to_cpu(fn(images))
    folder = Path(cache_dir) / "self_guided_labels"
    path = folder / f"{labels_key(encoder_digest, images, k, seed, extra)}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(blob, dict) and blob.get("format") == CACHE_FORMAT:
                return blob["value"]
        except Exception:  # a torn or foreign file: recompute and overwrite
            pass
    value = _to_cpu(fn(images))
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": CACHE_FORMAT, "value": value, "encoder_digest": encoder_digest, "k": int(k),
                "seed": int(seed), "extra": extra}, buf)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return value


def _to_cpu(value: LabelResult) -> LabelResult:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: v.detach().cpu() for k, v in value.items()}
    raise TypeError(f"label function must return a tensor or a dict of tensors, got {type(value).__name__}")


__all__ = ["Annotator", "ModuleEncoder", "assign", "as_encoder", "cached_labels", "encoder_digest",
           "file_digest", "kmeans", "labels_key", "load_domain_encoder", "module_digest", "normalize",
           "tensor_digest"]
