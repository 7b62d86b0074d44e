"""Starting or joining Ray, sized for the machine it runs on.

Entry points call :func:`ray_runtime` once. On a cluster (``RAY_ADDRESS`` set, e.g. under
``ray job submit``) it joins and leaves the cluster alone; on a laptop it starts a local
instance with explicit resources, because Ray's defaults on a 2-core machine let training
workers starve Ray Data's read tasks.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import ray

# Logical CPUs a local instance advertises per physical core. Ray Data read tasks and light
# drivers claim fractional CPUs; a little oversubscription keeps them from deadlocking behind
# training workers on a 2-core machine while torch threads are capped separately.
LOCAL_CPU_OVERSUBSCRIPTION = 2


@contextlib.contextmanager
def ray_runtime(num_cpus: int | None = None, object_store_mb: int = 1024, *, address: str | None = None,
                dashboard: bool | None = None, log_to_driver: bool = True) -> Iterator[dict]:
    """Join ``address``/``RAY_ADDRESS``/an already-initialised Ray, or start a local one.

    ``dashboard=None`` follows ``DVFL_DASHBOARD`` (on unless it is ``0``). Yields
    ``ray.cluster_resources()``. Shuts down only what it started.
    """
    started = False
    # Ray Data logs two INFO lines per dataset execution (every epoch, from every worker) and
    # resets its logger levels on first use, so a level set here would not stick; its own
    # variable does, and local workers inherit it. RAY_DATA_LOG_LEVEL=INFO brings them back.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            cores = os.cpu_count() or 1
            if dashboard is None:
                dashboard = os.environ.get("DVFL_DASHBOARD", "1") != "0"
            context = ray.init(
                # "local": never silently join some other cluster found through
                # /tmp/ray/ray_current_cluster (possibly stale); RAY_ADDRESS is the way to join
                address="local",
                num_cpus=num_cpus or cores * LOCAL_CPU_OVERSUBSCRIPTION,
                object_store_memory=object_store_mb * 2**20,
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",  # never reachable from other machines by default
                log_to_driver=log_to_driver,
                configure_logging=True,
                logging_level="WARNING",
            )
            started = True
            if dashboard and context.dashboard_url:
                print(f"[ray] local Ray started; dashboard at http://{context.dashboard_url}", flush=True)
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one progress line per stage is ours
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()

