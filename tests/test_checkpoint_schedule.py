"""Which steps checkpoint: one schedule, decided by the driver and carried in the job."""

from orchestrator.core.config import RunSettings
from orchestrator.runtime.job import checkpoint_schedule


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


def test_a_run_evaluates_at_points_that_grow_with_its_budget():
    from orchestrator.runtime.job import eval_schedule

    assert eval_schedule(RunSettings(steps=300, report_every=50)) == [150]  # its middle
    assert eval_schedule(RunSettings(steps=1000, report_every=50)) == [350, 700]  # its thirds
    # k = 6 points (3000 i / 7), each rounded up to a report
    assert eval_schedule(RunSettings(steps=3000, report_every=50)) == [450, 900, 1300, 1750, 2150, 2600]
    assert eval_schedule(RunSettings(steps=20, report_every=10)) == [10]
    # eval_every, when set, wins (0: only the final evaluation); ASHA's rungs replace the points
    assert eval_schedule(RunSettings(steps=300, report_every=50, eval_every=50)) == [50, 100, 150, 200, 250]
    assert eval_schedule(RunSettings(steps=300, report_every=50, eval_every=0)) == []
    assert eval_schedule(RunSettings(steps=100, report_every=10), rungs=[25, 75]) == [30, 80]


def test_the_job_evaluates_on_its_schedule_and_always_at_the_end():
    from orchestrator.data.artifacts import ArtifactRef
    from orchestrator.runtime.job import Job

    data = ArtifactRef(uri="runs/artifacts/x", digest="0" * 64, name="images.npy", is_file=True)
    job = Job(kind="adapt", name="j", method="ddpm_finetune", family="ddpm", resolution=16, method_config={},
              run=RunSettings(steps=30, report_every=5), storage="runs", data=data)
    assert [s for s in range(1, 31) if job.wants_evaluation(s)] == [15, 30]  # the middle
    trial = job.model_copy(update={"eval_at": [20]})  # a sweep trial: the driver's list (its rungs)
    assert [s for s in range(1, 31) if trial.wants_evaluation(s)] == [20, 30]
