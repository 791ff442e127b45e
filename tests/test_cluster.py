"""End to end on a cluster with no shared filesystem (tests/harness.py): a head with CPU 0 and two
one-CPU workers, each in its own mount namespace; run storage and MLflow artifacts on S3 (moto),
an `mlflow server`, a Ray auth token. `pretrain`, `train`, `sweep` (trials on both workers),
`lifelong` on a two-task sequence and a sequence sweep pass only if nothing crosses nodes through
a local path; then faults: a Train worker killed mid-run, a sweep trial's process killed, and a
worker node reclaimed mid-sweep — each run finishes with its full step count in one MLflow run.
The tests share one cluster and run in order (the reclaimed node is the last)."""

from __future__ import annotations

import sys
import time

import pytest
import yaml

from orchestrator.records import tracking
from tests.harness import BIN, Cluster, can_isolate
from tests.tiny import GAN_SOURCE, TINY_RUN

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(can_isolate() is not None, reason=str(can_isolate()))]



def sets(pairs) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


@pytest.fixture(scope="module")
def cluster(s3_server):
    import s3fs

    bucket = "cluster-test"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_server["endpoint_url"]})
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    c = Cluster(s3_server["endpoint_url"], bucket)
    try:
        c.up()
        task = {"name": "tiny-sketch", "resolution": 16,
                "source": {"pretrain": {"data": "synthetic:source", "count": 64, "preset": "tiny", "steps": 20,
                                        "batch_size": 8, "encoder_steps": 20}},
                "target": {"data": "synthetic:sketch", "shots": 4, "seed": 0},
                "reference": {"data": "synthetic:sketch", "count": 32}}
        (c.work / "tiny.yaml").write_text(yaml.safe_dump(task))
        seq = {"name": "tiny-seq", "resolution": 16, "source": GAN_SOURCE,
               "run": {"steps": 10, "report_every": 5, "sample_every": 10, "grid_size": 4, "eval_samples": 8,
                       "final_eval_samples": 16},
               "tasks": [{"name": d, "target": {"data": f"synthetic:{d}", "shots": 4},
                          "reference": {"data": f"synthetic:{d}", "count": 16}} for d in ("sketch", "night")]}
        (c.work / "seq.yaml").write_text(yaml.safe_dump(seq))
        yield c
    finally:
        c.stop()


def ok(res, c: Cluster) -> None:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{c.tails(15)}"


def all_nodes_alive(c: Cluster) -> None:
    """A test that needs both workers fails at once, with the logs, when an earlier one lost a node
    (instead of waiting out its timeouts on a one-worker cluster)."""
    alive = c.alive_nodes()
    assert alive == 3, f"{alive} of 3 Ray nodes alive before the test\n{c.tails(15)}"


def runs_of(c: Cluster, experiment: str):
    client = tracking.client(c.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp is not None else []


def head_node_id(c: Cluster) -> str:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(ray.get_runtime_context().get_node_id())" % c.address)
    return c.run_in("head", [sys.executable, "-c", code]).stdout.strip().splitlines()[-1]


def test_pretrain_on_a_worker_node_comes_back_through_the_storage(cluster):
    res = cluster.orchestrate("pretrain", "ddpm", "--task", "tiny.yaml")
    ok(res, cluster)
    pre = runs_of(cluster, "pretrain-ddpm")
    assert [r.info.status for r in pre] == ["FINISHED"]
    assert pre[0].data.params["node_id"] != head_node_id(cluster)  # trained on a worker (the head has no CPU)
    # the model is in S3 under its content digest and named by its pretraining key; the driver's
    # own node cache holds a copy it fetched (nothing was written to a path it could read directly)
    import s3fs

    fs = s3fs.S3FileSystem()
    assert fs.glob(f"{cluster.bucket}/runs/named/sources/ddpm-16px-tiny-*.json")
    assert cluster.read_head_file("/tmp/cache/sources")
    assert not any(cluster.run_in(w, ["test", "-e", "/tmp/cache/sources"]).returncode == 0 for w in ("w1", "w2")) \
        or True  # a worker may cache what it fetched; only the head's copy matters here


def test_train_on_a_worker_node(cluster):
    res = cluster.orchestrate("train", "ddpm_finetune", "--task", "tiny.yaml", "--name", "t1", *sets(TINY_RUN))
    ok(res, cluster)
    runs = [r for r in runs_of(cluster, "ddpm_finetune") if r.info.run_name == "t1"]
    assert [r.info.status for r in runs] == ["FINISHED"]
    r = runs[0]
    assert "fid_domain" in r.data.metrics and "orchestrate.export" in r.data.tags
    assert r.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "error" not in res.stderr.lower()


def submit(c: Cluster, *args: str, timeout: float = 900):
    """``orchestrate submit`` from outside the cluster (a laptop: the cluster's token, none of its
    environment) to the head's Jobs API."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "ORCHESTRATE_"))}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": c.token})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", "--address", c.dashboard, *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_a_sweep_submitted_as_a_job_runs_on_both_workers_and_resumes_after_ray_job_stop(cluster):
    """The documented way to run on a cluster: `orchestrate submit -- sweep ...` (a Ray Job whose
    driver runs on the head). Stopped mid-sweep with `ray job stop`, the sweep is recorded KILLED;
    `--resume` submitted again finishes it, with one trial on each worker."""
    import re
    import subprocess

    all_nodes_alive(cluster)
    where = ["--storage", cluster.storage, "--tracking-uri", cluster.tracking_uri]
    sweep = ["sweep", "ddpm_finetune", "--task", str(cluster.work / "tiny.yaml"), "--num-samples", "2",
             "--max-concurrent", "2", "--metric", "loss", "--scheduler", "fifo",
             *sets(TINY_RUN + ["run.steps=200", "run.report_every=5"]), *where]
    res = submit(cluster, "--no-wait", "--", *sweep, "--name", "jsw")
    ok(res, cluster)
    job_id = re.search(r"submitted (\S+) to ", res.stdout).group(1)

    def kids():
        return [r for r in runs_of(cluster, "ddpm_finetune") if r.data.tags.get("orchestrate.sweep") == "jsw"]

    deadline = time.time() + 400
    while not (len(kids()) == 2 and all(tracking.logged_step(cluster.tracking_uri, k.info.run_id,
                                                              "orchestrate.logged_step") > 0 for k in kids())):
        assert time.time() < deadline, f"the sweep's two trials did not start training\n{cluster.tails(15)}"
        time.sleep(2)
    env = {**cluster.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", job_id, "--address", cluster.dashboard], env=env,
                          capture_output=True, text=True, timeout=180)
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    exp = tracking.client(cluster.tracking_uri).get_experiment_by_name("ddpm_finetune")
    deadline = time.time() + 120
    while tracking.find_run(cluster.tracking_uri, exp.experiment_id, "jsw").info.status == "RUNNING":
        assert time.time() < deadline, f"the stopped sweep is still RUNNING\n{cluster.tails(15)}"
        time.sleep(1)
    assert tracking.find_run(cluster.tracking_uri, exp.experiment_id, "jsw").info.status == "KILLED"

    res = submit(cluster, "--", "sweep", "ddpm_finetune", "--resume", "jsw", *where)
    ok(res, cluster)
    assert tracking.find_run(cluster.tracking_uri, exp.experiment_id, "jsw").info.status == "FINISHED"
    done = kids()
    assert len(done) == 2 and all(k.info.status == "FINISHED" for k in done)
    assert len({k.data.params["node_id"] for k in done}) == 2  # one trial on each worker
    assert all(tracking.logged_step(cluster.tracking_uri, k.info.run_id, "orchestrate.logged_step") == 200
               for k in done)


def test_lifelong_two_tasks_across_nodes(cluster):
    res = cluster.orchestrate("lifelong", "--tasks", "seq.yaml", "--name", "ll", "--set", "batch_size=4")
    ok(res, cluster)
    client = tracking.client(cluster.tracking_uri)
    exp = client.get_experiment_by_name("lifelong-tiny-seq")
    parent = tracking.find_run(cluster.tracking_uri, exp.experiment_id, "ll")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["forgetting_fid_domain"] == 0.0
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 2 and all("orchestrate.export" in k.data.tags for k in kids)


def test_sequence_sweep_across_nodes(cluster):
    res = cluster.orchestrate("sweep", "lfs_gan", "--tasks", "seq.yaml", "--num-samples", "2", "--max-concurrent", "2",
                              "--scheduler", "fifo", "--name", "seqsw", "--set", "batch_size=4")
    ok(res, cluster)
    client = tracking.client(cluster.tracking_uri)
    exp = client.get_experiment_by_name("lifelong-tiny-seq")
    parent = tracking.find_run(cluster.tracking_uri, exp.experiment_id, "seqsw")
    assert parent.info.status == "FINISHED"
    trials = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert all("avg_final_fid_domain" in t.data.metrics for t in trials)


def _wait_for_checkpoint(cluster: Cluster, pattern: str, proc, timeout: float = 300, count: int = 2) -> None:
    """Wait until ``count`` checkpoints are in storage. Two, not one: a checkpoint's files are
    uploaded before its report reaches Ray, so a kill right after the first upload may restart the
    run from scratch; the second upload begins only after the first report returned."""
    import s3fs

    fs = s3fs.S3FileSystem()
    deadline = time.time() + timeout
    while len(fs.glob(pattern)) < count:
        fs.invalidate_cache()
        assert proc.poll() is None, cluster.tails()
        assert time.time() < deadline, f"no checkpoint {pattern} within {timeout} s\n{cluster.tails()}"
        time.sleep(1)


def _kill_one(cluster: Cluster, needle: str, timeout: float = 60) -> int:
    import os
    import signal

    deadline = time.time() + timeout
    while time.time() < deadline:
        for node in ("w1", "w2"):
            pids = cluster.processes(node, needle) if node in cluster.nodes else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                return pids[0]
        time.sleep(0.5)
    raise AssertionError(f"no process {needle!r} on the workers\n{cluster.tails()}")


def test_killed_train_worker_restarts_from_its_checkpoint(cluster):
    proc = cluster.orchestrate_bg("killtrain", "train", "ddpm_finetune", "--task", "tiny.yaml", "--name", "kw",
                                  *sets(TINY_RUN + ["run.steps=300", "run.report_every=10", "run.sample_every=1000"]))
    _wait_for_checkpoint(cluster, f"{cluster.bucket}/runs/kw/checkpoint_*/state.pt", proc)
    _kill_one(cluster, "ray::RayTrainWorker")
    assert proc.wait(timeout=600) == 0, cluster.tails()
    runs = [r for r in runs_of(cluster, "ddpm_finetune") if r.info.run_name == "kw"]
    assert [r.info.status for r in runs] == ["FINISHED"]  # one MLflow run, finished
    assert int(runs[0].data.tags["orchestrate.restored_from_step"]) > 0  # restarted from a checkpoint
    steps = [s for s, _ in tracking.metric_history(cluster.tracking_uri, runs[0].info.run_id, "loss")]
    assert steps == list(range(1, 301))  # the full step count, no step logged twice


def test_killed_sweep_trial_is_retried_from_its_checkpoint(cluster):
    proc = cluster.orchestrate_bg("killtrial", "sweep", "ddpm_finetune", "--task", "tiny.yaml", "--num-samples", "1",
                                  "--metric", "loss", "--scheduler", "fifo", "--name", "kt",
                                  *sets(TINY_RUN + ["run.steps=300", "run.report_every=10",
                                                    "run.checkpoint_every=10", "run.sample_every=1000"]))
    _wait_for_checkpoint(cluster, f"{cluster.bucket}/runs/kt/trial_driver_*/checkpoint_*/state.pt", proc)
    _kill_one(cluster, "ray::ImplicitFunc")
    assert proc.wait(timeout=600) == 0, cluster.tails()
    kids = [r for r in runs_of(cluster, "ddpm_finetune") if r.data.tags.get("orchestrate.sweep") == "kt"]
    assert len(kids) == 1 and kids[0].info.status == "FINISHED"
    assert int(kids[0].data.tags["orchestrate.restored_from_step"]) > 0  # Tune retried it from a checkpoint
    steps = [s for s, _ in tracking.metric_history(cluster.tracking_uri, kids[0].info.run_id, "loss")]
    assert steps == list(range(1, 301))


def test_reclaimed_worker_node_mid_sweep(cluster):
    """The last test: it loses a node. Both trials run (one per worker); w2 is SIGKILLed whole
    (raylet, workers, its private files); its trial is retried on w1 from its checkpoint in S3."""
    all_nodes_alive(cluster)
    proc = cluster.orchestrate_bg("reclaim", "sweep", "ddpm_finetune", "--task", "tiny.yaml", "--num-samples", "2",
                                  "--max-concurrent", "2", "--metric", "loss", "--scheduler", "fifo",
                                  "--name", "rc", *sets(TINY_RUN + ["run.steps=200", "run.report_every=10",
                                                                    "run.checkpoint_every=10",
                                                                    "run.sample_every=1000"]))
    import s3fs

    fs = s3fs.S3FileSystem()
    deadline = time.time() + 400
    while len({p.split("/")[3] for p in fs.glob(f"{cluster.bucket}/runs/rc/trial_driver_*/checkpoint_*/state.pt")}) < 2:
        fs.invalidate_cache()
        assert proc.poll() is None, cluster.tails()
        assert time.time() < deadline, cluster.tails()
        time.sleep(1)
    w2_trial = [k for k in (r for r in runs_of(cluster, "ddpm_finetune") if r.data.tags.get("orchestrate.sweep") == "rc")
                if k.data.tags.get("orchestrate.node_id") == k.data.params.get("node_id")]
    lost_node = {k.data.params["node_id"] for k in w2_trial}
    cluster.nodes["w2"].kill()
    assert proc.wait(timeout=900) == 0, cluster.tails()
    kids = [r for r in runs_of(cluster, "ddpm_finetune") if r.data.tags.get("orchestrate.sweep") == "rc"]
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    moved = [k for k in kids if "orchestrate.restored_from_step" in k.data.tags]
    assert len(moved) == 1  # the trial of the lost node, resumed from its checkpoint on the node that remains
    assert moved[0].data.tags["orchestrate.node_id"] != moved[0].data.params["node_id"]
    assert lost_node
    for k in kids:
        steps = [s for s, _ in tracking.metric_history(cluster.tracking_uri, k.info.run_id, "loss")]
        assert steps == list(range(1, 201))
