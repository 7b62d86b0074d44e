#!/usr/bin/env python
"""Benchmark: epoch time of plain CE training vs cached KD vs online KD (teacher in the loop).

All three run the same shared Ray Train loop on the same clip shards, in one process, interleaved:
every repeat runs CE, cached KD and online KD once each (one epoch of --steps steps per worker;
the order rotates between repeats), so that a background load slows all three alike. The epoch
time is the loop's own (Ray Train start-up and validation excluded). Reported per run: median
and min-max over the repeats; per repeat the ratios cached/CE and online/cached, with their
median and min-max. The loop also logs, per epoch, the share of time spent waiting for input
batches (data_wait_fraction) and for the teacher's logits (teacher_fraction: the cache lookup or
the teacher's forward). Default pair: the paper's Video-FocalNet-B teacher (untrained: timing
only) and the nano student at 8x112x112, batch 4 (the paper-path config trains at 16 per worker;
4 keeps an online epoch of 50 steps to ~3 minutes on 2 cores), 50 steps per epoch, 1 worker.

Writes benchmarks/results/distill_cost.json (with the load average and the CPU model) and
prints a table. Wall time: about 21 minutes on a 2-core Xeon with the defaults (the cache build
~4 min, then ~5.5 min per repeat, the online runs most of it); no repeat is started after
--max-seconds.
    python benchmarks/distill_cost.py [--size 112] [--steps 50] [--repeats 3] [--batch-size 4]
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "distill_cost.json"


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=112, help="frame size (short side = crop)")
    p.add_argument("--teacher", default="videofocalnet_base")
    p.add_argument("--student", default="videofocalnet_nano")
    p.add_argument("--steps", type=int, default=50, help="training steps per epoch per worker (at least)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three runs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=1200, help="start no repeat after this (>= 1 runs)")
    p.add_argument("--work-dir")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)

    import ray

    from dvfl import pipeline
    from dvfl.artifacts import load_model, save_model
    from dvfl.models import build_model
    from dvfl.config import KDSection, OptimSection, load_config
    from dvfl.runtime import ray_runtime
    from dvfl.train.loop_config import LoopConfig, ModelSpec, TeacherFeed
    from dvfl.teacher_cache import TeacherLogitCache, build_teacher_cache
    from dvfl.train.launch import Scaling, load_final_state, run_training
    from benchmarks.train_step import cpu_info

    started = time.time()
    load_before = os.getloadavg()
    classes = 8
    # enough videos for --steps full batches after the 10 % validation hold-out (whole videos)
    per_class = math.ceil(a.steps * a.batch_size / classes / 0.85) + 1
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="dvfl-bench-distill-"))
    if not a.work_dir:  # our own scratch (videos, clips, cache, checkpoints): gone at exit
        atexit.register(shutil.rmtree, work, True)
    cfg = load_config(None, [("output_dir", str(work)), ("data.short_side", a.size), ("data.synthetic.unlabeled_videos", 0),
                             ("students", None), ("data.synthetic.size", a.size), ("data.synthetic.num_classes", classes),
                             ("data.synthetic.train_per_class", per_class), ("data.synthetic.test_per_class", 1),
                             ("data.synthetic.val_per_class", 0),
                             ("data.teacher_pool", 0.0), ("optim.batch_size", a.batch_size),
                             ("data.clips_per_video", 1), ("optim.epochs", 1)])
    pipeline.ensure_videos(cfg, log=None)
    cores = os.cpu_count() or 1
    scaling = Scaling(num_workers=1, use_gpu=False, cpus_per_worker=float(cores))
    runs = {"ce": [], "cached_kd": [], "online_kd": []}
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
        names = list(signals)
        for r in range(a.repeats):
            if r and time.time() - started > a.max_seconds:
                print(f"[bench] stopping after {r} repeat(s): --max-seconds {a.max_seconds:.0f} reached", flush=True)
                break
            for name in names[r % 3:] + names[:r % 3]:  # rotate who goes first
                loop = LoopConfig(seed=0, model=ModelSpec(a.student, kw), teacher=TeacherFeed.from_signal(signals[name]),
                                  kd=KDSection(alpha=0.7, temperature=4.0),
                                  # the loop's default speed options (optim.fused etc.) apply
                                  optim=OptimSection(epochs=1, batch_size=a.batch_size, lr=1e-4, weight_decay=0.05,
                                                     warmup_frac=0.0, clip_grad=1.0),
                                  crop_size=a.size, flip=False)
                result = run_training(loop, clips_dir=cfg.clips_dir, scaling=scaling,
                                      name=f"bench-{name}-{time.time_ns()}",
                                      storage_path=str(work / "ray_results"), max_failures=0)
                h = load_final_state(result)["history"][-1]
                runs[name].append(h)
                print(f"[bench] repeat {r + 1} {name}: {h['epoch_seconds']:.2f} s, {h['steps']} steps, "
                      f"data wait {h['data_wait_fraction']:.1%}"
                      + (f", teacher {h['teacher_fraction']:.1%}" if "teacher_fraction" in h else ""), flush=True)
    n = min(len(v) for v in runs.values())
    sec = {k: [h["epoch_seconds"] for h in v[:n]] for k, v in runs.items()}
    cached_ce = [c / e for c, e in zip(sec["cached_kd"], sec["ce"])]
    online_cached = [o / c for o, c in zip(sec["online_kd"], sec["cached_kd"])]
    results = {
        "teacher": a.teacher, "student": a.student, "input": [cfg.data.frames, 3, a.size, a.size],
        "num_classes": kw["num_classes"], "batch_size": a.batch_size, "workers": 1, "torch_threads": cores,
        "device": "cpu", "cpu": cpu_info(), "load_before": load_before, "load_after": os.getloadavg(),
        "steps_per_epoch": runs["ce"][0]["steps"], "repeats": n, "cache_build_s": cache_build,
        "runs": {k: {"epoch_seconds": spread(v),
                     "data_wait_fraction": spread([h["data_wait_fraction"] for h in runs[k][:n]]),
                     **({"teacher_fraction": spread([h["teacher_fraction"] for h in runs[k][:n]])}
                        if "teacher_fraction" in runs[k][0] else {})} for k, v in sec.items()},
        "cached_over_ce_per_repeat": spread(cached_ce),
        "online_over_cached_per_repeat": spread(online_cached),
        "cached_over_ce": statistics.median(sec["cached_kd"]) / statistics.median(sec["ce"]),
        "online_over_cached": statistics.median(sec["online_kd"]) / statistics.median(sec["cached_kd"]),
        # the loop that reads clips and logits (CE, cached KD); the online runs wait on their teacher, not data
        "data_wait_fraction": statistics.median(h["data_wait_fraction"] for k in ("ce", "cached_kd")
                                                for h in runs[k][:n]),
        "targets": {"cached_over_ce_max": 1.03, "online_over_cached_min": 3.5, "steps_per_epoch_min": 50},
        "wall_seconds": time.time() - started,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(results, indent=2) + "\n")
    os.replace(out.with_suffix(".tmp"), out)
    print(f"\nDistillation cost per epoch ({a.teacher} -> {a.student}, 8x{a.size}x{a.size}, batch {a.batch_size}, "
          f"{results['steps_per_epoch']} steps, 1 worker x {cores} threads, CPU, {n} interleaved repeats; "
          f"load {load_before[0]:.1f} -> {results['load_after'][0]:.1f})")
    print("| run | epoch s, median (min-max) | data wait | teacher |\n|---|---:|---:|---:|")
    for name, label in (("ce", "plain CE (no teacher)"), ("cached_kd", "KD from the cache"),
                        ("online_kd", "KD, teacher in the loop")):
        r = results["runs"][name]
        e = r["epoch_seconds"]
        t = r.get("teacher_fraction", {}).get("median")
        print(f"| {label} | {e['median']:.1f} ({e['min']:.1f}-{e['max']:.1f}) | {r['data_wait_fraction']['median']:.1%} | "
              + (f"{t:.1%}" if t is not None else "-") + " |")
    c, o = results["cached_over_ce_per_repeat"], results["online_over_cached_per_repeat"]
    print(f"\ncached / CE = {results['cached_over_ce']:.3f} (per repeat {c['min']:.3f}-{c['max']:.3f}; target <= 1.03); "
          f"online / cached = {results['online_over_cached']:.2f} (per repeat {o['min']:.2f}-{o['max']:.2f}; target >= 3.5)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
