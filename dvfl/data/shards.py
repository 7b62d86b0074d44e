"""The clip shard format: schema, atomic shard writing, readers, ``decode_frames``.

See ``docs/data-format.md`` for the contract other stages rely on.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dvfl import storage

SCHEMA_VERSION = 1
FORMAT_NAME = "dvfl-clips"
SHARD_DIR = "shards"
META_DIR = "_meta"          # per-shard sidecars (rejects, counts); "_" prefix: ignored by Parquet readers
DATASET_JSON = "dataset.json"
REJECTS_FILE = "rejects.jsonl"
SUMMARY_JSON = "summary.json"
PLAN_JSON = "_plan.json"
SPLITS = ("train", "val", "test", "unlabeled")
READ_TASK_CPUS = 0.25  # a read task's CPU share: schedulable beside Train workers on small machines (hang #1)

CLIP_SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("label", pa.int32(), nullable=True),          # NULL for unlabelled videos
    pa.field("class_name", pa.string(), nullable=True),    # NULL for unlabelled videos
    pa.field("split", pa.string(), nullable=False),
    pa.field("view", pa.string(), nullable=False),         # "train" (seeded TSN) | "uniform" (eval)
    pa.field("view_index", pa.int32(), nullable=False),
    pa.field("frame_indices", pa.list_(pa.int32()), nullable=False),
    pa.field("src_fps", pa.float32(), nullable=False),
    pa.field("src_num_frames", pa.int32(), nullable=False),
    pa.field("num_frames", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("frames", pa.binary(), nullable=False),       # uint8 (T, H, W, 3) C-order .tobytes()
], metadata={b"dvfl.format": FORMAT_NAME.encode(), b"dvfl.schema_version": str(SCHEMA_VERSION).encode()})

CLIP_COLUMNS = CLIP_SCHEMA.names


# ---------------------------------------------------------------------------------------
# frames <-> bytes

def encode_frames(clip: np.ndarray) -> bytes:
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3), got {clip.dtype} {clip.shape}")
    return np.ascontiguousarray(clip).tobytes()


def _frames_of(buf: Union[bytes, memoryview, np.ndarray], t: int, h: int, w: int) -> np.ndarray:
    if isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 4:
        return buf.reshape(t, h, w, 3)
    arr = np.frombuffer(buf, dtype=np.uint8)
    if arr.size != t * h * w * 3:
        raise ValueError(f"frames hold {arr.size} bytes, expected {t}x{h}x{w}x3")
    return arr.reshape(t, h, w, 3)


def frames_array(table: pa.Table) -> Optional[np.ndarray]:
    """The ``frames`` of a pyarrow batch as one ``(B, T, H, W, 3)`` uint8 array without a copy.

    Clips of one dataset usually share a shape, so their bytes lie back to back in the binary
    column's data buffer: one ``np.frombuffer`` over it replaces a Python ``bytes`` object and a
    copy per clip (faster training-time reading, docs/ingest.md). Returns ``None``
    when the clips differ in shape (callers then go clip by clip). Read-only, like the buffer.
    """
    if table.num_rows == 0:
        return None
    shape = []
    for c in ("num_frames", "height", "width"):
        col = table.column(c)
        if col.null_count:
            return None
        v = col.to_numpy()  # numpy, not pyarrow.compute: less per-batch overhead here
        if not (v == v[0]).all():
            return None
        shape.append(int(v[0]))
    frames = table.column("frames")
    if isinstance(frames, pa.ChunkedArray):  # (combine_chunks copies even a single chunk: 33 MB a batch at 224^2)
        arr = frames.chunk(0) if frames.num_chunks == 1 else frames.combine_chunks()
    else:
        arr = frames
    if arr.null_count or not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        return None
    size = shape[0] * shape[1] * shape[2] * 3
    _, offsets_buf, data_buf = arr.buffers()
    dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=dtype)[arr.offset:arr.offset + len(arr) + 1]
    if not np.all(np.diff(offsets) == size):
        return None
    data = np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]):int(offsets[-1])]
    return data.reshape(len(arr), *shape, 3)


def decode_frames(row_or_batch: Any) -> Union[np.ndarray, List[np.ndarray]]:
    """Turn stored ``frames`` bytes back into uint8 ``(T, H, W, 3)`` arrays (read-only views).

    * a row (``dict`` with ``frames``, ``num_frames``, ``height``, ``width`` scalars) -> one array
    * a batch (``dict`` of columns / numpy arrays as given by Ray Data, a ``pyarrow.Table`` or
      a pandas DataFrame) -> ``(B, T, H, W, 3)`` array when every clip has the same shape,
      else a list of arrays.
    """
    if isinstance(row_or_batch, pa.Table):
        whole = frames_array(row_or_batch)
        if whole is not None:
            return whole
        cols = {c: row_or_batch.column(c).to_pylist() for c in ("frames", "num_frames", "height", "width")}
        return _decode_batch(cols)
    if hasattr(row_or_batch, "to_dict") and hasattr(row_or_batch, "columns"):  # pandas
        return _decode_batch({c: list(row_or_batch[c]) for c in ("frames", "num_frames", "height", "width")})
    frames = row_or_batch["frames"]
    if isinstance(frames, (bytes, bytearray, memoryview)):
        return _frames_of(frames, int(row_or_batch["num_frames"]), int(row_or_batch["height"]),
                          int(row_or_batch["width"]))
    return _decode_batch(row_or_batch)


def _decode_batch(cols: Mapping[str, Sequence]) -> Union[np.ndarray, List[np.ndarray]]:
    frames = cols["frames"]
    ts, hs, ws = (np.asarray(cols[c]).astype(np.int64) for c in ("num_frames", "height", "width"))
    if len(frames) == 0:
        return []
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 5:
        return frames  # already decoded by tensor_column_schema
    clips = [_frames_of(f, t, h, w) for f, t, h, w in zip(frames, ts, hs, ws)]
    if len({c.shape for c in clips}) == 1:
        return np.stack(clips)
    return clips


def clips_table(rows: List[Dict[str, Any]]) -> pa.Table:
    """Build a table with :data:`CLIP_SCHEMA` from row dicts (frames as bytes)."""
    return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)


# ---------------------------------------------------------------------------------------
# atomic files (the general helpers are dvfl.storage.write_bytes/write_text/write_json)

def atomic_write_table(path: str, table: pa.Table, **write_kwargs) -> None:
    """A Parquet file written with :func:`pyarrow.parquet.write_table`, atomically."""
    storage.write_with(str(path), lambda tmp: pq.write_table(table, tmp, **write_kwargs))


class AtomicShardWriter:
    """Stream rows into ``.<name>.<rand>.tmp`` in the shard dir; ``commit()`` renames it to ``name``.

    Row groups have a fixed number of rows (deterministic bytes for identical input).
    Readers only ever see complete shards: they glob ``*.parquet`` and the temporary name
    neither matches that nor is visible to pyarrow/Ray (leading ``.``).

    On an object store (no rename) rows are spooled to a local temporary file and ``close()``
    uploads it once under the final name; readers ignore a shard until its ``_meta`` sidecar,
    written after it, commits it (:func:`shard_paths`).
    """

    def __init__(self, path: str, row_group_rows: int = 256, compression: str = "lz4"):
        self.path = str(path)
        self.remote = storage.is_remote(self.path)
        if self.remote:
            self.tmp = storage.spool_file(self.path)
        else:
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            self.tmp = storage.local_tmp_name(self.path)
        self.row_group_rows = max(1, int(row_group_rows))
        non_frames = [c for c in CLIP_COLUMNS if c != "frames"]
        # write_batch_size 1: a page is cut by its size alone, not also where the arriving chunks end (a video at
        # a time, or a merged piece's row groups): the same bytes however the rows were cut into tasks
        try:
            self.writer = pq.ParquetWriter(self.tmp, CLIP_SCHEMA, compression=compression, write_page_checksum=True,
                                           write_batch_size=1,
                                           use_dictionary=["video_id", "path", "class_name", "split", "view"],
                                           write_statistics=non_frames)
        except BaseException:  # (a full disk: the file is made, its header fails; no abort() will follow)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise
        self.pending: List[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table.select(CLIP_COLUMNS))  # cast once per row group, not per call
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self.pending, promote_options="permissive").cast(CLIP_SCHEMA)
        self.writer.write_table(t.slice(0, n), row_group_size=n)
        rest = t.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows
        self.rows += n

    def close(self) -> int:
        """Flush and close the temporary file; returns its size in bytes. Local: not yet visible.
        Object store: uploaded under the final name, not yet committed (no sidecar yet)."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        self.writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        n = os.path.getsize(self.tmp)
        if self.remote:
            try:
                storage.upload_file(self.tmp, self.path)
            finally:
                os.unlink(self.tmp)
        return n

    def publish(self) -> None:
        """Atomically make the shard visible under its final name (object stores: done by close())."""
        if self.remote:
            return
        os.replace(self.tmp, self.path)
        storage.fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def commit(self) -> int:
        n = self.close()
        self.publish()
        return n

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def remove_stale_tmp(directory: str) -> int:
    if storage.is_remote(directory):
        return 0  # objects are written once under their final names: no temporary objects
    n = 0
    # the folder escaped: unescaped, a folder br[1] is a pattern matching br1, not itself
    for p in glob.glob(os.path.join(glob.escape(storage.local_path(directory)), ".*.tmp")):
        try:
            os.unlink(p)
            n += 1
        except FileNotFoundError:
            pass
    return n


# ---------------------------------------------------------------------------------------
# readers

def load_dataset_info(out_dir: str) -> Dict[str, Any]:
    """The ``dataset.json`` of a finished ingest (raises if the ingest never completed)."""
    p = storage.join(out_dir, DATASET_JSON)
    try:
        return storage.read_json(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{p} not found: {out_dir} is not a finished ingest output") from None
    except ValueError as exc:  # (cut short or edited: a JSONDecodeError's traceback said nothing of which file)
        raise ValueError(f"{p} is not valid JSON ({exc}): re-ingest {out_dir} (dvfl ingest ... --fresh)") from None


def keep_clips(ds, clip_ids: set):
    """``ds`` without the rows whose ``clip_id`` is not in ``clip_ids``. The set goes to the object
    store once and each read worker fetches it once: as a filter expression (``is_in``) Ray Data
    pickled it into every read task of every epoch (~15 MB x 15,000 shards on Kinetics-400). The
    filter lives here, not beside training: a read worker imports this module, not torch (~2.5 s a
    fresh worker)."""
    import ray

    ref = ray.put(frozenset(clip_ids))
    # in a list: a ref nested in an argument reaches the function as a ref, fetched once per process
    # the read's CPU share: Ray Data fuses the filter into the read task (one task, no 1-CPU filter
    # task that a worker group leaving < 1 CPU free could never schedule: a silent hang)
    return ds.map_batches(_rows_of_clips, fn_kwargs={"ids": [ref]}, batch_format="pyarrow", batch_size=None,
                          num_cpus=READ_TASK_CPUS)


_CLIP_SETS: dict = {}  # per worker process: the id sets of the runs its read tasks served last


def _rows_of_clips(batch, ids):
    import pyarrow as pa
    import ray

    key = ids[0].hex()
    wanted = _CLIP_SETS.get(key)
    if wanted is None:
        while len(_CLIP_SETS) >= 4:  # two concurrent runs' train and val sets
            _CLIP_SETS.pop(next(iter(_CLIP_SETS)))
        wanted = _CLIP_SETS[key] = ray.get(ids[0])
    return batch.filter(pa.array([c in wanted for c in batch.column("clip_id").to_pylist()], type=pa.bool_()))


def read_rejects(out_dir: str) -> List[dict]:
    """An ingest's reject records (``rejects.jsonl``); OSError / ValueError where unreadable."""
    lines = storage.read_text(storage.join(out_dir, REJECTS_FILE)).splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def shard_paths(out_dir: str, splits: Optional[Iterable[str]] = None) -> List[str]:
    """Final shard files (sorted), optionally only those of the given splits.

    On an object store only committed shards count: those with their ``_meta`` sidecar (a shard
    object uploaded by an ingest killed before its sidecar is ignored, and rewritten by the rerun).
    """
    if storage.is_remote(out_dir):
        shard_dir = storage.join(out_dir, SHARD_DIR)
        committed = {storage.basename(m)[:-len(".json")]
                     for m in storage.listdir(storage.join(shard_dir, META_DIR), ".json")}
        paths = [p for p in storage.listdir(shard_dir, ".parquet") if storage.basename(p)[:-len(".parquet")] in committed]
    else:
        shard_dir = glob.escape(os.path.join(storage.local_path(out_dir), SHARD_DIR))  # br[1] is a name, not a pattern
        paths = sorted(glob.glob(os.path.join(shard_dir, "*.parquet")))
    try:
        listed = storage.read_json(storage.join(out_dir, DATASET_JSON)).get("shards")
    except FileNotFoundError:  # an ingest in progress: its shards so far
        listed = None
    if listed is not None:
        # a finished ingest reads exactly its shards: a file lost in a partial copy or sync would
        # leave every score computed on part of a split, and a stray copy would add clips twice
        found = {storage.basename(p): p for p in paths}
        names = [storage.basename(e["file"]) for e in listed if splits is None or e.get("split") in set(splits)]
        missing = [n for n in names if n not in found]
        if missing:
            raise IncompleteClipsError(
                f"{out_dir}: {len(missing)} of the {len(names)} shard files its {DATASET_JSON} lists"
                f"{' for split(s) ' + ', '.join(sorted(set(splits))) if splits is not None else ''} are missing "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the folder is incomplete "
                "(copied or synced partway?); copy it again, or rerun the ingest that made it")
        return sorted(found[n] for n in names)
    if splits is not None:
        want = set(splits)
        paths = [p for p in paths if storage.basename(p).rsplit("-", 1)[0] in want]
    return paths


def smallest_frame_side(out_dir: str) -> Optional[int]:
    """The smallest height or width of any stored clip (from the shards' column statistics: footers
    only), or None without statistics; for clips kept at their source size (short side 0)."""
    smallest = None
    for path in shard_paths(out_dir):
        meta = parquet_file(path).metadata
        names = meta.schema.names
        for g in range(meta.num_row_groups):
            for column in ("height", "width"):
                stats = meta.row_group(g).column(names.index(column)).statistics
                if stats is None or not stats.has_min_max:
                    return None
                smallest = stats.min if smallest is None else min(smallest, stats.min)
    return smallest


def parquet_file(path: str, **kwargs) -> pq.ParquetFile:
    """A Parquet file at a local path or URI."""
    if storage.is_remote(path):
        return pq.ParquetFile(storage.open_input(path), **kwargs)
    return pq.ParquetFile(path, **kwargs)


def read_table(path: str, **kwargs) -> pa.Table:
    fs, p = storage.filesystem(path)
    return pq.read_table(p, filesystem=fs, **kwargs)


def read_tables(paths: Sequence[str], **kwargs) -> List[pa.Table]:
    """``read_table`` of each path, in order, several at a time: one after another, a split of
    thousands of shards on an object store took minutes of request latency."""
    return storage.in_threads(lambda p: read_table(p, **kwargs), list(paths))


def read_clips_table(out_dir: str, splits: Optional[Iterable[str]] = None,
                     columns: Optional[List[str]] = None) -> pa.Table:
    """All clips of the given splits as one pyarrow Table (small columns of large datasets, tests, tools)."""
    paths = shard_paths(out_dir, splits)
    if not paths:
        return CLIP_SCHEMA.empty_table() if columns is None else CLIP_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(read_tables(paths, columns=columns, schema=CLIP_SCHEMA))


def split_sizes(out_dir: str, splits: Iterable[str]) -> Tuple[int, int]:
    """(clips, bytes) of the shards of ``splits``: from a finished ingest's ``dataset.json`` (no
    request per shard: a footer read and a HEAD each were ~100k requests a run on a Kinetics-sized
    split on s3), else from the shards' footers and sizes (an ingest in progress)."""
    splits = set(splits)
    paths = shard_paths(out_dir, splits)  # (refuses a finished ingest with listed shards missing)
    try:
        listed = storage.read_json(storage.join(out_dir, DATASET_JSON)).get("shards")
    except FileNotFoundError:
        listed = None
    if listed is None or any("clips" not in e or "bytes" not in e for e in listed):
        return (sum(parquet_file(p).metadata.num_rows for p in paths), sum(storage.size(p) for p in paths))
    entries = [e for e in listed if e.get("split") in splits]
    return sum(e["clips"] for e in entries), sum(e["bytes"] for e in entries)


def median_video_seconds(out_dir: str, splits: Iterable[str]) -> Optional[float]:
    """The median length in seconds of the source videos of ``splits`` (None if no video has a
    known frame rate): the span a clip's T frames were spread over in training."""
    t = read_clips_table(out_dir, splits, columns=["video_id", "src_fps", "src_num_frames"])
    seconds = {}
    for vid, fps, n in zip(*(t.column(c).to_pylist() for c in ("video_id", "src_fps", "src_num_frames"))):
        if fps and fps > 0:
            seconds[vid] = n / fps
    return round(float(np.median(list(seconds.values()))), 3) if seconds else None


class IncompleteClipsError(FileNotFoundError):
    """A finished ingest's folder without every shard file its dataset.json lists."""


class CorruptShardError(OSError):
    """A clip shard that cannot be read back (damaged on disk or in transfer)."""


class ClipReadError(OSError):
    """A clip shard that could not be read now (access, credentials, network), not a damaged one."""


def find_corrupt_shards(paths: Iterable[str]) -> List[tuple]:
    """``(path, error)`` of every shard whose bytes do not read back whole, page checksums included
    (a diagnosis for read errors that do not say which file failed). The bytes are fetched first:
    a shard that cannot be fetched now (access, credentials, network) is not listed, not damaged;
    one whose fetched bytes do not parse is, whatever pyarrow's words for it."""
    bad = []
    for p in paths:
        try:
            data = storage.read_bytes(p)
        except Exception:  # noqa: BLE001  (a read that did not happen says nothing of the bytes)
            continue
        try:
            for _ in pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True).iter_batches(batch_size=64):
                pass
        except Exception as exc:  # noqa: BLE001  (any failure to parse fetched bytes is damage)
            bad.append((p, f"{type(exc).__name__}: {exc}"))
    return bad


def raise_if_corrupt(paths: Iterable[str], exc: BaseException) -> None:
    """Re-raise a failed read as :class:`CorruptShardError` naming the damaged shard(s), if any."""
    bad = find_corrupt_shards(paths)
    if bad:
        raise corrupt_shard_error([f"{p} ({e})" for p, e in bad]) from None


def corrupt_shard_error(damaged: List[str]) -> CorruptShardError:
    """The error naming damaged shards (``"path (what failed)"`` each) and what to do."""
    return CorruptShardError(f"clip shard(s) cannot be read: {'; '.join(damaged)}. Re-ingest (delete the damaged "
                             "file and its _meta sidecar, then rerun the same ingest command)")


def read_clip_dataset(out_dir: str, splits: Optional[Iterable[str]] = None,
                      columns: Optional[List[str]] = None, num_cpus: float = READ_TASK_CPUS, **kwargs):
    """A Ray Dataset over the shards of ``splits``.

    ``num_cpus=0.25`` for the read tasks keeps reads schedulable next to Train workers on
    small machines (see ray-2.60-notes, hang #1). Decode ``frames`` with :func:`decode_frames`.

    Uses Ray Data's V1 Parquet datasource: in Ray 2.60 the default V2 path plans a
    ``ListFiles`` task that delays the first row of every epoch by seconds (docs/ingest.md).
    """
    import ray.data

    paths = shard_paths(out_dir, splits)
    if not paths:
        raise FileNotFoundError(f"no shards for splits {list(splits) if splits else 'all'} in {out_dir}")
    # One read task per shard file (Ray splits big outputs into blocks by size as they stream).
    # Ray's default of ~200 read blocks cut a shard into blocks of 2-3 clips here, and the
    # per-block cost capped reading at ~400 UCF-sized clips/s; per file: ~1,300 (docs/ingest.md).
    kwargs.setdefault("override_num_blocks", len(paths))
    # verify page checksums (written by AtomicShardWriter): a damaged page fails the read instead of
    # giving wrong pixels; buffered reads as Ray's own default
    import pyarrow.dataset as pds
    from ray.data._internal.datasource.parquet_datasource import ParquetDatasource as _PD

    kwargs.setdefault("fragment_scan_options", pds.ParquetFragmentScanOptions(
        use_buffered_stream=True, buffer_size=getattr(_PD, "_DEFAULT_FRAGMENT_SCAN_BUFFER_SIZE", 8192),
        page_checksum_verification=True))
    ctx = ray.data.DataContext.get_current()
    old = getattr(ctx, "use_datasource_v2", None)
    if old is not None:
        ctx.use_datasource_v2 = False
    try:
        if storage.is_remote(out_dir):  # our filesystem (endpoint) travels with the read tasks
            fs, _ = storage.filesystem(out_dir)
            kwargs.setdefault("filesystem", fs)
            paths = [storage.filesystem(p)[1] for p in paths]
        ds = ray.data.read_parquet(paths, num_cpus=num_cpus, schema=CLIP_SCHEMA, **kwargs)
    finally:
        if old is not None:
            ctx.use_datasource_v2 = old
    if columns is not None:
        ds = ds.select_columns(columns)
    return ds
