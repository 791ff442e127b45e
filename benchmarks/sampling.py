"""images/s of `orchestrate sample` (Ray Data actors) against a plain diffusers loop, same process.

The model is a diffusers DDPM folder (default: the shipped `small` 32² source, the architecture of
the demo's export); every variant draws the same number of images with 50 DDIM steps and the
same batch size:

* ``plain``: ``diffusers.DDPMPipeline`` with its scheduler swapped for ``DDIMScheduler``, called in a
  ``for`` loop in this process with T torch threads (what a researcher writes by hand);
* ``actor code, no Ray``: what one sampling actor runs (``trainers.generate`` and the PNG
  encoding), called in a loop in one process with one thread, then in two such processes started
  together, each drawing half the images: the ceiling for two one-CPU actors of this very code on
  this machine, what two actors could reach if the pool cost nothing;
* ``sample``: ``orchestrator.api.sample`` with W actors of C CPUs each (one model load per actor).

Two rates per ``sample`` run: end to end (the actors' start, model loads, PNG encoding and
writing included) and steady (from the first shards written to the last; shards handed over
together with the first count as done at its time). Ray Data hands a finished shard over only
with the next one, so "steady" overstates a pool's rate (the last two shards arrive together);
``--marginal`` measures the pool free of that and of start-up.
Ratios use the steady rate; the end-to-end one says what a short job pays. Goals: one worker
>= 0.95x the plain loop with the same threads; two one-CPU workers >= 1.7x one one-CPU worker.

    python -m benchmarks.sampling [--n 256] [--batch-size 32] [--model DIR]
    python -m benchmarks.sampling --marginal [--rounds 2]  # every variant at n/2 and 3n/2: rates free of start-up
    python -m benchmarks.sampling --report-only        # re-render the markdown from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, cores, read_result, write_markdown


def plain_loop(model: str, n: int, batch_size: int, steps: int, threads: int, barrier=None) -> dict:
    import torch
    from diffusers import DDIMScheduler, DDPMPipeline

    torch.set_num_threads(threads)
    pipe = DDPMPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    pipe(batch_size=2, num_inference_steps=2, generator=gen, output_type="np")  # warm-up
    if barrier is not None:
        barrier.wait()  # both processes loaded and warm: start together
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        images = pipe(batch_size=b, num_inference_steps=steps, generator=gen, output_type="np").images
        done += len(images)
    t1 = time.perf_counter()
    seconds = t1 - t0
    return {"variant": f"plain diffusers loop, {threads} thread(s)", "n": n, "seconds": seconds,
            "steady_images_per_s": n / seconds, "end_to_end_images_per_s": n / seconds, "start": t0, "end": t1}


def actor_code_loop(model: str, n: int, batch_size: int, steps: int, threads: int, barrier=None) -> dict:
    """The body of a sampling actor without Ray: the same model loader, generator and PNG encoder."""
    import torch

    from orchestrator.runtime.sampling import png_bytes
    from trainers.generate import SampleOptions, open_model

    torch.set_num_threads(threads)
    m = open_model(model, "cpu")
    options = m.check(SampleOptions(steps=steps))
    m.generate(range(2), 0, m.check(SampleOptions(steps=2)))  # warm-up
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    for b in range(0, n, batch_size):
        batch = m.generate(range(b, min(b + batch_size, n)), 0, options)
        [png_bytes(img) for img in batch.permute(0, 2, 3, 1).numpy()]
    t1 = time.perf_counter()
    return {"variant": f"actor code without Ray, 1 process, {threads} thread(s)", "n": n, "seconds": t1 - t0,
            "steady_images_per_s": n / (t1 - t0), "end_to_end_images_per_s": n / (t1 - t0), "start": t0, "end": t1}


def in_parallel(loop, label: str, model: str, n: int, batch_size: int, steps: int, processes: int) -> dict:
    """`processes` one-thread `loop`s at once, n/processes images each; the rate is all images over
    the span from the common start to the last one's end (perf_counter is CLOCK_MONOTONIC on Linux,
    one clock for every process)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        barrier = manager.Barrier(processes)
        share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        runs = [f.result() for f in [pool.submit(loop, model, k, batch_size, steps, 1, barrier) for k in share]]
    seconds = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"variant": f"{label}, {processes} processes at once, 1 thread each", "n": n,
            "seconds": seconds, "steady_images_per_s": n / seconds, "end_to_end_images_per_s": n / seconds}


def sample_run(model: str, n: int, batch_size: int, steps: int, workers: int, cpus: int, out: Path,
               storage: Path) -> dict:
    from orchestrator import api

    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    res = api.sample(model, n, str(out), options={"steps": steps}, batch_size=batch_size, shard_size=batch_size,
                     workers=workers, cpus_per_worker=cpus, storage=str(storage),
                     progress=lambda done, total: stamps.append((time.perf_counter(), done)))
    seconds = time.perf_counter() - t0
    # steady: from the first shards written to the last (the first callback is the start, 0 done).
    # Ray Data may hand several finished shards over at once: every shard of that first burst
    # (written within a second of the first) counts as done at its start, else the rate would
    # credit the burst's shards to the time after it.
    written = [(t, d) for t, d in stamps if d > 0]
    t_a = written[0][0]
    d_a = max(d for t, d in written if t - t_a < 1.0)
    t_b, d_b = written[-1]
    steady = (d_b - d_a) / (t_b - t_a) if t_b > t_a else float("nan")
    return {"variant": f"`orchestrate sample`, {workers} worker(s) × {cpus} CPU", "n": res.n, "seconds": seconds,
            "steady_images_per_s": steady, "end_to_end_images_per_s": res.n / seconds,
            "shards_written_at_s": [[round(t - t0, 2), d] for t, d in written]}


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
              f"| actor code without Ray: 2 processes / 1 process (this machine's ceiling for the line above) | "
              f"{ratio('a1x2', 'a1')} | - |",
              f"| sample 2 workers × 1 CPU / actor code without Ray, 2 processes | "
              f"{ratio('s2x1', 'a1x2')} | - |",
              f"| sample 1 worker × 2 CPU / plain loop 2 threads | {ratio('s1x2', 'p2')} | ≥ 0.95 |", ""]
    return "\n".join(lines)


MARGINAL_VARIANTS = (("p1", "plain diffusers loop, 1 thread"), ("s1x1", "`orchestrate sample`, 1 worker × 1 CPU"),
                     ("s2x1", "`orchestrate sample`, 2 workers × 1 CPU"), ("p2", "plain diffusers loop, 2 threads"),
                     ("s1x2", "`orchestrate sample`, 1 worker × 2 CPU"))


def marginal(args: argparse.Namespace) -> None:
    """Images per second at the margin, free of start-up and of when Ray Data hands shards over
    (it may hold a finished shard back until the next one): each variant draws n/2 and then 3n/2
    images, and its rate is the extra n images over the extra seconds. The plain loop is measured
    the same way, in the same invocation, and every variant ``--rounds`` times in alternating
    order (this machine's rate drifts by several percent between minutes), so each ratio is a
    median over rounds of variants measured minutes apart. Written to
    ``results/sampling_marginal.json`` and ``.md``."""
    import statistics

    from orchestrator.runtime.raycluster import init_ray, shutdown
    from trainers.builtin import builtin_source

    model = args.model or str(builtin_source("ddpm", 32))
    small, large = args.n // 2, 3 * args.n // 2
    work = Path(tempfile.mkdtemp(prefix="sampling-marginal-"))

    def seconds(key: str, n: int, tag: str) -> float:
        if key.startswith("p"):
            return plain_loop(model, n, args.batch_size, args.steps, int(key[1]))["seconds"]
        workers, cpus = int(key[1]), int(key[3])
        return sample_run(model, n, args.batch_size, args.steps, workers, cpus, work / f"{key}-{n}-{tag}",
                          work)["seconds"]

    variants = [(k, label) for k, label in MARGINAL_VARIANTS if not args.variants or k in args.variants.split(",")]
    rows: dict[str, list[float]] = {k: [] for k, _ in variants}
    large_s: dict[str, list[float]] = {k: [] for k, _ in variants}  # wall seconds of the 3n/2 draw
    load_before = os.getloadavg()[0]
    started = init_ray(None)
    try:
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for key, label in order:
                t_small, t_large = seconds(key, small, f"r{r}"), seconds(key, large, f"r{r}")
                rate = (large - small) / (t_large - t_small)
                rows[key].append(rate)
                large_s[key].append(t_large)
                print(f"round {r + 1}, {label}: {small} images in {t_small:.1f} s, {large} in {t_large:.1f} s: "
                      f"{rate:.2f} images/s at the margin", flush=True)
    finally:
        shutdown(started)
        shutil.rmtree(work, ignore_errors=True)
    ratios = {name: [rows[a][i] / rows[b][i] for i in range(args.rounds)]
              for name, a, b in (("one worker / plain loop, 1 thread", "s1x1", "p1"),
                                 ("two 1-CPU workers / one 1-CPU worker", "s2x1", "s1x1"),
                                 ("one 2-CPU worker / plain loop, 2 threads", "s1x2", "p2"))
              if rows.get(a) and rows.get(b)}
    # the pool's whole wall time for 3n/2 images (Ray Data's and the actors' start, model loads and
    # writes included) against the plain loop's sampling time alone (its load and warm-up excluded)
    end_to_end = {name: [large_s[b][i] / large_s[a][i] for i in range(args.rounds)]
                  for name, a, b in (("one worker / plain loop, 1 thread", "s1x1", "p1"),
                                     ("one 2-CPU worker / plain loop, 2 threads", "s1x2", "p2"))
                  if large_s.get(a) and large_s.get(b)}
    out = args.out.with_name("sampling_marginal.json")
    out.write_text(json.dumps({"rates": rows, "ratios": ratios, "large_seconds": large_s, "end_to_end": end_to_end,
                               "n": [small, large], "batch_size": args.batch_size,
                               "steps": args.steps, "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"),
                               "load_before": load_before, "load_after": os.getloadavg()[0]}, indent=1))
    lines = [f"## Sampling at the margin (`sampling.py --marginal`, {cores()} CPU, {time.strftime('%Y-%m-%d')})", "",
             f"Each variant draws {small} and then {large} images ({args.steps} DDIM steps, batch and shard "
             f"{args.batch_size}); its rate is the extra {large - small} images over the extra seconds. "
             f"{args.rounds} rounds, in alternating order; load average before {load_before:.2f}.", "",
             "| variant | images/s at the margin, per round | median |", "|---|---|---:|"]
    for key, label in variants:
        lines.append(f"| {label} | {', '.join(f'{v:.2f}' for v in rows[key])} | "
                     f"{statistics.median(rows[key]):.2f} |")
    lines += ["", "| ratio (same round) | per round | median | goal |", "|---|---|---:|---:|"]
    goals = {"one worker / plain loop, 1 thread": "≥ 0.95", "two 1-CPU workers / one 1-CPU worker": "≥ 1.7",
             "one 2-CPU worker / plain loop, 2 threads": ""}
    for name, vals in ratios.items():
        lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in vals)} | **{statistics.median(vals):.3f}** | "
                     f"{goals[name]} |")
    if end_to_end:
        lines += ["", f"End to end at {large} images: the plain loop's sampling seconds over the pool's whole wall "
                  "time (start-up, model loads and writes included):", "",
                  "| ratio (same round) | per round | median | goal |", "|---|---|---:|---:|"]
        for name, vals in end_to_end.items():
            lines.append(f"| {name} | {', '.join(f'{v:.3f}' for v in vals)} | **{statistics.median(vals):.3f}** | "
                         f"{goals[name]} |")
    write_markdown(out, "\n".join(lines + [""]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a diffusers DDPM folder (default: the shipped 32² source)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=RESULTS / "sampling.json")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--marginal", action="store_true",
                    help="rates at the margin (each variant at n/2 and 3n/2 images): plain loops and pools")
    ap.add_argument("--rounds", type=int, default=2, help="--marginal: rounds of every variant")
    ap.add_argument("--variants", default="", help="--marginal: a comma-separated subset of "
                    f"{','.join(k for k, _ in MARGINAL_VARIANTS)}")
    args = ap.parse_args()
    if args.marginal:
        marginal(args)
        return
    if args.report_only:
        write_markdown(args.out, render(read_result(args.out)))
        return

    import diffusers
    import ray
    import torch

    from orchestrator.runtime.raycluster import init_ray, shutdown
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
                ("a1", lambda: actor_code_loop(model, args.n, args.batch_size, args.steps, 1)),
                ("a1x2", lambda: in_parallel(actor_code_loop, "actor code without Ray", model, args.n,
                                             args.batch_size, args.steps, 2)),
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
    data = {"rows": rows, "n": args.n, "steps": args.steps, "batch_size": args.batch_size,
            "model_name": Path(model).name,
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
