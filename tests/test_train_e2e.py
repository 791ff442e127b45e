"""End to end: `orchestrate train` under a real local Ray, recorded in MLflow on SQLite."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from orchestrator.records import tracking
from tests.tiny import GAN_SOURCE, cli, experiment_runs, tiny_args, write_tiny_task

pytestmark = pytest.mark.slow

TRUTH = ("--set", "run.truth_check=true")  # the tiny runs skip the truth check; this test checks it


@pytest.mark.cold_cache
def test_train_cli_records_run_and_second_invocation_is_a_no_op(ray_local, workspace):
    task = write_tiny_task(workspace)
    res = cli("train", "ddpm_finetune", *tiny_args(task, *TRUTH, "--name", "first"))
    assert res.exit_code == 0, res.output
    assert "done" in res.output and "mlflow ui" in res.output

    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    c, runs = experiment_runs(uri, "ddpm_finetune")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["method"] == "ddpm_finetune" and p["method_config.lr"] == "0.0001" and p["run.steps"] == "20"
    assert p["task.target.data"] == "synthetic:sketch"
    history = tracking.metric_history(uri, run.info.run_id, "loss")
    assert [s for s, _ in history] == list(range(1, 21))  # every step, logged in batches
    # periodic and final evaluation, each metric named by its feature network
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "fid_domain")] == [10, 20]
    m = run.data.metrics
    assert m["fid_domain"] >= 0 and m["kid_domain"] == m["kid_domain"] and 0 <= m["intra_dist_domain"] <= 2
    assert m["num_samples"] == 12 and m["num_reference"] == 32
    # the task's truth check: at every evaluation, with its held-out accuracy and the source's floor
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "target_rate")] == [10, 20]
    assert m["truth_separation"] >= 0.8 and m["target_rate_source"] <= 0.2, m
    assert {"truth_accuracy_target", "truth_accuracy_source", "truth_accuracy_neither"} <= set(m)
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "samples", "model"} <= arts
    samples = {a.path for a in c.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_000000.png", "samples/step_000010.png", "samples/final.png"} <= samples
    model = {a.path for a in c.list_artifacts(run.info.run_id, "model/unet")}
    assert "model/unet/config.json" in model
    assert (workspace / "runs" / "first").is_dir()
    # the pretraining of the tiny source is its own recorded run, cached for the next runs
    _, pre = experiment_runs(uri, "pretrain-ddpm")
    assert len(pre) == 1 and pre[0].info.status == "FINISHED"

    again = cli("train", "ddpm_finetune", *tiny_args(task, *TRUTH, "--name", "first"))
    assert again.exit_code == 0 and "already FINISHED" in again.output
    assert len(experiment_runs(uri, "ddpm_finetune")[1]) == 1
    assert len(experiment_runs(uri, "pretrain-ddpm")[1]) == 1
    _check_mlflow_idioms(uri, c, run, task)


def _check_mlflow_idioms(uri: str, c, run, task) -> None:
    """What MLflow 3's UI shows for a run: who and which commit ran it, its inputs in the Datasets
    panel, its grids in the Images panel by step, and its model, registered and loadable."""
    import json

    import mlflow.pyfunc
    import numpy as np

    from orchestrator.api import register
    from orchestrator.core.config import ConfigError, InputError
    from orchestrator.runs.models import resolve_model
    from trainers.generate import SampleOptions, open_model

    # the experiment opens in MLflow 3's model-training view (runs, charts, images), not GenAI's
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    run = c.get_run(run.info.run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"]  # the command (under pytest: its own argv)
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.user"]
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"shots", "reference", "source"}
    assert json.loads(inputs["shots"].dataset.source)["uri"] == "synthetic:sketch"
    assert json.loads(inputs["reference"].dataset.profile)["num_images"] == 32
    assert all(len(d.dataset.digest) == 36 for d in inputs.values())
    # the recorded digests are those of the data: the sha256 of the decoded images' .npy
    from orchestrator.core.config import load_task
    from orchestrator.runs.inputs import check_data

    for name, images in zip(("shots", "reference"), check_data(load_task(task))):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
        assert inputs[name].dataset.digest == hashlib.sha256(buf.getvalue()).hexdigest()[:36], name
    assert {t.value for t in inputs["shots"].tags} == {"training"}
    assert any(a.path.startswith("images") for a in c.list_artifacts(run.info.run_id))  # the Images panel

    # the export is an MLflow model; registering it makes a version that every door accepts
    assert "model/MLmodel" in {a.path for a in c.list_artifacts(run.info.run_id, "model")}
    res = cli("train", "ddpm_finetune", *tiny_args(task, *TRUTH, "--name", "first"),
              "--register", "sketchy")
    assert res.exit_code == 0 and "models:/sketchy/1" in res.output, res.output
    assert register("first", "sketchy", tracking_uri=uri) == "models:/sketchy/2"
    exported, registered = resolve_model("first", uri), resolve_model("models:/sketchy/1", uri)
    assert exported.digest == registered.digest  # the same bytes
    opts = SampleOptions(steps=3)
    want = open_model(exported.local).generate([0, 5], 0, opts)
    assert torch.equal(open_model(registered.local).generate([0, 5], 0, opts), want)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    got = mlflow.pyfunc.load_model("models:/sketchy/1").predict([0, 5], params={"seed": 0, "steps": 3})
    assert np.array_equal(got, want.permute(0, 2, 3, 1).numpy())
    with pytest.raises(InputError, match="no run named"):
        register("nope", "sketchy", tracking_uri=uri)
    with pytest.raises(ConfigError, match="--register"):
        register("first", "bad name", tracking_uri=uri)


def test_killed_run_resumes_from_its_checkpoint(ray_local, workspace):
    task = write_tiny_task(workspace)
    args = tiny_args(task, "--name", "killme", "--set", "run.steps=120", "--set", "run.report_every=5",
                     "--set", "run.sample_every=1000")
    # a short lease: the killed CLI's run is stale 3 s after its last heartbeat
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONUNBUFFERED": "1", "ORCHESTRATE_LEASE_TTL_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "ddpm_finetune", *args],
                            cwd=workspace, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = workspace / "runs" / "killme"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not any(run_dir.glob("checkpoint_*")):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        assert any(run_dir.glob("checkpoint_*")), "no checkpoint within 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _, runs = experiment_runs(uri, "ddpm_finetune")
    assert runs[0].info.status == "RUNNING"  # the driver died without a word
    killed_at = max(s for s, _ in tracking.metric_history(uri, runs[0].info.run_id, "loss"))
    assert killed_at < 120
    time.sleep(4)  # the killed invocation's lease goes stale

    res = cli("train", "ddpm_finetune", *args)  # the same command again: takes the stale run over
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output
    c, runs = experiment_runs(uri, "ddpm_finetune")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["orchestrate.resumed"] == "1"
    steps = [s for s, _ in tracking.metric_history(uri, runs[0].info.run_id, "loss")]
    # resumed after the last checkpoint, not from scratch, and no step was logged twice
    assert steps == list(range(1, 121))


def test_exception_inside_training_marks_the_run_failed(ray_local, workspace):
    from orchestrator.data.artifacts import publish_array
    from orchestrator.core.config import resolve
    from orchestrator.runtime.job import Job
    from orchestrator.runtime.launch import run_job

    import numpy as np

    task = write_tiny_task(workspace)
    cfg = resolve("ddpm_finetune", task, overrides={"run.steps": 5})
    storage = str(workspace / "runs")
    job = Job(kind="adapt", name="boom", method="ddpm_finetune", family="ddpm", resolution=16,
              method_config=cfg.method_config, run=cfg.run, storage=storage,
              data=publish_array(np.zeros((4, 16, 16, 3), np.uint8), storage),
              source_hub_id="no-such/source")  # fails inside the worker
    with pytest.raises(Exception):
        run_job(job, experiment="ddpm_finetune", tracking_uri="sqlite:///mlflow.db")
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _, runs = experiment_runs(uri, "ddpm_finetune")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_bad_data_fails_before_ray_with_a_clear_message(ray_local, workspace):
    (workspace / "shots").mkdir()
    (workspace / "shots" / "broken.png").write_bytes(b"not a png")
    task = write_tiny_task(workspace, target={"data": "shots", "shots": 1})
    res = cli("train", "ddpm_finetune", *tiny_args(task))
    assert res.exit_code == 2
    assert "broken.png" in res.output and "Traceback" not in res.output




@pytest.mark.parametrize("method", ["ddpm_finetune", "gan_finetune"])
def test_two_data_parallel_workers(ray_local, workspace, method):
    """--workers 2 (gloo on the CPU): both ranks end with equal weights; the run's metrics and
    checkpoints are written once (rank 0), each rank's RNG state beside them."""
    import torch

    from tests.tiny import TINY_RUN

    gan = method == "gan_finetune"
    task = write_tiny_task(workspace, name=f"dp-{method}", **({"source": GAN_SOURCE} if gan else {}))
    sets = [x for s in TINY_RUN if not (gan and s.startswith("sample_steps")) for x in ("--set", s)]
    res = cli("train", method, "--task", str(task), "--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs",
              *sets, "--name", f"dp-{method}", "--workers", "2", "--set", "run.cpus_per_worker=1")
    assert res.exit_code == 0, res.output
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _, runs = experiment_runs(uri, method)
    run = next(r for r in runs if r.info.run_name == f"dp-{method}")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    steps = [s for s, _ in tracking.metric_history(uri, run.info.run_id, "loss")]
    assert steps == list(range(1, 21))  # written once
    last = sorted(p for p in (workspace / "runs" / f"dp-{method}").glob("checkpoint_*") if p.is_dir())[-1]
    files = sorted(p.name for p in last.iterdir())
    assert files.count("state.pt") == 1 and {"rng_rank0.pt", "rng_rank1.pt"} <= set(files)
    digests = {torch.load(last / f"rng_rank{r}.pt", weights_only=False)["weights_sha256"] for r in (0, 1)}
    assert len(digests) == 1  # the ranks hold equal parameters
