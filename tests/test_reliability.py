"""Nothing leaks, nothing fails silently (issue 16): temp checkpoints, too-small splits, the
cache check's reads, atomic writes, a full disk, a corrupt shard.

The training and cache checks reuse the session's ``prepared`` clips/teacher/cache (conftest.py).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import re
import time
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import TINY, cli_in_process, linux_only
from dvfl.data.shards import load_dataset_info, shard_paths

REPO = Path(__file__).resolve().parents[1]


def _no_traceback(text: str) -> bool:
    """No traceback once Python's "--- Logging error ---" reports are set aside: Ray's own log
    files live on the full disk too (RLIMIT_FSIZE), and logging reports each failed write."""
    import re

    kept, skipping = [], False
    for line in text.splitlines():
        if "--- Logging error ---" in line:
            skipping = True
        elif skipping and re.search(r"(^|\s)Arguments: ", line):
            skipping = False
        elif not skipping:
            kept.append(line)
    return not any("Traceback" in line for line in kept)


# ----------------------------------------------------------------------------- temp checkpoints
def test_training_leaves_no_checkpoint_temp_folders(prepared):
    """The teacher of ``prepared`` trained 4 epochs with 2 workers; none of its per-epoch
    checkpoints may remain in the temp dir, looked for as soon as it finished (later in the suite,
    other training processes sweep a dead owner's folders: a leak would be gone before this test)."""
    from conftest import checkpoint_temp_folders_of

    history = json.loads((Path(prepared["teacher"]) / "model.json").read_text())["history"]
    assert json.loads((Path(prepared["cfg"].output_dir) / "ckpt_temp_folders_left.json").read_text()) == []
    assert checkpoint_temp_folders_of(history) == []
    # nor where Ray Train stores them: the saved model is what a rerun reuses (two epoch states of a
    # Video-FocalNet-B are ~3.8 GB; they were kept for good)
    cfg = prepared["cfg"]
    run = f"{cfg.name}-teacher-s{cfg.seed}-{Path(prepared['teacher']).name}-w{cfg.scaling.num_workers}"
    assert not os.path.exists(os.path.join(cfg.output_dir, "ray_results", run))
    assert (Path(prepared["teacher"]) / "model.pt").is_file()
    # a model reused by a rerun: epoch states left beside it (a run killed between saving and removing, one
    # of another worker count, folders of an earlier version) go too; other runs' stay
    from dvfl import pipeline

    runs = Path(cfg.output_dir) / "ray_results"
    base = run[: -len(f"-w{cfg.scaling.num_workers}")]
    for left in (base, f"{base}-w2", f"{base}-w3", f"{base}x", "another-run"):
        (runs / left / "checkpoint_000001").mkdir(parents=True)
    assert pipeline.ensure_teacher(cfg, prepared["info"], log=lambda *_: None)[0] == prepared["teacher"]
    assert sorted(p.name for p in runs.iterdir()) == sorted([f"{base}x", "another-run"])
    for left in (f"{base}x", "another-run"):
        shutil.rmtree(runs / left)


# ----------------------------------------------------------------------------- too-small splits
def _loop(batch_size: int):
    """A loop config for runs refused before any training (only the batch size matters)."""
    from dvfl.config import OptimSection
    from dvfl.train.loop_config import LoopConfig, ModelSpec

    return LoopConfig(seed=0, model=ModelSpec("videofocalnet_nano", {}), optim=OptimSection(batch_size=batch_size))


def test_empty_or_too_small_split_is_refused_before_training(prepared, tmp_path):
    from dvfl.train.launch import Scaling, run_training

    cfg = prepared["cfg"]
    from dvfl.data.holdout import val_source
    from dvfl.data.shards import read_clips_table

    # the training clips left after the default validation hold-out (data.val_split: val)
    held = val_source(cfg.clips_dir, "val", "train", 0.1, 0).videos
    train_rows = sum(v not in held for v in read_clips_table(cfg.clips_dir, ["train"], columns=["video_id"])
                     .column("video_id").to_pylist())
    assert 0 < train_rows < sum(pq.read_metadata(p).num_rows for p in shard_paths(cfg.clips_dir, ["train"]))
    loop = _loop(batch_size=train_rows // 2 + 1)
    kw = dict(clips_dir=cfg.clips_dir, scaling=Scaling(num_workers=2), name="refused",
              storage_path=str(tmp_path / "ray"))
    with pytest.raises(ValueError, match=rf"split 'train' .* has {train_rows} training clips.*fewer than 2 worker"):
        run_training(loop, **kw)
    with pytest.raises(ValueError, match="split 'validation' .* has no clips: nothing to validate"):
        run_training(_loop(batch_size=1), val_split="validation", **kw)
    assert not (tmp_path / "ray").exists()  # no trainer was started


def test_an_epoch_with_no_batches_is_an_error(prepared, ray_local, tmp_path):
    """The loop itself refuses an empty epoch (a split emptied by a filter Ray applies lazily), in
    whichever host runs it (here a runner actor: no worker group to start)."""
    from dvfl import pipeline
    from dvfl.data.shards import read_clip_dataset
    from dvfl.train.launch import VAL_COLUMNS, RunnerRun, Scaling, TrainingData, train_concurrently

    cfg = prepared["cfg"]
    loop = pipeline.training_loop_config(cfg, cfg.student, cfg.optim, len(prepared["info"]["classes"]), 0,
                                         {"mode": "none"}, tensorboard_dir=None)
    empty = read_clip_dataset(cfg.clips_dir, ["test"], columns=VAL_COLUMNS).filter(lambda row: False)
    # the driver's row count says one batch is there: only the loop can see that none arrives
    data = TrainingData(empty, empty, train_rows=cfg.optim.batch_size, clips_dir=cfg.clips_dir, splits="test")
    runs = [RunnerRun("empty-epoch", loop, data, str(tmp_path / "run"))]
    with pytest.raises(Exception, match="epoch 1: rank 0 of 1 got 0 training batches"):
        list(train_concurrently(runs, scaling=Scaling(num_workers=1, cpus_per_worker=0.5), concurrent=1))


def test_a_queued_runner_run_records_its_own_seconds_not_its_wait(prepared, ray_local, tmp_path):
    """Runs that wait for a free runner (more runs than runners) record the seconds a runner spent
    on them: results.json's training seconds and DVFL-Net's cost over VFL-Net's compare runs, not
    places in the queue."""
    from dvfl import pipeline
    from dvfl.train.launch import RunnerRun, Scaling, train_concurrently

    cfg = prepared["cfg"]
    loop = pipeline.training_loop_config(cfg, cfg.student, dataclasses.replace(cfg.optim, epochs=1),
                                         len(prepared["info"]["classes"]), 0, {"mode": "none"}, tensorboard_dir=None)
    data = pipeline.shared_training_data(cfg)
    runs = [RunnerRun(f"queued-{i}", dataclasses.replace(loop, label=f"queued {i}"), data, str(tmp_path / f"run{i}"))
            for i in range(2)]
    started = time.time()
    done = list(train_concurrently(runs, scaling=Scaling(1, False, 1), concurrent=1))
    elapsed = time.time() - started
    results = [r for _, r in done]
    assert sorted(run.name for run, _ in done) == ["queued-0", "queued-1"]
    assert all(r.seconds > 0 for r in results)
    # one runner, one run after the other: the second run's seconds exclude the first's
    assert sum(r.seconds for r in results) <= elapsed


def test_runners_leave_a_cpu_for_the_reads_of_streamed_clips(prepared, ray_local, tmp_path):
    """Clips too large to hold are read every epoch by Ray Data tasks (0.25 CPU each): two runners
    of 1.5 CPU took all of the session's 3 CPUs (an actor keeps them while it lives), and the reads,
    so the command, waited for ever. Now one runner at a time, said; held data keeps two."""
    from dvfl import pipeline
    from dvfl.train.launch import RunnerRun, Scaling, runners_beside_reads, train_concurrently, training_data

    cfg = prepared["cfg"]
    loop = pipeline.training_loop_config(cfg, cfg.student, dataclasses.replace(cfg.optim, epochs=1),
                                         len(prepared["info"]["classes"]), 0, {"mode": "none"}, tensorboard_dir=None)
    streamed = training_data(cfg.clips_dir, seed=0, materialize_below_mb=0)
    runs = [RunnerRun(f"streamed-{i}", dataclasses.replace(loop, label=f"streamed {i}"), streamed, str(tmp_path / f"run{i}"))
            for i in range(2)]
    scaling, lines = Scaling(1, False, 1.5), []
    held = [dataclasses.replace(r, data=pipeline.shared_training_data(cfg)) for r in runs]
    assert runners_beside_reads(held, scaling, 2, lines.append) == 2 and not lines
    assert runners_beside_reads(runs, scaling, 2, lines.append) == 1  # (asserted first: the old code hangs below)
    assert "1 runner(s) at a time, not 2" in lines[0], lines
    done = [run.name for run, _ in train_concurrently(runs, scaling=scaling, concurrent=2, log=lambda *_: None)]
    assert sorted(done) == ["streamed-0", "streamed-1"]


# ----------------------------------------------------------------------------- the cache check
def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@linux_only
def test_cache_verification_reads_only_the_sampled_rows(prepared):
    """One sampled clip reads its own shard at most, not every shard's frames (at this scale a
    shard is one row group of one page, so a read of its whole row group would pass too)."""
    from dvfl.artifacts import load_model
    from dvfl.teacher_cache import TeacherLogitCache, verify_cache

    cfg = prepared["cfg"]
    cache = TeacherLogitCache(cfg.cache_dir)
    cache.load()
    model, _ = load_model(prepared["teacher"])
    shards = shard_paths(cfg.clips_dir)
    total = sum(os.path.getsize(p) for p in shards)
    assert len(shards) >= 6
    verify_cache(cache, cfg.clips_dir, model, samples=1, seed=1)  # lazy imports read files too: not counted
    before = _bytes_read()
    for p in shards:  # what locating any clip costs: footers (pyarrow reads 64 KiB) and clip ids
        pq.ParquetFile(p).read(columns=["clip_id"])
    locate = _bytes_read() - before
    before = _bytes_read()
    report = verify_cache(cache, cfg.clips_dir, model, samples=1)
    read = _bytes_read() - before - locate
    assert report["checked"] == 1
    # beyond locating it, the page(s) of one clip's shard, not the frames of every clip
    assert read < 0.25 * total, (read, locate, total)


# ----------------------------------------------------------------------------- atomic writes
def _spy_writes(monkeypatch):
    """Record (file synced?, rename target) of every os.replace: which files were published
    atomically after an fsync of their temporary file."""
    synced, published = set(), {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        published[os.path.realpath(dst)] = os.path.realpath(src) in synced
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return published


@linux_only
def test_reports_are_written_atomically_and_synced(tmp_path, monkeypatch):
    from dvfl.config import load_config
    from dvfl.pipeline import write_report
    from dvfl.tune import load_tune_config, write_results

    # a named validation split: a report needs no clips to look for a hold-out in
    cfg = load_config(None, [("output_dir", str(tmp_path / "run")), ("data.val_split", "train")])
    os.makedirs(cfg.output_dir)
    row = {"top1": 0.5, "top5": 0.9, "params": 1000, "gmacs": 0.01, "history": [], "split": "test"}
    published = _spy_writes(monkeypatch)
    write_report(cfg, {"teacher": [row], "vfl": [row], "dvfl": [row]}, log=lambda *_: None)
    t, run_cfg = load_tune_config(None, [("tune.experiment", "exp"), ("tune.storage", str(tmp_path / "tune"))])
    exp = tmp_path / "tune" / "exp"
    exp.mkdir(parents=True)
    trial = {"trial_id": "t1", "status": "finished", "best_top1": 0.5, "epochs_run": 1, "max_epochs": 1,
             "temperature": 4.0, "width": 8, "alpha": 0.5, "lr": 1e-3, "gmacs": 0.01, "params": 1000,
             "params_searched": {}}
    write_results(exp, t, run_cfg, [trial], wall_seconds=1.0, log=lambda *_: None)
    for f in (Path(cfg.output_dir) / "results.md", Path(cfg.output_dir) / "results.json", exp / "tune_results.md"):
        assert published.get(str(f.resolve())) is True, f


def test_a_report_that_fails_part_way_leaves_no_results_json(tmp_path):
    """results.json is what marks a run finished (a protocol counts such a fold; tune_results.json names
    best_config.yaml): written last, a write that failed before it (here the plot's path is a folder, a
    real OSError, as from a full disk) leaves none (both were written first)."""
    from dvfl.config import load_config
    from dvfl.pipeline import write_report
    from dvfl.tune import load_tune_config, write_results

    cfg = load_config(None, [("output_dir", str(tmp_path / "run")), ("data.val_split", "train")])
    os.makedirs(os.path.join(cfg.output_dir, "training_curves.png", "in-the-way"))
    row = {"top1": 0.5, "top5": 0.9, "params": 1000, "gmacs": 0.01, "history": [], "split": "test"}
    with pytest.raises(OSError):
        write_report(cfg, {"teacher": [row], "vfl": [row], "dvfl": [row]}, log=lambda *_: None)
    assert not os.path.exists(os.path.join(cfg.output_dir, "results.json"))
    t, run_cfg = load_tune_config(None, [("tune.experiment", "exp"), ("tune.storage", str(tmp_path / "tune"))])
    exp = tmp_path / "tune" / "exp"
    (exp / "best_config.yaml" / "in-the-way").mkdir(parents=True)
    trial = {"trial_id": "t1", "status": "completed", "best_top1": 0.5, "epochs_run": 1, "max_epochs": 1,
             "temperature": 4.0, "width": 8, "alpha": 0.5, "lr": 1e-3, "gmacs": 0.01, "params": 1000,
             "params_searched": {}}
    with pytest.raises(OSError):
        write_results(exp, t, run_cfg, [trial], wall_seconds=1.0, log=lambda *_: None)
    assert not (exp / "tune_results.json").exists() and (exp / "tune_results.md").exists()


def test_fresh_deletes_only_a_tune_experiment_of_ours(tmp_path):
    from dvfl.config import ConfigError
    from dvfl.tune import SEARCH_FILE, remove_experiment

    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=f"no {SEARCH_FILE}"):
        remove_experiment(precious, "results", log=lambda *_: None)
    with pytest.raises(ConfigError, match="plain name"):
        remove_experiment(tmp_path, "", log=lambda *_: None)
    assert (precious / "thesis.tex").read_text() == "years of work"
    ours = tmp_path / "exp"
    ours.mkdir()
    (ours / SEARCH_FILE).write_text("{}")
    remove_experiment(ours, "exp", log=lambda *_: None)
    assert not ours.exists()
    # a name the search accepted (a space in it) is one --fresh deletes too (it refused: the search
    # could then be neither deleted nor renamed without losing it)
    spaced = tmp_path / "my exp"
    spaced.mkdir()
    (spaced / SEARCH_FILE).write_text("{}")
    remove_experiment(spaced, "my exp", log=lambda *_: None)
    assert not spaced.exists()


def test_distill_fresh_deletes_models_only_in_a_run_folder_of_ours(tmp_path):
    """``distill --fresh`` deletes teacher/, students/ and ray_results/ of --out: in a folder that
    holds such folders but no run config (``--out ~``), it deleted a user's ``students/``."""
    from dvfl.config import ConfigError, dump_config, load_config
    from dvfl.pipeline import claim_run_folder, clean_run

    home = tmp_path / "home"
    (home / "students").mkdir(parents=True)
    (home / "students" / "grades.csv").write_text("years of work")
    done = cli_in_process("distill.py", "--out", home, "--fresh")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "config error: --fresh deletes students/ in" in done.stderr and "nothing was deleted" in done.stderr
    assert (home / "students" / "grades.csv").read_text() == "years of work"
    cfg = load_config(None, [("output_dir", str(home))])
    with pytest.raises(ConfigError, match=r"holds no config.yaml \(or .dvfl-run mark\) of a run"):
        clean_run(cfg)
    (home / "config.yaml").write_text("students: [dvfl]\n")  # somebody's YAML, not a run config
    with pytest.raises(ConfigError, match=r"holds no config.yaml \(or .dvfl-run mark\) of a run"):
        clean_run(cfg)
    dump_config(cfg, home / "config.yaml")  # a run of ours wrote it before any model (older versions: the only mark)
    (home / "ray_results" / "run-a").mkdir(parents=True)
    clean_run(cfg)
    assert not (home / "students").exists() and not (home / "ray_results").exists() and (home / "config.yaml").exists()
    # `teacher` and `tune` write no config.yaml: the mark every command leaves first is enough
    teacher_made = load_config(None, [("output_dir", str(tmp_path / "from_teacher"))])
    (tmp_path / "from_teacher" / "teacher" / "m").mkdir(parents=True)
    claim_run_folder(teacher_made)
    clean_run(teacher_made)
    assert not (tmp_path / "from_teacher" / "teacher").exists()
    # a teacher given from the run folder's own teacher/ (a trained model's path, as the config errors
    # suggest): deleted by --fresh, then the run failed on the missing teacher
    (tmp_path / "from_teacher" / "teacher" / "m").mkdir(parents=True)
    (tmp_path / "from_teacher" / "teacher" / "m" / "model.pt").write_bytes(b"weeks of GPU time")
    given = load_config(None, [("output_dir", str(tmp_path / "from_teacher")),
                               ("teacher.path", str(tmp_path / "from_teacher" / "teacher" / "m"))], check_paths=False)
    with pytest.raises(ConfigError, match=r"--fresh deletes .*from_teacher/teacher/, which holds teacher\.path "):
        clean_run(given)
    assert (tmp_path / "from_teacher" / "teacher" / "m" / "model.pt").read_bytes() == b"weeks of GPU time"


def test_fresh_never_deletes_through_a_linked_folder(tmp_path):
    """A folder linked into the run (ray_results moved to a bigger disk and linked back, a link in
    students/ to the user's own models): --fresh removed the model.json files behind the links, then
    rmtree refused the link ("Cannot call rmtree on a symbolic link") with every model already broken."""
    from dvfl.config import ConfigError, load_config
    from dvfl.pipeline import claim_run_folder, clean_run

    run, mine = tmp_path / "run", tmp_path / "mine"
    (mine / "m").mkdir(parents=True)
    (mine / "m" / "model.json").write_text("{}")
    cfg = load_config(None, [("output_dir", str(run))])
    claim_run_folder(cfg)
    (run / "students" / "s0").mkdir(parents=True)
    (run / "students" / "s0" / "model.json").write_text("{}")
    for link in (run / "students" / "theirs", run / "teacher"):
        link.symlink_to(mine, target_is_directory=True)
        with pytest.raises(ConfigError, match=rf"--fresh would delete through the link {link} -> {mine}: nothing"):
            clean_run(cfg)
        assert (mine / "m" / "model.json").exists() and (run / "students" / "s0" / "model.json").exists()
        link.unlink()
    clean_run(cfg)
    assert not (run / "students").exists() and (mine / "m" / "model.json").exists()


def _hold_lock(folder, seconds: float, what: str = "run") -> subprocess.Popen:
    """Another process holding ``folder``'s lock for ``seconds`` (started once it holds it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dvfl.locks import folder_lock\n"
         f"with folder_lock({str(folder)!r}, {what!r}):\n    print('held', flush=True)\n    time.sleep({seconds})"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_folder_another_process_writes_is_refused_or_waited_for_and_freed_when_it_dies(tmp_path, monkeypatch):
    """A resubmitted job beside a running one: the second command is refused naming the first
    (or waits for it: ingest, cache), nested stages of one process share the lock, and a holder
    killed with SIGKILL frees it (the kernel drops a dead process's flock: never stale)."""
    from dvfl.locks import FolderBusyError, _lock_file, folder_lock

    holder = _hold_lock(tmp_path, 60)
    try:
        with pytest.raises(FolderBusyError, match=rf"in use by another run \(pid {holder.pid} on .*-c"):
            with folder_lock(str(tmp_path), "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(str(tmp_path), "run"), folder_lock(str(tmp_path), "ingest"):  # one process: nested
        assert _lock_file(os.path.realpath(tmp_path)) and os.path.exists(_lock_file(os.path.realpath(tmp_path)))
    assert not os.path.exists(_lock_file(os.path.realpath(tmp_path)))  # a holder that lets go removes its file
    # a holder killed with SIGKILL leaves its file; the next process's first lock removes it (free)
    killed = _hold_lock(tmp_path / "killed", 60)
    killed.kill()
    killed.wait()
    left = _lock_file(os.path.realpath(tmp_path / "killed"))
    assert os.path.exists(left)
    subprocess.run([sys.executable, "-c", "from dvfl.locks import folder_lock\n"
                    f"with folder_lock({str(tmp_path / 'other')!r}, 'run'):\n    pass"], check=True, timeout=60)
    assert not os.path.exists(left)
    holder = _hold_lock(tmp_path, 2)
    said, started = [], time.time()
    with folder_lock(str(tmp_path), "ingest", wait=True, log=said.append):
        assert time.time() - started > 1.5  # held until the other let go
    holder.wait()
    assert len(said) == 1 and "waiting for it to end" in said[0], said
    # an object-store prefix is locked on this machine by its URI and endpoint (nothing written to the store)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    uri_holder = _hold_lock("s3://bucket/prefix", 60)
    try:
        with pytest.raises(FolderBusyError, match=rf"s3://bucket/prefix/ is in use by another run \(pid {uri_holder.pid} "):
            with folder_lock("s3://bucket/prefix/", "run"):  # the same prefix, written another way
                pass
        with folder_lock("s3://bucket/prefix2", "run"), folder_lock("gs://bucket/prefix", "run"):
            pass
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the same bucket on another server
        with folder_lock("s3://bucket/prefix", "run"):
            pass
    finally:
        uri_holder.kill()
        uri_holder.wait()
    # nothing is written into the folder (a shared or read-only cache, a folder a refusal leaves as it was)
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and not (tmp_path / "new").exists()
    with folder_lock(str(tmp_path / "new"), "run"):
        assert not (tmp_path / "new").exists()


def test_distill_on_a_folder_another_run_is_writing_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out, 120)
    try:
        done = cli_in_process("distill.py", "--out", out)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"[distill] error: {out} is in use by another run (pid {holder.pid}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()  # no videos generated, nothing replaced; the lock lives in this user's lock folder


def _holding(code: str) -> subprocess.Popen:
    """A Python process running ``code``, which prints "held" once it holds what it takes and then
    holds it until a line arrives on its stdin (started once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _read_clips(clips, run_dir) -> subprocess.Popen:
    """Another process that got its clips as a run does (``ensure_clips`` in ``reads_held``) and
    reads them until a line arrives on its stdin (started once it holds them)."""
    overrides = [["output_dir", str(run_dir)], ["data.clips", str(clips)], *map(list, TINY)]
    reader = subprocess.Popen(
        [sys.executable, "-c", "import json, sys\nfrom dvfl.config import load_config\n"
         "from dvfl.locks import reads_held\nfrom dvfl.pipeline import ensure_clips\n"
         f"cfg = load_config(None, [tuple(o) for o in json.loads({json.dumps(overrides)!r})])\n"
         "with reads_held():\n    ensure_clips(cfg, log=None)\n    print('held', flush=True)\n"
         "    sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "held"
    return reader


def test_an_ingest_into_clips_a_run_reads_is_refused_until_the_run_ends(prepared, tmp_path):
    """``ingest --fresh`` into the clips of a run still training on them (another terminal, a
    resubmitted job) replaced the shards its epochs read: refused, naming a run, before a video is
    generated or a shard deleted. Runs share clips; the last one to end frees them. A run starting
    while an ingest writes them waits for it."""
    from dvfl.locks import FolderBusyError, _key, _lock_file, folder_lock, hold_for_reading, reads_held

    clips = tmp_path / "clips"
    shutil.copytree(prepared["cfg"].clips_dir, clips)
    before = {str(p): p.stat().st_mtime_ns for p in clips.rglob("*")}
    readers = [_read_clips(clips, tmp_path / f"run{i}") for i in range(2)]  # two runs on one set of clips
    try:
        # a run whose ingest has nothing to write (its own finished clips, read by another command: an
        # evaluation, a run) uses them as they are; one that would write them is refused
        from dataclasses import replace

        from dvfl.data.adapters import build_manifest
        from dvfl.data.ingest import IngestConfig, ingest

        root = json.loads((clips / "dataset.json").read_text())["root"]
        same = IngestConfig(out=str(clips), frames=8, clips_per_video=2, eval_clips=1, short_side=32,
                            videos_per_shard=8, progress=False)
        said = []
        assert ingest(build_manifest("synthetic", root, 1), same, log=said.append)["videos_decoded_this_run"] == 0
        assert any("holds this ingest, finished: used as it is" in line for line in said), said
        with pytest.raises(FolderBusyError, match="is being read by a run"):
            ingest(build_manifest("synthetic", root, 1), replace(same, short_side=24), log=None)
        assert {str(p): p.stat().st_mtime_ns for p in clips.rglob("*")} == before
        for first, still_reading in ((True, readers), (False, readers[1:])):
            done = cli_in_process("ingest.py", "--dataset", "synthetic", "--out", clips, "--fresh",
                                  "--synthetic-classes", "2", "--train-per-class", "1", "--test-per-class", "1")
            assert done.returncode == 1, done.stdout + done.stderr
            pids = "|".join(str(r.pid) for r in still_reading)
            assert re.search(rf"error: {re.escape(str(clips))} is being read by a run \(pid ({pids}) on .*-c",
                             done.stderr), done.stderr
            assert "Traceback" not in done.stderr
            assert {str(p): p.stat().st_mtime_ns for p in clips.rglob("*")} == before  # nothing generated or deleted
            if first:
                readers[0].communicate("\n", timeout=60)  # the first run ends; the other still reads
    finally:
        for r in readers:
            r.kill() if r.poll() is None else None
            r.wait()
    assert readers[1].returncode == -signal.SIGKILL  # (its lock file is swept by the next process's first lock)
    readers = [_read_clips(clips, tmp_path / "run2")]
    readers[0].communicate("\n", timeout=60)
    assert readers[0].returncode == 0 and not os.path.exists(_lock_file(_key(str(clips))))  # the last reader's file
    with folder_lock(str(clips), "ingest"):  # free
        pass
    holder = _hold_lock(clips, 2, "ingest")
    said, started = [], time.time()
    with reads_held():
        assert hold_for_reading(str(clips), "run", log=said.append)
        assert time.time() - started > 1.5  # the ingest ended first
    holder.wait()
    assert len(said) == 1 and f"{clips} is being written (pid {holder.pid}" in said[0], said
    # `dvfl evaluate` and `dvfl cache` hold them for reading too (an `ingest --fresh` replaced the shards under
    # an evaluation of hours): started while an ingest writes them, each waits for it, then reads what it left
    for script, args, what in (("evaluate.py", ["--model", prepared["teacher"]], "evaluation"),
                               ("cache_teacher.py", ["--teacher", prepared["teacher"], "--out", tmp_path / "cache",
                                                     "--verify", 0], "cache build")):
        holder = _hold_lock(clips, 3, "ingest")
        started = time.time()
        done = cli_in_process(script, "--clips", clips, *args)
        holder.wait()
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"[{what}] {clips} is being written (pid {holder.pid}" in done.stdout, done.stdout
        assert time.time() - started > 2.5
    # a reader that could not write its holder line (a full home) is still a reader: refused, not waited for
    silent = _holding("import fcntl, os, sys\nfrom dvfl.locks import _key, _lock_file\n"
                      f"fd = os.open(_lock_file(_key({str(clips)!r})), os.O_RDWR | os.O_CREAT)\n"
                      "fcntl.flock(fd, fcntl.LOCK_SH)\nprint('held', flush=True)\nsys.stdin.readline()")
    try:
        started = time.time()
        with pytest.raises(FolderBusyError, match=r"is being read by a run \(a process that has just started\)"):
            with folder_lock(str(clips), "ingest", wait=True, log=None):
                pass
        assert time.time() - started < 5
    finally:
        silent.kill()
        silent.wait()


def test_a_fresh_cut_short_leaves_a_folder_fresh_still_recognises(tmp_path, monkeypatch):
    """--fresh deleted in listing order: cut short after the project's mark went but before Tune's
    state, the folder was refused both as a resume (not ours) and by --fresh (not ours)."""
    from dvfl import storage
    from dvfl.tune import SEARCH_FILE, remove_experiment
    from dvfl.tune.search import resumable

    exp = tmp_path / "exp"
    for sub in ("dvfl_trials", "trial_a", "zz_trial"):
        (exp / sub).mkdir(parents=True)
        (exp / sub / "result.json").write_text("{}")
    (exp / "tuner.pkl").write_bytes(b"state")
    (exp / SEARCH_FILE).write_text(json.dumps({"digest": "d", "search": {}}))
    real_remove_tree = storage.remove_tree

    def cut_short(path):  # the kill: after one folder
        real_remove_tree(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "remove_tree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        remove_experiment(exp, "exp", log=lambda *_: None)
    monkeypatch.setattr(storage, "remove_tree", real_remove_tree)
    assert (exp / SEARCH_FILE).exists() and not (exp / "tuner.pkl").exists()
    assert resumable(str(exp), {"digest": "d"}) is False  # nothing to resume: a fresh search
    remove_experiment(exp, "exp", log=lambda *_: None)  # and --fresh finishes the job
    assert not exp.exists()


def test_a_run_checks_and_reads_its_teacher_cache_under_the_cache_lock(prepared, ray_local):
    """A run checked its cache, then read it: a `dvfl cache --fresh` in between could replace the logits
    with another teacher's under the fingerprint checked. Both now happen under the cache's lock: a
    build in progress is waited for, and a build waits for a run loading the logits (a moment), naming it."""
    from dvfl import pipeline

    cfg = prepared["cfg"]
    holder = _hold_lock(cfg.cache_dir, 2, "cache build")
    said, started = [], time.time()
    got = pipeline.teacher_signal(cfg, prepared["teacher"], prepared["spec"], prepared["info"], kd=True,
                                  log=said.append)
    assert time.time() - started > 1.5  # the build ended first
    holder.wait()
    assert got["mode"] == "cached" and got["fingerprint"] == prepared["cache"]["fingerprint"]
    assert len(said) == 1 and f"{cfg.cache_dir} is being written (pid {holder.pid}" in said[0], said

    # a run loading it (until told, 2 s on): another run's build waits, naming it, then finds the cache finished
    import threading

    reader = _holding("import sys\nfrom dvfl.locks import folder_lock\n"
                      f"with folder_lock({cfg.cache_dir!r}, 'teacher cache load', shared=True):\n"
                      "    print('held', flush=True)\n    sys.stdin.readline()")
    def let_go():
        reader.stdin.write("\n")
        reader.stdin.flush()

    release = threading.Timer(2.0, let_go)
    said, started = [], time.time()
    release.start()
    try:
        assert pipeline.ensure_cache(cfg, prepared["teacher"], log=said.append)["fingerprint"] == got["fingerprint"]
        assert time.time() - started > 1.5
    finally:
        release.cancel()
        reader.kill()
        reader.wait()
    assert f"{cfg.cache_dir} is being read (pid {reader.pid}" in said[0] and "waiting for it to end" in said[0], said


# ----------------------------------------------------------------------------- a full disk
def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec


def _hidden_or_tmp(directory) -> list[str]:
    return [p for p in glob.glob(os.path.join(directory, "**", ".*"), recursive=True)]


def test_ingest_disk_full_then_rerun_beside_a_reader_and_no_videos_written(tmp_path, video_factory, ray_local):
    from conftest import make_videos

    root = tmp_path / "videos"
    # distinct content per video: a copy under another id would be rejected as duplicate_content
    make_videos([(str(root / c / f"{c}{i}.mp4"), {"seed": 10 * k + i}) for k, c in enumerate("ab") for i in range(3)])
    out = tmp_path / "clips"
    cmd = [sys.executable, str(REPO / "pipelines" / "ingest.py"), "--dataset", "folder", "--root", str(root),
           "--test-fraction", "0.34", "--out", str(out), "--short-side", "32", "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # small JSON files fit; every shard is larger than this. The decode tasks write the shards in
    # the cluster's worker processes: the same limit reaches them through the ingest's test hook
    full = subprocess.run(cmd, env={**env, "DVFL_INGEST_TEST_HOOKS": "1", "DVFL_TEST_FSIZE_LIMIT": str(16 * 1024)},
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(16 * 1024))
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
    assert "error: writing to" in full.stderr and "File too large" in full.stderr
    assert _no_traceback(full.stderr), full.stderr[-3000:]
    (line,) = [ln for ln in full.stderr.splitlines() if ln.startswith("error: writing to")]
    assert "File too large" in line and "ray::" not in line, line  # the error, not Ray's remote traceback
    assert not glob.glob(str(out / "shards" / "*.parquet")) and not _hidden_or_tmp(out / "shards")
    assert not (out / "dataset.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    info = load_dataset_info(str(out))
    assert info["written_videos"] == 6 and info["rejects"] == 0
    assert not _hidden_or_tmp(out / "shards")
    for p in shard_paths(str(out)):
        assert pq.read_metadata(p).num_rows > 0

    # the same command while another command reads the clips: nothing to write, so it ends as finished
    # (it was refused); other settings would rewrite them: refused, nothing touched
    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
    reader = _holding("import sys\nfrom dvfl.locks import hold_for_reading, reads_held\n"
                      f"with reads_held():\n    hold_for_reading({str(out)!r}, 'evaluation', log=None)\n"
                      "    print('held', flush=True)\n    sys.stdin.readline()")
    try:
        same = subprocess.run(cmd[:-1], env=env, capture_output=True, text=True, timeout=300)
        assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
        assert "holds this ingest, finished: used as it is" in same.stdout, same.stdout[-2000:]
        other = subprocess.run([*cmd[:-2], "24"], env=env, capture_output=True, text=True, timeout=300)
        assert other.returncode == 1 and "is being read by a run" in other.stderr, other.stderr[-2000:]
        assert _no_traceback(other.stderr), other.stderr[-3000:]
        assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    finally:
        reader.kill()
        reader.wait()

    # every input rejected: ingest exits non-zero, saying so
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        (bad / c / "x.mp4").write_bytes(b"not a video" * 10)
    none = subprocess.run([*cmd[:5], str(bad), "--out", str(tmp_path / "none"), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert none.returncode == 1, none.stdout[-2000:] + none.stderr[-2000:]
    assert "error: 0 videos written: all 2 input(s) were rejected" in none.stderr
    # not a finished ingest to any other command (a cache of 0 rows was built on it, and verified)
    assert (tmp_path / "none" / "rejects.jsonl").is_file() and not (tmp_path / "none" / "dataset.json").exists()


def test_ctrl_c_and_sigterm_end_a_command_with_one_line(tmp_path, video_factory, ray_local):
    """Ctrl+C printed a traceback through Ray's wait; SIGTERM (ray job stop, a pod's stop) went to
    Ray's crash handler first, which printed a stack dump of every thread (and armed an abort for a
    shutdown over 3 s). Each now ends the ingest with one line, exit 130 / 143, nothing committed;
    the stopped tasks end with the command's job (cancelling them raced in Ray's core: a check
    failure, a stack dump and exit 1 after the line) and the next run removes what they left."""
    from conftest import make_videos

    root = tmp_path / "videos"
    make_videos([(str(root / c / f"{c}{i}.mp4"), {"seed": 10 * k + i}) for k, c in enumerate("ab") for i in range(2)])
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           # test hook: the task writing this shard waits after writing it: the ingest cannot end alone
           "DVFL_INGEST_TEST_HOOKS": "1", "DVFL_TEST_HOLD_UNCOMMITTED": "train-00000"}
    for signum, status, line in ((signal.SIGINT, 130, "[ingest] interrupted: run the same command again to resume"),
                                 (signal.SIGTERM, 143, "[ingest] terminated (SIGTERM): run the same command again to resume")):
        out = tmp_path / f"clips-{signum}"
        log = tmp_path / f"ingest-{signum}.log"
        with open(log, "w") as f:
            # Ctrl+C's default action, as a terminal gives it: a suite started in the background (`make
            # test &`) inherits SIGINT ignored, and the signal did nothing (the held ingest never ended)
            proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "ingest.py"), "--dataset", "folder",
                                     "--root", str(root), "--out", str(out), "--short-side", "32"],
                                    env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            try:
                deadline = time.time() + 120
                while not glob.glob(str(out / "shards" / ".train-00000*")):  # the held shard's temporary
                    assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                    time.sleep(0.2)
                proc.send_signal(signum)
                try:
                    code = proc.wait(180)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"no exit 180 s after signal {signum}: {log.read_text()[-3000:]}")
                assert code == status, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
        text = log.read_text()
        assert text.rstrip().splitlines()[-1].strip().startswith(line), text[-3000:]
        assert "Traceback" not in text and "received at time" not in text and "tack" not in text, text[-3000:]
        assert not (out / "dataset.json").exists()
    env.pop("DVFL_TEST_HOLD_UNCOMMITTED")
    again = subprocess.run([sys.executable, str(REPO / "pipelines" / "ingest.py"), "--dataset", "folder", "--root",
                            str(root), "--out", str(out), "--short-side", "32", "--quiet"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_dataset_info(str(out))["written_videos"] == 4 and not _hidden_or_tmp(out / "shards")


def test_sigterm_while_the_videos_are_made_before_ray_ends_in_one_line_and_stops_the_generator(tmp_path):
    """SIGTERM while the embedded default's videos are made (before Ray starts, where the handler was
    installed) killed the command without a word, and its generator processes went on writing the
    folder after it, then waited for ever."""
    log = tmp_path / "ingest.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "pipelines" / "ingest.py"), "--dataset", "synthetic",
                                 "--out", str(tmp_path / "clips"), "--train-per-class", "400", "--gen-processes", "2"],
                                stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.time() + 120
            while "[synthetic] generating" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(1.0)  # the pool's processes at work
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 143 and text.rstrip().splitlines()[-1].startswith("[ingest] terminated (SIGTERM)"), text[-3000:]
    assert "Traceback" not in text
    made = len(list((tmp_path / "clips" / "videos").rglob("*.mp4")))
    # nothing of its process group is left (the pool's forkserver ends once its parent has: on a
    # loaded machine that took more than 2 s), and nothing was written after the command ended
    gone = time.time() + 20
    while _group_alive(proc.pid) and time.time() < gone:
        time.sleep(0.2)
    assert not _group_alive(proc.pid)
    time.sleep(1)
    assert len(list((tmp_path / "clips" / "videos").rglob("*.mp4"))) == made < 8 * 440


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_cache_build_disk_full_then_rerun(prepared, tmp_path, ray_local):
    from dvfl.teacher_cache import FSIZE_TEST_ENV, TeacherLogitCache

    cfg = prepared["cfg"]
    out = tmp_path / "cache"
    cmd = [sys.executable, str(REPO / "pipelines" / "cache_teacher.py"), "--clips", cfg.clips_dir,
           "--teacher", prepared["teacher"], "--out", str(out), "--verify", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # the per-shard sidecar JSON fits, a logits Parquet file does not
    full = subprocess.run(cmd, env={**env, FSIZE_TEST_ENV: "600"}, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
    assert "error: writing the cache to" in full.stderr and "File too large" in full.stderr, full.stderr[-3000:]
    assert _no_traceback(full.stderr), full.stderr[-3000:]
    # no logits file published (a reader trusts a shard's logits once its Parquet file exists); a
    # hidden temp file of another shard may remain when Ray kills that actor mid-write as the
    # driver exits: the rerun removes it (checked below)
    assert not glob.glob(str(out / "logits" / "*.parquet"))
    assert not (out / "cache.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(TeacherLogitCache(out)) == len(TeacherLogitCache(cfg.cache_dir))
    assert not _hidden_or_tmp(out / "logits")


def test_a_cache_writer_lost_mid_build_is_started_again_and_the_build_finishes(prepared, tmp_path, ray_local):
    """A cache writer's process dies (its node preempted, the OOM killer): Ray starts it again and
    its shard is written again; the build finishes (with no restarts, one lost node failed the build
    and, in a RayJob, the job)."""
    from dvfl.teacher_cache import DIE_ONCE_TEST_ENV, TeacherLogitCache

    cfg = prepared["cfg"]
    out, died = tmp_path / "cache", tmp_path / "died"
    cmd = [sys.executable, str(REPO / "pipelines" / "cache_teacher.py"), "--clips", cfg.clips_dir,
           "--teacher", prepared["teacher"], "--out", str(out), "--verify", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, DIE_ONCE_TEST_ENV: str(died)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and died.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    assert len(TeacherLogitCache(out)) == len(TeacherLogitCache(cfg.cache_dir))
    assert not _hidden_or_tmp(out / "logits")


# ----------------------------------------------------------------------------- a damaged shard
def test_corrupt_data_page_in_a_shard_is_named_at_training_time(prepared, tmp_path):
    from dvfl.data.shards import CorruptShardError
    from dvfl.train.launch import Scaling, run_training

    clips = tmp_path / "clips"
    shutil.copytree(prepared["cfg"].clips_dir, clips)
    victim = shard_paths(str(clips), ["train"])[1]
    data = bytearray(Path(victim).read_bytes())
    middle = len(data) // 2  # inside the frames column's data pages
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    Path(victim).write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"cannot be read: {victim} "):
        run_training(_loop(batch_size=2), clips_dir=str(clips), scaling=Scaling(num_workers=1),
                     name="corrupt", storage_path=str(tmp_path / "ray"))
    # the cache build: named too, not "writing the logits failed" (a disk's fault, which a rerun resumes)
    from dvfl.teacher_cache import build_teacher_cache

    with pytest.raises(CorruptShardError, match=f"cannot be read: {victim} "):
        build_teacher_cache(str(clips), prepared["teacher"], str(tmp_path / "cache"), log=lambda *_: None)


# ----------------------------------------------------------------------------- a killed driver
@pytest.mark.slow
def test_a_killed_driver_and_a_stopped_run_resume_and_a_lost_worker_is_recovered(prepared, ray_local, tmp_path):
    """Ray Train, one output folder, three commands (one test: each Ray Train run costs the suite
    ~30 s of CPU; one worker each, ~8 s of CPU less per start: DDP that loses a node and resumes
    from its checkpoint is the multi-node test's subject). (1) `python pipelines/distill.py`
    SIGKILLed after the student's first checkpoint. (2) The same command again resumes from that
    checkpoint; with ``max_failures`` 0 it loses a worker in epoch 3 and stops, its error and
    traceback on the terminal. (3) ``--resume`` with ``max_failures`` 1 continues after epoch 2 and
    loses a worker in epoch 4: FailureConfig restarts the worker group from epoch 3's checkpoint.
    Epochs 1..4 once each in the history, the step count (the LR schedule's) continued across all
    three."""
    from conftest import TINY, set_args

    from dvfl.pipeline import FAIL_ENV

    cfg = prepared["cfg"]
    out = tmp_path / "run"
    marker = out / ".fail-injected"  # written by the worker the fault hook kills
    common = [*TINY, ("scaling.num_workers", 1), ("scaling.cpus_per_worker", 1), ("baseline", False), ("optim.epochs", 4),
              ("data.clips", cfg.clips_dir), ("teacher.path", prepared["teacher"]), ("teacher.cache", cfg.cache_dir)]
    cmd = [sys.executable, str(REPO / "pipelines" / "distill.py"), "--out", str(out)]
    stop_on_failure = cmd + set_args([*common, ("max_failures", 0)])
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}

    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(stop_on_failure, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        try:  # a checkpoint is registered once its epoch's report returned: wait for the next epoch's start
            while proc.poll() is None and time.time() < deadline:
                if glob.glob(str(out / "ray_results" / "*" / "checkpoint_*" / "state.pt")):
                    time.sleep(3)
                    break
                time.sleep(0.5)
            assert proc.poll() is None, log_path.read_text()[-3000:]  # killed mid-run, not after it
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "results.json").exists()

    stopped = subprocess.run(stop_on_failure, env={**env, FAIL_ENV: "2"}, capture_output=True, text=True, timeout=900)
    assert stopped.returncode != 0, stopped.stdout[-3000:]  # no retries allowed: the run stops after epoch 2
    assert marker.exists()  # a worker really died
    assert re.search(r"resumed from checkpoint after epoch [12]\b", stopped.stdout + stopped.stderr)
    # a real error is never filtered out of the terminal: the failure and its traceback show
    assert "Traceback (most recent call last)" in stopped.stderr
    assert re.search(r"^[\w.]*(Error|Exception)\b", stopped.stderr, re.M), stopped.stderr[-3000:]
    assert not (out / "results.json").exists()

    marker.unlink()
    resumed = subprocess.run(cmd + set_args([*common, ("max_failures", 1)]) + ["--resume"], env={**env, FAIL_ENV: "3"},
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert marker.exists()  # a worker of the resumed run died too, and was replaced
    output = resumed.stdout + resumed.stderr
    assert "resumed from checkpoint after epoch 2" in output and "resumed from checkpoint after epoch 3" in output
    (student,) = (out / "students").glob("dvfl-s*")
    history = json.loads((student / "model.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["steps"] for h in history] == [k * history[0]["steps"] for k in (1, 2, 3, 4)]


# ----------------------------------------------------------------------------- scratch folders
def test_scratch_folders_of_killed_processes_are_removed_by_the_next_one(tmp_path, monkeypatch):
    """A SIGKILLed worker leaves its checkpoint or TensorBoard spool folder behind; the next
    process that makes a folder of that kind removes it once it is stale, and nothing else."""
    from dvfl import scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    old = time.time() - 2 * scratch.STALE_SECONDS

    def folder(name, written):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
        for p in (tmp_path / name / "state.pt", tmp_path / name):
            os.utime(p, (written, written))
        return tmp_path / name

    dead_stale = folder(f"dvfl-ckpt-{killed.pid}-run-a-x1", old)
    dead_fresh = folder(f"dvfl-ckpt-{killed.pid}-run-b-x2", time.time())  # may still be in use elsewhere
    alive = folder(f"dvfl-ckpt-{os.getppid()}-run-c-x3", old)  # its owner runs
    other_kind = folder(f"dvfl-tb-{killed.pid}-x4", old)
    not_ours = folder(f"dvfl-ckptx-{killed.pid}-x5", old)
    monkeypatch.setattr(scratch, "_swept", set())
    made = Path(scratch.make_scratch_dir("ckpt", "run-d"))
    assert made.parent == tmp_path and made.name.startswith(f"dvfl-ckpt-{os.getpid()}-run-d-")
    assert not dead_stale.exists()
    assert all(p.exists() for p in (dead_fresh, alive, other_kind, not_ours))
    assert scratch.make_scratch_dir("tb") and not other_kind.exists()
    # the test session's own clean-up (conftest): a dead owner's folder of any age, nothing else
    assert scratch.sweep_dead("ckpt", stale_seconds=0) == [str(dead_fresh)]
    assert alive.exists() and made.exists() and not_ours.exists()


def test_a_runner_removes_the_temporary_epoch_state_a_killed_runner_left(ray_local, tmp_path):
    """ray.kill (Ctrl+C, a replaced runner) ends a runner without clean-up: one killed while writing
    its epoch state left a hidden temporary file in the run folder that nothing read or removed."""
    from dvfl.storage import local_tmp_name
    from dvfl.train.session import RunnerSession

    run_dir = tmp_path / "ray_results" / "dvfl-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "epoch_000001.pt").write_bytes(b"state")
    stale = Path(local_tmp_name(str(run_dir / "epoch_000002.pt")))
    stale.write_bytes(b"half a state")
    session = RunnerSession({}, str(run_dir))
    assert not stale.exists() and os.listdir(run_dir) == ["epoch_000001.pt"]
    assert session.checkpoint().path.endswith("epoch_000001.pt")


def test_a_teacher_at_zero_gives_null_not_nan_in_results_json():
    """A teacher scoring 0 % on the test split (a weak teacher on a few videos of one's own) wrote
    NaN into results.json, which strict JSON readers (jq, JavaScript) refuse."""
    from dvfl.pipeline import kd_gains

    row = {"top1_per_seed": [0.5], "top1_mean": 0.5}
    gains = kd_gains({"teacher": {**row, "top1_per_seed": [0.0], "top1_mean": 0.0}, "dvfl": row})
    assert gains["dvfl_over_teacher"] == [None]
    json.loads(json.dumps(gains, allow_nan=False))  # raises on NaN


def test_a_refusal_names_a_holder_that_still_runs(tmp_path):
    """Readers each add a holder line; a refusal names the last one whose process still runs: readers
    that ended before it left theirs (a long run beside many evaluations: the first 64 KiB held only
    ended ones), and a line of the older format (no newline) is still read."""
    import socket

    from dvfl.locks import _holder

    def line(pid, command, newline=True):
        return json.dumps({"pid": pid, "host": socket.gethostname(), "since": time.time(),
                           "command": command}) + ("\n" if newline else "")

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock = tmp_path / "lock"
    lock.write_text(line(os.getpid(), "older format", newline=False) + line(ended.pid, "ended"))
    fd = os.open(lock, os.O_RDONLY)
    try:
        assert _holder(fd).endswith(": older format")
    finally:
        os.close(fd)
    lock.write_text("".join(line(ended.pid, f"evaluation {i}") for i in range(2000)) + line(os.getpid(), "live reader"))
    assert lock.stat().st_size > 1 << 17
    fd = os.open(lock, os.O_RDONLY)
    try:
        assert _holder(fd).endswith(": live reader")
    finally:
        os.close(fd)
