"""The frames column back to arrays: the zero-copy batch path agrees with the per-clip path.
And local shard listing, and the frames the test crops are cut from."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dvfl.data import shards as SH
from dvfl.data.views import batch_arrays


def _rows(clips, labels=None):
    rows = []
    for i, c in enumerate(clips):
        t, h, w, _ = c.shape
        rows.append({"clip_id": f"v{i}#train0", "video_id": f"v{i}", "path": f"c/v{i}.mp4",
                     "label": None if labels is None else labels[i], "class_name": None if labels is None else "c",
                     "split": "unlabeled" if labels is None else "train", "view": "train", "view_index": 0,
                     "frame_indices": list(range(t)), "src_fps": 25.0, "src_num_frames": t, "num_frames": t,
                     "height": h, "width": w, "frames": SH.encode_frames(c)})
    return SH.clips_table(rows)


def test_zero_copy_batch_equals_clip_by_clip_after_a_parquet_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, size=(10, 4, 6, 5, 3), dtype=np.uint8)
    path = str(tmp_path / "s.parquet")
    w = SH.AtomicShardWriter(path, row_group_rows=3)  # several row groups -> several chunks
    w.write(_rows(clips, labels=list(range(10))))
    w.commit()
    assert pq.ParquetFile(path).metadata.row_group(0).column(14).compression == "LZ4"
    table = pq.read_table(path)
    assert table.column("frames").num_chunks > 1
    whole = SH.frames_array(table)
    np.testing.assert_array_equal(whole, clips)
    for k in range(10):  # the per-row path (dict rows) gives the same clips
        np.testing.assert_array_equal(SH.decode_frames(table.slice(k, 1).to_pylist()[0]), clips[k])
    # slices start at a non-zero offset inside the buffers
    one_chunk = table.slice(4, 5).combine_chunks()
    np.testing.assert_array_equal(SH.frames_array(one_chunk), clips[4:9])
    # one chunk (a batch inside a row group, as training reads): a view of its buffer, not a copy
    frames = one_chunk.column("frames").chunk(0)
    start = int(np.frombuffer(frames.buffers()[1], dtype=np.int32)[frames.offset])
    assert SH.frames_array(one_chunk).ctypes.data == frames.buffers()[2].address + start
    arrays, ids, labels = batch_arrays(table.slice(2, 5))
    np.testing.assert_array_equal(np.stack(arrays), clips[2:7])
    assert ids == [f"v{i}#train0" for i in range(2, 7)] and labels.tolist() == [2, 3, 4, 5, 6]


def test_mixed_shapes_fall_back_to_one_array_per_clip():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(4, 6, 7, 3), dtype=np.uint8)
    table = _rows([a, b, a])
    assert SH.frames_array(table) is None
    out = SH.decode_frames(table)
    assert isinstance(out, list) and [x.shape for x in out] == [a.shape, b.shape, a.shape]
    np.testing.assert_array_equal(out[1], b)
    arrays, _, labels = batch_arrays(table)
    np.testing.assert_array_equal(arrays[1], b)
    assert labels.tolist() == [-1, -1, -1]
    assert SH.frames_array(table.slice(0, 0)) is None


def test_a_clip_with_the_wrong_byte_count_is_not_silently_reshaped():
    a = np.zeros((4, 6, 5, 3), np.uint8)
    table = _rows([a, a])
    frames = pa.array([a.tobytes(), a.tobytes()[:-3] + b"\x00\x00"], pa.binary())  # 1 byte short
    table = table.set_column(table.schema.get_field_index("frames"), "frames", frames)
    assert SH.frames_array(table) is None
    try:
        SH.decode_frames(table)
    except ValueError as e:
        assert "expected 4x6x5x3" in str(e)
    else:
        raise AssertionError("a short clip was accepted")


def test_shards_in_a_folder_whose_name_holds_glob_brackets_are_found_and_its_stale_tmp_removed(tmp_path):
    """'[1]' in a folder name is a glob character class (it matches 'br1'): readers must still
    list that folder's shards, and the stale-tmp cleanup must see its temporary files."""
    out = tmp_path / "br[1]"
    (tmp_path / "br1" / SH.SHARD_DIR).mkdir(parents=True)   # what the unescaped pattern would match instead
    clips = np.zeros((2, 4, 6, 5, 3), np.uint8)
    done = str(out / SH.SHARD_DIR / "train-00000.parquet")
    w = SH.AtomicShardWriter(done)
    w.write(_rows(clips, labels=[0, 1]))
    w.commit()
    killed = SH.AtomicShardWriter(str(out / SH.SHARD_DIR / "train-00001.parquet"))
    killed.write(_rows(clips, labels=[0, 1]))
    killed.writer.close()                                    # a writer killed before commit leaves its .tmp
    assert os.path.exists(killed.tmp)
    assert SH.shard_paths(str(out)) == [done] and SH.shard_paths(f"file://{out}", ["train"]) == [done]
    assert SH.read_clips_table(str(out), columns=["clip_id"]).num_rows == 2
    assert SH.remove_stale_tmp(str(out / SH.SHARD_DIR)) == 1 and not os.path.exists(killed.tmp)
    assert sorted(os.listdir(out / SH.SHARD_DIR)) == ["train-00000.parquet"]


def test_three_test_crops_span_the_whole_short_side_as_the_official_protocol_does():
    """The official Video-FocalNet test pipeline resizes the short side to the crop size before its
    three crops; cropping 224 of a stored 256-pixel short side instead dropped 16 rows at the top and
    bottom of every view (its 1 crop is a centre crop of the 256 short side, as here)."""
    from dvfl.data.views import CROPS, View, frames_to_crop, make_clip_batch

    clip = np.zeros((2, 256, 341, 3), np.uint8)
    clip[:, :4, :, 0] = 255  # the top rows
    clip[:, -4:, :, 0] = 128  # the bottom rows
    clip[:, :, :4, 1] = 255  # the left edge
    clip[:, :, -4:, 2] = 255  # the right edge
    resized = frames_to_crop([clip], 224, 3)[0]
    assert resized.shape == (2, 224, 298, 3)  # 341 * 224 / 256 = 298.4
    start, center, end = make_clip_batch([resized] * 3, 224, [View(c) for c in CROPS[3]]).numpy()
    for crop in (start, center, end):
        assert crop[0, 0, 112, 0] == 255 and crop[0, -1, 112, 0] == 128  # top and bottom rows kept
    assert start[0, 112, 0, 1] == 255 and end[0, 112, -1, 2] == 255  # the crops reach both ends
    assert center[0, 112, 0, 1] == 0 and center[0, 112, -1, 2] == 0
    assert frames_to_crop([clip], 224, 1)[0] is clip  # 1 crop: the stored frames, centre-cropped
    small = clip[:, :32, :40]
    assert frames_to_crop([small], 32, 3)[0] is small  # already the crop's size: nothing resized
    import warnings

    stored = np.frombuffer(clip.tobytes(), np.uint8).reshape(clip.shape)  # read-only, as shards give them
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warned on every batch about the non-writable array
        assert np.array_equal(frames_to_crop([stored], 224, 3)[0], resized)


def test_a_shard_has_the_same_bytes_however_its_rows_arrived(tmp_path):
    """A shard written whole by one task gets its rows a video at a time; one merged from pieces gets
    them a piece's row group at a time. Parquet broke pages where the chunks broke, so the bytes
    depended on how the decode tasks were cut (the rows did not): the docs promise one writer's bytes."""
    import hashlib

    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, size=(40, 8, 96, 128, 3), dtype=np.uint8)  # ~295 KB a clip: pages fill mid-chunk
    videos = [_rows(clips[i:i + 1], labels=[i % 3]) for i in range(40)]

    def shard(name, feeds):
        w = SH.AtomicShardWriter(str(tmp_path / name), row_group_rows=16)
        for t in feeds:
            w.write(t)
        w.commit()
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    def merged(cut):
        feeds = []
        for j, part in enumerate((videos[:cut], videos[cut:])):  # pieces, uncompressed, read back by row group
            w = SH.AtomicShardWriter(str(tmp_path / f"part{cut}-{j}"), row_group_rows=16, compression="none")
            for t in part:
                w.write(t)
            w.commit()
            pf = SH.parquet_file(str(tmp_path / f"part{cut}-{j}"), pre_buffer=False)
            feeds += [pf.read_row_group(i, use_threads=False) for i in range(pf.num_row_groups)]
        return shard(f"merged{cut}", feeds)

    assert len({shard("whole", videos), merged(8), merged(13), merged(20)}) == 1


def test_a_shard_writer_that_cannot_start_its_file_leaves_no_temporary(tmp_path):
    """A full disk (here a file-size limit) fails the Parquet header after the file is made: the
    writer never existed, so no abort() removed its temporary."""
    import subprocess
    import sys

    code = f"""
import resource, signal
from dvfl.data import shards as SH
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
try:
    SH.AtomicShardWriter({str(tmp_path / "train-00000.parquet")!r})
except OSError as exc:
    print("OSError", exc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("OSError"), (r.stdout, r.stderr[-2000:])
    assert os.listdir(tmp_path) == []


def test_split_sizes_come_from_dataset_json_without_a_request_per_shard(tmp_path, monkeypatch):
    """A run counted its clips and bytes from every shard's footer and size: a footer read and a HEAD
    per shard, ~100k requests a run on a Kinetics-sized split on s3. A finished ingest's dataset.json
    lists both; a folder without one (an ingest in progress) still counts from the files."""
    out = tmp_path / "clips"
    clips = np.zeros((3, 4, 6, 5, 3), np.uint8)
    listed = []
    for split, k in (("train", 0), ("train", 1), ("test", 0)):
        name = f"{split}-{k:05d}.parquet"
        w = SH.AtomicShardWriter(str(out / SH.SHARD_DIR / name))
        w.write(_rows(clips[:2 + k], labels=[0] * (2 + k)))
        size = w.commit()
        listed.append({"file": f"{SH.SHARD_DIR}/{name}", "split": split, "clips": 2 + k, "bytes": size})
    from_files = SH.split_sizes(str(out), ["train"])
    assert from_files == (5, listed[0]["bytes"] + listed[1]["bytes"])
    (out / SH.DATASET_JSON).write_text(json.dumps({"shards": listed}))

    def no_request(*a, **k):
        raise AssertionError("a request per shard")

    monkeypatch.setattr(SH, "parquet_file", no_request)
    monkeypatch.setattr(SH.storage, "size", no_request)
    assert SH.split_sizes(str(out), ["train"]) == from_files and SH.split_sizes(str(out), ["test", "train"])[0] == 7


def test_many_shards_are_read_back_in_their_order(tmp_path):
    """read_clips_table reads shards several at a time (object-store latency): the rows stay in shard order."""
    out = tmp_path / "clips"
    for k in range(40):
        w = SH.AtomicShardWriter(str(out / SH.SHARD_DIR / f"train-{k:05d}.parquet"))
        w.write(_rows(np.full((1, 2, 3, 3, 3), k, np.uint8), labels=[k % 3]))
        w.commit()
    table = SH.read_clips_table(str(out), ["train"])
    assert [int(f[0]) for f in table.column("frames").to_pylist()] == list(range(40))
