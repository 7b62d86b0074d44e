"""Hyper-parameter search with Ray Tune: which temperature, α, learning rate and student width?

Every trial is a distillation run of the shared loop (:func:`dvfl.train.loop.train_loop_per_worker`)
on the same clip shards against the same teacher-logit cache: the clips, the teacher and the cache
are prepared once, before the search (:mod:`dvfl.pipeline` reuses finished stages by
fingerprint), so no trial ever runs the teacher.

The Ray 2.60 pattern (Train V2): a Tune trial is a light driver function
(:func:`trial_driver`, ``tune.with_resources(..., {"cpu": driver_cpus})``) that builds and fits a
``TorchTrainer`` through :func:`dvfl.train.launch.run_training`, whose Train ``RunConfig`` carries
``TuneReportCallback`` so rank 0's per-epoch metrics reach Tune; ASHA stops weak trials on the
validation top-1 of each epoch (``time_attr="epoch"``: an epoch number survives a resumed Train run).

The search is data: a YAML file (``configs/tune_*.yaml``, see :class:`TuneConfig`) names the run
config every trial starts from and the space as dotted config fields::

    space:
      kd.temperature: {loguniform: [1, 20]}
      student.embed_dim: {choice: [12, 16, 24]}

Results live under ``<storage>/<experiment>`` (Tune's per-trial TensorBoard events, the trial
table, a Pareto plot and the best configuration as a run config ``pipelines/distill.py`` takes);
an interrupted experiment resumes with ``Tuner.restore``.
"""
from dvfl.tune.report import (BEST_CONFIG, PARETO_PNG, RESULTS_JSON, RESULTS_MD, SearchFailed, choose, collect_trials,
                              cost_level_bests, pareto_front, report_errors, write_results)
from dvfl.tune.resources import check_resources, reclaim_orphaned_placement_groups, required_resources
from dvfl.tune.search import SEARCH_FILE, prepare, remove_experiment, run_search
from dvfl.tune.search_config import TuneConfig, apply_params, experiment_dir, load_tune_config, validate_tune
from dvfl.tune.trial import diverged, trial_driver

__all__ = ["TuneConfig", "SearchFailed", "load_tune_config", "validate_tune", "apply_params", "run_search", "prepare",
           "required_resources", "check_resources", "reclaim_orphaned_placement_groups", "pareto_front",
           "cost_level_bests", "choose",
           "collect_trials", "write_results", "report_errors", "trial_driver", "diverged", "experiment_dir",
           "remove_experiment", "SEARCH_FILE", "RESULTS_JSON", "RESULTS_MD", "PARETO_PNG", "BEST_CONFIG"]
