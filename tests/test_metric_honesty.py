"""Metrics that noise cannot pass: pure-noise samples and a blur of real target images score
clearly worse than held-out real target images on every quality metric, and not as more diverse;
the domain classifier's target rate tells them apart too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.data import DOMAINS, render
from trainers.metrics import evaluate, train_domain_encoder
from trainers.metrics.domain_classifier import train_domain_classifier

RES = 16
pytestmark = pytest.mark.slow  # trains a small encoder and classifier (a minute on two cores)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    unlabeled = np.concatenate([render(d, 200, RES, seed=3) for d in DOMAINS])
    encoder = train_domain_encoder(unlabeled, steps=120, batch_size=128, resolution=RES)
    classifier = train_domain_classifier({d: render(d, 300, RES, seed=4) for d in DOMAINS}, resolution=RES,
                                         steps=150, batch_size=128)
    return encoder, classifier


def nchw(a):
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def test_noise_and_blur_score_worse_than_real_images_and_not_more_diverse(nets):
    encoder, classifier = nets
    shots = nchw(render("sketch", 10, RES, seed=0))
    reference = nchw(render("sketch", 400, RES, seed=1))
    real = nchw(render("sketch", 200, RES, seed=2))  # held out: neither shots nor reference
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, real.shape, generator=g, dtype=torch.uint8)
    blur = F.interpolate(F.interpolate(real.float(), size=RES // 4, mode="area"), size=RES, mode="bilinear",
                         align_corners=False).round().clamp(0, 255).to(torch.uint8)
    m = {name: evaluate(s, reference, shots, [encoder]) for name, s in
         (("real", real), ("noise", noise), ("blur", blur))}
    rate = {name: classifier.rate(s, "sketch") for name, s in (("real", real), ("noise", noise), ("blur", blur))}
    r = m["real"]
    for bad in ("noise", "blur"):
        b = m[bad]
        # quality: clearly worse
        assert b["fid_domain"] > 5 * r["fid_domain"] + 0.05, (bad, b["fid_domain"], r["fid_domain"])
        assert b["kid_domain"] > r["kid_domain"] + 5 * max(r["kid_std_domain"], b["kid_std_domain"]), bad
        assert b["density_domain"] < 0.5 * r["density_domain"], bad
        assert rate[bad] < rate["real"] - 0.5, (bad, rate)
        # diversity: not more diverse than the real images (beyond the spread of the estimate)
        assert b["coverage_domain"] < 0.5 * r["coverage_domain"], bad
        spread = 2 * (b["intra_dist_std_domain"] + r["intra_dist_std_domain"])
        assert b["intra_dist_domain"] <= r["intra_dist_domain"] + spread, (bad, b["intra_dist_domain"])
        assert b["b_dist_domain"] <= r["b_dist_domain"] + spread, bad
    assert rate["real"] > 0.9


def test_copies_of_the_shots_have_fidelity_but_no_coverage(nets):
    encoder, _ = nets
    shots = nchw(render("sketch", 10, RES, seed=0))
    reference = nchw(render("sketch", 400, RES, seed=1))
    real = nchw(render("sketch", 200, RES, seed=2))
    copies = shots[torch.arange(200) % 10]
    m_real, m_copy = (evaluate(s, reference, shots, [encoder]) for s in (real, copies))
    assert m_copy["intra_dist_domain"] < 0.1 * m_real["intra_dist_domain"]  # memorised: no spread
    assert m_copy["coverage_domain"] < 0.5 * m_real["coverage_domain"]
