"""Optuna samplers that survive being pickled by Ray Tune.

``ray.tune.Tuner(...)`` pickles its Tune config with cloudpickle, searcher included, and Tune
pickles the searcher again whenever it saves the experiment state. From Optuna 5.1 the genetic
samplers (NSGA-II, NSGA-III) hold a ``threading.Lock`` for their generation cache, which cannot be
pickled: a multi-objective sweep then failed before its first trial with "cannot pickle
'_thread.lock' object" (Optuna 5.0 had no lock, so the same sweep ran).

:class:`RebuiltSampler` is a public-API :class:`optuna.samplers.BaseSampler` that holds a
picklable *recipe* (a class and its keyword arguments) and builds the real sampler where it is
used. Pickling keeps the recipe and drops the built sampler, so nothing of Optuna's (or Ray's)
private state is touched. What is lost across a pickle is only the sampler's own cache and random
generator: a genetic sampler reads its population from the study's trials, so a restored sweep
goes on from the study's history. The generator is seeded when the sampler is built, from the
recipe's seed and the number of finished trials the study holds then: a fresh sweep (no trials) draws
exactly what the seed says, and a resumed one does not draw its first configs again (restarted
from the bare seed, TPE's random start-up would propose the same learning rates as before the kill).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState


class RebuiltSampler(BaseSampler):
    """Delegates every call to ``cls(**kwargs)``, built on first use and again after unpickling."""

    def __init__(self, cls: type[BaseSampler], **kwargs: Any):
        self.cls, self.kwargs = cls, kwargs
        self._inner: BaseSampler | None = None

    @property
    def inner(self) -> BaseSampler:
        if self._inner is None:
            self._inner = self.cls(**self.kwargs)
        return self._inner

    def _built_for(self, study) -> BaseSampler:
        """The sampler, built on first use with a seed that also counts the study's trials."""
        if self._inner is None:
            kwargs = dict(self.kwargs)
            finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)  # not the trial being asked
            done = len(study.get_trials(deepcopy=False, states=finished))
            if done and kwargs.get("seed") is not None:
                kwargs["seed"] = (int(kwargs["seed"]) + 1_000_003 * done) % 2**32
            self._inner = self.cls(**kwargs)
        return self._inner

    def __getstate__(self) -> dict[str, Any]:
        return {"cls": self.cls, "kwargs": self.kwargs, "_inner": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"RebuiltSampler({self.cls.__name__}, {self.kwargs})"

    # -- BaseSampler, delegated ------------------------------------------------------------------
    def infer_relative_search_space(self, study, trial):
        return self._built_for(study).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._built_for(study).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._built_for(study).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._built_for(study).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._built_for(study).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def sweep_sampler(multi_objective: bool, seed: int) -> BaseSampler:
    """TPE for one objective, NSGA-II for several; both picklable (see the module docstring)."""
    if multi_objective:
        return RebuiltSampler(optuna.samplers.NSGAIISampler, seed=seed)
    return RebuiltSampler(optuna.samplers.TPESampler, seed=seed)
