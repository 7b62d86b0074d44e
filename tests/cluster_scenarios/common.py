"""Helpers shared by the cluster scenarios (each scenario runs in its own process).

Every scenario keeps its Ray instance apart from anything else on the machine: its own temp dir
(``RAY_TMPDIR``, which also holds Ray's "current cluster" address file), explicit free ports, no
dashboard; and it never runs ``ray stop`` (that would stop every Ray instance of this user,
including other jobs' and the test session's).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ray_tmpdir(prefix: str) -> str:
    """A short private RAY_TMPDIR (Ray's unix socket paths must stay under ~100 characters).
    Call before Ray starts anything."""
    import tempfile

    if not os.environ.get("RAY_TMPDIR"):
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    return os.environ["RAY_TMPDIR"]


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def pids_under(tmpdir: str) -> list[int]:
    """Processes whose command line names ``tmpdir``: the Ray processes of this scenario only
    (raylets, GCS, agents and workers all carry their session directory), never this process
    or the ones that started it (whose arguments may name a path inside ``tmpdir``)."""
    pids, skip = [], _ancestors()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tmpdir in cmd:
            pids.append(int(entry))
    return pids


def kill_leftovers(tmpdir: str, grace_s: float = 5.0) -> tuple[list[int], list[int]]:
    """SIGTERM, then SIGKILL, every process of this scenario that is still alive.

    Returns the processes found alive after the cluster's own shutdown, and those still alive
    after the kill (which should be none)."""
    found = left = pids_under(tmpdir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and pids_under(tmpdir):
            time.sleep(0.2)
        left = pids_under(tmpdir)
        if not left:
            break
    return found, left


def write_result(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(f"[scenario {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def finish(result: dict, tmpdir: str, own_tmp: bool, started: float, result_path: str) -> None:
    """Shut the scenario's cluster down (``result["_cluster"]``), kill what it left behind,
    record the wall time, and keep the session logs only when the scenario failed."""
    cluster = result.pop("_cluster", None)
    if cluster is not None:
        import ray

        ray.shutdown()
        try:
            cluster.shutdown()
        except Exception as exc:  # still clean up below
            result["shutdown_error"] = repr(exc)
    result["alive_after_shutdown"], result["leftover_processes"] = kill_leftovers(tmpdir)
    result["wall_s"] = round(time.time() - started, 1)
    if result["ok"] and not result["leftover_processes"] and own_tmp:
        shutil.rmtree(tmpdir, ignore_errors=True)
    write_result(result_path, result)
