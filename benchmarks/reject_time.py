"""Seconds from typing a command to its first answer, at two commits: a bad task file's one-line
refusal, a typo'd method's suggestion, and ``orchestrate --help``.

A task file with a typo'd key (``sourse:`` for ``source:``) is given to ``orchestrate check-task``
and ``orchestrate train ddpm_finetune --task``; ``orchestrate train ddpm_fintune`` and
``orchestrate --help`` are timed too. Each runs at the commit before the input-rules and lazy
registry work (``--before``, default a80a26d) and at this checkout, alternately, ``--runs`` times;
the table gives the median and the spread (min-max) of the wall time, the exit codes (2 for the
refusals, 0 for help) and the number of lines a refusal printed.
The old commit runs from a ``git worktree`` with this checkout's venv (``PYTHONPATH`` puts its
code first), so only the code differs.

    python -m benchmarks.reject_time [--runs 5] [--before a80a26d]
    python -m benchmarks.reject_time --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, cores, read_result, write_markdown

BAD_TASK = """name: typo
sourse:
  model: builtin:ddpm-synthetic-32
target:
  data: synthetic:sketch
  shots: 10
"""

COMMANDS = {"check-task typo.yaml": ["check-task", "{task}"],
            "train ddpm_finetune --task typo.yaml": ["train", "ddpm_finetune", "--task", "{task}"],
            "train ddpm_fintune": ["train", "ddpm_fintune"],
            "--help": ["--help"]}


def run_once(code: Path, command: list[str], cwd: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", *command], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    return time.perf_counter() - t0, res.returncode, (res.stderr.strip() or res.stdout.strip())


def measure(before: str, runs: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="reject-time-"))
    old = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), before], check=True,
                   capture_output=True)
    try:
        task = work / "typo.yaml"
        task.write_text(BAD_TASK)
        rows: dict[str, dict[str, list]] = {}
        for _ in range(runs):
            for variant, code in (("before", old), ("after", ROOT)):
                for cmd, argv in COMMANDS.items():
                    secs, rc, msg = run_once(code, [a.format(task=task) for a in argv], work)
                    r = rows.setdefault(f"{cmd}|{variant}", {"s": [], "rc": [], "lines": [], "message": msg})
                    r["s"].append(secs)
                    r["rc"].append(rc)
                    r["lines"].append(len(msg.splitlines()))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return {"before": before, "runs": runs, "rows": rows, "machine": cores(),
            "load_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}


def report(data: dict) -> str:
    out = [f"## Time to the first answer (`reject_time.py`, {data['machine']}, {data['date']})", "",
           f"A task file with the key `sourse:` (for `source:`); {data['runs']} runs per cell, alternating; "
           f"before = commit {data['before']}, after = this commit; load average after: {data['load_after']:.2f}.", "",
           "| command | commit | median s | min-max s | exit codes | lines |", "|---|---|---:|---:|---|---:|"]
    for key, r in data["rows"].items():
        cmd, variant = key.split("|")
        out.append(f"| `{cmd}` | {variant} | {statistics.median(r['s']):.2f} | {min(r['s']):.2f}-{max(r['s']):.2f} | "
                   f"{sorted(set(r['rc']))} | {max(r['lines'])} |")
    out += ["", "Messages (after):", ""]
    for key, r in data["rows"].items():
        if key.endswith("|after") and not key.startswith("--help"):
            out.append(f"- `{key.split('|')[0]}`: {r['message']}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", default="a80a26d")
    ap.add_argument("--out", type=Path, default=RESULTS / "reject_time.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        data = read_result(args.out)
    else:
        data = measure(args.before, args.runs)
        args.out.write_text(json.dumps(data, indent=1))
    write_markdown(args.out, report(data))


if __name__ == "__main__":
    main()
