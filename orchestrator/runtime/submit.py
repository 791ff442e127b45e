"""``orchestrate submit``: any ``orchestrate`` command run on a Ray cluster as a Ray Job.

Why Jobs and not a driver on the laptop (Ray Client, ``ray://HEAD:10001``): Ray's documentation
says Ray Client "may not work as expected" for Ray Tune and Ray Train and recommends the Jobs API
for running a driver on a cluster
(https://docs.ray.io/en/latest/cluster/running-applications/job-submission/index.html,
https://docs.ray.io/en/latest/cluster/running-applications/job-submission/ray-client.html); and a
Ray Client driver dies with the laptop's connection (a lid closed mid-sweep ends the sweep). A Job's
driver is a process on the head node: the submitting machine may go away, and the Jobs API is the
same on a ``ray up`` cluster (the dashboard port, 8265) and on KubeRay (the head service's 8265;
RayJob resources submit through it too).

What is submitted: this checkout as the job's ``working_dir`` (local state left out: ``EXCLUDES``,
the same list as cluster.yaml's ``rsync_exclude`` and deploy/Dockerfile.dockerignore), so the
cluster runs the code you have here, and the entrypoint ``python -m orchestrator.cli COMMAND...``
(the uploaded copy comes first on the driver's and the workers' path). Relative paths in the
command are relative to the checkout's root there.

Stopping: ``ray job stop ID`` makes Ray send SIGTERM to the entrypoint and all its descendants,
then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s by default, read by the job's supervisor
actor, which gets the job's runtime-env variables: ray/dashboard/modules/job/job_supervisor.py).
orchestrator.core.interrupts turns SIGTERM into the same path as Ctrl-C (runs recorded KILLED, the
resume command printed), and ``STOP_GRACE_S`` gives that path the time it needs. Ctrl-C in
``submit`` only stops following the logs: the job runs on.

Exit code: the job's own (its driver's exit code: 0 done, 1 failed while training, 2 refused);
130 when the job was stopped, or when following was interrupted.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from orchestrator.core.config import InputError

# Local state that is no part of the code (and could be large, or hold secrets): never uploaded.
EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlartifacts", "mlflow.db", ".orchestrate", "**/__pycache__",
            "*.egg-info", ".pytest_cache", "build", "dist"]
# Seconds a stopped job's driver has between SIGTERM and SIGKILL to record its runs KILLED
# (closing a sweep's trials and the MLflow runs takes a few seconds, more than Ray's default 3).
STOP_GRACE_S = 60
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(InputError):
    """A submission refused before anything runs on the cluster (one line)."""


@dataclass
class Job:
    """What ``submit`` sends: the Jobs API's ``submit_job`` arguments."""
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


def project_root() -> Path:
    """The checkout this module runs from (the folder with pyproject.toml and orchestrator/)."""
    root = Path(__file__).resolve().parents[2]  # orchestrator/runtime/submit.py
    if not ((root / "pyproject.toml").is_file() and (root / "orchestrator").is_dir() and (root / "trainers").is_dir()):
        raise SubmitError(f"orchestrate submit uploads the project's checkout, but {root} is not one (no "
                          "pyproject.toml, orchestrator/ and trainers/ there): run it from a clone of the repository")
    return root


def check_command(command: list[str], commands) -> None:
    """Parse ``command`` as the CLI would (``commands``: the CLI's click group, given by the CLI so
    that this module does not import it), here, before anything is uploaded: a typo fails now
    instead of minutes later on the cluster."""
    if not command:
        raise SubmitError("orchestrate submit needs a command to run, e.g. "
                          "`orchestrate submit --address http://HEAD:8265 -- sweep ddpm_pa`")
    group = commands
    names = sorted(group.list_commands(None))  # type: ignore[attr-defined]
    if command[0] == "submit":
        raise SubmitError("orchestrate submit -- submit ...: the command to run on the cluster cannot be submit")
    sub = group.get_command(None, command[0])  # type: ignore[attr-defined]
    if sub is None:
        raise SubmitError(f"orchestrate submit: {command[0]!r} is not an orchestrate command (one of: {', '.join(names)})")
    try:
        sub.make_context(command[0], list(command[1:]))
    except Exception as exc:  # typer's (vendored) click: UsageError and its kind, or Exit after --help
        if hasattr(exc, "format_message"):
            raise SubmitError(f"orchestrate submit -- {command[0]}: {exc.format_message()}") from None
        if type(exc).__name__ != "Exit":
            raise


def cluster_paths(command: list[str], root: Path, cwd: Path | None = None) -> tuple[list[str], list[str]]:
    """The command with its local paths as the job sees them (the job runs in the uploaded copy of
    ``root``: a path inside the checkout becomes relative to its root), and a warning for each path
    the cluster will not have from the upload (outside the checkout, or in a folder left out)."""
    cwd = cwd or Path.cwd()
    out, warnings = [], []
    for arg in command:
        prefix, value = (arg.split("=", 1)[0] + "=", arg.split("=", 1)[1]) if arg.startswith("--") and "=" in arg \
            else ("", arg)
        local = Path(value).expanduser()
        local = local if local.is_absolute() else cwd / local
        if not value or value.startswith("-") or "://" in value or not local.exists():
            out.append(arg)  # not a local path (an option, a URI, a built-in task, a run name)
            continue
        local = local.resolve()
        try:
            rel = local.relative_to(root)
        except ValueError:
            warnings.append(f"{value} is outside the uploaded checkout {root}: the job reads {local} on the cluster")
            out.append(prefix + str(local))
            continue
        if rel.parts and any(rel.parts[0] == e or rel.match(e) for e in EXCLUDES):
            warnings.append(f"{value} is under {rel.parts[0]}, which is not uploaded: the job reads its own {rel}")
        out.append(prefix + (str(rel) if rel.parts else "."))
    return out, warnings


def build_job(command: list[str], env: dict[str, str] | None = None, stop_grace_s: int = STOP_GRACE_S,
              root: Path | None = None) -> Job:
    root = root or project_root()
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace_s)), "PYTHONUNBUFFERED": "1", **(env or {})}
    return Job(entrypoint="python -m orchestrator.cli " + shlex.join(command),
               runtime_env={"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars},
               metadata={"orchestrate": shlex.join(command)})


def parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise SubmitError(f"--env {p!r}: expected KEY=VALUE")
        out[key] = value
    return out


def client(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (or ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``).
    It sends the Ray token itself when ``RAY_AUTH_MODE=token`` (from ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)."""
    from ray.job_submission import JobSubmissionClient

    where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not where:
        raise SubmitError("orchestrate submit: no cluster given: --address http://HEAD:8265 (the Ray dashboard's "
                          "port; `ray dashboard cluster.yaml` or `kubectl port-forward svc/fewshot-head-svc 8265` "
                          "forwards it), or set RAY_API_SERVER_ADDRESS")
    try:
        return JobSubmissionClient(where)
    except Exception as exc:  # connection refused, a 401/403 from a token mismatch, a bad address
        raise SubmitError(f"orchestrate submit: the Ray Jobs API at {where} did not answer: {_one_line(exc)}"
                          + _auth_hint(exc)) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _auth_hint(exc: BaseException) -> str:
    text = str(exc).lower()
    if any(k in text for k in ("401", "403", "unauthorized", "forbidden", "token")):
        return (" (the cluster uses token authentication: set RAY_AUTH_MODE=token and its token in "
                "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    return ""


def submit(command: list[str], *, commands, address: str | None = None, wait: bool = True, env: list[str] | None = None,
           stop_grace_s: int = STOP_GRACE_S, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Submit ``orchestrate COMMAND...`` as a Ray Job; follow its logs unless ``wait`` is False.
    ``commands``: the CLI's click group (see ``check_command``). Returns the exit code for
    ``orchestrate submit``."""
    out = out or sys.stdout
    err = err or sys.stderr
    check_command(command, commands)
    root = project_root()
    command, warnings = cluster_paths(command, root)
    for w in warnings:
        print(f"warning: {w}", file=err, flush=True)
    job = build_job(command, env=parse_env(env or []), stop_grace_s=stop_grace_s, root=root)
    jobs = client(address)
    where = jobs.get_address()
    try:
        job_id = jobs.submit_job(entrypoint=job.entrypoint, runtime_env=job.runtime_env, metadata=job.metadata)
    except Exception as exc:
        raise SubmitError(f"orchestrate submit: the cluster at {where} refused the job: {_one_line(exc)}"
                          + _auth_hint(exc)) from None
    logs, stop = (f"ray job logs {job_id} --address {where} --follow", f"ray job stop {job_id} --address {where}")
    print(f"submitted {job_id} to {where}: orchestrate {shlex.join(command)}", file=out, flush=True)
    print(f"  logs: {logs}\n  stop: {stop} (its runs are recorded KILLED; submit the same command again to resume)",
          file=out, flush=True)
    if not wait:
        return 0
    try:
        status, exit_code, message = asyncio.run(_follow(jobs, job_id, out, err))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} continues on the cluster. Its logs: {logs}; to stop it: {stop}",
              file=err, flush=True)
        return 130
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        print(f"job {job_id} was stopped: its runs are recorded KILLED; submit the same command again to resume",
              file=err, flush=True)
        return 130
    if exit_code is None:  # never ran its driver (e.g. the runtime environment failed to build)
        print(f"job {job_id} {status}: {message.strip().splitlines()[0] if message.strip() else 'no message'} "
              f"(full logs: {logs.replace(' --follow', '')})", file=err, flush=True)
        return 1
    return exit_code


async def _follow(jobs, job_id: str, out: TextIO, err: TextIO) -> tuple[str, int | None, str]:
    """Stream the job's logs until it ends; then its status, driver exit code and message."""
    try:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
    except Exception as exc:  # the log stream broke (the head restarted, a proxy timed out): poll instead
        print(f"warning: the log stream of {job_id} ended ({_one_line(exc)}); waiting for the job to end",
              file=err, flush=True)
    while True:
        info = jobs.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            return status, info.driver_exit_code, info.message or ""
        await asyncio.sleep(2)
