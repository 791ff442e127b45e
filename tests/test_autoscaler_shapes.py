"""The resource check asks the running cluster for its autoscaler's node types.

Ray's fake multi-node autoscaler stands in for a cloud (``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=FILE`` with a ``fake_multinode`` provider: it starts "nodes" as local raylets
with the resources their type declares): a head with no CPU, a GPU node type at zero nodes. A
driver on the head (as a Ray Jobs driver runs) is let through with one GPU per trial while no
GPU node exists, and refused, in one line and before anything starts, for a request no node
type can hold. The GCS's cluster config, when an autoscaler reports one, is read first. A cluster
whose node types cannot be read gets a warning, not a refusal. Every Ray process is started in
a namespace of its own and killed with it (tests/raynode.py), never by ``ray stop``.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import yaml

from orchestrator.runtime.raycluster import NodeShape, ResourceError, check_resources
from tests.harness import can_isolate
from tests.raynode import IsolatedHead


def test_unreadable_node_types_warn_in_one_line_and_let_ray_decide(capsys):
    live = [NodeShape("node", 0, 0, 1)]
    unknown = NodeShape("no autoscaler config is readable from this machine", math.inf, math.inf, math.inf,
                        unknown=True)
    check_resources(1, 1.0, 1.0, live + [unknown], what="each trial")
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("warning: each trial asks for 1 worker(s) × 1 CPU + 1 GPU")
    assert "cannot be read (no autoscaler config is readable from this machine)" in err
    with pytest.raises(ResourceError):  # what is known to be impossible stays refused
        check_resources(2, 1.0, 0.5, live + [unknown])
    with pytest.raises(ResourceError, match="1× node"):  # without the stand-in: refused as before
        check_resources(1, 1.0, 1.0, live)


FAKE_CONFIG = {
    "cluster_name": "fake-gpu", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 4, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    # the legacy keys the launcher's schema still asks for
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}

# A driver on the head: connect as `orchestrate` does, read the shapes, check three requests.
DRIVER = """
import json, sys
import ray
from orchestrator.runtime.raycluster import ResourceError, autoscaler_node_types, check_resources, cluster_shapes, init_ray
init_ray(sys.argv[1])
out = {"gpu_nodes": sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))}
types, source = autoscaler_node_types()
out["source"] = source
out["types"] = [s.describe() for s in types or []]
shapes = cluster_shapes()
for key, (workers, cpus, gpus) in {"one_gpu": (1, 1, 1), "two_gpus": (1, 1, 2), "four_workers": (4, 1, 1)}.items():
    try:
        check_resources(workers, cpus, gpus, shapes, what="each trial")
        out[key] = "accepted"
    except ResourceError as exc:
        out[key] = "refused: " + str(exc)
print("RESULT " + json.dumps(out))
"""


def _result(res) -> dict:
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def fake_cluster():
    why = can_isolate()
    if why:
        pytest.skip(why)
    head = IsolatedHead("fake-autoscaler", env={"RAY_FAKE_CLUSTER": "1"})
    try:
        cfg = json.loads(json.dumps(FAKE_CONFIG))
        cfg["provider"]["gcs_address"] = head.address  # the fake provider joins its nodes here
        config = head.base / "fake-cluster.yaml"
        config.write_text(yaml.safe_dump(cfg))
        head.start("--num-cpus=0", f"--autoscaling-config={config}")
        yield head
    finally:
        head.stop()


@pytest.mark.slow
def test_a_gpu_request_is_accepted_while_the_gpu_group_has_no_node(fake_cluster):
    out = _result(fake_cluster.run([sys.executable, "-c", DRIVER, fake_cluster.address], timeout=180))
    assert out["gpu_nodes"] == 0, out  # nothing scaled up: the answer came from the node types
    assert out["source"].startswith("the head's autoscaler config"), out
    assert "2× node type gpu_worker (4 CPU, 1 GPU)" in out["types"], out
    assert out["one_gpu"] == "accepted", out
    assert out["four_workers"].startswith("refused") and "can hold 2 such worker(s)" in out["four_workers"], out
    assert out["two_gpus"].startswith("refused: each trial asks for 1 worker(s) × 1 CPU + 2 GPU, but the cluster "
                                      "can hold 0 such worker(s)"), out
    assert "node type gpu_worker (4 CPU, 1 GPU)" in out["two_gpus"]


@pytest.mark.slow
def test_the_cli_refuses_a_request_no_node_type_can_hold_in_one_line(fake_cluster):
    tmp_path = fake_cluster.base
    res = fake_cluster.run([sys.executable, "-m", "orchestrator.cli", "sweep", "ddpm_finetune",
                            "--gpus-per-trial", "2", "--num-samples", "1", "--address", fake_cluster.address,
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "runs")],
                           env={"ORCHESTRATE_CACHE": str(tmp_path / "cache")}, timeout=300)
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert err.startswith("error: each trial asks for 1 worker(s) × 1 CPU + 2 GPU") and "gpu_worker" in err, err
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_the_gcs_cluster_config_is_read_first(fake_cluster):
    """An autoscaler that reports its node groups to the GCS (Ray's slot for them, which Ray
    Data's autoscaling reads) is believed before any file: here a group the config file does not
    have, reported as such an autoscaler would."""
    report = """
import sys, ray
from ray.core.generated import autoscaler_pb2
ray.init(address=sys.argv[1], logging_level="ERROR")
cfg = autoscaler_pb2.ClusterConfig()
g = cfg.node_group_configs.add()
g.name = "a100x8"
g.resources["CPU"] = 96
g.resources["GPU"] = 8
g.min_count = 0
g.max_count = 4
ray._private.worker.global_worker.gcs_client.report_cluster_config(cfg.SerializeToString())
"""
    res = fake_cluster.run([sys.executable, "-c", report, fake_cluster.address], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = _result(fake_cluster.run([sys.executable, "-c", DRIVER, fake_cluster.address], timeout=180))
    assert out["source"] == "the cluster config the autoscaler reported to the GCS", out
    assert out["types"] == ["4× node type a100x8 (96 CPU, 8 GPU)"], out
    assert out["two_gpus"] == "accepted", out
