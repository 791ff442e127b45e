"""Which steps checkpoint: one schedule, decided by the driver and carried in the job."""

from orchestrator.config import RunSettings
from orchestrator.job import checkpoint_schedule


def test_checkpoint_every_is_honoured():
    run = RunSettings(steps=30, report_every=5, checkpoint_every=10)
    assert checkpoint_schedule(run) == [10, 20]  # the last step (30) always checkpoints, outside the list
    assert checkpoint_schedule(RunSettings(steps=40, report_every=5, checkpoint_every=20)) == [20]


def test_a_sweep_trial_checkpoints_at_the_first_report_after_each_rung():
    run = RunSettings(steps=100, report_every=10)
    assert checkpoint_schedule(run, rungs=[5, 25, 40]) == [10, 30, 40]
    # checkpoint_every, when set, wins over the rungs
    assert checkpoint_schedule(RunSettings(steps=100, report_every=10, checkpoint_every=50), rungs=[5]) == [50]


def test_without_either_every_report_checkpoints():
    assert checkpoint_schedule(RunSettings(steps=20, report_every=5)) == [5, 10, 15]
