"""Ray Tune's Optuna searcher on a study that outlives its driver (orchestrator.search.study).

Tune saves its experiment state (trials, searcher) every few seconds, while Optuna writes each
``tell`` to the study's database at once. When the sweep driver is killed between the two, the
restored Tune run resumes a trial whose Optuna twin the database already holds as finished, and
Optuna refuses every later intermediate value for it (``UpdateFinishedTrialError``). Ray's
``OptunaSearch.on_trial_complete`` already tolerates a refused ``tell``, but ``on_trial_result``
does not, so the refusal escaped and failed the whole resumed sweep.

:class:`KeptStudySearch` is ``OptunaSearch`` with that one case handled: the refused report is
skipped (it only feeds Optuna's pruners, which Tune's scheduler replaces here) and said once per
trial. The trial's final values still reach the study: ``orchestrator.search.study.record_missing`` adds
every trial the sweep finished and the study lacks, once the sweep ends.
"""

from __future__ import annotations

import logging
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class KeptStudySearch(OptunaSearch):
    """``OptunaSearch`` that skips intermediate results of a trial its study already closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed_in_study: set[str] = set()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.closed_in_study:
            return
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            self.closed_in_study.add(trial_id)
            log.warning("trial %s: its Optuna record was closed before the sweep driver was killed; its "
                        "intermediate results are not reported to the study again, and its final values "
                        "are added when the sweep ends", trial_id)
