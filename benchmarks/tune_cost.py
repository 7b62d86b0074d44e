#!/usr/bin/env python
"""Benchmark: what the teacher-logit cache and ASHA save a Ray Tune search.

Searches over one space (``SPACE``: configs/tune_embedded.yaml's T, α, lr and student widths 4/8/16,
the widths sampled instead of gridded so that ``--samples`` sets the trials), one trial at a time
(so that a search's wall time less its trials' passes is their start-up), the same seed (so the same sampled trials), the same clip shards, one worker per trial, one after the
other on one Ray instance:

* ``cached``         - trials distil from the teacher-logit cache (built once, before the search),
                       each in its Tune trial's own process (the default), ASHA on
* ``cached_workers`` - the same, but each trial starts a Ray Train worker group of its own
                       (``tune.in_process: false``, how every trial ran before)
* ``online``         - trials run the teacher inside the training loop (``teacher.mode: online``)
* ``cached_fifo``    - the cache, ASHA off: every trial runs to the end (``--fifo``)

Reported: per-trial start-up (a search's wall time less its trials' training and validation
passes, per trial: worker processes, datasets, checkpoints, Tune's bookkeeping) next to the mean
epoch time, trials per hour (cached vs online), and what ASHA saved.

Default teacher: Video-FocalNet-B (the paper's teacher), untrained - this measures cost, not
accuracy (as benchmarks/distill_cost.py does); ``--teacher embedded`` uses the embedded default's
demo teacher architecture instead. Writes benchmarks/results/tune_cost.json and prints a table.

    python benchmarks/tune_cost.py [--samples 4] [--epochs 3] [--videos-per-class 12] [--teacher embedded]
    python benchmarks/tune_cost.py --from-run runs/embedded   # a finished demo's real clips and shipped teacher
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "tune_cost.json"
# cost per trial over the space the results were measured with (the shipped search grids its widths)
SPACE = {"kd.temperature": {"loguniform": [1.0, 16.0]}, "student.embed_dim": {"choice": [4, 8, 16]},
         "kd.alpha": {"uniform": [0.8, 0.95]}, "optim.lr": {"loguniform": [0.0005, 0.001]}}


def derive(results: dict) -> dict:
    """Ratios and the split of each search's wall time into epochs and per-trial start-up."""
    rows = results["runs"]
    for r in rows.values():
        r["epoch_seconds_total"] = sum(sum(t["epoch_seconds"]) for t in r["trials_detail"])
        r["val_seconds_total"] = sum(sum(t.get("val_seconds") or []) for t in r["trials_detail"])
        # worker processes, datasets, checkpoints and Tune's bookkeeping: all but the passes
        r["startup_per_trial_s"] = (r["wall_s"] - r["epoch_seconds_total"] - r["val_seconds_total"]) / max(r["trials"], 1)
    cached, online, fifo = rows["cached"], rows["online"], rows.get("cached_fifo")
    workers = rows.get("cached_workers")
    results.update({
        "startup_per_trial_s": cached["startup_per_trial_s"],
        "epoch_s": cached["mean_epoch_s"],
        "startup_per_trial_s_worker_group": workers["startup_per_trial_s"] if workers else None,
        "trials_per_hour_ratio": cached["trials_per_hour"] / online["trials_per_hour"],
        "cached_over_online_trial_epochs_per_hour": cached["trial_epochs_per_hour"] / online["trial_epochs_per_hour"],
        "online_over_cached_epoch_s": online["mean_epoch_s"] / cached["mean_epoch_s"],
        "online_over_cached_epoch_time_total": online["epoch_seconds_total"] / cached["epoch_seconds_total"],
        "asha_trial_epochs_saved": cached["trial_epochs_if_all_ran_to_the_end"] - cached["trial_epochs_run"],
        "asha_wall_saved_s": (fifo["wall_s"] - cached["wall_s"]) if fifo else None,
        "asha_epoch_time_saved_s": (fifo["epoch_seconds_total"] - cached["epoch_seconds_total"]) if fifo else None,
    })
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4, help="trials per search")
    p.add_argument("--epochs", type=int, default=3, help="most epochs per trial (ASHA's max_t)")
    p.add_argument("--videos-per-class", type=int, default=12, help="synthetic training videos per class")
    p.add_argument("--teacher", default="videofocalnet_base", help="a timm Video-FocalNet name, or 'embedded'")
    p.add_argument("--fifo", action="store_true", help="also run the ASHA-off search (ASHA's wall-time savings)")
    p.add_argument("--no-workers", action="store_true", help="skip the search whose trials start worker groups")
    p.add_argument("--from-run", help="a finished distill run's output dir: its clips and trained teacher")
    p.add_argument("--work-dir")
    p.add_argument("--out", default=str(RESULTS), help="the results file (default: %(default)s)")
    a = p.parse_args(argv)

    from benchmarks.machine import cpu_model
    from dvfl import pipeline
    from dvfl.artifacts import save_model
    from dvfl.models import build_model
    from dvfl.runtime import ray_runtime
    from dvfl.train.launch import count_rows
    from dvfl.tune import load_tune_config, run_search

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="dvfl-bench-tune-"))
    if not a.work_dir:  # our own scratch (clips, caches, Tune folders) goes when the benchmark ends
        atexit.register(shutil.rmtree, work, True)
    data = [("tune.space", SPACE), ("data.synthetic.train_per_class", a.videos_per_class), ("data.synthetic.test_per_class", 4),
            ("data.synthetic.val_per_class", 0),
            ("data.synthetic.unlabeled_videos", 0), ("students", None), ("tune.set.optim.epochs", a.epochs),
            ("tune.num_samples", a.samples), ("tune.storage", str(work / "tune")), ("scaling.num_workers", 1),
            ("tune.asha.grace_period", 1), ("tune.front_seeds", []), ("tune.max_concurrent_trials", 1)]  # cost per trial: ASHA from epoch 1, no front re-runs
    run_teacher = None
    if a.from_run:
        run = Path(a.from_run).resolve()
        run_teacher = [m.parent for m in sorted((run / "teacher").glob("*/model.json"))]
        run_cfg = (yaml.safe_load((run / "config.yaml").read_text()) or {}) if (run / "config.yaml").is_file() else {}
        if not run_teacher and run_cfg:  # a run with a given (pre-trained) teacher
            given = (run_cfg.get("teacher") or {}).get("path")
            # relative (a config written under a Ray job): to the checkout, where this is run from
            given = given and Path(given).expanduser().resolve()
            run_teacher = [given] if given and (given / "model.json").is_file() else []
        if not (run / "clips" / "dataset.json").is_file() or not run_teacher:
            p.error(f"--from-run {run}: no clips/dataset.json, or no teacher (teacher/*/model.json or the "
                    f"config's teacher.path): a finished distill run?")
        run_teacher = run_teacher[0]
        # a teacher trained in the run on a pool of its own: the same pool (else refused: students on its videos)
        pool = (run_cfg.get("data") or {}).get("teacher_pool")
        data = [("tune.space", SPACE), ("data.clips", str(run / "clips")), ("students", None), ("tune.set.optim.epochs", a.epochs),
                *([("data.teacher_pool", pool)] if pool else []),
                ("tune.num_samples", a.samples), ("tune.storage", str(work / "tune")), ("scaling.num_workers", 1),
                # cost per trial, not the default search: ASHA from epoch 1, no front re-runs
                ("tune.asha.grace_period", 1), ("tune.front_seeds", []), ("tune.max_concurrent_trials", 1)]
    search, cfg = load_tune_config(None, data, output_dir=str(work))
    load_before = os.getloadavg()
    if not a.from_run:
        pipeline.ensure_videos(cfg, log=None)
    cores = os.cpu_count() or 1
    rows, prep = {}, {}
    with ray_runtime(dashboard=False, log_to_driver=False):
        t0 = time.perf_counter()
        info = pipeline.ensure_clips(cfg, log=lambda *_: None)
        prep["ingest_s"] = time.perf_counter() - t0
        kw = {"num_classes": len(info["classes"]), "num_frames": cfg.data.frames, "img_size": cfg.crop_size}
        if run_teacher is not None:  # the run teacher's own architecture and kwargs, not the generic ones
            spec = json.loads((run_teacher / "model.json").read_text())
            name, kw = spec["name"], dict(spec.get("kwargs") or {})
        elif a.teacher == "embedded":
            t_cfg = cfg.teacher.train
            kw.update({k: v for k, v in (("embed_dim", t_cfg.embed_dim), ("depths", t_cfg.depths)) if v is not None})
            name = t_cfg.model
        else:
            name = a.teacher
        teacher_dir = run_teacher or work / "teacher"
        if not (teacher_dir / "model.json").is_file():
            save_model(teacher_dir, build_model(name, **kw), name, kw)  # timing only: untrained
        common = [*data, ("teacher.path", str(teacher_dir)), ("baseline", False)]
        runs = {"cached": [("tune.experiment", "cached"), ("teacher.mode", "cached")]}
        if not a.no_workers:
            runs["cached_workers"] = [("tune.experiment", "cached_workers"), ("teacher.mode", "cached"),
                                      ("tune.in_process", False)]
        runs["online"] = [("tune.experiment", "online"), ("teacher.mode", "online")]
        if a.fifo:
            runs["cached_fifo"] = [("tune.experiment", "cached_fifo"), ("teacher.mode", "cached"),
                                   ("tune.asha", {"enabled": False})]
        for label, extra in runs.items():
            t, c = load_tune_config(None, common + extra, output_dir=str(work))
            if label == "cached":  # the one-off cost every cached search amortises
                t0 = time.perf_counter()
                pipeline.ensure_cache(c, str(teacher_dir), log=lambda *_: None)
                prep["cache_build_s"] = time.perf_counter() - t0
            s = run_search(t, c, fresh=True, verbose=0, log=lambda *_: None)
            epochs = [e for r in s["rows"] for e in r["epoch_seconds"]]
            rows[label] = {
                "wall_s": s["wall_seconds"], "trials": s["trials"], "errors": s["errors"],
                "stopped_early": s["stopped_early"], "trial_epochs_run": s["trial_epochs_run"],
                "trial_epochs_if_all_ran_to_the_end": s["trial_epochs_if_all_ran_to_the_end"],
                # finished trials only: an errored trial (out of memory) is not a trial the search bought
                "trials_per_hour": (s["trials"] - s["errors"]) / s["wall_seconds"] * 3600,
                "trial_epochs_per_hour": s["trial_epochs_run"] / s["wall_seconds"] * 3600,
                "mean_epoch_s": sum(epochs) / max(len(epochs), 1),
                "teacher_forward_calls": sum(r["teacher_forward_calls"] or 0 for r in s["rows"]),
                "trials_detail": [{k: r[k] for k in ("trial_id", "temperature", "alpha", "lr", "width", "gmacs",
                                                     "best_top1", "epochs_run", "status", "epoch_seconds",
                                                     "val_seconds")}
                                  for r in s["rows"]],
            }
            print(f"[bench] {label}: {s['trials']} trials, {s['trial_epochs_run']} trial-epochs in "
                  f"{s['wall_seconds']:.0f}s", flush=True)
    load_after = os.getloadavg()
    cached, fifo, workers = rows["cached"], rows.get("cached_fifo"), rows.get("cached_workers")
    results = {
        "cpu": cpu_model(), "teacher": name, "teacher_kwargs": kw, "teacher_trained": run_teacher is not None,
        "clips": f"a finished run's: {cfg.clips_dir}" if a.from_run else "generated here",
        "space": search.space,
        "samples": a.samples, "max_epochs": a.epochs, "asha": vars(search.asha), "seed": search.seed,
        "train_clips": count_rows(cfg.clips_dir, [cfg.data.train_split]),
        "scaling": vars(cfg.scaling), "cores": cores, "device": "cpu", "prepare": prep, "runs": rows,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "contended": max(load_before[0], load_after[0]) > cores,
        "note": ("the machine was shared with other jobs (load average above the core count): absolute times are "
                 "upper bounds, and the load changed while the searches ran one after the other, so wall-time "
                 "ratios are rough; epoch-time ratios are steadier")
        if max(load_before[0], load_after[0]) > cores else "quiet machine",
    }
    derive(results)
    errored = {label: r["errors"] for label, r in rows.items() if r["errors"]}
    out = Path(a.out)
    if errored:  # (a search of errored trials ran shorter: its ratios compare nothing; the last good file stays)
        out = out.with_name(out.stem + ".errored.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nTune cost: {a.samples} trials x up to {a.epochs} epochs, teacher {name} "
          f"({'trained' if run_teacher else 'untrained, timing only'}), students {search.space.get('student.embed_dim')}, "
          f"one worker per trial, CPU ({results['cpu']}), {cores} cores")
    print("| search | wall | trials | errored | trial-epochs | trials / hour | trial-epochs / hour | mean epoch | "
          "start-up per trial | teacher forwards |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['wall_s']:.0f} s | {r['trials']} ({r['stopped_early']} stopped early) | {r['errors']} | "
              f"{r['trial_epochs_run']}/{r['trial_epochs_if_all_ran_to_the_end']} | {r['trials_per_hour']:.1f} | "
              f"{r['trial_epochs_per_hour']:.1f} | {r['mean_epoch_s']:.1f} s | {r['startup_per_trial_s']:.1f} s | "
              f"{r['teacher_forward_calls']} |")
    if workers:
        print(f"\nstart-up per trial: {results['startup_per_trial_s']:.1f} s in the trial's process vs "
              f"{results['startup_per_trial_s_worker_group']:.1f} s with a Ray Train worker group per trial")
    print(f"\ncache vs online teacher: {results['trials_per_hour_ratio']:.2f}x trials per hour "
          f"({results['online_over_cached_epoch_s']:.2f}x epoch time); cache build (once): "
          f"{prep.get('cache_build_s', 0):.0f} s")
    print(f"ASHA: {results['asha_trial_epochs_saved']} of {cached['trial_epochs_if_all_ran_to_the_end']} trial-epochs "
          f"saved" + (f"; {results['asha_wall_saved_s']:.0f} s of wall time vs every trial to the end" if fifo else ""))
    print(f"load average {results['load_average_before_after']} ({'contended' if results['contended'] else 'quiet'})")
    print(f"wrote {out}")
    if errored:
        print(f"error: trials errored ({', '.join(f'{k}: {v}' for k, v in errored.items())}): the searches are not "
              f"comparable ({a.out} left as it was); see the trials' error files under the experiments", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
