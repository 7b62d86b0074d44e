"""Teacher training through the shared Ray Train loop, and the view-exact teacher-logit cache.

One small synthetic dataset is generated (real H.264 files), ingested with the real Ray Data
pipeline, and a tiny teacher is trained on it with 2 DDP workers; the tests share them (the
session-wide ``prepared`` fixture in conftest.py, which the Tune tests reuse).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dvfl.artifacts import load_model, save_model
from dvfl.config import load_config
from dvfl.data.shards import load_dataset_info, read_clips_table, shard_paths
from dvfl.losses import distillation_loss
from dvfl.models import CheckpointError
from dvfl.teacher_cache import CacheMismatchError, TeacherLogitCache, build_teacher_cache
from dvfl.train.clips import View, batch_arrays, make_clip_batch, normalize

from conftest import TINY, tiny_config  # noqa: F401  (the shared tiny run config; `prepared` is in conftest)

REPO = Path(__file__).resolve().parents[1]


def test_shared_loop_learns_with_two_ddp_workers(prepared):
    history = json.loads((Path(prepared["teacher"]) / "model.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # 4 classes: chance is 25%. The tiny set is too small to generalise motion (see the embedded
    # default notes), but the loop must fit it: the loss falls and training accuracy rises.
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_top1"] >= 0.5
    assert {"val_top1", "val_top5", "train_ce", "lr"} <= set(history[-1])


def test_cache_covers_every_clip_once_and_matches_a_direct_forward(prepared):
    cfg = prepared["cfg"]
    cache = TeacherLogitCache(cfg.cache_dir)
    clips = read_clips_table(cfg.clips_dir, columns=["clip_id", "label", "frames", "num_frames", "height", "width"])
    assert len(cache) == clips.num_rows == cache.info["rows"]
    ids = clips.column("clip_id").to_pylist()
    assert len(set(ids)) == len(ids)
    model, _ = load_model(prepared["teacher"])
    arrays, _, _ = batch_arrays(clips)
    with torch.inference_mode():
        direct = model.eval()(normalize(make_clip_batch(arrays, 32, [View()] * len(arrays))))
    cached = cache.lookup(ids, ["center"] * len(ids))
    # stored as fp16: relative rounding 2^-11, plus kernel differences across batch sizes
    torch.testing.assert_close(cached, direct, rtol=2e-3, atol=2e-3)
    assert cache.info["dtype"] == "float16" and cache.info["verify"]["checked"] > 0
    # raw logits, not softened probabilities: rows do not sum to 1
    assert not torch.allclose(cached.exp().sum(1), torch.ones(len(ids)), atol=1e-2)


def _direct_top1(model_dir, clips_dir, splits=None) -> dict:
    """Top-1 per split of a plain forward on every clip's centre view (the reference computation)."""
    clips = read_clips_table(clips_dir, splits, columns=["clip_id", "label", "split", "frames", "num_frames",
                                                         "height", "width"])
    model, _ = load_model(model_dir)
    arrays, _, labels = batch_arrays(clips)
    with torch.inference_mode():
        hits = model.eval()(normalize(make_clip_batch(arrays, 32, [View()] * len(arrays)))).argmax(1).numpy() == labels
    split_of = clips.column("split").to_pylist()
    return {s: float(hits[[x == s for x in split_of]].mean()) for s in set(split_of)}


def test_teacher_top1_is_reported_on_cached_views(prepared):
    top1 = prepared["cache"]["teacher_top1"]
    expected = _direct_top1(prepared["teacher"], prepared["cfg"].clips_dir)
    assert set(top1) == set(expected) == {"train", "test"}
    assert top1 == pytest.approx(expected, abs=1e-9)


def test_fingerprint_changes_with_teacher_weights_and_ingest_params(prepared, tmp_path):
    cfg, info = prepared["cfg"], prepared["info"]
    cache = TeacherLogitCache(cfg.cache_dir)
    cache.check(info, teacher_spec=prepared["spec"], crop_size=32, splits=["train"])  # the right pair passes
    model, spec = load_model(prepared["teacher"])
    with torch.no_grad():
        model.head.bias.add_(0.01)
    other = tmp_path / "other_teacher"
    other_spec = save_model(other, model, spec["name"], spec["kwargs"])
    assert other_spec["weights_fingerprint"] != prepared["spec"]["weights_fingerprint"]
    with pytest.raises(CacheMismatchError, match="teacher weights"):
        cache.check(info, teacher_spec=other_spec)
    with pytest.raises(CacheMismatchError, match="re-ingested"):
        cache.check({**info, "fingerprint": "0" * 64})
    with pytest.raises(CacheMismatchError, match="crop size"):
        cache.check(info, crop_size=28)
    with pytest.raises(CacheMismatchError, match="unlabeled"):
        cache.check(info, splits=["train", "unlabeled"])
    # building for the other teacher into the same directory is refused, not mixed
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        build_teacher_cache(cfg.clips_dir, str(other), cfg.cache_dir, log=lambda *_: None)


def test_ingest_with_other_parameters_gets_another_fingerprint(prepared, tmp_path):
    from dvfl.data.adapters import build_manifest
    from dvfl.data.ingest import IngestConfig, ingest

    cfg = prepared["cfg"]
    ingest(build_manifest("synthetic", os.path.join(cfg.output_dir, "videos"), 1),
           IngestConfig(out=str(tmp_path / "clips_seed1"), frames=8, clips_per_video=2, short_side=32, seed=1,
                        progress=False), log=lambda *_: None)
    other = load_dataset_info(str(tmp_path / "clips_seed1"))
    assert other["fingerprint"] != prepared["info"]["fingerprint"]
    with pytest.raises(CacheMismatchError, match="stale or mismatched"):
        TeacherLogitCache(cfg.cache_dir).check(other)


def test_distillation_refuses_a_stale_cache(prepared, tmp_path):
    from dvfl import pipeline

    cfg = prepared["cfg"]
    model, spec = load_model(prepared["teacher"])
    with torch.no_grad():
        model.head.weight.mul_(1.5)
    retrained = save_model(tmp_path / "retrained", model, spec["name"], spec["kwargs"])
    with pytest.raises(CacheMismatchError, match="Rebuild it"):
        pipeline.teacher_signal(cfg, str(tmp_path / "retrained"), retrained, prepared["info"], kd=True)


def test_online_and_cached_teacher_give_the_same_loss(prepared):
    cfg = prepared["cfg"]
    cache = TeacherLogitCache(cfg.cache_dir)
    clips = read_clips_table(cfg.clips_dir, ["train"], columns=["clip_id", "label", "frames", "num_frames", "height", "width"])
    arrays, ids, labels = batch_arrays(clips.slice(0, 16))
    x = normalize(make_clip_batch(arrays, 32, [View()] * len(arrays)))
    teacher, _ = load_model(prepared["teacher"])
    with torch.no_grad():
        online = teacher.eval()(x)
    student = torch.randn(len(ids), online.shape[1], generator=torch.Generator().manual_seed(0))
    y = torch.from_numpy(labels)
    a = distillation_loss(student, online, y, alpha=0.7, temperature=4.0)
    b = distillation_loss(student, cache.lookup(ids, ["center"] * len(ids)), y, alpha=0.7, temperature=4.0)
    assert abs(float(a.total) - float(b.total)) < 1e-3 * max(1.0, float(a.total))
    assert abs(float(a.kd) - float(b.kd)) < 1e-3 * max(1.0, float(a.kd))


def test_teacher_loading_errors_are_clear(prepared, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth", name="videofocalnet_nano")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.json").write_text(json.dumps({"name": "videofocalnet_nano", "kwargs": {}}))
    (corrupt / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(corrupt)
    # a teacher for 5 classes on a 4-class dataset
    model, spec = load_model(prepared["teacher"], kwargs={"num_classes": 5}, reinit_head=True)
    save_model(tmp_path / "five", model, spec["name"], spec["kwargs"])
    with pytest.raises(CacheMismatchError, match="predicts 5 classes"):
        build_teacher_cache(prepared["cfg"].clips_dir, str(tmp_path / "five"), str(tmp_path / "cache5"))


@pytest.mark.slow
def test_killed_cache_build_resumes_without_partial_files(prepared, tmp_path, ray_local):
    cfg = prepared["cfg"]
    out = tmp_path / "cache"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, str(REPO / "pipelines" / "cache_teacher.py"), "--clips", cfg.clips_dir,
           "--teacher", prepared["teacher"], "--out", str(out), "--batch-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_shards = len(shard_paths(cfg.clips_dir))
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "logits").glob("*.parquet")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((out / "logits").glob("*.parquet")))
    assert 1 <= done_at_kill < n_shards, "the kill must land mid-build"
    assert not (out / "cache.json").exists()
    for f in (out / "logits").glob("*.parquet"):  # whatever is visible is complete
        assert pq.read_metadata(f).num_rows > 0
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    resumed = TeacherLogitCache(out)
    full = TeacherLogitCache(cfg.cache_dir)
    assert resumed.fingerprint == full.fingerprint and len(resumed) == len(full)
    assert not list((out / "logits").glob(".*"))
    ids = read_clips_table(cfg.clips_dir, columns=["clip_id"]).column("clip_id").to_pylist()
    torch.testing.assert_close(resumed.lookup(ids, ["center"] * len(ids)),
                               full.lookup(ids, ["center"] * len(ids)), rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- distillation (issue 5)
@pytest.mark.parametrize("override, field", [
    (("kd.temperature", -1.0), "kd.temperature"),
    (("kd.alpha", 1.5), "kd.alpha"),
    (("student.model", "videofocalnet_huge"), "student.model"),
    (("teacher.path", "/no/such/teacher"), "teacher.path"),
    (("data.root", "/no/such/videos"), "data.root"),
    (("teacher.mode", "sometimes"), "teacher.mode"),
    (("scaling.num_workers", 0), "scaling.num_workers"),
    (("kd.alpha", "high"), "kd.alpha"),
    (("optim.epochs", 0), "optim.epochs"),
    (("kd.tempreature", 2.0), "kd.tempreature"),
    (("data.synthetic.motion", "teleport"), "data.synthetic.motion"),
    (("data.synthetic.angle_jitter_deg", 30.0), "data.synthetic.angle_jitter_deg"),
])
def test_bad_configs_are_rejected_naming_the_field(override, field, tmp_path):
    from dvfl.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "distill.py"), "--output-dir", str(out),
                        "--set", "kd.temperature=-2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "kd.temperature must be > 0" in r.stderr
    assert not out.exists()


def _run_distill(args, address, env_extra=None, timeout=900):
    env = {**os.environ, "RAY_ADDRESS": address, **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "distill.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _tiny_args(out, extra=()):
    args = ["--output-dir", str(out)]
    for key, value in (*TINY, *extra):
        args += ["--set", f"{key}={value}"]
    return args


@pytest.mark.slow
def test_embedded_default_end_to_end_reduced(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("e2e")
    address = ray_local.get_runtime_context().gcs_address
    # like the embedded default: an unlabelled pool too, so three students are trained
    args = _tiny_args(out, [("data.synthetic.unlabeled_videos", 6)])
    r = _run_distill(args, address)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "vfl", "dvfl", "dvfl+unlabeled"}
    # each row's top-1 is its model's accuracy on the test split (1 clip x 1 crop per video here)
    dirs = {"teacher": next((out / "teacher").glob("*/model.json")).parent,
            **{role: next((out / "students").glob(f"{role.replace('+', '-')}-s0-*"))
               for role in ("vfl", "dvfl", "dvfl+unlabeled")}}
    for role, row in models.items():
        assert row["top1_per_seed"] == [pytest.approx(_direct_top1(dirs[role], str(out / "clips"), ["test"])["test"],
                                                      abs=1e-9)], role
        assert row["top1_mean"] == row["top1_per_seed"][0] and row["params"] > 0 and row["gmacs"] > 0
    # the terminal: our own lines, one per epoch, and none of Ray's or PyTorch's known noise
    output = r.stdout + r.stderr
    for noise in ("PreemptionWatcher", "Grad strides do not match", "Progress bars disabled", "DeprecationWarning",
                  "Use 'expr' instead of 'fn'", "Token authentication is enabled"):
        assert noise not in output, noise
    for ours in ("[ingest] ", "[teacher] done", "[cache] ", "[vfl] done", "[dvfl] done", "[report] "):
        assert ours in output, ours
    epochs = re.findall(r'\[train\] \{"epoch": \d+', output)
    assert len(epochs) == 4 + 3 * 2, epochs  # the teacher's 4 epochs, 2 per student: each line once
    assert models["dvfl"]["params"] == models["vfl"]["params"] < models["teacher"]["params"]
    assert "DVFL-Net" in (out / "results.md").read_text()
    gains = report["kd_gains"]  # the issue-5 comparison, per seed, from the same rows
    assert gains["dvfl_minus_vfl_points"] == [
        pytest.approx(100 * (models["dvfl"]["top1_per_seed"][0] - models["vfl"]["top1_per_seed"][0]), abs=0.01)]
    assert "Per seed, DVFL-Net minus VFL-Net" in (out / "results.md").read_text()
    assert (out / "training_curves.png").stat().st_size > 10_000
    # the cached-KD student ran with 2 DDP workers and reported CE, KD and total each epoch
    (dvfl_dir,) = (out / "students").glob("dvfl-s*")
    history = json.loads((dvfl_dir / "model.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train_kd"] > 0 and h["train_ce"] > 0 for h in history)
    # a second run reuses every stage (fingerprints unchanged)
    again = _run_distill(args, address)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") >= 4
    assert not re.search(r"^\[(teacher|vfl|dvfl|dvfl\+unlabeled)\] training", again.stdout, re.M)


@pytest.mark.slow
def test_killed_worker_is_recovered_by_failure_config(prepared, ray_local):
    cfg = prepared["cfg"]
    address = ray_local.get_runtime_context().gcs_address
    args = _tiny_args(cfg.output_dir, [("baseline", False), ("max_failures", 1), ("optim.epochs", 3),
                                       ("data.clips", cfg.clips_dir)])
    r = _run_distill(args, address, {"DVFL_FAIL_AFTER_EPOCH": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (Path(cfg.output_dir) / ".fail-injected").exists()  # a worker really died
    assert "resumed from checkpoint after epoch 1" in r.stdout + r.stderr
    (student,) = [p for p in (Path(cfg.output_dir) / "students").glob("dvfl-s*")
                  if json.loads((p / "model.json").read_text())["identity"]["optim"]["epochs"] == 3]
    history = json.loads((student / "model.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.slow
def test_rerun_resumes_from_checkpoint_with_epochs_and_metrics(prepared, ray_local, tmp_path):
    cfg = prepared["cfg"]
    address = ray_local.get_runtime_context().gcs_address
    marker = Path(cfg.output_dir) / ".fail-injected"
    marker.unlink(missing_ok=True)
    args = _tiny_args(cfg.output_dir, [("baseline", False), ("max_failures", 0), ("optim.epochs", 4),
                                       ("data.clips", cfg.clips_dir)])
    first = _run_distill(args, address, {"DVFL_FAIL_AFTER_EPOCH": "2"})
    assert first.returncode != 0  # no retries allowed: the run stops after epoch 2
    # a real error is never filtered out of the terminal: the failure and its traceback show
    assert "Traceback (most recent call last)" in first.stderr
    assert re.search(r"^[\w.]*(Error|Exception)\b", first.stderr, re.M), first.stderr[-3000:]
    second = _run_distill(args + ["--resume"], address)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from checkpoint after epoch 2" in second.stdout + second.stderr
    (student,) = [p for p in (Path(cfg.output_dir) / "students").glob("dvfl-s*")
                  if json.loads((p / "model.json").read_text())["identity"]["optim"]["epochs"] == 4]
    history = json.loads((student / "model.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[3]["steps"] == 2 * history[1]["steps"]  # the step count (LR schedule) continued


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(prepared, tmp_path):
    """The README's way to run the product: `ray start --head` + `ray job submit -- python pipelines/distill.py`."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # a hermetic local head; real clusters keep token auth
    port, dashboard = _free_port(), _free_port()
    # its own temp dir: `ray start` records itself as "the current cluster" there, and a stale
    # record in the default /tmp/ray would redirect every later plain ray.init() on the machine
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's unix sockets live in it
    # --block keeps the head's processes children of this one process group, so the test stops
    # exactly this head (`ray stop` would stop every Ray instance on the machine).
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--num-cpus=3", "--object-store-memory=400000000",
                             "--include-dashboard=true", f"--temp-dir={temp_dir}", "--block",
                             # the session's Ray instance already holds the default agent ports
                             f"--dashboard-agent-listen-port={_free_port()}",
                             f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                             f"--metrics-export-port={_free_port()}", f"--ray-client-server-port={_free_port()}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = tmp_path / "job_out"
        args = _tiny_args(out, [("baseline", False), ("optim.epochs", 1), ("data.clips", prepared["cfg"].clips_dir),
                                ("teacher.path", prepared["teacher"])])
        deadline = time.time() + 180
        while True:  # the job server answers before its per-node agent is ready to take jobs
            job = subprocess.run([ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                                  "--working-dir", str(REPO), "--", sys.executable, "pipelines/distill.py", *args],
                                 env=env, capture_output=True, text=True, timeout=900)
            not_ready = "No available agent" in job.stderr or "Connection refused" in job.stderr
            if job.returncode == 0 or not not_ready or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        report = json.loads((out / "results.json").read_text())
        assert set(report["models"]) == {"teacher", "dvfl"}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's processes exit on SIGTERM ...
        time.sleep(10)
        os.killpg(head.pid, signal.SIGKILL)  # ... the blocking `ray start` and the monitor do not
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_rebuilds_its_own_cache_but_refuses_a_named_one(prepared, tmp_path):
    """After a config change the default cache (inside the output dir) is the pipeline's to
    rebuild; a cache the user named in teacher.cache is never overwritten."""
    import dataclasses

    from dvfl import pipeline

    cfg = prepared["cfg"]
    model, spec = load_model(prepared["teacher"])
    with torch.no_grad():
        model.head.bias.add_(0.5)
    other = str(tmp_path / "other_teacher")
    save_model(other, model, spec["name"], spec["kwargs"])
    own = dataclasses.replace(cfg, output_dir=str(tmp_path / "run"),
                              data=dataclasses.replace(cfg.data, clips=cfg.clips_dir))
    first = pipeline.ensure_cache(own, prepared["teacher"], log=lambda *_: None)
    second = pipeline.ensure_cache(own, other, log=lambda *_: None)
    assert first["fingerprint"] != second["fingerprint"]
    assert TeacherLogitCache(own.cache_dir).fingerprint == second["fingerprint"]
    named = dataclasses.replace(own, teacher=dataclasses.replace(cfg.teacher, cache=own.cache_dir))
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        pipeline.ensure_cache(named, prepared["teacher"], log=lambda *_: None)
