"""Real multi-node and autoscaling runs on this one machine (issue 7, item 3).

Each scenario (tests/cluster_scenarios/) runs in its own process with its own Ray cluster in a
private temp dir, so the session's ``ray_local`` instance (and anything else on the machine) is
untouched; the scenario writes a result JSON that the test checks. Nothing is mocked: the raylets,
the GCS, Ray Train's failure handling and Ray's autoscaler with its fake multi-node provider are
the real ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dvfl.config import ConfigError, load_config

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "tests" / "cluster_scenarios"


def _run_scenario(script: str, result: Path, *args: str, timeout: int) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    proc = subprocess.run([sys.executable, str(SCENARIOS / script), "--result", str(result), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert result.is_file(), f"{script} wrote no result (rc {proc.returncode}):\n{output[-5000:]}"
    data = json.loads(result.read_text())
    assert proc.returncode == 0 and data["ok"], data.get("error") or output[-5000:]
    # every process of the scenario's cluster is gone (found by its private temp dir)
    assert data["leftover_processes"] == [], data["leftover_processes"]
    return data, output


# ----------------------------------------------------------------------------- scaling.worker_resources
def test_worker_resources_config():
    cfg = load_config(None, [("scaling.worker_resources", {"train_node": 1})])
    assert cfg.scaling.worker_resources == {"train_node": 1}
    assert load_config(None).scaling.worker_resources is None
    for bad, match in [({"CPU": 1}, "custom resources only"), ({"train_node": 0}, "must be > 0"),
                       ({"train_node": "1"}, "must be > 0"), ([1], "must be dict")]:
        with pytest.raises(ConfigError, match=r"scaling\.worker_resources .*" + re.escape(match)):
            load_config(None, [("scaling.worker_resources", bad)])


# ----------------------------------------------------------------------------- multi-node
@pytest.mark.slow
def test_multinode_ingest_cache_and_distillation_survive_a_killed_node(tmp_path, s3_server):
    """Ingest, teacher cache and 2-worker distillation on a 3-node cluster (ray.cluster_utils.Cluster)
    with every artefact on S3 (moto's server: no disk shared by the nodes is relied on); the node
    hosting rank 1 is killed mid-epoch 2 and training resumes from epoch 1's checkpoint, read back
    from the bucket."""
    from conftest import s3_objects

    uri = f"s3://{s3_server['new_bucket']()}/mn"
    r, output = _run_scenario("multinode_recovery.py", tmp_path / "result.json", "--out", str(tmp_path / "run"),
                              "--storage", uri, timeout=600)
    head = r["head_node"]
    assert len(r["nodes_at_start"]) == 3
    assert 0 < r["ingest"]["train_clips"] < r["ingest"]["clips"] and r["cache"]["rows"] == r["ingest"]["train_clips"]
    # on the bucket: shards written by the decode tasks (one video per task: pieces merged), the
    # teacher, its cache, Ray Train's checkpoints, the student; locally only the source videos and the hook
    s = r["ingest_summary"]
    assert s["accounting_ok"] and s["written_videos"] == s["inputs"] == 24 and s["shards"] == 2
    objects = s3_objects(uri)
    assert sorted(k for k in objects if k.startswith("clips/shards/") and k.endswith(".parquet")) == [
        "clips/shards/test-00000.parquet", "clips/shards/train-00000.parquet"]
    assert not [k for k in objects if "_parts/" in k]   # merged and removed
    assert r["storage"] == uri and r["student_on_storage"] and r["checkpoint_snapshots"] >= 1
    assert r["checkpoint_snapshots_after"] == 0  # the run's checkpoints go once its model is saved
    assert r["checkpoint_before_kill"]["path"].startswith(uri + "/ray_results/")
    assert "teacher_random/model.pt" in objects and "teacher_cache/cache.json" in objects
    assert sorted(os.listdir(tmp_path / "run")) == ["hold", "videos"]

    # the two DDP workers ran on the two worker nodes, not on the head
    rank_nodes = {int(k): v["node_id"] for k, v in r["ranks_before_kill"].items()}
    assert len(set(rank_nodes.values())) == 2 and head not in rank_nodes.values()

    # the failure happened: rank 1's node was removed mid-epoch 2, its worker process died
    assert r["killed"]["rank1_process_gone"]
    assert rank_nodes[1] in r["dead_nodes"] and rank_nodes[1] not in r["nodes_at_end"]
    assert r["replacement_node"] in r["nodes_at_end"]

    # ... and Ray Train restarted the worker group from epoch 1's checkpoint
    ckpt = r["checkpoint_before_kill"]
    assert ckpt["epoch_index"] == 0 and [h["epoch"] for h in ckpt["history"]] == [1]
    assert "resumed from checkpoint after epoch 1" in output
    history = r["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # contiguous, no restart from epoch 1
    assert history[0] == ckpt["history"][0]  # epoch 1 was restored, not trained again
    per_epoch = history[0]["steps"]
    assert per_epoch > 0 and [h["steps"] for h in history] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    # distillation from the cache: no teacher forward in any epoch (a live teacher gives train_kd > 0 too)
    assert all(h["train_kd"] > 0 and h["teacher_forward_calls"] == 0 for h in history)


# ----------------------------------------------------------------------------- autoscaling
@pytest.mark.slow
def test_autoscaler_adds_nodes_for_our_ingest_and_removes_them_when_idle(tmp_path):
    """Ray's autoscaler with the fake multi-node provider: our ingest (2 one-CPU decode tasks in
    flight) on a 0-CPU head makes it launch 2 worker nodes; the ingest's output is complete and right;
    idle for 6 s (idle_timeout_minutes=0.1), the nodes are removed again."""
    from dvfl.data.shards import load_dataset_info, read_clips_table

    r, output = _run_scenario("autoscaling.py", tmp_path / "result.json", "--out", str(tmp_path / "run"),
                              "--idle-timeout-minutes", "0.1", timeout=480)
    counts = [n for _, n in r["node_count_changes"]]
    assert r["head_cpus"] == 0 and counts[0] == 1
    # the autoscaler asked for the 2 one-CPU nodes the job's 2 decode tasks need, and nodes joined while
    # the job ran. How many were alive at once depends on launch times: under CI load the ingest has
    # finished on the first node before the second joined (seen: at most 2 alive), so that is recorded only.
    assert sum(r["nodes_queued_for_launch"]) >= 2, r["nodes_queued_for_launch"]
    assert r["max_alive_nodes_during_job"] >= 2 and len(r["worker_nodes_seen"]) >= 1
    assert counts[-1] == 1 and r["final_alive_nodes"] == 1  # back to the head alone
    # the job's output: every one of the 12 videos decoded (on the added nodes: the head has no CPU)
    # into 2 training clips or 1 test clip, in 3 complete shards
    ingest = r["ingest"]
    assert ingest["inputs"] == ingest["written_videos"] == 12 and ingest["rejected"] == 0 and ingest["accounting_ok"]
    assert ingest["counts"] == {"train": {"videos": 8, "clips": 16}, "test": {"videos": 4, "clips": 4}}
    info = load_dataset_info(r["clips_dir"])
    clips = read_clips_table(r["clips_dir"], columns=["video_id", "split", "num_frames", "height", "width"])
    assert info["clips"] == clips.num_rows == 20 and len(info["shards"]) == ingest["shards"] == 3
    assert set(clips.column("num_frames").to_pylist()) == {4} and set(clips.column("height").to_pylist()) == {16}
    assert len(set(clips.column("video_id").to_pylist())) == 12
    assert "[ingest] synthetic: 12 inputs" in output


# ----------------------------------------------------------------------------- a path only the head has
def _ray_start(args: list[str], env: dict, prefix: list[str] = ()) -> subprocess.Popen:
    """``ray start ... --block`` with ports of its own (the session's Ray holds the defaults), in a
    process group of its own: stopped by killing that group (`ray stop` would stop every Ray here)."""
    ports = [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port")]
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.Popen([*prefix, ray_bin, "start", *args, *ports, "--num-cpus=1", "--object-store-memory=100000000",
                             "--block", "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_local_path_another_node_does_not_see_is_refused_before_any_work(tmp_path, video_factory):
    """A two-node cluster whose worker node has its own view of one folder (a mount namespace with a
    tmpfs over it: the head's local disk as another machine sees it). An ingest joining it with its
    videos and --out in that folder failed video by video on the other node, or wrote shards there
    that no one read; now it is refused before any work, naming each path and the node. The probe's
    marker is gone. So is a search whose student start weights only the head has (its trials load
    them wherever Tune places them), and a teacher whose --test-config's clips only the head has."""
    import signal
    import tempfile
    import time

    head_only = tmp_path / "head-only"
    videos = head_only / "videos"
    for i, cls in enumerate(("a", "a", "b", "b")):
        (videos / cls).mkdir(parents=True, exist_ok=True)
        video_factory(str(videos / cls / f"v{i}.mp4"), n=12, seed=i)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token of the machine's user: no token asked for
    temp_dir = tempfile.mkdtemp(prefix="rayprobe", dir="/tmp")  # short: Ray's unix sockets live in it
    port = free_port()
    nodes = [_ray_start(["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                         f"--ray-client-server-port={free_port()}"], env)]
    try:
        join = [f"--address=127.0.0.1:{port}"]
        # a mount namespace of its own (as root; otherwise inside a user namespace, where an
        # unprivileged user may mount a tmpfs too)
        unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
        nodes.append(_ray_start(join, env, prefix=[*unshare, "--propagation", "private", "sh", "-c",
                                                   f'mount -t tmpfs tmpfs "$0" && exec "$@"', str(head_only)]))
        ingest = [sys.executable, str(REPO / "pipelines" / "ingest.py"), "--dataset", "folder", "--root", str(videos),
                  "--test-fraction", "0.5", "--quiet"]
        deadline = time.time() + 120
        while True:  # until the worker node has joined
            status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address=127.0.0.1:{port}"],
                                    env=env, capture_output=True, text=True, timeout=60)
            if status.stdout.count("node_") >= 2 or time.time() > deadline:
                break
            time.sleep(1)
        assert status.stdout.count("node_") >= 2, status.stdout + status.stderr
        # its output and its videos only on the head: a decode task on the other node would find
        # no video (an input: a copy at the same path would do) and write its shard where no one looks
        r = subprocess.run(ingest + ["--out", str(head_only / "clips")], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        assert re.search(rf"^config error: --out {re.escape(str(head_only / 'clips'))} is not on node \S+ \(node id "
                         rf"[0-9a-f]{{8}}\); --root {re.escape(str(videos))} is not on node \S+ \(node "
                         r"id [0-9a-f]{8}\): Ray's tasks on other nodes", r.stderr, re.M), r.stderr[-3000:]
        assert r.stderr.count("is not on node") == 2 and "Traceback" not in r.stderr  # the head itself sees both
        assert sorted(os.listdir(head_only)) == ["videos"]  # no marker left, nothing ingested

        # a search's trials load the student's start weights where Tune places them: the search
        # with weights only the head has (its run folder shared) is refused too, before any trial
        import torch
        from conftest import TINY, set_args

        from dvfl.models import build_model
        from dvfl.pipeline import model_kwargs

        tiny = load_config(None, TINY)
        weights = head_only / "student.pt"
        torch.save(build_model(tiny.student.model, **model_kwargs(tiny.student, 4, tiny)).state_dict(), weights)
        search = [sys.executable, str(REPO / "tuning" / "search.py"), "--out", str(tmp_path / "run"),
                  *set_args([*TINY, ("tune.asha.grace_period", 1), ("student.checkpoint", str(weights)),
                             ("tune.space.student.embed_dim", {"choice": [8]})])]
        r = subprocess.run(search, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        assert re.search(rf"^config error: student\.checkpoint {re.escape(str(weights))} is not on node \S+ \(node id "
                         r"[0-9a-f]{8}\): Ray's tasks on other nodes", r.stderr, re.M), r.stderr[-3000:]
        assert r.stderr.count("is not on node") == 1 and "Traceback" not in r.stderr
        assert not (tmp_path / "run" / "tune").exists()

        # a teacher whose accuracy is to be taken on a --test-config's clips only the head would
        # hold: refused before the training (its decode tasks wrote shards where they ran, found
        # missing after hours of training). Its teacher.cache, which training a teacher never
        # touches, is not looked for (it was, and refused a run that needs none).
        from dvfl.config import dump_config

        test_config = tmp_path / "test.yaml"
        dump_config(load_config(None, [*TINY, ("output_dir", str(head_only / "test-run"))]), test_config)
        teacher = [sys.executable, str(REPO / "pipelines" / "train_teacher.py"), "--config", str(REPO / "configs" / "embedded.yaml"),
                   *set_args([*TINY, ("output_dir", str(tmp_path / "teacher-run")), ("teacher.path", str(tmp_path / "teacher")),
                              ("teacher.cache", str(head_only / "cache"))]),
                   "--publish", str(tmp_path / "published"), "--test-config", str(test_config)]
        r = subprocess.run(teacher, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        test_run = re.escape(str(head_only / "test-run"))
        assert re.search(rf"^config error: --test-config output_dir {test_run} is not on node \S+ \(node id [0-9a-f]{{8}}\); "
                         rf"--test-config data\.clips {test_run}/clips is not on node .*: Ray's tasks", r.stderr, re.M), \
            r.stderr[-3000:]
        assert r.stderr.count("is not on node") == 2 and "Traceback" not in r.stderr
        assert not (tmp_path / "teacher").exists()
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
        time.sleep(3)
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
