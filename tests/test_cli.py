"""The small commands, end to end through the CLI."""

from pathlib import Path

import yaml

from tests.tiny import cli

REPO = Path(__file__).resolve().parents[1]


def test_methods_lists_every_registered_method_with_defaults():
    from trainers.registry import METHODS

    res = cli("methods")
    assert res.exit_code == 0
    for key in METHODS:
        assert key in res.output
    assert "lr=" in res.output


def test_check_task_prints_the_resolved_task():
    res = cli("check-task", str(REPO / "tasks" / "synthetic-sketch.yaml"))
    assert res.exit_code == 0
    data = yaml.safe_load(res.output)
    assert data["target"]["shots"] == 10 and data["source"]["pretrain"]["preset"] == "tiny"


def test_check_task_reports_the_bad_key(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("target: {data: synthetic:sketch, shot: 3}\n")
    res = cli("check-task", str(p))
    assert res.exit_code == 2
    assert "target.shot: unknown key" in res.output


def test_train_rejects_unknown_method_and_bad_override():
    res = cli("train", "nope")
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output
    res = cli("train", "ddpm_finetune", "--set", "learning_rate=1")
    assert res.exit_code == 2 and "learning_rate: unknown key" in res.output


def test_sweep_rejects_a_bad_space_before_starting_ray(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {uniform: [1, 0]}\n")
    res = cli("sweep", "ddpm_pa", "--space", str(space))
    assert res.exit_code == 2 and "low < high" in res.output
