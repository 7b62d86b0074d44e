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
"""
import json
import os
import struct
import time

import pytest

from dvfl.data import adapters as A
from dvfl.data import shards as SH
from dvfl.data.decode import TEST_CRASH_MAGIC, TEST_HANG_MAGIC
from dvfl.data.ingest import IngestConfig, ingest


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    from conftest import make_videos

    root = str(tmp_path_factory.mktemp("bad"))
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
    lst = os.path.join(root, "ucfTrainTestlist")
    os.makedirs(lst)
    _write(os.path.join(lst, "classInd.txt"), b"1 A\n2 B\n")
    train = ["A/v_A_g08_c01.mp4 1", "B/v_B_g08_c01.avi 2", "A/v_A_g08_c02.mp4 1", "A/v_A_g08_c03.mp4 1",
             "A/v_A_g08_c04.mp4 1", "B/v_B_g08_c02.avi 2", "B/v_B_g08_c03.webm 2", "A/v_A_g08_c05.mp4 1",
             "A/v_A_g08_c06.mp4 1", "A/v_A_g08_c07.mp4 1",  # missing
             "A/v_A_g08_c08.mp4 1", "B/v_B_g08_c04.mp4 2",
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
}
GOOD = {"A/v_A_g08_c01", "B/v_B_g08_c01", "B/v_B_g01_c01"}


def test_every_bad_input_is_rejected_with_its_reason(bad_dataset, tmp_path, ray_local):
    m = A.ucf101(bad_dataset, 1)
    assert m.num_inputs == 17
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
    assert s["inputs"] == 17 and s["written_videos"] == 3 and s["rejected"] == 14 and s["accounting_ok"]
    assert s["rejects_by_reason"]["truncated"] == 3
    info = SH.load_dataset_info(out)
    assert info["inputs"] == info["written_videos"] + info["rejects"] == 17
    written = {r["video_id"] for r in SH.read_clips_table(out, columns=["video_id"]).to_pylist()}
    assert written == GOOD
    # resume: nothing decoded again, same accounting
    s2 = ingest(A.ucf101(bad_dataset, 1), IngestConfig(out=out, frames=8, short_side=32, timeout_per_file=3,
                                                       test_hooks=True, workers=1, videos_per_task=4,
                                                       videos_per_shard=4), log=None)
    assert s2["videos_decoded_this_run"] == 0 and s2["rejected"] == 14 and s2["accounting_ok"]


def test_min_frames_and_unlabeled_rejects(bad_dataset, tmp_path, ray_local):
    """--min-frames lowers the bar (the 4-frame video then repeats frames); unlabelled inputs get
    the same rejects and accounting as labelled ones."""
    pool = str(tmp_path / "pool.txt")
    with open(pool, "w") as f:
        f.write(f"{bad_dataset}/A/v_A_g08_c06.mp4\n{bad_dataset}/A/v_A_g08_c03.mp4\n{bad_dataset}/nope.mp4\n")
    m = A.unlabeled(pool)
    s = ingest(m, IngestConfig(out=str(tmp_path / "o"), frames=8, min_frames=4, short_side=32), log=None)
    assert s["inputs"] == 3 and s["written_videos"] == 1 and s["accounting_ok"]
    assert s["rejects_by_reason"] == {"missing": 1, "not_video": 1}
    rows = SH.read_clips_table(str(tmp_path / "o")).to_pylist()
    assert len(rows) == 2 and all(r["label"] is None and r["split"] == "unlabeled" for r in rows)
    assert all(len(r["frame_indices"]) == 8 and max(r["frame_indices"]) <= 3 for r in rows)
