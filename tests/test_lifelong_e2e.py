"""End to end: `orchestrate lifelong` with LFS-GAN (no forgetting by construction) and with
sequential fine-tuning (which forgets), the matrices in MLflow."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from orchestrator.records import tracking
from orchestrator.data.artifacts import ArtifactRef, fetch
from tests.tiny import cli

pytestmark = pytest.mark.slow

URI = ["--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs"]


def write_sequence(folder, steps=10, tasks=("sketch", "night", "stripes"), report_every=20):
    seq = {
        "name": "tiny-seq", "resolution": 16,
        "source": {"family": "stylegan2", "pretrain": {"count": 64, "preset": "tiny", "steps": 20, "batch_size": 8,
                                                       "lr": None, "encoder_steps": 20}},
        "run": {"steps": steps, "report_every": report_every, "sample_every": 20, "grid_size": 4, "eval_samples": 8,
                "final_eval_samples": 32},
        "tasks": [{"name": d, "target": {"data": f"synthetic:{d}", "shots": 4},
                   "reference": {"data": f"synthetic:{d}", "count": 24}} for d in tasks],
    }
    path = folder / "seq.yaml"
    path.write_text(yaml.safe_dump(seq))
    return path


def parent_and_children(uri, name):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("lifelong-tiny-seq")
    parent = tracking.find_run(uri, exp.experiment_id, name)
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return c, parent, kids


def test_lfs_gan_does_not_forget_and_finetuning_does(ray_local, workspace):
    seq = write_sequence(workspace, steps=60)  # enough for a shared generator to drift between tasks
    res = cli("lifelong", "--tasks", str(seq), "--name", "lfs", *URI, "--set", "batch_size=4")
    assert res.exit_code == 0, res.output
    assert "forgetting_fid_domain" in res.output
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    c, parent, kids = parent_and_children(uri, "lfs")
    assert parent.info.status == "FINISHED" and len(kids) == 3
    assert all(k.info.status == "FINISHED" for k in kids)
    m = parent.data.metrics
    # earlier tasks are sampled with their own, untouched modulators: identical rows
    assert m["forgetting_fid_domain"] == 0.0 and m["bwt_fid_domain"] == 0.0
    assert m["trainable_parameters_per_task"] > 0
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "matrices")}
    assert {"matrices/fid_domain.csv", "matrices/fid_domain.png", "matrices/intra_dist_domain.csv"} <= arts

    res = cli("lifelong", "--tasks", str(seq), "--method", "gan_finetune", "--name", "ft", *URI,
              "--set", "batch_size=4")
    assert res.exit_code == 0, res.output
    _, ft, _ = parent_and_children(uri, "ft")
    # shared weights: what the model does on earlier tasks changes as it learns later ones (how
    # much it forgets at real lengths is measured by the sequence1 run recorded in the README)
    assert ft.data.metrics["bwt_fid_domain"] != 0.0 and ft.data.metrics["forgetting_fid_domain"] != 0.0
    assert ft.data.metrics["trainable_parameters_per_task"] > m["trainable_parameters_per_task"]


def folder_digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_killed_sequence_resumes_at_the_unfinished_task(ray_local, workspace):
    """SIGKILL the whole `orchestrate lifelong` process group while it learns task 1; running
    the command again keeps task 0 (its MLflow row and its export, bit for bit), continues task
    1 from its checkpoint and learns task 2."""
    seq = write_sequence(workspace, steps=100, report_every=10)
    args = ["lifelong", "--tasks", str(seq), "--name", "killed", *URI, "--set", "batch_size=4"]
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONUNBUFFERED": "1", "ORCHESTRATE_LEASE_TTL_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=workspace, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    task1_run = workspace / "runs" / "killed-task1-night"
    deadline = time.time() + 420
    try:
        while not any(task1_run.glob("checkpoint_*")):
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            assert time.time() < deadline, "task 1 reached no checkpoint within 420 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _, parent, kids = parent_and_children(uri, "killed")
    assert parent.info.status == "RUNNING"  # SIGKILL leaves no chance to close it: the rerun does
    row0 = next(k for k in kids if k.data.tags["orchestrate.task_index"] == "0")
    assert row0.info.status == "FINISHED"
    row1 = next(k for k in kids if k.data.tags["orchestrate.task_index"] == "1")
    assert "orchestrate.export" not in row1.data.tags  # killed before task 1 finished
    export0 = ArtifactRef.model_validate_json(row0.data.tags["orchestrate.export"])
    task0 = folder_digest(fetch(export0))
    task0_modulators = torch.load(fetch(export0) / "left_modulators.pt", weights_only=True)["tasks"][0]

    time.sleep(4)  # the killed invocation's lease goes stale
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "task 0 (sketch) already learned: kept" in res.output
    assert "resuming killed-task1-night" in res.output
    c, parent, kids = parent_and_children(uri, "killed")
    assert parent.info.status == "FINISHED" and len(kids) == 3
    assert all(k.info.status == "FINISHED" for k in kids)
    by_index = {k.data.tags["orchestrate.task_index"]: k for k in kids}
    assert by_index["0"].info.run_id == row0.info.run_id and by_index["0"].data.metrics == row0.data.metrics
    assert "orchestrate.resumed" in by_index["1"].data.tags
    # the earlier export, bit for bit: the same content digest, read back from the run storage
    assert by_index["0"].data.tags["orchestrate.export"] == row0.data.tags["orchestrate.export"]
    assert folder_digest(fetch(export0)) == task0
    # and task 0's modulators travel unchanged into every later export
    export2 = ArtifactRef.model_validate_json(by_index["2"].data.tags["orchestrate.export"])
    final = torch.load(fetch(export2) / "left_modulators.pt", weights_only=True)["tasks"]
    assert sorted(final) == [0, 1, 2]
    assert final[0].keys() == task0_modulators.keys()
    assert all(torch.equal(final[0][k], task0_modulators[k]) for k in task0_modulators)
    assert parent.data.metrics["forgetting_fid_domain"] == 0.0


def test_sweep_whose_objective_is_the_whole_sequence(ray_local, workspace):
    """`orchestrate sweep lfs_gan --tasks SEQ`: each trial learns the whole sequence; ASHA
    compares trials after the same number of tasks; the objective of a finished trial is its
    average final FID over every task; `best --sequence` ranks the trials."""
    seq = write_sequence(workspace, steps=20, tasks=("sketch", "night"))
    space = workspace / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"loguniform": [5e-4, 5e-3]}, "rank": {"choice": [1, 2]},
                                     "mode_seeking_weight": None}))
    res = cli("sweep", "lfs_gan", "--tasks", str(seq), "--space", str(space), "--num-samples", "4",
              "--grace-period", "1", "--name", "seqsweep", *URI, "--set", "batch_size=4")
    assert res.exit_code == 0, res.output
    assert "tasks_learned" in res.output and "avg_final_fid_domain" in res.output
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    c, parent, trials = parent_and_children(uri, "seqsweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["orchestrate.kind"] == "sweep"
    assert len(trials) == 4
    finished = []
    for t in trials:
        tasks = c.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{t.info.run_id}'")
        by_index = {k.data.tags["orchestrate.task_index"]: k for k in tasks}
        assert by_index["0"].info.status == "FINISHED"
        assert all(k.info.status != "RUNNING" for k in tasks)  # closed even when Tune stopped the trial
        if t.info.status == "FINISHED":
            assert all(k.info.status == "FINISHED" for k in tasks)
            assert len(tasks) == 2
            # the objective is computed over the whole sequence: the mean of the last matrix row
            rows = c.download_artifacts(t.info.run_id, "matrices/fid_domain.csv")
            last = open(rows).read().splitlines()[-1].split(",")[1:]
            assert t.data.metrics["avg_final_fid_domain"] == pytest.approx(sum(map(float, last)) / 2, rel=1e-5)
            finished.append(t)
        else:
            assert t.info.status == "KILLED"  # ASHA stopped it at its report after task 0
    assert finished
    best = min(finished, key=lambda t: t.data.metrics["avg_final_fid_domain"])
    assert parent.data.tags["orchestrate.best_trial"] == best.data.tags["orchestrate.trial_id"]
    assert parent.data.metrics["best_avg_final_fid_domain"] == best.data.metrics["avg_final_fid_domain"]
    out = cli("best", "lfs_gan", "--sequence", "tiny-seq", "--tracking-uri", "sqlite:///mlflow.db")
    assert out.exit_code == 0, out.output
    assert best.info.run_name in out.output and "orchestrate lifelong --tasks" in out.output
