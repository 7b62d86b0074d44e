#!/usr/bin/env python
"""Teacher vs student efficiency: Video-FocalNet-Base vs VFL-Net nano at 8 x 224^2, batch 1.

    python benchmarks/model_efficiency.py [--rounds 8] [--nano-per-round 3] [--out PATH]

Writes ``benchmarks/results/model_efficiency.json`` and prints a table of params, GFLOPs
(FlopCounterMode, 2 per multiply-add), GMACs (= what papers call "GFLOPs") and CPU latency
(median, batch 1) for both models, with the base/nano ratios (target: latency ratio >= 7x; the
FLOP ratio is 8.13x). FLOPs and params are checked against
``../shared/reference/video_focalnet_reference.json`` (FLOPs within 1 %, params exact).

Latency is measured on the CPU (the question is the edge/CPU speed-up), with
``torch.set_num_threads(<available cores>)``. Both models stay loaded and are timed in
interleaved rounds (``--nano-per-round`` nano forwards, then one base forward), so that a
background load on a shared machine slows both alike instead of biasing the ratio. The load
average before and after is recorded, and each forward's CPU utilisation (process CPU time /
(wall time * threads)): the reported latency is the median over the forwards that got the CPU
(utilisation >= 0.8), and rounds are added (up to ``--max-rounds``) until ``--min-quiet`` base
forwards ran uncontended. The base/nano ratio is also taken per round (paired in time) on
wall and on process CPU time, with its median and min-max, and the result says whether every
round is above 7x. About 2 minutes on a quiet 2-core machine; no round starts after
--max-seconds of timing (default 480).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.machine import cpu_model  # noqa: E402

from dvfl.models import build_model  # noqa: E402
from dvfl.profile import (  # noqa: E402
    RssSampler, available_cpus, count_flops, count_params, measure_latency,
)

MODELS = {"nano": "videofocalnet_nano", "base": "videofocalnet_base"}
FRAMES, SIZE, NUM_CLASSES = 8, 224, 101
DEFAULT_REFERENCE = os.path.join(_ROOT, "..", "shared", "reference",
                                 "video_focalnet_reference.json")


def _load_reference(path: str):
    path = os.path.normpath(path)
    if not os.path.exists(path):
        return None, path
    with open(path) as fh:
        return json.load(fh), path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8,
                   help="interleaved timing rounds (one base forward each), at least")
    p.add_argument("--nano-per-round", type=int, default=3, help="nano forwards per round")
    p.add_argument("--min-quiet", type=int, default=5,
                   help="keep adding rounds until this many base forwards ran uncontended")
    p.add_argument("--max-rounds", type=int, default=30, help="give up adding rounds after this")
    p.add_argument("--max-seconds", type=float, default=480,
                   help="stop adding rounds after this much timing (seconds)")
    p.add_argument("--quiet-utilisation", type=float, default=0.8,
                   help="a forward is uncontended if process CPU time / (wall * threads) >= this")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per model")
    p.add_argument("--threads", type=int, default=None, help="default: available CPU cores")
    p.add_argument("--reference", default=DEFAULT_REFERENCE)
    p.add_argument("--out", default=os.path.join(_HERE, "results", "model_efficiency.json"))
    a = p.parse_args(argv)

    threads = a.threads or available_cpus()
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    reference, ref_path = _load_reference(a.reference)

    rows, models = {}, {}
    for key, name in MODELS.items():
        flops = count_flops(name, num_classes=NUM_CLASSES, num_frames=FRAMES, img_size=SIZE)
        torch.manual_seed(0)
        model = build_model(name, num_classes=NUM_CLASSES, num_frames=FRAMES, img_size=SIZE,
                            device=device).eval()
        models[key] = model
        rows[key] = {"model": name, **count_params(model),
                     "flops_per_clip": flops["flops_per_clip"],
                     "gflops_per_clip": flops["flops_per_clip"] / 1e9,
                     "gmacs_per_clip": flops["gmacs_per_clip"], "latency_ms": []}
        if reference is not None:
            ref = reference[f"{key}_{NUM_CLASSES}"]
            rel = flops["flops_per_clip"] / ref["flops_per_clip_8x224"] - 1.0
            rows[key]["reference"] = {
                "params": ref["params"], "params_equal": rows[key]["params"] == ref["params"],
                "flops_per_clip": ref["flops_per_clip_8x224"], "flops_rel_diff": rel,
                "flops_within_1pct": abs(rel) <= 0.01}

    x = torch.randn(1, FRAMES, 3, SIZE, SIZE, device=device)
    # peak memory on forwards of their own (they warm up too): a 1 ms sampler thread running beside the
    # timed forwards took CPU from torch's threads (+6-11 % latency, measured in session 47)
    with RssSampler() as rss:
        for key, model in models.items():
            measure_latency(model, x, warmup=a.warmup, repeats=1)  # warm-up (+1 discarded run)

    def timed(key):
        """One forward: wall ms and CPU utilisation (process CPU time / (wall * threads))."""
        with torch.inference_mode():
            w0, c0 = time.perf_counter(), time.process_time()
            models[key](x)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rows[key]["latency_ms"].append(wall * 1e3)
        rows[key]["cpu_ms"].append(cpu * 1e3)
        rows[key]["cpu_utilisation"].append(cpu / (wall * threads))

    for row in rows.values():
        row["cpu_utilisation"], row["cpu_ms"] = [], []
    # per round: base latency / the median of that round's nano latencies (paired in time, so a
    # load that comes and goes cancels), on wall time and on process CPU time
    round_ratios = {"wall": [], "cpu": []}
    def quiet(key):
        row = rows[key]
        return [ms for ms, u in zip(row["latency_ms"], row["cpu_utilisation"])
                if u >= a.quiet_utilisation]

    rounds, t_timing = 0, time.perf_counter()

    def more_rounds() -> bool:
        if rounds < a.rounds:
            return True
        return (len(quiet("base")) < a.min_quiet and rounds < a.max_rounds
                and time.perf_counter() - t_timing < a.max_seconds)

    while more_rounds():
        rounds += 1
        for _ in range(a.nano_per_round):
            timed("nano")
        timed("base")
        k = a.nano_per_round
        for unit, col in (("wall", "latency_ms"), ("cpu", "cpu_ms")):
            round_ratios[unit].append(rows["base"][col][-1] / statistics.median(rows["nano"][col][-k:]))
        print(f"round {rounds}: nano {rows['nano']['latency_ms'][-1]:.0f} ms, "
              f"base {rows['base']['latency_ms'][-1]:.0f} ms, CPU utilisation "
              f"{rows['base']['cpu_utilisation'][-1]:.2f}, uncontended base forwards "
              f"{len(quiet('base'))}", file=sys.stderr, flush=True)
    # The headline latency is the median over the uncontended forwards (those whose threads got
    # the CPU); if too few ran uncontended it falls back to all forwards and flags the run.
    contended = min(len(quiet("nano")), len(quiet("base"))) < max(1, min(3, a.min_quiet))
    for key, row in rows.items():
        ms = row["latency_ms"]
        used = ms if contended else quiet(key)
        row.update(latency_ms_median=statistics.median(used), latency_ms_min=min(ms),
                   latency_ms_median_all=statistics.median(ms), latency_repeats=len(used),
                   latency_forwards_total=len(ms), latency_forwards_uncontended=len(quiet(key)),
                   throughput_clips_per_s=1e3 / statistics.median(used),
                   cpu_utilisation_median=statistics.median(row["cpu_utilisation"]))

    n, b = rows["nano"], rows["base"]
    ratios = {
        "params": b["params"] / n["params"],
        "flops": b["flops_per_clip"] / n["flops_per_clip"],
        "latency_median": b["latency_ms_median"] / n["latency_ms_median"],
        "latency_median_all_forwards": b["latency_ms_median_all"] / n["latency_ms_median_all"],
        "latency_min": b["latency_ms_min"] / n["latency_ms_min"],
    }
    spread = {u: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
              for u, v in round_ratios.items()}
    ratios["latency_per_round"] = spread["wall"]
    ratios["cpu_time_per_round"] = spread["cpu"]
    # above 7x by more than the noise: every round's ratio is above 7x (the min-max range clears it);
    # on a loaded machine CPU time is the figure that holds (wall time measures the other processes)
    basis = "cpu" if contended else "wall"
    above = spread[basis]["min"] > 7.0
    result = {
        "latency_ratio_basis": basis,
        "latency_ratio_above_7x_by_more_than_spread": above,
        "config": {"frames": FRAMES, "size": SIZE, "num_classes": NUM_CLASSES, "batch": 1,
                   "device": str(device), "threads": torch.get_num_threads(),
                   "available_cpus": available_cpus(), "cpu": cpu_model(),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "warmup": a.warmup, "rounds": rounds, "nano_per_round": a.nano_per_round,
                   "timing": "interleaved rounds, torch.inference_mode, eval mode; latency = "
                             "median over uncontended forwards (CPU utilisation >= "
                             f"{a.quiet_utilisation}) unless too few, see 'contended'",
                   "flops_counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per MAC)",
                   "load_average_before": load_before, "load_average_after": os.getloadavg(),
                   "process_niceness": os.nice(0)},
        "models": rows,
        "ratios_base_over_nano": ratios,
        "latency_ratio_target": 7.0,
        # the clock the spread is judged on: on a loaded machine the wall medians measure the other processes
        "latency_ratio_meets_target": (spread["cpu"]["median"] if contended else ratios["latency_median"]) >= 7.0,
        "reference": ref_path if reference is not None else None,
        "reference_ok": (None if reference is None else all(
            r["reference"]["params_equal"] and r["reference"]["flops_within_1pct"]
            for r in rows.values())),
        "peak_rss_mib_both_models_loaded": rss.peak / 2**20,
        # True if too few forwards got the full CPU (other processes competed for the cores;
        # a quiet 2-core run measures a utilisation of ~0.9): the latencies are then inflated.
        "contended": contended,
        "wall_s": None,
    }
    result["wall_s"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=2)

    print(f"Video-FocalNet efficiency at {FRAMES}x{SIZE}^2, batch 1, CPU "
          f"({result['config']['cpu']}, {result['config']['threads']} threads, "
          f"torch {torch.__version__})")
    header = (f"| {'model':<18} | {'params':>12} | {'GFLOPs':>8} | {'GMACs':>7} | "
              f"{'CPU latency (ms)':>16} | {'clips/s':>7} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for row in (n, b):
        print(f"| {row['model']:<18} | {row['params']:>12,} | {row['gflops_per_clip']:>8.2f} | "
              f"{row['gmacs_per_clip']:>7.2f} | {row['latency_ms_median']:>16.0f} | "
              f"{row['throughput_clips_per_s']:>7.2f} |")
    print(f"| {'base / nano':<18} | {ratios['params']:>11.2f}x | {ratios['flops']:>7.2f}x | "
          f"{ratios['flops']:>6.2f}x | {ratios['latency_median']:>15.2f}x | {'':>7} |")
    ok = "meets" if result["latency_ratio_meets_target"] else "BELOW"
    which = "forwards (all: too few uncontended)" if contended else "uncontended forwards"
    judged = spread["cpu"]["median"] if contended else ratios["latency_median"]  # (the figure the verdict used)
    print(f"latency ratio {judged:.2f}x ({'CPU time' if contended else 'wall'}; {ok} the 7x target; min-based "
          f"{ratios['latency_min']:.2f}x); medians of {n['latency_repeats']} nano / "
          f"{b['latency_repeats']} base {which} (of {n['latency_forwards_total']} / "
          f"{b['latency_forwards_total']}); load avg before {load_before[0]:.2f}")
    for unit in ("wall", "cpu"):
        sp = spread[unit]
        print(f"per-round base/nano ratio on {unit} time: median {sp['median']:.2f}x, min-max "
              f"{sp['min']:.2f}-{sp['max']:.2f}x over {sp['n']} rounds")
    print(f"above 7x by more than the spread ({basis} time, every round > 7x): {'yes' if above else 'no'}")
    if result["contended"]:
        print(f"WARNING: the CPU was shared with other work during the timing (median CPU "
              f"utilisation nano {n['cpu_utilisation_median']:.2f}, base "
              f"{b['cpu_utilisation_median']:.2f} of {threads} threads; load average after "
              f"{result['config']['load_average_after'][0]:.1f}) and too few forwards ran "
              f"uncontended: latencies are inflated and the ratios are unreliable. Re-run on a "
              f"quiet machine.")
    if reference is not None:
        for key, row in rows.items():
            ref = row["reference"]
            print(f"reference check {key}: params {'==' if ref['params_equal'] else '!='} "
                  f"{ref['params']:,}; FLOPs {ref['flops_rel_diff'] * 100:+.4f}% "
                  f"({'within' if ref['flops_within_1pct'] else 'OUTSIDE'} 1%)")
    else:
        print(f"reference check skipped: {ref_path} not found")
    print(f"wrote {os.path.relpath(a.out)} in {result['wall_s']:.0f} s")
    return 0 if result["reference_ok"] in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
