"""The method registry: its table agrees with the classes, and reading it imports no method.

``trainers.registry.METHOD_TABLE`` names each method's family and class without importing it, so
that the command line answers ``--help``, a typo'd method name and a bad task file before torch,
diffusers and the seven methods load (issue: a typo waited 4-5 s for its one-line answer).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainers.registry import METHOD_TABLE, METHODS, get_method, method_family

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key", sorted(METHOD_TABLE))
def test_the_table_names_each_class_by_its_own_key_and_family(key):
    cls = get_method(key)
    assert cls.key == key and cls.family == method_family(key) == METHOD_TABLE[key][0]
    assert METHODS[key] is cls


def test_an_unknown_key_is_a_key_error_with_a_suggestion():
    for lookup in (get_method, method_family):
        with pytest.raises(KeyError, match=r"unknown method 'ddpm_fintune' \(did you mean ddpm_finetune\?\)"):
            lookup("ddpm_fintune")
    with pytest.raises(KeyError):
        METHODS["nope"]
    assert list(METHODS) == list(METHOD_TABLE) and len(METHODS) == 7


def _torch_loaded_after(body: str, tmp_path: Path) -> str:
    """Run ``body`` in a fresh interpreter (cwd ``tmp_path``); return what it printed last:
    whether torch was imported by then."""
    script = textwrap.dedent(body) + "\nimport sys\nprint('torch' in sys.modules)\n"
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


def test_help_a_typo_and_a_bad_task_file_answer_without_importing_torch(tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\nsourse:\n  model: builtin:ddpm-synthetic-32\n"
                                        "target:\n  data: synthetic:sketch\n  shots: 10\n")
    body = """
        from typer.testing import CliRunner
        from orchestrator.cli import app
        r = CliRunner()
        for args, code, needle in ((["--help"], 0, "sweep"), (["train", "--help"], 0, "--task"),
                                   (["train", "ddpm_fintune"], 2, "did you mean ddpm_finetune"),
                                   (["check-task", "typo.yaml"], 2, "sourse"),
                                   (["train", "ddpm_finetune", "--task", "typo.yaml"], 2, "sourse")):
            res = r.invoke(app, args)
            assert res.exit_code == code and needle in " ".join(res.output.split()), (args, res.output)
    """
    assert _torch_loaded_after(body, tmp_path) == "False"


def test_a_good_task_loads_the_method_when_it_is_resolved(tmp_path):
    body = f"""
        from orchestrator.core.config import resolve
        resolve("ddpm_finetune", task_file={str(REPO / 'tasks' / 'synthetic-sketch.yaml')!r})
    """
    assert _torch_loaded_after(body, tmp_path) == "True"
