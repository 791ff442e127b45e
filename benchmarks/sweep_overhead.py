"""Orchestration overhead of `orchestrate sweep` against the same trials run bare, in one process.

Both sides run the same fixed-length trials of ``ddpm_finetune`` on a tiny task (16² images, the
tiny UNet, the same steps, evaluation samples and export):
  (a) bare: a plain Python loop over the trainers' method (build it from the source, train, final
      evaluation, export) — what a hand-written script does, no Ray, no MLflow;
  (b) sweep: ``run_sweep`` (Ray Tune + Optuna, MLflow parent + child runs on SQLite), each trial in
      its Tune trial's own process (the single-worker path), one at a time (FIFO, no early
      stopping) and then two at a time.
Per-trial time of a sweep is the span from the first trial's start to the last trial's end (from
the MLflow child runs) divided by the trials: the sweep's one-time setup (Ray start, publishing
the inputs, reference statistics) is reported apart. Where a trial's seconds go comes from the
loop's own phase timings (``time_<phase>_s``, logged to each child run); the rest of a trial's wall
time (Tune scheduling, the trial process, MLflow run creation) is the "outside the loop" column.

    python -m benchmarks.sweep_overhead [--trials 4] [--steps 100 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import RESULTS, processor, read_result

RUN = {"report_every": 25, "sample_every": 10 ** 6, "grid_size": 16, "grid_sample_steps": 5, "eval_samples": 32,
       "eval_sample_steps": 5, "final_eval_samples": 64, "final_eval_sample_steps": 5, "eval_every": 0}
PHASES = ("build", "data", "restore", "prepare", "metric_networks", "train", "grids", "eval", "mlflow",
          "report", "checkpoint", "export")


def tiny_task(folder: Path, source: Path) -> Path:
    task = {"name": "bench-sketch", "resolution": 16,
            "source": {"model": str(source), "pretrain": {"encoder_steps": 50, "count": 256}},
            "target": {"data": "synthetic:sketch", "shots": 10},
            "reference": {"data": "synthetic:sketch", "count": 200}}
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def bare_trial(cfg, source: Path, encoder: Path, seed: int) -> float:
    """The same work as one trial, in a plain loop."""
    from trainers.common import random_batch
    from trainers.data import load_images, to_tensor
    from trainers.metrics import available_extractors, evaluate
    from trainers.registry import get_method, load_source_model

    t0 = time.perf_counter()
    cls = get_method(cfg.method)
    method = cls(cls.Config.model_validate(cfg.method_config), load_source_model("ddpm", str(source), "cpu"),
                 torch.device("cpu"), seed=seed)
    t = cfg.task
    shots = to_tensor(load_images(t.target.data, t.resolution, count=t.target.shots, seed=t.target.seed))
    ref = to_tensor(load_images(t.reference.data, t.resolution, count=t.reference.count, seed=t.reference.seed))
    extractors = available_extractors(["domain"], encoder)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.run.steps):
        out = method.train_step(random_batch(shots, method.config.batch_size, gen))
    float(out["loss"])
    samples = method.sample(cfg.run.final_eval_samples, steps=cfg.run.final_eval_sample_steps)
    evaluate(samples, ref, shots, extractors)
    with tempfile.TemporaryDirectory() as tmp:
        method.export(Path(tmp) / "model")
    return time.perf_counter() - t0


def sweep_trials(cfg, trials: int, concurrent: int, name: str) -> dict:
    from orchestrator.records import tracking
    from orchestrator.search.sweep import SweepSettings, run_sweep

    settings = SweepSettings(num_samples=trials, max_concurrent=concurrent, metrics=["loss"], modes=["min"],
                             scheduler="fifo")
    t0 = time.time()
    res = run_sweep(cfg, {"lr": 1e-4}, settings, name=name, tracking_uri="sqlite:///mlflow.db", storage="runs",
                    verbose=0)
    wall = time.time() - t0
    c = tracking.client(res.tracking_uri)
    kids = c.search_runs([res.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    starts = [k.info.start_time / 1000 for k in kids]
    ends = [k.info.end_time / 1000 for k in kids]
    span = max(ends) - min(starts)
    phases = {p: statistics.mean(k.data.metrics.get(f"time_{p}_s", 0.0) for k in kids) for p in PHASES}
    trial_wall = statistics.mean(e - s for s, e in zip(starts, ends))
    return {"per_trial": span / trials, "setup": min(starts) - t0, "wall": wall, "trial_wall": trial_wall,
            "phases": phases, "outside_loop": trial_wall - sum(phases.values())}


def _median_run(runs: list[dict]) -> dict:
    """The sweep run of median per-trial time (its phases and setup stay together)."""
    return sorted(runs, key=lambda r: r["per_trial"])[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="*", default=[100, 300])
    ap.add_argument("--rounds", type=int, default=3,
                    help="bare, 1-at-a-time and 2-at-a-time measured this many times in turn; medians reported "
                         "(one round on 2 cores varies by ±10%%)")
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from the JSON")
    args = ap.parse_args()
    if args.report_only:
        saved = read_result(RESULTS / "sweep_overhead.json")
        return report(saved["meta"], saved["rows"])

    rows = []
    load = LoadSampler()
    with tempfile.TemporaryDirectory() as tmp, load:
        work = Path(tmp)
        os.environ["ORCHESTRATE_CACHE"] = str(work / "cache")
        os.chdir(work)
        from orchestrator.core.config import resolve
        from orchestrator.runtime.raycluster import init_ray, shutdown
        from orchestrator.runs.sources import domain_encoder_for
        from trainers.diffusion.backbone import build_unet, default_scheduler, save_source

        torch.manual_seed(0)
        save_source(build_unet("tiny", 16), default_scheduler(), work / "source")
        started = init_ray(num_cpus=2)
        try:
            for steps in args.steps:
                overrides = {f"run.{k}": v for k, v in RUN.items()}
                overrides.update({"run.steps": steps, "batch_size": 8, "ema_decay": 0.0})
                cfg = resolve("ddpm_finetune", tiny_task(work, work / "source"), overrides=overrides)
                encoder = domain_encoder_for(cfg.task)
                torch.set_num_threads(1)
                bare_trial(cfg, work / "source", encoder, 0)  # warm caches and imports
                torch.set_num_threads(os.cpu_count() or 1)
                rounds = []
                for k in range(args.rounds):
                    torch.set_num_threads(1)  # what one trial process gets (1 CPU)
                    bare = statistics.mean(bare_trial(cfg, work / "source", encoder, i) for i in range(args.trials))
                    torch.set_num_threads(os.cpu_count() or 1)
                    one = {"bare": bare}
                    for concurrent in (1, 2):
                        one[f"sweep{concurrent}"] = sweep_trials(cfg, args.trials, concurrent,
                                                                 f"bench-{steps}-{concurrent}-{k}")
                    rounds.append(one)
                    print(json.dumps({"steps": steps, "round": k, "bare": bare,
                                      **{f"ratio{c}": one[f"sweep{c}"]["per_trial"] / bare for c in (1, 2)}}),
                          flush=True)
                row = {"steps": steps, "bare": statistics.median(r["bare"] for r in rounds),
                       "rounds": [{"bare": r["bare"], **{f"sweep{c}": r[f"sweep{c}"]["per_trial"] for c in (1, 2)}}
                                  for r in rounds]}
                for c in (1, 2):
                    row[f"sweep{c}"] = _median_run([r[f"sweep{c}"] for r in rounds])
                rows.append(row)
        finally:
            shutdown(started)

    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "machine": processor(),
            "date": time.strftime("%Y-%m-%d"), "trials": args.trials, "rounds": args.rounds, **load.summary()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    report(meta, rows)


class LoadSampler:
    """The 1-minute load average before, during (every 5 s: mean and max) and after the run."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self.before = os.getloadavg()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.after = os.getloadavg()[0]

    def summary(self) -> dict:
        during = self.samples or [self.after]
        return {"load_before": self.before, "load_after": self.after, "load_mean": statistics.mean(during),
                "load_max": max(during)}


def report(meta: dict, rows: list[dict]) -> None:
    """The markdown table (results/sweep_overhead.md) from the measured rows."""
    rounds = meta.get("rounds", 1)
    load = (f"load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after"
            + (f", {meta['load_mean']:.2f} mean and {meta['load_max']:.2f} max during the run (2.0 = both cores "
               "busy; the benchmark itself is most of it)" if "load_mean" in meta else ""))
    lines = [f"Sweep overhead: {meta['trials']} trials of ddpm_finetune per variant (16², tiny UNet, batch 8, "
             f"64-sample final evaluation), {meta['cpus']} CPUs, torch {meta['torch']}, {meta['date']}; {load}. "
             f"Each variant measured in {rounds} interleaved round(s): the overhead and the ratio are paired "
             "per round (bare and sweep back to back), then the median over rounds.", "",
             "| steps | variant | s / trial | overhead s / trial | ratio vs bare | ratio per round | "
             "sweep setup s (once) |",
             "|---:|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['steps']} | bare loop, one process, 1 thread | {r['bare']:.1f} | 0.0 | 1.00 | | |")
        for c in (1, 2):
            s = r[f"sweep{c}"]
            # paired per round (bare and sweep measured back to back), then the median over rounds
            rounds_ = r.get("rounds") or [{"bare": r["bare"], f"sweep{c}": s["per_trial"]}]
            ratios = [x[f"sweep{c}"] / x["bare"] for x in rounds_]
            extra = statistics.median(x[f"sweep{c}"] - x["bare"] for x in rounds_)
            per_trial = statistics.median(x[f"sweep{c}"] for x in rounds_)
            lines.append(f"| {r['steps']} | orchestrate sweep, {c} at a time | {per_trial:.1f} | "
                         f"{extra:+.1f} | {statistics.median(ratios):.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in ratios)} | {s['setup']:.1f} |")
    lines += ["", "Where a sweep trial's seconds go (one at a time, the median round; mean over its trials, from the "
              "loop's `time_<phase>_s`):", "", "| steps | " + " | ".join(PHASES) + " | outside the loop | trial wall |",
              "|---:|" + "---:|" * (len(PHASES) + 2)]
    for r in rows:
        s = r["sweep1"]
        lines.append(f"| {r['steps']} | " + " | ".join(f"{s['phases'][p]:.2f}" for p in PHASES)
                     + f" | {s['outside_loop']:.2f} | {s['trial_wall']:.2f} |")
    (RESULTS / "sweep_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
