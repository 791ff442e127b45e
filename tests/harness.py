"""A Ray cluster on one machine on which a shared-filesystem assumption cannot pass.

Each node (a head with ``CPU: 0`` as in cluster.yaml, two workers with one CPU each) lives in its
own mount namespace (``unshare --mount``, root only): private tmpfs mounts over ``/tmp`` (Ray's
session folders, ``HOME``, the node cache) and over the working copy's ``runs/`` and
``mlartifacts/``. A file one node writes there, no other node sees — as on a real cluster, where
only the code (synced by ``ray up``), S3 and the MLflow server are shared. S3 is moto's server and
MLflow an ``mlflow server`` with S3 artifacts, both on loopback. Drivers run inside the head's
namespace (``nsenter``), as ``orchestrate`` does on a cluster's head.

Credentials are made here: a Ray auth token (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``) for
every node and driver, the fake AWS keys of the S3 fixture. Every process the harness starts
writes its output to ``<base>/logs/``; a wait that times out prints the tails. ``stop()`` kills
every process of every node namespace and the servers, whatever state they are in.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports the harness hands to Ray and MLflow come from below the kernel's ephemeral range (and
# above the nodes' worker-port ranges, 21000-23999). A port found free by binding port 0 and
# released at once can be taken, before the process it was meant for binds it, by any process
# that binds port 0 meanwhile (a starting Ray node binds several); CI once lost a worker node
# that way: its runtime-env agent's port was answered by another node's HTTP server (404), the
# agent could not bind, and the raylet exited. Nothing binds below the ephemeral range unasked.
_PORT_FLOOR = 24000
_handed_out: set[int] = set()


def free_port() -> int:
    """A port no other process is listening on, outside the ephemeral range, never handed out
    twice in this process."""
    high = max(_PORT_FLOOR + 100, _ephemeral_low())
    start = _PORT_FLOOR + secrets.randbelow(high - _PORT_FLOOR)
    for i in range(high - _PORT_FLOOR):
        port = _PORT_FLOOR + (start - _PORT_FLOOR + i) % (high - _PORT_FLOOR)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all interfaces: Ray binds the node's address, MLflow loopback
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_FLOOR}-{high - 1}")


def can_isolate() -> str | None:
    """None when mount namespaces work here, else why not."""
    if os.geteuid() != 0:
        return "needs root for unshare --mount"
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        return "needs unshare and nsenter (util-linux)"
    for what, path in (("the checkout", Path(__file__).resolve().parents[1]), ("the venv", Path(sys.prefix))):
        if path.is_relative_to("/tmp"):  # each node mounts its own empty /tmp over it
            return f"{what} is under /tmp ({path}), which every isolated node replaces with its own: clone elsewhere"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare --mount failed: {probe.stderr.decode().strip()}"


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


class Node:
    def __init__(self, name: str, holder: subprocess.Popen):
        self.name, self.holder = name, holder
        self.ns = None
        # ready once its mounts are in place: the holder's script ends by exec'ing `sleep`
        # (a process entering the namespace earlier could start from the host's /tmp)
        deadline = time.time() + 10
        while time.time() < deadline and holder.poll() is None:
            ns = _mount_ns(holder.pid)
            if ns and ns != _mount_ns(os.getpid()) and _cmdline(holder.pid).startswith(b"sleep"):
                self.ns = ns
                break
            time.sleep(0.05)
        if self.ns is None:
            raise RuntimeError(f"node {name}: its mount namespace did not come up (see its holder log)")

    def pids(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != self.holder.pid and _mount_ns(int(d)) == self.ns:
                out.append(int(d))
        return out

    def kill(self) -> None:
        """SIGKILL every process of the node: a reclaimed spot instance."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.holder.kill()
        except ProcessLookupError:
            pass
        self.holder.wait(timeout=10)


class Cluster:
    def __init__(self, s3_endpoint: str, bucket: str):
        self.base = Path(tempfile.mkdtemp(prefix="orch-cluster-", dir="/var/tmp"))  # outside the private /tmp
        self.work = self.base / "work"
        self.logs = self.base / "logs"
        for d in (self.work / "runs", self.work / "mlartifacts", self.logs):
            d.mkdir(parents=True)
        self.bucket = bucket
        self.token = secrets.token_hex(32)
        self.nodes: dict[str, Node] = {}
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ORCHESTRATE_", "MLFLOW_"))}
        self.env.update({
            "HOME": "/tmp/home", "ORCHESTRATE_CACHE": "/tmp/cache", "PYTHONUNBUFFERED": "1",
            # a node's `python` is the environment's (a Ray Job's entrypoint is `python -m ...`)
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",  # as cluster.yaml runs the server
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ENDPOINT_URL": s3_endpoint,
        })
        self.storage = f"s3://{bucket}/runs"
        self.gcs_port = free_port()
        self.address = f"{self._node_ip()}:{self.gcs_port}"
        self.mlflow_port = free_port()
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"  # the Jobs API (orchestrate submit)

    @staticmethod
    def _node_ip() -> str:
        """The address Ray binds to (it ignores 127.0.0.1): the interface of the default route,
        found as Ray finds it, by connecting a UDP socket (no packet is sent)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("8.8.8.8", 80))
                return s.getsockname()[0]
            except OSError:
                return "127.0.0.1"

    # -- processes ------------------------------------------------------------------------
    def _log(self, name: str):
        return open(self.logs / f"{name}.log", "ab")

    def start(self, name: str, args: list[str], node: str | None = None, **kw) -> subprocess.Popen:
        cwd = kw.pop("cwd", self.work)
        # entering a mount namespace resets the working directory to / unless told (--wd)
        cmd = ["nsenter", "--target", str(self.nodes[node].holder.pid), "--mount", f"--wd={cwd}", "--", *args] \
            if node else args
        p = subprocess.Popen(cmd, env=kw.pop("env", self.env), cwd=cwd, start_new_session=True,
                             stdout=self._log(name), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def add_node(self, name: str) -> Node:
        mounts = [f"mount -t tmpfs tmpfs {d}" for d in ("/tmp", self.work / "runs", self.work / "mlartifacts")]
        # The code is what every node shares (``ray up`` syncs it): a checkout or venv under /tmp
        # (a CI clone) stays visible through a bind mount of the original /tmp, taken before the
        # node's private /tmp covers it.
        stash = self.base / "tmp-stash" / name
        stash.mkdir(parents=True)
        under_tmp = {p for p in (REPO, Path(sys.prefix)) if Path("/tmp") in p.parents}
        code = sorted(p for p in under_tmp if not any(q in p.parents for q in under_tmp))
        keep = [f"mkdir -p {p} && mount --bind {stash / p.relative_to('/tmp')} {p}" for p in code]
        script = " && ".join([f"mount --bind /tmp {stash}", *mounts, *keep] if code else mounts)
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c",
             f"{script} && mkdir -p /tmp/home /tmp/cache && exec sleep infinity"],
            start_new_session=True, stdout=self._log(f"{name}-holder"), stderr=subprocess.STDOUT)
        self.nodes[name] = Node(name, holder)
        return self.nodes[name]

    def _ports(self) -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def start_worker(self, name: str, worker_ports: str) -> None:
        self.add_node(name)
        lo, hi = worker_ports.split("-")
        self.start(f"{name}-ray", [str(BIN / "ray"), "start", "--block", f"--address={self.address}", "--num-cpus=1",
                                   f"--min-worker-port={lo}", f"--max-worker-port={hi}", *self._ports()], node=name)

    def up(self) -> "Cluster":
        self.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                              f"sqlite:///{self.base / 'mlflow.db'}", "--artifacts-destination",
                              f"s3://{self.bucket}/mlflow", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                              "--workers", "1"], cwd=self.base)
        self.add_node("head")
        self.start("head-ray", [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
                                "--num-cpus=0", "--include-dashboard=true", "--dashboard-port", str(self.dashboard_port),
                                f"--ray-client-server-port={free_port()}", "--min-worker-port=21000",
                                "--max-worker-port=21999", *self._ports()], node="head")
        self.wait(lambda: self._port_open(self.gcs_port), 90, "the Ray head")
        self.start_worker("w1", "22000-22999")
        self.start_worker("w2", "23000-23999")
        self.wait(lambda: self._http_ok(f"{self.tracking_uri}/health"), 120, "mlflow server")
        self.wait(lambda: self.alive_nodes() == 3, 120, "three Ray nodes")
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    # -- waiting, with the logs when something does not come -------------------------------
    def tails(self, lines: int = 25) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def wait(self, check, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready within {timeout:.0f} s\n{self.tails()}")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((Cluster._node_ip(), port)) == 0

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alive_nodes(self) -> int:
        code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        out = self.run_in("head", [sys.executable, "-c", code], timeout=60)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    # -- drivers on the head -----------------------------------------------------------------
    def run_in(self, node: str, args: list[str], timeout: float = 900, env: dict | None = None):
        cmd = ["nsenter", "--target", str(self.nodes[node].holder.pid), "--mount", f"--wd={self.work}", "--", *args]
        return subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=self.work, capture_output=True,
                              text=True, timeout=timeout)

    def orchestrate(self, *args: str, timeout: float = 900, env: dict | None = None):
        """``orchestrate ARGS --address ... --storage s3://... --tracking-uri http://...`` on the head."""
        full = [sys.executable, "-m", "orchestrator.cli", *args]
        if args and args[0] in ("train", "sweep", "pretrain", "lifelong"):
            full += ["--address", self.address, "--storage", self.storage, "--tracking-uri", self.tracking_uri]
        return self.run_in("head", full, timeout=timeout, env=env)

    def orchestrate_bg(self, name: str, *args: str) -> subprocess.Popen:
        full = [sys.executable, "-m", "orchestrator.cli", *args, "--address", self.address,
                "--storage", self.storage, "--tracking-uri", self.tracking_uri]
        return self.start(name, full, node="head")

    def read_head_file(self, path: str) -> bool:
        return self.run_in("head", ["test", "-e", path]).returncode == 0

    def processes(self, node: str, needle: str) -> list[int]:
        """pids of the node's processes whose command line contains ``needle``."""
        out = []
        for pid in self.nodes[node].pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                out.append(pid)
        return out
