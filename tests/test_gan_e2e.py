"""End to end for the GAN family: `orchestrate pretrain stylegan2`, `train dcl`, `sweep dcl`."""

import json

import pytest

from orchestrator.records import tracking
from orchestrator.core.config import load_task
from orchestrator.runs.sources import pretrain_key
from tests.tiny import GAN_SOURCE, cli, experiment_runs, write_tiny_task

pytestmark = pytest.mark.slow

GAN_RUN = ["run.steps=10", "run.report_every=5", "run.sample_every=5", "run.grid_size=4", "batch_size=4",
           "run.eval_samples=8", "run.final_eval_samples=12"]
URI = ["--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs"]


def sets(pairs):
    return [x for p in pairs for x in ("--set", p)]


@pytest.mark.cold_cache
def test_dcl_train_and_sweep_end_to_end(ray_local, workspace):
    task = write_tiny_task(workspace, name="tiny-gan", source=GAN_SOURCE)
    res = cli("pretrain", "stylegan2", "--task", str(task), *URI)
    assert res.exit_code == 0, res.output
    exported = workspace / "exported-gan"
    again = cli("pretrain", "stylegan2", "--task", str(task), *URI, "--export", str(exported))
    assert "already cached" in again.output
    # the export is safetensors with its recipe beside it, and adapts like the cached source
    assert (exported / "stylegan2.safetensors").is_file()
    recipe = json.loads((exported / "recipe.json").read_text())
    assert recipe["pretrain_key"] == pretrain_key(load_task(task, family="stylegan2"))
    assert recipe["command"].startswith("orchestrate pretrain stylegan2 --task ")

    res = cli("train", "dcl", "--task", str(task), "--name", "dcl-run", *URI, *sets(GAN_RUN),
              "--set", f"task.source.model={exported}")
    assert res.exit_code == 0, res.output
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    c, runs = experiment_runs(uri, "dcl")
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("loss", "d_loss", "fid_domain", "intra_dist_domain"):
        assert key in run.data.metrics, key
    assert {"g_cl", "d_cl"} <= set(run.data.metrics)  # DCL's generator- and discriminator-side InfoNCE
    model = {a.path for a in c.list_artifacts(run.info.run_id, "model")}
    assert "model/stylegan2.pt" in model
    _, pre = experiment_runs(uri, "pretrain-stylegan2")
    assert [r.info.status for r in pre] == ["FINISHED"]

    res = cli("sweep", "dcl", "--task", str(task), "--num-samples", "2", "--name", "dcl-sweep", *URI,
              *sets(GAN_RUN))
    assert res.exit_code == 0, res.output
    _, runs = experiment_runs(uri, "dcl")
    parent = next(r for r in runs if r.info.run_name == "dcl-sweep")
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == 2 and all(k.info.status in ("FINISHED", "KILLED") for k in kids)


def test_family_mismatch_is_a_clear_error(workspace):
    task = write_tiny_task(workspace)  # a ddpm task
    res = cli("train", "dcl", "--task", str(task), *URI)
    assert res.exit_code == 2
    assert "source.family" in res.output and "stylegan2" in res.output
