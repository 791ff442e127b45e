"""images/s of `orchestrate sample` (Ray Data actors) against a plain diffusers loop, same process.

The model is a diffusers DDPM folder (default: the shipped `small` 32² source, the architecture of
the demo's export); every variant draws the same number of images with 50 DDIM steps and the
same batch size:

* ``plain``: ``diffusers.DDPMPipeline`` with its scheduler swapped for ``DDIMScheduler``, called in a
  ``for`` loop in this process with T torch threads (what a researcher writes by hand);
* ``sample``: ``orchestrator.api.sample`` with W actors of C CPUs each (one model load per actor).

Two rates per ``sample`` run: end to end (the actors' start, model loads, PNG encoding and
writing included) and steady (from the first shard written to the last: the pool at work, what
a long job converges to). Ratios use the steady rate; the end-to-end one says what a short job
pays. Goals (issue: one worker >= 0.95x the plain loop with the same threads; two one-CPU
workers >= 1.7x one one-CPU worker).

    python benchmarks/sampling.py [--n 160] [--batch-size 32] [--model DIR]
    python benchmarks/sampling.py --report-only        # re-render the markdown from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, cores, read_result, write_markdown


def plain_loop(model: str, n: int, batch_size: int, steps: int, threads: int) -> dict:
    import torch
    from diffusers import DDIMScheduler, DDPMPipeline

    torch.set_num_threads(threads)
    pipe = DDPMPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    pipe(batch_size=2, num_inference_steps=2, generator=gen, output_type="np")  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        images = pipe(batch_size=b, num_inference_steps=steps, generator=gen, output_type="np").images
        done += len(images)
    seconds = time.perf_counter() - t0
    return {"variant": f"plain diffusers loop, {threads} thread(s)", "n": n, "seconds": seconds,
            "steady_images_per_s": n / seconds, "end_to_end_images_per_s": n / seconds}


def sample_run(model: str, n: int, batch_size: int, steps: int, workers: int, cpus: int, out: Path,
               storage: Path) -> dict:
    from orchestrator import api

    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    res = api.sample(model, n, str(out), options={"steps": steps}, batch_size=batch_size, shard_size=batch_size,
                     workers=workers, cpus_per_worker=cpus, storage=str(storage),
                     progress=lambda done, total: stamps.append((time.perf_counter(), done)))
    seconds = time.perf_counter() - t0
    # steady: from the first shard written to the last (the first callback is the start, 0 done)
    written = [(t, d) for t, d in stamps if d > 0]
    (t_a, d_a), (t_b, d_b) = written[0], written[-1]
    steady = (d_b - d_a) / (t_b - t_a) if t_b > t_a else float("nan")
    return {"variant": f"`orchestrate sample`, {workers} worker(s) × {cpus} CPU", "n": res.n, "seconds": seconds,
            "steady_images_per_s": steady, "end_to_end_images_per_s": res.n / seconds}


def render(data: dict) -> str:
    rows = data["rows"]
    by = {r["key"]: r for r in rows}

    def ratio(a: str, b: str) -> str:
        if a in by and b in by:
            return f"{by[a]['steady_images_per_s'] / by[b]['steady_images_per_s']:.2f}"
        return "-"

    lines = [f"## Sampling throughput (`sampling.py`, {data['machine']}, {data['date']})", "",
             f"{data['n']} images per variant, {data['steps']} DDIM steps, batch {data['batch_size']}, model "
             f"`{data['model_name']}` ({data['resolution']}²); load average before {data['load_before']:.2f}, "
             f"after {data['load_after']:.2f}; torch {data['torch']}, ray {data['ray']}, diffusers "
             f"{data['diffusers']}; wall {data['wall_s']:.0f} s.", "",
             "| variant | steady images/s | end-to-end images/s | wall s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steady_images_per_s']:.2f} | {r['end_to_end_images_per_s']:.2f} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", "| ratio (steady) | value | goal |", "|---|---:|---:|",
              f"| sample 1 worker × 1 CPU / plain loop 1 thread | {ratio('s1x1', 'p1')} | ≥ 0.95 |",
              f"| sample 2 workers × 1 CPU / sample 1 worker × 1 CPU | {ratio('s2x1', 's1x1')} | ≥ 1.7 |",
              f"| sample 1 worker × 2 CPU / plain loop 2 threads | {ratio('s1x2', 'p2')} | ≥ 0.95 |", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a diffusers DDPM folder (default: the shipped 32² source)")
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=RESULTS / "sampling.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(args.out, render(read_result(args.out)))
        return

    import diffusers
    import ray
    import torch

    from orchestrator.raycluster import init_ray, shutdown
    from trainers.builtin import builtin_source

    model = args.model or str(builtin_source("ddpm", 32))
    load_before = os.getloadavg()[0]
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sampling-bench-"))
    rows = []
    started = init_ray(None)
    try:
        plan = [("p1", lambda: plain_loop(model, args.n, args.batch_size, args.steps, 1)),
                ("s1x1", lambda: sample_run(model, args.n, args.batch_size, args.steps, 1, 1, work / "a", work)),
                ("s2x1", lambda: sample_run(model, args.n, args.batch_size, args.steps, 2, 1, work / "b", work)),
                ("p2", lambda: plain_loop(model, args.n, args.batch_size, args.steps, 2)),
                ("s1x2", lambda: sample_run(model, args.n, args.batch_size, args.steps, 1, 2, work / "c", work))]
        for key, fn in plan:
            row = {"key": key, **fn()}
            print(f"{row['variant']}: steady {row['steady_images_per_s']:.2f} images/s, end to end "
                  f"{row['end_to_end_images_per_s']:.2f} images/s ({row['seconds']:.1f} s)", flush=True)
            rows.append(row)
        same = all((work / "a" / p.name).read_bytes() == p.read_bytes() for p in (work / "b").glob("*.png"))
    finally:
        shutdown(started)
        shutil.rmtree(work, ignore_errors=True)
    from diffusers import UNet2DModel

    res = UNet2DModel.load_config(str(Path(model) / "unet"))["sample_size"]
    data = {"rows": rows, "n": args.n, "steps": args.steps, "batch_size": args.batch_size, "model_name": Path(model).name,
            "resolution": res, "machine": f"{cores()} CPU",
            "date": time.strftime("%Y-%m-%d"), "load_before": load_before, "load_after": os.getloadavg()[0],
            "torch": torch.__version__, "ray": ray.__version__, "diffusers": diffusers.__version__,
            "wall_s": time.perf_counter() - t_all, "one_and_two_workers_same_bytes": same}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    write_markdown(args.out, render(data))
    print(f"1 and 2 workers wrote the same bytes: {same}")


if __name__ == "__main__":
    main()
