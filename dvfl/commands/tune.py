"""Which temperature, α, learning rate and student width? A Ray Tune search over distillation runs.

With no arguments this searches the embedded default (configs/tune_embedded.yaml) in minutes on a
laptop: it reuses (or builds) the clips, teacher and teacher-logit cache of ``dvfl distill``, then
runs the trials from that one cache, stopping weak ones early with ASHA on the validation top-1 of
every epoch. Results (trial table, Pareto plot of top-1 vs GMACs, the best configuration as a run
config) go to <storage>/<experiment>; watch it with ``tensorboard --logdir <storage>/<experiment>``.

    dvfl tune [--search configs/tune_ucf101.yaml] [--set tune.num_samples=8]
              [--set optim.epochs=2 --set tune.asha.grace_period=1]   (ASHA's first judgement within the epochs)

(``python tuning/search.py`` takes the same arguments.) ``--search`` is a search config (its
``run_config`` names the run config every trial starts from); ``--set tune.FIELD=V`` changes the
search, any other ``--set SECTION.FIELD=V`` that run config. Running the same command again resumes
an interrupted experiment (``Tuner.restore``) or just rewrites the results of a finished one;
``--fresh`` starts over.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial

from dvfl.cli import add_fresh, add_num_cpus, deprecated, paths_on_every_node, run_paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", help="search config YAML (default: configs/tune_embedded.yaml)")
    # a search config is not a run config: --config names run configs everywhere else
    deprecated(p, "--config", "--search", "search")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[tune.]SECTION.FIELD=VALUE",
                   help="override a search (tune.*) or run config value (repeatable)")
    p.add_argument("--out", help="the run config's output_dir: clips, teacher, cache, and the experiment under "
                                 "OUT/tune unless tune.storage is set (default: the run config's output_dir)")
    deprecated(p, "--output-dir", "--out", "out")
    add_num_cpus(p)
    add_fresh(p, "discard this experiment's trials")
    p.add_argument("--tables", action="store_true",
                   help="also print Ray Tune's own status tables (every trial, every 30 s); by default the "
                        "terminal shows this project's lines: the stages, each trial's epochs, the results")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # the default since session 25


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from dvfl.config import ConfigError
    from dvfl.tune import SearchFailed, load_tune_config, run_search

    try:
        search, cfg = load_tune_config(a.search, a.overrides, output_dir=a.out)
        from dvfl.pipeline import check_given_inputs
        from dvfl.tune.search import refuse_changed_settings
        from dvfl.tune.search_config import check_start_weights_fit_space

        check_given_inputs(cfg)
        check_start_weights_fit_space(search, cfg)
        if not a.fresh:  # before the videos are made for the new settings
            refuse_changed_settings(search, cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from dvfl.cli import announce_job_outputs, cpus_refused_before_videos, failures_as_one_line, generate_videos
    from dvfl.locks import folder_lock, reads_held
    from dvfl.runtime import ray_runtime
    from dvfl.tune import experiment_dir
    from dvfl.tune.resources import check_resources

    announce_job_outputs(str(experiment_dir(search, cfg)))

    started = time.time()
    a.fresh_done = not a.fresh  # (Ctrl+C while --fresh deletes: the rerun needs --fresh again; dvfl.cli.run_command)
    # the run config's folder (clips, teacher, cache) is the search's while it prepares and runs
    with failures_as_one_line("tune"), folder_lock(cfg.output_dir, "run"), reads_held():
        if cpus_refused_before_videos(cfg, a.num_cpus, partial(check_resources, search)) or not generate_videos(cfg):
            return 2
        with ray_runtime(num_cpus=a.num_cpus):
            outputs, inputs = run_paths(cfg)
            # a trial loads the student's start weights itself, on whichever node Tune places it
            inputs.update({"student.checkpoint": cfg.student.checkpoint, "student.init_2d": cfg.student.init_2d})
            if not paths_on_every_node({**outputs, "tune.storage": search.storage}, inputs):
                return 2
            try:
                summary = run_search(search, cfg, fresh=a.fresh, verbose=1 if a.tables and not a.quiet else 0,
                                     fresh_done=lambda: setattr(a, "fresh_done", True))
            except ConfigError as exc:
                print(f"config error: {exc}", file=sys.stderr)
                return 2
            except SearchFailed as exc:
                print(f"[tune] FAILED after {time.time() - started:.0f}s: {exc}", file=sys.stderr)
                return 1
    errored = summary.get("errors") or 0  # (some trials errored, the rest found something: said, not hidden)
    print(f"[tune] finished in {time.time() - started:.0f}s"
          + (f"; {errored} of {summary.get('trials')} trials errored (first error above)" if errored else ""))
    return 0
