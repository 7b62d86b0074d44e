#!/usr/bin/env python
"""Scaling plan for Kinetics-400 and Something-Something v2 from the figures measured here.

Reads the benchmark results in benchmarks/results/ (every measured input names the JSON file and
key it comes from), the cluster node types in cluster/aws.yaml and the production run settings in
configs/ucf101_base.yaml, and projects:

  * ingest hours on N CPU nodes, and which limit binds as N grows;
  * storage: clip shards and the teacher-logit cache;
  * teacher-cache build time on M GPUs;
  * distillation epoch time on M GPUs (cached KD and, for comparison, teacher in the loop),
    and whether the GPUs or the input pipeline set the pace.

Writes benchmarks/results/scaling_plan.json and prints the tables (Markdown); with
``--write-doc docs/scaling.md`` it refreshes the generated sections of the document (the tests
check that they match the result files).
    python benchmarks/scaling_plan.py [--gpu-tflops 35] [--gpu-fp32-tflops 15] [--write-doc docs/scaling.md]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "scaling_plan.json"

# Public dataset sizes (approximate: Kinetics videos disappear from YouTube over time).
DATASETS = {
    "kinetics400": {"name": "Kinetics-400", "train": 220_000, "val": 20_000, "unlabeled": 0, "classes": 400,
                    "shape": "k400_like"},
    # SSv2: 168,913 train + 24,777 validation + 27,157 test (no public labels: used as the unlabelled
    # KD pool, split "unlabeled", which only ever enters the KD term)
    "ssv2": {"name": "Something-Something v2", "train": 168_913, "val": 24_777, "unlabeled": 27_157,
             "classes": 174, "shape": "ssv2_like"},
}

# Assumptions: not measured here (no GPU, no cloud). Each is a parameter of the plan.
ASSUMED = {
    "gpu_effective_tflops": (35.0, "sustained dense bf16 TFLOP/s of one GPU of the A10G/L4 class in "
                                   "cluster/ on these models; not measured (no GPU here): replace with a measurement"),
    # the cache build's forward is strict fp32 (TF32 off: dvfl/teacher_cache.py), without the tensor cores
    "gpu_fp32_tflops": (15.0, "sustained dense fp32 TFLOP/s (TF32 off, as the teacher cache is built) of one "
                              "A10G/L4-class GPU: about half their ~30-31 TFLOP/s fp32 peak; not measured"),
    "ddp_efficiency": (0.9, "fraction of linear speed-up kept by DDP across M GPUs"),
    "vcpu_vs_core_here": (1.0, "one cloud vCPU does the work of one core of this machine (optimistic: "
                               "cloud vCPUs are hyperthreads)"),
    "head_nic_gbit_s": (10.0, "network into the head node, where the ingest driver receives every clip"),
    "storage_write_gib_s": (1.0, "aggregate write bandwidth of the shared file system / object store"),
    "storage_read_gib_s": (3.0, "aggregate read bandwidth of the shared file system / object store"),
    "train_step_flops_over_forward": (3.0, "a training step costs ~3 forward passes (forward + backward)"),
}
NODE_COUNTS = [1, 2, 4, 8, 16]
GPU_COUNTS = [1, 4, 8, 16, 32]


class Sources:
    """Loads JSON/YAML inputs and remembers, for every figure used, where it came from."""

    def __init__(self):
        self.cache: dict[str, dict] = {}
        self.used: dict[str, dict] = {}

    def _doc(self, rel: str) -> dict:
        if rel not in self.cache:
            text = (ROOT / rel).read_text()
            self.cache[rel] = json.loads(text) if rel.endswith(".json") else yaml.safe_load(text)
        return self.cache[rel]

    def get(self, name: str, rel: str, key: str, kind: str = "measured"):
        node = self._doc(rel)
        for part in _split_key(key):
            node = node[part]
        self.used[name] = {"value": node, "kind": kind, "source": f"{rel}: {key}"}
        return node

    def derived(self, name: str, value, how: str):
        self.used[name] = {"value": value, "kind": "derived", "source": how}
        return value


def _split_key(key: str) -> list:
    """``available_node_types[ray.worker.cpu].resources.CPU`` -> parts (brackets keep dots)."""
    parts, buf, depth = [], "", 0
    for ch in key:
        if ch == "[":
            depth += 1
            if buf:
                parts.append(buf)
            buf = ""
        elif ch == "]":
            depth -= 1
            parts.append(buf)
            buf = ""
        elif ch == "." and depth == 0:
            if buf:
                parts.append(buf)
            buf = ""
        else:
            buf += ch
    if buf:
        parts.append(buf)
    return parts


def inputs(src: Sources, gpu_tflops: float, gpu_fp32_tflops: float | None = None) -> dict:
    # distill_cost_amd.json: teacher and student both in fp32, as both run in bf16 on GPUs (on a CPU
    # with AMX the student trains in bf16 while the teacher stays fp32, which inflates the ratio)
    ip, ds, tc, dc, me = ("benchmarks/results/input_pipeline.json", "benchmarks/results/dataset_shapes.json",
                          "benchmarks/results/teacher_cache.json", "benchmarks/results/distill_cost_amd.json",
                          "benchmarks/results/model_efficiency.json")
    f = {}
    # run settings (the paper's: 8 x 224^2, 4 training views, 4 eval views, centre + flipped centre cached)
    f["frames"] = src.get("frames", "configs/ucf101_base.yaml", "data.frames", "config")
    f["views_train"] = src.get("views_train", "configs/ucf101_base.yaml", "data.clips_per_video", "config")
    f["views_eval"] = src.get("views_eval", "configs/ucf101_base.yaml", "data.eval_clips", "config")
    f["short_side"] = src.get("short_side", "configs/ucf101_base.yaml", "data.short_side", "config")
    f["crop"] = src.get("crop", "configs/ucf101_base.yaml", "data.crop_size", "config")
    f["teacher_views"] = len(src.get("teacher_views_list", "configs/ucf101_base.yaml", "teacher.views", "config"))
    f["student_epochs"] = src.get("student_epochs", "configs/ucf101_base.yaml", "optim.epochs", "config")
    # cluster node types
    aws = "cluster/aws.yaml"
    f["cpu_node_vcpus"] = src.get("cpu_node_vcpus", aws, "available_node_types[ray.worker.cpu].resources.CPU", "config")
    f["gpu_node_gpus"] = src.get("gpu_node_gpus", aws, "available_node_types[ray.worker.gpu].resources.GPU", "config")
    f["gpu_node_vcpus"] = src.get("gpu_node_vcpus", aws, "available_node_types[ray.worker.gpu].resources.CPU", "config")
    # ingest, at the datasets' shapes (measured here)
    for shape in ("k400_like", "ssv2_like"):
        # marginal cost per clip (difference of two run sizes: no start-up cost in it)
        f[f"{shape}.ingest_cpu_ms_per_clip"] = src.get(f"{shape}.ingest_cpu_ms_per_clip", ds, f"shapes.{shape}.ingest_marginal.cpu_ms_per_clip")
        f[f"{shape}.driver_cpu_ms_per_clip"] = src.get(f"{shape}.driver_cpu_ms_per_clip", ds, f"shapes.{shape}.ingest_marginal.driver_cpu_ms_per_clip")
        src.get(f"{shape}.ingest_cpu_ms_per_clip_run_average", ds, f"shapes.{shape}.ingest.cpu_ms_per_clip")
        f[f"{shape}.bytes_per_clip_disk"] = src.get(f"{shape}.bytes_per_clip_disk", ds, f"shapes.{shape}.storage.bytes_per_clip_disk")
        f[f"{shape}.raw_bytes_per_clip"] = src.get(f"{shape}.raw_bytes_per_clip", ds, f"shapes.{shape}.storage.raw_bytes_per_clip")
        f[f"{shape}.read_cpu_ms_per_clip"] = src.get(f"{shape}.read_cpu_ms_per_clip", ds, f"shapes.{shape}.read.cpu_ms_per_clip")
        f[f"{shape}.stored_clip_shape"] = src.get(f"{shape}.stored_clip_shape", ds, f"shapes.{shape}.stored_clip_shape")
    # cross-checks from the input-pipeline benchmark (UCF-like 320x240 -> short side 128)
    f["ucf_like.ingest_cpu_ms_per_clip"] = src.get("ucf_like.ingest_cpu_ms_per_clip", ip, "sets.ucf_like_320x240.a_ingest.cpu_ms_per_clip")
    # the driver's own CPU per clip once decode tasks write their shards (benchmarks/input_pipeline.py
    # --section writers, median of interleaved rounds; per task, not per pixel, so one shape serves)
    f["driver_cpu_ms_per_clip_workers_write"] = src.get(
        "driver_cpu_ms_per_clip_workers_write", "benchmarks/results/input_pipeline_writers.json",
        "workers_driver_cpu_ms_per_clip.median")
    f["ucf_like.raw_decode_cpu_ms_per_clip"] = src.get("ucf_like.raw_decode_cpu_ms_per_clip", ip, "sets.ucf_like_320x240.a_raw_decode_1proc.cpu_ms_per_clip")
    # teacher-logit cache bytes: fp16 raw logits are 2*C bytes; the rest is Parquet per-row overhead
    per_view = src.get("cache.fp16_bytes_per_view", tc, "cache.float16.bytes_per_view")
    raw_view = src.get("cache.fp16_raw_bytes_per_view", tc, "cache.float16.raw_logit_bytes_per_view")
    f["cache_row_overhead_bytes"] = src.derived("cache_row_overhead_bytes", per_view - raw_view,
                                                f"{tc}: cache.float16.bytes_per_view - cache.float16.raw_logit_bytes_per_view")
    # model cost (8 x 224^2)
    f["teacher_gflops"] = src.get("teacher_flops", me, "models.base.flops_per_clip") / 1e9
    f["student_gflops"] = src.get("student_flops", me, "models.nano.flops_per_clip") / 1e9
    f["teacher_cpu_s_per_clip"] = src.get("teacher_cpu_latency_ms", me, "models.base.latency_ms_median") / 1e3
    f["student_cpu_s_per_clip"] = src.get("student_cpu_latency_ms", me, "models.nano.latency_ms_median") / 1e3
    f["cpu_threads"] = src.get("cpu_threads", me, "config.threads", "setting")
    # measured relative costs inside training (CPU, Video-FocalNet-B -> nano at 8 x 112^2)
    f["teacher_fwd_over_student_step"] = src.get("teacher_fwd_over_student_step", tc, "paper_pair_112.teacher_over_student_step")
    f["online_over_cached_epoch"] = src.get("online_over_cached_epoch", dc, "online_over_cached")
    f["cached_over_ce_epoch"] = src.get("cached_over_ce_epoch", dc, "cached_over_ce")
    for k, (v, why) in ASSUMED.items():
        given = {"gpu_effective_tflops": gpu_tflops, "gpu_fp32_tflops": gpu_fp32_tflops}.get(k)
        value = given or v
        src.used[k] = {"value": value, "kind": "assumed", "source": why}
        f[k] = value
    return f


def plan(f: dict, src: Sources) -> dict:
    out = {}
    teacher_gpu_s = f["teacher_gflops"] / (f["gpu_effective_tflops"] * 1e3)  # s per clip
    # the student step, priced relative to the teacher forward by the ratio measured in training;
    # by FLOPs alone it would be cheaper (3 x 54 vs 441 GFLOP), so this is the conservative side
    step_by_flops = f["train_step_flops_over_forward"] * f["student_gflops"] / f["teacher_gflops"]
    step_rel = max(1.0 / f["teacher_fwd_over_student_step"], step_by_flops)
    student_gpu_s = teacher_gpu_s * step_rel
    src.derived("teacher_gpu_s_per_clip", teacher_gpu_s, "teacher_gflops / gpu_effective_tflops")
    cache_gpu_s = f["teacher_gflops"] / (f["gpu_fp32_tflops"] * 1e3)  # the cache's fp32 forward, s per view
    src.derived("teacher_cache_gpu_s_per_view", cache_gpu_s, "teacher_gflops / gpu_fp32_tflops")
    src.derived("student_step_gpu_s_per_clip", student_gpu_s,
                "teacher_gpu_s_per_clip / teacher_fwd_over_student_step (measured ratio; >= the FLOP ratio)")
    for key, d in DATASETS.items():
        shape = d["shape"]
        train_clips = (d["train"] + d["unlabeled"]) * f["views_train"]
        eval_clips = d["val"] * f["views_eval"]
        clips = train_clips + eval_clips
        cached_views = train_clips * f["teacher_views"]
        # ---------------------------------------------------------------- ingest
        tree_ms, driver_ms = f[f"{shape}.ingest_cpu_ms_per_clip"], f[f"{shape}.driver_cpu_ms_per_clip"]
        worker_ms = max(tree_ms - driver_ms, 1e-9)
        disk_b, raw_b = f[f"{shape}.bytes_per_clip_disk"], f[f"{shape}.raw_bytes_per_clip"]
        caps = {
            "driver (receives and writes every clip)": 1000.0 / driver_ms,
            "head network (raw clips into the driver)": f["head_nic_gbit_s"] * 1e9 / 8 / raw_b,
            "storage write": f["storage_write_gib_s"] * 2**30 / disk_b,
        }
        ingest_rows = []
        for n in NODE_COUNTS:
            vcpus = n * f["cpu_node_vcpus"] * f["vcpu_vs_core_here"]
            # the ingest as built: each decode task writes its own shard, the driver plans tasks and
            # reads sidecars (measured per clip), so the write cost is on the workers (whole tree's
            # CPU per clip, an upper bound) and nothing funnels through the head
            spread = {"CPU decode + write (worker nodes)": vcpus * 1000.0 / tree_ms,
                      "driver (plans tasks, reads sidecars)": 1000.0 / f["driver_cpu_ms_per_clip_workers_write"],
                      "storage write": caps["storage write"]}
            bound2 = min(spread, key=spread.get)
            rate2 = spread[bound2]
            # before (writer="driver"): every clip shipped to the driver, which wrote the shards
            limits = {"CPU decode (worker nodes)": vcpus * 1000.0 / worker_ms, **caps}
            bound = min(limits, key=limits.get)
            rate = limits[bound]
            ingest_rows.append({"nodes": n, "vcpus": n * f["cpu_node_vcpus"],
                                # as built: decode + write on the workers (the header's per-vCPU rate)
                                "decode_capacity_clips_per_s": spread["CPU decode + write (worker nodes)"],
                                "clips_per_s": rate2, "hours": clips / rate2 / 3600, "bound_by": bound2,
                                "write_mib_s": rate2 * disk_b / 2**20,
                                "cpu_rate_needs_write_gib_s": spread["CPU decode + write (worker nodes)"] * disk_b / 2**30,
                                # what the nodes give when the storage keeps up (the assumed bandwidth binds early)
                                "hours_if_storage_keeps_up": clips / min(v for k, v in spread.items()
                                                                         if k != "storage write") / 3600,
                                "driver_written": {"decode_capacity_clips_per_s": limits["CPU decode (worker nodes)"],
                                                   "clips_per_s": rate, "hours": clips / rate / 3600, "bound_by": bound,
                                                   "write_mib_s": rate * disk_b / 2**20,
                                                   "into_head_gbit_s": rate * raw_b * 8 / 1e9}})
        # ---------------------------------------------------------------- storage
        cache_bytes_per_view = 2 * d["classes"] + f["cache_row_overhead_bytes"]
        storage = {"clips": clips, "train_clips": train_clips, "eval_clips": eval_clips,
                   "shards_tb": clips * disk_b / 1e12, "shards_raw_tb": clips * raw_b / 1e12,
                   "cached_views": cached_views, "cache_bytes_per_view": cache_bytes_per_view,
                   "cache_gb": cached_views * cache_bytes_per_view / 1e9,
                   "cache_fp32_gb": cached_views * (4 * d["classes"] + f["cache_row_overhead_bytes"]) / 1e9}
        # ---------------------------------------------------------------- cache build + distillation
        read_ms = f[f"{shape}.read_cpu_ms_per_clip"]
        gpu_rows = []
        for m in GPU_COUNTS:
            eff = m * (f["ddp_efficiency"] if m > 1 else 1.0)
            vcpus = m * f["gpu_node_vcpus"] / f["gpu_node_gpus"] * f["vcpu_vs_core_here"]
            storage_rate = f["storage_read_gib_s"] * 2**30 / disk_b
            # cache build: one teacher actor per GPU, each stored training clip read once and
            # forwarded once per cached view; independent actors, so no DDP loss
            cache_limits = {"GPU compute": m / (f["teacher_views"] * cache_gpu_s),
                            "input CPU on the GPU nodes": vcpus * 1000.0 / read_ms, "storage read": storage_rate}
            cache_bound = min(cache_limits, key=cache_limits.get)
            cache_h = train_clips / cache_limits[cache_bound] / 3600
            epoch_gpu_h = train_clips * student_gpu_s / eff / 3600
            # input side: clips/s the GPUs consume vs what the GPU nodes' CPUs can read + decode
            need_clips_s = train_clips / (epoch_gpu_h * 3600)
            input_rate = vcpus * 1000.0 / read_ms
            limits = {"GPU compute": need_clips_s, "input CPU on the GPU nodes": input_rate,
                      "storage read": storage_rate}
            bound = min(limits, key=limits.get)
            epoch_h = train_clips / limits[bound] / 3600
            gpu_rows.append({
                "gpus": m, "cache_build_hours": cache_h, "cache_bound_by": cache_bound,
                "cache_read_mib_s": train_clips / (cache_h * 3600) * disk_b / 2**20,
                "epoch_hours_gpu_only": epoch_gpu_h, "epoch_hours": epoch_h, "epoch_bound_by": bound,
                "input_vcpus_needed_per_gpu": need_clips_s * read_ms / 1000.0 / m,
                # teacher in the loop: the GPU part grows by the in-loop ratio measured on CPU; the
                # input side is unchanged, so it binds later (if at all)
                "epoch_hours_online_kd": max(epoch_gpu_h * f["online_over_cached_epoch"],
                                             train_clips / min(input_rate, storage_rate) / 3600),
                "distillation_hours": epoch_h * f["student_epochs"],
            })
        # the same cache on CPU nodes instead, at the measured CPU cost of a teacher forward
        cpu_core_h = cached_views * f["teacher_cpu_s_per_clip"] * f["cpu_threads"] / 3600
        cache_on_cpus = {"core_hours": cpu_core_h,
                         "hours_on_16_cpu_nodes": cpu_core_h / (16 * f["cpu_node_vcpus"] * f["vcpu_vs_core_here"])}
        out[key] = {"dataset": d, "cache_on_cpus": cache_on_cpus, "ingest": ingest_rows, "ingest_caps_clips_per_s": caps,
                    "ingest_clips_per_s_per_vcpu": 1000.0 / tree_ms,  # as built: the workers decode and write
                    "ingest_clips_per_s_per_vcpu_driver_written": 1000.0 / worker_ms, "storage": storage, "gpu": gpu_rows,
                    "teacher_gpu_s_per_clip": teacher_gpu_s, "teacher_cache_gpu_s_per_view": cache_gpu_s,
                    "student_step_gpu_s_per_clip": student_gpu_s}
    return out


def markdown(f: dict, p: dict) -> str:
    lines = []
    for key, r in p.items():
        d, s = r["dataset"], r["storage"]
        lines += [f"### {d['name']}", "",
                  f"{d['train']:,} train + {d['unlabeled']:,} unlabelled + {d['val']:,} val videos → "
                  f"{s['train_clips']:,} training clips ({f['views_train']} views/video) + {s['eval_clips']:,} eval clips "
                  f"({f['views_eval']} views/video); {s['cached_views']:,} cached teacher views "
                  f"({f['teacher_views']} per training clip), {d['classes']} classes.", "",
                  "| storage | size |", "|---|---:|",
                  f"| clip shards (Parquet + zstd, as measured) | {s['shards_tb']:.2f} TB |",
                  f"| clip shards, raw uint8 (upper bound) | {s['shards_raw_tb']:.2f} TB |",
                  f"| teacher-logit cache, fp16 ({s['cache_bytes_per_view']:.0f} B/view) | {s['cache_gb']:.2f} GB |",
                  f"| teacher-logit cache, fp32 | {s['cache_fp32_gb']:.2f} GB |", "",
                  f"Ingest of {s['clips']:,} clips ({r['ingest_clips_per_s_per_vcpu']:.1f} clips/s per vCPU of decode "
                  "and write work): decode tasks write their own shards (as built), and before (the driver wrote "
                  f"every shard; {r['ingest_clips_per_s_per_vcpu_driver_written']:.1f} clips/s per vCPU of decode):", "",
                  "| CPU nodes (vCPUs) | decode capacity | clips/s | hours | bound by | writes needed at CPU rate | "
                  "hours if the storage keeps up | before: clips/s | hours | bound by |",
                  "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
        for row in r["ingest"]:
            w = row["driver_written"]
            lines.append(f"| {row['nodes']} ({row['vcpus']}) | {row['decode_capacity_clips_per_s']:,.0f}/s | "
                         f"{row['clips_per_s']:,.0f} | {_h(row['hours'])} | {row['bound_by']} | "
                         f"{row['cpu_rate_needs_write_gib_s']:.1f} GiB/s | {_h(row['hours_if_storage_keeps_up'])} | "
                         f"{w['clips_per_s']:,.0f} | {_h(w['hours'])} | {w['bound_by']} |")
        c = r["cache_on_cpus"]
        lines += ["", "Teacher cache and distillation on M GPUs (the same cache on CPUs instead: "
                  f"{c['core_hours']:,.0f} core-hours at the measured CPU cost of a teacher forward, "
                  f"{c['hours_on_16_cpu_nodes']:.0f} h on 16 CPU nodes):", "",
                  "| GPUs | cache build | bound by | epoch (cached KD) | bound by | input vCPUs needed / GPU | "
                  f"epoch, teacher in the loop | {f['student_epochs']} epochs, cached KD |",
                  "|---:|---:|---|---:|---|---:|---:|---:|"]
        for row in r["gpu"]:
            lines.append(f"| {row['gpus']} | {_h(row['cache_build_hours'])} | {row['cache_bound_by']} | "
                         f"{_h(row['epoch_hours'])} | {row['epoch_bound_by']} | {row['input_vcpus_needed_per_gpu']:.1f} | "
                         f"{_h(row['epoch_hours_online_kd'])} | {_h(row['distillation_hours'])} |")
        lines.append("")
    return "\n".join(lines)


def inputs_markdown(used: dict) -> str:
    lines = ["| figure | value | kind | source (file: key) |", "|---|---:|---|---|"]
    for name, u in used.items():
        v = u["value"]
        if isinstance(v, (int, float)) and abs(v) >= 1e4:
            v = f"{v:,.0f}"
        elif isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = "×".join(map(str, v)) if all(isinstance(x, int) for x in v) else ", ".join(map(str, v))
        lines.append(f"| {name} | {v} | {u['kind']} | {u['source']} |")
    return "\n".join(lines)


BEGIN, END = "<!-- scaling_plan.py:{} begin -->", "<!-- scaling_plan.py:{} end -->"


SUMMARY_GPUS = 8  # cluster/aws.yaml allows 2 GPU nodes x 4 GPUs


def summary_markdown(f: dict, p: dict) -> str:
    k, s = p["kinetics400"], p["ssv2"]
    gk = next(r for r in k["gpu"] if r["gpus"] == SUMMARY_GPUS)
    gs = next(r for r in s["gpu"] if r["gpus"] == SUMMARY_GPUS)
    return "\n".join([
        f"| projected (GPU throughput assumed: {f['gpu_effective_tflops']:g} TFLOPS bf16 training, "
        f"{f['gpu_fp32_tflops']:g} TFLOPS fp32 cache build) | Kinetics-400 | SSv2 |",
        "|---|---:|---:|",
        f"| clip shards on disk | {k['storage']['shards_tb']:.1f} TB | {s['storage']['shards_tb']:.1f} TB |",
        f"| teacher-logit cache (fp16) | {k['storage']['cache_gb']:.1f} GB | {s['storage']['cache_gb']:.1f} GB |",
        *[f"| ingest, {n} CPU node{'s' if n > 1 else ''} (decode tasks write their shards): at "
          f"{f['storage_write_gib_s']:g} GiB/s of storage writes / if the storage keeps up | "
          f"{_h(kr['hours'])} / {_h(kr['hours_if_storage_keeps_up'])} | "
          f"{_h(sr['hours'])} / {_h(sr['hours_if_storage_keeps_up'])} |"
          for kr, sr in zip(k["ingest"], s["ingest"]) for n in [kr["nodes"]] if n in (1, 2, 16)],
        f"| ingest before (the driver wrote every shard), any number of CPU nodes | "
        f"{_h(k['ingest'][0]['driver_written']['hours'])} | {_h(s['ingest'][0]['driver_written']['hours'])} |",
        f"| teacher cache on {SUMMARY_GPUS} GPUs | {_h(gk['cache_build_hours'])} | {_h(gs['cache_build_hours'])} |",
        f"| cached-KD epoch on {SUMMARY_GPUS} GPUs | {_h(gk['epoch_hours'])} | {_h(gs['epoch_hours'])} |",
        f"| {f['student_epochs']} epochs on {SUMMARY_GPUS} GPUs (cached KD) | {_h(gk['distillation_hours'])} "
        f"| {_h(gs['distillation_hours'])} |",
        f"| epoch with the teacher in the loop, {SUMMARY_GPUS} GPUs | {_h(gk['epoch_hours_online_kd'])} "
        f"| {_h(gs['epoch_hours_online_kd'])} |",
    ])


def generated_blocks(f: dict, p: dict, used: dict) -> dict:
    return {"summary": summary_markdown(f, p), "inputs": inputs_markdown(used), "tables": markdown(f, p)}


def replace_blocks(text: str, blocks: dict) -> str:
    """Replace each ``<!-- scaling_plan.py:NAME begin -->...end -->`` section of a document."""
    for name, body in blocks.items():
        b, e = BEGIN.format(name), END.format(name)
        i, j = text.index(b) + len(b), text.index(e)
        text = text[:i] + "\n" + body.strip() + "\n" + text[j:]
    return text


def extract_blocks(text: str, names) -> dict:
    out = {}
    for name in names:
        b, e = BEGIN.format(name), END.format(name)
        out[name] = text[text.index(b) + len(b):text.index(e)].strip()
    return out


def _h(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu-tflops", type=float, default=None,
                    help=f"effective bf16 TFLOPS per GPU, training (default {ASSUMED['gpu_effective_tflops'][0]}, an assumption)")
    ap.add_argument("--gpu-fp32-tflops", type=float, default=None,
                    help=f"effective fp32 TFLOPS per GPU, the cache build (default {ASSUMED['gpu_fp32_tflops'][0]}, an assumption)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--write-doc", metavar="MD", help="refresh the generated sections of this document "
                    "(docs/scaling.md) in place")
    a = ap.parse_args(argv)
    src = Sources()
    f = inputs(src, a.gpu_tflops, a.gpu_fp32_tflops)
    p = plan(f, src)
    result = {"inputs": src.used, "plan": p}
    Path(a.out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    blocks = generated_blocks(f, p, src.used)
    if a.write_doc:
        doc = Path(a.write_doc)
        doc.write_text(replace_blocks(doc.read_text(), blocks))
    print(blocks["tables"])
    print("inputs (measured = benchmark result file; config = repository file; assumed = parameter):")
    for name, u in src.used.items():
        v = u["value"]
        v = f"{v:.4g}" if isinstance(v, float) else v
        print(f"  {u['kind']:<8} {name:<38} {v!s:<14} {u['source']}")
    return result


if __name__ == "__main__":
    main()
