"""The frames column back to arrays: the zero-copy batch path agrees with the per-clip path.
And local shard listing."""
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
    np.testing.assert_array_equal(SH.frames_array(table.slice(4, 5).combine_chunks()), clips[4:9])
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
