#!/usr/bin/env python
"""Per clip: the embedded default's student training step vs its teacher's forward (issue 21).

    python benchmarks/kd_pair_cost.py [--rounds 5] [--batch-sizes 16 64] [--threads 1] [--widths 4 8 16] [--out PATH]

A Tune trial's epoch from the teacher-logit cache costs the student's training steps; with the
teacher in the loop it costs those plus the teacher's forward on the same clips. So
``1 + teacher forward / student step`` (per clip) bounds what the cache can buy per epoch, and
trials per hour (the same start-up and validation added to both) stay below it.

Builds the student of ``configs/embedded.yaml`` (its width, depths, optimizer, KD α and T, the
project's autocast choice for this CPU) and loads the shipped teacher (``models/embedded_teacher``),
runs torch on ``--threads`` threads (a trial's: one), and times on random clips of the trained size, in
interleaved rounds (a student step batch, then a teacher forward batch), per batch size: the
median per clip, its min-max, and the bound with its per-round range. Writes
``benchmarks/results/kd_pair_cost.json`` and prints a table. About a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.machine import cpu_flags, cpu_model  # noqa: E402

RESULTS = os.path.join(_HERE, "results", "kd_pair_cost.json")
RESULTS_WIDTHS = os.path.join(_HERE, "results", "kd_pair_cost_widths.json")


def build(batch: int, width: int | None = None):
    from dvfl.artifacts import load_model
    from dvfl.config import load_config
    from dvfl.losses import distillation_loss
    from dvfl.models import build_model
    from dvfl.train.loop import amp_dtype, make_optimizer

    cfg = load_config(None, [("student.embed_dim", width)] if width else ())
    teacher, spec = load_model(os.path.join(_ROOT, cfg.teacher.path))
    teacher.eval()
    num_classes = len(spec.get("classes") or []) or cfg.data.synthetic.num_classes
    size, frames = cfg.data.short_side, cfg.data.frames
    s = cfg.student
    student = build_model(s.model, num_classes=num_classes, num_frames=frames, img_size=size,
                          embed_dim=s.embed_dim, depths=list(s.depths), drop_path_rate=s.drop_path_rate)
    student.train()
    optimizer = make_optimizer(student, cfg.optim)
    amp = amp_dtype(torch.device("cpu"), cfg.optim.amp, cpu_amp=cfg.optim.cpu_amp)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, frames, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    cached = torch.randn(batch, num_classes, generator=g).half()  # what the cache holds

    def student_step():
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=bool(amp)):
            logits = student(x)
        out = distillation_loss(logits.float(), cached.float(), y, alpha=cfg.kd.alpha, temperature=cfg.kd.temperature)
        out.total.backward()
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad():  # fp32 on a CPU, as the loop runs it (dvfl.train.loop)
            teacher(x)

    info = {"student": {"model": s.model, "embed_dim": s.embed_dim, "depths": list(s.depths)},
            "teacher": cfg.teacher.path, "clip": [frames, 3, size, size], "autocast": str(amp) if amp else "off"}
    return student_step, teacher_forward, info


def time_per_clip(fn, batch: int, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / (steps * batch) * 1000.0


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Tune trial's: 1)")
    ap.add_argument("--clips-per-round", type=int, default=128, help="clips timed per model per round")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="student widths to time (default: the embedded student's; the search grids 4 8 16)")
    ap.add_argument("--out", help="results file (default: kd_pair_cost.json, kd_pair_cost_widths.json with --widths)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                       "loadavg_at_start": os.getloadavg()},
           "threads": a.threads, "rounds": a.rounds}
    tables = {}
    for width in a.widths or [None]:
        by_batch = {}
        for batch in a.batch_sizes:
            student_step, teacher_forward, info = build(batch, width)
            res.update({k: v for k, v in info.items() if k != "student"} if a.widths else info)
            steps = max(1, a.clips_per_round // batch)
            for _ in range(2):  # warm-up: allocator, oneDNN primitives
                student_step()
                teacher_forward()
            rows = []
            for _ in range(a.rounds):
                s_ms = time_per_clip(student_step, batch, steps)
                t_ms = time_per_clip(teacher_forward, batch, steps)
                rows.append({"student_step_ms_per_clip": s_ms, "teacher_forward_ms_per_clip": t_ms,
                             "epoch_ratio_bound": 1 + t_ms / s_ms})
            summary = {}
            for key in ("student_step_ms_per_clip", "teacher_forward_ms_per_clip", "epoch_ratio_bound"):
                v = [r[key] for r in rows]
                summary[key] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
            by_batch[str(batch)] = {"rounds": rows, **summary}
        tables[info["student"]["embed_dim"]] = by_batch
    if a.widths:
        res["by_width"] = {str(w): {"by_batch": t} for w, t in tables.items()}
    else:
        res["by_batch"] = next(iter(tables.values()))
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    out = a.out or (RESULTS_WIDTHS if a.widths else RESULTS)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nembedded student step vs teacher forward, per clip ({res['machine']['cpu']}, {a.threads} thread(s), "
          f"{a.rounds} interleaved rounds; median [min-max])")
    print(f"{'width':>6} {'batch':>6} {'student step ms':>22} {'teacher forward ms':>22} {'1 + teacher/student':>24}")
    for width, by_batch in tables.items():
        for batch, r in by_batch.items():
            cells = [f"{r[k]['median']:.2f} [{r[k]['min']:.2f}-{r[k]['max']:.2f}]"
                     for k in ("student_step_ms_per_clip", "teacher_forward_ms_per_clip", "epoch_ratio_bound")]
            print(f"{width:>6} {batch:>6} {cells[0]:>22} {cells[1]:>22} {cells[2]:>24}")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
