"""LFS-GAN (``lfs_gan``) and its LeFT modulators, on tiny 16² StyleGAN2s on the CPU."""

import copy
import math

import pytest
import torch

from trainers.common import generator_states, load_generator_states, random_batch
from trainers.gan.gan_finetune import ROSINALITY_EMA, GANFinetune, GANFinetuneConfig
from trainers.gan.lfs_gan import (
    LFSGAN, LFSGANConfig, cluster_mode_seeking_loss, cluster_pairs, load_lfs_modulators, nearest_shot,
)
from trainers.gan.source import GANSource, load_gan_source
from trainers.nets.left import LeFTConv, LeFTGenerator, LeFTLinear
from trainers.nets.stylegan2 import EqualLinear, ModulatedConv2d, build_discriminator, build_generator, preset_arch
from trainers.registry import get_method


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_source(resolution: int = 16, seed: int = 0) -> GANSource:
    torch.manual_seed(seed)
    arch = preset_arch("tiny", resolution)
    g = build_generator(arch)
    g_ema = build_generator(arch).eval().requires_grad_(False)  # a different net: base choice is visible
    return GANSource(g=g, g_ema=g_ema, d=build_discriminator(arch), arch=arch, origin="test")


def shots(n: int = 4, res: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = shots()
    return [random_batch(images, 4, gen) for _ in range(n)]


def clone_params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def base_sample(g, n: int, seed: int) -> torch.Tensor:
    """What GANFinetune.sample draws (same z / noise per seed), from the plain generator ``g``."""
    from trainers.common import to_uint8

    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, g.style_dim, generator=gen)
    noise = g.random_noise(n, gen)
    with torch.no_grad():
        return to_uint8(g([z], noise=noise)[0].float()).cpu()


# -- LeFT --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("use_relu,additive,rank_init", [(True, True, "constant"), (False, False, "constant"),
                                                         (True, True, "perturbed")])
def test_left_modulators_are_exactly_the_identity_at_init(rank, use_relu, additive, rank_init):
    torch.manual_seed(0)
    conv = LeFTConv(5, 7, 3, rank, use_relu=use_relu, additive=additive, rank_init=rank_init,
                    generator=torch.Generator().manual_seed(1))
    w = torch.randn(5, 7, 3, 3)
    assert torch.equal(conv(w), w) and torch.equal(conv(w[None])[0], w)  # [C_out,C_in,k,k] and [1,...]
    m = conv.multiplier()  # M = r²·c³ = 1: to ~1e-16 in float64, exactly 1 once cast to the weights' dtype
    assert float((m.detach() - 1).abs().max()) < 1e-14 and torch.equal(m.float(), torch.ones(5, 7, 9))
    lin = LeFTLinear(6, 4, rank, bias=True, additive=additive, rank_init=rank_init,
                     generator=torch.Generator().manual_seed(1))
    wl, bl = torch.randn(6, 4), torch.randn(6)
    w_hat, b_hat = lin(wl, bl)
    assert torch.equal(w_hat, wl) and torch.equal(b_hat, bl)
    if additive:  # the "lora" init: the random side is non-zero, its partner zero, the product 0
        assert conv.a_add.abs().sum() > 0 and conv.b_add.abs().sum() == 0
        assert lin.v_add.abs().sum() > 0 and lin.u_add.abs().sum() == 0


def test_rank_components_stay_symmetric_with_the_constant_init_unless_perturbed():
    """The paper's constant init gives every rank component the same gradient, so rank r > 1
    stays rank 1; ``rank_init="perturbed"`` (still the identity at init) breaks the tie."""
    gen = torch.Generator().manual_seed(0)
    w, wl, bl = torch.randn(4, 5, 3, 3, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)
    r1, r2 = torch.randn(4, 5, 3, 3, generator=gen), torch.randn(4, 5, generator=gen)
    for init, symmetric in [("constant", True), ("perturbed", False)]:
        conv = LeFTConv(4, 5, 3, rank=2, rank_init=init, generator=torch.Generator().manual_seed(1))
        lin = LeFTLinear(4, 5, rank=2, rank_init=init, generator=torch.Generator().manual_seed(1))
        assert torch.equal(conv(w), w) and torch.equal(lin(wl, bl)[0], wl)
        opt = torch.optim.Adam([*conv.parameters(), *lin.parameters()], lr=0.01)
        for _ in range(3):
            loss = (conv(w) * r1).sum() + (lin(wl, bl)[0] * r2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        pairs = [(conv.a_out[:, 0], conv.a_out[:, 1]), (conv.c_in[:, 0], conv.c_in[:, 1]), (lin.u[:, 0], lin.u[:, 1])]
        assert all(torch.equal(a, b) for a, b in pairs) == symmetric
        assert any(torch.equal(a, b) for a, b in pairs) == symmetric


@pytest.mark.parametrize("rank", [1, 3])
def test_left_generator_at_init_gives_identical_images(rank):
    torch.manual_seed(0)
    g = build_generator(preset_arch("tiny", 16))
    left = LeFTGenerator(g, rank=rank, generator=torch.Generator().manual_seed(0))
    # every conv and linear layer of the generator is modulated: mapping, style affines, convs, ToRGB
    kinds = {type(m) for n, m in g.named_modules() if n.replace(".", "__") in left.modulators}
    assert kinds == {EqualLinear, ModulatedConv2d}
    n_lin = sum(isinstance(m, EqualLinear) for m in g.modules())
    n_conv = sum(isinstance(m, ModulatedConv2d) for m in g.modules())
    assert len(left.modulators) == n_lin + n_conv and n_conv == 1 + 2 * 2 + 3  # conv1, 2 per octave, ToRGBs
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)
    noise = g.random_noise(3, gen)
    with torch.no_grad():
        for styles, inject in [([z1], None), ([z1, z2], 2)]:
            a, _, fa = g(styles, noise=noise, inject_index=inject, return_features=True)
            b, _, fb = left(styles, noise=noise, inject_index=inject, return_features=True)
            assert torch.equal(a, b) and same(fa, fb)
        assert torch.equal(g.get_latent(z1), left.get_latent(z1))
    # ... and the modulators are wired in: moving one factor changes the images
    with torch.no_grad():
        left.modulators["convs__1__conv"].c_in.mul_(1.5)
        assert not torch.equal(left([z1], noise=noise)[0], g([z1], noise=noise)[0])


def test_lfs_gan_samples_the_base_at_init_and_uses_the_chosen_base():
    src = tiny_source()
    m = LFSGAN(LFSGANConfig(), src, "cpu")
    assert m.g.base is src.g_ema and torch.equal(m.sample(3, seed=4), base_sample(src.g_ema, 3, 4))
    src = tiny_source()
    m = LFSGAN(LFSGANConfig(base_generator="g"), src, "cpu")
    assert m.g.base is src.g and torch.equal(m.sample(3, seed=4), base_sample(src.g, 3, 4))
    src = tiny_source()
    m = LFSGAN(LFSGANConfig(rank=3, rank_init="perturbed"), src, "cpu")
    assert torch.equal(m.sample(3, seed=4), base_sample(src.g_ema, 3, 4))


# -- training touches only the current task's modulators (and D) -------------------------------
def test_only_modulators_and_d_train_and_the_base_stays_bit_identical():
    m = LFSGAN(LFSGANConfig(d_reg_every=2), tiny_source(), "cpu", seed=1)
    base0, mods0, d0 = clone_params(m.g.base), clone_params(m.g.modulators), clone_params(m.d)
    optim_params = {id(p) for group in m.g_optim.param_groups for p in group["params"]}
    assert optim_params == {id(p) for p in m.g.modulators.parameters()}
    for batch in batches(2):
        out = m.train_step(batch)
        assert all(math.isfinite(v) for v in out.values()), out
        assert {"g_adv", "g_ms", "d_adv", "ms_pairs", "ms_ratio"} <= set(out)
        assert all(not p.requires_grad and p.grad is None for p in m.g.base.parameters())
    assert same(base0, m.g.base.parameters())
    assert all(p.requires_grad for p in m.g.modulators.parameters())
    assert not same(mods0, m.g.modulators.parameters()) and not same(d0, m.d.parameters())
    # every factor got a gradient (the additive ones too: the "lora" init keeps them trainable),
    # except b_mul on the mapping biases, which are exactly 0 in this untrained base (b ⊙ b_mul)
    dead = {n for n, p in m.g.modulators.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    assert dead == {f"style__{i}.b_mul" for i in (1, 2)}
    assert all(float(m.g.base.style[i].bias.abs().sum()) == 0 for i in (1, 2))


def test_learning_a_new_task_leaves_earlier_tasks_bit_identical():
    m = LFSGAN(LFSGANConfig(), tiny_source(), "cpu", seed=2)
    at_init = m.sample(4, seed=7)
    for batch in batches(2):
        m.train_step(batch)
    task0 = m.sample_task(0, 4, seed=7)
    assert torch.equal(task0, m.sample(4, seed=7)) and not torch.equal(task0, at_init)
    mods0 = m.task_modulators(0)

    m.set_task(1)
    assert m.task_id == 1 and m.learned_tasks == [0, 1]
    assert torch.equal(m.sample(4, seed=7), at_init)  # a new task starts from the identity
    assert all(torch.equal(p, m.d_source_state[k]) for k, p in m.d.state_dict().items())  # D restarted
    for batch in batches(2, seed=1):
        m.train_step(batch)
    assert torch.equal(m.sample_task(0, 4, seed=7), task0)  # zero forgetting, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(mods0.values(), m.task_modulators(0).values()))
    task1 = m.sample_task(1, 4, seed=7)
    assert torch.equal(task1, m.sample(4, seed=7)) and not torch.equal(task1, task0)
    with pytest.raises(KeyError, match="not been learned"):
        m.sample_task(5, 2)
    # switching back resumes task 0's modulators exactly
    m.set_task(0)
    assert torch.equal(m.sample(4, seed=7), task0) and torch.equal(m.sample_task(1, 4, seed=7), task1)


# -- the cluster-wise mode-seeking loss --------------------------------------------------------
def test_mode_seeking_loss_uses_cluster_members_batch_indices():
    # 4 samples; clusters {0, 2} and {1, 3}. The release's position-based loop would compare
    # samples (0, 1) in both clusters instead.
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [5.0, 5.0]])
    w = torch.tensor([[0.0], [3.0], [4.0], [9.0]])
    feats = [torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [7.0, 7.0]]),
             torch.tensor([[1.0], [1.0], [3.0], [2.0]])]
    x = torch.tensor([[0.0], [2.0], [8.0], [4.0]])
    labels = torch.tensor([1, 0, 1, 0])
    ia, ib = cluster_pairs(labels)
    assert sorted(zip(ia.tolist(), ib.tolist())) == [(0, 2), (1, 3)]

    def ratio(a, b):
        l1 = lambda t: float((t[a] - t[b]).abs().mean())  # noqa: E731
        return l1(w) / l1(z) + sum(l1(f) for f in feats) / len(feats) / l1(w) + l1(x) / l1(w)

    expected = 1 / ((ratio(0, 2) + ratio(1, 3)) / 2 + 1e-5)
    position_based = 1 / (ratio(0, 1) + 1e-5)
    loss, stats = cluster_mode_seeking_loss(z, w, feats, x, labels)
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert not math.isclose(expected, position_based, rel_tol=1e-3)
    assert stats["ms_pairs"] == 2 and stats["ms_clusters"] == 2 and float(loss) > 0


def test_mode_seeking_without_pairs_is_zero_and_no_nan():
    z, w = torch.randn(3, 4), torch.randn(3, 4)
    loss, stats = cluster_mode_seeking_loss(z, w, [torch.randn(3, 2, 4, 4)], torch.randn(3, 3, 4, 4),
                                            torch.tensor([2, 0, 1]))
    assert float(loss) == 0.0 and stats["ms_pairs"] == 0 and stats["ms_clusters"] == 0

    class Diagonal:  # fake i is nearest to shot i: every cluster has one member
        def pairwise(self, a, b):
            return 1.0 - torch.eye(len(a), len(b))

    m = LFSGAN(LFSGANConfig(fake_multiplier=1), tiny_source(), "cpu")
    m.set_cluster_distance(Diagonal())
    out = m.train_step(batches(1)[0])
    assert out["ms_pairs"] == 0 and out["g_ms"] == 0 and all(math.isfinite(v) for v in out.values())


@pytest.mark.parametrize("distance", ["discriminator", "pixel"])
def test_mode_seeking_on_real_fakes_is_finite_positive_and_trains_the_modulators(distance):
    m = LFSGAN(LFSGANConfig(cluster_distance=distance), tiny_source(), "cpu")
    real = batches(1)[0]
    fakes = torch.rand(16, 3, 16, 16) * 2 - 1
    labels = nearest_shot(fakes, real, m.cluster_distance())
    assert labels.shape == (16,) and int(labels.min()) >= 0 and int(labels.max()) < 4
    assert torch.equal(nearest_shot(real, real, m.cluster_distance()), torch.arange(4))  # a shot is its own nearest
    loss, stats = m.mode_seeking(real)
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    assert stats["ms_pairs"] >= 6  # 16 fakes over 4 shots: some cluster has >= 4 members
    loss.backward()
    assert all(p.grad is None for p in m.g.base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.g.modulators.parameters())


# -- state, export, parameter count ------------------------------------------------------------
def test_state_dict_resumes_bit_for_bit():
    cfg = LFSGANConfig(d_reg_every=2, mixing=0.5)
    a = LFSGAN(cfg, tiny_source(), "cpu", seed=3)
    data = batches(5)
    a.train_step(data[0])
    a.set_task(1)
    a.train_step(data[1])
    state = copy.deepcopy(a.state_dict())  # as torch.save / torch.load would hand it back
    gens = copy.deepcopy(generator_states(a))  # the RNGs travel beside the state (trainers.common)
    assert set(state["tasks"]) == {0, 1} and state["task_id"] == 1
    b = LFSGAN(cfg, tiny_source(), "cpu", seed=99)
    b.load_state_dict(state)
    load_generator_states(b, gens)
    assert b.task_id == 1 and b.learned_tasks == [0, 1]
    for batch in data[2:]:  # crosses an R1 step
        assert a.train_step(batch.clone()) == b.train_step(batch.clone())
    for t in (0, 1):
        assert torch.equal(a.sample_task(t, 3, seed=1), b.sample_task(t, 3, seed=1))
    assert same(a.g.modulators.parameters(), b.g.modulators.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.d.state_dict().values(), b.d.state_dict().values()))


def test_export_and_modulator_round_trip(tmp_path):
    a = LFSGAN(LFSGANConfig(), tiny_source(), "cpu", seed=5)
    a.train_step(batches(1)[0])
    a.set_task(1)
    a.train_step(batches(1, seed=1)[0])
    folder = a.export(tmp_path / "task1")
    # the folder loads as a source: g = the frozen base, g_ema samples like the current task
    src = load_gan_source(str(folder))
    assert src.extra["adapted_by"] == "lfs_gan"
    assert all(torch.equal(p, q) for p, q in zip(src.g.state_dict().values(), a.g.base.state_dict().values()))
    ema = GANFinetuneConfig(ema_decay=ROSINALITY_EMA)  # samples the export's g_ema at step 0
    assert torch.equal(GANFinetune(ema, src, "cpu").sample(3, seed=2), a.sample(3, seed=2))
    assert all(torch.equal(src.d.state_dict()[k], v) for k, v in a.d_source_state.items())  # next task's D
    mods = load_lfs_modulators(folder)
    assert set(mods) == {0, 1}
    for t in (0, 1):
        assert all(torch.equal(x, y) for x, y in zip(mods[t].values(), a.task_modulators(t).values()))
    # the next task of a stream: built from the export, earlier tasks taken over
    c = LFSGAN(LFSGANConfig(task_id=2), src, "cpu")
    c.continue_from(folder)
    assert c.learned_tasks == [0, 1, 2] and c.task_id == 2
    for t in (0, 1):
        assert torch.equal(c.sample_task(t, 3, seed=2), a.sample_task(t, 3, seed=2))
    assert torch.equal(c.sample(3, seed=2), base_sample(a.g.base, 3, 2))  # task 2 starts at the identity
    with pytest.raises(ValueError, match="LeFT settings must match"):
        LFSGAN(LFSGANConfig(task_id=2, rank=2), load_gan_source(str(folder)), "cpu").continue_from(folder)
    with pytest.raises(ValueError, match="different base"):
        LFSGAN(LFSGANConfig(task_id=2), tiny_source(seed=3), "cpu").continue_from(folder)


def expected_left_count(g, rank: int, additive: bool) -> int:
    total = 0
    for m in g.modules():
        if isinstance(m, EqualLinear):
            out_f, in_f = m.weight.shape
            total += rank * (out_f + in_f) + out_f  # U, V, b_mul
            total += (rank * (out_f + in_f) + out_f) if additive else 0  # U', V', b_add
        elif isinstance(m, ModulatedConv2d):
            o, i, k = m.out_channel, m.in_channel, m.kernel_size
            total += rank * o + rank * rank * k * k + rank * i  # A, B, C
            total += (rank * (o + i) + 2 * rank * k * k) if additive else 0  # A', B', C', D'
    return total


@pytest.mark.parametrize("rank,additive", [(1, True), (2, False)])
def test_trainable_parameter_count_is_the_modulator_factors(rank, additive):
    m = LFSGAN(LFSGANConfig(rank=rank, additive=additive), tiny_source(), "cpu")
    n = m.trainable_parameters()
    assert n == expected_left_count(m.g.base, rank, additive)
    assert n == sum(p.numel() for g in m.g_optim.param_groups for p in g["params"])
    assert n < 0.25 * sum(p.numel() for p in m.g.base.parameters())  # 16-channel nets; 0.4% at 256², below


def test_parameter_count_of_the_256_generator_matches_the_paper():
    with torch.device("meta"):  # shapes only
        g = build_generator(preset_arch("base", 256))
        left = LeFTGenerator(g, rank=1, use_relu=True, additive=True)
    assert left.modulator_count() == expected_left_count(g, 1, True) == 108_446  # paper: ~108K per task
    assert sum(p.numel() for p in g.parameters()) == 30_034_338  # 0.36% of the generator per task


def test_config_registry_and_search_space():
    assert get_method("lfs_gan") is LFSGAN and LFSGAN.family == "gan"
    with pytest.raises(ValueError, match="without EMA"):
        LFSGANConfig(ema_decay=0.99)
    space = LFSGANConfig.search_space()
    assert space["rank"] == {"choice": [1, 2, 4]} and {"lr", "mode_seeking_weight"} <= set(space)
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        for v in values if kind == "choice" else values[:2]:
            LFSGANConfig(**{key: v})
