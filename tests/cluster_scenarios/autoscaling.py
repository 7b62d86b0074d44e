"""A real autoscaling run on one machine with Ray's fake multi-node provider, driving our own ingest.

    python tests/cluster_scenarios/autoscaling.py --out DIR --result result.json

The head advertises 0 CPUs (as on the AWS/GCP/KubeRay clusters in cluster/) and runs Ray's
autoscaler (v1, the 2.60 default) with the ``fake_multinode`` node provider, which "launches" a
worker node by starting another raylet on this machine. The job is the product's ingest
(``dvfl.data.ingest``) of a small generated dataset with 2 decode tasks in flight (``workers=2``, as
docs/cluster.md tells users to pass on autoscaling clusters): its 1-CPU decode tasks cannot run on the
head, so the autoscaler must add worker nodes of type ``cpu_worker`` (1 CPU, at most 2); once the
ingest is done the nodes are idle and are removed after ``idle_timeout_minutes`` (a few seconds
here). The node count is sampled throughout; the head advertising 0 CPUs is what puts every decode
task on an added node.

Why not ``ray.cluster_utils.AutoscalingCluster``: its ``start()`` and ``shutdown()`` run
``ray stop --force``, which kills every Ray process of this user on the machine (other jobs, the
test session's own instance), and in the 2.60 wheel the ``example.yaml`` it builds its config from
is missing. So this scenario writes the autoscaler config itself and starts the head with
``ray.cluster_utils.Cluster`` (``autoscaling_config=``), in a private ``RAY_TMPDIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, free_port, log, own_ray_tmpdir  # noqa: E402

WORKER_TYPE = "cpu_worker"
MAX_WORKERS = 2


def autoscaler_config(gcs_address: str, idle_timeout_minutes: float) -> dict:
    """A complete launcher-style config for the fake provider (the autoscaler reads it as is)."""
    return {
        "cluster_name": "dvfl-fake",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,       # the provider's default is <ip>:6379
            "use_node_id_as_ip": True,        # all fake nodes share this machine's IP
            "disable_node_updaters": True,    # nothing to ssh into or set up
            "disable_launch_config_check": True,
            "launch_multiple": True,          # start all requested nodes in one autoscaler round
        },
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1, "object_store_memory": 128 * 2**20}, "node_config": {},
                          "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def queued_launches(session_dir: str) -> list[int]:
    """The autoscaler's own launch decisions ("Queue N new nodes for launch" in its log): how many
    nodes it asked for, whatever the time each launch then took to join."""
    path = os.path.join(session_dir, "logs", "monitor.log")
    with open(path) as f:
        return [int(m.group(1)) for m in re.finditer(r"Queue (\d+) new nodes for launch", f.read())]


class NodeCounter(threading.Thread):
    """Samples the number of alive nodes every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.time()
        self.stopped = threading.Event()

    def alive(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"])

    def run(self):
        while not self.stopped.is_set():
            try:
                self.samples.append((round(time.time() - self.t0, 1), self.alive()))
            except Exception:  # GCS briefly busy: skip a sample
                pass
            self.stopped.wait(self.interval)

    def changes(self) -> list[tuple[float, int]]:
        out = []
        for t, n in self.samples:
            if not out or out[-1][1] != n:
                out.append((t, n))
        return out


def run(out: str, result: dict, idle_timeout_minutes: float, up_timeout_s: float, down_timeout_s: float) -> None:
    import ray
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.cluster_utils import Cluster

    from dvfl.data.adapters import build_manifest
    from dvfl.data.synthetic import SyntheticConfig, generate

    # before Ray starts: the generator forks; 12 real H.264 files (4 classes x (2 train + 1 test))
    generated = generate(os.path.join(out, "videos"), SyntheticConfig(num_classes=4, train_per_class=2,
                                                                      test_per_class=1, unlabeled_videos=0,
                                                                      frames=8, size=32), log=log)
    manifest = build_manifest("synthetic", generated["root"], 1)
    gcs_port = free_port()
    gcs_address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    fd, config_path = tempfile.mkstemp(prefix="autoscaler-", suffix=".json", dir=os.environ["RAY_TMPDIR"])
    with os.fdopen(fd, "w") as f:
        json.dump(autoscaler_config(gcs_address, idle_timeout_minutes), f)

    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 128 * 2**20, "gcs_server_port": gcs_port,
        "include_dashboard": False, "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
        "autoscaling_config": config_path,
        # the provider knows the head by this id (what `ray start` does under RAY_FAKE_CLUSTER)
        "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}})
    result["_cluster"] = cluster
    cluster.connect()
    result["head_start_s"] = round(time.time() - t0, 1)
    result["head_cpus"] = ray.cluster_resources().get("CPU", 0)

    counter = NodeCounter()
    counter.start()
    result["_counter"] = counter

    # 1. the job: our ingest, 2 decode tasks of 1 CPU each in flight on a head with 0 CPUs
    from dvfl.data.ingest import IngestConfig, ingest

    t = time.time()
    outcome: dict = {}

    def job():
        try:
            outcome["summary"] = ingest(manifest, IngestConfig(
                out=os.path.join(out, "clips"), frames=4, clips_per_video=2, eval_clips=1, short_side=16,
                videos_per_shard=4, videos_per_task=1, workers=MAX_WORKERS, timeout_per_file=120, progress=False),
                log=log)
        except BaseException:  # reported in the result, not lost in a thread
            outcome["error"] = traceback.format_exc()

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    runner.join(timeout=up_timeout_s)
    if runner.is_alive() or "error" in outcome:
        raise RuntimeError(f"the ingest did not finish within {up_timeout_s} s: {outcome.get('error')}; "
                           f"node counts {counter.changes()}")
    summary = outcome["summary"]
    result["job_seconds"] = round(time.time() - t, 1)
    result["ingest"] = {k: summary[k] for k in ("inputs", "written_videos", "rejected", "accounting_ok", "clips",
                                                "counts", "shards")}
    result["clips_dir"] = os.path.join(out, "clips")
    # the decode tasks need 1 CPU each and the head has none: every one ran on a node the
    # autoscaler added while the ingest ran
    job = (t - counter.t0, time.time() - counter.t0)  # the samples taken while the ingest ran
    result["max_alive_nodes_during_job"] = max((n for ts, n in counter.samples if job[0] <= ts <= job[1]), default=0)
    result["max_alive_nodes"] = max(n for _, n in counter.samples)
    result["head_node"] = cluster.head_node.node_id
    result["worker_nodes_seen"] = sorted({n["NodeID"] for n in ray.nodes() if n["NodeID"] != cluster.head_node.node_id})
    result["nodes_queued_for_launch"] = queued_launches(cluster.head_node.get_session_dir_path())

    # 2. idle: the workers must go away again
    t = time.time()
    while counter.alive() > 1:
        if time.time() - t > down_timeout_s:
            raise RuntimeError(f"nodes still alive {down_timeout_s} s after the job; counts {counter.changes()}")
        time.sleep(0.5)
    result["scale_down_seconds"] = round(time.time() - t, 1)
    time.sleep(2.0)  # a last few samples at 1 node
    result["final_alive_nodes"] = counter.alive()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--idle-timeout-minutes", type=float, default=0.1)
    ap.add_argument("--up-timeout", type=float, default=180)
    ap.add_argument("--down-timeout", type=float, default=180)
    args = ap.parse_args(argv)
    own_tmp = not os.environ.get("RAY_TMPDIR")
    tmpdir = own_ray_tmpdir("dvfl-as-")
    os.environ.pop("RAY_ADDRESS", None)
    # read by the autoscaler (monitor) process the head starts: fake provider on, 1 s updates
    os.environ["RAY_FAKE_CLUSTER"] = "1"
    os.environ["AUTOSCALER_UPDATE_INTERVAL_S"] = "1"
    result: dict = {"ray_tmpdir": tmpdir, "idle_timeout_minutes": args.idle_timeout_minutes, "ok": False}
    started = time.time()
    try:
        run(os.path.abspath(args.out), result, args.idle_timeout_minutes, args.up_timeout, args.down_timeout)
        result["ok"] = True
    except BaseException:
        result["error"] = traceback.format_exc()
        log(result["error"])
    finally:
        counter = result.pop("_counter", None)
        if counter is not None:
            counter.stopped.set()
            counter.join(timeout=5)
            result["node_count_changes"] = counter.changes()
        finish(result, tmpdir, own_tmp, started, args.result)
        log(f"done in {result['wall_s']} s, ok={result['ok']}: nodes {result.get('node_count_changes')}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
