"""Bad input starts nothing (issue 28): one name rule for every run, sweep, sequence and task name;
every refusal that needs no Ray is decided before Ray starts; finite numbers only; one-line
messages that name the flag the user typed, suggest close matches and quote resume hints.

Nothing here trains, starts Ray or needs the tiny sources (no ``workspace`` fixture): each test
works in its own temporary folder with Ray's start replaced by a tripwire.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import socket
import time
from pathlib import Path

import pytest
import typer

from orchestrator.core.config import ConfigError, InputError, RunSettings, load_task, resolve
from orchestrator.core.names import DERIVED_MAX, NAME_MAX, RESERVED, check_name, problem
from orchestrator.data.storage import run_dir
from tests.tiny import cli

REPO = Path(__file__).resolve().parents[1]
LONG = "a" * 300


@pytest.fixture
def here(tmp_path, monkeypatch):
    """An empty working directory, no tracking/storage/Ray environment, and Ray's start replaced
    by a tripwire: a command that reaches it fails the test."""
    import orchestrator.runtime.raycluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    for var in ("MLFLOW_TRACKING_URI", "ORCHESTRATE_STORAGE", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(orchestrator.runtime.raycluster, "init_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def text(res) -> str:
    return " ".join(res.output.split())


def refused(res, *needles: str) -> str:
    out = text(res)
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:])
    assert "Traceback" not in res.output
    for n in needles:
        assert n in out, (n, out)
    # Ray's start is the ``here`` fixture's tripwire; ``ray.is_initialized()`` says nothing here,
    # since the session's own Ray instance (conftest ``ray_local``) may be up from earlier tests.
    return out


def nothing_created(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "a refused command created files"


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("bad", ["x/../b3-full", "a/b", "..", ".", "../x", "x\\..\\y", "-x", "my run", LONG,
                                 "it's", "artifacts"])
def test_bad_names_are_refused_before_anything_starts(here, bad):
    seq = str(REPO / "tasks" / "sequence1.yaml")
    for args in (["train", "ddpm_finetune", "--name", bad],
                 ["sweep", "ddpm_pa", "--name", bad],
                 ["sweep", "ddpm_pa", "--resume", bad],
                 ["lifelong", "--tasks", seq, "--name", bad]):
        res = cli(*args)
        out = refused(res, "--resume" if "--resume" in args else "--name")
        assert "error:" in out and any(why in out for why in ("not allowed", "at most 100", "must start with",
                                                               "reserved")), out
        if bad == LONG:
            assert "300 characters, at most 100" in out and LONG not in out  # the name is cut in the message
    nothing_created(here)


def test_a_task_file_name_follows_the_same_rule(tmp_path):
    for name, why in (("../x", "'/' not allowed"), (LONG, "at most 100")):
        p = tmp_path / "t.yaml"
        p.write_text(json.dumps({"name": name, "target": {"data": "synthetic:sketch"}}))
        with pytest.raises(ConfigError, match=why) as e:
            load_task(p)
        assert f"{p}: name" in str(e.value)
    p = tmp_path / "bad name.yaml"
    p.write_text("target: {data: synthetic:sketch}\n")
    with pytest.raises(ConfigError, match="taken from the file name"):
        load_task(p)


def test_a_sequence_and_its_task_names_follow_the_same_rule(tmp_path):
    from orchestrator.runs.lifelong import load_sequence

    for seq in ({"name": "a/../b", "tasks": [{"name": "t", "target": {"data": "synthetic:sketch"}}]},
                {"name": "s", "tasks": [{"name": LONG, "target": {"data": "synthetic:sketch"}}]}):
        p = tmp_path / "seq.yaml"
        p.write_text(json.dumps(seq))
        with pytest.raises(ConfigError, match="name"):
            load_sequence(p)


def _random_name(rng: random.Random) -> str:
    """Half from the allowed characters only (dots included: ``a..b``, ``.x``, ``..``), half with
    path separators, traversals, quotes, spaces, control and non-ASCII characters mixed in."""
    safe = ["a", "Z", "0", "9", "-", "_", ".", ".."]
    hostile = safe + ["/", "\\", " ", "'", '"', "%", "~", "\n", "é", "\x00", "s3://", "../", "/..", "./", "`", "$"]
    pool = safe if rng.random() < 0.5 else hostile
    n = rng.choice([1, 2, 3, 5, 8, 20, 60, 99, 100, 101, 250, 251, 400])
    out = "".join(rng.choice(pool) for _ in range(n))
    return out[:n] if rng.random() < 0.5 else out


@pytest.mark.parametrize("root", ["LOCAL", "s3://bucket/some/prefix", "s3://bucket"])
def test_no_name_resolves_outside_its_storage_root(tmp_path, root):
    """Property: over many generated names, run_dir either refuses the name or returns a folder that
    is a direct child of the storage root (lexically, and on disk for a local root)."""
    root = str(tmp_path / "runs") if root == "LOCAL" else root
    rng = random.Random(28)
    names = [_random_name(rng) for _ in range(4000)] + ["a" * DERIVED_MAX, "a" * (DERIVED_MAX + 1), "..", ".",
                                                        "a..b", "a.", "x" + "/.." * 5, *RESERVED]
    accepted = 0
    for name in names:
        try:
            path = run_dir(root, name)
        except ConfigError:  # InputError is one too
            assert problem(name, DERIVED_MAX) is not None, name  # refused for its name, nothing else
            continue
        accepted += 1
        assert problem(name, DERIVED_MAX) is None, name
        if root.startswith("s3://"):
            parent, leaf = posixpath.split(posixpath.normpath(path.split("://", 1)[1]))
            assert parent == posixpath.normpath(root.split("://", 1)[1]) and leaf == name
        else:
            real = os.path.realpath(path)
            assert os.path.dirname(real) == os.path.realpath(root) and os.path.basename(real) == name
    assert accepted > 100  # the generator also makes valid names


def test_an_s3_key_too_long_for_what_a_run_writes_is_refused():
    with pytest.raises(InputError, match="bytes of an object key"):
        run_dir("s3://bucket/" + "p" * 700, "run")
    assert run_dir("s3://bucket/prefix", "run") == "s3://bucket/prefix/run"


def test_default_and_composed_names_are_checked():
    assert check_name("a" * NAME_MAX, "--name") == "a" * NAME_MAX
    with pytest.raises(ConfigError, match="at most 100"):
        check_name("a" * (NAME_MAX + 1), "--name")
    check_name("a" * DERIVED_MAX, "the default run name", DERIVED_MAX)
    cfg = resolve("ddpm_finetune", task_file="synthetic:sketch")
    assert problem(cfg.default_name(), DERIVED_MAX) is None


# ---------------------------------------------------------------------------------------------
# refusals decided before Ray


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.mark.parametrize("command", [["runs"], ["best", "ddpm_finetune"]])
def test_an_unreachable_tracking_server_fails_within_10_s_naming_its_source(here, monkeypatch, command):
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    res = cli(*command, "--tracking-uri", uri)
    assert time.monotonic() - t0 < 10
    refused(res, f"--tracking-uri {uri}", "no MLflow server answered")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    res = cli(*command)
    assert time.monotonic() - t0 < 10
    out = refused(res, f"MLFLOW_TRACKING_URI={uri}")
    assert "--tracking-uri" not in out


def test_train_names_the_environment_variable_it_took_the_uri_from(here, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = refused(cli("train", "ddpm_finetune", "--storage", "runs"), f"MLFLOW_TRACKING_URI={uri}")
    assert "--tracking-uri" not in out


def test_resume_of_an_unknown_sweep_starts_no_ray(here):
    res = cli("sweep", "ddpm_pa", "--resume", "never-was", "--tracking-uri", "sqlite:///mlflow.db",
              "--storage", "runs")
    refused(res, "--resume never-was: no sweep of that name")
    assert not (here / "mlflow.db").exists()  # looking for it created no store


@pytest.mark.parametrize("args,needle", [
    (["--more", "3"], "--more 3: adds trials to a sweep: give --resume NAME"),
    (["--resume", "x", "--more", "0"], "--more 0: expected a number of trials >= 1"),
    (["--warm-start", "never-was"], "--warm-start never-was: no sweep named 'never-was'"),
    (["--warm-start", "old", "--top", "9", "--num-samples", "4"], "--top 9: expected 1 to --num-samples (4)"),
    (["--study-storage", "postgresql://me:pw@db/optuna"], "--study-storage: the URL holds a password"),
])
def test_study_flags_are_refused_before_ray(here, args, needle):
    res = cli("sweep", "ddpm_pa", *args, "--tracking-uri", "sqlite:///mlflow.db", "--storage", "runs")
    out = refused(res, needle)
    assert "pw" not in out  # a refused password is not echoed


def _live_run(uri: str, experiment: str, name: str, kind: str) -> str:
    """An MLflow run ``name`` whose lease a live invocation (this process) holds."""
    from orchestrator.records import lease, tracking

    exp = tracking.get_or_create_experiment(uri, experiment)
    run_id = tracking.start_run(uri, exp, name, tags={tracking.TAG_KIND: kind})
    info = lease.LeaseInfo(owner="elsewhere:1", host="elsewhere", pid=os.getpid(), token="t", taken=time.time(),
                           heartbeat=time.time(), ttl=600)
    tracking.client(uri).set_tag(run_id, lease.TAG_LEASE, json.dumps(info.__dict__))
    return run_id


def test_a_sweep_held_by_a_live_invocation_is_refused_before_ray(here):
    from orchestrator.records import tracking

    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _live_run(uri, "ddpm_pa", "busy-sweep", "sweep")
    for flag in ("--resume", "--name"):
        res = cli("sweep", "ddpm_pa", flag, "busy-sweep", "--tracking-uri", "sqlite:///mlflow.db",
                  "--storage", "runs")
        refused(res, "is being trained by another invocation", "elsewhere")


def test_a_run_held_by_a_live_invocation_is_refused_before_ray(here):
    from orchestrator.records import tracking

    uri = tracking.resolve_tracking_uri("sqlite:///mlflow.db")
    _live_run(uri, "ddpm_finetune", "busy-run", "train")
    for extra in ([], ["--restart"]):
        res = cli("train", "ddpm_finetune", "--name", "busy-run", *extra, "--tracking-uri", "sqlite:///mlflow.db",
                  "--storage", "runs")
        refused(res, "run 'busy-run'", "is being trained by another invocation")


# ---------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(here, value):
    refused(cli("train", "ddpm_finetune", "--set", f"lr={value}"), "--set", "lr", "finite number")
    refused(cli("train", "ddpm_finetune", "--set", f"run.start_timeout_s={value}"), "run.start_timeout_s",
            "finite number")
    nothing_created(here)


def test_every_float_setting_of_every_method_must_be_finite():
    from pydantic import ValidationError

    from trainers.registry import METHODS

    checked = 0
    for cls in METHODS.values():
        for field, info in cls.Config.model_fields.items():
            if float not in (getattr(info.annotation, "__args__", None) or (info.annotation,)):
                continue
            is_list = getattr(info.annotation, "__origin__", None) is list  # e.g. list[float]: each value
            for bad in (float("inf"), float("nan")):
                with pytest.raises(ValidationError, match="finite"):
                    cls.Config(**{field: [0.0, bad] if is_list else bad})
                checked += 1
    assert checked > 20
    for field in ("cpus_per_worker", "gpus_per_worker", "start_timeout_s"):
        with pytest.raises(ValidationError, match="finite"):
            RunSettings(**{field: float("inf")})


def test_infinite_flags_are_refused_naming_the_flag(here):
    refused(cli("train", "ddpm_finetune", "--gpus-per-worker", "inf"), "--gpus-per-worker inf", "finite")
    refused(cli("sweep", "ddpm_pa", "--cpus-per-trial", "inf"), "--cpus-per-trial inf", "finite")
    refused(cli("sweep", "ddpm_pa", "--gpus-per-trial", "nan"), "--gpus-per-trial nan", "finite")


# ---------------------------------------------------------------------------------------------
# messages


def test_typos_get_a_did_you_mean(here):
    refused(cli("train", "ddpm_fintune"), "unknown method 'ddpm_fintune'", "did you mean ddpm_finetune?")
    refused(cli("train", "ddpm_finetune", "--task", "synthetic:skech"), "did you mean synthetic:sketch?")
    refused(cli("lifelong", "--tasks", str(REPO / "tasks" / "sequence1.yaml"), "--method", "lfs_gn"),
            "did you mean lfs_gan?")
    refused(cli("train", "ddpm_finetune", "--set", "ema_decy=0.9"), "did you mean ema_decay?")


def test_a_typo_in_a_synthetic_data_uri_gets_a_did_you_mean():
    from trainers.data import DataError, load_images

    with pytest.raises(DataError, match=r"did you mean synthetic:sketch\?"):
        load_images("synthetic:skech", 16, count=1)


def test_a_flag_is_blamed_as_itself_not_as_set(here):
    out = refused(cli("train", "ddpm_finetune", "--steps", "0"), "--steps 0")
    assert "--set" not in out
    out = refused(cli("sweep", "ddpm_pa", "--steps", "0"), "--steps 0")
    assert "--set" not in out


def test_a_validator_message_shows_the_value_once(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("resolution: 48\ntarget: {data: synthetic:sketch}\n")
    with pytest.raises(ConfigError) as e:
        load_task(p)
    msg = str(e.value)
    assert msg.count("(got 48)") == 1 and "Value error" not in msg and "\n" not in msg  # one error, one line


def test_errors_are_one_line_without_object_reprs_or_colour_codes(capsys):
    from orchestrator.cli import fail

    with pytest.raises(typer.Exit) as e:
        fail("shots/a.png: cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0d90> \x1b[31mred\x1b[0m "
              + "word " * 40 + "[bold]not markup[/bold]")
    assert e.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "BytesIO" not in err and "0x7f" not in err and "\x1b" not in err
    assert "[bold]not markup[/bold]" in err


def test_an_undecodable_image_names_no_buffer():
    from trainers.data import DataError
    from trainers.data.sources import _decode

    with pytest.raises(DataError) as e:
        _decode(b"this is not an image", "shots/a.png", 16)
    assert "shots/a.png" in str(e.value) and "BytesIO" not in str(e.value)


def test_every_interruption_gives_a_shell_quoted_resume_hint(here, monkeypatch, capsys):
    """Ctrl-C before the run names itself (e.g. while its source pretrains) still says how to
    resume: the command line again, shell-quoted."""
    import sys

    from orchestrator.core import interrupts
    from orchestrator.cli import command_session

    monkeypatch.setattr(sys, "argv", ["orchestrate", "train", "ddpm_finetune", "--task", "my tasks/t.yaml"])

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        command_session(None, lambda checked: None, preflight=interrupted)
    assert e.value.exit_code == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "run the same command again" in err
    assert "orchestrate train ddpm_finetune --task 'my tasks/t.yaml'" in err

    def named_then_interrupted():
        interrupts.current("run x", "orchestrate sweep ddpm_pa --resume 'a b'")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit):
        command_session(None, lambda checked: None, preflight=named_then_interrupted)
    err = " ".join(capsys.readouterr().err.split())
    assert "run x is recorded KILLED" in err and "--resume 'a b'" in err
