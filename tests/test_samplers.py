"""The sweep's Optuna samplers pickle (Ray Tune pickles its searcher) and still sample."""

import cloudpickle
import optuna
import pytest

from orchestrator.search.samplers import RebuiltSampler, sweep_sampler


@pytest.mark.parametrize("multi", [False, True])
def test_sweep_samplers_pickle_before_and_after_use(multi):
    sampler = sweep_sampler(multi, seed=3)
    directions = ["minimize", "maximize"] if multi else ["minimize"]
    study = optuna.create_study(directions=directions, sampler=sampler)

    def objective(trial):
        x = trial.suggest_float("x", -1, 1)
        return (x * x, -x) if multi else x * x

    study.optimize(objective, n_trials=3)  # the inner sampler is built and holds its state
    again = cloudpickle.loads(cloudpickle.dumps(sampler))
    assert isinstance(again, RebuiltSampler) and again._inner is None
    study2 = optuna.create_study(directions=directions, sampler=again)
    study2.optimize(objective, n_trials=2)
    assert len(study2.trials) == 2


def test_optuna_search_with_nsga2_pickles():
    """What failed with Optuna 5.1: Tune pickling an OptunaSearch that holds NSGA-II."""
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(metric=["a", "b"], mode=["min", "max"], sampler=sweep_sampler(True, 0))
    cloudpickle.loads(cloudpickle.dumps(search))


def test_a_rebuilt_sampler_is_reproducible_from_its_seed():
    def run(sampler):
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
        return [t.params["x"] for t in study.trials]

    assert run(sweep_sampler(False, 7)) == run(sweep_sampler(False, 7))


def test_a_restored_sampler_does_not_redraw_the_configs_it_drew_before():
    """After a resume the sampler is rebuilt: seeded from the seed alone it would propose the same
    random start-up configs again; it also counts the study's finished trials."""
    import pickle

    study = optuna.create_study(sampler=sweep_sampler(False, 7))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    first = [t.params["x"] for t in study.trials]
    restored = pickle.loads(pickle.dumps(study.sampler))
    study.sampler = restored
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    again = [t.params["x"] for t in study.trials[3:]]
    assert not set(first) & set(again), (first, again)
