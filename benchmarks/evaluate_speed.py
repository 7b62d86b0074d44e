#!/usr/bin/env python
"""Forward-only stages on a CPU (evaluation, the teacher-cache build, predict) with glibc's
allocator as it comes vs with freed memory kept (``dvfl.allocator.keep_freed_memory``, which
training already used): each run in a fresh process (glibc's dynamic thresholds untouched in the
default one), the two modes alternating, round after round.

    python benchmarks/evaluate_speed.py [--rounds 3] [--threads 1] [--out PATH]

Cases: the embedded default's student (width 16) and teacher (width 48) evaluating 320 stored
32x32 clips (``evaluate_multiview``, batch 32), and the nano at 8x112^2 (32 clips, batch 4) and
8x224^2 (8 clips, batch 1: what predict and serve run). Clips are random frames written as a real
shard folder under a temporary directory. Each process evaluates once untimed, then twice timed.
Writes ``benchmarks/results/evaluate_speed.json`` and prints a table (CPU seconds and page faults
of the timed evaluations; the ratio default / kept per round). A few minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import cpu_flags, cpu_model  # noqa: E402

RESULTS = os.path.join(_HERE, "results", "evaluate_speed.json")
# name: (model kwargs, clip side, clips, batch)
CASES = {
    "embedded student (width 16), 32^2": (dict(embed_dim=16, depths=[1, 1, 2, 1]), 32, 320, 32),
    "embedded teacher (width 48), 32^2": (dict(embed_dim=48, depths=[1, 1, 2, 1]), 32, 320, 32),
    "nano, 112^2": ({}, 112, 32, 4),
    "nano, 224^2": ({}, 224, 8, 1),
}


def write_clips(folder: str, side: int, n: int) -> None:
    """A shard folder of ``n`` test clips of 8 random ``side``x``side`` frames (what evaluation reads)."""
    from dvfl.data.shards import CLIP_SCHEMA, AtomicShardWriter

    rng = np.random.default_rng(0)
    rows = [dict(clip_id=f"test/v{i:05d}#u0", video_id=f"v{i}", path="p", label=i % 8, class_name=f"c{i % 8}",
                 split="test", view="uniform", view_index=0, frame_indices=list(range(8)), src_fps=25.0,
                 src_num_frames=100, num_frames=8, height=side, width=side,
                 frames=rng.integers(0, 255, (8, side, side, 3), dtype=np.uint8).tobytes()) for i in range(n)]
    os.makedirs(os.path.join(folder, "shards"), exist_ok=True)
    writer = AtomicShardWriter(os.path.join(folder, "shards", "test-00000.parquet"))
    writer.write(pa.Table.from_pylist(rows, schema=CLIP_SCHEMA))
    writer.commit()
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"fingerprint": "bench", "params": {"eval_clips": 1},
                   "shards": [{"file": "shards/test-00000.parquet", "split": "test"}]}, f)


def child(mode: str, case: str, folder: str, threads: int) -> dict:
    """One process's measurement (``--child``): the untimed first evaluation, then two timed."""
    from dvfl.train.evaluate import evaluate_multiview

    torch.set_num_threads(threads)
    if mode == "kept":
        from dvfl.allocator import keep_freed_memory

        keep_freed_memory()
    from dvfl.models import build_model, set_temporal_impl

    kwargs, side, _, batch = CASES[case]
    model = build_model("videofocalnet_nano", num_classes=8, num_frames=8, img_size=side, **kwargs)
    set_temporal_impl(model, "conv2d")
    evaluate_multiview(model, folder, "test", side, batch_size=batch, device="cpu")
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(2):
        evaluate_multiview(model, folder, "test", side, batch_size=batch, device="cpu")
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": round(time.perf_counter() - started, 3),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 3),
            "sys_s": round(after.ru_stime - before.ru_stime, 3), "page_faults": after.ru_minflt - before.ru_minflt}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CASE", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.threads)))
        return {}
    import subprocess

    res = {"machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": a.threads,
                       "torch": torch.__version__, "loadavg_at_start": os.getloadavg()},
           "rounds": a.rounds, "method": "each run in a fresh process; default: no allocator setting at all",
           "cases": {}}
    with tempfile.TemporaryDirectory(prefix="dvfl-bench-eval-") as tmp:
        for name, (kwargs, side, n, batch) in CASES.items():
            folder = os.path.join(tmp, f"{side}-{n}")
            if not os.path.exists(folder):
                write_clips(folder, side, n)
            runs = {"default": [], "kept": []}
            for _ in range(a.rounds):
                for mode in ("default", "kept"):
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--threads", str(a.threads),
                                          "--child", mode, name, folder], capture_output=True, text=True, check=True)
                    runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            ratios = [d["cpu_s"] / k["cpu_s"] for d, k in zip(runs["default"], runs["kept"])]
            res["cases"][name] = {"clips": n, "side": side, "batch": batch, "runs": runs,
                                  "cpu_default_over_kept": {"median": statistics.median(ratios),
                                                            "min": min(ratios), "max": max(ratios)}}
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(f"\nevaluation with glibc's allocator as it comes vs freed memory kept ({res['machine']['cpu']}, {a.threads} thread(s), "
          f"{a.rounds} interleaved rounds; medians)")
    print("| case | CPU s default | CPU s kept | default / kept (min-max) | page faults default | kept |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, c in res["cases"].items():
        med = {m: statistics.median(r["cpu_s"] for r in c["runs"][m]) for m in ("default", "kept")}
        faults = {m: statistics.median(r["page_faults"] for r in c["runs"][m]) for m in ("default", "kept")}
        q = c["cpu_default_over_kept"]
        print(f"| {name} | {med['default']:.2f} | {med['kept']:.2f} | {q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f}) "
              f"| {faults['default']:.0f} | {faults['kept']:.0f} |")
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
