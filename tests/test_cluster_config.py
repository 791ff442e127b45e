"""cluster.yaml: valid against Ray's own cluster-config schema, and it installs this project."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(config):
    # Ray's launcher runs exactly these two before `ray up` talks to AWS. Private API: pinned by
    # this test (ray 2.60), so an upgrade that moves it fails here first.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_head_runs_no_training_and_gpu_workers_autoscale_from_zero(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    workers = [v for k, v in config["available_node_types"].items() if k != config["head_node_type"]]
    assert workers and all(w["min_workers"] == 0 for w in workers)


def test_image_matches_our_ray_and_python(config):
    import sys

    import ray

    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}")
    assert image.endswith("-gpu")


def test_setup_installs_this_project_and_points_nodes_at_mlflow_and_s3(config):
    mounts = config["file_mounts"]
    target = next(k for k, v in mounts.items() if v == ".")
    setup = " ".join(config["setup_commands"])
    assert f"pip install -q --no-deps -e {target}" in setup  # on top of the lock (tests/test_node_env.py)
    assert "MLFLOW_TRACKING_URI=http://" in setup and "ORCHESTRATE_STORAGE=s3://" in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "--artifacts-destination s3://" in head and "sqlite:////" in head


def test_no_secrets_in_the_file():
    text = (REPO / "cluster.yaml").read_text()
    for needle in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_secret", "BEGIN RSA"):
        assert needle not in text


def test_every_node_gets_the_ray_auth_token_and_runs_in_token_mode(config):
    mounts = config["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])  # drivers on the head
