"""End to end: `orchestrate sweep` (Tune + Optuna + ASHA, each trial a Ray Train run), its MLflow
record, `orchestrate best --export` into `orchestrate train --config`, and resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator.records import tracking
from tests.tiny import TINY_RUN, cli, write_tiny_task

pytestmark = pytest.mark.slow

URI_ARGS = ["--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs"]


def sweep_args(task, space, *extra):
    out = ["sweep", "ddpm_finetune", "--task", str(task), "--space", str(space), *URI_ARGS]
    for s in TINY_RUN:
        out += ["--set", s]
    return out + list(extra)


def write_space(folder, data):
    p = folder / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def children(uri, parent_id):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("ddpm_finetune")
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parent_run(uri, name):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("ddpm_finetune")
    return tracking.find_run(uri, exp.experiment_id, name) if exp is not None else None


def test_sweep_asha_failed_trial_best_and_export(ray_local, workspace):
    task = write_tiny_task(workspace)
    # Small learning rates barely move the loss: ASHA should stop such trials at a rung. t_max
    # 5000 passes config validation but makes the method raise in the worker: a FAILED trial.
    space = write_space(workspace, {"lr": {"loguniform": [1e-7, 3e-3]},
                                    "t_max": {"choice": [1000, 1000, 1000, 5000]},
                                    "ema_decay": None, "weight_decay": None})
    res = cli(*sweep_args(task, space, "--num-samples", "7", "--max-concurrent", "2", "--metric", "loss",
                          "--mode", "min", "--grace-period", "5", "--name", "s1", "--seed", "1",
                          "--set", "run.report_every=5"))
    assert res.exit_code == 0, res.output
    assert "best" in res.output and "s1" in res.output

    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    parent = parent_run(uri, "s1")
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.TAG_KIND] == "sweep"
    kids = children(uri, parent.info.run_id)
    assert len(kids) == 7
    by_trial = {k.data.tags["orchestrate.trial_id"]: k for k in kids}
    table = {row.split(",")[0]: row.split(",") for row in
             tracking.client(uri).download_artifacts(parent.info.run_id, "results.csv") and
             open(tracking.client(uri).download_artifacts(parent.info.run_id, "results.csv")).read().splitlines()[1:]}
    assert set(table) == set(by_trial)
    for trial_id, row in table.items():
        assert by_trial[trial_id].info.status == row[1], (trial_id, row)  # MLflow status = Tune's outcome
    statuses = [r[1] for r in table.values()]
    assert "FAILED" in statuses, statuses  # the t_max=5000 trial raised, the sweep went on
    assert "KILLED" in statuses, statuses  # ASHA stopped a weak trial
    best_trial = parent.data.tags["orchestrate.best_trial"]
    for trial_id, row in table.items():
        if row[1] == "KILLED":  # stopped at a rung, and weaker there than the winner at the end
            assert int(row[2]) < 20 and float(row[3]) > float(table[best_trial][3])
    assert by_trial[best_trial].info.status == "FINISHED"
    assert "best_loss" in parent.data.metrics
    arts = {a.path for a in tracking.client(uri).list_artifacts(parent.info.run_id)}
    assert {"results.csv", "trials.json", "metric_across_trials.png", "sweep.json", "best_config.json", "report"} <= arts
    logged = {a.path for a in tracking.client(uri).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/importances.json", "report/history_loss.png"} <= logged, logged

    # the report again, after the fact, into a folder of the user's
    rep = cli("report", "s1", "--tracking-uri", "sqlite:///mlflow.db", "--out", "rep", "--top", "2")
    assert rep.exit_code == 0, rep.output
    page = (workspace / "rep" / "report.html").read_text()
    assert "Top 2 trials" in page and best_trial in page and "data:image/png;base64," in page
    assert "Their samples" in page  # the best trials' final grids, embedded
    finished = statuses.count("FINISHED")
    assert ("importances for loss" in rep.output) == (finished >= 3), (finished, rep.output)
    missing = cli("report", "no-such-sweep", "--tracking-uri", "sqlite:///mlflow.db")
    assert missing.exit_code == 2 and "no sweep named 'no-such-sweep'" in " ".join(missing.output.split())

    out = cli("best", "ddpm_finetune", "--metric", "loss", "--mode", "min", "--tracking-uri",
              "sqlite:///mlflow.db", "--top", "3", "--export", "best.yaml")
    assert out.exit_code == 0, out.output
    assert best_trial in out.output
    exported = yaml.safe_load((workspace / "best.yaml").read_text())
    best_lr = float(by_trial[best_trial].data.params["method_config.lr"])
    assert exported["method_config"]["lr"] == pytest.approx(best_lr)
    again = cli("train", "ddpm_finetune", "--config", "best.yaml", "--name", "from-best", *URI_ARGS)
    assert again.exit_code == 0, again.output
    c = tracking.client(uri)
    trained = tracking.find_run(uri, c.get_experiment_by_name("ddpm_finetune").experiment_id, "from-best")
    assert trained.info.status == "FINISHED"
    assert float(trained.data.params["method_config.lr"]) == pytest.approx(best_lr)


def test_multi_objective_sweep_reports_a_pareto_front(ray_local, workspace):
    task = write_tiny_task(workspace)
    space = write_space(workspace, {"lr": {"loguniform": [1e-5, 3e-3]}, "ema_decay": None, "weight_decay": None})
    # quality and diversity, in the domain encoder's feature space
    res = cli(*sweep_args(task, space, "--num-samples", "4", "--metric", "fid_domain", "--mode", "min",
                          "--metric", "intra_dist_domain", "--mode", "max", "--name", "mo"))
    assert res.exit_code == 0, res.output
    assert "Pareto front" in res.output
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    parent = parent_run(uri, "mo")
    front = yaml.safe_load(open(tracking.client(uri).download_artifacts(parent.info.run_id, "pareto_front.json")))
    assert 1 <= len(front) <= 4
    logged = {a.path for a in tracking.client(uri).list_artifacts(parent.info.run_id, "report")}
    assert "report/pareto_front.png" in logged, logged
    assert all(k.info.status == "FINISHED" for k in children(uri, parent.info.run_id))


def test_killed_sweep_resumes_with_every_trial_once(ray_local, workspace):
    task = write_tiny_task(workspace)
    space = write_space(workspace, {"lr": {"loguniform": [1e-4, 3e-3]}, "ema_decay": None, "weight_decay": None})
    args = sweep_args(task, space, "--num-samples", "5", "--max-concurrent", "2", "--metric", "loss",
                      "--scheduler", "fifo", "--name", "killed", "--set", "run.steps=60", "--set", "run.report_every=5")
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONUNBUFFERED": "1", "ORCHESTRATE_LEASE_TTL_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=workspace, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            # Tune's folder appears after the driver created the MLflow store (reading a SQLite
            # store while another process creates it races)
            parent = parent_run(uri, "killed") if (workspace / "runs" / "killed").exists() else None
            if parent and any(k.info.status == "FINISHED" for k in children(uri, parent.info.run_id)):
                break
            time.sleep(1)
        else:
            pytest.fail("no trial finished within 400 s")
        time.sleep(3)  # let a second wave of trials start, then kill the driver mid-way
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    snapshot = children(uri, parent.info.run_id)
    before = {k.data.tags["orchestrate.trial_id"]: k.info.status for k in snapshot}
    # how often each run was reopened before the kill: a trial that Tune retried inside the first
    # driver (its process died, or it raised) was reopened there already
    reopened = {k.data.tags["orchestrate.trial_id"]: k.data.tags.get("orchestrate.resumed") for k in snapshot}
    assert 1 <= len(before) < 5 or "RUNNING" in before.values()

    time.sleep(4)  # the killed driver's lease goes stale
    res = cli("sweep", "ddpm_finetune", "--resume", "killed", *URI_ARGS)
    assert res.exit_code == 0, res.output
    parent = parent_run(uri, "killed")
    assert parent.info.status == "FINISHED"
    kids = children(uri, parent.info.run_id)
    ids = [k.data.tags["orchestrate.trial_id"] for k in kids]
    assert len(ids) == 5 and len(set(ids)) == 5  # every trial exactly once in MLflow
    assert all(k.info.status == "FINISHED" for k in kids)
    for trial_id, status in before.items():  # finished trials were not run again by the resume
        if status == "FINISHED":
            k = next(k for k in kids if k.data.tags["orchestrate.trial_id"] == trial_id)
            assert k.data.tags.get("orchestrate.resumed") == reopened[trial_id], (trial_id, before, k.data.tags)
    rows = open(tracking.client(uri).download_artifacts(parent.info.run_id, "results.csv")).read().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == sorted(ids)  # and exactly once in Tune's results
    # the kept Optuna study holds every trial with its params and value; none is left RUNNING
    from optuna.trial import TrialState

    _, trials = recorded(uri, "killed")
    study = study_trials(workspace, "killed")
    done = {round(t.params["lr"], 15): t.values[0] for t in study if t.state == TrialState.COMPLETE}
    assert sorted(done) == pytest.approx(sorted(t["config"]["lr"] for t in trials))
    for t in trials:
        # A trial that started after the resume was told once: the study holds its value. One that
        # had started before the kill may have been told COMPLETE to Optuna after Tune's last saved
        # state (even one MLflow shows FINISHED): Tune reruns its end and reports again, which
        # Optuna cannot take (finished trials are final), so the study keeps the first value. (One
        # whose first record was closed otherwise is added again: orchestrator.search.study.record_missing.)
        if t["trial_id"] not in before:
            assert done[round(t["config"]["lr"], 15)] == pytest.approx(t["loss"]), t
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in study)


def test_ddpm_pa_sweep_with_its_default_space_and_objective(ray_local, workspace):
    task = write_tiny_task(workspace)
    args = ["sweep", "ddpm_pa", "--task", str(task), "--num-samples", "2", "--name", "pa", *URI_ARGS]
    for s in TINY_RUN:
        args += ["--set", s]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("ddpm_pa")
    parent = tracking.find_run(uri, exp.experiment_id, "pa")
    space = {k for k in parent.data.params if k.startswith("space.")}
    assert {"space.lambda_img", "space.lambda_hf", "space.lambda_hfmse", "space.pair_t_max", "space.pair_min_snr",
            "space.lr"} <= space
    assert "best_fid_domain" in parent.data.metrics  # the default objective
    best_id = parent.data.tags["orchestrate.best_trial"]
    out = cli("best", "ddpm_pa", "--tracking-uri", "sqlite:///mlflow.db")
    assert out.exit_code == 0 and best_id in out.output and "fid_domain" in out.output


def study_trials(workspace, name):
    """The kept Optuna study of sweep ``name`` (runs/NAME/study.db): trial -> (state, params, values)."""
    from orchestrator.search.study import load

    st = load(f"sqlite:///{workspace / 'runs' / name / 'study.db'}", name)
    return st.get_trials(deepcopy=False)


def recorded(uri, name):
    parent = parent_run(uri, name)
    import json

    return parent, json.loads(open(tracking.client(uri).download_artifacts(parent.info.run_id, "trials.json")).read())


def test_the_study_is_kept_continued_with_more_and_warm_starts_a_new_sweep(ray_local, workspace):
    from optuna.trial import TrialState

    task = write_tiny_task(workspace)
    space = write_space(workspace, {"lr": {"loguniform": [1e-5, 3e-3]}, "ema_decay": None, "weight_decay": None})
    fast = ["--scheduler", "fifo", "--metric", "loss", "--set", "run.steps=10", "--set", "run.report_every=5"]
    res = cli(*sweep_args(task, space, "--num-samples", "3", "--name", "kept", *fast))
    assert res.exit_code == 0, res.output
    assert "optuna-dashboard sqlite:///" in " ".join(res.output.split())
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _, trials = recorded(uri, "kept")
    study = study_trials(workspace, "kept")
    assert [t.state for t in study] == [TrialState.COMPLETE] * 3
    assert sorted(t.params["lr"] for t in study) == pytest.approx(sorted(t["config"]["lr"] for t in trials))
    assert sorted(t.values[0] for t in study) == pytest.approx(sorted(t["loss"] for t in trials))

    # exactly N more, in the same study: the new round's sampler sees the first three
    res = cli("sweep", "ddpm_finetune", "--resume", "kept", "--more", "3", *URI_ARGS)
    assert res.exit_code == 0, res.output
    parent, trials = recorded(uri, "kept")
    assert parent.info.status == "FINISHED" and parent.data.tags["orchestrate.rounds"] == "1"
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6
    assert len(children(uri, parent.info.run_id)) == 6
    study = study_trials(workspace, "kept")
    assert [t.state for t in study] == [TrialState.COMPLETE] * 6
    assert (workspace / "runs" / "kept" / "round1").is_dir()
    assert len({round(t.params["lr"], 12) for t in study}) == 6  # round 1 did not redraw round 0's start-up
    again = cli("sweep", "ddpm_finetune", "--resume", "kept", "--more", "0", *URI_ARGS)
    assert again.exit_code == 2 and "--more 0" in again.output

    # a new sweep that starts from the old one's two best configs
    best2 = sorted(trials, key=lambda t: t["loss"])[:2]
    res = cli(*sweep_args(task, space, "--num-samples", "3", "--name", "warm", "--warm-start", "kept", "--top", "2",
                          *fast))
    assert res.exit_code == 0, res.output
    parent, warm = recorded(uri, "warm")
    assert parent.data.tags["orchestrate.warm_start"] == "kept"
    first = sorted(study_trials(workspace, "warm"), key=lambda t: t.number)[:2]
    assert [t.params["lr"] for t in first] == pytest.approx([t["config"]["lr"] for t in best2])
    assert len(warm) == 3
