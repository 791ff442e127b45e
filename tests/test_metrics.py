"""Metrics: FID/KID, intra-cluster diversity, the feature networks and evaluate().

Real properties, small sizes (2 shared CPU cores): closed forms, a scipy reference, hand-built
clusters, random weights saved in the exact file formats, and a domain encoder actually trained
on the synthetic source domain.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from trainers.data import TARGET_DOMAINS, render
from trainers.metrics import (
    FID_WEIGHTS_FILE,
    LPIPS,
    DomainEncoder,
    FeatureDistance,
    FIDInceptionV3,
    InceptionExtractor,
    MissingWeightsError,
    ReferenceStats,
    available_extractors,
    evaluate,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    intra_cluster_diversity,
    kid,
    pairwise_distance_matrix,
    train_domain_encoder,
)
from trainers.metrics import weights as weights_mod

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# FID / KID
# ---------------------------------------------------------------------------------------------
def _scipy_fid(mu1, s1, mu2, s2, eps=1e-6):
    """The usual reference implementation (pytorch-fid style): sqrtm of the product, eps-offset
    fallback, imaginary parts dropped."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(400, 16))
    assert fid_from_features(x, x) < 1e-8
    # also with fewer samples than dimensions (singular covariance)
    y = np.random.default_rng(1).normal(size=(20, 64))
    assert fid_from_features(y, y) < 1e-8


def test_fid_grows_with_mean_shift_and_matches_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))  # correlated features
    direction = rng.normal(size=8)
    values = []
    for delta in [0.0, 0.25, 0.5, 1.0, 2.0]:
        shift = delta * direction
        fid = fid_from_features(x, x + shift)  # equal covariances: FID = |Δμ|²
        assert fid == pytest.approx(float(shift @ shift), rel=1e-6, abs=1e-8)
        values.append(fid)
    assert all(b > a for a, b in zip(values, values[1:]))
    # Gaussians with equal covariances given directly
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a = rng.normal(size=(5, 5))
    s = a @ a.T + np.eye(5)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float((mu1 - mu2) @ (mu1 - mu2)), rel=1e-9)
    # Closed form for different isotropic covariances: |Δμ|² + d (σ1 - σ2)²
    d = 6
    expect = d * (2.0 - 0.5) ** 2  # σ1 = 2, σ2 = 0.5
    assert frechet_distance(np.zeros(d), 4 * np.eye(d), np.zeros(d), 0.25 * np.eye(d)) == pytest.approx(expect)


@pytest.mark.parametrize("n,d", [(200, 20), (500, 32), (40, 64), (12, 30)])
def test_frechet_distance_agrees_with_scipy_sqrtm(n, d):
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + rng.normal(size=d) * 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-3)


def test_feature_statistics_float64_and_torch_input():
    x = torch.randn(50, 4, dtype=torch.float32)
    mu, s = feature_statistics(x)
    assert mu.dtype == np.float64 and s.dtype == np.float64 and s.shape == (4, 4)
    np.testing.assert_allclose(s, np.cov(x.double().numpy(), rowvar=False), rtol=1e-10)


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same_mean, same_std = kid(x, y, num_subsets=20, subset_size=200, seed=0)
    shifted_mean, shifted_std = kid(x, y + 0.75, num_subsets=20, subset_size=200, seed=0)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 0.05 and shifted_mean > 10 * shifted_std
    assert shifted_mean > 20 * abs(same_mean)
    # subset size is clipped to the smaller set; deterministic for a seed
    m1 = kid(x[:30], y, num_subsets=5, subset_size=1000, seed=3)
    m2 = kid(torch.from_numpy(x[:30]), torch.from_numpy(y), num_subsets=5, subset_size=1000, seed=3)
    assert m1 == pytest.approx(m2)


# ---------------------------------------------------------------------------------------------
# intra-cluster diversity
# ---------------------------------------------------------------------------------------------
def _hand_built():
    shots = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0]])
    samples = torch.tensor(
        [
            [9.0, 0.0], [11.0, 0.0], [10.0, 1.0],  # cluster 0: distances 2, √2, √2
            [0.0, 9.0], [0.0, 11.0],  # cluster 1: distance 2
            [-10.0, 0.5],  # cluster 2: one member (excluded); cluster 3 empty
        ]
    )
    d0, d1 = (2 + 2 * math.sqrt(2)) / 3, 2.0
    return samples, shots, d0, d1


def test_intra_cluster_diversity_hand_built_exact():
    samples, shots, d0, d1 = _hand_built()
    res = intra_cluster_diversity(samples, shots, "l2", max_per_cluster=50, seed=0)
    assert res.cluster_sizes == [3, 2, 1, 0]
    assert res.kept_sizes == [3, 2, 1, 0]
    assert res.intra == pytest.approx((d0 + d1) / 2, rel=1e-6)
    assert res.per_cluster[:2] == pytest.approx([d0, d1], rel=1e-6)
    assert math.isnan(res.per_cluster[2]) and math.isnan(res.per_cluster[3])
    # balanced (LFS-GAN): Σ -p log10 p · D_c, p_c = n_c/N + 1e-5, D_c = 0 for < 2 members
    p = [3 / 6 + 1e-5, 2 / 6 + 1e-5]
    expect = -p[0] * math.log10(p[0]) * d0 - p[1] * math.log10(p[1]) * d1
    assert res.balanced == pytest.approx(expect, rel=1e-6)


def test_intra_cluster_diversity_generic_callable_path_matches_fast_path():
    samples, shots, d0, d1 = _hand_built()

    def l2_aligned(a, b):  # no .pairwise attribute -> generic batched path
        return (a - b).norm(dim=1)

    fast = intra_cluster_diversity(samples, shots, FeatureDistance("l2"))
    slow = intra_cluster_diversity(samples, shots, l2_aligned, batch_size=3)
    assert slow.intra == pytest.approx(fast.intra, rel=1e-6)
    assert slow.balanced == pytest.approx(fast.balanced, rel=1e-6)
    m1 = pairwise_distance_matrix(samples, shots, l2_aligned, batch_size=5)
    m2 = pairwise_distance_matrix(samples, shots, FeatureDistance("l2"))
    torch.testing.assert_close(m1, m2)


def test_intra_cluster_diversity_cap_and_single_member_clusters():
    # shots at 10·e_i in R^8; cluster 0 has 7 samples 10·e_0 + e_j (j = 1..7): every pair is
    # exactly √2 apart, so the value is √2 whichever members the cap keeps.
    dim = 8
    shots = 10 * torch.eye(dim)[:3]
    c0 = 10 * torch.eye(dim)[0] + torch.eye(dim)[1:8]
    c1 = torch.stack([10 * torch.eye(dim)[1]])  # a single member: excluded
    samples = torch.cat([c0, c1])
    for cap in (2, 3, 50):
        res = intra_cluster_diversity(samples, shots, "l2", max_per_cluster=cap, seed=1)
        assert res.cluster_sizes == [7, 1, 0]
        assert res.kept_sizes == [min(7, cap), 1, 0]
        assert res.intra == pytest.approx(math.sqrt(2), rel=1e-6)
        # p uses the sizes before the cap
        p0 = 7 / 8 + 1e-5
        assert res.balanced == pytest.approx(-p0 * math.log10(p0) * math.sqrt(2), rel=1e-6)
    # cap makes the number of evaluated pairs C(cap, 2): count calls of a generic distance
    pairs = []

    def counting(a, b):
        pairs.append(len(a))
        return (a - b).norm(dim=1)

    intra_cluster_diversity(samples, shots, counting, max_per_cluster=4, batch_size=10_000)
    assert sum(pairs) == len(samples) * len(shots) + 4 * 3 // 2
    # no cluster with two members -> NaN intra, 0 balanced
    res = intra_cluster_diversity(samples[-1:], shots, "l2")
    assert math.isnan(res.intra) and res.balanced == 0.0


# ---------------------------------------------------------------------------------------------
# weight files: LPIPS and Inception
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_default_weights(tmp_path, monkeypatch):
    """Hide every default weight location so that only what a test writes is found."""
    empty = tmp_path / "empty_hub"
    empty.mkdir()
    monkeypatch.setattr(weights_mod, "torch_hub_checkpoint_dirs", lambda: [empty])
    monkeypatch.setattr("trainers.metrics.lpips.lpips_package_weight_dir", lambda: None)
    monkeypatch.delenv(weights_mod.WEIGHTS_ENV, raising=False)
    return empty


def _write_lpips_weights(folder, net: str, seed: int = 0):
    torch.manual_seed(seed)
    model = LPIPS(net)
    backbone = {f"features.{k.split('features.', 1)[1]}": v for k, v in model.backbone.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry a classifier too
    bfile, lfile = LPIPS.weight_files(net)
    torch.save(backbone, folder / bfile)
    lins = {f"lin{i}.model.1.weight": lin.model[1].weight.detach().abs() for i, lin in enumerate(model.lins)}
    torch.save(lins, folder / lfile)
    return backbone, lins


def test_lpips_loads_standard_files_and_is_a_distance(tmp_path, no_default_weights):
    backbone, lins = _write_lpips_weights(tmp_path, "vgg")
    # key names: what torchvision's vgg16().features and the lpips package use
    assert "features.28.weight" in backbone and "lin4.model.1.weight" in lins
    assert lins["lin2.model.1.weight"].shape == (1, 256, 1, 1)
    lp = LPIPS.from_pretrained("vgg", weights_dir=tmp_path)
    torch.testing.assert_close(lp.backbone.features[28].weight, backbone["features.28.weight"])
    torch.testing.assert_close(lp.lins[4].model[1].weight, lins["lin4.model.1.weight"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    dxy, dyx, dxx = lp(x, y), lp(y, x), lp(x, x)
    assert dxy.shape == (4,) and torch.isfinite(dxy).all()
    assert torch.all(dxx.abs() < 1e-7)
    torch.testing.assert_close(dxy, dyx)
    assert torch.all(dxy > 0)
    # float input in [-1, 1] is the LPIPS convention and gives the same numbers
    torch.testing.assert_close(lp(x.float() / 127.5 - 1, y.float() / 127.5 - 1), dxy)
    # pairwise fast path agrees with aligned calls
    m = lp.pairwise(x, y[:3])
    assert m.shape == (4, 3)
    torch.testing.assert_close(m[torch.arange(3), torch.arange(3)], dxy[:3], rtol=1e-4, atol=1e-6)
    # a lin file given explicitly by path also works
    lp2 = LPIPS.from_pretrained("vgg", backbone_path=tmp_path / "vgg16-397923af.pth", lin_path=tmp_path / "vgg.pth")
    torch.testing.assert_close(lp2(x, y), dxy)


def test_lpips_alexnet_loads(tmp_path, no_default_weights):
    _write_lpips_weights(tmp_path, "alex", seed=1)
    lp = LPIPS.from_pretrained("alex", weights_dir=tmp_path)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert lp(x, x.flip(0)).shape == (2,)
    assert torch.all(lp(x, x).abs() < 1e-7)
    with pytest.raises(ValueError, match="at least 31"):
        lp(x[..., :16, :16], x[..., :16, :16])


def test_missing_lpips_weights_name_the_files(tmp_path, no_default_weights):
    with pytest.raises(MissingWeightsError) as err:
        LPIPS.from_pretrained("vgg", weights_dir=tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "vgg16-397923af.pth" in msg and "vgg.pth" in msg
    assert str(tmp_path) in msg and str(no_default_weights) in msg
    assert "how to obtain" in msg
    # only the lin file missing -> only it is named
    _write_lpips_weights(tmp_path, "alex")
    (tmp_path / "alex.pth").unlink()
    with pytest.raises(MissingWeightsError) as err:
        LPIPS.from_pretrained("alex", weights_dir=tmp_path)
    assert err.value.filenames == ["alex.pth"]


def test_inception_loads_pytorch_fid_format(tmp_path, no_default_weights):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # non-trivial BN statistics, so that loading them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"] = torch.zeros(1008, 2048)  # the file has the 1008-class classifier
    sd["fc.bias"] = torch.zeros(1008)
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch1x1.conv.weight",
                "Mixed_7c.branch3x3dbl_3b.bn.bias", "Mixed_6e.branch7x7dbl_5.conv.weight"):
        assert key in sd
    torch.save(sd, tmp_path / FID_WEIGHTS_FILE)
    with pytest.raises(MissingWeightsError) as err:
        InceptionExtractor.from_pretrained(weights_dir=tmp_path / "elsewhere")
    assert FID_WEIGHTS_FILE in str(err.value) and "elsewhere" in str(err.value)
    ext = InceptionExtractor.from_pretrained(weights_dir=tmp_path)
    torch.testing.assert_close(ext.net.Mixed_7c.branch_pool.bn.running_var, net.Mixed_7c.branch_pool.bn.running_var)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f = ext.features(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    assert (f >= 0).all()  # pool of ReLU outputs
    # numpy [N,H,W,3] input gives the same features
    torch.testing.assert_close(ext.features(x.permute(0, 2, 3, 1).numpy()), f)
    assert ext.name == "inception"


# ---------------------------------------------------------------------------------------------
# domain encoder
# ---------------------------------------------------------------------------------------------
ENC_RES = 32


@pytest.fixture(scope="module")
def domain_encoder():
    src = render("source", 512, ENC_RES, seed=0)
    t0 = time.perf_counter()
    enc = train_domain_encoder(src, steps=200, batch_size=64, device="cpu", seed=0, resolution=ENC_RES)
    enc.train_info["test_seconds"] = time.perf_counter() - t0
    return enc


def test_domain_encoder_separates_target_domains(domain_encoder):
    """Trained on *source* images only (200 steps, 32², batch 64; ~17 s on one shared core).

    Measured over training seeds 0-3: nearest-centroid accuracy 0.725-0.738 over the 6 domains
    (chance 1/6; most errors are mosaic images taken for source; an untrained encoder of the same
    shape gets ~0.72 too, so per-image accuracy is not where training shows). At the level of
    distributions, which is what FID/KID use, every domain is identified, the nearest other
    domain is >= 7x farther than a second sample of the same domain, and the geometric-mean
    separation ratio is 27-35 trained vs 13-14 untrained. Thresholds below leave margin.
    """
    enc = domain_encoder
    assert enc.train_info["test_seconds"] < 60
    domains = ["source", *TARGET_DOMAINS]
    assert len(domains) == 6
    feats = {d: enc.features(render(d, 60, ENC_RES, seed=123)) for d in domains}
    assert feats["source"].shape == (60, enc.dim)
    torch.testing.assert_close(feats["source"].norm(dim=1), torch.ones(60))
    centroids = torch.stack([F.normalize(feats[d][:20].mean(0), dim=0) for d in domains])
    correct = sum(int(((feats[d][20:] @ centroids.T).argmax(1) == i).sum()) for i, d in enumerate(domains))
    accuracy = correct / (40 * len(domains))
    print(f"nearest-centroid accuracy {accuracy:.3f}; training {enc.train_info}")
    assert accuracy > 0.5  # chance: 1/6
    # distribution level, what FID sees: each held-out set is closest to its own domain
    ratio = _fid_separation(enc, domains)
    print("FID nearest-other / same-domain ratios", ratio.round(1))
    assert ratio.min() > 3
    # and training helps there: an untrained encoder of the same shape separates less
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = DomainEncoder(ENC_RES).eval()
    ratio0 = _fid_separation(untrained, domains)
    gmean, gmean0 = float(np.exp(np.log(ratio).mean())), float(np.exp(np.log(ratio0).mean()))
    print(f"geometric-mean ratio trained {gmean:.1f}, untrained {gmean0:.1f} {ratio0.round(1)}")
    assert gmean > 1.5 * gmean0


def _fid_separation(enc, domains) -> np.ndarray:
    """Per domain: FID to the nearest *other* domain / FID to a second sample of its own."""
    a = {d: enc.features(render(d, 150, ENC_RES, seed=7)) for d in domains}
    b = {d: enc.features(render(d, 150, ENC_RES, seed=8)) for d in domains}
    fid = np.array([[fid_from_features(a[x], b[y]) for y in domains] for x in domains])
    assert (fid.argmin(axis=1) == np.arange(len(domains))).all(), fid
    return np.where(np.eye(len(domains), dtype=bool), np.inf, fid).min(axis=1) / fid.diagonal()


def test_domain_encoder_save_load_roundtrip(domain_encoder, tmp_path):
    path = domain_encoder.save(tmp_path / "enc" / "domain.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["resolution"] == ENC_RES and "state_dict" in blob
    loaded = DomainEncoder.load(path)
    x = render("night", 8, 64, seed=0)  # other resolutions are resized to the encoder's
    torch.testing.assert_close(loaded.features(x), domain_encoder.features(x))
    assert loaded.train_info["steps"] == 200
    with pytest.raises(MissingWeightsError, match="nothere.pt"):
        DomainEncoder.load(tmp_path / "nothere.pt")


def test_domain_encoder_training_is_fast_and_deterministic():
    src = render("source", 64, 16, seed=0)
    e1 = train_domain_encoder(src, steps=3, batch_size=16, seed=5, resolution=16)
    e2 = train_domain_encoder(src, steps=3, batch_size=16, seed=5, resolution=16)
    x = render("pastel", 4, 16, seed=0)
    torch.testing.assert_close(e1.features(x), e2.features(x))
    assert 0.2e6 < sum(p.numel() for p in e1.parameters()) < 1e6


# ---------------------------------------------------------------------------------------------
# evaluate()
# ---------------------------------------------------------------------------------------------
def test_evaluate_returns_named_finite_metrics_and_caches_reference(domain_encoder):
    torch.manual_seed(0)
    lp = LPIPS("vgg")
    with torch.no_grad():
        for lin in lp.lins:
            lin.model[1].weight.abs_()
    samples = torch.from_numpy(render("sketch", 48, 32, seed=1)).permute(0, 3, 1, 2).contiguous()
    reference = render("sketch", 64, 32, seed=2)
    shots = render("sketch", 4, 32, seed=3)
    cache = ReferenceStats()
    details: dict = {}
    kw = dict(max_per_cluster=8, kid_subset_size=32, kid_subsets=10, seed=0, batch_size=16, cache=cache)
    out = evaluate(samples, reference, shots, [domain_encoder, lp], details=details, **kw)
    expected = {
        "num_samples", "num_reference", "fid_domain", "kid_domain", "kid_std_domain",
        "intra_dist_domain", "b_dist_domain", "intra_lpips_vgg", "b_lpips_vgg",
    }
    assert expected <= set(out)
    assert all(math.isfinite(v) for v in out.values()), out
    assert out["num_samples"] == 48 and out["num_reference"] == 64
    assert out["intra_lpips_vgg"] > 0 and out["intra_dist_domain"] > 0
    assert sum(details["clusters_domain"]) == 48 and len(details["clusters_lpips_vgg"]) == 4
    # second call against the same reference: statistics come from the cache, same numbers
    misses = cache.misses
    out2 = evaluate(samples, reference, shots, [domain_encoder], **kw)
    assert cache.misses == misses and cache.hits > 0
    assert out2["fid_domain"] == pytest.approx(out["fid_domain"])
    # the same domain scores better than another domain against this reference
    other = evaluate(render("night", 48, 32, seed=1), reference, shots, [domain_encoder], **kw)
    assert other["fid_domain"] > 3 * out["fid_domain"]


def test_available_extractors(tmp_path, no_default_weights, domain_encoder):
    path = domain_encoder.save(tmp_path / "domain.pt")
    _write_lpips_weights(tmp_path, "vgg")
    exts = available_extractors(["domain", "lpips_vgg"], domain_encoder_path=path, weights_dir=tmp_path)
    assert [e.name for e in exts] == ["domain", "lpips_vgg"]
    with pytest.raises(MissingWeightsError) as err:
        available_extractors(["inception", "lpips_alex"], weights_dir=tmp_path)
    msg = str(err.value)
    assert FID_WEIGHTS_FILE in msg and "alexnet-owt-7be5be79.pth" in msg and "alex.pth" in msg
    with pytest.raises(MissingWeightsError):
        available_extractors(["domain"])
    with pytest.raises(ValueError, match="unknown extractor"):
        available_extractors(["clip"])
