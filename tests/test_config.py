"""Task-file and override validation: every error names the file, the key and what was expected."""

from pathlib import Path

import pytest
import yaml

from orchestrator.core.config import ConfigError, apply_overrides, load_task, parse_overrides, resolve

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data, name: str = "task.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_shipped_task_files_validate():
    files = sorted((REPO / "tasks").glob("*.yaml"))
    assert files, "tasks/ ships example task files"
    for f in files:
        if f.name.startswith("sequence"):
            continue
        task = load_task(f)
        assert task.target.shots >= 1 and task.resolution >= 8


def test_minimal_task_fills_defaults_and_resolves_paths(tmp_path):
    (tmp_path / "shots").mkdir()
    task = load_task(write(tmp_path, {"target": {"data": "shots"}}))
    assert task.name == "task"
    assert task.target.data == str((tmp_path / "shots").resolve())
    # no source named, no pretraining described, a shipped source at 32 px: that one is adapted
    assert task.source.model == "builtin" and task.resolution == 32


def test_a_task_without_source_model_adapts_the_shipped_source_unless_it_asks_for_pretraining(tmp_path):
    (tmp_path / "shots").mkdir()
    target = {"target": {"data": "shots"}}
    gan = load_task(write(tmp_path, {**target, "source": {"family": "stylegan2"}}))
    assert gan.source.model == "builtin"
    own = load_task(write(tmp_path, {**target, "source": {"pretrain": {"steps": 100}}}))
    assert own.source.model == "pretrained"  # a pretrain block: the project's own pretraining
    asked = load_task(write(tmp_path, {**target, "source": {"model": "pretrained"}}))
    assert asked.source.model == "pretrained"
    small = load_task(write(tmp_path, {**target, "resolution": 16}))
    assert small.source.model == "pretrained"  # nothing shipped at 16 px


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    p = write(tmp_path, {"target": {"data": "synthetic:sketch", "shot": 10}})
    with pytest.raises(ConfigError) as e:
        load_task(p)
    msg = str(e.value)
    assert str(p) in msg and "target.shot" in msg and "unknown key" in msg and "shots" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    p = write(tmp_path, {"resolution": "big", "target": {"data": "synthetic:sketch"}})
    with pytest.raises(ConfigError) as e:
        load_task(p)
    assert "resolution" in str(e.value) and "'big'" in str(e.value) and str(p) in str(e.value)


def test_resolution_must_be_power_of_two(tmp_path):
    p = write(tmp_path, {"resolution": 48, "target": {"data": "synthetic:sketch"}})
    with pytest.raises(ConfigError, match="resolution: .*power of two"):
        load_task(p)


def test_missing_required_key(tmp_path):
    p = write(tmp_path, {"resolution": 32})
    with pytest.raises(ConfigError, match=r"target: required key is missing"):
        load_task(p)


def test_missing_task_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file(tmp_path):
    p = write(tmp_path, "target: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(p)


def test_builtin_task_and_unknown_builtin():
    assert load_task("synthetic:night").target.data == "synthetic:night"
    with pytest.raises(ConfigError, match="unknown built-in task synthetic:nope"):
        load_task("synthetic:nope")


def test_overrides_route_to_method_run_and_task():
    cfg = resolve("ddpm_finetune", "synthetic:sketch",
                  overrides=parse_overrides(["lr=3e-5", "steps=7", "task.target.shots=5", "run.seed=3"]))
    assert cfg.method_config["lr"] == 3e-5
    assert cfg.run.steps == 7 and cfg.run.seed == 3
    assert cfg.task.target.shots == 5


def test_override_errors_name_the_key():
    cfg = resolve("ddpm_finetune", "synthetic:sketch")
    with pytest.raises(ConfigError, match="--set learning_rate: unknown key"):
        apply_overrides(cfg, {"learning_rate": 1.0})
    with pytest.raises(ConfigError, match=r"method_config.*lr"):
        apply_overrides(cfg, {"lr": -1.0})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["lr"])


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        resolve("nope", "synthetic:sketch")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = resolve("ddpm_finetune", "synthetic:sketch", overrides={"lr": 2e-5})
    p = tmp_path / "cfg.yaml"
    p.write_text(cfg.to_yaml())
    again = resolve("ddpm_finetune", config_file=p)
    assert again == cfg and again.default_name() == cfg.default_name()


def test_run_settings_validate_metrics_and_eval_cadence():
    cfg = resolve("ddpm_finetune", "synthetic:sketch")
    with pytest.raises(ConfigError, match=r"run.metrics: .*unknown feature network"):
        apply_overrides(cfg, {"run.metrics": ["clip"]})
    with pytest.raises(ConfigError, match="eval_every .* must be a multiple of report_every"):
        apply_overrides(cfg, {"run.report_every": 50, "run.eval_every": 75})


def test_shipped_sketch_task_is_the_builtin_default():
    from orchestrator.core.config import builtin_task

    assert load_task(REPO / "tasks" / "synthetic-sketch.yaml") == builtin_task("sketch")


def test_source_cache_key_follows_the_generators_training_only():
    """The pretrained source's cache key changes with what trains the generator, not with the domain
    encoder's settings, and not when an optional field is spelled out at its unset value."""
    from orchestrator.core.config import TaskConfig
    from orchestrator.runs.sources import pretrain_key

    def key(**pretrain):
        return pretrain_key(TaskConfig.model_validate({"name": "k", "resolution": 32, "target": {"data": "synthetic:sketch"},
                                                       "source": {"pretrain": pretrain}}))

    base = key(steps=100)
    assert key(steps=100, encoder_steps=7, encoder_data=["synthetic:night"]) == base
    assert key(steps=100, pretrainer=None) == base
    assert key(steps=200) != base
    assert key(steps=100, lr=3e-4) != base
    assert key(steps=100, preset="small") != base


def test_a_run_gets_its_methods_own_budget_unless_it_sets_one():
    from trainers.registry import get_method

    assert resolve("ddpm_finetune", "synthetic:sketch").run.steps == get_method("ddpm_finetune").default_steps == 2000
    assert resolve("gan_finetune", "synthetic:sketch").run.steps == 300
    assert resolve("dual_output", "synthetic:sketch").run.steps == 300  # its mix reaches the target sooner
    assert resolve("ddpm_finetune", "synthetic:sketch", overrides={"run.steps": 40}).run.steps == 40
