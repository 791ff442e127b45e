"""Tiny task settings shared by the end-to-end tests (16² images, a tiny UNet, a few steps)."""

from pathlib import Path

import yaml
from typer.testing import CliRunner

from orchestrator.records import tracking
from orchestrator.cli import app

TINY_TASK = {
    "name": "tiny-sketch",
    "resolution": 16,
    "source": {"pretrain": {"data": "synthetic:source", "count": 64, "preset": "tiny", "steps": 20,
                            "batch_size": 8, "encoder_steps": 20}},
    "target": {"data": "synthetic:sketch", "shots": 4, "seed": 0},
    "reference": {"data": "synthetic:sketch", "count": 32},
}

# The tiny StyleGAN2 source of the GAN and lifelong end-to-end tests.
GAN_SOURCE = {"family": "stylegan2",
              "pretrain": {"data": "synthetic:source", "count": 64, "preset": "tiny", "steps": 20,
                           "batch_size": 8, "lr": None, "encoder_steps": 20}}

# The truth check (a per-task classifier trained before the run) is off here: every isolated node
# cache would retrain it (~7-10 s a run). test_train_e2e's first test turns it on and checks it.
TINY_RUN = ["run.truth_check=false", "run.steps=20", "run.report_every=10", "run.sample_every=10", "run.grid_size=4",
            "run.grid_sample_steps=2", "batch_size=4", "sample_steps=3", "run.eval_samples=8",
            "run.eval_sample_steps=2", "run.final_eval_samples=12", "run.final_eval_sample_steps=2"]


def write_tiny_task(folder: Path, **changes) -> Path:
    task = {**TINY_TASK, **changes}
    path = folder / f"{task['name']}.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def cli(*args: str):
    res = CliRunner().invoke(app, list(args))
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def tiny_args(task: Path, *extra: str) -> list[str]:
    out = ["--task", str(task), "--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs"]
    for s in TINY_RUN:
        out += ["--set", s]
    return out + list(extra)


def experiment_runs(uri: str, experiment: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    return c, runs
