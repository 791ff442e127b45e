"""The one helper module of the benchmarks: what several scripts under ``benchmarks/`` share.

* where results go (``ROOT``, ``RESULTS``) and how a script is written down in them: its command
  line (``command_line``), its settings (``settings_of``), the machine (``cores``, ``processor``,
  ``machine_description``); ``pick_device`` for ``--device auto | cpu | cuda``;
* timing: ``Clock`` (wall and process-CPU seconds of a phase), ``phase_rows`` (the markdown rows
  of a phase table);
* statistics and tables: ``mean_std`` and ``fmt`` (mean ± std over seeds), ``md_table`` and
  ``text_table``;
* the JSON a script records and its markdown, re-rendered by ``--report-only``: ``read_result``,
  ``write_markdown``;
* running the project's one training loop (``orchestrator.runtime.loop.run_loop``) from a script:
  ``run_row`` (a run's table row), ``same_images`` (the loop trained on the script's images),
  ``reload`` (the trained method from its export), ``node_cache``, ``copy_into_place`` and
  ``install`` (a pretrained source put where the CLI caches it), ``log``, and
  ``SAMPLE_SEED_OFFSET`` (the loop's evaluation protocol).

Benchmarks run as ``python -m benchmarks.<script>`` from the repository root and import it as
``benchmarks.common``; the project itself is imported as installed. Nothing heavy (torch,
the project) is imported here at module level, so that ``--report-only`` stays quick: the
functions that need them import them when called.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    import argparse

    import torch

    from orchestrator.data.artifacts import ArtifactRef
    from orchestrator.runtime.job import Job

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESULTS = Path(__file__).resolve().parent / "results"  # benchmarks/results: the recorded results

SAMPLE_SEED_OFFSET = 12345  # the loop's evaluation protocol: sampling noise seed = run seed + 12345
# keys of a loop report that are neither metrics nor training terms
LOOP_KEYS = {"step", "steps_per_s", "images_per_s", "export", "trainable_parameters"}


# ------------------------------------------------------------------------------------------------
# the record: command, settings, machine, device
# ------------------------------------------------------------------------------------------------
def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python -m benchmarks.<script>`` and its arguments (``argv``, else this process's)."""
    return f"python -m benchmarks.{script}" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))


def settings_of(args: argparse.Namespace, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A script's arguments for its JSON (paths as strings), without the keys in ``drop``."""
    skip = set(drop)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


def cores() -> str:
    """``<n>-core <architecture>``: the machine in a results heading."""
    return f"{os.cpu_count()}-core {platform.machine()}"


def processor() -> str:
    """The processor's name, else its architecture."""
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    """``<n> CPU cores (<processor>), torch <version>, device <device>`` (and the GPU's name)."""
    import torch

    return (f"{os.cpu_count()} CPU cores ({processor()}), torch {torch.__version__}, device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))


def pick_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when available, else the CPU; anything else as given."""
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                        else ("cpu" if name == "auto" else name))


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
class Clock:
    """Wall and process-CPU seconds since creation (CPU time: all threads of this process; it is
    robust to other jobs on the machine)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) since creation."""
        return time.perf_counter() - self.wall, time.process_time() - self.cpu

    def seconds(self) -> dict[str, float]:
        """``{"wall_s": ..., "cpu_s": ...}`` since creation: a phase's entry in a result."""
        wall, cpu = self.elapsed()
        return {"wall_s": wall, "cpu_s": cpu}


def phase_rows(phases: dict[str, dict[str, float]]) -> str:
    """``| phase | wall min | CPU min |`` rows of a result's phases (``Clock.seconds`` entries)."""
    return "\n".join(f"| {k} | {v['wall_s'] / 60:.1f} | {v['cpu_s'] / 60:.1f} |" for k, v in phases.items())


# ------------------------------------------------------------------------------------------------
# statistics and tables
# ------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (std is NaN for fewer than two)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def fmt(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` of the finite values with ``digits`` significant digits (the mean alone for
    one value, ``n/a`` for none)."""
    m, s = mean_std(values)
    if not math.isfinite(m):
        return "n/a"
    g = f"{{:.{digits}g}}"
    return g.format(m) if not math.isfinite(s) else f"{g.format(m)} ± {g.format(s)}"


def md_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """The same table as plain text, columns padded to their widest cell (for stdout)."""
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)


# ------------------------------------------------------------------------------------------------
# the recorded JSON and its markdown (--report-only)
# ------------------------------------------------------------------------------------------------
def read_result(path: Path) -> dict[str, Any]:
    """A recorded result (``--report-only`` re-renders its markdown from it)."""
    return json.loads(Path(path).read_text())


def write_markdown(json_path: Path, text: str) -> None:
    """``text`` to the markdown beside a result's JSON (``<name>.md``), and to stdout."""
    Path(json_path).with_suffix(".md").write_text(text)
    print(text)


# ------------------------------------------------------------------------------------------------
# runs of the one training loop
# ------------------------------------------------------------------------------------------------
def run_row(final: dict[str, Any], metric_keys: set[str], steps: int, cpu_s_per_step: float) -> dict[str, Any]:
    """A run's row from the loop's final report: its evaluation's metrics, the time per step, and
    the training terms of its last report window as ``train_<term>``."""
    row = {k: v for k, v in final.items() if k in metric_keys}
    row.update(s_per_step=final["time_train_s"] / steps, cpu_s_per_step=cpu_s_per_step)
    row.update({f"train_{k}": v for k, v in final.items()
                if k not in metric_keys and k not in LOOP_KEYS and not k.startswith("time_")})
    return row


def same_images(ref: ArtifactRef, images: torch.Tensor, what: str) -> None:
    """The loop's copy of an image set (published by ``prepare``) is this script's set."""
    from orchestrator.data.artifacts import load_array

    if not np.array_equal(load_array(ref), images.permute(0, 2, 3, 1).numpy()):
        raise RuntimeError(f"the loop's {what} differ from this script's")


def reload(job: Job, export: ArtifactRef, device: torch.device):
    """The trained method around its export (the loop's class, config and precision), for sampling."""
    from orchestrator.data.artifacts import fetch
    from orchestrator.runtime.loop import method_class, perf_for
    from trainers.registry import load_source_model

    cls = method_class(job)
    source = load_source_model(job.family, str(fetch(export)), device)
    return cls(cls.Config.model_validate(job.method_config), source, device, seed=job.run.seed,
               perf=perf_for(job, device, cls))


@contextlib.contextmanager
def node_cache(path: Path) -> Iterator[None]:
    """``ORCHESTRATE_CACHE`` at ``path`` meanwhile: what the loop publishes and fetches (data,
    source copies, exports) stays in this run's temporary folder, out of the CLI's cache (the
    source folder, encoder and decoded data a script shares with the CLI are located before)."""
    saved = os.environ.get("ORCHESTRATE_CACHE")
    os.environ["ORCHESTRATE_CACHE"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ORCHESTRATE_CACHE", None)
        else:
            os.environ["ORCHESTRATE_CACHE"] = saved


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_into_place(src: Path, folder: Path, ready: Callable[[], bool]) -> bool:
    """Copy ``src`` to ``folder`` atomically (written beside it, then renamed into place); False
    when ``ready()`` says another process (a CLI run, a concurrent script) put it there first."""
    if ready():
        return False
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    try:
        tmp.replace(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ready():
            raise
        return False
    return True


def install(export: Path, task: Any, folder: Path) -> None:
    """A copy of a pretraining export at ``folder``; when a CLI run finished the same spec
    meanwhile, theirs is kept."""
    from orchestrator.runs.sources import is_ready

    if not copy_into_place(export, folder, lambda: is_ready(task, folder)):
        log(f"  {folder} appeared meanwhile; keeping it")
