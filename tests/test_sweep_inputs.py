"""A sweep hands its trials the inputs it published once (``orchestrator.search.sweep``): every field a
trial's job reads must survive that hand-over, or trials silently lose a metric (a sweep's trials
once had no ``target_rate_domain`` because the domain classifier was dropped here)."""

import dataclasses
import json

import pytest

from orchestrator.data.artifacts import ArtifactRef
from orchestrator.runs.inputs import Inputs
from orchestrator.runs.sources import ResolvedSource
from orchestrator.search.sweep import inputs_from, inputs_to


def ref(name: str) -> ArtifactRef:
    return ArtifactRef(uri=f"runs/artifacts/{name}", digest=name * 8, name=name, is_file=True)


def test_every_input_field_reaches_the_trials():
    full = Inputs(source=ResolvedSource(ref("source"), None, None), data=ref("data"), reference=ref("ref"),
                  domain_encoder=ref("encoder"), reference_stats=ref("stats"),
                  domain_classifier=ref("classifier"), target_domain="sketch", truth_classifier=ref("truth"))
    assert all(getattr(full, f.name) is not None for f in dataclasses.fields(Inputs))  # the test covers all
    carried = json.loads(json.dumps(inputs_to(full)))  # what RunTrialSetup.inputs carries to the trials
    back = inputs_from(carried)
    for f in dataclasses.fields(Inputs):
        if f.name != "source":
            assert getattr(back, f.name) == getattr(full, f.name), f.name
    assert back.source.ref == full.source.ref


def test_a_sweep_saved_before_the_classifier_travelled_still_resumes():
    full = Inputs(source=ResolvedSource(ref("source"), None, None), data=ref("data"), reference=None,
                  domain_encoder=ref("encoder"))
    carried = inputs_to(full)
    for key in ("domain_classifier", "target_domain", "truth_classifier"):
        carried.pop(key)
    back = inputs_from(carried)
    assert back.domain_classifier is None and back.target_domain is None and back.truth_classifier is None
    assert back.data == full.data


def test_the_trial_setup_is_typed_and_refuses_unknown_fields():
    import pickle

    import pydantic

    from orchestrator.search.sweep import RunTrialSetup

    common = {"tracking_uri": "sqlite:///m.db", "experiment_id": "1", "parent_run_id": "p", "sweep_name": "s",
              "trials_storage": "runs/s/trials", "cpus": 1, "gpus": 0.25}
    full = Inputs(source=ResolvedSource(ref("source"), None, None), data=ref("data"), reference=None,
                  domain_encoder=ref("encoder"))
    setup = RunTrialSetup(**common, base={"method": "ddpm_finetune"}, inputs=inputs_to(full), source_name="src",
                          checkpoint_at=[10, 20], eval_at=[20])
    assert pickle.loads(pickle.dumps(setup)) == setup  # Tune pickles it into every trial
    assert setup.cpus == 1.0 and setup.checkpoint_at == [10, 20]
    with pytest.raises(pydantic.ValidationError, match="checkpoint_every"):
        RunTrialSetup(**common, base={}, inputs={}, source_name="src", checkpoint_at=[], eval_at=[],
                      checkpoint_every=5)
    with pytest.raises(pydantic.ValidationError, match="eval_at"):
        RunTrialSetup(**common, base={}, inputs={}, source_name="src", checkpoint_at=[])
