"""``orchestrate``: the command line (typer + rich)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.config import DEFAULT_TASK, ConfigError

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


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _print_result(res, what: str) -> None:
    from orchestrator.tracking import ui_hint

    table = Table(show_header=False, box=None)
    table.add_row("run", res.name)
    table.add_row("status", res.status + (" (resumed)" if res.resumed else ""))
    table.add_row("MLflow run id", res.run_id)
    table.add_row("MLflow", res.tracking_uri)
    table.add_row("checkpoints", res.run_dir)
    if res.checkpoint_path:
        table.add_row("last checkpoint", res.checkpoint_path)
    for k in ("loss", "loss_simple", "step"):
        if res.metrics and k in res.metrics:
            table.add_row(k, f"{res.metrics[k]:.4g}")
    console.print(f"[bold green]{what} done.[/]")
    console.print(table)
    console.print(f"Browse: [bold]{ui_hint(res.tracking_uri)}[/]  (experiment {res.experiment_id})")


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
) -> None:
    """Adapt a source generator to a few-shot task with METHOD (one Ray Train run)."""
    from orchestrator.config import parse_overrides, resolve
    from orchestrator.launch import init_ray
    from orchestrator.train import train as run_train

    try:
        overrides = parse_overrides(set_)
        for key, value in (("run.num_workers", workers), ("run.steps", steps),
                           ("run.gpus_per_worker", gpus_per_worker)):
            if value is not None:
                overrides[key] = value
        if gpu:
            overrides["run.use_gpu"] = True
        task_file = task or (None if config else DEFAULT_TASK)
        cfg = resolve(method, task_file=task_file, config_file=config, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc))
    started = init_ray(address)
    try:
        res = _guard(lambda: run_train(cfg, name=name, tracking_uri=tracking_uri, storage=storage,
                                       restart=restart))
    finally:
        _shutdown(started)
    if res.already_finished:
        console.print(f"Run [bold]{res.name}[/] already FINISHED (MLflow run {res.run_id}); "
                      "nothing to do. Use --restart to train it again or --name for a new run.")
        return
    _print_result(res, f"{method} on {cfg.task.name}")


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
    cpus_per_trial: Optional[float] = typer.Option(None, help="CPUs per trial worker (default 0.99 on CPU)"),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs per trial worker; fractions share a GPU"),
    name: Optional[str] = typer.Option(None, help="sweep name (default: sweep-METHOD-TASK-time)"),
    resume: Optional[str] = typer.Option(None, help="continue the interrupted sweep NAME"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Search METHOD's loss weights, timesteps and learning rate with Optuna in Ray Tune; every
    trial is a Ray Train run and an MLflow child run of the sweep. With --tasks SEQUENCE every
    trial learns a whole lifelong sequence (a Ray Train run per task) and is ranked by the
    sequence's summary."""
    from orchestrator.config import parse_overrides, resolve
    from orchestrator.launch import init_ray
    from orchestrator.lifelong import load_sequence, task_configs
    from orchestrator.space import build_space
    from orchestrator.sweep import SweepSettings, default_objective, run_sweep

    sequence = None
    try:
        overrides = parse_overrides(set_)
        for key, value in (("run.num_workers", workers), ("run.steps", steps)):
            if value is not None:
                overrides[key] = value
        if tasks is not None:
            if task is not None:
                raise ConfigError("--task and --tasks: give one task or one sequence, not both")
            sequence = load_sequence(tasks)
            base = task_configs(sequence, method, overrides, str(tasks))[0]
            default = ([SEQUENCE_METRIC[0]], [SEQUENCE_METRIC[1]])
        else:
            base = resolve(method, task_file=task or DEFAULT_TASK, overrides=overrides)
            default = default_objective(base)
        metrics, modes = (metric, mode) if metric else default
        if metric and not mode:
            modes = ["min"] * len(metric)
        settings = SweepSettings(num_samples=num_samples, max_concurrent=max_concurrent, metrics=list(metrics),
                                 modes=list(modes), scheduler=scheduler, grace_period=grace_period, seed=seed,
                                 cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
        settings.validate()
        sp = build_space(base, space)
    except ConfigError as exc:
        _fail(str(exc))
    started = init_ray(address)
    try:
        res = _guard(lambda: run_sweep(base, sp, settings, name=resume or name, resume=resume is not None,
                                       tracking_uri=tracking_uri, storage=storage, sequence=sequence,
                                       overrides=overrides))
    finally:
        _shutdown(started)
    _print_sweep(res, res.settings, method)  # on --resume, the sweep's own stored settings


def _print_sweep(res, settings, method: str) -> None:
    from orchestrator.tracking import ui_hint

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
    console.print(f"Browse: [bold]{ui_hint(res.tracking_uri)}[/]  ·  best configs: "
                  f"[bold]orchestrate best {method}[/]")


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
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
) -> None:
    """The best configs of METHOD recorded in MLflow (train runs and sweep trials)."""
    from orchestrator.best import best_runs, export_config
    from orchestrator.sweep import DEFAULT_METRIC
    from orchestrator.tracking import resolve_tracking_uri

    default = SEQUENCE_METRIC if sequence else DEFAULT_METRIC
    metric = metric or default[0]
    mode = mode or default[1]
    try:
        if sequence and (task or export):
            raise ConfigError("--sequence ranks whole sequences: --task and --export apply to single-task runs")
        runs = best_runs(method, metric, mode, task=task, top=top, tracking_uri=tracking_uri, sequence=sequence)
    except ConfigError as exc:
        _fail(str(exc))
    if not runs:
        _fail(f"no FINISHED {method} run has the metric {metric!r}"
              + (f" for task {task!r}" if task else ""), code=1)
    from orchestrator.tracking import TAG_TASK

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


@app.command()
def pretrain(
    family: str = typer.Argument("ddpm", help="generator family: ddpm or stylegan2"),
    task: str = typer.Option(DEFAULT_TASK, "--task", "-t", help=TASK_HELP),
    force: bool = typer.Option(False, help="pretrain again even if a cached model exists"),
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Pretrain (once, cached) the source model that a task's `source.pretrain` block describes."""
    from orchestrator.config import load_task
    from orchestrator.launch import init_ray
    from orchestrator.sources import cached_source_path, is_ready, pretrain_source

    if family not in ("ddpm", "stylegan2"):
        _fail(f"unknown generator family {family!r}; expected ddpm or stylegan2")
    try:
        t = load_task(task, family=family)
    except ConfigError as exc:
        _fail(str(exc))
    if t.source.family != family:
        _fail(f"{task}: source.family is {t.source.family!r}, not {family!r}")
    if t.source.model != "pretrained":
        _fail(f"{task}: source.model is {t.source.model!r}, not 'pretrained': nothing to pretrain")
    folder = cached_source_path(t)
    if is_ready(t, folder) and not force:
        console.print(f"Source model already cached: [bold]{folder}[/] (use --force to retrain)")
        return
    started = init_ray(address)
    try:
        folder, res = _guard(lambda: pretrain_source(t, tracking_uri=tracking_uri, storage=storage, force=force))
    finally:
        _shutdown(started)
    _print_result(res, "pretraining")
    console.print(f"Source model: [bold]{folder}[/]")


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
    from orchestrator.config import parse_overrides
    from orchestrator.launch import init_ray
    from orchestrator.lifelong import load_sequence, run_lifelong, task_configs

    try:
        seq = load_sequence(tasks)
        overrides = parse_overrides(set_)
        task_configs(seq, method, overrides, str(tasks))  # validate everything before Ray starts
    except (ConfigError, KeyError) as exc:
        _fail(str(exc.args[0] if isinstance(exc, KeyError) else exc))
    started = init_ray(address)
    try:
        res = _guard(lambda: run_lifelong(seq, method, overrides=overrides, name=name, tracking_uri=tracking_uri,
                                          storage=storage, where=str(tasks)))
    finally:
        _shutdown(started)
    _print_lifelong(res)


def _print_lifelong(res) -> None:
    import math

    from orchestrator.tracking import ui_hint

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

    table = Table("method", "family", "settings (defaults)")
    for key, cls in sorted(METHODS.items()):
        defaults = cls.Config().model_dump()
        table.add_row(key, cls.family, ", ".join(f"{k}={v}" for k, v in defaults.items()))
    console.print(table)


@app.command("check-task")
def check_task(task: str = typer.Argument(..., help=TASK_HELP)) -> None:
    """Validate a task file and print it with every default filled in."""
    import yaml

    from orchestrator.config import load_task

    try:
        t = load_task(task)
    except ConfigError as exc:
        _fail(str(exc))
    console.print(yaml.safe_dump(t.model_dump(mode="json"), sort_keys=False), highlight=False)


@app.command()
def demo(
    tracking_uri: Optional[str] = typer.Option(None, help=TRACKING_HELP),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
) -> None:
    """The embedded default end to end: pretrain the synthetic source DDPM (cached after the first
    time), adapt it to ten shots of the synthetic `sketch` domain, and say where the results are."""
    from orchestrator.config import resolve
    from orchestrator.launch import init_ray
    from orchestrator.train import train as run_train

    t0 = time.time()
    cfg = resolve("ddpm_finetune", task_file=DEFAULT_TASK)
    started = init_ray()
    try:
        res = _guard(lambda: run_train(cfg, tracking_uri=tracking_uri, storage=storage))
    finally:
        _shutdown(started)
    if res.already_finished:
        console.print(f"The demo run {res.name} is already FINISHED (MLflow run {res.run_id}).")
    else:
        _print_result(res, "demo: ddpm_finetune on synthetic-sketch")
    console.print(f"Demo finished in {time.time() - t0:.0f} s.")


def _guard(fn):
    """Turn the errors users cause (bad data, bad source) into a clear message and exit code 1."""
    from trainers.data import DataError
    from trainers.diffusion.backbone import SourceModelError

    try:
        return fn()
    except (ConfigError, DataError, SourceModelError) as exc:
        _fail(str(exc), code=1)
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, (DataError, SourceModelError, ConfigError)):
            _fail(str(cause), code=1)
        raise


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _shutdown(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
