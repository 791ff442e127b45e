"""Tiny task settings shared by the end-to-end tests (16² images, a tiny UNet, a few steps)."""

from pathlib import Path

import yaml

TINY_TASK = {
    "name": "tiny-sketch",
    "resolution": 16,
    "source": {"pretrain": {"data": "synthetic:source", "count": 64, "preset": "tiny", "steps": 20,
                            "batch_size": 8}},
    "target": {"data": "synthetic:sketch", "shots": 4, "seed": 0},
    "reference": {"data": "synthetic:sketch", "count": 32},
}

TINY_RUN = ["run.steps=20", "run.report_every=10", "run.sample_every=10", "run.grid_size=4",
            "run.grid_sample_steps=2", "batch_size=4", "sample_steps=3"]


def write_tiny_task(folder: Path, **changes) -> Path:
    task = {**TINY_TASK, **changes}
    path = folder / f"{task['name']}.yaml"
    path.write_text(yaml.safe_dump(task))
    return path
