"""Ingest videos into Parquet clip shards (see docs/ingest.md).

Examples (the flags after --out are the data fields configs/<dataset>.yaml reads; clips ingested with
the defaults, short side 128 and 1 evaluation clip, are refused by those configs):
  dvfl ingest --dataset synthetic --out data/synthetic
  dvfl ingest --dataset ucf101 --root /data/UCF101 --split 1 --out data/ucf101_s1 \\
      --short-side 256 --clips-per-video 4 --eval-clips 4
  dvfl ingest --dataset hmdb51 --root /data/hmdb51 --split 2 --out data/hmdb51_s2 \\
      --short-side 256 --clips-per-video 4 --eval-clips 4
  dvfl ingest --dataset ucf50 --root /data/UCF50 --split 7 --out data/ucf50_g7 \\
      --short-side 256 --clips-per-video 4 --eval-clips 4
  dvfl ingest --dataset kinetics --root /data/k400 --annotations train=train.csv \\
      --annotations test=validate.csv --out data/k400 --short-side 256 --clips-per-video 2 --eval-clips 4
  dvfl ingest --dataset ssv2 --root /data/ssv2 --annotations train=labels/train.json \\
      --annotations test=labels/validation.json --out data/ssv2 --short-side 256 --clips-per-video 2 --eval-clips 2
  dvfl ingest --dataset dvfl-csv --root /data/UCF101 --annotations train=lists/train.csv \\
      --annotations test=lists/val.csv --out data/ucf101_dvfl
  dvfl ingest --dataset folder --root /data/my_videos --test-fraction 0.2 --out data/mine
  ... --unlabeled /data/raw_clips        (or a text file with one path per line)

(``python pipelines/ingest.py`` takes the same arguments.) Re-running the same command resumes
(finished shards are skipped); ``--fresh`` starts over.
"""
from __future__ import annotations

import argparse
import os
import sys

from dvfl.host import joined_address, usable_cpus
from dvfl.cli import absolute_path_args, add_num_cpus, deprecated, os_error_line

ANNOTATION_SPLITS = ("train", "val", "test", "validation", "validate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dvfl.data.adapters import DATASETS

    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--out", required=True, help="output folder (shards/, dataset.json, rejects.jsonl, summary.json)")
    p.add_argument("--root", help="dataset root (not used by --dataset synthetic)")
    p.add_argument("--split", type=int, default=1,
                   help="official split 1-3 (ucf101, hmdb51) or held-out group 1-25 (ucf50)")
    p.add_argument("--videos-dir", help="where the videos are, if not under --root "
                                        "(synthetic: where to generate them, an empty or new folder; default OUT/videos)")
    p.add_argument("--lists-dir", help="folder with the split files (ucf101, hmdb51)")
    p.add_argument("--annotations", action="append", default=[], metavar="[SPLIT=]FILE",
                   help="annotation file(s) for kinetics (CSV), ssv2 (JSON) and dvfl-csv; repeatable")
    p.add_argument("--classes", help="class list file (kinetics, dvfl-csv: one name per line; ssv2: labels.json)")
    p.add_argument("--num-classes", type=int,
                   help="dvfl-csv: number of classes (default: the distinct labels of the lists, numbered 0..K-1)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="folder: fraction of each class's recordings for test (the cuts of one recording, "
                        "rec7_001 and rec7_002, together; drawn by a stable hash of the names, the same on every "
                        "ingest whatever --seed)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="folder: fraction of each class's recordings for val (as --test-fraction)")
    p.add_argument("--unlabeled", action="append", default=[], metavar="DIR_OR_LIST",
                   help="videos without labels (a folder tree or a file with one path per line): "
                        "stored with label NULL and split 'unlabeled'; repeatable")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete an earlier ingest in --out (and generated videos of another "
                        "synthetic configuration) instead of resuming or refusing it")
    deprecated(p, "--overwrite", "--fresh", "fresh", flag=True)
    g = p.add_argument_group("clips")
    g.add_argument("--frames", type=int, default=8, help="frames per clip T")
    g.add_argument("--clips-per-video", type=int, default=2, help="seeded TSN views per train/unlabeled video")
    g.add_argument("--eval-clips", type=int, default=1, help="uniform views per val/test video")
    g.add_argument("--short-side", type=int, default=None,
                   help="resize so the short side is this (aspect kept, no crop); 0 keeps the source size "
                        "(default 128; synthetic: the generated size)")
    g.add_argument("--seed", type=int, default=0, help="seed of the training views (and of the synthetic data)")
    g.add_argument("--min-frames", type=int, default=None, help="reject videos with fewer frames (default --frames)")
    g.add_argument("--timeout-per-file", type=float, default=60.0,
                   help="seconds a single file may take to decode; the decoder process is killed after it")
    g.add_argument("--videos-per-shard", type=int, default=None, help="default: ~128 MiB of clips per shard")
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None, help="Ray cluster to connect to (default: $RAY_ADDRESS, else local)")
    add_num_cpus(r)
    r.add_argument("--object-store-mb", type=int, default=1024, help="object store of the local Ray instance")
    r.add_argument("--decode-tasks", type=int, default=None,
                   help="decode tasks in flight (default: --num-cpus, else cores + 1, on a local instance; "
                        "the cluster's logical CPUs on a cluster)")
    deprecated(r, "--workers", "--decode-tasks", "decode_tasks", type=int)
    r.add_argument("--task-mb", type=float, default=4.0,
                   help="source video MB per decode task, 0.7-2 s of decoding (the last tasks are smaller)")
    r.add_argument("--videos-per-task", type=int, default=None,
                   help="at most this many videos per decode task (default: ~256 MiB of decoded clips)")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.add_argument("--ray-progress", action="store_true", help="also show Ray Data's progress bars")
    s = p.add_argument_group("synthetic (the generator's own defaults; the embedded default is configs/embedded.yaml)")
    s.add_argument("--synthetic-classes", type=int, default=8)
    s.add_argument("--train-per-class", type=int, default=160)
    s.add_argument("--test-per-class", type=int, default=40)
    s.add_argument("--unlabeled-videos", type=int, default=0,
                   help="also generate (and ingest) an unlabelled pool of N videos, disjoint from the labelled ones")
    s.add_argument("--video-frames", type=int, default=16, help="frames per generated video")
    s.add_argument("--video-size", type=int, default=32, help="generated frame size (square, even)")
    s.add_argument("--gen-processes", type=int, default=None, help="processes that generate the videos "
                   "(default: min(4, cores); one for fewer than 64 videos to make)")
    deprecated(s, "--gen-workers", "--gen-processes", "gen_processes", type=int)


def _in_a_class_folder(path: str, root: str, dataset: str) -> bool:
    """``path`` is ``root`` or lies in a folder the adapter reads as a class (or split folder):
    ucf50 reads ``root/UCF50`` when there is one; hidden and system folders are not classes."""
    from dvfl.data.adapters import SYSTEM_FOLDERS

    base = os.path.join(root, "UCF50") if dataset == "ucf50" and os.path.isdir(os.path.join(root, "UCF50")) else root
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(base))
    if rel == os.curdir or os.path.realpath(path) == os.path.realpath(root):
        return True
    first = rel.split(os.sep)[0]
    return first != os.pardir and not first.startswith(".") and first not in SYSTEM_FOLDERS


def validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Fail fast, naming the bad flag, before any work starts."""
    from dvfl import storage

    def bad(msg: str) -> None:
        p.error(msg)

    if a.dataset != "synthetic":
        if not a.root:
            bad(f"--root is required for --dataset {a.dataset}")
        if storage.is_remote(a.root):  # (it was "no such directory")
            bad(f"--root {a.root}: the videos are read from a local or mounted folder, not a URI: mount the bucket, "
                "or ingest where the videos are (--out may be a URI)")
        if not os.path.isdir(a.root):
            bad(f"--root {a.root}: no such directory")
    if a.dataset in ("ucf101", "hmdb51") and a.split not in (1, 2, 3):
        bad(f"--split must be 1, 2 or 3 for {a.dataset}, got {a.split}")
    if a.dataset == "ucf50" and not 1 <= a.split <= 25:
        bad(f"--split (held-out group) must be 1..25 for ucf50, got {a.split}")
    if a.dataset == "synthetic" and a.split != 1:
        bad("--split: the synthetic dataset only has split 1")
    if a.task_mb <= 0:
        bad(f"--task-mb must be > 0, got {a.task_mb}")
    for flag, v, lo in (("--frames", a.frames, 1), ("--clips-per-video", a.clips_per_video, 1),
                        ("--eval-clips", a.eval_clips, 1), ("--num-cpus", a.num_cpus, 1),
                        ("--decode-tasks", a.decode_tasks, 1), ("--videos-per-task", a.videos_per_task, 1),
                        ("--videos-per-shard", a.videos_per_shard, 1),
                        ("--min-frames", a.min_frames, 1), ("--short-side", a.short_side, 0),
                        ("--object-store-mb", a.object_store_mb, 128), ("--num-classes", a.num_classes, 1),
                        ("--synthetic-classes", a.synthetic_classes, 2), ("--train-per-class", a.train_per_class, 0),
                        ("--test-per-class", a.test_per_class, 0), ("--unlabeled-videos", a.unlabeled_videos, 0),
                        ("--video-frames", a.video_frames, 2), ("--video-size", a.video_size, 16),
                        ("--gen-processes", a.gen_processes, 1)):
        if v is not None and v < lo:
            bad(f"{flag} must be >= {lo}, got {v}")
    if a.video_size % 2:
        bad(f"--video-size must be even (H.264 yuv420p), got {a.video_size}")
    if a.dataset == "synthetic" and a.video_frames is not None and a.video_frames < (a.min_frames or a.frames):
        # else every generated video is rejected as too_short, after minutes of generation
        bad(f"--video-frames {a.video_frames} is fewer than a clip needs (--min-frames, default --frames: "
            f"{a.min_frames or a.frames})")
    if a.synthetic_classes > 36:
        bad("--synthetic-classes must be <= 36")
    if not a.timeout_per_file > 0:
        bad(f"--timeout-per-file must be > 0, got {a.timeout_per_file}")
    for flag, v in (("--test-fraction", a.test_fraction), ("--val-fraction", a.val_fraction)):
        if not 0.0 <= v < 1.0:
            bad(f"{flag} must be in [0, 1), got {v}")
    if a.test_fraction + a.val_fraction >= 1.0:
        bad("--test-fraction + --val-fraction must be < 1")
    for flag, v in (("--root", a.root), ("--videos-dir", a.videos_dir), ("--lists-dir", a.lists_dir),
                    ("--classes", a.classes), *(("--unlabeled", u) for u in a.unlabeled)):
        if v and storage.is_remote(v):  # (a synthetic --videos-dir made ./s3:/... here, then failed in the encoder)
            bad(f"{flag} {v}: videos and lists are read from local files (on a cluster, a folder every node "
                "mounts); only --out may be a URI")
    parsed = []
    for spec in a.annotations:
        split, _, path = spec.partition("=")
        if split.strip().lower() not in ANNOTATION_SPLITS:  # no SPLIT=: the whole text is the path (it may hold '=')
            split, path = "", spec
        path = os.path.expanduser(path)
        if not os.path.isabs(path) and a.root and not os.path.exists(path):
            path = os.path.join(a.root, path)
        if not os.path.isfile(path):
            bad(f"--annotations {spec}: no such file" + (" (SPLIT= must be train, val or test)" if "=" in spec and not split
                                                          else ""))
        parsed.append((split.strip().lower() or None, path))
    a.annotations = parsed
    for u in a.unlabeled:
        if not os.path.exists(u):
            bad(f"--unlabeled {u}: no such folder or list file")
        if a.dataset in ("folder", "ucf50") and a.root and os.path.isdir(u) and _in_a_class_folder(u, a.root, a.dataset):
            # every sub-folder of such a root is a class: the pool would be trained on as one
            bad(f"--unlabeled {u} is inside --root {a.root}, whose every folder is a class: keep the unlabelled "
                "videos outside the dataset's folder")
    # flags a layout never reads: accepted and ignored (--test-fraction was even recorded in dataset.json)
    used = {"--annotations": ("kinetics", "ssv2", "dvfl-csv"), "--classes": ("kinetics", "ssv2", "dvfl-csv"),
            "--num-classes": ("dvfl-csv",), "--test-fraction": ("folder",), "--val-fraction": ("folder",),
            "--lists-dir": ("ucf101", "hmdb51", "synthetic")}
    given = {"--annotations": a.annotations, "--classes": a.classes, "--num-classes": a.num_classes,
             "--test-fraction": a.test_fraction, "--val-fraction": a.val_fraction, "--lists-dir": a.lists_dir}
    for flag, datasets in used.items():
        if given[flag] and a.dataset not in datasets:
            bad(f"{flag} is not used by --dataset {a.dataset} (only by {', '.join(datasets)}): leave it out")
    if a.videos_dir and a.dataset in ("dvfl-csv", "folder", "ucf50"):  # else every entry would be "missing"
        bad(f"--videos-dir is not used by --dataset {a.dataset}: its videos are found under --root")
    for flag, v in (("--classes", a.classes), ("--lists-dir", a.lists_dir), ("--videos-dir", a.videos_dir)):
        if v and a.dataset != "synthetic" and not os.path.exists(v):
            bad(f"{flag} {v}: not found")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        bad(f"--out {a.out} exists and is not a directory")

    if storage.is_remote(a.out):
        why = storage.reachable(a.out)
        if why:
            bad(f"--out {why}")
        if a.dataset == "synthetic" and not a.videos_dir:
            bad("--videos-dir is required with a URI --out: the generated videos are decoded from a local folder")
    elif a.dataset in ("folder", "ucf50"):  # layouts whose every sub-folder is a class
        # the next run would read the ingest's own folder as one more class
        if a.root and storage.same_or_inside(a.out, a.root):
            bad(f"--out {a.out} is inside --root {a.root}: write the clips outside the dataset's folder")


def video_folders(m, a: argparse.Namespace) -> dict:
    """The folders the decode tasks read videos from, by the flag that gave them."""
    folders = {}
    labelled = {e.root for e in m.entries if e.root and e.split != "unlabeled"}
    for root in sorted({e.root for e in m.entries if e.root}):
        # (a dataset's videos may sit below --root: /data/UCF101/UCF-101 is still --root's)
        flag = "--videos-dir" if root == a.videos_dir else "--root" if root == a.root or root in labelled else "--unlabeled"
        folders[flag if flag not in folders else f"{flag} #{len(folders) + 1}"] = root
    return folders


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    absolute_path_args(a, inputs=("root", "videos_dir", "lists_dir", "classes", "unlabeled"), outputs=("out",))
    validate(p, a)
    from dvfl.locks import FolderBusyError, folder_lock

    log = print
    # Ctrl+C before --fresh has deleted the earlier ingest: the rerun needs --fresh again (without it,
    # refused: another fingerprint); after it, the rerun resumes without it (dvfl.cli.run_command)
    a.fresh_done = not a.fresh
    try:  # taken before videos are generated or Ray starts: a run reading these clips refuses it now
        with folder_lock(a.out, "ingest", wait=True, log=log):
            return ingest_locked(a, log)
    except FolderBusyError as e:
        if a.fresh or not e.readers:
            print(f"error: {e}", file=sys.stderr)
            return 1
    # read by other commands: an ingest with nothing to write (these inputs and settings, finished) ends
    # as finished, anything else is refused by dvfl.data.ingest.ingest (it was refused here, unplanned)
    try:
        return ingest_locked(a, log)
    except FolderBusyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def ingest_locked(a: argparse.Namespace, log) -> int:
    """The command's work, ``--out``'s lock held."""
    from dvfl.data.adapters import AdapterError, build_manifest, unlabeled
    from dvfl.data.ingest import IngestConfig, NothingWrittenError, ingest, ray_session
    from dvfl.runtime import RayAddressError

    short_side = a.short_side
    if a.dataset == "synthetic":
        from dvfl.data.synthetic import SyntheticConfig, VideoFolderError, generate

        vdir = a.videos_dir or os.path.join(a.out, "videos")
        scfg = SyntheticConfig(num_classes=a.synthetic_classes, train_per_class=a.train_per_class,
                               test_per_class=a.test_per_class, unlabeled_videos=a.unlabeled_videos,
                               frames=a.video_frames, size=a.video_size, seed=a.seed,
                               # (the default 8 degrees would blur neighbouring directions past 22 classes: refused)
                               angle_jitter_deg=min(8.0, 180 / a.synthetic_classes))
        try:
            g = generate(vdir, scfg, workers=a.gen_processes, overwrite=a.fresh, log=log)
        except VideoFolderError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a read-only or full --out: one line, as for the ingest below
            print(f"error: generating videos in {vdir} failed: {os_error_line(e)}", file=sys.stderr)
            return 1
        log(f"[synthetic] {g['videos']} videos ({g['generated']} new) in {g['seconds']:.1f} s, "
            f"{g['bytes'] / 2 ** 20:.1f} MiB -> {vdir}")
        root = vdir
        if short_side is None:
            short_side = a.video_size
        if g["unlabeled_dir"] and g["unlabeled_dir"] not in a.unlabeled:
            a.unlabeled.append(g["unlabeled_dir"])
    else:
        root = a.root
    if short_side is None:
        short_side = 128
    # (two walks and a stat per file: ~20 s for Kinetics-400 on a local disk, minutes on NFS)
    log(f"[ingest] listing the {a.dataset} videos under {root}" + (f" and {len(a.unlabeled)} unlabelled source(s)"
                                                                   if a.unlabeled else ""))
    try:
        m = build_manifest(a.dataset, root, a.split, annotations=a.annotations or None, lists_dir=a.lists_dir,
                           videos_dir=a.videos_dir if a.dataset != "synthetic" else None,
                           classes_file=a.classes, num_classes=a.num_classes, test_fraction=a.test_fraction,
                           val_fraction=a.val_fraction)
        if a.dataset == "synthetic":  # (a run given these clips says what its data.synthetic changes)
            m.source["generator"] = scfg.as_dict()
        for pool, u in enumerate(a.unlabeled):
            m.extend(unlabeled(u, pool))
            m.source.setdefault("unlabeled", []).append(os.path.abspath(u))
    except (AdapterError, OSError) as e:  # OSError: a list or annotation file it may not read
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in m.notes:  # (folders that are not classes, classes a split drew no video of)
        log(f"[ingest] note: {note}")
    # one decode task more than cores in flight on a local instance fills the gaps Ray Data leaves
    # between tasks (dvfl.data.ingest.plan_decode_tasks); a cluster gets one per logical CPU
    local = not joined_address(a.address)
    decode_tasks = a.decode_tasks or (a.num_cpus or usable_cpus() + 1 if local else None)
    cfg = IngestConfig(out=a.out, frames=a.frames, clips_per_video=a.clips_per_video, eval_clips=a.eval_clips,
                       short_side=short_side, seed=a.seed, min_frames=a.min_frames,
                       timeout_per_file=a.timeout_per_file, videos_per_shard=a.videos_per_shard,
                       workers=decode_tasks, task_mb=a.task_mb, videos_per_task=a.videos_per_task,
                       overwrite=a.fresh, replace_uncommitted=True, progress=not a.quiet,
                       ray_progress=a.ray_progress,
                       # test-only: honour the DVFL-TEST-HANG/CRASH magic files (tests/test_ingest_cli.py)
                       test_hooks=os.environ.get("DVFL_INGEST_TEST_HOOKS") == "1")
    try:
        with ray_session(a.address, a.num_cpus, a.object_store_mb, log=log):
            from dvfl.cli import paths_on_every_node

            if not paths_on_every_node({"--out": a.out}, video_folders(m, a)):
                return 2
            ingest(m, cfg, log=log, fresh_done=lambda: setattr(a, "fresh_done", True))
    except NothingWrittenError as e:  # nothing to train on is a failure, not a finished ingest
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RayAddressError as e:  # (an OSError: the address to join, not the disk)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, quota, permissions: finished shards stay, a rerun resumes
        print(f"error: writing to {a.out} failed: {os_error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a decode task's error the user can act on, through Ray Data's wrappers
        from dvfl.cli import actionable_failure

        known = actionable_failure(e)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        return 1
    return 0
