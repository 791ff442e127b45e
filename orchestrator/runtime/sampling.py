"""``orchestrate sample``: thousands of images from a model, spread over the cluster with Ray Data.

The job's indices ``0..n-1`` are cut into fixed *shards* of ``shard_size`` consecutive indices,
and each shard into fixed batches of ``batch_size``. A Ray Data actor pool (``--workers`` actors,
each holding ``--cpus-per-worker`` CPUs and ``--gpus-per-worker`` of a GPU, fractions allowed)
loads the model once per actor and draws one shard per call (``trainers.generate``: image ``i``
from its own generator seeded by ``(seed, i)``); the driver receives each finished shard as PNG
bytes and writes it. Since a batch is always the same set of indices, the images are the same
bytes whatever the number of workers and whichever worker drew them.

Destinations (local or ``s3://``, any fsspec URL):

* a folder: ``000000.png`` ... and ``manifest.json``;
* a ``.parquet`` file: columns ``index``, ``seed``, ``image`` (PNG bytes, what the tool's own data
  loader reads back); shards are staged in ``<DEST>.shards/`` and joined into the file at the
  end, with the manifest in the file's metadata.

The manifest records the model's digest, the options, seed, n, batch and shard size, and the
shards written; a shard is recorded only after all its files are in place. Running the same
command again skips the recorded shards (a killed job resumes), and a destination that holds
another job's images is refused instead of being mixed with this one's.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.data.artifacts import ArtifactRef
from orchestrator.core.config import InputError
from orchestrator.data.storage import filesystem, is_remote, join
from trainers.generate import SampleOptions

MANIFEST = "manifest.json"
PARQUET_KEY = b"orchestrate.sample"
FORMAT = "orchestrate-sample-v1"


class SampleJob(BaseModel):
    """What decides the images (besides the worker count, which does not)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_digest: str
    options: SampleOptions
    seed: int = 0
    n: int = Field(..., ge=1)
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(256, ge=1)

    def shards(self) -> list[tuple[int, int]]:
        """[start, stop) of every shard; boundaries are multiples of ``shard_size``."""
        return [(s, min(s + self.shard_size, self.n)) for s in range(0, self.n, self.shard_size)]

    def identity(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.model_dump(mode="json")}


@dataclass
class Destination:
    """Where a job's images go (see the module docstring)."""

    uri: str

    @property
    def parquet(self) -> bool:
        return self.uri.rstrip("/").endswith((".parquet", ".parq"))

    @property
    def folder(self) -> str:
        """The folder that holds the images (PNG) or the staged shards (Parquet)."""
        return self.uri.rstrip("/") + ".shards" if self.parquet else self.uri.rstrip("/")

    def fs(self):
        return filesystem(self.folder)

    def read_manifest(self) -> dict[str, Any] | None:
        fs, root = self.fs()
        path = join(root, MANIFEST)
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                return json.loads(f.read())
        if self.parquet:
            done = self._finished_parquet()
            if done is not None:
                return done
        return None

    def _finished_parquet(self) -> dict[str, Any] | None:
        import pyarrow.parquet as pq

        fs, path = filesystem(self.uri)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        if PARQUET_KEY not in meta:
            raise InputError(f"--out {self.uri}: an existing Parquet file that `orchestrate sample` did not write; "
                             "choose another destination")
        return {**json.loads(meta[PARQUET_KEY]), "complete": True}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        fs, root = self.fs()
        fs.makedirs(root, exist_ok=True)
        _atomic_write(fs, join(root, MANIFEST), json.dumps(manifest, indent=1).encode())

    def check_empty_or_ours(self) -> None:
        """A folder destination that already holds files but no manifest is someone else's."""
        if self.parquet:
            return
        fs, root = self.fs()
        if fs.exists(root) and not fs.isdir(root):
            raise InputError(f"--out {self.uri}: a file; expected a folder (PNGs) or a .parquet path")
        if fs.exists(root) and fs.ls(root, detail=False) and not fs.exists(join(root, MANIFEST)):
            raise InputError(f"--out {self.uri}: a folder that holds other files; choose an empty or new folder")

    def write_shard(self, start: int, stop: int, seeds: np.ndarray, pngs: list[bytes]) -> None:
        fs, root = self.fs()
        fs.makedirs(root, exist_ok=True)
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"index": np.arange(start, stop, dtype=np.int64), "seed": seeds.astype(np.int64),
                              "image": pa.array(pngs, type=pa.binary())})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            _atomic_write(fs, join(root, f"shard-{start:09d}-{stop:09d}.parquet"), buf.getvalue())
        else:
            for i, data in zip(range(start, stop), pngs):
                _atomic_write(fs, join(root, f"{i:06d}.png"), data)

    def finish(self, manifest: dict[str, Any]) -> None:
        """Parquet: join the shards (in index order) into the destination file, manifest in its
        metadata, then remove the staging folder. A folder needs nothing more."""
        if not self.parquet:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, root = self.fs()
        tables = []
        for start, stop in sorted(tuple(s) for s in manifest["shards"]):
            with fs.open(join(root, f"shard-{start:09d}-{stop:09d}.parquet"), "rb") as f:
                tables.append(pq.read_table(f))
        table = pa.concat_tables(tables)
        ident = {k: v for k, v in manifest.items() if k not in ("shards", "complete")}
        table = table.replace_schema_metadata({PARQUET_KEY: json.dumps(ident).encode()})
        out_fs, out_path = filesystem(self.uri)
        parent = out_path.rsplit("/", 1)[0]
        if parent:
            out_fs.makedirs(parent, exist_ok=True)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        _atomic_write(out_fs, out_path, buf.getvalue())
        fs.rm(root, recursive=True)


def _atomic_write(fs, path: str, data: bytes) -> None:
    """A whole file or nothing: local files are written beside and renamed; an object store's PUT
    is atomic already."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{time.monotonic_ns()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 [H,W,3] image as PNG (PIL's encoder is deterministic: same pixels, same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class ShardSampler:
    """A Ray Data actor: loads the model once (fetched from the run storage into its node's
    cache), then draws whole shards. Its calls get ``{"start": [...], "stop": [...]}`` rows."""

    ARGS: dict[str, Any] = {}

    @classmethod
    def bound(cls, **args: Any) -> type["ShardSampler"]:
        """A subclass holding the constructor's arguments: Ray pickles it with them, so no
        constructor argument goes through the object store (an actor restarted after a fault
        would otherwise depend on those objects still being alive)."""
        return type("ShardSampler", (cls,), {"ARGS": args})

    def __init__(self) -> None:
        self._setup(**self.ARGS)

    def _setup(self, model: dict[str, Any], job: dict[str, Any], threads: float | None) -> None:
        import torch

        from orchestrator.data.artifacts import fetch
        from trainers.generate import open_model

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.job = SampleJob.model_validate(job)
        self.model = open_model(fetch(ArtifactRef.model_validate(model)), device)
        self.options = self.model.check(self.job.options)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One output row per image: its index, its shard and its PNG bytes."""
        out: dict[str, list] = {"index": [], "start": [], "stop": [], "png": []}
        for start, stop in zip(rows["start"].tolist(), rows["stop"].tolist()):
            for b in range(start, stop, self.job.batch_size):
                idx = range(b, min(b + self.job.batch_size, stop))
                batch = self.model.generate(idx, self.job.seed, self.options)
                out["png"].extend(png_bytes(img) for img in batch.permute(0, 2, 3, 1).numpy())
                out["index"].extend(idx)
                out["start"].extend([start] * len(idx))
                out["stop"].extend([stop] * len(idx))
        return {"index": np.array(out["index"], dtype=np.int64), "start": np.array(out["start"], dtype=np.int64),
                "stop": np.array(out["stop"], dtype=np.int64), "png": np.array(out["png"], dtype=object)}


@dataclass
class SampleResult:
    dest: str
    n: int
    written: int  # images written by this invocation (the rest were there already)
    seconds: float
    job: SampleJob
    model: str

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")


def plan(job: SampleJob, dest: Destination) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """The destination's manifest (new or found) and the shards still to draw; ``InputError`` when
    the destination holds another job's images."""
    dest.check_empty_or_ours()
    found = dest.read_manifest()
    ident = job.identity()
    if found is not None:
        theirs = {k: v for k, v in found.items() if k not in ("shards", "complete", "model")}
        if theirs != ident:
            diff = sorted(k for k in set(theirs) | set(ident) if theirs.get(k) != ident.get(k))
            raise InputError(f"--out {dest.uri} holds images of another sampling job (it differs in "
                             f"{', '.join(diff)}); use another destination, or the same model and options")
        if found.get("complete"):
            return found, []
        done = {tuple(s) for s in found.get("shards", [])}
        return found, [s for s in job.shards() if s not in done]
    return {**ident, "shards": []}, job.shards()


def run_sampling(job: SampleJob, model_ref: ArtifactRef, dest: Destination, *, model_name: str,
                 workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 on_shard: Callable[[int, int], None] | None = None) -> SampleResult:
    """Draw the job's missing shards on a Ray Data actor pool and write them (Ray is up)."""
    import ray.data

    manifest, todo = plan(job, dest)
    manifest["model"] = model_name
    t0 = time.perf_counter()
    written = 0
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver prints its own (images/s, ETA)
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        _quiet_ray_data_logs()
        rows = [{"start": a, "stop": b} for a, b in todo]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ShardSampler.bound(model=model_ref.model_dump(), job=job.model_dump(mode="json"),
                               threads=cpus_per_worker if not gpus_per_worker else None),
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None)
        for batch in _shards(ds):
            start, stop, pngs = batch
            dest.write_shard(start, stop, np.full(stop - start, job.seed), pngs)
            manifest["shards"].append([start, stop])
            dest.write_manifest(manifest)  # only now is the shard recorded
            written += stop - start
            if on_shard is not None:
                on_shard(start, stop)
    if not manifest.get("complete"):
        manifest["complete"] = True
        dest.write_manifest(manifest)
        dest.finish(manifest)
    return SampleResult(dest.uri, job.n, written, time.perf_counter() - t0, job, model_name)


def _quiet_ray_data_logs() -> None:
    """Ray Data logs each execution's start and end at INFO and a WARNING that its progress bars
    are off (we turned them off: the driver prints one line per shard); its log files keep them."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _shards(ds) -> Iterator[tuple[int, int, list[bytes]]]:
    """Whole shards, in the order they complete, from the per-image rows of the actor pool."""
    pending: dict[tuple[int, int], dict[int, bytes]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, a, b, png in zip(batch["index"].tolist(), batch["start"].tolist(), batch["stop"].tolist(),
                                batch["png"]):
            got = pending.setdefault((a, b), {})
            got[i] = bytes(png)
            if len(got) == b - a:
                del pending[(a, b)]
                yield a, b, [got[k] for k in range(a, b)]


def check_destination(uri: str) -> Destination:
    """``--out``: a folder or a ``.parquet`` path, local or remote; checked before Ray starts."""
    from orchestrator.data.storage import check_writable

    if not uri:
        raise InputError("--out: expected a folder or a .parquet file (local or s3://...)")
    dest = Destination(uri if is_remote(uri) else _absolute(uri))
    dest.check_empty_or_ours()
    parent = dest.folder.rsplit("/", 1)[0] or "/"
    try:
        check_writable(parent if not is_remote(uri) else dest.folder, "--out")
    except PermissionError as exc:
        raise InputError(str(exc)) from None
    return dest


def _absolute(path: str) -> str:
    from pathlib import Path

    return str(Path(path).expanduser().resolve())


def load_images(dest: str) -> np.ndarray:
    """All images of a finished job's destination, uint8 [N,H,W,3] in index order."""
    from PIL import Image

    d = Destination(dest)
    if d.parquet:
        import pyarrow.parquet as pq

        fs, path = filesystem(d.uri)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f).sort_by("index")
        data = table.column("image").to_pylist()
    else:
        fs, root = d.fs()
        names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".png"))
        data = []
        for p in names:
            with fs.open(p, "rb") as f:
                data.append(f.read())
    return np.stack([np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in data])
