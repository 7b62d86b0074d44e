#!/usr/bin/env python
"""Benchmark: what the teacher-logit cache costs and what it saves.

Measured in one run, side by side:
  * cache build rate (clip views/s) through Ray Data on the embedded-default teacher;
  * bytes per cached view on disk, fp16 vs fp32 (same clips, same teacher);
  * the teacher's forward cost per clip vs the student's training-step cost per clip, for the
    embedded default (32x32) and for the paper's pair (Video-FocalNet-B vs nano, 8x112^2,
    101 classes): the work the cache removes from every KD step of every epoch and trial.

  * the driver's peak RSS during a cache build (``pipelines/cache_teacher.py`` as a child process,
    peak from ``wait4``) on a dataset and on one 10x larger: it must stay flat, since the driver
    only reads the few clips it verifies.

Writes benchmarks/results/teacher_cache.json (or --out) and prints a table.
    python benchmarks/teacher_cache.py [--videos-per-class 16] [--repeats 3] [--rss-videos-per-class 2] [--out PATH]
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.machine import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "teacher_cache.json"


def time_per_clip(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / batch


def teacher_vs_student(teacher_name, teacher_kw, student_name, student_kw, shape, repeats) -> dict:
    import timm

    import dvfl.models  # noqa: F401

    x = torch.randn(*shape)
    y = torch.randint(0, teacher_kw["num_classes"], (shape[0],))
    teacher = timm.create_model(teacher_name, **teacher_kw).eval()
    student = timm.create_model(student_name, **student_kw).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def teacher_forward():
        with torch.inference_mode():
            teacher(x)

    def student_step():
        loss = torch.nn.functional.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_fwd = time_per_clip(teacher_forward, shape[0], repeats)
    s_step = time_per_clip(student_step, shape[0], repeats)
    return {"teacher": teacher_name, "teacher_kwargs": teacher_kw, "student": student_name, "student_kwargs": student_kw,
            "input": list(shape), "teacher_forward_s_per_clip": t_fwd, "student_step_s_per_clip": s_step,
            "teacher_over_student_step": t_fwd / s_step,
            "online_kd_step_over_cached": (t_fwd + s_step) / s_step}


def cache_build_peak_rss(clips_dir: str, teacher_dir: str, out: Path, crop_size: int, address: str) -> dict:
    """Peak RSS of a cache build's driver process (the Ray workers are the cluster's)."""
    import subprocess

    cmd = [sys.executable, str(ROOT / "pipelines" / "cache_teacher.py"), "--clips", clips_dir, "--teacher",
           teacher_dir, "--out", str(out), "--crop-size", str(crop_size), "--verify", "32"]
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": address},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"cache build failed: {proc.stderr.read().decode()[-2000:]}")
    return {"driver_peak_rss_mb": usage.ru_maxrss / 1024}


def _print_cache_tables(results: dict) -> None:
    c = results["cache"]
    print(f"\nTeacher-logit cache ({c['num_classes']} classes, {c['float16']['rows']} clip views, "
          f"{results['machine']['cpus']} CPU cores)")
    print("| measure | fp16 | fp32 |\n|---|---:|---:|")
    print(f"| build rate (views/s, incl. Ray start-up of the actor) | {c['float16']['views_per_s']:.0f} | {c['float32']['views_per_s']:.0f} |")
    print(f"| bytes per cached view on disk (Parquet, zstd) | {c['float16']['bytes_per_view']:.0f} | {c['float32']['bytes_per_view']:.0f} |")
    print(f"| raw logit bytes per view | {c['float16']['raw_logit_bytes_per_view']} | {c['float32']['raw_logit_bytes_per_view']} |")
    print("\n| pair | input | teacher fwd ms/clip | student step ms/clip | teacher/step | online KD step / cached |")
    print("|---|---|---:|---:|---:|---:|")
    for key in ("embedded_pair", "paper_pair_112"):
        r = results[key]
        print(f"| {r['teacher']} -> {r['student']} | {'x'.join(map(str, r['input'][1:]))} | "
              f"{r['teacher_forward_s_per_clip'] * 1e3:.1f} | {r['student_step_s_per_clip'] * 1e3:.1f} | "
              f"{r['teacher_over_student_step']:.2f}x | {r['online_kd_step_over_cached']:.2f}x |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos-per-class", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", help="keep the generated data here (default: a temp dir)")
    p.add_argument("--rss-videos-per-class", type=int, default=2,
                   help="driver-RSS check: this many training videos per class, then 10x as many")
    p.add_argument("--rss-short-side", type=int, default=128,
                   help="driver-RSS check: stored clip size (large clips make any whole-dataset read show)")
    p.add_argument("--only-rss", action="store_true",
                   help="run only the driver-RSS check and update that part of the results file")
    p.add_argument("--out", default=str(RESULTS), help="the results file (default: %(default)s)")
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    from dvfl import pipeline
    from dvfl.artifacts import save_model
    from dvfl.models import build_model
    from dvfl.config import load_config
    from dvfl.runtime import ray_runtime
    from dvfl.teacher_cache import build_teacher_cache

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="dvfl-bench-cache-"))
    if not a.work_dir:  # our own scratch: gone at exit
        atexit.register(shutil.rmtree, work, True)
    cfg = load_config(None, [("output_dir", str(work)), ("data.synthetic.train_per_class", a.videos_per_class),
                             ("data.synthetic.unlabeled_videos", 0), ("students", None), ("data.synthetic.val_per_class", 0),
                             ("data.synthetic.test_per_class", max(1, a.videos_per_class // 4))])
    rss_cfgs = {n: load_config(None, [("output_dir", str(work / f"rss_{n}")), ("data.synthetic.train_per_class", n),
                                      ("data.synthetic.unlabeled_videos", 0), ("students", None), ("data.synthetic.val_per_class", 0),
                                      ("data.short_side", a.rss_short_side),
                                      ("data.crop_size", 32), ("data.synthetic.test_per_class", max(1, n // 4))])
                for n in (a.rss_videos_per_class, 10 * a.rss_videos_per_class)}
    if a.only_rss:  # the small RSS dataset stands in for the main one (teacher shape, classes)
        cfg = rss_cfgs[a.rss_videos_per_class]
    for c in {cfg.output_dir: cfg, **{c.output_dir: c for c in rss_cfgs.values()}}.values():
        pipeline.ensure_videos(c, log=None)  # before Ray starts: the CPUs are the generator's alone
    results: dict = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "device": "cpu", "torch": torch.__version__, "loadavg_at_start": os.getloadavg()}}
    with ray_runtime():
        info = pipeline.ensure_clips(cfg, log=lambda *_: None)
        num_classes = len(info["classes"])
        kwargs = pipeline.model_kwargs(cfg.teacher.train, num_classes, cfg)
        teacher_dir = work / "teacher"
        # an untrained teacher costs the same to run as a trained one
        save_model(teacher_dir, build_model(cfg.teacher.train.model, **kwargs), cfg.teacher.train.model, kwargs)
        sizes = {}
        for dtype in () if a.only_rss else ("float16", "float32"):
            out = work / f"cache_{dtype}"
            started = time.perf_counter()
            meta = build_teacher_cache(cfg.clips_dir, str(teacher_dir), str(out), dtype=dtype, log=lambda *_: None)
            wall = time.perf_counter() - started
            files = list((out / "logits").glob("*.parquet"))
            size = sum(f.stat().st_size for f in files)
            sizes[dtype] = {"rows": meta["rows"], "bytes_on_disk": size, "bytes_per_view": size / meta["rows"],
                            "raw_logit_bytes_per_view": num_classes * (2 if dtype == "float16" else 4),
                            "build_wall_s": wall, "views_per_s": meta["rows"] / wall}
        rss = {}
        address = __import__("ray").get_runtime_context().gcs_address
        for n, c in rss_cfgs.items():
            rinfo = pipeline.ensure_clips(c, log=lambda *_: None)
            shards = list(Path(c.clips_dir, "shards").glob("*.parquet"))
            rss[n] = {"videos_per_class": n, "clips": rinfo["clips"], "short_side": a.rss_short_side,
                      "shard_mb": sum(f.stat().st_size for f in shards) / 2 ** 20,
                      **cache_build_peak_rss(c.clips_dir, str(teacher_dir), work / f"rss_cache_{n}", 32, address)}
        small, large = rss.values()
        results["driver_rss"] = {"sizes": list(rss.values()),
                                 "peak_rss_growth_mb": large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"],
                                 "shard_growth_mb": large["shard_mb"] - small["shard_mb"]}
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out_path = Path(a.out)
    if a.only_rss:
        previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
        # the rest of the file (and its "machine") is the previous run's: record this run's machine
        # next to the numbers it measured
        results = {**previous, "driver_rss": results["driver_rss"], "driver_rss_machine": results["machine"]}
        results.setdefault("machine", results["driver_rss_machine"])
    else:
        results["cache"] = {"teacher": cfg.teacher.train.model, "teacher_kwargs": kwargs, "num_classes": num_classes,
                            **sizes, "fp32_over_fp16_bytes": sizes["float32"]["bytes_per_view"] / sizes["float16"]["bytes_per_view"]}
        student_kw = pipeline.model_kwargs(cfg.student, num_classes, cfg)
        results["embedded_pair"] = teacher_vs_student(cfg.teacher.train.model, kwargs, cfg.student.model, student_kw,
                                                      (16, 8, 3, 32, 32), a.repeats)
        paper_kw = {"num_classes": 101, "num_frames": 8, "img_size": 112}
        results["paper_pair_112"] = teacher_vs_student("videofocalnet_base", paper_kw, "videofocalnet_nano", paper_kw,
                                                       (2, 8, 3, 112, 112), a.repeats)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")

    c = results.get("cache")
    if c:
        _print_cache_tables(results)
    r = results["driver_rss"]
    print("\n| cache build driver | clips | shards on disk | driver peak RSS |\n|---|---:|---:|---:|")
    for row in r["sizes"]:
        print(f"| {row['videos_per_class']} videos/class at {row['short_side']}px | {row['clips']} | "
              f"{row['shard_mb']:.0f} MiB | {row['driver_peak_rss_mb']:.0f} MiB |")
    print(f"10x the data: shards +{r['shard_growth_mb']:.0f} MiB, driver peak RSS {r['peak_rss_growth_mb']:+.0f} MiB")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
