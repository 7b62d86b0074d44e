"""Train (fine-tune) a teacher on ingested clip shards with the shared Ray Train loop.

    dvfl teacher --config configs/ucf101_base.yaml [--checkpoint FILE --reinit-head]
    dvfl teacher --clips DIR --out DIR [--arch NAME] [--epochs N] [--checkpoint FILE]

(``python pipelines/train_teacher.py`` takes the same arguments.) With ``--config`` everything
comes from the run config: the clips (``data.clips``), the output (``teacher.path``, where
distillation and the cache look for it), the architecture (``teacher.train``), the recipe
(``teacher.optim``), frames, crop and the validation hold-out; the flags override single fields.

Real runs use Video-FocalNet-B (``--arch videofocalnet_base``) initialised from the official
Kinetics-400 checkpoint (``--checkpoint video-focalnet_base_k400.pth --reinit-head``) or from a
2D ImageNet FocalNet (``--init-2d``). Writes OUT/model.pt + OUT/model.json (with the validation
accuracy and the per-epoch history).
"""
from __future__ import annotations

import argparse
import json
import sys

from dvfl.cli import (absolute_path_args, add_config_args, add_num_workers, clips_own_settings, config_from_args,
                      cpus_refused_before_videos, deprecated, failures_as_one_line, fits_ray, local_outputs, run_paths,
                      uses_config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--clips", help="ingest output (shards/ + dataset.json) (config: data.clips; a synthetic --config generates and ingests them)")
    p.add_argument("--out", help="directory for the trained teacher (config: teacher.path)")
    p.add_argument("--arch", default=None, help="architecture (default videofocalnet_base; config: teacher.train.model)")
    deprecated(p, "--model", "--arch", "arch")
    p.add_argument("--embed-dim", type=int, help="override the variant's width")
    p.add_argument("--epochs", type=int, help="config: teacher.optim.epochs")
    p.add_argument("--lr", type=float, help="config: teacher.optim.lr")
    p.add_argument("--batch-size", type=int, help="config: teacher.optim.batch_size")
    p.add_argument("--checkpoint", help="official Video-FocalNet checkpoint to start from")
    p.add_argument("--reinit-head", action="store_true", help="new classifier when the class count differs")
    p.add_argument("--init-2d", help="2D ImageNet FocalNet state dict to start from")
    add_num_workers(p)
    p.add_argument("--gpu", action="store_true", default=None, help="config: scaling.use_gpu")
    p.add_argument("--publish", help="also ship the teacher as a model folder (safetensors + spec + card) here")
    p.add_argument("--test-config", help="with --publish: record the teacher's accuracy on this run config's "
                                         "test split in the folder (its clips are generated/ingested as needed)")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    prepared = teacher_run_config(a, p)
    if isinstance(prepared, int):
        return prepared
    cfg, info, test_cfg, out, to_generate = prepared
    from dvfl import pipeline, storage
    from dvfl.locks import folder_lock, reads_held
    from dvfl.runtime import ray_runtime

    # one run per folder (see dvfl/locks.py), the --test-config's too (its clips are made there);
    # the videos are made under the locks
    with failures_as_one_line("teacher"), folder_lock(cfg.output_dir, "run"), \
            folder_lock(test_cfg.output_dir if test_cfg else cfg.output_dir, "run"), reads_held():
        if cpus_refused_before_videos(cfg, a.num_cpus):
            return 2
        for c in to_generate:
            pipeline.ensure_videos(c)  # before Ray starts: the generator forks processes
        with ray_runtime(num_cpus=a.num_cpus) as resources:
            # the teacher's clips and run folder, and the --test-config's clips its accuracy is taken on
            outputs, inputs = run_paths(cfg, clips_only=True)
            if test_cfg:
                test_out, test_in = run_paths(test_cfg, clips_only=True)
                if not (test_cfg.data.dataset == "synthetic" and test_out["data.clips"]):
                    del test_out["output_dir"]  # (read by Ray tasks only as the home of videos still to decode)
                outputs.update({f"--test-config {k}": v for k, v in test_out.items()})
                inputs.update({f"--test-config {k}": v for k, v in test_in.items()})
            if not fits_ray(cfg, resources, (outputs, inputs)):
                return 2
            # (clips found finished before Ray started: held for reading now, as ensure_clips holds the ones it makes)
            info = pipeline.ensure_clips(cfg) if info is None else pipeline.hold_clips(cfg, info)
            pipeline.say_validation_note(cfg)
            path, spec = pipeline.ensure_teacher(cfg, info)
            storage.makedirs(out)
            storage.remove(storage.join(out, "model.json"))  # an older model's spec never pairs with these weights
            for name in ("model.pt", "model.json"):  # the spec last: a folder with model.json is a whole model
                storage.write_bytes(storage.join(out, name), storage.read_bytes(storage.join(path, name)))
            summary = {"teacher": out, "model": spec["name"], "val_top1": spec.get("val_top1"),
                       "val_split": spec.get("val_split"), "weights_fingerprint": spec["weights_fingerprint"]}
            if a.publish:
                # (the run's own copy: where the teacher trained can read it; --out may be the head's disk)
                summary["published"] = pipeline.publish_teacher(path, a.publish, test_cfg, use_gpu=cfg.scaling.use_gpu)
    print(json.dumps(summary))
    return 0


def teacher_run_config(a: argparse.Namespace, p: argparse.ArgumentParser):
    """(run config, the clips' dataset.json or None when they are still to be made, the
    --test-config run config or None, the output folder, the configs whose videos are to be
    generated), or an exit code; no Ray yet, nothing written."""
    if a.test_config and not a.publish:
        p.error("--test-config records an accuracy in a published folder: give --publish too")
    local_outputs(p, a, "publish")
    absolute_path_args(a, inputs=("clips", "checkpoint", "init_2d", "test_config"), outputs=("out", "publish"))
    from dvfl.export import replaceable_folder

    if a.publish and not replaceable_folder(a.publish):  # (found after the training, as a traceback)
        p.error(f"--publish {a.publish} exists and is not an exported model folder; not overwriting it")
    # --set alone is not a config: bare --clips/--out with a --set trained the embedded default's teacher
    from_config = bool(a.config) or (uses_config(a) and not (a.clips and a.out))
    if not from_config and not (a.clips and a.out):
        p.error("give --config (paths from the run config) or both --clips and --out")
    own: dict = {}
    if not from_config:  # the named variant as it is (not the embedded default's small teacher) on the clips as
        own = clips_own_settings(a.clips)  # they are (not the default's generated videos), --set on top
        # (the default architecture before the user's --set: after it, it overrode --set teacher.train.model)
        a.overrides = [("teacher.train.model", a.arch or "videofocalnet_base"),
                       ("teacher.train.embed_dim", a.embed_dim), ("teacher.train.depths", None),
                       ("scaling.concurrent_runs", 0),  # (side-by-side students: not a teacher's)
                       *((f"data.{k}", v) for k, v in own.items()), *a.overrides]
    cfg = config_from_args(a, {"data.clips": a.clips, "teacher.path": a.out, "teacher.train.model": a.arch,
                               "teacher.train.embed_dim": a.embed_dim, "teacher.optim.epochs": a.epochs,
                               "teacher.optim.lr": a.lr, "teacher.optim.batch_size": a.batch_size,
                               "teacher.train.checkpoint": a.checkpoint, "teacher.train.init_2d": a.init_2d,
                               "teacher.train.reinit_head": a.reinit_head or None,
                               "scaling.num_workers": a.num_workers, "scaling.use_gpu": a.gpu},
                           outputs=("teacher.path",))
    out = cfg.teacher.path
    if not out:
        p.error("no output: set teacher.path in the config or give --out")
    from dvfl import pipeline, storage

    refusal = teacher_output_refusal(out)
    if refusal:  # (found after the whole training, as a traceback or a folder of two models)
        p.error(refusal)

    test_cfg = None
    from dvfl.config import ConfigError, load_config, parse_override

    if a.test_config:
        try:  # its teacher is the one this command makes: it need not exist yet
            # (and its clips need not exist yet: ingested from its data.root, as its --help says)
            test_cfg = load_config(a.test_config, [("teacher.path", None)], outputs=("data.clips",))
        except ConfigError as exc:
            p.error(f"--test-config {a.test_config}: {exc}")
    # a synthetic config generates its videos and ingests them (as distill does): by run()
    generate = from_config and cfg.data.dataset == "synthetic"
    to_generate = ((cfg,) if generate else ()) + ((test_cfg,) if test_cfg else ())
    if not generate and not storage.isfile(storage.join(cfg.clips_dir, "dataset.json")):
        p.error(f"clips {cfg.clips_dir}: not a finished ingest output (no dataset.json); run `dvfl ingest` first")
    from dvfl.data.shards import load_dataset_info

    try:
        info = None if generate else load_dataset_info(cfg.clips_dir)
    except ValueError as exc:
        p.error(f"clips {cfg.clips_dir}: {exc}")
    if test_cfg and info is not None:  # its accuracy on another split's test videos, which it trains on
        then = pipeline.trained_on(info)
        if (then["dataset"] == test_cfg.data.dataset and then["split"] is not None
                and test_cfg.data.split != then["split"]):
            p.error(f"--test-config {a.test_config}: its test split is {then['dataset']} split {test_cfg.data.split}, "
                    f"the teacher trains on split {then['split']}, whose training videos hold that split's test "
                    f"videos: give the test config of split {then['split']}")
    if from_config and info is not None:
        try:  # the config describes the clips: a mismatch is an error, not a silent change
            pipeline.check_clips_match(cfg, info)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif info is not None:  # bare --clips: the clips describe themselves, and a --set may not say otherwise
        for field, value in own.items():
            if getattr(cfg.data, field) != value:
                print(f"config error: --set data.{field}={getattr(cfg.data, field)}: the clips {cfg.clips_dir} hold "
                      f"{value} (dataset.json); leave it out, or ingest the clips again with it", file=sys.stderr)
                return 2
        try:
            cfg.validate(outputs=("teacher.path",))
        except ConfigError as exc:  # e.g. clips at their source size and no crop size
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        set_keys = {(parse_override(o) if isinstance(o, str) else o)[0] for o in a.overrides}
        if not getattr(a, "output_dir", None) and "output_dir" not in set_keys:
            cfg.output_dir = storage.join(out, "_work")
    cfg.teacher.path = None  # train one (ensure_teacher would otherwise use the given teacher)
    try:  # a --checkpoint the model cannot take: before any work, not when the run is planned
        pipeline.check_start_weights(cfg)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return cfg, info, test_cfg, out, to_generate


TEACHER_FILES = ("model.pt", "model.json", "_work")  # what this command writes there (_work: a bare run's folder)


def teacher_output_refusal(out: str) -> str | None:
    """Why the teacher may not be written to ``out`` (teacher.path): a file (a given checkpoint), or a
    folder holding anything but an earlier teacher of this command (an exported model folder, whose
    safetensors and card would then describe another model beside the new model.pt); None when it may."""
    from dvfl import storage

    if storage.isfile(out):
        return (f"teacher.path {out} is a file (a given checkpoint?): the trained teacher is a folder; give --out, "
                "or --set teacher.path=FOLDER")
    others = [n for n in storage.list_entries(out) if n not in TEACHER_FILES and not n.startswith(".")]
    if others:
        return (f"teacher.path {out} holds {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}, not only a "
                "teacher this command wrote (an exported model folder, or files of yours): train into another "
                "folder (--out, or --set teacher.path=FOLDER); --publish FOLDER ships an exported one")
    return None
