#!/usr/bin/env python
"""Benchmark: what the teacher-logit cache costs and what it saves.

Measured in one run, side by side:
  * cache build rate (clip views/s) through Ray Data on the embedded-default teacher;
  * bytes per cached view on disk, fp16 vs fp32 (same clips, same teacher);
  * the teacher's forward cost per clip vs the student's training-step cost per clip, for the
    embedded default (32x32) and for the paper's pair (Video-FocalNet-B vs nano, 8x112^2,
    101 classes): the work the cache removes from every KD step of every epoch and trial.

Writes benchmarks/results/teacher_cache.json and prints a table.
    python benchmarks/teacher_cache.py [--videos-per-class 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

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

    import dvfl  # noqa: F401

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos-per-class", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", help="keep the generated data here (default: a temp dir)")
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    from dvfl import pipeline
    from dvfl.artifacts import build_model, save_model
    from dvfl.config import load_config
    from dvfl.runtime import ray_runtime
    from dvfl.teacher_cache import build_teacher_cache

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="dvfl-bench-cache-"))
    cfg = load_config(None, [("output_dir", str(work)), ("data.synthetic.train_per_class", a.videos_per_class),
                             ("data.synthetic.unlabeled_videos", 0),
                             ("data.synthetic.test_per_class", max(1, a.videos_per_class // 4))])
    pipeline.ensure_videos(cfg, log=None)
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "device": "cpu", "torch": torch.__version__}}
    with ray_runtime():
        info = pipeline.ensure_clips(cfg, log=lambda *_: None)
        num_classes = len(info["classes"])
        kwargs = pipeline.model_kwargs(cfg.teacher.train, num_classes, cfg)
        teacher_dir = work / "teacher"
        # an untrained teacher costs the same to run as a trained one
        save_model(teacher_dir, build_model(cfg.teacher.train.model, **kwargs), cfg.teacher.train.model, kwargs)
        sizes = {}
        for dtype in ("float16", "float32"):
            out = work / f"cache_{dtype}"
            started = time.perf_counter()
            meta = build_teacher_cache(cfg.clips_dir, str(teacher_dir), str(out), dtype=dtype, log=lambda *_: None)
            wall = time.perf_counter() - started
            files = list((out / "logits").glob("*.parquet"))
            size = sum(f.stat().st_size for f in files)
            sizes[dtype] = {"rows": meta["rows"], "bytes_on_disk": size, "bytes_per_view": size / meta["rows"],
                            "raw_logit_bytes_per_view": num_classes * (2 if dtype == "float16" else 4),
                            "build_wall_s": wall, "views_per_s": meta["rows"] / wall}
    results["cache"] = {"teacher": cfg.teacher.train.model, "teacher_kwargs": kwargs, "num_classes": num_classes,
                        **sizes, "fp32_over_fp16_bytes": sizes["float32"]["bytes_per_view"] / sizes["float16"]["bytes_per_view"]}
    student_kw = pipeline.model_kwargs(cfg.student, num_classes, cfg)
    results["embedded_pair"] = teacher_vs_student(cfg.teacher.train.model, kwargs, cfg.student.model, student_kw,
                                                  (16, 8, 3, 32, 32), a.repeats)
    paper_kw = {"num_classes": 101, "num_frames": 8, "img_size": 112}
    results["paper_pair_112"] = teacher_vs_student("videofocalnet_base", paper_kw, "videofocalnet_nano", paper_kw,
                                                   (2, 8, 3, 112, 112), a.repeats)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

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
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
