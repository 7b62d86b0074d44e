#!/usr/bin/env python
"""Ingest and read cost at the shapes of Kinetics-400 and Something-Something v2 (issue 7).

The input-pipeline benchmark measures a UCF-like set stored at short side 128. The scaling plan
(docs/scaling.md, benchmarks/scaling_plan.py) needs the figures at the production setting for the
two large datasets: 8 frames, short side 256 (224 crops), 4 training views per video. This
benchmark generates real encoded videos shaped like each dataset and measures, per shape:

  * ingest CPU time per clip and per video, as an average over a run and as the marginal cost
    between a run of N/3 and one of N videos (the whole process tree: driver, Ray, decode
    workers and their decode children; CPU time, not wall time, because the machine is shared),
    the driver's own share (it plans the decode tasks and commits the manifest; before session 12
    it received every clip and wrote every shard), and the wall rate with one decode worker per core;
  * bytes per stored clip on disk (Parquet + zstd) next to the raw uint8 size;
  * the training-time read: Ray Data Parquet read + frame decode (clips/s and CPU per clip).

Shapes (the usual distributions of the datasets; the content is synthetic):
  k400_like: 340x256, 25 fps, 10 s, H.264 (.mp4)   -- Kinetics-400 as commonly resized (short side 256)
  ssv2_like: 427x240, 12 fps, 4 s, VP9 (.webm)      -- Something-Something v2 as released

Content is textured, moving noise blocks (what the input-pipeline benchmark uses): it compresses
worse than typical footage, so bytes on disk are an upper-side estimate; raw bytes are exact.

    python benchmarks/dataset_shapes.py [--videos 48] [--work DIR] [--out PATH]
Writes benchmarks/results/dataset_shapes_latest.json (or --out) and prints a table. The generated videos
and ingest outputs go to a fresh temporary folder that is removed at exit, unless --work is given.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, _HERE)
from input_pipeline import _tree_cpu_s, ray_read_rate  # noqa: E402  (same CPU accounting and read loop)
from benchmarks.machine import cpu_model  # noqa: E402

# not dataset_shapes.json: the scaling plan reads that first measurement (its "before" column needs the
# driver cost of the design in which the driver wrote every shard; docs/scaling.md)
RESULTS = os.path.join(_HERE, "results", "dataset_shapes_latest.json")

SHAPES = {
    "k400_like": {"w": 340, "h": 256, "fps": 25, "seconds": 10.0, "codec": "libx264", "ext": "mp4"},
    "ssv2_like": {"w": 427, "h": 240, "fps": 12, "seconds": 4.0, "codec": "libvpx-vp9", "ext": "webm"},
}
FRAMES, CLIPS_PER_VIDEO, SHORT_SIDE = 8, 4, 256

_GEN = r"""
import fractions, json, os, sys
import av, numpy as np
spec, root, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
h, w, fps = spec["h"], spec["w"], spec["fps"]
for i in range(n):
    path = os.path.join(root, f"c{i % 4}", f"v{i:04d}.{spec['ext']}")
    if os.path.exists(path):
        continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(i)
    tex = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w]
    tmp = path + ".tmp." + spec["ext"]
    with av.open(tmp, "w") as c:
        st = c.add_stream(spec["codec"], rate=fractions.Fraction(fps))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = ({"crf": "23", "preset": "veryfast", "threads": "1"} if spec["codec"] == "libx264"
                      else {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8", "threads": "1"})
        for t in range(int(spec["seconds"] * fps)):
            fr = np.roll(tex, (t * 2, t * 3), axis=(0, 1)).copy()
            y = (t * 4) % (h - 40)
            fr[y:y + 40, 100:140] = 255
            for p in st.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    os.replace(tmp, path)
"""


def generate(root: str, spec: dict, n: int) -> None:
    # a separate process: once decord is loaded, PyAV's VP9 encoder fails to open (tests/conftest.py)
    subprocess.run([sys.executable, "-c", _GEN, json.dumps(spec), root, str(n)], check=True)


def measure(name: str, spec: dict, root: str, work: str, workers: int, videos: int) -> dict:
    from dvfl.data import adapters as A
    from dvfl.data.ingest import IngestConfig, ingest

    manifest = A.folder(root)
    manifest.entries = manifest.entries[:videos]
    out = os.path.join(work, f"out_{name}_{videos}")
    shutil.rmtree(out, ignore_errors=True)
    c0, d0 = _tree_cpu_s(os.getpid()), time.process_time()
    s = ingest(manifest, IngestConfig(out=out, frames=FRAMES, clips_per_video=CLIPS_PER_VIDEO, short_side=SHORT_SIDE,
                                      workers=workers, progress=False), log=None)
    cpu, driver_cpu = _tree_cpu_s(os.getpid()) - c0, time.process_time() - d0
    assert s["rejected"] == 0, s["rejects_by_reason"]
    info = json.load(open(os.path.join(out, "dataset.json")))
    from dvfl.data.shards import read_clips_table

    shape = read_clips_table(out, ["train"], columns=["num_frames", "height", "width"]).slice(0, 1).to_pylist()[0]
    raw = shape["num_frames"] * shape["height"] * shape["width"] * 3
    c1 = _tree_cpu_s(os.getpid())
    rr = ray_read_rate(out)
    read_cpu = _tree_cpu_s(os.getpid()) - c1
    clips = s["clips_this_run"]
    return {
        "source": {**spec, "videos": s["videos_decoded_this_run"],
                   "bytes_per_video": s["source_bytes"] / max(s["inputs"], 1)},
        "stored_clip_shape": [shape["num_frames"], shape["height"], shape["width"], 3],
        "ingest": {"clips": clips, "videos": s["videos_decoded_this_run"], "decode_workers": workers,
                   "wall_s": s["decode_seconds"], "clips_per_s": s["clips_per_second"], "cpu_s": cpu,
                   "cpu_ms_per_clip": 1000 * cpu / clips,
                   "cpu_ms_per_video": 1000 * cpu / s["videos_decoded_this_run"],
                   # the driver alone: it plans the tasks and commits the manifest (the decode tasks write the shards)
                   "driver_cpu_ms_per_clip": 1000 * driver_cpu / clips},
        "storage": {"shard_bytes": s["shard_bytes"], "bytes_per_clip_disk": s["shard_bytes"] / clips,
                    "raw_bytes_per_clip": raw, "zstd_ratio": raw * clips / s["shard_bytes"],
                    "clips_in_dataset_json": info["clips"]},
        # read_cpu covers both passes of ray_read_rate (each reads every clip once)
        "read": {**rr, "cpu_ms_per_clip": 1000 * read_cpu / (2 * clips),
                 "mb_per_s": rr["clips_per_s"] * s["shard_bytes"] / clips / 2**20},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="scratch folder, kept (default: a temporary folder, removed at exit)")
    ap.add_argument("--videos", type=int, default=48, help="videos per shape (a second run uses a third)")
    ap.add_argument("--out", default=RESULTS, help="the results file (default: %(default)s)")
    a = ap.parse_args()
    if a.work:
        os.makedirs(a.work, exist_ok=True)
    else:  # our own scratch: gone at exit
        a.work = tempfile.mkdtemp(prefix="dvfl-bench-shapes-")
        atexit.register(shutil.rmtree, a.work, True)
    roots = {}
    for name, spec in SHAPES.items():
        roots[name] = os.path.join(a.work, f"{name}_{a.videos}")
        generate(roots[name], spec, a.videos)

    from dvfl.data import adapters as A
    from dvfl.data.ingest import IngestConfig, ingest, ray_session

    cores = os.cpu_count() or 1
    res = {"machine": {"cpu": cpu_model(), "cores": cores, "platform": platform.platform(), "python": platform.python_version(),
                       "loadavg_at_start": os.getloadavg(), "process_niceness": os.nice(0)},
           "params": {"frames": FRAMES, "clips_per_video": CLIPS_PER_VIDEO, "short_side": SHORT_SIDE},
           "shapes": {}}
    started = time.time()
    with ray_session(num_cpus=cores + 1, object_store_mb=1024, log=None):
        # warm the worker pool (imports, decode children) on a copy of the first shape's videos
        warm = A.folder(roots["k400_like"])
        warm.entries = warm.entries[:4]
        ingest(warm, IngestConfig(out=os.path.join(a.work, "warm"), frames=FRAMES, clips_per_video=1,
                                  short_side=64, workers=cores, progress=False, overwrite=True), log=None)
        for name, spec in SHAPES.items():
            # two sizes: the difference is the marginal (steady-state) cost per clip, without the
            # fixed start-up cost of an ingest run that the small runs here would otherwise carry
            small = measure(name, spec, roots[name], a.work, workers=cores, videos=a.videos // 3)
            full = measure(name, spec, roots[name], a.work, workers=cores, videos=a.videos)
            dclips = full["ingest"]["clips"] - small["ingest"]["clips"]
            full["ingest_small_run"] = small["ingest"]
            full["ingest_marginal"] = {
                "clips": dclips,
                "cpu_ms_per_clip": 1000 * (full["ingest"]["cpu_s"] - small["ingest"]["cpu_s"]) / dclips,
                "driver_cpu_ms_per_clip": (full["ingest"]["driver_cpu_ms_per_clip"] * full["ingest"]["clips"]
                                           - small["ingest"]["driver_cpu_ms_per_clip"] * small["ingest"]["clips"]) / dclips,
            }
            res["shapes"][name] = full
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    res["wall_s"] = time.time() - started
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res)
    print(f"\nwrote {a.out}")


def print_table(res):
    m = res["machine"]
    print(f"\ndataset shapes ({m['cores']} cores, load avg {m['loadavg_at_start'][0]:.1f} -> {m['loadavg_at_end'][0]:.1f}); "
          f"{res['params']['frames']} frames, short side {res['params']['short_side']}, "
          f"{res['params']['clips_per_video']} views/video")
    hdr = (f"{'shape':<11} {'source':<22} {'ingest CPU ms/clip':>18} {'marginal':>8} {'driver':>6} {'KiB/clip disk':>14} "
           f"{'raw':>8} {'read clips/s':>12} {'read CPU ms/clip':>16}")
    print(hdr)
    print("-" * len(hdr))
    for name, s in res["shapes"].items():
        src = s["source"]
        print(f"{name:<11} {src['w']}x{src['h']} {src['fps']}fps {src['seconds']:.0f}s {src['ext']:<5} "
              f"{s['ingest']['cpu_ms_per_clip']:>18.1f} {s['ingest_marginal']['cpu_ms_per_clip']:>8.1f} "
              f"{s['ingest_marginal']['driver_cpu_ms_per_clip']:>6.1f} "
              f"{s['storage']['bytes_per_clip_disk'] / 1024:>14.0f} {s['storage']['raw_bytes_per_clip'] / 1024:>8.0f} "
              f"{s['read']['clips_per_s']:>12.1f} {s['read']['cpu_ms_per_clip']:>16.1f}")


if __name__ == "__main__":
    main()
