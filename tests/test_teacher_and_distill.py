"""Teacher training through the shared Ray Train loop, and the view-exact teacher-logit cache.

One small synthetic dataset is generated (real H.264 files), ingested with the real Ray Data
pipeline, and a tiny teacher is trained on it with 2 DDP workers; the tests share them (the
session-wide ``prepared`` fixture in conftest.py, which the Tune tests reuse).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dvfl.artifacts import load_model, save_model
from dvfl.config import load_config
from dvfl.data.shards import load_dataset_info, read_clips_table, shard_paths
from dvfl.losses import distillation_loss
from dvfl.models import CheckpointError, build_model
from dvfl.teacher_cache import CacheMismatchError, TeacherLogitCache, build_teacher_cache
from dvfl.data.views import View, batch_arrays, make_clip_batch, normalize

from conftest import TINY, cli_in_process, direct_top1, set_args, tiny_config  # noqa: F401  (the shared tiny run config; `prepared` is in conftest)

REPO = Path(__file__).resolve().parents[1]


def test_shared_loop_learns_with_two_ddp_workers(prepared):
    history = json.loads((Path(prepared["teacher"]) / "model.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # 4 classes: chance is 25%. The tiny set is too small to generalise motion (see the embedded
    # default notes), but the loop must fit it: the loss falls and training accuracy rises.
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # (10 points above chance and its first epoch: 0.5 was 2 of 56 clips below one CPU's bf16 run's last epoch)
    assert history[-1]["train_top1"] >= max(0.25, history[0]["train_top1"]) + 0.1
    assert {"val_top1", "val_top5", "train_ce", "lr", "command_started"} <= set(history[-1])
    # the loop measures, per epoch, the share of its time spent waiting for the next input batch
    waits = [h["data_wait_fraction"] for h in history]
    assert all(0 < w < 1 for w in waits), waits
    # the run left the process's Ctrl+C handler as it found it (Ray Train's own stayed installed:
    # the next two Ctrl+C of the command did nothing and the third exited 0)
    assert json.loads((Path(prepared["cfg"].output_dir) / "sigint_after_ray_train.json").read_text())["kept"]


def test_cache_covers_every_clip_once_and_matches_a_direct_forward(prepared):
    cfg = prepared["cfg"]
    cache = TeacherLogitCache(cfg.cache_dir)
    clips = read_clips_table(cfg.clips_dir, ["train"], columns=["clip_id", "label", "frames", "num_frames", "height", "width"])
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
    # raw logits: neither probabilities (all in [0, 1]) nor log-probabilities (exp sums to 1)
    assert not ((cached >= 0) & (cached <= 1)).all()
    assert not torch.allclose(cached.exp().sum(1), torch.ones(len(ids)), atol=1e-2)


def test_the_cache_holds_the_training_clips_only_and_their_teacher_top1(prepared):
    """The teacher never runs over the test split before the final evaluation: its clips are never
    distilled on, so the cache has no logits of them (and prints no test score)."""
    cfg, cache = prepared["cfg"], prepared["cache"]
    expected = direct_top1(prepared["teacher"], cfg.clips_dir, ["train"])
    assert set(cache["teacher_top1"]) == {"train"} and cache["splits"] == ["train"]
    assert cache["teacher_top1"] == pytest.approx(expected, abs=1e-9)
    logits = sorted(os.listdir(os.path.join(cfg.cache_dir, "logits")))
    assert shard_paths(cfg.clips_dir, ["test"])
    assert [f for f in logits if f.endswith(".parquet")] == sorted(os.path.basename(p) for p in shard_paths(cfg.clips_dir, ["train"]))
    assert cache["rows"] == sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(cfg.clips_dir, ["train"]))


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
    # as many classes in another order (a renamed class folder re-sorted): it distilled swapped classes
    from dvfl import pipeline
    from dvfl.config import ConfigError

    model, spec = load_model(prepared["teacher"])
    classes = list(prepared["info"]["classes"])
    save_model(tmp_path / "swapped", model, spec["name"], spec["kwargs"], classes=[classes[1], classes[0], *classes[2:]])
    with pytest.raises(CacheMismatchError, match=r"output 0 is class .* label 0 is .* another class list"):
        build_teacher_cache(prepared["cfg"].clips_dir, str(tmp_path / "swapped"), str(tmp_path / "cache_swapped"))
    cfg = dataclasses.replace(prepared["cfg"], teacher=dataclasses.replace(prepared["cfg"].teacher,
                                                                           path=str(tmp_path / "swapped")))
    with pytest.raises(ConfigError, match=r"teacher\.path .* another class list"):
        pipeline.ensure_teacher(cfg, prepared["info"])
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=str(tmp_path / "five")))
    with pytest.raises(ConfigError, match="predicts 5 classes; the dataset has 4"):  # a config error: one line
        pipeline.ensure_teacher(cfg, prepared["info"])


def test_a_teacher_given_as_a_checkpoint_file_is_cached_and_run_online(prepared, tmp_path, ray_local):
    """teacher.path may be a bare checkpoint file (an official one carries no spec): the cache and
    the online teacher build it for the dataset's classes and frames, as ensure_teacher does, and
    the cache matches the spec ensure_teacher records (not timm's 1,000-class default)."""
    from dvfl import pipeline
    from dvfl.artifacts import load_model_for
    from dvfl.models import build_model

    cfg, info = prepared["cfg"], prepared["info"]
    ckpt = tmp_path / "teacher.pth"
    torch.save(build_model("videofocalnet_nano", num_classes=len(info["classes"]), num_frames=cfg.data.frames)
               .state_dict(), ckpt)
    built = build_teacher_cache(cfg.clips_dir, str(ckpt), str(tmp_path / "cache"), teacher_name="videofocalnet_nano",
                                crop_size=cfg.crop_size, log=lambda *_: None)
    assert built["teacher"]["kwargs"] == {"num_classes": len(info["classes"]), "num_frames": cfg.data.frames}
    _, spec = load_model_for(ckpt, "videofocalnet_nano", len(info["classes"]), cfg.data.frames)
    TeacherLogitCache(str(tmp_path / "cache")).check(info, teacher_spec=spec, crop_size=cfg.crop_size,
                                                     splits=[cfg.data.train_split])
    online_cfg = tiny_config(cfg.output_dir, [("teacher.mode", "online"), ("teacher.model", "videofocalnet_nano")])
    signal_ = pipeline.teacher_signal(online_cfg, str(ckpt), spec, info, kd=True)
    assert signal_["mode"] == "online" and signal_["spec"]["kwargs"]["num_classes"] == len(info["classes"])


@pytest.mark.slow
def test_killed_cache_build_resumes_without_partial_files(prepared, tmp_path, ray_local):
    cfg = prepared["cfg"]
    out = tmp_path / "cache"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, str(REPO / "pipelines" / "cache_teacher.py"), "--clips", cfg.clips_dir,
           "--teacher", prepared["teacher"], "--out", str(out), "--batch-size", "2"]
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_shards = len(shard_paths(cfg.clips_dir, ["train"]))
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
    finished = {f.name: f.stat().st_mtime_ns for f in (out / "logits").glob("*.parquet")}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    # resumed: the shards finished before the kill are kept, not built again (a rebuild passes the rest)
    assert {name: (out / "logits" / name).stat().st_mtime_ns for name in finished} == finished
    resumed = TeacherLogitCache(out)
    full = TeacherLogitCache(cfg.cache_dir)
    assert resumed.fingerprint == full.fingerprint and len(resumed) == len(full)
    assert not list((out / "logits").glob(".*"))
    ids = read_clips_table(cfg.clips_dir, ["train"], columns=["clip_id"]).column("clip_id").to_pylist()
    torch.testing.assert_close(resumed.lookup(ids, ["center"] * len(ids)),
                               full.lookup(ids, ["center"] * len(ids)), rtol=2e-3, atol=2e-3)


def test_a_finished_cache_that_no_longer_fits_its_shards_is_repaired_not_reused(prepared, tmp_path, ray_local):
    """A finished cache of the same fingerprint whose files do not fit the clips' shards (the same
    clips re-ingested with another shard layout, a logits file lost): it used to be reused as it was,
    then refused by every training run ("Rebuild it"), and a rebuild, --fresh included, reused it
    again. Now the shards it lacks are built again and files of shards the clips no longer have go."""
    from dvfl import pipeline

    cfg = prepared["cfg"]
    copy = tmp_path / "cache"
    shutil.copytree(cfg.cache_dir, copy)
    logits = sorted((copy / "logits").glob("*.parquet"))
    assert len(logits) >= 2
    logits[0].unlink()  # lost
    pq.write_table(pq.read_table(logits[-1]).slice(0, 3), logits[1])  # another shard's rows: the wrong size
    (copy / "logits" / "train-99999.parquet").write_bytes(logits[-1].read_bytes())  # a shard the clips lack
    kept = logits[-1].stat().st_mtime_ns
    lines = []
    cfg_copy = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=str(copy)))
    assert cfg_copy.cache_dir == str(copy)
    pipeline.ensure_cache(cfg_copy, prepared["teacher"], log=lines.append)
    assert any("does not fit the clips' shards (1 logits file(s) missing, 1 of the wrong size)" in x for x in lines), lines
    built = [int(m.group(1)) for x in lines for m in [re.search(r"\[cache\] \d+/(\d+) shards", x)] if m]
    assert built and set(built) == {2}, lines  # only those two were built again
    assert logits[-1].stat().st_mtime_ns == kept and not (copy / "logits" / "train-99999.parquet").exists()
    repaired, full = TeacherLogitCache(copy), TeacherLogitCache(cfg.cache_dir)
    repaired.check(prepared["info"], crop_size=cfg.crop_size)
    ids = read_clips_table(cfg.clips_dir, ["train"], columns=["clip_id"]).column("clip_id").to_pylist()
    torch.testing.assert_close(repaired.lookup(ids, ["center"] * len(ids)), full.lookup(ids, ["center"] * len(ids)),
                               rtol=2e-3, atol=2e-3)
    lines.clear()
    pipeline.ensure_cache(cfg_copy, prepared["teacher"], log=lines.append)
    assert any("reusing finished cache" in x for x in lines), lines


def test_logits_of_a_shard_that_now_holds_other_clips_are_refused_and_rebuilt(prepared, tmp_path, ray_local):
    """The same videos re-ingested with another shard layout keep the fingerprint and give shards of
    the same names, some of the same sizes, holding other clips: such a shard's logits passed every
    check and were reused; a training run then failed mid-epoch on clip ids the cache lacked.
    Here one shard's content digest changes as such a re-ingest changes it (the ingest test
    shows the digests follow the layout)."""
    from dvfl import pipeline

    cfg = prepared["cfg"]
    clips, cache = tmp_path / "clips", tmp_path / "cache"
    shutil.copytree(cfg.clips_dir, clips)
    shutil.copytree(cfg.cache_dir, cache)
    info = json.loads((clips / "dataset.json").read_text())
    moved = next(e for e in info["shards"] if e["split"] == cfg.data.train_split)
    moved["content"] = "0" * 16
    (clips / "dataset.json").write_text(json.dumps(info))
    name = os.path.basename(moved["file"])
    with pytest.raises(CacheMismatchError, match=rf"{name} \(logits of other clips"):
        TeacherLogitCache(cache).check(info, crop_size=cfg.crop_size)
    lines = []
    cfg_copy = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, clips=str(clips)),
                                   teacher=dataclasses.replace(cfg.teacher, cache=str(cache)))
    pipeline.ensure_cache(cfg_copy, prepared["teacher"], log=lines.append)
    built = [x for x in lines if re.search(r"\[cache\] \d+/\d+ shards", x)]
    assert len(built) == 1 and name in built[0], lines  # that shard alone, made again
    TeacherLogitCache(cache).check(info, crop_size=cfg.crop_size)


def test_a_cache_writer_without_a_gpu_from_ray_stays_on_the_cpu(prepared, ray_local, monkeypatch):
    """use_gpu false on a GPU node: the actor (num_gpus=0) still sees the node's GPUs, and the
    writer used to load the teacher onto cuda:0 anyway, uncounted by Ray."""
    import ray

    from dvfl.teacher_cache import ShardLogitWriter, view_spec

    model, spec = load_model(prepared["teacher"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what such an actor sees
    writer = ShardLogitWriter(spec, [ray.put(model.state_dict())], view_spec(prepared["cfg"].crop_size, ["center"]),
                              "float16", batch_size=4, threads=1, use_gpu=False)
    assert writer.device.type == "cpu" and next(writer.model.parameters()).device.type == "cpu"


def test_a_cut_clip_shard_is_named_damaged_and_a_refused_read_is_not(prepared, ray_local, tmp_path, monkeypatch):
    """A clip shard cut short (a folder copied partway) crashed the cache build with pyarrow's
    ArrowInvalid naming no file; a read refused by the bucket (an expired token) or the disk was
    reported as a damaged shard, with advice to delete good clips."""
    import ray

    from dvfl import teacher_cache
    from dvfl.data import shards as shards_mod
    from dvfl.teacher_cache import ShardLogitWriter, view_spec

    src = shard_paths(prepared["cfg"].clips_dir, ["train"])[0]
    cut = tmp_path / "train-00000.parquet"
    cut.write_bytes(Path(src).read_bytes()[:4000])
    model, spec = load_model(prepared["teacher"])
    writer = ShardLogitWriter(spec, [ray.put(model.state_dict())], view_spec(prepared["cfg"].crop_size, ["center"]),
                              "float16", batch_size=4, threads=1)
    batch = {"shard": [str(cut)], "out": [str(tmp_path / "out.parquet")], "content": [None]}
    (stats,) = [json.loads(s) for s in writer(batch)["stats"]]
    assert stats["corrupt"] and str(cut) in stats["corrupt"][0] and "ArrowInvalid" in stats["corrupt"][0], stats

    def refused(path, **kw):  # what pyarrow's S3 filesystem raises; its words hold "INVALID" for a bad key
        raise OSError("When reading information for key 'clips/train-00000.parquet' in bucket 'b': AWS Error "
                      "INVALID_ACCESS_KEY_ID during GetObject operation: The provided token is malformed or otherwise invalid")

    from dvfl import storage

    monkeypatch.setattr(teacher_cache, "parquet_file", refused)
    monkeypatch.setattr(storage, "read_bytes", refused)
    (stats,) = [json.loads(s) for s in writer({**batch, "shard": [src]})["stats"]]
    assert stats["read"] and not stats["corrupt"] and "INVALID_ACCESS_KEY_ID" in stats["error"], stats
    assert shards_mod.find_corrupt_shards([src]) == []
    monkeypatch.undo()
    # damage is judged on bytes that were fetched, whatever pyarrow's words: a flipped page, a cut file
    flipped = bytearray(Path(src).read_bytes())
    flipped[len(flipped) // 2:len(flipped) // 2 + 64] = bytes(b ^ 0xFF for b in flipped[len(flipped) // 2:len(flipped) // 2 + 64])
    (tmp_path / "flipped.parquet").write_bytes(bytes(flipped))
    assert [p for p, _ in shards_mod.find_corrupt_shards([src, str(cut), str(tmp_path / "flipped.parquet")])] == [
        str(cut), str(tmp_path / "flipped.parquet")]
    # `dvfl cache` on such clips: the damaged shard, to re-ingest (it said "writing the cache to OUT failed",
    # sending the user to their disk)
    clips = tmp_path / "clips"
    shutil.copytree(prepared["cfg"].clips_dir, clips)
    first = sorted((clips / "shards").glob("train-*.parquet"))[0]
    first.write_bytes(first.read_bytes()[:4000])
    done = cli_in_process("cache_teacher.py", "--clips", clips, "--teacher", prepared["teacher"], "--out",
                          tmp_path / "cache", "--verify", 0)
    assert done.returncode == 1 and "clip shard(s) cannot be read" in done.stderr and str(first) in done.stderr, done.stderr
    assert "writing the cache" not in done.stderr



def test_teacher_logits_a_float16_cache_cannot_hold_are_refused_naming_the_fix(prepared, ray_local, tmp_path):
    """Logits beyond 65504 became +inf in a float16 cache; training then got NaN gradients from a finite
    loss and stopped as "diverged, lower optim.lr". A teacher whose logits are NaN is named as broken."""
    import ray

    from dvfl.teacher_cache import ShardLogitWriter, view_spec

    model, spec = load_model(prepared["teacher"])
    with torch.no_grad():
        model.head.weight.mul_(1e6)
        model.head.bias.mul_(1e6)
    loud = tmp_path / "loud_teacher"
    save_model(loud, model, spec["name"], spec["kwargs"])
    done = cli_in_process("cache_teacher.py", "--clips", prepared["cfg"].clips_dir, "--teacher", loud, "--out",
                          tmp_path / "cache", "--verify", 0)
    assert done.returncode == 1, done.stderr
    assert "beyond float16's range" in done.stderr and "--dtype float32" in done.stderr, done.stderr
    assert not list((tmp_path / "cache").rglob("*.parquet"))  # nothing of it written
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    writer = ShardLogitWriter(spec, [ray.put(model.state_dict())], view_spec(prepared["cfg"].crop_size, ["center"]),
                              "float32", batch_size=4, threads=1)
    src = shard_paths(prepared["cfg"].clips_dir, ["train"])[0]
    (stats,) = [json.loads(s) for s in writer({"shard": [src], "out": [str(tmp_path / "o.parquet")],
                                               "content": [None]})["stats"]]
    assert "are not finite" in stats["nonfinite"] and "broken" in stats["nonfinite"], stats
    assert not (tmp_path / "o.parquet").exists()

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
    (("data.synthetic.luma_contrast", 200.0), "data.synthetic.luma_contrast"),
    (("optim.clip_grad", -1.0), "optim.clip_grad"),  # a negative max norm would flip every gradient
    (("teacher.optim.clip_grad", -0.5), "teacher.optim.clip_grad"),
    (("seeds", [0, 0]), "seeds"),  # one seed twice: one run reported as two
    (("max_failures", -1), "max_failures"),
    (("data.val_split", "test"), "data.val_split"),  # choices would read the split reported once
    # one view twice ("center+" is "center"): its rows were cached twice and the workers' lookups shifted
    (("teacher.views", ["center", "center+"]), "teacher.views"),
    (("data.frames", 32), "data.synthetic.frames"),  # 16-frame generated videos: every one too short
])
def test_bad_configs_are_rejected_naming_the_field(override, field, tmp_path):
    from dvfl.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    out = tmp_path / "never"
    r = cli_in_process("distill.py", "--out", out, "--set", "kd.temperature=-2")
    assert r.returncode == 2
    assert "kd.temperature must be > 0" in r.stderr
    assert not out.exists()
    # a "no teacher" distillation used to train a teacher and distil online from it
    r = cli_in_process("distill.py", "--out", out, "--set", "teacher.mode=none")
    assert r.returncode == 2 and "teacher.mode is none" in r.stderr, r.stderr
    assert not out.exists()


def _run_distill(args, address, env_extra=None, timeout=900):
    env = {**os.environ, "RAY_ADDRESS": address, **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "distill.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _tiny_args(out, extra=()):
    return ["--out", str(out), *set_args([*TINY, *extra])]


def test_students_side_by_side_in_runners_and_a_killed_runner_resumes(prepared, ray_local, tmp_path):
    """scaling.concurrent_runs: the one-worker student runs train two at a time in runner actors
    (no Ray Train run each: their state is epoch files, not Train checkpoints); vfl_long trains
    twice the epochs; a runner that dies mid-epoch is replaced and its run resumes from its last
    epoch state (max_failures), with every epoch in the history once."""
    cfg = prepared["cfg"]
    out = tmp_path / "side"
    args = _tiny_args(out, [("students", ["vfl_long", "dvfl"]), ("optim.epochs", 2), ("max_failures", 1),
                            ("scaling.num_workers", 1), ("scaling.cpus_per_worker", 1),
                            ("scaling.concurrent_runs", 2), ("data.clips", cfg.clips_dir),
                            ("teacher.path", prepared["teacher"])])
    r = _run_distill(args, ray_local.get_runtime_context().gcs_address, {"DVFL_FAIL_AFTER_EPOCH": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / ".fail-injected").exists()  # a runner really died
    assert re.search(r"\[(vfl_long|dvfl) s0\] resumed from checkpoint after epoch 1", r.stdout + r.stderr)
    report = json.loads((out / "results.json").read_text())
    assert set(report["models"]) == {"teacher", "vfl_long", "dvfl"}
    epochs = {}
    for role in ("vfl_long", "dvfl"):
        (student,) = (out / "students").glob(f"{role}-s0-*")
        epochs[role] = [h["epoch"] for h in json.loads((student / "model.json").read_text())["history"]]
    assert epochs == {"vfl_long": [1, 2, 3, 4], "dvfl": [1, 2]}
    # the runs' epoch states are gone once their models are saved (a rerun reuses the models)
    assert list((out / "ray_results").iterdir()) == []
    assert "dvfl_minus_vfl_long_points" in report["kd_gains"] and report["wall_seconds"] > 0


def test_a_run_in_the_other_launch_mode_says_it_starts_over(tmp_path):
    """Runners keep an interrupted run's state as epoch files, Ray Train as checkpoint folders: a
    rerun with scaling.concurrent_runs toggled started at epoch 1 without a word (hours lost)."""
    from types import SimpleNamespace as NS

    from conftest import tiny_config
    from dvfl.pipeline import _announce

    run = NS(name="dvfl-s0-x", loop=NS(label="dvfl s0", teacher=NS(mode="cache")),
             section=NS(model="videofocalnet_nano"), kwargs={}, epochs=2)
    runners, train = (tiny_config(tmp_path, [("scaling.num_workers", 1), ("scaling.concurrent_runs", n)]) for n in (2, 0))
    run_dir = tmp_path / "ray_results" / run.name

    def said(cfg):
        lines = []
        _announce(cfg, run, "somewhere", lines.append)
        return [line for line in lines if "note:" in line]

    assert said(runners) == said(train) == []
    (run_dir / "checkpoint_000001").mkdir(parents=True)
    assert said(train) == []
    (note,) = said(runners)
    assert note.startswith(f"[dvfl s0] note: {run_dir} holds the epochs of an interrupted run with "
                           "scaling.concurrent_runs 0; this one starts at epoch 1"), note
    (run_dir / "checkpoint_000001").rmdir()
    (run_dir / "epoch_000001.pt").write_bytes(b"")
    assert said(runners) == [] and "scaling.concurrent_runs >= 1" in said(train)[0]


def test_runners_that_ray_cannot_all_place_still_train_every_run(prepared, ray_local, tmp_path):
    """concurrent_runs 2 where one runner fits (2 CPUs each, 3 in Ray): the second runner waits
    unplaced with a run handed to it, and a finished runner kept its CPUs idle while the queue was
    empty, so that run waited for ever. A runner with nothing left to do now gives its CPUs back."""
    cfg = prepared["cfg"]
    out = tmp_path / "one_fits"
    args = _tiny_args(out, [("students", ["dvfl"]), ("seeds", [0, 1]), ("optim.epochs", 1),
                            ("scaling.num_workers", 1), ("scaling.cpus_per_worker", 2), ("scaling.concurrent_runs", 2),
                            ("data.clips", cfg.clips_dir), ("teacher.path", prepared["teacher"]),
                            ("teacher.cache", cfg.cache_dir)])
    r = _run_distill(args, ray_local.get_runtime_context().gcs_address, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dvfl = json.loads((out / "results.json").read_text())["models"]["dvfl"]
    assert dvfl["seeds"] == 2 and len(dvfl["top1_per_seed"]) == 2, dvfl


def test_a_reingest_killed_while_deleting_the_old_clips_is_redone_not_refused(prepared, ray_local, tmp_path):
    """A changed data setting re-ingests the run's own clips folder, deleting the plan first, then
    the shards: killed in between, every rerun was refused ("holds shards but no _plan.json") and
    --fresh (which keeps the clips) did not help. The run's own folder is ingested again."""
    from dvfl import pipeline

    cfg = tiny_config(tmp_path)
    shutil.copytree(Path(prepared["cfg"].output_dir) / "videos", tmp_path / "videos")  # (not generated again)
    (tmp_path / "clips" / "shards").mkdir(parents=True)
    shutil.copy(shard_paths(prepared["cfg"].clips_dir)[0], tmp_path / "clips" / "shards" / "train-00000.parquet")
    lines = []
    info = pipeline.ensure_clips(cfg, log=lines.append)
    assert any("re-ingesting" in x for x in lines), lines
    assert {"train", "test"} <= set(info["counts"]) and (tmp_path / "clips" / "dataset.json").exists()


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
    # with this command's remedies, not dvfl cache's (--out, --fresh: distill --fresh deleted the
    # students and kept the cache)
    # ... and says what changed, not "another teacher, other clips or other views (a retrained teacher?)"
    with pytest.raises(CacheMismatchError, match=r"teacher\.cache .* built from teacher weights \w+ then, \w+ now "
                                                 r".* rebuild it with `dvfl cache --config") as refused:
        pipeline.ensure_cache(named, prepared["teacher"], log=lambda *_: None)
    assert "crop size" not in str(refused.value)
    recropped = _with(named, teacher={"cache_dtype": "float32"}, data={"crop_size": cfg.crop_size - 4})
    with pytest.raises(CacheMismatchError, match=rf"crop size {cfg.crop_size} then, {cfg.crop_size - 4} now; "
                                                 r"logits stored as float16 then, float32 now"):
        pipeline.ensure_cache(recropped, other, log=lambda *_: None)
    # a record cut short (a folder copied partway) is named, not a JSON traceback
    record = Path(own.cache_dir) / "cache.json"
    record.write_text(record.read_text()[:40])
    with pytest.raises(CacheMismatchError, match=rf"{re.escape(str(record))} is not readable as a teacher cache's record"):
        pipeline.ensure_cache(named, other, log=lambda *_: None)
    assert pipeline.ensure_cache(own, other, log=lambda *_: None)["fingerprint"] == second["fingerprint"]  # its own: rebuilt


# ----------------------------------------------------------------------------- given inputs are checked
def _with(cfg, **sections):
    import dataclasses

    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) if isinstance(v, dict) else v
                                       for k, v in sections.items()})


def test_given_clips_must_match_the_configs_frames_short_side_and_crop(prepared, tmp_path, capsys):
    from dvfl import pipeline

    cfg = _with(prepared["cfg"], output_dir=str(tmp_path / "run"), data={"clips": prepared["cfg"].clips_dir})
    assert pipeline.ensure_clips(cfg, log=None)["fingerprint"] == prepared["info"]["fingerprint"]
    with pytest.raises(ValueError, match="data.frames is 16, the clips have 8 frames"):
        pipeline.ensure_clips(_with(cfg, data={"clips": cfg.data.clips, "frames": 16}), log=None)
    with pytest.raises(ValueError, match=r"data.short_side is 64, the clips were stored at short side 32.*"
                                         r"data.crop_size is 64, larger than the clips' short side 32"):
        pipeline.ensure_clips(_with(cfg, data={"clips": cfg.data.clips, "short_side": 64}), log=None)
    with pytest.raises(ValueError, match="eval.clips is 2, the clips store 1"):
        pipeline.ensure_clips(_with(cfg, eval={"clips": 2}), log=None)
    # training reads every clip stored: results.json said 1 per video while it trained on 2
    with pytest.raises(ValueError, match="data.clips_per_video is 1, the clips hold 2 per training video"):
        pipeline.ensure_clips(_with(cfg, data={"clips": cfg.data.clips, "clips_per_video": 1}), log=None)
    # a misspelt split used to reach Ray as an empty dataset (session 29); "val" is carved from training
    with pytest.raises(ValueError, match=r"data.train_split is 'trian', the clips hold split\(s\) 'test', 'train'"):
        pipeline.ensure_clips(_with(cfg, data={"clips": cfg.data.clips, "train_split": "trian"}), log=None)
    with pytest.raises(ValueError, match=r"data.val_split is 'validation', the clips hold"):
        pipeline.ensure_clips(_with(cfg, data={"clips": cfg.data.clips, "val_split": "validation"}), log=None)
    # clips kept at their source size (short side 0): a crop larger than the smallest stored frame
    # crashed training mid-epoch; the footers' statistics name that size first (session 30)
    source_size = tmp_path / "source_size"
    shutil.copytree(cfg.data.clips, source_size)
    info = json.loads((source_size / "dataset.json").read_text())
    info["params"]["short_side"] = 0
    (source_size / "dataset.json").write_text(json.dumps(info))
    at_source = {"clips": str(source_size), "short_side": 0, "crop_size": 40}
    with pytest.raises(ValueError, match="data.crop_size is 40, larger than the smallest stored frame side 32"):
        pipeline.ensure_clips(_with(cfg, data=at_source), log=None)
    pipeline.ensure_clips(_with(cfg, data={**at_source, "crop_size": 32}), log=None)
    # the command says so before Ray starts or a file is written (it started Ray, rewrote config.yaml
    # and removed the earlier results first, then failed with a traceback: session 28)
    out = tmp_path / "cli"
    r = _run_distill(_tiny_args(out, [("data.clips", cfg.data.clips), ("data.frames", 16), ("data.test_split", "tset")]),
                     "127.0.0.1:1", timeout=120)
    assert r.returncode == 2 and "config error: data.clips" in r.stderr and "data.frames is 16" in r.stderr, r.stderr
    assert "data.test_split is 'tset', the clips hold split(s) 'test', 'train'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    # a given teacher of other frames: the run's clips were re-ingested, then the teacher failed on them
    other_frames = _with(prepared["cfg"], output_dir=str(tmp_path / "run16"), data={"frames": 16},
                         teacher={"path": prepared["teacher"]})
    with pytest.raises(ValueError, match=r"teacher.path .* takes clips of 8 frames, data.frames is 16"):
        pipeline.check_given_inputs(other_frames)
    pipeline.check_given_inputs(_with(other_frames, data={"frames": 8}))
    # a given teacher at another crop than it was trained on: said in a line (session 41: nothing)
    capsys.readouterr()
    trained = json.loads(open(os.path.join(prepared["teacher"], "model.json")).read())["inputs"]["crop_size"]
    pipeline.check_given_inputs(_with(other_frames, data={"frames": 8, "crop_size": trained - 8}))
    assert f"was trained on {trained} px crops, data.crop_size is {trained - 8}" in capsys.readouterr().err
    # a teacher of another official split: this split's test videos are among its training videos
    # (session 41: given, it was used without a word)
    spec = json.loads(open(os.path.join(prepared["teacher"], "model.json")).read())
    assert spec["trained_on"] == {"dataset": "synthetic", "split": 1} == pipeline.trained_on(prepared["info"])
    other_split = tmp_path / "teacher_split2"
    shutil.copytree(prepared["teacher"], other_split)
    (other_split / "model.json").write_text(json.dumps({**spec, "trained_on": {"dataset": "synthetic", "split": 2}}))
    with pytest.raises(ValueError, match=r"was trained on synthetic split 2, these clips are split 1: its test videos"):
        pipeline.check_given_inputs(_with(other_frames, data={"frames": 8, "clips": prepared["cfg"].clips_dir},
                                          teacher={"path": str(other_split)}))
    with pytest.raises(ValueError, match=r"synthetic split 2, these clips are split 1"):
        pipeline.ensure_teacher(_with(other_frames, data={"frames": 8}, teacher={"path": str(other_split)}),
                                prepared["info"], log=lambda *_: None)
    assert pipeline.teacher_split_problem("t", {"trained_on": {"dataset": "ucf50", "split": 3}},
                                          {"dataset": "ucf50", "source": {"test_group": 7}}).startswith(
        "teacher.path t was trained on ucf50 fold (held-out group) 3, these clips are fold (held-out group) 7")


def test_evaluation_in_a_ray_task_gives_the_numbers_of_the_driver(prepared, ray_local, monkeypatch):
    """With scaling.use_gpu the final evaluation and the teacher gate run in a Ray task holding a GPU
    (the driver may be a head node without one); on this CPU machine the same task, without a GPU,
    gives the driver's numbers."""
    from dvfl import pipeline

    cfg = prepared["cfg"]
    here = pipeline.evaluate_model_at(cfg, prepared["teacher"], 8, "test", in_task=False, num_clips=1, num_crops=3)
    remote = pipeline.evaluate_model_at(cfg, prepared["teacher"], 8, "test", in_task=True, num_clips=1, num_crops=3)
    assert remote == here and here["params"] > 0 and here["videos"] == 16
    # from here on this process cannot evaluate: the numbers below come from a Ray task or nowhere
    import dvfl.train.evaluate

    def not_here(*args, **kwargs):
        raise AssertionError("evaluated in the driver, not in a Ray task")

    monkeypatch.setattr(dvfl.train.evaluate, "evaluate_multiview", not_here)
    assert pipeline.evaluate_model_at(cfg, prepared["teacher"], 8, "test", in_task=True, num_clips=1,
                                      num_crops=3) == here
    # a model at a local path goes with the task: the task's node may not see the driver's disk (a
    # teacher under the head's job root failed on a GPU node as "a checkpoint file needs the model name")
    model, _ = load_model(prepared["teacher"])
    unseen = str(Path(prepared["teacher"]).parent / "on-the-head-only")
    assert pipeline.evaluate_model_at(cfg, unseen, 8, "test", in_task=True, model=model, num_clips=1,
                                      num_crops=3) == here


def test_a_given_teachers_evaluation_is_kept_in_the_run_dir_and_keyed_by_the_clips(prepared, tmp_path):
    """A teacher the user gives is only read: its evaluation goes to the run's evaluations.json,
    keyed by its weights and the clips' fingerprint, so another dataset's accuracy (planted in its
    model.json the way the old cache stored it) is never reported."""
    from dvfl import pipeline

    user = tmp_path / "user_teacher"
    shutil.copytree(prepared["teacher"], user)
    cfg = _with(prepared["cfg"], output_dir=str(tmp_path / "run"), data={"clips": prepared["cfg"].clips_dir})
    spec = json.loads((user / "model.json").read_text())
    planted = {"top1": 0.987, "top5": 0.999, "clips": 1, "crops": 1, "videos": 3, "params": 1, "gmacs": 1.0}
    spec[f"eval_{cfg.data.test_split}_{cfg.eval.clips}x{cfg.eval.crops}"] = planted  # from another dataset
    (user / "model.json").write_text(json.dumps(spec))
    before = (user / "model.json").read_bytes()
    m = pipeline.evaluate_model_dir(cfg, str(user), log=lambda *_: None)
    assert m["top1"] != 0.987 and m["videos"] == 16
    assert (user / "model.json").read_bytes() == before
    assert m["val_top1"] == spec["val_top1"] is not None  # trained on these clips with this hold-out
    assert m["history"] == spec["history"] and m["history"]
    stored = json.loads((tmp_path / "run" / "evaluations.json").read_text())
    (key, value), = stored.items()
    assert prepared["spec"]["weights_fingerprint"] in key and prepared["info"]["fingerprint"][:16] in key
    # reused on the same clips; clips with another fingerprint are evaluated afresh
    stored[key] = dict(value, top1=0.5)
    (tmp_path / "run" / "evaluations.json").write_text(json.dumps(stored))
    assert pipeline.evaluate_model_dir(cfg, str(user), log=lambda *_: None)["top1"] == 0.5
    other = tmp_path / "clips2"
    shutil.copytree(cfg.data.clips, other)
    info = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps(dict(info, fingerprint="f" * 64)))
    again = pipeline.evaluate_model_dir(_with(cfg, data={"clips": str(other)}), str(user), log=lambda *_: None)
    assert again["top1"] == m["top1"] and len(json.loads((tmp_path / "run" / "evaluations.json").read_text())) == 2
    # its recorded validation top-1 is of other clips: not reported as this run's (session 29)
    assert again["val_top1"] is None and again["val_split"] is None
    # nor its curve (training_curves.png drew it as this run's validation accuracy; session 47)
    assert again["history"] == []
    # another crop of the same clips is another evaluation (the clips' fingerprint does not say it)
    pipeline.evaluate_model_dir(_with(cfg, data={"crop_size": 28}), str(user), log=lambda *_: None)
    assert any("_28px_" in k for k in json.loads((tmp_path / "run" / "evaluations.json").read_text()))


def test_a_model_this_run_scores_under_other_views_records_them_for_predict(prepared, tmp_path):
    """A rerun with other `eval` settings reuses its models (their folders do not depend on them) and
    reports them under the new views: model.json's eval_views (predict's and evaluate's default) kept
    the first run's, and the model card called them the run's evaluation."""
    from dvfl import pipeline

    run = tmp_path / "run"
    owned = run / pipeline.TEACHER_DIR / "teacher-x"
    shutil.copytree(prepared["teacher"], owned)
    cfg = _with(prepared["cfg"], output_dir=str(run), data={"clips": prepared["cfg"].clips_dir})
    first = f"{cfg.eval.clips}x{cfg.eval.crops}"
    assert json.loads((owned / "model.json").read_text())["inputs"]["eval_views"] == first == "1x1"
    m = pipeline.evaluate_model_dir(_with(cfg, eval={"crops": 3}), str(owned), log=lambda *_: None)
    assert (m["clips"], m["crops"]) == (1, 3)
    assert json.loads((owned / "model.json").read_text())["inputs"]["eval_views"] == "1x3"
    pipeline.evaluate_model_dir(cfg, str(owned), log=lambda *_: None)  # (its stored evaluation, read again)
    assert json.loads((owned / "model.json").read_text())["inputs"]["eval_views"] == first


def test_a_cache_built_for_other_views_is_refused(prepared):
    from dvfl import pipeline

    cfg = _with(prepared["cfg"], teacher={"views": ["center", "center+flip"]})
    with pytest.raises(CacheMismatchError, match=r"built for views \['center'\], teacher.views is \['center', "
                                                 r"'center\+flip'\]"):
        pipeline.teacher_signal(cfg, prepared["teacher"], prepared["spec"], prepared["info"], kd=True)


def test_dvfl_cache_with_a_set_takes_the_clips_dataset_and_its_flip_rule(prepared, ray_local, tmp_path):
    """`dvfl cache --clips C ... --set k=v` built its config on the embedded default's, whose dataset (the
    generated one) refuses flip views: real clips' center+flip cache was refused as "synthetic clips"."""
    clips = tmp_path / "clips"  # the tiny clips, named a dataset whose classes are not directions
    shutil.copytree(prepared["cfg"].clips_dir, clips)
    info = json.loads((clips / "dataset.json").read_text())
    (clips / "dataset.json").write_text(json.dumps({**info, "dataset": "ucf101"}))
    r = cli_in_process("cache_teacher.py", "--clips", clips, "--teacher", prepared["teacher"], "--out", tmp_path / "c",
                       "--crop-size", prepared["cfg"].crop_size, "--cache-views", "center,center+flip", "--set",
                       "teacher.cache_dtype=float32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["view_spec"]["views"] == ["center", "center+flip"]
    # the clips named by a --set instead (session 50): the same cache, found finished
    r = cli_in_process("cache_teacher.py", "--set", f"data.clips={clips}", "--teacher", prepared["teacher"], "--out",
                       tmp_path / "c", "--crop-size", prepared["cfg"].crop_size, "--cache-views", "center,center+flip",
                       "--set", "teacher.cache_dtype=float32")
    assert r.returncode == 0 and "must not flip" not in r.stderr, r.stderr[-3000:]
    # the generated clips themselves: still refused, with a --set or without one
    for extra in (["--set", "teacher.cache_dtype=float32"], []):
        r = cli_in_process("cache_teacher.py", "--clips", prepared["cfg"].clips_dir, "--teacher", prepared["teacher"],
                           "--out", tmp_path / "c2", "--cache-views", "center,center+flip", *extra)
        assert r.returncode == 2 and "must not flip synthetic clips" in r.stderr, (extra, r.stderr[-3000:])
    assert not (tmp_path / "c2").exists()


def test_a_logits_row_twice_is_refused_and_workers_look_up_what_the_driver_does(prepared, tmp_path):
    """A (clip, view) key held twice made the driver's index and the one shipped to Train workers
    (keys renumbered 0..n-1) disagree for every later key: workers trained on other clips' logits.
    Such a cache is now refused, and the shipped index carries the driver's row numbers."""
    from dvfl.teacher_cache import cache_fingerprint, view_spec

    cache = TeacherLogitCache(prepared["cfg"].cache_dir)
    ids = read_clips_table(prepared["cfg"].clips_dir, ["train"], columns=["clip_id"]).column("clip_id").to_pylist()
    shipped = TeacherLogitCache.from_packed(cache.packed())
    assert torch.equal(shipped.lookup(ids, ["center"] * len(ids)), cache.lookup(ids, ["center"] * len(ids)))

    copy = tmp_path / "cache"
    shutil.copytree(prepared["cfg"].cache_dir, copy)
    first = sorted((copy / "logits").glob("*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), first)
    with pytest.raises(CacheMismatchError, match=r"holds 1 \(clip, view\) row\(s\) twice"):
        TeacherLogitCache(copy).lookup(ids[:1], ["center"])
    with pytest.raises(ValueError, match="name a view twice"):
        view_spec(32, ["center", "center+"])
    # the same views in another order are the same logits: one fingerprint
    spec = prepared["spec"]
    assert cache_fingerprint(spec, "f", view_spec(32, ["center+flip", "center"]), "float16") == cache_fingerprint(
        spec, "f", view_spec(32, ["center", "center+flip"]), "float16")


def test_a_cache_that_fails_verification_is_computed_again_on_the_next_run(prepared, tmp_path, ray_local):
    """Rows that a direct teacher forward contradicts: the build fails (as before) and removes the
    logits file holding them, so that the next run computes it again instead of failing the same way."""
    cfg = prepared["cfg"]
    out = tmp_path / "cache"
    shutil.copytree(cfg.cache_dir, out)
    fingerprint = json.loads((out / "cache.json").read_text())["fingerprint"]
    (out / "cache.json").unlink()  # a build cut short before its verification
    (out / "_build.json").write_text(json.dumps({"fingerprint": fingerprint}))
    bad = sorted((out / "logits").glob("*.parquet"))[0]
    table = pq.read_table(bad)
    flipped = [bytes(b ^ 0x40 for b in v) for v in table.column("logits").to_pylist()]  # fp16 sign/exponent bits
    i = table.schema.get_field_index("logits")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(flipped, pa.binary())), bad)
    kwargs = dict(crop_size=cfg.crop_size, views=("center",), batch_size=4, verify_samples=10_000, log=lambda *_: None)
    # `dvfl cache`: exit 1, as distill reports it (a failure of the build; 2 is for inputs that do not fit)
    r = cli_in_process("cache_teacher.py", "--clips", cfg.clips_dir, "--teacher", prepared["teacher"], "--out", out,
                       "--crop-size", cfg.crop_size, "--batch-size", 4, "--verify", 10_000)
    assert r.returncode == 1 and re.search(rf"^error: cached logits of .* differ from a direct teacher forward .*"
                                           rf"removed {bad.name}", r.stderr, re.M), r.stderr[-3000:]
    assert not bad.exists()
    info = build_teacher_cache(cfg.clips_dir, prepared["teacher"], str(out), **kwargs)
    assert info["fingerprint"] == fingerprint and info["verify"]["checked"] == len(TeacherLogitCache(out))


def test_a_missing_or_short_logits_file_is_found_before_training(prepared, tmp_path):
    from dvfl import pipeline

    cache = tmp_path / "cache"
    shutil.copytree(prepared["cfg"].cache_dir, cache)
    cfg = _with(prepared["cfg"], teacher={"cache": str(cache)})
    train = sorted((cache / "logits").glob("train-*.parquet"))
    train[0].unlink()
    table = pq.read_table(train[1])
    pq.write_table(table.slice(0, table.num_rows - 1), train[1])
    with pytest.raises(CacheMismatchError, match=rf"1 logits file\(s\) missing .*{train[0].name}.*"
                                                 rf"{train[1].name} \({table.num_rows - 1} rows, expected"):
        pipeline.teacher_signal(cfg, prepared["teacher"], prepared["spec"], prepared["info"], kd=True)
    # a damaged footer is as good as missing (rebuilt): cut short (ArrowInvalid), or its metadata
    # garbled (pyarrow's OSError "Couldn't deserialize thrift"). (A bucket's failed read: test_object_storage.py)
    import struct

    from dvfl import teacher_cache as tc

    train[2].write_bytes(train[2].read_bytes()[:-100])
    garbled = bytearray(train[3].read_bytes())
    start = len(garbled) - 8 - struct.unpack("<I", garbled[-8:-4])[0]  # the footer's metadata
    garbled[start:start + 16] = b"\xff" * 16
    train[3].write_bytes(bytes(garbled))
    absent, short = tc.TeacherLogitCache(str(cache)).logits_files(prepared["info"])
    assert absent == [train[0].name], absent
    assert short[train[2].name] == "unreadable: ArrowInvalid" and short[train[3].name] == "unreadable: OSError", short


def test_the_students_of_a_run_share_one_copy_of_their_start_weights(prepared, ray_local, tmp_path):
    """Each planned student put its own copy of the start checkpoint in the object store (the embedded
    recipe: 12 copies, over a local 1 GiB object store); inside train_students they share one."""
    from dvfl import pipeline

    cfg = tiny_config(tmp_path, [])
    kwargs = pipeline.model_kwargs(cfg.student, len(prepared["info"]["classes"]), cfg)
    torch.save(build_model(cfg.student.model, **kwargs).state_dict(), tmp_path / "start.pt")
    section = dataclasses.replace(cfg.student, checkpoint=str(tmp_path / "start.pt"))
    said = []
    with pipeline.shared_start_weights():
        first, again = (pipeline._init_state_ref(section, kwargs, said.append) for _ in range(2))
    assert first is again and len(said) == 1, said
    alone = pipeline._init_state_ref(section, kwargs, said.append)  # outside: each call its own (nothing pinned)
    assert alone is not first and alone[0] != first[0]


def test_a_resumed_run_trains_the_model_an_uninterrupted_one_does(prepared, ray_local, tmp_path):
    """Two epochs straight, and the same run resumed from its first epoch's state: the same weights
    and history. Flips draw from the loop's random stream and drop-path from torch's; both are in
    the state (before, a resumed run replayed epoch 1's draws)."""
    import dataclasses

    from dvfl import pipeline
    from dvfl.train.loop import checkpoint_state, run_loop
    from dvfl.train.session import RunnerSession, epoch_states, latest_epoch_state

    cfg = tiny_config(prepared["cfg"].output_dir, [("student.drop_path_rate", 0.3)])
    # (flips, which validation refuses for the generated clips' directions, only to draw from the loop's stream)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, flip=True))
    loop = pipeline.training_loop_config(cfg, cfg.student, cfg.optim, len(prepared["info"]["classes"]), seed=0,
                                         teacher={"mode": "none"}, tensorboard_dir=None, log=lambda *_: None)
    data = pipeline.shared_training_data(cfg)
    loop = dataclasses.replace(loop, train_rows=data.train_rows, threads_per_worker=1, print_epochs=False)
    datasets = {"train": data.train, "val": data.val}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_loop(dataclasses.replace(loop, run_name="straight"), RunnerSession(datasets, str(straight)))
    first_epoch = epoch_states(str(straight))[0]
    resumed.mkdir()
    # epoch 1's state, marked: the resumed run's history must carry the mark (a run that ignored the state
    # and trained epoch 1 again, deterministically, would end with the same weights and losses)
    state = torch.load(first_epoch, map_location="cpu", weights_only=True)
    state["history"][0]["copied_from"] = "straight"
    torch.save(state, resumed / os.path.basename(first_epoch))
    run_loop(dataclasses.replace(loop, run_name="resumed"), RunnerSession(datasets, str(resumed)))
    a, b = (checkpoint_state(latest_epoch_state(str(d))) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == cfg.optim.epochs - 1
    assert [h.get("copied_from") for h in b["history"]] == ["straight"] + [None] * (cfg.optim.epochs - 1)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_long_epoch_says_how_far_it_is(prepared, ray_local, tmp_path, monkeypatch, capsys):
    """An epoch of hours (UCF101 on CPUs) printed nothing between its start and its end: past
    EPOCH_PROGRESS_SECONDS it says the clips done, the rate and the time left (0 s here: every step);
    its validation pass, as long on a UCF101 carve, says the clips it validated."""
    import dataclasses

    from dvfl import pipeline
    from dvfl.train import loop as loop_module
    from dvfl.train.session import RunnerSession

    monkeypatch.setattr(loop_module, "EPOCH_PROGRESS_SECONDS", 0.0)
    cfg = tiny_config(prepared["cfg"].output_dir, [("optim.epochs", 1), ("optim.batch_size", 8)])
    data = pipeline.shared_training_data(cfg)
    loop = pipeline.training_loop_config(cfg, cfg.student, cfg.optim, len(prepared["info"]["classes"]), seed=0,
                                         teacher={"mode": "none"}, tensorboard_dir=None, log=lambda *_: None)
    loop = dataclasses.replace(loop, train_rows=data.train_rows, threads_per_worker=1, run_name="progress")
    capsys.readouterr()
    loop_module.run_loop(loop, RunnerSession({"train": data.train, "val": data.val}, str(tmp_path / "run")))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(f"[{loop.label}] epoch 1/1: ")]
    validating = [x for x in lines if x.startswith(f"[{loop.label}] epoch 1/1: validating, ")]
    progress, end = [x for x in lines if x not in validating][:-1], lines[-1]
    steps = -(-data.train_rows // 8)
    assert len(progress) == steps and "val top-1" in end, lines  # one per step, then the epoch's own line
    # the validation pass too (before each of its batches here), between the last step's line and the epoch's
    assert validating and lines.index(validating[0]) == steps and lines.index(validating[-1]) == len(lines) - 2, lines
    assert all(re.fullmatch(rf"\[{loop.label}\] epoch 1/1: validating, [0-9,]+ clips in 0 min, [0-9.,]+ clips/s",
                            x) for x in validating), validating
    assert f": 8 of {data.train_rows:,} clips in 0 min, " in progress[0] and " min left" in progress[0], progress[0]
    assert f": {data.train_rows:,} of {data.train_rows:,} clips in " in progress[-1], progress[-1]
    monkeypatch.setattr(loop_module, "EPOCH_PROGRESS_SECONDS", 3600.0)  # the default's kind: a short epoch says nothing more
    loop_module.run_loop(dataclasses.replace(loop, run_name="quiet"),
                         RunnerSession({"train": data.train, "val": data.val}, str(tmp_path / "quiet")))
    assert [x for x in capsys.readouterr().out.splitlines() if " clips in " in x] == []


def test_accumulated_steps_in_the_loop_train_the_model_one_large_batch_does(prepared, ray_local, tmp_path):
    """optim.accum_steps 2 with batches of 3 and one step per batch of 6, through the loop's own
    train_step and its rescale of an epoch's last, partial accumulation: the same weights."""
    import dataclasses

    from dvfl import pipeline
    from dvfl.models import build_model
    from dvfl.train.loop import checkpoint_state, run_loop
    from dvfl.train.session import RunnerSession, latest_epoch_state

    base = tiny_config(prepared["cfg"].output_dir, [("data.flip", False), ("student.drop_path_rate", 0.0),
                                                    ("optim.epochs", 1)])
    data = pipeline.shared_training_data(base)
    assert data.train_rows % 6 == 2  # the epoch ends on a batch of 2, half an accumulation: its rescale is exercised
    weights = []
    for batch, accum in ((6, 1), (3, 2)):
        # SGD, no clipping, fp32: an update in proportion to the gradient (AdamW's normalisation and a clipped
        # norm would hide a gradient scaled wrongly; bf16 rounds batches of 3 and 6 apart)
        cfg = tiny_config(prepared["cfg"].output_dir, [("data.flip", False), ("student.drop_path_rate", 0.0),
                                                       ("optim.epochs", 1), ("optim.batch_size", batch),
                                                       ("optim.accum_steps", accum), ("optim.optimizer", "sgd"),
                                                       ("optim.clip_grad", None), ("optim.amp", "off")])
        loop = pipeline.training_loop_config(cfg, cfg.student, cfg.optim, len(prepared["info"]["classes"]), seed=0,
                                             teacher={"mode": "none"}, tensorboard_dir=None, log=lambda *_: None)
        loop = dataclasses.replace(loop, train_rows=data.train_rows, threads_per_worker=1, print_epochs=False,
                                   run_name=f"b{batch}")
        run_loop(loop, RunnerSession({"train": data.train, "val": data.val}, str(tmp_path / f"b{batch}")))
        state = checkpoint_state(latest_epoch_state(str(tmp_path / f"b{batch}")))
        weights.append((state["model"], state["step"]))
    torch.manual_seed(loop.seed)  # the loop's own initialisation
    start = build_model(loop.model.name, **loop.model.kwargs).state_dict()
    (one, one_steps), (accumulated, accumulated_steps) = weights
    assert one_steps == accumulated_steps == -(-data.train_rows // 6)
    moved = 0.0
    for name, tensor in one.items():  # what training moved each weight by, the same both ways
        torch.testing.assert_close(accumulated[name] - start[name], tensor - start[name], rtol=1e-3, atol=1e-7,
                                   msg=name)
        moved = max(moved, float((tensor - start[name]).abs().max()))
    assert moved > 1e-5  # (weights that did not move would prove nothing)


def test_training_data_held_in_memory_is_shuffled_the_same_way_for_a_seed(prepared, ray_local):
    """The in-memory training set is shuffled once, seeded; Ray's shuffle seeds each input block by the
    order blocks arrive in, so the read runs in file order (reads finishing in another order, e.g. the
    train and unlabelled shards of a pool, gave the same seed another order: a rerun or a resumed run
    trained on other batches)."""
    from dvfl.train.launch import training_data

    clips = prepared["cfg"].clips_dir

    def order(seed):
        data = training_data(clips, seed=seed)
        assert data.train.context.execution_options.preserve_order  # (the arrival order is not forced here)
        return [c for b in data.train.iter_batches(batch_format="pyarrow") for c in b.column("clip_id").to_pylist()]

    first = order(0)
    assert first == order(0) and first != order(1) and len(first) == len(set(first)) > 8


def test_a_training_split_too_big_to_hold_streams_in_a_new_file_order_each_epoch(prepared, ray_local):
    """Above ``materialize_below_mb`` the training read is not held in the object store: no
    all-to-all step in its plan (Ray's randomize_block_order, used before, read the whole split
    into the object store before the first batch of every epoch: ~80 GB a UCF101 epoch), and
    each epoch (an execution) reads the shards in another seeded order, every clip once."""
    from ray.data._internal.logical.interfaces import LogicalOperator
    from ray.data._internal.logical.operators import AbstractAllToAll

    from dvfl.train.launch import training_data

    clips = prepared["cfg"].clips_dir
    data = training_data(clips, seed=0, materialize_below_mb=0)

    def ops(op: LogicalOperator):
        yield op
        for dep in op.input_dependencies:
            yield from ops(dep)

    assert not [op.name for op in ops(data.train._logical_plan.dag) if isinstance(op, AbstractAllToAll)]
    data.train.context.execution_options.preserve_order = True   # the file order alone, not task timing

    def epoch():
        return [c for b in data.train.iter_batches(batch_format="pyarrow") for c in b.column("clip_id").to_pylist()]

    first, second = epoch(), epoch()
    assert len(first) == data.train_rows == len(set(first)) and sorted(first) == sorted(second)
    assert first != second
    assert len(shard_paths(clips, ["train"])) > 2


def test_a_diverged_run_stops_instead_of_saving_nan_weights(prepared, ray_local, tmp_path, monkeypatch):
    """A loss that is no longer finite ends a run with an error naming the fix; a Tune trial only
    reports it (its stopper ends the trial, tests/test_tune.py)."""
    import dataclasses

    from dvfl import pipeline
    from dvfl.train.loop import TrainingDiverged, run_loop
    from dvfl.train.session import RunnerSession, epoch_states

    cfg = tiny_config(prepared["cfg"].output_dir, [("optim.lr", 1e9), ("optim.clip_grad", None)])
    loop = pipeline.training_loop_config(cfg, cfg.student, cfg.optim, len(prepared["info"]["classes"]), seed=0,
                                         teacher={"mode": "none"}, tensorboard_dir=None, log=lambda *_: None)
    data = pipeline.shared_training_data(cfg)
    loop = dataclasses.replace(loop, train_rows=data.train_rows, threads_per_worker=1, print_epochs=False)
    datasets = {"train": data.train, "val": data.val}
    with pytest.raises(TrainingDiverged, match=r"training loss is (nan|inf) at epoch 1; lower optim\.lr"):
        run_loop(dataclasses.replace(loop, run_name="nan"), RunnerSession(datasets, str(tmp_path / "nan")))
    assert not epoch_states(str(tmp_path / "nan"))  # no checkpoint of NaN weights for a retry to resume from
    # a gradient that overflows on the run's last step, after that step's finite loss was counted: the NaN
    # weights were saved as the model, the run a success
    from dvfl.train import loop as loop_module

    real_step = loop_module._optimizer_step

    def overflowing(model, optimizer, scaler, optim, step, total_steps, warmup):
        if step == total_steps - 1:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        return real_step(model, optimizer, scaler, optim, step, total_steps, warmup)

    monkeypatch.setattr(loop_module, "_optimizer_step", overflowing)
    sane = dataclasses.replace(loop, optim=dataclasses.replace(loop.optim, lr=1e-3, clip_grad=1.0), run_name="last")
    with pytest.raises(TrainingDiverged, match=rf"the weights are no longer finite \(a gradient overflowed\) at epoch "
                                               rf"{cfg.optim.epochs}; lower optim\.lr or raise optim\.warmup_frac \(no"):
        run_loop(sane, RunnerSession(datasets, str(tmp_path / "last")))
    assert len(epoch_states(str(tmp_path / "last"))) == cfg.optim.epochs - 1
    monkeypatch.undo()
    run_loop(dataclasses.replace(loop, run_name="tune", stop_on_divergence=False),
             RunnerSession(datasets, str(tmp_path / "tune")))
    assert len(epoch_states(str(tmp_path / "tune"))) == cfg.optim.epochs


@pytest.mark.parametrize("override, field, message", [
    ([("teacher.views", [])], "teacher.views", "at least one view"),
    ([("data.short_side", 0)], "data.crop_size", "give the crop size"),
    ([("data.clips", "/x/clips"), ("data.unlabeled", "/x/pool")], "data.unlabeled", "one teacher cache covers both"),
    # online too: a pool ingested on its own was never checked for copies of test videos (trained on)
    ([("data.clips", "/x/clips"), ("data.unlabeled", "/x/pool"), ("teacher.mode", "online")], "data.unlabeled",
     "rejects unlabelled copies of test and validation videos"),
])
def test_configs_that_used_to_fail_deep_inside_training_are_refused(override, field, message, tmp_path):
    from dvfl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"{re.escape(field)}.*{message}"):
        load_config(None, [("output_dir", str(tmp_path)), *override], check_paths=False)


def test_a_checkpoint_start_ships_only_what_it_loaded(ray_local, tmp_path):
    """student.checkpoint with reinit_head: the new head (and anything else the file lacks) keeps
    the run's seeded initialisation; shipping the whole state dict replaced it with an unseeded one."""
    import ray

    from dvfl import pipeline
    from dvfl.models import build_model
    from dvfl.models.checkpoint import HEAD_KEYS

    cfg = tiny_config(tmp_path, [("student.reinit_head", True)])
    kwargs = pipeline.model_kwargs(cfg.student, 4, cfg)
    torch.save(build_model(cfg.student.model, **{**kwargs, "num_classes": 7}).state_dict(), tmp_path / "k7.pth")
    cfg.student.checkpoint = str(tmp_path / "k7.pth")
    loop = pipeline.training_loop_config(cfg, cfg.student, cfg.optim, 4, 0, {"mode": "none"}, None,
                                         log=lambda *_: None)
    shipped = ray.get(loop.init_state_ref[0])
    own = build_model(cfg.student.model, **kwargs).state_dict()
    assert set(HEAD_KEYS) & set(own) and not set(HEAD_KEYS) & set(shipped)
    assert set(shipped) == set(own) - set(HEAD_KEYS)
    # the loop's model starts from the file's weights, its new head from the run's seeded init
    from types import SimpleNamespace

    from dvfl.train.loop import set_up
    from dvfl.train.session import fetch

    session = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), prepare_model=lambda m: m, fetch=fetch)
    started = set_up(dataclasses.replace(loop, train_rows=8), session).raw_model.state_dict()
    given = torch.load(tmp_path / "k7.pth", weights_only=True)
    seeded = set_up(dataclasses.replace(loop, train_rows=8, init_state_ref=None), session).raw_model.state_dict()
    assert all(torch.equal(started[k], given[k]) for k in shipped)
    assert any(not torch.equal(started[k], seeded[k]) for k in shipped)  # (a seeded init is not the file's)
    assert all(torch.equal(started[k], seeded[k]) for k in HEAD_KEYS)


def test_logits_left_without_a_build_marker_are_not_reused(prepared, ray_local, tmp_path):
    """A replaced cache whose delete was cut short after its markers (or whose cache.json was
    deleted by hand): its logits files must not pass as the next build's finished shards."""
    cfg = prepared["cfg"]
    model, spec = load_model(prepared["teacher"])
    with torch.no_grad():
        model.head.bias.add_(0.5)
    other = tmp_path / "other_teacher"
    save_model(other, model, spec["name"], spec["kwargs"])
    stale = tmp_path / "cache"
    shutil.copytree(cfg.cache_dir, stale)
    for marker in ("cache.json", "_build.json"):
        (stale / marker).unlink(missing_ok=True)
    lines = []
    info = build_teacher_cache(cfg.clips_dir, str(other), str(stale), verify_samples=10_000, log=lines.append)
    assert any("removing" in ln and "unknown build" in ln for ln in lines), lines
    assert any(" 0 already cached" in ln for ln in lines), lines
    assert any(ln.startswith("[cache] verifying up to 10000 cached rows") for ln in lines), lines  # (a silent wait)
    assert info["verify"]["checked"] == info["rows"]  # every row is the other teacher's


def test_a_cache_build_refuses_an_out_whose_logits_folder_holds_other_files(prepared, tmp_path):
    """``--out`` at a folder of the user's with a ``logits/`` of their own: the build deleted every
    file there as logits "of an unknown build" (no --fresh asked for). Refused before any work."""
    cfg = prepared["cfg"]
    (tmp_path / "logits").mkdir()
    mine = {"important_results.npy": "user data", "notes.txt": "more"}
    for name, text in mine.items():
        (tmp_path / "logits" / name).write_text(text)
    for overwrite in (False, True):
        with pytest.raises(CacheMismatchError, match=r"holds files that are not a teacher cache's "
                                                       r"\(important_results\.npy, notes\.txt\)"):
            build_teacher_cache(cfg.clips_dir, prepared["teacher"], str(tmp_path), overwrite=overwrite)
    assert {p.name: p.read_text() for p in (tmp_path / "logits").iterdir()} == mine
    assert sorted(os.listdir(tmp_path)) == ["logits"]  # no build marker written either
    # a .parquet of the user's own is not a logits file (it was deleted as one "of an unknown build")
    (tmp_path / "logits" / "important_results.npy").unlink()
    (tmp_path / "logits" / "notes.txt").unlink()
    (tmp_path / "logits" / "my_predictions.parquet").write_text("user data")
    with pytest.raises(CacheMismatchError, match=r"holds files that are not a teacher cache's \(my_predictions\.parquet\)"):
        build_teacher_cache(cfg.clips_dir, prepared["teacher"], str(tmp_path))
    assert [p.name for p in (tmp_path / "logits").iterdir()] == ["my_predictions.parquet"]
    # a system's hidden file in a finished cache (Finder's .DS_Store) neither blocks nor goes
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache_dir, cache)
    (cache / "logits" / ".DS_Store").write_text("finder")
    lines = []
    build_teacher_cache(cfg.clips_dir, prepared["teacher"], str(cache), log=lines.append)
    assert any("reusing finished cache" in x for x in lines) and (cache / "logits" / ".DS_Store").exists(), lines


def test_a_cache_of_a_teacher_for_other_frames_is_refused_before_any_forward(prepared, tmp_path):
    """The class count was checked, the frame count not: every actor's first batch failed inside
    Ray Data, and ``dvfl cache`` ended in a traceback."""
    cfg = prepared["cfg"]
    model, spec = load_model(prepared["teacher"])
    frames = load_dataset_info(cfg.clips_dir)["params"]["frames"]
    other = build_model(spec["name"], **{**spec["kwargs"], "num_frames": frames * 2})
    save_model(tmp_path / "teacher", other, spec["name"], {**spec["kwargs"], "num_frames": frames * 2})
    with pytest.raises(CacheMismatchError, match=rf"takes clips of {frames * 2} frames, .* holds clips of {frames} frames"):
        build_teacher_cache(cfg.clips_dir, str(tmp_path / "teacher"), str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "logits").exists() or not os.listdir(tmp_path / "cache" / "logits")


def test_a_damaged_model_spec_is_an_error_naming_the_file(prepared, tmp_path):
    """A cut or hand-edited model.json: a bare JSON error without a file name (dvfl cache), or a
    KeyError / TypeError traceback."""
    shutil.copytree(prepared["teacher"], tmp_path / "t")
    spec_file = tmp_path / "t" / "model.json"
    whole = spec_file.read_text()
    # (the last two: a folder from elsewhere may not have timm build another model or fetch weights from a URL)
    fetching = {"pretrained": True, "pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/w.pth"}}
    for text in (whole[:20], json.dumps([1, 2]), json.dumps({"kwargs": {}}), json.dumps({"name": "x", "kwargs": None}),
                 json.dumps({"name": "resnet18", "kwargs": {}}),
                 json.dumps({**json.loads(whole), "kwargs": {**json.loads(whole)["kwargs"], **fetching}})):
        spec_file.write_text(text)
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(spec_file))} is not a model spec"):
            load_model(tmp_path / "t")
    spec_file.write_text(whole)
    load_model(tmp_path / "t")


def test_cache_flags_with_an_unreachable_object_store_are_one_line(tmp_path, monkeypatch):
    """``dvfl cache --clips s3://...`` (the flags' form) against an endpoint that does not answer
    printed a traceback from the first existence check; the config form was checked."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    r = cli_in_process("cache_teacher.py", "--clips", "s3://bucket/clips", "--teacher", tmp_path / "t",
                       "--out", tmp_path / "cache")
    assert r.returncode == 2 and "error: --clips cannot reach s3://bucket/clips" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "cache").exists()


def test_a_sigterm_while_ray_starts_ends_the_command_in_one_line_and_says_how_to_resume(prepared, tmp_path, monkeypatch):
    """ray.init's first act installs a SIGTERM handler that exits with status 15; ours was back only
    once it returned: a stop during a local start (seconds) ended with exit 15 and no line. And a
    `dvfl cache --fresh` stopped before it deleted anything said to rerun without --fresh, which
    the other build's cache then refused."""
    import ray

    def init(**kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init does first
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler runs before this returns)
        raise AssertionError("not stopped")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = prepared["cfg"]
    r = cli_in_process("cache_teacher.py", "--clips", cfg.clips_dir, "--teacher", prepared["teacher"],
                       "--out", tmp_path / "cache", "--fresh")
    assert r.returncode == 143, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == ("[cache] terminated (SIGTERM): run the same command again, with --fresh "
                                                 "(it had not finished deleting)"), r.stderr[-3000:]


def test_dvfl_teacher_on_given_clips_takes_the_architecture_a_set_names(prepared, tmp_path, monkeypatch):
    """Without --config, the default architecture (videofocalnet_base) was applied after the user's
    --set: `--set teacher.train.model=videofocalnet_tiny` trained a base. --arch still wins."""
    from dvfl.commands import teacher as teacher_cmd

    built = []
    real = teacher_cmd.config_from_args

    def capture(*args, **kwargs):
        built.append(real(*args, **kwargs).teacher.train)
        raise SystemExit(0)  # (the model it would train is the subject, not the training)

    monkeypatch.setattr(teacher_cmd, "config_from_args", capture)
    clips = prepared["cfg"].clips_dir
    for extra in ([], ["--set", "teacher.train.model=videofocalnet_tiny"],
                  ["--set", "teacher.train={model: videofocalnet_tiny}"],
                  ["--arch", "videofocalnet_nano", "--set", "teacher.train.model=videofocalnet_tiny"]):
        cli_in_process("train_teacher.py", "--clips", clips, "--out", tmp_path / "t", *extra)
    assert [(t.model, t.embed_dim) for t in built] == [("videofocalnet_base", None), ("videofocalnet_tiny", None),
                                                        ("videofocalnet_tiny", None), ("videofocalnet_nano", None)]


def test_a_teacher_that_cannot_train_ends_with_one_error_line(prepared, ray_local, tmp_path):
    """The one-line report of errors a user can act on was distill's alone: ``dvfl teacher`` (and
    tune, protocol) ended in a traceback through Ray's wrappers. Here: too few clips for a batch."""
    r = cli_in_process("train_teacher.py", "--out", tmp_path / "teacher",  # (it joins the session's Ray)
                       *set_args([*TINY, ("output_dir", str(tmp_path / "run")), ("data.clips", prepared["cfg"].clips_dir),
                                  ("teacher.optim.batch_size", 100_000)]))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"^\[teacher\] error: split 'train' of .* has \d+ training clips .* fewer than 2 worker\(s\) x "
                     r"batch size 100000 = 200000: use a smaller teacher\.optim\.batch_size", r.stderr, re.M), \
        r.stderr[-3000:]  # (it named the students' optim.batch_size)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # workers a local Ray instance cannot place: refused once Ray is up (Ray Train waited for ever)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "train_teacher.py"), "--out", str(tmp_path / "teacher"),
                        "--num-cpus", "1", "--num-workers", "4",
                        *set_args([*TINY, ("output_dir", str(tmp_path / "run")), ("data.clips", prepared["cfg"].clips_dir),
                                   ("scaling.cpus_per_worker", 0.5)])],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "config error: scaling.num_workers 4 x (scaling.cpus_per_worker 0.5) + 0.25 CPU for " \
        "Ray Data's reads needs 2.25 CPU (Ray has 1)" in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    assert not (tmp_path / "teacher").exists()


def test_a_diverged_ray_train_run_fails_the_command_with_one_error_line(prepared, ray_local, tmp_path):
    """Under Ray Train (retries on failure; one worker: the retry is the subject) a diverged student
    used to report success: the retry resumed from the last epoch's NaN checkpoint, found nothing
    left to train and saved it. Now no NaN checkpoint exists, every retry diverges again and the
    command exits 1, its last line the error (not a traceback through Ray's wrappers). (The prepared
    clips, teacher and cache: only the student's runs are this test's subject.)"""
    cfg = prepared["cfg"]
    out = tmp_path / "nan"
    out.mkdir()
    for name in ("results.json", "results.md", "training_curves.png"):  # an earlier run's, which succeeded
        (out / name).write_text("{}")
    r = _run_distill(_tiny_args(out, [("optim.lr", 1e9), ("optim.clip_grad", None), ("students", ["dvfl"]),
                                      ("scaling.num_workers", 1), ("scaling.cpus_per_worker", 1),
                                      ("data.clips", cfg.clips_dir), ("teacher.path", prepared["teacher"]),
                                      ("teacher.cache", cfg.cache_dir)]),
                     ray_local.get_runtime_context().gcs_address)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[distill] error: dvfl s0: the training loss is nan at epoch" in r.stderr, r.stderr[-2000:]
    assert "[distill] finished" not in r.stdout + r.stderr
    # this Ray has no dashboard: Ray Train's placement-group cleaner cannot reach the State API, and
    # its once-a-second warning is not the user's business (moved here from test_object_storage.py)
    assert "Failed to query Ray Train Controller actor state" not in r.stdout + r.stderr, r.stderr[-2000:]
    # nor Ray Data's two lines per dataset and epoch from the workers of a cluster the command joined
    assert "Starting execution of Dataset" not in r.stdout + r.stderr, r.stdout[-2000:]
    assert not list(out.glob("students/*/model.json"))
    # no results beside this run's config.yaml: the earlier run's would read as this one's (session 28)
    assert (out / "config.yaml").exists() and not list(out.glob("results.*")) and not (out / "training_curves.png").exists()


def test_an_evaluation_says_where_it_is_and_names_a_damaged_shard(prepared, tmp_path):
    """A 4x3 evaluation of Video-FocalNet-B on CPUs takes hours and printed nothing until its end;
    a damaged shard ended it in a traceback through pyarrow (dvfl evaluate) naming no file."""
    from dvfl.data.shards import CorruptShardError
    from dvfl.train.evaluate import evaluate_multiview

    clips = tmp_path / "clips"
    shutil.copytree(prepared["cfg"].clips_dir, clips)
    model, _ = load_model(prepared["teacher"])
    lines = []
    evaluate_multiview(model, str(clips), "test", 32, progress=lines.append, progress_seconds=0)
    shards = sorted((clips / "shards").glob("test-*.parquet"))
    assert [ln.split(", ")[0] for ln in lines] == [f"{i}/{len(shards)} shards of split 'test'"
                                                   for i in range(len(shards))], lines
    data = bytearray(shards[0].read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])  # a damaged page
    shards[0].write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=rf"clip shard\(s\) cannot be read: {re.escape(str(shards[0]))} "):
        evaluate_multiview(model, str(clips), "test", 32)


def test_cached_logits_come_out_of_the_arrow_buffers_row_for_row():
    """The cache's binary logits column, in chunks and slices, as one (rows, classes) array copied
    once (a bytes object per row, then their join, peaked at ~4x the logits); a row of another
    width is refused naming the cache."""
    import numpy as np

    from dvfl.teacher_cache import logits_array

    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32):
        x = rng.standard_normal((50, 7)).astype(dtype)
        rows = [r.tobytes() for r in x]
        chunked = pa.chunked_array([pa.array(rows[:20], pa.binary()), pa.array(rows[20:], pa.binary())]).slice(3, 40)
        np.testing.assert_array_equal(logits_array(chunked, dtype, 7, "c"), x[3:43])
        large = pa.chunked_array([pa.array(rows, pa.large_binary())]).slice(5)
        np.testing.assert_array_equal(logits_array(large, dtype, 7, "c"), x[5:])
    with pytest.raises(CacheMismatchError, match="cache /x holds logits that are not 7 classes of float16"):
        logits_array(pa.chunked_array([pa.array([b"\0" * 14, b"\0" * 12], pa.binary())]), np.float16, 7, "/x")
