"""The driver's progress lines show each evaluation's numbers once, at the report that made them."""

from mlflow.entities import Metric

from orchestrator.records import tracking
from orchestrator.records.progress import ProgressPrinter

TAG = "orchestrate.logged_step"


def test_a_report_between_evaluations_does_not_repeat_the_last_one(tmp_path, capsys):
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c = tracking.client(uri)
    run_id = c.create_run(c.create_experiment("progress")).info.run_id
    printer = ProgressPrinter(uri, run_id, "r", steps=300, tag=TAG)

    def report(step: int, **metrics: float) -> str:
        c.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in metrics.items()])
        c.set_tag(run_id, TAG, str(step))
        printer.poll()
        return capsys.readouterr().out

    evaluated = report(100, loss=0.5, fid_domain=0.39, target_rate_domain=0.0, steps_per_s=8.0)
    assert "step 100/300" in evaluated and "fid_domain 0.39" in evaluated and "target_rate_domain 0" in evaluated
    between = report(150, loss=0.25, steps_per_s=8.0)
    assert "step 150/300 loss 0.25" in between and "fid_domain" not in between and "target_rate" not in between
    again = report(200, loss=0.125, fid_domain=0.24, target_rate_domain=0.0)
    assert "fid_domain 0.24" in again and "target_rate_domain 0" in again  # all of an evaluation's numbers
    c.set_terminated(run_id)
