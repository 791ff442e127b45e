"""A sweep's Optuna study, kept: what the sampler learned outlives the driver.

Ray Tune's ``OptunaSearch`` gets an Optuna RDB storage (``optuna.storages.RDBStorage``) and the
sweep's name as the study name, so every trial's parameters, values and state are written to a
database as the sweep runs, and:

- ``orchestrate sweep METHOD --resume NAME`` after a driver kill continues the same study (Tune
  restores its searcher, which reopens the database);
- ``--resume NAME --more N`` runs N more trials as a new round whose sampler loads the study and
  so starts from every earlier trial (``create_study(load_if_exists=True)``);
- ``optuna-dashboard sqlite:///runs/NAME/study.db`` (or the server URL) browses it;
- ``--warm-start OLD --top K`` begins a new sweep with the old sweep's K best configs
  (``OptunaSearch(points_to_evaluate=...)``, which enqueues them as the study's first trials).

Where the study lives: with a local run storage, ``study.db`` (SQLite) in the sweep's own folder,
next to Tune's state. With a remote run storage (``s3://``) SQLite cannot live there: the driver
keeps it under its cache (``ORCHESTRATE_CACHE``/studies) and copies it to ``<sweep>/study.db``
after every round and when it is interrupted; a ``--resume`` on a machine without the local file
fetches that copy first. Several drivers, or a team's dashboard, use a database server instead:
``--study-storage postgresql://user@host/db``. A URL is recorded (sweep.json, Tune's state), so
it must not hold a password: PostgreSQL reads it from ``PGPASSWORD`` or ``~/.pgpass``, MySQL from
its option files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from orchestrator.core.config import ConfigError
from orchestrator.data.storage import cache_home, filesystem, is_remote, join

STUDY_FILE = "study.db"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def check_study_url(url: str, flag: str = "--study-storage") -> str:
    """A database URL Optuna's RDB storage opens, with no password in it; else ``ConfigError``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{flag} {url!r}: expected a database URL such as sqlite:///study.db or "
                          "postgresql://user@host/db") from None
    if parsed.get_backend_name() not in RDB_SCHEMES:
        raise ConfigError(f"{flag} {url!r}: {parsed.get_backend_name()!r} is not a database Optuna stores "
                          f"studies in (one of {', '.join(RDB_SCHEMES)})")
    if parsed.password:
        raise ConfigError(f"{flag}: the URL holds a password, and it would be recorded with the sweep; give the "
                          "password to the database client instead (PGPASSWORD or ~/.pgpass for PostgreSQL)")
    return url


def default_location(sweep_path: str) -> tuple[str, str | None]:
    """(the URL the driver opens, the remote copy or None) for a sweep stored at ``sweep_path``."""
    if is_remote(sweep_path):
        name = sweep_path.rstrip("/").rsplit("/", 1)[-1]
        local = cache_home() / "studies" / f"{name}.db"
        return f"sqlite:///{local}", join(sweep_path, STUDY_FILE)
    return f"sqlite:///{Path(sweep_path) / STUDY_FILE}", None


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for a server URL)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` (an SQLite file's folder is made first)."""
    import optuna

    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def push_copy(url: str, remote: str | None) -> None:
    """Copy the driver's SQLite study to the sweep's remote folder (a no-op without one)."""
    path = sqlite_path(url)
    if remote is None or path is None or not path.is_file():
        return
    fs, dest = filesystem(remote)
    fs.put_file(str(path), dest)


def pull_copy(url: str, remote: str | None) -> None:
    """Before a resume: fetch the remote copy when this machine has no local study file."""
    path = sqlite_path(url)
    if remote is None or path is None or path.is_file():
        return
    fs, src = filesystem(remote)
    if fs.exists(src):
        path.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(src, str(path))


def load(url: str, name: str):
    """The sweep's study, read back (for tests, the report and ``--warm-start``)."""
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(url))


def record_missing(url: str, name: str, trials: list[dict[str, Any]], space: dict[str, Any],
                   metrics: list[str]) -> int:
    """Add to the study every FINISHED trial of the sweep's record that it lacks as COMPLETE;
    returns how many. Tune's searcher state is saved every few seconds, not with every tell: after
    a driver kill, a resumed trial's Optuna twin may already be finished (FAIL, or told by Tune as
    it restored) and cannot be told again, so the study would miss a trial that the sweep did
    finish. The added trial carries the same params and values and ``trial_id``."""
    import optuna
    from optuna.trial import TrialState

    from orchestrator.search.space import optuna_distributions

    dists = optuna_distributions(space)
    study = load(url, name)
    have = {tuple(sorted((k, repr(v)) for k, v in t.params.items()))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    added = 0
    for t in trials:
        values = [t.get(m) for m in metrics]
        if t.get("status") != "FINISHED" or any(v is None or not math.isfinite(float(v)) for v in values):
            continue
        params = {k: t["config"][k] for k in dists if k in t.get("config", {})}
        if len(params) != len(dists) or tuple(sorted((k, repr(v)) for k, v in params.items())) in have:
            continue
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, values=[float(v) for v in values],
            user_attrs={"trial_id": t["trial_id"], "orchestrate.recorded_after_resume": True}))
        added += 1
    return added


def _base_value(base_flat: dict[str, Any], key: str) -> Any:
    for k in (key, f"method_config.{key}", f"run.{key}"):
        if k in base_flat:
            return base_flat[k]
    return None


def warm_start_points(old_top: list[dict[str, Any]], space: dict[str, Any],
                      base_flat: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The configs a warm-started sweep evaluates first: each of ``old_top``'s configs (best
    first) on this sweep's sampled keys. A key the old sweep did not sample takes this sweep's
    base value; a value outside this space's range is clipped to it (a choice it lacks is
    dropped for the base value). Returns (points, notes on what was changed)."""
    from orchestrator.search.space import optuna_distributions

    dists = optuna_distributions(space)
    points, notes = [], []
    for t in old_top:
        point = {}
        for key, dist in dists.items():
            value = t["config"].get(key, _base_value(base_flat, key))
            if hasattr(dist, "choices"):
                if value not in dist.choices:
                    fallback = _base_value(base_flat, key)
                    value = fallback if fallback in dist.choices else dist.choices[0]
                    notes.append(f"{t['trial_id']}: {key} takes {value!r} (not a choice of the old value)")
            else:
                if value is None or (isinstance(value, float) and not math.isfinite(value)):
                    value = dist.low
                clipped = min(max(float(value), dist.low), dist.high)
                if clipped != float(value):
                    notes.append(f"{t['trial_id']}: {key} {value!r} clipped to {clipped:g}")
                value = int(round(clipped)) if type(dist).__name__ == "IntDistribution" else clipped
            point[key] = value
        points.append(point)
    return points, notes


def record(url: str, remote: str | None, name: str) -> dict[str, Any]:
    """The study's entry in sweep.json."""
    return {"url": url, "copy": remote, "name": name}


def from_record(entry: dict[str, Any] | None) -> tuple[str, str | None, str] | None:
    if not entry:
        return None
    return entry["url"], entry.get("copy"), entry["name"]
