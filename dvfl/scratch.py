"""Local temporary folders and files that a killed process does not leave behind for good.

A process killed with SIGKILL (a lost node, the out-of-memory killer, a fault-injection test)
runs no clean-up, so its temporary folders and files stay in the temp dir. Ours carry the owner's
PID in their name (``dvfl-<kind>-<pid>-…``), and the first one a process makes of a kind (in a
folder) removes the ones of that kind whose owner is no longer running on this machine and that
nobody has written to for ``STALE_SECONDS`` (the age also protects those of a process in another
PID namespace that shares this temp dir).
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time

STALE_SECONDS = 600
SCRATCH_KINDS = ("ckpt", "tb", "serve", "spool", "export")  # every kind the project makes
BESIDE_USER_FILES = ("export",)  # made in the user's folder (beside the file it becomes), not the temp dir
_swept: set[tuple] = set()  # (kind, folder) pairs this process has already swept


def kind_prefix(kind: str) -> str:
    """``dvfl-<kind>-``, what every scratch name of that kind starts with; hidden (a leading ``.``)
    for the kinds made beside a user's own files."""
    return _dot(kind) + f"dvfl-{kind}-"


def scratch_prefix(kind: str, label: str = "") -> str:
    """``dvfl-<kind>-<pid>-[<label>-]``: the owner's PID first, so a sweep can tell it is dead."""
    return kind_prefix(kind) + f"{os.getpid()}-" + (f"{label}-" if label else "")


def _dot(kind: str) -> str:
    return "." if kind in BESIDE_USER_FILES else ""


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
    """Remove this user's ``dvfl-<kind>-<pid>-…`` folders and files whose process has ended and
    that have not been written for ``stale_seconds``; returns what was removed."""
    tmpdir = tmpdir or tempfile.gettempdir()
    pattern = re.compile(rf"{re.escape(kind_prefix(kind))}(\d+)-")
    removed = []
    for name in os.listdir(tmpdir):
        match = pattern.match(name)
        path = os.path.join(tmpdir, name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            st = os.lstat(path)  # (a symlink is neither: never followed)
            is_dir = stat.S_ISDIR(st.st_mode)
            stale = (st.st_uid == os.getuid() and (is_dir or stat.S_ISREG(st.st_mode))
                     and not _running(int(match.group(1))) and time.time() - _last_written(path) > stale_seconds)
            if stale:
                shutil.rmtree(path, ignore_errors=True) if is_dir else os.unlink(path)
                removed.append(path)
        except OSError:  # gone meanwhile
            continue
    return removed




def _sweep_once(kind: str, tmpdir: str | None) -> None:
    key = (kind, os.path.abspath(tmpdir or tempfile.gettempdir()))
    if key not in _swept:
        _swept.add(key)
        sweep_dead(kind, tmpdir)


def make_scratch_dir(kind: str, label: str = "", tmpdir: str | None = None) -> str:
    """A new temporary folder of ``kind`` (see :func:`scratch_prefix`) in ``tmpdir`` (default the
    temp dir); the caller removes it."""
    _sweep_once(kind, tmpdir)
    return tempfile.mkdtemp(prefix=scratch_prefix(kind, label), dir=tmpdir)


def make_scratch_file(kind: str, suffix: str = "", tmpdir: str | None = None) -> str:
    """A new empty temporary file of ``kind`` in ``tmpdir`` (default the temp dir); the caller removes it."""
    _sweep_once(kind, tmpdir)
    fd, path = tempfile.mkstemp(prefix=scratch_prefix(kind), suffix=suffix, dir=tmpdir)
    os.close(fd)
    return path
