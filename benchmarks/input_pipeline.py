#!/usr/bin/env python
"""Input-pipeline benchmark (issue 3): writes benchmarks/results/input_pipeline.json and prints a table.

(a) ingest clips/s vs the raw decode rate of the same videos and frames with decord in plain
    single-process loops, one per core the ingest used (all of them: it keeps cores + 1 decode
    tasks in flight on a local Ray with cores + 1 logical CPUs), run at the same time. Target >= 0.8.
    Also reported: the ratio to one loop's rate x cores, which assumes loops scale perfectly
    (they do not: each decord reader starts a thread of its own; measured 1.67-1.98x on 2 cores).
(b) training-time input rate: reading the Parquet shards with Ray Data (uint8 clip tensors) vs
    decoding the same clips on the fly with decord in a torch DataLoader with one worker per
    core (the official DVFL-Net data path). Target >= 10x.
(c) ingest peak memory (PSS of the whole process tree: driver, Ray, workers, decode children)
    at N and 4N videos. Target <= 1.2x.

(d) who writes the shards (issue 18): the driver-written path (every clip through the driver:
    IngestConfig(writer="driver")) and decode tasks that write their own shards (the default),
    run interleaved in one session with repeats: the driver process's CPU time per clip (what capped
    one ingest at ~120 clips/s whatever the number of nodes) and each path's ingest rate / raw decode
    loops one per core, measured in the same round. ``--section writers`` runs (d) alone.

Two video sets: the embedded synthetic dataset at its default size (6,000 training videos of
32x32 pixels and 16 frames: per-file overheads are the size of the decode) and a "UCF-like" set
(512 videos of 320x240, 25 fps, 6 s H.264, short side 128: decoding dominates, like real
datasets). Usage: python benchmarks/input_pipeline.py [--quick] [--section all|writers] [--ucf-videos N] [--repeats R]
[--work DIR]. The videos and ingest outputs go to a fresh temporary folder that is removed at exit,
unless --work names a folder (then it is kept).
"""
from __future__ import annotations

import argparse
import atexit
import fractions
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
sys.path[:] = [q for q in sys.path if os.path.abspath(q or ".") != _HERE]
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

RESULTS = os.path.join(_HERE, "results", "input_pipeline.json")


# ---------------------------------------------------------------------------------------
# data

def make_ucf_like(root: str, n: int, seconds: float = 6.0, fps: int = 25, h: int = 240, w: int = 320) -> None:
    """Real H.264/MP4 files shaped like UCF101 (moving textured content, so the codec works)."""
    import av

    os.makedirs(root, exist_ok=True)
    frames_n = int(seconds * fps)
    for i in range(n):
        path = os.path.join(root, f"c{i % 4}", f"v{i:04d}.mp4")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rng = np.random.default_rng(i)
        tex = rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        tmp = path + ".tmp.mp4"
        with av.open(tmp, "w") as c:
            st = c.add_stream("libx264", rate=fractions.Fraction(fps))
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.options = {"crf": "23", "preset": "veryfast", "threads": "1"}
            for t in range(frames_n):
                fr = np.roll(tex, (t * 2, t * 3), axis=(0, 1))
                fr[(t * 4) % (h - 40):(t * 4) % (h - 40) + 40, 100:140] = (255, 255, 255)
                for p in st.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                    c.mux(p)
            for p in st.encode():
                c.mux(p)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# CPU accounting of a process tree (load-independent efficiency: the machine is shared)

_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root_pid: int) -> float:
    """utime+stime (+ reaped children's) of root_pid and all its descendants, in seconds."""
    return sum(cpu for _, cpu in _tree_cpu_by_kind(root_pid).values())


# ---------------------------------------------------------------------------------------
# (a) raw decode loop

def raw_decode_one(e, T, clips_per_video, seed, split) -> int:
    """Decode one video's views' frames (their union, one get_batch, no resize); returns its clips."""
    import decord

    from dvfl.data import sampling as S

    vr = decord.VideoReader(e.path, ctx=decord.cpu(0), num_threads=1)
    views = S.plan_views(len(vr), T, split, seed, e.video_id, clips_per_video, 1)
    vr.get_batch(S.unique_sorted(v[2] for v in views).tolist()).asnumpy()
    return len(views)


def raw_decode_rate(entries, T, clips_per_video, seed, split="train"):
    """Same frames as the ingest (union of a video's views, one get_batch), no resize, one process."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    clips = 0
    for e in entries:
        clips += raw_decode_one(e, T, clips_per_video, seed, split)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"videos": len(entries), "clips": clips, "seconds": dt, "clips_per_s": clips / dt,
            "cpu_s": cpu, "cpu_ms_per_clip": 1000 * cpu / clips}


def _raw_worker_ready(_):
    import decord  # noqa: F401

    from dvfl.data import sampling  # noqa: F401

    time.sleep(0.5)  # hold this process so that every process of the pool gets one warm-up call
    return os.getpid()


def _raw_slice(args):
    from types import SimpleNamespace

    videos, T, clips_per_video, seed = args
    return raw_decode_rate([SimpleNamespace(path=p, video_id=v) for p, v in videos], T, clips_per_video, seed)


def raw_decode_parallel(entries, T, clips_per_video, seed, procs):
    """The same plain loop in ``procs`` processes at once (one per core), each on every
    procs-th video: the machine's raw decode capacity. Processes are started and warmed first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as ex:
        pids = set(ex.map(_raw_worker_ready, range(procs)))
        jobs = [([(e.path, e.video_id) for e in entries[i::procs]], T, clips_per_video, seed) for i in range(procs)]
        t0 = time.perf_counter()
        parts = list(ex.map(_raw_slice, jobs))
        dt = time.perf_counter() - t0
    clips = sum(r["clips"] for r in parts)
    return {"processes": procs, "distinct_pids": len(pids), "clips": clips, "seconds": dt, "clips_per_s": clips / dt,
            "cpu_ms_per_clip": 1000 * sum(r["cpu_s"] for r in parts) / clips}


def ingest_rate(manifest, out, T, clips_per_video, short_side, **kw):
    from dvfl.data.ingest import IngestConfig, ingest

    shutil.rmtree(out, ignore_errors=True)
    c0 = _tree_cpu_s(os.getpid())  # this driver + the local Ray it started (raylet, workers, decode children)
    s = ingest(manifest, IngestConfig(out=out, frames=T, clips_per_video=clips_per_video, short_side=short_side,
                                      progress=False, **kw), log=None)
    cpu = _tree_cpu_s(os.getpid()) - c0
    return {"videos": s["videos_decoded_this_run"], "clips": s["clips_this_run"],
            "seconds": s["decode_seconds"], "clips_per_s": s["clips_per_second"],
            "cpu_s": cpu, "cpu_ms_per_clip": 1000 * cpu / max(s["clips_this_run"], 1)}


# ---------------------------------------------------------------------------------------
# (b) training-time input

class OnTheFlyClips:
    """torch Dataset: decode each clip from its video with decord + resize, per item (official path)."""

    def __init__(self, items):
        self.items = items  # (path, frame_indices, height, width)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import decord
        import torch

        from dvfl.data.decode import resize_frames

        path, idx, h, w = self.items[i]
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        x = vr.get_batch(list(idx)).asnumpy()
        return torch.from_numpy(resize_frames(x, h, w))


def dataloader_rate(items, workers, batch_size=32, passes=2):
    import torch

    dl = torch.utils.data.DataLoader(OnTheFlyClips(items), batch_size=batch_size, shuffle=False,
                                     num_workers=workers, persistent_workers=True,
                                     multiprocessing_context="spawn")
    rates = []
    for _ in range(passes):  # persistent workers: the 2nd pass has no worker start-up
        t0 = time.perf_counter()
        n = 0
        for b in dl:
            n += b.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return {"clips": len(items), "clips_per_s_by_pass": rates, "clips_per_s": rates[-1]}


def ray_read_rate(out, batch_size=32, passes=2):
    """The training loop's input path: Ray Data Parquet read, pyarrow batches, frames as one owned
    uint8 (B, T, H, W, 3) tensor (the loop then crops it)."""
    import torch

    from dvfl.data.shards import decode_frames, read_clip_dataset

    rates, steady = [], []
    for _ in range(passes):  # a new execution per pass, as every training epoch does
        ds = read_clip_dataset(out, ["train"], columns=["clip_id", "label", "frames", "num_frames", "height",
                                                        "width"])
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for table in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            x = torch.from_numpy(np.array(decode_frames(table)))  # batch_arrays' zero-copy view, copied once
            if t_first is None:
                t_first = time.perf_counter()
            else:
                n += x.shape[0]
        t1 = time.perf_counter()
        rates.append((n + batch_size) / (t1 - t0))
        steady.append(n / max(t1 - t_first, 1e-9))
    return {"clips": n + batch_size, "clips_per_s_by_pass": rates, "clips_per_s": rates[-1],
            "steady_clips_per_s_after_first_batch": steady[-1], "first_batch_s": t_first - t0}


# ---------------------------------------------------------------------------------------
# (c) peak memory of an ingest run (separate process tree)

DECODE_TASKS = ("ray::_ingest_piece", "ray::_merge_parts")  # the processes that decode and write shards


def _tree_pss_kb(root_pid):
    """(total PSS of the tree in kB, processes, {pid: PSS kB} of those running a decode task)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, procs, decode, stack = 0, 0, {}, [root_pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                pss = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, StopIteration):
            continue
        total += pss
        procs += 1
        if title.startswith(DECODE_TASKS):
            decode[p] = pss
    return total, procs, decode


def ingest_peak_memory(videos_dir, out, train_per_class, test_per_class):
    args = [sys.executable, os.path.join(REPO, "pipelines", "ingest.py"), "--dataset", "synthetic",
            "--videos-dir", videos_dir, "--out", out, "--train-per-class", str(train_per_class),
            "--test-per-class", str(test_per_class), "--quiet", "--fresh"]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # generate first (not measured), then measure the ingest alone
    subprocess.run(args[:4] + ["--videos-dir", videos_dir, "--out", out + "_gen"] + args[8:12] + ["--quiet"],
                   env=env, check=True, capture_output=True)
    shutil.rmtree(out + "_gen", ignore_errors=True)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    peak, peak_procs, worker_peak = 0, 0, {}
    t0 = time.perf_counter()
    while proc.poll() is None:
        pss, procs, decode = _tree_pss_kb(proc.pid)
        if pss > peak:
            peak, peak_procs = pss, procs
        for pid, kb in decode.items():  # each decode worker's own peak while it ran a decode task
            worker_peak[pid] = max(worker_peak.get(pid, 0), kb)
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    out_text = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(out_text[-2000:])
    summary = json.load(open(os.path.join(out, "summary.json")))
    return {"videos": summary["inputs"], "clips": summary["clips"], "peak_pss_mib": peak / 1024,
            "processes_at_peak": peak_procs, "wall_s": wall,
            # PSS of each Ray worker process while it ran a decode task (target <= 200 MiB: no torch)
            "decode_worker_pss_mib": sorted(round(kb / 1024, 1) for kb in worker_peak.values())}


# ---------------------------------------------------------------------------------------

def driver_cpu_ingest(manifest, out, T, clips_per_video, short_side, writer):
    """One ingest with ``writer``: the driver process's own CPU time (all its threads: the Ray
    core worker's included) per clip, and the rate."""
    import resource

    from dvfl.data.ingest import IngestConfig, ingest

    shutil.rmtree(out, ignore_errors=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    s = ingest(manifest, IngestConfig(out=out, frames=T, clips_per_video=clips_per_video, short_side=short_side,
                                      progress=False, writer=writer), log=None)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"writer": writer, "clips": s["clips_this_run"], "seconds": s["decode_seconds"],
            "clips_per_s": s["clips_per_second"], "driver_cpu_s": cpu,
            "driver_cpu_ms_per_clip": 1000 * cpu / max(s["clips_this_run"], 1), "shards": s["shards"],
            "fingerprint": s["fingerprint"], "loadavg": os.getloadavg()[0]}


def writers_section(manifest, work, T, CPV, short_side, cores, repeats):
    """(d): interleaved rounds; each round measures the raw loops, then both writers (order
    alternating between rounds), then the raw loops again."""
    entries = manifest.entries
    rounds = []
    for r in range(repeats):
        order = ("driver", "workers") if r % 2 == 0 else ("workers", "driver")
        par1 = raw_decode_parallel(entries, T, CPV, 0, cores)
        runs = {w: driver_cpu_ingest(manifest, os.path.join(work, f"writers_{w}"), T, CPV, short_side, w)
                for w in order}
        par2 = raw_decode_parallel(entries, T, CPV, 0, cores)
        raw = (par1["clips_per_s"] + par2["clips_per_s"]) / 2
        rounds.append({"order": list(order), "raw_loops_clips_per_s": [par1["clips_per_s"], par2["clips_per_s"]],
                       **{w: dict(runs[w], ratio_vs_raw_loops=runs[w]["clips_per_s"] / raw) for w in order}})
    out = {"rounds": rounds, "videos": len(entries), "cores": cores}
    for w in ("driver", "workers"):
        for k in ("driver_cpu_ms_per_clip", "ratio_vs_raw_loops", "clips_per_s"):
            v = [rd[w][k] for rd in rounds]
            out[f"{w}_{k}"] = {"median": float(np.median(v)), "min": min(v), "max": max(v)}
    fps = {rd[w]["fingerprint"] for rd in rounds for w in ("driver", "workers")}
    out["same_fingerprint"] = len(fps) == 1
    out["driver_cpu_per_clip_after_over_before"] = (out["workers_driver_cpu_ms_per_clip"]["median"]
                                                    / out["driver_driver_cpu_ms_per_clip"]["median"])
    out["ratio_target"] = 0.9
    out["ratio_met"] = out["workers_ratio_vs_raw_loops"]["median"] >= 0.9
    return out


def print_writers(w, load):
    print(f"\n(d) who writes the shards: {w['videos']} UCF-like videos, {w['cores']} cores, {len(w['rounds'])} "
          f"interleaved rounds, load avg {load[0]:.1f} -> {load[1]:.1f} (median [min-max])")
    for k, label in (("driver_cpu_ms_per_clip", "driver CPU ms per clip"),
                     ("ratio_vs_raw_loops", "ingest / raw loops one per core"), ("clips_per_s", "ingest clips/s")):
        for wr in ("driver", "workers"):
            v = w[f"{wr}_{k}"]
            print(f"  {label:<34} {wr + '-written':<16} {v['median']:8.3f} [{v['min']:.3f}-{v['max']:.3f}]")
    print(f"  driver CPU per clip, after / before: {w['driver_cpu_per_clip_after_over_before']:.3f}; "
          f"ratio target >= 0.9: {'met' if w['ratio_met'] else 'NOT met'}; same fingerprint: {w['same_fingerprint']}")


# ---------------------------------------------------------------------------------------
# (e) where an ingest's CPU goes beyond the raw decode (issue 18)

def _piece_counts(entries, T, CPV, short_side, workers, task_mb=4.0):
    """Shards and decode tasks the ingest plans for ``entries`` (its own planning functions, its
    default sizes): which clips pass through a merge task (shards cut into several pieces)."""
    from dvfl.data import ingest as I

    est = T * short_side * (short_side * 4 // 3) * 3 * CPV
    plans = I._plan_shards(entries, max(1, int(128.0 * 2 ** 20 // est)), 0)
    by_id = {e.video_id: e for e in entries}
    jobs = [{"shard": p.name, "split": p.split, "bytes": os.path.getsize(by_id[v].path)}
            for p in plans for v in p.video_ids]
    pieces = I.plan_pieces(jobs, plans, workers, task_mb, max(1, int(I.TASK_OUTPUT_BYTES // est)), "s", "p")
    merged = {p["shard"] for p in pieces if not p["whole"]}
    videos_merged = sum(len(p.video_ids) for p in plans if p.name in merged)
    return {"shards": len(plans), "pieces": len(pieces), "merged_shards": len(merged),
            "merged_video_fraction": videos_merged / max(1, len(entries))}


def _pid_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13]) / _TICK


def cpu_breakdown(manifest, work, T, CPV, short_side, workers):
    """CPU per clip of each step a decode task does, one at a time in this process (no Ray), then
    the whole ingest: what is left over is Ray, the driver and the merge tasks' scheduling.

    raw       decord get_batch of the views' frames at the coded size (the (a) raw loop)
    scaled    the ingest's decode function in-process: decode at the stored size (FFmpeg's
              scaler inside decord), sample every view, assemble the clips
    child     the same through the worker's decode child: + pickling and the pipe (parent + child CPU)
    table     the child's clips as Arrow rows (the task's _video_table)
    writes    those rows into a piece's part file (uncompressed; lz4 as it was before, for comparison),
              then the merge task's code reading it back into the lz4 shard (every clip of a shard cut
              into several pieces pays both; a shard written by one task is written once, lz4)
    """
    from dvfl.data import decode as D
    from dvfl.data import ingest as I
    from dvfl.data import shards as S
    from dvfl.data.worker import DecodeProcess

    entries = manifest.entries
    params = {"frames": T, "clips_per_video": CPV, "eval_clips": 1, "seed": 0, "short_side": short_side,
              "min_frames": T, "test_hooks": False}
    jobs = [dict(params, path=e.path, video_id=e.video_id, split=e.split) for e in entries]
    meta = [{"path": os.path.relpath(e.path, manifest.root), "video_id": e.video_id, "split": e.split,
             "label": -1 if e.label is None else int(e.label), "class_name": e.class_name or ""} for e in entries]
    out = {"videos": len(entries)}
    # the three decodes of each video back to back, so that the machine's drifting speed (a shared
    # VM) affects them alike; CPU time of this process (+ the decode child's, read from /proc)
    raw_decode_one(entries[0], T, CPV, 0, entries[0].split)  # decord imported before any timing
    proc = DecodeProcess()
    proc.run(jobs[0], 120)  # the child started and its imports done, as in a warm worker
    cpu = {"raw": 0.0, "scaled": 0.0, "child": 0.0}
    results, clips = [], 0
    for e, j in zip(entries, jobs):
        c0 = time.process_time()
        n_views = raw_decode_one(e, T, CPV, 0, e.split)
        c1 = time.process_time()
        D.decode_video(j)
        c2 = time.process_time()
        k0 = _pid_cpu_s(proc.proc.pid)
        results.append(proc.run(j, 120))  # what a decode task gets: a video's clips back to back
        c3 = time.process_time()
        cpu["raw"] += c1 - c0
        cpu["scaled"] += c2 - c1
        cpu["child"] += (c3 - c2) + (_pid_cpu_s(proc.proc.pid) - k0)
        clips += n_views
    proc.close()
    assert all(r.get("ok") for r in results), [r for r in results if not r.get("ok")][:1]
    ms = lambda s: 1000 * s / clips  # noqa: E731
    for k, v in cpu.items():
        out[f"{k}_ms_per_clip"] = ms(v)

    I._video_table(meta[0], results[0])  # Arrow's first-call set-up, paid once per worker process
    c0 = time.process_time()
    tables = [I._video_table(m, r)[0] for m, r in zip(meta, results)]
    out["table_ms_per_clip"] = ms(time.process_time() - c0)
    # the same with each clip in an array of its own (as the child's in-band pickles gave them before)
    apart = [dict(r, views=[(v, k, i, c.copy()) for v, k, i, c in r["views"]]) for r in results]
    c0 = time.process_time()
    for m, r in zip(meta, apart):
        I._video_table(m, r)
    out["table_copying_clips_ms_per_clip"] = ms(time.process_time() - c0)
    del results, apart
    raw_bytes = sum(t.column("frames").nbytes for t in tables)
    # a piece's part file written with `codec`, then the real merge task's code into the lz4 shard
    meta_dir = os.path.join(work, "breakdown_meta")
    opts = {"row_group_clips": 256, "compression": "lz4", "meta_dir": meta_dir, "params": {"test_hooks": False}}
    for codec in ("lz4", "none"):
        part = os.path.join(work, f"breakdown_part_{codec}.parquet")
        c0 = time.process_time()
        w = S.AtomicShardWriter(part, 256, codec)
        for t in tables:
            w.write(t)
        w.commit()
        out[f"part_write_{codec}_ms_per_clip"] = ms(time.process_time() - c0)
        out[f"{codec}_bytes_over_raw"] = os.path.getsize(part) / raw_bytes
        shard = os.path.join(work, "breakdown_shard.parquet")
        c0 = time.process_time()
        I._write_merged({"shard": "breakdown", "split": "train", "dest": shard},
                        [{"dest": part, "rejects": [], "videos": len(tables), "written": len(tables), "clips": clips}],
                        opts)
        out[f"merge_from_{codec}_ms_per_clip"] = ms(time.process_time() - c0)
        os.unlink(shard)
    shutil.rmtree(meta_dir, ignore_errors=True)
    del tables
    # the whole ingest against the raw loop run just before and just after it
    raw1 = raw_decode_rate(entries, T, CPV, 0)
    # what Ray's processes spend while nothing runs (5 s idle), to set against the ingest's share
    idle0, t_idle = _tree_cpu_by_kind(os.getpid()), time.perf_counter()
    time.sleep(5.0)
    idle1, t_idle = _tree_cpu_by_kind(os.getpid()), time.perf_counter() - t_idle
    idle = {}
    for pid, (kind, cpu_s) in idle1.items():
        if kind != "driver":
            idle[kind] = idle.get(kind, 0.0) + (cpu_s - idle0.get(pid, (kind, 0.0))[1]) / t_idle
    out["idle_cpu_s_per_s"] = idle
    before = _tree_cpu_by_kind(os.getpid())
    ing = ingest_rate(manifest, os.path.join(work, "breakdown_ingest"), T, CPV, short_side)
    after = _tree_cpu_by_kind(os.getpid())
    by_kind = {}
    for pid, (kind, cpu_s) in after.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + cpu_s - before.get(pid, (kind, 0.0))[1]
    out["ingest_by_process_ms_per_clip"] = {k: ms(v) for k, v in sorted(by_kind.items())}
    raw2 = raw_decode_rate(entries, T, CPV, 0)
    out["raw_loop_around_ingest_ms_per_clip"] = [raw1["cpu_ms_per_clip"], raw2["cpu_ms_per_clip"]]
    shutil.rmtree(os.path.join(work, "breakdown_ingest"), ignore_errors=True)
    plan = _piece_counts(entries, T, CPV, short_side, workers)
    out["plan"] = plan
    out["ingest_tree_ms_per_clip"] = ing["cpu_ms_per_clip"]
    out["ingest_clips_per_s"] = ing["clips_per_s"]
    steps = {"decode at the stored size (over raw)": out["scaled_ms_per_clip"] - out["raw_ms_per_clip"],
             "decode child: pickle + pipe": out["child_ms_per_clip"] - out["scaled_ms_per_clip"],
             "Arrow rows": out["table_ms_per_clip"],
             # a merged shard's clips: an uncompressed part file, then the merge into the lz4 shard;
             # an unmerged shard's: written once, lz4
             "Parquet writes": (plan["merged_video_fraction"] * (out["part_write_none_ms_per_clip"]
                                                                  + out["merge_from_none_ms_per_clip"])
                                + (1 - plan["merged_video_fraction"]) * out["part_write_lz4_ms_per_clip"])}
    out["extra_over_raw_ms_per_clip"] = steps
    out["steps_alone_over_raw_cpu"] = 1 + sum(steps.values()) / out["raw_ms_per_clip"]
    # the ingest itself, against the raw loops run just before and after it (the same minutes)
    raw_around = sum(out["raw_loop_around_ingest_ms_per_clip"]) / 2
    out["ingest_over_raw_cpu"] = out["ingest_tree_ms_per_clip"] / raw_around
    out["decode_children_in_ingest_over_raw_cpu"] = out["ingest_by_process_ms_per_clip"].get("decode children", 0) / raw_around
    return out


_RAY_DAEMONS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _tree_cpu_by_kind(root_pid: int) -> dict:
    """{pid: (kind, CPU seconds: utime+stime + reaped children's)} over root_pid's process tree;
    kinds: the driver, decode children, Ray worker processes (the decode and merge tasks), Ray's
    own daemons."""
    children, found = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                children.setdefault(int(fields[1]), []).append(int(d))
                found[int(d)] = (argv, sum(int(x) for x in fields[11:15]) / _TICK)
            except (OSError, ValueError, IndexError):
                pass
    out, stack = {}, [root_pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        if p not in found:
            continue
        argv, cpu = found[p]
        title = argv[0].decode(errors="replace")
        kind = ("driver" if p == root_pid else "decode children" if any(a.endswith(b"_decode_child.py") for a in argv)
                else "Ray daemons" if title.startswith(_RAY_DAEMONS) or not title.startswith("ray::")
                else "Ray workers (decode + merge tasks)")
        out[p] = (kind, cpu)
    return out


def print_breakdown(b):
    print(f"\n(e) ingest CPU per clip beyond the raw decode: {b['videos']} UCF-like videos; plan: {b['plan']}")
    print(f"  each step alone, one video at a time (interleaved):")
    print(f"  {'raw decode (the (a) loop)':<44} {b['raw_ms_per_clip']:7.2f} ms")
    for k, v in b["extra_over_raw_ms_per_clip"].items():
        print(f"  + {k:<42} {v:7.2f} ms  ({100 * v / b['raw_ms_per_clip']:5.1f} % of raw)")
    print(f"  = {'the steps alone':<42} {b['steps_alone_over_raw_cpu']:7.2f} x raw")
    raw_around = sum(b["raw_loop_around_ingest_ms_per_clip"]) / 2
    print(f"  the ingest ({b['ingest_clips_per_s']:.1f} clips/s), by process; raw loop around it {raw_around:.2f} ms:")
    for k, v in b["ingest_by_process_ms_per_clip"].items():
        idle = b["idle_cpu_s_per_s"].get(k)
        print(f"    {k:<42} {v:7.2f} ms  ({100 * v / raw_around:5.1f} % of raw)"
              + (f"; idle, these processes use {100 * idle:.1f} % of a core" if idle is not None else ""))
    print(f"  = {'whole ingest tree':<42} {b['ingest_tree_ms_per_clip']:7.2f} ms  "
          f"(ingest / raw CPU {b['ingest_over_raw_cpu']:.2f}; its decode children alone "
          f"{b['decode_children_in_ingest_over_raw_cpu']:.2f})")
    print(f"  Arrow rows from clips in arrays of their own (before): {b['table_copying_clips_ms_per_clip']:.2f} ms per clip")
    for c, what in (("none", "uncompressed (the ingest's)"), ("lz4", "lz4 (before)")):
        print(f"  part files {what:<28} write {b[f'part_write_{c}_ms_per_clip']:.2f} ms + merge "
              f"{b[f'merge_from_{c}_ms_per_clip']:.2f} ms per clip")
    print(f"  size / raw bytes: lz4 {b['lz4_bytes_over_raw']:.3f}, uncompressed {b['none_bytes_over_raw']:.3f}")


def _write_section_results(name: str, res: dict) -> None:
    path = os.path.join(os.path.dirname(RESULTS), name)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")


def _ucf_like_train_set(a):
    """The UCF-like set of ``--section writers`` / ``breakdown``: manifests of its training videos
    and of its first 8 (for warming the Ray worker pool up)."""
    from dvfl.data import adapters as A

    n = a.ucf_videos or (12 if a.quick else 512)
    root = os.path.join(a.work, f"ucf_like_{n}")
    make_ucf_like(root, n)
    m = A.folder(root)
    m.entries = [e for e in m.entries if e.split == "train"]
    warm = A.folder(root)
    warm.entries = warm.entries[:8]
    return m, warm


def main_breakdown(a):
    from dvfl.data.ingest import ray_session

    from benchmarks.machine import cpu_model

    cores = os.cpu_count() or 1
    load0 = os.getloadavg()
    m, warm = _ucf_like_train_set(a)
    with ray_session(num_cpus=cores + 1, object_store_mb=1024, log=None):  # the ingest CLI's default
        ingest_rate(warm, os.path.join(a.work, "warm"), 8, 2, 128, videos_per_task=2)
        rounds = [cpu_breakdown(m, a.work, 8, 2, 128, cores + 1) for _ in range(a.repeats)]
    res = {"machine": {"cores": cores, "cpu": cpu_model(), "platform": platform.platform(),
                       "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg()}, "rounds": rounds}
    for b in rounds:
        print_breakdown(b)
    if not a.quick:
        _write_section_results("input_pipeline_breakdown.json", res)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="scratch folder, kept (default: a temporary folder, removed at exit)")
    ap.add_argument("--quick", action="store_true", help="smaller sets (smoke run)")
    ap.add_argument("--section", choices=("all", "writers", "breakdown"), default="all",
                    help="writers: only (d), written to results/input_pipeline_writers.json; breakdown: only "
                         "(e), written to results/input_pipeline_breakdown.json")
    ap.add_argument("--ucf-videos", type=int, default=None, help="size of the UCF-like set (default 512; 12 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of (d)")
    a = ap.parse_args()
    if not a.work:  # our own scratch: gone at exit (a --work the user gave is kept)
        a.work = tempfile.mkdtemp(prefix="dvfl-bench-input-")
        atexit.register(shutil.rmtree, a.work, True)
    if a.section == "writers":
        return main_writers(a)
    if a.section == "breakdown":
        return main_breakdown(a)
    import ray

    from dvfl.data import adapters as A
    from dvfl.data import synthetic as syn
    from dvfl.data.ingest import ray_session

    os.makedirs(a.work, exist_ok=True)
    cores = os.cpu_count() or 1
    load0 = os.getloadavg()
    from benchmarks.machine import cpu_model

    res = {"machine": {"cpu": cpu_model(), "cores": cores, "platform": platform.platform(), "python": platform.python_version(),
                       "loadavg_at_start": load0}, "sets": {}}
    n_syn_pc, n_ucf = (40, 12) if a.quick else (750, 512)  # 6,000 videos: the embedded default of sessions <= 18, large enough to time
    syn_root = os.path.join(a.work, f"syn_videos_{n_syn_pc}")
    syn.generate(syn_root, syn.SyntheticConfig(train_per_class=n_syn_pc, test_per_class=0), log=None)
    ucf_root = os.path.join(a.work, f"ucf_like_{n_ucf}")
    make_ucf_like(ucf_root, n_ucf)
    sets = {
        "synthetic_32px": dict(manifest=lambda: A.ucf101(syn_root, 1), short_side=32),
        "ucf_like_320x240": dict(manifest=lambda: A.folder(ucf_root), short_side=128),
    }
    T, CPV, SEED = 8, 2, 0
    with ray_session(num_cpus=cores + 1, object_store_mb=1024, log=None):  # the ingest CLI's default
        # warm the Ray worker pool (imports) so that (a) measures steady-state decoding: tasks of
        # 2 videos, so that every worker process starts
        warm = A.ucf101(syn_root, 1)
        warm.entries = warm.entries[:32]
        ingest_rate(warm, os.path.join(a.work, "warm"), T, CPV, 32, videos_per_task=2)
        tasks_in_flight = int(ray.cluster_resources()["CPU"])
        for name, spec in sets.items():
            m = spec["manifest"]()
            entries = [e for e in m.entries if e.split == "train"]
            m.entries = entries
            # raw loops before and after the ingest (load drifts): one process, and one per core at once
            raw1, par1 = raw_decode_rate(entries, T, CPV, SEED), raw_decode_parallel(entries, T, CPV, SEED, cores)
            out = os.path.join(a.work, f"out_{name}")
            ing = ingest_rate(m, out, T, CPV, spec["short_side"])
            raw2, par2 = raw_decode_rate(entries, T, CPV, SEED), raw_decode_parallel(entries, T, CPV, SEED, cores)
            raw = {k: (raw1[k] + raw2[k]) / 2 for k in raw1}
            raw["runs_clips_per_s"] = [raw1["clips_per_s"], raw2["clips_per_s"]]
            par = {k: (par1[k] + par2[k]) / 2 for k in par1}
            par["runs_clips_per_s"] = [par1["clips_per_s"], par2["clips_per_s"]]
            ratio = ing["clips_per_s"] / par["clips_per_s"]
            ratio_linear = ing["clips_per_s"] / (raw["clips_per_s"] * cores)
            cpu_eff = raw["cpu_ms_per_clip"] / ing["cpu_ms_per_clip"]
            # (b): the same clips, with their exact frame indices and stored sizes
            from dvfl.data.shards import read_clips_table

            tbl = read_clips_table(out, ["train"], columns=["video_id", "frame_indices", "height", "width"])
            paths = {e.video_id: e.path for e in entries}
            items = [(paths[r["video_id"]], r["frame_indices"], r["height"], r["width"]) for r in tbl.to_pylist()]
            rr = ray_read_rate(out)
            dl = dataloader_rate(items, workers=cores)
            res["sets"][name] = {
                "videos": len(entries), "clips": ing["clips"], "short_side": spec["short_side"],
                "a_raw_decode_1proc": raw, "a_raw_decode_loop_per_core": par, "a_ingest": ing, "a_cores": cores,
                "a_parallel_loops_speedup": par["clips_per_s"] / raw["clips_per_s"],
                "a_ratio_vs_1proc_x_cores": ratio_linear,
                "a_decode_tasks_in_flight": tasks_in_flight,
                "a_ratio": ratio, "a_target": 0.8, "a_met": ratio >= 0.8,
                "a_cpu_efficiency": cpu_eff,
                "b_ray_data_read": rr, "b_dataloader_decord": dl,
                "b_speedup": rr["clips_per_s"] / dl["clips_per_s"], "b_target": 10.0,
                "b_met": rr["clips_per_s"] / dl["clips_per_s"] >= 10.0,
            }
    # (c) peak memory at N and 4N videos (fresh Ray per run, like a user's run)
    n_pc = 10 if a.quick else 160  # N = 1,600 videos: enough work that every decode worker starts in both runs
    vd = os.path.join(a.work, "mem_videos")
    mem = {}
    for mult in (1, 4):
        vdm = vd + f"_{n_pc}_{mult}"
        mem[f"{mult}N"] = ingest_peak_memory(vdm, os.path.join(a.work, f"mem_out_{mult}"), n_pc * mult,
                                             n_pc * mult // 4)
    growth = mem["4N"]["peak_pss_mib"] / mem["1N"]["peak_pss_mib"]
    res["c_memory"] = {**mem, "growth": growth, "target": 1.2, "met": growth <= 1.2}
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    if not a.quick:
        with open(RESULTS, "w") as f:
            json.dump(res, f, indent=2)
    print_table(res)
    return res


def main_writers(a):
    from dvfl.data.ingest import ray_session

    from benchmarks.machine import cpu_model

    cores = os.cpu_count() or 1
    load0 = os.getloadavg()
    m, warm = _ucf_like_train_set(a)
    with ray_session(num_cpus=cores + 1, object_store_mb=1024, log=None):  # the ingest CLI's default
        for w in ("driver", "workers"):  # worker processes started and imports done before any measurement
            driver_cpu_ingest(warm, os.path.join(a.work, "warm"), 8, 2, 128, w)
        res = writers_section(m, a.work, 8, 2, 128, cores, a.repeats)
    load1 = os.getloadavg()
    res["machine"] = {"cores": cores, "cpu_model": cpu_model(), "platform": platform.platform(),
                      "loadavg_at_start": load0, "loadavg_at_end": load1}
    print_writers(res, (load0[0], load1[0]))
    if not a.quick:
        _write_section_results("input_pipeline_writers.json", res)
    return res


def print_table(res):
    print(f"\ninput pipeline benchmark ({res['machine']['cores']} cores, load avg at start "
          f"{res['machine']['loadavg_at_start'][0]:.1f}, at end {res['machine'].get('loadavg_at_end', [0])[0]:.1f})")
    hdr = f"{'set':<18} {'metric':<58} {'value':>10} {'target':>8} {'met':>4}"
    print(hdr)
    print("-" * len(hdr))
    for name, s in res["sets"].items():
        raw, ing = s["a_raw_decode_1proc"], s["a_ingest"]
        par = s["a_raw_decode_loop_per_core"]
        print(f"{name:<18} {'(a) raw decord loop, 1 process (clips/s)':<58} {raw['clips_per_s']:>10.1f}")
        print(f"{'':<18} {'(a) raw decord loops, one per core at once (clips/s)':<58} {par['clips_per_s']:>10.1f}")
        print(f"{'':<18} {'(a) ingest on %d cores (clips/s)' % s['a_cores']:<58} "
              f"{ing['clips_per_s']:>10.1f}")
        print(f"{'':<18} {'(a) ingest / (1-process loop x cores)':<58} {s['a_ratio_vs_1proc_x_cores']:>10.2f}")
        print(f"{'':<18} {'(a) ingest / (loops, one per core)':<58} {s['a_ratio']:>10.2f} {'>=0.8':>8} "
              f"{'yes' if s['a_met'] else 'NO':>4}")
        print(f"{'':<18} {'(a) CPU ms per clip: raw loop / whole ingest tree':<58} "
              f"{raw['cpu_ms_per_clip']:>4.1f}/{ing['cpu_ms_per_clip']:<5.1f}")
        print(f"{'':<18} {'(a) CPU efficiency (raw CPU per clip / ingest CPU per clip)':<58} "
              f"{s['a_cpu_efficiency']:>10.2f}")
        print(f"{'':<18} {'(b) Ray Data Parquet read (clips/s)':<58} {s['b_ray_data_read']['clips_per_s']:>10.1f}")
        print(f"{'':<18} {'(b) DataLoader + decord on the fly, %d workers (clips/s)' % res['machine']['cores']:<58} "
              f"{s['b_dataloader_decord']['clips_per_s']:>10.1f}")
        print(f"{'':<18} {'(b) speed-up':<58} {s['b_speedup']:>10.1f} {'>=10':>8} {'yes' if s['b_met'] else 'NO':>4}")
    m = res["c_memory"]
    print(f"{'synthetic':<18} {'(c) ingest peak PSS, N=%d videos (MiB)' % m['1N']['videos']:<58} "
          f"{m['1N']['peak_pss_mib']:>10.0f}")
    print(f"{'':<18} {'(c) ingest peak PSS, 4N=%d videos (MiB)' % m['4N']['videos']:<58} {m['4N']['peak_pss_mib']:>10.0f}")
    print(f"{'':<18} {'(c) growth 4N / N':<58} {m['growth']:>10.2f} {'<=1.2':>8} {'yes' if m['met'] else 'NO':>4}")
    for n in ("1N", "4N"):
        worker = max(m[n].get("decode_worker_pss_mib") or [float("nan")])
        print(f"{'':<18} {'(c) largest decode worker PSS, %s (MiB)' % n.replace('1N', 'N'):<58} {worker:>10.0f} "
              f"{'<=200':>8} {'yes' if worker <= 200 else 'NO':>4}")


if __name__ == "__main__":
    main()
