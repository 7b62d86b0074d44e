"""Ingest: manifest -> decode tasks that write their own Parquet clip shards -> manifest.

The driver plans and commits; no clip byte passes through it:

    the driver cuts the videos still to do into decode tasks ("pieces": a run of one shard's
    videos, sized by source bytes and shrinking towards the end, plan_pieces) and keeps as many
    in flight as the cluster has CPUs (plain Ray tasks, num_cpus=1)
      -> each task (on any node) decodes its videos in its worker's killable decode child
         (dvfl.data.worker: decord, every view's frame indices from dvfl.data.sampling, the union
         of those frames decoded once, resized on the short side) and streams the clips, in
         planned order, into a Parquet file it writes itself (dvfl.storage: local disk or s3://,
         gs://): a shard that fits in one task is written and committed (its _meta sidecar) by
         that task; a bigger shard's pieces are written as part files under _parts/ and a merge
         task concatenates them, in order, into the shard and commits it
      -> the driver gets back counts and rejects only, reads every shard's sidecar and writes
         rejects.jsonl, summary.json and, last, dataset.json.

Shards are a deterministic function of the manifest (split, sorted video ids, fixed
number of videos per shard) and their bytes of the rows in order (fixed row groups), so a re-run
skips committed shards and redoes only the rest; a killed run leaves only dot-prefixed ``*.tmp``
files and _parts/, which are removed on the next run. See docs/data-format.md for the output
contract. ``IngestConfig(writer="driver")`` keeps the earlier path (Ray Data, every clip through
the driver, which writes all shards) as the baseline benchmarks/input_pipeline.py measures against.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from dvfl import storage
from dvfl.host import joined_address

from . import decode as _d
from . import shards as _s
from .manifest import KEEP_FIRST, Manifest, Problem, VideoEntry
from .sampling import SAMPLING_SCHEME, TRAIN_LIKE_SPLITS, clip_id as make_clip_id, stable_seed

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}
HASH_BYTES = 1 << 16   # file identity: size + blake2b(first 64 KiB + last 64 KiB)


@dataclass
class IngestConfig:
    out: str
    frames: int = 8
    clips_per_video: int = 2
    eval_clips: int = 1
    short_side: int = 128
    seed: int = 0
    min_frames: Optional[int] = None        # default: frames
    timeout_per_file: float = 60.0
    videos_per_shard: Optional[int] = None  # default: from target_shard_mb
    target_shard_mb: float = 128.0          # uncompressed clip bytes per shard (estimate)
    row_group_clips: int = 128
    workers: Optional[int] = None           # decode tasks in flight; default: the cluster's logical CPUs
    task_mb: float = 4.0                    # source video MB per decode task (0.7-2 s of decoding)
    videos_per_task: Optional[int] = None   # at most this many videos per task; default: 256 MiB of clips
    overwrite: bool = False
    # the plan of an ingest that committed nothing (no shard, no dataset.json) is replaced without --fresh:
    # the ingest command's rerun after every input was refused; a run's given data.clips is never replaced
    replace_uncommitted: bool = False
    progress: bool = True
    ray_progress: bool = False              # Ray Data's own progress bars
    test_hooks: bool = False                # honour the DVFL-TEST-* magic files (tests only)
    max_jobs_per_child: int = 100_000
    max_child_rss_mb: float = 2048.0        # recycle a decode child whose memory grew past this
    # lz4, not zstd: about the same size on clip frames, faster to read back every epoch (docs/ingest.md)
    compression: str = "lz4"
    # "workers": decode tasks write their shards; "driver": every clip through the driver (the
    # earlier path, kept as the baseline benchmarks/input_pipeline.py measures against)
    writer: str = "workers"

    def validate(self) -> None:
        checks = [
            (self.frames >= 1, "--frames must be >= 1"),
            (self.clips_per_video >= 1, "--clips-per-video must be >= 1"),
            (self.eval_clips >= 1, "--eval-clips must be >= 1"),
            (self.short_side >= 0, "--short-side must be >= 0 (0 keeps the source size)"),
            (self.min_frames is None or self.min_frames >= 1, "--min-frames must be >= 1"),
            (self.timeout_per_file > 0, "--timeout-per-file must be > 0"),
            (self.videos_per_shard is None or self.videos_per_shard >= 1, "--videos-per-shard must be >= 1"),
            (self.workers is None or self.workers >= 1, "--decode-tasks must be >= 1"),
            (self.videos_per_task is None or self.videos_per_task >= 1, "--videos-per-task must be >= 1"),
            (self.task_mb > 0, "--task-mb must be > 0"),
            (self.max_jobs_per_child >= 1 and self.max_child_rss_mb > 0, "decode child limits must be > 0"),
            (self.target_shard_mb > 0, "--target-shard-mb must be > 0"),
            (self.writer in ("workers", "driver"), f"writer must be 'workers' or 'driver', got {self.writer!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def content_params(self) -> Dict[str, Any]:
        """Everything that changes the stored clips (and nothing else): part of the fingerprint."""
        decord = _d.decord_version()
        return {"frames": self.frames, "clips_per_video": self.clips_per_video, "eval_clips": self.eval_clips,
                "short_side": self.short_side, "seed": self.seed, "min_frames": self.min_frames or self.frames,
                "sampling": SAMPLING_SCHEME, "train_view_splits": list(TRAIN_LIKE_SPLITS),
                "resize": ("FFmpeg scaler via decord width/height (PIL.BILINEAR if the size is unknown)" if decord
                           else "PIL.BILINEAR of each frame PyAV decodes") + ", short side, aspect kept, no crop",
                "orientation": "as displayed: the MP4/MOV display rotation applied",
                "decoder": f"decord {decord}" if decord else f"PyAV {_d.pyav_version()} (no decord)", "decode_rules": _d.DECODE_RULES,
                "schema_version": _s.SCHEMA_VERSION}


# ---------------------------------------------------------------------------------------
# file identity and fingerprint

# two small reads per video (one GET per shard sidecar) one after another cost ~30-60 min for
# Kinetics-400's 240k videos on NFS or HDD, and on s3
_in_threads = storage.in_threads


def _identity_or_error(path: str):
    try:
        return file_identity(path), None
    except OSError as ex:
        return None, ex


def file_identity(path: str) -> Tuple[int, str]:
    """``(size, blake2b-128 of the first and last 64 KiB)`` of a local file or an object: a content
    identity that costs two small reads per file. Edits of the same size strictly inside the middle of a file larger
    than 128 KiB are not seen (documented trade-off)."""
    h = hashlib.blake2b(digest_size=16)
    if storage.local_path(path) is None:  # an init checkpoint on object storage: two ranged reads
        with storage.open_input(path) as f:
            size = f.size()
            h.update(f.read_at(min(size, HASH_BYTES), 0))
            if size > HASH_BYTES:
                start = max(HASH_BYTES, size - HASH_BYTES)  # the same bytes as the local branch below
                h.update(f.read_at(size - start, start))
        return size, h.hexdigest()
    path = storage.local_path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(HASH_BYTES))
        if size > 2 * HASH_BYTES:
            f.seek(size - HASH_BYTES)
            h.update(f.read(HASH_BYTES))
        elif size > HASH_BYTES:
            h.update(f.read())
    return size, h.hexdigest()


def _full_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reject_duplicate_content(manifest: Manifest, identities: Dict[str, Tuple[int, str]]) -> int:
    """Entries with the same bytes under different ids (across splits, pools or within one):
    keep one (test > val > train > unlabeled, then the first id), reject the others as
    ``duplicate_content`` naming the kept id. Returns how many rejected copies were training or
    unlabelled copies of a val/test video (leaks). Same head/tail identities are confirmed with a
    hash of the whole files."""
    groups: Dict[Tuple[int, str], List[VideoEntry]] = {}
    for e in manifest.entries:
        groups.setdefault(identities[e.video_id], []).append(e)
    rejected, leaks = set(), 0
    for (size, _), group in groups.items():
        if len(group) < 2 or size == 0:  # empty files (failed downloads) are each rejected as empty
            continue
        by_content: Dict[str, List[VideoEntry]] = {}
        for e in group:
            try:
                by_content.setdefault(_full_hash(e.path), []).append(e)
            except OSError:  # vanished since: decoding reports it as missing
                continue
        for same in by_content.values():
            # evaluation copies first (manifest.KEEP_FIRST, the same-id rule's order): no test video also trains
            same.sort(key=lambda e: (KEEP_FIRST.get(e.split, 9), e.video_id))
            kept = same[0]
            for e in same[1:]:
                leak = kept.split in ("val", "test") and e.split not in ("val", "test")
                leaks += leak
                manifest.problems.append(Problem(
                    _d.DUPLICATE_CONTENT, e.path, e.video_id,
                    f"same content as {kept.split} video {kept.video_id} ({kept.relpath(manifest.root)})"
                    + ("; a copy of evaluation data in training is refused" if leak else ""), e.split))
                rejected.add(e.video_id)
                identities.pop(e.video_id, None)
    if rejected:
        manifest.entries = [e for e in manifest.entries if e.video_id not in rejected]
    return leaks


def compute_fingerprint(manifest: Manifest, params: Dict[str, Any], identities: Dict[str, Tuple[int, str]]) -> str:
    """sha256 over the preprocessing parameters, the classes, every entry (video id, relative
    path, label, split, file identity) and every manifest-level reject."""
    h = hashlib.sha256()

    def put(obj: Any) -> None:
        b = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put({"format": _s.FORMAT_NAME, "params": params, "classes": manifest.classes})
    for e in sorted(manifest.entries, key=lambda e: e.video_id):
        put([e.video_id, e.relpath(manifest.root), e.label, e.split, list(identities[e.video_id])])
    for p in sorted(manifest.problems, key=lambda p: (p.reason, p.video_id or "", p.path)):
        # listed since sessions 33 and 40: an earlier ingest of the same files keeps its fingerprint
        if p.reason not in (_d.NO_CLASS, _d.LINKED_FOLDER):
            put(["reject", p.reason, p.video_id, os.path.basename(p.path), p.split])
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Ray side: the decode actor

_OUT_SCHEMA = pa.schema([pa.field(f.name, f.type, nullable=True) for f in _s.CLIP_SCHEMA] + [
    pa.field("_shard", pa.string()), pa.field("_order", pa.int64()), pa.field("_status", pa.string()),
    pa.field("_detail", pa.string()), pa.field("_nrows", pa.int32())])
_ROW_SCHEMA = pa.schema([f for f in _OUT_SCHEMA if f.name != "frames"])
_CHUNK_BYTES = 1 << 30  # binary arrays have 32-bit offsets: start a new chunk before 2 GiB


def binary_column(parts: List[Optional[np.ndarray]]) -> pa.ChunkedArray:
    """A ``binary`` column whose values are the bytes of ``parts`` (None -> null), built from one
    contiguous buffer per chunk: ``pa.Table.from_pylist`` over ``ndarray.tobytes()`` values cost
    2.6-3.7 ms of CPU per UCF-like video (1 MB of clips), more than all other worker-side work."""
    chunks, start = [], 0
    while start < len(parts) or not chunks:
        stop, total = start, 0
        while stop < len(parts) and (stop == start or total + _nbytes(parts[stop]) <= _CHUNK_BYTES):
            total += _nbytes(parts[stop])
            stop += 1
        group = parts[start:stop]
        offsets = np.zeros(len(group) + 1, dtype=np.int32)
        np.cumsum([_nbytes(p) for p in group], out=offsets[1:])
        if _back_to_back(group):  # one video's clips, as the decode child's block holds them: no copy
            data = pa.foreign_buffer(group[0].ctypes.data, int(offsets[-1]), base=group)
        else:
            flat = np.empty(int(offsets[-1]), dtype=np.uint8)
            for p, o in zip(group, offsets[:-1]):
                if p is not None:
                    flat[o:o + p.nbytes] = p.reshape(-1).view(np.uint8)
            data = pa.py_buffer(flat)
        valid = np.array([p is not None for p in group], dtype=bool)
        bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
        chunks.append(pa.BinaryArray.from_buffers(pa.binary(), len(group), [bitmap, pa.py_buffer(offsets), data],
                                                  null_count=int((~valid).sum())))
        start = stop
    return pa.chunked_array(chunks, type=pa.binary())


def _nbytes(p: Optional[np.ndarray]) -> int:
    return 0 if p is None else p.nbytes


def _back_to_back(group: List[Optional[np.ndarray]]) -> bool:
    """Whether ``group``'s arrays are C-contiguous and lie one right after the other in memory."""
    if not group or any(p is None or not p.flags.c_contiguous for p in group):
        return False
    return all(a.ctypes.data + a.nbytes == b.ctypes.data for a, b in zip(group, group[1:]))


_PROC = None  # one decode child per Ray worker process, reused across tasks (and ingest runs)


def _decode_batch(batch: pa.Table, timeout: float, max_jobs: int, max_rss_mb: float,
                  params: Dict[str, Any]) -> pa.Table:
    """Ray Data UDF: decode the videos of one batch in this worker's killable child process.

    A task pool (not an actor pool) is used so that Ray's pooled worker processes, which
    already imported this package, are reused across tasks and across ingest runs; the
    decode child lives as long as its worker process (it gets SIGKILL when the worker dies).
    """
    global _PROC
    from .worker import DecodeProcess

    if _PROC is None:
        _PROC = DecodeProcess()
    _PROC.max_jobs, _PROC.max_rss_mb = max_jobs, max_rss_mb
    rows: List[Dict[str, Any]] = []
    frames: List[Optional[np.ndarray]] = []
    for job in (j for text in batch.column("jobs").to_pylist() for j in json.loads(text)):
        full = dict(params, path=job["abspath"], root=job["root"], video_id=job["video_id"], split=job["split"])
        res = _PROC.run(full, timeout)
        raise_if_not_on_node(job, res)
        label = None if job["label"] < 0 else job["label"]
        base = {"video_id": job["video_id"], "path": job["path"], "label": label,
                "class_name": job["class_name"] or None, "split": job["split"],
                "_shard": job["shard"], "_order": job["order"]}
        if not res.get("ok"):
            rows.append(dict(base, _status=res.get("reason", "decoder_error"), _detail=res.get("detail", ""),
                             _nrows=1))
            frames.append(None)
            continue
        for view, k, idx, clip in res["views"]:
            rows.append(dict(base, _nrows=len(res["views"]), clip_id=make_clip_id(job["video_id"], view, k),
                             view=view, view_index=k, frame_indices=idx.tolist(), src_fps=res["src_fps"],
                             src_num_frames=res["src_num_frames"], num_frames=clip.shape[0],
                             height=res["height"], width=res["width"], _status="ok", _detail=""))
            frames.append(clip)
    table = pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)
    return table.append_column(_OUT_SCHEMA.field("frames"), binary_column(frames)).select(_OUT_SCHEMA.names)


# ---------------------------------------------------------------------------------------
# Ray session handling

@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None,
                object_store_mb: int = 1024, log=print) -> Iterator[Dict[str, Any]]:
    """:func:`dvfl.runtime.ray_runtime` (its default logical CPUs, like every command) for ingest:
    no dashboard, worker logs kept out of the progress line. Shuts down only what it started."""
    import ray

    from dvfl.runtime import ray_runtime

    owned = not ray.is_initialized()
    addr = joined_address(address)
    with ray_runtime(num_cpus=num_cpus, object_store_mb=object_store_mb, address=address, dashboard=False,
                     log_to_driver=False) as resources:
        n = int(resources.get("CPU", 0))
        mode = ("existing" if not owned else f"connected to {addr}" if addr
                else f"local Ray, {n} logical CPUs, {object_store_mb} MiB object store")
        if log and owned:
            log(f"[ingest] {mode}")
        yield {"owned": owned and not addr, "mode": mode}


# ---------------------------------------------------------------------------------------
# the ingest

@dataclass
class _ShardPlan:
    name: str
    split: str
    video_ids: List[str]


def _shard_content(plan: _ShardPlan, meta: dict) -> str:
    """Which videos a shard holds, in order: the same fingerprint under another shard layout
    gives shards of the same names and sizes holding other clips (a teacher cache matches on it)."""
    rejected = {r.get("video_id") for r in meta["rejects"]}
    written = [v for v in plan.video_ids if v not in rejected]
    return hashlib.sha256("\n".join(written).encode()).hexdigest()[:16]


def _plan_shards(entries: List[VideoEntry], videos_per_shard: int, seed: int = 0) -> List[_ShardPlan]:
    by_split: Dict[str, List[VideoEntry]] = {}
    for e in entries:
        by_split.setdefault(e.split, []).append(e)
    plans = []
    for split in sorted(by_split, key=lambda s: (SPLIT_ORDER.get(s, 9), s)):
        vids = sorted(e.video_id for e in by_split[split])
        if split in TRAIN_LIKE_SPLITS:
            # Video ids sort by class; training reads shards in streaming order with only a
            # local shuffle buffer, so training shards get a seeded, class-mixed order.
            vids.sort(key=lambda v: stable_seed(seed, "shard-order", v))
        for i in range(0, len(vids), videos_per_shard):
            plans.append(_ShardPlan(f"{split}-{i // videos_per_shard:05d}", split, vids[i:i + videos_per_shard]))
    return plans


class _Progress:
    def __init__(self, total_videos: int, enabled: bool, stream=sys.stderr):
        self.total = total_videos
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.videos = self.clips = self.rejects = 0

    def update(self, videos: int, clips: int, rejects: int, force: bool = False) -> None:
        self.videos += videos
        self.clips += clips
        self.rejects += rejects
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = self.clips / el
        vrate = self.videos / el
        eta = (self.total - self.videos) / vrate if vrate > 0 else float("nan")
        pct = 100.0 * self.videos / max(self.total, 1)
        msg = (f"[ingest] {self.videos}/{self.total} videos ({pct:5.1f}%) | {self.clips} clips | "
               f"{self.rejects} rejected | {rate:7.1f} clips/s | eta {eta:5.0f} s")
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if force else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


class IngestInputsUnreadable(ValueError):
    """Listed videos that cannot be read now, beside a finished ingest of other inputs: never a
    reason to replace it on its own. ``what``: the finding, without the ingest command's advice."""

    def __init__(self, what: str):
        super().__init__(f"{what}. Run again once they can be read; to re-ingest without them, --fresh (or delete "
                         "the folder)")
        self.what = what


def _rejected_as(out: str, reason: str) -> set:
    """Video ids a finished ingest in ``out`` rejected for ``reason`` (none for an unfinished one)."""
    try:
        return {r.get("video_id") for r in _s.read_rejects(out) if isinstance(r, dict) and r.get("reason") == reason}
    except (OSError, ValueError):
        return set()


def _reject_record(p: Problem, root: str) -> Dict[str, Any]:
    ve = VideoEntry(p.video_id or "", p.path, None, None, p.split or "")
    return {"path": ve.relpath(root) if os.path.isabs(p.path) else p.path, "video_id": p.video_id,
            "split": p.split, "reason": p.reason, "detail": p.detail, "stage": "manifest"}


def ingest(manifest: Manifest, cfg: IngestConfig, log=print, fresh_done=None) -> Dict[str, Any]:
    """Run the ingest of ``manifest`` into ``cfg.out``; Ray must be initialised (see
    :func:`ray_session`). Returns the summary dict (also written to ``summary.json``). Another
    ingest writing ``cfg.out`` on this machine is waited for (its temporaries and parts are
    what a start clears), then its finished shards are reused. While other commands read
    ``cfg.out`` (a run, an evaluation) nothing is written: a finished ingest of these inputs and
    settings is used as it is, anything else is refused (:class:`dvfl.locks.FolderBusyError`).
    ``fresh_done``: called once ``cfg.overwrite`` has deleted the earlier ingest (from then on a
    rerun resumes)."""
    from dvfl.locks import FolderBusyError, folder_lock

    cfg.validate()
    try:
        with folder_lock(cfg.out, "ingest", wait=True, log=log):
            return _ingest(manifest, cfg, log, fresh_done)
    except FolderBusyError as busy:
        if cfg.overwrite or not busy.readers:
            raise
        # (a run started beside an evaluation of its clips was refused, though it had nothing to write)
        with folder_lock(cfg.out, "ingest", wait=True, log=log, shared=True, announce=False):
            finished = _finished_as_planned(manifest, cfg, log)
        if finished is None:
            raise
        return finished


def _out_dir(cfg: IngestConfig) -> str:
    """``cfg.out`` as every file below names it: a local path made absolute, or a URI (s3://, gs://)."""
    return cfg.out.rstrip("/") if storage.is_remote(cfg.out) else storage.absolute(cfg.out)


@dataclass
class _IngestPlan:
    """What an ingest of a manifest writes: its videos' identities, fingerprint and shard layout."""
    identities: Dict[str, Tuple[int, str]]
    entries: Dict[str, VideoEntry]
    params: Dict[str, Any]
    fingerprint: str
    plans: List["_ShardPlan"]
    layout: Dict[str, Any]
    videos_per_shard: int
    video_bytes: int  # one video's decoded clips, estimated: what sizes the tasks
    cfg: IngestConfig  # with the row group size the layout takes


def _plan_ingest(manifest: Manifest, cfg: IngestConfig, log) -> _IngestPlan:
    manifest.dedupe()

    # -- identities (a file that vanished since the adapter ran becomes a 'missing' reject)
    if log:  # (reads of every file: 30-60 min for Kinetics-400 in one thread, less in these threads)
        log(f"[ingest] {len(manifest.entries)} videos listed ({len(manifest.problems)} manifest rejects): "
            "reading their identities (size and content hash) for the fingerprint")
    identities: Dict[str, Tuple[int, str]] = {}
    keep = []
    for e, (identity, ex) in zip(manifest.entries, _in_threads(_identity_or_error, [e.path for e in manifest.entries])):
        if ex is None:
            identities[e.video_id] = identity
            keep.append(e)
        else:  # gone since listed (or unreadable: permission denied), said as such
            reason = _d.MISSING if isinstance(ex, FileNotFoundError) else _d.UNREADABLE
            manifest.problems.append(Problem(reason, e.path, e.video_id, _d._short(ex), e.split))
    manifest.entries = keep
    if manifest.earlier_splits:
        _keep_earlier_splits(manifest, cfg, identities, log)
    leaks = _reject_duplicate_content(manifest, identities)
    if leaks and log:
        log(f"[ingest] {leaks} video(s) of the training/unlabelled data have the same content as a val/test "
            f"video: rejected as {_d.DUPLICATE_CONTENT} (both ids in {_s.REJECTS_FILE})")
    entries = {e.video_id: e for e in manifest.entries}
    params = cfg.content_params()
    fingerprint = compute_fingerprint(manifest, params, identities)

    # -- shard layout
    T, S = cfg.frames, cfg.short_side
    views = max(cfg.clips_per_video, cfg.eval_clips)
    # decoded bytes of one clip: a 4:3 video at the short side; at the source size (short side 0)
    # the largest of a sample of the inputs (HD clips are 50x a 256-pixel one: sized as 256, a
    # task's and a row group's buffers ran out of memory)
    est_clip_bytes = T * 3 * (S * (S * 4 // 3) if S else _largest_source_pixels(manifest.entries))
    est_video_bytes = est_clip_bytes * views
    vps = cfg.videos_per_shard or max(1, int(cfg.target_shard_mb * 2 ** 20 // est_video_bytes))
    row_group_clips = min(cfg.row_group_clips, max(1, ROW_GROUP_BYTES // est_clip_bytes))
    plans = _plan_shards(manifest.entries, vps, cfg.seed)
    layout = {"fingerprint": fingerprint, "videos_per_shard": vps, "row_group_clips": row_group_clips,
              "compression": cfg.compression, "shards": [p.name for p in plans]}
    cfg = replace(cfg, row_group_clips=row_group_clips)
    return _IngestPlan(identities, entries, params, fingerprint, plans, layout, vps, est_video_bytes, cfg)


def _keep_earlier_splits(manifest: Manifest, cfg: IngestConfig, identities: Dict[str, Tuple[int, str]], log) -> None:
    """Where ``cfg.out`` holds an ingest of these inputs with the splits an earlier split rule drew
    (``manifest.earlier_splits``), those splits (its clips, teachers and caches stay valid; --fresh
    or a new --out draws by the current rule)."""
    try:
        made = storage.read_json(storage.join(_out_dir(cfg), _s.PLAN_JSON)).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return
    if cfg.overwrite or not made:
        return
    earlier = copy.deepcopy(manifest)
    ids = dict(identities)  # (the duplicate check drops the ids of the copies it rejects)
    for e in earlier.entries + earlier.problems:  # (a reject's split is in the fingerprint too)
        e.split = manifest.earlier_splits.get(e.video_id, e.split)
    _reject_duplicate_content(earlier, ids)
    if compute_fingerprint(earlier, cfg.content_params(), ids) != made:
        return
    for e in manifest.entries + manifest.problems:
        e.split = manifest.earlier_splits.get(e.video_id, e.split)
    manifest.source["split_rule"] = 1
    if log:
        log(f"[ingest] note: {_out_dir(cfg)} holds these videos with the test/val videos an earlier version drew "
            "video by video (cuts of one recording can be on both sides): kept (notes above of what a class drew "
            "describe the new draw); --fresh draws whole recordings per class")
        untaught = sorted({e.class_name for e in manifest.entries if e.label is not None}
                          - {e.class_name for e in manifest.entries if e.split == "train"})
        if untaught:  # (the new draw keeps every class a training video; that one did not)
            log(f"[ingest] note: in that draw {len(untaught)} class(es) have no training video "
                f"({', '.join(untaught[:5])}{', ...' if len(untaught) > 5 else ''}): no model learns them")


def older_decode_rules_note(out: str, info: Dict[str, Any]) -> Optional[str]:
    """A note for finished clips, given as they are, that earlier decode rules made (none otherwise)."""
    rules = (info.get("params") or {}).get("decode_rules")
    if rules == _d.DECODE_RULES:
        return None
    return (f"{out} was decoded by an earlier version (decode rules {rules or 'before revision 1'}, now "
            f"{_d.DECODE_RULES}): the frames of AVIs with B-frames, H.264 in AVI, WMV/ASF files and streams starting "
            "mid-GOP may be stored in the wrong order; used as given (re-ingest it with --fresh if it holds such videos)")


def _older_decode_rules(out: str, params: Dict[str, Any]) -> bool:
    """Whether ``out``'s finished ingest differs from ``params`` only by older decode rules."""
    try:
        old = storage.read_json(storage.join(out, _s.DATASET_JSON)).get("params") or {}
    except (OSError, ValueError):
        return False
    def rest(p: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in p.items() if k != "decode_rules"}

    return old.get("decode_rules") != params["decode_rules"] and rest(old) == rest(params)


def _space_note(out: str, decoded_bytes: int) -> Optional[str]:
    """A warning when the clips to write, decoded (before compression, which gains little on real video),
    may not fit the free space of a local ``out``: said at the start, not found hours later; None else."""
    if storage.is_remote(out) or not decoded_bytes:
        return None
    import shutil

    existing = out
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return None
    if decoded_bytes <= free:
        return None
    return (f"the clips may take up to {decoded_bytes / 2 ** 30:.1f} GiB (decoded, before compression); "
            f"{existing} has {free / 2 ** 30:.1f} GiB free: a disk that fills stops the ingest (finished shards "
            "stay, a rerun resumes)")


def _finished_as_planned(manifest: Manifest, cfg: IngestConfig, log) -> Optional[Dict[str, Any]]:
    """The summary of the finished ingest in ``cfg.out`` when it is this manifest's with these settings
    (nothing to write); None otherwise. Reads only."""
    out = _out_dir(cfg)
    plan = _plan_ingest(manifest, cfg, log)
    try:
        committed = storage.read_json(storage.join(out, _s.DATASET_JSON))  # (written last, once every shard is)
        layout = storage.read_json(storage.join(out, _s.PLAN_JSON))
        summary = storage.read_json(storage.join(out, _s.SUMMARY_JSON))
    except (OSError, ValueError):
        return None
    if layout != plan.layout or committed.get("fingerprint") != plan.fingerprint:
        return None
    if log:
        log(f"[ingest] {out} is being read by another command and holds this ingest, finished: used as it is")
    return {**summary, "shards_skipped": summary.get("shards"), "videos_decoded_this_run": 0, "clips_this_run": 0}


def _ingest(manifest: Manifest, cfg: IngestConfig, log, fresh_done=None) -> Dict[str, Any]:
    import ray

    t_start = time.perf_counter()
    # a local path or a URI (s3://, gs://): every file below goes through dvfl.storage
    out = _out_dir(cfg)
    shard_dir = storage.join(out, _s.SHARD_DIR)
    meta_dir = storage.join(shard_dir, _s.META_DIR)
    plan = _plan_ingest(manifest, cfg, log)
    identities, entries, params, fingerprint = plan.identities, plan.entries, plan.params, plan.fingerprint
    plans, layout, vps, cfg = plan.plans, plan.layout, plan.videos_per_shard, plan.cfg
    est_video_bytes = plan.video_bytes

    # -- output dir state: refuse to mix different datasets, unless --fresh
    plan_path = storage.join(out, _s.PLAN_JSON)
    if cfg.overwrite:
        _delete_ingest(out, shard_dir, "--fresh deletes")
        if fresh_done:
            fresh_done()
    elif storage.exists(plan_path):
        old = storage.read_json(plan_path)
        if old != layout and cfg.replace_uncommitted and not _anything_committed(out, shard_dir, meta_dir):
            # (a run that wrote nothing, e.g. no input it could list: its plan refused the corrected rerun)
            if log:
                log(f"[ingest] note: {out} holds the plan of an ingest that committed no shard: replaced")
        elif old != layout and cfg.replace_uncommitted and _committed_no_clip(out, shard_dir, meta_dir):
            # (every input rejected, e.g. a codec it cannot read: the rerun on the re-encoded videos was refused)
            _delete_ingest(out, shard_dir, "replacing an ingest that wrote no clip deletes")
            if log:
                log(f"[ingest] note: {out} holds an ingest that wrote no clip (every input rejected): replaced")
        elif old != layout:
            unreadable = [q for q in manifest.problems if q.reason == _d.UNREADABLE]
            if unreadable and old.get("fingerprint") != fingerprint:  # (those it rejected alike: not a change)
                known = _rejected_as(out, _d.UNREADABLE)
                unreadable = [q for q in unreadable if q.video_id not in known]
            if unreadable and old.get("fingerprint") != fingerprint:
                # (perhaps only a read that failed now, an NFS hiccup: a run re-ingesting its own clips deleted a
                # finished ingest for it, then again on the next run, when the file read fine)
                raise IngestInputsUnreadable(
                    f"{out} holds an ingest, and {len(unreadable)} of the listed videos it did not find unreadable "
                    f"cannot be read now (e.g. {unreadable[0].path}: {unreadable[0].detail}): with them the inputs may "
                    "be that ingest's")
            what = "fingerprint (inputs or parameters)" if old.get("fingerprint") != fingerprint else "shard layout"
            if old.get("fingerprint") != fingerprint and _older_decode_rules(out, params):
                what = (f"decoder: its clips were decoded before the rules of revision {_d.DECODE_RULES} (frames of AVIs "
                        "with B-frames, H.264 in AVI, WMV/ASF, mid-GOP starts were stored in the wrong order), and "
                        "are not reused")
            raise ValueError(f"{out} already holds an ingest with a different {what}; "
                             f"use a new --out or pass --fresh")
    elif _s.shard_paths(out):
        raise ValueError(f"{out} holds shards but no {_s.PLAN_JSON}; use a new --out or pass --fresh")
    storage.makedirs(meta_dir)
    for folder in (out, shard_dir, meta_dir):  # temp files of writes a killed run cut short
        _s.remove_stale_tmp(folder)
    parts_dir = storage.join(out, PARTS_DIR)
    storage.remove_tree(parts_dir)  # pieces of shards a killed run never merged: those shards are redone whole
    storage.write_json(plan_path, layout)

    # a shard is done when the shard and its sidecar are both there (one listing each, not a
    # request per shard on an object store); an uncommitted one is written again, whole
    have = ({storage.basename(f) for f in storage.listdir(shard_dir, ".parquet")},
            {storage.basename(f) for f in storage.listdir(meta_dir, ".json")})

    def done(p: _ShardPlan) -> bool:
        return p.name + ".parquet" in have[0] and p.name + ".json" in have[1]

    todo = [p for p in plans if not done(p)]
    skipped = len(plans) - len(todo)
    jobs = []
    for p in todo:
        for vid in p.video_ids:
            e = entries[vid]
            jobs.append({"video_id": vid, "abspath": e.path, "root": e.root, "path": e.relpath(manifest.root),
                         "label": -1 if e.label is None else int(e.label), "class_name": e.class_name or "",
                         "split": e.split, "shard": p.name, "order": len(jobs), "bytes": identities[vid][0]})
    n_videos_todo = len(jobs)
    if log:
        log(f"[ingest] {manifest.dataset}: {manifest.num_inputs} inputs ({len(manifest.entries)} videos, "
            f"{len(manifest.problems)} manifest rejects), {len(plans)} shards of <= {vps} videos; "
            f"{skipped} shards already done, {n_videos_todo} videos to decode")
        # (the estimate is a 4:3 frame at the short side: 16:9 sources take 4/3 of it)
        space_note = _space_note(out, n_videos_todo * est_video_bytes * (4 if cfg.short_side else 3) // 3)
        if space_note:
            log(f"[ingest] note: {space_note}")

    progress = _Progress(n_videos_todo, cfg.progress and log is not None)
    t_run = time.perf_counter()
    clips_this_run = 0
    if jobs:
        if log:
            from .worker import network_isolation, network_note

            isolated, why_not = network_isolation()
            if not isolated:
                log(f"[ingest] note: {network_note(why_not)}")
        max_videos = cfg.videos_per_task or max(1, int(TASK_OUTPUT_BYTES // est_video_bytes))
        if cfg.writer == "driver":
            clips_this_run = _run_pipeline(jobs, todo, cfg, max_videos, shard_dir, meta_dir, progress)
        else:
            # this run's own part folder: a task of a killed run that still finishes writes into its own
            # run's folder, never over a part of this run that a merge would then take (session 29)
            run_parts = storage.join(parts_dir, f"run-{uuid.uuid4().hex[:12]}")
            clips_this_run = _run_tasks(jobs, todo, cfg, max_videos, shard_dir, meta_dir, run_parts, progress, log)
            storage.remove_tree(parts_dir)  # every part was merged and removed: the empty folder too
    run_secs = time.perf_counter() - t_run

    # -- gather every shard's meta: summary, rejects, dataset.json
    metas = _in_threads(storage.read_json, [storage.join(meta_dir, p.name + ".json") for p in plans])
    rejects = [_reject_record(p, manifest.root) for p in manifest.problems]
    for m in metas:
        rejects.extend(m["rejects"])
    rejects.sort(key=lambda r: (r["reason"], r.get("video_id") or "", r["path"]))
    written_videos = sum(m["written_videos"] for m in metas)
    counts: Dict[str, Dict[str, int]] = {}
    for m in metas:
        c = counts.setdefault(m["split"], {"videos": 0, "clips": 0})
        c["videos"] += m["written_videos"]
        c["clips"] += m["clips"]
    by_reason = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    shard_bytes = sum(m["bytes"] for m in metas)
    src_bytes = sum(identities[v][0] for v in entries)
    info = {
        "format": _s.FORMAT_NAME, "schema_version": _s.SCHEMA_VERSION, "fingerprint": fingerprint,
        "dataset": manifest.dataset, "root": manifest.root, "source": manifest.source,
        "classes": manifest.classes, "num_classes": len(manifest.classes), "params": params,
        "counts": counts, "clips": sum(c["clips"] for c in counts.values()),
        "inputs": manifest.num_inputs, "written_videos": written_videos, "rejects": len(rejects),
        "rejects_by_reason": by_reason, "excluded_by_protocol": manifest.excluded,
        "shards": [{"file": f"{_s.SHARD_DIR}/{m['shard']}.parquet", "split": m["split"], "clips": m["clips"],
                    "videos": m["written_videos"], "bytes": m["bytes"], "content": _shard_content(p, m)}
                   for p, m in zip(plans, metas)],
        "frames_shape": "(num_frames, height, width, 3) uint8, per row",
    }
    ok = written_videos + len(rejects) == manifest.num_inputs
    storage.write_text(storage.join(out, _s.REJECTS_FILE), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    total_secs = time.perf_counter() - t_start
    summary = {
        "out": out, "dataset": manifest.dataset, "fingerprint": fingerprint, "inputs": manifest.num_inputs,
        "written_videos": written_videos, "rejected": len(rejects), "accounting_ok": ok,
        "clips": info["clips"], "counts": counts, "rejects_by_reason": by_reason,
        "shards": len(plans), "shards_skipped": skipped, "videos_decoded_this_run": n_videos_todo,
        "clips_this_run": clips_this_run, "shard_bytes": shard_bytes, "source_bytes": src_bytes,
        "decode_seconds": round(run_secs, 3), "total_seconds": round(total_secs, 3),
        "clips_per_second": round(clips_this_run / run_secs, 2) if run_secs > 0 and clips_this_run else 0.0,
    }
    storage.write_json(storage.join(out, _s.SUMMARY_JSON), summary)
    if not ok:  # cannot happen unless there is a bug; never hide it, and never commit such an ingest
        raise RuntimeError(f"accounting mismatch: written {written_videos} + rejected {len(rejects)} "
                           f"!= inputs {manifest.num_inputs}; {out} is left uncommitted (no {_s.DATASET_JSON})")
    # temp files of tasks that died mid-write and were retried by Ray (the run still succeeded)
    _s.remove_stale_tmp(shard_dir)
    _s.remove_stale_tmp(meta_dir)
    if written_videos == 0:  # nothing to train on: never a finished ingest that other commands read as one
        storage.remove(storage.join(out, _s.DATASET_JSON))  # (one committed by a version that did)
        if log:
            log(format_summary(summary))
        raise NothingWrittenError(f"0 videos written: all {manifest.num_inputs} input(s) were rejected "
                                  f"(reasons in {storage.join(out, _s.REJECTS_FILE)})")
    storage.write_json(storage.join(out, _s.DATASET_JSON), info)
    if log:
        log(format_summary(summary))
    return summary


class _OpenShard:
    """A shard being written: videos are written in their planned order (so the bytes are
    deterministic) although results arrive in completion order; results that arrive early
    wait in ``pending`` (only out-of-order results are held in memory)."""

    def __init__(self, plan: _ShardPlan, path: str, cfg: IngestConfig):
        self.plan = plan
        self.order = plan.video_ids
        self.next = 0
        self.pending: Dict[str, pa.Table] = {}
        self.writer: Optional[_s.AtomicShardWriter] = None
        self.path = path
        self.cfg = cfg
        self.rejects: List[Dict] = []
        self.clips = 0
        self.written = 0

    def add(self, video_id: str, rows: pa.Table) -> None:
        self.pending[video_id] = rows
        while self.next < len(self.order) and self.order[self.next] in self.pending:
            self._emit(self.pending.pop(self.order[self.next]))
            self.next += 1

    @property
    def complete(self) -> bool:
        return self.next == len(self.order)

    def _emit(self, t: pa.Table) -> None:
        if self.writer is None:
            self.writer = _s.AtomicShardWriter(self.path, self.cfg.row_group_clips, self.cfg.compression)
        status = t.column("_status").to_pylist()
        if status[0] != "ok":
            r = {k: t.column(k)[0].as_py() for k in ("path", "video_id", "split")}
            r.update(reason=status[0], detail=t.column("_detail")[0].as_py(), stage="decode")
            self.rejects.append(r)
            return
        self.writer.write(t)
        self.clips += t.num_rows
        self.written += 1

    def publish(self, meta_dir: str) -> None:
        if self.writer is None:
            self.writer = _s.AtomicShardWriter(self.path, self.cfg.row_group_clips, self.cfg.compression)
        _commit_shard(self.writer, self.plan.name, self.plan.split, len(self.order), self.written, self.clips,
                      self.rejects, meta_dir, held_shard(self.cfg.test_hooks))

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _commit_shard(writer: "_s.AtomicShardWriter", name: str, split: str, videos: int, written: int, clips: int,
                  rejects: List[Dict], meta_dir: str, hold: str = "") -> int:
    """Close a shard's writer and commit the shard; returns its size in bytes.

    Local: sidecar first, then the shard (renamed into place); object store: the shard was
    uploaded by close(), the sidecar written after it commits it."""
    nbytes = writer.close()
    if hold and hold == name:
        time.sleep(3600)  # test hook: the shard is uploaded but not committed (killed here)
    meta = {"shard": name, "split": split, "videos": videos, "written_videos": written, "clips": clips,
            "bytes": nbytes, "rejects": rejects}
    storage.write_json(storage.join(meta_dir, name + ".json"), meta)
    writer.publish()
    return nbytes


# test hook (with test_hooks): hold the shard's writer after its upload, before its sidecar
HOLD_UNCOMMITTED_ENV = "DVFL_TEST_HOLD_UNCOMMITTED"


def held_shard(test_hooks: bool) -> str:
    """The shard the test hook holds, read where the command runs: a task's worker process need not
    see the command's environment (the hold then never came, and the test raced the ingest's end)."""
    return os.environ.get(HOLD_UNCOMMITTED_ENV, "") if test_hooks else ""


# test hook (with test_hooks): the decode tasks' files may grow to this many bytes (a disk full)
FSIZE_LIMIT_ENV = "DVFL_TEST_FSIZE_LIMIT"


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Test hook: writes past ``limit`` bytes fail with EFBIG in this process while inside."""
    if not limit:
        yield
        return
    import resource
    import signal

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed worker
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def _anything_committed(out: str, shard_dir: str, meta_dir: str) -> bool:
    """Whether ``out`` holds a finished ingest or a shard (committed or not): what a new plan must not replace."""
    return (storage.exists(storage.join(out, _s.DATASET_JSON)) or bool(storage.listdir(shard_dir, ".parquet"))
            or bool(storage.listdir(meta_dir, ".json")))


def _committed_no_clip(out: str, shard_dir: str, meta_dir: str) -> bool:
    """Whether ``out``'s ingest is unfinished, committed shards, and each of its shards is committed
    with no clip (every input rejected): nothing a new plan would lose but its rejects."""
    sidecars = storage.listdir(meta_dir, ".json")
    committed = {storage.basename(f)[:-len(".json")] for f in sidecars}
    shards = {storage.basename(f)[:-len(".parquet")] for f in storage.listdir(shard_dir, ".parquet")}
    if storage.exists(storage.join(out, _s.DATASET_JSON)) or not sidecars or not shards <= committed:
        return False
    try:
        return all(storage.read_json(f).get("clips") == 0 for f in sidecars)
    except (OSError, ValueError, AttributeError):
        return False


def _delete_ingest(out: str, shard_dir: str, doing: str) -> None:
    """Delete ``out``'s ingest, the commit marker first (a delete cut short must not leave it vouching
    for a part); refused, deleting nothing, when the shards folder holds files no ingest writes."""
    foreign = _not_written_by_ingest(shard_dir)
    if foreign:
        raise ValueError(f"{doing} {shard_dir}, which holds files no ingest writes ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): nothing was deleted; move them or use a new --out")
    for f in (_s.DATASET_JSON, _s.PLAN_JSON, _s.REJECTS_FILE, _s.SUMMARY_JSON):
        storage.remove(storage.join(out, f))
    storage.remove_tree(shard_dir)


def _not_written_by_ingest(shard_dir: str) -> list[str]:
    """Files in a shards folder other than shards, their sidecars and hidden files (temporaries,
    a desktop's index files): ``--fresh`` deletes the folder whole, so it must hold only ours."""
    ours = re.compile(rf"[^/]+\.parquet|{re.escape(_s.META_DIR)}/[^/]+\.json|(.*/)?\.[^/]*")
    return [f for f in storage.files_under(shard_dir) if not ours.fullmatch(f)]


PARTS_DIR = "_parts"  # pieces of shards cut into several decode tasks, until merged (not read by anyone else)
TASK_OUTPUT_BYTES = 256 << 20  # decoded clips one decode task may hold before returning them
ROW_GROUP_BYTES = 512 << 20    # decoded clips a shard writer may buffer for one row group (128 clips up to short side 362)
SOURCE_SIZE_SAMPLE = 64        # inputs whose size sets a source-size ingest's estimate


def _largest_source_pixels(entries: List[VideoEntry]) -> int:
    """Pixels of the largest frame among (up to) ``SOURCE_SIZE_SAMPLE`` inputs spread over the
    sorted ids (container headers: cheap for MP4/MOV, a PyAV probe otherwise); 256 x 341 if none
    can be read (the decode rejects those)."""
    ids = sorted(range(len(entries)), key=lambda i: entries[i].video_id)
    step = max(1, len(ids) // SOURCE_SIZE_SAMPLE)
    sizes = [_checked_coded_size(entries[i].path) for i in ids[::step][:SOURCE_SIZE_SAMPLE]]
    return max([h * w for h, w in filter(None, sizes)] or [256 * 341])


def _checked_coded_size(path: str):
    """:func:`decode.coded_size` of a file whose magic bytes name a supported container, else None:
    here in the driver, before the decode child's checks and time limit, FFmpeg opened a listed
    playlist's segments outside the root and hung on a FIFO."""
    try:
        kind, problem = _d.probe_container(path)
    except OSError:
        return None
    # (a cut file is decoded up to its cut: an input, its size counts)
    return _d.coded_size(path) if problem in (None, _d.TRUNCATED) and kind in _d.CONTAINERS else None


def plan_decode_tasks(sizes: List[int], workers: int, task_mb: float, max_videos: int,
                      groups: Optional[List[int]] = None) -> List[int]:
    """Split videos of ``sizes`` bytes (in order) into decode tasks; returns the videos per task.

    Ray Data leaves a gap between the end of one task and the start of the next, so tasks hold
    ~``task_mb`` of source video, a second or two of decoding (docs/ingest.md). Towards the end tasks shrink (guided
    self-scheduling: at most 1/(2 x workers) of what is left, down to ``task_mb / 4``) so that
    the last tasks finish together instead of one long task running alone on one core.
    ``max_videos`` bounds a task's output. With ``groups`` (consecutive run lengths summing to
    ``len(sizes)``: the shards), no task crosses a group boundary.
    """
    cap, floor = task_mb * 2 ** 20, task_mb * 2 ** 20 / 4
    left = float(sum(sizes))
    ends = set(np.cumsum(groups).tolist()) if groups else set()
    out: List[int] = []
    i = 0
    while i < len(sizes):
        target = max(min(cap, left / (2 * max(1, workers))), floor)
        j, acc = i, 0
        while j < len(sizes) and j - i < max_videos and (j == i or (acc + sizes[j] <= target and j not in ends)):
            acc += sizes[j]
            j += 1
        out.append(j - i)
        left -= acc
        i = j
    return out


# ---------------------------------------------------------------------------------------
# decode tasks that write their own shards (the default writer)

_CLIP_ROW_SCHEMA = pa.schema([f for f in _s.CLIP_SCHEMA if f.name != "frames"])


def _decode_process(max_jobs: int, max_rss_mb: float):
    """This worker process's decode child (started once, reused across tasks and ingest runs)."""
    global _PROC
    from .worker import DecodeProcess

    if _PROC is None:
        _PROC = DecodeProcess()
    _PROC.max_jobs, _PROC.max_rss_mb = max_jobs, max_rss_mb
    return _PROC


def _video_table(job: Dict[str, Any], res: Dict[str, Any]) -> Tuple[Optional[pa.Table], Optional[Dict]]:
    """One decoded video as clip rows (:data:`CLIP_SCHEMA` columns), or its reject record."""
    if not res.get("ok"):
        return None, {"path": job["path"], "video_id": job["video_id"], "split": job["split"],
                      "reason": res.get("reason", "decoder_error"), "detail": res.get("detail", ""), "stage": "decode"}
    label = None if job["label"] < 0 else job["label"]
    rows = [{"clip_id": make_clip_id(job["video_id"], view, k), "video_id": job["video_id"], "path": job["path"],
             "label": label, "class_name": job["class_name"] or None, "split": job["split"], "view": view,
             "view_index": k, "frame_indices": idx.tolist(), "src_fps": res["src_fps"],
             "src_num_frames": res["src_num_frames"], "num_frames": clip.shape[0], "height": res["height"],
             "width": res["width"]} for view, k, idx, clip in res["views"]]
    t = pa.Table.from_pylist(rows, schema=_CLIP_ROW_SCHEMA)
    return t.append_column(_s.CLIP_SCHEMA.field("frames"), binary_column([v[3] for v in res["views"]])), None


def _ingest_piece(piece: Dict[str, Any], opts: Dict[str, Any]) -> Dict[str, Any]:
    """Ray task: decode one piece's videos in order and write them to ``piece["dest"]``: the shard
    itself, committed here, when the piece is the whole shard; else a part file for _merge_parts.
    Returns counts and rejects only (the clips never travel back to the driver)."""
    try:
        with _file_size_limit(opts.get("fsize_limit", 0)):
            return _write_piece(piece, opts)
    finally:
        _release_arrow_memory()


def decode_tasks_for_cluster(log) -> int:
    """One decode task per CPU the cluster has now; a joined cluster is told how to ask for more
    (an autoscaling one may start with a CPU-less head: one task, never more as nodes came)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    # joined: by RAY_ADDRESS, or by ingest --address (a cluster of several nodes)
    joined = joined_address() is not None or len(ray.nodes()) > 1
    if joined and log:
        log(f"[ingest] {max(1, cpus)} decode task(s) at a time: the cluster's {cpus} CPUs now (an autoscaling "
            "cluster: --decode-tasks, or data.decode_tasks in a run's config, for the CPUs it may add)")
    return max(1, cpus)


class NothingWrittenError(ValueError):
    """Every input was rejected: the ingest is left uncommitted (no dataset.json), its rejects kept."""


class VideoNotOnNodeError(RuntimeError):
    """A video the ingest read when it listed the inputs that a decode task finds no file at."""


def raise_if_not_on_node(job: Dict[str, Any], res: Dict[str, Any]) -> None:
    """A decode task's ``missing`` for a file the driver read moments ago is this node's problem, not
    the video's: a reject would be final (a rerun skips the committed shard), so the task fails."""
    if res.get("reason") == _d.MISSING or (res.get("reason") == _d.UNREADABLE and res.get("denied")):
        import socket

        what = ("finds no such file (the dataset not mounted on every node, or the file deleted meanwhile)"
                if res["reason"] == _d.MISSING else f"may not read it ({res.get('detail')})")
        raise VideoNotOnNodeError(
            f"{job['abspath']} was read when the ingest listed its inputs, but the decode task on "
            f"{socket.gethostname()} {what}: finished shards are kept; run the ingest again once every node "
            "reads the files (a file deleted for good changes the inputs: the rerun then needs --fresh)")


def _write_piece(piece: Dict[str, Any], opts: Dict[str, Any]) -> Dict[str, Any]:
    proc = _decode_process(opts["max_jobs"], opts["max_rss_mb"])
    # a part file is read back once by its merge: compressing it costs CPU twice for nothing
    # (benchmarks/input_pipeline.py --section breakdown)
    codec = opts["compression"] if piece["whole"] else "none"
    writer = _s.AtomicShardWriter(piece["dest"], opts["row_group_clips"], codec)
    written = clips = 0
    rejects: List[Dict] = []
    try:
        for job in piece["jobs"]:
            res = proc.run(dict(opts["params"], path=job["abspath"], root=job["root"], video_id=job["video_id"],
                                split=job["split"]), opts["timeout"])
            raise_if_not_on_node(job, res)
            table, reject = _video_table(job, res)
            if table is None:
                rejects.append(reject)
                continue
            writer.write(table)
            written += 1
            clips += table.num_rows
        if piece["whole"]:
            nbytes = _commit_shard(writer, piece["shard"], piece["split"], len(piece["jobs"]), written, clips,
                                   rejects, opts["meta_dir"], opts.get("hold", ""))
        else:
            nbytes = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {"shard": piece["shard"], "index": piece["index"], "videos": len(piece["jobs"]), "written": written,
            "clips": clips, "rejects": rejects, "bytes": nbytes}


def _merge_parts(shard: Dict[str, Any], parts: List[Dict[str, Any]], opts: Dict[str, Any]) -> Dict[str, Any]:
    """Ray task: concatenate a shard's part files, in piece order, into the shard and commit it.
    The bytes equal those of one writer fed the same rows (fixed-size row groups)."""
    try:
        with _file_size_limit(opts.get("fsize_limit", 0)):
            return _write_merged(shard, parts, opts)
    finally:
        _release_arrow_memory()


def _release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps after a task back to the OS: a pooled decode worker
    otherwise holds its largest task's peak (+70 MiB after a merge) while it decodes."""
    pa.default_memory_pool().release_unused()


def _write_merged(shard: Dict[str, Any], parts: List[Dict[str, Any]], opts: Dict[str, Any]) -> Dict[str, Any]:
    meta = storage.join(opts["meta_dir"], shard["shard"] + ".json")
    if storage.isfile(meta) and storage.isfile(shard["dest"]):
        # committed by an attempt Ray retries (its worker died after the commit, while or after it
        # removed the parts): done, not a FileNotFoundError failing the whole ingest
        for part in parts:
            storage.remove(part["dest"])
        return {"shard": shard["shard"], "bytes": storage.read_json(meta)["bytes"]}
    writer = _s.AtomicShardWriter(shard["dest"], opts["row_group_clips"], opts["compression"])
    try:
        for part in parts:
            # one row group at a time and no read-ahead (pre_buffer reads several at once): Arrow's
            # peak memory 20 MB instead of 50 per 8 MB row group (docs/ingest.md)
            pf = _s.parquet_file(part["dest"], pre_buffer=False)
            if pf.metadata.num_rows != part["clips"]:  # not the file this run's task wrote: never merged
                raise RuntimeError(f"part file {part['dest']} holds {pf.metadata.num_rows} clips, but its decode "
                                   f"task wrote {part['clips']}; run the ingest again")
            for i in range(pf.num_row_groups):
                writer.write(pf.read_row_group(i, use_threads=False))
        rejects = [r for part in parts for r in part["rejects"]]
        nbytes = _commit_shard(writer, shard["shard"], shard["split"], sum(p["videos"] for p in parts),
                               sum(p["written"] for p in parts), sum(p["clips"] for p in parts), rejects,
                               opts["meta_dir"], opts.get("hold", ""))
    except BaseException:
        writer.abort()
        raise
    for part in parts:
        storage.remove(part["dest"])
    return {"shard": shard["shard"], "bytes": nbytes}


def plan_pieces(jobs: List[Dict], todo: List[_ShardPlan], workers: int, task_mb: float, max_videos: int,
                shard_dir: str, parts_dir: str) -> List[Dict[str, Any]]:
    """The decode tasks of ``jobs`` (in shard order), none across a shard boundary; each names
    where it writes: the shard itself when it is the shard's only piece, else a part file."""
    sizes = plan_decode_tasks([j["bytes"] for j in jobs], workers, task_mb, max_videos,
                              groups=[len(p.video_ids) for p in todo])
    pieces, start = [], 0
    for n in sizes:
        chunk = jobs[start:start + n]
        start += n
        if pieces and pieces[-1]["shard"] == chunk[0]["shard"]:
            pieces[-1]["_more"].append(chunk)
        else:
            pieces.append({"shard": chunk[0]["shard"], "split": chunk[0]["split"], "_more": [chunk]})
    out = []
    for sh in pieces:
        chunks = sh.pop("_more")
        for k, chunk in enumerate(chunks):
            whole = len(chunks) == 1
            dest = (storage.join(shard_dir, sh["shard"] + ".parquet") if whole
                    else storage.join(parts_dir, f"{sh['shard']}.{k:05d}.parquet"))
            out.append(dict(sh, index=k, count=len(chunks), whole=whole, dest=dest, jobs=chunk))
    return out


def _run_tasks(jobs: List[Dict], todo: List[_ShardPlan], cfg: IngestConfig, max_videos: int, shard_dir: str,
               meta_dir: str, parts_dir: str, progress: _Progress, log=None) -> int:
    """Keep ``workers`` decode (and merge) tasks in flight, in plan order; merges go first."""
    import ray

    workers = cfg.workers or decode_tasks_for_cluster(log)
    pieces = plan_pieces(jobs, todo, workers, cfg.task_mb, max_videos, shard_dir, parts_dir)
    opts = {"timeout": cfg.timeout_per_file, "max_jobs": cfg.max_jobs_per_child, "max_rss_mb": cfg.max_child_rss_mb,
            "row_group_clips": cfg.row_group_clips, "compression": cfg.compression, "meta_dir": meta_dir,
            "params": {"frames": cfg.frames, "clips_per_video": cfg.clips_per_video, "eval_clips": cfg.eval_clips,
                       "seed": cfg.seed, "short_side": cfg.short_side, "min_frames": cfg.min_frames or cfg.frames,
                       "test_hooks": bool(cfg.test_hooks)},
            # test hook: a full disk where the decode tasks write (they may run in another process tree)
            "fsize_limit": int(os.environ.get(FSIZE_LIMIT_ENV, 0)) if cfg.test_hooks else 0,
            "hold": held_shard(cfg.test_hooks)}
    # retried when their worker or node dies: a task writes the same bytes under the same names again
    piece_task = ray.remote(_ingest_piece).options(num_cpus=1, max_retries=3)
    merge_task = ray.remote(_merge_parts).options(num_cpus=1, max_retries=3)
    opts_ref = ray.put(opts)
    queue = pieces[::-1]                 # pop() from the end = plan order
    del pieces
    merges: List[Tuple[Dict, List[Dict]]] = []
    done_parts: Dict[str, List[Dict]] = {}
    inflight: Dict[Any, str] = {}
    total_clips = 0
    try:
        while queue or merges or inflight:
            while len(inflight) < workers and (merges or queue):
                if merges:
                    sh, parts = merges.pop(0)
                    inflight[merge_task.remote(sh, parts, opts_ref)] = "merge"
                else:
                    p = queue.pop()
                    inflight[piece_task.remote(p, opts_ref)] = "piece"
                    if not p["whole"]:
                        done_parts.setdefault(p["shard"], {"split": p["split"], "parts": [None] * p["count"]})
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                kind = inflight.pop(ref)
                r = ray.get(ref)
                if kind == "merge":
                    continue
                total_clips += r["clips"]
                progress.update(r["videos"], r["clips"], len(r["rejects"]))
                sh = done_parts.get(r["shard"])
                if sh is not None:
                    sh["parts"][r["index"]] = r
                    if all(x is not None for x in sh["parts"]):
                        del done_parts[r["shard"]]
                        parts = [dict(x, dest=storage.join(parts_dir, f"{r['shard']}.{x['index']:05d}.parquet"))
                                 for x in sh["parts"]]
                        merges.append(({"shard": r["shard"], "split": sh["split"],
                                        "dest": storage.join(shard_dir, r["shard"] + ".parquet")}, parts))
    except KeyboardInterrupt:
        # Ctrl+C or SIGTERM: the tasks end with this driver's job (Ray kills a finished job's workers);
        # ray.cancel raced with their replies there (a Ray check failure: a stack dump and exit 1).
        # What they leave, the next run removes.
        raise
    except BaseException:
        _stop_tasks(list(inflight))
        raise
    progress.update(0, 0, 0, force=True)
    return total_clips


def _stop_tasks(refs: List[Any], grace_s: float = 20.0) -> None:
    """On an error: interrupt the tasks still writing, so that each aborts its writer and leaves no
    temporary file; a task that does not stop within ``grace_s`` is killed (the next
    run removes what it left)."""
    import ray

    def cancel(refs, force):
        for ref in refs:
            try:
                ray.cancel(ref, force=force)
            except Exception:  # noqa: BLE001  (best effort: the original error is what matters)
                pass

    if not refs:
        return
    print(f"[ingest] stopping {len(refs)} decode task(s) (up to {grace_s:.0f} s)", flush=True)
    cancel(refs, False)
    try:
        _, running = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    except Exception:  # noqa: BLE001
        running = refs
    cancel(running, True)


def _run_pipeline(jobs: List[Dict], todo: List[_ShardPlan], cfg: IngestConfig, max_videos: int, shard_dir: str,
                  meta_dir: str, progress: _Progress) -> int:
    import ray
    import ray.data
    from ray.data import TaskPoolStrategy

    workers = cfg.workers or decode_tasks_for_cluster(None)
    plan = plan_decode_tasks([j["bytes"] for j in jobs], workers, cfg.task_mb, max_videos)
    workers = max(1, min(workers, len(plan)))
    tasks, start = [], 0
    for n in plan:  # one row (and one block) per task; the jobs travel as JSON text
        tasks.append({"jobs": json.dumps(jobs[start:start + n])})
        start += n
    params = {"frames": cfg.frames, "clips_per_video": cfg.clips_per_video, "eval_clips": cfg.eval_clips,
              "seed": cfg.seed, "short_side": cfg.short_side, "min_frames": cfg.min_frames or cfg.frames,
              "test_hooks": bool(cfg.test_hooks)}
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    # Results are consumed in completion order (a slow or hanging file must not hold back
    # the others); _OpenShard restores the planned order per shard.
    ds.context.execution_options.preserve_order = False
    # Per-operator reservations run one decode task alone until its output size is known; the
    # decode is the only operator and the driver drains its outputs as they come (docs/ingest.md).
    ds.context.op_resource_reservation_enabled = False
    ds.context.enable_progress_bars = bool(cfg.ray_progress)
    ds.context.print_on_execution_start = bool(cfg.ray_progress)
    ds = ds.map_batches(_decode_batch, batch_size=1, batch_format="pyarrow",
                        compute=TaskPoolStrategy(size=workers), num_cpus=1,
                        fn_kwargs={"timeout": cfg.timeout_per_file, "max_jobs": cfg.max_jobs_per_child,
                                   "max_rss_mb": cfg.max_child_rss_mb,
                                   "params": params})
    plan_of = {vid: p for p in todo for vid in p.video_ids}
    open_shards: Dict[str, _OpenShard] = {}
    partial: Dict[str, List[pa.Table]] = {}  # a video's rows split across output blocks (rare)
    total_clips = 0
    try:
        # prefetch_batches=0: with prefetching, blocks that finished behind a slow one were held back
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            if batch.num_rows == 0:
                continue
            vids = batch.column("video_id").to_pylist()
            start = 0
            n_videos = n_clips = n_bad = 0
            nrows = batch.column("_nrows").to_pylist()
            while start < batch.num_rows:  # rows of one video are contiguous
                end = start + 1
                while end < batch.num_rows and vids[end] == vids[start]:
                    end += 1
                rows = batch.slice(start, end - start)
                vid = vids[start]
                if vid in partial or rows.num_rows < nrows[start]:
                    partial.setdefault(vid, []).append(rows)
                    rows = pa.concat_tables(partial[vid])
                    if rows.num_rows < nrows[start]:
                        start = end
                        continue
                    del partial[vid]
                plan = plan_of[vids[start]]
                sh = open_shards.get(plan.name)
                if sh is None:
                    sh = open_shards[plan.name] = _OpenShard(plan, storage.join(shard_dir, plan.name + ".parquet"),
                                                             cfg)
                ok = rows.column("_status")[0].as_py() == "ok"
                sh.add(vids[start], rows)
                n_videos += 1
                n_clips += rows.num_rows if ok else 0
                n_bad += 0 if ok else 1
                if sh.complete:
                    sh.publish(meta_dir)
                    del open_shards[plan.name]
                start = end
            total_clips += n_clips
            progress.update(n_videos, n_clips, n_bad)
        if open_shards:
            raise RuntimeError(f"pipeline ended with incomplete shards: {sorted(open_shards)}")
    except BaseException:
        for sh in open_shards.values():
            sh.abort()
        raise
    progress.update(0, 0, 0, force=True)
    return total_clips


RETRYABLE_REJECTS = (_d.TIMEOUT, _d.DECODER_CRASH, _d.DECODER_KILLED)  # the machine's state, not the file's


def format_summary(s: Dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v['clips']}" for k, v in sorted(s["counts"].items(), key=lambda kv: SPLIT_ORDER.get(kv[0], 9)))
    reasons = ", ".join(f"{k} {v}" for k, v in s["rejects_by_reason"].items()) or "none"
    mb = lambda b: f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
    lines = [
        f"== ingest summary: {s['dataset']} -> {s['out']}",
        f"inputs        {s['inputs']} videos",
        f"written       {s['written_videos']} videos -> {s['clips']} clips ({counts})",
        f"rejected      {s['rejected']} ({reasons})",
        f"accounting    written {s['written_videos']} + rejected {s['rejected']} = {s['written_videos'] + s['rejected']}"
        f" {'==' if s['accounting_ok'] else '!='} inputs {s['inputs']}",
        f"shards        {s['shards']} files ({s['shards_skipped']} already done), {mb(s['shard_bytes'])} on disk; "
        f"{mb(s['source_bytes'])} of source video",
        f"this run      {s['videos_decoded_this_run']} videos, {s['clips_this_run']} clips in "
        f"{s['decode_seconds']:.1f} s = {s['clips_per_second']:.1f} clips/s (total {s['total_seconds']:.1f} s)",
        f"fingerprint   {s['fingerprint']}",
    ]
    retryable = {k: v for k, v in s["rejects_by_reason"].items() if k in RETRYABLE_REJECTS}
    if retryable:  # a finished shard keeps its rejects: a rerun with a larger time-out decodes nothing again
        lines.append(f"retry         {sum(retryable.values())} rejected as {', '.join(retryable)} may decode on a "
                     "quieter machine or with more time; finished shards keep them rejected: run `dvfl ingest` "
                     f"again with --out {s['out']} --fresh and a larger --timeout-per-file to retry them")
    return "\n".join(lines)
