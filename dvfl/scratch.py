"""Local temporary folders that a killed process does not leave behind for good.

A process killed with SIGKILL (a lost node, the out-of-memory killer, a fault-injection test)
runs no clean-up, so its temporary folders stay in the temp dir. Ours carry the owner's PID in
their name (``dvfl-<kind>-<pid>-…``), and the first folder a process makes of a kind removes the
ones of that kind whose owner is no longer running on this machine and that nobody has written
to for ``STALE_SECONDS`` (the age also protects folders of a process in another PID namespace
that shares this temp dir).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

STALE_SECONDS = 600
_swept: set[str] = set()  # kinds this process has already swept


def scratch_prefix(kind: str, label: str = "") -> str:
    """``dvfl-<kind>-<pid>-[<label>-]``: the owner's PID first, so a sweep can tell it is dead."""
    return f"dvfl-{kind}-{os.getpid()}-" + (f"{label}-" if label else "")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _last_written(path: str) -> float:
    newest = os.lstat(path).st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return newest


def sweep_dead(kind: str, tmpdir: str | None = None, stale_seconds: float = STALE_SECONDS) -> list[str]:
    """Remove this user's ``dvfl-<kind>-<pid>-…`` folders whose process has ended and that have
    not been written for ``stale_seconds``; returns what was removed."""
    tmpdir = tmpdir or tempfile.gettempdir()
    pattern = re.compile(rf"dvfl-{re.escape(kind)}-(\d+)-")
    removed = []
    for name in os.listdir(tmpdir):
        match = pattern.match(name)
        path = os.path.join(tmpdir, name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            stale = (os.lstat(path).st_uid == os.getuid() and os.path.isdir(path) and not os.path.islink(path)
                     and not _running(int(match.group(1))) and time.time() - _last_written(path) > stale_seconds)
        except OSError:  # gone meanwhile
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


SCRATCH_KINDS = ("ckpt", "tb", "serve")  # every kind the project makes


def make_scratch_dir(kind: str, label: str = "") -> str:
    """A new temporary folder of ``kind`` (see :func:`scratch_prefix`); the caller removes it."""
    if kind not in _swept:
        _swept.add(kind)
        sweep_dead(kind)
    return tempfile.mkdtemp(prefix=scratch_prefix(kind, label))
