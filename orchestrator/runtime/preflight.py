"""Checks that run in the driver before Ray starts, each failing in one line that names the key,
the value and what was expected (exit code 2): the tracking URI answers, the working directory
and the run storage are writable. Data and source-model checks are in ``orchestrator.runs.inputs``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.core.config import InputError
from orchestrator.data.storage import check_writable, is_remote, storage_uri

TRACKING_TIMEOUT_S = 10.0
# Commands that only read MLflow (runs, best) must answer within 10 s even when nothing listens:
# urlopen's timeout applies to the connection and again to the answer, so half of it each.
READ_TIMEOUT_S = 4.0


def tracking_source(flag: str | None) -> str:
    """Where the tracking URI came from, as a message names it: the flag, the environment variable,
    or the default (a user who never typed --tracking-uri must not be told to fix it)."""
    if flag:
        return "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "the default tracking URI"


def check_tracking(uri: str, timeout: float = TRACKING_TIMEOUT_S, source: str = "--tracking-uri",
                   write: bool = True) -> None:
    """An MLflow server answers ``/health`` within ``timeout`` s; with ``write``, a SQLite store's
    folder is writable. ``source``: where ``uri`` came from (:func:`tracking_source`)."""
    where = f"{source}={uri}" if source == "MLFLOW_TRACKING_URI" else f"{source} {uri}"
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status == 200:
                    return
                raise InputError(f"{where}: {url} answered HTTP {r.status}, expected an MLflow server")
        except urllib.error.HTTPError as exc:
            raise InputError(f"{where}: {url} answered HTTP {exc.code}, expected an MLflow server") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(f"{where}: no MLflow server answered within {timeout:g} s ({reason})") from None
    if uri.startswith("sqlite:///") and write:
        db = Path(uri[len("sqlite:///"):])
        folder = db.parent
        if not folder.is_dir():
            raise InputError(f"{where}: the folder {folder} does not exist")
        if db.exists() and not os.access(db, os.W_OK):
            raise InputError(f"{where}: the MLflow store {db} is not writable")
        if not db.exists() and not os.access(folder, os.W_OK):
            raise InputError(f"{where}: cannot create the MLflow store {db}: the folder {folder} "
                             "is not writable (use --tracking-uri or run from a writable folder)")


def check_tracking_readable(tracking_uri: str | None) -> str:
    """For commands that only read MLflow (``runs``, ``best``): the resolved URI, once a server
    behind it answered within :data:`READ_TIMEOUT_S` (MLflow's own client retries an unreachable
    server for minutes, silently)."""
    from orchestrator.records.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking(uri, READ_TIMEOUT_S, tracking_source(tracking_uri), write=False)
    return uri


def check_storage(storage: str | None) -> str:
    uri = storage_uri(storage)
    try:
        check_writable(uri, "--storage")
    except PermissionError as exc:
        hint = "" if is_remote(uri) else " (use --storage or run from a writable folder)"
        raise InputError(f"{exc}{hint}") from None
    return uri


def check_working_dir() -> None:
    cwd = Path.cwd()
    if not os.access(cwd, os.W_OK):
        raise InputError(f"the working directory {cwd} is not writable: runs/, mlflow.db and mlartifacts/ "
                         "are kept there by default (run from a writable folder, or give --storage and "
                         "--tracking-uri)")


def check_all(tracking_uri: str | None, storage: str | None) -> tuple[str, str]:
    """Every URI check; returns the resolved (tracking URI, storage URI)."""
    from orchestrator.records.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) or not (storage or os.environ.get("ORCHESTRATE_STORAGE")):
        check_working_dir()
    check_tracking(uri, source=tracking_source(tracking_uri))
    return uri, check_storage(storage)
