"""DCL vs plain GAN fine-tuning: the comparison of Zhao et al., "A Closer Look at Few-shot Image
Generation" (CVPR 2022, arXiv 2205.03805) in small.

    python -m benchmarks.gan_finetune_vs_dcl [--domain sketch] [--seeds 0 1 2] [--steps 400]
        [--batch-size 4] [--samples 256] [--eval-every 100] [--pretrain-steps N]
        [--out benchmarks/results] [--threads 1] [--vary-shots]

Everything is trained through the project's one training loop (``orchestrator.runtime.loop.run_loop`` in
this process with a ``StoreSession``: no Ray, no MLflow); nothing here steps an optimiser. The
loop's run storage and the artifacts it fetches are kept in a temporary folder, removed at the end.

1. The source StyleGAN2 of the built-in task ``synthetic:<domain>`` with family ``stylegan2``: the
   very folder the CLI uses (``orchestrator.runs.sources.cached_source_path``). When it is not there yet
   it is pretrained here as the CLI's ``pretrain_source`` does it (the spec's pretrainer, method
   config, images, seed and batch stream, lr None = the pretrainer's default: a
   ``Job(kind="pretrain")`` run by ``run_loop``), and its export is copied there, so that CLI runs
   reuse it and vice versa. ``--pretrain-steps`` changes the spec and therefore the folder (the
   CLI's cache key hashes the whole spec): a quick run never writes a differently trained model
   under the default spec's name.
   The domain encoder behind the ``*_domain`` metrics is the CLI's too (``encoder_path(task)``);
   when missing it is trained here with ``train_domain_encoder`` with the arguments of
   ``orchestrator.runs.sources.domain_encoder_for`` and saved atomically (a per-process temporary file).
2. For each seed and each method (``gan_finetune``, ``dcl``, default configs, the same steps and
   batch size), an adaptation run on the task's ten shots through ``orchestrator.core.config.resolve`` /
   ``orchestrator.runs.inputs.prepare`` / ``make_job`` / ``run_loop``. The loop evaluates every
   ``--eval-every`` steps (a quality/diversity trajectory; outside the loop's training time, and
   sampling has its own generator, so it changes nothing in the training) and at the end (the
   run's row): ``--samples`` images from G_ema (noise seed = seed + 12345), ``evaluate``-d with this
   script's feature networks against the task's reference set (1,000 synthetic target images; the
   loop's copies of the shots and the reference set are checked to be this script's). Time per
   step: the loop's training time (``time_train_s``) per step; CPU time per step: process CPU
   seconds over the loop's report windows that hold training steps only. The sample grids of the
   first seed are drawn again, with the same noise, from the reloaded exports.
   Shots: by default the task's own ten shots (``task.target``, draw 0: the images the CLI trains
   on), fixed over seeds as in the paper (one fixed 10-shot set per domain); the seed varies the
   training (z's, style mixing, noise maps, batches) and the sampling noise. With
   ``--vary-shots`` the shot set is drawn anew per seed (draw 100 + seed, the run's
   ``task.target.seed``; draws 0 and 1 are the task's shots and reference set). Both methods of one
   seed see the same shots, batches, latents and sampling noise, so ratios are taken per seed
   (paired).
3. A table (mean ± std over seeds) on stdout and in ``<out>/gan_finetune_vs_dcl.md``, raw numbers
   in ``<out>/gan_finetune_vs_dcl.json``, sample grids of seed 0 and the shots as PNGs.

Two reference rows: the source model before adaptation, and 'real target', ``--samples`` real
target images of another draw (FID's floor at this sample count, and the target's own diversity).

Steps: the DCL/CDC papers adapt a 256² FFHQ StyleGAN2 for 1.5k–3k iterations at batch 4 and
lr 0.002 and report that plain fine-tuning overfits (replicates the shots) long before that. Our
tiny 32² source learns much faster per step; the default 400 steps at batch 4 (1,600 images,
160 passes over the ten shots) keeps the paper's batch and lr and keeps the default run (with
the source pretraining, ~10 of its minutes) near 15 minutes on 2 contended CPU cores. It is
early in the adaptation: in a 1,200-step run (seeds 0 1, ``--eval-every 200``) both methods
kept improving (fid_domain 0.46 → 0.22 for fine-tuning, 0.58 → 0.26 for DCL), and fine-tuning's
intra_dist_domain fell below the real target's own (0.035) from ~800 steps on (0.033 at 800,
0.027 at 1,000 and 1,200: samples collapsing onto the shots) while DCL's came down to the
target's level (0.035 at 1,200) — the regime the paper is about. Use ``--steps 1200`` (or more) with fewer seeds to see it.

Threads: default 1. On this shared 2-core machine (load average ~5) two torch threads made every
step 10–60× slower than one (oversubscribed OpenMP workers spin-wait for each other); with the
machine to yourself, ``--threads 2`` is faster.

Verdict rule (``verdict`` below). "Similar quality" at the end iff the mean over seeds of
fid_domain(dcl) / fid_domain(ft) ≤ 1 + FID_TOLERANCE (10 %). Then, per seed,
Δ = intra_dist_domain(dcl) − intra_dist_domain(ft) at the end of training. Otherwise the two
are compared at matched quality: per seed at F = the worse (higher) of the two final FIDs, the
method that ended better read off its trajectory (evaluations every ``--eval-every`` steps,
step 0 = the source; linear in FID on the last segment crossing F) —
Δ = intra_dist(dcl at F) − intra_dist(ft at F). "More diversity" iff mean(Δ) > 0 and
mean(Δ) > std(Δ) over seeds (with one seed: Δ > 0, no spread estimate). Why matched quality:
DCL's contrastive terms hold G near the source, so at equal steps it is usually less adapted
(higher FID, and the source's own higher diversity); comparing diversity at unequal FIDs would
reward not adapting. Diversity far above the real target's own (the 'real target' row) is not
a virtue either; the report says how far each method closed the source→target FID gap.
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

import numpy as np
import torch

from benchmarks.common import (  # benchmarks/common.py
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
    reload,
    run_row,
    same_images,
    settings_of,
    text_table,
)
from orchestrator.data.artifacts import ArtifactRef, fetch, publish
from orchestrator.core.config import PretrainSpec, RunSettings, TaskConfig, builtin_task, resolve
from orchestrator.runs.inputs import make_job, prepare
from orchestrator.runtime.job import Job
from orchestrator.runtime.loop import LoopResult, run_loop
from orchestrator.runtime.session import StoreSession
from orchestrator.runs.sources import ResolvedSource, cached_source_path, encoder_path, is_ready, pretrain_job
from orchestrator.data.storage import cache_home, data_cache_dir
from trainers.data import TARGET_DOMAINS, load_images, to_tensor
from trainers.gan.dcl import DCL
from trainers.gan.gan_finetune import GANFinetune
from trainers.gan.source import load_gan_source
from trainers.metrics import MissingWeightsError, ReferenceStats, available_extractors, evaluate
from trainers.metrics import train_domain_encoder
from trainers.registry import pretrainer

FAMILY = "stylegan2"
METHODS = ("gan_finetune", "dcl")
FID_TOLERANCE = 0.10  # "similar quality": DCL's FID at most 10 % above fine-tuning's (mean of per-seed ratios)
METRICS = [("fid_domain", "↓"), ("kid_domain", "↓"), ("intra_dist_domain", "↑"), ("intra_lpips_vgg", "↑")]
SHOT_DRAW_OFFSET = 100  # --vary-shots: shot draw = 100 + seed (never the reference set's draw)
NAME = "gan_finetune_vs_dcl"
REPORT_EVERY = 50  # adaptation runs: steps per log line; the loop reports every gcd(--eval-every, 50) steps
TERMS = ("d_loss", "g_adv", "g_cl", "g_cl_d", "d_cl", "real_score", "fake_score")  # logged training terms
# What the loop's final report holds besides the evaluation's metrics and the training terms
# (and its phase timings, time_<phase>_s).
LOOP_EVAL_KEYS = {"target_rate_domain", "eval_seconds"}  # the loop's evaluation adds these to evaluate()'s
LOOP = "orchestrator.runtime.loop.run_loop in this process (StoreSession)"  # the result's "loop": who trained


class Progress:
    """A ``StoreSession`` ``on_report``: a log line every ``log_every`` steps (and the metrics of the
    loop's periodic evaluations, every ``eval_every`` steps), and the process CPU seconds per
    training step over the report windows that hold training steps only (not the first, which also
    holds the loop's setup, nor one that ends in an evaluation or the export); NaN when there is
    no such window."""

    def __init__(self, label: str, total: int, keys: tuple[str, ...], log_every: int,
                 eval_every: int = 0, eval_keys: tuple[str, ...] = ()):
        self.label, self.total, self.keys, self.log_every = label, total, keys, log_every
        self.eval_every, self.eval_keys = eval_every, eval_keys
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.step, self.cpu_s, self.cpu_steps = 0, 0.0, 0

    def evaluated(self, step: int) -> bool:
        """Whether the loop evaluated at ``step`` (its periodic evaluations and the final one)."""
        return step == self.total or bool(self.eval_every and step % self.eval_every == 0)

    def __call__(self, m: dict[str, Any]) -> None:
        cpu = time.process_time()
        step = int(m["step"])
        if self.step > 0 and not self.evaluated(step):
            self.cpu_s += cpu - self.cpu0
            self.cpu_steps += step - self.step
        if step % self.log_every == 0 or step == self.total:
            wall = time.perf_counter() - self.t0
            terms = "  ".join(f"{k} {m[k]:.3f}" for k in self.keys if k in m)
            log(f"{self.label} {step}/{self.total}  {terms}  {1 / m['steps_per_s']:.3f} s/step, "
                f"eta {wall / step * (self.total - step) / 60:.1f} min")
        if self.eval_keys and self.evaluated(step) and step < self.total:
            log(f"{self.label} {step}: " + ", ".join(f"{k} {m[k]:.4g}" for k in self.eval_keys))
        self.step, self.cpu0 = step, time.process_time()

    @property
    def cpu_s_per_step(self) -> float:
        return self.cpu_s / self.cpu_steps if self.cpu_steps else float("nan")


# ------------------------------------------------------------------------------------------------
# source model and domain encoder
# ------------------------------------------------------------------------------------------------
def task_with_pretrain_steps(task: TaskConfig, pretrain_steps: int | None) -> TaskConfig:
    """The task with the pretrain spec actually used. Its ``cached_source_path`` hashes that spec,
    so a changed step count gets its own folder (the one the CLI would use for such a task)."""
    if pretrain_steps is None or pretrain_steps == task.source.pretrain.steps:
        return task
    spec = task.source.pretrain.model_copy(update={"steps": int(pretrain_steps)})
    return task.model_copy(update={"source": task.source.model_copy(update={"pretrain": spec})})


def pretrain(task: TaskConfig, folder: Path, storage: str, scratch: Path, threads: int,
             device: torch.device) -> dict[str, Any]:
    """Pretrain the source StyleGAN2 in the one loop as the CLI's ``pretrain_source`` does (the
    spec's pretrainer, method config, data and seed, its report interval), then copy its export
    to ``folder``."""
    spec: PretrainSpec = task.source.pretrain
    every = max(1, min(250, spec.steps))
    run = RunSettings(steps=spec.steps, report_every=every, seed=spec.seed, cpus_per_worker=float(threads),
                      use_gpu=device.type == "cuda")
    clock = Clock()
    with node_cache(scratch):
        job = pretrain_job(task, storage, run=run, name=f"pretrain-{folder.name}").model_copy(
            update={"checkpoint_at": []})
        progress = Progress("  pretrain", spec.steps, ("d_loss", "g_loss"), every)
        result = run_loop(job, StoreSession(storage, job.name, device=device, on_report=progress))
        install(fetch(result.export), task, folder)
    wall, cpu = clock.elapsed()
    last = result.metrics
    return {"steps": spec.steps, "wall_s": wall, "cpu_s": cpu, "s_per_step": last["time_train_s"] / spec.steps,
            **{f"final_{k}": last[k] for k in ("d_loss", "g_loss", "real_score", "fake_score") if k in last}}


def ensure_encoder(task: TaskConfig, device: torch.device) -> Path:
    """The CLI's domain encoder of the task's source domain (``encoder_path``), trained here with
    ``domain_encoder_for``'s arguments when missing; written to a per-process temporary file and
    renamed, so a concurrent writer of the same encoder cannot corrupt it."""
    path = encoder_path(task)
    if path.is_file():
        return path
    spec = task.source.pretrain
    images = load_images(spec.data, task.resolution, count=min(spec.count, 2048), seed=spec.seed,
                         cache_dir=data_cache_dir())
    encoder = train_domain_encoder(images, steps=spec.encoder_steps, batch_size=128, device=device,
                                   seed=spec.seed, resolution=task.resolution)
    if path.is_file():
        log(f"  {path} appeared meanwhile; keeping it")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    encoder.save(tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# one adaptation run
# ------------------------------------------------------------------------------------------------
def adapt(method: str, folder: Path, source: ArtifactRef, encoder: ArtifactRef, draw: int, seed: int,
          metrics: list[str], eval_keys: tuple[str, ...], args, storage: str,
          device: torch.device) -> tuple[LoopResult, Job, Progress]:
    """``method`` (default config, the benchmark's batch size) for ``args.steps`` steps on the shot
    draw ``draw`` of the built-in task, from the source at ``folder`` (published as ``source``):
    resolve -> prepare -> make_job -> run_loop, evaluated every ``args.eval_every`` steps (before
    the last) and at the end with the benchmark's protocol."""
    eval_every = args.eval_every if 0 < args.eval_every < args.steps else 0
    # reports at a divisor of eval_every: the loop evaluates at reports only
    every = math.gcd(eval_every, REPORT_EVERY) if eval_every else min(REPORT_EVERY, args.steps)
    overrides: dict[str, Any] = {
        "task.source.model": str(folder), "task.target.seed": draw, "batch_size": args.batch_size,
        "run.steps": args.steps, "run.report_every": every, "run.eval_every": eval_every,
        "run.eval_samples": args.samples, "run.final_eval_samples": args.samples,
        "run.seed": seed, "run.metrics": metrics,
        "run.cpus_per_worker": float(args.threads), "run.use_gpu": device.type == "cuda",
    }
    cfg = resolve(method, f"synthetic:{args.domain}", overrides=overrides)
    inputs = prepare(cfg, storage=storage, source=ResolvedSource(source, None, folder), encoder=encoder)
    job = make_job(cfg, inputs, name=f"{method}-seed{seed}", storage=storage, checkpoint_at=[])
    progress = Progress(f"    {method} seed {seed} step", args.steps, TERMS, REPORT_EVERY, eval_every, eval_keys)
    result = run_loop(job, StoreSession(storage, job.name, device=device, on_report=progress))
    return result, job, progress


# ------------------------------------------------------------------------------------------------
# statistics, verdict, output
# ------------------------------------------------------------------------------------------------
def diversity_at_fid(trajectory: list[dict[str, float]], fid: float) -> float:
    """intra_dist_domain of a run at the moment its fid_domain came down to ``fid``: linear
    interpolation in FID on the last segment of the trajectory (ordered by step, step 0 = the
    source) that crosses ``fid`` (GAN FIDs are not monotone in the step: the last crossing is the
    one nearest the end). NaN when the run never reached ``fid``."""
    pts = sorted(trajectory, key=lambda p: p["step"])
    for a, b in reversed(list(zip(pts[:-1], pts[1:]))):
        fa, fb = a["fid_domain"], b["fid_domain"]
        if min(fa, fb) <= fid <= max(fa, fb):
            w = 0.0 if fa == fb else (fa - fid) / (fa - fb)
            return a["intra_dist_domain"] + w * (b["intra_dist_domain"] - a["intra_dist_domain"])
    return float("nan")


def matched_deltas(runs: dict[str, list[dict[str, Any]]], source_rows: list[dict[str, float]]) -> list[float]:
    """Per seed: intra_dist_domain(dcl) − intra_dist_domain(ft) at equal fid_domain, namely the
    worse (higher) of the two final FIDs; the method that ended lower is read off its trajectory
    (``diversity_at_fid``) at the moment it was as good as the other's end point."""
    out = []
    for i, (f, d) in enumerate(zip(runs["gan_finetune"], runs["dcl"])):
        src = source_rows[min(i, len(source_rows) - 1)]
        start = {"step": 0, "fid_domain": src["fid_domain"], "intra_dist_domain": src["intra_dist_domain"]}
        target = max(f["fid_domain"], d["fid_domain"])
        div_f = diversity_at_fid([start] + f["trajectory"], target)
        div_d = diversity_at_fid([start] + d["trajectory"], target)
        out.append(div_d - div_f)
    return out


def verdict(runs: dict[str, list[dict[str, Any]]], source_rows: list[dict[str, float]]
            ) -> tuple[bool, str, dict[str, float]]:
    """Did DCL keep more diversity than fine-tuning at similar quality? Computed, per the rule in
    the module docstring; returns (answer, sentence, the numbers behind it)."""
    ft, dcl = runs["gan_finetune"], runs["dcl"]
    delta = [d["intra_dist_domain"] - f["intra_dist_domain"] for d, f in zip(dcl, ft)]
    fid_ratio = [d["fid_domain"] / f["fid_domain"] for d, f in zip(dcl, ft)]
    r_mean, r_std = mean_std(fid_ratio)
    ft_div = mean_std([f["intra_dist_domain"] for f in ft])[0]

    def judge(values: list[float]) -> tuple[bool, float, float, str]:
        m, s = mean_std(values)
        n_valid = sum(math.isfinite(x) for x in values)
        more = math.isfinite(m) and m > 0 and (n_valid < 2 or m > s)
        spread = "no spread estimate: one seed" if n_valid < 2 else f"spread over seeds {s:.4f}"
        txt = f"intra_dist_domain {'+' if m >= 0 else ''}{m:.4f} ({m / ft_div:+.1%} of fine-tuning's; {spread})"
        return more, m, s, txt

    more_div, d_mean, d_std, div_txt = judge(delta)
    similar = math.isfinite(r_mean) and r_mean <= 1 + FID_TOLERANCE
    one_seed = len(fid_ratio) < 2
    fid_txt = f"fid_domain ratio dcl/finetune {r_mean:.3f}" + (f" ± {r_std:.3f}" if not one_seed else "")
    numbers = {"delta_intra_dist_mean": d_mean, "delta_intra_dist_std": d_std,
               "fid_ratio_mean": r_mean, "fid_ratio_std": r_std}

    def says(more: bool, m: float, txt: str, at: str) -> str:
        if not math.isfinite(m):
            return f"Undecided {at}: intra_dist_domain is undefined there"
        if more:
            return f"Yes {at}: DCL kept more diversity than fine-tuning — {txt}"
        if m > 0:
            return f"No clear difference {at}: DCL's diversity is higher on average, not by more than the spread — {txt}"
        return f"No {at}: DCL did not keep more diversity than fine-tuning — {txt}"

    if similar:
        return more_div, f"{says(more_div, d_mean, div_txt, 'at similar quality')}; {fid_txt} (≤ {1 + FID_TOLERANCE:.2f}).", numbers
    has_traj = all(len(r.get("trajectory", [])) > 1 for r in ft + dcl)
    if not has_traj:
        return False, (f"Not at similar quality: {fid_txt} (> {1 + FID_TOLERANCE:.2f}); at the end of training "
                       f"DCL's {div_txt}. Run with --eval-every to compare at matched FID."), numbers
    matched = matched_deltas(runs, source_rows)
    more_m, m_mean, m_std, m_txt = judge(matched)
    numbers.update(matched_delta_intra_dist_mean=m_mean, matched_delta_intra_dist_std=m_std)
    worse = "DCL" if r_mean > 1 else "fine-tuning"
    return more_m, (f"{says(more_m, m_mean, m_txt, 'at matched quality')} (both at the FID where {worse} "
                    f"ended, the other read off its training trajectory). At the end of training the quality "
                    f"differs ({fid_txt}, > {1 + FID_TOLERANCE:.2f}), and there DCL's {div_txt}."), numbers


def adaptation_progress(runs: dict[str, list[dict[str, Any]]], source_rows: list[dict[str, float]],
                        real_rows: list[dict[str, float]]) -> str:
    """A computed sentence putting the numbers in context: how much of the FID gap between the
    source model and real target images each method closed, and where the target's own
    diversity lies (diversity far above it is partly unadapted source content, not a virtue)."""
    f_src, f_real = source_rows[0]["fid_domain"], real_rows[0]["fid_domain"]
    gap = f_src - f_real
    parts = []
    for key, rs in runs.items():
        closed = [(f_src - r["fid_domain"]) / gap for r in rs] if gap > 0 else [float("nan")]
        m, s = mean_std(closed)
        parts.append(f"{key} {m:.0%}" + (f" ± {s:.0%}" if math.isfinite(s) else ""))
    return (f"Context: of the fid_domain gap between the unadapted source ({f_src:.4g}) and real target "
            f"images ({f_real:.4g}), the methods closed {', '.join(parts)} (100 % = the real-image floor). "
            f"The target domain's own intra_dist_domain is {real_rows[0]['intra_dist_domain']:.4g} and the "
            f"source's {source_rows[0]['intra_dist_domain']:.4g}: diversity far above the target's own partly "
            "measures what is left of the source, so it counts only together with the FID.")


def table(rows: list[tuple[str, list[dict[str, float]]]], columns: list[tuple[str, str]],
          ratios: dict[str, list[float]], markdown: bool) -> str:
    head = ["method"] + [f"{k} {arrow}" for k, arrow in columns] + ["s/step (wall)", "CPU s/step"]
    body = []
    for name, runs in rows:
        cells = [name] + [fmt([r.get(k, float("nan")) for r in runs]) for k, _ in columns]
        cells += [fmt([r.get("s_per_step", float("nan")) for r in runs], 3),
                  fmt([r.get("cpu_s_per_step", float("nan")) for r in runs], 3)]
        body.append(cells)
    body.append(["ratio dcl/finetune"] + [fmt(ratios[k], 3) for k, _ in columns]
                + [fmt(ratios["s_per_step"], 3), fmt(ratios["cpu_s_per_step"], 3)])
    return md_table(head, body) if markdown else text_table(head, body)


def trajectory_table(runs: dict[str, list[dict[str, Any]]], source_rows: list[dict[str, float]],
                     columns: list[tuple[str, str]]) -> str:
    """Markdown table: one row per evaluated step, one column per (method, metric)."""
    keys = [k for k, _ in columns if k != "kid_domain"]
    head = ["step"] + [f"{m} {k}" for m in runs for k in keys]
    steps = sorted({p["step"] for rs in runs.values() for r in rs for p in r["trajectory"]})
    body = [["0 (source)"] + [fmt([r[k] for r in source_rows]) for _ in runs for k in keys]]
    for st in steps:
        cells = [str(st)]
        for rs in runs.values():
            pts = [p for r in rs for p in r["trajectory"] if p["step"] == st]
            cells += [fmt([p[k] for p in pts]) for k in keys]
        body.append(cells)
    return md_table(head, body)


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
    # 256-colour palette, no dithering: ~2.5× smaller than RGB for noisy 32² samples (results
    # stay under 200 KB) and indistinguishable at this size
    img.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="sketch", choices=TARGET_DOMAINS,
                   help="built-in task synthetic:<domain> (StyleGAN2 source)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="adaptation steps, the same for both methods")
    p.add_argument("--batch-size", type=int, default=4, help="the same for both methods (DCL needs >= 2)")
    p.add_argument("--samples", type=int, default=256, help="samples per evaluation")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="override the task's pretraining steps (a different cache folder)")
    p.add_argument("--vary-shots", action="store_true", help="draw a new 10-shot set per seed")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: see the docstring, 2 threads on 2 busy cores is far slower)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--eval-every", type=int, default=100,
                   help="also evaluate every N steps: the trajectory table and the matched-quality "
                        "comparison of the verdict; 0: only at the end")
    p.add_argument("--grid", type=int, default=48, help="images in each sample grid PNG (256-colour palette)")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        p.error("--batch-size must be >= 2 (DCL's in-batch negatives)")
    if args.samples < 2:
        p.error("--samples must be >= 2")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.eval_every < 0:
        p.error("--eval-every must be >= 0")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    t_start = Clock()
    started = _dt.datetime.now().astimezone()
    load_start = os.getloadavg()
    phases: dict[str, dict[str, float]] = {}

    task = task_with_pretrain_steps(builtin_task(args.domain, FAMILY), args.pretrain_steps)
    folder = cached_source_path(task)
    spec = task.source.pretrain
    log(f"task {task.name}: source {folder} ({'cached' if is_ready(task, folder) else 'to pretrain'}), "
        f"device {device}, {args.threads} threads, load average {load_start[0]:.1f}")
    # The loop's run storage and the artifacts it fetches: temporary (see node_cache).
    work = tempfile.TemporaryDirectory(prefix=f"{NAME}-")
    storage, scratch = str(Path(work.name) / "storage"), Path(work.name) / "node-cache"

    # 1. source model and domain encoder --------------------------------------------------------
    source_info: dict[str, Any] = {"path": str(folder), "cached": is_ready(task, folder),
                                   "spec": spec.model_dump(mode="json")}
    if not source_info["cached"]:
        log(f"pretraining the source StyleGAN2: preset {spec.preset}, {spec.steps} steps, "
            f"batch {spec.batch_size}, lr {spec.lr if spec.lr is not None else 'pretrainer default'}")
        source_info["pretrain"] = pretrain(task, folder, storage, scratch, args.threads, device)
        phases["pretrain source"] = {"wall_s": source_info["pretrain"]["wall_s"],
                                     "cpu_s": source_info["pretrain"]["cpu_s"]}
    enc_path = encoder_path(task)
    source_info["encoder"] = str(enc_path)
    source_info["encoder_cached"] = enc_path.is_file()
    if not source_info["encoder_cached"]:
        log(f"training the domain encoder: {spec.encoder_steps} SimCLR steps")
        clock = Clock()
        ensure_encoder(task, device)
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
    log(f"source model before adaptation: {args.samples} samples")
    # sampled through the methods' own sample() (G_ema, the same z/noise stream per seed)
    unadapted = GANFinetune(GANFinetune.Config(batch_size=args.batch_size), load_gan_source(folder, device),
                            device, seed=args.seeds[0])
    src_samples = unadapted.sample(args.samples, seed=args.seeds[0] + SAMPLE_SEED_OFFSET)
    del unadapted
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
    log("    source: " + ", ".join(f"{k} {source_rows[0][k]:.4g}" for k, _ in columns)
        + " | real: " + ", ".join(f"{k} {real_rows[0][k]:.4g}" for k, _ in columns))

    # 3. the comparison: every run through the one training loop -------------------------------
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in METHODS}
    grids: dict[str, torch.Tensor] = {}
    loop_metrics = ["domain"] + (["lpips_vgg"] if len(extractors) > 1 else [])  # this script's networks
    metric_keys = set(source_rows[0]) | LOOP_EVAL_KEYS
    eval_keys = tuple(k for k, _ in columns)
    loop_wall = loop_cpu = grid_wall = grid_cpu = 0.0
    with node_cache(scratch):
        source_ref, encoder_ref = publish(folder, storage), publish(enc_path, storage)
        for seed in args.seeds:
            draw = SHOT_DRAW_OFFSET + seed if args.vary_shots else t.seed
            for key in METHODS:
                log(f"  {key} seed {seed}: {args.steps} steps, batch {args.batch_size}")
                clock = Clock()
                result, job, prog = adapt(key, folder, source_ref, encoder_ref, draw, seed, loop_metrics,
                                          eval_keys, args, storage, device)
                w, c = clock.elapsed()
                loop_wall, loop_cpu = loop_wall + w, loop_cpu + c
                same_images(job.data, shots_of[seed], "shots")
                if seed == args.seeds[0] and key == METHODS[0]:
                    same_images(job.reference, reference, "reference images")
                # the loop's evaluations: every --eval-every steps before the last, and the final one
                trajectory = [{"step": int(r["step"]), **{k: r[k] for k in eval_keys}} for r in result.reports
                              if prog.evaluated(int(r["step"]))]
                row = {**run_row(result.metrics, metric_keys, args.steps, prog.cpu_s_per_step), "seed": seed,
                       "trajectory": trajectory}
                runs[key].append(row)
                if seed == args.seeds[0]:  # the final evaluation's samples again, from the reloaded export
                    clock = Clock()
                    samples = reload(job, result.export, device).sample(args.samples, seed=seed + SAMPLE_SEED_OFFSET)
                    grids[key] = samples[: args.grid]
                    w, c = clock.elapsed()
                    grid_wall, grid_cpu = grid_wall + w, grid_cpu + c
                log(f"    {key} seed {seed}: " + ", ".join(f"{k} {row[k]:.4g}" for k, _ in columns if k in row)
                    + f", {row['s_per_step']:.3f} s/step")
    work.cleanup()
    phases["adaptation (run_loop: train, evaluations, export)"] = {"wall_s": loop_wall, "cpu_s": loop_cpu}
    phases["sample grids (reloaded exports)"] = {"wall_s": grid_wall, "cpu_s": grid_cpu}

    # 4. report ---------------------------------------------------------------------------------
    ft, dcl = runs["gan_finetune"], runs["dcl"]
    ratio_keys = [k for k, _ in columns] + ["s_per_step", "cpu_s_per_step"]
    ratios = {k: [d[k] / f[k] if f[k] else float("nan") for d, f in zip(dcl, ft)] for k in ratio_keys}
    rows = [("source (before adaptation)", source_rows), ("real target images", real_rows),
            ("gan_finetune", ft), ("dcl", dcl)]
    answer, sentence, numbers = verdict(runs, source_rows)
    wall_total, cpu_total = t_start.elapsed()
    load_end = os.getloadavg()

    text_table = table(rows, columns, ratios, markdown=False)
    print()
    print(text_table)
    print()
    print(sentence)
    print(f"\nwall time {wall_total / 60:.1f} min (CPU {cpu_total / 60:.1f} min)")

    args.out.mkdir(parents=True, exist_ok=True)
    s0 = args.seeds[0]
    save_grid(shots_of[s0], args.out / f"{NAME}_shots.png", cols=5, scale=2)
    save_grid(src_samples[: args.grid], args.out / f"{NAME}_source.png", cols=8)
    for key, imgs in grids.items():
        save_grid(imgs, args.out / f"{NAME}_{key}_seed{s0}.png", cols=8)

    cmd = command_line(NAME, argv)
    machine = (machine_description(device) + f", {args.threads} torch thread{'s' if args.threads > 1 else ''}; "
               f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at the end (other jobs shared the "
               "cores: wall times are noisy, CPU times less so)")
    shots_txt = (f"a new draw per seed (synthetic draw {SHOT_DRAW_OFFSET} + seed)" if args.vary_shots else
                 f"the task's ten shots, fixed (draw {t.seed}; the images the CLI trains on); "
                 "the seed varies training and sampling noise")
    pre = source_info.get("pretrain")
    source_txt = ("cached" if source_info["cached"] else
                  f"pretrained by this run in {pre['wall_s'] / 60:.1f} min, {pre['s_per_step']:.3f} s/step")
    dcfg = DCL.Config()
    default_lr = pretrainer(FAMILY, spec.pretrainer).Config().lr
    enc_txt = ("cached" if source_info["encoder_cached"] else
               f"trained by this run in {phases['train domain encoder']['wall_s'] / 60:.1f} min")
    progress = adaptation_progress(runs, source_rows, real_rows)
    traj_md = ""
    if args.eval_every:
        traj_md = ("\n## Over training (mean over seeds)\n\n"
                   "Quality and diversity of each method every {} steps (`--eval-every`); the source row is "
                   "step 0.\n\n{}\n").format(args.eval_every, trajectory_table(runs, source_rows, columns))
        print()
        print(trajectory_table(runs, source_rows, columns))
    phase_lines = phase_rows(phases)
    md = f"""# DCL vs GAN fine-tuning, in small

`{cmd}` — {started:%Y-%m-%d %H:%M %Z}, wall time **{wall_total / 60:.1f} min** (CPU {cpu_total / 60:.1f} min).

The comparison of Zhao et al., "A Closer Look at Few-shot Image Generation" (CVPR 2022) in small:
built-in task `synthetic:{args.domain}` with the project's own StyleGAN2 source ({spec.preset} preset,
{task.resolution}², pretrained on `{spec.data}` ({spec.count} images): {spec.steps} steps, batch {spec.batch_size},
lr {spec.lr if spec.lr is not None else f'pretrainer default ({default_lr})'}; {source_txt}: `{folder.name}`,
the CLI's cache under `{cache_home()}`)
adapted to {t.shots} shots of `{t.data}`. Shots: {shots_txt}.

Both methods: default configs, **{args.steps} steps, batch {args.batch_size}**, Adam lr 0.002 betas (0, 0.99),
lazy R1 γ 10, style mixing 0.9, G EMA (rosinality's 0.5^(32/10⁴)); `dcl` adds λ_G {dcfg.lambda_g}, λ_D {dcfg.lambda_d},
τ {dcfg.temperature}, all layers (unverified choices: no official DCL loss code exists, see `trainers/gan/dcl.py`).
Trained by the project's one loop, `{LOOP}`; the evaluations are the loop's (the final one and, with
`--eval-every`, those on the way; the grids below are the final one's samples, drawn again from the reloaded exports).
Seeds {', '.join(map(str, args.seeds))}. Evaluation: {args.samples} samples from G_ema (no truncation) against the
task's reference set ({len(reference)} images of `{ref.data}`, draw {ref.seed}), features of the project's domain
encoder (SimCLR on the source domain, {spec.encoder_steps} steps; {enc_txt}: `{enc_path.parent.name}`). `intra_dist_domain` is the Intra-LPIPS protocol
(Ojha et al. 2021: samples clustered to their nearest shot, ≤ 50 per cluster, mean pairwise distance within
clusters) with the domain encoder's cosine distance instead of LPIPS. {lpips_note}
The paper evaluates 256² FFHQ → Babies/Sunglasses/Sketches with 5,000 samples, Inception FID and LPIPS;
these are the same measurements on a toy domain, not its numbers.

Machine: {machine}.

## Results (mean ± std over {len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''})

{table(rows, columns, ratios, markdown=True)}

Ratios are per seed (paired: same shots, batches, latents and sampling noise), then averaged.
"source" is the unadapted source model's samples (one sampling run) and "real target images" is
{args.samples} real images of another draw of the target domain: FID's floor at this sample count and
the domain's own diversity.

**{sentence}**

{progress}

Rule (computed in `verdict()`): similar quality at the end iff mean over seeds of fid_domain dcl/ft ≤
{1 + FID_TOLERANCE:.2f}; then Δ = intra_dist_domain(dcl) − intra_dist_domain(ft) per seed at the end.
Otherwise Δ is taken at matched quality: at F = the worse of the two final FIDs per seed, the
better-ending method's diversity read off its trajectory (evaluated every `--eval-every` steps,
linear in FID between evaluations). More diversity iff mean(Δ) > 0 and mean(Δ) > std(Δ) over seeds.

{traj_md}
## Time

| phase | wall min | CPU min |
|---|---|---|
{phase_lines}
| **total** | **{wall_total / 60:.1f}** | **{cpu_total / 60:.1f}** |

s/step: the loop's training time (`time_train_s`) per step; CPU s/step: process CPU seconds per step over the
loop's report windows that hold training steps only (n/a when a run had none: not the first, which holds the
loop's setup, nor one that ends in an evaluation or the export).

## Samples (seed {s0}, first {min(args.grid, args.samples)})

| shots | source | gan_finetune | dcl |
|---|---|---|---|
| ![shots]({NAME}_shots.png) | ![source]({NAME}_source.png) | ![ft]({NAME}_gan_finetune_seed{s0}.png) | ![dcl]({NAME}_dcl_seed{s0}.png) |
"""
    (args.out / f"{NAME}.md").write_text(md)
    result = {
        "command": cmd, "date": started.isoformat(), "wall_s": wall_total, "cpu_s": cpu_total,
        "machine": machine, "settings": settings_of(args),
        "source": source_info, "phases": phases, "loop": LOOP, "verdict": {"answer": answer, "sentence": sentence, **numbers},
        "source_rows": source_rows, "real_rows": real_rows, "runs": runs, "ratios": ratios,
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out / (NAME + '.md')}")
    return result


if __name__ == "__main__":
    main()
