"""How dvfl.storage names things: URIs to filesystem paths (every character of a key kept), and
the local spool files of object-store writes (named after their owner, swept once it is gone)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dvfl import storage


@pytest.fixture
def s3_env(monkeypatch):
    # a region and no instance-metadata lookup: building the S3 filesystem stays offline
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize("key", ["runs/ucf#2/shards/train-00000.parquet", "runs/ucf#2/_meta/x.json",
                                 "runs/q?x=1/a.json", "runs/semi;colon/x;v=1.json",
                                 "runs/pct%41/a.json"])
def test_an_s3_uri_keeps_every_character_of_its_key(s3_env, key):
    """'#' and '?' are ordinary characters of an object key, not a URI fragment or query: cut
    off, objects of different runs would collapse onto one key (';', '%' stay as they were)."""
    assert storage.filesystem(f"s3://bkt/{key}")[1] == f"bkt/{key}"
    assert storage.filesystem(f"s3a://bkt/{key}/")[1] == f"bkt/{key}"


def test_objects_under_a_prefix_with_a_hash_map_to_distinct_keys_outside_the_shorter_prefix(s3_env):
    shard, meta = (storage.filesystem(f"s3://bkt/runs/ucf#2/{k}")[1] for k in ("shards/train-00000.parquet",
                                                                               "_meta/x.json"))
    assert shard != meta and "bkt/runs/ucf" not in (shard, meta)
    assert storage.ray_storage("s3://bkt/runs/ucf#2")[0] == "bkt/runs/ucf#2"


def test_a_file_uri_keeps_hash_and_query_characters_in_its_path(tmp_path):
    for name in ("run#2", "q?x=1", "semi;colon"):
        uri = f"file://{tmp_path}/{name}/x.json"
        assert storage.local_path(uri) == f"{tmp_path}/{name}/x.json" and not storage.is_remote(uri)
        storage.write_json(uri, {"name": name})
        assert storage.read_json(str(tmp_path / name / "x.json")) == {"name": name}
        assert storage.listdir(f"file://{tmp_path}/{name}", ".json") == [uri]
    assert sorted(os.listdir(tmp_path)) == ["q?x=1", "run#2", "semi;colon"]


def test_file_uri_hosts():
    assert storage.local_path("file://localhost/tmp/a#1") == "/tmp/a#1"
    assert storage.local_path("file:///tmp/a") == "/tmp/a" and storage.local_path("file://") == "/"
    with pytest.raises(ValueError, match=r"^file://tmp/a: a file:// URI must name a local path \(file:///path\), "
                                         r"not host 'tmp'$"):
        storage.local_path("file://tmp/a")


@pytest.mark.parametrize("uri", ["gs://bkt/runs/ucf#2/x.json", "gs://bkt/runs/q?x=1/x.json"])
def test_other_schemes_refuse_what_pyarrow_would_cut_off(uri):
    """pyarrow's from_uri drops a '#' fragment (gs://bkt/runs/ucf#2/x -> bkt/runs/ucf): refused."""
    with pytest.raises(ValueError, match=rf"^{uri.replace('?', '[?]')}: '#' and '\?' are not supported in gs:// paths"):
        storage.filesystem(uri)


# ---------------------------------------------------------------------------------------
# spool files

def _unused_pid() -> int:
    for pid in range(4_000_000, 1000, -7919):   # downwards from above any default pid_max
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
    raise AssertionError("no unused pid found")


def _spool(d, pid, name, age_s):
    p = d / f"dvfl-spool-{pid}-abcd1234-{name}"
    p.write_bytes(b"x" * 10)
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_the_first_spool_file_removes_those_left_by_killed_processes(tmp_path, monkeypatch):
    """A SIGKILLed writer never deletes its spool file (up to a shard's size): the next spool file
    made in that folder removes the stale ones whose owner is gone, and nothing else."""
    from dvfl import scratch

    d = tmp_path / "spool"
    d.mkdir()
    monkeypatch.setenv(storage.SPOOL_ENV, str(d))
    monkeypatch.setattr(scratch, "_swept", set())   # this process has not swept it yet
    dead = _unused_pid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _spool(d, child.pid, "a.parquet", age_s=3600)    # its owner still runs: kept
        left = _spool(d, dead, "b.parquet", age_s=3600)         # killed owner, stale: removed
        fresh = _spool(d, dead, "c.parquet", age_s=0)           # recent: another PID namespace's?
        other = d / "notes-123-x"
        other.write_text("not a spool file")
        os.utime(other, (0, 0))
        new = storage.spool_file("s3://bkt/clips/shards/train-00003.parquet")
        assert os.path.basename(new).startswith(f"dvfl-spool-{os.getpid()}-") and new.endswith("-train-00003.parquet")
        assert not left.exists()
        assert live.exists() and fresh.exists() and other.exists() and os.path.exists(new)
        left2 = _spool(d, dead, "e.parquet", age_s=3600)
        os.unlink(storage.spool_file("s3://bkt/clips/shards/train-00005.parquet"))
        assert left2.exists()   # one sweep per folder and process: later spool files cost no listing
    finally:
        child.kill()
        child.wait()
