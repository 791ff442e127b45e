"""The truth check of a lifelong stream: every task of a sequence gets its own classifier (its
reference images against the source's samples), it travels with the sequence's inputs (also into
a sweep's trials), and after task k the model is scored on every earlier task j with task j's own
check (``r_target_rate_task{j}``, so forgetting and BWT are also measured as target rates)."""

from __future__ import annotations

import json

import numpy as np
import torch

from orchestrator.core.config import RunSettings
from orchestrator.data.artifacts import ArtifactRef, publish, publish_array
from orchestrator.runs.lifelong import SequenceInputs
from orchestrator.runs.sources import ResolvedSource
from orchestrator.runtime.job import EvalTask, Job
from orchestrator.runtime.loop import Evaluator
from trainers.data.synthetic import render
from trainers.metrics.task_classifier import train_task_classifier


def ref(name: str) -> ArtifactRef:
    return ArtifactRef(uri=f"runs/artifacts/{name}", digest=name * 8, name=name, is_file=True)


def test_each_task_carries_its_own_truth_check_through_the_sequence_inputs():
    seq = SequenceInputs(ResolvedSource(ref("source"), None, None), ref("encoder"),
                         [(ref("shots0"), ref("ref0")), (ref("shots1"), None)], None, [None, None],
                         [ref("truth0"), None])
    back = SequenceInputs.from_static(json.loads(json.dumps(seq.to_static())))  # what a sweep's trials get
    assert back.truths == seq.truths
    assert back.inputs(0).truth_classifier == ref("truth0") and back.inputs(1).truth_classifier is None
    assert [t.truth_classifier for t in back.eval_tasks(1)] == [ref("truth0"), None]
    old = seq.to_static()
    old.pop("truths")  # a sweep prepared before the streams had truth checks still resumes
    assert SequenceInputs.from_static(old).inputs(0).truth_classifier is None


class _Drawn:
    """A method whose every task samples fixed images: task 0 the target, task 1 the source."""

    def __init__(self, images: dict[int, torch.Tensor]):
        self.images = images

    def sample_task(self, task_id: int, n: int, steps=None, seed: int = 0) -> torch.Tensor:
        return self.images[task_id][:n]


def test_the_model_is_scored_on_every_earlier_task_with_that_tasks_check(tmp_path):
    storage = str(tmp_path / "runs")
    target, source = render("sketch", 12, 32, seed=1), render("source", 96, 32, seed=2)
    clf = train_task_classifier(torch.from_numpy(target).permute(0, 3, 1, 2).contiguous(),
                                torch.from_numpy(source).permute(0, 3, 1, 2).contiguous(), resolution=32,
                                source_held_out=torch.from_numpy(render("source", 32, 32, seed=3)).permute(0, 3, 1, 2),
                                steps=60)  # two such domains part early; the default 300 takes a minute here
    clf.save(tmp_path / "truth0.safetensors")
    truth0 = publish(tmp_path / "truth0.safetensors", storage)
    shots0 = publish_array(target, storage)
    shots1 = publish_array(render("night", 12, 32, seed=4), storage)
    run = RunSettings(metrics=[], final_eval_samples=32)  # no feature network: only the checks score
    job = Job(kind="adapt", name="t", method="lfs_gan", family="stylegan2", resolution=32, method_config={},
              run=run, storage=storage, data=shots1,
              lifelong_eval=[EvalTask(index=0, task_id=0, shots=shots0, truth_classifier=truth0),
                             EvalTask(index=1, task_id=1, shots=shots1)])
    drawn = {0: torch.from_numpy(render("sketch", 32, 32, seed=5)).permute(0, 3, 1, 2).contiguous(),
             1: torch.from_numpy(render("source", 32, 32, seed=6)).permute(0, 3, 1, 2).contiguous()}
    ev = Evaluator(job, torch.from_numpy(np.array(render("night", 12, 32, seed=4))).permute(0, 3, 1, 2), torch.device("cpu"))
    row = ev.earlier_tasks(_Drawn(drawn))
    assert row["r_target_rate_task0"] >= 0.9, row  # task 0's samples are task 0's domain
    assert "r_target_rate_task1" not in row  # task 1 has no check (turned off): nothing is invented
    drawn[0] = drawn[1]  # a model that forgot task 0 and draws the source again
    assert ev.earlier_tasks(_Drawn(drawn))["r_target_rate_task0"] <= 0.1
