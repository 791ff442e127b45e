"""How far a run's metrics go (``orchestrate.logged_step``) is recorded in the same MLflow request
as the metrics: a worker killed after its metrics were sent can no longer leave a tag behind them,
which made its restart log those steps twice (seen when a cluster node was reclaimed mid-sweep)."""

import pytest

from orchestrator.records import tracking

TAG = "orchestrate.logged_step"


@pytest.fixture
def run(tmp_path):
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client(uri)
    run_id = c.create_run(c.create_experiment("buffer")).info.run_id
    yield uri, run_id
    c.set_terminated(run_id)


def test_the_tag_travels_with_the_last_metrics_in_one_request(run, monkeypatch):
    uri, run_id = run
    c = tracking.client(uri)
    calls = []
    real = c.log_batch
    monkeypatch.setattr(c, "log_batch", lambda rid, **kw: (calls.append(kw), real(rid, **kw))[1])
    monkeypatch.setattr(c, "set_tag", lambda *a, **k: pytest.fail("a separate set_tag request"))
    monkeypatch.setattr(tracking, "client", lambda _uri: c)
    buf = tracking.MetricBuffer(uri, run_id)
    for step in range(1, 11):
        buf.add({"loss": 1.0 / step}, step)
    buf.flush(tags={TAG: "10"})
    assert len(calls) == 1 and len(calls[0]["metrics"]) == 10 and [t.key for t in calls[0]["tags"]] == [TAG]
    assert tracking.logged_step(uri, run_id, TAG) == 10


def test_a_large_flush_keeps_within_mlflows_batch_limit_and_tags_the_last_chunk(run):
    uri, run_id = run  # the SQL store enforces MLflow's limit of 1000 entities per batch
    buf = tracking.MetricBuffer(uri, run_id)
    for step in range(1, 1001):
        buf.add({"loss": 1.0 / step, "grad_norm": float(step)}, step)
    buf.flush(tags={TAG: "1000"})
    assert [s for s, _ in tracking.metric_history(uri, run_id, "loss")] == list(range(1, 1001))
    assert len(tracking.metric_history(uri, run_id, "grad_norm")) == 1000
    assert tracking.logged_step(uri, run_id, TAG) == 1000
    buf.flush(tags={TAG: "1001"})  # nothing pending: the tag alone still moves
    assert tracking.logged_step(uri, run_id, TAG) == 1001
