"""Where DDPM-PA's extra terms weigh on the UNet: the gradient norm of each weighted term
(λ_img·L_img, λ_hf·L_hf, λ_hfmse·L_hfmse) against L_simple's, per timestep.

Why it matters: every PA term is a function of the predicted clean image
x̃0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t), so an error of ε̂ reaches it multiplied by
sqrt(1/ᾱ_t − 1) = 1/sqrt(SNR_t) (158 at t = 999 on the linear schedule). Where that factor is
large the terms' gradients dwarf L_simple's, and under gradient clipping and Adam those samples
set the step. This is the evidence behind ``ddpm_pa``'s SNR gate ``pair_min_snr`` (default 4,
t < 145; trainers/diffusion/ddpm_pa.py).

Protocol: the shipped 32² DDPM source, ten shots of ``synthetic:sketch``. The pairwise terms are 0
while the adapted UNet equals the source, so the UNet is first fine-tuned for ``--warm-steps``
steps (L_simple only, the default lr); then for each t, one batch of 8 shots at that t (the same
noise for every term), the L2 norm of each weighted term's gradient on the UNet's weights, the
released weights (4, 4, 1), every sample in the pairwise set::

    python -m benchmarks.pa_gradients --out benchmarks/results/pa_gradients.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, cores, md_table, processor, read_result, write_markdown
from trainers.builtin import builtin_source
from trainers.data import to_tensor
from trainers.data.synthetic import render
from trainers.diffusion.backbone import load_source
from trainers.diffusion.ddpm_pa import DDPMPA, DDPMPAConfig

TERMS = ("loss_simple", "loss_img", "loss_hf", "loss_hfmse")


def gradient_norms(m: DDPMPA, x0: torch.Tensor, t: int, seed: int) -> dict[str, float]:
    """Each weighted term's gradient norm on the UNet for the batch ``x0`` noised at timestep ``t``."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    ts = torch.full((x0.shape[0],), t, dtype=torch.long)
    abar = m.alphas_cumprod[ts].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    m.noisy = lambda _x: (x_t, ts, eps)  # this batch's x_t for every term
    try:
        out = m.losses(x0)
    finally:
        del m.noisy
    params = [p for p in m.unet.parameters() if p.requires_grad]
    norms = {}
    for key in TERMS:
        loss = out[key]
        if not loss.requires_grad:
            norms[key] = 0.0
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[key] = float(torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads if gr is not None)))
    return norms


def render_md(result: dict) -> str:
    head = ["t", "SNR_t", "1/sqrt(SNR_t)", "L_simple", "λ_img·L_img", "λ_hf·L_hf", "λ_hfmse·L_hfmse"]
    rows = [[str(r["t"]), f"{r['snr']:.3g}", f"{r['amplification']:.3g}",
             *(f"{r[k]:.3g}" for k in TERMS)] for r in result["rows"]]
    return "\n".join([
        "# DDPM-PA: each term's gradient norm on the UNet, per timestep", "",
        f"`{result['command']}`", "", result["machine"], "",
        f"After {result['warm_steps']} fine-tuning steps from the shipped source; batch of 8 `sketch` shots "
        "at one t; released weights (λ_img 4, λ_hf 4, λ_hfmse 1), the whole batch as the pairwise set.", "",
        md_table(head, rows), "",
        "`pair_min_snr=1` keeps the PA terms at SNR_t ≥ 1 (t < 259; the default 4: t < 145), where each is at most "
        "about as large as L_simple's (the largest, L_hfmse at the edge of the gate, exceeds it by about a tenth); "
        "as SNR falls below it they grow by orders of magnitude and, under clipping at norm 1, set each "
        "step.", ""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the result's JSON (.md beside it)")
    ap.add_argument("--warm-steps", type=int, default=300, help="fine-tuning steps before measuring")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[10, 100, 200, 258, 300, 500, 700, 900, 990])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="re-render the markdown from --out")
    args = ap.parse_args(argv)
    if args.report_only:
        result = read_result(args.out)
        write_markdown(args.out, render_md(result))
        return result
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = load_source(str(builtin_source("ddpm", 32)))
    shots = to_tensor(render("sketch", 10, 32, seed=0)).float() / 127.5 - 1
    cfg = DDPMPAConfig(pair_size=0, pair_min_snr=0.0, ema_decay=0.0)  # every t measured, every sample paired
    m = DDPMPA(cfg.model_copy(update={"lambda_img": 0.0, "lambda_hf": 0.0, "lambda_hfmse": 0.0}), source,
               torch.device("cpu"), seed=0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(args.warm_steps):  # plain fine-tuning: the adapted model leaves the source
        m.train_step(shots[torch.randint(0, len(shots), (8,), generator=g)])
    warm_s = time.perf_counter() - t0
    m.config = cfg  # now the released weights, for the measurement only
    abar = m.alphas_cumprod.double()
    rows = []
    for i, t in enumerate(args.timesteps):
        snr = float(abar[t] / (1 - abar[t]))
        rows.append({"t": t, "snr": snr, "amplification": snr ** -0.5,
                     **gradient_norms(m, shots[:8], t, seed=i)})
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    result = {"command": command_line("pa_gradients", argv), "machine": f"{cores()}, {processor()}",
              "warm_steps": args.warm_steps, "warm_s": warm_s, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    write_markdown(args.out, render_md(result))
    return result


if __name__ == "__main__":
    main()
