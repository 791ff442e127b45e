"""Runs that stop, fail and are refused as a user expects (the README's fault table):
bad input and impossible requests fail before Ray starts in one line with exit code 2; a second
invocation of a live run is refused; Ctrl-C records KILLED and exits 130; a run left RUNNING by a
killed CLI is shown stale and taken over."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from orchestrator.records import tracking
from tests.tiny import TINY_RUN, experiment_runs, write_tiny_task

URI = ["--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs"]


def run_cli(workspace, *args, env=None, timeout=120):
    """The CLI in a subprocess (as a user runs it); ``timeout`` bounds any hang."""
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=workspace, env=e,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(res, *needles):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in res.stdout
    text = " ".join(err.split())  # rich wraps long lines at the console width
    assert text.startswith("error:"), err
    for n in needles:
        assert n in text, (n, text)
    assert "Ray" not in res.stdout  # nothing started


def sets(extra=()):
    return [x for s in (*TINY_RUN, *extra) for x in ("--set", s)]


def test_gpus_per_trial_without_a_gpu_is_refused_before_ray(workspace):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    task = write_tiny_task(workspace)
    res = run_cli(workspace, "sweep", "ddpm_finetune", "--task", str(task), "--gpus-per-trial", "1", *URI, *sets())
    one_line_error(res, "1 GPU", "0 GPU")


def test_more_workers_than_cores_is_refused_before_ray(workspace):
    task = write_tiny_task(workspace)
    n = (os.cpu_count() or 1) + 1
    res = run_cli(workspace, "train", "ddpm_finetune", "--task", str(task), "--workers", str(n),
                  "--set", "run.cpus_per_worker=1", *URI, *sets())
    one_line_error(res, f"{n} worker(s)", "CPU")


def test_fractional_gpus_with_several_workers_are_refused():
    from orchestrator.runtime.raycluster import NodeShape, ResourceError, check_resources

    with pytest.raises(ResourceError, match="NCCL"):
        check_resources(2, 1.0, 0.5, [NodeShape("node", 8, 4, 1)])
    check_resources(1, 1.0, 0.25, [NodeShape("node", 8, 1, 1)])  # one worker on a quarter GPU: fine
    check_resources(4, 1.0, 0.0, [NodeShape("node type gpu", float("inf"), float("inf"), 8)])  # autoscaler


def test_unreachable_tracking_uri_fails_in_one_line(workspace):
    task = write_tiny_task(workspace)
    res = run_cli(workspace, "train", "ddpm_finetune", "--task", str(task), "--tracking-uri", "http://127.0.0.1:1",
                  "--storage", "runs", *sets(), timeout=60)
    one_line_error(res, "http://127.0.0.1:1", "no MLflow server answered")


def test_read_only_working_directory_is_named(workspace):
    task = write_tiny_task(workspace)
    ro = workspace / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("root ignores the mode bits here")
        res = run_cli(ro, "train", "ddpm_finetune", "--task", str(task), *sets())
        one_line_error(res, str(ro), "not writable")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_read_only_working_directory_is_named_even_as_root(workspace, tmp_path):
    """As root the mode bits do not stop writes: a read-only bind mount does."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and unshare")
    task = write_tiny_task(workspace)
    ro = workspace / "ro"
    ro.mkdir()
    cmd = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && cd {ro} && "
           f"{sys.executable} -m orchestrator.cli train ddpm_finetune --task {task} "
           + " ".join(f"--set {s}" for s in TINY_RUN))
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", cmd], capture_output=True,
                         text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    one_line_error(res, str(ro), "not writable")


def test_missing_source_fails_before_ray_in_one_line(workspace):
    task = write_tiny_task(workspace, source={"model": str(workspace / "nowhere")})
    res = run_cli(workspace, "train", "ddpm_finetune", "--task", str(task), *URI, *sets())
    one_line_error(res, "source.model", "nowhere", "does not exist")


def test_wrong_family_source_fails_before_ray_in_one_line(workspace):
    from trainers.gan.pretrain import GANPretrain, GANPretrainConfig
    from trainers.gan.source import save_gan_source

    g = GANPretrain(GANPretrainConfig(preset="tiny"), 16, "cpu")
    save_gan_source(workspace / "gan", g.g, g.g_ema, g.d)
    task = write_tiny_task(workspace, source={"model": str(workspace / "gan")})  # a ddpm task
    res = run_cli(workspace, "train", "ddpm_finetune", "--task", str(task), *URI, *sets())
    one_line_error(res, "StyleGAN2", "wrong family")


def test_resolution_mismatch_is_refused_and_resize_is_explicit(workspace):
    from trainers.diffusion.backbone import build_unet, default_scheduler, save_source

    save_source(build_unet("tiny", 32), default_scheduler(), workspace / "src32")
    task = write_tiny_task(workspace, source={"model": str(workspace / "src32")})  # the task is at 16 px
    res = run_cli(workspace, "train", "ddpm_finetune", "--task", str(task), *URI, *sets())
    one_line_error(res, "32px", "16px", "resize_to_source")

    from orchestrator.core.config import resolve
    from orchestrator.runs.train import early_source_check

    cfg = resolve("ddpm_finetune", task, overrides={"task.source.resize_to_source": True})
    assert early_source_check(cfg).task.resolution == 32


def test_data_errors_fail_before_ray(workspace):
    (workspace / "few").mkdir()
    task = write_tiny_task(workspace, target={"data": "few", "shots": 4})
    res = run_cli(workspace, "train", "ddpm_finetune", "--task", str(task), *URI, *sets())
    assert res.returncode == 2 and "few" in res.stderr and "Traceback" not in res.stderr


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# -- with Ray: leases and interrupts -------------------------------------------------------------
def _start(workspace, ray_address, *args, ttl="60"):
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1", "ORCHESTRATE_LEASE_TTL_S": ttl}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=workspace, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_running(workspace, experiment: str, name: str, proc, timeout: float = 300):
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (workspace / "runs" / name).exists():
            c = tracking.client(uri)
            exp = c.get_experiment_by_name(experiment)
            run = tracking.find_run(uri, exp.experiment_id, name) if exp else None
            if run is not None and tracking.logged_step(uri, run.info.run_id, "orchestrate.logged_step") > 0:
                return uri, run
        time.sleep(0.5)
    raise AssertionError(f"{name} did not start training within {timeout} s")


@pytest.mark.slow
def test_a_second_invocation_of_a_live_run_is_refused(ray_local, workspace):
    task = write_tiny_task(workspace)
    args = ["train", "ddpm_finetune", "--task", str(task), "--name", "busy", *URI,
            *sets(["run.steps=100", "run.report_every=5", "run.sample_every=1000"])]
    first = _start(workspace, ray_local, *args)
    try:
        _wait_running(workspace, "ddpm_finetune", "busy", first)
        second = run_cli(workspace, *args, env={"RAY_ADDRESS": ray_local})
        assert second.returncode == 2
        text = " ".join(second.stderr.split())
        assert "busy" in text and "another invocation" in text and f"pid {first.pid}" in text
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _, runs = experiment_runs(uri, "ddpm_finetune")
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = [s for s, _ in tracking.metric_history(uri, runs[0].info.run_id, "loss")]
    assert steps == list(range(1, 101))  # one writer: every step once


@pytest.mark.slow
def test_ctrl_c_records_killed_exits_130_and_says_how_to_resume(ray_local, workspace):
    task = write_tiny_task(workspace)
    args = ["train", "ddpm_finetune", "--task", str(task), "--name", "ctrlc", *URI,
            *sets(["run.steps=400", "run.report_every=5", "run.sample_every=1000"])]
    proc = _start(workspace, ray_local, *args)
    try:
        uri, run = _wait_running(workspace, "ddpm_finetune", "ctrlc", proc)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    text = " ".join(err.split())
    assert "KILLED" in text and "run the same command again" in text and "ctrlc" in text
    run = tracking.client(uri).get_run(run.info.run_id)
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_a_killed_cli_leaves_a_stale_run_that_the_next_invocation_takes_over(ray_local, workspace):
    task = write_tiny_task(workspace)
    args = ["train", "ddpm_finetune", "--task", str(task), "--name", "stale", *URI,
            *sets(["run.steps=60", "run.report_every=5", "run.sample_every=1000"])]
    proc = _start(workspace, ray_local, *args, ttl="3")
    try:
        uri, run = _wait_running(workspace, "ddpm_finetune", "stale", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(4)
    listing = run_cli(workspace, "runs", "ddpm_finetune", "--tracking-uri", "sqlite:///mlflow.db")
    assert listing.returncode == 0 and "RUNNING (stale)" in " ".join(listing.stdout.split())
    res = run_cli(workspace, *args, env={"RAY_ADDRESS": ray_local}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tracking.client(uri).get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["orchestrate.resumed"] == "1"


@pytest.mark.slow
def test_a_sigkilled_cli_leaves_no_ray_process_of_its_own(workspace):
    """The CLI started its own Ray (no address); kill -9 of the CLI alone: its watchdog stops the
    Ray processes it had started (GCS, raylet, dashboard and its agents, workers)."""
    import psutil

    task = write_tiny_task(workspace)
    args = ["train", "ddpm_finetune", "--task", str(task), "--name", "orphan", *URI,
            *sets(["run.steps=400", "run.report_every=5", "run.sample_every=1000"])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=workspace, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_running(workspace, "ddpm_finetune", "orphan", proc)
        ray_procs = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "orchestrator.runtime.raycluster" not in " ".join(p.cmdline())]
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_procs)
        proc.kill()  # the CLI alone, as `kill -9 PID` does
        proc.wait()
        gone, alive = psutil.wait_procs(ray_procs, timeout=60)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
