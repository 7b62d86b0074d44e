"""The Ray Data ingest for real (session Ray, real Parquet, real decord): schema, exact frames,
codecs/containers/odd sizes/frame rates, determinism, fingerprint, resume."""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import needs_decord
from dvfl.data import adapters as A
from dvfl.data import decode as D
from dvfl.data import sampling as S
from dvfl.data import shards as SH
from dvfl.data import synthetic as syn
from dvfl.data.ingest import IngestConfig, compute_fingerprint, ingest

SMALL = dict(num_classes=4, train_per_class=4, test_per_class=2, unlabeled_videos=3, frames=16)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synpipe") / "videos")
    info = syn.generate(root, syn.SyntheticConfig(**SMALL), workers=1, log=None)
    return root, info["unlabeled_dir"]


def manifest(syn_root):
    root, pool = syn_root
    m = A.ucf101(root, 1)
    m.dataset = "synthetic"
    m.extend(A.unlabeled(pool))
    return m


def shard_hashes(out):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in SH.shard_paths(out)}


@needs_decord
def test_schema_counts_and_exact_frames(syn_root, tmp_path, ray_local):
    import decord

    out = str(tmp_path / "out")
    s = ingest(manifest(syn_root), IngestConfig(out=out, frames=8, clips_per_video=2, eval_clips=2,
                                                short_side=20, seed=7), log=None)
    assert s["accounting_ok"] and s["inputs"] == 27 and s["rejected"] == 0
    assert s["counts"] == {"train": {"videos": 16, "clips": 32}, "test": {"videos": 8, "clips": 16},
                           "unlabeled": {"videos": 3, "clips": 6}}
    info = SH.load_dataset_info(out)
    assert info["classes"] == ["MoveRight", "MoveUp", "MoveLeft", "MoveDown"]
    assert info["params"]["frames"] == 8 and info["params"]["seed"] == 7 and info["params"]["short_side"] == 20
    assert info["fingerprint"] == s["fingerprint"] and len(info["fingerprint"]) == 64
    assert sorted(os.path.basename(p) for p in SH.shard_paths(out)) == [
        "test-00000.parquet", "train-00000.parquet", "unlabeled-00000.parquet"]
    for p in SH.shard_paths(out):
        assert pq.read_schema(p).equals(SH.CLIP_SCHEMA, check_metadata=False)
    t = SH.read_clips_table(out)
    rows = t.to_pylist()
    assert len({r["clip_id"] for r in rows}) == len(rows) == 54
    root = info["root"]
    for r in rows:
        assert r["clip_id"] == f"{r['video_id']}|{r['view']}{r['view_index']}"
        assert (r["num_frames"], r["height"], r["width"]) == (8, 20, 20) and r["src_num_frames"] == 16
        assert r["src_fps"] == pytest.approx(8.0)
        if r["split"] == "unlabeled":
            assert r["label"] is None and r["class_name"] is None and r["view"] == "train"
        else:
            assert info["classes"][r["label"]] == r["class_name"] == r["path"].split("/")[0]
        if r["view"] == "train":
            want = S.tsn_train_indices(16, 8, S.view_rng(7, r["video_id"], r["view_index"]))
        else:
            want = S.uniform_clip_indices(16, 8, r["view_index"], 2)
        assert r["frame_indices"] == want.tolist()
    # stored frames are exactly: decord frames at those indices, resized by its FFmpeg scaler (no
    # crop) - and that is a real resize of the source frames (close to PIL's)
    for r in rows[::9]:
        path = os.path.join(root, r["path"])
        scaled = decord.VideoReader(path, width=20, height=20).get_batch(r["frame_indices"]).asnumpy()
        np.testing.assert_array_equal(SH.decode_frames(r), scaled)
        src = decord.VideoReader(path).get_batch(r["frame_indices"]).asnumpy()
        assert src.shape[1:3] != (20, 20)
        assert np.abs(scaled.astype(int) - D.resize_frames(src, 20, 20)).mean() < 6
    # decord's scaler refuses a few widths (24 px among them): those clips are resized by PIL
    job = dict(path=os.path.join(root, rows[0]["path"]), video_id=rows[0]["video_id"], split="train", frames=8,
               clips_per_video=1, eval_clips=1, seed=7, short_side=24, min_frames=8)
    res = D.decode_video(job)
    assert res["ok"] and (res["height"], res["width"]) == (24, 24)
    _, _, idx, clip = res["views"][0]
    src = decord.VideoReader(job["path"]).get_batch(idx.tolist()).asnumpy()
    np.testing.assert_array_equal(clip, D.resize_frames(src, 24, 24))
    batch = SH.decode_frames(t.slice(0, 5))
    assert batch.shape == (5, 8, 20, 20, 3) and batch.dtype == np.uint8
    # Ray Data reads the same rows back
    ds = SH.read_clip_dataset(out, ["train"])
    b = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert SH.decode_frames(b).shape == (4, 8, 20, 20, 3)
    # A fresh Dataset for count(): Ray 2.60 caches num_rows when an iterator of `ds` stops, and an
    # iterator abandoned after one batch can stop early under load (seen: 12 instead of 32).
    assert SH.read_clip_dataset(out, ["train"]).count() == 32


@needs_decord
def test_codecs_containers_odd_sizes_and_rates(tmp_path, video_factory, ray_local):
    import decord

    from conftest import make_videos

    root = tmp_path / "vids"
    specs = [("a/h264.mp4", dict(codec="libx264", h=34, w=46, fps=12.5, n=20)),
             ("a/mpeg4.avi", dict(codec="mpeg4", h=33, w=47, fps=30000 / 1001, n=14)),
             ("b/vp9.webm", dict(codec="libvpx-vp9", h=33, w=47, fps=8, n=10)),
             ("b/h264.mkv", dict(codec="libx264", h=40, w=30, fps=24, n=9)),
             ("b/mjpeg.avi", dict(codec="mjpeg", h=35, w=45, fps=15, n=11)),
             ("a/mpeg4_b.mov", dict(codec="mpeg4", h=30, w=40, fps=10, n=8))]
    make_videos([(str(root / p), kw) for p, kw in specs])
    m = A.folder(str(root))
    assert len(m.entries) == 6
    out = str(tmp_path / "out")
    s = ingest(m, IngestConfig(out=out, frames=8, clips_per_video=1, short_side=20), log=None)
    assert s["rejected"] == 0 and s["written_videos"] == 6, open(os.path.join(out, "rejects.jsonl")).read()
    rows = {r["video_id"]: r for r in SH.read_clips_table(out).to_pylist()}
    expect = {p.rsplit(".", 1)[0]: kw for p, kw in specs}
    for vid, kw in expect.items():
        r = rows[vid]
        h, w = S.resized_hw(kw["h"], kw["w"], 20)
        assert (r["height"], r["width"]) == (h, w) and min(h, w) == 20
        assert r["src_num_frames"] == kw["n"]
        assert r["src_fps"] == pytest.approx(kw["fps"], rel=1e-3)
        assert SH.decode_frames(r).shape == (8, h, w, 3)
        src = decord.VideoReader(str(root / r["path"])).get_batch(r["frame_indices"]).asnumpy()
        assert src.shape[1:3] == (kw["h"], kw["w"])
        # the size the FFmpeg scaler is told about: MP4/MOV from the sample entry, others via PyAV
        assert D.coded_size(str(root / r["path"])) == (kw["h"], kw["w"])
        mp4_track = D.mp4_video_track(str(root / r["path"]))
        assert mp4_track == ((kw["h"], kw["w"], 0) if r["path"].endswith((".mp4", ".mov")) else None)
        # resized in FFmpeg for every codec, and a faithful resize (PIL for comparison)
        assert np.abs(SH.decode_frames(r).astype(int) - D.resize_frames(src, h, w)).mean() < 6, vid


def test_phone_videos_are_turned_upright(tmp_path, ray_local):
    """A phone's portrait video is stored landscape with a display rotation in the track matrix;
    decord decodes it as stored. The clips must be what a player shows (FFmpeg's convention,
    checked against PyAV's reading of the same files), for MP4 and MOV, with and without the
    resize inside FFmpeg."""
    import av

    from conftest import make_videos

    root = tmp_path / "phone"
    # FFmpeg's counter-clockwise degrees as written -> the turn the clips get (np.rot90's k, counter-clockwise)
    turns = {0: 0, 90: 1, -90: 3, 180: 2}
    specs = [(f"{ext}/{ext}_r{deg}.{ext}", dict(h=24, w=40, n=10, fps=8, rotation=deg, seed=3))
             for deg in turns for ext in ("mp4", "mov")]
    make_videos([(str(root / p), kw) for p, kw in specs])
    for p, kw in specs:
        with av.open(str(root / p)) as c:  # FFmpeg's own reading of the display matrix
            assert next(c.decode(video=0)).rotation % 360 == kw["rotation"] % 360
        assert D.mp4_video_track(str(root / p)) == (24, 40, kw["rotation"] % 360)
    m = A.folder(str(root))
    for short_side in (0, 20):
        out = str(tmp_path / f"out{short_side}")
        s = ingest(m, IngestConfig(out=out, frames=4, clips_per_video=1, short_side=short_side), log=None)
        assert s["rejected"] == 0 and s["written_videos"] == len(specs)
        for r in SH.read_clips_table(out).to_pylist():
            deg = int(re.search(r"_r(-?\d+)\.", r["path"]).group(1))
            stored = D._decode_stored(str(root / r["path"]), np.array(r["frame_indices"]))  # PyAV: as stored
            assert stored.shape[1:3] == (24, 40)
            h, w = S.resized_hw(24, 40, short_side)
            want = np.rot90(D.resize_frames(stored, h, w), turns[deg], axes=(1, 2))
            got = SH.decode_frames(r)
            assert (r["height"], r["width"]) == want.shape[1:3] == got.shape[1:3], r["video_id"]
            assert np.abs(got.astype(int) - want).mean() < 6, r["video_id"]
            # and not any other turn: the red corner lands where the player shows it
            # (turns of the resized frames: the stored size's shapes matched no resized clip, and the
            # list was empty at short side 20; the half turn always has the clip's shape)
            resized = D.resize_frames(stored, h, w)
            others = [np.abs(got.astype(int) - np.rot90(resized, k, axes=(1, 2))).mean()
                      for k in range(4) if k != turns[deg] and np.rot90(resized, k, axes=(1, 2)).shape == want.shape]
            assert others and all(o > 10 for o in others), (r["video_id"], others)


def _patch_mp4(src, dst, fn):
    """A copy of the MP4 ``src`` with ``fn(data, box)`` applied, ``box(name)`` the payload offset
    of the first box of that name (a plain byte search: the test files are tiny)."""
    data = bytearray(open(src, "rb").read())
    fn(data, lambda name: data.index(name) + 4)
    open(dst, "wb").write(bytes(data))


def _cut_head(data, box, frames):
    """``ffmpeg -ss ... -c copy``'s edit list: presentation starts ``frames`` frames later."""
    import struct

    delta = struct.unpack(">I", data[box(b"stts") + 12:box(b"stts") + 16])[0]
    at = box(b"elst") + 12  # version/flags, entry count, segment duration, then media_time
    struct.pack_into(">i", data, at, struct.unpack(">i", data[at:at + 4])[0] + frames * delta)


def _mirror(data, box):
    """A horizontally mirrored display matrix (a = -1) in the track header."""
    data[box(b"tkhd") + 40:box(b"tkhd") + 44] = (-65536).to_bytes(4, "big", signed=True)


@needs_decord
def test_where_decords_frames_are_wrong_ffmpeg_decodes_in_order(tmp_path, monkeypatch):
    """decord seeks MPEG program streams and AVIs with B-frames to other frames, counts and seeks
    into the frames an edit list hides (clips cut with `ffmpeg -ss -c copy`), turns mirrored
    matrices instead of leaving them, cannot open H.264 in MPEG-TS, and in Matroska obeys a rotate
    tag whose turned size it must be told: each was stored with wrong frames, squeezed or rejected.
    Those files are decoded by FFmpeg in order (PyAV); the clips are its frames at the planned
    indices, as a player shows them. A plain MP4 stays on decord's seeking path."""
    import av

    from conftest import make_videos, moving_frames

    d = tmp_path / "v"
    make_videos([(str(d / "ps.mpg"), dict(n=40, h=32, w=64, codec="mpeg2video", options={"bf": "2", "g": "12"}, seed=1)),
                 (str(d / "xvid_b.avi"), dict(n=40, h=32, w=64, codec="mpeg4", options={"bf": "2", "g": "12"}, seed=2)),
                 (str(d / "h264.ts"), dict(n=40, h=32, w=64, seed=3)),
                 (str(d / "rotate_tag.mkv"), dict(n=20, h=32, w=64, seed=4, tags={"rotate": "90"})),
                 (str(d / "plain.mp4"), dict(n=40, h=32, w=64, seed=5)),
                 # (session 28) MPEG-4 Part 2 with B-frames outside AVI, H.264 in AVI: decord's frames were others
                 (str(d / "xvid_b.mp4"), dict(n=40, h=32, w=64, codec="mpeg4", options={"bf": "2", "g": "12"}, seed=7)),
                 (str(d / "xvid_b.mkv"), dict(n=40, h=32, w=64, codec="mpeg4", options={"bf": "2", "g": "12"}, seed=8)),
                 (str(d / "h264.avi"), dict(n=40, h=32, w=64, seed=9, options={"g": "30"})),
                 # (session 43) WMV in ASF: decord's seeks landed a keyframe interval or two early
                 (str(d / "wmv2.wmv"), dict(n=90, h=32, w=64, codec="wmv2", options={"g": "15"}, seed=10)),
                 (str(d / "gop12.mkv"), dict(n=40, h=32, w=64, seed=11, options={"g": "12"})),
                 (str(d / "vp9.webm"), dict(n=40, h=32, w=64, codec="libvpx-vp9", seed=14, options={"g": "12"}))])
    _patch_mp4(d / "plain.mp4", d / "cut_head.mp4", lambda data, box: _cut_head(data, box, 10))
    _patch_mp4(d / "plain.mp4", d / "mirrored.mp4", _mirror)
    # a stream copy cut at a P-frame (its first packets dropped, no edit list): decord counted the
    # undecodable ones as frames and its indices drifted
    # (VP9's decoder raises on those packets where H.264's skips them: the file was rejected as corrupt)
    def in_order(path):  # what FFmpeg decodes, in order, as stored (a player skips what cannot decode)
        frames = []
        with av.open(path) as c:
            for packet in c.demux(video=0):
                try:
                    frames += [f.to_ndarray(format="rgb24") for f in packet.decode()]
                except av.error.InvalidDataError:
                    pass
        return np.stack(frames)

    mid_gop_frames = {}
    for src_name, name in (("gop12.mkv", "mid_gop.mkv"), ("vp9.webm", "mid_gop.webm")):
        with av.open(str(d / src_name)) as src, av.open(str(d / name), "w") as dst:
            out = dst.add_stream_from_template(src.streams.video[0])
            for i, packet in enumerate(p for p in src.demux(video=0) if p.dts is not None):
                if i >= 5:
                    packet.stream = out
                    dst.mux(packet)
        mid_gop_frames[name] = len(in_order(str(d / name)))
    # two video tracks in one MP4 (a dual-camera file): decord decoded the second at the first one's size
    with av.open(str(d / "two_tracks.mp4"), "w") as c:
        first, second = c.add_stream("libx264", rate=8), c.add_stream("libx264", rate=8)
        (first.width, first.height), (second.width, second.height) = (64, 32), (128, 48)
        for a, b in zip(moving_frames(40, 32, 64, seed=12), moving_frames(40, 48, 128, seed=13)):
            for stream, frame in ((first, a), (second, 255 - b)):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(packet)
        for stream in (first, second):
            for packet in stream.encode():
                c.mux(packet)
    # (file, frames a player shows, the clips' turn: np.rot90's k)
    cases = [("ps.mpg", 40, 0), ("xvid_b.avi", 40, 0), ("h264.ts", 40, 0), ("rotate_tag.mkv", 20, 3),
             ("cut_head.mp4", 30, 0), ("mirrored.mp4", 40, 0), ("plain.mp4", 40, 0), ("xvid_b.mp4", 40, 0),
             ("xvid_b.mkv", 40, 0), ("h264.avi", 40, 0), ("wmv2.wmv", 90, 0), ("mid_gop.mkv", mid_gop_frames["mid_gop.mkv"], 0),
             ("mid_gop.webm", mid_gop_frames["mid_gop.webm"], 0),
             ("two_tracks.mp4", 40, 0)]
    reference = []
    monkeypatch.setattr(D, "_decode_reference", lambda *a, _f=D._decode_reference, **k: reference.append(a[0]) or _f(*a, **k))
    for name, frames, turn in cases:
        path = str(d / name)
        truth = in_order(path)
        assert len(truth) == frames, name
        for short_side in (0, 20):
            res = D.decode_video(dict(path=path, video_id=name, split="test", frames=8, clips_per_video=1, eval_clips=2,
                                      seed=0, short_side=short_side, min_frames=8))
            assert res["ok"], (name, res)
            assert res["src_num_frames"] == frames and res["rotation"] == 90 * turn % 360, (name, res["src_num_frames"])
            for _, _, idx, clip in res["views"]:
                want = np.rot90(truth[idx], turn, axes=(1, 2))
                want = D.resize_frames(np.ascontiguousarray(want), *clip.shape[1:3])
                assert np.abs(clip.astype(int) - want).mean() < 6, (name, short_side)
    assert sorted(set(reference)) == sorted(str(d / n) for n, _, _ in cases if n != "plain.mp4")
    assert all(n < 35 for n in mid_gop_frames.values())  # (the dropped packets took frames that need them with them)


def test_a_file_cut_short_keeps_the_frames_before_the_cut(tmp_path):
    """An interrupted copy (the container declares more bytes than the file holds) was rejected
    whole as truncated, while a damaged tail kept its decodable frames: the same rule now, and too
    few frames before the cut stay `truncated`, naming the count. The frames kept are the uncut
    file's, every one: a B-frame lost in the cut must not let the frames shown after it slide
    into its place (they did at most cuts), and the cut's partial packet is not a frame."""
    import av

    from conftest import make_videos

    make_videos([(str(tmp_path / "full.mkv"), dict(n=40, h=32, w=64, seed=6))])  # x264: B-frames
    data = (tmp_path / "full.mkv").read_bytes()
    with av.open(str(tmp_path / "full.mkv")) as c:
        full = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    for fraction, kept in ((0.56, True), (0.64, True), (0.72, True), (0.8, True), (0.92, True), (0.1, False)):
        cut = tmp_path / f"cut{int(fraction * 100)}.mkv"
        cut.write_bytes(data[:int(len(data) * fraction)])
        assert D.probe_container(str(cut)) == ("matroska", D.TRUNCATED)
        job = dict(path=str(cut), video_id="c", split="test", frames=8, clips_per_video=1, eval_clips=1,
                   seed=0, short_side=0, min_frames=8)
        res = D.decode_video(dict(job, all_frames=True))
        assert res["ok"] == kept, res
        # predict and serve want the whole file: a half-uploaded one is refused
        assert D.decode_video({**job, "whole_file": True})["reason"] == D.TRUNCATED
        if kept:
            n = res["src_num_frames"]
            assert 8 <= n < 40 * fraction
            np.testing.assert_array_equal(res["views"][0][3], full[:n], err_msg=str(fraction))
            sampled = D.decode_video(job)  # the planned views: the same frames
            for _, _, idx, clip in sampled["views"]:
                np.testing.assert_array_equal(clip, full[idx])
        else:
            assert res["reason"] == D.TRUNCATED and "declares more bytes" in res["detail"], res


def test_cuts_in_files_that_declare_no_length_are_told_where_the_format_allows(tmp_path):
    """A transport stream declares no length, and an MP4 whose media box runs "to the end of the
    file" (size 0) passes the box walk: cut short, both were predicted (and served) from their
    first part as whole videos. Now a stream that ends inside a 188-byte packet is `truncated`, and
    so is an MP4 whose last chunk of frames ends past the file; ingest still keeps the frames before
    the cut. A whole MP4 that starts on a non-key frame (remuxed from a stream joined mid-GOP: FFmpeg
    decodes fewer frames than it lists) is not cut, and is still predicted."""
    import struct
    import subprocess
    import sys

    from conftest import make_videos

    open_start = tmp_path / "open_start.mp4"   # 60 frames, GOP 12, its first 4 packets dropped on remux
    subprocess.run([sys.executable, "-c", """
import sys, av, numpy as np
src, dst = sys.argv[1], sys.argv[2]
with av.open(src, "w") as c:
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    s.options = {"g": "12", "bf": "0", "keyint_min": "12", "sc_threshold": "0", "threads": "1"}
    for i in range(60):
        img = np.full((48, 64, 3), (i * 4) % 255, np.uint8); img[:, i % 64] = 255
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")): c.mux(p)
    for p in s.encode(): c.mux(p)
with av.open(src) as inp, av.open(dst, "w") as out:
    ist = inp.streams.video[0]; ost = out.add_stream_from_template(ist); first = None
    for k, p in enumerate((p for p in inp.demux(ist) if p.size), 1):
        if k <= 4: continue
        first = p.pts if first is None else first
        p.pts -= first; p.dts -= first; p.stream = ost; out.mux(p)
""", str(tmp_path / "gop.mp4"), str(open_start)], check=True)

    make_videos([(str(tmp_path / "full.ts"), dict(n=40, h=32, w=64, seed=6)),
                 (str(tmp_path / "full.mp4"), dict(n=40, h=32, w=64, seed=6, container_options={"movflags": "faststart"}))])
    mp4 = bytearray((tmp_path / "full.mp4").read_bytes())
    mdat = mp4.index(b"mdat") - 4
    assert mp4.index(b"moov") < mdat   # fast start: the header first, the media box last
    mp4[mdat:mdat + 4] = struct.pack(">I", 0)
    job = dict(video_id="c", split="test", frames=8, clips_per_video=1, eval_clips=1, seed=0, short_side=0, min_frames=8)
    for name, data in (("full.ts", (tmp_path / "full.ts").read_bytes()), ("full.mp4", bytes(mp4))):
        kind = "mpeg-ts" if name.endswith(".ts") else "mp4"
        whole = tmp_path / f"whole_{name}"
        whole.write_bytes(data)
        assert D.probe_container(str(whole)) == (kind, None)
        assert D.decode_video({**job, "path": str(whole), "whole_file": True})["src_num_frames"] == 40
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[:int(len(data) * 0.6) // 188 * 188 + 100])   # inside a packet, past the header
        res = D.decode_video({**job, "path": str(cut), "whole_file": True})
        assert res["reason"] == D.TRUNCATED, (name, res)
        kept = D.decode_video({**job, "path": str(cut), "all_frames": True})
        assert kept["ok"] and 8 <= kept["src_num_frames"] < 40, (name, kept)
    assert D.probe_container(str(tmp_path / "cut_full.ts"))[1] == D.TRUNCATED
    whole = D.decode_video({**job, "path": str(open_start), "whole_file": True})
    assert whole["ok"] and 40 <= whole["src_num_frames"] <= 56, whole
    assert "inside a packet" in D.decode_video({**job, "path": str(tmp_path / "cut_full.ts"), "whole_file": True})["detail"]


def test_a_length_limit_is_judged_before_the_frames_are_decoded(tmp_path):
    """Serve's ``max_video_seconds`` was checked after the whole decode: a long transport stream
    (decoded in order, every frame counted, then the sampled ones decoded again) could run into the
    decode time limit and get 408 instead of 413. The decoder now refuses it as it counts, on
    either path (decord's frame count, FFmpeg's in-order decode)."""
    from conftest import make_videos

    make_videos([(str(tmp_path / "long.ts"), dict(n=160, h=32, w=32, fps=8)),
                 (str(tmp_path / "long.mp4"), dict(n=160, h=32, w=32, fps=8))])   # 20 s each
    job = dict(video_id="c", split="test", frames=8, clips_per_video=1, eval_clips=1, seed=0, short_side=0,
               min_frames=8, whole_file=True)
    for name in ("long.ts", "long.mp4"):
        path = str(tmp_path / name)
        res = D.decode_video({**job, "path": path, "max_seconds": 12})
        assert res["reason"] == D.TOO_LONG and "> limit 12 s" in res["detail"], (name, res)
        assert D.decode_video({**job, "path": path, "max_seconds": 25})["src_num_frames"] == 160
    # the in-order count stops where the limit is passed, not at the end of the file
    counted = D._decodable_prefix(str(tmp_path / "long.ts"), job={"max_seconds": 25})
    assert counted[0] == 160
    try:
        D._decodable_prefix(str(tmp_path / "long.ts"), job={"max_seconds": 5})
    except D.DecodeReject as exc:
        assert exc.reason == D.TOO_LONG and "5.1 s > limit 5 s" in exc.detail, exc.detail
    else:
        raise AssertionError("the count went past the limit")


def test_a_cut_mp4_keeps_its_header_s_orientation(tmp_path):
    """A fast-start MP4 cut short still has its whole header: a mirrored track matrix is left as
    stored, as for the uncut file (FFmpeg's frame rotation reads it as a half turn: the cut copy
    came out upside down), and a quarter turn still turns."""
    import av

    from conftest import make_videos

    faststart = {"movflags": "faststart"}
    make_videos([(str(tmp_path / "plain.mp4"), dict(n=40, h=32, w=64, seed=7, container_options=faststart)),
                 (str(tmp_path / "turned.mp4"), dict(n=40, h=32, w=64, seed=7, rotation=-90, container_options=faststart))])
    _patch_mp4(tmp_path / "plain.mp4", tmp_path / "mirrored.mp4", _mirror)
    with av.open(str(tmp_path / "plain.mp4")) as c:
        stored = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    for name, turn in (("mirrored.mp4", 0), ("turned.mp4", 3), ("plain.mp4", 0)):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[:len(data) * 2 // 3])
        assert D.probe_container(str(cut)) == ("mp4", D.TRUNCATED)
        res = D.decode_video(dict(path=str(cut), video_id="c", split="test", frames=8, clips_per_video=1,
                                  eval_clips=1, seed=0, short_side=0, min_frames=8, all_frames=True))
        assert res["ok"] and res["rotation"] == 90 * turn, (name, res.get("rotation"))
        n = res["src_num_frames"]
        np.testing.assert_array_equal(res["views"][0][3], np.rot90(stored[:n], turn, axes=(1, 2)), err_msg=name)


def test_timing_tables_that_claim_more_samples_than_the_file_holds_are_not_expanded(tmp_path):
    """The header parse expanded stts/ctts to one entry per sample as the file's counts claim: a
    3 KB MP4 claiming 50 million samples cost 1.2 GB (2**31: 16 GiB, or a MemoryError out of
    the ingest driver). Such tables are damaged: nothing is expanded, the decoders tell."""
    import struct
    import tracemalloc

    from conftest import make_videos

    make_videos([(str(tmp_path / "plain.mp4"), dict(n=20, h=32, w=64, seed=8))])

    def claim(data, box):  # the first stts row's sample count
        struct.pack_into(">I", data, box(b"stts") + 8, 50_000_000)

    _patch_mp4(tmp_path / "plain.mp4", tmp_path / "claims.mp4", claim)
    _patch_mp4(tmp_path / "claims.mp4", tmp_path / "claims_cut.mp4", lambda data, box: _cut_head(data, box, 2))
    for name in ("claims.mp4", "claims_cut.mp4"):
        tracemalloc.start()
        try:
            track = D.mp4_track(str(tmp_path / name))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert track is not None and (track.height, track.width) == (32, 64) and peak < 20 << 20, (name, peak)


def test_file_names_in_another_encoding_are_decoded_and_stored_as_utf8_text(tmp_path, ray_local):
    """A Latin-1 archive's names (bytes that are not UTF-8) reach Python as lone surrogates: decord
    refused the path (every such video was rejected as corrupt) and Parquet cannot store the name.
    The video is decoded, its id and path stored with the bytes written as \\xNN."""
    from conftest import make_videos

    root = tmp_path / "latin1"
    make_videos([(str(root / "b" / "plain.mp4"), dict(n=10, seed=1)), (str(root / "caf" / "x.mp4"), dict(n=10, seed=2))])
    odd = os.fsdecode(bytes(root / "caf") + b"/caf\xe9.mp4")
    os.rename(root / "caf" / "x.mp4", odd)
    os.rename(root / "caf", os.fsdecode(bytes(root) + b"/caf\xe9s"))  # a class folder too
    m = A.folder(str(root))
    out = str(tmp_path / "out")
    s = ingest(m, IngestConfig(out=out, frames=4, clips_per_video=1, short_side=20), log=None)
    assert s["rejected"] == 0 and s["written_videos"] == 2, open(os.path.join(out, "rejects.jsonl")).read()
    rows = SH.read_clips_table(out).to_pylist()
    assert {r["video_id"] for r in rows} == {"caf\\xe9s/caf\\xe9", "b/plain"}
    assert {r["class_name"] for r in rows} == {"b", "caf\\xe9s"} and SH.load_dataset_info(out)["classes"] == ["b", "caf\\xe9s"]
    assert all(SH.decode_frames(r).shape == (4, 20, 20, 3) for r in rows)


def _damage_tail(src, dst, fraction):
    """A copy of the MP4 ``src`` whose last ``fraction`` of coded video (the end of ``mdat``) is
    zeros: the container still lists every frame, the decoder fails from some frame on."""
    import struct

    data = bytearray(open(src, "rb").read())
    pos = 0
    while data[pos + 4:pos + 8] != b"mdat":
        pos += struct.unpack(">I", data[pos:pos + 4])[0]
    start, end = pos + 8, pos + struct.unpack(">I", data[pos:pos + 4])[0]
    cut = int(end - (end - start) * fraction)
    data[cut:end] = bytes(end - cut)
    open(dst, "wb").write(bytes(data))


@needs_decord
def test_a_damaged_tail_keeps_the_frames_before_it(tmp_path, ray_local):
    """A video whose last frames do not decode (cut or damaged uploads, common in Kinetics) was
    rejected whole as corrupt; its frames before the first failure are the video now, its views
    planned on them. Too few of them: too_short, naming the counts."""
    from conftest import make_videos

    root = tmp_path / "tails"
    make_videos([(str(root / "src" / "v.mp4"), dict(n=40, h=32, w=32, seed=4))])
    (root / "c").mkdir()
    (root / "d").mkdir()  # (a dataset of one class is refused)
    for fraction in (0.3, 0.5, 0.7):
        _damage_tail(root / "src" / "v.mp4", root / ("d" if fraction == 0.3 else "c") / f"cut{int(fraction * 100)}.mp4",
                     fraction)
    shutil.rmtree(root / "src")
    out = str(tmp_path / "out")
    s = ingest(A.folder(str(root)), IngestConfig(out=out, frames=8, clips_per_video=2, short_side=20), log=None)
    assert s["inputs"] == 3 and s["written_videos"] == 2, open(os.path.join(out, "rejects.jsonl")).read()
    rejects = [json.loads(ln) for ln in open(os.path.join(out, "rejects.jsonl"))]
    assert [r["video_id"] for r in rejects] == ["c/cut70"] and rejects[0]["reason"] == "too_short"
    assert "of 40 frames decodable (min_frames 8)" in rejects[0]["detail"]
    for r in SH.read_clips_table(out).to_pylist():
        n = r["src_num_frames"]
        assert 8 <= n < 40 and max(r["frame_indices"]) < n, r["video_id"]
        # PyAV (FFmpeg, decoding in order) agrees on the kept frames
        ref = D.resize_frames(D._decode_stored(str(root / r["path"]), np.array(r["frame_indices"])), 20, 20)
        assert np.abs(SH.decode_frames(r).astype(int) - ref).mean() < 6, r["video_id"]


def test_a_source_size_ingest_sizes_shards_and_row_groups_by_the_sources(tmp_path, ray_local, monkeypatch):
    """--short-side 0 keeps HD frames: sized as if 256 pixels, shards came out ~25x their target
    and a 128-clip row group buffered gigabytes. The layout now comes from the inputs' own size."""
    from conftest import make_videos

    from dvfl.data import ingest as ingest_mod

    monkeypatch.setattr(ingest_mod, "ROW_GROUP_BYTES", 1 << 20)
    root = tmp_path / "big"
    make_videos([(str(root / "cd"[i % 2] / f"v{i}.mp4"), dict(n=10, h=96, w=128, seed=i)) for i in range(4)])
    out = str(tmp_path / "out")
    s = ingest(A.folder(str(root)), IngestConfig(out=out, frames=8, clips_per_video=2, short_side=0, target_shard_mb=2),
               log=None)
    assert s["written_videos"] == 4
    plan = json.load(open(os.path.join(out, SH.PLAN_JSON)))
    clip_bytes = 8 * 96 * 128 * 3
    assert plan["videos_per_shard"] == (2 << 20) // (2 * clip_bytes) == 3
    assert plan["row_group_clips"] == (1 << 20) // clip_bytes == 3
    pf = SH.parquet_file(SH.shard_paths(out)[0])
    assert pf.metadata.row_group(0).num_rows == 3 and SH.decode_frames(SH.read_clips_table(out).slice(0, 1)).shape[2:4] == (96, 128)


def test_deterministic_shards_and_fingerprint(syn_root, tmp_path, ray_local):
    m = manifest(syn_root)
    cfg = dict(frames=8, clips_per_video=2, short_side=32, seed=3, videos_per_shard=5)
    a = ingest(manifest(syn_root), IngestConfig(out=str(tmp_path / "a"), **cfg), log=None)
    b = ingest(manifest(syn_root), IngestConfig(out=str(tmp_path / "b"), workers=1, videos_per_task=3, **cfg),
               log=None)
    # the earlier path (every clip through the driver, which writes all shards)
    c = ingest(manifest(syn_root), IngestConfig(out=str(tmp_path / "c"), writer="driver", **cfg), log=None)
    assert a["fingerprint"] == b["fingerprint"] == c["fingerprint"]
    # byte-identical: whole-shard tasks (a), shards cut into 3-video pieces and merged (b), the driver (c)
    assert shard_hashes(str(tmp_path / "a")) == shard_hashes(str(tmp_path / "b")) == shard_hashes(str(tmp_path / "c"))
    assert len(shard_hashes(str(tmp_path / "a"))) == 7
    assert not os.path.exists(tmp_path / "b" / "_parts")   # every piece merged, then removed
    # any change of parameters or inputs changes the fingerprint
    base = IngestConfig(out="x", **cfg)
    ids = {e.video_id: (os.path.getsize(e.path), "h") for e in m.entries}
    fp = compute_fingerprint(m, base.content_params(), ids)
    assert fp == compute_fingerprint(manifest(syn_root), base.content_params(), ids)
    for change in (dict(seed=4), dict(frames=4), dict(short_side=16), dict(clips_per_video=3),
                   dict(eval_clips=2), dict(min_frames=12)):
        assert compute_fingerprint(m, IngestConfig(out="x", **dict(cfg, **change)).content_params(), ids) != fp
    ids2 = dict(ids)
    k = sorted(ids2)[0]
    ids2[k] = (ids2[k][0], "other-bytes")
    assert compute_fingerprint(m, base.content_params(), ids2) != fp
    m2 = manifest(syn_root)
    m2.entries[0].label = (m2.entries[0].label + 1) % 4
    assert compute_fingerprint(m2, base.content_params(), ids) != fp
    m3 = manifest(syn_root)
    m3.entries = m3.entries[1:]
    assert compute_fingerprint(m3, base.content_params(), ids) != fp


def test_a_video_that_cannot_be_read_now_never_replaces_a_finished_ingest(syn_root, tmp_path, ray_local, monkeypatch):
    """One listed video failing to read on a rerun (an NFS hiccup) changed the fingerprint: a run
    re-ingesting its own clips (data.clips unset) took that for another configuration's clips,
    deleted the finished ingest and decoded everything again, then again on the next run."""
    from dvfl.data import ingest as ingest_mod
    from dvfl.data.ingest import IngestInputsUnreadable

    out = str(tmp_path / "clips")
    cfg = IngestConfig(out=out, frames=8, clips_per_video=1, short_side=16)
    ingest(manifest(syn_root), cfg, log=None)
    before = {p: os.path.getmtime(p) for p in SH.shard_paths(out)}
    flaky = sorted(e.path for e in manifest(syn_root).entries)[3]
    real = ingest_mod.file_identity

    def identity(path):
        if path == flaky:
            raise OSError(5, "Input/output error", path)
        return real(path)

    monkeypatch.setattr(ingest_mod, "file_identity", identity)
    with pytest.raises(IngestInputsUnreadable, match=r"holds an ingest, and 1 of the listed videos it did not find "
                                                     r"unreadable cannot be read now \(e\.g\. .*Input/output error") as refused:
        ingest(manifest(syn_root), cfg, log=None)
    assert "already holds an ingest with a different" not in str(refused.value)  # (what a run re-ingests on)
    assert {p: os.path.getmtime(p) for p in SH.shard_paths(out)} == before  # nothing deleted or rewritten
    monkeypatch.setattr(ingest_mod, "file_identity", real)
    assert ingest(manifest(syn_root), cfg, log=None)["accounting_ok"]  # read again: the finished ingest reused
    # a run that ingests its own clips (data.clips unset): one config error, the clips kept
    from dvfl.config import ConfigError, load_config
    from dvfl.pipeline import ready_clips

    run_cfg = load_config(None, [("data.dataset", "ucf101"), ("data.root", syn_root[0]), ("output_dir", str(tmp_path / "run")),
                                 ("data.frames", 8), ("data.short_side", 16), ("data.crop_size", 16),
                                 ("data.clips_per_video", 1), ("data.eval_clips", 1), ("eval.clips", 1), ("eval.crops", 1)])
    info = ready_clips(run_cfg, log=None)
    monkeypatch.setattr(ingest_mod, "file_identity", identity)
    with pytest.raises(ConfigError, match=r"^data\.root: .* cannot be read now .*; to re-ingest without them, delete "
                                          r".*/run/clips$"):
        ready_clips(run_cfg, log=None)
    assert SH.load_dataset_info(run_cfg.clips_dir) == info
    # a video the finished ingest rejected as unreadable too: another setting re-ingests as before
    kept = str(tmp_path / "kept")
    ingest(manifest(syn_root), IngestConfig(out=kept, frames=8, clips_per_video=1, short_side=16), log=None)
    with pytest.raises(ValueError, match="already holds an ingest with a different fingerprint"):
        ingest(manifest(syn_root), IngestConfig(out=kept, frames=8, clips_per_video=1, short_side=24), log=None)


def test_the_driver_writes_no_clip(syn_root, tmp_path, ray_local, monkeypatch):
    """Decode tasks write their shards (or pieces of them) themselves: with the shard writer
    broken in the driver process only, the ingest still completes, for whole-shard tasks and for
    shards cut into pieces and merged; the earlier driver-written path fails."""
    def refuse(*a, **k):
        raise AssertionError("the driver opened a shard writer")

    monkeypatch.setattr(SH.AtomicShardWriter, "__init__", refuse)  # in this process; Ray workers are others
    cfg = dict(frames=8, clips_per_video=1, short_side=16, videos_per_shard=8)
    for name, extra in (("whole", {}), ("pieces", dict(workers=2, videos_per_task=3))):
        s = ingest(manifest(syn_root), IngestConfig(out=str(tmp_path / name), **cfg, **extra), log=None)
        assert s["accounting_ok"] and s["written_videos"] == 27 and s["clips"] == 27
    with pytest.raises(AssertionError, match="the driver opened a shard writer"):
        ingest(manifest(syn_root), IngestConfig(out=str(tmp_path / "driver"), writer="driver", **cfg), log=None)


def test_fingerprint_sees_file_content(syn_root, tmp_path, ray_local):
    root, _ = syn_root
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    m = A.ucf101(copy, 1)
    cfg = dict(frames=8, short_side=32)
    f1 = ingest(m, IngestConfig(out=str(tmp_path / "o1"), **cfg), log=None)["fingerprint"]
    victim = m.entries[3].path
    data = bytearray(open(victim, "rb").read())
    data[-100] ^= 0xFF  # same size, different bytes
    open(victim, "wb").write(bytes(data))
    f2 = ingest(A.ucf101(copy, 1), IngestConfig(out=str(tmp_path / "o2"), **cfg), log=None)["fingerprint"]
    assert f1 != f2
    with pytest.raises(ValueError, match="different fingerprint"):  # never mixes two datasets in one --out
        ingest(A.ucf101(copy, 1), IngestConfig(out=str(tmp_path / "o1"), **cfg), log=None)
    f3 = ingest(A.ucf101(copy, 1), IngestConfig(out=str(tmp_path / "o1"), overwrite=True, **cfg), log=None)
    assert f3["fingerprint"] == f2 and f3["shards_skipped"] == 0


def test_resume_skips_finished_shards(syn_root, tmp_path, ray_local, monkeypatch):
    out = str(tmp_path / "out")
    cfg = dict(frames=8, clips_per_video=2, short_side=32, videos_per_shard=4)
    s1 = ingest(manifest(syn_root), IngestConfig(out=out, **cfg), log=None)
    ref = shard_hashes(out)
    assert s1["shards"] == 7 and s1["shards_skipped"] == 0  # train 16 -> 4, test 8 -> 2, unlabeled 3 -> 1
    # simulate an interrupted run: one shard never published, one only got its sidecar, stale temp files
    os.unlink(os.path.join(out, "shards", "train-00002.parquet"))
    os.unlink(os.path.join(out, "shards", "_meta", "test-00001.json"))
    open(os.path.join(out, "shards", ".train-00002.parquet.deadbeef.tmp"), "wb").write(b"PAR1partial")
    # and in the output folder: a kill while rejects.jsonl was written (session 28: left there for ever)
    open(os.path.join(out, ".rejects.jsonl.deadbeef.tmp"), "wb").write(b'{"reason"')
    # on a disk with less free space than the clips to write may take, decoded: said at the start, not found later
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10 ** 9, 10 ** 9, 1000))
    said = []
    s2 = ingest(manifest(syn_root), IngestConfig(out=out, **cfg, progress=False), log=said.append)
    assert s2["shards_skipped"] == 5 and s2["videos_decoded_this_run"] == 8
    assert [line for line in said if line.startswith("[ingest] note: the clips may take up to ") and
            f"; {out} has 0.0 GiB free" in line], said
    monkeypatch.undo()
    assert shard_hashes(out) == ref
    assert not glob.glob(os.path.join(out, "shards", ".*.tmp")) and not glob.glob(os.path.join(out, ".*.tmp"))
    assert s2["clips"] == s1["clips"] and s2["counts"] == s1["counts"]
    s3 = ingest(manifest(syn_root), IngestConfig(out=out, **cfg), log=None)
    assert s3["shards_skipped"] == 7 and s3["videos_decoded_this_run"] == 0 and s3["clips"] == s1["clips"]
    with pytest.raises(ValueError, match="shard layout"):
        ingest(manifest(syn_root), IngestConfig(out=out, **dict(cfg, videos_per_shard=3)), log=None)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["accounting_ok"] and summary["written_videos"] == 27


def test_clips_decoded_by_earlier_decode_rules_are_not_reused(syn_root, tmp_path, ray_local, monkeypatch):
    """Decoder fixes (AVIs with B-frames, H.264 in AVI, WMV/ASF, ...) changed the frames stored but not
    the fingerprint: an earlier version's clips, wrong frames and all, were reused by every rerun and
    every run keyed on them. The decode rules' revision is in the fingerprint; such clips are refused,
    saying why (and a run re-ingests its own clips folder)."""
    from dvfl.data import decode as D

    out = str(tmp_path / "out")
    cfg = dict(frames=8, clips_per_video=1, short_side=32, videos_per_shard=8)
    current = IngestConfig.content_params
    monkeypatch.setattr(IngestConfig, "content_params",  # what versions before session 48 wrote
                        lambda self: {k: v for k, v in current(self).items() if k != "decode_rules"})
    old = ingest(manifest(syn_root), IngestConfig(out=out, **cfg), log=None)
    monkeypatch.undo()
    # given as a run's data.clips (used as they are: a Kinetics ingest takes hours): a note says so
    from dvfl.data.ingest import older_decode_rules_note

    assert "was decoded by an earlier version (decode rules before revision 1" in \
        older_decode_rules_note(out, SH.load_dataset_info(out))
    with pytest.raises(ValueError, match=f"different decoder: its clips were decoded before the rules of revision "
                                         f"{D.DECODE_RULES} .*; use a new --out or pass --fresh"):
        ingest(manifest(syn_root), IngestConfig(out=out, **cfg), log=None)
    again = ingest(manifest(syn_root), IngestConfig(out=out, overwrite=True, **cfg), log=None)
    assert again["fingerprint"] != old["fingerprint"] and again["clips"] == old["clips"]
    assert json.load(open(os.path.join(out, SH.DATASET_JSON)))["params"]["decode_rules"] == D.DECODE_RULES
    assert older_decode_rules_note(out, SH.load_dataset_info(out)) is None


def test_an_ingest_that_does_not_add_up_is_not_committed_and_leaves_no_temp_files(syn_root, tmp_path, ray_local,
                                                                                  monkeypatch):
    """dataset.json (the commit marker distill trusts) was written before the accounting check
    that fails the ingest; temp files of tasks that died mid-write and were retried stayed."""
    from dvfl import storage

    out = str(tmp_path / "out")
    cfg = IngestConfig(out=out, frames=8, clips_per_video=1, short_side=32, videos_per_shard=8)
    read_json = storage.read_json

    def gather(path):  # the driver reads every shard's sidecar once the tasks are done
        meta = read_json(path)
        if "/_meta/" in path:
            # what a task that died mid-write leaves behind when Ray's retry succeeds
            open(os.path.join(out, "shards", f".{meta['shard']}.parquet.dead.tmp"), "wb").write(b"PAR1partial")
            if meta["shard"] == "test-00000" and bad:
                meta["written_videos"] -= 1  # a shard that lost a video without a reject: a bug
        return meta

    monkeypatch.setattr(storage, "read_json", gather)
    bad = True
    with pytest.raises(RuntimeError, match=r"accounting mismatch: written 26 \+ rejected 0 != inputs 27"):
        ingest(manifest(syn_root), cfg, log=None)
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    bad = False
    summary = ingest(manifest(syn_root), cfg, log=None)
    assert summary["accounting_ok"] and os.path.exists(os.path.join(out, "dataset.json"))
    assert not glob.glob(os.path.join(out, "shards", ".*.tmp"))


def test_another_shard_layout_keeps_the_fingerprint_and_changes_the_shards_content_digests(syn_root, tmp_path,
                                                                                            ray_local):
    # the digest is what a teacher cache matches a logits file on (tests/test_teacher_and_distill.py)
    out = str(tmp_path / "out")
    cfg = dict(frames=8, clips_per_video=1, short_side=32)
    a = ingest(manifest(syn_root), IngestConfig(out=out, videos_per_shard=8, **cfg), log=None)
    shards_a = {s["file"]: s for s in SH.load_dataset_info(out)["shards"]}
    # --fresh deletes shards/ whole: a file no ingest writes there (a user's) stops it before any delete
    os.makedirs(os.path.join(out, "shards", "notes"))
    with open(os.path.join(out, "shards", "notes", "thesis.tex"), "w") as f:
        f.write("years of work")
    with pytest.raises(ValueError, match=r"holds files no ingest writes \(notes/thesis.tex\): nothing was deleted"):
        ingest(manifest(syn_root), IngestConfig(out=out, videos_per_shard=4, overwrite=True, **cfg), log=None)
    assert SH.load_dataset_info(out)["shards"] and os.path.exists(os.path.join(out, "shards", "train-00000.parquet"))
    os.rename(os.path.join(out, "shards", "notes"), str(tmp_path / "notes"))
    open(os.path.join(out, "shards", ".DS_Store"), "w").close()  # hidden files go with the folder
    b = ingest(manifest(syn_root), IngestConfig(out=out, videos_per_shard=4, overwrite=True, **cfg), log=None)
    shards_b = {s["file"]: s for s in SH.load_dataset_info(out)["shards"]}
    assert a["fingerprint"] == b["fingerprint"]
    both = sorted(set(shards_a) & set(shards_b))
    assert "shards/train-00000.parquet" in both and "shards/train-00001.parquet" in both
    first = shards_a["shards/train-00000.parquet"], shards_b["shards/train-00000.parquet"]
    second = shards_a["shards/train-00001.parquet"], shards_b["shards/train-00001.parquet"]
    assert first[0]["content"] != first[1]["content"] and second[0]["content"] != second[1]["content"]
    c = ingest(manifest(syn_root), IngestConfig(out=str(tmp_path / "again"), videos_per_shard=4, **cfg), log=None)
    assert c["fingerprint"] == b["fingerprint"]
    assert {s["file"]: s["content"] for s in SH.load_dataset_info(str(tmp_path / "again"))["shards"]} == \
        {f: s["content"] for f, s in shards_b.items()}  # the same inputs and layout: the same digests


def test_decode_tasks_follow_the_cluster_and_a_joined_one_is_told_how_to_ask_for_more(ray_local, monkeypatch):
    """An ingest started by distill/tune/protocol on an autoscaling cluster ran one decode task per
    CPU Ray had at its start (one, beside a CPU-less head) and never more as nodes came: the count is
    said on a joined cluster, with the field that sets it (data.decode_tasks, as --decode-tasks does)."""
    from dvfl.config import ConfigError, load_config
    from dvfl.data.ingest import decode_tasks_for_cluster

    lines = []
    cpus = int(ray_local.cluster_resources()["CPU"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert decode_tasks_for_cluster(lines.append) == cpus and lines == []
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    assert decode_tasks_for_cluster(lines.append) == cpus
    assert lines == [f"[ingest] {cpus} decode task(s) at a time: the cluster's {cpus} CPUs now (an autoscaling "
                     "cluster: --decode-tasks, or data.decode_tasks in a run's config, for the CPUs it may add)"]
    assert load_config(None, [("data.decode_tasks", 64)], check_paths=False).data.decode_tasks == 64
    with pytest.raises(ConfigError, match=r"data\.decode_tasks.*must be >= 0"):
        load_config(None, [("data.decode_tasks", -1)], check_paths=False)


@needs_decord
def test_a_damaged_packet_before_the_first_frame_out_ends_the_video(tmp_path):
    """Skipping what cannot decode before the first packet decodes (a stream cut mid-GOP: VP8/VP9
    raise there) must not skip a damaged packet after it: x264's B-frames hold the first frames back
    for reordering, and the video was kept with a hole (59 of 60 frames) instead of its 2 good ones."""
    import av

    from conftest import make_videos

    path = str(tmp_path / "b_frames.mkv")
    make_videos([(path, dict(n=60, h=32, w=64, seed=15))])  # x264's default: B-frames
    with av.open(path) as c:
        packets = [p for p in c.demux(video=0) if p.size]
        at, size = packets[2].pos, packets[2].size
    data = bytearray(open(path, "rb").read())
    data[at + 4:at + size] = np.random.default_rng(0).integers(0, 256, size - 4, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))
    res = D.decode_video(dict(path=path, video_id="d", split="test", frames=8, clips_per_video=1, eval_clips=1,
                              seed=0, short_side=0, min_frames=8))
    assert not res["ok"] and res["reason"] == D.TOO_SHORT and res["detail"].startswith("2 of 60 frames"), res


@needs_decord
def test_without_decord_ffmpeg_decodes_the_same_frames_and_the_ingest_says_so(video_factory, tmp_path):
    """decord publishes x86_64 wheels only: on a Mac or a Linux aarch64 laptop the project installs
    without it, and FFmpeg through PyAV decodes every video (a process where `import decord` fails)."""
    path = video_factory(str(tmp_path / "v.mp4"), n=40, h=48, w=64, fps=8)
    code = f"""
import json, sys
sys.modules["decord"] = None  # (what a machine without the package has: import decord fails)
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from dvfl.data import decode
from dvfl.data.ingest import IngestConfig
job = {{"path": {path!r}, "video_id": "v", "split": "test", "frames": 8, "clips_per_video": 1, "eval_clips": 2,
        "seed": 0, "short_side": 24, "min_frames": 8}}
r = decode.decode_video(job)
print(json.dumps({{"decord": decode.decord_version(), "ok": r["ok"], "size": [r["height"], r["width"]],
                  "indices": [v[2].tolist() for v in r["views"]], "frames": [v[3].tolist() for v in r["views"]],
                  "decoder": IngestConfig(out="o").content_params()["decoder"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = D.decode_video({"path": path, "video_id": "v", "split": "test", "frames": 8, "clips_per_video": 1,
                                "eval_clips": 2, "seed": 0, "short_side": 24, "min_frames": 8})
    assert got["decord"] is None and D.decord_version() is not None and got["decoder"].startswith("PyAV ")
    assert got["ok"] and got["size"] == [want["height"], want["width"]] == [24, 32]
    assert got["indices"] == [v[2].tolist() for v in want["views"]]
    # the same frames up to the scaler's rounding (FFmpeg's through decord vs PyAV's reformat)
    for mine, theirs in zip(got["frames"], want["views"]):
        assert np.abs(np.asarray(mine, dtype=np.int16) - theirs[3].astype(np.int16)).mean() < 4
