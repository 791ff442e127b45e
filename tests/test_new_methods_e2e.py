"""End to end for dual_output and self_guided: `orchestrate pretrain` of their own kind of source,
`orchestrate train` from it (and from a plain DDPM source), `orchestrate sweep` with the method's
default space — on tiny settings."""

from __future__ import annotations

import pytest

from orchestrator.records import tracking
from tests.tiny import TINY_TASK, cli, experiment_runs, write_tiny_task

pytestmark = pytest.mark.slow

URI = ["--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs"]
RUN = ["run.steps=10", "run.report_every=5", "run.sample_every=10", "run.grid_size=4", "run.grid_sample_steps=2",
       "batch_size=5", "sample_steps=3", "run.eval_samples=8", "run.eval_sample_steps=2",
       "run.final_eval_samples=12", "run.final_eval_sample_steps=2"]


def sets(pairs):
    return [x for p in pairs for x in ("--set", p)]


@pytest.mark.parametrize("method, extra", [("dual_output", []), ("self_guided", ["k_target=2"])])
def test_pretrain_train_and_sweep(ray_local, workspace, method, extra):
    pretrain = {**TINY_TASK["source"]["pretrain"], "pretrainer": f"{method}_pretrain"}
    own = write_tiny_task(workspace, name=f"{method}-own", source={"pretrain": pretrain})
    res = cli("pretrain", "ddpm", "--task", str(own), *URI)
    assert res.exit_code == 0, res.output
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _, pre = experiment_runs(uri, "pretrain-ddpm")
    assert [r.info.status for r in pre] == ["FINISHED"]

    # adapt the method's own kind of source, and an ordinary noise-predicting one (the shared tiny DDPM)
    plain = write_tiny_task(workspace, name=f"{method}-plain")
    for task, name in ((own, "from-own"), (plain, "from-plain")):
        res = cli("train", method, "--task", str(task), "--name", f"{method}-{name}", *URI, *sets(RUN + extra))
        assert res.exit_code == 0, res.output
    c, runs = experiment_runs(uri, method)
    assert {r.info.run_name for r in runs} == {f"{method}-from-own", f"{method}-from-plain"}
    for r in runs:
        assert r.info.status == "FINISHED" and "fid_domain" in r.data.metrics
        assert "model/unet/config.json" in {a.path for a in c.list_artifacts(r.info.run_id, "model/unet")}

    res = cli("sweep", method, "--task", str(plain), "--num-samples", "2", "--name", f"{method}-sweep", *URI,
              *sets(RUN + extra))
    assert res.exit_code == 0, res.output
    parent = tracking.find_run(uri, c.get_experiment_by_name(method).experiment_id, f"{method}-sweep")
    assert parent.info.status == "FINISHED"
    space = {k for k in parent.data.params if k.startswith("space.")}
    assert "space.lr" in space
