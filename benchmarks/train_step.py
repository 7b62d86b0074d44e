#!/usr/bin/env python
"""Benchmark: the student's training step against this machine's matmul peak, and the speed levers.

    python benchmarks/train_step.py [--sizes 112x8,224x2] [--repeats 3] [--max-seconds 480]

Measures, with the threads a training worker uses (``--threads``, default: available cores):
  * the fp32 and bf16 peak of a 2048^2 matmul (GFLOP/s, best of ``--peak-repeats``);
  * the nano student's full training step (forward, backward, AdamW step) at 8 x S^2, batch B for
    each ``SxB`` of ``--sizes``, its FLOPs (torch.utils.flop_counter, 2 per multiply-add), GFLOP/s
    and fraction of the fp32 peak;
  * one variant per speed lever (``plain`` = fp32, official Conv1d temporal path, unfused AdamW;
    each lever alone on top of it; ``default`` = the training loop's defaults together), timed in
    interleaved rounds on the same batch from the same initial weights: speed-ups are the
    per-round ratios plain / variant (median and min-max), and each variant's loss after the same
    steps is compared with plain's (tolerance per lever);
  * the top operators by self CPU time (torch.profiler) of one plain and one default step.

Both wall and process CPU seconds are recorded; on a machine whose load average exceeds its
cores, decisions use CPU seconds (wall time then mostly measures the other processes). The load
average before/after, the CPU model and its bf16 flags go into the results file
(benchmarks/results/train_step.json); ``data_wait_fraction`` is copied from the real loop's
measurement in benchmarks/results/distill_cost.json when that exists.
Wall time: about 10 minutes on a quiet 2-core AMD EPYC with the defaults; rounds stop being added
after --max-seconds (each round is one step of every variant), and --compile adds the compile time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.machine import cpu_flags, cpu_model  # noqa: E402
from dvfl.allocator import keep_freed_memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")
# loss after the timed steps, relative to plain's: fp32 reorderings vs bf16 rounding
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}


def cpu_info() -> dict:
    return {"model": cpu_model(), "bf16_flags": cpu_flags(BF16_FLAGS), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__}


def matmul_peak(dtype, repeats: int, n: int = 2048) -> dict:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up
    rates, per_cpu_s = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
        per_cpu_s.append(2 * n**3 / max(time.process_time() - c, 1e-9) / 1e9)
    # per CPU-second: what the cores do while they run us, the figure that survives a loaded machine
    return {"peak": max(rates), "median": statistics.median(rates), "min": min(rates),
            "peak_per_cpu_s": max(per_cpu_s)}


def variants(bf16_ok: bool, threads: int, with_compile: bool, bf16_pays: bool | None = None) -> dict:
    """``bf16_ok``: the CPU has bf16 instructions (the bf16 variants are timed); ``bf16_pays``: the
    loop's defaults use bf16 autocast here (dvfl.train.loop.bf16_autocast_pays; default: bf16_ok)."""
    plain = {"temporal_impl": "conv1d", "fused": False, "bf16": False, "threads": threads,
             "contiguous_input": False, "compile": False, "keep_freed": False}
    out = {"plain": plain,
           "temporal_conv2d": {**plain, "temporal_impl": "conv2d"},
           "fused_optimizer": {**plain, "fused": True},
           "nchw_input": {**plain, "contiguous_input": True},
           "keep_freed_memory": {**plain, "keep_freed": True}}
    if bf16_ok:
        out["bf16_autocast"] = {**plain, "bf16": True}
    if threads > 1:
        out["half_threads"] = {**plain, "threads": threads // 2}
    from dvfl.config import OptimSection

    d = OptimSection()
    default = {**plain, "temporal_impl": d.temporal_impl, "fused": d.fused, "bf16": d.cpu_amp and bool(bf16_ok if bf16_pays is None else bf16_pays),
               "keep_freed": d.keep_freed_memory}
    out["default"] = default
    if default["bf16"]:
        out["default_fp32"] = {**default, "bf16": False}
    elif bf16_ok:  # the defaults plus bf16 autocast: what optim.cpu_amp would give
        out["default_bf16"] = {**default, "bf16": True}
    if default["temporal_impl"] == "conv2d":  # the official temporal path under the other defaults
        out["default_conv1d"] = {**default, "temporal_impl": "conv1d"}
    if with_compile:  # on the loop's fp32 step (the one fraction_of_peak measures) and on the default
        out["compile"] = {**default, "bf16": False, "compile": True}
        if default["bf16"]:
            out["compile_bf16"] = {**default, "compile": True}
    return out


def loop_fp32(v: dict) -> str:
    """The variant that is the training loop's fp32 step: its defaults with bf16 autocast off
    (what it runs on a CPU without bf16 instructions, or with optim.cpu_amp off)."""
    return "default_fp32" if "default_fp32" in v else "default"


LEVER_OF = {  # variant -> (lever name in the report, config field that switches it)
    "temporal_conv2d": ("temporal (k,1) Conv2d instead of Conv1d", "optim.temporal_impl"),
    "fused_optimizer": ("fused AdamW", "optim.fused"),
    "nchw_input": ("channels-last input (kept: the loop's layout; the variant tries an NCHW copy)", None),
    "bf16_autocast": ("bf16 autocast on CPU", "optim.cpu_amp"),
    "keep_freed_memory": ("glibc keeps freed memory (no page faults per step)", "optim.keep_freed_memory"),
    "half_threads": ("half the threads", None),
    "compile": ("torch.compile (on the loop's fp32 step)", None),
    "compile_bf16": ("torch.compile (on the default bf16 step)", None),
}


class Runner:
    """One variant: its own model and optimizer from the shared initial weights."""

    def __init__(self, name, v, init_state, kw):
        from dvfl.models import build_model
        from dvfl.config import OptimSection
        from dvfl.models import set_temporal_impl
        from dvfl.train.loop import make_optimizer

        self.name, self.v = name, v
        self.model = build_model("videofocalnet_nano", **kw)
        self.model.load_state_dict(init_state)
        set_temporal_impl(self.model, v["temporal_impl"])
        self.model.train()
        self.opt = make_optimizer(self.model, OptimSection(lr=1e-4, weight_decay=0.05, fused=v["fused"]))
        # static shapes: each size is its own graph (a dynamic-shape recompile fails in inductor here)
        self.fwd = torch.compile(self.model, dynamic=False) if v["compile"] else self.model
        self.losses, self.wall, self.cpu = [], [], []

    def step(self, x, y, record=True):
        torch.set_num_threads(self.v["threads"])
        keep_freed_memory(self.v["keep_freed"])  # process-wide: each variant steps with its own setting
        torch.manual_seed(len(self.losses))  # the same stochastic-depth draws for every variant
        if self.v["contiguous_input"]:
            x = x.contiguous()
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.v["bf16"]):
            logits = self.fwd(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # as the loop does
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.wall.append(time.perf_counter() - t)
            self.cpu.append(time.process_time() - c)
            self.losses.append(float(loss.detach()))


def stats(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def step_flops(kw, x, y) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from dvfl.models import build_model

    model = build_model("videofocalnet_nano", **kw).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()  # the optimizer's elementwise update is not counted


def top_ops(runner, x, y, n=12) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(x, y, record=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:n]]


def run_size(size, batch, a, threads, bf16_ok, deadline, bf16_pays=None) -> dict:
    from dvfl.data.views import normalize

    torch.manual_seed(0)
    kw = {"num_classes": 101, "num_frames": 8, "img_size": size}
    # the loop's input: uint8 (B, T, H, W, 3) clips normalised into a channels-last (B, T, 3, H, W) view
    x = normalize(torch.randint(0, 256, (batch, 8, size, size, 3), dtype=torch.uint8))
    y = torch.randint(0, 101, (batch,))
    torch.set_num_threads(threads)
    flops = step_flops(kw, x, y)
    from dvfl.models import build_model

    init = build_model("videofocalnet_nano", **kw).state_dict()
    vs = variants(bf16_ok, threads, a.compile, bf16_pays)
    torch._dynamo.reset()  # this size's compiled graphs only
    runners = [Runner(n, v, copy.deepcopy(init), kw) for n, v in vs.items()]
    for r in runners:  # warm-up (and compile) step, untimed; every variant takes the same steps
        t = time.perf_counter()
        r.step(x, y, record=False)
        r.first_step_s = time.perf_counter() - t
    rounds, round_peaks = 0, []
    while rounds < a.repeats or (rounds < a.min_repeats_if_noisy and os.getloadavg()[0] > threads):
        order = runners[rounds % len(runners):] + runners[:rounds % len(runners)]  # rotate who goes first
        for r in order:
            r.step(x, y)
        # the fp32 matmul peak in the same round: the step's fraction of it cancels the machine's drift
        round_peaks.append(matmul_peak(torch.float32, 5)["peak"])
        rounds += 1
        print(f"[train_step] {size}x{batch}: round {rounds} " + " ".join(
            f"{r.name}={r.wall[-1]:.2f}s/{r.cpu[-1]:.2f}cpu" for r in runners), flush=True)
        if time.time() > deadline and rounds >= 2:
            break
    plain = runners[0]
    out = {"input": [8, 3, size, size], "batch": batch, "rounds": rounds, "flops_per_step": flops,
           "fp32_peak_per_round": round_peaks, "variants": {}}
    for r in runners:
        ratio_wall = [p / v for p, v in zip(plain.wall, r.wall)]
        ratio_cpu = [p / v for p, v in zip(plain.cpu, r.cpu)]
        loss_diff = max(abs(a_ - b_) / max(abs(a_), 1e-9) for a_, b_ in zip(plain.losses, r.losses))
        out["variants"][r.name] = {
            "settings": r.v, "wall_s": stats(r.wall), "cpu_s": stats(r.cpu), "wall_s_per_round": r.wall,
            "gflops": flops / statistics.median(r.wall) / 1e9,
            "gflops_per_cpu_s": flops / statistics.median(r.cpu) / 1e9,
            "speedup_wall": stats(ratio_wall), "speedup_cpu": stats(ratio_cpu),
            "loss_rel_diff": loss_diff, "first_step_s": r.first_step_s}
    if size == a.profile_size:
        out["top_ops"] = {"plain": top_ops(plain, x, y), "default": top_ops(runners[[r.name for r in runners].index("default")], x, y)}
    return out


def _in_default(name: str, v: dict) -> bool:
    """Whether the training loop's default uses the lever (for nchw_input: keeps channels-last,
    the layout the loop's input already has)."""
    d = v["default"]["settings"]
    return {"temporal_conv2d": d["temporal_impl"] == "conv2d", "fused_optimizer": d["fused"],
            "bf16_autocast": d["bf16"], "nchw_input": not d["contiguous_input"],
            "keep_freed_memory": d["keep_freed"],
            "half_threads": d["threads"] < v["plain"]["settings"]["threads"], "compile": d["compile"], "compile_bf16": d["compile"]}.get(name, False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="112x8,224x2", help="comma-separated SIZExBATCH (8 frames each)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds per size")
    p.add_argument("--min-repeats-if-noisy", type=int, default=5,
                   help="rounds while the load average exceeds the threads (within --max-seconds)")
    p.add_argument("--peak-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="default: available cores (as a 1-worker run)")
    p.add_argument("--compile", action="store_true", help="also try torch.compile (adds minutes of compile)")
    p.add_argument("--profile-size", type=int, default=112, help="which size gets the operator profile")
    p.add_argument("--max-seconds", type=float, default=480, help="stop adding rounds after this")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)

    from dvfl.profile import available_cpus
    from dvfl.train.loop import bf16_autocast_pays, cpu_has_bf16, cpu_vendor_and_flags

    started = time.time()
    deadline = started + a.max_seconds
    threads = a.threads or available_cpus()
    torch.set_num_threads(threads)
    bf16_ok = cpu_has_bf16()
    bf16_pays = bf16_autocast_pays(*cpu_vendor_and_flags())  # what the loop's defaults run here
    load_before = os.getloadavg()
    peak32 = matmul_peak(torch.float32, a.peak_repeats)
    peak16 = matmul_peak(torch.bfloat16, a.peak_repeats)
    print(f"[train_step] matmul peak: fp32 {peak32['peak']:.0f} GFLOP/s, bf16 {peak16['peak']:.0f} GFLOP/s "
          f"({threads} threads)", flush=True)
    sizes = {}
    for spec in a.sizes.split(","):
        size, batch = (int(v) for v in spec.lower().split("x"))
        sizes[spec] = run_size(size, batch, a, threads, bf16_ok, deadline, bf16_pays)
    load_after = os.getloadavg()
    noisy = max(load_before[0], load_after[0]) > threads
    metric = "speedup_cpu" if noisy else "speedup_wall"

    first = sizes[a.sizes.split(",")[0]]
    v = first["variants"]
    levers = []
    for name, (lever, field) in LEVER_OF.items():
        if name not in v:
            levers.append({"lever": lever, "variant": name, "tried": False,
                           "why": "CPU has no bf16 instructions" if name in ("bf16_autocast", "compile_bf16") and not bf16_ok
                           else "needs --compile (minutes of compile time)" if name.startswith("compile")
                           else "n/a"})
            continue
        tol = TOLERANCE["bf16" if v[name]["settings"]["bf16"] else "fp32"]
        speed = {s: sizes[s]["variants"][name][metric]["median"] for s in sizes}
        faster = all(x > 1.0 for x in speed.values())
        same = all(sizes[s]["variants"][name]["loss_rel_diff"] <= tol for s in sizes)
        levers.append({"lever": lever, "variant": name, "config": field, "tried": True,
                       "speedup": {s: sizes[s]["variants"][name][metric] for s in sizes},
                       "loss_rel_diff": {s: sizes[s]["variants"][name]["loss_rel_diff"] for s in sizes},
                       "tolerance": tol, "faster": faster, "same_loss": same,
                       # kept: the training loop uses it by default (see the README for why a lever
                       # that passes here may still be off)
                       "passes": faster and same, "kept": _in_default(name, v)})
        if name.startswith("compile"):  # judged against the step it compiles, and with its compile time
            base = loop_fp32(v) if name == "compile" else "default"
            levers[-1].update({
                "base": base, "first_step_s": {s: sizes[s]["variants"][name]["first_step_s"] for s in sizes},
                "speedup_vs_base": {s: stats([b / c for b, c in zip(sizes[s]["variants"][base]["wall_s_per_round"],
                                                                  sizes[s]["variants"][name]["wall_s_per_round"])])
                                    for s in sizes}})
    fp32 = loop_fp32(v)
    bf16_name = next((n for n in ("default_bf16", "default") if n in v and v[n]["settings"]["bf16"]), None)
    plain_s = v["plain"]["wall_s"]["median"]
    default_s = v["default"]["wall_s"]["median"]
    results = {
        "cpu": {**cpu_info(), "vendor": cpu_vendor_and_flags()[0]}, "bf16_autocast_by_default": bf16_pays,
        "threads": threads, "load_before": load_before, "load_after": load_after,
        "noisy": noisy, "decided_on": metric,
        "peak_gflops": peak32["peak"], "peak_gflops_bf16": peak16["peak"],
        "peak_detail": {"fp32": peak32, "bf16": peak16},
        # the training loop's fp32 step (its default levers, bf16 off); stock PyTorch as "plain_"
        "fp32_step_variant": fp32,
        "step_gflops": v[fp32]["gflops"],
        "fraction_of_peak": v[fp32]["gflops"] / peak32["peak"],
        # each round's step against the matmul peak measured in that round (median, min-max)
        "fraction_of_round_peak": stats([first["flops_per_step"] / w / 1e9 / pk for w, pk in
                                         zip(v[fp32]["wall_s_per_round"], first["fp32_peak_per_round"])]),
        "plain_step_gflops": v["plain"]["gflops"],
        "plain_fraction_of_peak": v["plain"]["gflops"] / peak32["peak"],
        "default_step_gflops": v["default"]["gflops"],
        # the same figures per CPU-second of this process (threads x wall on a quiet machine)
        "per_cpu_second": {"peak_gflops": peak32["peak_per_cpu_s"] * threads,
                           "peak_gflops_bf16": peak16["peak_per_cpu_s"] * threads,
                           "step_gflops": v[fp32]["gflops_per_cpu_s"] * threads,
                           "fraction_of_peak": v[fp32]["gflops_per_cpu_s"] / peak32["peak_per_cpu_s"],
                           "plain_fraction_of_peak": v["plain"]["gflops_per_cpu_s"] / peak32["peak_per_cpu_s"],
                           "default_step_gflops": v["default"]["gflops_per_cpu_s"] * threads},
        "default_fraction_of_peak": v["default"]["gflops"] / peak32["peak"],
        # the fp32 plain step / the step with the default levers and bf16 autocast
        "bf16_speedup": v[bf16_name][metric]["median"] if bf16_name else None,
        "bf16_speedup_per_round": v[bf16_name][metric] if bf16_name else None,
        "default_speedup": v["default"][metric],
        "plain_step_s": plain_s, "default_step_s": default_s,
        "levers": levers, "sizes": sizes, "data_wait_fraction": None,
        "wall_seconds": time.time() - started,
    }
    dc = ROOT / "benchmarks" / "results" / "distill_cost.json"
    if dc.exists():
        d = json.loads(dc.read_text())
        if "data_wait_fraction" in d:
            results["data_wait_fraction"] = d["data_wait_fraction"]
            results["data_wait_source"] = "benchmarks/results/distill_cost.json (the real loop)"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nnano training step, {threads} threads, {cpu_info()['model']} (bf16: {bf16_ok}); "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}; ratios on {metric}")
    print("| size x batch | variant | wall s (median, min-max) | speed-up vs plain (median, min-max) | loss rel. diff |")
    print("|---|---|---:|---:|---:|")
    for s, r in sizes.items():
        for name, x in r["variants"].items():
            w, sp = x["wall_s"], x[metric]
            print(f"| {s} | {name} | {w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f}) | "
                  f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f}) | {x['loss_rel_diff']:.1e} |")
    fr = results["fraction_of_round_peak"]
    print(f"\npeak fp32 {peak32['peak']:.0f} / bf16 {peak16['peak']:.0f} GFLOP/s; the loop's fp32 step ({fp32}) "
          f"{results['step_gflops']:.0f} GFLOP/s = {results['fraction_of_peak']:.2f} of fp32 peak "
          f"(of each round's own peak {fr['median']:.2f}, {fr['min']:.2f}-{fr['max']:.2f}); stock PyTorch (plain) {results['plain_fraction_of_peak']:.2f}; "
          f"default step {results['default_step_gflops']:.0f} GFLOP/s"
          + (f"; bf16_speedup {results['bf16_speedup']:.2f}" if bf16_ok else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
