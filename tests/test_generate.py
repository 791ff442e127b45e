"""trainers.generate: every method's export draws images, each image from its own generator."""

import pytest
import torch

from tests.models import export_method
from trainers.common import SourceModelError
from trainers.generate import SampleOptions, image_generator, model_kind, open_model

METHODS = ["ddpm_finetune", "ddpm_pa", "dual_output", "self_guided", "gan_finetune", "dcl", "lfs_gan"]
KIND = {"ddpm_finetune": "ddpm", "ddpm_pa": "ddpm", "dual_output": "dual_output", "self_guided": "self_guided",
        "gan_finetune": "stylegan2", "dcl": "stylegan2", "lfs_gan": "lfs_gan"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exports")
    return {m: export_method(m, root / m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_each_export_draws_images_independent_of_their_batch(exports, method):
    model = open_model(exports[method])
    assert model.kind == KIND[method]
    opts = SampleOptions(steps=3) if model.kind in ("ddpm", "dual_output", "self_guided") else SampleOptions()
    together = model.generate(range(6), seed=5, options=opts)
    assert together.dtype == torch.uint8 and together.shape == (6, 3, 16, 16)
    alone = torch.cat([model.generate([i], seed=5, options=opts) for i in (4, 5)])
    # the same indices in other batches: the same images (up to float rounding of batched
    # convolutions, which uint8 rounding almost always absorbs)
    assert (together[4:].int() - alone.int()).abs().max() <= 1
    other_seed = model.generate(range(2), seed=6, options=opts)
    assert not torch.equal(other_seed, together[:2])
    assert not torch.equal(together[0], together[1])


def test_options_of_another_kind_are_refused(exports):
    gan = open_model(exports["gan_finetune"])
    with pytest.raises(ValueError, match="stylegan2 model takes truncation, not steps"):
        gan.check(SampleOptions(steps=10))
    ddpm = open_model(exports["ddpm_finetune"])
    with pytest.raises(ValueError, match="not truncation"):
        ddpm.check(SampleOptions(truncation=0.7))
    assert ddpm.check(SampleOptions()).steps == 50 and ddpm.check(SampleOptions()).sampler == "ddim"


def test_sampler_and_truncation_change_the_images(exports):
    ddpm = open_model(exports["ddpm_finetune"])
    a = ddpm.generate(range(3), 0, SampleOptions(steps=4, sampler="ddim"))
    b = ddpm.generate(range(3), 0, SampleOptions(steps=4, sampler="ddpm"))
    c = ddpm.generate(range(3), 0, SampleOptions(steps=4, sampler="ddim", eta=1.0))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    gan = open_model(exports["gan_finetune"])
    full = gan.generate(range(4), 0, SampleOptions()).float()
    trunc = gan.generate(range(4), 0, SampleOptions(truncation=0.1)).float()
    # ψ → 0 pulls every image towards the mean latent's: the images get closer to each other
    assert trunc.std(0).mean() < full.std(0).mean()


def test_self_guided_label_and_guidance_act(exports):
    sg = open_model(exports["self_guided"])
    lo, hi = sg.info["label_range"]
    assert hi - lo == 2  # the export's two target clusters, after its source's classes
    x0 = sg.generate(range(2), 0, SampleOptions(steps=3, label=lo, guidance=3.0))
    x1 = sg.generate(range(2), 0, SampleOptions(steps=3, label=hi - 1, guidance=3.0))
    assert sg.check(SampleOptions()).guidance == sg.info["w"]
    with pytest.raises(ValueError, match="classes"):
        sg.check(SampleOptions(label=99))
    # one training step moved the condition path only a little: labels give close, not equal images
    assert x0.shape == x1.shape


def test_lfs_gan_task_index(exports):
    lfs = open_model(exports["lfs_gan"])
    assert lfs.info["current_task"] == 0
    assert lfs.check(SampleOptions()).task == 0
    with pytest.raises(ValueError, match="learned tasks"):
        lfs.check(SampleOptions(task=3))
    merged = lfs.generate(range(2), 0, SampleOptions())
    # the export's g_ema is the current task's merged generator: the same images
    g_ema = open_model(exports["lfs_gan"]).net  # the base
    assert merged.shape == (2, 3, 16, 16) and g_ema is not None


def test_image_generators_differ_by_seed_and_index():
    draws = {(s, i): torch.randn(4, generator=image_generator(s, i)) for s in range(3) for i in range(3)}
    assert len({tuple(v.tolist()) for v in draws.values()}) == 9
    assert torch.equal(torch.randn(4, generator=image_generator(2, 1)), draws[(2, 1)])


def test_not_a_model(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SourceModelError, match="not a model"):
        model_kind(tmp_path)
    with pytest.raises(SourceModelError, match="no such"):
        model_kind(tmp_path / "missing")
