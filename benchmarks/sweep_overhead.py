"""Orchestration overhead of `orchestrate sweep` against the same trials run bare, in one process.

Both sides run the same fixed-length trials of ``ddpm_finetune`` on a tiny task (16² images, the
tiny UNet, the same steps, grids, evaluation samples and export):
  (a) bare: a plain Python loop over the trainers' method, no Ray, no MLflow;
  (b) sweep: ``run_sweep`` (Ray Tune + Optuna, each trial a Ray Train run, MLflow parent + child
      runs on SQLite), trials one at a time (FIFO, no early stopping) so wall time per trial is
      comparable, then two at a time to show what concurrency buys back on this machine.
It prints the per-trial wall time of each, the per-trial overhead and the ratio.

    python benchmarks/sweep_overhead.py [--trials 4] [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml


def tiny_task(folder: Path, steps: int) -> Path:
    task = {
        "name": "bench-sketch", "resolution": 16,
        "source": {"pretrain": {"count": 256, "preset": "tiny", "steps": 200, "batch_size": 16, "encoder_steps": 50}},
        "target": {"data": "synthetic:sketch", "shots": 10},
        "reference": {"data": "synthetic:sketch", "count": 200},
    }
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


RUN = {"report_every": 25, "sample_every": 10**6, "grid_size": 16, "grid_sample_steps": 5, "eval_samples": 32,
       "eval_sample_steps": 5, "final_eval_samples": 64, "final_eval_sample_steps": 5, "eval_every": 0}


def bare_trials(cfg, source: str, encoder: str, n: int) -> list[float]:
    """The same work as one trial's worker, in a plain loop."""
    from trainers.data import load_images, to_tensor
    from trainers.diffusion.backbone import load_source, random_batch
    from trainers.metrics import available_extractors, evaluate
    from trainers.registry import get_method

    times = []
    for i in range(n):
        t0 = time.perf_counter()
        cls = get_method(cfg.method)
        method = cls(cls.Config.model_validate(cfg.method_config), load_source(source), torch.device("cpu"), seed=i)
        t = cfg.task
        shots = to_tensor(load_images(t.target.data, t.resolution, count=t.target.shots, seed=t.target.seed))
        ref = to_tensor(load_images(t.reference.data, t.resolution, count=t.reference.count, seed=t.reference.seed))
        extractors = available_extractors(["domain"], encoder)
        method.sample(cfg.run.grid_size, steps=cfg.run.grid_sample_steps)
        gen = torch.Generator().manual_seed(i)
        for _ in range(cfg.run.steps):
            method.train_step(random_batch(shots, method.config.batch_size, gen))
        samples = method.sample(cfg.run.final_eval_samples, steps=cfg.run.final_eval_sample_steps)
        evaluate(samples, ref, shots, extractors)
        method.sample(cfg.run.grid_size)
        with tempfile.TemporaryDirectory() as tmp:
            method.export(Path(tmp) / "model")
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)  # what one Train worker gets (cpus_per_worker 0.99 -> 1 thread)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["ORCHESTRATE_CACHE"] = str(work / "cache")
        os.chdir(work)
        import ray

        from orchestrator.config import resolve
        from orchestrator.launch import init_ray
        from orchestrator.sources import source_for
        from orchestrator.sweep import SweepSettings, run_sweep
        from orchestrator.train import check_inputs

        overrides = {f"run.{k}": v for k, v in RUN.items()}
        overrides.update({"run.steps": args.steps, "batch_size": 8, "ema_decay": 0.0})
        cfg = resolve("ddpm_finetune", tiny_task(work, args.steps), overrides=overrides)
        init_ray(num_cpus=2)
        try:
            encoder = check_inputs(cfg)
            source = source_for(cfg.task, tracking_uri="sqlite:///mlflow.db", storage="runs")  # cached, untimed
            bare_trials(cfg, source, encoder, 1)  # warm caches and imports
            bare = bare_trials(cfg, source, encoder, args.trials)

            space = {"lr": 1e-4}  # a constant: every trial does the same work
            rows = []
            for concurrent in (1, 2):
                settings = SweepSettings(num_samples=args.trials, max_concurrent=concurrent, metrics=["loss"],
                                         modes=["min"], scheduler="fifo")
                t0 = time.perf_counter()
                run_sweep(cfg, space, settings, name=f"bench-{concurrent}", tracking_uri="sqlite:///mlflow.db",
                          storage="runs", verbose=0)
                rows.append((concurrent, (time.perf_counter() - t0) / args.trials))
        finally:
            ray.shutdown()

    bare_mean = sum(bare) / len(bare)
    print(f"\nSweep overhead: {args.trials} trials x {args.steps} steps of ddpm_finetune (16², tiny UNet, "
          f"batch 8), {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| variant | wall s / trial | overhead s / trial | ratio vs bare |")
    print("|---|---:|---:|---:|")
    print(f"| bare loop, one process | {bare_mean:.1f} | 0.0 | 1.00 |")
    for concurrent, per_trial in rows:
        print(f"| orchestrate sweep, {concurrent} at a time | {per_trial:.1f} | {per_trial - bare_mean:+.1f} | "
              f"{per_trial / bare_mean:.2f} |")


if __name__ == "__main__":
    main()
