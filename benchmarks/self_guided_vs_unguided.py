"""Self-guided vs unguided sampling (Hu et al., "Self-Guided Diffusion Models", CVPR 2023, arXiv
2210.06462) in small, on the built-in synthetic few-shot tasks.

    python -m benchmarks.self_guided_vs_unguided                    # the default run (see --help)
    python -m benchmarks.self_guided_vs_unguided --targets sketch --seeds 0 --steps 50 --samples 64 \\
        --sample-steps 10 --pretrain-steps 200                      # a quick end-to-end check
    python -m benchmarks.self_guided_vs_unguided --self-guided-source   # + a self-guided source row
    python -m benchmarks.self_guided_vs_unguided --report-only      # re-render the markdown from the JSON

Everything trains through the project's one training loop (``orchestrator.runtime.loop.run_loop`` with a
``StoreSession``, in this process: no Ray, no MLflow); nothing here steps a method itself.

1. **Source.** A plain DDPM (``ddpm_pretrain``, UNet preset ``--preset``) on the built-in synthetic
   source domain (4,096 images), as a ``Job(kind="pretrain")``. With ``--self-guided-source`` also a
   self-guided source (``self_guided_pretrain``: k = 32 source clusters of the shipped domain
   encoder's features) with the same steps, batch and lr. Both are cached where the CLI caches a
   source of the same pretraining spec (``orchestrator.runs.sources.cached_source_path``: the key hashes
   the spec), so a rerun — or a CLI task with that spec — reuses them; an interrupted pretraining
   resumes from its last checkpoint (its run storage is kept under the node cache).
2. **Adaptation.** For each target (``--targets``, default sketch and night; the task's 10 shots,
   draw 0, fixed over seeds) and each seed: ``ddpm_finetune`` (the unguided baseline) and
   ``self_guided`` (its defaults: ``target_labels=new_clusters``, k_target = 5 clusters of the
   shots in the shipped encoder's space, label dropout p = 0.1, concat conditioning, AdamW weight
   decay 0.01 — ddpm_finetune's default is 0) with the same steps, lr and batch size, through
   ``orchestrator.core.config.resolve`` → ``orchestrator.runs.inputs.prepare``/``make_job`` → ``run_loop``.
   The run seed varies the initialisation of the new conditioning weights, the batches and the
   noise; the pseudo-labels are seeded by ``cluster_seed`` and are the same for every seed.
3. **Evaluation.** The trained method is restored from the run's final checkpoint (the loop's own
   resume path: ``build_method`` + ``load_state_dict`` + ``prepare``), and sampled with DDIM
   (``--sample-steps``, η = 0, EMA weights): ``ddpm_finetune`` with ``sample``; ``self_guided``
   with ``sample_labels(draw_labels(n), guidance=w)`` for each w in ``--weights`` (w = 0 is its
   unconditional branch, 1 the conditional model, 2 the release's default; labels drawn from the
   shots' pseudo-labels). All variants of one seed use the same sampling noise (seed + 12345, as
   the CLI's final evaluation), so differences are paired per seed. Metrics in the feature space
   of the shipped domain encoder (``trainers/builtin/encoder-synthetic-<res>.safetensors``):
   ``trainers.metrics.evaluate(samples, reference, shots, [encoder])`` with reference = 1,000
   rendered target images (``trainers.data.render(domain, 1000, res, seed=1)``) — fid_domain,
   kid_domain, intra_dist_domain (samples clustered to their nearest shot, mean pairwise cosine
   distance within clusters), coverage_domain, density_domain — and target_rate_domain, the share
   of samples the shipped domain classifier calls the target domain. Two reference rows per
   target: the source before adaptation and ``--samples`` real target images of another draw.
4. **Grids** (seed 0): the self-guided model at w = 2, one row per pseudo-label cluster (the
   shots of that cluster, a grey gap, samples conditioned on that cluster), and the unguided
   baseline, its samples sorted into the same clusters by the same annotator (nearest centroid),
   so that the two grids compare row by row.
5. **Report**: ``benchmarks/results/self_guided_vs_unguided.md`` and ``.json`` with the settings,
   the machine, the wall time, the table (target × variant, mean ± std over seeds) and a verdict
   computed by ``verdict()``: per target and per w, the paired per-seed difference
   Δ = self_guided(w) − ddpm_finetune of each metric; an effect counts iff |mean Δ| > std Δ over
   the seeds (same direction in most seeds; with one seed there is no spread estimate); "best w"
   is the w of the lowest mean fid_domain.

Sizes: the defaults are chosen so that a first run (pretraining included) takes about 30–40
minutes on 2 CPU cores shared with other jobs; see ``--help`` and the recorded wall time in the
markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Before torch starts its OpenMP pool: idle threads sleep instead of spinning (on CPU cores shared
# with other jobs, spinning threads waiting for a descheduled sibling make every step much slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.data.artifacts import fetch, publish  # noqa: E402
from orchestrator.core.config import (  # noqa: E402
    PretrainSpec,
    ResolvedConfig,
    RunSettings,
    SourceSpec,
    TargetSpec,
    TaskConfig,
    resolve,
)
from orchestrator.runs.inputs import Inputs, make_job, prepare  # noqa: E402
from orchestrator.runtime.job import Job  # noqa: E402
from orchestrator.runtime.loop import STATE_FILE, build_method, images_tensor, run_loop  # noqa: E402
from orchestrator.core.rng import load_state  # noqa: E402
from orchestrator.runtime.session import StoreSession  # noqa: E402
from orchestrator.runs.sources import ResolvedSource, cached_source_path, is_ready, pretrain_job  # noqa: E402
from orchestrator.data.storage import cache_home, remove_run_dir  # noqa: E402
from orchestrator.records.tracking import image_grid, png_bytes  # noqa: E402
from trainers.base import PrepareContext  # noqa: E402
from trainers.builtin import builtin_classifier  # noqa: E402
from trainers.data import TARGET_DOMAINS, render  # noqa: E402
from trainers.metrics import DomainEncoder, ReferenceStats, evaluate  # noqa: E402
from trainers.metrics.domain_classifier import DomainClassifier  # noqa: E402
from trainers.registry import pretrainer  # noqa: E402
from benchmarks.common import (  # noqa: E402  (benchmarks/common.py)
    RESULTS,
    ROOT,
    SAMPLE_SEED_OFFSET,
    Clock,
    command_line,
    copy_into_place,
    fmt,
    log,
    machine_description,
    md_table,
    mean_std,
    phase_rows,
    pick_device,
    read_result,
    settings_of,
    text_table,
)

NAME = "self_guided_vs_unguided"
BASELINE = "ddpm_finetune"
GUIDED = "self_guided"
# (key, better direction: +1 higher is better, -1 lower is better, 0 neither)
METRICS: list[tuple[str, int]] = [("fid_domain", -1), ("kid_domain", -1), ("target_rate_domain", +1),
                                  ("coverage_domain", +1), ("density_domain", +1), ("intra_dist_domain", +1)]
ARROW = {-1: "↓", +1: "↑", 0: ""}
REFERENCE_COUNT, REFERENCE_SEED = 1000, 1  # the built-in tasks' reference set
REAL_SEED = 2  # "real target images" row: another draw of the target domain
SOURCE_IMAGES = 4096  # synthetic source images for pretraining (the project's PretrainSpec default)
RELEASE_W = 2.0  # the release's cond_scale
GRID_PER_CLUSTER = 8  # samples per cluster row in the grids
# An effect must also be at least this share of the metric's adaptation range |real − source| (the
# gap between the target's own images and the unadapted source, per target): smaller ones are
# called negligible even when the seeds agree on their sign.
MIN_EFFECT = 0.02


def variant_name(w: float, tag: str = "") -> str:
    return f"{GUIDED}{tag} w={w:g}"


# ------------------------------------------------------------------------------------------------
# 1. sources
# ------------------------------------------------------------------------------------------------
def source_task(args: argparse.Namespace, key: str | None) -> TaskConfig:
    """A task whose ``source.pretrain`` is this benchmark's pretraining spec (``key``: the
    pretrainer, None = the plain DDPM one): its ``cached_source_path`` is where the CLI would
    cache a source of the same spec."""
    spec = PretrainSpec(data="synthetic:source", count=SOURCE_IMAGES, preset=args.preset,
                        steps=args.pretrain_steps, batch_size=args.pretrain_batch_size, lr=args.pretrain_lr,
                        seed=0, pretrainer=key)
    return TaskConfig(name="sgvu-source", resolution=args.resolution,
                      source=SourceSpec(family="ddpm", model="pretrained", pretrain=spec),
                      target=TargetSpec(data=f"synthetic:{args.targets[0]}"))


def pretrain_source(args: argparse.Namespace, key: str | None, encoder: Path, work: Path,
                    device: torch.device) -> dict[str, Any]:
    """The source of ``key`` from the cache, else pretrained now through ``run_loop`` (resuming an
    interrupted pretraining of the same spec) and entered into the cache."""
    task = source_task(args, key)
    folder = cached_source_path(task)
    info: dict[str, Any] = {"pretrainer": key or "ddpm_pretrain", "path": str(folder),
                            "spec": task.source.pretrain.model_dump(mode="json")}
    if is_ready(task, folder):
        log(f"source {info['pretrainer']}: cached in {folder}")
        return {**info, "cached": True}
    spec = task.source.pretrain
    cls = pretrainer("ddpm", key)
    storage = str(work / "pretrain")
    every = max(1, min(250, spec.steps))
    run = RunSettings(steps=spec.steps, report_every=every, sample_every=10 ** 9, seed=spec.seed,
                      keep_checkpoints=1, cpus_per_worker=float(args.threads), use_gpu=device.type == "cuda")
    job = pretrain_job(task, storage, run=run, encoder=encoder)
    clock = Clock()

    def progress(report: dict[str, Any]) -> None:
        step = int(report["step"])
        wall = clock.seconds()["wall_s"]
        log(f"  {cls.key} {step}/{spec.steps}  loss {report.get('loss', float('nan')):.4f}  "
            f"{report['steps_per_s']:.2f} steps/s, eta {(spec.steps - step) / max(report['steps_per_s'], 1e-9) / 60:.1f} min"
            f" (elapsed {wall / 60:.1f} min)")

    log(f"source {cls.key}: pretraining {spec.steps} steps, batch {spec.batch_size}, lr {spec.lr}, "
        f"preset {spec.preset}, {spec.count} images of {spec.data}")
    result = run_loop(job, StoreSession(storage, job.name, device=device, keep=1, on_report=progress))
    if result.export is None:
        raise RuntimeError(f"pretraining {job.name} finished without an export")
    copy_into_place(fetch(result.export), folder, folder.exists)
    remove_run_dir(storage, job.name)  # its checkpoints: the source is in the cache now
    losses = [r["loss"] for r in result.reports if "loss" in r]
    return {**info, "cached": False, **clock.seconds(), "final_loss": losses[-1] if losses else None,
            "steps_per_s": float(np.mean([r["steps_per_s"] for r in result.reports])) if result.reports else None}


# ------------------------------------------------------------------------------------------------
# 2. adaptation through the one loop, 3. restore for evaluation
# ------------------------------------------------------------------------------------------------
def target_task_file(work: Path, domain: str, resolution: int, source: Path) -> Path:
    """A task file of the built-in target ``domain`` (its 10 shots, draw 0) with ``source``."""
    import yaml

    task = {"name": f"sgvu-{domain}", "resolution": resolution,
            "source": {"family": "ddpm", "model": str(source)},
            "target": {"data": f"synthetic:{domain}", "shots": 10, "seed": 0},
            # the loop's own final evaluation is replaced by this benchmark's (below): it only
            # needs a small reference set
            "reference": {"data": f"synthetic:{domain}", "count": 16, "seed": REFERENCE_SEED}}
    path = work / f"{task['name']}-{source.name}.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def resolved(method: str, task_file: Path, args: argparse.Namespace, seed: int) -> ResolvedConfig:
    overrides: dict[str, Any] = {
        "lr": args.lr, "batch_size": args.batch_size, "sample_steps": args.sample_steps,
        "run.steps": args.steps, "run.report_every": args.steps, "run.seed": seed,
        "run.sample_every": 10 ** 9, "run.eval_every": 0, "run.keep_checkpoints": 1,
        # the loop's final evaluation: a cheap smoke check; the benchmark evaluates itself
        "run.final_eval_samples": 8, "run.final_eval_sample_steps": 2, "run.eval_samples": 8,
        "run.cpus_per_worker": float(args.threads), "run.use_gpu": args.device_type == "cuda",
    }
    if method == GUIDED:
        overrides["k_target"] = args.k_target
    return resolve(method, task_file, overrides=overrides)


def adapt(cfg: ResolvedConfig, inputs: Inputs, storage: str, name: str,
          device: torch.device) -> tuple[Job, StoreSession, dict[str, Any]]:
    """One adaptation run through ``run_loop``; returns the job, its session and timings."""
    job = make_job(cfg, inputs, name=name, storage=storage)
    session = StoreSession(storage, name, device=device, keep=1)
    clock = Clock()
    result = run_loop(job, session)
    last = result.reports[-1] if result.reports else {}
    info = {**clock.seconds(), "steps_per_s": last.get("steps_per_s"), "train_loss_last_report": last.get("loss"),
            "train_seconds": last.get("time_train_s"), "trainable_parameters": last.get("trainable_parameters")}
    for k in ("dropped_fraction", "grad_norm"):
        if k in last:
            info[f"train_{k}"] = last[k]
    return job, session, info


def restore(job: Job, session: StoreSession, device: torch.device):
    """The trained method as the loop leaves it: built from the job, the final checkpoint
    loaded, ``prepare`` run on the shots (the loop's resume path)."""
    method, _ = build_method(job, device, int(job.run.seed))
    with session.latest_checkpoint() as folder:
        if folder is None:
            raise RuntimeError(f"{job.name}: no checkpoint")
        state = load_state(folder / STATE_FILE)
    if int(state.get("step", -1)) != job.run.steps:
        raise RuntimeError(f"{job.name}: last checkpoint at step {state.get('step')}, expected {job.run.steps}")
    method.load_state_dict(state["method"])
    encoder = fetch(job.domain_encoder) if job.domain_encoder is not None else None
    method.prepare(images_tensor(job.data).to(device),
                   PrepareContext(domain_encoder=encoder, cache_dir=cache_home() / "annotations"))
    return method


@torch.no_grad()
def condition_gap(method, shots: torch.Tensor, seed: int, timesteps: int = 8) -> float:
    """How far a trained self_guided model's conditional branch is from its null branch: the mean,
    over the shots (with their pseudo-labels) and ``timesteps`` evenly spaced t, of
    ‖ε_c − ε_∅‖ / ‖ε_∅‖ (sampling weights). 0: the label changes nothing, and no w can either."""
    from trainers.common import to_model_range

    net = method.sampling_unet
    was = net.training
    net.eval()
    x0 = to_model_range(shots.to(method.device)).float()
    cond = net.condition(method.labels)
    null = torch.zeros_like(cond)
    gen = torch.Generator().manual_seed(seed)
    ratios = []
    for t in torch.linspace(0, len(method.alphas_cumprod) - 1, timesteps).long().tolist():
        eps = torch.randn(x0.shape, generator=gen).to(method.device)
        abar = method.alphas_cumprod[t]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        tt = torch.full((len(x0),), t, device=method.device, dtype=torch.long)
        e_c, e_u = net(x_t, tt, cond).sample.float(), net(x_t, tt, null).sample.float()
        ratios.append(((e_c - e_u).flatten(1).norm(dim=1) / e_u.flatten(1).norm(dim=1)).mean())
    net.train(was)
    return float(torch.stack(ratios).mean())


class Scorer:
    """``evaluate`` + the domain classifier's target rate against one target's reference set."""

    def __init__(self, domain: str, shots: torch.Tensor, encoder: DomainEncoder, classifier: DomainClassifier,
                 resolution: int) -> None:
        self.domain, self.shots, self.encoder, self.classifier = domain, shots, encoder, classifier
        self.reference = torch.from_numpy(render(domain, REFERENCE_COUNT, resolution, seed=REFERENCE_SEED)
                                          ).permute(0, 3, 1, 2).contiguous()
        self.cache = ReferenceStats()

    def __call__(self, samples: torch.Tensor, seed: int) -> dict[str, float]:
        n = len(samples)
        m = evaluate(samples, self.reference, self.shots, [self.encoder], seed=seed,
                     kid_subset_size=min(1000, n, len(self.reference)), cache=self.cache)
        m["target_rate_domain"] = self.classifier.rate(samples, self.domain)
        return m


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# 4. grids
# ------------------------------------------------------------------------------------------------
def cluster_grid(shots: torch.Tensor, shot_labels: torch.Tensor, samples: torch.Tensor,
                 sample_labels: torch.Tensor, per_row: int) -> np.ndarray:
    """One row per cluster (the labels of the shots): its shots, a grey cell, up to ``per_row``
    samples of that cluster (white where there are fewer)."""
    shots_np = shots.permute(0, 2, 3, 1).numpy()
    samples_np = samples.permute(0, 2, 3, 1).numpy()
    h, w = shots_np.shape[1:3]
    white = np.full((h, w, 3), 255, np.uint8)
    grey = np.full((h, w, 3), 160, np.uint8)
    clusters = sorted(int(c) for c in torch.unique(shot_labels))
    width = max(int((shot_labels == c).sum()) for c in clusters)
    cells: list[np.ndarray] = []
    for c in clusters:
        row = [shots_np[i] for i in torch.nonzero(shot_labels == c).flatten().tolist()]
        row += [white] * (width - len(row)) + [grey]
        picked = [samples_np[i] for i in torch.nonzero(sample_labels == c).flatten().tolist()[:per_row]]
        cells += row + picked + [white] * (per_row - len(picked))
    return image_grid(np.stack(cells), ncols=width + 1 + per_row, pad=1)


def write_png(grid: np.ndarray, path: Path, scale: int = 3) -> None:
    path.write_bytes(png_bytes(grid, scale=scale))


def target_cluster_labels(method, images: torch.Tensor) -> torch.Tensor:
    """Nearest *target* cluster (of the shots' k-means) of each image, by the method's annotator."""
    from trainers.annotate import assign

    ann = method.annotator
    ids = ann.ids.cpu()
    targets = torch.nonzero(ids >= method.num_source_classes).flatten()
    feats = ann.features(images.to(method.device)).cpu()
    return ids[targets][assign(feats, ann.centroids.cpu()[targets])]


# ------------------------------------------------------------------------------------------------
# statistics, verdict, report
# ------------------------------------------------------------------------------------------------
def paired(a: list[dict[str, float]], b: list[dict[str, float]], key: str, direction: int,
           scale: float = float("nan")) -> dict[str, Any]:
    """Δ = a − b per seed (paired by position): mean, std, relative to b, and whether the effect
    is beyond the seed spread (|mean| > std; one seed: no spread, never 'beyond') and not
    negligible (|mean| ≥ MIN_EFFECT · ``scale``, the metric's adaptation range)."""
    d = [x[key] - y[key] for x, y in zip(a, b) if key in x and key in y]
    m, s = mean_std(d)
    base = mean_std([y[key] for y in b if key in y])[0]
    beyond = len(d) > 1 and math.isfinite(s) and abs(m) > s
    negligible = math.isfinite(scale) and scale > 0 and math.isfinite(m) and abs(m) < MIN_EFFECT * scale
    if not math.isfinite(m):
        effect = "n/a"
    elif not beyond:
        effect = "within spread"
    elif negligible:
        effect = "negligible"
    elif direction == 0:
        effect = "higher" if m > 0 else "lower"
    else:
        effect = "better" if m * direction > 0 else "worse"
    return {"mean": m, "std": s, "rel": m / base if base else float("nan"), "n": len(d), "beyond": beyond,
            "negligible": negligible, "scale": scale, "effect": effect, "deltas": d}


def describe(c: dict[str, Any], label: str, digits: int = 3) -> str:
    if not math.isfinite(c["mean"]):
        return f"{label} n/a"
    g = f"{{:+.{digits}g}}"
    rel = f", {c['rel']:+.1%}" if math.isfinite(c["rel"]) else ""
    spread = f"seed spread {c['std']:.{digits}g}" if math.isfinite(c["std"]) else "one seed: no spread"
    word = {"within spread": "within the spread", "negligible": f"negligible, < {MIN_EFFECT:.0%} of the range"}.get(
        c["effect"], c["effect"])
    return f"{label} {g.format(c['mean'])} ({word}{rel}; {spread})"


LABELS = {"fid_domain": "FID", "kid_domain": "KID", "target_rate_domain": "target rate",
          "coverage_domain": "coverage", "density_domain": "density", "intra_dist_domain": "intra-cluster dist."}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Per target: paired comparisons of every self_guided w against ddpm_finetune (and against
    its own w = 0), the best w, and a generated paragraph."""
    weights = result["settings"]["weights"]
    out: dict[str, Any] = {"targets": {}, "paragraphs": []}
    for domain, rows in result["runs"].items():
        ft = rows[BASELINE]
        scale = {k: abs(mean_std([r[k] for r in result["real_rows"][domain]])[0]
                        - mean_std([r[k] for r in result["source_rows"][domain]])[0]) for k, _ in METRICS}
        per_w: dict[str, Any] = {}
        for w in weights:
            sg = rows[variant_name(w)]
            per_w[f"{w:g}"] = {
                "vs_unguided": {k: paired(sg, ft, k, d, scale[k]) for k, d in METRICS},
                "vs_w0": ({k: paired(sg, rows[variant_name(0.0)], k, d, scale[k]) for k, d in METRICS}
                          if 0.0 in weights and w != 0 else None),
            }
        fid_means = {f"{w:g}": mean_std([r["fid_domain"] for r in rows[variant_name(w)]])[0] for w in weights}
        best = min(fid_means, key=lambda k: fid_means[k] if math.isfinite(fid_means[k]) else float("inf"))
        guided_ws = [f"{w:g}" for w in weights if w != 0]
        headline = f"{RELEASE_W:g}" if RELEASE_W in weights else best
        h = per_w[headline]["vs_unguided"]
        b = per_w[best]["vs_unguided"]
        fid_improves = {w: per_w[w]["vs_unguided"]["fid_domain"]["effect"] == "better" for w in guided_ws}
        rate_improves = {w: per_w[w]["vs_unguided"]["target_rate_domain"]["effect"] == "better" for w in guided_ws}
        ft_fid = mean_std([r["fid_domain"] for r in ft])[0]

        def outcome(c: dict[str, Any], name: str, good: str, bad: str) -> str:
            return {"better": f"{name} {good}", "worse": f"{name} {bad}",
                    "negligible": f"{name} changes negligibly"}.get(
                c["effect"], f"{name} does not change beyond the seed spread")

        best_note = ""
        if best == "0":
            best_note = ", i.e. without guidance"
        elif per_w[best]["vs_w0"] is not None and per_w[best]["vs_w0"]["fid_domain"]["effect"] != "better":
            best_note = ", but not better than w = 0 by the rule below"
        sentences = [
            f"**synthetic:{domain}.** Lowest mean FID at w = {best}{best_note} ({fid_means[best]:.3g}; unguided "
            f"ddpm_finetune {ft_fid:.3g}; mean FID by w: " + ", ".join(f"w={k} {v:.3g}" for k, v in fid_means.items())
            + ").",
            f"At the release's w = {headline}, against the unguided baseline (paired per seed): "
            + "; ".join(describe(h[k], LABELS[k]) for k, _ in METRICS) + ".",
            f"In short, with guidance at w = {headline} instead of unguided fine-tuning: "
            f"{outcome(h['fid_domain'], 'FID', 'improves', 'gets worse')}, "
            f"{outcome(h['target_rate_domain'], 'the target rate', 'rises', 'falls')}; on diversity, "
            f"{outcome(h['coverage_domain'], 'coverage', 'rises', 'falls')} and "
            f"{outcome(h['intra_dist_domain'], 'the intra-cluster distance', 'rises', 'falls')}.",
        ]
        if best != headline:
            sentences.append(f"At the best w = {best}: " + "; ".join(
                describe(b[k], LABELS[k]) for k in ("fid_domain", "target_rate_domain", "coverage_domain",
                                                     "intra_dist_domain")) + ".")
        w0 = per_w[headline]["vs_w0"]
        if w0 is not None:
            sentences.append(f"Guidance alone (the same network, w = {headline} vs its unconditional branch w = 0): "
                             + "; ".join(describe(w0[k], LABELS[k]) for k in ("fid_domain", "target_rate_domain",
                                                                               "coverage_domain",
                                                                               "intra_dist_domain")) + ".")
        gaps = [r["cond_gap"] for r in result.get("adapt", {}).get(domain, {}).get(GUIDED, []) if "cond_gap" in r]
        gap = mean_std(gaps)[0]
        if math.isfinite(gap):
            sentences.append(f"The trained conditional branch differs from the null branch by ‖ε_c − ε_∅‖/‖ε_∅‖ = "
                             f"{gap:.2g} on the shots (mean over seeds)"
                             + (": guidance has almost nothing to amplify, so no w can change the samples much."
                                if gap < 0.01 else "."))
        cov = {k: mean_std([r["coverage_domain"] for r in rows[variant_name(float(k))]])[0] for k in fid_means}
        intra = {k: mean_std([r["intra_dist_domain"] for r in rows[variant_name(float(k))]])[0] for k in fid_means}
        sentences.append("Diversity by w: coverage " + ", ".join(f"{v:.3g}" for v in cov.values())
                         + "; intra-cluster " + ", ".join(f"{v:.3g}" for v in intra.values())
                         + f" (w = {', '.join(fid_means)}).")
        out["targets"][domain] = {"best_w": float(best), "headline_w": float(headline), "fid_by_w": fid_means,
                                  "cond_gap": gap,
                                  "fid_improves_by_w": fid_improves, "target_rate_improves_by_w": rate_improves,
                                  "comparisons": per_w}
        out["paragraphs"].append(" ".join(sentences))
    return out


def table(result: dict[str, Any], markdown: bool) -> str:
    head = ["target", "variant"] + [f"{k} {ARROW[d]}" for k, d in METRICS] + ["sample s"]
    body = []
    for domain, rows in result["runs"].items():
        for name, runs in [("source (no adaptation)", result["source_rows"][domain]),
                           ("real target images", result["real_rows"][domain])] + list(rows.items()):
            cells = [domain, name] + [fmt([r.get(k, float("nan")) for r in runs], 3) for k, _ in METRICS]
            cells.append(fmt([r.get("sample_s", float("nan")) for r in runs], 3))
            body.append(cells)
    return md_table(head, body) if markdown else text_table(head, body)


def report(result: dict[str, Any], out: Path) -> None:
    """Print the table and verdict; write ``<out>/self_guided_vs_unguided.md`` (and the verdict
    into the JSON) from a result, so that ``--report-only`` re-renders it without training."""
    st = result["settings"]
    v = verdict(result)
    result["verdict"] = v
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1, default=float))
    wall = result["wall_s"] / 60
    print()
    print(table(result, markdown=False))
    print()
    for p in v["paragraphs"]:
        print(p.replace("**", ""))
        print()
    print(f"wall time {wall:.1f} min (CPU {result['cpu_s'] / 60:.1f} min)")

    sources = "\n".join(
        f"* `{s['pretrainer']}`: {'cached (trained by an earlier run)' if s['cached'] else 'pretrained by this run'}"
        f" — `{Path(s['path']).name}`"
        + (f"; {s['wall_s'] / 60:.1f} min, final loss {s['final_loss']:.4f}" if not s["cached"] else "")
        for s in result["sources"].values())
    phases = phase_rows(result["phases"])
    train = "\n".join(
        f"| {d} | {m} | {fmt([r.get('steps_per_s') for r in runs], 3)} | "
        f"{fmt([r.get('train_loss_last_report') for r in runs], 3)} | {fmt([r.get('wall_s') for r in runs], 3)} | "
        f"{fmt([r['cond_gap'] for r in runs if 'cond_gap' in r], 3) if any('cond_gap' in r for r in runs) else ''} |"
        for d, per in result["adapt"].items() for m, runs in per.items())
    labels = "\n".join(
        f"| {d} | {info['k']} | {', '.join(str(c) for c in info['shots_per_cluster'])} | "
        f"{', '.join(f'{x:.2f}' for x in info['unguided_share'])} | {', '.join(f'{x:.2f}' for x in info['guided_share'])} |"
        for d, info in result["clusters"].items())
    grids = "\n".join(
        f"| {d} | ![{d} shots](self_guided_vs_unguided_{d}_shots.png) | "
        f"![{d} self-guided](self_guided_vs_unguided_{d}_self_guided_clusters.png) | "
        f"![{d} unguided](self_guided_vs_unguided_{d}_unguided_clusters.png) |" for d in result["runs"])
    sg_note = ("" if not st.get("self_guided_source") else
               f" Rows `{GUIDED}[sg-src] w=…` adapt the self-guided source (its k = 32 source clusters, the "
               "shots' clusters appended) instead of the plain one.")
    md = f"""# Self-guided vs unguided sampling, in small

`{result['command']}` — {result['date'][:16].replace('T', ' ')}, wall time **{wall:.1f} min**
(CPU {result['cpu_s'] / 60:.1f} min over the torch threads).

Machine: {result['machine']}.

What (Hu et al., *Self-Guided Diffusion Models*, CVPR 2023, in small): a plain DDPM source
(UNet preset `{st['preset']}`, {st['resolution']}², pretrained on {SOURCE_IMAGES} images of `synthetic:source`:
{st['pretrain_steps']} steps, batch {st['pretrain_batch_size']}, lr {st['pretrain_lr']}) adapted to the 10 shots
(draw 0, fixed over seeds) of each built-in target with `ddpm_finetune` (unguided) and `self_guided`
(pseudo-labels: k-means with k_target = {st['k_target']} on the shots' features of the shipped domain encoder,
label dropout p = 0.1; its other defaults), both **{st['steps']} steps, batch {st['batch_size']}, lr {st['lr']:g}**,
EMA 0.999, through the project's training loop (`run_loop`); seeds {', '.join(map(str, st['seeds']))}.
Evaluation: {st['samples']} samples per variant, DDIM {st['sample_steps']} steps (η = 0, EMA weights), the same
noise for every variant of a seed; `self_guided` sampled with guidance w ∈ {{{', '.join(f'{w:g}' for w in st['weights'])}}}
(ε̃ = ε_∅ + w (ε_c − ε_∅): w = 0 its unconditional branch, 1 conditional, 2 the release's default),
labels drawn from the shots' pseudo-labels. Metrics in the shipped domain encoder's feature space
against {REFERENCE_COUNT} rendered target images (draw {REFERENCE_SEED}); `intra_dist_domain`: samples
clustered to their nearest shot, mean pairwise cosine distance within clusters (the Intra-LPIPS
protocol in that space); `target_rate_domain`: the shipped domain classifier's share of samples
called the target domain. "real target images" = {st['samples']} real images of another draw (FID's floor
at this sample count, the domain's own diversity).{sg_note}

Sources:
{sources}

## Results (mean ± std over {len(st['seeds'])} seed{'s' if len(st['seeds']) > 1 else ''})

{table(result, markdown=True)}

"sample s": wall seconds to draw the samples (w ∉ {{0, 1}} runs the UNet on a doubled batch).

## Verdict (computed by `verdict()`)

{chr(10).join(p + chr(10) for p in v['paragraphs'])}
Rule: Δ = metric(self_guided at w) − metric(ddpm_finetune) per seed (paired: same shots, same
sampling noise); an effect is "better"/"worse" only when |mean Δ| > std Δ over the seeds
(otherwise "within the spread") and |mean Δ| ≥ {MIN_EFFECT:.0%} of the metric's adaptation range
|real target − source| of that target (otherwise "negligible"). The best w is picked on these same
runs (optimistic); w = 2 is fixed in advance (the release's default).

## Pseudo-labels and where samples fall

| target | k | shots per cluster | share of unguided samples per cluster | share of self-guided (w = 2) samples |
|---|---|---|---|---|
{labels}

Seed {st['seeds'][0]}; a sample's cluster is its nearest target centroid in the encoder's space (the
annotator `self_guided` trains with). The self-guided model is asked for each cluster in proportion to
its shots; the unguided one is not asked for anything.

## Training

| target | method | steps/s | loss (last report) | wall s per run (build, train, export) | ‖ε_c − ε_∅‖ / ‖ε_∅‖ |
|---|---|---|---|---|---|
{train}

The last column: how far the trained conditional branch is from the null branch (mean over the
shots with their pseudo-labels and 8 evenly spaced timesteps, sampling weights). Guidance scales
exactly this difference: where it is ~0 no w can change the samples.

## Time

| phase | wall min | CPU min |
|---|---|---|
{phases}
| **total** | **{wall:.1f}** | **{result['cpu_s'] / 60:.1f}** |

## Samples (seed {st['seeds'][0]})

Self-guided at w = 2: one row per pseudo-label cluster — that cluster's shots, a grey cell, samples
conditioned on that cluster. Unguided: `ddpm_finetune`'s samples sorted into the same clusters.

| target | shots | self_guided, w = 2 | ddpm_finetune (unguided) |
|---|---|---|---|
{grids}
"""
    (out / f"{NAME}.md").write_text(md)
    log(f"wrote {out / (NAME + '.md')} and {out / (NAME + '.json')}")


# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["sketch", "night"], choices=TARGET_DOMAINS,
                   help="built-in target domains (10 shots each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--resolution", type=int, default=32, help="needs a shipped encoder/classifier (32)")
    p.add_argument("--preset", default="tiny", help="UNet preset of the source (tiny | small | base)")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="the project's default for a tiny source")
    p.add_argument("--self-guided-source", action="store_true",
                   help="also pretrain a self_guided_pretrain source (same budget) and adapt self_guided from it")
    p.add_argument("--steps", type=int, default=300, help="adaptation steps, the same for both methods")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="adaptation lr, the same for both methods")
    p.add_argument("--k-target", type=int, default=5, help="self_guided's clusters of the shots")
    p.add_argument("--samples", type=int, default=256, help="samples per evaluated variant")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0], help="guidance weights w")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true",
                   help=f"re-render the markdown from <out>/{NAME}.json; train nothing")
    args = p.parse_args(argv)
    if args.samples < 8:
        p.error("--samples must be >= 8")
    if 0.0 not in args.weights:
        args.weights = [0.0] + args.weights  # the unconditional branch is the within-network baseline
    args.weights = sorted(set(float(w) for w in args.weights))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        result = read_result(args.out / f"{NAME}.json")
        report(result, args.out)
        return result
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.device_type = device.type
    enc_file = ROOT / "trainers" / "builtin" / f"encoder-synthetic-{args.resolution}.safetensors"
    cls_file = builtin_classifier(args.resolution)
    if not enc_file.is_file() or cls_file is None:
        raise SystemExit(f"no shipped domain encoder/classifier at {args.resolution}px (trainers/builtin)")
    started = _dt.datetime.now().astimezone()
    load_start = os.getloadavg()
    total = Clock()
    phases: dict[str, dict[str, float]] = {}
    work = cache_home() / "benchmarks" / NAME  # pretraining runs (resumable); adaptation runs go to a temp dir
    work.mkdir(parents=True, exist_ok=True)
    log(f"{NAME}: targets {args.targets}, seeds {args.seeds}, device {device}, {args.threads} threads, "
        f"load average {load_start[0]:.1f}")

    # 1. sources --------------------------------------------------------------------------------
    clock = Clock()
    sources = {"plain": pretrain_source(args, None, enc_file, work, device)}
    if args.self_guided_source:
        sources["self_guided"] = pretrain_source(args, "self_guided_pretrain", enc_file, work, device)
    phases["sources (pretrain or cache)"] = clock.seconds()

    encoder = DomainEncoder.load(enc_file, device)
    classifier = DomainClassifier.load(cls_file, device)
    plain_src = Path(sources["plain"]["path"])
    sg_tag = "[sg-src]"
    variants = [BASELINE] + [variant_name(w) for w in args.weights]
    if args.self_guided_source:
        variants += [variant_name(w, sg_tag) for w in args.weights]

    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    source_rows: dict[str, list[dict[str, float]]] = {}
    real_rows: dict[str, list[dict[str, float]]] = {}
    adapt_info: dict[str, dict[str, list[dict[str, Any]]]] = {}
    clusters: dict[str, dict[str, Any]] = {}
    train_clock = {"wall_s": 0.0, "cpu_s": 0.0}
    eval_clock = {"wall_s": 0.0, "cpu_s": 0.0}

    # the source before adaptation: one set of samples, scored against each target
    clock = Clock()
    from trainers.diffusion.backbone import ddim_sample, load_source

    src = load_source(str(plain_src), device)
    src_samples, src_s = timed(lambda: ddim_sample(src.unet.eval(), src.scheduler, args.samples, args.resolution,
                                                   args.sample_steps, device, seed=args.seeds[0] + SAMPLE_SEED_OFFSET
                                                   ).cpu())
    del src
    phases["source samples"] = clock.seconds()

    storage_dir = Path(tempfile.mkdtemp(prefix="sgvu-runs-", dir=work))
    storage = str(storage_dir)
    try:
        for domain in args.targets:
            log(f"target synthetic:{domain}")
            rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            adapt_info[domain] = {}
            task_files = {"plain": target_task_file(work, domain, args.resolution, plain_src)}
            if args.self_guided_source:
                task_files["self_guided"] = target_task_file(work, domain, args.resolution,
                                                             Path(sources["self_guided"]["path"]))
            inputs: dict[str, Inputs] = {}
            for key, tf in task_files.items():
                cfg = resolved(BASELINE, tf, args, args.seeds[0])
                path = Path(sources[key]["path"])
                inputs[key] = prepare(cfg, storage=storage, source=ResolvedSource(publish(path, storage), None, path),
                                      encoder=publish(enc_file, storage))
            shots = images_tensor(inputs["plain"].data)
            scorer = Scorer(domain, shots, encoder, classifier, args.resolution)
            real = torch.from_numpy(render(domain, args.samples, args.resolution, seed=REAL_SEED)
                                    ).permute(0, 3, 1, 2).contiguous()
            source_rows[domain] = [{**scorer(src_samples, args.seeds[0]), "sample_s": src_s}]
            real_rows[domain] = [scorer(real, args.seeds[0])]

            plan = [(BASELINE, "plain", ""), (GUIDED, "plain", "")]
            if args.self_guided_source:
                plan.append((GUIDED, "self_guided", sg_tag))
            for seed in args.seeds:
                sample_seed = seed + SAMPLE_SEED_OFFSET
                for method_key, src_key, tag in plan:
                    label = method_key + tag
                    cfg = resolved(method_key, task_files[src_key], args, seed)
                    clock = Clock()
                    job, session, info = adapt(cfg, inputs[src_key], storage, f"{domain}-{label}-seed{seed}", device)
                    for k, v in clock.seconds().items():
                        train_clock[k] += v
                    adapt_info[domain].setdefault(label, []).append({**info, "seed": seed})
                    log(f"  {label} seed {seed}: trained {args.steps} steps in {info['wall_s']:.0f} s "
                        f"({info['steps_per_s'] or float('nan'):.2f} steps/s), loss {info['train_loss_last_report']:.4f}")
                    clock = Clock()
                    method = restore(job, session, device)
                    if method_key == BASELINE:
                        samples, s = timed(lambda: method.sample(args.samples, steps=args.sample_steps, seed=sample_seed))
                        m = {**scorer(samples, seed), "sample_s": s, "seed": seed}
                        rows[BASELINE].append(m)
                        log(f"    {BASELINE}: " + ", ".join(f"{k} {m[k]:.4g}" for k, _ in METRICS) + f", {s:.0f} s")
                        if seed == args.seeds[0]:
                            baseline_samples = samples
                    else:
                        gap = condition_gap(method, shots, seed)
                        adapt_info[domain][label][-1]["cond_gap"] = gap
                        log(f"    ‖ε_c − ε_∅‖/‖ε_∅‖ on the shots: {gap:.4f}")
                        labels = method.draw_labels(args.samples, seed=sample_seed)
                        for w in args.weights:
                            samples, s = timed(lambda: method.sample_labels(labels, steps=args.sample_steps,
                                                                            seed=sample_seed, guidance=w))
                            m = {**scorer(samples, seed), "sample_s": s, "seed": seed}
                            rows[variant_name(w, tag)].append(m)
                            log(f"    {variant_name(w, tag)}: " + ", ".join(f"{k} {m[k]:.4g}" for k, _ in METRICS)
                                + f", {s:.0f} s")
                            if seed == args.seeds[0] and tag == "" and w == RELEASE_W:
                                guided = (method, samples, labels)
                        if seed == args.seeds[0] and tag == "" and RELEASE_W not in args.weights:
                            guided = (method, method.sample_labels(labels, steps=args.sample_steps, seed=sample_seed,
                                                                   guidance=RELEASE_W), labels)
                    for k, v in clock.seconds().items():
                        eval_clock[k] += v
                    del method
            runs[domain] = rows

            # grids and cluster shares (seed 0) -----------------------------------------------------
            sg_method, sg_samples, sg_labels = guided
            shot_labels = sg_method.labels.cpu()
            ft_labels = target_cluster_labels(sg_method, baseline_samples)
            ids = sorted(int(c) for c in torch.unique(shot_labels))
            clusters[domain] = {
                "k": len(ids), "ids": ids,
                "shots_per_cluster": [int((shot_labels == c).sum()) for c in ids],
                "unguided_share": [float((ft_labels == c).float().mean()) for c in ids],
                "guided_share": [float((target_cluster_labels(sg_method, sg_samples) == c).float().mean()) for c in ids],
                "guided_requested_share": [float((sg_labels == c).float().mean()) for c in ids],
            }
            write_png(cluster_grid(shots, shot_labels, sg_samples, sg_labels, GRID_PER_CLUSTER),
                      args.out / f"{NAME}_{domain}_self_guided_clusters.png")
            write_png(cluster_grid(shots, shot_labels, baseline_samples, ft_labels, GRID_PER_CLUSTER),
                      args.out / f"{NAME}_{domain}_unguided_clusters.png")
            write_png(image_grid(shots.permute(0, 2, 3, 1).numpy(), ncols=10, pad=1),
                      args.out / f"{NAME}_{domain}_shots.png")
            del sg_method, guided
    finally:
        shutil.rmtree(storage_dir, ignore_errors=True)
    phases["adaptation: training (run_loop)"] = train_clock
    phases["adaptation: restore, sample, evaluate"] = eval_clock

    # 5. report ---------------------------------------------------------------------------------
    t = total.seconds()
    load_end = os.getloadavg()
    cmd = command_line(NAME, argv)
    machine = (machine_description(device) + f", {args.threads} torch threads; load average {load_start[0]:.1f} at "
               f"the start, {load_end[0]:.1f} at the end (other jobs shared the cores: wall times are noisy)")
    settings = settings_of(args)
    result = {"command": cmd, "date": started.isoformat(), "wall_s": t["wall_s"], "cpu_s": t["cpu_s"],
              "machine": machine, "load_average": {"start": list(load_start), "end": list(load_end)},
              "settings": settings, "sources": sources, "phases": phases, "source_rows": source_rows,
              "real_rows": real_rows, "runs": runs, "adapt": adapt_info, "clusters": clusters}
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
