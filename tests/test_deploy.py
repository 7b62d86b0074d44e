"""Using a trained model (issue 19): predict on video files, the stream mode, export, serving.

They reuse the session's ``prepared`` teacher (a tiny model trained by the pipeline on the
generated dataset) and its clips: the test videos of that dataset are real files on disk.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(script, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "pipelines" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def videos_of(prepared) -> dict:
    """video_id -> absolute path of every test video of the prepared dataset."""
    from dvfl.data.shards import read_clips_table

    info, clips = prepared["info"], prepared["cfg"].clips_dir
    table = read_clips_table(clips, ["test"], columns=["video_id", "path"])
    return {v: os.path.join(info["root"], p) for v, p in zip(table.column("video_id").to_pylist(),
                                                             table.column("path").to_pylist())}


def test_predict_top1_equals_evaluation_for_every_test_video(prepared, tmp_path):
    """predict.py's top-1 (same decode child, same uniform clip, same 3 crops) is the class the
    multi-view evaluation predicted for each test video; a bad file among them gets its own error,
    the rest are still predicted and the exit status says something failed."""
    from dvfl.artifacts import load_model
    from dvfl.train.evaluate import evaluate_multiview

    model, _ = load_model(prepared["teacher"])
    ev = evaluate_multiview(model, prepared["cfg"].clips_dir, "test", 32, num_clips=1, num_crops=3, per_video=True)
    videos = videos_of(prepared)
    assert set(ev["predictions"]) == set(videos) and len(videos) == 16
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n")
    out = tmp_path / "pred.json"
    r = run_cli("predict.py", "--model", prepared["teacher"], *sorted(videos.values()), bad, "--views", "1x3",
                "--topk", "2", "--json", out)
    assert r.returncode == 1, r.stderr
    assert f"{bad}: error: not_video" in r.stderr and "1 of 17 files failed" in r.stderr
    rows = {row["path"]: row for row in json.loads(out.read_text())}
    classes = prepared["info"]["classes"]
    for vid, path in videos.items():
        top = rows[path]["topk"]
        assert len(top) == 2 and top[0][1] >= top[1][1]
        assert top[0][0] == classes[ev["predictions"][vid]], vid
    assert rows[str(bad)]["error"].startswith("not_video")


def test_stream_window_count_for_a_known_video(prepared, video_factory, tmp_path):
    """40 frames, windows of 8 every 4 frames: windows end at frames 8, 12, ..., 40 -> 9 windows,
    each printed with its latency; frames arrive at the file's 40 fps (about 1 s of stream)."""
    video = video_factory(str(tmp_path / "stream.mp4"), n=40, h=32, w=32, fps=40)
    out = tmp_path / "stream.json"
    r = run_cli("predict.py", "--model", prepared["teacher"], video, "--stream", "--window", 8, "--stride", 4,
                "--json", out)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[stream] frames")]
    assert len(lines) == 9 and all("latency" in ln for ln in lines)
    got = json.loads(out.read_text())
    assert [w["end_frame"] for w in got["windows"]] == list(range(8, 41, 4))
    assert got["fps"] == pytest.approx(40) and got["real_time_factor"] > 0
