"""Run the teacher once over every stored view of the training clips (the train split and the
unlabelled pool) and cache its raw logits (Ray Data).

    dvfl cache --config configs/ucf101_base.yaml
    dvfl cache --clips DIR --teacher DIR_OR_FILE --out DIR

(``python pipelines/cache_teacher.py`` takes the same arguments.) With ``--config`` the clips
(``data.clips``), teacher (``teacher.path``, ``teacher.model``), cache (``teacher.cache``, which
distillation then reads), crop size, views, dtype and GPU use come from the run config, so the
cache is exactly the one distillation asks for; flags override single fields.

The cache is content-addressed (teacher weights + architecture, the clips' ingest fingerprint,
the view spec); rerunning reuses a finished cache and resumes an interrupted one.
"""
from __future__ import annotations

import argparse
import sys

from dvfl.cli import (absolute_path_args, add_config_args, add_fresh, check_gpu_reachable, clips_own_settings,
                      config_from_args, deprecated, os_error_line, set_value, uses_config)
from dvfl.config import DIRECTIONAL_DATASETS, SPLIT_PLACEHOLDER, ConfigError, DataSection
from dvfl.data.sampling import TRAIN_LIKE_SPLITS


def built_crop(out: str) -> int | None:
    """The crop of an earlier cache build in ``out`` (its cache.json), which its rerun continues."""
    from dvfl import storage
    from dvfl.teacher_cache import CACHE_JSON

    try:
        crop = storage.read_json(storage.join(out, CACHE_JSON))["view_spec"]["crop_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    print(f"[cache] crop {crop} px: the crop of the cache already in {out} (--crop-size to change, --fresh to "
          "start over)", file=sys.stderr)
    return crop


def default_crop(teacher: str, stored: int) -> int | None:
    """The crop the teacher folder was trained on where the clips hold it (as evaluate takes it),
    else the stored short side (None for clips at their source size), said in a line."""
    crop = trained_crop(teacher)
    if crop and (not stored or crop <= stored):
        print(f"[cache] crop {crop} px: the crop {teacher} was trained on (--crop-size to change)", file=sys.stderr)
        return crop
    if crop:
        print(f"[cache] note: {teacher} was trained on {crop} px crops, larger than the clips' short side {stored}: "
              f"caching at {stored} px", file=sys.stderr)
    return stored or None


def trained_crop(teacher: str) -> int | None:
    """The crop a model folder's teacher was trained on (its model.json); None for a checkpoint file."""
    from dvfl import storage
    from dvfl.artifacts import SPEC

    spec_path = storage.join(teacher, SPEC)
    if not storage.isfile(spec_path):
        return None
    try:
        spec = storage.read_json(spec_path)
    except (OSError, ValueError):
        return None  # (a damaged model.json: loading the teacher says so)
    if not isinstance(spec, dict):
        return None  # (likewise)
    return (spec.get("inputs") or {}).get("crop_size") or (spec.get("kwargs") or {}).get("img_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--clips", help="ingest output (shards/ + dataset.json) (config: data.clips)")
    p.add_argument("--teacher", help="teacher model dir (model.json) or official checkpoint file (config: teacher.path)")
    p.add_argument("--arch", help="architecture of a bare --teacher checkpoint file, e.g. videofocalnet_base "
                                  "(config: teacher.model)")
    deprecated(p, "--teacher-model", "--arch", "arch")
    p.add_argument("--out", help="cache directory (config: teacher.cache)")
    p.add_argument("--crop-size", type=int, help="default: data.crop_size; without a config the crop the teacher "
                                                 "folder was trained on, else the stored short side")
    p.add_argument("--cache-views", help="comma-separated cached views, e.g. center,center+flip (config: "
                   "teacher.views; default center)")
    deprecated(p, "--views", "--cache-views", "cache_views")
    p.add_argument("--dtype", choices=["float16", "float32"], help="config: teacher.cache_dtype (default float16)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, help="teacher replicas, one per GPU (default: 1; with --config and GPUs, "
                                              "scaling.num_workers)")
    p.add_argument("--gpu", action="store_true", default=None, help="config: scaling.use_gpu")
    p.add_argument("--verify", type=int, default=32, help="cached rows to recompute and compare")
    add_fresh(p, "replace a cache of another teacher/clips in --out instead of refusing (a finished cache "
                 "of the same teacher and clips is reused: it is content-addressed)", old="--overwrite")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from dvfl.locks import reads_held

    with reads_held():  # the clips stay locked for reading while the cache is built from them (below)
        return _build(a, p)


def _build(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    a.fresh_done = not a.fresh  # (interrupted before --fresh deleted another build's cache: rerun with it)
    absolute_path_args(a, inputs=("clips", "teacher"), outputs=("out",))
    if uses_config(a):
        # a --set alone: the clips' dataset, not the embedded default's (its flip rule)
        named = a.clips or set_value(a, "data.clips")
        if not a.config and isinstance(named, str):
            from dvfl.paths import absolute_input

            # (the folder found as the config finds it: ~ expanded, a Ray job's root, its split number)
            split = set_value(a, "data.split")
            named = named.replace(SPLIT_PLACEHOLDER, str(split if split is not None else DataSection.split))
            dataset = clips_own_settings(absolute_input(named)).get("dataset")
            a.overrides = [*([("data.dataset", dataset)] if dataset else []), *a.overrides]
        # the flags as the config's fields, so that the config's checks apply to them too
        cfg = config_from_args(a, {"data.clips": a.clips, "teacher.path": a.teacher, "teacher.model": a.arch,
                                   "teacher.cache": a.out, "teacher.cache_dtype": a.dtype,
                                   "scaling.use_gpu": a.gpu, "data.crop_size": a.crop_size,
                                   "teacher.views": a.cache_views.split(",") if a.cache_views else None})
        if not cfg.teacher.path:
            p.error("no teacher: set teacher.path in the config or give --teacher")
        a.clips, a.teacher, a.arch, a.out = cfg.clips_dir, cfg.teacher.path, cfg.teacher.model, cfg.cache_dir
        if a.config or a.crop_size:  # (a --set alone: the embedded default's 32-px crop replaced the teacher's)
            a.crop_size = cfg.crop_size
        a.cache_views = ",".join(cfg.teacher.views)
        a.dtype, a.gpu = cfg.teacher.cache_dtype, cfg.scaling.use_gpu
        keep_memory = cfg.optim.keep_freed_memory
        if a.actors is None:
            a.actors = cfg.cache_actors
        from dvfl.pipeline import cache_splits

        splits = cache_splits(cfg)
    elif not (a.clips and a.teacher and a.out):
        p.error("give --config (everything from the run config) or --clips, --teacher and --out")
    else:
        splits, keep_memory = TRAIN_LIKE_SPLITS, True
        dataset = clips_own_settings(a.clips).get("dataset")
        if dataset in DIRECTIONAL_DATASETS and "flip" in (a.cache_views or ""):  # (as a config refuses them)
            p.error(f"--cache-views {a.cache_views}: must not flip {dataset} clips: its classes are directions "
                    "(left to right becomes right to left)")
    a.cache_views, a.dtype, a.gpu = a.cache_views or "center", a.dtype or "float16", bool(a.gpu)
    a.actors = 1 if a.actors is None else a.actors
    try:
        check_gpu_reachable(a.gpu)  # (a config's use_gpu was checked with the config)
    except ConfigError as exc:
        p.error(str(exc))
    from dvfl import storage

    for flag, path in (("--clips", a.clips), ("--teacher", a.teacher), ("--out", a.out)):
        why = storage.reachable(path) if storage.is_remote(path) else None  # (else a traceback: no endpoint, credentials)
        if why:
            p.error(f"{flag} {why}")
    from dvfl.locks import hold_for_reading

    # before they are read: an `ingest --fresh` into them from another terminal is refused while they are
    # read, and one writing them now is waited for
    hold_for_reading(a.clips, "cache build")
    if not storage.isfile(storage.join(a.clips, "dataset.json")):
        p.error(f"--clips {a.clips}: not a finished ingest output (no dataset.json): run `dvfl ingest` first, "
                "or its same command again to finish an interrupted one")
    if not storage.exists(a.teacher) and not storage.isdir(a.teacher):
        p.error(f"--teacher {a.teacher}: not found")
    if storage.isfile(a.teacher) and not a.arch:
        p.error("--arch is required when --teacher is a checkpoint file")
    for flag, v in (("--batch-size", a.batch_size), ("--actors", a.actors), ("--crop-size", 1 if a.crop_size is None else a.crop_size)):
        if v < 1:
            p.error(f"{flag} must be >= 1")
    from dvfl.data.shards import load_dataset_info
    from dvfl.teacher_cache import view_spec

    try:  # before Ray starts: unknown, random or repeated views
        view_spec(a.crop_size or 1, a.cache_views.split(","))
    except ValueError as exc:
        p.error(f"--cache-views {a.cache_views}: {exc}")
    try:
        stored = load_dataset_info(a.clips)["params"]["short_side"]
    except (ValueError, KeyError, TypeError) as exc:
        p.error(f"--clips {a.clips}: its dataset.json cannot be read ({exc})")
    if a.crop_size is None:  # without a config: an earlier build's crop (its rerun resumes), else the teacher's
        a.crop_size = (None if a.fresh else built_crop(a.out)) or default_crop(a.teacher, stored)
    if a.crop_size and stored and a.crop_size > stored:
        p.error(f"--crop-size {a.crop_size} exceeds the clips' short side {stored}")
    if not stored:  # clips at their source size: the smallest stored video decides (a Ray task error mid-build)
        from dvfl.data.shards import smallest_frame_side

        if not a.crop_size:
            p.error(f"--clips {a.clips} keeps the source size (short side 0): give --crop-size")
        smallest = smallest_frame_side(a.clips)
        if smallest is not None and a.crop_size > smallest:
            p.error(f"--crop-size {a.crop_size} exceeds the smallest stored frame side {smallest} (clips kept at "
                    "their source size, short side 0)")
    from dvfl.models import CheckpointError
    from dvfl.runtime import ray_runtime
    from dvfl.data.shards import ClipReadError, CorruptShardError, IncompleteClipsError
    from dvfl.teacher_cache import CacheMismatchError, CacheVerificationError, build_teacher_cache

    from dvfl.cli import failures_as_one_line

    with failures_as_one_line("cache"), ray_runtime(num_cpus=a.num_cpus):  # (an unreachable cluster: one line)
        from dvfl.cli import paths_on_every_node

        if not paths_on_every_node({"--out": a.out}, {"--clips": a.clips}):  # (the teacher: read here, sent)
            return 2
        try:
            build_teacher_cache(a.clips, a.teacher, a.out, teacher_name=a.arch, crop_size=a.crop_size,
                                views=a.cache_views.split(","), dtype=a.dtype, batch_size=a.batch_size,
                                num_actors=a.actors, use_gpu=a.gpu, verify_samples=a.verify,
                                overwrite=a.fresh, splits=splits, fresh_done=lambda: setattr(a, "fresh_done", True),
                                keep_memory=keep_memory)
        except CacheVerificationError as exc:  # (the build's failure, not its inputs': as distill reports it)
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (CacheMismatchError, CheckpointError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except IncompleteClipsError as exc:  # (an OSError, but of the input)
            print(f"error: --clips {exc}", file=sys.stderr)
            return 2
        except (ClipReadError, CorruptShardError) as exc:  # (OSErrors, but of the input: a read a rerun may get
            # through; a damaged shard to re-ingest. "writing the cache failed" sent users to their disk)
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # disk full, quota: finished shards stay, a rerun resumes
            print(f"error: writing the cache to {a.out} failed: {os_error_line(exc)}", file=sys.stderr)
            return 1
    return 0
