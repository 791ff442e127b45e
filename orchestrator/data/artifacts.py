"""Content-keyed artifacts: how files cross nodes.

There is no shared filesystem between the nodes of a cluster. Everything that one process makes
and another needs — a source model, the domain encoder, the decoded few-shot images and reference
set, reference statistics, a lifelong task's exported generator — is *published* to the run
storage (``--storage``: a local folder, or ``s3://...`` on a cluster) under its content digest,
and *fetched* by whoever needs it into a node-local cache keyed by the same digest:

    <storage>/artifacts/<digest>/MANIFEST.json          written last: the commit marker
    <storage>/artifacts/<digest>/payload/<name>[/...]    the file, or the folder's files

An :class:`ArtifactRef` (uri, digest, name) is what jobs carry instead of paths. Publishing the
same bytes twice is a no-op; a fetched copy is verified file by file against the manifest
(sha256) before it is moved into place, atomically, so a half-written cache entry is never used.

Named pointers (``<storage>/named/<key>.json``) map a stable name, e.g. a pretraining spec's key,
to the ref of its latest content, so that a later run on another machine finds a source model
that an earlier run pretrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from orchestrator.data.storage import cache_home, filesystem, join

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact is missing from the storage or its bytes do not match its digest."""


class ArtifactRef(BaseModel):
    """Where an artifact lives in a run storage and what its content is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str  # <storage>/artifacts/<digest>
    digest: str  # sha256 of the manifest (names and sha256 of every file)
    name: str  # the file's or folder's name
    is_file: bool

    def short(self) -> str:
        return f"{self.name}@{self.digest[:12]}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_of(path: str | os.PathLike) -> dict[str, Any]:
    """{"name", "is_file", "files": {relative path: sha256}} of a file or folder."""
    path = Path(path)
    if path.is_file():
        files = {path.name: _sha256_file(path)}
    elif path.is_dir():
        files = {p.relative_to(path).as_posix(): _sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    else:
        raise ArtifactError(f"cannot publish {path}: no such file or folder")
    return {"name": path.name, "is_file": path.is_file(), "files": files}


def digest_of_manifest(manifest: dict[str, Any]) -> str:
    blob = json.dumps({k: manifest[k] for k in ("name", "is_file", "files")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def artifact_uri(storage: str, digest: str) -> str:
    return join(storage, "artifacts", digest[:40])


def publish(path: str | os.PathLike, storage: str) -> ArtifactRef:
    """Upload a file or folder to ``storage`` under its content digest (a no-op when that content
    is there already) and return its ref. The local copy is also entered into this node's cache,
    so fetching it here costs nothing."""
    path = Path(path)
    manifest = manifest_of(path)
    digest = digest_of_manifest(manifest)
    ref = ArtifactRef(uri=artifact_uri(storage, digest), digest=digest, name=manifest["name"],
                      is_file=manifest["is_file"])
    fs, root = filesystem(ref.uri)
    if not fs.exists(join(root, MANIFEST)):
        for rel in manifest["files"]:
            src = path if manifest["is_file"] else path / rel
            dest = join(root, "payload", manifest["name"]) if manifest["is_file"] else \
                join(root, "payload", manifest["name"], rel)
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(src), dest)
        with fs.open(join(root, MANIFEST), "wb") as f:  # last: the artifact is complete
            f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    _enter_cache(path, ref)
    return ref


def _cache_root(ref: ArtifactRef) -> Path:
    return cache_home() / "artifacts" / ref.digest[:40]


def _enter_cache(path: Path, ref: ArtifactRef) -> None:
    root = _cache_root(ref)
    if (root / MANIFEST).is_file():
        return
    tmp = root.with_name(root.name + f".tmp-{uuid.uuid4().hex[:8]}")
    target = tmp / ref.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        shutil.copy2(path, target)
    else:
        shutil.copytree(path, target)
    (tmp / MANIFEST).write_text(json.dumps(manifest_of(target)))
    _commit(tmp, root)


def _commit(tmp: Path, root: Path) -> None:
    try:
        os.replace(tmp, root)
    except OSError:  # another process committed the same content first
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(ref: ArtifactRef) -> Path:
    """The artifact's local path on this node: from the node cache, else downloaded from the
    storage, verified against its manifest, and entered into the cache."""
    root = _cache_root(ref)
    local = root / ref.name
    if (root / MANIFEST).is_file():
        return local
    fs, remote = filesystem(ref.uri)
    try:
        with fs.open(join(remote, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise ArtifactError(f"artifact {ref.short()} is not in the storage at {ref.uri} (incomplete upload, "
                            "or a run storage that this node cannot reach)") from None
    if digest_of_manifest(manifest) != ref.digest:
        raise ArtifactError(f"artifact at {ref.uri}: its manifest does not match digest {ref.digest[:12]}")
    tmp = root.with_name(root.name + f".tmp-{uuid.uuid4().hex[:8]}")
    try:
        for rel, sha in manifest["files"].items():
            src = join(remote, "payload", ref.name) if ref.is_file else join(remote, "payload", ref.name, rel)
            dest = tmp / ref.name if ref.is_file else tmp / ref.name / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(dest))
            if _sha256_file(dest) != sha:
                raise ArtifactError(f"artifact {ref.short()}: {rel} does not match its sha256 after download")
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        _commit(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def publish_array(array: np.ndarray, storage: str, name: str = "images.npy") -> ArtifactRef:
    """A numpy array (e.g. decoded uint8 images) as an artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        return publish(path, storage)


@lru_cache(maxsize=32)
def load_array(ref: ArtifactRef) -> np.ndarray:
    """The array of a ``publish_array`` ref (cached per process: trials that run one after the
    other in the same process read it once). Read-only: copy before changing it."""
    arr = np.load(fetch(ref), allow_pickle=False)
    arr.setflags(write=False)
    return arr


def publish_bytes(data: bytes, storage: str, name: str) -> ArtifactRef:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        return publish(path, storage)


def point(storage: str, key: str, ref: ArtifactRef) -> None:
    """Name ``ref`` as ``key`` in the storage (overwrites an older pointer)."""
    fs, path = filesystem(join(storage, "named", f"{key}.json"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(ref.model_dump_json().encode())


def lookup(storage: str, key: str) -> ArtifactRef | None:
    """The ref named ``key`` in the storage, if any."""
    fs, root = filesystem(join(storage, "named", f"{key}.json"))
    try:
        with fs.open(root, "rb") as f:
            return ArtifactRef.model_validate_json(f.read())
    except FileNotFoundError:
        return None
