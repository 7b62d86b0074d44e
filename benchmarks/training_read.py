#!/usr/bin/env python
"""Training read of a split too big to hold in the object store (session 38): writes
benchmarks/results/training_read.json and prints a table.

Above ``materialize_below_mb`` a run streams its training shards. Until session 38 it ordered them
with Ray Data's ``randomize_block_order``, an all-to-all step: every epoch read the whole split into
the object store (spilling what did not fit) before its first batch. Now the read itself takes the
files in a seeded order drawn anew each epoch (``FileShuffleConfig``). Both variants read the same
UCF-like clips (H.264 320x240 videos, short side 128, 8 frames, 2 clips per video: ~0.5 MB a clip)
through a local Ray whose object store is smaller than the split (and one larger), interleaved over ``--repeats``
rounds, as the training loop iterates them (batches of 16, a 256-clip local shuffle buffer): time
to the first batch, time for the epoch, and what Ray spilled to disk meanwhile.

Usage: python benchmarks/training_read.py [--videos N] [--repeats R] [--object-store-mb M [M ...]] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import platform
import re
import shutil
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != _HERE]
sys.path.insert(0, REPO)

RESULTS = os.path.join(_HERE, "results", "training_read.json")


def spilled_mib() -> float:
    """MiB Ray has spilled to disk so far (its memory summary's line; 0 when it has spilled nothing)."""
    from ray._private.internal_api import memory_summary

    m = re.search(r"Spilled (\d+) MiB", memory_summary(stats_only=True))
    return float(m.group(1)) if m else 0.0


def epoch(ds) -> dict:
    started, first, clips = time.perf_counter(), None, 0
    for batch in ds.iter_batches(batch_size=16, batch_format="pyarrow", local_shuffle_buffer_size=256,
                                 local_shuffle_seed=0):
        if first is None:
            first = time.perf_counter() - started
        clips += batch.num_rows
    return {"first_batch_s": round(first, 3), "epoch_s": round(time.perf_counter() - started, 3), "clips": clips}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    # smaller than the split (it spills), and larger
    ap.add_argument("--object-store-mb", type=int, nargs="+", default=[160, 1000])
    # a real split has hundreds of shards (UCF101's 80 GB: ~600 of 128 MB); 8 videos a shard gives this
    # small split 40, so that reading "all of them first" and "one at a time" differ as they do there
    ap.add_argument("--videos-per-shard", type=int, default=8)
    ap.add_argument("--work", help="scratch folder, kept (default: a temporary folder, removed at exit)")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="dvfl-training-read-")
    try:
        run(a, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def run(a, work: str) -> None:
    import ray

    from benchmarks.input_pipeline import make_ucf_like
    from benchmarks.machine import cpu_model
    from dvfl.data import adapters as A
    from dvfl.data.ingest import IngestConfig, ingest, ray_session
    from dvfl.data.shards import read_clip_dataset, shard_paths
    from dvfl.train.launch import TRAIN_COLUMNS, _files_shuffled_per_epoch, quiet_data_progress

    videos, clips = os.path.join(work, "videos"), os.path.join(work, "clips")
    print(f"[bench] {a.videos} UCF-like videos -> {clips}", flush=True)
    make_ucf_like(videos, a.videos)
    if not os.path.exists(os.path.join(clips, "dataset.json")):
        m = A.folder(videos)
        m.entries = [e for e in m.entries if e.split == "train"] or m.entries
        with ray_session(num_cpus=3, log=None):  # (the ingest CLI's default: cores + 1)
            ingest(m, IngestConfig(out=clips, frames=8, clips_per_video=2, short_side=128, progress=False,
                                   videos_per_shard=a.videos_per_shard), log=None)
    split_mb = sum(os.path.getsize(p) for p in shard_paths(clips, ["train"])) / 2**20
    variants = {
        "randomize_block_order (before)":
            lambda: read_clip_dataset(clips, ["train"], columns=TRAIN_COLUMNS).randomize_block_order(seed=0),
        "files shuffled per epoch (now)":
            lambda: read_clip_dataset(clips, ["train"], columns=TRAIN_COLUMNS, shuffle=_files_shuffled_per_epoch(0)),
    }
    names = list(variants)
    res = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
           "loadavg_at_start": os.getloadavg(), "videos": a.videos,
           "train_split_mb": round(split_mb, 1), "train_shards": len(shard_paths(clips, ["train"])),
           "repeats": a.repeats, "stores": {}}
    for store in a.object_store_mb:
        ray.init(num_cpus=2, object_store_memory=store * 2**20, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
        try:
            quiet_data_progress()
            rounds = []
            for r in range(a.repeats):
                row = {}
                for name, make in variants.items():
                    before = spilled_mib()
                    row[name] = {**epoch(make()), "spilled_mib": spilled_mib() - before}
                    print(f"[bench] store {store} MB, round {r + 1}: {name}: {row[name]}", flush=True)
                rounds.append(row)
        finally:
            ray.shutdown()
        median = {n: {k: statistics.median(r[n][k] for r in rounds)
                      for k in ("first_batch_s", "epoch_s", "spilled_mib")} for n in names}
        before, now = (median[n] for n in names)
        res["stores"][str(store)] = {
            "rounds": rounds, "median": median, "clips": rounds[0][names[0]]["clips"],
            "first_batch_before_over_now": round(before["first_batch_s"] / now["first_batch_s"], 2),
            "epoch_before_over_now": round(before["epoch_s"] / now["epoch_s"], 2)}
    res["loadavg_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\ntraining split {split_mb:.0f} MB in {res['train_shards']} shards, {a.repeats} interleaved rounds "
          f"(median [min-max]), {res['cpu']}")
    print("| object store | read | first batch (s) | epoch (s) | spilled (MiB) |\n|---|---|---|---|---|")
    for store, st in res["stores"].items():
        for n in names:
            cells = []
            for k in ("first_batch_s", "epoch_s", "spilled_mib"):
                v = sorted(r[n][k] for r in st["rounds"])
                cells.append(f"{st['median'][n][k]:g} [{v[0]:g}-{v[-1]:g}]")
            print(f"| {store} MB | {n} | " + " | ".join(cells) + " |")
        print(f"| {store} MB | before / now | {st['first_batch_before_over_now']}x | {st['epoch_before_over_now']}x | |")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
