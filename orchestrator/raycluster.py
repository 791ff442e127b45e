"""Connecting to Ray (or starting a local instance), checking a request against what the cluster
can ever hold, and cleaning up after a CLI that was killed.

* ``init_ray``: ``--address`` / ``RAY_ADDRESS`` connects to a running cluster (its token must be
  in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, see the README); without
  one a local instance is started (Ray enables token authentication for it and creates the token
  if the machine has none).
* ``check_resources``: a request that no node (alive, or of a type the autoscaler may start) can
  ever hold is refused in one line before anything starts, instead of a worker group that waits
  forever: GPUs per worker, CPUs per worker, workers per run, fractional GPUs shared by ranks.
* A local instance is watched by a small process of its own session (``watchdog``): when the CLI
  dies without shutting Ray down (``kill -9``), it stops the Ray processes the CLI started.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import InputError

# the file `ray up` puts on the head node: the autoscaler's node types
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml").expanduser()


class ResourceError(InputError):
    """A request that the cluster can never satisfy."""


@dataclass
class NodeShape:
    name: str
    cpus: float
    gpus: float
    count: float  # how many such nodes exist (or may exist, for autoscaler node types)

    def describe(self) -> str:
        n = "∞" if math.isinf(self.count) else f"{self.count:g}"
        return f"{n}× {self.name} ({self.cpus:g} CPU, {self.gpus:g} GPU)"


def local_shape() -> list[NodeShape]:
    """This machine, before Ray starts: what a local instance would have."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # no torch CUDA runtime: no GPU
        gpus = 0
    return [NodeShape("this machine", float(os.cpu_count() or 1), float(gpus), 1)]


def cluster_shapes() -> list[NodeShape]:
    """Alive nodes of the connected cluster, plus the autoscaler's node types when this is the head
    of a `ray up` cluster (``~/ray_bootstrap_config.yaml``) or ``ORCHESTRATE_CLUSTER_CONFIG`` names
    a cluster config."""
    import ray

    shapes: dict[tuple[float, float], NodeShape] = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n.get("Resources", {})
        key = (float(r.get("CPU", 0.0)), float(r.get("GPU", 0.0)))
        if key in shapes:
            shapes[key].count += 1
        else:
            shapes[key] = NodeShape("node", key[0], key[1], 1)
    return list(shapes.values()) + autoscaler_shapes()


def autoscaler_shapes(path: str | os.PathLike | None = None) -> list[NodeShape]:
    path = Path(path or os.environ.get("ORCHESTRATE_CLUSTER_CONFIG") or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return []
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return []
    out = []
    for name, t in (cfg.get("available_node_types") or {}).items():
        res = t.get("resources") or {}
        if int(t.get("max_workers", 0) or 0) <= 0 and name != cfg.get("head_node_type"):
            continue
        # "resources: {}" means Ray detects them on the instance: unknown here, so anything goes
        cpus = float(res["CPU"]) if "CPU" in res else math.inf
        gpus = float(res["GPU"]) if "GPU" in res else (math.inf if not res else 0.0)
        out.append(NodeShape(f"node type {name}", cpus, gpus, float(t.get("max_workers", 1) or 1)))
    return out


def check_resources(num_workers: int, cpus: float, gpus: float, shapes: list[NodeShape], *,
                    what: str = "the run") -> None:
    """Raise ``ResourceError`` (one line) when ``num_workers`` workers of ``cpus`` CPU and ``gpus``
    GPU each can never be placed on ``shapes``."""
    asked = f"{what} asks for {num_workers} worker(s) × {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    have = "; ".join(s.describe() for s in shapes) or "no alive node"
    if num_workers > 1 and 0 < gpus < 1:
        raise ResourceError(f"{asked}: a fraction of a GPU per worker puts two data-parallel ranks on one "
                            "GPU, which NCCL refuses; use whole GPUs with several workers, or one worker")
    fits = 0.0
    for s in shapes:
        per_node = math.inf
        if cpus > 0:
            per_node = min(per_node, math.floor(s.cpus / cpus + 1e-9) if not math.isinf(s.cpus) else math.inf)
        if gpus > 0:
            per_node = min(per_node, math.floor(s.gpus / gpus + 1e-9) if not math.isinf(s.gpus) else math.inf)
        if per_node >= 1:
            fits += per_node * s.count
    if fits < num_workers:
        raise ResourceError(f"{asked}, but the cluster can hold {0 if fits == 0 else int(fits)} such worker(s): {have}")


def default_cpus_per_worker(workers: int, use_gpu: bool, node_cpus: float | None) -> float:
    """CPUs per worker when the user did not say: with GPUs the CPU only feeds the device (1);
    on the CPU a worker computes with as many torch threads as it holds CPUs, so the cores of the
    largest node (``node_cpus``; None when unknown, e.g. a remote cluster not yet asked) are
    shared among the workers, at least 1 each."""
    if use_gpu or not node_cpus:
        return 1.0
    return float(max(1, int(node_cpus // max(1, workers))))


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local instance sized to this
    machine. Returns True when this call started Ray (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers' output stays in Ray's log files: the driver prints progress itself
    # (orchestrator.progress). ORCHESTRATE_DEBUG=1 (or --debug) forwards it as Ray does by default.
    kwargs: dict[str, Any] = {"logging_level": "WARNING",
                              "log_to_driver": bool(os.environ.get("ORCHESTRATE_DEBUG"))}
    if address:
        ray.init(address=address, **kwargs)
        return True
    _quiet_auth_warning()
    ctx = ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    _start_watchdog(ctx.address_info.get("session_dir"))
    return True


def _quiet_auth_warning() -> None:
    """A new local instance enables token authentication (creating ~/.ray/auth_token when missing)
    and logs a WARNING saying so at every start; for a local instance that is noise. The choice
    cannot be made quietly by setting RAY_AUTH_MODE here: Ray reads it when it is imported. The
    logger is named after Ray's module (not a public name): if it moves, the warning shows again,
    nothing breaks."""
    import logging

    class _NoAuthNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Token authentication is enabled" not in str(record.msg)

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _NoAuthNotice) for f in logger.filters):
        logger.addFilter(_NoAuthNotice())


def shutdown(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()


def _start_watchdog(session_dir: str | None) -> None:
    """A process of its own session that outlives a ``kill -9`` of this one and then stops the
    Ray processes this process started (they are its descendants)."""
    if os.environ.get("ORCHESTRATE_NO_WATCHDOG"):
        return
    subprocess.Popen([sys.executable, "-m", "orchestrator.raycluster", str(os.getpid()), session_dir or ""],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)


def _watch(parent_pid: int, poll_s: float = 1.0) -> None:
    import psutil

    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    me = os.getpid()
    known: dict[int, float] = {}
    while True:
        try:
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                break
            for child in parent.children(recursive=True):
                if child.pid != me:
                    try:
                        known[child.pid] = child.create_time()
                    except psutil.Error:
                        pass
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    procs = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:  # not a reused pid
                procs.append(p)
                procs.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":  # the watchdog process
    _watch(int(sys.argv[1]))
