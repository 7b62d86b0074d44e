"""Every artefact on object storage: the pipelines run against a real S3 API server (moto's
standalone server, ``s3_server`` in conftest.py) through the AWS_ENDPOINT_URL it sets, as a user
would against any S3-compatible endpoint. The entry points run as subprocesses with their own
local Ray, so their workers inherit the endpoint and the dummy credentials.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import s3_objects

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INGEST = os.path.join(REPO, "pipelines", "ingest.py")
DISTILL = os.path.join(REPO, "pipelines", "distill.py")
SMALL = ["--synthetic-classes", "4", "--train-per-class", "3", "--test-per-class", "1", "--videos-per-shard", "2",
         "--video-size", "32", "--num-cpus", "3", "--object-store-mb", "256", "--quiet"]


def _env(s3_server, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_server["env"], DVFL_SPOOL_DIR=str(tmp_path / "spool"), **extra)
    os.makedirs(env["DVFL_SPOOL_DIR"], exist_ok=True)
    return env


def _run(args, env, cwd, timeout=300):
    r = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       start_new_session=True)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def _shard_hashes_local(out):
    d = os.path.join(out, "shards")
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(d)) if n.endswith(".parquet")}


def _shard_hashes_s3(uri):
    from dvfl import storage

    return {k[len("shards/"):]: hashlib.sha256(storage.read_bytes(f"{uri}/{k}")).hexdigest()
            for k in s3_objects(uri) if k.startswith("shards/") and k.endswith(".parquet") and "/_meta/" not in k}


def test_ingest_sigkilled_on_s3_then_rerun_leaves_no_partial_or_duplicate_shard(s3_server, tmp_path, ray_local):
    """A shard uploaded but not yet committed (its sidecar not written) when the driver is
    SIGKILLed is invisible to readers; the rerun skips the committed shards, writes that one again
    and ends with the same bytes as an uninterrupted local ingest of the same inputs."""
    from dvfl import storage
    from dvfl.data import adapters as A
    from dvfl.data.ingest import IngestConfig, ingest
    from dvfl.data.shards import read_clips_table, shard_paths

    bucket = s3_server["new_bucket"]()
    uri = f"s3://{bucket}/clips/run1"
    videos = str(tmp_path / "videos")
    work = tmp_path / "cwd"
    work.mkdir()
    args = [INGEST, "--dataset", "synthetic", "--out", uri, "--videos-dir", videos, *SMALL]
    # the plan's last shard: hold the driver after its upload, before its sidecar commits it
    held = "train-00005"
    env = _env(s3_server, tmp_path, DVFL_INGEST_TEST_HOOKS="1", DVFL_TEST_HOLD_UNCOMMITTED=held)
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while f"shards/{held}.parquet" not in s3_objects(uri):
            assert proc.poll() is None, f"the run ended on its own: {proc.stderr.read()[-3000:]}"
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
        proc.stderr.close()
    objects = s3_objects(uri)
    assert "dataset.json" not in objects                      # not a finished ingest
    assert f"shards/_meta/{held}.json" not in objects         # uploaded, never committed
    committed = shard_paths(uri)
    assert committed and f"{uri}/shards/{held}.parquet" not in committed
    assert read_clips_table(uri, columns=["clip_id"]).num_rows == sum(
        storage.read_json(f"{uri}/shards/_meta/{storage.basename(p)[:-8]}.json")["clips"] for p in committed)

    env.pop("DVFL_TEST_HOLD_UNCOMMITTED")
    r = _run(args, env, work)
    n_done = len(committed)
    assert f"{n_done} already done" in r.stdout and "== inputs 16" in r.stdout, r.stdout
    info = storage.read_json(f"{uri}/dataset.json")
    files = sorted(s["file"] for s in info["shards"])
    objects = s3_objects(uri)
    assert sorted(k for k in objects if k.startswith("shards/") and k.endswith(".parquet")) == files
    assert sorted(k for k in objects if k.startswith("shards/_meta/")) == sorted(
        f"shards/_meta/{f[len('shards/'):-8]}.json" for f in files)
    assert not [k for k in objects if "tmp" in k]
    assert os.listdir(work) == [] and os.listdir(env["DVFL_SPOOL_DIR"]) == []  # nothing local: no spool left over

    # same bytes as an uninterrupted ingest of the same videos on local disk
    m = A.ucf101(videos, 1)
    m.dataset = "synthetic"
    ref = str(tmp_path / "ref")
    s = ingest(m, IngestConfig(out=ref, short_side=32, videos_per_shard=2, progress=False), log=None)
    assert _shard_hashes_s3(uri) == _shard_hashes_local(ref) and len(files) == s["shards"]
    assert info["fingerprint"] == s["fingerprint"]
    for p in shard_paths(uri):
        assert pq.ParquetFile(storage.open_input(p)).metadata.num_rows > 0
