"""The Ray Train worker loop: one generic loop for every method (and for source pretraining).

Each worker builds the method from plain config, draws its batches from the few-shot images kept
as uint8 on its device, and every ``report_every`` steps reports metrics and a checkpoint to Ray
Train. Rank 0 also logs to the MLflow run the driver created. When Ray Train restarts the run
(same name and storage), ``ray.train.get_checkpoint()`` hands back the last checkpoint and the
loop continues from its step.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator import tracking
from orchestrator.shipping import local_path

STATE_FILE = "state.pt"


def build_method(job: dict[str, Any], device: torch.device, seed: int):
    """Build the trainer object of a job: an adaptation method or a source pretrainer."""
    from trainers.registry import get_method, load_source_model, pretrainer

    if job["kind"] == "pretrain":
        cls = pretrainer(job["family"])
        return cls(cls.Config.model_validate(job["method_config"]), job["resolution"], device, seed=seed)
    cls = get_method(job["method"])
    cfg = cls.Config.model_validate(job["method_config"])
    source = local_path(job["source"], job.get("source_ref"))
    method = cls(cfg, load_source_model(job["family"], source, device), device, seed=seed)
    if job.get("lifelong_previous"):  # a later task of a lifelong stream: earlier tasks' state
        method.continue_from(local_path(job["lifelong_previous"], job.get("lifelong_previous_ref")))
    return method


def load_images_of(job: dict[str, Any], d: dict[str, Any]) -> np.ndarray:
    """A job's images: shipped by the driver (its local data) or read here (synthetic, s3://)."""
    if d.get("ref") is not None:
        import ray

        return ray.get(d["ref"])
    from trainers.data import load_images

    return load_images(d["uri"], job["resolution"], count=d.get("count"), seed=d.get("seed", 0),
                       image_column=d.get("image_column", "image"), cache_dir=job.get("cache_dir"),
                       storage_options=d.get("storage_options"))


class Evaluator:
    """Rank 0's periodic and final evaluation: samples from the method, metrics against the task's
    reference set (or the shots), each metric named by its feature network (trainers.metrics)."""

    def __init__(self, job: dict[str, Any], shots: torch.Tensor, device: torch.device):
        from trainers.data import to_tensor
        from trainers.metrics import ReferenceStats, available_extractors

        run = job["run"]
        self.run = run
        encoder = local_path(job.get("domain_encoder"), job.get("domain_encoder_ref"))
        self.extractors = available_extractors(run["metrics"], encoder, device)
        ref = job.get("reference")
        if ref is not None:
            self.reference = to_tensor(load_images_of(job, ref))
        else:
            self.reference = shots.cpu()
        self.shots = shots.cpu()
        self.cache = ReferenceStats()
        self.every = run["eval_every"] if run["eval_every"] is not None else run["report_every"]

    def due(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def __call__(self, method, last: bool) -> dict[str, float]:
        from trainers.metrics import evaluate

        run = self.run
        n = run["final_eval_samples"] if last else run["eval_samples"]
        steps = run["final_eval_sample_steps"] if last else run["eval_sample_steps"]
        t0 = time.perf_counter()
        samples = method.sample(n, steps=steps, seed=run["seed"] + 12345)
        metrics = evaluate(samples, self.reference, self.shots, self.extractors, seed=run["seed"],
                           kid_subset_size=min(1000, n, len(self.reference)), cache=self.cache)
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics


    def earlier_tasks(self, method, job: dict[str, Any]) -> dict[str, float]:
        """Row k of the lifelong matrices: the model after task k on every task j <= k, sampled
        with task j's own state where the method keeps one (``sample_task``), else as it is."""
        from trainers.data import to_tensor
        from trainers.metrics import evaluate

        run, out = self.run, {}
        for spec in job["lifelong_eval"]:
            j = spec["index"]
            shots = to_tensor(load_images_of(job, spec["data"]))
            ref = to_tensor(load_images_of(job, spec["reference"])) if spec.get("reference") else shots
            n = run["final_eval_samples"]
            if hasattr(method, "sample_task"):
                samples = method.sample_task(spec["task_id"], n, seed=run["seed"] + 12345)
            else:
                samples = method.sample(n, steps=run["final_eval_sample_steps"], seed=run["seed"] + 12345)
            metrics = evaluate(samples, ref, shots, self.extractors, seed=run["seed"],
                               kid_subset_size=min(1000, n, len(ref)), cache=self.cache)
            out.update({f"r_{k}_task{j}": v for k, v in metrics.items() if not k.startswith("num_")})
        return out


def _save_checkpoint(method, folder: Path, extra: dict[str, Any]) -> None:
    torch.save({"method": method.state_dict(), "torch_rng": torch.get_rng_state(), **extra},
               folder / STATE_FILE)


def _quiet_report_log() -> None:
    """Ray Train logs "Reporting training result ..." (every metric of every report) at INFO on a
    logger named after its module's file, outside the ``ray.train`` tree that ``LoggingConfig``
    quiets (orchestrator.launch.quiet_train_logs): raise that one logger to WARNING."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(job: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from trainers.data import to_tensor
    from trainers.diffusion.backbone import random_batch

    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run = job["run"]
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(run["cpus_per_worker"])))
    seed = int(run["seed"]) + 1000 * rank
    torch.manual_seed(seed)

    method = build_method(job, device, seed)
    images = to_tensor(load_images_of(job, job["data"])).to(device)
    if world > 1:
        method.parallelize(lambda m: ray.train.torch.prepare_model(m, move_to_device=False))

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        method.load_state_dict(state["method"])
        torch.set_rng_state(state["torch_rng"])
        start = method.step
    batch_gen = torch.Generator(device=device).manual_seed(seed + 7 + start)

    log = rank == 0 and job.get("run_id") is not None
    uri, run_id = job.get("tracking_uri"), job.get("run_id")
    buffer = tracking.MetricBuffer(uri, run_id) if log else None

    def grid(step: int, sampling_steps: int, name: str) -> None:
        samples = method.sample(run["grid_size"], steps=sampling_steps, seed=run["seed"])
        tracking.log_image_grid(uri, run_id, samples.numpy(), f"samples/{name}.png")

    if log and start == 0:
        tracking.log_params(uri, run_id, {"trainable_parameters": str(method.trainable_parameters()),
                                          "world_size": str(world), "device": str(device),
                                          "node_id": ray.get_runtime_context().get_node_id()})
        grid(0, run["grid_sample_steps"], "step_000000")

    evaluator = Evaluator(job, images, device) if rank == 0 and job.get("kind") == "adapt" else None
    last_eval: dict[str, float] = {}
    steps, every = run["steps"], run["report_every"]
    window: dict[str, list[float]] = {}
    train_seconds, done_in_window = 0.0, 0
    for step in range(start, steps):
        t0 = time.perf_counter()
        batch = random_batch(images, method.config.batch_size, batch_gen, hflip=method.config.hflip)
        metrics = method.train_step(batch)
        train_seconds += time.perf_counter() - t0
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        done_in_window += 1
        if not all(np.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite training metrics at step {step + 1}: {metrics}")
        if buffer is not None:
            buffer.add(metrics, step + 1)
        last = step + 1 == steps
        if log and ((step + 1) % run["sample_every"] == 0 or last):
            grid(step + 1, run["grid_sample_steps"], f"step_{step + 1:06d}")
        if (step + 1) % every == 0 or last:
            # throughput of the optimisation steps alone (grids and evaluations excluded)
            report = {k: float(np.mean(v)) for k, v in window.items()}
            report.update(step=step + 1, steps_per_s=done_in_window / max(train_seconds, 1e-9),
                          images_per_s=done_in_window * method.config.batch_size * world / max(train_seconds, 1e-9))
            if evaluator is not None and evaluator.due(step + 1, last):
                last_eval = evaluator(method, last)
                if buffer is not None:
                    buffer.add(last_eval, step + 1)
            report.update(last_eval)  # between evaluations, the last values (schedulers need them)
            if buffer is not None:
                buffer.add({"steps_per_s": report["steps_per_s"], "images_per_s": report["images_per_s"]},
                           step + 1)
                buffer.flush()
            if rank == 0:  # live progress in the driver's console (Ray forwards worker output)
                shown = {k: report[k] for k in ("loss", "fid_domain", "intra_dist_domain") if k in report}
                # Not print(): Ray Train patches it to log as well as print, which shows every line twice.
                sys.stdout.write(f"[{job.get('name', job['kind'])}] step {step + 1}/{steps} "
                                 + " ".join(f"{k} {v:.4g}" for k, v in shown.items())
                                 + f" ({report['steps_per_s']:.2f} steps/s)\n")
                sys.stdout.flush()
            if last and rank == 0:
                # Before the final report: a scheduler may stop the trial as soon as it sees it.
                finish(job, method, log)
                if job.get("lifelong_eval"):
                    rows = evaluator.earlier_tasks(method, job)
                    report.update(rows)
                    if buffer is not None:
                        buffer.add(rows, step + 1)
                        buffer.flush()
                report["trainable_parameters"] = float(method.trainable_parameters())
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    _save_checkpoint(method, Path(tmp), {"step": step + 1})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=ckpt)
            window, train_seconds, done_in_window = {}, 0.0, 0


def finish(job: dict[str, Any], method, log: bool) -> None:
    """Rank 0, after the last step: export the generator, the final grid, the model artifact."""
    uri, run_id = job.get("tracking_uri"), job.get("run_id")
    export_to = job.get("export_dir")
    with tempfile.TemporaryDirectory() as tmp:
        folder = method.export(Path(export_to) if export_to else Path(tmp) / "model")
        if log:
            samples = method.sample(job["run"]["grid_size"], seed=job["run"]["seed"])
            tracking.log_image_grid(uri, run_id, samples.numpy(), "samples/final.png")
            tracking.log_artifacts(uri, run_id, folder, "model")
