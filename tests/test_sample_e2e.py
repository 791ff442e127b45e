"""`orchestrate sample` / `evaluate` end to end on tiny models: every method's export, 1 and 2
Ray Data workers, a killed job resumed, S3, outside images scored, bad input refused before Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.models import export_method
from tests.tiny import cli

METHODS = ["ddpm_finetune", "ddpm_pa", "dual_output", "self_guided", "gan_finetune", "dcl", "lfs_gan"]
DIFFUSION = {"ddpm_finetune", "ddpm_pa", "dual_output", "self_guided"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exports")
    try:
        return {m: export_method(m, root / m) for m in METHODS}
    finally:
        torch.set_num_threads(before)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_one_and_two_workers_write_the_same_bytes(ray_local, exports, tmp_path, method):
    from orchestrator import api

    opts = {"steps": 3} if method in DIFFUSION else {}
    kw = dict(options=opts, seed=3, batch_size=4, shard_size=4, cpus_per_worker=1, storage=str(tmp_path / "runs"))
    one = api.sample(str(exports[method]), 10, str(tmp_path / "one"), workers=1, **kw)
    two = api.sample(str(exports[method]), 10, str(tmp_path / "two"), workers=2, **kw)
    assert one.written == two.written == 10
    a, b = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert sorted(a) == [f"{i:06d}.png" for i in range(10)]
    assert a == b
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["complete"] and sorted(map(tuple, manifest["shards"])) == [(0, 4), (4, 8), (8, 10)]
    assert manifest["model_digest"] == one.job.model_digest


@pytest.mark.slow
def test_parquet_output_on_s3_reads_back_as_task_data(ray_local, exports, s3_bucket, tmp_path):
    from orchestrator import api
    from trainers.data import load_images

    out = f"s3://{s3_bucket}/samples/gan.parquet"
    res = api.sample(str(exports["gan_finetune"]), 9, out, batch_size=4, shard_size=4, cpus_per_worker=1,
                     storage=f"s3://{s3_bucket}/runs")
    assert res.written == 9
    images = load_images(out, 16)  # the tool's own loader reads the image column
    assert images.shape == (9, 16, 16, 3)
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with fs.open(out, "rb") as f:
        table = pq.read_table(f)
    assert table.column("index").to_pylist() == list(range(9))
    assert not fs.exists(f"s3://{s3_bucket}/samples/gan.parquet.shards")
    again = api.sample(str(exports["gan_finetune"]), 9, out, batch_size=4, shard_size=4, cpus_per_worker=1,
                       storage=f"s3://{s3_bucket}/runs")
    assert again.written == 0


@pytest.mark.slow
def test_a_killed_job_resumes_and_writes_every_index_once(exports, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sample", str(exports["ddpm_finetune"]), "--n", "48",
           "--out", str(out), "--steps", "6", "--batch-size", "4", "--shard-size", "4", "--workers", "1",
           "--cpus-per-worker", "1", "--storage", str(tmp_path / "runs"),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = dict(os.environ)
    env.pop("ORCHESTRATE_NO_WATCHDOG", None)  # the killed CLI's watchdog stops the Ray it started
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    done = json.loads(manifest.read_text())["shards"]
    assert 2 <= len(done) < 12 and not json.loads(manifest.read_text()).get("complete")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(after) == [f"{i:06d}.png" for i in range(48)]
    recorded = {f"{i:06d}.png" for a, b in done for i in range(a, b)}
    assert all(after[name] == first[name] for name in recorded)  # not written again
    assert not list(out.glob("*.tmp-*"))
    final = json.loads(manifest.read_text())
    assert final["complete"] and len(final["shards"]) == 12


def _write_pngs(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return folder


def test_evaluate_scores_real_images_near_the_anchor_and_noise_far(tmp_path, monkeypatch):
    """The built-in sketch task (32², the shipped encoder and classifier): its own reference
    images score like a fresh real draw of the domain; noise scores far from both, and the truth
    check calls the real images target and the noise not."""
    from orchestrator import api
    from orchestrator.core.config import load_task
    from orchestrator.runs.inputs import check_data
    from trainers.data import render

    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    task = load_task("synthetic:sketch")
    _, reference = check_data(task)
    rng = np.random.default_rng(0)
    folders = {"reference": _write_pngs(tmp_path / "reference", reference[:200]),
               "anchor": _write_pngs(tmp_path / "anchor", render("sketch", 200, 32, seed=77)),
               "noise": _write_pngs(tmp_path / "noise", rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8))}
    kw = dict(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", storage=str(tmp_path / "runs"))
    res = {k: api.evaluate(str(v), "synthetic:sketch", **kw) for k, v in folders.items()}
    fid = {k: r.metrics["fid_domain"] for k, r in res.items()}
    assert fid["reference"] <= fid["anchor"] * 1.5 + 1e-3
    assert fid["noise"] > 10 * fid["anchor"]
    assert res["reference"].metrics["target_rate_domain"] > 0.9 and res["noise"].metrics["target_rate_domain"] < 0.1
    # the task's own truth check (its reference against the shipped source's samples), as for a folder task
    truth = {k: r.metrics["target_rate"] for k, r in res.items()}
    assert truth["reference"] > 0.9 and truth["anchor"] > 0.8 and truth["noise"] < 0.1, truth
    assert res["noise"].metrics["truth_separation"] >= 0.8
    assert res["reference"].metrics["num_samples"] == 200
    again = api.evaluate(str(folders["noise"]), "synthetic:sketch", **kw)
    assert again.already_finished and again.run_id == res["noise"].run_id
    from orchestrator.records import tracking

    run = tracking.client(kw["tracking_uri"]).get_run(res["noise"].run_id)
    assert run.data.tags[tracking.TAG_KIND] == "evaluation" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_evaluate_a_model_samples_it_and_tags_its_run(ray_local, exports, tmp_path, monkeypatch):
    from orchestrator import api

    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    # a 16² export scored against a 16² synthetic task of its own (reference of 20 images)
    task = tmp_path / "t16.yaml"
    task.write_text("name: t16\nresolution: 16\nsource: {pretrain: {encoder_steps: 2, count: 64}}\n"
                    "target: {data: 'synthetic:sketch', shots: 4}\nreference: {data: 'synthetic:sketch', count: 20}\n")
    res = api.evaluate(str(exports["gan_finetune"]), str(task), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                       storage=str(tmp_path / "runs"), cpus_per_worker=1, batch_size=8)
    assert res.metrics["num_samples"] == 20  # the reference count by default
    assert np.isfinite(res.metrics["fid_domain"])


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model", "--n", "4", "--out", "x"], "MODEL /nonexistent/model: not a model folder"),
    (["{model}", "--n", "0", "--out", "x"], "--n 0: expected >= 1"),
    (["{model}", "--n", "4", "--out", "x", "--truncation", "0.5"], "not truncation"),
    (["{model}", "--n", "4", "--out", "x", "--steps", "0"], "--steps 0"),
    (["{model}", "--n", "4", "--out", "{file}"], "expected a folder"),
    (["{model}", "--n", "4", "--out", "x", "--workers", "3", "--cpus-per-worker", "8"], "can hold"),
])
def test_bad_input_fails_in_one_line_before_ray(exports, tmp_path, monkeypatch, args, message):
    import orchestrator.runtime.raycluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(orchestrator.runtime.raycluster, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    (tmp_path / "afile").write_text("x")
    args = [a.format(model=exports["ddpm_finetune"], file=tmp_path / "afile") for a in args]
    res = cli("sample", *args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
