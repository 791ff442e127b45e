"""Self-annotation (trainers/annotate.py) and self-guided diffusion (trainers/diffusion/self_guided.py),
on tiny models (16² images, the tiny UNet preset, a few steps) on the CPU."""

import copy
import itertools

import pytest
import torch

from trainers import annotate
from trainers.annotate import Annotator, assign, cached_labels, kmeans, load_domain_encoder
from trainers.base import PrepareContext
from trainers.common import generator_states, load_generator_states, random_batch
from trainers.data.synthetic import render
from trainers.diffusion import self_guided as sg
from trainers.diffusion.backbone import DiffusionSource, build_unet, ddim_sample, default_scheduler, load_source
from trainers.diffusion.self_guided import (
    SelfGuided,
    SelfGuidedConfig,
    SelfGuidedPretrain,
    SelfGuidedPretrainConfig,
    guidance_combine,
    is_self_guided_source,
)
from trainers.metrics.domain_encoder import DomainEncoder, train_domain_encoder
from trainers.perf import DevicePerf

RES = 16


def tiny_source(seed: int = 0) -> DiffusionSource:
    torch.manual_seed(seed)
    return DiffusionSource(build_unet("tiny", RES), default_scheduler(), "test")


def images_of(domain: str, n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(render(domain, n, RES, seed=seed)).permute(0, 3, 1, 2).contiguous()


def random_encoder_file(path, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = DomainEncoder(resolution=RES, widths=(8, 8, 16, 16))
    return enc.eval().save(path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is much faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A tiny DomainEncoder trained for two SimCLR steps on synthetic source images."""
    enc = train_domain_encoder(render("source", 32, RES), steps=2, batch_size=16, resolution=RES,
                               widths=(8, 8, 16, 16), proj_dim=16, seed=0)
    return enc.save(tmp_path_factory.mktemp("enc") / "domain_encoder.pt")


@pytest.fixture(scope="module")
def shots():
    return images_of("sketch", 5)


@pytest.fixture(scope="module")
def sg_source(tmp_path_factory, encoder_file):
    """A self-guided source: self_guided_pretrain (k = 3) prepared on 24 source images, 2 steps, exported."""
    cfg = SelfGuidedPretrainConfig(preset="tiny", k=3, batch_size=4, ema_decay=0.9, kmeans_iters=10)
    m = SelfGuidedPretrain(cfg, RES, "cpu", seed=0)
    source_images = images_of("source", 24)
    m.prepare(source_images, PrepareContext(domain_encoder=encoder_file))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch, idx = random_batch(source_images, 4, gen, return_index=True)
        m.train_step(batch, index=idx)
    folder = m.export(tmp_path_factory.mktemp("sg") / "source")
    return folder, m


# ---------------------------------------------------------------------------------------------
# annotate.py
# ---------------------------------------------------------------------------------------------
def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    dirs, _ = torch.linalg.qr(torch.randn(16, 4, generator=g))  # 4 orthonormal directions in R^16
    truth = torch.arange(4).repeat_interleave(30)
    x = dirs.T[truth] + 0.08 * torch.randn(120, 16, generator=g)
    x = x * torch.empty(120, 1).uniform_(0.3, 5.0, generator=g)  # norms vary: clustering is on directions
    perm = torch.randperm(120, generator=g)
    x, truth = x[perm], truth[perm]
    for seed in range(3):
        centroids, labels = kmeans(x, 4, seed=seed)
        assert centroids.shape == (4, 16) and torch.allclose(centroids.norm(dim=1), torch.ones(4))
        # agreement up to a permutation: each true cluster maps to exactly one label, bijectively
        mapping = {int(t): set(labels[truth == t].tolist()) for t in range(4)}
        assert all(len(v) == 1 for v in mapping.values()), mapping
        assert len({next(iter(v)) for v in mapping.values()}) == 4
        assert torch.equal(assign(x, centroids), labels)
        assert torch.equal(assign(7.0 * x, centroids), labels)  # assignment normalises too
    c1, l1 = kmeans(x, 4, seed=5)
    c2, l2 = kmeans(x, 4, seed=5)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    _, own = kmeans(x[:6], 6)
    assert sorted(own.tolist()) == list(range(6))
    with pytest.raises(ValueError, match="k <= number of points"):
        kmeans(x[:3], 4)


def test_annotator_save_load_and_module_encoder(tmp_path, encoder_file):
    enc = load_domain_encoder(encoder_file)
    assert enc._self_guided_digest == annotate.file_digest(encoder_file)
    imgs = images_of("source", 12)
    ann = Annotator.fit(enc, imgs, 3, seed=0, encoder_digest=enc._self_guided_digest)
    back = Annotator.load(ann.save(tmp_path / "a.pt"))  # the DomainEncoder is embedded
    assert back.encoder_digest == ann.encoder_digest and back.digest == ann.digest
    assert torch.equal(back.labels(imgs), ann.labels(imgs))
    # any nn.Module as the feature function: not embedded, its digest is checked on load
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    menc = annotate.ModuleEncoder(module, size=24)
    assert menc.features(imgs).shape == (12, 4)
    mann = Annotator.fit(menc, imgs, 2)
    mann.save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="not embedded"):
        Annotator.load(tmp_path / "m.pt")
    assert Annotator.load(tmp_path / "m.pt", encoder=menc).digest == mann.digest
    other = annotate.ModuleEncoder(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(ValueError, match="digest"):
        Annotator.load(tmp_path / "m.pt", encoder=other)


def test_label_cache_is_reused_and_invalidated(tmp_path):
    calls = []

    def fn(images):
        calls.append(1)
        return images.flatten(1).sum(1) % 3

    imgs = images_of("source", 4)
    first = cached_labels(tmp_path, "enc-a", imgs, fn, k=3, seed=0)
    again = cached_labels(tmp_path, "enc-a", imgs.clone(), fn, k=3, seed=0)
    assert len(calls) == 1 and torch.equal(first, again)  # reused: fn not called again
    cached_labels(tmp_path, "enc-b", imgs, fn, k=3, seed=0)  # another encoder
    assert len(calls) == 2
    changed = imgs.clone()
    changed[0, 0, 0, 0] ^= 1  # one bit of one image
    cached_labels(tmp_path, "enc-a", changed, fn, k=3, seed=0)
    assert len(calls) == 3
    cached_labels(tmp_path, "enc-a", imgs, fn, k=4, seed=0)
    cached_labels(tmp_path, "enc-a", imgs, fn, k=3, seed=1)
    assert len(calls) == 5
    cached_labels(None, "enc-a", imgs, fn, k=3, seed=0)  # no cache folder: always computed
    assert len(calls) == 6


def test_prepare_uses_the_cache_and_recomputes_for_another_encoder(tmp_path, monkeypatch, encoder_file, shots):
    calls = []
    real = sg.kmeans
    monkeypatch.setattr(sg, "kmeans", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    cfg = SelfGuidedConfig(k_target=2)
    ctx = PrepareContext(domain_encoder=encoder_file, cache_dir=tmp_path / "cache")
    a = SelfGuided(cfg, tiny_source(), "cpu")
    a.prepare(shots, ctx)
    b = SelfGuided(cfg, tiny_source(), "cpu")
    b.prepare(shots, ctx)
    assert len(calls) == 1 and torch.equal(a.labels, b.labels)
    other = random_encoder_file(tmp_path / "other.pt", seed=7)
    b.prepare(shots, PrepareContext(domain_encoder=other, cache_dir=tmp_path / "cache"))
    assert len(calls) == 2
    b.prepare(images_of("sketch", 5, seed=1), ctx)
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# the conditional model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditioning", ["concat", "add"])
def test_zero_initialised_embedding_leaves_the_source_unchanged(conditioning):
    reference = tiny_source(seed=3).unet.eval()
    m = SelfGuided(SelfGuidedConfig(conditioning=conditioning, k_target=4), tiny_source(seed=3), "cpu")
    net = m.unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, RES, RES, generator=g)
    t = torch.tensor([0, 7, 250, 640, 999])
    with torch.no_grad():
        ref = reference(x, t).sample
        for label in (0, 1, 3, -1):  # three labels and the null condition
            out = net(x, t, net.condition(torch.full((5,), label))).sample
            assert torch.allclose(out, ref, atol=1e-6, rtol=0), (label, (out - ref).abs().max())
            if conditioning == "add":
                assert torch.equal(out, ref)  # emb + 0: bit-exact
        mixed = net(x, t, net.condition(torch.tensor([0, 1, 2, 3, -1]))).sample
        assert torch.allclose(mixed, ref, atol=1e-6, rtol=0)


def test_frozen_time_units_stay_zero_and_the_condition_learns(encoder_file, shots):
    m = SelfGuided(SelfGuidedConfig(k_target=3, lr=1e-3, ema_decay=0, p=0.0, batch_size=4), tiny_source(), "cpu")
    m.prepare(shots, PrepareContext(domain_encoder=encoder_file))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch, idx = random_batch(shots, 4, gen, return_index=True)
        m.train_step(batch, index=idx)
    assert float(m.unet.frozen_values_max()) == 0.0
    assert m.unet.cond_mlp[2].weight.abs().max() > 0  # the zero layer got gradient
    net = m.unet.eval()
    x, t = torch.randn(2, 3, RES, RES), torch.tensor([500, 500])
    with torch.no_grad():
        a = net(x, t, net.condition(torch.tensor([0, 0]))).sample
        b = net(x, t, net.condition(torch.tensor([-1, -1]))).sample
    assert not torch.allclose(a, b)


def _condition_gap(mult: float, encoder_file, shots, steps: int = 20) -> float:
    """|eps_c - eps_null| / |eps_null| on fixed inputs after ``steps`` steps at ``cond_lr_mult``."""
    m = SelfGuided(SelfGuidedConfig(k_target=2, lr=2e-4, ema_decay=0, p=0.1, batch_size=4, cond_lr_mult=mult),
                   tiny_source(), "cpu", seed=0)
    m.prepare(shots, PrepareContext(domain_encoder=encoder_file))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        m.train_step(*_batch(shots, gen, size=4))
    net = m.unet.eval()
    x, t = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(5)), torch.full((4,), 400)
    with torch.no_grad():
        eps_c = net(x, t, net.condition(torch.tensor([0, 1, 0, 1]))).sample
        eps_u = net(x, t, net.condition(torch.tensor([-1, -1, -1, -1]))).sample
    return float((eps_c - eps_u).norm() / eps_u.norm())


def test_the_condition_lr_multiplier_makes_the_condition_act_sooner(encoder_file, shots):
    """From an unconditional source the condition starts at zero (guidance changes nothing); its
    own learning rate decides how soon eps_c and eps_null part."""
    default = SelfGuidedConfig().cond_lr_mult
    assert default == 10.0  # chosen on the shipped source (the module docstring)
    base, fast = _condition_gap(1.0, encoder_file, shots), _condition_gap(default, encoder_file, shots)
    assert base > 0 and fast > 3 * base, (base, fast)  # at the default, ε_c and ε_∅ part sooner
    m = SelfGuided(SelfGuidedConfig(k_target=2, lr=1e-4, cond_lr_mult=10.0), tiny_source(), "cpu")
    lrs = sorted(g["lr"] for g in m.optimizer.param_groups)
    assert lrs == pytest.approx([1e-4, 1e-3])
    mlp = {id(p) for p in m.unet.cond_mlp.parameters()}
    assert {id(p) for p in m.optimizer.param_groups[1]["params"]} == mlp


def test_loss_falls_on_a_tiny_model(encoder_file, shots):
    m = SelfGuided(SelfGuidedConfig(lr=2e-3, batch_size=8, ema_decay=0, k_target=2), tiny_source(), "cpu")
    images = shots[:2]
    m.prepare(images, PrepareContext(domain_encoder=encoder_file))
    gen = torch.Generator().manual_seed(1)
    losses = [m.train_step(*_batch(images, gen, size=8))["loss"] for _ in range(60)]
    assert sum(losses[-15:]) / 15 < 0.8 * sum(losses[:15]) / 15
    assert m.step == 60


def test_label_dropout_rate_is_as_configured():
    m = SelfGuided(SelfGuidedConfig(p=0.3, k_target=2), tiny_source(), "cpu", seed=1)
    draws = torch.cat([m.drop_mask(1000) for _ in range(20)])
    rate = draws.float().mean().item()
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / len(draws)) ** 0.5, rate
    assert not m.__class__(SelfGuidedConfig(p=0.0, k_target=2), tiny_source(), "cpu").drop_mask(500).any()
    assert m.__class__(SelfGuidedConfig(p=1.0, k_target=2), tiny_source(), "cpu").drop_mask(500).all()
    # dropped rows become the null condition (the all-zero one-hot)
    cond = m.unet.condition(torch.tensor([0, 1, 1, 0]), torch.tensor([True, False, True, False]))
    assert torch.equal(cond, torch.tensor([[0.0, 0], [0, 1], [0, 0], [1, 0]]))


def test_guidance_endpoints_on_eps():
    g = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    assert torch.equal(guidance_combine(eps_c, eps_u, 0.0), eps_u)
    assert torch.equal(guidance_combine(eps_c, eps_u, 1.0), eps_c)
    assert torch.allclose(guidance_combine(eps_c, eps_u, 2.0), eps_u + 2 * (eps_c - eps_u), atol=1e-6)


class _Fixed(torch.nn.Module):
    """An unconditional-looking UNet for backbone.ddim_sample: the net with a fixed condition."""

    def __init__(self, net, cond):
        super().__init__()
        self.net, self.cond = net, cond

    def forward(self, x, t):
        return self.net(x, t, self.cond)


def test_guided_sampler_endpoints_match_plain_ddim():
    m = SelfGuided(SelfGuidedConfig(k_target=3, ema_decay=0), tiny_source(), "cpu")
    with torch.no_grad():  # a trained-looking condition embedding, so that conditional != unconditional
        m.unet.cond_mlp[2].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1])
    net = m.unet
    uncond = m.sample_labels(labels, steps=3, seed=4, guidance=0.0)
    cond = m.sample_labels(labels, steps=3, seed=4, guidance=1.0)
    plain_u = ddim_sample(_Fixed(net, torch.zeros(3, 3)), m.scheduler, 3, RES, 3, m.device, seed=4)
    plain_c = ddim_sample(_Fixed(net, net.condition(labels)), m.scheduler, 3, RES, 3, m.device, seed=4)
    assert uncond.dtype == torch.uint8 and uncond.shape == (3, 3, RES, RES)
    assert torch.equal(uncond, plain_u) and torch.equal(cond, plain_c)
    assert not torch.equal(uncond, cond)
    guided = m.sample_labels(labels, steps=3, seed=4)  # default w = 2
    assert not torch.equal(guided, cond)
    assert torch.equal(m.sample_labels(torch.tensor([-1, -1, -1]), steps=3, seed=4, guidance=2.0), plain_u)


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------
def test_prepare_new_clusters_from_an_unconditional_source(encoder_file, shots):
    m = SelfGuided(SelfGuidedConfig(k_target=3), tiny_source(), "cpu")
    assert m.num_classes == 3 and m.wants_index
    with pytest.raises(ValueError, match="needs an image encoder"):
        m.prepare(shots, PrepareContext())
    m.prepare(shots, PrepareContext(domain_encoder=encoder_file))
    assert m.labels.shape == (5,) and set(m.labels.tolist()) == {0, 1, 2}
    assert torch.equal(m.annotator.labels(shots), m.labels)  # each shot is nearest its own centroid
    few = SelfGuided(SelfGuidedConfig(k_target=9), tiny_source(), "cpu")
    few.prepare(shots[:2], PrepareContext(domain_encoder=encoder_file))  # at most one cluster per shot
    assert sorted(few.labels.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="needs a self-guided source"):
        SelfGuided(SelfGuidedConfig(target_labels="nearest_source"), tiny_source(), "cpu")
    drawn = m.draw_labels(200, seed=1)
    assert set(drawn.tolist()) <= set(m.labels.tolist()) and torch.equal(drawn, m.draw_labels(200, seed=1))


def test_prepare_on_a_self_guided_source(sg_source, shots):
    folder, pre = sg_source
    near = SelfGuided(SelfGuidedConfig(target_labels="nearest_source"), load_source(str(folder)), "cpu")
    assert near.num_classes == 3 and near.source_annotator.k == 3
    near.prepare(shots)  # the source's annotator brings its encoder: no context needed
    assert torch.equal(near.labels, pre.annotator.labels(shots))
    assert near.labels.max() < 3
    new = SelfGuided(SelfGuidedConfig(target_labels="new_clusters", k_target=2, ema_decay=0),
                     load_source(str(folder)), "cpu")
    assert new.num_classes == 5
    new.prepare(shots)
    assert set(new.labels.tolist()) == {3, 4}  # appended after the source's 3 labels
    assert new.annotator.ids.tolist() == [0, 1, 2, 3, 4]
    net = new.unet.eval()  # a new label starts as the null condition
    x, t = torch.randn(2, 3, RES, RES), torch.tensor([100, 900])
    with torch.no_grad():
        assert torch.equal(net(x, t, net.condition(torch.tensor([3, 4]))).sample,
                           net(x, t, net.condition(torch.tensor([-1, -1]))).sample)


def test_export_loads_back_as_a_self_guided_source(sg_source, shots, tmp_path):
    folder, pre = sg_source
    assert is_self_guided_source(folder) and (folder / "annotator.pt").is_file()
    src = load_source(str(folder))  # the project's ordinary loader reads the UNet
    m = SelfGuided(SelfGuidedConfig(target_labels="nearest_source", ema_decay=0), src, "cpu")
    assert torch.equal(m.source_annotator.centroids, pre.annotator.centroids)
    assert m.source_annotator.encoder_digest == pre.annotator.encoder_digest
    x, t = torch.randn(3, 3, RES, RES), torch.tensor([10, 500, 990])
    with torch.no_grad():
        cond = m.unet.condition(torch.tensor([0, 2, -1]))
        assert torch.equal(m.unet.eval()(x, t, cond).sample, pre.sampling_unet(x, t, cond).sample)
    # a fine-tuned model (new clusters) exports its whole label space
    ft = SelfGuided(SelfGuidedConfig(k_target=2, batch_size=3), load_source(str(folder)), "cpu")
    with pytest.raises(RuntimeError, match="prepare"):
        ft.export(tmp_path / "too-early")
    ft.prepare(shots)
    batch, idx = random_batch(shots, 3, torch.Generator().manual_seed(0), return_index=True)
    ft.train_step(batch, index=idx)
    again = SelfGuided(SelfGuidedConfig(target_labels="nearest_source"), load_source(str(ft.export(tmp_path / "ft"))),
                       "cpu")
    assert again.num_classes == 5 and again.source_annotator.ids.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(again.source_annotator.labels(shots), ft.annotator.labels(shots))


def test_state_dict_resumes_exactly(encoder_file, shots):
    cfg = SelfGuidedConfig(k_target=2, batch_size=3, ema_decay=0.9, p=0.5, warmup_steps=10)
    ctx = PrepareContext(domain_encoder=encoder_file)
    a = SelfGuided(cfg, tiny_source(), "cpu", seed=3)
    a.prepare(shots, ctx)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.train_step(*_batch(shots, gen))
    state = copy.deepcopy(a.state_dict())
    gens = copy.deepcopy(generator_states(a))  # the RNGs travel beside the state (trainers.common)
    b = SelfGuided(cfg, tiny_source(seed=1), "cpu", seed=99)
    b.load_state_dict(state)  # before prepare: prepare touches no weights
    load_generator_states(b, gens)
    b.prepare(shots, ctx)
    batch, idx = _batch(shots, gen)
    la, lb = a.train_step(batch.clone(), idx), b.train_step(batch.clone(), idx)
    for key in ("loss", "loss_simple", "dropped_fraction", "grad_norm"):
        assert la[key].ndim == 0 and torch.equal(la[key], lb[key]), key
    for p, q in itertools.chain(zip(a.unet.parameters(), b.unet.parameters()),
                                zip(a.ema.module.parameters(), b.ema.module.parameters())):
        assert torch.equal(p, q)
    assert torch.equal(a.sample(2, steps=2, seed=1), b.sample(2, steps=2, seed=1))
    wrong = SelfGuided(SelfGuidedConfig(k_target=3), tiny_source(), "cpu")
    with pytest.raises(ValueError, match="classes"):
        wrong.load_state_dict(state)


def _batch(images, gen, size=3):
    batch, idx = random_batch(images, size, gen, return_index=True)
    return batch, idx


@pytest.mark.parametrize("conditioning", ["concat", "add"])
def test_odd_batch_bf16_step_is_finite(conditioning, encoder_file, shots):
    perf = DevicePerf("cpu", precision="bf16")
    m = SelfGuided(SelfGuidedConfig(k_target=2, batch_size=3, conditioning=conditioning, grad_clip=None),
                   tiny_source(), "cpu", perf=perf)
    m.prepare(shots, PrepareContext(domain_encoder=encoder_file))
    out = m.train_step(*_batch(shots, torch.Generator().manual_seed(0)))
    assert set(out) == {"loss", "loss_simple", "dropped_fraction", "grad_norm"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    s = m.sample(3, steps=2, seed=0)
    assert s.shape == (3, 3, RES, RES) and s.dtype == torch.uint8
    with pytest.raises(ValueError, match="index"):
        m.train_step(_batch(shots, torch.Generator())[0])


def test_pretrainer_prepares_k_clusters_and_trains(sg_source, encoder_file):
    folder, pre = sg_source
    assert pre.key == "self_guided_pretrain" and pre.num_classes == 3
    assert pre.annotator.k == 3 and set(pre.labels.tolist()) <= {0, 1, 2} and len(pre.labels) == 24
    assert len(set(pre.labels.tolist())) == 3
    assert pre.step == 2 and float(pre.unet.frozen_values_max()) == 0.0
    perf = DevicePerf("cpu", precision="bf16")
    m = SelfGuidedPretrain(SelfGuidedPretrainConfig(preset="tiny", k=2, batch_size=5), RES, "cpu", perf=perf)
    with pytest.raises(ValueError, match="needs an image encoder"):
        m.prepare(images_of("source", 8), PrepareContext())
    imgs = images_of("source", 8)
    m.prepare(imgs, PrepareContext(domain_encoder=encoder_file))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        out = m.train_step(*_batch(imgs, gen, size=5))
        assert all(torch.isfinite(v) for v in out.values())
    assert SelfGuidedConfig.search_space().keys() >= {"k", "p", "w", "lr"}


def test_requested_share_scores_where_samples_land_and_evaluations_record_it(encoder_file, shots):
    m = SelfGuided(SelfGuidedConfig(k_target=3, sample_steps=2), tiny_source(), "cpu")
    m.prepare(shots, PrepareContext(domain_encoder=encoder_file))
    # the shots, asked for their own pseudo-classes, all land there; asked for another, none do
    assert m.requested_share(shots, m.labels) == 1.0
    assert m.requested_share(shots, (m.labels + 1) % 3) == 0.0
    periodic = m.evaluation_extras(m.sample(6, seed=4), 6, None, 4, final=False)
    assert set(periodic) == {"requested_share"} and 0.0 <= periodic["requested_share"] <= 1.0
    # the evaluation's samples are those of the labels sample() drew: recomputed from (n, seed)
    assert periodic["requested_share"] == m.requested_share(m.sample_labels(m.draw_labels(6, 4), seed=4),
                                                            m.draw_labels(6, 4))
    final = m.evaluation_extras(m.sample(6, seed=4), 6, None, 4, final=True)
    assert set(final) == {"requested_share", "requested_share_w0"}  # eval_guidance's default, w = 0
