"""Starting or joining Ray, sized for the machine it runs on.

Entry points call :func:`ray_runtime` once. On a cluster (``RAY_ADDRESS`` set, e.g. under
``ray job submit``) it joins and leaves the cluster alone; on a laptop it starts a local
instance with explicit resources, because Ray's defaults on a 2-core machine let training
workers starve Ray Data's read tasks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from typing import Iterator

import ray

from dvfl.host import job_submission_address, joined_address
# (light, in their own module: a command installs the handler before any work; again after ray.init)
from dvfl.signals import note_sigterm, sigterm_received, terminate_in_one_line  # noqa: F401

# Logical CPUs a local instance advertises per physical core. Ray Data read tasks and light
# drivers claim fractional CPUs; a little oversubscription keeps them from deadlocking behind
# training workers on a 2-core machine while torch threads are capped separately.
LOCAL_CPU_OVERSUBSCRIPTION = 2


# Lines from Ray that are not about the user's job, matched exactly (see quiet_known_noise):
# Ray core's notice that a restartable actor got constructor arguments through the object store
# (Ray Train's PreemptionWatcher and Ray Data's actor-pool workers always do, ray-project/ray#53727),
# Ray Data's "progress bars disabled" notice, which every process that runs a dataset prints
# once because we turn its bars off (our stages print one progress line each), and Ray Train's
# PlacementGroupCleaner warning, printed every second of a training run when the local instance
# has no dashboard (DVFL_DASHBOARD=0: the State API it polls is not there; the run is unaffected).
RAY_NOISE = (
    r"core_worker\.cc:\d+: Actor with class name: '(PreemptionWatcher|MapWorker\([^']*\))' and ID: "
    r"'[0-9a-f]+' has constructor arguments in the object store and max_restarts > 0\."
    r"|^Progress bars (for operators )?disabled\. To enable, set `ray\.data\.DataContext"
    r"|^Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable\. "
    r"Continuing to monitor"
)

# the lines our training loops print from Ray workers: "[dvfl s0] epoch 3/12: ...", "[teacher]
# resumed from checkpoint ...": a lower-case tag in brackets (torch's "[W1204 ...]" warnings are not)
OUR_LINES = r"^\[[a-z][\w+.-]*(?: [\w+.-]+)*\] "


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class RayAddressError(ConnectionError):
    """The address to join is not one Ray runs on (:func:`dvfl.host.job_submission_address`)."""


def quiet_known_noise() -> None:
    """Drop the lines in :data:`RAY_NOISE` (and, for a local instance, Ray's notice that token
    authentication is on) from the driver's terminal, and the "(ActorName pid=...)" prefix Ray puts
    on forwarded worker lines; everything else, errors included, still shows, and our own tagged
    lines (:data:`OUR_LINES`) are never folded by Ray's deduplicator. Call before ray.init.

    Worker lines reach the driver through Ray's log deduplicator, whose skip pattern (the one
    ``RAY_DEDUP_LOGS_SKIP_REGEX`` sets) is extended here; the driver's own notices are Python log
    records, filtered by message on their loggers. Idempotent.
    """
    from ray._private import ray_constants, ray_logging

    # our lines carry their own tag ("[dvfl s0] epoch 3/12: ..."); Ray's "(LoopRunner pid=...)" in
    # colour before each would only bury it (RAY_DISABLE_WORKER_LOG_PREFIX=0 brings it back)
    prefix_off = os.environ.get("RAY_DISABLE_WORKER_LOG_PREFIX", "1").lower()
    ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX = prefix_off in ("1", "true")
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        current = dedup.skip_re.pattern if dedup.skip_re is not None else None
        if current is None or RAY_NOISE not in current:
            dedup.skip_re = re.compile(RAY_NOISE if current is None else f"{current}|{RAY_NOISE}")
        # Ray folds lines that differ only in digits from several processes into one "[repeated
        # Nx across cluster]": two runs' epoch lines ("[dvfl s0] ...", "[dvfl s1] ...") would merge
        current = dedup.allow_re.pattern if dedup.allow_re is not None else None
        if current is None or OUR_LINES not in current:
            dedup.allow_re = re.compile(OUR_LINES if current is None else f"{current}|{OUR_LINES}")
    for name, pattern in (("ray.data._internal.progress", RAY_NOISE),
                          ("ray._private.authentication.authentication_token_setup",
                           r"^Token authentication is enabled for this Ray cluster\.")):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))


def job_env_var_keys() -> set:
    """The variables the submitted job's runtime env sets (``ray job submit --runtime-env-json``,
    a RayJob's ``runtimeEnvYAML``), which Ray hands its driver in ``RAY_JOB_CONFIG_JSON_ENV_VAR``."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return set(((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})) if raw else set()
    except (ValueError, AttributeError):
        return set()


@contextlib.contextmanager
def signal_handlers_kept(*signums: int):
    """Ray Train's and Ray Tune's fit() install Ctrl+C handlers for their run and leave them
    installed: after the run they swallowed the next Ctrl+C presses. The caller's handlers come back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    saved = {n: signal.getsignal(n) for n in signums} if main else {}
    try:
        yield
    finally:
        for n, handler in saved.items():
            if handler is not None:
                signal.signal(n, handler)


def worker_bundle(scaling) -> dict:
    """What one training worker (or runner actor) of a config's ``scaling`` asks Ray for, all on one node."""
    return {"CPU": float(scaling.cpus_per_worker), **({"GPU": 1.0} if scaling.use_gpu else {}),
            **(scaling.worker_resources or {})}


def alive_node_resources() -> list[dict]:
    """Each alive node's total resources, as Ray lists them."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def note_no_node_holds(what: str, bundle: dict, nodes: list[dict], remedy: str) -> None:
    """On a joined cluster (left to its autoscaler) an actor or worker that fits no node waited
    without a word until an autoscaler added one, or for ever: one line says so before the wait."""
    if any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
        return
    wants = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    have = "; ".join(", ".join(f"{node.get(k, 0.0):g} {k}" for k in bundle) for node in nodes) or "none alive"
    print(f"[ray] note: {what} needs {wants} on one node, and no node of the cluster has them now (its nodes: "
          f"{have}): it waits until the cluster's autoscaler adds such a node; Ctrl+C to stop, or {remedy}",
          file=sys.stderr, flush=True)


NO_PATH_PROBE_ENV = "DVFL_NO_PATH_PROBE"  # 1: skip it (a shared mount slow to show a new file on other nodes)
PROBE_TIMEOUT_S = 60.0  # a node that does not answer by then (being removed, say) is not judged


def _node_sees(wanted: dict) -> dict:
    """On one node: which of ``wanted`` (field -> (path, size or None)) it finds as the driver does."""
    seen = {}
    for field, (path, size) in wanted.items():
        try:
            found = os.stat(path).st_size
            seen[field] = size is None or found == size
        except OSError:
            seen[field] = False
    return seen


def unseen_local_paths(outputs: dict, inputs: dict | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """On a cluster of several nodes, each local path (field -> path; URIs and None skipped) is
    looked for on every alive node, where Ray's tasks write or read it: a folder only the
    driver's node has (the head's disk under a job's working directory) failed later, deep inside
    the ingest, the cache or training. An output folder (or the nearest one above it, made later)
    gets a marker file, removed after: the nodes must share it. An input need only be there, as
    a copy or shared: the path and its first entry, of the same size. A path the driver cannot
    judge (an output folder it may not write, an input it does not have) is left to the command.
    Returns one line per path a node does not see."""
    import uuid

    from dvfl import storage

    if not ray.is_initialized() or os.environ.get(NO_PATH_PROBE_ENV) == "1":
        return []
    local = {kind: {f: storage.local_path(p) for f, p in (paths or {}).items()
                    if p and storage.local_path(p) is not None}
             for kind, paths in (("out", outputs), ("in", inputs))}
    # every node, the driver's own too (its raylet's view is the one its tasks get), but only where
    # there are several: a one-node run pays nothing
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not (local["out"] or local["in"]) or len(nodes) < 2:
        return []
    # (a field may be an output or an input, None in the other: e.g. clips made, or still to make)
    wanted, written, given = {}, [], {k: v for d in (inputs or {}, outputs) for k, v in d.items() if v}
    try:
        for field, path in local["out"].items():
            folder = path
            while not os.path.isdir(folder) and os.path.dirname(folder) != folder:  # (made later)
                folder = os.path.dirname(folder)
            marker = os.path.join(folder, f".dvfl-node-probe-{uuid.uuid4().hex[:12]}")
            try:
                with open(marker, "w"):
                    pass
            except OSError:
                continue
            written.append(marker)
            wanted[field] = (marker, None)
        for field, path in local["in"].items():
            try:
                entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
                probe = os.path.join(path, entries[0]) if entries else path
                wanted[field] = (probe, os.stat(probe).st_size if os.path.isfile(probe) else None)
            except OSError:
                continue
        if not wanted:
            return []
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        check = ray.remote(num_cpus=0, max_retries=0)(_node_sees)
        refs = {check.options(name="dvfl-path-probe", scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(wanted): n for n in nodes}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        unseen = []
        for ref in done:
            node = refs[ref]
            try:
                seen = ray.get(ref)
            except Exception:  # (a node lost meanwhile)
                continue
            where = f"{node.get('NodeManagerAddress', '?')} (node id {node['NodeID'][:8]})"
            unseen += [f"{field} {given[field]} is not on node {where}" for field, ok in seen.items() if not ok]
        return unseen
    finally:
        for marker in written:
            try:
                os.unlink(marker)
            except OSError:
                pass


def init_ray(**kwargs):
    """``ray.init``, a SIGTERM during it unwound as Ctrl+C: its first act installs a handler that exits
    with status 15, and ours is back only once it returns (seconds of a local start: exit 15, no line)."""
    import signal

    try:
        return ray.init(**kwargs)
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        note_sigterm()
        raise KeyboardInterrupt from None


@contextlib.contextmanager
def ray_runtime(num_cpus: int | None = None, object_store_mb: int = 1024, *, address: str | None = None,
                dashboard: bool | None = None, log_to_driver: bool = True) -> Iterator[dict]:
    """Join ``address``/``RAY_ADDRESS``/an already-initialised Ray, or start a local one.

    ``dashboard=None`` follows ``DVFL_DASHBOARD`` (on unless it is ``0``). Yields
    ``ray.cluster_resources()``. Shuts down only what it started.
    """
    started = False
    quiet_known_noise()
    # Ray Data logs two INFO lines per dataset execution (every epoch, from every worker) and
    # resets its logger levels on first use, so a level set here would not stick; its own
    # variable does, and local workers inherit it. RAY_DATA_LOG_LEVEL=INFO brings them back.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not ray.is_initialized():
        refusal = job_submission_address(address)
        if refusal:
            raise RayAddressError(refusal)
        address = joined_address(address)
        if address:  # (unset, empty or Ray's "local": a new local instance, ours, set up below)
            from dvfl.storage import worker_env

            # the S3 endpoint (never credentials) and Ray Data's log level reach the job's workers,
            # which a joined cluster started without this process's environment (unless the job's
            # own runtime env sets them: Ray refuses a key named twice)
            env = {k: v for k, v in {**worker_env(), "RAY_DATA_LOG_LEVEL": os.environ["RAY_DATA_LOG_LEVEL"]}.items()
                   if k not in job_env_var_keys()}
            init_ray(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": env} if env else None)
            terminate_in_one_line()
        else:
            from dvfl.host import usable_cpus

            cores = usable_cpus()
            if dashboard is None:
                dashboard = os.environ.get("DVFL_DASHBOARD", "1") != "0"
            context = init_ray(
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
            terminate_in_one_line()
            if dashboard and context.dashboard_url:
                print(f"[ray] local Ray started; dashboard at http://{context.dashboard_url}", flush=True)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one progress line per stage is ours
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()

