"""How the ingest cuts work into Ray Data tasks and builds its frames column (no Ray needed)."""
import os

import numpy as np
import pyarrow as pa
import pytest

from dvfl.data import ingest as I

MB = 2 ** 20


def test_decode_tasks_cover_every_video_once_in_order_and_shrink_at_the_end():
    sizes = [200_000] * 256  # 256 UCF-sized files, 48.8 MB
    plan = I.plan_decode_tasks(sizes, workers=3, task_mb=4.0, max_videos=1000)
    assert sum(plan) == 256 and all(n >= 1 for n in plan)
    # full-size tasks (4 MB = 20 files) first, then smaller ones, never below task_mb / 4 (5 files)
    assert plan[0] == 20 and max(plan) == 20
    assert plan[-1] < plan[0] and min(plan[:-1]) >= 5
    assert plan == sorted(plan, reverse=True)


def test_decode_tasks_respect_max_videos_and_spread_small_inputs_over_workers():
    tiny = [7_000] * 1280  # the synthetic 32x32 files: 8.5 MB
    plan = I.plan_decode_tasks(tiny, workers=3, task_mb=4.0, max_videos=100)
    assert sum(plan) == 1280 and max(plan) == 100
    # 6 MB of UCF-sized files on 3 workers: no single task takes more than 1/6 of it
    plan = I.plan_decode_tasks([200_000] * 32, workers=3, task_mb=4.0, max_videos=1000)
    assert len(plan) >= 6 and max(plan) <= 6
    # a single huge file is one task, not an error
    assert I.plan_decode_tasks([10 * 2 ** 30], workers=3, task_mb=4.0, max_videos=10) == [1]
    assert I.plan_decode_tasks([], workers=3, task_mb=4.0, max_videos=10) == []


def test_binary_column_holds_the_clip_bytes_and_nulls(monkeypatch):
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, size=(2, 3, 5, 3), dtype=np.uint8), None,
             rng.integers(0, 255, size=(4, 2, 2, 3), dtype=np.uint8)[:, :, ::-1],  # not contiguous
             np.zeros((0, 2, 2, 3), np.uint8)]
    col = I.binary_column(clips)
    assert col.type == pa.binary() and len(col) == 4 and col.null_count == 1
    assert col.to_pylist() == [clips[0].tobytes(), None, clips[2].tobytes(), b""]
    # chunks stay under the 2 GiB offset limit: with a 100-byte limit every clip gets its own chunk
    monkeypatch.setattr(I, "_CHUNK_BYTES", 100)
    col = I.binary_column(clips)
    assert col.num_chunks >= 2 and all(len(c.buffers()[2] or b"") <= 100 or len(c) == 1 for c in col.chunks)
    assert col.to_pylist() == [clips[0].tobytes(), None, clips[2].tobytes(), b""]


def test_binary_column_takes_back_to_back_clips_without_copying_them():
    block = np.arange(2 * 240, dtype=np.uint16).astype(np.uint8)  # one video's clips, as the decode child sends them
    clips = [block[:240].reshape(2, 4, 10, 3), block[240:].reshape(2, 4, 10, 3)]
    col = I.binary_column(clips)
    assert col.chunk(0).buffers()[2].address == block.ctypes.data  # Arrow holds the block itself
    assert col.to_pylist() == [clips[0].tobytes(), clips[1].tobytes()]
    apart = [clips[1], clips[0]]  # not in memory order: copied, still right
    col = I.binary_column(apart)
    assert col.chunk(0).buffers()[2].address != block.ctypes.data
    assert col.to_pylist() == [clips[1].tobytes(), clips[0].tobytes()]


def test_decode_child_returns_a_videos_clips_back_to_back_as_decoded_in_process(video_factory, tmp_path):
    from dvfl.data import decode
    from dvfl.data.worker import DecodeProcess

    path = video_factory(str(tmp_path / "v.mp4"), n=40, h=96, w=128)
    job = {"path": path, "video_id": "v", "split": "train", "frames": 8, "clips_per_video": 3, "eval_clips": 1,
           "seed": 0, "short_side": 64, "min_frames": 8}
    proc = DecodeProcess()
    try:
        res = proc.run(job, 60)
    finally:
        proc.close()
    here = decode.decode_video(job)
    clips = [v[3] for v in res["views"]]
    assert res["ok"] and len(clips) == 3 and clips[0].nbytes >= 1 << 16  # large enough to cross out of band
    assert I._back_to_back(clips)
    assert [c.tobytes() for c in clips] == [v[3].tobytes() for v in here["views"]]
    assert [v[2].tolist() for v in res["views"]] == [v[2].tolist() for v in here["views"]]


def test_a_decode_child_read_through_a_descriptor_above_1023_still_answers(video_factory, tmp_path):
    """select() refuses descriptors >= 1024 (ValueError: the task, then the ingest, failed); a
    long-lived Ray worker, whose open-file limit Ray raises, can hold its child's pipe that high."""
    import resource

    from dvfl.data.worker import DecodeProcess

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    path = video_factory(str(tmp_path / "v.mp4"), n=12, h=32, w=32)
    job = {"path": path, "video_id": "v", "split": "train", "frames": 8, "clips_per_video": 2, "eval_clips": 1,
           "seed": 0, "short_side": 32, "min_frames": 8}
    proc = DecodeProcess()
    try:
        assert proc.run(job, 30)["ok"]
        low = proc.proc.stdout
        os.dup2(low.fileno(), 1500)
        proc.proc.stdout = os.fdopen(1500, "rb", buffering=0)
        low.close()
        res = proc.run(job, 30)
        assert res["ok"] and proc.proc.stdout.fileno() == 1500
    finally:
        proc.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_merge_that_ray_retries_after_its_commit_finds_the_shard_done(video_factory, tmp_path):
    """A merge removes its part files after committing the shard; when its worker died then, Ray ran
    the task again, which failed on the missing parts (FileNotFoundError) and failed the ingest."""
    from dvfl.data import decode
    from dvfl.data import shards as S

    params = {"frames": 8, "clips_per_video": 2, "eval_clips": 1, "seed": 0, "short_side": 32, "min_frames": 8,
              "test_hooks": False}
    parts = []
    for i in range(2):
        path = video_factory(str(tmp_path / f"v{i}.mp4"), n=12, h=32, w=32)
        job = {"path": f"v{i}.mp4", "video_id": f"v{i}", "split": "train", "label": 0, "class_name": "a"}
        table, _ = I._video_table(job, decode.decode_video(dict(params, path=path, video_id=f"v{i}", split="train")))
        writer = S.AtomicShardWriter(str(tmp_path / "_parts" / f"train-00000.{i}.parquet"), 4, "none")
        writer.write(table)
        writer.commit()
        parts.append({"dest": writer.path, "videos": 1, "written": 1, "clips": table.num_rows, "rejects": []})
    shard = {"shard": "train-00000", "split": "train", "dest": str(tmp_path / "shards" / "train-00000.parquet")}
    opts = {"row_group_clips": 4, "compression": "lz4", "meta_dir": str(tmp_path / "shards" / "_meta"),
            "params": params}
    os.makedirs(opts["meta_dir"])
    first = I._merge_parts(shard, parts, opts)
    committed = open(shard["dest"], "rb").read()
    assert not any(os.path.exists(p["dest"]) for p in parts)
    assert I._merge_parts(shard, parts, opts) == first  # the retry: done, nothing rewritten
    assert open(shard["dest"], "rb").read() == committed
    # a part file that is not what its task reported (written by a killed run's task after the rerun
    # cleared the folder, say): never merged into a shard (session 29)
    writer = S.AtomicShardWriter(str(tmp_path / "_parts" / "train-00001.0.parquet"), 4, "none")
    writer.write(table)
    writer.commit()
    other = {"shard": "train-00001", "split": "train", "dest": str(tmp_path / "shards" / "train-00001.parquet")}
    with pytest.raises(RuntimeError, match=rf"holds {table.num_rows} clips, but its decode task wrote 1"):
        I._merge_parts(other, [{"dest": writer.path, "videos": 1, "written": 1, "clips": 1, "rejects": []}], opts)
    assert not os.path.exists(other["dest"]) and not os.path.exists(os.path.join(opts["meta_dir"], "train-00001.json"))


def test_ingest_config_rejects_bad_task_sizes():
    with pytest.raises(ValueError, match="task-mb"):
        I.IngestConfig(out="x", task_mb=0).validate()
    with pytest.raises(ValueError, match="videos-per-task"):
        I.IngestConfig(out="x", videos_per_task=0).validate()


def test_decode_child_is_recycled_only_when_its_memory_grows(video_factory, tmp_path):
    from dvfl.data.worker import DecodeProcess

    path = video_factory(str(tmp_path / "v.mp4"), n=12, h=32, w=32)
    job = {"path": path, "video_id": "v", "split": "train", "frames": 8, "clips_per_video": 2, "eval_clips": 1,
           "seed": 0, "short_side": 32, "min_frames": 8}
    keep = DecodeProcess()
    first = [keep.run(job, 30) for _ in range(3)]
    assert all(r["ok"] for r in first) and keep.proc is not None
    pid = keep.proc.pid
    assert keep.run(job, 30)["ok"] and keep.proc.pid == pid  # the same child serves every file
    assert 20 < keep.rss_mb() < 2048
    keep.close()

    tight = DecodeProcess(max_rss_mb=1)  # every child is above 1 MiB: closed after each file
    assert tight.run(job, 30)["ok"] and tight.proc is None
    again = tight.run(job, 30)
    assert again["ok"] and again["views"][0][3].tobytes() == first[0]["views"][0][3].tobytes()
    tight.close()


def test_pieces_never_cross_a_shard_and_say_where_they_write():
    """A shard that fits in one decode task is written by that task; a bigger one is cut into
    pieces that write part files under _parts/, in order (merged later)."""
    shards = [I._ShardPlan("train-00000", "train", [f"a{i}" for i in range(8)]),
              I._ShardPlan("train-00001", "train", ["b0", "b1"]),
              I._ShardPlan("test-00000", "test", [f"c{i}" for i in range(5)])]
    jobs = [{"video_id": v, "shard": p.name, "split": p.split, "bytes": 1 * MB} for p in shards for v in p.video_ids]
    pieces = I.plan_pieces(jobs, shards, workers=1, task_mb=3.0, max_videos=100, shard_dir="/o/shards",
                           parts_dir="/o/_parts")
    assert [v["video_id"] for p in pieces for v in p["jobs"]] == [j["video_id"] for j in jobs]
    for p in pieces:
        assert {j["shard"] for j in p["jobs"]} == {p["shard"]}
    by_shard = {}
    for p in pieces:
        by_shard.setdefault(p["shard"], []).append(p)
    assert len(by_shard["train-00000"]) >= 3 and len(by_shard["train-00001"]) == 1
    one = by_shard["train-00001"][0]
    assert one["whole"] and one["dest"] == "/o/shards/train-00001.parquet"
    for k, p in enumerate(by_shard["train-00000"]):
        assert not p["whole"] and p["index"] == k and p["count"] == len(by_shard["train-00000"])
        assert p["dest"] == f"/o/_parts/train-00000.{k:05d}.parquet"


def test_decode_tasks_load_no_torch():
    """A decode worker imports the modules of its task (the package, ingest, the decode child's
    driver, shard writing, storage) and nothing heavier: with torch, each worker held ~570 MiB PSS
    instead of ~125-165 MiB (benchmarks/input_pipeline.py (c), docs/ingest.md)."""
    import subprocess
    import sys

    code = ("import sys, dvfl, dvfl.data.ingest, dvfl.data.worker, dvfl.data.shards, dvfl.storage; "
            "print(sorted(m for m in ('torch', 'timm', 'einops', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_video_the_driver_read_but_a_decode_task_cannot_find_fails_the_task(video_factory, tmp_path):
    """A decode task on a node without the dataset's mount (or after the file was deleted) stored it
    as a final 'missing' reject in a committed shard: the ingest ended 0 and a rerun skipped it. The
    task fails instead, naming the node, and leaves no part or shard behind."""
    from dvfl.cli import actionable_failure

    params = {"frames": 8, "clips_per_video": 2, "eval_clips": 1, "seed": 0, "short_side": 32, "min_frames": 8,
              "test_hooks": False}
    there = video_factory(str(tmp_path / "v0.mp4"), n=12, h=32, w=32)
    jobs = [{"abspath": p, "root": str(tmp_path), "path": os.path.basename(p), "video_id": os.path.basename(p)[:2],
             "split": "train", "label": 0, "class_name": "a"} for p in (there, str(tmp_path / "v1.mp4"))]
    dest = tmp_path / "shards" / "train-00000.parquet"
    piece = {"dest": str(dest), "whole": True, "jobs": jobs, "shard": "train-00000", "split": "train", "index": 0}
    opts = {"max_jobs": 100, "max_rss_mb": 2048, "compression": "lz4", "row_group_clips": 4, "params": params,
            "timeout": 60, "meta_dir": str(tmp_path / "shards" / "_meta")}
    os.makedirs(opts["meta_dir"])
    with pytest.raises(I.VideoNotOnNodeError, match=r"v1\.mp4 was read when the ingest listed its inputs, but the "
                                                    r"decode task on \S+ finds no such file") as e:
        I._write_piece(piece, opts)
    assert actionable_failure(RuntimeError("wrapped")) is None and actionable_failure(e.value) is e.value
    assert not dest.exists() and os.listdir(dest.parent) == ["_meta"] and os.listdir(opts["meta_dir"]) == []


def test_a_file_this_machine_may_not_read_is_unreadable_and_fails_the_task_not_a_final_reject(video_factory, tmp_path,
                                                                                            monkeypatch):
    """A PermissionError (another user id on a worker node) or an I/O error escaped the decode as
    'decoder_error' ("a bug"). Both are 'unreadable' now; in an ingest a file the driver read that a
    decode task may not read fails the task, naming the node, like one it cannot find (a reject in a
    committed shard is final: no rerun retried it), while a bad sector stays that file's reject."""
    from dvfl.data import decode

    path = video_factory(str(tmp_path / "v0.mp4"), n=12, h=32, w=32)
    job = {"path": path, "root": str(tmp_path), "frames": 8, "clips_per_video": 1, "eval_clips": 1, "seed": 0,
           "short_side": 32, "min_frames": 8, "video_id": "v0", "split": "train"}

    def refused(p):
        raise PermissionError(13, "Permission denied", p)

    monkeypatch.setattr(decode, "probe_container", refused)
    res = decode.decode_video(job)
    assert (res["ok"], res["reason"], res["denied"]) == (False, "unreadable", True) and "Permission denied" in res["detail"]
    with pytest.raises(I.VideoNotOnNodeError, match=r"v0\.mp4 was read when the ingest listed its inputs, but the "
                                                    r"decode task on \S+ may not read it \(PermissionError"):
        I.raise_if_not_on_node({"abspath": path}, res)

    def bad_sector(p):  # the file's own fault, on every node: a reject, not a task every rerun fails again
        raise OSError(5, "Input/output error", p)

    monkeypatch.setattr(decode, "probe_container", bad_sector)
    res = decode.decode_video(job)
    assert (res["reason"], res["denied"]) == ("unreadable", False)
    I.raise_if_not_on_node({"abspath": path}, res)
