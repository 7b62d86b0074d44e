#!/usr/bin/env python
"""Benchmark: epoch time of plain CE training vs cached KD vs online KD (teacher in the loop).

All three run the same shared Ray Train loop on the same clip shards, one after the other in
one process; the epoch time is the loop's own per-epoch wall time (Ray Train start-up excluded),
taken from the last epoch so that warm-up is not counted. Default pair: the paper's
Video-FocalNet-B teacher and the nano student at 8x112x112.

Writes benchmarks/results/distill_cost.json and prints a table.
    python benchmarks/distill_cost.py [--size 112] [--teacher videofocalnet_base] [--videos-per-class 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "distill_cost.json"


def pipeline_count(cfg) -> int:
    from dvfl.train.launch import count_rows

    return count_rows(cfg.clips_dir, [cfg.data.train_split])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=112, help="frame size (short side = crop)")
    p.add_argument("--teacher", default="videofocalnet_base")
    p.add_argument("--student", default="videofocalnet_nano")
    p.add_argument("--videos-per-class", type=int, default=1, help="synthetic train videos per class (8 classes)")
    p.add_argument("--clips-per-video", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--work-dir")
    a = p.parse_args(argv)

    import ray

    from dvfl import pipeline
    from dvfl.artifacts import build_model, load_model, save_model
    from dvfl.config import load_config
    from dvfl.runtime import ray_runtime
    from dvfl.teacher_cache import TeacherLogitCache, build_teacher_cache
    from dvfl.train.launch import Scaling, load_final_state, run_training

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="dvfl-bench-distill-"))
    cfg = load_config(None, [("output_dir", str(work)), ("data.short_side", a.size), ("data.synthetic.unlabeled_videos", 0),
                             ("data.synthetic.size", a.size), ("data.synthetic.train_per_class", a.videos_per_class),
                             ("data.synthetic.test_per_class", 1), ("optim.batch_size", a.batch_size),
                             ("data.clips_per_video", a.clips_per_video),
                             ("optim.epochs", a.epochs)])
    pipeline.ensure_videos(cfg, log=None)
    cores = os.cpu_count() or 1
    scaling = Scaling(num_workers=1, use_gpu=False, cpus_per_worker=float(cores))
    rows = {}
    with ray_runtime(num_cpus=cores * 2):
        info = pipeline.ensure_clips(cfg, log=lambda *_: None)
        # heads sized for the dataset's classes: a 768 x C linear layer is noise next to the
        # backbone, so the cost ratios hold for 101 classes too
        kw = {"num_classes": len(info["classes"]), "num_frames": cfg.data.frames, "img_size": a.size}
        teacher_dir = work / "teacher"
        save_model(teacher_dir, build_model(a.teacher, **kw), a.teacher, kw)  # timing only: untrained
        cache_dir = work / "cache"
        t = time.perf_counter()
        build_teacher_cache(cfg.clips_dir, str(teacher_dir), str(cache_dir), log=lambda *_: None)
        cache_build = time.perf_counter() - t
        cache = TeacherLogitCache(cache_dir)
        teacher_model, _ = load_model(teacher_dir)
        signals = {
            "ce": {"mode": "none"},
            "cached_kd": {"mode": "cached", "views": ["center"], "cache_ref": [ray.put(cache.packed())]},
            "online_kd": {"mode": "online", "views": ["center"], "spec": {"name": a.teacher, "kwargs": kw},
                          "state_ref": [ray.put(teacher_model.state_dict())]},
        }
        for name, signal in signals.items():
            loop = {"seed": 0, "model": {"name": a.student, "kwargs": kw}, "teacher": signal,
                    "kd": {"alpha": 0.7, "temperature": 4.0},
                    "optim": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": 1e-4, "weight_decay": 0.05,
                              "warmup_frac": 0.0, "clip_grad": 1.0},
                    "crop_size": a.size, "flip": False, "tensorboard_dir": None}
            result = run_training(loop, clips_dir=cfg.clips_dir, scaling=scaling, name=f"bench-{name}-{time.time_ns()}",
                                  storage_path=str(work / "ray_results"), max_failures=0)
            history = load_final_state(result)["history"]
            rows[name] = {"epoch_seconds": [h["epoch_seconds"] for h in history],
                          "last_epoch_s": history[-1]["epoch_seconds"]}
            print(f"[bench] {name}: epoch seconds {[round(h['epoch_seconds'], 2) for h in history]}", flush=True)
    results = {
        "teacher": a.teacher, "student": a.student, "input": [cfg.data.frames, 3, a.size, a.size],
        "num_classes": kw["num_classes"], "batch_size": a.batch_size, "workers": 1, "torch_threads": cores,
        "device": "cpu", "train_clips": pipeline_count(cfg), "cache_build_s": cache_build, "runs": rows,
        "cached_over_ce": rows["cached_kd"]["last_epoch_s"] / rows["ce"]["last_epoch_s"],
        "online_over_cached": rows["online_kd"]["last_epoch_s"] / rows["cached_kd"]["last_epoch_s"],
        "targets": {"cached_over_ce_max": 1.05, "online_over_cached_min": 3.5},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nDistillation cost per epoch ({a.teacher} -> {a.student}, 8x{a.size}x{a.size}, batch {a.batch_size}, "
          f"1 worker x {cores} threads, CPU)")
    print("| run | epoch time (s) | vs plain CE |\n|---|---:|---:|")
    for name, label in (("ce", "plain CE (no teacher)"), ("cached_kd", "KD from the cache"),
                        ("online_kd", "KD, teacher in the loop")):
        r = rows[name]
        print(f"| {label} | {r['last_epoch_s']:.1f} | {r['last_epoch_s'] / rows['ce']['last_epoch_s']:.2f}x |")
    print(f"\ncached / CE = {results['cached_over_ce']:.3f} (target <= 1.05); "
          f"online / cached = {results['online_over_cached']:.2f} (target >= 3.5)")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
