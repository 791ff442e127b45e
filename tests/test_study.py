"""The kept Optuna study (orchestrator.search.study): where it lives, which URLs are refused, how a
warm start maps an old sweep's best configs onto a new space, and the copy beside a remote sweep."""

from __future__ import annotations

import pytest

from orchestrator.core.config import ConfigError
from orchestrator.search.study import (check_study_url, default_location, load, open_storage, pull_copy, push_copy,
                                record_missing, sqlite_path, warm_start_points)

SPACE = {"lr": {"loguniform": [1e-5, 1e-3]}, "t_max": {"int": [200, 1000]}, "kl": {"choice": ["forward", "reverse"]},
         "steps": 300}
BASE = {"method_config.lr": 1e-4, "method_config.t_max": 500, "method_config.kl": "reverse", "run.steps": 300}


@pytest.mark.parametrize("url,needle", [
    ("postgresql://me:secret@db/optuna", "holds a password"),
    ("redis://localhost/0", "'redis' is not a database"),
    ("not a url", "expected a database URL"),
])
def test_bad_study_urls_are_refused_naming_the_flag(url, needle):
    with pytest.raises(ConfigError, match="--study-storage") as err:
        check_study_url(url)
    assert needle in str(err.value)


def test_server_urls_without_a_password_pass():
    for url in ("postgresql://me@db/optuna", "mysql+pymysql://me@db/optuna", "sqlite:////tmp/x.db"):
        assert check_study_url(url) == url


def test_a_local_sweep_keeps_its_study_beside_tunes_state_a_remote_one_in_the_cache(tmp_path, monkeypatch):
    url, copy = default_location(str(tmp_path / "runs" / "s1"))
    assert url == f"sqlite:///{tmp_path / 'runs' / 's1' / 'study.db'}" and copy is None
    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    url, copy = default_location("s3://bucket/prefix/s1")
    assert sqlite_path(url) == tmp_path / "cache" / "studies" / "s1.db"
    assert copy == "s3://bucket/prefix/s1/study.db"


def test_the_copy_goes_out_and_comes_back_when_the_local_file_is_missing(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'driver' / 's.db'}"
    st = optuna.create_study(storage=open_storage(url), study_name="s")
    st.add_trial(optuna.trial.create_trial(params={"x": 1.0}, distributions={
        "x": optuna.distributions.FloatDistribution(0, 2)}, value=3.0))
    remote = str(tmp_path / "remote" / "study.db")  # a local path stands in for the bucket (same fsspec calls)
    (tmp_path / "remote").mkdir()
    push_copy(url, remote)
    sqlite_path(url).unlink()
    pull_copy(url, remote)
    assert [t.value for t in load(url, "s").trials] == [3.0]


def test_warm_start_points_keep_shared_keys_clip_to_the_new_range_and_fill_from_the_base():
    top = [{"trial_id": "a", "config": {"lr": 5e-4, "t_max": 1500, "kl": "forward", "weight": 2.0}},
           {"trial_id": "b", "config": {"lr": 1e-2, "kl": "both"}}]
    points, notes = warm_start_points(top, SPACE, BASE)
    assert points[0] == {"lr": 5e-4, "t_max": 1000, "kl": "forward"}
    assert points[1] == {"lr": 1e-3, "t_max": 500, "kl": "reverse"}
    assert isinstance(points[0]["t_max"], int)
    assert any("t_max 1500 clipped to 1000" in n for n in notes)
    assert any("lr 0.01 clipped to 0.001" in n for n in notes)
    assert any("kl takes 'reverse'" in n for n in notes)


def test_a_finished_trial_whose_optuna_record_was_closed_is_added_complete_once(tmp_path):
    """After a driver kill, Tune may close a resumed trial's Optuna twin (FAIL) before the trial
    finishes; the sweep's record then has a FINISHED trial the study lacks."""
    import optuna
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 's.db'}"
    space = {"lr": {"loguniform": [1e-5, 1e-3]}}
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    st = optuna.create_study(storage=open_storage(url), study_name="s")
    st.add_trial(optuna.trial.create_trial(params={"lr": 1e-4}, distributions=dist, value=0.5))
    st.add_trial(optuna.trial.create_trial(params={"lr": 2e-4}, distributions=dist, state=TrialState.FAIL))
    trials = [{"trial_id": "a", "status": "FINISHED", "config": {"lr": 1e-4}, "loss": 0.5},
              {"trial_id": "b", "status": "FINISHED", "config": {"lr": 2e-4}, "loss": 0.25},
              {"trial_id": "c", "status": "KILLED", "config": {"lr": 3e-4}, "loss": 0.9}]
    assert record_missing(url, "s", trials, space, ["loss"]) == 1
    assert record_missing(url, "s", trials, space, ["loss"]) == 0
    done = {t.params["lr"]: t.value for t in load(url, "s").trials if t.state == TrialState.COMPLETE}
    assert done == {1e-4: 0.5, 2e-4: 0.25}


def test_a_resumed_trial_whose_optuna_record_is_closed_reports_without_failing_the_sweep(tmp_path):
    """The killed driver told Optuna a trial finished after Tune's last saved state: the restored
    Tune run resumes that trial, and Ray's plain ``OptunaSearch`` raised on its next result (the
    failure that stopped ``--resume``); the sweep's searcher skips the refused report."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.search.searcher import KeptStudySearch

    space = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    url = f"sqlite:///{tmp_path / 's.db'}"
    for cls, name in ((OptunaSearch, "plain"), (KeptStudySearch, "kept")):
        search = cls(space=space, metric="loss", mode="min", storage=open_storage(url), study_name=name)
        assert "lr" in search.suggest("t1")
        closed = load(url, name)
        closed.tell(closed.trials[0].number, 0.5)  # what the killed driver wrote
        result = {"loss": 0.4, "training_iteration": 2}
        if cls is OptunaSearch:
            with pytest.raises(UpdateFinishedTrialError):
                search.on_trial_result("t1", result)
            continue
        search.on_trial_result("t1", result)
        search.on_trial_result("t1", result)  # said once, skipped after
        assert search.closed_in_study == {"t1"}
        search.on_trial_complete("t1", {"loss": 0.3, "training_iteration": 3})
        assert [t.value for t in load(url, name).trials] == [0.5]  # the record stands as written
