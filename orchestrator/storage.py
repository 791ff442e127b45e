"""Where things are kept: run storage (a local folder or ``s3://...``) and the local caches.

Ray Train/Tune get a storage path plus, for ``s3://`` URIs, nothing else: pyarrow reads the
endpoint and credentials from the standard AWS environment (``AWS_ENDPOINT_URL`` ...).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORAGE = "runs"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_uri(uri: str | None) -> str:
    """A storage URI Ray accepts: remote URIs as given, local paths made absolute."""
    uri = uri or os.environ.get("ORCHESTRATE_STORAGE") or DEFAULT_STORAGE
    if is_remote(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return str(Path(uri).expanduser().resolve())


def cache_home() -> Path:
    """Local cache of decoded data and pretrained source models (``ORCHESTRATE_CACHE`` overrides)."""
    root = os.environ.get("ORCHESTRATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchestrate")
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_cache_dir() -> Path:
    path = cache_home() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sources_dir() -> Path:
    path = cache_home() / "sources"
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_run_dir(storage: str, name: str) -> None:
    """Delete one run's folder under the storage (``--restart``)."""
    if is_remote(storage):
        import fsspec

        fs, root = fsspec.core.url_to_fs(storage)
        target = f"{root}/{name}"
        if fs.exists(target):
            fs.rm(target, recursive=True)
    else:
        import shutil

        shutil.rmtree(Path(storage) / name, ignore_errors=True)
