"""DDPM-PA vs plain fine-tuning: the paper's comparison (Zhu et al. 2022, arXiv 2211.03264) in small.

    python -m benchmarks.ddpm_pa_vs_finetune [--domain sketch] [--seeds 0 1 2] [--steps 300]
        [--batch-size 8] [--samples 256] [--sample-steps 10] [--pretrain-steps N]
        [--out benchmarks/results] [--threads 2] [--vary-shots]

Everything is trained through the project's one training loop (``orchestrator.runtime.loop.run_loop`` in
this process with a ``StoreSession``: no Ray, no MLflow); nothing here steps an optimiser. The
loop's run storage and the artifacts it fetches are kept in a temporary folder, removed at the end.

1. The source DDPM of the built-in task ``synthetic:<domain>`` with the pretrain spec
   ``SOURCE_SPEC`` (below): the very folder the CLI uses for that spec
   (``orchestrator.runs.sources.cached_source_path``). When it is not there yet it is pretrained here
   as the CLI's ``pretrain_source`` does it (the spec's pretrainer, method config, data, seed and
   batch stream: a ``Job(kind="pretrain")`` run by ``run_loop``), and its export is copied there
   (so the CLI reuses it, and vice versa).
   ``--pretrain-steps`` changes the spec, and therefore the folder (the CLI's cache key hashes the
   spec): a quick run never writes a differently trained model under the default spec's name.
   The domain encoder behind the ``*_domain`` metrics comes from ``domain_encoder_for(task)``
   (the CLI's own function: the shipped encoder of the synthetic source domain at 32², else one
   trained once with ``train_domain_encoder``, saved atomically).
2. For each seed and each method (``ddpm_finetune``, ``ddpm_pa``, default configs, the same
   steps and batch size), an adaptation run on the task's ten shots through
   ``orchestrator.core.config.resolve`` / ``orchestrator.runs.inputs.prepare`` / ``make_job`` / ``run_loop``.
   The run's row is the loop's final evaluation: ``--samples`` samples (sampling noise seed =
   seed + 12345) at ``--sample-steps`` DDIM steps, ``evaluate``-d with this script's feature
   networks against the task's reference set (1,000 synthetic target images; the loop's copies of
   the shots and the reference set are checked to be this script's). Time per step: the loop's
   training time (``time_train_s``) per step; CPU time per step: process CPU seconds over the
   loop's report windows that hold training steps only. The sample grids of the first seed are
   drawn again, with the same noise, from the reloaded exports.
   Shots: by default the task's own ten shots (``task.target``, seed 0: the images the CLI trains
   on), fixed over seeds as in the paper, which adapts to one fixed 10-shot set per domain; the
   benchmark seed varies the training (timesteps, noise, batches, pair choice) and the sampling
   noise. With ``--vary-shots`` the shot set is drawn anew per seed (draw 100 + seed of the
   target domain, the run's ``task.target.seed``; draws 0 and 1 are the task's shots and
   reference set, so a draw equal to the reference seed would put the shots inside the reference
   set). Both methods of one seed see the same shots, batches and sampling noise seed, so ratios
   are taken per seed (paired).
3. A table (mean ± std over seeds) on stdout and in ``<out>/ddpm_pa_vs_finetune.md``, raw numbers
   in ``<out>/ddpm_pa_vs_finetune.json``, sample grids of seed 0 and the shots as PNGs.

Two reference rows: the source model before adaptation, and 'real target', ``--samples`` real
target images of another draw (the best a model can do at this sample count: FID's floor and
the target's own diversity).

Verdict rule (``verdict`` below): per seed, Δ = intra_dist_domain(pa) − intra_dist_domain(ft);
"more diversity" iff mean(Δ) > 0 and mean(Δ) > std(Δ) (the spread over seeds; with one seed,
Δ > 0 without a spread estimate); "similar quality" iff the mean over seeds of
fid_domain(pa) / fid_domain(ft) ≤ 1 + FID_TOLERANCE (10 %).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# Before torch starts its OpenMP pool: idle threads sleep instead of spinning. On a CPU shared with
# other jobs, spinning threads waiting for a descheduled sibling made a 2-thread step 4-15x slower
# (measured: 2.0-7.5 s vs 0.5 s per pretraining step); alone on the machine it costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.data.artifacts import ArtifactRef, fetch, publish  # noqa: E402
from orchestrator.core.config import PretrainSpec, RunSettings, TaskConfig, builtin_task, resolve  # noqa: E402
from orchestrator.runs.inputs import make_job, prepare  # noqa: E402
from orchestrator.runtime.job import Job  # noqa: E402
from orchestrator.runtime.loop import LoopResult, run_loop  # noqa: E402
from orchestrator.runtime.session import StoreSession  # noqa: E402
from orchestrator.runs.sources import (  # noqa: E402
    ResolvedSource,
    cached_source_path,
    domain_encoder_for,
    encoder_path,
    is_ready,
    pretrain_job,
)
from orchestrator.data.storage import data_cache_dir  # noqa: E402
from trainers.builtin import builtin_encoder  # noqa: E402
from trainers.data import TARGET_DOMAINS, load_images, to_tensor  # noqa: E402
from trainers.diffusion.backbone import ddim_sample, load_source  # noqa: E402
from trainers.metrics import MissingWeightsError, ReferenceStats, available_extractors, evaluate  # noqa: E402
from trainers.perf import DevicePerf  # noqa: E402
from benchmarks.common import (  # noqa: E402  (benchmarks/common.py)
    RESULTS,
    SAMPLE_SEED_OFFSET,
    Clock,
    command_line,
    fmt,
    install,
    log,
    machine_description,
    md_table,
    mean_std,
    node_cache,
    phase_rows,
    pick_device,
    read_result,
    reload,
    run_row,
    same_images,
    settings_of,
    text_table,
)

METHODS = ("ddpm_finetune", "ddpm_pa")
FID_TOLERANCE = 0.10  # "similar quality": PA's FID at most 10 % above fine-tuning's (mean of per-seed ratios)
METRICS = [("fid_domain", "↓"), ("kid_domain", "↓"), ("intra_dist_domain", "↑"), ("intra_lpips_vgg", "↑")]
SHOT_DRAW_OFFSET = 100  # --vary-shots: shot draw = 100 + seed (never the reference set's draw)
REPORT_EVERY = 50  # adaptation runs: steps per report of the loop (a log line; the training terms' window)
# What the loop's final report holds besides the evaluation's metrics and the training terms
# (and its phase timings, time_<phase>_s).
LOOP_EVAL_KEYS = {"target_rate_domain", "eval_seconds"}  # the loop's evaluation adds these to evaluate()'s
LOOP = "orchestrator.runtime.loop.run_loop in this process (StoreSession)"  # the result's "loop": who trained


class Progress:
    """A ``StoreSession`` ``on_report``: one log line per report of the loop, and the process CPU
    seconds per training step over the report windows that hold training steps only (not the
    first, which also holds the loop's setup, nor the last, which holds the final evaluation and
    the export); NaN when there is no such window."""

    def __init__(self, label: str, total: int, keys: tuple[str, ...]):
        self.label, self.total, self.keys = label, total, keys
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.step, self.cpu_s, self.cpu_steps = 0, 0.0, 0

    def __call__(self, m: dict[str, Any]) -> None:
        cpu = time.process_time()
        step = int(m["step"])
        if self.step > 0 and step < self.total:
            self.cpu_s += cpu - self.cpu0
            self.cpu_steps += step - self.step
        wall = time.perf_counter() - self.t0
        terms = "  ".join(f"{k} {m[k]:.4f}" for k in self.keys if k in m)
        log(f"{self.label} {step}/{self.total}  {terms}  {1 / m['steps_per_s']:.3f} s/step, "
            f"eta {wall / step * (self.total - step) / 60:.1f} min")
        self.step, self.cpu0 = step, time.process_time()

    @property
    def cpu_s_per_step(self) -> float:
        return self.cpu_s / self.cpu_steps if self.cpu_steps else float("nan")


# ------------------------------------------------------------------------------------------------
# source model and domain encoder
# ------------------------------------------------------------------------------------------------
# The source this benchmark's recorded results were made with: a larger UNet than the demo's
# default (`tiny`, 2,000 steps, sized for a 10-minute demo on 2 CPU cores); ~7.5 min on 2 cores.
SOURCE_SPEC = {"preset": "small", "steps": 1500, "batch_size": 16, "lr": 3e-4}


def source_folder(task: TaskConfig, pretrain_steps: int | None) -> tuple[TaskConfig, Path]:
    """The task (with the pretrain spec actually used: SOURCE_SPEC, ``--pretrain-steps``) and the
    folder of its source model."""
    update = dict(SOURCE_SPEC)
    if pretrain_steps is not None:
        update["steps"] = int(pretrain_steps)
    spec = task.source.pretrain.model_copy(update=update)
    task = task.model_copy(update={"source": task.source.model_copy(update={"pretrain": spec})})
    # The CLI's key hashes the whole spec: a changed spec is where a task with it would cache.
    return task, cached_source_path(task)


def pretrain(task: TaskConfig, folder: Path, storage: str, scratch: Path, threads: int,
             device: torch.device) -> dict[str, Any]:
    """Pretrain the source DDPM in the one loop as the CLI's ``pretrain_source`` does (the spec's
    pretrainer, method config, data and seed), then copy its export to ``folder``."""
    spec: PretrainSpec = task.source.pretrain
    run = RunSettings(steps=spec.steps, report_every=max(1, min(100, spec.steps)), seed=spec.seed,
                      cpus_per_worker=float(threads), use_gpu=device.type == "cuda")
    clock = Clock()
    with node_cache(scratch):
        job = pretrain_job(task, storage, run=run, name=f"pretrain-{folder.name}").model_copy(
            update={"checkpoint_at": []})
        result = run_loop(job, StoreSession(storage, job.name, device=device,
                                            on_report=Progress("  pretrain", spec.steps, ("loss",))))
        install(fetch(result.export), task, folder)
    wall, cpu = clock.elapsed()
    last = result.metrics
    return {"steps": spec.steps, "wall_s": wall, "cpu_s": cpu, "s_per_step": last["time_train_s"] / spec.steps,
            "final_loss": last["loss"]}


# ------------------------------------------------------------------------------------------------
# one adaptation run
# ------------------------------------------------------------------------------------------------
def adapt(method: str, folder: Path, source: ArtifactRef, encoder: ArtifactRef, draw: int, seed: int,
          metrics: list[str], args, storage: str, device: torch.device) -> tuple[LoopResult, Job, Progress]:
    """``method`` (default config, the benchmark's batch size) for ``args.steps`` steps on the shot
    draw ``draw`` of the built-in task, from the source at ``folder`` (published as ``source``):
    resolve -> prepare -> make_job -> run_loop. Its final evaluation is the benchmark's protocol."""
    overrides: dict[str, Any] = {
        "task.source.model": str(folder), "task.target.seed": draw, "batch_size": args.batch_size,
        "run.steps": args.steps, "run.report_every": min(REPORT_EVERY, args.steps), "run.eval_every": 0,
        "run.eval_samples": args.samples, "run.final_eval_samples": args.samples,
        "run.eval_sample_steps": args.sample_steps, "run.seed": seed,
        "run.metrics": metrics, "run.cpus_per_worker": float(args.threads), "run.use_gpu": device.type == "cuda",
    }
    cfg = resolve(method, f"synthetic:{args.domain}", overrides=overrides)
    inputs = prepare(cfg, storage=storage, source=ResolvedSource(source, None, folder), encoder=encoder)
    job = make_job(cfg, inputs, name=f"{method}-seed{seed}", storage=storage, checkpoint_at=[])
    progress = Progress(f"    {method} seed {seed} step", args.steps, ("loss",))
    result = run_loop(job, StoreSession(storage, job.name, device=device, on_report=progress))
    return result, job, progress


# ------------------------------------------------------------------------------------------------
# statistics, verdict, output
# ------------------------------------------------------------------------------------------------
def verdict(runs: dict[str, list[dict[str, float]]]) -> tuple[bool, str, dict[str, float]]:
    """Did DDPM-PA keep more diversity than fine-tuning at similar quality? Computed, per the
    rule in the module docstring; returns (answer, sentence, the numbers behind it)."""
    ft, pa = runs["ddpm_finetune"], runs["ddpm_pa"]
    delta = [p["intra_dist_domain"] - f["intra_dist_domain"] for p, f in zip(pa, ft)]
    fid_ratio = [p["fid_domain"] / f["fid_domain"] for p, f in zip(pa, ft)]
    d_mean, d_std = mean_std(delta)
    r_mean, r_std = mean_std(fid_ratio)
    one_seed = len(delta) < 2
    more_div = d_mean > 0 and (one_seed or d_mean > d_std)
    similar = r_mean <= 1 + FID_TOLERANCE
    rel = d_mean / mean_std([f["intra_dist_domain"] for f in ft])[0]
    spread = "no spread estimate: one seed" if one_seed else f"spread over seeds {d_std:.4f}"
    div_txt = (f"intra_dist_domain {'+' if d_mean >= 0 else ''}{d_mean:.4f} ({rel:+.1%}; {spread})")
    fid_txt = f"fid_domain ratio pa/finetune {r_mean:.3f}" + (f" ± {r_std:.3f}" if not one_seed else "")
    if more_div and similar:
        sentence = (f"Yes: DDPM-PA kept more diversity than fine-tuning at similar quality — {div_txt}, "
                    f"{fid_txt} (≤ {1 + FID_TOLERANCE:.2f}).")
    elif more_div:
        sentence = (f"Not at similar quality: DDPM-PA kept more diversity ({div_txt}) but its FID is worse "
                    f"by more than {FID_TOLERANCE:.0%} ({fid_txt}).")
    elif d_mean > 0:
        sentence = (f"No clear difference: DDPM-PA's diversity is higher on average but not by more than the "
                    f"spread over seeds ({div_txt}); {fid_txt}.")
    else:
        sentence = f"No: DDPM-PA did not keep more diversity than fine-tuning ({div_txt}); {fid_txt}."
    return more_div and similar, sentence, {"delta_intra_dist_mean": d_mean, "delta_intra_dist_std": d_std,
                                            "fid_ratio_mean": r_mean, "fid_ratio_std": r_std}


def table(rows: list[tuple[str, list[dict[str, float]]]], columns: list[tuple[str, str]],
          ratios: dict[str, list[float]], markdown: bool) -> str:
    head = ["method"] + [f"{k} {arrow}" for k, arrow in columns] + ["s/step (wall)", "CPU s/step"]
    body = []
    for name, runs in rows:
        cells = [name] + [fmt([r.get(k, float("nan")) for r in runs]) for k, _ in columns]
        cells += [fmt([r.get("s_per_step", float("nan")) for r in runs], 3),
                  fmt([r.get("cpu_s_per_step", float("nan")) for r in runs], 3)]
        body.append(cells)
    body.append(["ratio pa/finetune"] + [fmt(ratios[k], 3) for k, _ in columns]
                + [fmt(ratios["s_per_step"], 3), fmt(ratios["cpu_s_per_step"], 3)])
    return md_table(head, body) if markdown else text_table(head, body)


def save_grid(images: torch.Tensor, path: Path, cols: int, scale: int = 1, pad: int = 1) -> None:
    from PIL import Image

    x = images.permute(0, 2, 3, 1).numpy()  # [N,H,W,3] uint8
    n, h, w, _ = x.shape
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, optimize=True)


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="sketch", choices=TARGET_DOMAINS, help="built-in task synthetic:<domain>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="adaptation steps, the same for both methods")
    p.add_argument("--batch-size", type=int, default=8, help="the same for both methods (ddpm_pa needs >= 3)")
    p.add_argument("--samples", type=int, default=256, help="samples per evaluation")
    p.add_argument("--sample-steps", type=int, default=10,
                   help="DDIM steps when sampling (10, as the CLI's periodic evaluations: 25 did not fit "
                        "the 20-minute budget of the default run on 2 shared CPU cores)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="override the task's pretraining steps (a different cache folder)")
    p.add_argument("--vary-shots", action="store_true", help="draw a new 10-shot set per seed")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--grid", type=int, default=16, help="images in each sample grid PNG (8 a row)")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the table and markdown from <out>/ddpm_pa_vs_finetune.json; train nothing")
    args = p.parse_args(argv)
    if args.batch_size < 3:
        p.error("--batch-size must be >= 3 (ddpm_pa's pairwise set has 3 samples)")
    if args.samples < 2:
        p.error("--samples must be >= 2")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_only:
        result = read_result(args.out / "ddpm_pa_vs_finetune.json")
        report(result, args.out)
        return result
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    t_start = Clock()
    started = _dt.datetime.now().astimezone()
    load_start = os.getloadavg()
    phases: dict[str, dict[str, float]] = {}

    task, folder = source_folder(builtin_task(args.domain), args.pretrain_steps)
    if task.source.family != "ddpm":
        raise SystemExit(f"{task.name}: the source is a {task.source.family}, not a DDPM")
    spec = task.source.pretrain
    log(f"task {task.name}: source {folder} ({'cached' if is_ready(task, folder) else 'to pretrain'}), "
        f"device {device}, {args.threads} threads, load average {load_start[0]:.1f}")
    # The loop's run storage and the artifacts it fetches: temporary (see node_cache).
    work = tempfile.TemporaryDirectory(prefix="ddpm_pa_vs_finetune-")
    storage, scratch = str(Path(work.name) / "storage"), Path(work.name) / "node-cache"

    # 1. source model and domain encoder --------------------------------------------------------
    source_info: dict[str, Any] = {"path": str(folder), "cached": is_ready(task, folder), "spec": spec.model_dump(mode="json")}
    if not source_info["cached"]:
        log(f"pretraining the source DDPM: {spec.steps} steps, batch {spec.batch_size}, preset {spec.preset}")
        source_info["pretrain"] = pretrain(task, folder, storage, scratch, args.threads, device)
        phases["pretrain source"] = {"wall_s": source_info["pretrain"]["wall_s"], "cpu_s": source_info["pretrain"]["cpu_s"]}
    source_info["encoder_cached"] = builtin_encoder(task) is not None or encoder_path(task).is_file()
    if not source_info["encoder_cached"]:
        log(f"training the domain encoder: {spec.encoder_steps} SimCLR steps")
    clock = Clock()
    enc_path = domain_encoder_for(task)  # the CLI's: the shipped one of the synthetic source domain, else trained once
    source_info["encoder"] = str(enc_path)
    if not source_info["encoder_cached"]:
        w, c = clock.elapsed()
        phases["train domain encoder"] = {"wall_s": w, "cpu_s": c}

    extractors = available_extractors(["domain"], enc_path, device)
    try:
        extractors += available_extractors(["lpips_vgg"], device=device)
        lpips_note = "Intra-LPIPS (VGG) computed: LPIPS weights found on disk."
    except MissingWeightsError as exc:
        lpips_note = (f"Intra-LPIPS not computed: its weights are not on this machine "
                      f"(missing {', '.join(exc.filenames)}); diversity is intra_dist_domain only.")
    log(lpips_note)
    columns = [(k, a) for k, a in METRICS if k != "intra_lpips_vgg" or len(extractors) > 1]

    # data ------------------------------------------------------------------------------------
    t, ref = task.target, task.reference
    reference = to_tensor(load_images(ref.data, task.resolution, count=ref.count, seed=ref.seed,
                                      cache_dir=data_cache_dir()))
    real = to_tensor(load_images(ref.data, task.resolution, count=args.samples, seed=ref.seed + 1,
                                 cache_dir=data_cache_dir()))  # another draw of the target domain
    shot_sets = {}
    for seed in args.seeds:
        draw = SHOT_DRAW_OFFSET + seed if args.vary_shots else t.seed
        if draw not in shot_sets:
            shot_sets[draw] = to_tensor(load_images(t.data, task.resolution, count=t.shots, seed=draw,
                                                    cache_dir=data_cache_dir()))
    shots_of = {s: shot_sets[SHOT_DRAW_OFFSET + s if args.vary_shots else t.seed] for s in args.seeds}
    cache = ReferenceStats()

    # 2. reference rows: the source model before adaptation, real target images ----------------
    clock = Clock()
    log(f"source model before adaptation: {args.samples} samples, {args.sample_steps} DDIM steps")
    src = load_source(str(folder), device)
    src_samples = ddim_sample(src.unet.eval(), src.scheduler, args.samples, src.resolution, args.sample_steps,
                              device, seed=args.seeds[0] + SAMPLE_SEED_OFFSET,  # the methods' precision:
                              autocast=DevicePerf(device).autocast()).cpu()
    del src
    source_rows, real_rows = [], []
    for seed in args.seeds:  # evaluated against each seed's shots (the same set unless --vary-shots)
        source_rows.append(evaluate(src_samples, reference, shots_of[seed], extractors, seed=seed,
                                    kid_subset_size=min(1000, args.samples, len(reference)), cache=cache))
        real_rows.append(evaluate(real, reference, shots_of[seed], extractors, seed=seed,
                                  kid_subset_size=min(1000, args.samples, len(reference)), cache=cache))
        if not args.vary_shots:
            break
    w, c = clock.elapsed()
    phases["reference rows (sample + evaluate)"] = {"wall_s": w, "cpu_s": c}

    # 3. the comparison: every run through the one training loop -------------------------------
    runs: dict[str, list[dict[str, float]]] = {key: [] for key in METHODS}
    grids: dict[str, torch.Tensor] = {}
    loop_metrics = ["domain"] + (["lpips_vgg"] if len(extractors) > 1 else [])  # this script's networks
    metric_keys = set(source_rows[0]) | LOOP_EVAL_KEYS
    loop_wall = loop_cpu = grid_wall = grid_cpu = 0.0
    with node_cache(scratch):
        source_ref, encoder_ref = publish(folder, storage), publish(enc_path, storage)
        for seed in args.seeds:
            draw = SHOT_DRAW_OFFSET + seed if args.vary_shots else t.seed
            for key in METHODS:
                log(f"  {key} seed {seed}: {args.steps} steps, batch {args.batch_size}")
                clock = Clock()
                result, job, prog = adapt(key, folder, source_ref, encoder_ref, draw, seed, loop_metrics,
                                          args, storage, device)
                w, c = clock.elapsed()
                loop_wall, loop_cpu = loop_wall + w, loop_cpu + c
                same_images(job.data, shots_of[seed], "shots")
                if seed == args.seeds[0] and key == METHODS[0]:
                    same_images(job.reference, reference, "reference images")
                row = {**run_row(result.metrics, metric_keys, args.steps, prog.cpu_s_per_step), "seed": seed}
                runs[key].append(row)
                if seed == args.seeds[0]:  # the evaluation's samples again, from the reloaded export
                    clock = Clock()
                    samples = reload(job, result.export, device).sample(args.samples, steps=args.sample_steps,
                                                                        seed=seed + SAMPLE_SEED_OFFSET)
                    grids[key] = samples[: args.grid]
                    w, c = clock.elapsed()
                    grid_wall, grid_cpu = grid_wall + w, grid_cpu + c
                log(f"    {key} seed {seed}: " + ", ".join(f"{k} {row[k]:.4g}" for k, _ in columns if k in row)
                    + f", {row['s_per_step']:.3f} s/step, evaluation {row['eval_seconds']:.0f} s")
    work.cleanup()
    phases["adaptation (run_loop: train, final evaluation, export)"] = {"wall_s": loop_wall, "cpu_s": loop_cpu}
    phases["sample grids (reloaded exports)"] = {"wall_s": grid_wall, "cpu_s": grid_cpu}

    # 4. report ---------------------------------------------------------------------------------
    wall_total, cpu_total = t_start.elapsed()
    load_end = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    save_grid(shots_of[args.seeds[0]], args.out / "ddpm_pa_vs_finetune_shots.png", cols=5, scale=2)
    save_grid(src_samples[: args.grid], args.out / "ddpm_pa_vs_finetune_source.png", cols=8)
    for key, imgs in grids.items():
        save_grid(imgs, args.out / f"ddpm_pa_vs_finetune_{key}_seed{args.seeds[0]}.png", cols=8)

    cmd = command_line("ddpm_pa_vs_finetune", argv)
    machine = (machine_description(device) + f", {args.threads} torch threads; load average {load_start[0]:.1f} "
               f"at start, {load_end[0]:.1f} at the end (other jobs shared the cores: wall times are noisy, "
               "CPU times less so)")
    ft, pa = runs["ddpm_finetune"], runs["ddpm_pa"]
    ratio_keys = [k for k, _ in columns] + ["s_per_step", "cpu_s_per_step"]
    result = {
        "command": cmd, "date": started.isoformat(), "wall_s": wall_total, "cpu_s": cpu_total,
        "machine": machine, "settings": settings_of(args),
        "task": task.model_dump(mode="json"), "lpips_note": lpips_note, "columns": [k for k, _ in columns],
        "source": source_info, "phases": phases, "loop": LOOP,
        "source_rows": source_rows, "real_rows": real_rows, "runs": runs,
        "ratios": {k: [p[k] / f[k] for p, f in zip(pa, ft)] for k in ratio_keys},
    }
    answer, sentence, numbers = verdict(runs)
    result["verdict"] = {"answer": answer, "sentence": sentence, **numbers}
    (args.out / "ddpm_pa_vs_finetune.json").write_text(json.dumps(result, indent=1))
    report(result, args.out)
    return result


def report(result: dict[str, Any], out: Path) -> None:
    """Print the table and write ``<out>/ddpm_pa_vs_finetune.md`` from a result (the JSON's
    content), so that ``--report-only`` can re-render it without training anything."""
    st = result["settings"]
    task = TaskConfig.model_validate(result["task"]) if "task" in result else \
        source_folder(builtin_task(st["domain"]), st.get("pretrain_steps"))[0]
    spec, t, ref = task.source.pretrain, task.target, task.reference
    runs = result["runs"]
    ft, pa = runs["ddpm_finetune"], runs["ddpm_pa"]
    keys = result.get("columns") or [k for k, _ in METRICS if k in ft[0]]
    columns = [(k, a) for k, a in METRICS if k in keys]
    lpips_note = result.get("lpips_note") or (
        "Intra-LPIPS (VGG) computed." if "intra_lpips_vgg" in ft[0] else
        "Intra-LPIPS not computed: its weights are not on this machine; diversity is intra_dist_domain only.")
    rows = [("source (before adaptation)", result["source_rows"]), ("real target images", result["real_rows"]),
            ("ddpm_finetune", ft), ("ddpm_pa", pa)]
    ratios = result["ratios"]
    answer, sentence, numbers = verdict(runs)
    wall_total, cpu_total = result["wall_s"], result["cpu_s"]
    seeds = st["seeds"]
    n_ref = int(result["source_rows"][0].get("num_reference", ref.count or 0))
    started = _dt.datetime.fromisoformat(result["date"])
    folder = Path(result["source"]["path"])

    print()
    print(table(rows, columns, ratios, markdown=False))
    print()
    print(sentence)
    print(f"\nwall time {wall_total / 60:.1f} min (CPU {cpu_total / 60:.1f} min)")

    shots_txt = (f"a new draw per seed (synthetic draw {SHOT_DRAW_OFFSET} + seed)" if st.get("vary_shots") else
                 f"the task's ten shots, fixed (draw {t.seed}; the images the CLI trains on); "
                 "the seed varies training and sampling noise")
    phase_lines = phase_rows(result["phases"])
    loss_keys = [k for k in ("train_loss_simple", "train_loss_img", "train_loss_hf", "train_loss_hfmse",
                             "train_loss", "train_grad_norm") if any(k in r for r in ft + pa)]
    loss_lines = "\n".join(
        f"| {name} | " + " | ".join(fmt([r[k] for r in rs if k in r], 3) for k in loss_keys) + " |"
        for name, rs in (("ddpm_finetune", ft), ("ddpm_pa", pa)))
    grid = min(st.get("grid", 16), st["samples"])
    last_n = st["steps"] % REPORT_EVERY or min(REPORT_EVERY, st["steps"])  # the loop's last report window
    loop_txt = time_txt = ""
    if result.get("loop"):
        loop_txt = (f" Trained by the project's one loop, `{result['loop']}`; the evaluation is the loop's final "
                    "one (the grids below are its samples, drawn again from the reloaded exports).")
        time_txt = ("\ns/step: the loop's training time (`time_train_s`) per step; CPU s/step: process CPU seconds "
                    "per step over the loop's report windows that hold training steps only (n/a when a run had "
                    "none: not the first, which holds the loop's setup, nor the last).\n")
    grid_png = out / f"ddpm_pa_vs_finetune_ddpm_pa_seed{seeds[0]}.png"
    if grid_png.is_file():  # what the PNG holds (8 a row, 1-pixel gaps)
        from PIL import Image

        with Image.open(grid_png) as im:
            grid = min(grid, 8 * ((im.height - 1) // (task.resolution + 1)))
    md = f"""# DDPM-PA vs fine-tuning, in small

`{result['command']}` — {started:%Y-%m-%d %H:%M %Z}, wall time **{wall_total / 60:.1f} min** (CPU {cpu_total / 60:.1f} min, both threads).

Built-in task `synthetic:{st['domain']}`: the project's own source DDPM ({spec.preset} UNet, {task.resolution}²,
pretrained on `{spec.data}`: {spec.steps} steps, batch {spec.batch_size}, lr {spec.lr};
{'cached' if result['source']['cached'] else 'pretrained by this run'}: `{folder.name}`) adapted to
{t.shots} shots of `{t.data}`. Shots: {shots_txt}.

Both methods: default configs (`ddpm_pa`: λ_img 4, λ_hf 4, λ_hfmse 1, pairs of 3, all timesteps), **{st['steps']} steps,
batch {st['batch_size']}**, lr 1e-4, EMA 0.999, grad-norm clip 1; seeds {', '.join(map(str, seeds))}.{loop_txt} Evaluation:
{st['samples']} samples (EMA weights), {st['sample_steps']} DDIM steps, against the task's reference set ({n_ref} images of
`{ref.data}`, draw {ref.seed}), features of the project's domain encoder (SimCLR on the source domain,
{spec.encoder_steps} steps). `intra_dist_domain` is the Intra-LPIPS protocol (Ojha et al. 2021: samples
clustered to their nearest shot, mean pairwise distance within clusters) with the domain encoder's
cosine distance instead of LPIPS. {lpips_note}

Machine: {result['machine']}.

## Results (mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})

{table(rows, columns, ratios, markdown=True)}

Ratios are per seed (paired: same shots, batches and sampling noise), then averaged.
"source" is the source model's samples (one sampling run) and "real target images" is
{st['samples']} real images of another draw of the target domain: FID's floor at this sample count and
the domain's own diversity.

**{sentence}**

Rule (computed in `verdict()`): Δ = intra_dist_domain(pa) − intra_dist_domain(ft) per seed; more
diversity iff mean(Δ) > 0 and mean(Δ) > std(Δ) over seeds; similar quality iff mean(fid pa/ft) ≤
{1 + FID_TOLERANCE:.2f}.

Training losses, mean of the last {last_n} steps (`ddpm_pa`'s terms are weighted, as in its loss dict;
the gradient norm is before clipping):

| method | {' | '.join(k.removeprefix('train_') for k in loss_keys)} |
|---|{'---|' * len(loss_keys)}
{loss_lines}

## Time

| phase | wall min | CPU min |
|---|---|---|
{phase_lines}
| **total** | **{wall_total / 60:.1f}** | **{cpu_total / 60:.1f}** |
{time_txt}
## Samples (seed {seeds[0]}, first {grid})

| shots | source | ddpm_finetune | ddpm_pa |
|---|---|---|---|
| ![shots](ddpm_pa_vs_finetune_shots.png) | ![source](ddpm_pa_vs_finetune_source.png) | ![ft](ddpm_pa_vs_finetune_ddpm_finetune_seed{seeds[0]}.png) | ![pa](ddpm_pa_vs_finetune_ddpm_pa_seed{seeds[0]}.png) |
"""
    (out / "ddpm_pa_vs_finetune.md").write_text(md)
    log(f"wrote {out / 'ddpm_pa_vs_finetune.md'}")


if __name__ == "__main__":
    main()
