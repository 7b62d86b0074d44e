"""ASHA whose rungs survive a resumed search.

``Tuner.restore`` brings the scheduler back as it was pickled when the search began, with empty
rungs: a resumed search judged its remaining trials only against each other, so it stopped fewer
of them than the same search run without a break. Tune does save its callbacks' state with the
experiment, so a callback keeps every trial's (epoch, metric) results, and the scheduler, which
shares the callback through the same pickle, replays a restored trial's results into its rungs
when Tune adds the trial back.
"""
from __future__ import annotations

from ray import tune
from ray.tune.schedulers import ASHAScheduler


class TrialResults(tune.Callback):
    """Each trial's ``metric`` at each ``time_attr``, saved with the experiment's state."""

    def __init__(self, time_attr: str, metric: str):
        self.time_attr, self.metric = time_attr, metric
        self.results: dict[str, dict] = {}  # trial id -> {time: metric}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.time_attr in result and self.metric in result:
            self.results.setdefault(trial.trial_id, {})[result[self.time_attr]] = result[self.metric]

    def get_state(self) -> dict | None:
        return {"results": self.results} if self.results else None

    def set_state(self, state: dict) -> None:
        self.results = state["results"]


class ResumableASHA(ASHAScheduler):
    """ASHA fed, for every trial Tune adds back on a resume, the results that trial reported before."""

    def __init__(self, results: TrialResults, **kwargs):
        super().__init__(time_attr=results.time_attr, **kwargs)
        self.trial_results = results

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        earlier = self.trial_results.results.get(trial.trial_id, {})
        for time in sorted(earlier):  # in the order they arrived: each records at most one rung
            super().on_trial_result(tune_controller, trial, {self.trial_results.time_attr: time,
                                                             self.trial_results.metric: earlier[time]})


def resumable_asha(metric: str, **asha_kwargs) -> tuple[ResumableASHA, TrialResults]:
    """The scheduler and the callback that keeps its results: pass both to the same Tuner."""
    results = TrialResults("epoch", metric)
    return ResumableASHA(results, **asha_kwargs), results
