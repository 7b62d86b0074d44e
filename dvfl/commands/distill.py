"""DVFL-Net: distil a Video-FocalNet teacher into the nano student on Ray Train.

With no arguments this runs the embedded default end to end (generate a small motion dataset,
ingest it, check the shipped teacher (models/embedded_teacher), cache its logits, train the
student without and with KD, and write a results table + curves) on a laptop. On a cluster:

    ray job submit --working-dir . -- python pipelines/distill.py --config configs/ucf101_base.yaml

(``dvfl distill`` takes the same arguments.) Every stage is reused when its inputs are unchanged;
an interrupted run resumes from its last checkpoint when the same command is run again (``--fresh``
starts over).
"""
from __future__ import annotations

import argparse
import sys
import time

from dvfl.cli import add_config_args, add_fresh, add_num_workers, config_from_args, failures_as_one_line, fits_ray
from dvfl.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, out_is_output_dir=True)
    p.add_argument("--out", help="the run's folder: clips, teacher, cache, students, results (config: output_dir)")
    p.add_argument("--teacher", help="teacher model dir or official checkpoint (config: teacher.path)")
    p.add_argument("--teacher-mode", choices=["cached", "online"], help="config: teacher.mode")
    p.add_argument("--clips", help="ingest output to train on (config: data.clips)")
    p.add_argument("--unlabeled", help="the ingest output of --clips, ingested with its --unlabeled videos "
                   "(config: data.unlabeled)")
    p.add_argument("--epochs", type=int, help="student epochs (config: optim.epochs)")
    add_num_workers(p)
    p.add_argument("--gpu", action="store_true", default=None, help="train on GPUs (config: scaling.use_gpu)")
    p.add_argument("--resume", action="store_true",
                   help="resume an interrupted run (the default: same command, same --out)")
    add_fresh(p, "discard trained models and checkpoints in --out first (clips stay)")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    cfg = config_from_args(a, {"output_dir": a.out, "teacher.path": a.teacher, "teacher.mode": a.teacher_mode,
                               "data.clips": a.clips, "data.unlabeled": a.unlabeled, "optim.epochs": a.epochs,
                               "scaling.num_workers": a.num_workers, "scaling.use_gpu": a.gpu},
                           outputs=("data.clips",))  # ingested there from data.root when it does not exist yet
    try:
        cfg.require_teacher()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from dvfl import pipeline, storage

    if a.fresh and (refusal := pipeline.fresh_refusal(cfg)):
        print(f"config error: {refusal}", file=sys.stderr)
        return 2
    from dvfl.cli import announce_job_outputs, cpus_refused_before_videos, generate_videos

    try:  # given clips or teacher that the config does not describe: refused before Ray starts or a file is written
        if not a.config:
            refuse_own_data_under_the_embedded_recipe(cfg)
        pipeline.check_given_inputs(cfg)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from dvfl.config import dump_config
    from dvfl.locks import folder_lock, reads_held
    from dvfl.runtime import ray_runtime

    announce_job_outputs(cfg.output_dir)

    started = time.time()
    # one run per folder: a resubmitted job beside a running one replaced its videos and clips
    # interrupted before --fresh's deletions are done, a rerun without --fresh would reuse the models
    # it meant to discard (the Ctrl+C line says to keep --fresh)
    a.fresh_done = not a.fresh
    with failures_as_one_line("distill"), folder_lock(cfg.output_dir, "run"), reads_held():
        if cpus_refused_before_videos(cfg, a.num_cpus) or not generate_videos(cfg):
            return 2
        with ray_runtime(num_cpus=a.num_cpus) as resources:
            if not fits_ray(cfg, resources):  # (before --fresh deletes anything)
                return 2
            if a.fresh:
                pipeline.clean_run(cfg)
                a.fresh_done = True
            storage.makedirs(cfg.output_dir)
            pipeline.remove_report(cfg.output_dir)  # a run that fails must not leave an earlier one's beside its config
            dump_config(cfg, storage.join(cfg.output_dir, "config.yaml"))
            pipeline.run_all(cfg, started=started)
    print(f"[distill] finished in {time.time() - started:.0f}s; results in {cfg.output_dir}")
    return 0


def refuse_own_data_under_the_embedded_recipe(cfg) -> None:
    """One's own clips or videos (``--clips``, ``--set data.clips=`` or ``data.dataset``) with no
    ``--config`` trained the embedded default's recipe on them (a 16-wide student, 3 seeds x 4
    students, its 8-class teacher): refused. The default's own clips (on s3, say) are fine."""
    from dvfl.data.shards import load_dataset_info

    dataset = cfg.data.dataset
    if dataset == "synthetic" and cfg.data.clips:
        try:
            dataset = load_dataset_info(cfg.clips_dir).get("dataset") or dataset
        except (OSError, ValueError):
            return  # check_given_inputs names a missing or unfinished ingest
    if dataset != "synthetic":
        where = f"data.clips {cfg.clips_dir} holds {dataset} clips" if cfg.data.clips else f"data.dataset is {dataset}"
        raise ConfigError(f"{where}, and with no --config the embedded default's recipe would train on them (its "
                          "tiny student, its 8-class teacher): give --config, e.g. a copy of configs/ucf101_base.yaml "
                          "with your data, classes and teacher")
