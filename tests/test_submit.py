"""``orchestrate submit``: commands run on a cluster as Ray Jobs.

Fast: what is sent (the checkout as working_dir without local state, ``python -m
orchestrator.cli ...``, the stop grace period the RayJob manifest uses too), and what is refused
here before anything is uploaded. Slow, on a Ray head of the test's own (tests/raynode.py: its
own mount namespace, token authentication, the node environment a cluster gives its processes):
``ray job stop`` reaches the driver as SIGTERM and the run is recorded KILLED, then the same
command submitted again resumes it; a job outlives the process that submitted it (killed right
after submission); ``submit`` exits with the job's exit code.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import typer
import yaml

from orchestrator.records import tracking
from orchestrator.cli import app
from orchestrator.runtime.submit import EXCLUDES, STOP_GRACE_S, SubmitError, build_job, check_command, cluster_paths
from tests.deploy import REPO, one
from tests.harness import BIN, can_isolate
from tests.raynode import IsolatedHead
from tests.tiny import TINY_RUN, TINY_TASK


def test_the_job_is_this_checkout_without_local_state_and_the_cli_as_entrypoint():
    job = build_job(["sweep", "ddpm_pa", "--set", "lr=1e-4", "--name", "a b"])
    assert job.entrypoint == "python -m orchestrator.cli sweep ddpm_pa --set lr=1e-4 --name 'a b'"
    assert job.runtime_env["working_dir"] == str(REPO)
    for name in (".git", ".venv", "runs", "mlartifacts", "mlflow.db", "mlruns"):
        assert name in job.runtime_env["excludes"]
    assert job.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(STOP_GRACE_S)


def test_uploads_images_and_rsync_leave_out_the_same_local_state():
    ignore = [l.strip() for l in (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    assert sorted(EXCLUDES) == sorted(ignore)


def test_the_rayjob_manifest_gives_a_stopped_driver_the_same_grace():
    env = yaml.safe_load(one("RayJob")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == str(STOP_GRACE_S)


@pytest.mark.parametrize("command,needle", [
    ([], "needs a command"),
    (["submit", "--", "train"], "cannot be submit"),
    (["swep", "ddpm_pa"], "'swep' is not an orchestrate command"),
    (["sweep", "ddpm_pa", "--no-such-flag"], "No such option: --no-such-flag"),
    (["sweep"], "Missing argument"),
])
def test_a_bad_command_is_refused_before_anything_is_uploaded(command, needle):
    with pytest.raises(SubmitError, match=re.escape(needle)):
        check_command(command, typer.main.get_command(app))


def test_local_paths_become_paths_in_the_uploaded_checkout(tmp_path):
    sub = REPO / "tasks"
    cmd, warnings = cluster_paths(["sweep", "x", "--task", "synthetic-sketch.yaml", f"--space={REPO}/tasks/sequence1.yaml",
                                   "--storage", "s3://b/p", "--tracking-uri", "http://h:5000", "synthetic:sketch",
                                   "--tasks", str(tmp_path)], REPO, cwd=sub)
    assert cmd[:4] == ["sweep", "x", "--task", "tasks/synthetic-sketch.yaml"]
    assert cmd[4] == "--space=tasks/sequence1.yaml"
    assert cmd[5:10] == ["--storage", "s3://b/p", "--tracking-uri", "http://h:5000", "synthetic:sketch"]
    assert len(warnings) == 1 and "outside the uploaded checkout" in warnings[0]


def run_submit(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unreachable_cluster_is_one_line_and_exit_2():
    res = run_submit("--address", "http://127.0.0.1:1", "--", "methods")
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and err.startswith("error: orchestrate submit: the Ray Jobs API at http://127.0.0.1:1")
    assert "Traceback" not in res.stderr


# -- on a Ray head ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head(tiny_sources):
    why = can_isolate()
    if why:
        pytest.skip(why)
    h = IsolatedHead("jobs")
    try:
        shutil.copytree(tiny_sources, h.base / "cache" / "sources")
        (h.base / "tiny.yaml").write_text(yaml.safe_dump(TINY_TASK))
        # the node environment that cluster.yaml / the KubeRay ConfigMap give every Ray process
        h.env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{h.base / 'mlflow.db'}", "ORCHESTRATE_STORAGE": str(h.base / "runs"),
                      "ORCHESTRATE_CACHE": str(h.base / "cache"), "ORCHESTRATE_OFFLINE": "1",
                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
        # the schema is made once, as a cluster's MLflow server has it before any job: a job's
        # driver and this test opening a new SQLite file at the same moment race in its migration
        tracking.client(h.env["MLFLOW_TRACKING_URI"]).search_experiments()
        h.start("--num-cpus=2")
        yield h
    finally:
        h.stop()


def client_env(h: IsolatedHead) -> dict:
    """A laptop's: the cluster's token, nothing of the node environment."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": h.token}


def jobs_client(h: IsolatedHead, monkeypatch):
    """The test's own view of the job (status, logs), with the cluster's token. The token goes in
    an explicit Authorization header: Ray's token loader reads RAY_AUTH_TOKEN once per process and
    keeps it, and this pytest process may already have loaded another (or none) for an earlier
    Ray instance of the session; a header the caller gives is sent as is."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", h.token)
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(h.dashboard, headers={"Authorization": f"Bearer {h.token}"})


def train_args(h: IsolatedHead, name: str, steps: int) -> list[str]:
    sets = [*TINY_RUN, f"run.steps={steps}", "run.report_every=5", "run.sample_every=1000"]
    return ["train", "ddpm_finetune", "--task", str(h.base / "tiny.yaml"), "--name", name,
            *[x for s in sets for x in ("--set", s)]]


def job_id_of(text: str) -> str:
    m = re.search(r"submitted (\S+) to ", text)
    assert m, text[-3000:]
    return m.group(1)


def wait_status(jobs, job_id: str, want: tuple[str, ...], timeout: float, h: IsolatedHead) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(jobs.get_job_status(job_id))
        status = status.split(".")[-1]
        if status in want:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} not {want} within {timeout} s: {status}\n{jobs.get_job_logs(job_id)[-3000:]}"
                         f"\n{h.tails()}")


def wait_training(h: IsolatedHead, name: str, jobs, job_id: str, timeout: float = 300):
    uri = f"sqlite:///{h.base / 'mlflow.db'}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (h.base / "mlflow.db").exists():
            c = tracking.client(uri)
            exp = c.get_experiment_by_name("ddpm_finetune")
            run = tracking.find_run(uri, exp.experiment_id, name) if exp else None
            if run is not None and tracking.logged_step(uri, run.info.run_id, "orchestrate.logged_step") > 0:
                return uri, run
        assert str(jobs.get_job_status(job_id)).split(".")[-1] in ("PENDING", "RUNNING"), jobs.get_job_logs(job_id)
        time.sleep(1)
    raise AssertionError(f"{name} did not start training within {timeout} s\n{jobs.get_job_logs(job_id)[-3000:]}")


@pytest.mark.slow
def test_ray_job_stop_records_the_run_killed_and_the_same_command_resumes_it(head, monkeypatch):
    jobs = jobs_client(head, monkeypatch)
    args = train_args(head, "jobstop", steps=200)
    res = run_submit("--address", head.dashboard, "--no-wait", "--", *args, env=client_env(head))
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = job_id_of(res.stdout)
    assert f"ray job stop {job_id}" in res.stdout and f"ray job logs {job_id}" in res.stdout
    uri, run = wait_training(head, "jobstop", jobs, job_id)

    # the documented command; Ray sends SIGTERM to the entrypoint and its descendants
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", job_id, "--address", head.dashboard],
                          env={**os.environ, **client_env(head)}, capture_output=True, text=True, timeout=180)
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    assert wait_status(jobs, job_id, ("STOPPED", "FAILED", "SUCCEEDED"), 120, head) == "STOPPED"
    logs = " ".join(jobs.get_job_logs(job_id).split())
    assert "jobstop is recorded KILLED in MLflow; to resume it, run the same command again" in logs, logs[-3000:]
    stopped = tracking.client(uri).get_run(run.info.run_id)
    assert stopped.info.status == "KILLED"
    killed_at = tracking.logged_step(uri, run.info.run_id, "orchestrate.logged_step")
    assert 0 < killed_at < 200

    # the same command, followed this time: it resumes the run and exits with the job's code
    res = run_submit("--address", head.dashboard, "--", *args, env=client_env(head), timeout=900)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "done" in res.stdout  # the driver's own output, streamed
    done = tracking.client(uri).get_run(run.info.run_id)
    assert done.info.status == "FINISHED" and done.data.tags.get("orchestrate.resumed") == "1"
    assert tracking.logged_step(uri, run.info.run_id, "orchestrate.logged_step") == 200


@pytest.mark.slow
def test_the_job_outlives_the_process_that_submitted_it(head, monkeypatch):
    jobs = jobs_client(head, monkeypatch)
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "submit", "--address", head.dashboard, "--",
                             *train_args(head, "detached", steps=30)], cwd=REPO, env={**e, **client_env(head)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = ""
    try:
        deadline = time.time() + 120
        while "submitted " not in seen and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        job_id = job_id_of(seen)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the laptop goes away: no goodbye to the cluster
        proc.wait(timeout=30)
    assert wait_status(jobs, job_id, ("SUCCEEDED", "FAILED", "STOPPED"), 600, head) == "SUCCEEDED"
    uri = f"sqlite:///{head.base / 'mlflow.db'}"
    exp = tracking.client(uri).get_experiment_by_name("ddpm_finetune")
    run = tracking.find_run(uri, exp.experiment_id, "detached")
    assert run.info.status == "FINISHED" and tracking.logged_step(uri, run.info.run_id, "orchestrate.logged_step") == 30


@pytest.mark.slow
def test_submit_exits_with_the_jobs_exit_code(head):
    res = run_submit("--address", head.dashboard, "--", "train", "ddpm_finetune", "--task",
                     str(head.base / "no-such-task.yaml"), env=client_env(head), timeout=300)
    assert res.returncode == 2, (res.stdout[-3000:], res.stderr[-3000:])
    assert "no-such-task.yaml" in res.stdout  # the driver's one-line error, in the streamed logs
