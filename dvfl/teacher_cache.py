"""The teacher's logits, computed once per clip view and cached on disk.

A cached logit is only valid for the exact input the teacher saw, so the cache is
content-addressed: its fingerprint hashes the teacher (architecture + weights), the ingest
fingerprint of the clip shards (videos, frame indices, preprocessing) and the view spec
(crop size, crop positions, flips, normalisation). Training refuses a cache whose fingerprint
parts do not match the shards or the teacher it is given.

Logits are stored raw (before any temperature), fp16 by default, one Parquet file per clip
shard under ``logits/``, keyed by ``(clip_id, view)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch

from dvfl.artifacts import load_model_for, other_class_list
from dvfl.models import build_model
from dvfl import storage
from dvfl.allocator import keep_freed_memory
from dvfl.host import usable_cpus
from dvfl.data.shards import (ClipReadError, atomic_write_table, corrupt_shard_error, find_corrupt_shards,
                              SPLITS, load_dataset_info, parquet_file, read_table, read_tables, remove_stale_tmp,
                              shard_paths)
from dvfl.data.views import IMAGENET_MEAN, IMAGENET_STD, View, batch_arrays, make_clip_batch, normalize
from dvfl.data.sampling import TRAIN_LIKE_SPLITS

CACHE_JSON = "cache.json"
BUILD_JSON = "_build.json"
LOGITS_DIR = "logits"
CACHE_FORMAT = "dvfl-teacher-logits-v1"
FSIZE_TEST_ENV = "DVFL_TEST_CACHE_FSIZE_LIMIT"  # test hook: RLIMIT_FSIZE of the cache writers
DIE_ONCE_TEST_ENV = "DVFL_TEST_CACHE_DIE_ONCE"  # test hook: a marker file; the first writer to miss it makes it and dies
WRITER_RESTARTS = 3  # on a cluster (several nodes, or a 0-CPU head), a cache writer lost with its node is restarted
LOGIT_SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("view", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.int32(), nullable=True),
    pa.field("logits", pa.binary(), nullable=False),  # raw logits, little-endian `dtype`
])
DTYPES = {"float16": np.float16, "float32": np.float32}
# A recomputed fp32 logit must match the stored one within this (fp16 keeps ~3 significant
# digits; CPU kernels differ by ~1e-5 across batch sizes).
VERIFY_TOLERANCE = {"float16": (1e-3, 2e-3), "float32": (1e-4, 1e-4)}  # (rtol, atol)


class CacheMismatchError(RuntimeError):
    """The cache was built for other clips, another teacher or other views."""


class CacheVerificationError(CacheMismatchError):
    """Cached logits that differ from a direct teacher forward: a failure of the build (exit 1), not
    of its inputs."""


class NonFiniteLogits(CacheVerificationError):
    """Teacher logits that are not finite as computed (a broken teacher) or once stored (float16
    overflows above 65504): written, they would turn training's gradients NaN."""


class CacheOfAnotherBuild(CacheMismatchError):
    """The output folder holds a cache of another teacher, other clips or other views
    (``differences``: what differs, in words, when its record says)."""

    def __init__(self, message: str, differences: list[str] = ()):
        super().__init__(message)
        self.differences = list(differences)


def read_record(path: str, what: str = "a teacher cache's record") -> dict:
    """``cache.json`` / ``_build.json``: a file cut short or edited by hand is named, not a JSON
    or KeyError traceback."""
    try:
        record = storage.read_json(path)
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
            raise ValueError("no fingerprint in it")
    except ValueError as exc:
        raise CacheMismatchError(f"{path} is not readable as {what} ({exc}): delete it (the cache is then "
                                 "rebuilt) or rebuild with pipelines/cache_teacher.py --fresh") from None
    return record


def differences(record: dict, teacher_spec: dict, dataset_fingerprint: str, vspec: dict, dtype: str) -> list[str]:
    """What a finished cache's record says it was built from, against what is asked now."""
    out, built = [], record.get("teacher") or {}
    now = teacher_identity(teacher_spec)
    if built and built.get("weights") != now["weights"]:
        out.append(f"teacher weights {built.get('weights')} then, {now['weights']} now (a retrained teacher?)")
    if built and (built.get("name"), built.get("kwargs")) != (now["name"], now["kwargs"]):
        out.append(f"teacher {built.get('name')} {built.get('kwargs')} then, {now['name']} {now['kwargs']} now")
    if record.get("dataset_fingerprint") not in (None, dataset_fingerprint):
        out.append(f"clips {record['dataset_fingerprint']} then, {dataset_fingerprint} now (re-ingested?)")
    then = record.get("view_spec") or {}
    if then.get("crop_size") not in (None, vspec["crop_size"]):
        out.append(f"crop size {then['crop_size']} then, {vspec['crop_size']} now")
    if then.get("views") is not None and sorted(then["views"]) != sorted(vspec["views"]):
        out.append(f"views {sorted(then['views'])} then, {sorted(vspec['views'])} now")
    if record.get("dtype") not in (None, dtype):
        out.append(f"logits stored as {record['dtype']} then, {dtype} now")
    return out


def view_spec(crop_size: int, views) -> dict:
    # sorted: the same views in another order are the same cache, and training draws from this list
    names = sorted(View.parse(v).name if isinstance(v, str) else v.name for v in views)
    if any(View.parse(n).crop == "random" for n in names):
        raise ValueError("a cached view must be deterministic: 'random' crops cannot be cached")
    if len(set(names)) != len(names):  # ("center" and "center+" are one view)
        raise ValueError(f"views {list(views)} name a view twice; each view's logits are cached once")
    return {"crop_size": int(crop_size), "views": names,
            "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def teacher_identity(spec: dict) -> dict:
    return {"name": spec["name"], "kwargs": spec["kwargs"], "weights": spec["weights_fingerprint"]}


def cache_fingerprint(teacher_spec: dict, dataset_fingerprint: str, vspec: dict, dtype: str) -> str:
    # the same views in another order are the same logits
    vspec = dict(vspec, views=sorted(vspec["views"]))
    return _digest({"format": CACHE_FORMAT, "teacher": teacher_identity(teacher_spec),
                    "dataset": dataset_fingerprint, "views": vspec, "dtype": dtype})


def logits_array(column: pa.ChunkedArray, dtype, num_classes: int, where: str) -> np.ndarray:
    """The binary ``logits`` column as one (rows, classes) array, copied once from the Arrow buffers
    (a Python bytes object per row, then their join, peaked at ~4x the logits: ~12 GiB for Kinetics-700)."""
    width = num_classes * np.dtype(dtype).itemsize
    out = np.empty((len(column), num_classes), dtype)
    row = 0
    for chunk in column.chunks:
        n = len(chunk)
        if n == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64 if pa.types.is_large_binary(chunk.type) else np.int32,
                                n + 1, chunk.offset * (8 if pa.types.is_large_binary(chunk.type) else 4))
        if chunk.null_count or not np.all(np.diff(offsets) == width):
            raise CacheMismatchError(f"teacher cache {where} holds logits that are not {num_classes} classes of "
                                     f"{np.dtype(dtype).name}: delete it and build it again")
        rows = np.frombuffer(data_buf, np.uint8, n * width, int(offsets[0]))
        out[row:row + n] = rows.view(dtype).reshape(n, num_classes)
        row += n
    return out


class TeacherLogitCache:
    """A finished cache directory: metadata checks and ``(clip_id, view) -> logits`` lookups."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        meta = storage.join(self.directory, CACHE_JSON)
        if not storage.isfile(meta):
            raise CacheMismatchError(
                f"{self.directory} holds no finished teacher cache ({CACHE_JSON} missing); "
                "build it with pipelines/cache_teacher.py")
        self.info = read_record(meta)
        self._index: dict[tuple[str, str], int] | None = None
        self._logits: np.ndarray | None = None

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def views(self) -> list[str]:
        return self.info["view_spec"]["views"]

    def check(self, dataset_info: dict, *, teacher_spec: dict | None = None,
              crop_size: int | None = None, splits=None, views=None) -> None:
        """Refuse (raise :class:`CacheMismatchError`) unless this cache belongs to these clips,
        this teacher, this crop size and these views (``teacher.views``), covers every clip of
        ``splits``, and holds every logits file it needs with the expected rows (read from the
        Parquet footers: found now, not mid-epoch)."""
        problems = []
        if self.info["dataset_fingerprint"] != dataset_info["fingerprint"]:
            problems.append(f"built for clips {self.info['dataset_fingerprint']}, these shards are "
                            f"{dataset_info['fingerprint']} (re-ingested or different preprocessing)")
        if teacher_spec is not None and teacher_identity(teacher_spec) != self.info["teacher"]:
            problems.append(f"built with teacher weights {self.info['teacher']['weights']} "
                            f"({self.info['teacher']['name']}), given {teacher_spec['weights_fingerprint']} "
                            f"({teacher_spec['name']})")
        if crop_size is not None and crop_size != self.info["view_spec"]["crop_size"]:
            problems.append(f"built for crop size {self.info['view_spec']['crop_size']}, training uses {crop_size}")
        if views is not None:
            wanted = [View.parse(v).name if isinstance(v, str) else v.name for v in views]
            if set(wanted) != set(self.views):
                problems.append(f"built for views {self.views}, teacher.views is {wanted}")
        if splits is not None:
            missing = [s for s in splits if s not in self.info["splits"]]
            if missing:
                problems.append(f"does not cover split(s) {missing} (covers {sorted(self.info['splits'])})")
        if not problems:  # (the files of another dataset's cache are not worth listing)
            problems += self._missing_logits(dataset_info, splits)
        if problems:
            raise CacheMismatchError(
                f"stale or mismatched teacher cache {self.directory} (fingerprint {self.fingerprint}): "
                + "; ".join(problems) + ". Rebuild it with pipelines/cache_teacher.py.")

    def logits_files(self, dataset_info: dict, splits=None) -> tuple[list[str], dict[str, str]]:
        """The clip shards of ``splits`` (None: those the cache says it covers) without a logits file,
        and those whose logits file does not hold clips x views rows ({name: why})."""
        if splits is None:  # (a record without its splits: every shard)
            splits = self.info.get("splits")
        absent, short = [], {}
        for shard in dataset_info["shards"]:
            if splits is not None and shard["split"] not in splits:
                continue
            name = os.path.basename(shard["file"])
            path = storage.join(self.directory, LOGITS_DIR, name)
            if not storage.isfile(path):
                absent.append(name)
                continue
            try:
                rows = parquet_file(path).metadata.num_rows
            except (ValueError, OSError) as exc:  # a damaged footer: as good as missing (ArrowInvalid; an OSError
                # for garbled footer metadata). Not a bucket's time-out or throttling: no reason to delete a
                # good file and rebuild it
                if isinstance(exc, OSError) and storage.is_remote(path) and "deserialize thrift" not in str(exc):
                    raise
                short[name] = f"unreadable: {type(exc).__name__}"
                continue
            if rows != shard["clips"] * len(self.views):
                short[name] = f"{rows} rows, expected {shard['clips']} clips x {len(self.views)} views"
            elif not logits_of_shard(path, shard):
                short[name] = "logits of other clips (the shard was re-ingested with another shard layout)"
        return absent, short

    def _missing_logits(self, dataset_info: dict, splits) -> list[str]:
        """One logits file per clip shard of ``splits`` (None: the cache's own), with clips x views rows."""
        absent, short_files = self.logits_files(dataset_info, splits)
        short = [f"{name} ({why})" for name, why in short_files.items()]
        out = []
        if absent:
            out.append(f"{len(absent)} logits file(s) missing from {storage.join(self.directory, LOGITS_DIR)}: "
                       + ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else ""))
        if short:
            out.append("logits file(s) that do not fit their clip shards: " + ", ".join(short[:5])
                       + (" ..." if len(short) > 5 else ""))
        return out

    def load(self) -> None:
        if self._logits is not None:
            return
        table = pa.concat_tables(
            read_tables(storage.listdir(storage.join(self.directory, LOGITS_DIR), ".parquet"),
                        columns=["clip_id", "view", "logits"]))
        self._logits = logits_array(table.column("logits"), DTYPES[self.info["dtype"]], self.info["num_classes"],
                                    self.directory)
        self._index = {key: i for i, key in enumerate(zip(table.column("clip_id").to_pylist(),
                                                          table.column("view").to_pylist()))}
        if len(self._index) != table.num_rows:  # a key twice: which of its rows is meant?
            raise CacheMismatchError(f"teacher cache {self.directory} holds {table.num_rows - len(self._index)} "
                                     "(clip, view) row(s) twice; delete it and build it again")

    def packed(self) -> dict:
        """Everything a lookup needs, as one picklable object (shipped to Train workers through
        the object store, so workers need no shared filesystem)."""
        self.load()
        return {"directory": str(self.directory), "info": self.info, "keys": list(self._index),
                "rows": np.fromiter(self._index.values(), dtype=np.int64, count=len(self._index)),
                "logits": self._logits}

    @classmethod
    def from_packed(cls, packed: dict) -> "TeacherLogitCache":
        cache = cls.__new__(cls)
        cache.directory, cache.info, cache._logits = packed["directory"], packed["info"], packed["logits"]
        cache._index = dict(zip(map(tuple, packed["keys"]), packed["rows"].tolist()))
        return cache

    def __len__(self) -> int:
        self.load()
        return len(self._index)

    def lookup(self, clip_ids, views) -> torch.Tensor:
        """Raw fp32 logits ``(B, C)`` for these clips, each under its view name."""
        self.load()
        try:
            rows = [self._index[(c, v)] for c, v in zip(clip_ids, views)]
        except KeyError as exc:
            raise CacheMismatchError(f"clip view {exc.args[0]} is not in the teacher cache {self.directory}") from None
        return torch.from_numpy(self._logits[rows].astype(np.float32))


# ----------------------------------------------------------------------------- building
def _teacher_logits(model, arrays, crop_size: int, view: View, device) -> torch.Tensor:
    """fp32 on every device (computed once: exact logits are worth the GPU time); a bf16 forward
    differed from verify_cache's fp32 one by up to 0.09 on logits of ~12, so a GPU-built cache
    failed its own check (docs/training-speed.md)."""
    x = normalize(make_clip_batch(arrays, crop_size, [view] * len(arrays)), device)
    with torch.inference_mode():
        return model(x).float().cpu()


def _read_batches(src: str, batch_size: int, columns: list[str]):
    """The clip shard's record batches; a failed read is a :class:`ClipReadError` (the writer then
    tells a damaged shard from one that could not be read)."""
    try:
        yield from parquet_file(src).iter_batches(batch_size=batch_size, columns=columns)
    except (OSError, pa.ArrowException) as exc:  # damaged bytes, or no bytes: find_corrupt_shards tells
        raise ClipReadError(f"{type(exc).__name__}: {exc}") from exc


class ShardLogitWriter:
    """Ray Data actor: loads the teacher once, then turns whole clip shards into logit shards.

    One output file per input shard, written to a temporary name and renamed, so a killed
    build leaves only complete files and a rerun redoes just the missing shards.
    """

    def __init__(self, spec: dict, state_ref: list, vspec: dict, dtype: str, batch_size: int, threads: int,
                 use_gpu: bool = False, test_fsize_limit: int | None = None, keep_memory: bool = True,
                 test_die_once: str | None = None):
        import ray

        self.test_die_once = test_die_once
        if test_fsize_limit:  # test hook: a disk that fills up after this many bytes per file
            import resource
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG (an OSError)
            resource.setrlimit(resource.RLIMIT_FSIZE, (test_fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        # the GPU Ray gave this actor, if any: an actor with num_gpus=0 on a GPU node still sees the
        # node's GPUs (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone), and would use one uncounted
        on_gpu = use_gpu and bool(ray.get_gpu_ids())
        if on_gpu and not torch.cuda.is_available():  # (it ran on the CPU holding 0 CPUs: days, said nowhere)
            raise RuntimeError(f"Ray gave this cache writer GPU {ray.get_gpu_ids()} on node "
                               f"{ray.get_runtime_context().get_node_id()[:12]}, but torch cannot use it (a driver "
                               f"older than torch {torch.__version__}'s CUDA, or a CPU-only torch there)")
        if not on_gpu:
            torch.set_num_threads(max(1, threads))
            if keep_memory:  # each batch's activations reused, not faulted back in (docs/training-speed.md)
                keep_freed_memory()
        else:  # TF32 (cuDNN's default for convolutions) keeps 10 mantissa bits: not an fp32 forward
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.model = build_model(spec["name"], **spec["kwargs"])
        self.model.load_state_dict(ray.get(state_ref[0]), strict=True)
        self.model.eval().to(self.device)
        self.crop_size = vspec["crop_size"]
        self.views = [View.parse(v) for v in vspec["views"]]
        self.dtype = dtype
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        if self.test_die_once and not os.path.exists(self.test_die_once):  # test hook: its node lost mid-build
            open(self.test_die_once, "w").close()
            os._exit(1)
        stats = []
        for src, dst, content in zip(batch["shard"], batch["out"], batch["content"]):
            try:
                stats.append(json.dumps(self._process(src, dst, content or None)))
            except NonFiniteLogits as exc:
                stats.append(json.dumps({"shard": storage.basename(src), "nonfinite": str(exc)}))
            except (OSError, pa.ArrowException) as exc:  # reported to the driver as what it is, not as a UDF crash
                # a damaged clip shard is not a write error: a rerun would fail on it again
                corrupt = [f"{p} ({e})" for p, e in find_corrupt_shards([src])]
                stats.append(json.dumps({"shard": storage.basename(src), "source": src, "error": str(exc),
                                         "read": isinstance(exc, ClipReadError) and not corrupt, "corrupt": corrupt}))
        return {"stats": np.array(stats, dtype=object)}

    def _process(self, src: str, dst: str, content: str | None = None) -> dict:
        columns = ["clip_id", "label", "split", "frames", "num_frames", "height", "width"]
        parts, correct, labelled = [], {}, {}
        for record_batch in _read_batches(src, self.batch_size, columns):
            table = pa.Table.from_batches([record_batch])
            arrays, clip_ids, labels = batch_arrays(table)
            splits = table.column("split").to_pylist()
            for k, view in enumerate(self.views):
                logits = _teacher_logits(self.model, arrays, self.crop_size, view, self.device)
                if k == 0:  # accuracy on the first (canonical) view, labelled clips only
                    hit = (logits.argmax(1).numpy() == labels) & (labels >= 0)
                    for s, h, lab in zip(splits, hit, labels):
                        correct[s] = correct.get(s, 0) + int(h)
                        labelled[s] = labelled.get(s, 0) + int(lab >= 0)
                stored = _finite_logits(logits.numpy(), self.dtype, clip_ids, view.name)
                parts.append(pa.table({
                    "clip_id": clip_ids, "view": [view.name] * len(clip_ids), "split": splits,
                    "label": pa.array([None if v < 0 else int(v) for v in labels], pa.int32()),
                    "logits": [row.tobytes() for row in stored],
                }, schema=LOGIT_SCHEMA))
        table = pa.concat_tables(parts) if parts else LOGIT_SCHEMA.empty_table()
        stats = {"shard": storage.basename(src), "rows": table.num_rows, "correct": correct, "labelled": labelled,
                 "content": content}
        if storage.is_remote(dst):  # each object once; the sidecar, last, marks the shard done
            atomic_write_table(dst, table, compression="zstd")
            storage.write_json(_sidecar(dst), stats)
        else:  # the sidecar first: a parquet file without its sidecar never exists
            storage.write_json(_sidecar(dst), stats)
            atomic_write_table(dst, table, compression="zstd")
        return stats


def _finite_logits(logits: np.ndarray, dtype: str, clip_ids, view: str) -> np.ndarray:
    """``logits`` as stored, refused (:class:`NonFiniteLogits`, naming the first clip) unless finite."""
    with np.errstate(over="ignore"):
        stored = logits.astype(DTYPES[dtype])
    bad = ~np.isfinite(stored).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if np.isfinite(logits[i]).all():
            raise NonFiniteLogits(
                f"the teacher's logits of clip {clip_ids[i]} (view {view}) reach {np.abs(logits[i]).max():.4g}, "
                f"beyond {dtype}'s range (65504): cache them as float32 (teacher.cache_dtype: float32, "
                "or dvfl cache --dtype float32 --fresh)")
        raise NonFiniteLogits(f"the teacher's logits of clip {clip_ids[i]} (view {view}) are not finite: the "
                              "teacher's weights are broken (a diverged training?); retrain or replace it")
    return stored


def _sidecar(dst: str) -> str:
    return storage.join(storage.dirname(dst), "_" + storage.basename(dst) + ".json")


def _cache_files(logits_dir: str) -> list[str]:
    """The files of ``logits_dir`` a build wrote (never a system's or a tool's hidden files)."""
    return [p for p in storage.listdir(logits_dir, hidden=True) if _is_cache_file(storage.basename(p))]


# the names a build writes: a logits file (its clip shard's name), its sidecar, a temporary file of either
# (any other .parquet is a user's own: a build never deletes it)
_CACHE_FILE = re.compile(r"(?P<final>_?(?:{})-\d{{5,}}\.parquet(?:\.json)?)".format("|".join(SPLITS)))
_CACHE_TMP = re.compile(r"\.(?P<final>.+)\.[0-9a-f]{8}\.tmp")


def _is_cache_file(name: str) -> bool:
    """A logits file, its sidecar, or a temporary file of either (the names a build writes)."""
    tmp = _CACHE_TMP.fullmatch(name)
    return bool(_CACHE_FILE.fullmatch(tmp["final"] if tmp else name))


def logits_of_shard(logits_path: str, shard: dict) -> bool:
    """Whether a logits file was made from this clip shard (its sidecar records the shard's
    content digest; ingests before the digest have none and match by name and size only)."""
    if "content" not in shard:
        return True
    try:
        return storage.read_json(_sidecar(logits_path)).get("content") == shard["content"]
    except FileNotFoundError:
        return False


def build_teacher_cache(
    clips_dir: str,
    teacher: str,
    out_dir: str,
    *,
    teacher_name: str | None = None,
    crop_size: int | None = None,
    views=("center",),
    dtype: str = "float16",
    batch_size: int = 32,
    num_actors: int = 1,
    use_gpu: bool = False,
    verify_samples: int = 32,
    overwrite: bool = False,
    splits=TRAIN_LIKE_SPLITS,
    log=print,
    fresh_done=None,
    keep_memory: bool = True,
) -> dict:
    """Run the teacher once over every stored view of the clips of ``splits`` (Ray Data, actor
    pool) and cache logits. Only the splits training distils on: the test and validation clips
    are never trained on, and a teacher forward over them is time spent (and a test score printed).

    Reuses a finished cache with the same fingerprint; resumes a partial one. Returns the
    cache metadata (also written to ``out_dir/cache.json``). Another build into ``out_dir`` on
    this machine (runs sharing ``teacher.cache``) is waited for, then its cache is reused.
    ``fresh_done``: called once ``overwrite`` has deleted a cache of another build (or found none).
    """
    from dvfl.locks import folder_lock

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    # a run holds the cache for reading while it loads the logits (seconds): waited for, as another build is
    with folder_lock(out_dir, "cache build", wait=True, log=log, wait_for_readers=True):
        return _build_teacher_cache(clips_dir, teacher, out_dir, teacher_name=teacher_name, crop_size=crop_size,
                                    views=views, dtype=dtype, batch_size=batch_size, num_actors=num_actors,
                                    use_gpu=use_gpu, verify_samples=verify_samples, overwrite=overwrite,
                                    splits=tuple(splits), log=log, fresh_done=fresh_done, keep_memory=keep_memory)


def _build_teacher_cache(clips_dir, teacher, out_dir, *, teacher_name, crop_size, views, dtype, batch_size,
                         num_actors, use_gpu, verify_samples, overwrite, splits, log, fresh_done=None,
                         keep_memory=True) -> dict:
    import ray

    dataset_info = load_dataset_info(clips_dir)
    num_classes = len(dataset_info["classes"])
    crop_size = crop_size or dataset_info["params"]["short_side"]
    if not crop_size:  # clips stored at their source size (--short-side 0) have no one crop size
        raise ValueError(f"{clips_dir} stores clips at their source size (short_side 0): give the crop size")
    model, spec = load_model_for(teacher, teacher_name, num_classes, dataset_info["params"]["frames"])
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise CacheMismatchError(
            f"teacher {teacher} predicts {model.num_classes} classes, the dataset has {num_classes}")
    frames = dataset_info["params"]["frames"]
    if getattr(model, "num_frames", frames) != frames:  # (else every actor's first batch failed, a traceback)
        raise CacheMismatchError(f"teacher {teacher} takes clips of {model.num_frames} frames, {clips_dir} holds clips "
                                 f"of {frames} frames: give a teacher of {frames} frames or ingest {model.num_frames}")
    other = other_class_list(f"teacher {teacher}", spec, clips_dir, dataset_info["classes"])
    if other:
        raise CacheMismatchError(other)
    shards = shard_paths(clips_dir, splits)
    if not shards:
        raise ValueError(f"{clips_dir} has no clips of split(s) {', '.join(splits)}: no logits to cache")
    vspec = view_spec(crop_size, views)
    fingerprint = cache_fingerprint(spec, dataset_info["fingerprint"], vspec, dtype)
    out = out_dir.rstrip("/") if storage.is_remote(out_dir) else os.fspath(out_dir)
    logits_dir = storage.join(out, LOGITS_DIR)

    # (hidden files are the system's or a tool's: .DS_Store, NFS .nfsXXXX, rsync temporaries; left alone)
    foreign = [storage.basename(p) for p in storage.listdir(logits_dir)
               if not _is_cache_file(storage.basename(p))]
    if foreign:  # a build deletes the logits files it does not need: never a user's own files
        raise CacheMismatchError(
            f"{logits_dir} holds files that are not a teacher cache's ({', '.join(sorted(foreign)[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): use another --out")
    for meta in (storage.join(out, CACHE_JSON), storage.join(out, BUILD_JSON)):
        if storage.isfile(meta):
            try:
                existing_info = read_record(meta)
            except CacheMismatchError:
                if not overwrite:
                    raise
                existing_info = {"fingerprint": None}  # unreadable: whose it is is unknown, so it is replaced
            existing = existing_info["fingerprint"]
            if existing == fingerprint and storage.basename(meta) == CACHE_JSON:
                # the same fingerprint, but the files may not fit the shards: the same clips
                # re-ingested with another shard layout, or a logits file lost
                absent, short = TeacherLogitCache(out).logits_files(dataset_info, splits)
                if not absent and not short:
                    log(f"[cache] reusing finished cache {out} (fingerprint {fingerprint})")
                    return existing_info
                log(f"[cache] the finished cache {out} does not fit the clips' shards ({len(absent)} logits file(s) "
                    f"missing, {len(short)} of the wrong size): building those")
                # back to a build in progress, the marker first: the finished marker never covers a repair
                storage.write_json(storage.join(out, BUILD_JSON), {"fingerprint": fingerprint})
                storage.remove(storage.join(out, CACHE_JSON))
                storage.remove_all([p for name in short
                                    for p in (storage.join(logits_dir, name), _sidecar(storage.join(logits_dir, name)))])
                break
            if existing != fingerprint:
                if not overwrite:
                    diffs = differences(existing_info, spec, dataset_info["fingerprint"], vspec, dtype)
                    raise CacheOfAnotherBuild(
                        f"{out} holds a cache with fingerprint {existing}, this teacher/clips/views give "
                        f"{fingerprint}" + (f" ({'; '.join(diffs)})" if diffs else "") + "; use another --out or --fresh",
                        diffs)
                # the finished marker first: a delete cut short must not leave it over partial logits
                for p in [storage.join(out, CACHE_JSON), storage.join(out, BUILD_JSON)]:
                    storage.remove(p)
                storage.remove_all(_cache_files(logits_dir))
    if fresh_done:  # (another build's cache deleted, or none there: a rerun without --fresh resumes this one)
        fresh_done()
    if not storage.isfile(storage.join(out, BUILD_JSON)):
        # logits with no build marker: a replaced cache whose delete was cut short, or one whose
        # markers were deleted by hand; whose teacher made them is unknown, so none is reused
        orphans = _cache_files(logits_dir)
        if orphans:
            log(f"[cache] removing {len(orphans)} logits files of an unknown build in {logits_dir}")
            storage.remove_all(orphans)
    storage.makedirs(logits_dir)
    remove_stale_tmp(logits_dir)
    storage.write_json(storage.join(out, BUILD_JSON), {"fingerprint": fingerprint})

    # logits of shards these clips no longer have (an earlier shard layout of the same clips) would
    # be read with the cache's lookups: removed
    every_shard = shard_paths(clips_dir)
    current = {storage.basename(s) for s in every_shard} | {storage.basename(_sidecar(s)) for s in every_shard}
    storage.remove_all([p for p in _cache_files(logits_dir)
                        if storage.basename(p) not in current and not storage.basename(p).endswith(".tmp")])
    # a shard is done when its logits and its sidecar are both there, made from the same clips
    have = {storage.basename(p) for p in storage.listdir(logits_dir, hidden=True)}
    shard_entry = {os.path.basename(e["file"]): e for e in dataset_info["shards"]}
    # (other splits' too: the cache's record covers them below)
    cached = [storage.join(logits_dir, storage.basename(s)) for s in every_shard
              if {storage.basename(s), storage.basename(_sidecar(s))} <= have]

    def stale(dst: str) -> bool:
        if logits_of_shard(dst, shard_entry.get(storage.basename(dst), {})):
            return False
        for p in (dst, _sidecar(dst)):  # the file, then its sidecar (never a file without one)
            storage.remove(p)
        return True

    for dst, removed in zip(cached, storage.in_threads(stale, cached)):
        if removed:
            have -= {storage.basename(dst), storage.basename(_sidecar(dst))}
    todo = [s for s in shards if not {storage.basename(s), storage.basename(_sidecar(s))} <= have]
    log(f"[cache] teacher {spec['name']} ({spec['weights_fingerprint']}), {len(shards)} clip shards "
        f"({'+'.join(sorted({_split_of(s) for s in shards}))}: the splits training reads), "
        f"{len(shards) - len(todo)} already cached, views {vspec['views']}, {dtype}, on {'GPUs' if use_gpu else 'CPUs'}")
    started = time.time()
    if todo:
        cpus = ray.available_resources().get("CPU", 1)
        # where nodes come and go (spot nodes, autoscaling) a lost writer is restarted; on one machine a
        # writer dies of the machine's own limits (out of memory: so would its restart), a rerun resumes,
        # and a restartable actor makes Ray core print a warning. An autoscaling cluster's head advertises
        # no CPU, and may be its only node when the build starts.
        alive = [n for n in ray.nodes() if n.get("Alive")]
        cluster = len(alive) > 1 or any(not n.get("Resources", {}).get("CPU") for n in alive)
        restarts = WRITER_RESTARTS if cluster or os.environ.get(DIE_ONCE_TEST_ENV) else 0
        threads = max(1, usable_cpus() // max(1, num_actors))
        state_ref = [ray.put({k: v.cpu() for k, v in model.state_dict().items()})]
        items = [{"shard": s, "out": storage.join(logits_dir, storage.basename(s)),
                  "content": shard_entry.get(storage.basename(s), {}).get("content") or ""} for s in todo]
        with warnings.catch_warnings():
            # max_restarts has no named parameter in Ray 2.60, only the deprecated **ray_remote_args
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardLogitWriter,
                fn_constructor_kwargs=dict(spec=spec, state_ref=state_ref, vspec=vspec, dtype=dtype,
                                           batch_size=batch_size, threads=threads, use_gpu=use_gpu,
                                           keep_memory=keep_memory,
                                           test_fsize_limit=int(os.environ.get(FSIZE_TEST_ENV, 0)) or None,
                                           test_die_once=os.environ.get(DIE_ONCE_TEST_ENV) or None),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=num_actors),
                # its shard is then written again (the same name, the sidecar last)
                max_restarts=restarts, max_task_retries=restarts,
                num_gpus=1 if use_gpu else 0,
                # leave CPU for the read side of the pipeline (ray-2.60-notes, hang #2)
                num_cpus=0 if use_gpu else min(1.0, max(0.25, (cpus - 0.5) / num_actors)),
            )
        for i, row in enumerate(ds.iter_rows(), 1):
            s = json.loads(row["stats"])
            if "nonfinite" in s:
                raise NonFiniteLogits(s["nonfinite"])
            if s.get("corrupt"):
                raise corrupt_shard_error(s["corrupt"])
            if s.get("read"):
                raise ClipReadError(f"reading clip shard {s['source']} failed: {s['error']} (the file is not "
                                    "damaged as far as can be told: rerun once it can be read; finished shards are kept)")
            if "error" in s:
                raise OSError(f"writing the logits of {s['shard']} failed: {s['error']}")
            log(f"[cache] {i}/{len(todo)} shards: {s['shard']} ({s['rows']} logit rows)")
    elapsed = time.time() - started

    # what the cache holds: these splits' shards and any other split's finished before (a cache shared by
    # runs of other train splits, or built over every split before session 38) stay covered
    have = {storage.basename(p) for p in storage.listdir(logits_dir, hidden=True)}
    covered = [s for s in every_shard if {storage.basename(s), storage.basename(_sidecar(s))} <= have]
    stats = [storage.read_json(_sidecar(storage.join(logits_dir, storage.basename(s)))) for s in covered]
    correct, labelled = {}, {}
    for s in stats:
        for k, v in s["correct"].items():
            correct[k] = correct.get(k, 0) + v
        for k, v in s["labelled"].items():
            labelled[k] = labelled.get(k, 0) + v
    rows = sum(s["rows"] for s in stats)
    built = {storage.basename(t) for t in todo}  # once: per shard it was quadratic (4 CPU-min at Kinetics' 16k shards)
    info = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "teacher": teacher_identity(spec),
        "dataset_fingerprint": dataset_info["fingerprint"],
        "view_spec": vspec,
        "dtype": dtype,
        "num_classes": num_classes,
        "rows": rows,
        "splits": sorted(set(labelled) | {_split_of(s) for s in covered}),
        "teacher_top1": {k: correct[k] / labelled[k] for k in labelled if labelled[k]},
        "build_seconds": round(elapsed, 2),
        # rows built by this run only (a resumed build skips finished shards)
        "logit_rows_per_second": round(sum(s["rows"] for s in stats if s["shard"] in built) / elapsed, 2) if todo else None,
    }
    cache = TeacherLogitCache.__new__(TeacherLogitCache)
    cache.directory, cache.info, cache._index, cache._logits = out, info, None, None
    log(f"[cache] verifying up to {verify_samples} cached rows against the teacher run directly")
    try:
        info["verify"] = verify_cache(cache, clips_dir, model, verify_samples)
    except CacheMismatchError as exc:
        # without this, a rerun would find every shard done and fail on the same row for ever
        removed = _remove_logits_of(logits_dir, getattr(exc, "clip_id", None))
        raise CacheVerificationError(f"{exc}; " + (f"removed {', '.join(removed)} so that a rerun computes it "
                                                  "again" if removed else "nothing removed")) from None
    storage.write_json(storage.join(out, CACHE_JSON), info)
    storage.remove(storage.join(out, BUILD_JSON))
    log(f"[cache] {rows} logit rows in {elapsed:.1f}s; teacher top-1 "
        + ", ".join(f"{k} {v:.1%}" for k, v in info["teacher_top1"].items())
        + f"; verified {info['verify']['checked']} rows, max |diff| {info['verify']['max_abs_diff']:.2e}")
    return info


def _remove_logits_of(logits_dir: str, clip_id) -> list[str]:
    """Remove the logits file holding ``clip_id`` and its sidecar (the file first); their names."""
    for path in storage.listdir(logits_dir, ".parquet"):
        if clip_id is not None and clip_id in set(read_table(path, columns=["clip_id"]).column("clip_id").to_pylist()):
            for p in (path, _sidecar(path)):
                if storage.isfile(p):
                    storage.remove(p)
            return [storage.basename(path)]
    return []


def _split_of(shard: str) -> str:
    return storage.basename(shard).rsplit("-", 1)[0]


def read_clips_by_id(clips_dir: str, wanted: set, columns: list[str], batch_size: int = 4) -> pa.Table:
    """The rows of the ``wanted`` clips only, without reading a whole dataset into memory.

    Reads each shard's ``clip_id`` column, then streams only the row groups that hold a wanted
    clip, in small batches, stopping after the last wanted row of each; several shards at a time
    (one after another, a Kinetics-sized split on s3 took ~40k requests' latency).
    """
    value_set = pa.array(sorted(wanted), pa.string())
    parts = [t for tables in storage.in_threads(lambda p: _wanted_rows(p, value_set, columns, batch_size),
                                                shard_paths(clips_dir)) for t in tables]
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})


def _wanted_rows(path: str, value_set: pa.Array, columns: list[str], batch_size: int) -> list[pa.Table]:
    """The rows of one shard whose ``clip_id`` is in ``value_set`` (see :func:`read_clips_by_id`)."""
    parts = []
    f = parquet_file(path, buffer_size=1 << 20)  # buffered: pages are read as the batches need them
    for rg in range(f.num_row_groups):
        mask = pa.compute.is_in(f.read_row_group(rg, columns=["clip_id"]).column("clip_id"), value_set=value_set)
        hits = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        if not len(hits):
            continue
        offset = 0
        for batch in f.iter_batches(batch_size=batch_size, row_groups=[rg], columns=columns):
            keep = mask.slice(offset, batch.num_rows)
            offset += batch.num_rows
            if pa.compute.any(keep).as_py():
                parts.append(pa.Table.from_batches([batch]).filter(keep))
            if offset > hits[-1]:
                break
    return parts


def verify_cache(cache: TeacherLogitCache, clips_dir: str, model, samples: int, seed: int = 0) -> dict:
    """Recompute a random sample of cached rows with a direct fp32 teacher forward.

    Raises :class:`CacheMismatchError` if any differs beyond :data:`VERIFY_TOLERANCE`.
    """
    cache.load()
    keys = list(cache._index)
    if not keys or samples <= 0:
        return {"checked": 0, "max_abs_diff": 0.0}
    rng = np.random.default_rng(seed)
    picked = [keys[i] for i in rng.choice(len(keys), size=min(samples, len(keys)), replace=False)]
    table = read_clips_by_id(clips_dir, {c for c, _ in picked},
                             columns=["clip_id", "label", "frames", "num_frames", "height", "width"])
    arrays, ids, _ = batch_arrays(table)
    by_id = dict(zip(ids, arrays))
    missing = sorted({c for c, _ in picked} - set(by_id))
    if missing:
        raise CacheMismatchError(f"cached clips {missing[:3]} are not in the clip shards of {clips_dir}")
    model = model.eval()
    device = next(model.parameters()).device
    rtol, atol = VERIFY_TOLERANCE[cache.info["dtype"]]
    max_diff = 0.0
    for clip_id, view in picked:
        fresh = _teacher_logits(model, [by_id[clip_id]], cache.info["view_spec"]["crop_size"], View.parse(view), device)[0]
        stored = cache.lookup([clip_id], [view])[0]
        diff = (fresh - stored).abs()
        max_diff = max(max_diff, float(diff.max()))
        if not bool((diff <= atol + rtol * fresh.abs()).all()):
            exc = CacheMismatchError(f"cached logits of {clip_id} [{view}] differ from a direct teacher "
                                     f"forward by {float(diff.max()):.3g} (> {atol} + {rtol}*|x|)")
            exc.clip_id = clip_id
            raise exc
    return {"checked": len(picked), "max_abs_diff": max_diff, "rtol": rtol, "atol": atol}


__all__ = ["TeacherLogitCache", "CacheMismatchError", "build_teacher_cache", "verify_cache",
           "cache_fingerprint", "view_spec", "ShardLogitWriter"]
