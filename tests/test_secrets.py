"""No secret is ever recorded: fake AWS keys planted in the environment and in a task's
storage_options (its shots live in S3) are found nowhere in the MLflow store, its artifacts, the
run storage or the console, after a train run and a sweep."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.tiny import TINY_RUN

pytestmark = pytest.mark.slow

PLANTED = {
    "env_key": "AKIAPLANTEDENVKEY123",
    "env_secret": "planted-env-secret-4f1c9e",
    "opt_key": "AKIAPLANTEDOPTKEY456",
    "opt_secret": "planted-option-secret-7a2b0d",
}


def test_planted_credentials_are_recorded_nowhere(ray_local, workspace, s3_server, s3_bucket):
    import s3fs

    from trainers.data import render

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_server["endpoint_url"]})
    for i, img in enumerate(render("sketch", 6, 16)):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="PNG")
        fs.pipe(f"{s3_bucket}/shots/{i}.png", buf.getvalue())
    task = {"name": "secret-task", "resolution": 16,
            "source": {"pretrain": {"data": "synthetic:source", "count": 64, "preset": "tiny", "steps": 20,
                                    "batch_size": 8, "encoder_steps": 20}},
            "target": {"data": f"s3://{s3_bucket}/shots", "shots": 4,
                       "storage_options": {"key": PLANTED["opt_key"], "secret": PLANTED["opt_secret"],
                                           "client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}}}}
    (workspace / "task.yaml").write_text(yaml.safe_dump(task))
    env = {**os.environ, "RAY_ADDRESS": ray_local, "AWS_ACCESS_KEY_ID": PLANTED["env_key"],
           "AWS_SECRET_ACCESS_KEY": PLANTED["env_secret"]}
    sets = [x for s in TINY_RUN for x in ("--set", s)]
    common = ["--task", "task.yaml", "--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs", *sets]
    outputs = []
    for args in (["train", "ddpm_finetune", "--name", "secret-run"],
                 ["sweep", "ddpm_finetune", "--num-samples", "2", "--metric", "loss", "--name", "secret-sweep"],
                 ["check-task", "task.yaml"]):
        extra = common if args[0] != "check-task" else []
        res = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, *extra], cwd=workspace, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        outputs.append(res.stdout + res.stderr)

    haystacks = {"console": "\n".join(outputs).encode()}
    for root in ("mlflow.db", "mlartifacts", "runs"):
        path = workspace / root
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, root
        for f in files:
            haystacks[str(f.relative_to(workspace))] = f.read_bytes()
    for name, secret in PLANTED.items():
        found = [where for where, data in haystacks.items() if secret.encode() in data]
        assert not found, f"{name} recorded in {found}"
    # what was redacted is still visible as redacted: the reader sees which options were set
    assert b"<redacted>" in haystacks["mlflow.db"]
