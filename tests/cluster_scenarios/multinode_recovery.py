"""A real multi-node run on one machine, and a worker node killed mid-training.

    python tests/cluster_scenarios/multinode_recovery.py --out DIR --result result.json

Ray's own multi-node test utility (``ray.cluster_utils.Cluster``) starts three raylets on this
machine: a head (1 CPU: the driver, Ray Data) and two worker nodes (1 CPU each) that advertise a
custom resource ``train_node``. The product's own stages run on that cluster:

1. ingest (Ray Data decode tasks; 2 concurrent 1-CPU tasks cannot both fit on the 1-CPU head);
2. the teacher-logit cache (Ray Data actor pool) for a tiny teacher;
3. cached-KD distillation with 2 DDP workers that each need ``train_node: 1``
   (``scaling.worker_resources``), so the two workers run on the two worker nodes.

Mid-way through epoch 2 (both ranks paused by the ``DVFL_HOLD_AFTER_EPOCH`` hook after their first
step, epoch 1's checkpoint persisted), the node hosting rank 1 is removed (all its processes
killed), a replacement node joins, and the workers are released. Ray Train's FailureConfig restarts
the worker group, which resumes from epoch 1's checkpoint and finishes. The result JSON records the
evidence; tests/test_cluster_runs.py asserts on it.

With ``--storage s3://BUCKET/PREFIX`` (an S3 endpoint from AWS_ENDPOINT_URL) every artefact is
on object storage, as a real multi-node cluster needs (no shared disk): the clips (ingested on
the cluster with one video per decode task, so shards are written by their tasks in pieces and
merged), the teacher, its logit cache, Ray Train's checkpoints, the student. Only the source
videos and the test hook's hold folder are local (under ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, free_port, log, own_ray_tmpdir  # noqa: E402

EPOCHS = 3
HOLD_AFTER_EPOCH = 1  # pause (and kill a node) after the first step of epoch 2
NODE_RESOURCE = "train_node"


def process_gone(pid: int, timeout_s: float) -> bool:
    """True once ``pid`` has exited (or is a zombie nobody reaped yet)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.2)
    return False


def tiny_config(out: str, teacher_path: str | None = None, clips: str | None = None):
    from dvfl.config import load_config

    overrides = [
        ("output_dir", out), ("name", "multinode"), ("baseline", False), ("max_failures", 1),
        ("data.synthetic.unlabeled_videos", 0),
        ("data.synthetic.num_classes", 4), ("data.synthetic.train_per_class", 4),
        ("data.synthetic.test_per_class", 2), ("data.synthetic.size", 32), ("data.synthetic.frames", 8),
        ("data.clips_per_video", 2), ("data.synthetic.label_noise", 0.0),  # pinned: the embedded default may change
        ("data.synthetic.val_per_class", 0),
        ("data.short_side", 16), ("data.frames", 4),  # decord fails on 16 px sources
        ("student.embed_dim", 8), ("optim.epochs", EPOCHS), ("optim.batch_size", 4),  # 8 clips: a full batch per worker
        ("scaling.num_workers", 2), ("scaling.cpus_per_worker", 0.5), ("scaling.concurrent_runs", 0),
        ("scaling.worker_resources", {NODE_RESOURCE: 1}),
        # a random tiny teacher made here (not the default's shipped one: 8 classes, width 48)
        ("teacher.path", teacher_path), ("teacher.train.embed_dim", 16),
    ]
    if clips:
        overrides.append(("data.clips", clips))
    return load_config(None, overrides)


def _checkpoint_snapshots(storage_path: str) -> list[str]:
    """Ray Train's checkpoint manager snapshots under ``storage_path`` (a local path or a URI)."""
    import pyarrow.fs as pafs

    from dvfl import storage

    fs, root = storage.filesystem(storage_path)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    return [storage.join(storage_path, i.path[len(root) + 1:]) for i in infos
            if i.type == pafs.FileType.File and i.path.endswith("/checkpoint_manager_snapshot.json")]


def run(out: str, result: dict, remote: str | None = None) -> None:
    import io

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from dvfl import pipeline, storage
    from dvfl.artifacts import save_model
    from dvfl.models import build_model
    from dvfl.data.shards import load_dataset_info

    local = tiny_config(out)
    pipeline.ensure_videos(local, log=None)  # before Ray: the generator forks
    cfg = tiny_config(remote, clips=storage.join(remote, "clips")) if remote else local

    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 192 * 2**20,
        "include_dashboard": False, "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    result["_cluster"] = cluster
    workers = [cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20, resources={NODE_RESOURCE: 1})
               for _ in range(2)]
    cluster.wait_for_nodes()
    cluster.connect()
    head_id = cluster.head_node.node_id
    result["cluster_start_s"] = round(time.time() - t0, 1)
    result["head_node"] = head_id
    result["nodes_at_start"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    log(f"cluster up: head {head_id[:8]} + workers {[w.node_id[:8] for w in workers]}")

    # 1. ingest on the cluster
    t = time.time()
    if remote:
        from dvfl.data.adapters import build_manifest
        from dvfl.data.ingest import IngestConfig, ingest

        d = cfg.data
        s = ingest(build_manifest("synthetic", os.path.join(out, "videos"), 1),
                   IngestConfig(out=cfg.clips_dir, frames=d.frames, clips_per_video=d.clips_per_video,
                                eval_clips=d.eval_clips, short_side=d.short_side, seed=cfg.seed, videos_per_task=1), log=log)
        result["ingest_summary"] = s
    info = pipeline.ensure_clips(cfg, log=log)
    result["ingest"] = {"clips": info["clips"], "videos": info["written_videos"], "seconds": round(time.time() - t, 1),
                        "train_clips": sum(s["clips"] for s in info["shards"] if s["split"] == "train")}

    # 2. a tiny teacher (random init: the point here is the cache and KD plumbing on a cluster)
    num_classes = len(info["classes"])
    kwargs = pipeline.model_kwargs(cfg.teacher.train, num_classes, cfg)
    torch.manual_seed(0)
    teacher_dir = storage.join(cfg.output_dir, "teacher_random")
    save_model(teacher_dir, build_model(cfg.teacher.train.model, **kwargs), cfg.teacher.train.model, kwargs)
    cfg = tiny_config(cfg.output_dir, teacher_dir, clips=cfg.data.clips)
    teacher_path, teacher_spec = pipeline.ensure_teacher(cfg, info, log=log)
    t = time.time()
    cache = pipeline.ensure_cache(cfg, teacher_path, log=log)
    result["cache"] = {"rows": cache["rows"], "seconds": round(time.time() - t, 1)}

    # 3. distillation with 2 workers on the 2 worker nodes; pause mid-epoch 2, kill rank 1's node
    hold_dir = os.path.join(out, "hold")
    os.makedirs(hold_dir, exist_ok=True)
    os.environ[pipeline.HOLD_ENV] = str(HOLD_AFTER_EPOCH)
    os.environ[pipeline.HOLD_DIR_ENV] = hold_dir
    kd = pipeline.teacher_signal(cfg, teacher_path, teacher_spec, load_dataset_info(cfg.clips_dir), kd=True)
    outcome: dict = {}

    def train():
        try:
            outcome["path"] = str(pipeline.train_student(cfg, info, kd, cfg.seed, log=log))
        except BaseException as exc:  # reported in the result, not lost in a thread
            outcome["error"] = "".join(traceback.format_exception(exc))

    t = time.time()
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    held = [os.path.join(hold_dir, f"held-rank{r}.json") for r in (0, 1)]
    deadline = time.time() + 300
    while not all(map(os.path.exists, held)):
        if not trainer.is_alive() or time.time() > deadline:
            raise RuntimeError(f"workers never paused in epoch {HOLD_AFTER_EPOCH + 1}: {outcome}")
        time.sleep(0.2)
    ranks = {r: json.load(open(p)) for r, p in enumerate(held)}
    result["ranks_before_kill"] = ranks
    # epoch 1's checkpoint, once Ray Train's controller has registered it: it writes its checkpoint
    # manager snapshot (ray 2.60's format) under the run directory when it does
    ray_storage = storage.join(cfg.output_dir, pipeline.RAY_RESULTS)
    registered = None
    while registered is None:
        if time.time() > deadline:
            raise RuntimeError("epoch 1's checkpoint was never registered")
        for snap in _checkpoint_snapshots(ray_storage):
            try:
                latest = storage.read_json(snap).get("latest_checkpoint_result") or {}
            except (ValueError, FileNotFoundError):  # being written
                continue
            if latest.get("metrics", {}).get("epoch") == 1:
                registered = storage.join(storage.dirname(snap), latest["checkpoint_dir_name"])
        time.sleep(0.2)
    state_bytes = storage.read_bytes(storage.join(registered, "state.pt"))
    state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    result["checkpoint_before_kill"] = {"path": registered, "epoch_index": state["epoch"], "step": state["step"],
                                        "history": state["history"]}
    victim = next(w for w in workers if w.node_id == ranks[1]["node_id"])
    result["checkpoint_snapshots"] = len(_checkpoint_snapshots(ray_storage))
    log(f"killing node {victim.node_id[:8]} (rank 1, pid {ranks[1]['pid']}) mid-epoch {HOLD_AFTER_EPOCH + 1}")
    cluster.remove_node(victim, allow_graceful=False)
    result["killed"] = {"node_id": victim.node_id, "rank": 1, "at_s": round(time.time() - t, 1),
                        "rank1_process_gone": process_gone(ranks[1]["pid"], timeout_s=30)}
    replacement = cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20, resources={NODE_RESOURCE: 1})
    result["replacement_node"] = replacement.node_id
    open(os.path.join(hold_dir, "release"), "w").close()
    trainer.join(timeout=420)
    if trainer.is_alive():
        raise RuntimeError("training did not finish within 420 s after the node was killed")
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    result["train_seconds"] = round(time.time() - t, 1)
    spec = storage.read_json(storage.join(outcome["path"], "model.json"))
    result["storage"] = cfg.output_dir
    result["student_on_storage"] = storage.isfile(storage.join(outcome["path"], "model.pt"))
    # (the run's checkpoints are removed once its model is saved)
    result["checkpoint_snapshots_after"] = len(_checkpoint_snapshots(ray_storage))
    result["history"] = spec["history"]
    result["student_dir"] = outcome["path"]
    result["nodes_at_end"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    result["dead_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if not n["Alive"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--storage", default=None,
                    help="s3://BUCKET/PREFIX (or gs://): every artefact there; --out keeps the source videos")
    args = ap.parse_args(argv)
    own_tmp = not os.environ.get("RAY_TMPDIR")
    tmpdir = own_ray_tmpdir("dvfl-mn-")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    result: dict = {"ray_tmpdir": tmpdir, "ok": False}
    started = time.time()
    try:
        run(os.path.abspath(args.out), result, args.storage)
        result["ok"] = True
    except BaseException:
        result["error"] = traceback.format_exc()
        log(result["error"])
    finally:
        finish(result, tmpdir, own_tmp, started, args.result)
        log(f"done in {result['wall_s']} s, ok={result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
