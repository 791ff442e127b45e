"""Methods compared the way a researcher should read them: from sweeps, not from one default config.

For a pair of methods of one family (``--pair diffusion``: ddpm_finetune vs ddpm_pa; ``--pair
gan``: gan_finetune vs dcl), each method gets a small multi-objective sweep over its default
search space (``orchestrate sweep`` machinery: Ray Tune + Optuna NSGA-II, every trial an MLflow
child run) with two objectives — quality ``fid_domain`` (min) and diversity
``intra_dist_domain`` (max, the literature's intra-cluster diversity in the domain encoder's
space) — on a built-in synthetic task with the shipped source. Then:

* each method's Pareto front, both on one plot (``pareto_<pair>.png``);
* a table of the best diversity each method reaches at matched quality: for FID levels spread
  over the range both methods reach, the highest intra_dist_domain among each method's finished
  trials with fid_domain at or below the level, with that trial's coverage_domain and
  target_rate_domain (so that diversity bought with off-domain samples shows);
* a verdict computed from that table (which method has more diversity at how many matched
  levels, and by how much);
* the final sample grid of each method's trial at the middle matched level.

Written to ``benchmarks/results/pareto_<pair>.md`` and ``.json`` with the machine, its load and
the wall time. Quality: on the CPU the sweeps are small (``--trials``, ``--steps``): a front from
eight trials is a coarse one; it is what this machine affords, and the script says so.

    python -m benchmarks.pareto --pair diffusion [--trials 8] [--steps 300] [--domain sketch]
    python -m benchmarks.pareto --pair gan --report-only        # re-render from the JSON
    python -m benchmarks.pareto --pair diffusion --task my_task.yaml --trials 2 --steps 20 \
        --samples 32 --out /tmp/pareto-check                     # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, SAMPLE_SEED_OFFSET, processor, read_result

PAIRS = {"diffusion": ("ddpm_finetune", "ddpm_pa"), "gan": ("gan_finetune", "dcl")}
OBJECTIVES = (("fid_domain", "min"), ("intra_dist_domain", "max"))
EXTRA = ("coverage_domain", "density_domain", "target_rate_domain", "kid_domain")


def run_pair(args) -> dict:
    import torch

    from orchestrator.records import tracking
    from orchestrator.core.config import resolve
    from orchestrator.runtime.raycluster import init_ray, shutdown
    from orchestrator.search.space import build_space
    from orchestrator.search.space import pareto_front
    from orchestrator.search.sweep import SweepSettings, run_sweep

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    uri = "sqlite:///mlflow.db"
    out: dict = {"methods": {}, "settings": vars(args)}
    started = init_ray(num_cpus=os.cpu_count())
    t0 = time.time()
    try:
        for method in PAIRS[args.pair]:
            # One report, evaluated, at the end: the fronts are read off the final evaluation (FIFO, no
            # early stopping), so periodic evaluations would only cost sampling time.
            overrides = {"run.steps": args.steps, "run.report_every": args.steps,
                         "run.eval_samples": args.samples, "run.final_eval_samples": args.samples,
                         "run.sample_every": args.steps}
            if args.sample_steps:
                overrides["run.eval_sample_steps"] = args.sample_steps
            cfg = resolve(method, task_file=args.task or f"synthetic:{args.domain}", overrides=overrides)
            space = build_space(cfg)
            settings = SweepSettings(num_samples=args.trials, max_concurrent=args.max_concurrent,
                                     metrics=[m for m, _ in OBJECTIVES], modes=[d for _, d in OBJECTIVES],
                                     scheduler="fifo", seed=args.seed)
            name = f"pareto-{args.pair}-{method}-{time.strftime('%H%M%S')}"
            res = run_sweep(cfg, space, settings, name=name, tracking_uri=uri, storage="runs", verbose=0)
            c = tracking.client(res.tracking_uri)
            kids = c.search_runs([res.experiment_id],
                                 filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
            by_trial = {k.data.tags.get("orchestrate.trial_id"): k for k in kids}
            trials = []
            for t in res.trials:
                run = by_trial.get(t["trial_id"])
                metrics = dict(run.data.metrics) if run is not None else {}
                trials.append({**t, **{k: metrics.get(k) for k in EXTRA},
                               "run_id": run.info.run_id if run is not None else None})
            front = pareto_front(trials, [m for m, _ in OBJECTIVES], [d for _, d in OBJECTIVES])
            out["methods"][method] = {"trials": trials, "front": [f["trial_id"] for f in front],
                                      "space": space, "sweep": name}
            for t in trials:  # keep every trial's final grid (for the report's pictures)
                if t["run_id"] and t["status"] == "FINISHED":
                    try:
                        local = c.download_artifacts(t["run_id"], "samples/final.png", str(work))
                        t["grid"] = str(Path(local).rename(work / f"{method}-{t['trial_id']}.png"))
                    except Exception:  # an artifact that did not make it: no picture for this trial
                        t["grid"] = None
    finally:
        shutdown(started)
    out["meta"] = {"seconds": time.time() - t0, "cpus": os.cpu_count(), "torch": torch.__version__,
                   "machine": processor(), "date": time.strftime("%Y-%m-%d"),
                   "load_after": os.getloadavg()[0]}
    return out


REAL_SEED = 2  # "real target images": another draw of a built-in domain than the shots (0) and reference (1)


def anchors(args) -> dict:
    """Where adaptation starts and where it should end, measured with the trials' own protocol
    (same sample count, sampling steps, seeds, reference set, shots and feature networks): the
    source's samples before adaptation and, for a built-in target, real target images of another
    draw. Without them a front cannot say whether its "diversity" is the target's or leftover
    source content (diversity above the real target's own is not a virtue)."""
    import torch

    from orchestrator.core.config import resolve
    from orchestrator.runs.inputs import check_data, synthetic_domain
    from orchestrator.runtime.loop import load_domain_classifier, metric_extractors
    from orchestrator.runs.sources import domain_encoder_for, locate_source, resolve_source
    from trainers.builtin import builtin_classifier, sample_source
    from trainers.data import render
    from trainers.metrics import ReferenceStats, evaluate

    method = PAIRS[args.pair][0]
    cfg = resolve(method, task_file=args.task or f"synthetic:{args.domain}",
                  overrides={"run.eval_samples": args.samples, "run.final_eval_samples": args.samples})
    task, run = cfg.task, cfg.run
    shots, reference = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() if a is not None else None
                        for a in check_data(task))
    reference = reference if reference is not None else shots
    extractors = metric_extractors(tuple(run.metrics), str(domain_encoder_for(task)), "cpu")
    domain = synthetic_domain(task.target.data)
    classifier = builtin_classifier(task.resolution) if domain is not None else None
    cache = ReferenceStats()

    def score(samples: torch.Tensor) -> dict:
        m = evaluate(samples, reference, shots, extractors, seed=run.seed,
                     kid_subset_size=min(1000, len(samples), len(reference)), cache=cache)
        if classifier is not None:
            m["target_rate_domain"] = load_domain_classifier(str(classifier), "cpu").rate(samples, domain)
        return {k: float(v) for k, v in m.items()}

    out = {}
    if task.source.model == "pretrained":  # the sweeps' own source: found in the cache (pretrained if absent)
        work = Path(args.work).resolve()
        path = resolve_source(task, tracking_uri=f"sqlite:///{work / 'mlflow.db'}", storage=str(work / "runs")).local
    else:
        path, _ = locate_source(task)
    if path is not None:
        steps = run.eval_sample_steps or args.sample_steps or cfg.method_config.get("sample_steps") or 50
        out["source (before adaptation)"] = score(sample_source(task.source.family, path, args.samples,
                                                                seed=run.seed + SAMPLE_SEED_OFFSET, steps=steps))
    if domain is not None:
        real = render(domain, args.samples, task.resolution, seed=REAL_SEED)
        out["real target images (another draw)"] = score(torch.from_numpy(real).permute(0, 3, 1, 2).contiguous())
    return out


def matched_levels(data: dict, n: int = 4) -> list[float]:
    """FID levels spread over the range that both methods reach with finished trials."""
    per = []
    for m in data["methods"].values():
        fids = [t["fid_domain"] for t in m["trials"] if t["status"] == "FINISHED" and t.get("fid_domain") is not None]
        if not fids:
            return []
        per.append(fids)
    lo = max(min(f) for f in per)  # both methods reach this level
    hi = min(float(np.median(f)) for f in per)
    hi = max(hi, lo)
    return sorted(set(np.round(np.linspace(lo, max(hi, lo * 1.5), n), 4).tolist()))


def best_at(trials: list[dict], level: float) -> dict | None:
    ok = [t for t in trials if t["status"] == "FINISHED" and t.get("fid_domain") is not None
          and t["fid_domain"] <= level and t.get("intra_dist_domain") is not None]
    return max(ok, key=lambda t: t["intra_dist_domain"]) if ok else None


def verdict(data: dict, levels: list[float]) -> tuple[str, list[dict]]:
    a, b = list(data["methods"])
    rows, wins = [], {a: 0, b: 0}
    for level in levels:
        ta, tb = best_at(data["methods"][a]["trials"], level), best_at(data["methods"][b]["trials"], level)
        rows.append({"level": level, a: ta, b: tb})
        if ta and tb:
            diff = tb["intra_dist_domain"] - ta["intra_dist_domain"]
            tol = 0.05 * max(abs(ta["intra_dist_domain"]), abs(tb["intra_dist_domain"]))
            if abs(diff) > tol:
                wins[b if diff > 0 else a] += 1
    compared = sum(1 for r in rows if r[a] and r[b])
    if not compared:
        return "no FID level is reached by finished trials of both methods: no comparison", rows
    if wins[b] > wins[a]:
        text = f"**{b}** reaches more diversity than {a} at {wins[b]} of {compared} matched-quality levels"
    elif wins[a] > wins[b]:
        text = f"**{a}** reaches more diversity than {b} at {wins[a]} of {compared} matched-quality levels"
    else:
        text = f"**no clear difference**: {a} {wins[a]}, {b} {wins[b]} of {compared} matched-quality levels"
    return text + " (a difference counts when it exceeds 5% of the larger value)", rows


def above_target(data: dict, rows: list[dict]) -> str:
    """The verdict's caveat: matched-level winners whose diversity exceeds the real target's own
    are more diverse because they kept source content, not because they cover the target better."""
    real = next((m for name, m in data.get("anchors", {}).items() if name.startswith("real")), None)
    if real is None:
        return ""
    cells = {t["trial_id"]: (m, t) for r in rows for m, t in r.items() if m != "level" and t is not None}
    level = real["intra_dist_domain"]
    above = [t for _, t in cells.values() if t["intra_dist_domain"] > level]
    below = [f"{m} {t['trial_id']} ({t['intra_dist_domain']:.4f})" for m, t in cells.values()
             if t["intra_dist_domain"] < level]
    if not above:
        return ""
    text = (f" Read with the anchors: {len(above)} of the {len(cells)} trials in the table are *more* diverse than "
            f"real target images (intra_dist_domain {level:.4f}, fid_domain {real['fid_domain']:.4f}) while their "
            f"FID is {min(t['fid_domain'] for t in above) / max(real['fid_domain'], 1e-12):.0f}× or more the real "
            "images': that diversity is source content not yet adapted away")
    if below:
        text += "; less diverse than the target itself: " + ", ".join(below)
    return text


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, m) in enumerate(data["methods"].items()):
        pts = [t for t in m["trials"] if t.get("fid_domain") is not None and t.get("intra_dist_domain") is not None]
        ax.scatter([t["fid_domain"] for t in pts], [t["intra_dist_domain"] for t in pts], c=f"C{i}", alpha=0.4,
                   label=f"{method} trials")
        front = sorted((t for t in pts if t["trial_id"] in m["front"]), key=lambda t: t["fid_domain"])
        ax.plot([t["fid_domain"] for t in front], [t["intra_dist_domain"] for t in front], "o-", c=f"C{i}",
                label=f"{method} Pareto front")
    for (name, m), marker in zip(data.get("anchors", {}).items(), ("s", "*")):
        ax.scatter([m["fid_domain"]], [m["intra_dist_domain"]], c="k", marker=marker, s=70, label=name)
    ax.set_xlabel("fid_domain (lower is better)")
    ax.set_ylabel("intra_dist_domain (higher is more diverse)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(data: dict, pair: str) -> str:
    levels = matched_levels(data)
    text, rows = verdict(data, levels)
    a, b = list(data["methods"])
    meta, st = data["meta"], data["settings"]
    lines = [f"# {a} vs {b}: Pareto fronts from sweeps", "",
             f"{st['trials']} trials per method (NSGA-II over each method's default space, objectives "
             f"fid_domain ↓ and intra_dist_domain ↑), {st['steps']} steps per trial, {st['samples']} samples per "
             f"evaluation, task {st['task'] or 'synthetic:' + st['domain']}; {meta['cpus']} CPUs, torch "
             f"{meta['torch']}, {meta['date']}; wall time {meta['seconds'] / 60:.0f} min, load average after "
             f"{meta['load_after']:.1f}. A front from this few trials is coarse.", "",
             f"![Pareto fronts](pareto_{pair}.png)", "",
             f"Verdict: {text}.{above_target(data, rows)}", "",
             "| fid_domain ≤ | " + " | ".join(f"{m}: intra_dist (coverage, target rate)" for m in (a, b)) + " |",
             "|---:|---|---|"]

    def cell(t):
        if t is None:
            return "—"
        cov = f"{t['coverage_domain']:.3f}" if t.get("coverage_domain") is not None else "–"
        rate = f"{t['target_rate_domain']:.2f}" if t.get("target_rate_domain") is not None else "–"
        return f"{t['intra_dist_domain']:.4f} ({cov}, {rate}) fid {t['fid_domain']:.3f}"

    for r in rows:
        lines.append(f"| {r['level']:.3f} | {cell(r[a])} | {cell(r[b])} |")
    if data.get("anchors"):
        lines += ["", "Anchors, measured with the trials' protocol (the target's own diversity is the level to "
                  "reach, not to exceed; the source's is what an unadapted model keeps):", "",
                  "| | fid_domain | intra_dist_domain | coverage | target rate |", "|---|---:|---:|---:|---:|"]
        for name, m in data["anchors"].items():
            g = lambda k: f"{m[k]:.4g}" if m.get(k) is not None else "–"  # noqa: E731
            lines.append(f"| {name} | {g('fid_domain')} | {g('intra_dist_domain')} | {g('coverage_domain')} | "
                         f"{g('target_rate_domain')} |")
    lines += ["", "Every trial (FINISHED unless said):", "", "| method | trial | fid_domain | intra_dist_domain | "
              "coverage | target rate | config |", "|---|---|---:|---:|---:|---:|---|"]
    for method, m in data["methods"].items():
        for t in sorted(m["trials"], key=lambda t: (t.get("fid_domain") is None, t.get("fid_domain") or 0)):
            cfg = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(t["config"].items()))
            f = lambda k: f"{t[k]:.4g}" if t.get(k) is not None else "–"  # noqa: E731
            status = "" if t["status"] == "FINISHED" else f" ({t['status']})"
            lines.append(f"| {method}{status} | {t['trial_id']}{' ★' if t['trial_id'] in m['front'] else ''} | "
                         f"{f('fid_domain')} | {f('intra_dist_domain')} | {f('coverage_domain')} | "
                         f"{f('target_rate_domain')} | {cfg} |")
    mid = rows[len(rows) // 2] if rows else None
    if mid:
        lines += ["", f"Final samples of each method's best trial at fid_domain ≤ {mid['level']:.3f}:", ""]
        for method in (a, b):
            t = mid[method]
            if t and t.get("grid"):
                lines.append(f"{method} ({t['trial_id']}): ![{method}](pareto_{pair}_{method}.png)")
    lines.append("\n★ on the method's Pareto front.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=sorted(PAIRS), required=True)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--sample-steps", type=int, default=None, help="sampling steps per evaluation (diffusion)")
    ap.add_argument("--domain", default="sketch")
    ap.add_argument("--task", default=None, help="a task file instead of synthetic:<domain>")
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "orchestrate" / "benchmarks"))
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the report, JSON and pictures go")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"pareto_{args.pair}.json"
    if args.report_only:
        data = read_result(js)
    else:
        data = run_pair(args)
    if "anchors" not in data:  # also for a JSON written before anchors existed
        data["anchors"] = anchors(argparse.Namespace(**data["settings"]))
    js.write_text(json.dumps(data, indent=1, default=str))
    plot(data, out / f"pareto_{args.pair}.png")
    levels = matched_levels(data)
    _, rows = verdict(data, levels)
    if rows:
        mid = rows[len(rows) // 2]
        for method in data["methods"]:
            t = mid[method]
            if t and t.get("grid") and Path(t["grid"]).exists():
                shutil.copy2(t["grid"], out / f"pareto_{args.pair}_{method}.png")
    text = report(data, args.pair)
    (out / f"pareto_{args.pair}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
