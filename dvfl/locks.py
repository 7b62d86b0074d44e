"""One writer per output folder: a second command writing the same folder is refused or waits.

A Ray job keeps running when ``ray job submit`` stops tailing it (Ctrl+C, a dropped tunnel), so a
resubmitted job or a second terminal can work on the output of one still running. Each stage
deletes what it finds half-written (temporaries, parts, an earlier configuration's clips or
cache), which is right after a crash and wrong beside a live writer: the two deleted each
other's files, and a run could be evaluated on clips that the other had just replaced.

The lock is ``flock`` on a file named after the folder's real path in this user's own lock
folder, ``~/.cache/dvfl/locks`` (``$XDG_CACHE_HOME``; not in the folder: a shared or read-only
cache, or a folder a refusal must leave untouched, gets nothing written). The kernel releases it when its holder dies
(SIGKILL included), so a lock is never stale; a holder that lets go removes its file. It holds between this user's processes on one
machine (the head node runs every job's driver). An object-store folder (``s3://``, ``gs://``) is
locked the same way, keyed by its URI (and the S3 endpoint): two jobs of one cluster, or two
terminals of one laptop, are kept apart; two machines writing one prefix are not (object stores
have no lock that dies with its holder).

A run (and ``dvfl evaluate``, ``dvfl cache``) also holds its clips folder for reading (a shared lock,
:func:`reads_held` and :func:`hold_for_reading`) from the moment its clips are ready to its end: an ingest into them from
another command (``ingest --fresh`` replaced the shards its epochs were reading) is refused, not
made to wait hours.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import stat
import sys
import time

from dvfl import storage

_held: dict[str, int] = {}  # folder (real path) -> how many times this process holds it (nested stages)
_swept: set[str] = set()  # lock folders this process has cleared of dead holders' files
_read_scopes: list[contextlib.ExitStack] = []  # innermost last: where hold_for_reading keeps its locks


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock (``readers``: other commands reading it, a writer refused)."""

    def __init__(self, message: str, readers: bool = False):
        super().__init__(message)
        self.readers = readers


@contextlib.contextmanager
def folder_lock(folder: str, what: str, *, wait: bool = False, log=print, shared: bool = False,
                announce: bool = True, wait_for_readers: bool = False):
    """Hold ``folder``'s lock inside. Held by another process: raise :class:`FolderBusyError`
    (``wait=False``), or say so and wait for it to end (``wait=True``: a second command then reuses
    what the first one finished; ``log`` None: silently). ``shared``: a reader's lock, held with
    other readers; a writer is refused while readers hold it, ``wait`` or not (they hold it for a
    whole run), unless ``wait_for_readers`` (a folder whose readers hold it a moment: a teacher cache
    being loaded). ``announce=False``: a reader of a moment, not named to a refused writer.
    Re-entrant in one process; the folder need not exist."""
    key = _key(folder)
    if key in _held:  # a stage nested in a command that holds it already
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = _lock_file(key)
    if lock is None:
        yield
        return
    fd = _locked_fd(lock, folder, what, wait, log, shared, wait_for_readers)
    try:
        if announce:
            _announce(fd, lock, key, shared)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        if not shared or _last_reader(fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # still held: a process waiting on this file finds it gone and locks a new one
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def reads_held():
    """The folders :func:`hold_for_reading` is given inside stay locked for reading until the
    block ends (a command's whole run)."""
    with contextlib.ExitStack() as stack:
        _read_scopes.append(stack)
        try:
            yield
        finally:
            _read_scopes.pop()


def hold_for_reading(folder: str, what: str, log=print) -> bool:
    """Lock ``folder`` for reading until the innermost :func:`reads_held` block ends (outside one,
    or held already: nothing, False). An ingest writing it is waited for: the caller checks what it
    left."""
    if not _read_scopes or _key(folder) in _held:
        return False
    _read_scopes[-1].enter_context(folder_lock(folder, what, wait=True, log=log, shared=True))
    return True


def _last_reader(fd: int) -> bool:
    """Whether no other reader holds the lock (then the file is this reader's to remove): tried
    as a switch to exclusive, which lets go of this reader's lock when it fails."""
    return _flocked(fd, fcntl.LOCK_EX)


def _flocked(fd: int, mode: int) -> bool:
    """Whether ``fd`` took the lock ``mode`` without waiting."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _key(folder: str) -> str:
    """What names ``folder`` on this machine: its real path, or its normalised URI (the S3 endpoint
    included: one bucket name on two servers is two folders)."""
    local = storage.local_path(folder)
    if local is not None:
        return os.path.realpath(local)
    scheme, _, rest = os.fspath(folder).partition("://")
    scheme = {"s3a": "s3", "gcs": "gs"}.get(scheme.lower(), scheme.lower())
    rest = rest.rstrip("/")  # as storage.filesystem reads it
    endpoint = (storage.s3_endpoint() or "").rstrip("/").lower() if scheme == "s3" else ""
    return f"{scheme}://{rest}" + (f" at {endpoint}" if endpoint else "")


def _locked_fd(lock: str, folder: str, what: str, wait: bool, log, shared: bool = False,
               wait_for_readers: bool = False) -> int:
    """An open descriptor of the file now at ``lock``, locked (a holder unlinks its file as it lets
    go, so a lock taken on a file no longer there is let go and taken again on the new one)."""
    said = False
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    readers_seen = 0
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                # (asked of the lock, not of the holder's line: it may be unwritten)
                reading = not shared and _readers_only(lock)
                if reading and not wait_for_readers:
                    readers_seen += 1
                    if readers_seen < 3:  # or the holders let go meanwhile: tried again
                        fd = _closed(fd)
                        time.sleep(0.05)
                        continue
                    raise FolderBusyError(f"{folder} is being read by a run ({holder}): writing it now would change "
                                          f"the files it reads; wait for it to end, or stop it, or use another "
                                          f"folder", readers=True) from None
                if not wait:
                    raise FolderBusyError(f"{folder} is in use by another {what} ({holder}); wait for it to end, "
                                          f"or stop it, or use another folder") from None
                if not said and log:
                    busy = "is being written" if shared else "is being read" if reading else f"is in use by another {what}"
                    log(f"[{what}] {folder} {busy} ({holder}); waiting for it to end")
                    said = True
                fcntl.flock(fd, mode)
            if _same_file(fd, lock):
                return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        os.close(fd)


def _closed(fd: int) -> int:
    os.close(fd)
    return -1  # (a Ctrl+C before the next open must not close the number again: another thread may hold it)


def _readers_only(lock: str) -> bool:
    """Whether the lock at ``lock`` is held for reading (a shared lock taken beside its holders)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return _flocked(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # (lets the probe go)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _lock_file(folder: str) -> str | None:
    """This user's lock file for ``folder``; None where the lock folder cannot be made or is not
    this user's alone (no lock rather than one another user could hold)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    locks = os.path.join(cache, "dvfl", "locks")
    try:
        os.makedirs(locks, mode=0o700, exist_ok=True)
        st = os.lstat(locks)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    if locks not in _swept:
        _swept.add(locks)
        _remove_free_lock_files(locks)
    return os.path.join(locks, hashlib.sha256(os.fsencode(folder)).hexdigest()[:32] + ".lock")


def _remove_free_lock_files(locks: str) -> None:
    """The files of holders that died (SIGKILL: no clean-up), once per process: each one no
    process holds is removed while locked here (a process about to lock it finds it gone)."""
    for name in os.listdir(locks):
        path = os.path.join(locks, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if name.endswith(".lock") and _same_file(fd, path):
                os.unlink(path)
        except OSError:  # held (BlockingIOError), or gone meanwhile
            pass
        finally:
            os.close(fd)


def _announce(fd: int, lock: str, key: str, shared: bool) -> None:
    """Write who holds the lock, for a refused command to name (a full or over-quota home must not
    fail the command): a writer's line, or one more line per reader (a reader that ends leaves its
    line, which a refusal passes over once its process is gone)."""
    line = json.dumps({"folder": key, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                       "command": " ".join(sys.argv)[:300]}).encode() + b"\n"
    try:
        if shared:
            appended = os.open(lock, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                os.write(appended, line)
            finally:
                os.close(appended)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
    except OSError:
        pass


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (readers: the last one to start that still runs)."""
    holders = []
    try:  # the file's tail (readers' lines pile up while one reads for a long time); an older version's line
        # had no newline: one appended after it is split off
        size = os.fstat(fd).st_size
        tail = os.pread(fd, 1 << 16, max(0, size - (1 << 16)))
        for line in re.split(rb"\n|(?<=\})(?=\{)", tail):
            try:
                h = json.loads(line)
                holders.append((h, time.strftime("%H:%M:%S", time.localtime(h["since"]))))
            except (ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    live = [(h, since) for h, since in holders if _running(h)]
    if not (live or holders):
        return "a process that has just started"
    h, since = (live or holders)[-1]
    return f"pid {h['pid']} on {h['host']} since {since}: {h['command']}"


def _running(holder: dict) -> bool:
    """Whether a holder line's process still runs (on another host: taken as running)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, KeyError, OverflowError):
        return True
    return True
