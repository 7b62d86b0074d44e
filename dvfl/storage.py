"""Where artefacts live: a local path or a URI (``s3://``, ``gs://``, ``file://``), one interface.

Every reader and writer of an artefact (clip shards and their sidecars, dataset.json, the
teacher-logit cache, model folders, results, Ray Train's storage) goes through this module, which
wraps :mod:`pyarrow.fs`:

* local paths (and ``file://`` URIs) keep the guarantees the project had: a write goes to a hidden
  temporary file next to its target, is fsynced and renamed over it (``os.replace``), then the
  directory is fsynced;
* object stores have no rename: each object is written once under its final name (a PUT or a
  multipart upload is visible whole or not at all), and a writer that publishes several objects
  commits a marker last (a shard's ``_meta`` sidecar, ``dataset.json``, ``cache.json``); readers
  trust only what a marker committed.

``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` select an S3-compatible endpoint (the installed
pyarrow does not read them itself), so a local S3 server needs no code change. Credentials come
from the AWS SDK's usual chain (environment, profile, instance role) in each process.

Layer: bottom (no Ray, no torch); ``dvfl.data`` and everything above use it.
"""
from __future__ import annotations

import functools
import io
import json
import os
import posixpath
import uuid
from typing import Any, Callable, List, Optional, Tuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dvfl.paths import is_uri

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the service-specific one wins, as in the AWS SDKs
SPOOL_ENV = "DVFL_SPOOL_DIR"
S3_ENV_FOR_WORKERS = (*ENDPOINT_ENVS, "AWS_DEFAULT_REGION", "AWS_REGION")


# ---------------------------------------------------------------------------------------
# paths

def local_path(path: str) -> Optional[str]:
    """The local file name of ``path`` (a plain path or a ``file://`` URI); None for a remote URI."""
    path = os.fspath(path)
    if not is_uri(path):
        return path
    if path.startswith("file://"):
        return _file_uri_path(path)
    return None


def _file_uri_path(uri: str) -> str:
    # the rest of the URI taken literally (urlparse would cut the path at '#' or '?'), its %XX
    # escapes decoded as every file URI writer encodes them (Path.as_uri(): "my%20clips")
    from urllib.parse import unquote

    rest = uri[len("file://"):]
    if not rest.startswith("/"):
        host, _, rest = rest.partition("/")
        if host not in ("", "localhost"):
            raise ValueError(f"{uri}: a file:// URI must name a local path (file:///path), not host {host!r}")
        rest = "/" + rest
    return unquote(rest)


def is_remote(path: str) -> bool:
    return local_path(path) is None


def absolute(path: str) -> str:
    """A remote URI unchanged; a local path or a ``file://`` URI as an absolute local path (abspath of
    ``file:///m`` was ``./file:/m``)."""
    local = local_path(path)
    return os.fspath(path) if local is None else os.path.abspath(local)


def join(base: str, *parts: str) -> str:
    base = os.fspath(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    return posixpath.basename(os.fspath(path).rstrip("/")) if is_remote(path) else os.path.basename(path)


def dirname(path: str) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def same_or_inside(path: str, base: str) -> bool:
    """``path`` is ``base`` or below it (local paths compared after resolving links)."""
    if is_remote(path) or is_remote(base):
        p, b = os.fspath(path).rstrip("/"), os.fspath(base).rstrip("/")
        return p == b or p.startswith(b + "/")
    real, root = os.path.realpath(local_path(path)), os.path.realpath(local_path(base))
    return os.path.commonpath([real, root]) == root


# ---------------------------------------------------------------------------------------
# filesystems

def s3_endpoint() -> Optional[str]:
    for name in ENDPOINT_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


@functools.lru_cache(maxsize=16)
def _s3(endpoint: Optional[str], region: Optional[str]) -> pafs.FileSystem:
    # the SDK's default request timeout (3 s without a byte) failed requests to a busy server
    kw: dict = {"connect_timeout": 10, "request_timeout": 60}
    if endpoint:
        # "host:port" without a scheme: urlparse would read the host as the scheme ("minio:9000")
        u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw["endpoint_override"] = u.netloc
        kw["scheme"] = u.scheme
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> Optional[str]:
    """An AWS bucket's own region (requests to another region's endpoint fail), as pyarrow's
    from_uri looks it up; None where it cannot be asked (the SDK's default region then)."""
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _gcs() -> pafs.FileSystem:
    return pafs.GcsFileSystem()  # Application Default Credentials, as from_uri("gs://...") gives


def filesystem(path: str) -> Tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI."""
    path = os.fspath(path)
    local = local_path(path)
    if local is not None:
        return pafs.LocalFileSystem(), os.path.abspath(local)
    scheme, _, rest = path.partition("://")
    if scheme.lower() in ("s3", "s3a"):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        endpoint = s3_endpoint()
        if not region and not endpoint:  # AWS itself, no region given: the bucket's
            region = _bucket_region(rest.split("/", 1)[0])
        # "bucket/key" taken literally: keys may hold '#' and '?', which urlparse would cut off
        return _s3(endpoint, region), rest.rstrip("/")
    if scheme.lower() in ("gs", "gcs"):
        # literally too: from_uri refuses spaces and non-ASCII and decodes '%41' into another key
        return _gcs(), rest.rstrip("/")
    if "#" in path or "?" in path:
        # pyarrow's from_uri drops a '#...' fragment and reads '?...' as options: another object
        raise ValueError(f"{path}: '#' and '?' are not supported in {scheme}:// paths; rename the path")
    return pafs.FileSystem.from_uri(path)


def ray_storage(path: str) -> Tuple[str, Optional[pafs.FileSystem]]:
    """``(storage_path, storage_filesystem)`` for Ray Train / Tune's RunConfig: our filesystem (with
    the endpoint) for a remote URI, the absolute path and Ray's default for a local one."""
    if not is_remote(path):
        return os.path.abspath(local_path(path)), None
    fs, p = filesystem(path)
    return p, fs


def worker_env() -> dict:
    """The S3 endpoint/region variables to hand to Ray workers (never credentials)."""
    return {k: os.environ[k] for k in S3_ENV_FOR_WORKERS if os.environ.get(k)}


# ---------------------------------------------------------------------------------------
# queries

def _info(path: str) -> pafs.FileInfo:
    fs, p = filesystem(path)
    return fs.get_file_info(p)


def exists(path: str) -> bool:
    """A file, a local directory, or an object-store prefix that holds at least one object (pyarrow
    leaves an empty ``prefix/`` marker object where it deleted the last object under it)."""
    kind = _info(path).type
    if kind == pafs.FileType.Directory and is_remote(path):
        return isdir(path)
    return kind != pafs.FileType.NotFound


def isfile(path: str) -> bool:
    return _info(path).type == pafs.FileType.File


def isdir(path: str) -> bool:
    """A local directory, or an object-store prefix that holds at least one object."""
    if not is_remote(path):
        return os.path.isdir(local_path(path))
    fs, p = filesystem(path)
    return bool(fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False)))


def size(path: str) -> int:
    return int(_info(path).size)


def listdir(path: str, suffix: str = "", hidden: bool = False) -> List[str]:
    """Files directly in ``path`` whose names end with ``suffix`` (sorted, full paths/URIs);
    names starting with ``.`` or ``_`` only when ``hidden``."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    names = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return [join(path, n) for n in names if n.endswith(suffix) and (hidden or n[:1] not in "._")]


def list_entries(path: str) -> List[str]:
    """The names of the files and folders (object-store prefixes) directly in ``path`` (sorted)."""
    fs, p = filesystem(path)
    return sorted(posixpath.basename(i.path.rstrip("/"))
                  for i in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False)))


def files_under(path: str) -> List[str]:
    """Every file anywhere under ``path``, as paths relative to it with ``/`` (sorted)."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=True))
    return sorted(posixpath.relpath(i.path, p) for i in infos if i.type == pafs.FileType.File)


def find(path: str, name: str) -> List[str]:
    """Every file called ``name`` anywhere under ``path`` (sorted, full paths/URIs)."""
    return [join(path, *r.split("/")) for r in files_under(path) if posixpath.basename(r) == name]


def reachable(path: str) -> Optional[str]:
    """None when ``path`` can be used (a local path that exists, or a URI whose bucket answers),
    else why not. A URI's object itself may be missing: callers that need it check it."""
    if not is_remote(path):
        return None if os.path.exists(local_path(path)) else f"path does not exist: {path}"
    try:
        fs, p = filesystem(path)
        bucket = p.split("/", 1)[0]
        kind = fs.get_file_info(bucket).type
    except Exception as exc:  # noqa: BLE001  (any failure to reach the store is the answer)
        return f"cannot reach {path}: {type(exc).__name__}: {exc}"
    if kind == pafs.FileType.NotFound:
        return f"bucket {bucket!r} of {path} does not exist (or these credentials cannot see it)"
    return None


# ---------------------------------------------------------------------------------------
# reading

def open_input(path: str):
    """A seekable binary file (for Parquet readers and torch.load)."""
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def read_bytes(path: str) -> bytes:
    local = local_path(path)
    if local is not None:
        with open(local, "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


# ---------------------------------------------------------------------------------------
# writing

def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a crash could otherwise undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_tmp_name(path: str) -> str:
    """The hidden temporary name a local write of ``path`` uses (next to it, never globbed)."""
    d = os.path.dirname(os.path.abspath(path))
    return os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_local(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a hidden temporary file next to ``path``; it is fsynced and renamed
    over ``path``, so readers see the old file or the whole new one, never a part (a full disk
    included: the temporary file is removed and the error raised)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = local_tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(d)
    except OSError as exc:
        if exc.filename is None:  # a write's error names no file (a full disk): the command's one line names it
            raise (OSError(exc.errno, f"writing {path}: {exc.strerror}") if exc.errno and exc.strerror
                   else OSError(f"writing {path}: {exc}")) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_output(path: str):
    """A stream that becomes the object ``path`` when closed (object stores: once, whole).
    Local paths: use :func:`write_bytes` / :func:`atomic_write_local` instead."""
    fs, p = filesystem(path)
    return fs.open_output_stream(p)


def spool_file(path: str) -> str:
    """A local temporary file to build the object ``path`` in before one upload (in
    ``$DVFL_SPOOL_DIR``, default the system's temporary directory), named ``dvfl-spool-<pid>-…``:
    the first one a process makes there removes those that killed processes left (dvfl.scratch)."""
    from dvfl.scratch import make_scratch_file

    return make_scratch_file("spool", suffix="-" + basename(path), tmpdir=os.environ.get(SPOOL_ENV) or None)


def upload_file(local: str, path: str) -> None:
    """Copy a local file to the object ``path`` (a multipart upload is visible only once complete)."""
    fs, p = filesystem(path)
    pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def write_bytes(path: str, data: bytes) -> None:
    """Atomic: readers see the old content or all of ``data``."""
    path = os.fspath(path)
    local = local_path(path)
    if local is not None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write_local(local, write)
        return
    with open_output(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_with(path: str, write: Callable[[Any], None]) -> None:
    """``write(target)`` writes a file through a library that takes a path or a file object
    (matplotlib, torch.save, pyarrow): a local temporary file renamed over ``path``, or one PUT."""
    path = os.fspath(path)
    local = local_path(path)
    if local is not None:
        atomic_write_local(local, write)
        return
    buf = io.BytesIO()
    write(buf)
    write_bytes(path, buf.getvalue())


def makedirs(path: str) -> None:
    """Local: create the directory. Object stores have no directories (a no-op)."""
    local = local_path(path)
    if local is not None:
        os.makedirs(local, exist_ok=True)


def remove(path: str) -> bool:
    """Delete one file/object; False when it was not there."""
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        if fs.get_file_info(p).type == pafs.FileType.NotFound:
            return False
        raise


def in_threads(fn: Callable[[Any], Any], items: List[Any]) -> List[Any]:
    """``[fn(x) for x in items]``, 32 at a time: small reads or deletes one after another (a GET per
    video's identity or shard sidecar, a delete per logits file) cost minutes to an hour on s3 or NFS
    for Kinetics-sized data, waiting on latency, not CPU."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(32, len(items))) as pool:
        return list(pool.map(fn, items))


def remove_all(paths: List[str]) -> None:
    """:func:`remove` of each path, several at a time (no order among them: callers remove a
    marker that vouches for them first)."""
    in_threads(remove, list(paths))


def remove_tree(path: str) -> None:
    """Delete a directory / every object under a prefix (missing: nothing to do). A file that cannot
    be deleted raises: callers start over in the folder (``--fresh``) and must not find old files."""
    local = local_path(path)
    if local is not None:
        import shutil

        def gone_already(func, name, exc_info):  # removed meanwhile: what was asked
            if not issubclass(exc_info[0], FileNotFoundError):
                raise exc_info[1]

        shutil.rmtree(local, onerror=gone_already)
        return
    fs, p = filesystem(path)
    if fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=True)):
        fs.delete_dir_contents(p, missing_dir_ok=True)
    # the empty prefix marker pyarrow leaves (never a bucket itself: a "prefix" with no "/")
    if "/" in p.strip("/") and fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)
