"""Every kind of bad input is rejected with its reason, never crashes the job, and the
accounting holds: written + rejected = inputs.

About the hanging file: we know of no small file that deterministically makes decord 0.6.0
hang, so the hang is *simulated inside the real decode worker path*: with
``IngestConfig(test_hooks=True)`` the decode child, on a file starting with
``DVFL-TEST-HANG``, calls libc ``sleep`` through ``ctypes.PyDLL``, i.e. a native call that
blocks while holding the GIL, like decord's hangs. Nothing in that process could interrupt
it; the test shows the per-file limit still stops it (the parent kills the child) and the
next files decode in a fresh child. ``DVFL-TEST-CRASH`` makes the child abort (like a
segfault in the decoder). All other bad files are real files.

Untrusted files: playlists (an HLS ``.m3u8`` or ``ffconcat`` text named ``.mp4``) would make FFmpeg
open other files or URLs, and a file of an unknown container would be handed to FFmpeg's probing;
both are refused before the decoder runs, and the decode child has no network.
"""
import json
import os
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import linux_only
from dvfl.data import adapters as A
from dvfl.data import shards as SH
from dvfl.data.decode import TEST_CRASH_MAGIC, TEST_HANG_MAGIC, TEST_URL_MAGIC
from dvfl.data.ingest import IngestConfig, ingest
from dvfl.data.worker import DecodeProcess


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    from conftest import make_videos

    base = str(tmp_path_factory.mktemp("bad"))
    root = os.path.join(base, "ds")  # the dataset root; base holds a file outside it
    v = lambda rel: os.path.join(root, rel)  # noqa: E731
    make_videos([
        (v("A/v_A_g08_c01.mp4"), dict(n=16, h=32, w=40, codec="libx264")),        # good
        (v("B/v_B_g08_c01.avi"), dict(n=12, h=33, w=47, codec="mpeg4", fps=25)),  # good
        (v("B/v_B_g01_c01.webm"), dict(n=10, h=30, w=30, codec="libvpx-vp9")),    # good (test split)
        (v("A/v_A_g08_c06.mp4"), dict(n=4, codec="libx264")),                     # too short (4 < 8)
        (v("src/full.mp4"), dict(n=16, codec="libx264")),
        (v("src/full.avi"), dict(n=16, codec="mpeg4")),
        (v("src/full.webm"), dict(n=16, codec="libvpx-vp9")),
    ])
    mp4 = open(v("src/full.mp4"), "rb").read()
    _write(v("A/v_A_g08_c02.mp4"), b"")                                           # empty
    _write(v("A/v_A_g08_c03.mp4"), b"this is a text file, not a video\n" * 20)    # not a video
    _write(v("A/v_A_g08_c04.mp4"), mp4[: len(mp4) // 2])                          # truncated MP4
    avi = open(v("src/full.avi"), "rb").read()
    _write(v("B/v_B_g08_c02.avi"), avi[: len(avi) * 2 // 3])                       # truncated AVI
    webm = open(v("src/full.webm"), "rb").read()
    _write(v("B/v_B_g08_c03.webm"), webm[: len(webm) // 2])                       # truncated WebM
    i = mp4.find(b"mdat")
    size = struct.unpack(">I", mp4[i - 4:i])[0]
    corrupt = bytearray(mp4)
    corrupt[i + 4:i - 4 + size] = b"\xff" * (size - 8)                           # corrupt: garbage frames
    _write(v("A/v_A_g08_c05.mp4"), bytes(corrupt))
    _write(v("A/v_A_g08_c08.mp4"), TEST_HANG_MAGIC + b"\0" * 64)                 # hangs (simulated, see above)
    _write(v("B/v_B_g08_c04.mp4"), TEST_CRASH_MAGIC + b"\0" * 64)                # crashes the decoder
    _write(v("A/v_A_g08_c09.mp4"), b"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:9/seg.ts\n#EXT-X-ENDLIST\n")  # HLS
    _write(v("A/v_A_g08_c10.mp4"), bytes(range(7, 250)) * 40)                      # unknown container
    _write(os.path.join(base, "secret.mp4"), mp4)                                   # a video outside the root
    os.symlink(os.path.join(base, "secret.mp4"), v("A/v_A_g08_c11.mp4"))           # symlink out of the root
    lst = os.path.join(root, "ucfTrainTestlist")
    os.makedirs(lst)
    _write(os.path.join(lst, "classInd.txt"), b"1 A\n2 B\n")
    train = ["A/v_A_g08_c01.mp4 1", "B/v_B_g08_c01.avi 2", "A/v_A_g08_c02.mp4 1", "A/v_A_g08_c03.mp4 1",
             "A/v_A_g08_c04.mp4 1", "B/v_B_g08_c02.avi 2", "B/v_B_g08_c03.webm 2", "A/v_A_g08_c05.mp4 1",
             "A/v_A_g08_c06.mp4 1", "A/v_A_g08_c07.mp4 1",  # missing
             "A/v_A_g08_c08.mp4 1", "B/v_B_g08_c04.mp4 2",
             "A/v_A_g08_c09.mp4 1", "A/v_A_g08_c10.mp4 1", "A/v_A_g08_c11.mp4 1",
             "A/../../secret.mp4 1",      # ../ out of the root
             "A/v_A_g09_c01.mp4 9",       # label out of range
             "A/v_A_g09_c02.mp4 2",       # label does not match the folder
             "A/v_A_g09_c03.mp4 x y"]     # malformed line
    _write(os.path.join(lst, "trainlist01.txt"), ("\n".join(train) + "\n").encode())
    _write(os.path.join(lst, "testlist01.txt"), b"B/v_B_g01_c01.webm\nC/v_C_g01_c01.mp4\n")  # C: unknown class
    return root


EXPECTED = {
    "A/v_A_g08_c02": "empty", "A/v_A_g08_c03": "not_video", "A/v_A_g08_c04": "truncated",
    "B/v_B_g08_c02": "truncated", "B/v_B_g08_c03": "truncated", "A/v_A_g08_c05": "corrupt",
    "A/v_A_g08_c06": "too_short", "A/v_A_g08_c07": "missing", "A/v_A_g08_c08": "timeout",
    "B/v_B_g08_c04": "decoder_crash", "A/v_A_g09_c01": "label_out_of_range", "A/v_A_g09_c02": "label_mismatch",
    "A/v_A_g09_c03": "bad_line", "C/v_C_g01_c01": "unknown_class",
    "A/v_A_g08_c09": "playlist", "A/v_A_g08_c10": "unknown_container", "A/v_A_g08_c11": "outside_root",
    "A/../../secret": "outside_root",
}
GOOD = {"A/v_A_g08_c01", "B/v_B_g08_c01", "B/v_B_g01_c01"}


def test_every_bad_input_is_rejected_with_its_reason(bad_dataset, tmp_path, ray_local):
    m = A.ucf101(bad_dataset, 1)
    assert m.num_inputs == 21
    out = str(tmp_path / "out")
    t0 = time.perf_counter()
    # one worker: the hang, the crash and the good files go through the same decode slot in turn
    s = ingest(m, IngestConfig(out=out, frames=8, short_side=32, timeout_per_file=3, test_hooks=True, workers=1,
                               videos_per_task=4, videos_per_shard=4), log=None)
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, "the hanging file was not stopped by the per-file limit"
    rejects = [json.loads(l) for l in open(os.path.join(out, "rejects.jsonl"))]
    got = {r["video_id"]: r["reason"] for r in rejects}
    assert got == EXPECTED
    assert all(r["detail"] for r in rejects)
    assert s["inputs"] == 21 and s["written_videos"] == 3 and s["rejected"] == 18 and s["accounting_ok"]
    assert s["rejects_by_reason"]["truncated"] == 3
    info = SH.load_dataset_info(out)
    assert info["inputs"] == info["written_videos"] + info["rejects"] == 21
    written = {r["video_id"] for r in SH.read_clips_table(out, columns=["video_id"]).to_pylist()}
    assert written == GOOD
    # resume: nothing decoded again, same accounting
    s2 = ingest(A.ucf101(bad_dataset, 1), IngestConfig(out=out, frames=8, short_side=32, timeout_per_file=3,
                                                       test_hooks=True, workers=1, videos_per_task=4,
                                                       videos_per_shard=4), log=None)
    assert s2["videos_decoded_this_run"] == 0 and s2["rejected"] == 18 and s2["accounting_ok"]
    # the rerun keeps the hang's and the crash's rejects: the summary says how to retry them
    from dvfl.data.ingest import format_summary

    retry = [ln for ln in format_summary(s2).splitlines() if ln.startswith("retry")]
    assert len(retry) == 1 and "timeout" in retry[0] and "decoder_crash" in retry[0] and "--fresh" in retry[0], retry


def test_min_frames_and_unlabeled_rejects(bad_dataset, tmp_path, ray_local):
    """--min-frames lowers the bar (the 4-frame video then repeats frames); unlabelled inputs get
    the same rejects and accounting as labelled ones."""
    pool = os.path.join(bad_dataset, "pool-min-frames.txt")  # a list's root is its folder
    with open(pool, "w") as f:
        f.write(f"{bad_dataset}/A/v_A_g08_c06.mp4\nA/v_A_g08_c03.mp4\n{bad_dataset}/nope.mp4\n")
    m = A.unlabeled(pool)
    s = ingest(m, IngestConfig(out=str(tmp_path / "o"), frames=8, min_frames=4, short_side=32), log=None)
    assert s["inputs"] == 3 and s["written_videos"] == 1 and s["accounting_ok"]
    assert s["rejects_by_reason"] == {"missing": 1, "not_video": 1}
    rows = SH.read_clips_table(str(tmp_path / "o")).to_pylist()
    assert len(rows) == 2 and all(r["label"] is None and r["split"] == "unlabeled" for r in rows)
    assert all(len(r["frame_indices"]) == 8 and max(r["frame_indices"]) <= 3 for r in rows)


def test_a_split_whose_every_video_is_rejected_is_refused_before_any_training(bad_dataset, tmp_path, ray_local):
    """The test split's only video is unreadable: the ingest finishes (train written), and a run on
    those clips is refused before any work, naming the split and where the reasons are. It passed the
    config check and failed at the final evaluation, after the teacher and the cache. (An ingest that
    writes no video at all: test_reliability.py::test_ingest_disk_full_then_rerun_and_no_videos_written.)"""
    import dataclasses

    from dvfl.config import ConfigError, load_config
    from dvfl.pipeline import check_clips_match

    m = A.ucf101(bad_dataset, 1)
    empty = os.path.join(bad_dataset, "A", "v_A_g08_c02.mp4")  # (an empty file)
    m.entries = [dataclasses.replace(e, path=empty) if e.split == "test" else e
                 for e in m.entries if e.video_id in GOOD]
    pool = os.path.join(bad_dataset, "pool-truncated.txt")  # an unlabelled pool of one truncated video
    with open(pool, "w") as f:
        f.write("A/v_A_g08_c04.mp4\n")
    m.extend(A.unlabeled(pool))
    out = str(tmp_path / "clips")
    s = ingest(m, IngestConfig(out=out, frames=8, clips_per_video=1, short_side=32, eval_clips=1), log=None)
    assert s["counts"]["test"] == s["counts"]["unlabeled"] == {"videos": 0, "clips": 0} and s["counts"]["train"]["clips"] > 0
    cfg = load_config(None, [("data.dataset", "ucf101"), ("data.clips", out), ("data.frames", 8), ("data.short_side", 32),
                             ("data.crop_size", 32), ("data.eval_clips", 1), ("eval.clips", 1), ("eval.crops", 1)])
    info = SH.load_dataset_info(out)
    with pytest.raises(ConfigError, match=r"split\(s\) 'test' hold no clips: every video of them was rejected at "
                                          rf"ingest \(reasons in {out}/rejects.jsonl\)"):
        check_clips_match(cfg, info)
    # a KD-with-unlabelled-clips student trained exactly like dvfl on the empty pool, reported as using it
    with pytest.raises(ConfigError, match=r"split\(s\) 'test', 'unlabeled' hold no clips"):
        check_clips_match(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, unlabeled=out)), info)
    # an export's parity check on these clips: it passed on its random inputs alone
    from dvfl.commands.export import real_clips

    with pytest.raises(ValueError, match="its test and val shards hold no clips"):
        real_clips(out, {"kwargs": {"img_size": 32}}, 4)

    # a pool whose every video was rejected when listed (no shard, no split at all): the same refusal,
    # not "an ingest without an unlabelled pool ... set these fields"
    listed = {**info, "counts": {k: v for k, v in info["counts"].items() if k != "unlabeled"}}
    with open(os.path.join(out, "rejects.jsonl"), "a") as f:
        f.write(json.dumps({"split": "unlabeled", "reason": "missing", "path": "pool/x.mp4"}) + "\n")
    with pytest.raises(ConfigError, match=r"split\(s\) 'test', 'unlabeled' hold no clips"):
        check_clips_match(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, unlabeled=out)), listed)


# ---------------------------------------------------------------------------------------
# untrusted files, straight through the decode child (no Ray)

JOB = dict(video_id="v", split="train", frames=8, clips_per_video=1, eval_clips=1, seed=0, short_side=16,
           min_frames=8)


@pytest.fixture
def listener():
    """A local listening socket: a decoder that follows a URL to it would connect."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(1.0)
    yield s
    s.close()


def _connections(s) -> int:
    try:
        conn, _ = s.accept()
        conn.close()
        return 1
    except socket.timeout:
        return 0


@linux_only
def test_playlists_and_unknown_containers_never_reach_the_decoder(bad_dataset, tmp_path, listener):
    port = listener.getsockname()[1]
    outside = os.path.join(os.path.dirname(bad_dataset), "secret.mp4")
    files = {
        "hls_url.mp4": (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:{port}/seg.ts\n"
                        "#EXT-X-ENDLIST\n").encode(),
        # FFmpeg's HLS demuxer reads local segments: this one would pull in a file outside the root
        "hls_local.mp4": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{outside}\n#EXT-X-ENDLIST\n".encode(),
        "concat.mp4": f"ffconcat version 1.0\nfile {outside}\n".encode(),
        "binary.avi": bytes(range(7, 250)) * 40,
        # a DASH manifest is a playlist; an object store's XML error body (a failed download saved
        # under the video's name) is a text file, not a playlist; a 0-byte file says so
        "dash.mp4": (f'<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011"><BaseURL>'
                     f"http://127.0.0.1:{port}/</BaseURL></MPD>\n").encode(),
        "denied.mp4": b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code></Error>\n',
        "empty.mp4": b"",
    }
    want = {"hls_url.mp4": "playlist", "hls_local.mp4": "playlist", "concat.mp4": "playlist",
            "binary.avi": "unknown_container", "dash.mp4": "playlist", "denied.mp4": "not_video", "empty.mp4": "empty"}
    proc = DecodeProcess()
    try:
        got = {}
        for name, data in files.items():
            _write(str(tmp_path / name), data)
            got[name] = proc.run(dict(JOB, path=str(tmp_path / name)), timeout=60)
        assert {k: r.get("reason") for k, r in got.items()} == want
        assert all(r["detail"] for r in got.values()) and got["empty.mp4"]["detail"] == "0 bytes"
        assert _connections(listener) == 0
        # a real video still decodes, in the same child
        ok = proc.run(dict(JOB, path=os.path.join(bad_dataset, "A/v_A_g08_c01.mp4")), timeout=60)
        assert ok["ok"] and ok["views"][0][3].shape == (8, 16, 20, 3)
        # and the child itself has no network: a URL handed straight to decord (test hook) connects nowhere
        assert proc.net_isolated, proc.net_detail
        _write(str(tmp_path / "url.mp4"), TEST_URL_MAGIC + f"http://127.0.0.1:{port}/v.mp4\n".encode())
        r = proc.run(dict(JOB, path=str(tmp_path / "url.mp4"), test_hooks=True), timeout=60)
        assert not r["ok"]
        assert _connections(listener) == 0
    finally:
        proc.close()


def _kill_child_while_decoding(proc: DecodeProcess, times: int, killed: list, in_hook=None) -> None:
    """The OOM killer's view of things: SIGKILL the decode child while it works on a file (once it
    has said hello and had 1 s for the job, or ``in_hook`` exists: not while it starts, which on a
    loaded machine takes seconds and made the killed start look like a crash)."""
    deadline = time.monotonic() + 60
    while len(killed) < times and time.monotonic() < deadline:
        p = proc.proc
        if p is not None and p.pid not in killed and p.poll() is None and proc.net_isolated is not None:
            ready = time.monotonic() + 1.0
            while time.monotonic() < ready or (in_hook and not os.path.exists(in_hook) and time.monotonic() < deadline):
                time.sleep(0.05)
            proc.net_isolated = None  # (set again by the next child's hello)
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        time.sleep(0.05)


@pytest.mark.parametrize("kills, reason", [(1, None), (2, "decoder_killed")])
def test_a_decoder_killed_mid_file_is_retried_once_then_rejected(bad_dataset, tmp_path, kills, reason):
    proc = DecodeProcess()
    good = os.path.join(bad_dataset, "A/v_A_g08_c01.mp4")
    killed: list = []
    # kills=1: the first attempt hangs and is killed, the retry decodes; kills=2: both attempts hang
    job = dict(JOB, path=good if kills == 1 else os.path.join(bad_dataset, "A/v_A_g08_c08.mp4"),
               test_hooks=True, test_hang_once=str(tmp_path / "hung-once") if kills == 1 else None)
    killer = threading.Thread(target=_kill_child_while_decoding, args=(proc, kills, killed, job["test_hang_once"]))
    killer.start()
    try:
        t0 = time.monotonic()
        r = proc.run(job, timeout=50)
        killer.join()
        assert len(killed) == kills and time.monotonic() - t0 < 50  # killed, not timed out
        if reason is None:
            assert r["ok"] and r["views"][0][3].shape == (8, 16, 20, 3)
        else:
            assert r["reason"] == reason and "SIGKILL" in r["detail"] and "twice" in r["detail"]
        assert proc.restarts == kills
        # the next file decodes in a fresh child
        assert proc.run(dict(JOB, path=good), timeout=60)["ok"]
    finally:
        killer.join()
        proc.close()


def test_a_child_that_never_says_hello_is_killed_not_read_out_of_step(bad_dataset, monkeypatch):
    """A decode child whose hello does not come in time is killed: the job gets a decoder_crash
    with the reason, and the next job, in a fresh child, gets its own video's clips (a late hello
    read as a result would have shifted every later video's clips onto the next one's id)."""
    from dvfl.data import worker

    good = os.path.join(bad_dataset, "A/v_A_g08_c01.mp4")
    proc = DecodeProcess()
    try:
        monkeypatch.setattr(worker, "_START_TIMEOUT", 0.0)  # no child can say hello in no time
        r = proc.run(dict(JOB, path=good), timeout=60)
        assert not r["ok"] and r["reason"] == "decoder_crash" and "no hello" in r["detail"], r
        assert proc.proc is None  # killed, not left to answer later
        monkeypatch.setattr(worker, "_START_TIMEOUT", 60.0)
        first = proc.run(dict(JOB, path=good), timeout=60)
        again = proc.run(dict(JOB, path=good), timeout=60)  # the same job: the same clips, in step
        assert first["ok"] and again["ok"] and first["views"][0][3].shape == (8, 16, 20, 3)
        assert (first["views"][0][3] == again["views"][0][3]).all()
    finally:
        proc.close()


def test_a_time_out_of_days_or_no_limit_still_decodes(bad_dataset):
    """poll() takes a C int of milliseconds: --timeout-per-file inf (or over ~24 days) raised
    OverflowError after the job was written to the child, whose answer the next file then read."""
    proc = DecodeProcess()
    good = os.path.join(bad_dataset, "A/v_A_g08_c01.mp4")
    try:
        for timeout in (float("inf"), 3e6):
            r = proc.run(dict(JOB, path=good), timeout=timeout)
            assert r["ok"] and r["views"][0][3].shape == (8, 16, 20, 3), r
        r = proc.run(dict(JOB, path=os.path.join(bad_dataset, "no-such-file.mp4")), timeout=60)
        assert not r["ok"] and r["reason"] != "ok"
    finally:
        proc.close()


def test_a_test_video_in_the_unlabelled_pool_is_caught(tmp_path, ray_local):
    """The same bytes under two ids: a test video copied into the unlabelled pool, and a training
    video that is also a test video. The training-side copies are rejected naming both ids; the
    test set stays whole."""
    import shutil

    from conftest import make_videos

    root, pool = tmp_path / "ds", tmp_path / "pool"
    make_videos([(str(root / "train/A/a1.mp4"), dict(n=10, seed=1)), (str(root / "train/B/b1.mp4"), dict(n=10, seed=2)),
                 (str(root / "test/A/t1.mp4"), dict(n=10, seed=3)), (str(pool / "u2.mp4"), dict(n=10, seed=4))])
    os.makedirs(root / "test/B")
    shutil.copyfile(root / "train/A/a1.mp4", root / "test/B/t2.mp4")   # listed in train and in test
    shutil.copyfile(root / "test/A/t1.mp4", pool / "u1.mp4")          # a test video in the pool
    for empty in ("train/A/e1.mp4", "train/B/e2.mp4", "test/A/e3.mp4"):  # failed downloads: not copies of each other
        (root / empty).write_bytes(b"")
    m = A.folder(str(root))
    m.extend(A.unlabeled(str(pool)))
    logged = []
    out = str(tmp_path / "out")
    s = ingest(m, IngestConfig(out=out, frames=8, clips_per_video=1, short_side=16, workers=1), log=logged.append)
    assert s["inputs"] == 9 and s["written_videos"] == 4 and s["accounting_ok"]
    rej = {r["video_id"]: r for r in map(json.loads, open(os.path.join(out, "rejects.jsonl")))}
    assert sorted(rej) == ["test/A/e3", "train/A/a1", "train/A/e1", "train/B/e2", "unlabeled/u1"]
    assert {rej[v]["reason"] for v in ("test/A/e3", "train/A/e1", "train/B/e2")} == {"empty"}
    rej = {v: r for v, r in rej.items() if "/e" not in v}
    assert {r["reason"] for r in rej.values()} == {"duplicate_content"}
    assert "test video test/B/t2" in rej["train/A/a1"]["detail"]
    assert "test video test/A/t1" in rej["unlabeled/u1"]["detail"]
    written = {r["video_id"] for r in SH.read_clips_table(out, columns=["video_id"]).to_pylist()}
    assert written == {"train/B/b1", "test/A/t1", "test/B/t2", "unlabeled/u2"}
    assert any("2 video(s)" in line and "duplicate_content" in line for line in logged)


def test_a_file_swapped_for_a_link_out_of_the_root_after_listing_is_not_read(tmp_path, ray_local):
    """The root check ran when the manifest was made; a video replaced by a symlink to a file
    outside the root before its decode was read (its frames would have entered the shards). The
    decode checks the real path again: the entry is rejected outside_root, the rest is ingested."""
    from conftest import make_videos

    root, outside = tmp_path / "ds", tmp_path / "elsewhere"
    make_videos([(str(root / "train/A/a1.mp4"), dict(n=10, seed=1)), (str(root / "train/B/b1.mp4"), dict(n=10, seed=2)),
                 (str(outside / "secret.mp4"), dict(n=10, seed=3))])
    m = A.folder(str(root))
    assert len(m.entries) == 2
    os.unlink(root / "train/B/b1.mp4")
    os.symlink(outside / "secret.mp4", root / "train/B/b1.mp4")
    out = str(tmp_path / "out")
    s = ingest(m, IngestConfig(out=out, frames=8, clips_per_video=1, short_side=16, workers=1), log=None)
    assert s["inputs"] == 2 and s["written_videos"] == 1 and s["accounting_ok"]
    (rej,) = map(json.loads, open(os.path.join(out, "rejects.jsonl")))
    assert rej["video_id"] == "train/B/b1" and rej["reason"] == "outside_root" and "secret.mp4" in rej["detail"]
    assert {r["video_id"] for r in SH.read_clips_table(out, columns=["video_id"]).to_pylist()} == {"train/A/a1"}


STAND_IN_CHILD = '''
import os, pickle, struct, sys

def send(obj):
    data = pickle.dumps(obj)
    sys.stdout.buffer.write(struct.pack("<QQ", len(data), 0) + data)
    sys.stdout.buffer.flush()

class Payload:  # what a child taken over through a decoder bug could send
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))

class BadDtype:  # a permitted global called with arguments it refuses
    def __reduce__(self):
        import numpy
        return (numpy.dtype, ("zzz",))

send({"net_isolated": False, "detail": "stand-in"})
n = struct.unpack("<Q", sys.stdin.buffer.read(8))[0]
sys.stdin.buffer.read(n)
mode = sys.argv[2] if len(sys.argv) > 2 else "run"
if mode == "huge":  # a result header claiming 2^60 bytes
    sys.stdout.buffer.write(struct.pack("<QQ", 1 << 60, 0))
    sys.stdout.buffer.flush()
else:
    send({"ok": True, "views": [BadDtype() if mode == "dtype" else Payload()]})
sys.stdin.buffer.read(8)
'''


def _stand_in_child(tmp_path, monkeypatch, *args):
    """Decode children started from here on are STAND_IN_CHILD, given ``args``."""
    import subprocess

    from dvfl.data import worker

    script = tmp_path / "child.py"
    script.write_text(STAND_IN_CHILD)
    real_popen = subprocess.Popen

    def popen(cmd, **kw):  # the stand-in instead of _decode_child.py
        return real_popen([*cmd[:-1], str(script), *args], **kw) if cmd[-1] == worker._CHILD else real_popen(cmd, **kw)

    monkeypatch.setattr(worker.subprocess, "Popen", popen)
    return script


def test_a_result_naming_anything_but_arrays_is_refused_not_run(tmp_path, monkeypatch):
    """The decode child parses untrusted files; its results were unpickled with plain pickle, so a
    child taken over through a decoder bug could run code in the ingest task or Serve replica.
    Only numpy arrays, dtypes and scalars may be named: anything else is a decoder_error and the
    child is killed (session 29)."""
    marker = tmp_path / "ran"
    script = _stand_in_child(tmp_path, monkeypatch, str(marker))
    proc = DecodeProcess()
    try:
        r = proc.run(dict(JOB, path=str(script)), timeout=30)
        assert not r["ok"] and r["reason"] == "decoder_error" and "it names posix.system" in r["detail"], r
        assert proc.proc is None and not marker.exists()
    finally:
        proc.close()


@pytest.mark.parametrize("mode, detail", [("huge", "ValueError: a result of 1152921504606846976 bytes"),
                                          ("dtype", "TypeError: data type 'zzz' not understood")])
def test_a_result_that_fails_to_read_is_a_decoder_error_and_the_child_is_killed(tmp_path, monkeypatch, mode, detail):
    """A hijacked child's header claiming 2^60 bytes (a MemoryError) or a permitted global given
    arguments it refuses (a TypeError) escaped ``run``, which never raises for a bad file, and left
    the child running for the next video (session 45)."""
    script = _stand_in_child(tmp_path, monkeypatch, str(tmp_path / "ran"), mode)
    proc = DecodeProcess()
    try:
        r = proc.run(dict(JOB, path=str(script)), timeout=30)
        assert not r["ok"] and r["reason"] == "decoder_error" and detail in r["detail"], r
        assert proc.proc is None
    finally:
        proc.close()


def test_frames_of_an_aspect_no_camera_makes_are_refused_before_their_size_is_allocated(tmp_path):
    """A few-KB MP4 whose header says 16x512 (or, forged, 8x16384) was resized to short side 256:
    frames of 8192x256 here (524288x256 there, 3 GiB for 8 of them in a serve replica)."""
    from conftest import write_video
    from dvfl.data import decode as D

    job = dict(video_id="v", split="test", frames=8, clips_per_video=1, eval_clips=1, seed=0, short_side=256,
               min_frames=8)
    tall = write_video(str(tmp_path / "tall.mp4"), n=12, h=512, w=16)
    res = D.decode_video({**job, "path": tall})
    assert not res["ok"] and res["reason"] == "bad_frame_size" and "16x512" in res["detail"], res
    # an MPEG program stream takes FFmpeg's own decode path, whose errors were all "corrupt"
    tall_ps = write_video(str(tmp_path / "tall.mpg"), n=12, h=512, w=16, codec="mpeg2video")
    res = D.decode_video({**job, "path": tall_ps})
    assert not res["ok"] and res["reason"] == "bad_frame_size", res
    wide = write_video(str(tmp_path / "wide.mp4"), n=12, h=32, w=64)  # 2:1, a panorama's: decoded
    res = D.decode_video({**job, "path": wide, "short_side": 32})
    assert res["ok"] and (res["height"], res["width"]) == (32, 64)


def test_an_audio_only_file_is_no_video_stream_not_corrupt(tmp_path):
    """A phone's voice memo saved as .mp4 (AAC, no video track): "corrupt" and decord's internal
    "Check failed: st_nb >= 0" text; serve answered 400 as if the upload were damaged."""
    import av
    import numpy as np

    from dvfl.data import decode as D
    from dvfl.serve import STATUS

    path = str(tmp_path / "memo.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    job = dict(video_id="v", split="test", frames=8, clips_per_video=1, eval_clips=1, seed=0, short_side=32,
               min_frames=8, path=path)
    res = D.decode_video(job)
    assert not res["ok"] and res["reason"] == "no_video_stream" and "Check failed" not in res["detail"], res
    assert STATUS["no_video_stream"] == 415
