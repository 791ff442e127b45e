"""The per-task truth check (trainers.metrics.task_classifier): trained on a task's target images
against its source's images, it must separate the two on held-out images and call noise neither."""

from __future__ import annotations

import torch

from trainers.data.synthetic import render
from trainers.metrics.task_classifier import CLASSES, neither_images, train_task_classifier


def test_it_separates_the_target_from_the_source_and_scores_noise_as_neither():
    target = render("sketch", 10, 32, seed=1)  # a ten-shot folder task without a reference set
    source = render("source", 96, 32, seed=2)
    model = train_task_classifier(target, source, resolution=32, source_held_out=render("source", 64, 32, seed=3))
    assert model.classes == list(CLASSES)
    info = model.train_info
    assert info["separation"] >= 0.9, info
    fresh_target, fresh_source = render("sketch", 64, 32, seed=4), render("source", 64, 32, seed=5)
    assert model.rate(fresh_target, "target") >= 0.9
    assert model.rate(fresh_source, "target") <= 0.1
    noise = (torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 255).to(torch.uint8)
    assert model.rate(noise, "target") <= 0.1 and model.rate(noise, "neither") >= 0.9
    # another domain it never saw is not the target either
    assert model.rate(render("night", 64, 32, seed=7), "target") <= 0.3


def test_neither_images_keep_the_count_and_shuffle_only_positions():
    like = torch.from_numpy(render("sketch", 4, 16)).permute(0, 3, 1, 2)
    out = neither_images(9, 16, like, torch.Generator().manual_seed(0))
    assert out.shape == (9, 3, 16, 16) and out.dtype == torch.uint8
    shuffled = out[6:]  # the last third: pixels of `like` in another order
    assert any(sorted(s.flatten(1).T.tolist()) == sorted(x.flatten(1).T.tolist()) for s in shuffled[:1] for x in like)


def test_the_run_trains_it_once_per_task_and_source_and_finds_it_by_content(tmp_path, monkeypatch):
    """orchestrator.metrics.truth: the first run publishes the classifier under a content key; a run on a
    new storage with the same task and source takes the node's copy; another target has another key."""
    from types import SimpleNamespace

    from orchestrator.metrics import truth
    from orchestrator.data.artifacts import fetch, publish, publish_array
    from trainers.builtin import builtin_source
    from trainers.metrics.domain_classifier import DomainClassifier

    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    cfg = SimpleNamespace(run=SimpleNamespace(truth_check=True, eval_sample_steps=None),
                          task=SimpleNamespace(resolution=32))
    import trainers.metrics.task_classifier as tc

    trained = []
    real = tc.train_task_classifier
    monkeypatch.setattr(tc, "train_task_classifier", lambda *a, **k: trained.append(a) or real(*a, **k))

    source = publish(builtin_source("stylegan2", 32), str(tmp_path / "a"))

    def check(storage, domain):
        data = publish_array(render(domain, 10, 32, seed=1), storage)
        return truth.truth_classifier(cfg, data=data, reference=None, source=source, storage=storage)

    first = check(str(tmp_path / "a"), "sketch")
    model = DomainClassifier.load(fetch(first))
    assert model.train_info["separation"] >= 0.8 and len(trained) == 1
    assert check(str(tmp_path / "a"), "sketch") == first  # the storage's pointer
    assert check(str(tmp_path / "b"), "sketch").digest == first.digest  # the node's copy
    assert len(trained) == 1
    other = publish_array(render("night", 10, 32, seed=1), str(tmp_path / "a"))
    assert truth.truth_key(other, source, 32, 25) != truth.truth_key(publish_array(
        render("sketch", 10, 32, seed=1), str(tmp_path / "a")), source, 32, 25)  # another target: trained anew
    cfg.run.truth_check = False
    assert check(str(tmp_path / "a"), "sketch") is None


def test_a_check_that_cannot_be_trained_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    """A one-shot task has no image to hold out: the run goes on without target_rate."""
    from types import SimpleNamespace

    from orchestrator.metrics import truth
    from orchestrator.data.artifacts import publish, publish_array
    from trainers.builtin import builtin_source

    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    cfg = SimpleNamespace(run=SimpleNamespace(truth_check=True, eval_sample_steps=None),
                          task=SimpleNamespace(resolution=32))
    storage = str(tmp_path / "runs")
    one = publish_array(render("sketch", 1, 32), storage)
    source = publish(builtin_source("stylegan2", 32), storage)
    got = truth.truth_classifier(cfg, data=one, reference=None, source=source, storage=storage)
    assert got is None
    assert "no truth check for this run" in capsys.readouterr().out
