"""What the sources shipped in ``trainers/builtin/`` draw: a sample grid per source beside real
images of the synthetic source domain, and the shipped domain classifier's verdict on their
samples (the share it assigns to each of the six synthetic domains; the acceptance bar is at least
0.8 for ``source``, as ``tests/test_shipped_sources.py`` checks on 128 samples).

    python -m benchmarks.shipped_sources [--samples 256] [--steps 50]

Writes ``benchmarks/results/shipped_sources.md`` and ``shipped_sources_<folder>.png`` (64 samples,
DDIM with ``--steps`` steps for a DDPM; the EMA generator without truncation for a StyleGAN2) and
``shipped_sources_real.png`` (64 real source images).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS


def main() -> None:
    from orchestrator.records.tracking import image_grid, png_bytes
    from orchestrator.runs.sources import RECIPE_FILE
    from trainers.builtin import HERE, SOURCES, SYNTHETIC_SOURCE, builtin_classifier, sample_source
    from trainers.data import load_images
    from trainers.metrics.domain_classifier import DomainClassifier

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps for a DDPM source")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    classifier = DomainClassifier.load(builtin_classifier(32))
    real = np.asarray(load_images(SYNTHETIC_SOURCE, 32, count=args.samples, seed=1))
    (args.out / "shipped_sources_real.png").write_bytes(png_bytes(image_grid(real[:64], 8), scale=3))
    rows = [("real source images", None, real, 0.0)]
    for (family, resolution), name in sorted(SOURCES.items()):
        if not (HERE / name).is_dir():
            print(f"{name}: not shipped")
            continue
        t0 = time.perf_counter()
        samples = sample_source(family, HERE / name, args.samples, seed=0, steps=args.steps).permute(0, 2, 3, 1).numpy()
        rows.append((name, family, samples, time.perf_counter() - t0))
        (args.out / f"shipped_sources_{name}.png").write_bytes(png_bytes(image_grid(samples[:64], 8), scale=3))

    classes = list(classifier.classes)
    lines = [f"# Shipped sources ({time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}, "
             f"{torch.get_num_threads()} threads)", "",
             f"{args.samples} samples each (DDIM {args.steps} steps for a DDPM); the share of them the shipped "
             "classifier assigns to each synthetic domain. Acceptance: `source` ≥ 0.8.", "",
             "| model | recipe | " + " | ".join(classes) + " | sampling s |",
             "|---|---|" + "---|" * len(classes) + "---|"]
    report = {}
    for name, family, images, seconds in rows:
        pred = classifier.predict(images).cpu().numpy()
        shares = {c: float(np.mean(pred == i)) for i, c in enumerate(classes)}
        recipe = "" if family is None else json.loads((HERE / name / RECIPE_FILE).read_text())["command"]
        report[name] = {"family": family, "shares": shares, "sampling_s": seconds, "recipe": recipe}
        lines.append(f"| {name} | `{recipe or 'synthetic:source, seed 1'}` | "
                     + " | ".join(f"{shares[c]:.3f}" for c in classes) + f" | {seconds:.0f} |")
        print(f"{name}: source share {shares['source']:.3f}")
    (args.out / "shipped_sources.md").write_text("\n".join(lines) + "\n")
    (args.out / "shipped_sources.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
