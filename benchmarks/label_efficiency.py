#!/usr/bin/env python
"""Benchmark: how many labels does the student need when the teacher's logits are cached?

On the embedded dataset, with 10%, 25% and 100% of the training labels, the nano student is
trained three ways, several seeds each:

* ``ce``            - cross-entropy on the labelled clips only (VFL-Net);
* ``kd_labelled``   - α·KD + (1−α)·CE on the labelled clips only (DVFL-Net);
* ``kd_unlabelled`` - the same on the labelled clips, plus KD only on the unlabelled pool.

Honest protocol: the teacher never saw a student's video - the embedded default's ships
pre-trained on a seed stream of its own (models/embedded_teacher); with ``teacher.path: null`` it
is trained once on its own pool of labelled videos (``data.teacher_pool``). The unlabelled pool is
a disjoint set of videos (its own seed stream in the generator) whose labels are never read. At
a label fraction f the students see a class-balanced seeded fraction f of the other labelled
videos; the rest are left out (not recycled as unlabelled clips).

Every run goes through the product's own stages (``dvfl.pipeline``: Ray Data shards, the cached
logits, the shared Ray Train loop, deterministic evaluation) and is reused when its inputs are
unchanged, so the 100% runs are seeds 0 and 1 of ``pipelines/distill.py`` in the same output dir.
Target: with 25% of the labels, ``kd_unlabelled`` comes within 3 points of ``ce`` with 100% of
the labels.

Budget (``--budget``): ``steps`` (default) gives every run the optimizer steps of the 100%-label
CE run (epochs x labelled videos), so a run on fewer clips takes more epochs: 25% labels -> 4x the
epochs, 25% labels + the embedded default's unlabelled pool (800 videos next to 180) -> 0.73x.
``epochs`` gives every run the config's epochs, so a run on fewer clips also gets fewer steps
(session 4's protocol).

Writes benchmarks/results/label_efficiency.json and label_efficiency.png (``--budget steps``, the
figures the README quotes) or label_efficiency_epochs.json and label_efficiency_epochs.png
(``--budget epochs``) into --out, and prints a table.
    python benchmarks/label_efficiency.py [--config configs/embedded.yaml] [--seeds 0 1] [--budget steps|epochs]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
METHODS = {"ce": "vfl", "kd_labelled": "dvfl", "kd_unlabelled": "dvfl+unlabeled"}
LABELS = {"ce": "CE, labelled clips only", "kd_labelled": "KD, labelled clips only",
          "kd_unlabelled": "KD, labelled + unlabelled clips"}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def plot(results: dict, teacher_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fractions = sorted(float(f) for f in results)
    for method, colour in zip(METHODS, ("tab:blue", "tab:red", "tab:green")):
        rows = [results[f"{f:g}"][method] for f in fractions]
        means = [100 * r["mean"] for r in rows]
        err = [[100 * (r["mean"] - r["min"]) for r in rows], [100 * (r["max"] - r["mean"]) for r in rows]]
        ax.errorbar([100 * f for f in fractions], means, yerr=err, marker="o", capsize=4, color=colour,
                    label=LABELS[method])
    ax.axhline(100 * teacher_top1, color="k", ls="--", lw=1, label="teacher")
    ax.set(xscale="log", xlabel="training labels used (%)", ylabel="test top-1 (%)",
           title="Label efficiency on the embedded dataset (mean, min-max over seeds)")
    ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config (default: the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--budget", choices=["steps", "epochs"], default="steps",
                   help="steps: every run gets the 100%%-label CE run's optimizer steps; epochs: the config's epochs")
    p.add_argument("--out", default=str(RESULTS),
                   help="folder for the JSON and the PNG: label_efficiency.{json,png} for --budget steps, "
                        "label_efficiency_epochs.{json,png} for --budget epochs (default: %(default)s)")
    a = p.parse_args(argv)

    from benchmarks.machine import cpu_flags, cpu_model
    from dvfl import pipeline
    from dvfl.config import load_config, parse_override
    from dvfl.runtime import ray_runtime

    cfg = load_config(a.config, [parse_override(s) for s in a.set])
    if not cfg.unlabeled_dir:
        p.error("the config has no unlabelled clips (data.unlabeled or data.synthetic.unlabeled_videos)")
    started, load_at_start = time.time(), os.getloadavg()
    pipeline.ensure_videos(cfg)
    with ray_runtime():
        info = pipeline.ensure_clips(cfg)
        teacher_path, teacher_spec = pipeline.ensure_teacher(cfg, info)
        pipeline.ensure_cache(cfg, teacher_path)
        teacher_top1 = pipeline.evaluate_model_dir(cfg, teacher_path)["top1"]
        signal = pipeline.teacher_signal(cfg, teacher_path, teacher_spec, info, kd=True)
        top1: dict = {}
        epochs_used: dict = {}
        train_videos = info["counts"]["train"]["videos"]
        labelled = train_videos * (1 - cfg.data.teacher_pool) if cfg.data.teacher_pool > 0 else train_videos
        unlabelled = info["counts"].get("unlabeled", {}).get("videos", 0)
        for fraction in sorted(a.fractions):
            for seed in a.seeds:
                for method, role in METHODS.items():
                    seen = fraction * labelled + (unlabelled if role == "dvfl+unlabeled" else 0)
                    epochs = (max(1, round(cfg.optim.epochs * labelled / seen)) if a.budget == "steps"
                              else cfg.optim.epochs)
                    epochs_used.setdefault(f"{fraction:g}", {})[method] = epochs
                    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_fraction=fraction),
                                                  optim=dataclasses.replace(cfg.optim, epochs=epochs))
                    run_cfg.validate()
                    print(f"[label-efficiency] {fraction:.0%} labels, {method}, seed {seed}, {epochs} epochs",
                          flush=True)
                    path = pipeline.train_student(run_cfg, info, signal if role != "vfl" else {"mode": "none"},
                                                  seed, unlabeled=role == "dvfl+unlabeled")
                    m = pipeline.evaluate_model_dir(run_cfg, str(path))
                    top1.setdefault(f"{fraction:g}", {}).setdefault(method, []).append(m["top1"])
    results = {f: {m: summary(v) for m, v in by.items()} for f, by in top1.items()}
    full_ce = results["1"]["ce"]["mean"] if "1" in results else None
    quarter = results.get("0.25", {}).get("kd_unlabelled", {}).get("mean")
    report = {
        "benchmark": "label_efficiency",
        "protocol": ((f"teacher pre-trained elsewhere ({cfg.teacher.path}) on videos no student sees"
                      if cfg.teacher.path else
                      f"teacher trained on its own pool ({cfg.data.teacher_pool:.0%}) of the labelled training "
                      "videos, never seen by a student (all of them when 0%)")
                     + "; unlabelled pool = disjoint videos, labels never read; students use a class-balanced "
                     "seeded fraction of the other labelled videos"),
        "config": {"student": dataclasses.asdict(cfg.student), "optim": dataclasses.asdict(cfg.optim),
                   "kd": dataclasses.asdict(cfg.kd), "synthetic": dataclasses.asdict(cfg.data.synthetic),
                   "eval": f"{cfg.eval.clips} clips x {cfg.eval.crops} crops, split {cfg.data.test_split}"},
        "budget": a.budget, "epochs": epochs_used, "seeds": a.seeds, "teacher_top1": teacher_top1, "top1": results,
        "target": {"rule": "kd_unlabelled at 25% labels >= ce at 100% labels - 3 points",
                   "kd_unlabelled_25": quarter, "ce_100": full_ce,
                   "gap_points": None if quarter is None or full_ce is None else round(100 * (full_ce - quarter), 2),
                   "met": None if quarter is None or full_ce is None else quarter >= full_ce - 0.03},
        "seconds": round(time.time() - started, 1), "cpus": os.cpu_count(),
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                    "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from dvfl import storage

    # one file per budget: an equal-epochs run must not replace the equal-steps figures
    stem = "label_efficiency" if a.budget == "steps" else f"label_efficiency_{a.budget}"
    storage.write_json(out / f"{stem}.json", report)
    plot(results, teacher_top1, out / f"{stem}.png")
    print(f"\nteacher top-1 {teacher_top1:.1%}; students, mean (min-max) over seeds {a.seeds}:")
    print(f"| labels | {' | '.join(LABELS[m] for m in METHODS)} |")
    print("|---:|" + "---:|" * len(METHODS))
    for f in sorted(results, key=float):
        cells = [f"{r['mean']:.1%} ({r['min']:.1%}-{r['max']:.1%})" for r in (results[f][m] for m in METHODS)]
        print(f"| {float(f):.0%} | " + " | ".join(cells) + " |")
    t = report["target"]
    if t["met"] is not None:
        print(f"target (25% labels + unlabelled KD within 3 points of CE on 100%): "
              f"{'MET' if t['met'] else 'MISSED'} (gap {t['gap_points']:+.1f} points)")
    print(f"[label-efficiency] {out / (stem + '.json')}, {out / (stem + '.png')} "
          f"({report['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
