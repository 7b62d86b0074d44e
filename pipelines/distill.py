#!/usr/bin/env python
"""DVFL-Net: distil a Video-FocalNet teacher into the nano student on Ray Train.

With no arguments this runs the embedded default end to end (generate a small motion dataset,
ingest it, train a demo teacher, cache its logits, train the student without and with KD, and
write a results table + curves) on a laptop. On a cluster:

    ray job submit --working-dir . -- python pipelines/distill.py --config configs/ucf101_base.yaml

Every stage is reused when its inputs are unchanged; an interrupted run resumes from its last
checkpoint when the same command is run again (``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import sys
import time

import _bootstrap  # noqa: F401
from dvfl.cli import add_config_args, config_from_args

from dvfl.runtime import ray_runtime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--teacher", help="teacher model dir or official checkpoint (config: teacher.path)")
    p.add_argument("--teacher-mode", choices=["cached", "online"], help="config: teacher.mode")
    p.add_argument("--clips", help="ingest output to train on (config: data.clips)")
    p.add_argument("--unlabeled", help="ingest output holding unlabelled clips (config: data.unlabeled)")
    p.add_argument("--epochs", type=int, help="student epochs (config: optim.epochs)")
    p.add_argument("--workers", type=int, help="Ray Train workers (config: scaling.num_workers)")
    p.add_argument("--gpu", action="store_true", default=None, help="train on GPUs (config: scaling.use_gpu)")
    p.add_argument("--resume", action="store_true",
                   help="resume an interrupted run (the default: same command, same output dir)")
    p.add_argument("--fresh", action="store_true", help="discard trained models and checkpoints first")
    a = p.parse_args(argv)
    cfg = config_from_args(a, {"teacher.path": a.teacher, "teacher.mode": a.teacher_mode, "data.clips": a.clips,
                               "data.unlabeled": a.unlabeled, "optim.epochs": a.epochs,
                               "scaling.num_workers": a.workers, "scaling.use_gpu": a.gpu})
    from dvfl import pipeline
    from dvfl.cli import announce_job_outputs
    from dvfl.config import dump_config

    announce_job_outputs(cfg.output_dir)

    if a.fresh:
        pipeline.clean_run(cfg)
    started = time.time()
    pipeline.ensure_videos(cfg)  # before Ray starts: the generator forks processes
    with ray_runtime(num_cpus=a.num_cpus):
        from dvfl import storage

        storage.makedirs(cfg.output_dir)
        dump_config(cfg, storage.join(cfg.output_dir, "config.yaml"))
        pipeline.run_all(cfg, started=started)
    print(f"[distill] finished in {time.time() - started:.0f}s; results in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
