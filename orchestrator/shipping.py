"""Getting what the driver has on its disk to workers on other nodes, through Ray's object store.

On one machine the workers read the driver's paths directly; on a cluster (`ray up`) they run on
other nodes, where a source model cached on the head or a task's local image folder does not
exist. The driver therefore puts such files (and local data, already decoded) in the object
store and the job carries the references; a worker uses the driver's path when it exists on its
node and otherwise unpacks the object into its own cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.storage import cache_home


def put_path(path: str | os.PathLike) -> Any:
    """A file or folder as an object: ``{"name", "files": {relative path: bytes}}``."""
    import ray

    path = Path(path)
    if path.is_file():
        files = {path.name: path.read_bytes()}
    else:
        files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return ray.put({"name": path.name, "is_file": path.is_file(), "files": files})


def local_path(path: str | None, ref: Any | None) -> str | None:
    """The driver's ``path`` if this node has it, else the shipped copy unpacked here."""
    if path is None or ref is None or Path(path).exists():
        return path
    import ray

    blob = ray.get(ref)
    digest = hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(blob["files"].items()))).hexdigest()[:16]
    root = cache_home() / "shipped" / digest
    target = root / blob["name"]
    if not target.exists():
        tmp = root / (blob["name"] + f".tmp{os.getpid()}")
        for rel, data in blob["files"].items():
            dest = tmp / rel if not blob["is_file"] else tmp
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        os.replace(tmp, target)
    return str(target)


def is_local_data(uri: str) -> bool:
    """Data that only the driver's machine can read (not synthetic:..., not s3://...)."""
    return ":" not in uri.split("/")[0] or uri.startswith("file:")


def put_images(images: np.ndarray) -> Any:
    import ray

    return ray.put(images)


def ship(job: dict[str, Any]) -> dict[str, Any]:
    """The job with object references for what only the driver's disk has (call after ray.init)."""
    from trainers.data import load_images

    job = dict(job)
    for key in ("source", "domain_encoder", "lifelong_previous"):
        if job.get(key) and Path(job[key]).exists():
            job[f"{key}_ref"] = put_path(job[key])

    def ship_images(d):
        if d is None or not is_local_data(d["uri"]):
            return d
        images = load_images(d["uri"], job["resolution"], count=d.get("count"), seed=d.get("seed", 0),
                             image_column=d.get("image_column", "image"), cache_dir=job.get("cache_dir"),
                             storage_options=d.get("storage_options"))
        return {**d, "ref": put_images(images)}

    for key in ("data", "reference"):
        job[key] = ship_images(job.get(key))
    if job.get("lifelong_eval"):
        job["lifelong_eval"] = [{**e, "data": ship_images(e["data"]), "reference": ship_images(e.get("reference"))}
                                for e in job["lifelong_eval"]]
    return job


def reuse_refs(job: dict[str, Any], shipped: dict[str, Any]) -> dict[str, Any]:
    """Attach a shipped job's references to another job that reads the same files and data (a
    sweep's trials share the base job's source, encoder and images)."""
    job = dict(job)
    for key in ("source", "domain_encoder"):
        if job.get(key) == shipped.get(key) and f"{key}_ref" in shipped:
            job[f"{key}_ref"] = shipped[f"{key}_ref"]
    for key in ("data", "reference"):
        mine, theirs = job.get(key), shipped.get(key)
        if mine is not None and theirs is not None and "ref" in theirs and \
                mine == {k: v for k, v in theirs.items() if k != "ref"}:
            job[key] = theirs
    return job
