#!/usr/bin/env python
"""Deployment figures on this machine's CPU -> benchmarks/results/deploy.json (+ a printed table).

    python benchmarks/deploy.py [--repeats 5] [--model DIR --clips DIR] [--skip SECTION]

1. Top-1 of every engine (below) on a test set, fp32 as the reference: needs ``--clips`` (an
   ingest output: its test split is the test set, its train split calibrates static int8) and
   ``--model`` (a trained model; without it a random-weight model is used and labelled so).
2. Latency at 8x224², batch 1, nano, same clip, interleaved round by round (median, min-max):
   PyTorch eager fp32 and bf16 autocast, torch.ao dynamic int8 (nn.Linear), ONNX Runtime fp32,
   ORT dynamic int8 on every op / on MatMul+Gemm only (per-tensor, per-channel), ORT static QDQ
   int8. ``int8`` in the results: the fastest int8 engine within 1 point of fp32's top-1.
3. Streaming real-time factor: windows the model processes per second / windows arriving per
   second (25 fps, a window every ``--stride`` frames), nano vs base at 8x224² and 8x112².
4. Ray Serve load test on 127.0.0.1: p50/p95/p99 latency and videos/s at concurrency 1, 4, 16,
   with a share of bad uploads (each must get a 4xx; no good upload may fail), nano vs base.

Wall time is bounded: section 2 stops adding rounds after ``--latency-budget`` s (at least 2
rounds), section 4 sends no request after ``--serve-seconds`` per level (a level ends at most one
request's time, 120 s, later) and at most ``--serve-requests``; sections 1 and 3 do a fixed
amount of work, which stretches with the machine's load. The results record the total wall time,
the load average (start, per latency round, end) and the CPU model; each section is saved as soon
as it is measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import cpu_model  # noqa: E402


def stats(xs) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(1000 * statistics.median(xs), 2), "min_ms": round(1000 * xs[0], 2),
            "max_ms": round(1000 * xs[-1], 2), "n": len(xs)}


def pct(xs, q) -> float:
    return round(1000 * float(np.percentile(xs, q)), 1) if xs else float("nan")


def make_model(name: str, size: int, classes: int = 101):
    import timm

    import dvfl.models  # noqa: F401

    return timm.create_model(name, num_classes=classes, num_frames=8, img_size=size, drop_path_rate=0.0).eval()


ENGINES = ("torch_eager", "torch_eager_conv2d", "torch_bf16_autocast", "torch_ao_int8_linear", "ort_fp32",
           "ort_fp32_conv1d", "ort_int8_dynamic_all",
           "ort_int8_dynamic_matmul", "ort_int8_dynamic_matmul_per_channel", "ort_int8_static_qdq")
# how each engine was made (written into the results next to its figures)
RECIPES = {
    "torch_eager": "PyTorch fp32, inference_mode",
    "torch_eager_conv2d": "PyTorch fp32, inference_mode, temporal path as (k, 1) Conv2d (the exported graph's "
                          "formulation; same weights and outputs)",
    "torch_bf16_autocast": "PyTorch, torch.autocast('cpu', bfloat16) (AMX-bf16 / AVX512-BF16 where the CPU has them)",
    "torch_ao_int8_linear": "torch.ao.quantization.quantize_dynamic({nn.Linear}, qint8): int8 weights, "
                            "activations quantised per batch",
    "ort_fp32": "ONNX Runtime fp32, CPUExecutionProvider, graph optimisation ORT_ENABLE_ALL; pipelines/export.py's "
                "graph (temporal path as (k, 1) Conv2d)",
    "ort_fp32_conv1d": "as ort_fp32, graph traced with the official Conv1d temporal path",
    "ort_int8_dynamic_all": "ORT quantize_dynamic, every supported op (Conv -> ConvInteger, MatMul -> "
                            "MatMulInteger), per-tensor, QInt8 weights",
    "ort_int8_dynamic_matmul": "ORT quantize_dynamic restricted to MatMul/Gemm, per-tensor, reduce_range off",
    "ort_int8_dynamic_matmul_per_channel": "ORT quantize_dynamic restricted to MatMul/Gemm, per-channel weights, "
                                           "reduce_range off",
    "ort_int8_static_qdq": "ORT quantize_static, QDQ format, Conv/MatMul/Gemm, per-channel QInt8 weights, QUInt8 "
                           "activations, MinMax calibration on real training clips",
}


class _Calib:
    """ONNX Runtime calibration reader over a list of input batches."""

    def __init__(self, batches):
        self.it = iter([{"video": b.numpy()} for b in batches])

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # not needed: one pass
        pass


def build_engines(model, example: torch.Tensor, calib: list, tmp: Path, threads: int, only=None) -> dict:
    """name -> fn(x) -> logits (numpy) for every engine of ENGINES (or ``only``), all from ``model``."""
    import copy

    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from dvfl.export import export_onnx
    from dvfl.models import set_temporal_impl

    names = only or ENGINES
    model = model.eval()
    engines = {}

    def eager(m):
        return lambda x: m(x).float().numpy()

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().numpy()

    if "torch_eager" in names:
        engines["torch_eager"] = eager(model)
    if "torch_eager_conv2d" in names:
        conv2d = copy.deepcopy(model)
        set_temporal_impl(conv2d, "conv2d")
        engines["torch_eager_conv2d"] = eager(conv2d)
    if "torch_bf16_autocast" in names:
        engines["torch_bf16_autocast"] = bf16
    if "torch_ao_int8_linear" in names:
        with warnings.catch_warnings():  # torch.ao's deprecation notices (it still works in this torch)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        engines["torch_ao_int8_linear"] = eager(q)
    ort_names = [n for n in names if n.startswith("ort_")]
    if not ort_names:
        return engines
    fp32 = tmp / "ort_fp32.onnx"  # every ORT engine's graph is tmp / f"{name}.onnx"
    export_onnx(model, fp32, [example])
    files = {"ort_fp32": fp32}
    if "ort_fp32_conv1d" in names:
        files["ort_fp32_conv1d"] = tmp / "ort_fp32_conv1d.onnx"
        export_onnx(model, files["ort_fp32_conv1d"], [example], temporal_impl="conv1d")
    logging.getLogger().setLevel(logging.ERROR)  # ORT quantisation's generic "consider pre-processing" advice
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    mm = ["MatMul", "Gemm"]
    recipes = {"ort_int8_dynamic_all": {},
               "ort_int8_dynamic_matmul": {"op_types_to_quantize": mm, "reduce_range": False},
               "ort_int8_dynamic_matmul_per_channel": {"op_types_to_quantize": mm, "per_channel": True,
                                                       "reduce_range": False}}
    for name, kw in recipes.items():
        if name in names:
            files[name] = tmp / f"{name}.onnx"
            quantize_dynamic(str(fp32), str(files[name]), weight_type=QuantType.QInt8, **kw)
    if "ort_int8_static_qdq" in names:
        files["ort_int8_static_qdq"] = tmp / "ort_int8_static_qdq.onnx"
        # calibration holds every batch's activations at once (ORT 1.31's CalibMaxIntermediateOutputs
        # drops them instead: "No data is collected"), hence few calibration clips at 224²
        quantize_static(str(fp32), str(files["ort_int8_static_qdq"]), _Calib(calib), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", *mm], per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    for name in ort_names:
        sess = ort.InferenceSession(str(files[name]), opts, providers=["CPUExecutionProvider"])
        engines[name] = (lambda s: lambda x: s.run(None, {"video": x.numpy()})[0])(sess)
    return engines


def graph_ops(path: Path) -> dict:
    import collections

    import onnx

    c = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    keep = ("Conv", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger", "Gemm", "QuantizeLinear",
            "DequantizeLinear", "DynamicQuantizeLinear", "Cast")
    return {k: c[k] for k in keep if c[k]}


def latency_section(repeats: int, budget_s: float, tmp: Path, size: int, calib: list, calib_source: str) -> dict:
    """Every engine on the same clip, interleaved round by round; at least 2 rounds, then more
    until ``repeats`` or ``budget_s`` (the section's wall-time bound) is reached."""
    torch.manual_seed(0)
    model = make_model("videofocalnet_nano", size)
    x = torch.randn(1, 8, 3, size, size)
    threads = torch.get_num_threads()
    d = tmp / f"lat{size}"
    d.mkdir()
    t_build = time.perf_counter()
    calib = [torch.nn.functional.interpolate(c.flatten(0, 1), size=(size, size), mode="bilinear",
                                             align_corners=False).view(c.shape[0], c.shape[1], 3, size, size)
             for c in calib]
    engines = build_engines(model, x, calib, d, threads)
    ops = {n: graph_ops(d / f"{n}.onnx") for n in engines if n.startswith("ort_")}
    build_s = time.perf_counter() - t_build
    times = {k: [] for k in engines}
    loads = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for fn in engines.values():  # warm-up
            fn(x)
        rounds = 0
        while rounds < max(2, repeats) and (rounds < 2 or time.perf_counter() - t0 < budget_s):
            for k, fn in engines.items():  # interleaved: the machine's load hits every engine alike
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
            rounds += 1
            loads.append(os.getloadavg()[0])
    out = {k: stats(v) for k, v in times.items()}
    eager_ms = out["torch_eager"]["median_ms"]
    for k in engines:
        out[k]["over_eager"] = round(out[k]["median_ms"] / eager_ms, 3)
        out[k]["recipe"] = RECIPES[k]
        if k in ops:
            out[k]["graph_ops"] = ops[k]
    out["ort_fp32_over_eager"] = out["ort_fp32"]["over_eager"]
    if "torch_eager_conv2d" in out:  # against PyTorch running the exported graph's formulation
        out["ort_fp32_over_eager_conv2d"] = round(out["ort_fp32"]["median_ms"] / out["torch_eager_conv2d"]["median_ms"], 3)
    out.update(input=f"1x8x3x{size}x{size}", threads=threads, rounds=rounds, weights="random (seed 0)",
               build_s=round(build_s, 1), timed_s=round(time.perf_counter() - t0, 1),
               load_average_1min_per_round=loads,
               calibration=f"{len(calib)} {calib_source}, bilinearly resized to {size}x{size}")
    return out


def load_split(clips_dir: str, split: str, size: int, limit: int | None = None):
    """(clips as normalised ``(N, T, 3, size, size)``, labels): one clip per video, centre crop:
    evaluation's 1x1 views (of a stored grid of N clips, the one evaluation and predict take)."""
    import pyarrow.parquet as pq

    from dvfl.data.sampling import spread_clips
    from dvfl.data.shards import load_dataset_info, shard_paths
    from dvfl.data.views import View, batch_arrays, make_clip_batch, normalize

    # (training videos store training views, of which any one calibrates)
    (index,) = {0} if split == "train" else spread_clips(1, int(load_dataset_info(clips_dir)["params"].get("eval_clips", 1)))
    xs, ys, n = [], [], 0
    for path in shard_paths(clips_dir, [split]):
        t = pq.read_table(path, columns=["clip_id", "label", "view_index", "frames", "num_frames", "height", "width"])
        t = t.filter(np.array(t.column("view_index").to_pylist()) == index)
        if limit is not None:
            t = t.slice(0, limit - n)
        arrays, _, y = batch_arrays(t)
        if arrays:
            xs.append(normalize(make_clip_batch(arrays, size, [View()] * len(arrays))))
            ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ValueError(f"{clips_dir}: no {split!r} clips")
    return torch.cat(xs), np.concatenate(ys)


def accuracy_section(model_dir: str | None, clips_dir: str, tmp: Path, calib_clips: int) -> dict:
    """Video-level top-1 of every engine on the test split (evaluation's 1x1 views), fp32 as the
    reference; static quantisation is calibrated on training clips, never on test clips."""
    from dvfl.artifacts import load_model
    from dvfl.data.shards import load_dataset_info

    if model_dir:
        model, spec = load_model(model_dir)
        weights = f"trained: {model_dir}"
    else:  # no trained model: a random one of the clips' shape (latency of the path only; top-1 is chance)
        info = load_dataset_info(clips_dir)
        torch.manual_seed(0)
        spec = {"kwargs": {"img_size": info["params"]["short_side"]}}
        model = make_model("videofocalnet_nano", spec["kwargs"]["img_size"], len(info["classes"]))
        weights = "random (seed 0): no --model given, top-1 figures are chance level"
    size = spec["kwargs"]["img_size"]
    x, y = load_split(clips_dir, "test", size)
    calib_x, _ = load_split(clips_dir, "train", size, calib_clips)
    d = tmp / "acc"
    d.mkdir()
    engines = build_engines(model, x[:2], list(calib_x.split(8)), d, torch.get_num_threads())
    preds = {}
    with torch.inference_mode():
        for name, fn in engines.items():
            preds[name] = np.concatenate([fn(x[i:i + 16]).argmax(1) for i in range(0, len(x), 16)])
    ref = preds["torch_eager"]
    top1 = {k: round(float((p == y).mean()), 6) for k, p in preds.items()}
    out = {"weights": weights, "clips": clips_dir, "split": "test", "views": "1x1 (one uniform clip, centre crop)",
           "videos": int(len(y)), "calibration_clips": int(len(calib_x)),
           "engines": {k: {"top1": top1[k], "top1_change_points": round(100 * (top1[k] - top1["torch_eager"]), 2),
                           "agreement_with_fp32": round(float((p == ref).mean()), 6)} for k, p in preds.items()}}
    if model_dir:
        recorded = [v for k, v in spec.items() if k.startswith("eval_test_1x1_")]
        out["recorded_eval_top1"] = recorded[0]["top1"] if recorded else None
    return out


def choose_int8(latency: dict | None, accuracy: dict | None, max_drop_points: float = 1.0) -> dict:
    """The fastest int8 engine whose top-1 is within ``max_drop_points`` of fp32."""
    if not latency or not accuracy:
        return {}
    ok = {k: v for k, v in accuracy["engines"].items()
          if "int8" in k and k in latency and abs(v["top1_change_points"]) <= max_drop_points}
    if not ok:
        return {"int8_choice": None, "reason": f"no int8 engine within {max_drop_points} point of fp32"}
    best = min(ok, key=lambda k: latency[k]["median_ms"])
    acc = accuracy["engines"]
    return {"int8_choice": best, "int8_top1": acc[best]["top1"], "fp32_top1": acc["torch_eager"]["top1"],
            "int8_top1_change_points": acc[best]["top1_change_points"], "test_videos": accuracy["videos"],
            "int8_median_ms": latency[best]["median_ms"], "int8_over_eager": latency[best]["over_eager"],
            "int8_over_ort_fp32": round(latency[best]["median_ms"] / latency["ort_fp32"]["median_ms"], 3),
            "weights": accuracy["weights"], "rule": f"fastest int8 engine with |top-1 change| <= {max_drop_points} point"}


def streaming_section(repeats: int, stride: int, fps: float, sizes, names) -> dict:
    out = {}
    with torch.inference_mode():
        for name in names:
            for size in sizes:
                model = make_model(f"videofocalnet_{name}", size)
                x = torch.randn(1, 8, 3, size, size)
                model(x)
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(x)
                    ts.append(time.perf_counter() - t0)
                per = statistics.median(ts)
                out[f"{name}_8x{size}"] = {"window_ms": round(1000 * per, 1),
                                           "real_time_factor": round((1 / per) / (fps / stride), 3)}
                del model
    return {"fps": fps, "stride": stride, "models": out}


def serve_section(model_dir: str, video: bytes, levels, max_requests: int, max_seconds: float,
                  bad_share: float) -> dict:
    import urllib.error
    import urllib.request

    import ray
    from ray import serve

    from dvfl.serve import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"

    def post(body):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120) as r:
                r.read()
                return r.status, time.perf_counter() - t0
        except urllib.error.HTTPError as e:
            return e.code, time.perf_counter() - t0
        except Exception:
            return -1, time.perf_counter() - t0

    bad = b"not a video at all\n" * 20
    ray.init(address="local", num_cpus=3, object_store_memory=256 * 2 ** 20, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    rows = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": model_dir, "cpus_per_replica": 1, "torch_threads": 2, "topk": 5}),
                  name="dvfl-bench", route_prefix="/")
        post(video)  # warm-up
        for c in levels:
            n = max_requests
            bodies = [bad if (i % round(1 / bad_share) == 0 and bad_share) else video for i in range(1, n + 1)]
            t_start = time.perf_counter()
            results = []

            def send(body):  # a request whose turn comes after the level's time bound is not sent
                return post(body) if time.perf_counter() - t_start <= max_seconds else None

            with ThreadPoolExecutor(c) as pool:
                futures = [(b is video, pool.submit(send, b)) for b in bodies]
                for is_good, f in futures:
                    if f.result() is not None:
                        results.append((is_good, *f.result()))
            wall = time.perf_counter() - t_start
            good = [r for r in results if r[0]]
            lat = [t for g, s, t in good if s == 200]
            rows[f"c{c}"] = {"concurrency": c, "sent": len(results), "wall_s": round(wall, 2),
                             "good": len(good), "good_failed": sum(1 for g, s, _ in good if s != 200),
                             "bad": len(results) - len(good),
                             "bad_4xx": sum(1 for g, s, _ in results if not g and 400 <= s < 500),
                             "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
                             "videos_per_s": round(len(lat) / wall, 2)}
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"model": model_dir, "bad_share": bad_share, "max_requests": max_requests, "replicas": 1,
            "max_seconds_per_level": max_seconds, "levels": rows}


def bench_video(tmp: Path, size: int) -> bytes:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_videos  # (encodes in a subprocess: see its docstring)

    path = tmp / "bench.mp4"
    make_videos([(str(path), {"n": 32, "h": size, "w": (size * 4 // 3) // 2 * 2, "fps": 25})])
    return path.read_bytes()


def serve_model_dir(tmp: Path, name: str, size: int) -> str:
    from dvfl.artifacts import save_model

    model = make_model(f"videofocalnet_{name}", size, classes=10)
    out = tmp / f"{name}{size}"
    kw = {"num_classes": 10, "num_frames": 8, "img_size": size, "drop_path_rate": 0.0}
    save_model(out, model, f"videofocalnet_{name}", kw, classes=[f"class{i}" for i in range(10)],
               inputs={"frames": 8, "short_side": size, "crop_size": size})
    return str(out)


# what a results file says of the run that wrote it
RUN_KEYS = ("cpu", "cores", "torch_threads", "torch", "onnxruntime", "command", "wall_s", "load_average_start",
            "load_average_end")
# --skip's sections -> the keys of the results file they write
SECTION_KEYS = {"accuracy": ("accuracy",), "latency": ("latency_8x224_b1",), "stream": ("streaming",),
                "serve": ("serve",)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="latency rounds (at least 2; fewer if --latency-budget "
                                                          "runs out)")
    p.add_argument("--latency-budget", type=float, default=600, help="seconds of timed latency rounds (after 2)")
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--model", help="a trained model directory (top-1 of every engine; without it: random weights, "
                                   "labelled as such)")
    p.add_argument("--clips", help="the ingest output it was trained on: test split for top-1, train split for "
                                   "int8 calibration")
    p.add_argument("--calib-clips", type=int, default=64, help="training clips for static int8 calibration")
    p.add_argument("--serve-size", type=int, default=112, help="input size of the served models")
    p.add_argument("--serve-requests", type=int, default=48)
    p.add_argument("--serve-seconds", type=float, default=60, help="time bound per concurrency level")
    p.add_argument("--skip", action="append", default=[], choices=["latency", "accuracy", "stream", "serve"])
    p.add_argument("--out", default=str(HERE / "results" / "deploy.json"))
    a = p.parse_args(argv)
    if a.model and not a.clips:
        p.error("--model needs --clips (its test split is the test set)")
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "load_average_start": os.getloadavg(), "torch": torch.__version__}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    from dvfl import storage

    # A section not measured now (--skip, or accuracy without --clips) keeps the file's earlier figures:
    # the README's figures come from two runs with --skip, each of which wrote over the other's.
    measured = {s for s in SECTION_KEYS if s not in a.skip and (s != "accuracy" or a.clips)}
    earlier = storage.read_json(a.out) if storage.isfile(a.out) else {}
    kept = {k: earlier[k] for s in set(SECTION_KEYS) - measured for k in SECTION_KEYS[s] if k in earlier}
    if not {"accuracy", "latency"} & measured and "int8" in earlier:
        kept["int8"] = earlier["int8"]
    if kept:  # each kept section with the run that measured it (its machine, versions, command)
        header = {k: v for k, v in earlier.items() if k in RUN_KEYS or k.endswith("_run") or k == "note"}
        before = earlier.get("kept_from_earlier_runs") or {}
        result["kept_from_earlier_runs"] = {k: before.get(k, header) for k in sorted(kept)}
    result["command"] = " ".join(["benchmarks/deploy.py", *(argv if argv is not None else sys.argv[1:])])

    def save():  # after every section: a long run that is stopped keeps what it measured
        storage.write_json(a.out, {**kept, **result, "load_average_now": os.getloadavg()})

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dvfl-bench-deploy-") as d:
        tmp = Path(d)
        if "accuracy" not in a.skip and a.clips:
            t = time.perf_counter()
            result["accuracy"] = accuracy_section(a.model, a.clips, tmp, a.calib_clips)
            result["accuracy"]["wall_s"] = round(time.perf_counter() - t, 1)
            print("accuracy", json.dumps(result["accuracy"]), flush=True)
            save()
        if "latency" not in a.skip:
            if a.clips:
                cal, _ = load_split(a.clips, "train", 32 if not a.model else
                                    json.loads(Path(a.model, "model.json").read_text())["kwargs"]["img_size"], 2)
                calib = [cal[i:i + 1] for i in range(len(cal))]
                calib_source = "real training clips"
            else:
                calib = [torch.randn(1, 8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
                calib_source = "random clips (no --clips given)"
            result["latency_8x224_b1"] = latency_section(a.repeats, a.latency_budget, tmp, 224, calib, calib_source)
            print("latency", json.dumps(result["latency_8x224_b1"]), flush=True)
            save()
        if {"accuracy", "latency"} & measured:
            result["int8"] = choose_int8(result.get("latency_8x224_b1") or kept.get("latency_8x224_b1"),
                                         result.get("accuracy") or kept.get("accuracy"))
        if "stream" not in a.skip:
            result["streaming"] = streaming_section(max(2, a.repeats // 2), a.stride, 25.0, (224, 112),
                                                    ("nano", "base"))
            print("stream", json.dumps(result["streaming"]), flush=True)
            save()
        if "serve" not in a.skip:
            video = bench_video(tmp, a.serve_size)
            result["serve"] = {}
            for name in ("nano", "base"):
                result["serve"][name] = serve_section(serve_model_dir(tmp, name, a.serve_size), video, (1, 4, 16),
                                                      a.serve_requests, a.serve_seconds, 0.25)
                result["serve"][name]["input"] = f"8x{a.serve_size}²"
                print("serve", name, json.dumps(result["serve"][name]["levels"]), flush=True)
                save()
    result["load_average_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    result = {**kept, **result}
    storage.write_json(a.out, result)
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    print(f"\nCPU: {r['cpu']} ({r['cores']} cores); load average {r['load_average_start']} -> {r['load_average_end']}")
    lat, acc = r.get("latency_8x224_b1"), (r.get("accuracy") or {}).get("engines", {})
    if lat:
        print("| engine (nano, 8x224², batch 1) | median ms | min-max ms | x eager | top-1 change (points) |")
        print("|---|---:|---:|---:|---:|")
        for k in ENGINES:
            if k in lat:
                ch = acc.get(k, {}).get("top1_change_points", "")
                print(f"| {k} | {lat[k]['median_ms']} | {lat[k]['min_ms']}-{lat[k]['max_ms']} | "
                      f"{lat[k]['over_eager']} | {ch} |")
    if r.get("int8", {}).get("int8_choice"):
        q = r["int8"]
        print(f"int8 ({q['int8_choice']}): top-1 {q['int8_top1']:.2%} vs fp32 {q['fp32_top1']:.2%} "
              f"({q['int8_top1_change_points']:+} points, {q['test_videos']} videos); {q['int8_over_eager']}x eager")
    if r.get("streaming"):
        print("| model | ms per window | real-time factor |\n|---|---:|---:|")
        for k, v in r["streaming"]["models"].items():
            print(f"| {k} | {v['window_ms']} | {v['real_time_factor']} |")
    for name, s in (r.get("serve") or {}).items():
        print(f"| serve {name} {s['input']} | sent | good failed | bad 4xx/bad | p50 | p95 | p99 ms | videos/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, v in s["levels"].items():
            print(f"| {k} | {v['sent']} | {v['good_failed']} | {v['bad_4xx']}/{v['bad']} | {v['p50_ms']} | "
                  f"{v['p95_ms']} | {v['p99_ms']} | {v['videos_per_s']} |")


if __name__ == "__main__":
    sys.exit(main())
