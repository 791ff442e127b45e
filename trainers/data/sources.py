"""Few-shot images from any source, decoded once to uint8 and cached.

A data URI is one of

* ``synthetic:<domain>``: a built-in procedural domain (:mod:`trainers.data.synthetic`);
* a local image folder (``.png .jpg .jpeg .webp .bmp``, searched recursively, ordered by relative
  path; hidden files and folders are skipped) or a single image file;
* a local ``.parquet`` file, or a folder holding only parquet files, with a column of encoded
  image bytes: a binary column, or a struct column with a ``bytes`` field as Hugging Face
  ``datasets`` writes images;
* either of the two on ``s3://bucket/prefix`` (through s3fs; any other fsspec URL works too).

:func:`load_images` returns uint8 ``[N, resolution, resolution, 3]``: every image converted to
RGB (transparent pixels composited on white), centre-cropped to a square and resized. With
``count``, a seeded permutation of the ordered list picks the images, and only those are read and
decoded. With ``cache_dir``, the decoded array is kept as ``.npy`` under a key that covers the
arguments and a fingerprint of the source (names, sizes, modification times or ETags), so the
second call reads one file and a changed source is decoded afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainers.data import synthetic

__all__ = ["DataError", "IMAGE_EXTENSIONS", "load_images", "to_tensor"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet", ".parq")
SYNTHETIC_PREFIX = "synthetic:"
_CACHE_VERSION = 1
_READ_THREADS = 8  # concurrent reads of image files from remote filesystems


class DataError(ValueError):
    """Bad or missing data. Every message names the file, URI, key or column, and what was
    expected, so that it can be shown to the user as it is."""


# ---------------------------------------------------------------------------------------------
# public API


def load_images(uri: str | os.PathLike, resolution: int, *, count: int | None = None, seed: int = 0,
                start: int = 0, image_column: str = "image",
                cache_dir: str | os.PathLike | None = None,
                storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Load images from ``uri`` as uint8 ``[N, resolution, resolution, 3]``.

    Args:
        uri: ``synthetic:<domain>``, a local image folder / image file / ``.parquet`` file /
            folder of parquet files, or the same on ``s3://bucket/prefix``.
        resolution: output side length in pixels.
        count: how many images. ``None`` takes every image (from ``start`` on, in order). Given,
            the images are ``permutation[start:start + count]`` of a ``numpy.random.default_rng(
            seed)`` permutation of the ordered list, so a smaller ``count`` gives a prefix of a
            larger one and different ``start`` windows never overlap. Required for synthetic
            domains, which render images ``start .. start + count - 1`` of draw ``seed``.
        seed: seeds the selection (and the synthetic draw).
        start: offset into the selection (see ``count``).
        image_column: the parquet column that holds the encoded images.
        cache_dir: a local folder for the decoded-array cache; ``None`` disables caching.
        storage_options: keyword arguments for the fsspec filesystem (``s3fs.S3FileSystem`` for
            ``s3://``). By default s3fs takes credentials and region from the standard AWS
            environment variables, and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` select the
            endpoint.

    Raises:
        DataError: a missing source, no images, fewer images than ``count``, an unknown
            synthetic domain or parquet column, or an image that cannot be decoded (the message
            names the file, and for parquet the row).
    """
    uri = os.fspath(uri)
    resolution = _check_int("resolution", resolution, 1)
    start = _check_int("start", start, 0)
    seed = _check_int("seed", seed, 0)
    if count is not None:
        count = _check_int("count", count, 1)

    if uri.startswith(SYNTHETIC_PREFIX):
        domain = uri[len(SYNTHETIC_PREFIX):]
        if domain not in synthetic.DOMAINS:
            import difflib

            close = difflib.get_close_matches(domain, list(synthetic.DOMAINS), n=1, cutoff=0.6)
            hint = f" (did you mean {SYNTHETIC_PREFIX}{close[0]}?)" if close else ""
            raise DataError(f"{uri}: unknown synthetic domain {domain!r}{hint}; known domains: "
                            f"{', '.join(SYNTHETIC_PREFIX + d for d in synthetic.DOMAINS)}")
        if count is None:
            raise DataError(f"{uri}: a synthetic domain is unbounded, so `count` is required")
        fingerprint: Any = {"synthetic": domain, "render_version": synthetic.RENDER_VERSION}
        path = _cache_path(cache_dir, uri, resolution, count, seed, start, image_column, fingerprint)
        cached = _read_cache(path, resolution)
        if cached is not None:
            return cached
        images = synthetic.render(domain, count, resolution, seed=seed, start=start)
        _write_cache(path, images)
        return images

    source = _Source.open(uri, storage_options)
    path = _cache_path(cache_dir, uri, resolution, count, seed, start, image_column,
                       source.fingerprint())
    cached = _read_cache(path, resolution)
    if cached is not None:
        return cached
    if source.kind == "images":
        images = _load_image_files(source, resolution, count, seed, start)
    else:
        images = _load_parquet(source, resolution, count, seed, start, image_column)
    _write_cache(path, images)
    return images


def to_tensor(images: np.ndarray):
    """uint8 ``[N, H, W, 3]`` (numpy) -> contiguous uint8 ``torch.Tensor`` ``[N, 3, H, W]``."""
    import torch

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# listing sources


@dataclass
class _Source:
    uri: str
    fs: Any  # an fsspec filesystem
    root: str  # the path of uri on fs
    kind: str  # "images" or "parquet"
    files: list[tuple[str, str, dict]]  # (relative path, full path on fs, info), ordered

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, Any] | None) -> _Source:
        fs, root = _filesystem(uri, storage_options)
        try:
            fs.invalidate_cache()  # a fresh listing, so that the fingerprint sees changes
        except Exception:
            pass
        try:
            info = fs.info(root)
        except FileNotFoundError:
            raise DataError(f"{uri}: no such file or folder; expected an image folder, a .parquet "
                            f"file or a folder of .parquet files") from None
        except Exception as exc:  # permissions, network, endpoint
            raise DataError(f"{uri}: cannot read it ({exc.__class__.__name__}: {exc})") from exc

        if info.get("type") != "directory":
            name = root.rstrip("/").rsplit("/", 1)[-1]
            ext = os.path.splitext(name)[1].lower()
            if ext in PARQUET_EXTENSIONS:
                return cls(uri, fs, root, "parquet", [(name, root, info)])
            if ext in IMAGE_EXTENSIONS:
                return cls(uri, fs, root, "images", [(name, root, info)])
            raise DataError(f"{uri}: unsupported file type {ext or '(none)'!r}; expected an image "
                            f"({', '.join(IMAGE_EXTENSIONS)}), a .parquet file or a folder")

        base = root.rstrip("/") + "/"
        try:
            found = fs.find(base, detail=True)
        except Exception as exc:
            raise DataError(f"{uri}: cannot list it ({exc.__class__.__name__}: {exc})") from exc
        images, parquets = [], []
        for full, finfo in found.items():
            if finfo.get("type") == "directory" or not full.startswith(base):
                continue
            rel = full[len(base):]
            if any(part.startswith(".") for part in rel.split("/")):
                continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints, ...)
            ext = os.path.splitext(rel)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                images.append((rel, full, finfo))
            elif ext in PARQUET_EXTENSIONS:
                parquets.append((rel, full, finfo))
        if images and parquets:
            raise DataError(f"{uri}: holds both image files ({len(images)}) and parquet files "
                            f"({len(parquets)}); expected one kind of source per folder")
        if not images and not parquets:
            raise DataError(f"{uri}: no images found; expected image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}) or .parquet files in the folder")
        kind, files = ("images", images) if images else ("parquet", parquets)
        return cls(uri, fs, root, kind, sorted(files, key=lambda f: f[0]))

    @property
    def is_local(self) -> bool:
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        return "file" in protocols or "local" in protocols

    def display(self, full: str) -> str:
        """How a file is named in messages: as the user would write it."""
        if self.is_local:
            return full
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{full}"

    def fingerprint(self) -> list:
        return [self.kind, [[rel, *_stamp(info)] for rel, _, info in self.files]]


def _filesystem(uri: str, storage_options: dict[str, Any] | None):
    import fsspec

    options = dict(storage_options or {})
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if protocol in ("s3", "s3a"):
        import s3fs

        endpoint = _env_endpoint()
        client_kwargs = dict(options.pop("client_kwargs", None) or {})
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            # botocore reads AWS_ENDPOINT_URL itself; passing it makes that independent of the
            # botocore version, and part of fsspec's filesystem-instance cache key
            client_kwargs["endpoint_url"] = endpoint
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        try:
            fs = s3fs.S3FileSystem(**options)
        except Exception as exc:
            raise DataError(f"{uri}: cannot set up S3 access ({exc.__class__.__name__}: {exc})") from exc
        return fs, uri.split("://", 1)[1].rstrip("/")
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
    except Exception as exc:
        raise DataError(f"{uri}: cannot open it ({exc.__class__.__name__}: {exc})") from exc
    return fs, root


def _env_endpoint() -> str | None:
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _stamp(info: dict) -> list:
    """Size and version of a listed file: ETag / mtime / LastModified, whichever the fs gives."""
    version = [info.get(k) for k in ("ETag", "etag", "mtime", "LastModified", "last_modified",
                                     "updated", "generation") if info.get(k) is not None]
    return [info.get("size"), *[str(v) for v in version]]


# ---------------------------------------------------------------------------------------------
# selection and decoding


def _select(total: int, count: int | None, seed: int, start: int, uri: str) -> np.ndarray:
    """Indices into the ordered list of ``total`` images (see :func:`load_images`)."""
    if total == 0:
        raise DataError(f"{uri}: no images found")
    if count is None:
        if start >= total:
            raise DataError(f"{uri}: found {total} images, but start={start} skips all of them")
        return np.arange(start, total)
    if start + count > total:
        asked = f"{count}" + (f" after skipping start={start}" if start else "")
        raise DataError(f"{uri}: found {total} images, but {asked} were asked for")
    return np.random.default_rng(seed).permutation(total)[start:start + count]


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def _decode(data: bytes | None, name: str, resolution: int) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[resolution, resolution, 3]``; ``name`` is for messages."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise DataError(f"{name}: empty image data; expected an encoded image "
                        f"(PNG, JPEG, WebP or BMP bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
        method = (Image.Resampling.LANCZOS if min(im.size) >= 3 * resolution
                  else Image.Resampling.BICUBIC)
        im = ImageOps.fit(im, (resolution, resolution), method=method)
        out = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names our buffer, not the file
        detail = ("not an image format PIL recognises" if isinstance(exc, UnidentifiedImageError)
                  else f"{exc.__class__.__name__}: {exc}")
        raise DataError(f"{name}: cannot decode the image ({detail}); "
                        f"expected a valid PNG, JPEG, WebP or BMP image") from exc
    if out.shape != (resolution, resolution, 3):  # pragma: no cover - PIL guarantees this
        raise DataError(f"{name}: decoded to shape {out.shape}, expected {(resolution, resolution, 3)}")
    return out


def _load_image_files(source: _Source, resolution: int, count: int | None, seed: int,
                      start: int) -> np.ndarray:
    chosen = _select(len(source.files), count, seed, start, source.uri)
    out = np.empty((len(chosen), resolution, resolution, 3), np.uint8)
    paths = [source.files[i][1] for i in chosen]

    def read(path: str) -> bytes:
        try:
            return source.fs.cat_file(path)
        except Exception as exc:
            raise DataError(f"{source.display(path)}: cannot read the file "
                            f"({exc.__class__.__name__}: {exc})") from exc

    if source.is_local or len(paths) < 2:
        blobs = map(read, paths)
    else:  # remote: fetch concurrently (cat_file, not cat: names may contain glob characters)
        pool = ThreadPoolExecutor(max_workers=_READ_THREADS)
        blobs = pool.map(read, paths)
    try:
        for j, (path, data) in enumerate(zip(paths, blobs)):
            out[j] = _decode(data, source.display(path), resolution)
    finally:
        if not (source.is_local or len(paths) < 2):
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def _open_parquet(source: _Source, full: str, image_column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = source.display(full)
    try:
        handle = source.fs.open(full, "rb")
        pf = pq.ParquetFile(handle)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise DataError(f"{name}: cannot read it as parquet ({exc.__class__.__name__}: {exc})") from exc
    schema = pf.schema_arrow
    if image_column not in schema.names:
        raise DataError(f"{name}: no column {image_column!r}; available columns: "
                        f"{', '.join(schema.names) or '(none)'}")
    kind = schema.field(image_column).type
    if pa.types.is_struct(kind):
        if kind.get_field_index("bytes") < 0:
            raise DataError(f"{name}: column {image_column!r} is a struct {kind} without a 'bytes' "
                            f"field; expected binary image bytes or a struct with a 'bytes' field")
    elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
              or getattr(pa.types, "is_binary_view", lambda t: False)(kind)):
        raise DataError(f"{name}: column {image_column!r} has type {kind}; expected binary image "
                        f"bytes or a struct with a 'bytes' field (as Hugging Face datasets write)")
    return pf, handle


def _row_group_bytes(pf, group: int, image_column: str) -> list:
    import pyarrow as pa

    column = pf.read_row_group(group, columns=[image_column]).column(image_column).combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def _load_parquet(source: _Source, resolution: int, count: int | None, seed: int, start: int,
                  image_column: str) -> np.ndarray:
    import pyarrow as pa

    opened, offsets, total = [], [], 0
    try:
        for _, full, _ in source.files:
            pf, handle = _open_parquet(source, full, image_column)
            opened.append((full, pf, handle))
            offsets.append(total)
            total += pf.metadata.num_rows
        if total == 0:
            raise DataError(f"{source.uri}: no images found (the parquet data has no rows)")
        chosen = _select(total, count, seed, start, source.uri)
        out = np.empty((len(chosen), resolution, resolution, 3), np.uint8)
        # which (file, row group, row) each chosen image is in
        file_of = np.searchsorted(np.asarray(offsets), chosen, side="right") - 1
        for f in np.unique(file_of):
            full, pf, _ = opened[f]
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            group_starts = np.concatenate([[0], np.cumsum(sizes)])
            where = np.nonzero(file_of == f)[0]
            rows = chosen[where] - offsets[f]
            group_of = np.searchsorted(group_starts, rows, side="right") - 1
            for g in np.unique(group_of):
                try:
                    values = _row_group_bytes(pf, int(g), image_column)
                except (OSError, pa.ArrowException, ValueError) as exc:
                    raise DataError(f"{source.display(full)}: cannot read row group {g} of column "
                                    f"{image_column!r} ({exc.__class__.__name__}: {exc})") from exc
                for k in np.nonzero(group_of == g)[0]:
                    row = int(rows[k])
                    data = values[row - int(group_starts[g])]
                    out[where[k]] = _decode(data, f"{source.display(full)} row {row} (column "
                                                  f"{image_column!r})", resolution)
        return out
    finally:
        for _, _, handle in opened:
            try:
                handle.close()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# cache


def _cache_path(cache_dir, uri: str, resolution: int, count, seed: int, start: int,
                image_column: str, fingerprint) -> str | None:
    if cache_dir is None:
        return None
    key = json.dumps({"version": _CACHE_VERSION, "uri": uri, "resolution": resolution,
                      "count": count, "seed": seed, "start": start, "image_column": image_column,
                      "source": fingerprint}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", uri).strip("_")[-60:] or "data"
    return os.path.join(os.fspath(cache_dir), f"{slug}-{resolution}px-{digest}.npy")


def _read_cache(path: str | None, resolution: int) -> np.ndarray | None:
    if path is None or not os.path.exists(path):
        return None
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # unreadable: decode again and overwrite it
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (resolution, resolution, 3):
        return None
    return images


def _write_cache(path: str | None, images: np.ndarray) -> None:
    """Write atomically (a temporary file in the same folder, then ``os.replace``)."""
    if path is None:
        return
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, images, allow_pickle=False)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path}: {exc}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _check_int(name: str, value, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return value
