"""A ten-shot folder task in a domain unlike the built-in synthetic ones: light glyph-like strokes
on near-black backgrounds (the kind of user task with which the GAN defaults were checked, README
"Defaults on a new domain"). Writes ``shots/`` (10 images), ``reference/`` (200 images) and two task
files, one per source family, adapting the shipped sources:

    python -m benchmarks.glyph_task --out /tmp/glyphs
    orchestrate train gan_finetune --task /tmp/glyphs/gan.yaml                       # the defaults
    orchestrate train gan_finetune --task /tmp/glyphs/gan.yaml --set ema_decay=0.99778  # rosinality's EMA
    orchestrate train ddpm_finetune --task /tmp/glyphs/ddpm.yaml

The built-in domain encoder has never seen this domain (see README "Metrics"): judge the grids,
or set ``source.pretrain.encoder_data`` / ``run.metrics`` as described there.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw


def glyph(seed: int, size: int = 32) -> Image.Image:
    """One image: a near-black, slightly tinted background and a pale polyline (and sometimes an
    arc), two pixels wide."""
    r = random.Random(seed)
    im = Image.new("RGB", (size, size), (r.randint(5, 25), r.randint(5, 25), r.randint(20, 45)))
    d = ImageDraw.Draw(im)
    colour = (r.randint(200, 255), r.randint(200, 255), r.randint(150, 230))
    scale = size / 32
    points = [(r.randint(6, 26) * scale, r.randint(6, 26) * scale) for _ in range(r.randint(3, 5))]
    d.line(points, fill=colour, width=max(1, round(2 * scale)))
    if r.random() < 0.6:
        x, y = r.randint(8, 20) * scale, r.randint(8, 20) * scale
        box = [x, y, x + r.randint(6, 10) * scale, y + r.randint(6, 10) * scale]
        d.arc(box, r.randint(0, 180), r.randint(200, 360), fill=colour, width=max(1, round(2 * scale)))
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--reference", type=int, default=200)
    args = ap.parse_args()
    for name, count, offset in (("shots", args.shots, 0), ("reference", args.reference, 1000)):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            glyph(offset + i).save(folder / f"{i:03d}.png")
    for family in ("stylegan2", "ddpm"):
        short = "gan" if family == "stylegan2" else family
        (args.out / f"{short}.yaml").write_text(
            f"name: glyphs-{short}\nresolution: 32\nsource: {{family: {family}, model: builtin}}\n"
            "target: {data: shots}\nreference: {data: reference}\n")
    print(f"wrote {args.out}/shots, {args.out}/reference, {args.out}/gan.yaml, {args.out}/ddpm.yaml")


if __name__ == "__main__":
    main()
