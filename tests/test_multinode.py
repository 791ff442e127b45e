"""A two-node Ray cluster on this machine (a head and a second raylet, one CPU each), moto's S3
server and `mlflow server` on loopback: `orchestrate sweep --address ... --storage s3://...` runs
trials on both nodes, with checkpoints and MLflow artifacts in the bucket. Everything the test
starts, it stops (by process group and by its private Ray temp dir, never `ray stop`, which would
stop other Ray instances on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.tiny import TINY_RUN, write_tiny_task

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready within {timeout} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def cluster(tmp_path, s3_server, s3_bucket):
    """Head + worker raylets and an MLflow server with artifacts in the bucket."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: Unix socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint_url"], "ORCHESTRATE_CACHE": str(tmp_path / "cache"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(args, env=env, cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    gcs = free_port()
    mlflow_port = free_port()
    try:
        start([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
               f"--temp-dir={temp_dir}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
               "--min-worker-port=21000", "--max-worker-port=21999", *node_ports()])
        address = f"127.0.0.1:{gcs}"
        wait_for(lambda: _port_open(gcs), 60, "Ray head")
        start([str(BIN / "ray"), "start", "--block", f"--address={address}", "--num-cpus=1",
               "--min-worker-port=22000", "--max-worker-port=22999", *node_ports()])
        start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", f"s3://{s3_bucket}/mlflow", "--host", "127.0.0.1",
               "--port", str(mlflow_port), "--workers", "1"])
        wait_for(lambda: http_ok(f"http://127.0.0.1:{mlflow_port}/health"), 90, "mlflow server")
        wait_for(lambda: _alive_nodes(address, env) == 2, 90, "two Ray nodes")
        yield {"address": address, "tracking_uri": f"http://127.0.0.1:{mlflow_port}", "env": env,
               "bucket": s3_bucket}
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # anything still running from this cluster's temp dir (workers Ray forked)
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive_nodes(address: str, env: dict) -> int:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def test_sweep_on_two_nodes_with_s3_storage_and_mlflow_server(cluster, tmp_path):
    import s3fs

    task = write_tiny_task(tmp_path)
    args = [sys.executable, "-m", "orchestrator.cli", "sweep", "ddpm_finetune", "--task", str(task),
            "--num-samples", "2", "--max-concurrent", "2", "--metric", "loss", "--scheduler", "fifo",
            "--name", "mn", "--address", cluster["address"], "--storage", f"s3://{cluster['bucket']}/runs",
            "--tracking-uri", cluster["tracking_uri"]]
    for s in TINY_RUN:
        args += ["--set", s]
    out = subprocess.run(args, env=cluster["env"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    uri = cluster["tracking_uri"]
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("ddpm_finetune")
    parent = tracking.find_run(uri, exp.experiment_id, "mn")
    assert parent.info.status == "FINISHED"
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert len({k.data.params["node_id"] for k in kids}) == 2  # one trial on each node

    fs = s3fs.S3FileSystem()
    checkpoints = fs.glob(f"{cluster['bucket']}/runs/mn/trials/*/checkpoint_*/state.pt")
    assert len({p.split("/")[4] for p in checkpoints}) == 2, checkpoints
    for k in kids:  # artifacts went through the server into the bucket
        assert k.info.artifact_uri.startswith("mlflow-artifacts:")
        stored = fs.glob(f"{cluster['bucket']}/mlflow/**/{k.info.run_id}/artifacts/samples/final.png")
        assert stored, k.info.run_id
