"""How dvfl.storage names things: URIs to filesystem paths (every character of a key kept), and
the local spool files of object-store writes (named after their owner, swept once it is gone)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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


def test_an_aws_bucket_is_reached_in_its_own_region_and_endpoints_may_omit_the_scheme(monkeypatch):
    """Without AWS_REGION every request to a bucket of another region failed (pyarrow's from_uri,
    which storage replaced, looked the region up); "minio:9000" was read as scheme "minio" and
    host "9000" (session 29)."""
    asked = []

    def resolve(bucket):  # the lookup itself needs AWS: what storage asks and uses is the subject here
        asked.append(bucket)
        return "eu-west-1"

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", *storage.ENDPOINT_ENVS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(storage.pafs, "resolve_s3_region", resolve)
    storage._bucket_region.cache_clear()
    assert storage.filesystem("s3://eu-bkt/runs/x")[0].region == "eu-west-1" and asked == ["eu-bkt"]
    monkeypatch.setenv("AWS_REGION", "us-west-2")  # a region the user gives wins, and nothing is asked
    assert storage.filesystem("s3://eu-bkt/runs/x")[0].region == "us-west-2" and asked == ["eu-bkt"]
    for endpoint, (host, scheme) in (("minio:9000", ("minio:9000", "https")),
                                     ("http://127.0.0.1:9000", ("127.0.0.1:9000", "http"))):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        options = storage.filesystem("s3://bkt/x")[0].__reduce__()[1][0]
        assert (options["endpoint_override"], options["scheme"]) == (host, scheme), endpoint
    storage._bucket_region.cache_clear()


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
    # %XX escapes decoded (Path.as_uri() writes them): a folder named "my%20clips" was made instead
    assert storage.local_path(Path("/data/my clips/100%").as_uri()) == "/data/my clips/100%"
    assert storage.local_path("file:///tmp/a") == "/tmp/a" and storage.local_path("file://") == "/"
    with pytest.raises(ValueError, match=r"^file://tmp/a: a file:// URI must name a local path \(file:///path\), "
                                         r"not host 'tmp'$"):
        storage.local_path("file://tmp/a")


@pytest.mark.parametrize("uri", ["hdfs://nn/runs/ucf#2/x.json", "hdfs://nn/runs/q?x=1/x.json"])
def test_other_schemes_refuse_what_pyarrow_would_cut_off(uri):
    """pyarrow's from_uri drops a '#' fragment (hdfs://nn/runs/ucf#2/x -> /runs/ucf): refused."""
    with pytest.raises(ValueError, match=rf"^{uri.replace('?', '[?]')}: '#' and '\?' are not supported in hdfs:// paths"):
        storage.filesystem(uri)


@pytest.mark.parametrize("key", ["runs/ucf#2/x.json", "runs/q?x=1/x.json", "my data/x", "caf\u00e9/x", "run%202024/x",
                                 "100%done/x"])
def test_a_gs_uri_keeps_every_character_of_its_key(key):
    """from_uri refused spaces and non-ASCII (a reachable bucket reported unreachable), decoded
    '%20' into another key and cut '#'/'?' off: gs:// keys are now taken as written, like s3://.
    (The filesystem is made without contacting Google: nothing here needs the network.)"""
    fs, path = storage.filesystem(f"gs://bkt/{key}")
    assert fs.type_name == "gcs" and path == f"bkt/{key}"


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


def _job_copy(base, session: str):
    """A directory laid out like Ray's temporary copy of a job's --working-dir, with a shipped input."""
    copy = base / session / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "models" / "embedded_teacher").mkdir(parents=True)
    return copy


def test_a_config_an_earlier_job_wrote_is_found_under_the_job_root(tmp_path, monkeypatch):
    """`--config runs/x/best_config.yaml` in a second job: a relative input not in the job's copy is
    looked up under the job root, as data paths are (the config file alone was "not found")."""
    from dvfl.config import ConfigError, load_config
    from dvfl.tune import load_tune_config

    monkeypatch.setenv("DVFL_JOB_ROOT", str(tmp_path / "jobs"))
    earlier = tmp_path / "jobs" / "runs" / "x"
    earlier.mkdir(parents=True)
    (earlier / "best_config.yaml").write_text("optim: {epochs: 7}\nname: earlier\n")
    (earlier / "search.yaml").write_text("experiment: again\nspace: {kd.temperature: {grid: [2.0, 4.0]}}\n")
    monkeypatch.chdir(_job_copy(tmp_path, "session_2026-12-07_1"))
    assert load_config("runs/x/best_config.yaml", check_paths=False).optim.epochs == 7
    assert load_tune_config("runs/x/search.yaml", check_paths=False)[0].experiment == "again"
    # the run config a search names (one shipped search over an earlier job's best config)
    assert load_tune_config(None, [("tune.run_config", "runs/x/best_config.yaml")],
                            check_paths=False)[1].name == "earlier"
    with pytest.raises(ConfigError, match="config file not found: runs/y.yaml"):
        load_config("runs/y.yaml", check_paths=False)


def test_configs_written_under_a_ray_job_name_shipped_inputs_as_the_user_gave_them(tmp_path, monkeypatch):
    """Inside a job the inputs resolve into the temporary copy (so the job reads them); a config
    written for later (config.yaml, best_config.yaml) and the search's resume digest name them as
    given, so they still work, and still match, after `ray stop` deletes that copy."""
    from dvfl.config import build_config, config_tree, dump_config
    from dvfl.tune.search import _fingerprint
    from dvfl.tune.search_config import TuneConfig

    monkeypatch.setenv("DVFL_JOB_ROOT", str(tmp_path / "jobs"))
    sets = [("teacher.path", "models/embedded_teacher"), ("output_dir", "runs/x")]
    digests = []
    for session in ("session_2026-12-04_1", "session_2026-12-04_2"):
        job_copy = _job_copy(tmp_path, session)
        monkeypatch.chdir(job_copy)
        cfg = build_config(config_tree(None, sets)).resolve_paths()
        assert cfg.teacher.path == str(job_copy / "models" / "embedded_teacher")  # read from the copy
        dump_config(cfg, tmp_path / "config.yaml")
        written = yaml.safe_load((tmp_path / "config.yaml").read_text())
        assert written["teacher"]["path"] == os.path.join("models", "embedded_teacher")
        assert written["output_dir"] == str(tmp_path / "jobs" / "runs" / "x")  # outputs: the job root
        assert "working_dir_files" not in (tmp_path / "config.yaml").read_text()
        digests.append(_fingerprint(TuneConfig(), cfg, {"fingerprint": "d"}, {"mode": "cache"})["digest"])
    assert digests[0] == digests[1]

    (job_copy / "scripts").mkdir()  # an entrypoint that changed into a subfolder of the copy first
    monkeypatch.chdir(job_copy / "scripts")
    up = [("teacher.path", os.path.join("..", "models", "embedded_teacher"))]
    cfg = build_config(config_tree(None, up)).resolve_paths()
    assert cfg.teacher.path == str(job_copy / "models" / "embedded_teacher")
    dump_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["teacher"]["path"] == up[0][1]

    from dvfl.pipeline import write_report  # results.json too (its config outlives the job)

    monkeypatch.chdir(job_copy)
    cfg = build_config(config_tree(None, sets + [("data.val_split", "train")])).resolve_paths()
    os.makedirs(cfg.output_dir)
    row = {"top1": 0.5, "top5": 0.9, "params": 1000, "gmacs": 0.01, "history": [], "split": "test"}
    write_report(cfg, {"dvfl": [row]}, log=lambda *_: None)
    report = json.loads(open(os.path.join(cfg.output_dir, "results.json")).read())
    assert report["config"]["teacher"]["path"] == os.path.join("models", "embedded_teacher")

    monkeypatch.chdir(tmp_path)  # not a job: absolute paths are written as they are
    cfg = build_config(config_tree(None, sets)).resolve_paths()
    dump_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["teacher"]["path"] == str(tmp_path / "models" / "embedded_teacher")


def test_a_tree_that_cannot_be_removed_raises_instead_of_staying(tmp_path, monkeypatch):
    """``--fresh`` removes the old shards with remove_tree, which ignored every error: shards it could
    not delete (owned by another user) stayed and were counted as this run's finished shards, under
    the new fingerprint. A failed delete now raises; a missing tree is still nothing to do."""
    tree = tmp_path / "shards"
    (tree / "_meta").mkdir(parents=True)
    (tree / "train-00000.parquet").write_bytes(b"PAR1")
    real_unlink = os.unlink

    def refuse(path, *a, **kw):
        if str(path).endswith(".parquet"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(PermissionError):
        storage.remove_tree(str(tree))
    assert (tree / "train-00000.parquet").exists()
    monkeypatch.undo()
    storage.remove_tree(str(tree))
    assert not tree.exists()
    storage.remove_tree(str(tmp_path / "never"))


def test_a_model_folder_given_as_a_file_uri_loads_and_is_written_to_as_its_local_path(tmp_path, monkeypatch):
    """``os.path.abspath("file:///m")`` is ``./file:/m``: Serve handed that to every replica, a
    checkpoint file was "not found", profile/predict --json wrote under ./file:/ ."""
    from dvfl.artifacts import load_model

    repo = Path(__file__).resolve().parents[1]
    _, spec = load_model((repo / "models" / "embedded_teacher").as_uri())
    assert spec["name"] == "videofocalnet_nano"
    monkeypatch.chdir(tmp_path)
    assert storage.absolute(f"file://{tmp_path}/a%20b/p.json") == f"{tmp_path}/a b/p.json"
    assert storage.absolute("s3://b/m") == "s3://b/m" and storage.absolute("m") == f"{tmp_path}/m"
    from dvfl.inference import write_json

    write_json(f"file://{tmp_path}/out/p.json", {"a": 1})
    assert json.loads((tmp_path / "out" / "p.json").read_text()) == {"a": 1} and not (tmp_path / "file:").exists()


def test_a_failed_local_write_names_its_file_and_leaves_no_temporary(tmp_path):
    """A write's OSError names no file (a full disk: "[Errno 28] No space left on device"), and the
    commands print it as it is: distill's `[distill] error:` line did not say which file failed."""
    import errno

    target = tmp_path / "results.json"
    with pytest.raises(OSError, match=rf"writing {target}: Bad file descriptor") as err:
        storage.atomic_write_local(str(target), lambda tmp: os.write(-1, b"x"))  # (a real OSError, no file in it)
    assert err.value.errno == errno.EBADF
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="nope"):  # an error that names its file keeps its own words
        storage.atomic_write_local(str(target), lambda tmp: open(tmp_path / "nope" / "x"))
