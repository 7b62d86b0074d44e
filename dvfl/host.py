"""What machine this is, for the records that measured numbers carry (stdlib only: benchmarks
read it before, or without, importing torch)."""
from __future__ import annotations

import math
import os
import platform


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo "model name"; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int:
    """The CPUs this process can use: its affinity, capped by a container's CPU quota (rounded up).
    ``os.cpu_count()`` counts the host's: a 4-CPU pod on a 64-core node sized a local Ray of 128
    CPUs, 65 decode tasks and 64 torch threads."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota))) if quota else n


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """This container's CPU quota in CPUs (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None
    without one."""
    try:
        with open(os.path.join(root, "cpu.max")) as fh:
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as fh:
            quota = int(fh.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as fh:
            period = int(fh.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def job_submission_address(address: str | None = None) -> str | None:
    """Why ``address`` (else ``RAY_ADDRESS``) cannot be run on, naming where it came from: an
    ``http(s)://`` address is a cluster's job-submission (dashboard) address, which docs/cluster.md
    exports for `ray job submit` (ray.init took it for Ray Client: a traceback); None when fine."""
    where = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if not address.lower().startswith(("http://", "https://")):
        return None
    return (f"{where} {address} is a cluster's job-submission (dashboard) address, not one to run on: submit "
            f"with `ray job submit --address {address} -- python ...`, or " +
            ("unset RAY_ADDRESS" if where == "RAY_ADDRESS" else "give the cluster's GCS address (host:6379)") +
            " to run here")


def joined_address(address: str | None = None) -> str | None:
    """The Ray cluster this process joins (``address``, else ``RAY_ADDRESS``), or None where it starts
    a local instance of its own: unset, empty (a Makefile's ``RAY_ADDRESS=``) or Ray's ``local``.
    Every check of "a joined cluster" asks this (they disagreed on the empty value: a local instance
    that skipped the checks against waiting for ever)."""
    address = address or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None
