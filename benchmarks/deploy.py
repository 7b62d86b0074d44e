#!/usr/bin/env python
"""Deployment figures on this machine's CPU -> benchmarks/results/deploy.json (+ a printed table).

    python benchmarks/deploy.py [--repeats 5] [--quick] [--model DIR --clips DIR]

1. Latency at 8x224², batch 1, same clip, same run, interleaved: PyTorch eager vs ONNX Runtime
   fp32 vs ONNX Runtime int8 (dynamic quantisation), for the nano student (median, min-max).
2. int8's top-1 change on a test set: needs a trained model (``--model``) and its clips (``--clips``).
3. Streaming real-time factor: windows the model processes per second / windows arriving per
   second (25 fps, a window every ``--stride`` frames), nano vs base at 8x224² and 8x112².
4. Ray Serve load test on 127.0.0.1: p50/p95/p99 latency and videos/s at concurrency 1, 4, 16,
   with a share of bad uploads (each must get a 4xx; no good upload may fail), bounded in requests
   and seconds per level.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


def latency_section(repeats: int, tmp: Path, size: int) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dvfl.export import export_onnx

    torch.manual_seed(0)
    model = make_model("videofocalnet_nano", size)
    x = torch.randn(1, 8, 3, size, size)
    fp32, int8 = tmp / "nano.onnx", tmp / "nano.int8.onnx"
    export_onnx(model, fp32, [x])
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    s32 = ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
    s8 = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
    runs = {"torch_eager": lambda: model(x), "ort_fp32": lambda: s32.run(None, {"video": x.numpy()}),
            "ort_int8": lambda: s8.run(None, {"video": x.numpy()})}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved: the machine's load hits every engine alike
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    out = {k: stats(v) for k, v in times.items()}
    out["ort_fp32_over_eager"] = round(out["ort_fp32"]["median_ms"] / out["torch_eager"]["median_ms"], 3)
    out["ort_int8_over_eager"] = round(out["ort_int8"]["median_ms"] / out["torch_eager"]["median_ms"], 3)
    out["input"] = f"1x8x3x{size}x{size}"
    out["threads"] = torch.get_num_threads()
    return out


def int8_accuracy(model_dir: str, clips_dir: str, tmp: Path) -> dict:
    """Video-level top-1 (1 uniform clip, centre crop) of PyTorch fp32 vs ORT int8 on the test split."""
    import onnxruntime as ort
    import pyarrow.parquet as pq
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dvfl.artifacts import load_model
    from dvfl.data.shards import shard_paths
    from dvfl.export import export_onnx
    from dvfl.train.clips import View, batch_arrays, make_clip_batch, normalize

    model, spec = load_model(model_dir)
    size = spec["kwargs"]["img_size"]
    xs, ys = [], []
    for path in shard_paths(clips_dir, ["test"]):
        t = pq.read_table(path, columns=["clip_id", "label", "view_index", "frames", "num_frames", "height", "width"])
        t = t.filter(np.array(t.column("view_index").to_pylist()) == 0)
        arrays, _, y = batch_arrays(t)
        xs.append(normalize(make_clip_batch(arrays, size, [View()] * len(arrays))))
        ys.append(y)
    x, y = torch.cat(xs), np.concatenate(ys)
    f32, i8 = tmp / "m.onnx", tmp / "m.int8.onnx"
    export_onnx(model.eval(), f32, [x[:2]])
    quantize_dynamic(str(f32), str(i8), weight_type=QuantType.QInt8)
    sess = ort.InferenceSession(str(i8), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        p32 = model(x).argmax(1).numpy()
    p8 = np.concatenate([sess.run(None, {"video": x[i:i + 16].numpy()})[0].argmax(1) for i in range(0, len(x), 16)])
    return {"videos": int(len(y)), "top1_fp32": float((p32 == y).mean()), "top1_int8": float((p8 == y).mean()),
            "top1_change_points": round(100 * float((p8 == y).mean() - (p32 == y).mean()), 2),
            "agreement": float((p8 == p32).mean()), "model": model_dir}


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
            with ThreadPoolExecutor(c) as pool:
                futures = []
                for b in bodies:
                    futures.append((b is video, pool.submit(post, b)))
                for is_good, f in futures:
                    if time.perf_counter() - t_start > max_seconds:
                        f.cancel()
                    if not f.cancelled():
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
    return {"model": model_dir, "bad_share": bad_share, "max_requests": max_requests,
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--model", help="a trained model directory (int8 top-1 change)")
    p.add_argument("--clips", help="its ingest output (test split)")
    p.add_argument("--serve-size", type=int, default=112, help="input size of the served models")
    p.add_argument("--serve-requests", type=int, default=48)
    p.add_argument("--serve-seconds", type=float, default=60)
    p.add_argument("--skip", action="append", default=[], choices=["latency", "int8", "stream", "serve"])
    p.add_argument("--out", default=str(HERE / "results" / "deploy.json"))
    a = p.parse_args(argv)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "load_average_start": os.getloadavg(), "torch": torch.__version__}
    from dvfl.data.shards import atomic_write_json

    def save():  # after every section: a long run that is stopped keeps what it measured
        atomic_write_json(a.out, {**result, "load_average_now": os.getloadavg()})

    with tempfile.TemporaryDirectory(prefix="dvfl-bench-deploy-") as d:
        tmp = Path(d)
        if "latency" not in a.skip:
            result["latency_8x224_b1"] = latency_section(a.repeats, tmp, 224)
            print("latency", json.dumps(result["latency_8x224_b1"]), flush=True)
            save()
        if "int8" not in a.skip and a.model and a.clips:
            result["int8_accuracy"] = int8_accuracy(a.model, a.clips, tmp)
            print("int8", json.dumps(result["int8_accuracy"]), flush=True)
            save()
        if "stream" not in a.skip:
            result["streaming"] = streaming_section(max(2, a.repeats // 3), a.stride, 25.0, (224, 112),
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
    atomic_write_json(a.out, result)
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    print(f"\nCPU: {r['cpu']} ({r['cores']} cores); load average {r['load_average_start']} -> {r['load_average_end']}")
    lat = r.get("latency_8x224_b1")
    if lat:
        print("| engine (nano, 8x224², batch 1) | median ms | min-max ms |\n|---|---:|---:|")
        for k in ("torch_eager", "ort_fp32", "ort_int8"):
            print(f"| {k} | {lat[k]['median_ms']} | {lat[k]['min_ms']}-{lat[k]['max_ms']} |")
        print(f"ORT fp32 / eager = {lat['ort_fp32_over_eager']}, int8 / eager = {lat['ort_int8_over_eager']}")
    if r.get("int8_accuracy"):
        q = r["int8_accuracy"]
        print(f"int8 top-1 {q['top1_int8']:.1%} vs fp32 {q['top1_fp32']:.1%} ({q['top1_change_points']:+} points, "
              f"{q['videos']} videos)")
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
