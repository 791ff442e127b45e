"""Connecting to Ray (or starting a local instance), checking a request against what the cluster
can ever hold, and cleaning up after a CLI that was killed.

* ``init_ray``: ``--address`` / ``RAY_ADDRESS`` connects to a running cluster (its token must be
  in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, see the README); without
  one a local instance is started (Ray enables token authentication for it and creates the token
  if the machine has none).
* ``check_resources``: a request that no node (alive, or of a type the autoscaler may start) can
  ever hold is refused in one line before anything starts, instead of a worker group that waits
  forever: GPUs per worker, CPUs per worker, workers per run, fractional GPUs shared by ranks.
  ``cluster_shapes`` asks the running cluster for its autoscaler's node types, groups at zero
  nodes included (see ``autoscaler_node_types`` for where they are read and why); on a cluster
  whose node types cannot be read, a request the live nodes cannot hold gets a one-line warning
  and Ray decides (it places the work when a node that fits joins), instead of a refusal.
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
from typing import Any, Callable

import yaml

from orchestrator.core.config import InputError

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
    # True for the stand-in of node types that could not be read (``name`` says why): a request
    # that only they might hold is let through with a warning instead of refused
    unknown: bool = False

    def describe(self) -> str:
        if self.unknown:
            return f"autoscaler node types unknown: {self.name}"
        n = "∞" if math.isinf(self.count) else f"{self.count:g}"
        return f"{n}× {self.name} ({self.cpus:g} CPU, {self.gpus:g} GPU)"


# Whether this process started the Ray instance it is connected to (``init_ray`` without an
# address): such an instance has no autoscaler, so its live nodes are all there will ever be.
_STARTED_LOCAL = {"on": False}


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
    """Alive nodes of the connected cluster, plus the node types its autoscaler may start (see
    ``autoscaler_node_types``), or a stand-in saying that they could not be read."""
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
    types, source = autoscaler_node_types()
    if types is None:
        unknown = NodeShape(source, math.inf, math.inf, math.inf, unknown=True)
        return list(shapes.values()) + [unknown]
    return list(shapes.values()) + types


def autoscaler_node_types() -> tuple[list[NodeShape] | None, str]:
    """The node types the connected cluster's autoscaler may start, groups at zero nodes included,
    and where they were read: ``([], why)`` when the cluster cannot grow, ``(None, why)`` when they
    could not be read.

    Ray 2.60 has no public API for this: ``ray status`` and the dashboard's cluster status report
    live and pending nodes and demands, not the node types a cluster could add (checked against
    the v1 and v2 autoscalers). So the sources below are tried in order; each is guarded, and one
    that fails only hands over to the next:

    1. ``ORCHESTRATE_CLUSTER_CONFIG``: a cluster config file named by the user.
    2. The GCS's cluster config (``ray._private.state.state.get_cluster_config()``, private): the
       slot in which an autoscaler publishes its node groups (resources, min/max counts) and that
       Ray Data's own autoscaling reads. Ray's OSS autoscalers of 2.60 leave it empty; later ones
       fill it, and then it is the one place that holds for every kind of cluster.
    3. KubeRay: a Ray pod has ``RAY_CLUSTER_NAME`` / ``RAY_CLUSTER_NAMESPACE`` (set by the KubeRay
       operator) and the head's service account may read its RayCluster (the autoscaler sidecar
       reads it the same way); Ray's own conversion of that resource into autoscaler node types
       (``ray.autoscaler._private.kuberay``, private: it is what the KubeRay autoscaler runs) gives
       every worker group with its CPUs and GPUs from the pod limits, at zero replicas too.
    4. The head's autoscaler process: on the head (where a Ray Jobs driver runs), the ``monitor``
       process of this cluster (matched by its ``--gcs-address``) names the config it scales by
       in ``--autoscaling-config`` (``ray up`` passes ``~/ray_bootstrap_config.yaml``; a
       ``ray start --head --autoscaling-config=FILE`` cluster, its FILE); a monitor without one
       is a cluster that does not autoscale.
    5. ``~/ray_bootstrap_config.yaml``, the file ``ray up`` leaves on the head.
    6. A local instance this process started has no autoscaler.
    """
    env_file = os.environ.get("ORCHESTRATE_CLUSTER_CONFIG")
    if env_file:
        return _from_config_file(Path(env_file).expanduser(), "ORCHESTRATE_CLUSTER_CONFIG")
    readers: list[Callable[[], tuple[list[NodeShape] | None, str] | None]] = [
        _from_gcs_cluster_config, _from_kuberay, _from_monitor_process]
    for reader in readers:
        try:
            found = reader()
        except Exception:  # a private API that moved, a refused request: the next source
            found = None
        if found is not None:
            return found
    if BOOTSTRAP_CONFIG.is_file():
        return _from_config_file(BOOTSTRAP_CONFIG, str(BOOTSTRAP_CONFIG))
    if _STARTED_LOCAL["on"]:
        return [], "a local Ray instance (no autoscaler)"
    return None, ("no autoscaler config is readable from this machine; run the command on the head, "
                  "e.g. with `orchestrate submit`")


def _from_config_file(path: Path, what: str) -> tuple[list[NodeShape] | None, str]:
    if not path.is_file():
        return None, f"{what}: {path} does not exist"
    try:
        return autoscaler_shapes(path), f"{what} ({path})"
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        return None, f"{what}: {path} is not a cluster config ({type(exc).__name__})"


def _from_gcs_cluster_config() -> tuple[list[NodeShape], str] | None:
    import ray._private.state

    cfg = ray._private.state.state.get_cluster_config()
    if cfg is None or not cfg.node_group_configs:
        return None
    out = []
    for group in cfg.node_group_configs:
        if group.max_count == 0:
            continue
        res = dict(group.resources)
        count = math.inf if group.max_count < 0 else float(group.max_count)
        cpus = float(res["CPU"]) if "CPU" in res else (math.inf if not res else 0.0)
        gpus = float(res["GPU"]) if "GPU" in res else (math.inf if not res else 0.0)
        out.append(NodeShape(f"node type {group.name}", cpus, gpus, count))
    return out, "the cluster config the autoscaler reported to the GCS"


def _from_kuberay() -> tuple[list[NodeShape] | None, str] | None:
    name = os.environ.get("RAY_CLUSTER_NAME")
    if not name:
        return None
    namespace = os.environ.get("RAY_CLUSTER_NAMESPACE", "default")
    from ray.autoscaler._private.kuberay import node_provider

    try:
        ray_cr = node_provider.KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{name}")
    except Exception as exc:  # no service account token, RBAC, the API server
        return None, (f"the RayCluster {namespace}/{name} could not be read from the Kubernetes API "
                      f"({type(exc).__name__}); its head service account needs `get` on rayclusters")
    return kuberay_shapes(ray_cr), f"the RayCluster {namespace}/{name}"


def kuberay_shapes(ray_cr: dict[str, Any]) -> list[NodeShape]:
    """The node types of a KubeRay ``RayCluster`` resource as Ray's KubeRay autoscaler sees them."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _shapes_from_config(_derive_autoscaling_config_from_ray_cr(ray_cr))


def _from_monitor_process() -> tuple[list[NodeShape] | None, str] | None:
    import psutil
    import ray

    gcs = ray.get_runtime_context().gcs_address
    if not gcs:
        return None
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(part.endswith(os.path.join("autoscaler", "_private", "monitor.py"))
                   or part.endswith(os.path.join("autoscaler", "v2", "monitor.py")) for part in cmd):
            continue
        args = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        if args.get("gcs-address") != gcs:
            continue
        config = args.get("autoscaling-config")
        if not config:
            return [], "this cluster's autoscaler has no config (the cluster does not grow)"
        return _from_config_file(Path(config).expanduser(), "the head's autoscaler config")
    return None


def autoscaler_shapes(path: str | os.PathLike | None = None) -> list[NodeShape]:
    """The node types of a cluster config file (cluster.yaml's format; default
    ``ORCHESTRATE_CLUSTER_CONFIG`` or ``~/ray_bootstrap_config.yaml``); [] when there is none."""
    path = Path(path or os.environ.get("ORCHESTRATE_CLUSTER_CONFIG") or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return []
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return []
    return _shapes_from_config(cfg)


def _shapes_from_config(cfg: dict[str, Any]) -> list[NodeShape]:
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
    GPU each can never be placed on ``shapes``. When only node types that could not be read might
    hold them (a shape marked ``unknown``), print a one-line warning and let Ray decide."""
    asked = f"{what} asks for {num_workers} worker(s) × {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    known = [s for s in shapes if not s.unknown]
    unknown = [s for s in shapes if s.unknown]
    have = "; ".join(s.describe() for s in known) or "no alive node"
    if num_workers > 1 and 0 < gpus < 1:
        raise ResourceError(f"{asked}: a fraction of a GPU per worker puts two data-parallel ranks on one "
                            "GPU, which NCCL refuses; use whole GPUs with several workers, or one worker")
    fits = 0.0
    for s in known:
        per_node = math.inf
        if cpus > 0:
            per_node = min(per_node, math.floor(s.cpus / cpus + 1e-9) if not math.isinf(s.cpus) else math.inf)
        if gpus > 0:
            per_node = min(per_node, math.floor(s.gpus / gpus + 1e-9) if not math.isinf(s.gpus) else math.inf)
        if per_node >= 1:
            fits += per_node * s.count
    if fits < num_workers:
        if unknown:
            print(f"warning: {asked}, more than the live nodes hold ({have}), and this cluster's autoscaler "
                  f"node types cannot be read ({unknown[0].name}): not checked; Ray starts the work when nodes "
                  "that fit join, or it waits", file=sys.stderr, flush=True)
            return
        raise ResourceError(f"{asked}, but the cluster can hold {0 if fits == 0 else int(fits)} such worker(s): {have}")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local instance sized to this
    machine. Returns True when this call started Ray (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers' output stays in Ray's log files: the driver prints progress itself
    # (orchestrator.records.progress). ORCHESTRATE_DEBUG=1 (or --debug) forwards it as Ray does by default.
    kwargs: dict[str, Any] = {"logging_level": "WARNING",
                              "log_to_driver": bool(os.environ.get("ORCHESTRATE_DEBUG"))}
    if address:
        ray.init(address=address, **kwargs)
        return True
    _quiet_auth_warning()
    ctx = ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    _STARTED_LOCAL["on"] = True
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
        _STARTED_LOCAL["on"] = False


def _start_watchdog(session_dir: str | None) -> None:
    """A process of its own session that outlives a ``kill -9`` of this one and then stops the
    Ray processes this process started (they are its descendants)."""
    if os.environ.get("ORCHESTRATE_NO_WATCHDOG"):
        return
    subprocess.Popen([sys.executable, "-m", "orchestrator.runtime.raycluster", str(os.getpid()), session_dir or ""],
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
