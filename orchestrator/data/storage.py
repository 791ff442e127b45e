"""Where things are kept: run storage (a local folder or ``s3://...``) and the node-local caches.

The run storage is the one place every node of a cluster can read and write (Ray Train and Tune
keep their checkpoints there; ``orchestrator.data.artifacts`` publishes source models, encoders, data
and exports there). On a cluster it must be ``s3://...`` (or another fsspec URL that every node
reaches); a local folder works on one machine. For ``s3://`` URIs the endpoint and credentials
come from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or the
instance role: nothing secret is passed on the command line or recorded.

The cache (``ORCHESTRATE_CACHE``, default ``~/.cache/orchestrate``) is per node: decoded data,
fetched artifacts. Nothing in it is ever read by another node.
"""

from __future__ import annotations

import os
import uuid
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


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URLs alike."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def filesystem(uri: str):
    """(fsspec filesystem, path inside it) of a storage URI or local path."""
    import fsspec

    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        # Other processes and nodes write here too: never answer from a listing cached earlier.
        fs.invalidate_cache()
        return fs, path
    return fsspec.filesystem("file"), str(Path(uri).expanduser().resolve())


def check_writable(uri: str, what: str) -> None:
    """Raise ``PermissionError`` naming ``what`` and ``uri`` when nothing can be written there."""
    fs, root = filesystem(uri)
    probe = join(root, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # PermissionError, botocore errors, read-only file systems ...
        raise PermissionError(f"{what} {uri} is not writable ({type(exc).__name__}: {exc})") from None


def cache_home() -> Path:
    """This node's cache of decoded data and fetched artifacts (``ORCHESTRATE_CACHE`` overrides)."""
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


# S3 keys hold at most 1,024 bytes; below a run's folder the tool and Ray write keys such as
# trials/<Tune trial folder>/checkpoint_000300/rng_rank0.pt: this much is kept free for them.
S3_KEY_MAX = 1024
KEY_RESERVE = 384


def run_dir(storage: str, name: str) -> str:
    """The folder of run (or sweep) ``name`` in the run storage ``storage``, the only way a storage
    path is built from a name: the name is checked (``orchestrator.core.names``: one safe path
    component) and the folder verified to be a direct child of the storage root, so that no name
    reaches another run's files. Raises ``ConfigError`` (bad name) or ``InputError`` (a path that
    leaves the root, an S3 key too long for what a run writes below it)."""
    import posixpath

    from orchestrator.core.config import InputError
    from orchestrator.core.names import DERIVED_MAX, check_name

    check_name(name, "run name", DERIVED_MAX)
    root = storage_uri(storage)
    path = join(root, name)
    if is_remote(root):
        scheme, rest = root.split("://", 1)
        inside, parent = posixpath.normpath(rest + "/" + name), posixpath.normpath(rest)
        key = inside.split("/", 1)[1] if "/" in inside else ""
        if len((key + "/").encode()) + KEY_RESERVE > S3_KEY_MAX:
            raise InputError(f"--storage {root}: the run folder {path} leaves fewer than {KEY_RESERVE} of the "
                             f"{S3_KEY_MAX} bytes of an object key for what a run writes below it (use a "
                             "shorter storage prefix or run name)")
    else:
        inside, parent = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    if posixpath.dirname(inside.replace(os.sep, "/")) != parent.replace(os.sep, "/"):
        raise InputError(f"run name {name!r}: its folder {path} is not directly under the run storage {root}")
    return path


def remove_run_dir(storage: str, name: str) -> None:
    """Delete one run's folder under the storage (``--restart``); only ever a checked name's own
    folder (:func:`run_dir`)."""
    fs, root = filesystem(run_dir(storage, name))
    if fs.exists(root):
        fs.rm(root, recursive=True)
