"""Every artefact on object storage: the pipelines run against a real S3 API server (moto's
standalone server, ``s3_server`` in conftest.py) through the AWS_ENDPOINT_URL it sets, as a user
would against any S3-compatible endpoint. The entry points run as subprocesses with their own
local Ray, so their workers inherit the endpoint and the dummy credentials.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pyarrow.parquet as pq
import pytest

from conftest import cli_in_process, s3_objects

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INGEST = os.path.join(REPO, "pipelines", "ingest.py")
DISTILL = os.path.join(REPO, "pipelines", "distill.py")
SEARCH = os.path.join(REPO, "tuning", "search.py")
SMALL = ["--synthetic-classes", "4", "--train-per-class", "8", "--test-per-class", "1", "--videos-per-shard", "4",
         "--video-size", "32", "--num-cpus", "3", "--object-store-mb", "256", "--quiet"]


def _env(s3_server, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_server["env"], DVFL_SPOOL_DIR=str(tmp_path / "spool"), **extra)
    os.makedirs(env["DVFL_SPOOL_DIR"], exist_ok=True)
    return env


def _run(args, env, cwd, timeout=300):
    r = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       start_new_session=True)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return r


def _shard_hashes_local(out):
    d = os.path.join(out, "shards")
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(d)) if n.endswith(".parquet")}


def _shard_hashes_s3(uri):
    from dvfl import storage

    return {k[len("shards/"):]: hashlib.sha256(storage.read_bytes(f"{uri}/{k}")).hexdigest()
            for k in s3_objects(uri) if k.startswith("shards/") and k.endswith(".parquet") and "/_meta/" not in k}


def test_an_init_checkpoint_replaced_on_s3_changes_the_runs_identity(s3_server):
    """A run's identity held only the size of an init checkpoint on object storage: one replaced by
    another of the same architecture (same size) reused the models trained from the old weights."""
    from types import SimpleNamespace

    from dvfl import storage
    from dvfl.pipeline import init_identity

    key = f"s3://{s3_server['new_bucket']()}/init/ck.pt"
    section = SimpleNamespace(checkpoint=key, init_2d=None, reinit_head=False)
    storage.write_bytes(key, b"a" * 200_000)
    first = init_identity(section)
    storage.write_bytes(key, b"a" * 199_999 + b"b")  # the same size, another last byte
    second = init_identity(section)
    assert first["init_weights"][0] == second["init_weights"][0] == 200_000 and first != second


def test_a_model_folder_on_s3_is_served_from_there(s3_server):
    """`serve run dvfl.serve:build_app model=s3://...` (a student distill wrote to a bucket): its
    arguments were checked on local disk (refused: "not a model directory") and the path made
    absolute (./s3:/...); the replica's own load reads the bucket."""
    from dvfl import storage
    from dvfl.inference import Predictor
    from dvfl.serve import ServeSettings, build_app

    uri = f"s3://{s3_server['new_bucket']()}/models/teacher"
    for name in ("model.json", "model.safetensors", "config.json"):
        with open(os.path.join(REPO, "models", "embedded_teacher", name), "rb") as f:
            storage.write_bytes(f"{uri}/{name}", f.read())
    app = build_app({"model": uri, "topk": "3"})
    assert app._bound_deployment.init_args[0]["model"] == uri
    assert len(Predictor.load(uri).spec["classes"]) == 8  # what a replica does with it
    with pytest.raises(ValueError, match=r"serve args: model: 's3://.*/models/none' is not a model directory"):
        ServeSettings.from_args({"model": uri.replace("/teacher", "/none")})


def test_a_logits_file_a_bucket_fails_to_read_is_an_error_not_a_damaged_file(s3_server, tmp_path, monkeypatch):
    """Any error reading a logits file's footer counted it as damaged: a bucket's time-out or
    throttling demoted a finished cache, deleted the good file and rebuilt it (and in training read
    as "stale or mismatched teacher cache ... Rebuild it"). A garbled footer on the bucket is still damaged."""
    import pyarrow as pa

    from dvfl import storage
    from dvfl import teacher_cache as tc

    cache = f"s3://{s3_server['new_bucket']()}/cache"
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"clip_id": ["a", "b"]}), good)
    storage.write_json(f"{cache}/cache.json", {"fingerprint": "f", "view_spec": {"views": ["center"]}})
    storage.write_bytes(f"{cache}/logits/train-00000.parquet", good.read_bytes())
    garbled = bytearray(good.read_bytes())
    meta = len(garbled) - 8 - int.from_bytes(garbled[-8:-4], "little")  # the footer's metadata
    garbled[meta:meta + 16] = b"\xff" * 16
    storage.write_bytes(f"{cache}/logits/train-00001.parquet", bytes(garbled))
    info = {"shards": [{"file": "shards/train-00001.parquet", "split": "train", "clips": 1}]}
    _, short = tc.TeacherLogitCache(cache).logits_files(info)
    assert short == {"train-00001.parquet": "unreadable: OSError"}

    def timed_out(path, **kw):  # (the bucket's failure; the objects and the server are real)
        raise OSError(f"When reading information for key '{path}': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(tc, "parquet_file", timed_out)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        tc.TeacherLogitCache(cache).logits_files({"shards": [{"file": "shards/train-00000.parquet", "split": "train",
                                                              "clips": 2}]})


def test_a_failed_tensorboard_upload_is_said_and_retried_not_raised(s3_server, capsys):
    """Events on s3 are uploaded at every epoch's flush, before that epoch's checkpoint: an S3 error
    there aborted the epoch (its checkpoint lost, the run retried), and at close it replaced the
    run's own error. Now a line, and the next flush uploads every events file again."""
    from dvfl import storage
    from dvfl.train.loop import _TensorBoard

    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/tb"  # every upload fails
    writer = _TensorBoard(missing)
    writer.add_scalar("loss", 1.0, 1)
    writer.flush()
    assert f"[tensorboard] uploading the events to {missing} failed" in capsys.readouterr().out
    writer.target = target = f"s3://{s3_server['new_bucket']()}/tb"  # (as if the bucket answered again)
    writer.add_scalar("loss", 0.5, 2)
    writer.close()
    assert [k for k in s3_objects(target) if k.startswith("events.out.tfevents")], s3_objects(target)
    assert not os.path.exists(writer.local) and "failed" not in capsys.readouterr().out
    lost = _TensorBoard(missing)  # failing at close: the only copy is kept, and said where
    lost.add_scalar("loss", 1.0, 1)
    lost.close()
    assert f"failed (" in (out := capsys.readouterr().out) and f"the events stay in {lost.local}" in out, out
    assert os.listdir(lost.local)
    shutil.rmtree(lost.local)


def test_generated_videos_are_never_written_under_a_uri_named_folder(s3_server, tmp_path):
    """--out s3://... with data.clips a URI that holds no ingest yet: the embedded default's videos
    were generated under ./s3:/... in the working directory; now a config error, nothing written."""
    bucket = s3_server["new_bucket"]()
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, DISTILL, "--out", f"s3://{bucket}/run", "--set", f"data.clips=s3://{bucket}/none",
                        "--teacher", os.path.join(REPO, "models", "embedded_teacher")],
                       env=_env(s3_server, tmp_path), cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"data.clips s3://{bucket}/none holds no finished ingest" in r.stderr, r.stderr
    assert os.listdir(work) == [] and not s3_objects(f"s3://{bucket}/run")


def test_config_names_the_field_whose_bucket_cannot_be_reached(s3_server):
    """A URI is checked where a local path would be checked for existence: its bucket must answer."""
    from dvfl.config import ConfigError, load_config

    bucket = s3_server["new_bucket"]()
    for field in ("output_dir", "data.clips", "teacher.path", "teacher.cache"):
        with pytest.raises(ConfigError, match=rf"^{field} bucket 'no-such-bucket-dvfl' of s3://no-such-bucket-dvfl/x "
                                               "does not exist"):
            load_config(None, [("output_dir", f"s3://{bucket}/run"), ("data.clips", f"s3://{bucket}/clips"),
                               (field, "s3://no-such-bucket-dvfl/x")])
    cfg = load_config(None, [("output_dir", f"s3://{bucket}/run"), ("data.clips", f"s3://{bucket}/clips")])
    assert cfg.output_dir == f"s3://{bucket}/run" and cfg.cache_dir == f"s3://{bucket}/run/teacher_cache"
    with pytest.raises(ConfigError, match="^data.clips is required when output_dir is a URI"):
        load_config(None, [("output_dir", f"s3://{bucket}/run")])
    from dvfl.tune import load_tune_config

    with pytest.raises(ConfigError, match="^tune.storage s3://no-such-bucket-dvfl/t: bucket 'no-such-bucket-dvfl'"):
        load_tune_config(None, [("tune.storage", "s3://no-such-bucket-dvfl/t"), ("output_dir", f"s3://{bucket}/run"),
                                ("data.clips", f"s3://{bucket}/clips")])
    t, _ = load_tune_config(None, [("tune.storage", f"s3://{bucket}/tune"), ("output_dir", f"s3://{bucket}/run"),
                                   ("data.clips", f"s3://{bucket}/clips")])
    assert t.storage == f"s3://{bucket}/tune"
    # a config on object storage (a search's best_config.yaml under an s3:// tune.storage, which the
    # search tells the user to run with --config): it was looked up as the local path s3:/...
    from dvfl import storage

    storage.write_bytes(f"s3://{bucket}/tune/best_config.yaml",
                        f"output_dir: s3://{bucket}/run\ndata: {{clips: s3://{bucket}/clips}}\nkd: {{temperature: 3}}\n".encode())
    cfg = load_config(f"s3://{bucket}/tune/best_config.yaml")
    assert cfg.kd.temperature == 3 and cfg.output_dir == f"s3://{bucket}/run"
    with pytest.raises(ConfigError, match=f"^config file not found: s3://{bucket}/tune/other.yaml"):
        load_config(f"s3://{bucket}/tune/other.yaml")


def test_file_uris_are_local_paths(tmp_path):
    """``file://`` names a local path: made one at config load, and written with the local atomic
    rename by dvfl.storage (no hidden temporary file left)."""
    from dvfl import storage
    from dvfl.config import load_config

    cfg = load_config(None, [("output_dir", f"file://{tmp_path}/run/../run2")])
    assert cfg.output_dir == str(tmp_path / "run2") and cfg.clips_dir == str(tmp_path / "run2" / "clips")
    storage.write_json(f"file://{tmp_path}/d/x.json", {"a": 1})
    assert storage.read_json(str(tmp_path / "d" / "x.json")) == {"a": 1} and os.listdir(tmp_path / "d") == ["x.json"]
    assert storage.listdir(f"file://{tmp_path}/d", ".json") == [f"file://{tmp_path}/d/x.json"]


def test_find_lists_a_name_at_any_depth_locally_and_on_s3(s3_server, tmp_path):
    """storage.find (what --fresh uses to remove every model's spec before its folder): the same
    answer on a local folder and on a bucket, full paths/URIs, sorted, other names left out."""
    from dvfl import storage

    for base in (str(tmp_path / "run"), f"s3://{s3_server['new_bucket']()}/run"):
        for rel in ("students/a/model.json", "students/b/model.json", "students/b/model.pt", "model.json.bak"):
            storage.write_text(storage.join(base, *rel.split("/")), "{}")
        assert storage.find(storage.join(base, "students"), "model.json") == [
            storage.join(base, "students", "a", "model.json"), storage.join(base, "students", "b", "model.json")]
        assert storage.find(storage.join(base, "nothing"), "model.json") == []


def test_a_removed_prefix_no_longer_exists_on_s3_and_its_bucket_stays(s3_server):
    """pyarrow leaves an empty ``prefix/`` marker object where it removed the last object under a
    prefix: `exists` counted it, so a second `search --fresh` found a "Tune experiment" with no
    search file in it and refused, after removing the main one; `evaluate` of an emptied model
    prefix took it for a checkpoint file."""
    import pyarrow.fs as pafs

    from dvfl import storage

    bucket = s3_server["new_bucket"]()
    exp = f"s3://{bucket}/runs/tune/exp"
    storage.write_text(storage.join(exp, "trial", "result.json"), "{}")
    storage.write_text(f"s3://{bucket}/runs/keep.json", "{}")
    assert storage.exists(exp) and storage.isdir(exp)
    storage.remove_tree(exp)
    assert not storage.exists(exp) and not storage.isdir(exp)
    fs, p = storage.filesystem(exp)
    assert fs.get_file_info(p).type == pafs.FileType.NotFound  # no marker object left either
    storage.write_text(storage.join(exp, "only.json"), "{}")
    storage.remove(storage.join(exp, "only.json"))  # the last object deleted: pyarrow writes a marker
    assert not storage.exists(exp)
    storage.remove_tree(f"s3://{bucket}")  # a whole bucket emptied, the bucket itself kept
    assert not storage.exists(f"s3://{bucket}/runs/keep.json") and fs.get_file_info(bucket).type == pafs.FileType.Directory


def test_a_shard_object_without_its_sidecar_is_not_read(s3_server):
    """Object stores have no rename: a shard is uploaded under its final name and committed by its
    _meta sidecar, written after it; readers list only committed shards."""
    from dvfl import storage
    from dvfl.data.shards import AtomicShardWriter, CLIP_SCHEMA, read_clips_table, shard_paths

    uri = f"s3://{s3_server['new_bucket']()}/clips"
    row = {"clip_id": "c", "video_id": "v", "path": "p", "label": 0, "class_name": "a", "split": "train",
           "view": "train", "view_index": 0, "frame_indices": [0], "src_fps": 1.0, "src_num_frames": 1,
           "num_frames": 1, "height": 1, "width": 1, "frames": b"abc"}
    w = AtomicShardWriter(f"{uri}/shards/train-00000.parquet")
    w.write(CLIP_SCHEMA.empty_table().from_pylist([row], schema=CLIP_SCHEMA))
    w.close()
    assert not os.path.exists(w.tmp)                         # the local spool file is gone,
    assert "shards/train-00000.parquet" in s3_objects(uri)   # the object is there, whole,
    assert shard_paths(uri) == [] and read_clips_table(uri).num_rows == 0   # but not committed
    storage.write_json(f"{uri}/shards/_meta/train-00000.json", {"clips": 1})
    assert shard_paths(uri) == [f"{uri}/shards/train-00000.parquet"]
    assert read_clips_table(uri, columns=["clip_id"]).column("clip_id").to_pylist() == ["c"]



def test_a_prefix_with_hash_or_query_characters_is_its_own_prefix_on_s3(s3_server):
    """'#' and '?' in an s3:// URI are part of the key (not a fragment or query cut off): a run
    under runs/ucf#2 writes, lists and reads its own objects, and removing it (--fresh) leaves
    the run under runs/ucf alone."""
    from dvfl import storage
    from dvfl.data.shards import AtomicShardWriter, CLIP_SCHEMA, read_clips_table, shard_paths

    bucket = s3_server["new_bucket"]()
    other = f"s3://{bucket}/runs/ucf/keep.json"
    storage.write_json(other, {"run": "ucf"})
    row = {"clip_id": "c", "video_id": "v", "path": "p", "label": 0, "class_name": "a", "split": "train",
           "view": "train", "view_index": 0, "frame_indices": [0], "src_fps": 1.0, "src_num_frames": 1,
           "num_frames": 1, "height": 1, "width": 1, "frames": b"abc"}
    for name in ("ucf#2", "q?x=1"):
        uri = f"s3://{bucket}/runs/{name}"
        w = AtomicShardWriter(f"{uri}/shards/train-00000.parquet")
        w.write(CLIP_SCHEMA.empty_table().from_pylist([row], schema=CLIP_SCHEMA))
        w.close()
        storage.write_json(f"{uri}/shards/_meta/train-00000.json", {"clips": 1})
        assert sorted(s3_objects(uri)) == ["shards/_meta/train-00000.json", "shards/train-00000.parquet"]
        assert shard_paths(uri) == [f"{uri}/shards/train-00000.parquet"]
        assert read_clips_table(uri, columns=["clip_id"]).column("clip_id").to_pylist() == ["c"]
        assert storage.read_json(f"{uri}/shards/_meta/train-00000.json") == {"clips": 1}
        assert storage.find(uri, "train-00000.json") == [f"{uri}/shards/_meta/train-00000.json"]
        storage.remove_tree(uri)
        assert s3_objects(uri) == {} and storage.read_json(other) == {"run": "ucf"}
    assert sorted(s3_objects(f"s3://{bucket}/runs")) == ["ucf/keep.json"]

HELD = "train-00007"  # the plan's last train shard (8 per class x 4 classes, 4 videos per shard)


@pytest.fixture(scope="module")
def s3_ingest(s3_server, tmp_path_factory):
    """``pipelines/ingest.py --out s3://...`` SIGKILLed while shard HELD is uploaded but not yet
    committed (test hook: the task writing it waits there), then the same command run again."""
    from dvfl import storage
    from dvfl.data.shards import shard_paths

    tmp = tmp_path_factory.mktemp("s3_ingest")
    uri = f"s3://{s3_server['new_bucket']()}/clips/run1"
    work = tmp / "cwd"
    work.mkdir()
    args = [INGEST, "--dataset", "synthetic", "--out", uri, "--videos-dir", str(tmp / "videos"), *SMALL]
    env = _env(s3_server, tmp, DVFL_INGEST_TEST_HOOKS="1", DVFL_TEST_HOLD_UNCOMMITTED=HELD)
    err = open(tmp / "killed-run.err", "w")  # a file, not a pipe nobody reads (a full pipe blocks the run)
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=work, stdout=subprocess.DEVNULL,
                            stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 240
        while f"shards/{HELD}.parquet" not in s3_objects(uri):
            assert proc.poll() is None, f"the run ended on its own: {(tmp / 'killed-run.err').read_text()[-3000:]}"
            assert time.time() < deadline, "the held shard was not uploaded in time"
            time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)   # the driver, between a shard's upload and its commit
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # the Ray processes the killed driver had started
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        err.close()
    # decode tasks of the killed run that were inside a shard may still commit it (whole) for a
    # moment after the driver died: the snapshot waits until the committed set is stable
    committed, stable_since, deadline = shard_paths(uri), time.time(), time.time() + 60
    while time.time() - stable_since < 5 and time.time() < deadline:
        time.sleep(0.5)
        if shard_paths(uri) != committed:
            committed, stable_since = shard_paths(uri), time.time()
    killed = {"objects": s3_objects(uri), "committed": committed}
    killed["rows"] = sum(pq.ParquetFile(storage.open_input(p)).metadata.num_rows for p in committed)
    killed["meta_clips"] = sum(storage.read_json(f"{uri}/shards/_meta/{storage.basename(p)[:-8]}.json")["clips"]
                               for p in committed)
    env.pop("DVFL_TEST_HOLD_UNCOMMITTED")
    rerun = _run(args, env, work)
    return {"uri": uri, "videos": str(tmp / "videos"), "work": work, "env": env, "tmp": tmp, "killed": killed,
            "rerun": rerun}


def test_ingest_sigkilled_on_s3_then_rerun_leaves_no_partial_or_duplicate_shard(s3_ingest, tmp_path, ray_local):
    """A shard uploaded but not yet committed (its sidecar not written) when the driver is
    SIGKILLed is invisible to readers; the rerun skips the committed shards, writes that one again
    and ends with the same bytes as an uninterrupted local ingest of the same inputs."""
    from dvfl import storage
    from dvfl.data import adapters as A
    from dvfl.data.ingest import IngestConfig, ingest
    from dvfl.data.shards import shard_paths

    uri, killed = s3_ingest["uri"], s3_ingest["killed"]
    assert "dataset.json" not in killed["objects"]                       # not a finished ingest
    assert f"shards/{HELD}.parquet" in killed["objects"]                 # uploaded,
    assert f"shards/_meta/{HELD}.json" not in killed["objects"]          # never committed,
    assert killed["committed"] and f"{uri}/shards/{HELD}.parquet" not in killed["committed"]  # so not read
    assert killed["rows"] == killed["meta_clips"] > 0

    out = s3_ingest["rerun"].stdout
    # decode tasks commit their own shards: one already running when the driver died may still
    # commit a (whole) shard afterwards, so the rerun skips at least the shards committed at the kill
    done = re.search(r"(\d+) shards already done", out)
    assert done and len(killed["committed"]) <= int(done.group(1)) < 9 and "== inputs 36" in out, out
    info = storage.read_json(f"{uri}/dataset.json")
    files = sorted(s["file"] for s in info["shards"])
    objects = s3_objects(uri)
    assert sorted(k for k in objects if k.startswith("shards/") and k.endswith(".parquet")) == files
    assert sorted(k for k in objects if k.startswith("shards/_meta/")) == sorted(
        f"shards/_meta/{f[len('shards/'):-8]}.json" for f in files)
    assert not [k for k in objects if "tmp" in k or "spool" in k or k.startswith("_parts/")]
    assert os.listdir(s3_ingest["work"]) == [] and os.listdir(s3_ingest["env"]["DVFL_SPOOL_DIR"]) == []

    # the same bytes as an uninterrupted ingest of the same videos on local disk
    m = A.ucf101(s3_ingest["videos"], 1)
    m.dataset = "synthetic"
    ref = str(tmp_path / "ref")
    s = ingest(m, IngestConfig(out=ref, short_side=32, videos_per_shard=4, progress=False), log=None)
    assert _shard_hashes_s3(uri) == _shard_hashes_local(ref) and len(files) == s["shards"]
    assert info["fingerprint"] == s["fingerprint"]
    for p in shard_paths(uri):
        assert pq.ParquetFile(storage.open_input(p)).metadata.num_rows > 0


TINY_S3 = ["teacher.train.embed_dim=16", "teacher.optim.epochs=1", "baseline=false", "student.embed_dim=8", "optim.epochs=1",
           "teacher.train.drop_path_rate=0.0", "teacher.min_top1_over_chance=-1", "data.teacher_pool=0",
           "data.clips_per_video=2", "data.synthetic.unlabeled_videos=0", "data.synthetic.num_classes=4",
           "data.synthetic.label_noise=0", "data.synthetic.val_per_class=0",
           # a teacher trained here; one-worker runs in runner actors, as the embedded default trains (Ray
           # Train's checkpoints on S3, DDP and a lost node: tests/cluster_scenarios/multinode_recovery.py)
           "teacher.path=null", "teacher.optim.batch_size=16", "seeds=[0]", "students=null", "scaling.num_workers=1",
           "scaling.cpus_per_worker=1", "scaling.concurrent_runs=2"]


def test_distill_then_search_with_every_path_on_s3(s3_server, s3_ingest, monkeypatch):
    """pipelines/distill.py --out s3://... --set data.clips=s3://...: the teacher, its logit
    cache, the student, the runners' epoch states, TensorBoard events and the results all land in
    the bucket, and nothing in the working directory or the spool folder. Then tuning/search.py with
    the same --out: the search reuses that teacher and cache, and its Tune experiment (Tune's
    state, the trial records, results, Pareto plot, best config) is in the bucket too."""
    from dvfl import storage

    out = f"s3://{s3_server['new_bucket']()}/runs/tiny"
    work, env = s3_ingest["work"], s3_ingest["env"]
    args = [DISTILL, "--out", out, "--set", f"data.clips={s3_ingest['uri']}", "--num-cpus", "3",
            *[x for kv in TINY_S3 for x in ("--set", kv)]]
    r = _run(args, {**env, "DVFL_DASHBOARD": "0"}, work, timeout=900)
    objects = s3_objects(out)
    results = storage.read_json(f"{out}/results.json")
    assert set(results["models"]) == {"teacher", "dvfl"}, results["models"].keys()
    assert results["models"]["dvfl"]["paths"][0].startswith(f"{out}/students/")
    for key in ("results.md", "training_curves.png", "config.yaml", "teacher_cache/cache.json"):
        assert key in objects, sorted(objects)
    assert len([k for k in objects if k.startswith("teacher/") and k.endswith("/model.json")]) == 1
    assert len([k for k in objects if k.startswith("students/") and k.endswith("/model.pt")]) == 1
    # each run's epoch states (what a replaced runner resumes from) are removed once its model is saved
    assert not [k for k in objects if k.startswith("ray_results/")], sorted(objects)
    assert any(k.startswith("students/tensorboard/") for k in objects)
    train_shards = [s["file"] for s in storage.read_json(f"{s3_ingest['uri']}/dataset.json")["shards"] if s["split"] == "train"]
    assert sorted(k[len("teacher_cache/logits/"):] for k in objects if k.startswith("teacher_cache/logits/")
                  and k.endswith(".parquet")) == sorted(f[len("shards/"):] for f in train_shards) != []
    assert os.listdir(work) == [] and os.listdir(env["DVFL_SPOOL_DIR"]) == []
    assert f"[report] {out}/results.json" in r.stdout
    # the student where distill wrote it, evaluated from the bucket (a local path was required before session 29)
    with monkeypatch.context() as m:  # (in this process: no Ray, its S3 settings are this session's)
        m.chdir(work)
        m.setenv("DVFL_SPOOL_DIR", env["DVFL_SPOOL_DIR"])
        e = cli_in_process("evaluate.py", "--model", results["models"]["dvfl"]["paths"][0], "--clips", s3_ingest["uri"])
    assert e.returncode == 0, e.stderr[-3000:]
    assert "[evaluate] s3://" in e.stdout and "top-1" in e.stdout, e.stdout

    search = [SEARCH, "--out", out, "--set", f"data.clips={s3_ingest['uri']}", "--num-cpus", "3", "--quiet",
              *[x for kv in TINY_S3 for x in ("--set", kv)],
              "--set", "scaling.num_workers=1", "--set", "tune.num_samples=1", "--set", "optim.batch_size=8",
              "--set", "tune.space.student.embed_dim={choice: [8]}",
              "--set", "tune.asha.grace_period=1", "--set", "tune.front_seeds=[]",
              "--set", "tune.max_concurrent_trials=1"]  # one trial: 3 logical CPUs hold one (1.25 + 1 for Ray Data)
    t = _run(search, {**env, "DVFL_DASHBOARD": "0"}, work, timeout=900)
    exp = f"{out}/tune/embedded-tune"
    # (any "[cache] " line passed: a rebuild prints them too)
    assert "[teacher] reusing" in t.stdout and "[cache] reusing finished cache " in t.stdout, t.stdout[-3000:]
    summary = storage.read_json(f"{exp}/tune_results.json")
    assert summary["path"] == exp and summary["trials"] == 1 and summary["errors"] == 0, summary
    assert summary["best_config"] == f"{exp}/best_config.yaml"
    tune_objects = s3_objects(exp)
    for key in ("tune_results.md", "pareto.png", "best_config.yaml", "dvfl_search.json"):
        assert key in tune_objects, sorted(tune_objects)
    assert any(re.fullmatch(r"experiment_state-.*\.json", k) for k in tune_objects), sorted(tune_objects)
    assert len([k for k in tune_objects if k.startswith("dvfl_trials/") and k.endswith(".json")]) == 1
    assert any(k.endswith("/result.json") for k in tune_objects), sorted(tune_objects)   # the trial's metrics
    assert summary["rows"][0]["starts"] == 1   # its record, read back from the bucket
    assert os.listdir(work) == [] and os.listdir(env["DVFL_SPOOL_DIR"]) == []
