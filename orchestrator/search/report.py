"""What a sweep taught, as one page: ``orchestrate report SWEEP`` (also written at the end of
every sweep and logged on its parent run under ``report/``).

The page (``report.html``, self-contained: its figures are embedded, and written beside it as
PNGs) holds, for each objective:

- the optimisation history (Optuna's ``plot_optimization_history``);
- parameter importances: Optuna's fANOVA evaluator (Hutter, Hoos & Leyton-Brown 2014, "An
  Efficient Approach for Assessing Hyperparameter Importance"), a random forest over the trials'
  parameters whose variance decomposition says how much of the objective's variance each
  parameter explains alone; seeded (``seed``) so the same trials give the same numbers;
- parallel coordinates of the parameters coloured by the objective;
- with two or three objectives, the Pareto front (``plot_pareto_front``);
- the top-k trials' final sample grids side by side, with their values and parameters.

The trials are the sweep's own record (``trials.json`` on its parent run: every trial's status,
last reported values and sampled parameters), loaded into an in-memory Optuna study with the
sweep space's distributions. Only FINISHED trials enter the study: a trial that the scheduler
stopped early (KILLED) reported at an earlier step, and its value does not compare with the
others'. Importances need at least :data:`MIN_TRIALS` finished trials and a parameter that
varies; with fewer, the page says so instead of printing numbers that mean nothing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.records import tracking
from orchestrator.search.space import optuna_distributions, pareto_front

MIN_TRIALS = 3
TRIALS_FILE = "trials.json"
REPORT_DIR = "report"


class ReportError(ValueError):
    """A report that cannot be made (no such sweep, no trials recorded): one line for the user."""


def study_of(trials: list[dict[str, Any]], space: dict[str, Any], metrics: list[str], modes: list[str]):
    """An in-memory Optuna study holding the FINISHED trials with every objective reported."""
    import optuna

    dists = optuna_distributions(space)
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        study = optuna.create_study(directions=["minimize" if m == "min" else "maximize" for m in modes])
    finally:
        optuna.logging.set_verbosity(level)
    for t in trials:
        values = [t.get(m) for m in metrics]
        if t.get("status") != "FINISHED" or any(v is None or not math.isfinite(float(v)) for v in values):
            continue
        params = {k: t["config"][k] for k in dists if k in t.get("config", {})}
        if len(params) != len(dists):
            continue
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, values=[float(v) for v in values],
            user_attrs={"trial_id": t["trial_id"]}))
    return study


def importances(study, metrics: list[str], seed: int = 0) -> dict[str, dict[str, float]]:
    """objective -> {parameter: fANOVA importance (they sum to 1)}, most important first; an
    objective is left out when fewer than :data:`MIN_TRIALS` trials or no varying parameter."""
    import optuna

    done = study.get_trials(deepcopy=False)
    varying = [k for k in (done[0].params if done else {}) if len({repr(t.params[k]) for t in done}) > 1]
    if len(done) < MIN_TRIALS or not varying:
        return {}
    out = {}
    for i, m in enumerate(metrics):
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning for the target argument
            imp = optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=varying, target=lambda t, i=i: t.values[i], normalize=True)
            out[m] = {k: float(v) for k, v in imp.items()}
    return out


@dataclass
class Report:
    """A written report: its folder, the page, and what it found."""

    folder: Path
    page: Path
    importances: dict[str, dict[str, float]]
    top: list[dict[str, Any]]
    finished: int
    figures: list[Path] = field(default_factory=list)


def rank_trials(trials: list[dict[str, Any]], metrics: list[str], modes: list[str], k: int) -> list[dict[str, Any]]:
    """The k best FINISHED trials on the first objective (the Pareto front first with several)."""

    done = [t for t in trials if t.get("status") == "FINISHED" and t.get(metrics[0]) is not None]
    sign = 1 if modes[0] == "min" else -1
    done.sort(key=lambda t: sign * float(t[metrics[0]]))
    if len(metrics) > 1:
        front = {t["trial_id"] for t in pareto_front(trials, metrics, modes)}
        done.sort(key=lambda t: t["trial_id"] not in front)  # stable: front first, each part by metric 0
    return done[:k]


def _figures(study, metrics: list[str], imps: dict[str, dict[str, float]], folder: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    out: list[tuple[str, Path]] = []

    def save(title: str, name: str, draw, size: tuple[float, float] = (7, 4.2)) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            with plt.style.context("default"):  # Optuna's plots switch the global style to ggplot
                ax = draw()
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(*size)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append((title, path))

    n = len(study.get_trials(deepcopy=False))
    for i, m in enumerate(metrics):
        target = (lambda t, i=i: t.values[i])
        if n:
            save(f"{m}: optimisation history", f"history_{m}.png",
                 lambda: ovm.plot_optimization_history(study, target=target, target_name=m))
        if m in imps:
            save(f"{m}: parameter importances (fANOVA)", f"importances_{m}.png", lambda: _bar(imps[m], m))
        if n >= 2 and len(study.trials[0].params) >= 1:
            save(f"{m}: parallel coordinates", f"parallel_{m}.png",
                 lambda: ovm.plot_parallel_coordinate(study, target=target, target_name=m),
                 size=(2.2 * (len(study.trials[0].params) + 1) + 1.5, 4.5))
    if len(metrics) in (2, 3) and n:
        save("Pareto front", "pareto_front.png", lambda: ovm.plot_pareto_front(study, target_names=metrics))
    return out


def _bar(imp: dict[str, float], metric: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    keys = list(imp)[::-1]
    ax.barh(keys, [imp[k] for k in keys], color="C0")
    ax.set_xlabel(f"share of {metric}'s variance explained (fANOVA)")
    ax.set_xlim(0, 1)
    return ax


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_report(trials: list[dict[str, Any]], space: dict[str, Any], metrics: list[str], modes: list[str],
                 folder: Path, *, title: str, top_k: int = 4, grids: dict[str, Path] | None = None,
                 seed: int = 0) -> Report:
    """Write ``report.html`` and its PNGs into ``folder`` from a sweep's trial records."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study_of(trials, space, metrics, modes)
    imps = importances(study, metrics, seed=seed)
    figures = _figures(study, metrics, imps, folder)
    top = rank_trials(trials, metrics, modes, top_k)
    finished = len(study.get_trials(deepcopy=False))
    e = html.escape
    counts = {s: sum(t.get("status") == s for t in trials) for s in ("FINISHED", "KILLED", "FAILED")}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             ".grids{display:flex;flex-wrap:wrap;gap:12px}.grids figure{margin:0;width:240px}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f"<p>{len(trials)} trials: {counts['FINISHED']} finished, {counts['KILLED']} stopped early or killed, "
             f"{counts['FAILED']} failed. Objectives: "
             + ", ".join(f"{e(m)} ({md})" for m, md in zip(metrics, modes)) + ".</p>"]
    parts.append("<h2>Parameter importances</h2>")
    if imps:
        for m, imp in imps.items():
            rows = "".join(f"<tr><th>{e(k)}</th><td>{v:.3f}</td></tr>" for k, v in imp.items())
            parts.append(f"<h3>{e(m)}</h3><table><tr><th>parameter</th><th>fANOVA importance</th></tr>{rows}</table>")
    else:
        parts.append(f"<p>Not computed: {finished} finished trial(s) with a varying parameter; "
                     f"importances need at least {MIN_TRIALS}.</p>")
    keys = sorted({k for t in top for k in t.get("config", {}) if k in optuna_distributions(space)})
    head = "".join(f"<th>{e(x)}</th>" for x in ["trial", *metrics, *keys])
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in
                                    [t["trial_id"], *[t.get(m) for m in metrics], *[t["config"].get(k) for k in keys]])
                   + "</tr>" for t in top)
    parts.append(f"<h2>Top {len(top)} trials</h2><table><tr>{head}</tr>{body}</table>")
    if grids:
        figs = "".join(f"<figure>{_img(grids[t['trial_id']])}<figcaption>{e(t['trial_id'])}: "
                       f"{e(metrics[0])} = {e(_fmt(t.get(metrics[0])))}</figcaption></figure>"
                       for t in top if t["trial_id"] in grids)
        parts.append(f"<h2>Their samples (final grids)</h2><div class='grids'>{figs}</div>")
    for caption, path in figures:
        parts.append(f"<h2>{e(caption)}</h2>{_img(path)}")
    parts.append("</body></html>")
    page = folder / "report.html"
    page.write_text("\n".join(parts))
    (folder / "importances.json").write_text(json.dumps(imps, indent=2))
    return Report(folder, page, imps, top, finished, [p for _, p in figures])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _final_grid(uri: str, run_id: str, folder: Path) -> Path | None:
    """A run's last sample grid (``samples/final.png``, else its latest ``samples/step_N.png``)."""
    c = tracking.client(uri)
    names = sorted(a.path for a in c.list_artifacts(run_id, "samples") if a.path.endswith(".png"))
    if not names:
        return None
    pick = "samples/final.png" if "samples/final.png" in names else names[-1]
    return Path(c.download_artifacts(run_id, pick, str(folder)))


def trial_grids(uri: str, experiment_id: str, parent_id: str, trial_ids: list[str], folder: Path) -> dict[str, Path]:
    """trial id -> its final grid, downloaded into ``folder`` (trials without a grid are left out)."""
    out = {}
    for tid in trial_ids:
        run = tracking.find_run(uri, experiment_id, tid, parent_id)
        if run is None:
            continue
        sub = folder / tid
        sub.mkdir(parents=True, exist_ok=True)
        grid = _final_grid(uri, run.info.run_id, sub)
        if grid is not None:
            out[tid] = grid
    return out


def report_on_run(uri: str, experiment_id: str, parent_id: str, name: str, trials: list[dict[str, Any]],
                  space: dict[str, Any], metrics: list[str], modes: list[str], *, out: Path | None = None,
                  top_k: int = 4) -> Report:
    """Write the report of sweep ``name`` (into ``out``, else a temporary folder) and log it on
    the sweep's parent run under ``report/``; returns it (its folder is kept only with ``out``)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp) / REPORT_DIR
        top = rank_trials(trials, metrics, modes, top_k)
        grids = trial_grids(uri, experiment_id, parent_id, [t["trial_id"] for t in top], Path(tmp) / "grids")
        rep = write_report(trials, space, metrics, modes, folder, title=f"Sweep {name}", top_k=top_k, grids=grids)
        tracking.log_artifacts(uri, parent_id, folder, REPORT_DIR)
        return rep


def find_sweep(uri: str, name: str):
    """The parent run of the sweep called ``name`` in any experiment, or a :class:`ReportError`."""
    c = tracking.client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, filter_string=f"tags.`{tracking.TAG_NAME}` = '{name}' and "
                                             f"tags.`{tracking.TAG_KIND}` = 'sweep'") if exps else []
    if not runs:
        raise ReportError(f"no sweep named {name!r} in MLflow at {uri} (orchestrate runs lists them)")
    if len(runs) > 1:
        where = ", ".join(sorted(c.get_experiment(r.info.experiment_id).name for r in runs))
        raise ReportError(f"sweep name {name!r} is in several MLflow experiments ({where}); give --experiment")
    return runs[0]


def recorded_trials(uri: str, name: str, experiment: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the trials, sweep.json) that sweep ``name`` recorded on its parent run, found in
    ``experiment`` or in any experiment; ``ReportError`` when it has none yet."""
    if experiment is not None:
        exp = tracking.client(uri).get_experiment_by_name(experiment)
        parent = tracking.find_run(uri, exp.experiment_id, name) if exp is not None else None
        if parent is None:
            raise ReportError(f"no sweep named {name!r} in MLflow experiment {experiment!r} at {uri}")
    else:
        parent = find_sweep(uri, name)
    run_id = parent.info.run_id
    c = tracking.client(uri)
    have = {a.path for a in c.list_artifacts(run_id)}
    if TRIALS_FILE not in have:
        raise ReportError(f"sweep {name!r} (MLflow run {run_id}) has no {TRIALS_FILE}: it has not finished "
                          "(resume it with orchestrate sweep METHOD --resume NAME) or an older version ran it")
    with tempfile.TemporaryDirectory() as tmp:
        trials = json.loads(Path(c.download_artifacts(run_id, TRIALS_FILE, tmp)).read_text())
        state = json.loads(Path(c.download_artifacts(run_id, "sweep.json", tmp)).read_text())
    state["parent_run_id"], state["experiment_id"] = run_id, parent.info.experiment_id
    return trials, state


def report_sweep(name: str, *, tracking_uri: str | None = None, out: Path | None = None, top_k: int = 4,
                 experiment: str | None = None) -> Report:
    """``orchestrate report``: the report of a recorded sweep, written into ``out`` (default
    ``./report-NAME``) and logged on its parent run."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    trials, state = recorded_trials(uri, name, experiment)
    settings = state["settings"]
    return report_on_run(uri, state["experiment_id"], state["parent_run_id"], name, trials, state["space"],
                         list(settings["metrics"]), list(settings["modes"]),
                         out=Path(out) if out is not None else Path(f"report-{name}"), top_k=top_k)
