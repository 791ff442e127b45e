"""One Ray head node of its own for a test, on a machine that others use too.

``ray stop`` stops every Ray process of the machine, other people's included, so a test cannot
use it. The head here lives in its own mount namespace (tests/harness.py's ``Node``: a private
``/tmp`` holds its session folders and ``HOME``), and stopping it kills exactly the processes of
that namespace: the head's, the autoscaler's fake nodes', a job's driver. Ray token
authentication is on, with a token made here. Drivers that must reach the raylet run inside the
namespace (``run``/``popen``); the Jobs API is plain HTTP and answers from outside.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import BIN, REPO, Cluster, Node, free_port


class IsolatedHead:
    def __init__(self, name: str, env: dict[str, str] | None = None):
        self.base = Path(tempfile.mkdtemp(prefix=f"orch-{name}-", dir="/var/tmp"))  # outside the private /tmp
        self.logs = self.base / "logs"
        self.logs.mkdir()
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ORCHESTRATE_", "MLFLOW_"))}
        self.env.update({"HOME": "/tmp/home", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token",
                         "RAY_AUTH_TOKEN": self.token, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                         **(env or {})})
        self.ip = Cluster._node_ip()
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"{self.ip}:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.node: Node | None = None
        self.procs: list[subprocess.Popen] = []

    def start(self, *ray_args: str, env: dict[str, str] | None = None, timeout: float = 120) -> "IsolatedHead":
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c",
             "mount -t tmpfs tmpfs /tmp && mkdir -p /tmp/home && exec sleep infinity"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.node = Node("head", holder)
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 f"--ray-client-server-port={free_port()}", "--min-worker-port=20000", "--max-worker-port=20999"]
        self.popen("head-ray", [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
                                "--include-dashboard=true", f"--dashboard-port={self.dashboard_port}", *ports,
                                *ray_args], env=env)
        deadline = time.time() + timeout
        while not self._dashboard_up():
            if time.time() > deadline or self.procs[0].poll() is not None:
                raise TimeoutError(f"the Ray head did not come up within {timeout:.0f} s\n{self.tails()}")
            time.sleep(1)
        return self

    def _dashboard_up(self) -> bool:
        """The dashboard (and its Jobs API) answers; with token auth on, an unauthenticated request
        is answered 401, which counts."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code in (401, 403)
        except OSError:
            return False

    def _nsenter(self, args: list[str], cwd: Path | None) -> list[str]:
        assert self.node is not None, "start() first"
        return ["nsenter", "--target", str(self.node.holder.pid), "--mount", f"--wd={cwd or REPO}", "--", *args]

    def popen(self, name: str, args: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        p = subprocess.Popen(self._nsenter(args, cwd), env={**self.env, **(env or {})}, cwd=cwd or REPO,
                             start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=open(self.logs / f"{name}.log", "ab"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def run(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self._nsenter(args, cwd), env={**self.env, **(env or {})}, cwd=cwd or REPO,
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code], **kw)

    def tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {f.name} ---\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
                         for f in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        """Kill every process of the head's namespace (and the holder), then remove its folders."""
        if self.node is not None:
            self.node.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
