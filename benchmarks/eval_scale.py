"""How far the in-training estimate (128 samples) is from a paper-scale evaluation (5,000).

Adapts the shipped source DDPM to the built-in `sketch` task exactly as `orchestrate demo` does
(or reuses that run when it is recorded), then scores the adapted model with `orchestrate
evaluate` (the runs' own protocol, through the public API) at several sample counts: 128 samples
over several seeds (the spread of the in-training number), and larger counts up to 5,000 (the
reference set holds 1,000 images; FID is biased by the sample count, so it is reported per count).

    python -m benchmarks.eval_scale [--big 5000] [--seeds 6]
    python -m benchmarks.eval_scale --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, cores, read_result, write_markdown

KEYS = ("fid_domain", "kid_domain", "intra_dist_domain", "coverage_domain", "density_domain", "target_rate_domain")


def render(data: dict) -> str:
    lines = [f"## In-training vs paper-scale evaluation (`eval_scale.py`, {data['date']})", "",
             f"Model: the demo's run `{data['model']}` (shipped `small` 32² source adapted to ten `sketch` shots, "
             f"300 steps). Task `synthetic:sketch` (reference set {data['num_reference']} images), 50 DDIM steps, "
             f"the domain encoder's features. Wall {data['wall_s'] / 60:.0f} min on {data['machine']}.", "",
             "| samples | seeds | " + " | ".join(KEYS) + " | s per evaluation |",
             "|---:|---:|" + "---:|" * (len(KEYS) + 1)]
    for row in data["rows"]:
        cells = []
        for k in KEYS:
            v = [x[k] for x in row["runs"] if k in x]
            m = float(np.mean(v)) if v else float("nan")
            s = float(np.std(v, ddof=1)) if len(v) > 1 else None
            cells.append(f"{m:.4g}" + (f" ± {s:.2g}" if s is not None else ""))
        secs = float(np.mean([x["eval_seconds"] for x in row["runs"]]))
        lines.append(f"| {row['n']} | {len(row['runs'])} | " + " | ".join(cells) + f" | {secs:.0f} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--workdir", type=Path, default=Path("eval-scale-work"))
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_scale.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(args.out, render(read_result(args.out)))
        return

    from orchestrator import api
    from orchestrator.cli import DEMO_RUN
    from orchestrator.core.config import DEFAULT_TASK, resolve
    from orchestrator.runtime.raycluster import init_ray, shutdown

    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    t0 = time.perf_counter()
    kw = dict(tracking_uri="sqlite:///mlflow.db", storage="runs")
    started = init_ray(None)
    try:
        cfg = resolve("ddpm_finetune", task_file=DEFAULT_TASK, overrides=DEMO_RUN)
        run = api.adapt(cfg, **kw)
        rows = []
        for n, seeds in [(128, range(args.seeds))] + [(b, range(1)) for b in args.big]:
            runs = []
            for seed in seeds:
                res = api.evaluate(run.name, DEFAULT_TASK, n=n, seed=1000 + seed, **kw)
                runs.append({k: v for k, v in res.metrics.items() if k in KEYS or k in ("eval_seconds", "num_reference")})
                print(f"n={n} seed={seed}: " + ", ".join(f"{k} {res.metrics[k]:.4g}" for k in KEYS if k in res.metrics),
                      flush=True)
            rows.append({"n": n, "runs": runs})
    finally:
        shutdown(started)
    data = {"rows": rows, "model": run.name, "num_reference": int(rows[0]["runs"][0]["num_reference"]),
            "date": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t0,
            "machine": f"{cores()} CPU"}
    out = args.out if args.out.is_absolute() else ROOT / args.out
    out.write_text(json.dumps(data, indent=1))
    write_markdown(out, render(data))


if __name__ == "__main__":
    main()
