"""``orchestrate``: the command line (typer + rich)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.core.config import DEFAULT_TASK, ConfigError, TaskConfig

# The objective of a sequence sweep and of `best --sequence` unless told otherwise: the average,
# over the sequence's tasks, of each task's FID (domain encoder) after the last task is learned.
SEQUENCE_METRIC = ("avg_final_fid_domain", "min")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Few-shot and lifelong generator adaptation on Ray, recorded in MLflow.")
console = Console()
err = Console(stderr=True)

TASK_HELP = "task file (tasks/*.yaml) or a built-in task synthetic:<domain>"
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"
STORAGE_HELP = "run storage: a folder or s3://bucket/prefix (default: ./runs)"
ADDRESS_HELP = "Ray cluster address (auto, ray://host:10001); default: $RAY_ADDRESS or a local Ray"


_DEBUG = {"on": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show full tracebacks")) -> None:
    """Few-shot and lifelong generator adaptation on Ray, recorded in MLflow.

    Exit codes: 0 done; 1 a run failed while training; 2 bad input or a request refused before
    anything started (one line says which key, value or resource); 130 interrupted (the run is
    recorded KILLED and resumes with the same command)."""
    import os

    _DEBUG["on"] = debug or bool(os.environ.get("ORCHESTRATE_DEBUG"))
    if _DEBUG["on"]:
        os.environ["ORCHESTRATE_DEBUG"] = "1"  # Ray forwards the workers' output (orchestrator.runtime.raycluster)


# "<_io.BytesIO object at 0x7f...>": a library's repr of its own object, which names nothing the user has;
# and the terminal colour codes that Ray puts in its exceptions' messages
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def fail(message: str, code: int = 2) -> None:
    """``error: MESSAGE`` on stderr, never wrapped by us (a terminal wraps it; a log keeps one line),
    with no object reprs and no rich markup read into it; then exit ``code``."""
    from rich.markup import escape

    from orchestrator.core.redact import redact_text

    text = _ANSI.sub("", _OBJECT_REPR.sub("", redact_text(message)))
    err.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _same_command() -> str:
    """The command line of this invocation, shell-quoted, to run again."""
    import shlex

    return shlex.join(["orchestrate", *sys.argv[1:]])


def _print_result(res, what: str) -> None:
    from orchestrator.records.tracking import ui_hint

    table = Table(show_header=False, box=None)
    table.add_row("run", res.name)
    table.add_row("status", res.status + (" (resumed)" if res.resumed else ""))
    table.add_row("MLflow run id", res.run_id)
    table.add_row("MLflow", res.tracking_uri)
    table.add_row("checkpoints", res.run_dir)
    if res.export is not None:
        table.add_row("exported model", f"{res.export.uri} ({res.export.short()})")
    for k in ("loss", "fid_domain", "intra_dist_domain", "target_rate_domain", "target_rate"):
        if res.metrics and k in res.metrics:
            table.add_row(k, f"{res.metrics[k]:.4g}")
    if res.metrics and "step" in res.metrics:
        table.add_row("step", str(int(res.metrics["step"])))  # 24000, not 2.4e+04
    console.print(f"[bold green]{what} done.[/]")
    console.print(table)
    console.print(f"Browse: [bold]{ui_hint(res.tracking_uri, res.experiment_id, res.run_id)}[/]", soft_wrap=True)


def command_session(address: str | None, body, preflight=None):
    """Run ``preflight()`` (no Ray yet), then start/connect Ray and run ``body(preflight's
    result)``; turn the errors users cause into one line and an exit code, Ctrl-C into KILLED +
    exit 130, and always shut down the Ray instance this command started."""
    from orchestrator.core import interrupts
    from orchestrator.runtime.raycluster import init_ray, shutdown

    started = False
    previous = interrupts.install()
    try:
        checked = _guard(preflight) if preflight is not None else None
        started = init_ray(address)
        interrupts.install()  # after ray.init, which installs its own SIGTERM handler
        return _guard(lambda: body(checked))
    except KeyboardInterrupt:
        from rich.markup import escape

        what, resume = interrupts.describe()
        # every interruption says how to resume: a source being pretrained (or anything before
        # the run names itself) is recorded KILLED too, and the same command continues it
        if what:
            msg = f"interrupted: {what} is recorded KILLED in MLflow; to resume it, run the same command again"
        else:
            msg = "interrupted (what it had started is recorded KILLED); to resume, run the same command again"
        msg += f" ({resume or _same_command()})"
        err.print(f"[bold yellow]{escape(msg)}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    finally:
        try:
            shutdown(started)
        except KeyboardInterrupt:
            shutdown(started)
        interrupts.restore(previous)


@app.command()
def train(
    method: str = typer.Argument(..., help="method key, e.g. ddpm_finetune (see `orchestrate methods`)"),
    task: Optional[str] = typer.Option(None, "--task", "-t", help=TASK_HELP + f" [default: {DEFAULT_TASK}]"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="a resolved config YAML (e.g. from `best --export`)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override KEY=VALUE (method, run.KEY or task.a.b)"),
    name: Optional[str] = typer.Option(None, help="run name; the same name resumes (default: method-task-confighash)"),
    restart: bool = typer.Option(False, help="discard the run's checkpoints and start it over"),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers (data parallel)"),
    gpu: bool = typer.Option(False, "--gpu", help="train on GPUs"),
    gpus_per_worker: Optional[float] = typer.Option(None, help="GPU share per worker (e.g. 0.5)"),
    steps: Optional[int] = typer.Option(None, help="optimisation steps (run.steps)"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    register: Optional[str] = typer.Option(None, "--register", metavar="NAME",
                                           help="register the exported model in MLflow's Model Registry as NAME "
                                                "(a new version: models:/NAME/VERSION)"),
) -> None:
    """Adapt a source generator to a few-shot task with METHOD (one Ray Train run)."""
    from orchestrator.core.config import parse_overrides, resolve, run_flags
    from orchestrator.core.names import check_name

    try:
        if name is not None:
            check_name(name, "--name")
        if register is not None:
            check_name(register, "--register")
        overrides = parse_overrides(set_)
        overrides.update(run_flags({"--workers": ("run.num_workers", workers), "--steps": ("run.steps", steps),
                                    "--gpus-per-worker": ("run.gpus_per_worker", gpus_per_worker)}))
        if gpu:
            overrides["run.use_gpu"] = True
        task_file = task or (None if config else DEFAULT_TASK)
        cfg = resolve(method, task_file=task_file, config_file=config, overrides=overrides)
    except ConfigError as exc:
        fail(str(exc))
    # imported once the command line and the task are known good: a typo answers before torch loads
    from orchestrator.runs.train import preflight
    from orchestrator.runs.train import train as run_train

    res = command_session(address, lambda checked: run_train(checked[0], name=name, tracking_uri=checked[1],
                                                             storage=checked[2], restart=restart),
                          preflight=lambda: preflight(cfg, tracking_uri=tracking_uri, storage=storage, address=address,
                                                      name=name))
    if res.already_finished:
        console.print(f"Run [bold]{res.name}[/] already FINISHED (MLflow run {res.run_id}); "
                      "nothing to do. Use --restart to train it again or --name for a new run.")
    else:
        _print_result(res, f"{method} on {res.name}")
    if register is not None and res.status == "FINISHED":
        _register(res.run_id, register, res.tracking_uri)


def _register(run: str, name: str, tracking_uri: str | None) -> None:
    from orchestrator.api import register as register_model

    try:
        uri = register_model(run, name, tracking_uri=tracking_uri)
    except ConfigError as exc:
        fail(str(exc))
    console.print(f"Registered [bold]{uri}[/]: orchestrate sample {uri} --n 1000 --out samples/", highlight=False)


@app.command()
def sweep(
    method: str = typer.Argument(..., help="method key, e.g. ddpm_pa"),
    task: Optional[str] = typer.Option(None, "--task", "-t", help=TASK_HELP + f" [default: {DEFAULT_TASK}]"),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="a lifelong sequence file instead of one task: "
                                         "every trial learns the whole sequence and the objective is its "
                                         f"summary (default {SEQUENCE_METRIC[0]})"),
    space: Optional[Path] = typer.Option(None, help="YAML that overrides or extends the method's default space"),
    set_: list[str] = typer.Option([], "--set", "-s", help="fixed override KEY=VALUE for every trial"),
    num_samples: int = typer.Option(6, help="trials"),
    max_concurrent: int = typer.Option(2, help="trials at once"),
    metric: list[str] = typer.Option([], help="objective(s); repeat for multi-objective (NSGA-II)"),
    mode: list[str] = typer.Option([], help="min or max, one per --metric"),
    scheduler: str = typer.Option("asha", help="asha (early stopping) or fifo"),
    grace_period: Optional[int] = typer.Option(None, help="steps before ASHA may stop a trial"),
    seed: int = typer.Option(0, help="seed of the Optuna sampler"),
    steps: Optional[int] = typer.Option(None, help="steps per trial (run.steps)"),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers per trial"),
    cpus_per_trial: Optional[float] = typer.Option(None, help="CPUs per trial worker (default 1)"),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs per trial worker; fractions share a GPU"),
    max_failures: int = typer.Option(2, help="retries of a trial whose process or node died"),
    name: Optional[str] = typer.Option(None, help="sweep name (default: sweep-METHOD-TASK-time)"),
    resume: Optional[str] = typer.Option(None, help="continue the interrupted sweep NAME"),
    more: Optional[int] = typer.Option(None, help="with --resume NAME: N more trials in the finished sweep's "
                                       "study (the sampler starts from every earlier trial)"),
    warm_start: Optional[str] = typer.Option(None, "--warm-start", metavar="SWEEP",
                                             help="first evaluate the best configs of the recorded sweep SWEEP"),
    top: int = typer.Option(3, help="with --warm-start: how many of its best configs"),
    study_storage: Optional[str] = typer.Option(None, help="database URL of the Optuna study (default: "
                                                "SQLite study.db beside the sweep's Tune state), e.g. "
                                                "postgresql://user@host/db for a shared dashboard"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Search METHOD's loss weights, timesteps and learning rate with Optuna in Ray Tune; every
    trial is a training run (in the trial's own process; a TorchTrainer with --workers > 1) and an
    MLflow child run of the sweep. With --tasks SEQUENCE every trial learns a whole lifelong
    sequence and is ranked by the sequence's summary. The Optuna study is kept (optuna-dashboard
    opens it), and the sweep's report (orchestrate report) is logged on its MLflow run."""
    from orchestrator.core.config import parse_overrides, resolve, run_flags
    from orchestrator.runs.lifelong import load_sequence, task_configs
    from orchestrator.core.names import check_name
    from orchestrator.search.space import build_space
    from orchestrator.search.sweep import SweepSettings, check_sweep, default_objective, run_sweep

    sequence = None
    task_cfg = None
    try:
        for flag, value in (("--name", name), ("--resume", resume), ("--warm-start", warm_start)):
            if value is not None:
                check_name(value, flag)
        if study_storage is not None:
            from orchestrator.search.study import check_study_url

            check_study_url(study_storage)
        if more is not None and more < 1:
            raise ConfigError(f"--more {more}: expected a number of trials >= 1")
        if warm_start is not None and not 1 <= top <= num_samples:
            raise ConfigError(f"--top {top}: expected 1 to --num-samples ({num_samples}) configs of {warm_start}")
        overrides = parse_overrides(set_)
        overrides.update(run_flags({"--workers": ("run.num_workers", workers), "--steps": ("run.steps", steps)}))
        if tasks is not None:
            if task is not None:
                raise ConfigError("--task and --tasks: give one task or one sequence, not both")
            sequence = load_sequence(tasks)
            configs = task_configs(sequence, method, overrides, str(tasks))
            base = configs[0]
            default = ([SEQUENCE_METRIC[0]], [SEQUENCE_METRIC[1]])
        else:
            base = resolve(method, task_file=task or DEFAULT_TASK, overrides=overrides)
            configs = [base]
            default = default_objective(base)
            task_cfg = base.task if (resume and task) else None
        metrics, modes = (metric, mode) if metric else default
        if metric and not mode:
            modes = ["min"] * len(metric)
        settings = SweepSettings(num_samples=num_samples, max_concurrent=max_concurrent, metrics=list(metrics),
                                 modes=list(modes), scheduler=scheduler, grace_period=grace_period, seed=seed,
                                 cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                                 max_failures=max_failures)
        settings.validate()
        sp = build_space(base, space)
    except ConfigError as exc:
        fail(str(exc))

    sweep_name: dict[str, str] = {}

    def checks():
        from orchestrator.runs.inputs import check_data, check_metric_networks
        from orchestrator.runtime.preflight import check_all
        from orchestrator.runtime.raycluster import check_resources, local_shape
        from orchestrator.runs.train import early_source_check

        import os

        check_all(tracking_uri, storage)
        # unknown --resume target, a taken --name, a live lease, a bad name: refused before Ray starts
        sweep_name["name"] = check_sweep(resume or name, resume=resume is not None, base=base, sequence=sequence,
                                         tracking_uri=tracking_uri, storage=storage, more=more,
                                         warm_start=warm_start)
        if resume:
            return base
        checked = early_source_check(base)
        for cfg in configs:
            check_data(cfg.task)
            check_metric_networks(cfg)
        if not (address or os.environ.get("RAY_ADDRESS")):
            check_resources(base.run.num_workers, settings.cpus, settings.gpus_per_trial, local_shape(),
                            what="each trial")
        return checked

    def body(checked_base):
        from orchestrator.runtime.raycluster import check_resources, cluster_shapes

        if not resume:
            check_resources(base.run.num_workers, settings.cpus, settings.gpus_per_trial, cluster_shapes(),
                            what="each trial")
        return run_sweep(checked_base, sp, settings, name=sweep_name["name"], resume=resume is not None,
                         tracking_uri=tracking_uri, storage=storage, sequence=sequence, overrides=overrides,
                         task=task_cfg, study_storage=study_storage, more=more, warm_start=warm_start,
                         warm_top=top)

    res = command_session(address, body, preflight=checks)
    _print_sweep(res, res.settings, method)  # on --resume, the sweep's own stored settings


def _print_sweep(res, settings, method: str) -> None:
    from orchestrator.records.tracking import ui_hint

    table = Table("trial", "status", res.progress, *settings.metrics, "config")
    for t in res.trials:
        table.add_row(t["trial_id"], t["status"], str(t["step"]),
                      *[f"{t[m]:.4g}" if t.get(m) is not None else "-" for m in settings.metrics],
                      ", ".join(f"{k}={_short(v)}" for k, v in sorted(t["config"].items())))
    console.print(table)
    if res.best:
        console.print(f"[bold green]best[/] {res.best['trial_id']}: {settings.metrics[0]} = "
                      f"{res.best[settings.metrics[0]]:.4g} with "
                      + ", ".join(f"{k}={_short(v)}" for k, v in sorted(res.best["config"].items())))
    if res.pareto is not None:
        console.print(f"[bold green]Pareto front[/] ({len(res.pareto)} trials): "
                      + "; ".join(t["trial_id"] for t in res.pareto))
    console.print(f"Sweep [bold]{res.name}[/]: MLflow parent run {res.parent_run_id}; Tune state {res.path}")
    if res.study_url:
        console.print(f"Optuna study: [bold]optuna-dashboard {res.study_url}[/]  ·  more trials: [bold]orchestrate "
                      f"sweep {method} --resume {res.name} --more N[/]  ·  report: [bold]orchestrate report "
                      f"{res.name}[/]", soft_wrap=True, highlight=False)
    console.print(f"Browse: [bold]{ui_hint(res.tracking_uri, res.experiment_id)}[/]  ·  best configs: "
                  f"[bold]orchestrate best {method}[/]", soft_wrap=True)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@app.command()
def best(
    method: str = typer.Argument(..., help="method key"),
    task: Optional[str] = typer.Option(None, help="only runs of this task (its name)"),
    sequence: Optional[str] = typer.Option(None, help="rank lifelong runs and sequence-sweep trials of this "
                                           f"sequence (its name) instead; default metric {SEQUENCE_METRIC[0]}"),
    top: int = typer.Option(5, help="how many"),
    metric: Optional[str] = typer.Option(None, help="rank by this metric (default: the sweep objective)"),
    mode: Optional[str] = typer.Option(None, help="min or max"),
    export: Optional[Path] = typer.Option(None, help="write the best config as YAML for `train --config`"),
    register: Optional[str] = typer.Option(None, "--register", metavar="NAME",
                                           help="register the best run's exported model in MLflow's Model "
                                                "Registry as NAME"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
) -> None:
    """The best configs of METHOD recorded in MLflow (train runs and sweep trials)."""
    from orchestrator.search.best import best_runs, export_config
    from orchestrator.search.sweep import DEFAULT_METRIC
    from orchestrator.records.tracking import resolve_tracking_uri

    default = SEQUENCE_METRIC if sequence else DEFAULT_METRIC
    metric = metric or default[0]
    mode = mode or default[1]
    try:
        from orchestrator.core.names import DERIVED_MAX, check_name
        from orchestrator.runtime.preflight import check_tracking_readable

        if sequence and (task or export or register):
            raise ConfigError("--sequence ranks whole sequences: --task, --export and --register apply to "
                              "single-task runs")
        if register is not None:
            check_name(register, "--register")
        if task is not None:  # names go into MLflow filter strings: a quote would break them
            check_name(task, "--task", DERIVED_MAX)
        if sequence is not None:
            check_name(sequence, "--sequence")
        check_tracking_readable(tracking_uri)  # an unreachable server fails in seconds, not minutes
        runs = best_runs(method, metric, mode, task=task, top=top, tracking_uri=tracking_uri, sequence=sequence)
    except ConfigError as exc:
        fail(str(exc))
    if not runs:
        fail(f"no FINISHED {method} run has the metric {metric!r}"
             + (f" for task {task!r}" if task else ""), code=1)
    from orchestrator.records.tracking import TAG_TASK

    varying = sorted({k for r in runs for k in r.data.params if k.startswith(("method_config.", "run.steps"))
                      and len({x.data.params.get(k) for x in runs}) > 1})
    table = Table("rank")
    # the run name is what users copy: never cut, however narrow the terminal (the rest wraps)
    table.add_column("run", no_wrap=True, min_width=max(len(r.info.run_name or "") for r in runs))
    table.add_column("task", overflow="fold")
    table.add_column(metric, no_wrap=True, min_width=len(metric))
    for k in varying:
        table.add_column(k.split(".", 1)[1], overflow="fold")
    for i, r in enumerate(runs, 1):
        table.add_row(str(i), r.info.run_name, r.data.tags.get(TAG_TASK, "-"), f"{r.data.metrics[metric]:.4g}",
                      *[r.data.params.get(k, "-") for k in varying])
    console.print(table)
    if sequence:
        fixed = {k: v for k, v in runs[0].data.params.items() if k.startswith("method_config.")}
        sets = " ".join(f"--set {k.split('.', 1)[1]}={v}" for k, v in sorted(fixed.items()))
        console.print(f"Best: [bold]{runs[0].info.run_name}[/]; again with: orchestrate lifelong --tasks "
                      f"<sequence file> --method {method} {sets}", highlight=False)
    if export:
        path = export_config(resolve_tracking_uri(tracking_uri), runs[0].info.run_id, export)
        console.print(f"Best config written to [bold]{path}[/]: orchestrate train {method} --config {path}")
    if register:
        _register(runs[0].info.run_id, register, tracking_uri)


@app.command()
def report(
    sweep: str = typer.Argument(..., help="sweep name (as given to --name, or printed by the sweep)"),
    out: Optional[Path] = typer.Option(None, help="folder for report.html and its PNGs (default: ./report-SWEEP)"),
    top: int = typer.Option(4, min=1, help="how many of the best trials to show with their sample grids"),
    experiment: Optional[str] = typer.Option(None, help="the sweep's MLflow experiment, when its name is in several"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
) -> None:
    """What a sweep taught: history, parameter importances (fANOVA), parallel coordinates, the
    Pareto front and the best trials' grids, as one HTML page (also logged on the sweep's run)."""
    from orchestrator.core.names import DERIVED_MAX, check_name
    from orchestrator.runtime.preflight import check_tracking_readable
    from orchestrator.search.report import ReportError, report_sweep

    try:
        check_name(sweep, "SWEEP", DERIVED_MAX)  # the name goes into an MLflow filter string
        check_tracking_readable(tracking_uri)
        rep = report_sweep(sweep, tracking_uri=tracking_uri, out=out, top_k=top, experiment=experiment)
    except (ConfigError, ReportError) as exc:
        fail(str(exc))
    console.print(f"Report of sweep [bold]{sweep}[/] ({rep.finished} finished trial(s)): [bold]{rep.page}[/] "
                  f"(also on the sweep's MLflow run under report/)", highlight=False)
    for metric, imp in rep.importances.items():
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in imp.items())
        console.print(f"  importances for {metric}: {ranked}", highlight=False)


@app.command("pretrain-classifier")
def pretrain_classifier(
    export: Path = typer.Option(..., help="where to write the classifier (.safetensors)"),
    resolution: int = typer.Option(32, help="image size it classifies at"),
    steps: int = typer.Option(800, help="training steps"),
    per_domain: int = typer.Option(2000, help="training images rendered per domain"),
    seed: int = typer.Option(0),
) -> None:
    """Train the supervised classifier of the six built-in synthetic domains (the truth check
    behind `target_rate_domain`) on rendered images; report its held-out accuracy."""
    import torch

    from trainers.data import DOMAINS, render
    from trainers.metrics.domain_classifier import confusion, train_domain_classifier

    torch.set_num_threads(os.cpu_count() or 1)
    train = {d: render(d, per_domain, resolution, seed=1000 + seed) for d in DOMAINS}
    held = {d: render(d, 500, resolution, seed=2000 + seed) for d in DOMAINS}
    model = train_domain_classifier(train, resolution=resolution, steps=steps, seed=seed, held_out=held,
                                    device="cuda" if torch.cuda.is_available() else "cpu")
    model.save(export)
    table = Table("true \\ predicted", *model.classes)
    for c, row in confusion(model, held).items():
        table.add_row(c, *[f"{row[k]:.3f}" for k in model.classes])
    console.print(table)
    console.print(f"held-out accuracy {model.train_info['held_out_accuracy_mean']:.4f}; written to [bold]{export}[/]")


@app.command("pretrain-encoder")
def pretrain_encoder(
    task: str = typer.Option(DEFAULT_TASK, "--task", "-t", help=TASK_HELP),
    export: Optional[Path] = typer.Option(None, help="also write it here (.safetensors or .pt)"),
) -> None:
    """Train (once, cached) the domain encoder that a task's `source.pretrain` block describes:
    SimCLR on the source domain's images (and `encoder_data`); the `*_domain` metrics use it."""
    import shutil

    from orchestrator.core.config import load_task
    from orchestrator.runs.sources import domain_encoder_for

    try:
        t = load_task(task)
    except ConfigError as exc:
        fail(str(exc))
    path = _guard(lambda: domain_encoder_for(t))
    console.print(f"Domain encoder: [bold]{path}[/]")
    if export is not None:
        if export.suffix == ".safetensors" and path.suffix != ".safetensors":
            from trainers.metrics import DomainEncoder

            DomainEncoder.load(path).save(export)
        else:
            shutil.copy2(path, export)
        console.print(f"Written to [bold]{export}[/]")


@app.command()
def pretrain(
    family: str = typer.Argument("ddpm", help="generator family: ddpm or stylegan2"),
    task: str = typer.Option(DEFAULT_TASK, "--task", "-t", help=TASK_HELP),
    force: bool = typer.Option(False, help="pretrain again even if a cached model exists"),
    export: Optional[Path] = typer.Option(None, help="also copy the pretrained source model to this folder"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Pretrain (once, cached) the source model that a task's `source.pretrain` block describes."""
    from orchestrator.core.config import load_task
    from orchestrator.runs.sources import cached_source_path, is_ready, pretrain_source

    if family not in ("ddpm", "stylegan2"):
        fail(f"unknown generator family {family!r}; expected ddpm or stylegan2")
    try:
        t = load_task(task, family=family)
    except ConfigError as exc:
        fail(str(exc))
    if t.source.family != family:
        fail(f"{task}: source.family is {t.source.family!r}, not {family!r}")
    if t.source.model != "pretrained":
        fail(f"{task}: source.model is {t.source.model!r}, not 'pretrained': nothing to pretrain")
    folder = cached_source_path(t)
    if is_ready(t, folder) and not force:
        console.print(f"Source model already cached: [bold]{folder}[/] (use --force to retrain)")
        _copy_export(folder, export, t, task)
        return

    def checks():
        import os

        from orchestrator.runtime.preflight import check_all
        from orchestrator.runtime.raycluster import check_resources, local_shape
        from orchestrator.data.storage import data_cache_dir
        from trainers.data import load_images

        uri, store = check_all(tracking_uri, storage)
        spec = t.source.pretrain

        load_images(spec.data, t.resolution, count=spec.count, seed=spec.seed, cache_dir=data_cache_dir())
        if not (address or os.environ.get("RAY_ADDRESS")):
            check_resources(1, 1.0, 0.0, local_shape(), what="pretraining")
        return uri, store

    ref, res = command_session(address, lambda checked: pretrain_source(t, tracking_uri=checked[0], storage=checked[1],
                                                                        force=force), preflight=checks)
    if res is not None:
        _print_result(res, "pretraining")
    console.print(f"Source model: [bold]{folder}[/] (in the run storage: {ref.uri})")
    _copy_export(folder, export, t, task)


def _copy_export(folder: Path, export: Optional[Path], task: TaskConfig, task_file: str) -> None:
    """A copy of the source outside the cache, weights as safetensors (a diffusers folder already
    is; a StyleGAN2 checkpoint is rewritten as ``stylegan2.safetensors``), with ``recipe.json``
    (the pretraining key, block and command that made it)."""
    if export is None:
        return
    import shutil

    from orchestrator.runs.sources import write_recipe
    from trainers.gan.source import CHECKPOINT_NAME, load_gan_source, save_gan_source

    if export.exists():
        shutil.rmtree(export)
    if (folder / CHECKPOINT_NAME).is_file():
        src = load_gan_source(folder)
        save_gan_source(export, src.g, src.g_ema, src.d, extra=src.extra, safetensors=True)
    else:
        shutil.copytree(folder, export)
    write_recipe(task, export, task_file)
    console.print(f"Copied to [bold]{export}[/]")


@app.command()
def lifelong(
    tasks: Path = typer.Option(..., "--tasks", help="sequence file (tasks/sequence1.yaml)"),
    method: str = typer.Option("lfs_gan", help="lfs_gan, or a shared-weight baseline: gan_finetune, dcl"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override KEY=VALUE for every task"),
    name: Optional[str] = typer.Option(None, help="run name; the same name resumes (default: method-sequence-hash)"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Learn a stream of few-shot tasks in order; after each, evaluate every earlier task and
    report the matrices R[k, j], forgetting, backward transfer and the parameter cost per task."""
    from orchestrator.core.config import parse_overrides
    from orchestrator.runs.lifelong import load_sequence, run_lifelong, task_configs
    from orchestrator.core.names import check_name

    try:
        if name is not None:
            check_name(name, "--name")
        seq = load_sequence(tasks)
        overrides = parse_overrides(set_)
        configs = task_configs(seq, method, overrides, str(tasks))  # validate everything before Ray starts
    except (ConfigError, KeyError) as exc:
        fail(str(exc.args[0] if isinstance(exc, KeyError) else exc))

    def checks():
        import os

        from orchestrator.runs.inputs import check_data, check_metric_networks
        from orchestrator.runtime.preflight import check_all
        from orchestrator.runtime.raycluster import check_resources, local_shape
        from orchestrator.records import lease
        from orchestrator.runs.lifelong import check_names, experiment_name
        from orchestrator.runs.train import early_source_check, run_resources

        uri, store = check_all(tracking_uri, storage)
        # the run's and every task run's name and folder, and the sequence's lease: before Ray starts
        run_name = check_names(seq, method, overrides, name, store)
        parent = lease.find_existing(uri, experiment_name(seq), run_name)
        if parent is not None:
            lease.check_free(parent, f"lifelong run {run_name!r} (MLflow run {parent.info.run_id})")
        early_source_check(configs[0])
        for cfg in configs:
            check_data(cfg.task)
            check_metric_networks(cfg)
        if not (address or os.environ.get("RAY_ADDRESS")):
            check_resources(*run_resources(configs[0]), local_shape(), what="each task's run")
        return uri, store

    res = command_session(address, lambda checked: run_lifelong(seq, method, overrides=overrides, name=name,
                                                                tracking_uri=checked[0], storage=checked[1],
                                                                where=str(tasks)),
                          preflight=checks)
    _print_lifelong(res)


def _print_lifelong(res) -> None:
    import math

    from orchestrator.records.tracking import ui_hint

    for metric, M in res.matrices.items():
        if metric.startswith("kid_std"):  # in MLflow, not worth a table here
            continue
        table = Table(f"{metric} (row: after task, column: on task)", *res.tasks)
        for k, row in enumerate(M):
            table.add_row(res.tasks[k], *["" if math.isnan(x) else f"{x:.4g}" for x in row])
        console.print(table)
    summary = Table("summary", "value")
    for k, v in res.summary.items():
        if "_task" not in k:
            summary.add_row(k, f"{v:.4g}")
    console.print(summary)
    console.print(f"Lifelong run [bold]{res.name}[/]: MLflow parent run {res.parent_run_id}. "
                  f"Browse: [bold]{ui_hint(res.tracking_uri)}[/]")


@app.command()
def methods() -> None:
    """List the methods and their default settings."""
    from trainers.registry import METHODS

    table = Table("method", "family", "steps", "settings (defaults)")
    for key, cls in sorted(METHODS.items()):
        defaults = cls.Config().model_dump()
        table.add_row(key, cls.family, str(cls.default_steps), ", ".join(f"{k}={v}" for k, v in defaults.items()))
    console.print(table)


@app.command("check-task")
def check_task(task: str = typer.Argument(..., help=TASK_HELP)) -> None:
    """Validate a task file and print it with every default filled in."""
    import yaml

    from orchestrator.core.config import load_task

    try:
        t = load_task(task)
    except ConfigError as exc:
        fail(str(exc))
    from orchestrator.core.redact import redact

    console.print(yaml.safe_dump(redact(t.model_dump(mode="json")), sort_keys=False), highlight=False)


# The demo's short preset: 1,000 steps, where ddpm_finetune's default is 2,000 (what a folder
# domain unlike the source's needs). On the built-in `sketch` task 1,000 steps reach the target
# (target_rate 0.91 ± 0.03 over three seeds) within the demo's 5 minutes on 2 CPU cores; the
# evaluation protocol is the default one (sized to the run: orchestrator.runtime.job.eval_schedule).
DEMO_RUN: dict[str, object] = {"run.steps": 1000}


@app.command()
def demo(
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
) -> None:
    """The embedded default end to end: adapt the shipped synthetic source DDPM to ten shots of the
    synthetic `sketch` domain, and say where the results are."""
    from orchestrator.core.config import resolve
    from orchestrator.runs.train import preflight
    from orchestrator.runs.train import train as run_train

    t0 = time.time()
    cfg = resolve("ddpm_finetune", task_file=DEFAULT_TASK, overrides=DEMO_RUN)
    res = command_session(None, lambda checked: run_train(checked[0], tracking_uri=checked[1], storage=checked[2]),
                          preflight=lambda: preflight(cfg, tracking_uri=tracking_uri, storage=storage, address=None))
    if res.already_finished:
        console.print(f"The demo run {res.name} is already FINISHED (MLflow run {res.run_id}).")
    else:
        _print_result(res, "demo: ddpm_finetune on synthetic-sketch")
    console.print(f"Demo finished in {time.time() - t0:.0f} s.")
    console.print(f"Draw images from the adapted model: [bold]orchestrate sample {res.name} --n 1000 --out "
                  f"demo-samples/[/]; score it at scale: [bold]orchestrate evaluate {res.name} --task "
                  f"{DEFAULT_TASK}[/]", soft_wrap=True)


@app.command()
def runs(
    method: Optional[str] = typer.Argument(None, help="only this method's experiment (default: every experiment)"),
    status: Optional[str] = typer.Option(None, help="only runs with this status (RUNNING, FINISHED, ...)"),
    top: int = typer.Option(20, help="how many, newest first"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
) -> None:
    """List recorded runs, newest first. A RUNNING run whose owner stopped sending heartbeats (a
    killed CLI, a lost node) is shown as RUNNING (stale): the next invocation takes it over."""
    from orchestrator.records import lease, tracking
    from orchestrator.core.names import did_you_mean
    from orchestrator.runtime.preflight import check_tracking_readable

    try:
        uri = check_tracking_readable(tracking_uri)  # an unreachable server fails in seconds, not minutes
    except ConfigError as exc:
        fail(str(exc))
    c = tracking.client(uri)
    exps = [c.get_experiment_by_name(method)] if method else c.search_experiments()
    exps = [e for e in exps if e is not None]
    if not exps:
        known = [e.name for e in c.search_experiments()] if method else []
        fail(f"no MLflow experiment {method!r}{did_you_mean(method or '', known)} in {uri}", code=1)
    flt = f"attributes.status = '{status.upper()}'" if status else ""
    found = c.search_runs([e.experiment_id for e in exps], filter_string=flt,
                          order_by=["attributes.start_time DESC"], max_results=top)
    names = {e.experiment_id: e.name for e in exps}
    table = Table("run", "experiment", "kind", "status", "started")
    for r in found:
        st = r.info.status
        lease_state = lease.state(r)
        if lease_state == "stale":
            st += " (stale)"
        elif lease_state == "live":
            info = lease.read(r)
            st += f" ({info.owner})"
        table.add_row(r.info.run_name or r.info.run_id, names.get(r.info.experiment_id, "?"),
                      r.data.tags.get(tracking.TAG_KIND, "-"), st,
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)))
    console.print(table)


SAMPLE_OPTIONS_HELP = "diffusion: sampler, steps, eta; self_guided: guidance, label; StyleGAN2: truncation; lfs_gan: task"


def _sample_options(sampler, steps, eta, guidance, label, truncation, task_index) -> dict:
    return {"sampler": sampler, "steps": steps, "eta": eta, "guidance": guidance, "label": label,
            "truncation": truncation, "task": task_index}


class _ImagesProgress:
    """One progress bar for a sampling job: images done, images/s and time left."""

    def __init__(self, what: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.t0 = time.perf_counter()
        self.first = None

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("sample", total=total, completed=done, rate="")
            self.first = done
            self.t0 = time.perf_counter()
            return
        rate = (done - self.first) / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done, rate=f"{rate:.1f} images/s")

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


@app.command()
def sample(
    model: str = typer.Argument(..., help="an exported folder, a diffusers UNet folder, a StyleGAN2 checkpoint, "
                                "a run name or MLflow run id, or models:/NAME/VERSION"),
    n: int = typer.Option(..., "--n", help="how many images"),
    out: str = typer.Option(..., "--out", help="a folder (PNGs) or a .parquet file, local or s3://..."),
    seed: int = typer.Option(0, help="image i depends only on the model, the options, this seed and i"),
    sampler: Optional[str] = typer.Option(None, help="diffusion: ddim (default) or ddpm"),
    steps: Optional[int] = typer.Option(None, help="diffusion sampling steps (default 50)"),
    eta: Optional[float] = typer.Option(None, help="DDIM's eta (default 0)"),
    guidance: Optional[float] = typer.Option(None, help="self_guided: guidance scale w (default: the model's)"),
    label: Optional[int] = typer.Option(None, help="self_guided: draw this pseudo-class only"),
    truncation: Optional[float] = typer.Option(None, help="StyleGAN2: truncation psi (default 1)"),
    task_index: Optional[int] = typer.Option(None, "--task-index", help="lfs_gan: which learned task (default: the last)"),
    workers: int = typer.Option(1, help="sampling actors (one model load each)"),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per actor (default: the node's cores shared; 1 with GPUs)"),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per actor; fractions share a GPU (e.g. 0.25)"),
    batch_size: int = typer.Option(32, help="images per forward pass (part of what decides the bytes)"),
    shard_size: Optional[int] = typer.Option(None, help="images per shard: the unit that is written and resumed"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Draw N images from MODEL into OUT, spread over Ray Data actors; rerun the same command to
    resume a killed job (the shards already written are skipped)."""
    from orchestrator import api

    bar = _ImagesProgress(f"sampling {model}")

    def plan():
        return api.plan_sample(model, n, out, seed=seed, batch_size=batch_size, shard_size=shard_size,
                               options=_sample_options(sampler, steps, eta, guidance, label, truncation, task_index),
                               workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                               tracking_uri=tracking_uri, storage=storage, address=address)

    try:
        checked = _guard(plan)
        if not checked.needs_ray:  # every shard is written already
            res = _guard(lambda: api.run_sample(checked))
        else:
            res = command_session(address, lambda _: api.run_sample(checked, bar))
    finally:
        bar.close()
    if res.written == 0:
        console.print(f"[bold green]{res.dest}[/] already holds all {res.n} images of this job; nothing to do.")
        return
    console.print(f"[bold green]sampled[/] {res.written} image(s) of {res.model} into [bold]{res.dest}[/] "
                  f"({res.images_per_s:.1f} images/s; {res.n} in the job)")


@app.command()
def evaluate(
    target: str = typer.Argument(..., help="a model (as for `sample`) or images made elsewhere: a folder, a "
                                 ".parquet file or an s3:// prefix"),
    task: str = typer.Option(DEFAULT_TASK, "--task", "-t", help=TASK_HELP),
    n: Optional[int] = typer.Option(None, "--n", help="samples of a model (default: the task's reference count); "
                                    "images of a folder (default: all)"),
    seed: int = typer.Option(0, help="sampling seed"),
    metrics: Optional[str] = typer.Option(None, help="feature networks, comma-separated (default: domain)"),
    sampler: Optional[str] = typer.Option(None, help="diffusion: ddim (default) or ddpm"),
    steps: Optional[int] = typer.Option(None, help="diffusion sampling steps (default 50)"),
    eta: Optional[float] = typer.Option(None, help="DDIM's eta (default 0)"),
    guidance: Optional[float] = typer.Option(None, help="self_guided: guidance scale w"),
    label: Optional[int] = typer.Option(None, help="self_guided: this pseudo-class only"),
    truncation: Optional[float] = typer.Option(None, help="StyleGAN2: truncation psi"),
    task_index: Optional[int] = typer.Option(None, "--task-index", help="lfs_gan: which learned task"),
    workers: int = typer.Option(1, help="sampling actors"),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per actor"),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per actor; fractions share a GPU"),
    batch_size: int = typer.Option(32, help="images per forward pass"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    truth_check: bool = typer.Option(True, "--truth-check/--no-truth-check",
                                     help="target_rate from the task's own classifier of its reference images "
                                          "against its source model's samples (trained once, cached by content)"),
) -> None:
    """Score a model or a folder of images with the runs' evaluation protocol (FID, KID,
    intra-cluster diversity, density/coverage, target rate) against TASK's reference set;
    recorded as an MLflow run of kind `evaluation`."""
    from orchestrator import api
    from orchestrator.records.tracking import ui_hint

    bar = _ImagesProgress(f"sampling {target}")

    def plan():
        return api.plan_evaluate(target, task, n=n, seed=seed, batch_size=batch_size,
                                 metrics=[m.strip() for m in metrics.split(",")] if metrics else None,
                                 options=_sample_options(sampler, steps, eta, guidance, label, truncation, task_index),
                                 workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                 tracking_uri=tracking_uri, storage=storage, address=address,
                                 truth_check=truth_check)

    try:
        checked = _guard(plan)
        if checked.sample is None or not checked.sample.needs_ray:  # nothing to sample: no Ray
            res = _guard(lambda: api.run_evaluate(checked))
        else:
            res = command_session(address, lambda _: api.run_evaluate(checked, bar))
    finally:
        bar.close()
    table = Table(show_header=False, box=None)
    table.add_row("evaluation", res.name + (" (already FINISHED)" if res.already_finished else ""))
    table.add_row("MLflow run id", res.run_id)
    for k in sorted(res.metrics):
        if k.startswith(("fid_", "kid_", "intra_", "density_", "coverage_", "target_rate", "truth_separation",
                         "num_")) and \
                "std" not in k:
            table.add_row(k, f"{res.metrics[k]:.4g}")
    console.print(table)
    console.print(f"Browse: [bold]{ui_hint(res.tracking_uri, res.experiment_id, res.run_id)}[/]", soft_wrap=True)


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def submit(
    command: list[str] = typer.Argument(..., help="the orchestrate command to run there, after --, "
                                        "e.g. -- sweep ddpm_pa --gpus-per-trial 0.25"),
    address: Optional[str] = typer.Option(None, help="the cluster's Ray Jobs API (its dashboard), e.g. "
                                          "http://localhost:8265; default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS"),
    no_wait: bool = typer.Option(False, "--no-wait", help="print the job's id and return; do not follow its logs"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job's processes (shown in the "
                                  "dashboard: no secrets)"),
    stop_grace_s: int = typer.Option(60, help="seconds a stopped job gets to record its runs KILLED"),
) -> None:
    """Run an orchestrate command on a Ray cluster as a Ray Job (this checkout uploaded as its
    working_dir); follow its logs until it ends and exit with its exit code. The job does not need
    this machine: Ctrl-C stops following, not the job (`ray job stop ID` stops it, recorded KILLED)."""
    from orchestrator.runtime.submit import SubmitError
    from orchestrator.runtime.submit import submit as submit_job

    try:
        code = submit_job(command, commands=typer.main.get_command(app), address=address, wait=not no_wait, env=env,
                          stop_grace_s=stop_grace_s)
    except SubmitError as exc:
        fail(str(exc))
    raise typer.Exit(code)


def _guard(fn):
    """Turn the errors users cause (bad input, refused requests) into one line and exit code 2;
    a failure while training into one line and exit code 1 (the traceback with --debug)."""
    from orchestrator.records.lease import RunBusyError
    from trainers.common import SourceModelError
    from trainers.data import DataError
    from trainers.metrics import MissingWeightsError

    user_errors = (ConfigError, DataError, SourceModelError, MissingWeightsError, RunBusyError, PermissionError)
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise
    except user_errors as exc:
        if _DEBUG["on"]:
            raise
        fail(str(exc), code=2)
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, user_errors) and not _DEBUG["on"]:
            fail(str(cause), code=2)
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        from orchestrator.core import interrupts

        if interrupts.requested():
            raise KeyboardInterrupt from exc
        if _DEBUG["on"]:
            raise
        what, _ = interrupts.describe()
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        fail(f"{what + ' ' if what else ''}failed: {type(cause).__name__}: {first}"
             " (recorded FAILED in MLflow; rerun with --debug for the traceback)", code=1)


def root_cause(exc: BaseException) -> BaseException:
    """The first error in a chain; through Ray Train's ``WorkerGroupError`` (its public
    ``worker_failures``: rank -> exception) to the lowest failed rank's own error, so that a user
    error raised in a worker (a bad checkpoint, a source that does not load) reads as itself."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        nxt = exc.__cause__ or exc.__context__
        if isinstance(failures, dict) and failures:
            nxt = failures[min(failures)]
        if nxt is None:
            break
        exc = nxt
    return exc


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # outside a session (before Ray, a run or a job had started)
        err.print(f"interrupted; to resume, run the same command again ({_same_command()})", highlight=False,
                  markup=False, soft_wrap=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
