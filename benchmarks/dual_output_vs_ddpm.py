"""Dynamic Dual-Output Diffusion (``dual_output``; Benny & Wolf, CVPR 2022) vs an ordinary
ε-predicting DDPM, at 5 to 100 sampling steps: the paper's claim is better quality at few steps.

    python -m benchmarks.dual_output_vs_ddpm                 # the default run (~35-45 min on 2 idle cores)
    python -m benchmarks.dual_output_vs_ddpm --pretrain-steps 50 --steps 20 --samples 32 --seeds 0   # smoke
    python -m benchmarks.dual_output_vs_ddpm --report-only   # re-render the markdown from the JSON

Everything is trained through the project's one training loop (``orchestrator.runtime.loop.run_loop`` in
this process with a ``StoreSession``: no Ray, no MLflow); nothing here steps an optimiser.

1. **Two sources, equal budgets**: ``ddpm_pretrain`` (ε prediction) and ``dual_output_pretrain``
   (x̂0 | ε̂ | r heads), each a ``Job(kind="pretrain")`` with the same UNet preset, resolution,
   steps, batch, lr, EMA, data (``--pretrain-count`` images of ``synthetic:source``, draw 0) and
   seed (so the same initial trunk weights, batches, timesteps and noise). Each export is cached
   under ``--cache-dir`` (default ``$TMPDIR/dual_output_vs_ddpm_cache``) in a folder keyed by
   those settings; a rerun with the same settings reuses it (and says so).
2. **Adaptation** to the built-in task ``synthetic:<domain>`` (``--shots`` shots, the task's own
   draw) through ``orchestrator.core.config.resolve`` / ``orchestrator.runs.inputs.prepare`` / ``make_job``
   / ``run_loop``, for every seed: ``ddpm_finetune`` on the ordinary source, ``dual_output`` on the
   dual-output source, and ``dual_output`` on the *ordinary* source (widened at build time, exactly
   the source at the start: r = ``--widen-r-bias`` = −30, so s = sigmoid(r) ≈ 1e-13 and, as the
   method's docstring explains, r gets no usable gradient: that row is ε fine-tuning with an extra
   x̂0 head, reported as it is). Same steps, lr and batch for all three.
3. **Evaluation** of each source (before adaptation) and each adapted export at every
   ``--sample-steps`` (DDIM, η = 0: ``method.sample(n, steps=...)``, i.e. ``ddim_sample`` for an ε
   model and ``dual_sample`` with the mixed x̂0 for a dual-output one; the same respacing,
   "leading", and clipping for both), with ``trainers.metrics.evaluate`` in the domain encoder's
   feature space (the shipped ``encoder-synthetic-32`` at 32², else one trained here with
   ``train_domain_encoder`` on rendered source images) against 1,000 rendered target images
   (``render(domain, 1000, res, seed=1)``, the task's reference set), plus ``target_rate_domain``
   of the shipped domain classifier (32² only). The sources are also evaluated on the **source
   domain** (1,000 rendered source images, draw 1, not the pretraining draw 0): the most direct
   test of the paper's claim. Sampling noise seed = seed + 12345 and metric seed = seed, the
   loop's own protocol; the loop's final evaluation (at the smallest step count) must equal this
   script's evaluation of the reloaded export, which is checked.
4. Diagnostics: the widening check (the widened, untrained source sampled with ``dual_sample`` vs
   the source with ``ddim_sample``), and per timestep t the mean mixing weight s̄ and the MSE of
   each x̂0 estimate (direct head, ε-derived, mix) on held-out images.
5. Output: ``benchmarks/results/dual_output_vs_ddpm.md`` and ``.json`` (settings, machine, wall
   time, tables: variant × sampling steps, mean ± std over seeds) and sample grids at
   ``--grid-steps`` (seed ``--seeds[0]``), ``dual_output_vs_ddpm_<variant>_<N>steps.png``.

Verdict (``verdict()``, computed from the JSON, never hand-written): for each step count, the
paired per-seed difference Δ = fid_domain(dual) − fid_domain(ordinary); "wins" iff mean Δ < 0 and
|mean Δ| > std Δ over seeds, "loses" iff mean Δ > 0 and |mean Δ| > std Δ, else "ties" (one seed:
sign only, flagged). Source domain: dual-output source vs ordinary source (the spread is sampling
noise only: each source is one pretraining run). Target domain: ``dual_output`` on the
dual-output source vs ``ddpm_finetune`` on the ordinary source (spread: adaptation and sampling
seeds), and the widened row vs ``ddpm_finetune``. The claim counts as supported where dual-output
wins at the two smallest step counts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Before torch starts its OpenMP pool: idle threads sleep instead of spinning (a CPU shared with
# other jobs; see benchmarks/ddpm_pa_vs_finetune.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.data.artifacts import fetch, load_array, publish, publish_array  # noqa: E402
from orchestrator.core.config import RunSettings, resolve  # noqa: E402
from orchestrator.runs.inputs import make_job, prepare  # noqa: E402
from orchestrator.runtime.job import Job  # noqa: E402
from orchestrator.runtime.loop import LoopResult, run_loop  # noqa: E402
from orchestrator.runtime.session import StoreSession  # noqa: E402
from orchestrator.runs.sources import ResolvedSource  # noqa: E402
from orchestrator.records.tracking import image_grid, png_bytes  # noqa: E402
from trainers.builtin import builtin_classifier  # noqa: E402
from trainers.builtin import HERE as BUILTIN_DIR, ENCODERS  # noqa: E402
from trainers.data import TARGET_DOMAINS, load_images, render  # noqa: E402
from trainers.diffusion.backbone import load_source  # noqa: E402
from trainers.diffusion.dual_output import split_output  # noqa: E402
from trainers.metrics import DomainEncoder, ReferenceStats, evaluate, train_domain_encoder  # noqa: E402
from trainers.metrics.domain_classifier import DomainClassifier  # noqa: E402
from trainers.registry import get_method, pretrainer  # noqa: E402
from benchmarks.common import (  # noqa: E402  (benchmarks/common.py)
    RESULTS,
    SAMPLE_SEED_OFFSET,
    Clock,
    command_line,
    fmt,
    log,
    md_table,
    mean_std,
    phase_rows,
    pick_device,
    processor,
    read_result,
    settings_of,
    text_table,
)

NAME = "dual_output_vs_ddpm"
PRETRAINERS = {"ddpm": "ddpm_pretrain", "dual": "dual_output_pretrain"}
# variant -> (method, which source); the two sources themselves are "src_ddpm" and "src_dual"
ADAPTED = {"ddpm_finetune": ("ddpm_finetune", "ddpm"), "dual_output": ("dual_output", "dual"),
           "dual_output_widened": ("dual_output", "ddpm")}
LABELS = {"src_ddpm": "ordinary source (ddpm_pretrain), before adaptation",
          "src_dual": "dual-output source (dual_output_pretrain), before adaptation",
          "ddpm_finetune": "ddpm_finetune ← ordinary source",
          "dual_output": "dual_output ← dual-output source",
          "dual_output_widened": "dual_output ← ordinary source (widened)",
          "real": "real images (another draw)"}
TARGET_METRICS = [("fid_domain", "↓"), ("kid_domain", "↓"), ("intra_dist_domain", "↑"),
                  ("coverage_domain", "↑"), ("density_domain", "↑"), ("target_rate_domain", "↑")]
SOURCE_METRICS = [("fid_domain", "↓"), ("kid_domain", "↓"), ("coverage_domain", "↑"), ("density_domain", "↑")]
PROFILE_T = (0, 10, 50, 100, 250, 500, 750, 900, 999)


def progress(label: str, total: int) -> Callable[[dict[str, Any]], None]:
    """A StoreSession ``on_report`` that prints one line per report of the loop."""
    t0 = time.perf_counter()

    def on_report(m: dict[str, Any]) -> None:
        step = int(m["step"])
        wall = time.perf_counter() - t0
        eta = wall / step * (total - step) / 60
        keys = [k for k in ("loss", "loss_simple", "loss_eps", "loss_x0", "loss_mu", "mix_mean") if k in m]
        extra = f", loop eval fid_domain {m['fid_domain']:.4f}" if "fid_domain" in m else ""
        log(f"  {label} {step}/{total}: " + ", ".join(f"{k} {m[k]:.4g}" for k in keys)
            + f", {m.get('steps_per_s', float('nan')):.2f} steps/s, eta {eta:.1f} min{extra}")

    return on_report


# ------------------------------------------------------------------------------------------------
# 1. the two sources, pretrained in the one loop and cached
# ------------------------------------------------------------------------------------------------
def pretrain_settings(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    return {"pretrainer": PRETRAINERS[kind], "preset": args.preset, "resolution": args.resolution,
            "steps": args.pretrain_steps, "batch_size": args.pretrain_batch, "lr": args.pretrain_lr,
            "data": "synthetic:source", "count": args.pretrain_count, "seed": 0, "loop": "run_loop/StoreSession"}


def source_folder(args: argparse.Namespace, kind: str) -> Path:
    s = pretrain_settings(args, kind)
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
    return Path(args.cache_dir) / f"{s['pretrainer']}-{s['resolution']}px-{s['preset']}-{s['steps']}steps-{key}"


def pretrain(args: argparse.Namespace, kind: str, storage: str, device: torch.device) -> dict[str, Any]:
    """The source of ``kind`` (ddpm | dual): from the cache, else pretrained with ``run_loop``.
    Returns its info; the diffusers folder is ``<folder>/model``."""
    folder = source_folder(args, kind)
    meta_file = folder / "meta.json"
    if (folder / "model" / "unet" / "config.json").is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        log(f"{PRETRAINERS[kind]}: reusing the cached source {folder} (pretrained {meta['date']}, "
            f"{meta['time']['wall_s'] / 60:.1f} min wall then)")
        return {**meta, "folder": str(folder), "cached": True}
    s = pretrain_settings(args, kind)
    cls = pretrainer("ddpm", s["pretrainer"])
    cfg = cls.Config(preset=args.preset, batch_size=args.pretrain_batch, lr=args.pretrain_lr)
    images = load_images("synthetic:source", args.resolution, count=args.pretrain_count, seed=0)
    every = min(250, max(1, args.pretrain_steps // 10))
    run = RunSettings(steps=args.pretrain_steps, report_every=every, eval_every=0, seed=0,
                      cpus_per_worker=float(args.threads), use_gpu=device.type == "cuda")
    job = Job(kind="pretrain", name=f"pretrain-{folder.name}", method=cls.key, family="ddpm",
              resolution=args.resolution, method_config=cfg.model_dump(mode="json"), run=run, storage=storage,
              data=publish_array(images, storage), checkpoint_at=[])
    log(f"{cls.key}: pretraining {args.pretrain_steps} steps, batch {args.pretrain_batch}, lr {args.pretrain_lr}, "
        f"preset {args.preset}, {args.resolution}² ({len(images)} images of synthetic:source)")
    clock = Clock()
    result = run_loop(job, StoreSession(storage, job.name, device=device,
                                        on_report=progress(cls.key, args.pretrain_steps)))
    took = clock.seconds()
    last = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    meta = {"settings": s, "method_config": cfg.model_dump(mode="json"), "time": took,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "final_report": last, "reports": [{k: v for k, v in r.items() if isinstance(v, (int, float))}
                                              for r in result.reports]}
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(fetch(result.export), tmp / "model")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():  # another run finished the same settings meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        meta = json.loads(meta_file.read_text())
    else:
        tmp.replace(folder)
    log(f"{cls.key}: done in {took['wall_s'] / 60:.1f} min (CPU {took['cpu_s'] / 60:.1f} min); cached in {folder}")
    return {**meta, "folder": str(folder), "cached": False}


# ------------------------------------------------------------------------------------------------
# 2. adaptation, through resolve / prepare / make_job / run_loop
# ------------------------------------------------------------------------------------------------
def adapt(args: argparse.Namespace, variant: str, seed: int, src_folder: Path, storage: str,
          encoder_ref, device: torch.device, eval_steps: int) -> tuple[LoopResult, Any, dict[str, Any]]:
    method, _ = ADAPTED[variant]
    overrides: dict[str, Any] = {
        "task.resolution": args.resolution, "task.target.shots": args.shots, "task.source.model": str(src_folder),
        "batch_size": args.batch_size, "lr": args.lr,
        "run.steps": args.steps, "run.report_every": min(100, args.steps), "run.eval_every": 0,
        "run.eval_samples": args.samples, "run.final_eval_samples": args.samples,
        "run.final_eval_sample_steps": eval_steps, "run.seed": seed,
        "run.metrics": ["domain"], "run.cpus_per_worker": float(args.threads), "run.use_gpu": device.type == "cuda",
    }
    if method == "dual_output":
        overrides["widen_r_bias"] = args.widen_r_bias
    cfg = resolve(method, f"synthetic:{args.domain}", overrides=overrides)
    inputs = prepare(cfg, storage=storage, source=ResolvedSource(publish(src_folder, storage), None, src_folder),
                     encoder=encoder_ref)
    job = make_job(cfg, inputs, name=f"{variant}-seed{seed}", storage=storage, checkpoint_at=[])
    clock = Clock()
    result = run_loop(job, StoreSession(storage, job.name, device=device,
                                        on_report=progress(f"{variant} seed {seed}", args.steps)))
    return result, cfg, {**clock.seconds(), "job": job}


def sampler_for(method_key: str, method_config: dict[str, Any], folder: Path, device: torch.device, seed: int = 0):
    """A method object around a saved model, used only for its ``sample`` (the method's own sampler)."""
    cls = get_method(method_key)
    return cls(cls.Config.model_validate(method_config), load_source(str(folder), device), device, seed=seed)


# ------------------------------------------------------------------------------------------------
# 3. evaluation and diagnostics
# ------------------------------------------------------------------------------------------------
class Evaluation:
    """The fixed sets and networks every variant is measured with."""

    def __init__(self, args: argparse.Namespace, encoder: DomainEncoder, classifier: DomainClassifier | None,
                 shots: torch.Tensor):
        res, n = args.resolution, args.samples
        nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        self.args, self.encoder, self.classifier, self.domain = args, encoder, classifier, args.domain
        self.target_ref = nchw(render(args.domain, 1000, res, seed=1))
        self.source_ref = nchw(render("source", 1000, res, seed=1))
        self.shots = shots
        self.source_shots = nchw(render("source", args.shots, res, seed=0))  # only to satisfy evaluate()
        self.real_target = nchw(render(args.domain, n, res, seed=2))
        self.real_source = nchw(render("source", n, res, seed=2))
        self.cache = ReferenceStats()
        self.kid_subset = min(1000, n, len(self.target_ref))

    def target(self, samples: torch.Tensor, seed: int) -> dict[str, float]:
        m = evaluate(samples, self.target_ref, self.shots, [self.encoder], seed=seed,
                     kid_subset_size=self.kid_subset, cache=self.cache)
        if self.classifier is not None:
            m["target_rate_domain"] = self.classifier.rate(samples, self.domain)
        return m

    def source(self, samples: torch.Tensor, seed: int) -> dict[str, float]:
        return evaluate(samples, self.source_ref, self.source_shots, [self.encoder], seed=seed,
                        kid_subset_size=min(1000, len(samples), len(self.source_ref)), cache=self.cache)


def sample_and_evaluate(ev: Evaluation, sampler, seeds: list[int], both_domains: bool, grids: dict[int, torch.Tensor],
                        grid_seed: int) -> tuple[dict[str, dict[str, list]], dict[str, float]]:
    """{"target"|"source": {steps: [metrics per seed]}} at every sampling step count."""
    args = ev.args
    out: dict[str, dict[str, list]] = {"target": {}, "source": {}} if both_domains else {"target": {}}
    t = {"sample_s": 0.0, "eval_s": 0.0}
    for seed in seeds:
        for steps in args.sample_steps:
            t0 = time.perf_counter()
            samples = sampler.sample(args.samples, steps=steps, seed=seed + SAMPLE_SEED_OFFSET)
            t1 = time.perf_counter()
            m = ev.target(samples, seed)
            m.update(seed=seed, sample_s=t1 - t0)
            out["target"].setdefault(str(steps), []).append(m)
            if both_domains:
                out["source"].setdefault(str(steps), []).append({**ev.source(samples, seed), "seed": seed})
            t["sample_s"] += t1 - t0
            t["eval_s"] += time.perf_counter() - t1
            if seed == grid_seed and steps in args.grid_steps:
                grids[steps] = samples[: args.grid].clone()
    return out, t


@torch.no_grad()
def x0_profile(unet: torch.nn.Module, scheduler, images: torch.Tensor, device: torch.device,
               seed: int = 0) -> list[dict[str, float]]:
    """Per timestep: mean mixing weight s̄ (dual-output nets) and the MSE against the clean image
    of each x̂0 estimate — the direct head, the ε-derived one, the mix — unclipped (``mse_*``) and
    clipped to [−1, 1] (``cmse_*``; the sampler uses the clipped mix)."""
    unet = unet.eval()
    x0 = (images.float() / 127.5 - 1).to(device)
    abar_all = scheduler.alphas_cumprod.to(device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    mse = lambda a: float(((a - x0) ** 2).mean())  # noqa: E731
    rows = []
    for t in PROFILE_T:
        eps = torch.randn(x0.shape, generator=gen).to(device)
        abar = abar_all[t]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        out = unet(x_t, torch.full((len(x0),), t, device=device, dtype=torch.long)).sample.float()
        est: dict[str, torch.Tensor] = {}
        row: dict[str, float] = {"t": t}
        if out.shape[1] == 7:
            x0_direct, eps_hat, r = split_output(out)
            s = torch.sigmoid(r)
            est["x0_eps"] = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
            est["x0_direct"] = x0_direct
            est["x0_mix"] = s * x0_direct + (1 - s) * est["x0_eps"]
            row.update(s_mean=float(s.mean()), r_mean=float(r.mean()))
        else:
            est["x0_eps"] = (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        for k, v in est.items():
            row[f"mse_{k}"] = mse(v)
            row[f"cmse_{k}"] = mse(v.clamp(-1, 1))
        rows.append(row)
    return rows


def save_png(images: torch.Tensor, path: Path, ncols: int = 8, scale: int = 2) -> None:
    path.write_bytes(png_bytes(image_grid(images.numpy(), ncols=ncols, pad=2), scale=scale))


# ------------------------------------------------------------------------------------------------
# statistics and verdict
# ------------------------------------------------------------------------------------------------
def compare(a: dict[str, list[dict]], b: dict[str, list[dict]], steps: list[int], key: str = "fid_domain"
            ) -> list[dict[str, Any]]:
    """Per step count: the paired per-seed Δ = a − b of ``key``, its mean, std and outcome for a."""
    rows = []
    for n in steps:
        by_seed_b = {r["seed"]: r[key] for r in b[str(n)]}
        pairs = [(r[key], by_seed_b[r["seed"]]) for r in a[str(n)] if r["seed"] in by_seed_b]
        delta = [x - y for x, y in pairs]
        rel = [(x - y) / y for x, y in pairs if y]
        d_mean, d_std = mean_std(delta)
        one = len(delta) < 2
        beyond = one or abs(d_mean) > d_std
        outcome = ("wins" if d_mean < 0 else "loses") if beyond and d_mean != 0 else "ties"
        rows.append({"steps": n, "delta_mean": d_mean, "delta_std": d_std, "rel_mean": mean_std(rel)[0],
                     "a_mean": mean_std([x for x, _ in pairs])[0], "b_mean": mean_std([y for _, y in pairs])[0],
                     "n_seeds": len(delta), "outcome": outcome, "one_seed": one})
    return rows


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(rows: list[dict[str, Any]], who: str) -> str:
    """One clause: where ``who`` wins, ties and loses, with Δ fid_domain mean ± std (relative)."""
    parts = []
    for outcome in ("wins", "ties", "loses"):
        sel = [r for r in rows if r["outcome"] == outcome]
        if not sel:
            continue
        steps = _join([str(r["steps"]) for r in sel]) + (" step" if [r["steps"] for r in sel] == [1] else " steps")
        nums = _join([f"{r['delta_mean']:+.3g}" + (f" ± {r['delta_std']:.2g}" if not r["one_seed"] else "")
                      + f" ({r['rel_mean']:+.0%})" for r in sel])
        parts.append(f"{outcome} at {steps} (Δ fid_domain {nums})")
    return f"{who} " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def claim(rows: list[dict[str, Any]]) -> str:
    few = sorted(rows, key=lambda r: r["steps"])[:2]
    won = [r for r in few if r["outcome"] == "wins"]
    steps = " and ".join(str(r["steps"]) for r in few)
    if len(won) == len(few):
        return f"supported (wins at {steps} steps)"
    if won:
        return f"partly supported (wins at {won[0]['steps']} of {steps} steps)"
    return f"not supported (no win at {steps} steps)"


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    steps = result["settings"]["sample_steps"]
    ev = result["evaluations"]
    src = compare(ev["src_dual"]["source"], ev["src_ddpm"]["source"], steps)
    tgt = compare(ev["dual_output"]["target"], ev["ddpm_finetune"]["target"], steps)
    wid = compare(ev["dual_output_widened"]["target"], ev["ddpm_finetune"]["target"], steps)
    pre = compare(ev["src_dual"]["target"], ev["src_ddpm"]["target"], steps)
    seeds = result["settings"]["seeds"]
    domain = result["settings"]["domain"]
    one = len(seeds) < 2
    summary = (
        f"On the source domain (fid_domain against 1,000 rendered source images; each source is one pretraining "
        f"run, so the spread is sampling noise only), " + describe(src, "the dual-output source")
        + " relative to the ordinary source trained with the same budget. "
        f"After adaptation to {domain} ({result['settings']['shots']} shots, {result['settings']['steps']} steps; "
        "the spread covers adaptation and sampling seeds), " + describe(tgt, "dual_output on the dual-output source")
        + " relative to ddpm_finetune on the ordinary source, and "
        + describe(wid, "dual_output on the widened ordinary source") + " relative to ddpm_finetune. "
        f"The paper's claim (better quality at few sampling steps) is {claim(src)} on the source domain and "
        f"{claim(tgt)} after adaptation"
        + (" — one seed only: signs without a spread estimate." if one else "."))
    return {"source_domain": src, "target_after_adaptation": tgt, "widened_vs_finetune": wid,
            "sources_on_target": pre, "claim_source": claim(src), "claim_target": claim(tgt), "summary": summary}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="sketch", choices=TARGET_DOMAINS, help="built-in target domain")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--preset", default="tiny", help="UNet preset of both sources (tiny | small | base)")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="both sources (the project's tiny recipe)")
    p.add_argument("--pretrain-count", type=int, default=4096, help="synthetic:source images (draw 0)")
    p.add_argument("--steps", type=int, default=300, help="adaptation steps")
    p.add_argument("--batch-size", type=int, default=8, help="adaptation batch")
    p.add_argument("--lr", type=float, default=1e-4, help="adaptation lr")
    p.add_argument("--widen-r-bias", type=float, default=-30.0, help="dual_output on the ordinary source: initial r")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=256, help="samples per evaluation")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[5, 10, 25, 50, 100])
    p.add_argument("--grid-steps", type=int, nargs="+", default=[5, 50], help="step counts with a sample grid")
    p.add_argument("--grid", type=int, default=16, help="images per grid (8 a row)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / f"{NAME}_cache",
                   help="where the pretrained sources (and a trained encoder, off 32²) are cached")
    p.add_argument("--report-only", action="store_true", help=f"re-render <out>/{NAME}.md from <out>/{NAME}.json")
    args = p.parse_args(argv)
    args.seeds = sorted(set(args.seeds))
    args.sample_steps = sorted(set(args.sample_steps))
    args.grid_steps = sorted(set(args.grid_steps) & set(args.sample_steps))
    if args.samples < 6:
        p.error("--samples must be >= 6 (density/coverage use k = 5 neighbours)")
    return args


def domain_encoder(args: argparse.Namespace, device: torch.device) -> tuple[Path, str]:
    """The shipped encoder at its resolution, else one trained here on rendered source images."""
    name = ENCODERS.get(args.resolution)
    if name is not None and (BUILTIN_DIR / name).is_file():
        return BUILTIN_DIR / name, f"the shipped `trainers/builtin/{name}`"
    path = Path(args.cache_dir) / f"encoder-synthetic-source-{args.resolution}px-300steps.pt"
    note = (f"no shipped encoder at {args.resolution}²: trained here with `train_domain_encoder` (SimCLR, 300 "
            f"steps) on 2,048 rendered `synthetic:source` images, cached as `{path}`")
    if not path.is_file():
        log(f"training a domain encoder at {args.resolution}² (300 SimCLR steps)")
        images = render("source", 2048, args.resolution, seed=0)
        enc = train_domain_encoder(images, steps=300, batch_size=128, device=device, seed=0,
                                   resolution=args.resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.pt")
        enc.save(tmp)
        tmp.replace(path)
    return path, note


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_only:
        result = read_result(args.out / f"{NAME}.json")
        report(result, args.out)
        return result
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    total = Clock()
    started = _dt.datetime.now().astimezone()
    load_start = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, dict[str, float]] = {}
    log(f"device {device}, {args.threads} threads, load average {load_start[0]:.1f}; cache {args.cache_dir}")

    # The run storage (artifacts, checkpoints) and this node's artifact/data cache: temporary.
    work = tempfile.TemporaryDirectory(prefix=f"{NAME}-")
    saved_cache = os.environ.get("ORCHESTRATE_CACHE")
    os.environ["ORCHESTRATE_CACHE"] = str(Path(work.name) / "node-cache")
    storage = str(Path(work.name) / "storage")
    try:
        # 1. sources ---------------------------------------------------------------------------
        sources = {}
        for kind in ("ddpm", "dual"):
            sources[kind] = pretrain(args, kind, storage, device)
            if not sources[kind]["cached"]:
                phases[f"pretrain {PRETRAINERS[kind]}"] = sources[kind]["time"]
        src_model = {k: Path(v["folder"]) / "model" for k, v in sources.items()}

        # metric networks and data ---------------------------------------------------------------
        enc_path, enc_note = domain_encoder(args, device)
        encoder = DomainEncoder.load(enc_path, device)
        encoder_ref = publish(enc_path, storage)
        clf_path = builtin_classifier(args.resolution)
        classifier = DomainClassifier.load(clf_path, device) if clf_path is not None else None
        shots_np = load_images(f"synthetic:{args.domain}", args.resolution, count=args.shots, seed=0)
        shots = torch.from_numpy(np.ascontiguousarray(shots_np)).permute(0, 3, 1, 2).contiguous()
        ev = Evaluation(args, encoder, classifier, shots)
        grid_seed = args.seeds[0]
        grids: dict[str, dict[int, torch.Tensor]] = {}
        evaluations: dict[str, Any] = {}
        timings: dict[str, Any] = {}
        checks: dict[str, Any] = {}
        profiles: dict[str, Any] = {}

        clock = Clock()
        evaluations["real"] = {"target": ev.target(ev.real_target, args.seeds[0]),
                               "source": ev.source(ev.real_source, args.seeds[0])}

        # 2. sources before adaptation, on both domains ---------------------------------------------
        default_cfg = {m: get_method(m).Config().model_dump(mode="json") for m in ("ddpm_finetune", "dual_output")}
        default_cfg["dual_output"]["widen_r_bias"] = args.widen_r_bias
        src_samplers = {"src_ddpm": sampler_for("ddpm_finetune", default_cfg["ddpm_finetune"], src_model["ddpm"], device),
                        "src_dual": sampler_for("dual_output", default_cfg["dual_output"], src_model["dual"], device)}
        for variant, sampler in src_samplers.items():
            log(f"evaluating {LABELS[variant]}: {args.samples} samples at {args.sample_steps} steps, seeds {args.seeds}")
            grids[variant] = {}
            evaluations[variant], timings[variant] = sample_and_evaluate(ev, sampler, args.seeds, True,
                                                                         grids[variant], grid_seed)
            profiles[variant] = x0_profile(sampler.sampling_unet, sampler.scheduler, ev.source_ref[:64], device)
            log("  " + ", ".join(f"{n} steps: src fid {fmt([r['fid_domain'] for r in evaluations[variant]['source'][str(n)]])}"
                                 for n in args.sample_steps))
        # widening is exact at the start: dual_sample of the widened source = ddim_sample of the source
        widened = sampler_for("dual_output", default_cfg["dual_output"], src_model["ddpm"], device)
        n_chk, st_chk = min(16, args.samples), args.sample_steps[0]
        a = widened.sample(n_chk, steps=st_chk, seed=SAMPLE_SEED_OFFSET).int()
        b = src_samplers["src_ddpm"].sample(n_chk, steps=st_chk, seed=SAMPLE_SEED_OFFSET).int()
        checks["widening"] = {"samples": n_chk, "steps": st_chk, "max_abs_uint8_diff": int((a - b).abs().max()),
                              "equal_fraction": float((a == b).float().mean()),
                              "r_bias": float(widened.unet.conv_out.bias[6].detach())}
        log(f"widening check: {checks['widening']}")
        del widened, src_samplers
        phases["sources: sample + evaluate"] = clock.seconds()

        # 3. adaptation ---------------------------------------------------------------------------------
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in ADAPTED}
        train_time = {"wall_s": 0.0, "cpu_s": 0.0}
        eval_clock_total = {"wall_s": 0.0, "cpu_s": 0.0}
        for seed in args.seeds:
            for variant, (method, src_kind) in ADAPTED.items():
                log(f"{LABELS[variant]}, seed {seed}: {args.steps} steps, batch {args.batch_size}, lr {args.lr}")
                result, cfg, took = adapt(args, variant, seed, src_model[src_kind], storage, encoder_ref, device,
                                          args.sample_steps[0])
                job = took.pop("job")
                if seed == args.seeds[0] and variant == "ddpm_finetune":  # the loop's reference = render(seed=1)
                    checks["reference_is_render_seed1"] = bool(np.array_equal(
                        load_array(job.reference), ev.target_ref.permute(0, 2, 3, 1).numpy()))
                for k in train_time:
                    train_time[k] += took[k]
                export = fetch(result.export)
                sampler = sampler_for(method, cfg.method_config, export, device, seed=seed)
                eclock = Clock()
                grids.setdefault(variant, {})
                out, t = sample_and_evaluate(ev, sampler, [seed], False, grids[variant] if seed == grid_seed else {},
                                             grid_seed)
                for k, v in eclock.seconds().items():
                    eval_clock_total[k] += v
                for n, rows in out["target"].items():
                    evaluations.setdefault(variant, {"target": {}})["target"].setdefault(n, []).extend(rows)
                mine = out["target"][str(args.sample_steps[0])][0]
                loop_m = result.metrics
                run_info = {
                    "seed": seed, "time": took, "sample_s": t["sample_s"], "eval_s": t["eval_s"],
                    "loop_final": {k: v for k, v in loop_m.items() if isinstance(v, float)},
                    "consistency": {k: [loop_m.get(k), mine.get(k)] for k in ("fid_domain", "kid_domain",
                                                                                "target_rate_domain")},
                }
                unet = sampler.sampling_unet
                if unet.config.out_channels == 7:
                    run_info["r_bias_after"] = float(unet.conv_out.bias[6].detach())
                    run_info["r_weight_absmax_after"] = float(unet.conv_out.weight[6].detach().abs().max())
                if seed == grid_seed:
                    profiles[variant] = x0_profile(unet, sampler.scheduler, ev.target_ref[:64], device)
                runs[variant].append(run_info)
                log(f"  {variant} seed {seed}: " + ", ".join(
                    f"{n}: fid {r[0]['fid_domain']:.4f}" for n, r in out["target"].items())
                    + f"; loop/mine fid@{args.sample_steps[0]} {run_info['consistency']['fid_domain']}")
                del sampler
        phases["adaptation (run_loop: train + its final evaluation + export)"] = train_time
        phases["adapted models: sample + evaluate"] = eval_clock_total

        # 4. output ---------------------------------------------------------------------------------
        save_png(shots, args.out / f"{NAME}_shots.png", ncols=min(args.shots, 10))
        grid_files: dict[str, dict[str, str]] = {}
        for variant, per_steps in grids.items():
            for n, imgs in per_steps.items():
                f = f"{NAME}_{variant}_{n}steps.png"
                save_png(imgs, args.out / f)
                grid_files.setdefault(variant, {})[str(n)] = f
        consistent = all(abs(c[0] - c[1]) <= 1e-6 * max(1.0, abs(c[1]))
                         for runs_v in runs.values() for r in runs_v for c in r["consistency"].values()
                         if c[0] is not None and c[1] is not None)
        checks["loop_eval_equals_reloaded_export_eval"] = consistent
    finally:
        if saved_cache is None:
            os.environ.pop("ORCHESTRATE_CACHE", None)
        else:
            os.environ["ORCHESTRATE_CACHE"] = saved_cache
        work.cleanup()

    took = total.seconds()
    load_end = os.getloadavg()
    cmd = command_line(NAME, argv)
    result = {
        "command": cmd, "date": started.isoformat(timespec="seconds"), "wall_s": took["wall_s"], "cpu_s": took["cpu_s"],
        "machine": {"cpu_count": os.cpu_count(), "processor": processor(),
                    "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "threads": args.threads, "load_average_start": list(load_start), "load_average_end": list(load_end)},
        "settings": settings_of(args, drop=["report_only"]),
        "method_configs": {"ddpm_finetune": resolve_cfg(args, "ddpm_finetune"), "dual_output": resolve_cfg(args, "dual_output")},
        "sources": sources,
        "encoder": {"path": str(enc_path), "note": enc_note},
        "classifier": str(clf_path) if clf_path is not None else None,
        "evaluations": evaluations, "timings": timings, "runs": runs, "profiles": profiles, "checks": checks,
        "phases": phases, "grids": grid_files,
    }
    result["verdict"] = verdict(result)
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    report(result, args.out)
    return result


def resolve_cfg(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The adaptation config as the runs used it (for the record)."""
    over: dict[str, Any] = {"batch_size": args.batch_size, "lr": args.lr}
    if method == "dual_output":
        over["widen_r_bias"] = args.widen_r_bias
    return get_method(method).Config(**over).model_dump(mode="json")


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def metric_rows(result: dict[str, Any], domain: str, variants: list[str], metrics: list[tuple[str, str]]
                ) -> tuple[list[str], list[list[str]]]:
    ev, steps = result["evaluations"], result["settings"]["sample_steps"]
    present = [(k, a) for k, a in metrics if any(k in r for v in variants for n in steps
                                                    for r in ev[v][domain].get(str(n), []))]
    head = ["variant", "steps"] + [f"{k} {a}" for k, a in present]
    rows = []
    for v in variants:
        for n in steps:
            runs = ev[v][domain].get(str(n), [])
            rows.append([LABELS[v], str(n)] + [fmt([r.get(k, float("nan")) for r in runs]) for k, _ in present])
    real = ev["real"][domain]
    rows.append([LABELS["real"], "–"] + [f"{real[k]:.4g}" if k in real else "n/a" for k, _ in present])
    return head, rows


def comparison_rows(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['delta_mean']:+.4g}" + (f" ± {r['delta_std']:.2g}" if not r["one_seed"] else "")
            + f" ({r['rel_mean']:+.0%}) **{r['outcome']}**" for r in rows]


def report(result: dict[str, Any], out: Path) -> None:
    """Print the tables and the verdict; write ``<out>/dual_output_vs_ddpm.md`` (from the JSON's
    content alone, so that ``--report-only`` re-renders it; the verdict is recomputed)."""
    st, m = result["settings"], result["machine"]
    vd = verdict(result)
    steps = st["sample_steps"]
    seeds = st["seeds"]
    started = _dt.datetime.fromisoformat(result["date"])
    src_head, src_rows = metric_rows(result, "source", ["src_ddpm", "src_dual"], SOURCE_METRICS)
    tgt_variants = ["src_ddpm", "src_dual", "ddpm_finetune", "dual_output", "dual_output_widened"]
    tgt_head, tgt_rows = metric_rows(result, "target", tgt_variants, TARGET_METRICS)
    cmp_head = ["steps", "source domain: dual src − ordinary src", "target: dual_output − ddpm_finetune",
                "target: widened − ddpm_finetune", "target, before adaptation: dual src − ordinary src"]
    cmp_rows = [[str(n)] + list(cells) for n, cells in zip(steps, zip(
        comparison_rows(vd["source_domain"]), comparison_rows(vd["target_after_adaptation"]),
        comparison_rows(vd["widened_vs_finetune"]), comparison_rows(vd["sources_on_target"])))]

    print()
    print("Source domain (fid vs rendered source images):")
    print(text_table(src_head, src_rows))
    print(f"\nTarget domain ({st['domain']}), 1,000 reference images:")
    print(text_table(tgt_head, tgt_rows))
    print("\nΔ fid_domain (mean ± std over seeds, relative):")
    print(text_table(cmp_head, cmp_rows))
    print("\n" + vd["summary"])
    print(f"\nwall time {result['wall_s'] / 60:.1f} min (CPU {result['cpu_s'] / 60:.1f} min)")

    # sources: pretraining
    src_lines = []
    for kind, info in result["sources"].items():
        fr = info.get("final_report", {})
        eps_loss = fr.get("loss_simple", fr.get("loss_eps", float("nan")))
        extra = (f"loss_x0 {fr['loss_x0']:.4g}, loss_mu {fr['loss_mu']:.3g}, mix_mean {fr['mix_mean']:.3g}"
                 if "loss_x0" in fr else "–")
        src_lines.append([PRETRAINERS[kind], "cached" if info["cached"] else "trained by this run",
                          f"{info['time']['wall_s'] / 60:.1f} / {info['time']['cpu_s'] / 60:.1f}",
                          f"{eps_loss:.4g}", f"{fr.get('loss', float('nan')):.4g}", extra,
                          f"`{Path(info['folder']).name}`"])
    src_table = md_table(["pretrainer", "", "wall / CPU min", "ε loss (last report)", "total loss", "dual terms",
                          "cache folder"], src_lines)

    # adaptation runs
    run_lines = []
    for v, runs in result["runs"].items():
        eps = [r["loop_final"].get("loss_simple", r["loop_final"].get("loss_eps", float("nan"))) for r in runs]
        tot = [r["loop_final"].get("loss", float("nan")) for r in runs]
        mix = [r["loop_final"].get("mix_mean", float("nan")) for r in runs]
        rb = [r.get("r_bias_after", float("nan")) for r in runs]
        run_lines.append([LABELS[v], fmt(eps, 3), fmt(tot, 3), fmt(mix, 3), fmt(rb, 6),
                          fmt([r["time"]["wall_s"] for r in runs], 3), fmt([r["time"]["cpu_s"] for r in runs], 3)])
    run_table = md_table(["variant", "ε loss (last 100 steps)", "total loss", "mix_mean s̄ (training)",
                          "r bias of conv_out after", "run_loop wall s", "run_loop CPU s"], run_lines)

    # x̂0 profile: rows = t, one column per model
    profiles = result["profiles"]
    pref = "cmse_" if any("cmse_x0_eps" in r for rows in profiles.values() for r in rows) else "mse_"

    def cell(r: dict[str, float]) -> str:
        if "s_mean" not in r:
            return f"ε {r[pref + 'x0_eps']:.3g}"
        return (f"s̄ {r['s_mean']:.2g} · head {r[pref + 'x0_direct']:.3g} · ε {r[pref + 'x0_eps']:.3g} · "
                f"mix {r[pref + 'x0_mix']:.3g}")

    ts = [r["t"] for r in next(iter(profiles.values()))] if profiles else []
    prof_table = md_table(["t"] + [LABELS[v] for v in profiles],
                          [[str(t)] + [cell(rows[i]) for rows in profiles.values()] for i, t in enumerate(ts)])

    phase_lines = phase_rows(result["phases"])
    chk = result["checks"]
    w = chk.get("widening", {})
    grids = result.get("grids", {})
    grid_rows = []
    for v in ["src_ddpm", "src_dual", "ddpm_finetune", "dual_output", "dual_output_widened"]:
        cells = [f"![{v} {n}]({grids[v][str(n)]})" if str(n) in grids.get(v, {}) else "–" for n in st["grid_steps"]]
        grid_rows.append([LABELS[v]] + cells)
    grid_table = md_table(["variant"] + [f"{n} steps" for n in st["grid_steps"]], grid_rows)
    la0, la1 = m["load_average_start"], m["load_average_end"]
    device = m["device"] + (f" ({m['device_name']})" if m.get("device_name") else "")

    md = f"""# Dual-output diffusion vs an ordinary DDPM, at few and many sampling steps

`{result['command']}` — {started:%Y-%m-%d %H:%M %Z}, wall time **{result['wall_s'] / 60:.1f} min**
(CPU {result['cpu_s'] / 60:.1f} min over all threads).

Machine: {m['cpu_count']} CPU cores ({m['processor']}), Python {m['python']}, torch {m['torch']}, device {device},
{m['threads']} torch threads; load average {la0[0]:.1f} / {la0[1]:.1f} / {la0[2]:.1f} at the start and
{la1[0]:.1f} / {la1[1]:.1f} / {la1[2]:.1f} at the end (other jobs shared the cores: wall times are noisy,
CPU times less so).

**Method**: `dual_output` (Benny & Wolf, CVPR 2022, `trainers/diffusion/dual_output.py`): the UNet predicts
x̂0, ε̂ and a mixing map r; sampling uses x̂0_mix = s·x̂0 + (1 − s)·x̂0(ε̂), s = sigmoid(r). Claim tested: better
quality at few sampling steps.

**Sources (equal budgets)**: `ddpm_pretrain` and `dual_output_pretrain`, each trained by the one loop
(`run_loop`, `Job(kind="pretrain")`): UNet preset `{st['preset']}`, {st['resolution']}², {st['pretrain_steps']} steps,
batch {st['pretrain_batch']}, lr {st['pretrain_lr']}, EMA 0.999, grad-norm clip 1, {st['pretrain_count']} images of
`synthetic:source` (draw 0), seed 0 (same initial trunk, batches, timesteps and noise).

**Adaptation**: built-in task `synthetic:{st['domain']}`, its {st['shots']} shots (draw 0), through
`resolve` → `prepare` → `make_job` → `run_loop`; {st['steps']} steps, batch {st['batch_size']}, lr {st['lr']}, EMA
0.999, default configs otherwise; seeds {', '.join(map(str, seeds))}. Three variants: `ddpm_finetune` on the
ordinary source, `dual_output` on the dual-output source, and `dual_output` on the ordinary source (widened
at build time with r = {st['widen_r_bias']:g}: exactly the source at the start, see below).

**Evaluation**: {st['samples']} samples (EMA weights) per model, seed and step count
({', '.join(map(str, steps))}), DDIM η = 0 with "leading" respacing and x̂0 clipping (`ddim_sample` for the
ε models, `dual_sample` with the mixed x̂0 for dual-output ones), sampling noise seed = seed + 12345 (the
same noise for every variant of a seed). Metrics from `trainers.metrics.evaluate` in the domain encoder's
feature space ({result['encoder']['note']}); target reference: 1,000 rendered `{st['domain']}` images
(draw 1, the task's reference set); source reference: 1,000 rendered `source` images (draw 1; the
sources trained on draw 0). `target_rate_domain`: share of samples the shipped domain classifier
{'(`' + Path(result['classifier']).name + '`)' if result.get('classifier') else '(none at this resolution)'} calls
`{st['domain']}`. "real images" rows: {st['samples']} rendered images of another draw (2) — the floor of
FID at this sample count. Sources are evaluated with every seed's sampling noise (their spread is sampling
noise only); adapted models with their own seed.

## Source domain — the paper's setting (mean ± std over sampling seeds)

{md_table(src_head, src_rows)}

## Target domain `{st['domain']}` (mean ± std over seeds)

{md_table(tgt_head, tgt_rows)}

## Comparisons: Δ fid_domain, paired per seed (negative = dual-output better)

{md_table(cmp_head, cmp_rows)}

Outcome rule (`verdict()`): **wins** iff mean Δ < 0 and |mean Δ| > std Δ over seeds, **loses** iff mean Δ > 0
and |mean Δ| > std Δ, else **ties**{' (one seed: the sign only)' if len(seeds) < 2 else ''}; relative = mean of Δ / ordinary.

## Verdict

**{vd['summary']}**

## Training

Pretraining (the loop's last report, mean over its last {max(1, min(250, st['pretrain_steps'] // 10))} steps; the ε loss is
`loss_simple` for the ordinary source and the ε head's `loss_eps` for the dual-output one; the dual total is
(L_x0 + L_ε + L_μ)/3):

{src_table}

Adaptation (the loop's last report; mean ± std over seeds):

{run_table}

## Diagnostics

Widening check: the widened, untrained ordinary source sampled by `dual_sample` vs the source by `ddim_sample`
({w.get('samples')} samples, {w.get('steps')} steps, same noise): max |Δ| = {w.get('max_abs_uint8_diff')} (uint8),
{w.get('equal_fraction', float('nan')):.2%} of the values equal; r bias {w.get('r_bias')}. The loop's own final evaluation
(at {steps[0]} steps) equals this script's evaluation of the reloaded export: {chk.get('loop_eval_equals_reloaded_export_eval')};
the loop's reference set is `render({st['domain']}, 1000, seed=1)`: {chk.get('reference_is_render_seed1')}.

x̂0 estimates per timestep t: MSE against the clean image ([−1, 1] pixel units{', each estimate clipped to [−1, 1] as the sampler clips the mix' if pref == 'cmse_' else ', unclipped'}) of
the direct x̂0 head, the ε-derived x̂0(ε̂) and the mix, and the mean mixing weight s̄ (s = 1 selects the head),
on 64 held-out images (source-domain images for the sources, target images for the adapted models of seed
{seeds[0]}):

{prof_table}

## Time

| phase | wall min | CPU min |
|---|---|---|
{phase_lines}
| **total** | **{result['wall_s'] / 60:.1f}** | **{result['cpu_s'] / 60:.1f}** |

## Samples (seed {seeds[0]}, first {st['grid']})

Shots: ![shots]({NAME}_shots.png)

{grid_table}
"""
    (out / f"{NAME}.md").write_text(md)
    log(f"wrote {out / f'{NAME}.md'}")


if __name__ == "__main__":
    main()
