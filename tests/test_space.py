"""Search spaces: the method's default, overridden by a YAML file; invalid spaces name the key."""

import pytest
import yaml

from orchestrator.core.config import ConfigError, resolve
from orchestrator.search.space import build_space, to_tune
from orchestrator.search.space import pareto_front
from orchestrator.search.sweep import SweepSettings


@pytest.fixture
def base():
    return resolve("ddpm_finetune", "synthetic:sketch")


def space_file(tmp_path, data):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_default_space_is_declared_by_the_method(base):
    space = build_space(base)
    assert space["lr"] == {"loguniform": [2e-5, 1e-3]}
    tune_space = to_tune(space)
    assert set(tune_space) == set(space)


def test_file_overrides_extends_and_removes(base, tmp_path):
    p = space_file(tmp_path, {"lr": {"uniform": [1e-4, 2e-4]}, "run.steps": 50, "t_max": {"int": [200, 1000, 100]},
                              "weight_decay": None})
    space = build_space(base, p)
    assert space["lr"] == {"uniform": [1e-4, 2e-4]}
    assert space["run.steps"] == 50 and "weight_decay" not in space
    t = to_tune(space)
    assert t["run.steps"] == 50
    assert t["t_max"].lower == 200 and t["t_max"].upper == 1000 and t["t_max"].sampler.q == 100  # upper bound inclusive


@pytest.mark.parametrize("entry, message", [
    ({"learning_rate": {"uniform": [0, 1]}}, "learning_rate: unknown key"),
    ({"lr": {"gaussian": [0, 1]}}, "lr: expected one of"),
    ({"lr": {"uniform": [1, 0]}}, "lr: uniform needs low < high"),
    ({"lr": {"loguniform": [0, 1]}}, "lr: loguniform needs low > 0"),
    ({"lr": {"uniform": [-1, 1]}}, "lr: value -1.0 is not valid"),
    ({"ema_decay": {"choice": []}}, "ema_decay: choice needs a non-empty list"),
    ({"t_min": {"int": [0.5, 3]}}, "t_min: int needs integer bounds"),
    ({"run.precision": {"choice": ["fp8"]}}, "run.precision: value 'fp8' is not valid"),
])
def test_invalid_spaces_name_the_file_and_key(base, tmp_path, entry, message):
    p = space_file(tmp_path, entry)
    with pytest.raises(ConfigError) as e:
        build_space(base, p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_missing_space_file(base, tmp_path):
    with pytest.raises(ConfigError, match="space file .* does not exist"):
        build_space(base, tmp_path / "none.yaml")


def test_settings_validation():
    with pytest.raises(ConfigError, match="one mode per metric"):
        SweepSettings(metrics=["a", "b"], modes=["min"]).validate()
    with pytest.raises(ConfigError, match="--mode 'up'"):
        SweepSettings(metrics=["a"], modes=["up"]).validate()


def test_pareto_front_by_hand():
    trials = [
        {"trial_id": "a", "status": "FINISHED", "q": 1.0, "d": 0.1},   # best q
        {"trial_id": "b", "status": "FINISHED", "q": 2.0, "d": 0.5},   # best d
        {"trial_id": "c", "status": "FINISHED", "q": 2.5, "d": 0.4},   # dominated by b
        {"trial_id": "d", "status": "FINISHED", "q": 1.5, "d": 0.3},   # trade-off
        {"trial_id": "e", "status": "KILLED", "q": 0.1, "d": 0.9},     # stopped early: not eligible
    ]
    front = pareto_front(trials, ["q", "d"], ["min", "max"])
    assert sorted(t["trial_id"] for t in front) == ["a", "b", "d"]


def test_a_resumed_sweep_retires_trials_that_tune_never_recorded(tmp_path, capsys):
    """A trial that opened its MLflow run after Tune's last state save, before the driver was
    killed, is unknown to the restored Tune run: its run is closed KILLED, tagged and marked
    deleted (restorable), and the known trials, also one known only by its folder, are kept."""
    from mlflow.entities import ViewType

    from orchestrator.records import tracking
    from orchestrator.search.sweep import TAG_TRIAL, retire_orphans

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.get_or_create_experiment(uri, "sweeps")
    parent = tracking.start_run(uri, exp, "s")
    ids = {}
    for trial in ("aaaa0001", "aaaa0002", "bbbb0003"):
        ids[trial] = tracking.start_run(uri, exp, trial, parent_run_id=parent, tags={TAG_TRIAL: trial})
    tracking.end_run(uri, ids["aaaa0001"], "FINISHED")
    retire_orphans(uri, exp, parent, ["aaaa0001", "trial_driver_aaaa0002_2_lr=0.001"])
    c = tracking.client(uri)
    active = {r.data.tags[TAG_TRIAL] for r in c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert active == {"aaaa0001", "aaaa0002"}
    orphan = c.get_run(ids["bbbb0003"])
    assert orphan.info.status == "KILLED" and orphan.info.lifecycle_stage == "deleted"
    assert "orchestrate.orphaned" in orphan.data.tags
    assert len(c.search_runs([exp], run_view_type=ViewType.ALL)) == 4  # nothing erased
    assert "bbbb0003" in capsys.readouterr().out
