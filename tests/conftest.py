"""Shared test fixtures.

``s3_server`` runs a real S3 protocol server (moto's standalone server) on loopback for the whole
test session, and ``s3_bucket`` gives each test a fresh, empty bucket on it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# variables that would point the AWS clients somewhere else while the fixture is active
_S3_ENV_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # any HTTP answer means the server is up
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {url} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a subprocess) for the whole session.

    While it runs, ``AWS_ENDPOINT_URL`` points at it and the credentials are ``testing``; the
    previous environment is restored and the server terminated at the end, even when tests fail.
    Yields ``{"endpoint_url", "access_key", "secret_key", "region"}``.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in (*_S3_ENV, *_S3_ENV_CLEARED, "AWS_ENDPOINT_URL")}
    try:
        _wait_until_up(endpoint + "/", proc)
        for key in _S3_ENV_CLEARED:
            os.environ.pop(key, None)
        os.environ.update(_S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield {"endpoint_url": endpoint, "access_key": "testing", "secret_key": "testing",
               "region": "us-east-1"}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the session's S3 server (created with s3fs); yields its name."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": s3_server["endpoint_url"]})
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield name
    try:
        fs.rm(name, recursive=True)
    except Exception:  # best effort: the server goes away at the end of the session anyway
        pass


@pytest.fixture(scope="session", autouse=True)
def offline_weights():
    """Tests never reach the internet: metric weights are not fetched (tests of the fetching
    serve their own files on loopback and lift this)."""
    saved = os.environ.get("ORCHESTRATE_OFFLINE")
    os.environ["ORCHESTRATE_OFFLINE"] = "1"
    yield
    if saved is None:
        os.environ.pop("ORCHESTRATE_OFFLINE", None)
    else:
        os.environ["ORCHESTRATE_OFFLINE"] = saved


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, as on this machine) for all end-to-end tests; yields its
    GCS address so that subprocesses can join it. Shut down at the end of the session."""
    import ray

    import orchestrator.runtime.launch  # noqa: F401  (sets Ray env defaults before the raylet starts)

    ray.init(num_cpus=2, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _random_source(task) -> None:
    """``task``'s source as an untrained network of its pretrainer's architecture (the preset, the
    resolution), put in the node cache under its pretraining key, where ``orchestrate pretrain``
    would leave the trained one. The tests that pretrain are marked ``cold_cache``."""
    import torch

    from orchestrator.runs.sources import cached_source_path

    spec, folder = task.source.pretrain, cached_source_path(task)
    torch.manual_seed(spec.seed)
    if task.source.family == "ddpm":
        from trainers.diffusion.backbone import build_unet, default_scheduler, save_source

        save_source(build_unet(spec.preset, task.resolution), default_scheduler(), folder)
    else:
        from trainers.gan.pretrain import GANPretrain, GANPretrainConfig
        from trainers.gan.source import save_gan_source

        g = GANPretrain(GANPretrainConfig(preset=spec.preset), task.resolution, "cpu")
        save_gan_source(folder, g.g, g.g_ema, g.d)


def _random_encoder(task) -> None:
    """The task's domain encoder, untrained (the architecture that SimCLR would train), where
    ``orchestrator.runs.sources.domain_encoder_for`` looks for it."""
    import numpy as np

    from orchestrator.runs.sources import encoder_path
    from trainers.metrics import train_domain_encoder

    noise = np.random.default_rng(0).integers(0, 256, (2, task.resolution, task.resolution, 3), dtype=np.uint8)
    train_domain_encoder(noise, steps=0, resolution=task.resolution, seed=task.source.pretrain.seed).save(
        encoder_path(task))


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    """The tiny DDPM and StyleGAN2 sources and the domain encoder that the end-to-end tests' task
    files describe, made once per session in memory with random weights (no pretraining: the fast
    lane stays fast, and no test needs a source that learned its domain), so that a test
    pretrains only when it tests pretraining (``@pytest.mark.cold_cache``)."""
    from orchestrator.core.config import TaskConfig
    from tests.tiny import GAN_SOURCE, TINY_TASK

    root = tmp_path_factory.mktemp("tiny-sources")
    saved = os.environ.get("ORCHESTRATE_CACHE")
    os.environ["ORCHESTRATE_CACHE"] = str(root / "cache")
    try:
        for source in (TINY_TASK["source"], GAN_SOURCE):
            task = TaskConfig.model_validate({**TINY_TASK, "source": source})
            _random_source(task)
            _random_encoder(task)
    finally:
        if saved is None:
            os.environ.pop("ORCHESTRATE_CACHE", None)
        else:
            os.environ["ORCHESTRATE_CACHE"] = saved
    return root / "cache" / "sources"


@pytest.fixture
def workspace(request, tmp_path, monkeypatch):
    """A fresh working directory with its own caches, MLflow store and run storage. Its cache
    starts with the session's tiny sources and encoder, unless the test is marked cold_cache."""
    import shutil

    cache = tmp_path / "cache"
    if request.node.get_closest_marker("cold_cache") is None:
        shutil.copytree(request.getfixturevalue("tiny_sources"), cache / "sources")
    monkeypatch.setenv("ORCHESTRATE_CACHE", str(cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path
