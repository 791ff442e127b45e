"""Every method with its defaults from the shipped sources on one task: where the run's time goes
(training, the periodic evaluations, the final one) and whether the samples reach the target.

Each method runs as a user runs it, ``orchestrate train METHOD --task TASK`` in its own process,
recorded in a fresh MLflow store; the table is read back from MLflow: the wall seconds of training
(``time_train_s``), of the periodic evaluations (the step-0 baseline and the schedule's points,
``orchestrator.runtime.job.eval_schedule``) and of the final one (``eval_seconds`` at the last step), the
share of the run's wall time that periodic evaluation took, the truth check's ``target_rate`` (with
the source's floor and the classifier's separation) and ``fid_domain`` at the end. The final grids
are copied beside the JSON::

    python -m benchmarks.method_defaults --task synthetic:sketch --out benchmarks/results/defaults_sketch.json
    python -m benchmarks.glyph_task --out /tmp/glyphs
    python -m benchmarks.method_defaults --task /tmp/glyphs/{family}.yaml --out benchmarks/results/defaults_glyphs.json
    python -m benchmarks.method_defaults --report-only --out benchmarks/results/defaults_sketch.json
    python -m benchmarks.method_defaults --methods ddpm_finetune,ddpm_pa --set run.steps=1000 --seeds 0 1 2 \
        --out benchmarks/results/pa_vs_finetune_1000.json

``{family}`` in ``--task`` is replaced by each method's source family (``ddpm`` or ``gan``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import command_line, cores, md_table, mean_std, processor, read_result, write_markdown

METHODS = ["ddpm_finetune", "ddpm_pa", "dual_output", "self_guided", "gan_finetune", "dcl", "lfs_gan"]
GAN_METHODS = {"gan_finetune", "dcl", "lfs_gan"}


def task_for(template: str, method: str) -> str:
    return template.replace("{family}", "gan" if method in GAN_METHODS else "ddpm")


def run_method(method: str, task: str, work: Path, extra: list[str], seed: int) -> dict:
    """One ``orchestrate train`` in its own process; its row read back from MLflow."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    name = f"{method}-seed{seed}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", method, "--task", task, "--name", name,
           "--tracking-uri", uri, "--storage", str(work / "runs"), "--set", f"run.seed={seed}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{method}: orchestrate train failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    return {**read_row(uri, work, method, seed, task), "command_s": wall}


def read_row(uri: str, work: Path, method: str, seed: int, task: str) -> dict:
    """A finished run's row, read back from the MLflow store at ``uri`` (its final grid is
    downloaded into ``work``)."""
    import mlflow

    name = f"{method}-seed{seed}"
    c = mlflow.MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name(method).experiment_id],
                        filter_string=f"attributes.run_name = '{name}'")[0]
    m, steps = run.data.metrics, int(run.data.params["run.steps"])
    evals = {h.step: h.value for h in c.get_metric_history(run.info.run_id, "eval_seconds")}
    final_eval = evals.pop(steps)
    periodic = m.get("time_eval_s", 0.0) - final_eval  # the step-0 baseline and the schedule's points
    loop_s = sum(v for k, v in m.items() if k.startswith("time_") and k.endswith("_s"))
    grid = Path(c.download_artifacts(run.info.run_id, "samples/final.png", str(work)))
    # the truth check at every evaluation (the step-0 baseline has none: its samples are the floor's)
    history = sorted((h.step, h.value) for h in c.get_metric_history(run.info.run_id, "target_rate"))
    return {"method": method, "seed": seed, "task": task, "steps": steps, "loop_s": loop_s,
            "train_s": m["time_train_s"], "periodic_eval_s": periodic, "periodic_evals": sorted(evals),
            "final_eval_s": final_eval, "periodic_share": periodic / loop_s,
            "target_rate": m.get("target_rate"), "target_rate_source": m.get("target_rate_source"),
            "truth_separation": m.get("truth_separation"), "target_rate_domain": m.get("target_rate_domain"),
            "fid_domain": m.get("fid_domain"), "intra_dist_domain": m.get("intra_dist_domain"),
            "target_rate_history": [[step, value] for step, value in history],
            # self_guided: the share of samples in the requested pseudo-class, at the run's w and per
            # eval_guidance scale (requested_share_w0 = unguided)
            **{k: v for k, v in m.items() if k.startswith("requested_share")},
            "grid": str(grid)}


def render(result: dict) -> str:
    """One row per method: the value of its one seed, else mean ± std over its seeds."""
    def f(values, d=3, scale=1.0, unit=""):
        values = [scale * v for v in values if v is not None]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.{d}f}{unit}"
        mean, std = mean_std(values)
        return f"{mean:.{d}f} ± {std:.{d}f}{unit}"

    by_method: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for method, rs in by_method.items():
        def col(key):
            return [r[key] for r in rs]

        n_periodic = len(rs[0]["periodic_evals"]) + 1
        rows.append([method, str(rs[0]["steps"]), ",".join(str(r.get("seed", 0)) for r in rs), f(col("train_s"), 0),
                     f"{f(col('periodic_eval_s'), 0)} ({n_periodic})", f(col("final_eval_s"), 0),
                     f(col("loop_s"), 0), f(col("periodic_share"), 0, 100, " %"), f(col("target_rate"), 2),
                     f(col("target_rate_source"), 2), f(col("truth_separation"), 2), f(col("target_rate_domain"), 2),
                     f(col("fid_domain")), f(col("intra_dist_domain"))])
    head = ["method", "steps", "seeds", "train s", "periodic eval s (n)", "final eval s", "run s", "periodic share",
            "target_rate", "source floor", "separation", "target_rate_domain", "fid_domain", "intra_dist"]
    shares = []  # self_guided: where guidance puts the samples, at the run's w and unguided
    for method, rs in by_method.items():
        keys = sorted({k for r in rs for k in r if k.startswith("requested_share")})
        if keys:
            shares.append(f"{method}: " + ", ".join(f"`{k}` {f([r.get(k) for r in rs], 2)}" for k in keys))
    extra = ("\n\nShare of samples in the requested pseudo-class at the final evaluation (`requested_share`: "
             "its samples, at the run's guidance scale w; `requested_share_w<s>`: 64 samples at scale s, "
             "`_w0` unguided): "
             + "; ".join(shares) + ".\n") if shares else "\n"
    histories = [f"{r['method']} seed {r.get('seed', 0)}: " + ", ".join(f"{s} {v:.2f}" for s, v in hist)
                 for r in result["rows"] if (hist := r.get("target_rate_history"))]
    if histories:
        extra += ("\n`target_rate` at each evaluation (step value; 64 samples at the periodic ones, "
                  "the evaluation of record's at the last step): " + "; ".join(histories) + ".\n")
    return (f"# Every method's defaults on {result['task']}\n\n`{result['command']}`\n\n{result['machine']}\n\n"
            + md_table(head, rows) + "\n\nperiodic eval: the step-0 baseline and the schedule's points "
            "(n counts the baseline); run s: the training loop's wall time (build, training, "
            "evaluations, grids, checkpoints, export); target_rate_domain: built-in targets only." + extra)


def strip(result: dict, out: Path) -> Path:
    """The first seed's final grid of every method side by side, each under its name: one PNG
    (``<out stem>_strip.png``) for the README."""
    from PIL import Image, ImageDraw

    firsts: dict[str, str] = {}
    for r in result["rows"]:
        firsts.setdefault(r["method"], r["grid"])
    grids = [(m, Image.open(out.with_name(g)).convert("RGB")) for m, g in firsts.items()]
    pad, head = 12, 28
    width = sum(im.width for _, im in grids) + pad * (len(grids) - 1)
    canvas = Image.new("RGB", (width, max(im.height for _, im in grids) + head), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for method, im in grids:
        canvas.paste(im, (x, head))
        draw.text((x + 4, 6), method, fill="black", font_size=18)
        x += im.width + pad
    path = out.with_name(f"{out.stem}_strip.png")
    canvas.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="synthetic:sketch", help="a task file or built-in task; {family} is replaced")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, required=True, help="the result's JSON (grids and .md beside it)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (run.seed)")
    ap.add_argument("--set", action="append", default=[], help="an override for every run (KEY=VALUE)")
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from --out")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the runs' MLflow store and checkpoints in this folder (default: a temporary one, removed)")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(args.out, render(read_result(args.out)))
        strip(read_result(args.out), args.out)
        return
    import json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        runs = [(method, seed) for method in args.methods.split(",") for seed in args.seeds]
        extra = [a for s in args.set for a in ("--set", s)]
        for method, seed in runs:
            row = run_method(method, task_for(args.task, method), work, extra, seed)
            grid = args.out.with_name(f"{args.out.stem}_{method}" + (f"_seed{seed}" if seed else "") + ".png")
            shutil.copyfile(row["grid"], grid)
            row["grid"] = grid.name
            rows.append(row)
            print(f"{method} seed {seed}: train {row['train_s']:.0f} s, periodic eval "
                  f"{row['periodic_eval_s']:.0f} s, final {row['final_eval_s']:.0f} s, "
                  f"target_rate {row['target_rate']}", flush=True)
    result = {"command": command_line("method_defaults"), "task": args.task, "rows": rows,
              "machine": f"{cores()}, {processor()}"}
    args.out.write_text(json.dumps(result, indent=1))
    write_markdown(args.out, render(result))
    strip(result, args.out)


if __name__ == "__main__":
    main()
