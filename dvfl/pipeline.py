"""The stages of the product, each reusable when its inputs have not changed.

    clips  -> teacher -> teacher cache -> students (VFL-Net without KD, DVFL-Net with KD) -> report

Every stage writes its outputs atomically with the fingerprints of its inputs; a rerun reuses a
stage whose fingerprints match and resumes one that was interrupted (Ray Train restores the
last checkpoint of a run with the same name). Entry points in ``pipelines/`` call these.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time

import yaml

from dvfl import storage
from dvfl.artifacts import SPEC, load_model, load_model_for, other_class_list, read_spec, save_model
from dvfl.config import LONG_EPOCHS_FACTOR, ConfigError, RunConfig
from dvfl.data.shards import REJECTS_FILE, load_dataset_info, median_video_seconds, read_rejects
from dvfl.models import CheckpointError, build_model

TEACHER_DIR = "teacher"
STUDENTS_DIR = "students"
RAY_RESULTS = "ray_results"
RUN_MARK = ".dvfl-run"  # see claim_run_folder
# evaluations of models this run does not own (a given teacher): never written into their directory
EVALUATIONS = "evaluations.json"
# Test hook: kill one Train worker once after this epoch (proves FailureConfig recovery).
FAIL_ENV = "DVFL_FAIL_AFTER_EPOCH"
FAIL_RUN_ENV = "DVFL_FAIL_RUN"  # ... only in a run whose name holds this
# Test hook: every worker pauses once after the first step of the epoch after this one, until
# <DVFL_HOLD_DIR>/release exists (the multi-node test kills a node while the workers wait).
HOLD_ENV, HOLD_DIR_ENV = "DVFL_HOLD_AFTER_EPOCH", "DVFL_HOLD_DIR"


STUDENT_LABELS = {"teacher": "Teacher", "vfl": "VFL-Net (student, no KD)",
                  "vfl_long": f"VFL-Net (student, no KD, {LONG_EPOCHS_FACTOR}x the epochs)",
                  "dvfl": "DVFL-Net (student, KD on labelled clips)",
                  "dvfl+unlabeled": "DVFL-Net (student, KD on labelled + unlabelled clips)"}


def digest(obj) -> str:
    """A short, stable name for a JSON-able identity (model folders, runs, searches)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_kwargs(section, num_classes: int, cfg: RunConfig) -> dict:
    kwargs = {"num_classes": num_classes, "num_frames": cfg.data.frames, "img_size": cfg.crop_size,
              "drop_path_rate": section.drop_path_rate}
    if section.embed_dim is not None:
        kwargs["embed_dim"] = section.embed_dim
    if section.depths is not None:
        kwargs["depths"] = list(section.depths)
    if section.use_checkpoint:  # (absent when off: earlier models' specs and identities stay the same)
        kwargs["use_checkpoint"] = True
    return kwargs


def model_identity(section, num_classes: int, cfg: RunConfig) -> dict:
    """:func:`model_kwargs` as a model's identity holds them: activation checkpointing (the same math,
    less memory) left out, so a run rerun with it after running out of memory resumes its epochs."""
    return {k: v for k, v in model_kwargs(section, num_classes, cfg).items() if k != "use_checkpoint"}


def optim_identity(optim) -> dict:
    """An optim section as a model's identity holds it: the allocator setting (memory and speed only,
    the same weights) held at its default, so turning it off resumes a run and earlier identities stay."""
    return {**vars(optim), "keep_freed_memory": True}


def validation_args(cfg: RunConfig) -> dict:
    """How every training run (teacher, students, Tune trials) finds its validation clips."""
    return {"train_splits": [cfg.data.train_split], "val_split": cfg.data.val_split,
            "val_fraction": cfg.data.val_fraction, "val_seed": cfg.data.val_seed}


def holdout_identity(cfg: RunConfig) -> dict:
    """What the validation hold-out adds to a model's identity: a different carve (fraction, seed or
    grouping rule) trains on different videos. Absent when nothing is carved: a named split, or an
    ingest with a val split of its own."""
    from dvfl.data.holdout import VAL_SPLIT, grouping_version, train_videos
    from dvfl.data.shards import shard_paths

    if cfg.data.val_split != VAL_SPLIT or shard_paths(cfg.clips_dir, [VAL_SPLIT]):
        return {}
    return {"val_holdout": [cfg.data.val_fraction, cfg.data.val_seed],
            "val_groups": grouping_version(*train_videos(cfg.clips_dir, cfg.data.train_split), cfg.data.val_fraction)}


def validation_source(cfg: RunConfig):
    from dvfl.data.holdout import val_source

    return val_source(cfg.clips_dir, cfg.data.val_split, cfg.data.train_split, cfg.data.val_fraction,
                      cfg.data.val_seed)


def say_validation_note(cfg: RunConfig, log=print) -> None:
    """The validation carve's caveat, if it has one (a carve that cannot be made fails later, where it is read)."""
    from dvfl.data.holdout import HoldoutError, carve_note, train_videos

    if cfg.data.val_split == cfg.data.train_split:
        if log:  # (allowed: a dataset may have no other split; a search then chooses on what it trained on)
            log(f"[clips] data.val_split is the training split ({cfg.data.train_split!r}): every choice (the teacher "
                "gate, Tune's trials and front) reads accuracy on videos the models train on")
        return
    try:
        src = validation_source(cfg)
    except HoldoutError:
        return
    note = carve_note(*train_videos(cfg.clips_dir, cfg.data.train_split), cfg.data.val_fraction,
                      src.videos) if src.carved else ""
    if note and log:
        log(f"[clips] validation carve: {note}")


@functools.lru_cache(maxsize=8)
def _median_video_seconds(clips_dir: str, split: str, fingerprint: str) -> float | None:
    # read once per ingest, not once per saved model (the fingerprint: a re-ingest reads again)
    return median_video_seconds(clips_dir, [split])


def model_inputs(cfg: RunConfig, dataset_info: dict) -> dict:
    """What a saved model needs to see a video as evaluation does (pipelines/predict.py reads it)."""
    return {"frames": cfg.data.frames, "short_side": dataset_info["params"]["short_side"],
            "crop_size": cfg.crop_size, "eval_clips": dataset_info["params"]["eval_clips"],
            "min_frames": dataset_info["params"].get("min_frames") or cfg.data.frames,
            # the views its top-1 was scored with (updated when a rerun scores it with others): predict's
            # default, so a file gets the class evaluation counted
            "eval_views": f"{cfg.eval.clips}x{cfg.eval.crops}",
            # a clip's T frames spread over a whole video: a stream's window should span as long
            "video_seconds": _median_video_seconds(cfg.clips_dir, cfg.data.train_split, dataset_info["fingerprint"]),
            "normalize": "imagenet", "layout": "B,T,C,H,W float32"}


# ----------------------------------------------------------------------------- clips
def ensure_videos(cfg: RunConfig, log=print) -> dict | None:
    """Generate the embedded default's video files (no-op for real datasets and when done).

    Its worker processes start from a fresh forkserver, so it is safe with Ray running too.
    """
    if cfg.data.dataset != "synthetic" or (cfg.data.clips and storage.isfile(storage.join(cfg.clips_dir, "dataset.json"))):
        return None
    from dvfl.data.synthetic import generate

    if storage.is_remote(cfg.output_dir):  # (they would land under ./s3:/... in the working directory)
        raise ConfigError(f"data.clips {cfg.clips_dir} holds no finished ingest (dataset.json) and output_dir is a "
                          "URI: the generated videos are made and decoded on local disk (run the same command once with a "
                          "local output folder: it generates them there and ingests them into data.clips; then this one)")
    syn = cfg.data.synthetic.generator_config(cfg.seed)
    # The output dir owns its generated videos: a changed config regenerates them (generate()
    # only ever deletes a folder that holds a generated dataset).
    return generate(os.path.join(cfg.output_dir, "videos"), syn, overwrite=True, log=log)


def ensure_clips(cfg: RunConfig, log=print) -> dict:
    """Ingest the clip shards (Ray Data); ingest itself skips finished shards. Inside a
    :func:`dvfl.locks.reads_held` block (a command's run) the clips then stay locked for reading
    until the block ends: an ingest into them from another command is refused meanwhile."""
    return hold_clips(cfg, ready_clips(cfg, log), log)


def hold_clips(cfg: RunConfig, info: dict, log=print) -> dict:
    """``info``, the clips' dataset.json, with the clips held for reading until the command's
    :func:`dvfl.locks.reads_held` block ends (outside one: nothing held)."""
    from dvfl.locks import hold_for_reading

    if hold_for_reading(cfg.clips_dir, "run", log) and load_dataset_info(cfg.clips_dir) != info:
        # (an ingest by another command between this one's and the lock: waited for, and what it left differs)
        raise ConfigError(f"data.clips: {cfg.clips_dir} was re-ingested by another command as this run started; "
                          "run it again")
    return info


def _note_decode_rules(out: str, info: dict, log) -> None:
    """Clips used as given that an earlier version decoded: said (never re-ingested here)."""
    from dvfl.data.ingest import older_decode_rules_note

    note = older_decode_rules_note(out, info)
    if note and log:
        log(f"[clips] note: {note}")


def _note_generator(cfg: RunConfig, info: dict, log) -> None:
    """Given generated clips made with other ``data.synthetic`` settings or ``seed`` than the config's
    (recorded since session 49): said, as the run trains and reports on the clips as they are."""
    made = (info.get("source") or {}).get("generator")
    if cfg.data.dataset != "synthetic" or not made or not log:
        return
    now = cfg.data.synthetic.generator_config(cfg.seed).as_dict()
    changed = [f"{'seed' if k == 'seed' else 'data.synthetic.' + k} {made.get(k, 0)} (config: {now.get(k, 0)})"
               for k in sorted(set(made) | set(now)) if made.get(k, 0) != now.get(k, 0)]
    if changed:
        log(f"[clips] note: {cfg.clips_dir} was generated with " + ", ".join(changed) + ": used as given (the "
            "results describe these clips; for the config's, leave data.clips unset or give another folder)")


def ready_clips(cfg: RunConfig, log=print) -> dict:
    """The clips' dataset.json, ingested first when they are not finished."""
    from dvfl.data.adapters import AdapterError, build_manifest, unlabeled
    from dvfl.data.ingest import IngestConfig, IngestInputsUnreadable, ingest

    out = cfg.clips_dir
    if cfg.data.clips and storage.isfile(storage.join(out, "dataset.json")):
        info = load_dataset_info(out)  # given explicitly: used as is, if made for this config
        check_clips_match(cfg, info)
        _note_decode_rules(out, info, log)
        _note_generator(cfg, info, log)
        return info
    if cfg.data.dataset == "kinetics":
        # its CSVs' own split column would make validate.csv "val" and a labelled test.csv "test": results
        # reported on a set the literature does not use, and model choices read the reported set
        if storage.isfile(storage.join(out, "dataset.json")):  # (output_dir/clips, ingested before)
            info = load_dataset_info(out)
            check_clips_match(cfg, info)
            _note_decode_rules(out, info, log)
            return info
        raise ConfigError(
            f"data.clips: {out} holds no finished ingest, and a run does not ingest Kinetics itself (which CSV is "
            f"the test split decides what the results compare with): ingest it first, with this config's settings: "
            f"`{cfg.kinetics_ingest_command()}`")
    if cfg.data.dataset == "synthetic":
        generated = ensure_videos(cfg, log)
        manifest = build_manifest("synthetic", generated["root"], 1)
        # (in dataset.json, not the fingerprint: clips given later are told apart from these settings)
        manifest.source["generator"] = cfg.data.synthetic.generator_config(cfg.seed).as_dict()
        if generated.get("unlabeled_dir"):
            manifest.extend(unlabeled(generated["unlabeled_dir"]))
    else:
        if storage.is_remote(cfg.data.root):  # (the adapters said "no train.csv under s3://..." of lists that were there)
            raise ConfigError(f"data.root: {cfg.data.root}: the videos are read from a local or mounted folder, not a "
                              "URI: mount the bucket, or ingest where the videos are (`dvfl ingest ... --out s3://...`) "
                              "and give data.clips")
        try:
            manifest = build_manifest(cfg.data.dataset, cfg.data.root, cfg.data.split)
        except AdapterError as exc:
            # (--annotations is the ingest command's flag, not this command's; clips given are used as they are)
            said = re.sub(r" \(use --annotations[^)]*\)$", "", str(exc))
            hint = (f": give the lists there, or ingest the clips yourself, with this config's settings: "
                    f"`{cfg.ingest_command()}`, and give data.clips={cfg.clips_dir}") if said != str(exc) else ""
            raise ConfigError(f"data.root: {said}{hint}") from None
        check_manifest_splits(cfg, manifest)
        for note in manifest.notes if log else ():  # (folders that are not classes, classes a split drew none of)
            log(f"[clips] note: {note}")
    icfg = IngestConfig(out=out, frames=cfg.data.frames, clips_per_video=cfg.data.clips_per_video,
                        eval_clips=cfg.data.eval_clips, short_side=cfg.data.short_side, seed=cfg.seed,
                        workers=cfg.data.decode_tasks or None)
    from dvfl.locks import FolderBusyError

    if cfg.data.clips and log:  # (a mistyped --clips is a new folder: said, not silently filled)
        where = "the generated videos" if cfg.data.dataset == "synthetic" else f"data.root {cfg.data.root}"
        log(f"[clips] data.clips {out} holds no finished ingest: ingesting {where} into it")
    try:
        ingest(manifest, icfg, log=log)
    except FolderBusyError:
        # given clips another run finished ingesting and now reads (it started first, both waiting on the
        # ingest): used as a run started a moment later would use them
        if not (cfg.data.clips and storage.isfile(storage.join(out, "dataset.json"))):
            raise
    except IngestInputsUnreadable as exc:  # (never a reason to replace the clips: a config error, one line)
        raise ConfigError(f"data.root: {exc.what}. Run again once they can be read; to re-ingest without them, "
                          f"delete {out}") from None  # (run commands have no ingest --fresh)
    except ValueError as exc:
        # an earlier configuration's clips, or a re-ingest killed while it deleted them (its plan gone first)
        ours = ("already holds an ingest with a different", "holds shards but no")
        if not any(m in str(exc) for m in ours):
            raise
        if cfg.data.clips:  # a user-given dir is never overwritten (a traceback, advice for dvfl ingest's flags)
            what = ("shards but no plan (a re-ingest's delete cut short)" if "holds shards but no" in str(exc) else
                    "an unfinished ingest of other inputs or settings than this config's")
            raise ConfigError(f"data.clips: {out} holds {what}: finish the ingest that wrote it, or re-ingest it "
                              f"with `dvfl ingest ... --out {out} --fresh`") from None
        log(f"[clips] {out} holds clips " + ("an earlier decoder made" if "different decoder" in str(exc) else
                                             "of an earlier configuration") + ": re-ingesting")
        ingest(manifest, dataclasses.replace(icfg, overwrite=True), log=log)
    info = load_dataset_info(out)
    check_clips_match(cfg, info)  # the splits the config names (the rest holds by construction)
    return info


def missing_splits(cfg: RunConfig, available) -> list[tuple[str, str]]:
    """(field, split) of the config's train/test/val splits not in ``available``; a "val" that is
    absent is carved from the training videos, so it is never missing."""
    from dvfl.data.holdout import VAL_SPLIT

    return [(key, split) for key, split in (("train_split", cfg.data.train_split), ("test_split", cfg.data.test_split),
                                            ("val_split", cfg.data.val_split))
            if split not in available and not (key == "val_split" and split == VAL_SPLIT)]


def check_manifest_splits(cfg: RunConfig, manifest) -> None:
    """The splits the config trains, validates and tests on are among those ``data.root`` lists:
    found after the whole ingest otherwise (SSv2 lists no test split: its test labels are not public)."""
    listed = sorted({e.split for e in manifest.entries})
    missing = missing_splits(cfg, listed)
    if missing:
        raise ConfigError(f"{cfg.data.dataset} at data.root {cfg.data.root} lists the split(s) "
                          f"{', '.join(map(repr, listed)) or 'none'}; "
                          + "; ".join(f"data.{key} is {split!r}" for key, split in missing)
                          + ": set those fields to listed splits, or ingest data.clips yourself naming the splits ("
                          + HOW_TO_NAME_SPLITS.get(cfg.data.dataset, "a layout of a dataset whose lists name them")
                          + "); nothing was ingested")


# how `pipelines/ingest.py` gives a layout the splits its folders or lists do not
HOW_TO_NAME_SPLITS = {
    "folder": "pipelines/ingest.py --dataset folder --test-fraction F (or root/{train,val,test}/<class>/ folders)",
    **{d: "pipelines/ingest.py --annotations test=FILE, as configs/ssv2.yaml shows" for d in ("kinetics", "ssv2", "dvfl-csv")},
}


def clips_split(info: dict) -> int | None:
    """The official split (UCF101/HMDB51) or held-out group (UCF50) an ingest output was made from."""
    source = info.get("source") or {}
    value = source.get("test_group" if info.get("dataset") == "ucf50" else "split")
    return int(value) if isinstance(value, int) else None


def trained_on(info: dict) -> dict:
    """What a model trained on these clips records of them (``trained_on`` in its model.json)."""
    return {"dataset": info.get("dataset"), "split": clips_split(info)}


def teacher_split_problem(teacher: str, spec: dict, info: dict) -> str | None:
    """A given teacher trained on another official split (or UCF50 fold) of the same dataset: this
    split's test videos are among that split's training videos, so the teacher has seen them."""
    then, now = spec.get("trained_on") or {}, trained_on(info)
    if then.get("dataset") != now["dataset"] or None in (then.get("split"), now["split"]) or then["split"] == now["split"]:
        return None
    what = "fold (held-out group)" if now["dataset"] == "ucf50" else "split"
    return (f"teacher.path {teacher} was trained on {now['dataset']} {what} {then['split']}, these clips are {what} "
            f"{now['split']}: its test videos are among that {what}'s training videos, which the teacher has seen; "
            f"give a teacher trained on {what} {now['split']} (a protocol: a teacher.path holding {{split}})")


def teacher_holdout_problem(cfg: RunConfig, teacher: str, spec: dict, info: dict) -> str | None:
    """A given teacher trained on these clips with another validation carve (``data.val_fraction``,
    ``val_seed``, grouping) than this run's: this run's validation videos are among its training
    videos, so its gate and the students' checkpoint choice would be judged on videos it has seen."""
    ident = spec.get("identity") or {}
    if ident.get("dataset") != info["fingerprint"] or ident.get("split") != cfg.data.train_split:
        return None
    pool = ident.get("teacher_pool", 0.0)
    if pool and pool != cfg.data.teacher_pool:  # (the pools are nested: a smaller one gives its videos to students)
        return (f"teacher.path {teacher} was trained on these clips' data.teacher_pool {pool} (videos no student may "
                f"see), this run's is {cfg.data.teacher_pool}: "
                + ("its students would train on videos the teacher trained on" if cfg.data.teacher_pool < pool else
                   "the students would lose videos for nothing") + f"; set data.teacher_pool={pool}")
    now = holdout_identity(cfg)
    if not now:  # a validation split of its own: no carve from training
        return None
    then = {k: ident.get(k) for k in now if k in ident or k == "val_holdout"}
    if all(then[k] == now[k] for k in then):
        return None
    def said(h):
        if not h.get("val_holdout"):
            return "none"
        groups = f", grouping rule {h['val_groups']}" if h.get("val_groups") is not None else ""
        return f"fraction {h['val_holdout'][0]}, seed {h['val_holdout'][1]}{groups}"
    fix = ("set data.val_fraction/val_seed to the teacher's, or give" if then.get("val_groups") == now.get("val_groups")
           else "give")  # (a grouping rule is the code's, not a setting)
    return (f"teacher.path {teacher} was trained on these clips with another validation hold-out ({said(then)}) than "
            f"this run's ({said(now)}): this run's validation videos are among its training videos; {fix} a teacher "
            "trained with this run's")


def check_clips_match(cfg: RunConfig, info: dict) -> None:
    """Refuse clips (``data.clips``) ingested with other frames, short side, clips per video or eval clips than the
    config says (dataset.json records what the ingest used), naming both values, and clips whose
    splits the run reads hold none (every video rejected)."""
    from dvfl.data.shards import IncompleteClipsError, shard_paths, smallest_frame_side

    p, where = info["params"], cfg.clips_dir
    try:
        shard_paths(where)  # every shard its dataset.json lists is there
    except IncompleteClipsError as exc:
        raise ConfigError(str(exc)) from None
    problems = []
    if p["frames"] != cfg.data.frames:
        problems.append(f"data.frames is {cfg.data.frames}, the clips have {p['frames']} frames")
    if p["short_side"] != cfg.data.short_side:
        problems.append(f"data.short_side is {cfg.data.short_side}, the clips were stored at short side "
                        f"{p['short_side'] or 'of the source (0)'}")
    if p["short_side"] and cfg.crop_size > p["short_side"]:
        problems.append(f"data.crop_size is {cfg.crop_size}, larger than the clips' short side {p['short_side']}")
    elif not p["short_side"]:  # clips at their source size: the smallest video decides (a crash mid-epoch)
        smallest = smallest_frame_side(where)
        if smallest is not None and cfg.crop_size > smallest:
            problems.append(f"data.crop_size is {cfg.crop_size}, larger than the smallest stored frame side {smallest} "
                            "(clips kept at their source size, short side 0)")
    if p.get("clips_per_video") not in (None, cfg.data.clips_per_video):  # (training reads every stored clip)
        problems.append(f"data.clips_per_video is {cfg.data.clips_per_video}, the clips hold {p['clips_per_video']} "
                        "per training video")
    if cfg.eval.clips > p["eval_clips"]:
        problems.append(f"eval.clips is {cfg.eval.clips}, the clips store {p['eval_clips']} per test video")
    stored_split = clips_split(info)
    if stored_split is not None and info.get("dataset") == cfg.data.dataset and stored_split != cfg.data.split:
        # another split's test videos are this split's training videos: never evaluate across splits
        problems.append(f"data.split is {cfg.data.split}, the clips were ingested from split {stored_split}")
    counts = info.get("counts") or {}
    # a split the run reads whose every video was rejected (at decode: a split of 0 clips; when
    # listed: no split at all): it failed after the teacher and the cache (an empty test split at the
    # final evaluation), and a dvfl+unlabeled student trained exactly like dvfl on an empty pool
    rejected = _rejects_by_split(where) if info.get("rejects") else {}
    used = [cfg.data.train_split, cfg.data.test_split, cfg.data.val_split] + (["unlabeled"] if cfg.unlabeled_dir else [])
    empty = [split for split in dict.fromkeys(used)
             if not (counts.get(split) or {}).get("clips") and (split in counts or rejected.get(split))]
    stored = sorted(counts)
    # a misspelt split reads as an empty dataset deep inside Ray
    for key, split in missing_splits(cfg, stored):
        if split not in empty:
            problems.append(f"data.{key} is {split!r}, the clips hold split(s) {', '.join(map(repr, stored)) or 'none'}")
    if cfg.unlabeled_dir and "unlabeled" not in counts and "unlabeled" not in empty:
        problems.append(f"data.unlabeled is {cfg.unlabeled_dir}, an ingest without an unlabelled pool (ingest the "
                        "pool with the labelled videos: --unlabeled DIR)")
    if problems:
        # (clips of the training split alone: data.test_split may not name it, so the first advice cannot be taken)
        no_test = (any(key == "test_split" and split not in empty for key, split in missing_splits(cfg, stored))
                   and not set(stored) - {cfg.data.train_split, "unlabeled"})
        how = HOW_TO_NAME_SPLITS.get(info.get("dataset")) if no_test else None
        raise ConfigError(f"data.clips {where} does not match the config: " + "; ".join(problems)
                          + ". Set these fields to the ingest's values, or ingest again with the config's"
                          + (f" (clips without a {cfg.data.test_split!r} split: ingest them again with a test split, "
                             f"{how}, with --out {where} --fresh)" if how else "") + ".")
    if empty:
        raise ConfigError(f"data.clips {where}: split(s) {', '.join(map(repr, empty))} hold no clips: every video of "
                          f"them was rejected at ingest (reasons in {storage.join(where, REJECTS_FILE)}); replace "
                          "or re-encode those videos and ingest again")


def _rejects_by_split(clips_dir: str) -> dict:
    """How many inputs of each split an ingest rejected (``rejects.jsonl``; {} where it is unreadable)."""
    try:
        return dict(collections.Counter(r.get("split") for r in read_rejects(clips_dir)))
    except (OSError, ValueError):
        return {}


def check_given_inputs(cfg: RunConfig) -> None:
    """Given clips (``data.clips``, a finished ingest) or a given teacher folder that the config does
    not describe: a :class:`ConfigError` before Ray starts or a file is written (protocol and tune
    met a mismatch late, as a traceback; another data.frames re-ingested the run's clips, then the
    given teacher failed on them)."""
    if cfg.data.clips and storage.isfile(storage.join(cfg.clips_dir, "dataset.json")):
        try:
            info = load_dataset_info(cfg.clips_dir)
        except ValueError as exc:  # (cut short: tune and protocol showed a traceback)
            raise ConfigError(f"data.clips: {exc}") from None
        check_clips_match(cfg, info)
    spec_path = storage.join(cfg.teacher.path, SPEC) if cfg.teacher.path and cfg.teacher.mode != "none" else None
    if spec_path and storage.isdir(cfg.teacher.path) and not storage.isfile(spec_path):
        # (found after the whole ingest, as a traceback: e.g. the run folder above the model's own)
        raise ConfigError(f"teacher.path {cfg.teacher.path} is a folder without {SPEC}, not a model folder: give the "
                          f"folder holding {SPEC} (a trained model's, e.g. <run>/teacher/<id>) or a checkpoint file")
    if spec_path and storage.isfile(spec_path):
        try:
            spec = read_spec(spec_path)
        except CheckpointError as exc:
            raise ConfigError(f"teacher.path: {exc}") from None
        if cfg.data.clips and storage.isfile(storage.join(cfg.clips_dir, "dataset.json")):
            problem = (teacher_split_problem(cfg.teacher.path, spec, info)
                       or teacher_holdout_problem(cfg, cfg.teacher.path, spec, info))
            if problem:
                raise ConfigError(problem)
        frames = (spec.get("kwargs") or {}).get("num_frames")
        if frames is not None and frames != cfg.data.frames:
            raise ConfigError(f"teacher.path {cfg.teacher.path} takes clips of {frames} frames, data.frames is "
                              f"{cfg.data.frames}: set data.frames to {frames}, or give a teacher of "
                              f"{cfg.data.frames} frames")
        crop = (spec.get("inputs") or {}).get("crop_size")
        if crop and crop != cfg.crop_size:  # its logits at another scale than it learnt: said, not refused
            print(f"[dvfl] note: teacher.path {cfg.teacher.path} was trained on {crop} px crops, data.crop_size is "
                  f"{cfg.crop_size}: its logits (and the students' targets) come from a scale it never trained on",
                  file=sys.stderr, flush=True)
    check_start_weights(cfg)


def known_class_count(cfg: RunConfig) -> int | None:
    """The class count before any ingest: the given clips' or the generator's; None for videos
    still to be ingested."""
    if cfg.data.clips and storage.isfile(storage.join(cfg.clips_dir, "dataset.json")):
        return len(load_dataset_info(cfg.clips_dir)["classes"])
    return cfg.data.synthetic.num_classes if cfg.data.dataset == "synthetic" else None


def check_start_weights(cfg: RunConfig) -> None:
    """Weights a run starts from that its model cannot take (another width, a head of another class
    count without ``reinit_head``, a bare teacher file with no ``teacher.model``): a ConfigError
    before any work. They failed when the run was planned, after ingest, teacher and cache, as a
    traceback. Names and shapes only, on a model on the meta device; local files only (a URI's
    download is left to the run that needs it)."""
    from dvfl.models import CheckpointError

    num_classes = known_class_count(cfg)
    classes = num_classes or 1  # (still unknown: the head is checked once the clips are)
    given_teacher = cfg.teacher.path if cfg.teacher.mode != "none" else None
    s = cfg.student
    starts = [("student.checkpoint", s.model, model_kwargs(s, classes, cfg), s.checkpoint, s.reinit_head)]
    if given_teacher and storage.isfile(given_teacher):  # a bare checkpoint file (a folder carries its spec)
        if not cfg.teacher.model:
            raise ConfigError(f"teacher.path {given_teacher} is a checkpoint file: set teacher.model to its "
                              "architecture (e.g. videofocalnet_base)")
        # built for the clips' classes and frames, as load_model_for builds it
        starts.append(("teacher.path", cfg.teacher.model, {"num_classes": classes, "num_frames": cfg.data.frames},
                       given_teacher, False))
    elif not given_teacher and cfg.teacher.mode != "none":  # a teacher trained here
        t = cfg.teacher.train
        starts.append(("teacher.train.checkpoint", t.model, model_kwargs(t, classes, cfg), t.checkpoint, t.reinit_head))
    for name, model_name, kwargs, path, reinit_head in starts:
        if not path or storage.is_remote(path):
            continue
        try:
            st = os.stat(path)
            _fitting_checkpoint(path, (st.st_size, st.st_mtime_ns), model_name, json.dumps(kwargs, sort_keys=True),
                                reinit_head or num_classes is None)
        except (CheckpointError, OSError) as exc:
            raise ConfigError(f"{name}: {exc}") from None
    # 2D ImageNet FocalNet weights load where names and shapes agree: none agreeing failed the run
    for name, section in (("student.init_2d", s), ("teacher.train.init_2d", cfg.teacher.train)):
        if name.startswith("teacher") and (given_teacher or cfg.teacher.mode == "none"):
            continue
        if (image_init_matches(cfg, section) or (None,))[0] == 0:
            raise ConfigError(f"{name} {section.init_2d}: no tensor of it fits {section.model} "
                              f"(embed_dim {model_kwargs(section, classes, cfg).get('embed_dim')}); is it a 2D "
                              "FocalNet of this width?")


def image_init_matches(cfg: RunConfig, section) -> tuple[int, int] | None:
    """How many tensors of ``section.init_2d`` (a 2D FocalNet) its model would take, of its own;
    None where there is none to check (unset, or a URI)."""
    from dvfl.models import CheckpointError

    path = section.init_2d
    if not path or storage.is_remote(path):
        return None
    kwargs = model_kwargs(section, known_class_count(cfg) or 1, cfg)
    try:
        st = os.stat(path)
        return _image_matches(path, (st.st_size, st.st_mtime_ns), section.model, json.dumps(kwargs, sort_keys=True))
    except (CheckpointError, OSError) as exc:
        raise ConfigError(f"init_2d {path}: {exc}") from None


@functools.lru_cache(maxsize=16)
def _image_matches(path: str, identity: tuple, model_name: str, kwargs: str) -> tuple[int, int]:
    from dvfl.models import image_focalnet_matches

    return image_focalnet_matches(build_model(model_name, device="meta", **json.loads(kwargs)), path)


@functools.lru_cache(maxsize=16)
def _fitting_checkpoint(path: str, identity: tuple, model_name: str, kwargs: str, reinit_head: bool) -> None:
    """Raises unless the checkpoint fits; a fit is remembered per file version (a protocol checks
    every split's config: one read of a 630 MB Video-FocalNet-B checkpoint, not 25)."""
    from dvfl.models import check_checkpoint

    check_checkpoint(build_model(model_name, device="meta", **json.loads(kwargs)), path, reinit_head=reinit_head)


# ----------------------------------------------------------------------------- training
def fault_hooks(cfg: RunConfig):
    """The loop's failure-injection and hold hooks the tests switch on by environment variables
    (read where the command runs: a Tune trial's actor does not see the search's environment)."""
    from dvfl.train.hooks import TestHooks

    hooks = {}
    if os.environ.get(FAIL_ENV):
        hooks["fail_after_epoch"] = int(os.environ[FAIL_ENV])
        hooks["fail_marker"] = os.path.abspath(os.path.join(cfg.output_dir, ".fail-injected"))
        hooks["fail_run"] = os.environ.get(FAIL_RUN_ENV) or None
    if os.environ.get(HOLD_ENV):
        hooks["hold_after_epoch"] = int(os.environ[HOLD_ENV])
        hooks["hold_dir"] = os.path.abspath(os.environ[HOLD_DIR_ENV])
    return TestHooks(**hooks)


def training_loop_config(cfg: RunConfig, section, optim, num_classes: int, seed: int, teacher: dict,
                         tensorboard_dir: str | None, log=print, hooks=None):
    """The typed :class:`~dvfl.train.loop_config.LoopConfig` of the shared loop
    (:func:`dvfl.train.loop.run_loop`) for one model of a run config; ``teacher``:
    :func:`teacher_signal`'s dict; ``hooks``: :func:`fault_hooks` read by the command, default:
    from this process's environment."""
    from dvfl.train.loop_config import LoopConfig, ModelSpec, TeacherFeed

    model = ModelSpec(section.model, model_kwargs(section, num_classes, cfg))
    return LoopConfig(seed=seed, model=model, optim=dataclasses.replace(optim), kd=dataclasses.replace(cfg.kd),
                      teacher=TeacherFeed.from_signal(teacher), crop_size=cfg.crop_size, flip=cfg.data.flip,
                      tensorboard_dir=tensorboard_dir, hooks=fault_hooks(cfg) if hooks is None else hooks,
                      init_state_ref=_init_state_ref(section, model.kwargs, log))


def _training_args(cfg: RunConfig, role: str, unlabeled_dir: str | None) -> dict:
    return dict(**validation_args(cfg), unlabeled_dir=unlabeled_dir,
                label_fraction=1.0 if role == "teacher" else cfg.data.label_fraction,
                teacher_pool=cfg.data.teacher_pool, role="teacher" if role == "teacher" else "student")


def _scaling(cfg: RunConfig):
    from dvfl.train.launch import Scaling

    return Scaling(cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker,
                   cfg.scaling.worker_resources)


def shared_training_data(cfg: RunConfig, *, role: str = "student", unlabeled_dir: str | None = None):
    """The datasets of a training run of ``cfg``, built once (a search shares them among its trials)."""
    from dvfl.train.launch import training_data

    return training_data(cfg.clips_dir, seed=cfg.seed, **_training_args(cfg, role, unlabeled_dir))


def launch_training(cfg: RunConfig, loop: dict, *, role: str, name: str, storage_path: str,
                    unlabeled_dir: str | None = None, callbacks=None, data=None, in_tune_trial: bool = False):
    """One training run of the shared loop: a Ray Train worker group (DDP) whose result is
    returned, or, for a one-worker Tune trial given the search's shared ``data``, the loop in the
    trial's own process (no worker group to start; it reports to Tune and returns None)."""
    from dvfl.train.launch import run_training, train_in_tune_trial

    scaling = _scaling(cfg)
    if in_tune_trial and scaling.num_workers == 1 and data is not None:
        return train_in_tune_trial(loop, data, scaling=scaling, name=name)
    # the clips shuffled by the data seed, as in the data runners and trials share: a run's
    # identity has no launch mode in it, so its data must not depend on one
    return run_training(loop, clips_dir=cfg.clips_dir, scaling=scaling, name=name, storage_path=storage_path,
                        max_failures=cfg.max_failures, callbacks=callbacks, data=data, data_seed=cfg.seed,
                        **_training_args(cfg, role, unlabeled_dir))


def init_given(section) -> list:
    """Which init weights a run starts from, by kind, not path (their content is in :func:`init_identity`):
    the same file shipped by ``ray job submit`` lands under another absolute path every session.
    ``[None, None]`` from scratch, as identities have always held it."""
    return [path and "given" for path in (section.checkpoint, section.init_2d)]


def init_identity(section) -> dict:
    """What a run starts from beyond its seed, for its identity: the checkpoint's or 2D weights'
    content (a file replaced under the same name) and a re-initialised head; empty without them,
    so that the identities of runs from scratch stay as they were."""
    from dvfl.data.ingest import file_identity
    from dvfl.models.checkpoint import checkpoint_file

    out = {}
    for key, path in (("init_weights", section.checkpoint), ("init_2d_weights", section.init_2d)):
        if path:  # (an object replaced under its key: its size alone stayed)
            out[key] = list(file_identity(checkpoint_file(path)))
    if section.checkpoint and section.reinit_head:
        out["reinit_head"] = True
    return out


_shared_init_refs: dict | None = None  # inside shared_start_weights(): start weights put once for all its runs


@contextlib.contextmanager
def shared_start_weights():
    """Inside, the runs planned put each start checkpoint in the object store once (train_students)."""
    global _shared_init_refs
    outer, _shared_init_refs = _shared_init_refs, {} if _shared_init_refs is None else _shared_init_refs
    try:
        yield
    finally:
        _shared_init_refs = outer  # (the refs go with the runs)


def _init_state_ref(section, kwargs: dict, log):
    """Weights to start from (official checkpoint or 2D FocalNet), shipped via the object store."""
    import ray

    from dvfl.models import init_from_image_focalnet, load_checkpoint

    if not (section.checkpoint or section.init_2d):
        return None
    # (every planned student put its own copy: 12 of the embedded recipe's, over a local object store)
    key = json.dumps([section.model, section.checkpoint, section.init_2d, section.reinit_head, kwargs],
                     sort_keys=True, default=str)
    if _shared_init_refs is not None and key in _shared_init_refs:
        return _shared_init_refs[key]
    model = build_model(section.model, **kwargs)
    if section.checkpoint:
        report = load_checkpoint(model, section.checkpoint, reinit_head=section.reinit_head)
    else:
        report = init_from_image_focalnet(model, section.init_2d)
    log(f"[init] {section.checkpoint or section.init_2d}: {report.summary()}")
    # only what was loaded: the rest (a new head, temporal branches) keeps the run's seeded init
    state = model.state_dict()
    ref = [ray.put({k: state[k] for k in report.loaded})]
    if _shared_init_refs is not None:
        _shared_init_refs[key] = ref
    return ref


@dataclasses.dataclass
class ModelRun:
    """One model to train: where it goes, what the loop gets, what its artefact records."""
    role: str
    seed: int
    out: str
    name: str
    loop: dict
    section: object
    kwargs: dict
    identity: dict
    unlabeled_dir: str | None
    epochs: int


def plan_model_run(cfg: RunConfig, *, role: str, section, optim, dataset_info: dict, seed: int,
                   teacher: dict, identity: dict, unlabeled_dir: str | None = None, log=print) -> ModelRun | str:
    """The run that trains one model, or the artefact directory of the same model already trained.

    ``identity`` is everything the result depends on: a finished run with the same identity is
    reused, an interrupted one resumes from its last checkpoint.
    """
    num_classes = len(dataset_info["classes"])

    def folder(key: str) -> str:
        return (storage.join(cfg.output_dir, TEACHER_DIR, key) if role == "teacher"
                else storage.join(cfg.output_dir, STUDENTS_DIR, f"{role.replace('+', '-')}-s{seed}-{key}"))

    def train_run(key: str) -> str:  # its Ray Train / runner folder under ray_results/ (without -wN)
        return f"{cfg.name}-{role.replace('+', '-')}-s{seed}-{key}"

    key = digest(identity)
    out = folder(key)
    label = role if role == "teacher" else f"{role} s{seed}"
    # a model finished before session 46 with activation checkpointing on or freed memory not kept: its
    # identity held those settings, whatever they are now
    earlier = [digest({**identity, "model": {**identity["model"], **({"use_checkpoint": True} if ckpt else {})},
                       "optim": {**identity["optim"], "keep_freed_memory": kept}})
               for ckpt in (False, True) for kept in (True, False)] if "optim" in identity else []
    for found_key in dict.fromkeys((key, *earlier)):
        found = folder(found_key)
        if storage.isfile(storage.join(found, SPEC)):
            log(f"[{label}] reusing {found} (inputs unchanged)")
            _remove_epoch_states(cfg, train_run(found_key), label, log)
            return found
    kwargs = model_kwargs(section, num_classes, cfg)
    loop = training_loop_config(cfg, section, optim, num_classes, seed, teacher, log=log,
                                tensorboard_dir=storage.join(storage.dirname(out), "tensorboard", storage.basename(out)))
    # the command's mark on the epochs it trains (a Ray Train or runner retry keeps it: the same command)
    loop = dataclasses.replace(loop, label=label, command_started=time.time(),
                               optim_key="teacher.optim" if role == "teacher" else "optim")
    # the teacher's identity leaves the worker count out (a search reuses the distill run's teacher), its
    # Train run does not: a run killed with 2 workers and rerun with 1 starts over instead of refusing
    workers = f"-w{cfg.scaling.num_workers}" if role == "teacher" and cfg.scaling.num_workers > 1 else ""
    return ModelRun(role, seed, out, train_run(key) + workers, loop, section, kwargs,
                    identity, unlabeled_dir, optim.epochs)


def whole_run_seconds(history: list, seconds: float, command_started: float) -> float:
    """A run's training wall time: this command's ``seconds`` plus the epochs (with their validation)
    that earlier commands trained before this one resumed the run (their start-up is not recorded)."""
    return seconds + sum(h.get("epoch_seconds", 0.0) + h.get("val_seconds", 0.0) for h in history
                         if h.get("command_started") not in (None, command_started))


def _remove_epoch_states(cfg: RunConfig, name: str, label: str, log) -> None:
    """A saved model's epoch states (weights and optimizer, ~1.9 GB a checkpoint for Video-FocalNet-B, two
    kept; with every worker count's, ``-wN``): nothing reads them once the model is saved, a rerun reuses it
    (a UCF50 protocol left ~120 GB of them)."""
    runs = storage.join(cfg.output_dir, RAY_RESULTS)
    for entry in storage.list_entries(runs):
        base = storage.basename(entry.rstrip("/"))
        if base == name or re.fullmatch(re.escape(name) + r"-w\d+", base):
            try:
                storage.remove_tree(storage.join(runs, base))
            except OSError as exc:
                log(f"[{label}] note: removing its epoch states in {storage.join(runs, base)} failed ({exc}); "
                    "they may be deleted")


def save_trained(cfg: RunConfig, run: ModelRun, result, dataset_info: dict, seconds: float, log=print,
                 say_done: bool = True) -> str:
    """The finished run's final weights + history as a model artefact directory (``seconds``: this
    command's training wall time; ``train_seconds`` adds the epochs of earlier commands a resumed run
    continues: a resumed run's was one epoch's, and results compared it with a whole run's;
    ``say_done=False`` where the run's runner said it)."""
    from dvfl.train.launch import load_final_state

    state = load_final_state(result)
    model = build_model(run.section.model, **run.kwargs)
    model.load_state_dict(state["model"])
    history = state["history"]
    save_model(run.out, model, run.section.model, run.kwargs, role=run.role, seed=run.seed, identity=run.identity,
               dataset_fingerprint=dataset_info["fingerprint"], trained_on=trained_on(dataset_info), history=history,
               classes=dataset_info["classes"], inputs=model_inputs(cfg, dataset_info),
               val_top1=history[-1]["val_top1"], val_split=validation_source(cfg).description,
               train_seconds=round(whole_run_seconds(history, seconds, run.loop.command_started), 1))
    _remove_epoch_states(cfg, re.sub(r"-w\d+$", "", run.name), run.loop.label, log)
    if say_done:
        log(f"[{run.loop.label}] done in {seconds:.0f}s: val top-1 {history[-1]['val_top1']:.1%}")
    return run.out


def _announce(cfg: RunConfig, run: ModelRun, workers: str, log) -> None:
    log(f"[{run.loop.label}] training {run.section.model} (embed_dim={run.kwargs.get('embed_dim', 'default')}) "
        f"for {run.epochs} epochs on {workers}; teacher signal: {run.loop.teacher.mode}")
    # the two launch modes keep an interrupted run's state apart (runner epoch files, Ray Train
    # checkpoint folders): another scaling.concurrent_runs started over at epoch 1 without a word
    from dvfl.train.session import epoch_states

    run_dir = storage.join(cfg.output_dir, RAY_RESULTS, run.name)
    train_checkpoints = any(e.startswith("checkpoint_") for e in storage.list_entries(run_dir))
    runner_states = bool(epoch_states(run_dir))
    other = (train_checkpoints and not runner_states) if cfg.scaling.concurrent_runs else (runner_states and not train_checkpoints)
    if other:
        was = "0" if cfg.scaling.concurrent_runs else ">= 1"
        log(f"[{run.loop.label}] note: {run_dir} holds the epochs of an interrupted run with scaling.concurrent_runs "
            f"{was}; this one starts at epoch 1 (stop it and rerun with scaling.concurrent_runs {was} to resume that one)")


def train_model(cfg: RunConfig, *, role: str, section, optim, dataset_info: dict, seed: int,
                teacher: dict, identity: dict, unlabeled_dir: str | None = None, log=print) -> str:
    """Train one model with the shared loop (a Ray Train run, or a runner actor when
    ``scaling.concurrent_runs`` is on); returns its artefact directory."""
    run = plan_model_run(cfg, role=role, section=section, optim=optim, dataset_info=dataset_info, seed=seed,
                         teacher=teacher, identity=identity, unlabeled_dir=unlabeled_dir, log=log)
    if isinstance(run, str):
        return run
    if cfg.scaling.concurrent_runs:  # a one-worker run: no worker group to start for it either
        return train_runs_concurrently(cfg, [run], dataset_info, log)[run.name]
    claim_run_folder(cfg)
    _announce(cfg, run, f"{cfg.scaling.num_workers} worker(s)", log)
    started = time.time()
    result = launch_training(cfg, run.loop, role=role, name=run.name,
                             storage_path=storage.join(cfg.output_dir, RAY_RESULTS), unlabeled_dir=unlabeled_dir)
    return save_trained(cfg, run, result, dataset_info, time.time() - started, log)


def train_runs_concurrently(cfg: RunConfig, runs: list[ModelRun], dataset_info: dict, log=print) -> dict:
    """``scaling.concurrent_runs`` one-worker runs at a time in runner actors (no Ray Train worker
    group per run); returns {run name: artefact directory}."""
    from dvfl.train.launch import RunnerRun, train_concurrently

    claim_run_folder(cfg)
    datasets = {}  # built once per (teacher or student pool, unlabelled source) and shared by the runs
    runner_runs = []
    for run in runs:
        key = ("teacher" if run.role == "teacher" else "student", run.unlabeled_dir)
        if key not in datasets:
            datasets[key] = shared_training_data(cfg, role=key[0], unlabeled_dir=run.unlabeled_dir)
        runner_runs.append(RunnerRun(run.name, run.loop, datasets[key],
                                     storage.join(cfg.output_dir, RAY_RESULTS, run.name)))
        _announce(cfg, run, f"a runner ({cfg.scaling.concurrent_runs} at a time)", log)
    by_name = {run.name: run for run in runs}
    saved = {}
    for runner_run, result in train_concurrently(runner_runs, scaling=_scaling(cfg), concurrent=cfg.scaling.concurrent_runs,
                                                 max_failures=cfg.max_failures, log=log):
        # the run's own seconds in its runner, not the time since the whole batch began
        saved[runner_run.name] = save_trained(cfg, by_name[runner_run.name], result, dataset_info, result.seconds, log,
                                              say_done=False)
    return saved


def ensure_teacher(cfg: RunConfig, dataset_info: dict, log=print) -> tuple[str, dict]:
    """The teacher to distil from: given (``teacher.path``) or trained here on the labelled data."""
    num_classes = len(dataset_info["classes"])
    if cfg.teacher.path:
        model, spec = load_model_for(cfg.teacher.path, cfg.teacher.model, num_classes, cfg.data.frames)
        if model.num_classes != num_classes:
            raise ConfigError(f"teacher.path {cfg.teacher.path} predicts {model.num_classes} classes; "
                              f"the dataset has {num_classes}")
        other = other_class_list(f"teacher.path {cfg.teacher.path}", spec, cfg.clips_dir, dataset_info["classes"])
        if other:
            raise ConfigError(other)
        problem = (teacher_split_problem(cfg.teacher.path, spec, dataset_info)
                   or teacher_holdout_problem(cfg, cfg.teacher.path, spec, dataset_info))
        if problem:
            raise ConfigError(problem)
        return cfg.teacher.path, spec
    section = cfg.teacher.train
    # (not the worker count, unlike a student's: a search or a rerun with other scaling reuses its teacher)
    identity = {"dataset": dataset_info["fingerprint"], "model": model_identity(section, num_classes, cfg),
                "name": section.model, "optim": optim_identity(cfg.teacher.optim), "seed": cfg.seed,
                "init": init_given(section), "split": cfg.data.train_split, "flip": cfg.data.flip,
                **holdout_identity(cfg), **init_identity(section)}
    if cfg.data.teacher_pool > 0:
        identity["teacher_pool"] = cfg.data.teacher_pool
    path = train_model(cfg, role="teacher", section=section, optim=cfg.teacher.optim, dataset_info=dataset_info,
                       seed=cfg.seed, teacher={"mode": "none"}, identity=identity, log=log)
    return path, storage.read_json(storage.join(path, SPEC))


def publish_teacher(teacher_path: str, out: str, test_cfg: RunConfig | None = None, log=print,
                    use_gpu: bool = False) -> dict:
    """Ship a trained teacher as a model folder (safetensors + spec + model card). With ``test_cfg``
    its accuracy on that config's test split goes into the spec (``eval_<name>_<split>``: top-1,
    top-5 and each test video's predicted class, so a test can reproduce it on a sample); that
    ingests the test config's clips, so Ray must be up. ``use_gpu``: evaluated in a GPU task, as the
    teacher was trained (the driver may be a head node without a GPU)."""
    from dvfl.export import export_folder

    model, spec = load_model(teacher_path)
    summary = {"path": out, "weights_fingerprint": spec["weights_fingerprint"]}
    if test_cfg is not None:
        info = ensure_clips(test_cfg, log)
        problem = teacher_split_problem(teacher_path, spec, info)  # (its accuracy on videos it trained on)
        if problem:
            raise ConfigError(f"--test-config {test_cfg.name}: {problem}")
        if model.num_classes != len(info["classes"]):
            raise ValueError(f"the teacher predicts {model.num_classes} classes; {test_cfg.name}'s clips have "
                             f"{len(info['classes'])}")
        split = test_cfg.data.test_split
        where = dataclasses.replace(test_cfg, scaling=dataclasses.replace(test_cfg.scaling, use_gpu=use_gpu))
        m = evaluate_model_at(where, teacher_path, model.num_classes, split, model=model, num_clips=test_cfg.eval.clips,
                              num_crops=test_cfg.eval.crops, per_video=True)
        m.pop("params")
        key = f"eval_{test_cfg.name}_{split}"
        spec[key] = {**m, "dataset_fingerprint": info["fingerprint"], "seed": test_cfg.seed,
                     "synthetic": vars(test_cfg.data.synthetic) if test_cfg.data.dataset == "synthetic" else None}
        summary[key] = {k: v for k, v in m.items() if k != "predictions"}
        if isinstance(spec.get("inputs"), dict):  # the views of the accuracy it is published with (predict's default)
            spec["inputs"] = {**spec["inputs"], "eval_views": f"{test_cfg.eval.clips}x{test_cfg.eval.crops}"}
        log(f"[teacher] {test_cfg.name} {split} split: top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%} "
            f"({m['videos']} videos)")
    # evaluation moved the model to its device (a GPU when there is one); the folder's exactness
    # check runs on the CPU
    result = export_folder(model.cpu(), spec, out)
    log(f"[teacher] published {out}: {', '.join(result['files'])}")
    return summary


class TeacherGateError(ValueError):
    """Distillation from a teacher whose validation accuracy is near chance."""


def validation_top1(cfg: RunConfig, model_path: str, spec: dict, dataset_info: dict) -> float:
    """Top-1 of a model on the validation clips (the number a choice may use; never test).

    A model trained here on these clips with this hold-out recorded it; any other is evaluated."""
    src = validation_source(cfg)
    if (spec.get("val_top1") is not None and spec.get("val_split") == src.description
            and spec.get("dataset_fingerprint") == dataset_info["fingerprint"]):
        return float(spec["val_top1"])
    kind = "train" if src.carved or src.split == cfg.data.train_split else "uniform"
    stored = dataset_info["params"]["clips_per_video" if kind == "train" else "eval_clips"]
    return evaluate_model_at(cfg, model_path, len(dataset_info["classes"]), src.split, num_clips=stored, num_crops=1,
                             videos=src.videos, view_kind=kind)["top1"]


def evaluate_model_at(cfg: RunConfig, model_path: str, num_classes: int, split: str, *, in_task: bool | None = None,
                      model=None, **views) -> dict:
    """:func:`~dvfl.train.evaluate.evaluate_multiview` of the model at ``model_path`` (with its
    ``params``), where the run trains: with ``scaling.use_gpu`` in a Ray task holding a GPU (the
    driver may be a head node without one, where Video-FocalNet-B's 4x3 evaluation of a test split
    takes about a day), else in this process (``model``: that model, already loaded). ``in_task``
    forces either (tests). A model at a local path is read here and sent with the task (its node
    may not see this disk); a URI is read where the task runs."""
    views = {**views, "keep_memory": cfg.optim.keep_freed_memory}
    args = (model_path, cfg.teacher.model, num_classes, cfg.data.frames, cfg.clips_dir, split, cfg.crop_size, views)
    if not (cfg.scaling.use_gpu if in_task is None else in_task):
        # on the device the config asks for: a GPU this process sees but Ray never gave out may be busy
        return _evaluate_model(*args, model=model, device=None if cfg.scaling.use_gpu else "cpu")
    import ray

    if storage.local_path(model_path) is not None:
        # the task may run on another node, without this one's disk (a teacher under the head's job
        # root): the weights go with it, as they go to the cache's actors
        if model is None:
            model, _ = load_model_for(model_path, cfg.teacher.model, num_classes, cfg.data.frames)
        model = ray.put(model)
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.scaling.use_gpu else 0)(_evaluate_model)
    return ray.get(task.options(name="dvfl-evaluate").remote(*args, in_task=True, model=model))


def _evaluate_model(model_path: str, name: str | None, num_classes: int, frames: int, clips_dir: str, split: str,
                    crop_size: int, views: dict, in_task: bool = False, model=None, device: str | None = None) -> dict:
    """``device`` None: a GPU if this process sees one."""
    from dvfl.train.evaluate import evaluate_multiview

    if model is None:
        model, _ = load_model_for(model_path, name, num_classes, frames)
    views = dict(views)
    keep_memory = views.pop("keep_memory", True) and in_task  # (a task's worker; not the run's driver)
    if in_task:
        import ray

        device = "cuda" if ray.get_gpu_ids() else "cpu"  # the GPU Ray gave this task, or none
    m = evaluate_multiview(model, clips_dir, split, crop_size, device=device, keep_memory=keep_memory,
                           progress=lambda line: print(f"[eval] {line}", flush=True), **views)
    return {**m, "params": sum(p.numel() for p in model.parameters())}


def chance_top1(video_labels: dict, num_classes: int) -> float:
    """The top-1 of a model that predicts one class: 1/C on class-balanced videos, the largest class's
    share on others (a collapsed teacher scores that)."""
    largest = max(collections.Counter(video_labels.values()).values(), default=0)
    return max(1.0 / num_classes, largest / len(video_labels) if video_labels else 0.0)


def gate_top1(chance: float, margin: float, num_classes: int) -> float:
    """The top-1 a teacher must reach: chance + margin on balanced videos; on imbalanced ones the margin
    shrinks with the headroom above chance (chance + margin passed 1 where one class held 96 %: a
    perfect teacher was refused)."""
    balanced = 1.0 / num_classes
    return chance + margin * (1.0 - chance) / (1.0 - balanced) if chance > balanced else chance + margin


def check_teacher(cfg: RunConfig, teacher_path: str, teacher_spec: dict, dataset_info: dict, log=print) -> float | None:
    """The teacher sanity gate: refuse to distil from a teacher within ``teacher.min_top1_over_chance``
    of chance on the validation clips (its soft targets would be noise). Chance is what predicting the
    largest validation class scores (1/C on balanced videos)."""
    from dvfl.data.shards import read_clips_table

    margin = cfg.teacher.min_top1_over_chance
    if margin < 0:
        return None
    num_classes = len(dataset_info["classes"])
    val = validation_source(cfg)
    table = read_clips_table(cfg.clips_dir, [val.split], columns=["video_id", "label"]).to_pydict()
    labels = {v: y for v, y in zip(table["video_id"], table["label"]) if val.videos is None or v in val.videos}
    chance = chance_top1(labels, num_classes)
    if chance >= 1.0:  # (every teacher naming that class scores 100 %: nothing to judge by)
        log(f"[teacher] note: the validation videos ({val.description}) are all of one class: the teacher gate "
            "cannot judge a teacher on them and is skipped")
        return None
    top1 = validation_top1(cfg, teacher_path, teacher_spec, dataset_info)
    src = val.description
    needed = gate_top1(chance, margin, num_classes)
    if top1 < needed:
        imbalanced = chance > 1.0 / num_classes
        raise TeacherGateError(
            f"the teacher {teacher_path} scores {top1:.1%} top-1 on the validation clips ({src}); chance is "
            f"{chance:.1%} ({num_classes} classes" + ("; its largest class holds that share of the validation "
                                                     "videos" if imbalanced else "")
            + f"), and distillation needs at least {needed:.1%} (chance + {margin:.0%}"
            + (", scaled to the headroom above chance" if imbalanced else "")
            + ", teacher.min_top1_over_chance): its soft targets would be noise. Train the teacher "
            "longer or from a pre-trained checkpoint, or lower teacher.min_top1_over_chance (< 0 turns the gate off)")
    log(f"[teacher] validation top-1 {top1:.1%} ({src}); chance {chance:.1%}: passes the gate")
    return top1


def cache_splits(cfg: RunConfig) -> tuple[str, ...]:
    """The splits whose clips training distils on: the teacher cache holds their logits only."""
    return (cfg.data.train_split, "unlabeled")


def ensure_cache(cfg: RunConfig, teacher_path: str, log=print) -> dict:
    from dvfl.teacher_cache import CacheMismatchError, CacheOfAnotherBuild, build_teacher_cache

    # The output dir owns its default cache: a new teacher or new clips rebuild it. A cache the
    # user named (teacher.cache) is never overwritten: a mismatch there is refused.
    try:
        return build_teacher_cache(cfg.clips_dir, teacher_path, cfg.cache_dir, teacher_name=cfg.teacher.model,
                                   crop_size=cfg.crop_size, views=cfg.teacher.views, dtype=cfg.teacher.cache_dtype,
                                   use_gpu=cfg.scaling.use_gpu, num_actors=cfg.cache_actors,
                                   overwrite=not cfg.teacher.cache, splits=cache_splits(cfg), log=log,
                                   keep_memory=cfg.optim.keep_freed_memory)
    except CacheOfAnotherBuild as exc:  # its own remedy (--out, --fresh) is dvfl cache's, not this command's
        what = "; ".join(exc.differences) or "another teacher, other clips or other views (a retrained teacher?)"
        raise CacheMismatchError(
            f"teacher.cache {cfg.cache_dir} was built from {what}: rebuild it with `dvfl cache --config ... "
            f"--teacher {teacher_path} --fresh`, or delete that folder, or set teacher.cache to another folder") from exc


def teacher_signal(cfg: RunConfig, teacher_path: str, teacher_spec: dict, dataset_info: dict, kd: bool,
                   log=print) -> dict:
    """What the loop gets to produce teacher logits: nothing, a cache (checked), or live weights."""
    import ray

    from dvfl.teacher_cache import TeacherLogitCache

    if not kd:
        return {"mode": "none"}
    if cfg.teacher.mode == "cached":
        from dvfl.locks import folder_lock

        if cfg.unlabeled_dir and cfg.unlabeled_dir.rstrip("/") != cfg.clips_dir.rstrip("/"):
            raise ValueError("data.unlabeled must be in the same ingest output as data.clips, so one cache "
                             "covers both (ingest them together with --unlabeled)")
        # checked and read under the cache's lock: a cache build into it waits until the logits are in memory
        # (it could replace them between the check and the read: another teacher's under the checked fingerprint)
        with folder_lock(cfg.cache_dir, "teacher cache load", wait=True, log=log, shared=True):
            cache = TeacherLogitCache(cfg.cache_dir)
            splits = [cfg.data.train_split] + (["unlabeled"] if cfg.unlabeled_dir else [])
            cache.check(dataset_info, teacher_spec=teacher_spec, crop_size=cfg.crop_size, splits=splits,
                        views=cfg.teacher.views)
            return {"mode": "cached", "views": cache.views, "cache_ref": [ray.put(cache.packed())],
                    "fingerprint": cache.fingerprint}
    model, spec = load_model_for(teacher_path, cfg.teacher.model, len(dataset_info["classes"]), cfg.data.frames)
    return {"mode": "online", "views": cfg.teacher.views, "spec": {"name": spec["name"], "kwargs": spec["kwargs"]},
            "state_ref": [ray.put(model.state_dict())], "fingerprint": spec["weights_fingerprint"]}


def student_run_args(cfg: RunConfig, dataset_info: dict, teacher: dict, seed: int, role: str) -> dict:
    """What :func:`train_model` / :func:`plan_model_run` get for one student: ``vfl`` (no teacher),
    ``vfl_long`` (no teacher, ``LONG_EPOCHS_FACTOR`` x the epochs), ``dvfl`` (KD on the labelled
    clips) or ``dvfl+unlabeled`` (KD on the unlabelled clips too; they never reach the CE term)."""
    unlabeled = role == "dvfl+unlabeled"
    kd = role in ("dvfl", "dvfl+unlabeled")
    if kd and teacher["mode"] == "none":
        raise ValueError(f"{role} needs a teacher signal")
    if unlabeled and not cfg.unlabeled_dir:
        raise ValueError("training on unlabelled clips needs a teacher signal and data.unlabeled "
                         "(or data.synthetic.unlabeled_videos > 0)")
    optim = (dataclasses.replace(cfg.optim, epochs=cfg.optim.epochs * LONG_EPOCHS_FACTOR) if role == "vfl_long"
             else cfg.optim)
    num_classes = len(dataset_info["classes"])
    identity = {"dataset": dataset_info["fingerprint"], "name": cfg.student.model,
                "model": model_identity(cfg.student, num_classes, cfg), "optim": optim_identity(optim), "seed": seed,
                "kd": vars(cfg.kd) if kd else None, "teacher": teacher.get("fingerprint") if kd else None,
                "unlabeled": unlabeled, "split": cfg.data.train_split, "flip": cfg.data.flip,
                "init": init_given(cfg.student), **holdout_identity(cfg),
                **init_identity(cfg.student)}
    if cfg.data.label_fraction < 1:  # (absent at 1.0: earlier full-label runs stay reusable)
        identity["label_fraction"] = cfg.data.label_fraction
    # the data order's seed (a given data.clips' fingerprint does not hold it) and the worker count
    # (optim.batch_size is per worker: the global batch and the schedule); absent at 0 and 1
    if cfg.seed:
        identity["data_seed"] = cfg.seed
    if cfg.scaling.num_workers != 1:
        identity["workers"] = cfg.scaling.num_workers
    if cfg.data.teacher_pool > 0:
        identity["teacher_pool"] = cfg.data.teacher_pool
    if kd and teacher["mode"] == "online":  # a cache's fingerprint holds its views; live weights do not
        identity["teacher_views"] = list(teacher["views"])
    signal = {k: v for k, v in teacher.items() if k != "fingerprint"} if kd else {"mode": "none"}
    return dict(role=role, section=cfg.student, optim=optim, dataset_info=dataset_info, seed=seed,
                teacher=signal, identity=identity, unlabeled_dir=cfg.unlabeled_dir if unlabeled else None)


def train_student(cfg: RunConfig, dataset_info: dict, teacher: dict, seed: int, *,
                  unlabeled: bool = False, role: str | None = None, log=print) -> str:
    """One student as a Ray Train run (``role`` default: dvfl / dvfl+unlabeled with a teacher
    signal, vfl without); returns its artefact directory."""
    if role is None:
        role = ("dvfl+unlabeled" if unlabeled else "dvfl") if teacher["mode"] != "none" else "vfl"
    elif unlabeled and role != "dvfl+unlabeled":
        raise ValueError(f"unlabeled=True trains dvfl+unlabeled, not {role}")
    if unlabeled and teacher["mode"] == "none":
        raise ValueError("training on unlabelled clips needs a teacher signal and data.unlabeled "
                         "(or data.synthetic.unlabeled_videos > 0)")
    return train_model(cfg, **student_run_args(cfg, dataset_info, teacher, seed, role), log=log)


def train_students(cfg: RunConfig, dataset_info: dict, teacher: dict, log=print) -> dict:
    """Every (seed, role) student of the run config; returns {(seed, role): artefact directory}.
    One Ray Train run after another, or ``scaling.concurrent_runs`` at a time in runner actors."""
    with shared_start_weights():
        return _train_students(cfg, dataset_info, teacher, log)


def _train_students(cfg: RunConfig, dataset_info: dict, teacher: dict, log=print) -> dict:
    paths, planned = {}, []
    for seed in cfg.seeds or [cfg.seed]:
        for role in cfg.student_roles:
            args = student_run_args(cfg, dataset_info, teacher, seed, role)
            if not cfg.scaling.concurrent_runs:
                paths[seed, role] = train_model(cfg, **args, log=log)
                continue
            run = plan_model_run(cfg, **args, log=log)
            if isinstance(run, str):
                paths[seed, role] = run
            else:
                planned.append(run)
    if planned:
        saved = train_runs_concurrently(cfg, planned, dataset_info, log)
        paths.update({(run.seed, run.role): saved[run.name] for run in planned})
    return paths


# ----------------------------------------------------------------------------- evaluation + report
def _owned_by_run(cfg: RunConfig, path: str) -> bool:
    """A model directory this output dir made (teacher/ or students/ under it)."""
    return any(storage.same_or_inside(path, storage.join(cfg.output_dir, sub)) for sub in (TEACHER_DIR, STUDENTS_DIR))


def _read_json(path: str) -> dict:
    try:
        return storage.read_json(path)
    except FileNotFoundError:
        return {}


# How the test views are cut (bumped when that changes: a protocol does not average folds evaluated
# two ways): 3 = fewer clips spread over the video (session 28), 3 crops of frames resized first (session 32)
EVALUATION_METHOD = 3


def evaluate_model_dir(cfg: RunConfig, path: str, log=print) -> dict:
    """The final evaluation, on ``data.test_split`` (never used for a choice).

    Multi-view top-1/top-5 of a model artefact, cached per split, views and clips fingerprint:
    in its model.json when this run made the model, else in ``<output_dir>/evaluations.json``
    under its weights fingerprint (a model the user gave is only read)."""
    from dvfl.profile import count_flops

    spec_path = storage.join(path, SPEC) if storage.isdir(path) else None
    spec = read_spec(spec_path) if spec_path else {}
    dataset = load_dataset_info(cfg.clips_dir)
    split = cfg.data.test_split
    # the crop too: cropping happens after ingest, so the clips' fingerprint does not change with it
    key = f"eval_{split}_{cfg.eval.clips}x{cfg.eval.crops}_{cfg.crop_size}px_{dataset['fingerprint'][:16]}"
    if cfg.eval.clips < dataset["params"]["eval_clips"]:  # fewer clips than stored: spread since session 28
        key += "_spread"
    if cfg.eval.crops == 3 and dataset["params"]["short_side"] != cfg.crop_size:  # resized first since session 32
        key += "_fullheight"
    model = None  # loaded here only for a model the run did not make (its weights fingerprint)
    if spec_path is not None and _owned_by_run(cfg, path):
        store, store_key = spec_path, key
    else:
        model, spec2 = load_model_for(path, cfg.teacher.model, len(dataset["classes"]), cfg.data.frames)
        spec = {**spec, **spec2}
        store, store_key = storage.join(cfg.output_dir, EVALUATIONS), f"{spec2['weights_fingerprint']}/{key}"
    m = _read_json(store).get(store_key)
    if m is None:
        m = evaluate_model_at(cfg, path, len(dataset["classes"]), split, model=model, num_clips=cfg.eval.clips,
                              num_crops=cfg.eval.crops)
        flops = count_flops(spec["name"], **{**spec["kwargs"], "img_size": cfg.crop_size})
        m["gmacs"] = flops["gmacs_per_clip"]
        storage.write_json(store, {**_read_json(store), store_key: m})
    if store == spec_path:  # a model of this run: the views it was last scored with, predict's and serve's default
        _record_eval_views(spec_path, f"{cfg.eval.clips}x{cfg.eval.crops}")
    log(f"[eval] {path}: split {split}: top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%} "
        f"({m['clips']}x{m['crops']} views, {m['videos']} videos)")
    # a model's recorded validation top-1 is this run's only on these clips with this hold-out (a
    # given teacher's is from its own data: it was reported under this config's validation split)
    same_validation = (spec.get("val_split") == validation_source(cfg).description
                       and spec.get("dataset_fingerprint") == dataset["fingerprint"])
    # (a model validated elsewhere: its curve was drawn as this run's validation accuracy)
    return {**m, "split": split, "history": spec.get("history", []) if same_validation else [], "name": spec.get("name"),
            "path": str(path), "val_top1": spec.get("val_top1") if same_validation else None,
            "val_split": spec.get("val_split") if same_validation else None,
            "train_seconds": spec.get("train_seconds")}


def _record_eval_views(spec_path: str, views: str) -> None:
    """``inputs.eval_views`` of a model this run scored: a rerun with other ``eval`` settings reuses the
    model (its folder does not depend on them) and reports it under the new views."""
    spec = _read_json(spec_path)
    if isinstance(spec.get("inputs"), dict) and spec["inputs"].get("eval_views") != views:
        storage.write_json(spec_path, {**spec, "inputs": {**spec["inputs"], "eval_views": views}})


def claim_run_folder(cfg: RunConfig) -> None:
    """Mark ``output_dir`` as a run folder of this project before the first model or Ray Train
    folder goes there (and after every refusal): ``--fresh`` deletes models and Ray Train state
    only in such a folder."""
    mark = storage.join(cfg.output_dir, RUN_MARK)
    if not storage.isfile(mark):
        storage.write_text(mark, "A run folder of dvfl: `distill --fresh` deletes teacher/, students/ and "
                                 "ray_results/ only where it finds this file (or a run's config.yaml).\n")


def fresh_refusal(cfg: RunConfig) -> str | None:
    """Why ``--fresh`` must not delete this output dir's models and Ray Train state: it holds
    such folders but neither our mark (:func:`claim_run_folder`) nor a run config of ours
    (``config.yaml``; folders of older versions), so they are somebody else's (e.g. ``--out ~``);
    None when it may."""
    subs = [s for s in (TEACHER_DIR, STUDENTS_DIR, RAY_RESULTS) if storage.exists(storage.join(cfg.output_dir, s))]
    given = {"teacher.path": cfg.teacher.path, "student.checkpoint": cfg.student.checkpoint,
             "student.init_2d": cfg.student.init_2d, "teacher.train.checkpoint": cfg.teacher.train.checkpoint,
             "teacher.train.init_2d": cfg.teacher.train.init_2d}
    for field, path in given.items():  # (it was deleted, then the run failed on the missing file)
        inside = [s for s in subs if path and storage.same_or_inside(path, storage.join(cfg.output_dir, s))]
        if inside:
            return (f"--fresh deletes {storage.join(cfg.output_dir, inside[0])}/, which holds {field} {path}: nothing "
                    "was deleted; copy it out of the run folder first (or leave --fresh out)")
    for sub in subs:  # (the deletes follow a linked folder: files outside the run went, or rmtree stopped halfway)
        link = _linked_folder_under(storage.join(cfg.output_dir, sub))
        if link:
            return (f"--fresh would delete through the link {link} -> {os.path.realpath(link)}: nothing was "
                    "deleted; remove the link (or the folders) yourself, or leave --fresh out")
    if not subs or storage.isfile(storage.join(cfg.output_dir, RUN_MARK)):
        return None
    try:
        given = yaml.safe_load(storage.read_text(storage.join(cfg.output_dir, "config.yaml")))
    except (OSError, yaml.YAMLError):
        given = None
    if isinstance(given, dict) and {"output_dir", "student", "teacher", "kd"} <= set(given):
        return None
    return (f"--fresh deletes {', '.join(s + '/' for s in subs)} in {cfg.output_dir}, which holds no config.yaml "
            "(or .dvfl-run mark) of a run of this project: nothing was deleted; use another --out (or delete them "
            "yourself)")


def _linked_folder_under(path: str) -> str | None:
    """The first folder at or under a local ``path`` that is a symbolic link (None on object stores)."""
    local = storage.local_path(path)
    if local is None:
        return None
    if os.path.islink(local):
        return local
    for root, dirs, _ in os.walk(local):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                return os.path.join(root, d)
    return None


def clean_run(cfg: RunConfig) -> None:
    """--fresh: forget trained models and Ray Train state of this output dir (clips stay)."""
    refusal = fresh_refusal(cfg)
    if refusal:
        raise ConfigError(refusal)
    for sub in (TEACHER_DIR, STUDENTS_DIR):
        # every model's spec first: a delete cut short must leave no model.json vouching for a folder
        for spec in storage.find(storage.join(cfg.output_dir, sub), SPEC):
            storage.remove(spec)
    for sub in (TEACHER_DIR, STUDENTS_DIR, RAY_RESULTS):
        storage.remove_tree(storage.join(cfg.output_dir, sub))


def summarize(rows: list[dict]) -> dict:
    import statistics

    top1 = [r["top1"] for r in rows]
    top5 = [r["top5"] for r in rows]
    # training cost: whole run (Ray Train start-up and validation included) and the loop's median epoch
    epochs = [statistics.median(h["epoch_seconds"] for h in r["history"]) if r.get("history") else None
              for r in rows]
    return {"top1_mean": statistics.fmean(top1), "top1_min": min(top1), "top1_max": max(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,  # sample std over seeds
            "train_seconds_per_seed": [r.get("train_seconds") for r in rows],
            "median_epoch_seconds_per_seed": epochs,
            "top5_mean": statistics.fmean(top5), "seeds": len(rows), "top1_per_seed": top1,
            "params": rows[0]["params"], "gmacs": rows[0]["gmacs"], "split": rows[0]["split"],
            "videos": rows[0].get("videos"), "val_top1_per_seed": [r.get("val_top1") for r in rows], "paths": [r.get("path") for r in rows]}


def kd_gains(table: dict) -> dict | None:
    """Per seed: DVFL-Net minus VFL-Net (and minus VFL-Net with twice the epochs) top-1 in points,
    DVFL-Net over the teacher, and the students whose mean beats the teacher's (a teacher too weak)."""
    if not all(k in table for k in ("teacher", "dvfl")):
        return None
    dvfl = table["dvfl"]["top1_per_seed"]
    teacher = table["teacher"]["top1_mean"]
    # (a teacher at 0 %: null, not NaN, which strict JSON readers refuse)
    gains = {"dvfl_over_teacher": [d / teacher if teacher else None for d in dvfl],
             "students_above_teacher": [k for k, row in table.items()
                                        if k != "teacher" and row["top1_mean"] > teacher]}
    for base in ("vfl", "vfl_long"):
        if base in table:
            gains[f"dvfl_minus_{base}_points"] = [round(100 * (d - v), 2)
                                                  for d, v in zip(dvfl, table[base]["top1_per_seed"])]
    return gains


def training_cost(table: dict) -> dict | None:
    """DVFL-Net's training time relative to VFL-Net's (same student, same clips): per seed, the
    ratio of median epoch seconds and of whole-run seconds. None when a figure is missing (a
    model trained elsewhere or by an older version)."""
    if not all(k in table for k in ("vfl", "dvfl")):
        return None
    vfl, dvfl = table["vfl"], table["dvfl"]
    pairs = {"epoch": ("median_epoch_seconds_per_seed", "dvfl_over_vfl_epoch"),
             "run": ("train_seconds_per_seed", "dvfl_over_vfl_run")}
    out = {}
    for key, name in pairs.values():
        if any(v is None for v in vfl[key] + dvfl[key]):
            return None
        out[name] = [d / v for d, v in zip(dvfl[key], vfl[key])]
    return out


REPORT_FILES = ("results.json", "results.md", "training_curves.png")


def remove_report(out: str) -> None:
    """An earlier run's report files (what :func:`write_report` writes)."""
    for name in REPORT_FILES:
        storage.remove(storage.join(out, name))


def clips_fingerprint(cfg: RunConfig) -> str | None:
    """The fingerprint of the finished ingest in ``cfg.clips_dir`` (None: no finished ingest there)."""
    try:
        return load_dataset_info(cfg.clips_dir).get("fingerprint")
    except (OSError, ValueError):
        return None


def write_report(cfg: RunConfig, results: dict, log=print, started: float | None = None) -> dict:
    """results.json, results.md and training_curves.png in the output dir (``started``: when the
    command began; the report then records ``wall_seconds``)."""
    out = cfg.output_dir
    table = {name: summarize(rows) for name, rows in results.items() if rows}
    validation = validation_source(cfg).description
    # as given: under a Ray job the inputs resolved into the job's temporary copy, gone after it
    from dvfl.host import cpu_model, usable_cpus

    report = {"config": cfg.as_given().to_dict(),
              # timings compare only on one kind of machine (a copy in benchmarks/ must say which); on a
              # cluster the students trained on its workers, on GPUs where scaling.use_gpu
              "machine": {"driver_cpu": cpu_model(), "driver_usable_cpus": usable_cpus(),
                          "device": "gpu" if cfg.scaling.use_gpu else "cpu"},
              "eval": f"{cfg.eval.clips} clips x {cfg.eval.crops} crops, split {cfg.data.test_split}",
              "evaluation_method": EVALUATION_METHOD,
              # the clips it was computed on: a protocol counts an earlier command's fold only on the same ones
              "dataset_fingerprint": clips_fingerprint(cfg),
              # top1/top5 (and kd_gains) come from the test split, evaluated once at the end; the
              # per-epoch history and val_top1_per_seed from the validation split
              "splits": {"test": cfg.data.test_split, "validation": validation,
                         "top1": cfg.data.test_split, "history": validation},
              "std": "sample standard deviation (n-1) over the seeds; null for one seed",
              "models": table}
    gains = kd_gains(table)
    if gains:
        report["kd_gains"] = gains
    cost = training_cost(table)
    if cost:
        report["training_cost"] = cost
    if started is not None:
        report["wall_seconds"] = round(time.time() - started, 1)
    labels = STUDENT_LABELS
    lines = ["| model | params | GMACs/clip | top-1 (mean ± std) | per seed | top-5 | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in table.items():
        std = f" ± {100 * row['top1_std']:.1f}" if row["top1_std"] is not None else ""
        per_seed = ", ".join(f"{100 * t:.1f}" for t in row["top1_per_seed"])
        lines.append(f"| {labels.get(name, name)} | {row['params'] / 1e6:.2f}M | {row['gmacs']:.3f} | "
                     f"{100 * row['top1_mean']:.1f}%{std} | {per_seed} | {row['top5_mean']:.1%} | {row['seeds']} |")
    md = "\n".join(lines) + (f"\n\nEvaluation (top-1, top-5): {report['eval']}, evaluated once at the end. "
                              f"Choices (per-epoch validation, curves) used {validation}. Std: sample standard "
                              "deviation (n-1) over the seeds.\n")
    if gains:
        for base in ("vfl", "vfl_long"):
            if f"dvfl_minus_{base}_points" in gains:
                md += (f"\nPer seed, DVFL-Net minus {labels[base].split(' (')[0]}"
                       f"{' with ' + str(LONG_EPOCHS_FACTOR) + 'x the epochs' if base == 'vfl_long' else ''}: "
                       + ", ".join(f"{g:+.1f}" for g in gains[f"dvfl_minus_{base}_points"]) + " points.\n")
        md += "\nDVFL-Net / teacher per seed: " + ", ".join("n/a (the teacher scored 0)" if r is None else f"{r:.2f}"
                                                          for r in gains["dvfl_over_teacher"]) + ".\n"
        if gains["students_above_teacher"]:
            md += ("\nThe teacher is too weak: " + ", ".join(labels.get(k, k) for k in gains["students_above_teacher"])
                   + " beat it on the test split.\n")
    if "wall_seconds" in report:
        md += f"\nWall time of the command: {report['wall_seconds'] / 60:.1f} min.\n"
    if cost:
        md += ("\nTraining time, DVFL-Net / VFL-Net per seed: median epoch "
               + ", ".join(f"{r:.2f}x" for r in cost["dvfl_over_vfl_epoch"]) + "; whole run "
               + ", ".join(f"{r:.2f}x" for r in cost["dvfl_over_vfl_run"]) + ".\n")
    storage.write_text(storage.join(out, "results.md"), md)
    _plot_curves(results, storage.join(out, "training_curves.png"), labels)
    # last: a protocol counts a fold with a results.json as finished (a full disk at the plot left one)
    storage.write_json(storage.join(out, "results.json"), report)
    log("\n" + md)
    log(f"[report] {storage.join(out, 'results.json')}, {storage.join(out, 'results.md')}, "
        f"{storage.join(out, 'training_curves.png')}")
    return report


def _plot_curves(results: dict, path: str, labels: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        for i, row in enumerate(rows):
            h = row.get("history") or []
            if not h:
                continue
            epochs = [e["epoch"] for e in h]
            kw = {"label": labels.get(name, name) if i == 0 else None,
                  "color": {"teacher": "k", "vfl": "tab:blue", "vfl_long": "tab:purple", "dvfl": "tab:red",
                            "dvfl+unlabeled": "tab:green"}.get(name)}
            axes[0].plot(epochs, [e["val_top1"] for e in h], **kw)
            axes[1].plot(epochs, [e["train_loss"] for e in h], **kw)
    axes[0].set(xlabel="epoch", ylabel="val top-1 (stored views)", title="held-out validation accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="training loss (KD runs: α·KD + (1−α)·CE)")
    axes[0].legend()
    fig.tight_layout()
    try:
        storage.write_with(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    finally:
        plt.close(fig)


def with_given_pool(cfg: RunConfig, dataset_info: dict, log=print) -> RunConfig:
    """The roles follow the data: given clips (``data.clips``) holding an unlabelled pool, with no
    ``students`` list, train a dvfl+unlabeled student too (it was dropped without a word). A copy with
    ``data.unlabeled`` set; ``cfg`` itself, which the report records as given, is left as it is."""
    pool = ((dataset_info.get("counts") or {}).get("unlabeled") or {}).get("clips")
    if not (pool and cfg.data.clips and cfg.students is None and not cfg.unlabeled_dir):
        return cfg
    adopted = copy.deepcopy(cfg)
    adopted.data.unlabeled = cfg.clips_dir
    log(f"[clips] {cfg.clips_dir} holds an unlabelled pool ({pool} clips): a dvfl+unlabeled student trains too "
        "(list `students` to leave it out)")
    return adopted


def run_all(cfg: RunConfig, log=print, started: float | None = None) -> dict:
    """The whole product: clips, teacher, cache, VFL-Net + DVFL-Net per seed, report
    (``started``: when the command began, for the report's ``wall_seconds``)."""
    dataset_info = ensure_clips(cfg, log)
    say_validation_note(cfg, log)
    given = cfg  # as the user gave it: what the report records (a protocol compares it with its other splits')
    cfg = with_given_pool(cfg, dataset_info, log)
    teacher_path, teacher_spec = ensure_teacher(cfg, dataset_info, log)
    roles = cfg.student_roles
    kd = any(r in ("dvfl", "dvfl+unlabeled") for r in roles)  # vfl and vfl_long learn from labels only
    if kd:
        check_teacher(cfg, teacher_path, teacher_spec, dataset_info, log)
        if cfg.teacher.mode == "cached":
            ensure_cache(cfg, teacher_path, log)
    kd_signal = teacher_signal(cfg, teacher_path, teacher_spec, dataset_info, kd=kd, log=log)
    paths = train_students(cfg, dataset_info, kd_signal, log)
    del kd_signal  # (its cache or teacher weights leave the object store before the evaluations)
    # the test split is read once, at the end, for every model: the teacher's top-1 is not printed
    # while its students still train
    results = {"teacher": [evaluate_model_dir(cfg, teacher_path, log)], **{r: [] for r in roles}}
    for seed in cfg.seeds or [cfg.seed]:
        for role in roles:
            results[role].append(evaluate_model_dir(cfg, str(paths[seed, role]), log))
    return write_report(given, results, log, started=started)


__all__ = ["ensure_clips", "ensure_teacher", "check_teacher", "TeacherGateError", "ensure_cache", "train_student", "evaluate_model_dir",
           "write_report", "run_all", "clean_run", "claim_run_folder", "fresh_refusal", "teacher_signal"]
