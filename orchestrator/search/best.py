"""``orchestrate best``: the best configs of a method, read back from MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.records import tracking
from orchestrator.core.config import ConfigError


def best_runs(method: str, metric: str, mode: str, *, task: str | None = None, top: int = 5,
              tracking_uri: str | None = None, sequence: str | None = None) -> list[Any]:
    """FINISHED train runs and sweep trials of ``method`` that logged ``metric``, best first.
    With ``sequence``: its lifelong runs and sequence-sweep trials (whole sequences) instead."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)
    experiment = f"lifelong-{sequence}" if sequence else method
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        from orchestrator.core.names import did_you_mean

        what = f"sequence {sequence!r}" if sequence else "this method"
        hint = did_you_mean(experiment, [e.name for e in c.search_experiments()])
        raise ConfigError(f"no MLflow experiment {experiment!r}{hint} in {uri}: nothing has been run with {what}")
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode {mode!r}: expected min or max")
    flt = f"attributes.status = 'FINISHED' and metrics.`{metric}` >= -1e308"
    if task:
        flt += f" and tags.`{tracking.TAG_TASK}` = '{task}'"
    if sequence:  # the lifelong experiment holds every method's runs of the sequence
        flt += f" and tags.`{tracking.TAG_METHOD}` = '{method}'"
    kinds = ("lifelong", "trial") if sequence else ("train", "trial")
    order = f"metrics.`{metric}` {'ASC' if mode == 'min' else 'DESC'}"
    out: list[Any] = []
    token = None
    while len(out) < top:  # sweep parents carry best_* metrics, not the metric itself; skip others
        page = c.search_runs([exp.experiment_id], filter_string=flt, order_by=[order],
                             max_results=max(50, top), page_token=token)
        out += [r for r in page if r.data.tags.get(tracking.TAG_KIND) in kinds]
        token = page.token
        if not token:
            break
    return out[:top]


def export_config(uri: str, run_id: str, path: str | Path) -> Path:
    """Write the run's resolved config (its ``config.yaml`` artifact) to ``path``; ``orchestrate
    train --config`` accepts it back."""
    import tempfile

    c = tracking.client(uri)
    run = c.get_run(run_id)
    # through the client of ``uri`` (mlflow.artifacts.load_text would resolve an mlflow-artifacts:
    # location against the process's default tracking URI, not --tracking-uri)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(c.download_artifacts(run_id, "config.yaml", tmp)).read_text()
    data = yaml.safe_load(text)
    header = (f"# exported by `orchestrate best` from MLflow run {run_id} ({run.info.run_name})\n"
              f"# use: orchestrate train {data['method']} --config {Path(path).name}\n")
    path = Path(path)
    path.write_text(header + text)
    return path
