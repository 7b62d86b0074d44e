#!/usr/bin/env python
"""Which temperature, α, learning rate and student width? A Ray Tune search over distillation runs.

With no arguments this searches the embedded default (configs/tune_embedded.yaml) in minutes on a
laptop: it reuses (or builds) the clips, teacher and teacher-logit cache of
``python pipelines/distill.py``, then runs the trials from that one cache, stopping weak ones early
with ASHA on the validation top-1 of every epoch. Results (trial table, Pareto plot of top-1 vs
GMACs, the best configuration as a run config) go to <storage>/<experiment>; watch it with
``tensorboard --logdir <storage>/<experiment>``.

    python tuning/search.py [--config configs/tune_ucf101.yaml] [--set tune.num_samples=8] [--set optim.epochs=2]

``--set tune.FIELD=V`` changes the search, any other ``--set SECTION.FIELD=V`` the run config every
trial starts from. Running the same command again resumes an interrupted experiment
(``Tuner.restore``) or just rewrites the results of a finished one; ``--fresh`` starts over.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dvfl.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="search config YAML (default: configs/tune_embedded.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[tune.]SECTION.FIELD=VALUE",
                   help="override a search (tune.*) or run config value (repeatable)")
    p.add_argument("--output-dir", help="the run config's output_dir (clips, teacher, cache; default storage)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: 2 x cores)")
    p.add_argument("--fresh", action="store_true", help="discard this experiment's trials and start over")
    p.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    a = p.parse_args(argv)
    from dvfl.tune import SearchFailed, load_tune_config, run_search

    try:
        search, cfg = load_tune_config(a.config, a.overrides, output_dir=a.output_dir)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from dvfl import pipeline
    from dvfl.cli import announce_job_outputs
    from dvfl.runtime import ray_runtime
    from dvfl.tune import experiment_dir

    announce_job_outputs(str(experiment_dir(search, cfg)))

    started = time.time()
    pipeline.ensure_videos(cfg)  # before Ray starts: the generator forks processes
    with ray_runtime(num_cpus=a.num_cpus):
        try:
            run_search(search, cfg, fresh=a.fresh, verbose=0 if a.quiet else 1)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        except SearchFailed as exc:
            print(f"[tune] FAILED after {time.time() - started:.0f}s: {exc}", file=sys.stderr)
            return 1
    print(f"[tune] finished in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
