"""Training-step throughput of every method, in the one loop, against two baselines run in the same
process on the same device:

* **bare**: the same method's ``train_step`` called in a plain ``for`` loop (what a hand-written
  script does) — the ratio loop/bare is the cost of the loop itself (batch draw, loss
  accumulation on the device, one host sync per report); it should stay within a few percent;
* **plain**: the plainest training of the same network — a diffusers UNet with L_simple and AdamW,
  or a StyleGAN2 G/D pair with the non-saturating logistic loss and Adam (no R1, no EMA, no path
  length) — the ratio method/plain is what the method's own terms cost (a frozen source forward
  for DDPM-PA and DCL, 4B extra fakes for LFS-GAN's mode-seeking term, ...).

Images per second over ``--steps`` timed steps after as many warm-up steps (the loop times its
second report window; the bare and plain loops warm up as long), median of ``--repeats``
interleaved rounds, ratios paired within a round. Tiny models (16², the ``tiny`` presets) on the
CPU by default; on a GPU the ``--preset``/``--resolution`` flags size it up. Writes
``benchmarks/results/throughput_<device>.md`` and ``.json`` with the device, versions and date.
On a shared machine, ``--clock cpu --threads 1`` times the same steps in this process's CPU
seconds, which other processes do not disturb (``throughput_cpu_cpuclock.md``).

    python -m benchmarks.throughput                      # every method, CPU, tiny
    python -m benchmarks.throughput --methods ddpm_pa dcl --repeats 5
    python -m benchmarks.throughput --clock cpu --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, processor, read_result
from orchestrator.data.artifacts import publish, publish_array
from orchestrator.core.config import RunSettings
from orchestrator.runtime.job import Job
from orchestrator.runtime.loop import build_method, run_loop
from orchestrator.runtime.session import StoreSession
from trainers.common import random_batch
from trainers.registry import METHODS

GAN = ("gan_finetune", "dcl", "lfs_gan")


def make_sources(root: Path, resolution: int, preset: str) -> dict[str, Path]:
    from trainers.diffusion.backbone import build_unet, default_scheduler, save_source
    from trainers.gan.pretrain import GANPretrain, GANPretrainConfig
    from trainers.gan.source import save_gan_source

    torch.manual_seed(0)
    save_source(build_unet(preset, resolution), default_scheduler(), root / "ddpm")
    g = GANPretrain(GANPretrainConfig(preset=preset), resolution, "cpu")
    save_gan_source(root / "gan", g.g, g.g_ema, g.d)
    return {"ddpm": root / "ddpm", "stylegan2": root / "gan"}


# How the timed steps are clocked (``--clock``): wall time, or this process's CPU time.
CLOCK = {"now": time.perf_counter}


def make_job(method: str, sources, storage: str, images, steps: int, device: torch.device, encoder) -> Job:
    family = "stylegan2" if method in GAN else "ddpm"
    cls = METHODS[method]
    cfg = cls.Config()
    run = RunSettings(steps=steps, report_every=steps, sample_every=10 ** 9, eval_every=0, metrics=["domain"],
                      final_eval_samples=8, final_eval_sample_steps=2, grid_size=4, grid_sample_steps=2,
                      use_gpu=device.type == "cuda", cpus_per_worker=float(torch.get_num_threads()))
    return Job(kind="adapt", name=f"tp-{method}-{time.time_ns()}", method=method, family=family,
               resolution=images.shape[1], method_config=cfg.model_dump(mode="json"), run=run, storage=storage,
               data=publish_array(images, storage), source=publish(sources[family], storage), domain_encoder=encoder)


def bare(job: Job, device: torch.device, warmup: int, steps: int) -> float:
    from orchestrator.runtime.loop import images_tensor

    method, perf = build_method(job, device, 0)
    images = images_tensor(job.data).to(device)
    gen = torch.Generator(device=device).manual_seed(7)
    bs = method.config.batch_size
    from orchestrator.data.artifacts import fetch
    from trainers.base import PrepareContext

    method.prepare(images, PrepareContext(domain_encoder=fetch(job.domain_encoder)))
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = CLOCK["now"]()
        if method.wants_index:
            x, idx = random_batch(images, bs, gen, return_index=True)
            out = method.train_step(x, index=idx)
        else:
            out = method.train_step(random_batch(images, bs, gen))
    float(out["loss"])  # the plain loop's own sync
    return steps * bs / (CLOCK["now"]() - t0)


def in_loop(job: Job, device: torch.device, warmup: int, steps: int) -> float:
    """images/s of the loop's second report window: steps 1..N warm up, N+1..2N are timed (the
    loop excludes evaluation, grids and the export from its own rate)."""
    run = job.run.model_copy(update={"steps": 2 * steps, "report_every": steps})
    with tempfile.TemporaryDirectory() as tmp, _loop_clock():
        session = StoreSession(tmp, job.name, device=device)
        run_loop(job.model_copy(update={"run": run, "storage": tmp, "checkpoint_at": []}), session)
    return session.reports[-1]["images_per_s"]


@contextlib.contextmanager
def _loop_clock():
    """With ``--clock cpu``, the loop's own rate is timed in process CPU seconds too: the loop times
    its report windows with ``time.perf_counter`` of its module, so that module's ``time`` is
    swapped for the run (a benchmark-only substitution; the loop itself is unchanged)."""
    if CLOCK["now"] is time.perf_counter:
        yield
        return
    import types

    import orchestrator.runtime.loop as loop_module

    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    shim.perf_counter = CLOCK["now"]
    saved, loop_module.time = loop_module.time, shim
    try:
        yield
    finally:
        loop_module.time = saved


def plain(family: str, sources, device: torch.device, images, bs: int, warmup: int, steps: int) -> float:
    """The plainest training of the same network (module docstring)."""
    import torch.nn.functional as F

    from trainers.registry import load_source_model

    src = load_source_model(family, str(sources[family]), device)
    x_all = images_to_model(images, device)
    gen = torch.Generator(device=device).manual_seed(0)
    if family == "ddpm":
        unet = src.unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda")
        abar = src.scheduler.alphas_cumprod.to(device)

        def step():
            x0 = x_all[torch.randint(0, len(x_all), (bs,), generator=gen, device=device)]
            t = torch.randint(0, len(abar), (bs,), generator=gen, device=device)
            eps = torch.randn(x0.shape, generator=gen, device=device)
            a = abar[t].view(-1, 1, 1, 1)
            loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
    else:
        g, d = src.g.train(), src.d.train()
        og = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.0, 0.99), fused=device.type == "cuda")
        od = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.0, 0.99), fused=device.type == "cuda")

        def step():
            real = x_all[torch.randint(0, len(x_all), (bs,), generator=gen, device=device)]
            z = torch.randn(bs, g.style_dim, generator=gen, device=device)
            with torch.no_grad():
                fake = g([z])[0]
            ld = F.softplus(d(fake)).mean() + F.softplus(-d(real)).mean()
            od.zero_grad(set_to_none=True)
            ld.backward()
            od.step()
            z = torch.randn(bs, g.style_dim, generator=gen, device=device)
            lg = F.softplus(-d(g([z])[0])).mean()
            og.zero_grad(set_to_none=True)
            lg.backward()
            og.step()
            return lg
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = CLOCK["now"]()
    for _ in range(steps):
        loss = step()
    float(loss.detach())
    return steps * bs / (CLOCK["now"]() - t0)


def images_to_model(images, device):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=sorted(METHODS))
    ap.add_argument("--steps", type=int, default=80,
                    help="timed steps per measurement, after as many warm-up steps (the loop times its second "
                         "report window, so the bare and plain loops warm up as long)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time in process CPU seconds (time.process_time), which other processes on a "
                         "shared machine do not disturb; the CPU only, best with --threads 1")
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from the JSON")
    args = ap.parse_args()
    if args.report_only:
        name = f"throughput_{args.device}" + ("_cpuclock" if args.clock == "cpu" else "")
        saved = read_result(RESULTS / f"{name}.json")
        return report(saved["meta"], saved["rows"], name)
    if args.clock == "cpu":
        if args.device != "cpu":
            ap.error("--clock cpu times CPU work; use it with --device cpu")
        CLOCK["now"] = time.process_time
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]

    from trainers.data import render
    from trainers.metrics import train_domain_encoder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["ORCHESTRATE_CACHE"] = str(root / "cache")
        sources = make_sources(root, args.resolution, args.preset)
        images = render("sketch", 10, args.resolution)
        enc = train_domain_encoder(render("source", 64, args.resolution), steps=2, batch_size=16,
                                   resolution=args.resolution)
        enc.save(root / "enc.pt")
        storage = str(root / "storage")
        encoder = publish(root / "enc.pt", storage)
        rows = []
        for method in args.methods:
            family = "stylegan2" if method in GAN else "ddpm"
            runs = {"bare": [], "loop": [], "plain": [], "bare_again": []}
            for _ in range(args.repeats):  # interleaved, so that drifts of the machine hit all three
                job = make_job(method, sources, storage, images, args.steps, device, encoder)
                bs = job.method_config["batch_size"]
                runs["bare"].append(bare(job, device, args.steps, args.steps))
                runs["loop"].append(in_loop(job, device, args.steps, args.steps))
                runs["plain"].append(plain(family, sources, device, images, bs, args.steps, args.steps))
                # the same bare loop again: its ratio to the first is the noise floor of this machine
                runs["bare_again"].append(bare(job, device, args.steps, args.steps))
            med = {k: statistics.median(v) for k, v in runs.items()}
            # ratios paired within a round (measured back to back), then the median over rounds
            loop_vs_bare = statistics.median(l / b for l, b in zip(runs["loop"], runs["bare"]))
            method_vs_plain = statistics.median(b / p for b, p in zip(runs["bare"], runs["plain"]))
            rows.append({"method": method, "batch": bs, **{f"{k}_images_per_s": v for k, v in med.items()},
                         "loop_vs_bare": loop_vs_bare, "method_vs_plain": method_vs_plain,
                         "loop_vs_bare_rounds": [l / b for l, b in zip(runs["loop"], runs["bare"])],
                         "bare_again_vs_bare_rounds": [a / b for a, b in zip(runs["bare_again"], runs["bare"])],
                         "spread": {k: [min(v), max(v)] for k, v in runs.items()}})
            print(f"{method:14s} plain {med['plain']:8.1f}  bare {med['bare']:8.1f}  loop {med['loop']:8.1f} img/s  "
                  f"loop/bare {loop_vs_bare:.3f}  method/plain {method_vs_plain:.3f}", flush=True)

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({processor()}, {args.threads} threads of {os.cpu_count()})",
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "resolution": args.resolution, "preset": args.preset, "steps": args.steps, "warmup": args.steps,
            "repeats": args.repeats, "clock": args.clock, "load_before": load_before, "load_after": os.getloadavg()[0]}
    RESULTS.mkdir(exist_ok=True)
    name = f"throughput_{device.type}" + ("_cpuclock" if args.clock == "cpu" else "")
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    report(meta, rows, name)


def _geo(values: list[float]) -> tuple[float, float]:
    """Geometric mean and its standard error (in log units)."""
    logs = [math.log(v) for v in values]
    se = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
    return math.exp(statistics.mean(logs)), se


def report(meta: dict, rows: list[dict], name: str) -> None:
    """``results/<name>.md`` from the measured rows."""
    cpu = meta.get("clock") == "cpu"
    load = (f"load average {meta['load_before']:.2f} before the run, {meta['load_after']:.2f} after"
            if meta.get("load_before") is not None else
            f"load average {meta.get('load_after', float('nan')):.2f} after the run (the load before was not recorded)")
    lines = [f"# Training-step throughput ({meta['device']}, torch {meta['torch']}, {meta['date']})", "",
             f"{meta['preset']} presets at {meta['resolution']}², {meta['steps']} timed steps after {meta['warmup']} "
             f"warm-up steps, median of {meta['repeats']} interleaved rounds (ratios paired within a round); {load}. "
             "images/s (higher is better)"
             + (", per second of this process's CPU time (time.process_time): the time other processes hold the "
                "CPU is left out, though they still disturb the caches." if cpu else ", wall clock."),
             "",
             "| method | batch | plain loop of the network | method, bare loop | method, in the one loop | "
             "loop / bare | loop / bare per round | bare again / bare per round (noise) | method / plain |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch']} | {r['plain_images_per_s']:.1f} | {r['bare_images_per_s']:.1f} | "
                     f"{r['loop_images_per_s']:.1f} | {r['loop_vs_bare']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in r['loop_vs_bare_rounds'])} | "
                     f"{', '.join(f'{x:.3f}' for x in r['bare_again_vs_bare_rounds'])} | {r['method_vs_plain']:.3f} |")
    loop, loop_se = _geo([x for r in rows for x in r["loop_vs_bare_rounds"]])
    same, same_se = _geo([x for r in rows for x in r["bare_again_vs_bare_rounds"]])
    lines += ["", f"Pooled over every method and round ({sum(len(r['loop_vs_bare_rounds']) for r in rows)} pairs), "
              f"geometric means: loop / bare {loop:.3f} (± {loop_se:.3f} in log units), the same bare loop twice "
              f"{same:.3f} (± {same_se:.3f})."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
