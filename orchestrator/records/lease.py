"""One writer per run: a lease kept in the MLflow run itself, where every node can see it.

The invocation that trains a run (``train``, ``pretrain``, a sweep's parent, a lifelong sequence's
parent) takes the run's lease before anything starts: the tag ``orchestrate.lease`` holds the owner
(host, pid), when it was taken and a heartbeat that a daemon thread renews every ``ttl/4``
seconds. A second invocation of the same run while the heartbeat is fresh is refused, naming the
run and where its owner runs. A lease whose heartbeat is older than its ``ttl`` belongs to an
invocation that died without a word (``kill -9``, a lost node): it is *stale*, the run is shown
as such by ``orchestrate runs``, and the next invocation takes it over and resumes the run.

MLflow has no compare-and-swap, so taking a lease writes it and reads it back after a short
pause: of two invocations that write at the same moment, the one whose write did not survive
backs off.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from orchestrator.records import tracking

TAG_LEASE = "orchestrate.lease"


def default_ttl() -> float:
    """Seconds without a heartbeat after which a lease is stale (``ORCHESTRATE_LEASE_TTL_S``)."""
    return float(os.environ.get("ORCHESTRATE_LEASE_TTL_S", "60"))


class RunBusyError(RuntimeError):
    """Another live invocation holds the run's lease."""


@dataclass
class LeaseInfo:
    owner: str
    host: str
    pid: int
    token: str
    taken: float
    heartbeat: float
    ttl: float

    @property
    def age(self) -> float:
        return time.time() - self.heartbeat

    @property
    def live(self) -> bool:
        return self.age <= self.ttl

    def describe(self) -> str:
        return f"{self.owner} (pid {self.pid} on {self.host}; last heartbeat {self.age:.0f} s ago)"


def read(run) -> LeaseInfo | None:
    """The lease recorded on an MLflow run object, if any."""
    raw = run.data.tags.get(TAG_LEASE)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return LeaseInfo(**d)
    except (ValueError, TypeError):
        return None


def state(run) -> str:
    """``live`` / ``stale`` / ``released`` / ``none`` for a RUNNING run; ``-`` otherwise."""
    if run.info.status != "RUNNING":
        return "-"
    lease = read(run)
    if lease is None:
        return "none"
    if lease.pid < 0:
        return "released"
    return "live" if lease.live else "stale"


def store_exists(tracking_uri: str) -> bool:
    """False when ``tracking_uri`` is a local store (SQLite file, folder) that does not exist yet:
    it holds no run, and a check that only reads must not create it."""
    from pathlib import Path

    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).is_file()
    if "://" not in tracking_uri or tracking_uri.startswith("file:"):
        return Path(tracking_uri.removeprefix("file://")).exists()
    return True


def find_existing(tracking_uri: str, experiment: str, name: str, parent_run_id: str | None = None):
    """The newest run ``name`` of ``experiment`` (None when the store, the experiment or the run
    does not exist); creates nothing."""
    if not store_exists(tracking_uri):
        return None
    exp = tracking.client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    return tracking.find_run(tracking_uri, exp.experiment_id, name, parent_run_id)


def check_free(run, what: str) -> None:
    """Before Ray starts: refuse (``RunBusyError``) a run whose lease a live invocation holds, as
    ``Lease.acquire`` would after Ray had started. (``acquire`` still decides: this is the early,
    cheap answer for the common case of a second invocation.)"""
    if run is None or state(run) != "live":
        return
    current = read(run)
    raise RunBusyError(f"{what} is being trained by another invocation: {current.describe()}; wait for it, or "
                       f"stop it (its lease goes stale {current.ttl:.0f} s after its last heartbeat)")


class Lease:
    """A held lease; ``release()`` (or leaving the ``with`` block) ends its heartbeat."""

    def __init__(self, tracking_uri: str, run_id: str, what: str, ttl: float | None = None):
        self.uri, self.run_id, self.what = tracking_uri, run_id, what
        self.ttl = ttl if ttl is not None else default_ttl()
        self.info = LeaseInfo(owner=f"{socket.gethostname()}:{os.getpid()}", host=socket.gethostname(),
                              pid=os.getpid(), token=uuid.uuid4().hex, taken=time.time(), heartbeat=time.time(),
                              ttl=self.ttl)
        self.took_over: LeaseInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.info.heartbeat = time.time()
        tracking.client(self.uri).set_tag(self.run_id, TAG_LEASE, json.dumps(self.info.__dict__))

    def acquire(self) -> "Lease":
        c = tracking.client(self.uri)
        current = read(c.get_run(self.run_id))
        if current is not None and current.token != self.info.token and current.pid >= 0 and current.live:
            raise RunBusyError(f"{self.what} is being trained by another invocation: {current.describe()}; "
                               f"wait for it, or stop it (its lease goes stale {current.ttl:.0f} s after its "
                               "last heartbeat)")
        if current is not None and current.pid >= 0 and not current.live:
            self.took_over = current
        self._write()
        time.sleep(0.3)  # no compare-and-swap in MLflow: write, then check that our write survived
        mine = read(c.get_run(self.run_id))
        if mine is None or mine.token != self.info.token:
            raise RunBusyError(f"{self.what} was claimed at the same moment by another invocation"
                               + (f": {mine.describe()}" if mine else ""))
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._write()
            except Exception:  # a transient tracking-server error: try again at the next beat
                pass

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (the run may be resumed at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.info.pid = -1
            self._write()
        except Exception:
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
