"""Distillation from unlabelled clips (issue 9), on real files and a real Ray Train run.

A small generated dataset with an unlabelled pool (real H.264 files, disjoint videos) is ingested
with the real Ray Data pipeline; the teacher is the one the shared ``prepared`` fixture trained on
*another* ingest of labelled videos only (a teacher "pre-trained elsewhere": it never saw the
pool). Its cache covers the unlabelled clips, and the student trains on labelled + unlabelled
clips with 2 DDP workers.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvfl import pipeline
from dvfl.config import ConfigError
from dvfl.data.shards import read_clips_table
from dvfl.teacher_cache import CacheMismatchError, TeacherLogitCache

from conftest import tiny_config

POOL = 10


@pytest.fixture(scope="module")
def with_pool(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("unlabeled")
    cfg = tiny_config(out, [("data.synthetic.unlabeled_videos", POOL), ("teacher.path", prepared["teacher"]),
                            ("optim.epochs", 1), ("seed", 3)])
    pipeline.ensure_videos(cfg, log=None)
    info = pipeline.ensure_clips(cfg, log=lambda *_: None)
    pipeline.ensure_cache(cfg, prepared["teacher"], log=lambda *_: None)
    return {"cfg": cfg, "info": info}


def test_unlabelled_rows_are_ingested_without_labels_and_cached(with_pool):
    cfg = with_pool["cfg"]
    rows = read_clips_table(cfg.clips_dir, ["unlabeled"], columns=["clip_id", "label", "class_name", "split"]).to_pylist()
    assert len(rows) == POOL * cfg.data.clips_per_video
    assert all(r["label"] is None and r["class_name"] is None and r["split"] == "unlabeled" for r in rows)
    cache = TeacherLogitCache(cfg.cache_dir)
    assert "unlabeled" in cache.info["splits"]
    logits = cache.lookup([r["clip_id"] for r in rows], ["center"] * len(rows))
    assert logits.shape == (len(rows), 4) and bool(logits.isfinite().all())


def test_mixed_batches_under_two_ddp_workers_keep_unlabelled_clips_out_of_ce(with_pool, prepared):
    cfg, info = with_pool["cfg"], with_pool["info"]
    assert cfg.scaling.num_workers == 2 and cfg.student_roles == ["vfl", "dvfl", "dvfl+unlabeled"]
    signal = pipeline.teacher_signal(cfg, prepared["teacher"], prepared["spec"], info, kd=True)
    path = pipeline.train_student(cfg, info, signal, seed=3, unlabeled=True, log=lambda *_: None)
    (epoch,) = json.loads((Path(path) / "model.json").read_text())["history"]
    # the students' pool: the labelled training videos left after the held-out validation videos,
    # minus the teacher's pool (data.teacher_pool), as training reads them
    from dvfl.data.sampling import pool_videos

    ids = read_clips_table(cfg.clips_dir, ["train"], columns=["video_id", "label"]).to_pydict()
    assert 0 < cfg.data.teacher_pool < 1  # the tiny runs train their teacher here, on a pool of its own
    held = pipeline.validation_source(cfg).videos
    rest = [(v, y) for v, y in zip(ids["video_id"], ids["label"]) if v not in held]
    pool = pool_videos([v for v, _ in rest], [y for _, y in rest], cfg.data.teacher_pool, "student")
    labelled = sum(v in pool for v, _ in rest)
    assert held and not pool & held and 0 < labelled < len(ids["video_id"])
    unlabelled = read_clips_table(cfg.clips_dir, ["unlabeled"], columns=["clip_id"]).num_rows
    # both workers' counts (all-reduced); equal splitting may drop < world_size rows per epoch
    assert labelled + unlabelled - 2 < epoch["labelled_clips"] + epoch["unlabelled_clips"] <= labelled + unlabelled
    assert epoch["unlabelled_clips"] > 0 and epoch["mixed_batches"] > 0
    # the clips the loss averaged CE over are the labelled ones (its value is tested in test_losses.py)
    assert epoch["ce_clips"] == epoch["labelled_clips"]
    assert epoch["train_kd"] > 0 and epoch["teacher_forward_calls"] == 0


def test_a_streamed_training_read_mixes_the_unlabelled_pool_into_the_epoch(with_pool, ray_local):
    """Above ``materialize_below_mb`` the pool is read with the labelled shards, in one seeded file
    order: a union of two streamed reads gave the labelled clips, then the unlabelled ones (or ran out
    of the smaller read early), so the epoch's end was one kind of clip. The teacher-pool filter keeps
    every unlabelled clip."""
    from dvfl.train.launch import training_data

    cfg = with_pool["cfg"]
    data = training_data(cfg.clips_dir, seed=0, unlabeled_dir=cfg.clips_dir, materialize_below_mb=0,
                         teacher_pool=cfg.data.teacher_pool, role="student")
    data.train.context.execution_options.preserve_order = True   # the file order alone, not task timing
    labels = [y for b in data.train.iter_batches(batch_format="pyarrow") for y in b.column("label").to_pylist()]
    unlabelled = read_clips_table(cfg.clips_dir, ["unlabeled"], columns=["clip_id"]).num_rows
    assert len(labels) == data.train_rows and labels.count(None) == unlabelled > 0
    first_pool, last_labelled = labels.index(None), max(i for i, y in enumerate(labels) if y is not None)
    assert first_pool < last_labelled, labels   # interleaved, not appended


def test_given_clips_holding_a_pool_train_the_unlabelled_student_too(with_pool, tmp_path):
    """The roles follow the data: the same clips given as data.clips (the default's clips on a bucket,
    `--clips runs/embedded/clips`) trained no dvfl+unlabeled student, without a word."""
    cfg = with_pool["cfg"]
    given = tiny_config(tmp_path, [("data.synthetic.unlabeled_videos", POOL), ("data.clips", cfg.clips_dir),
                                   ("seed", 3)])
    assert given.student_roles == ["vfl", "dvfl"]  # (what the config alone says)
    said = []
    info = pipeline.ensure_clips(given, log=said.append)
    run = pipeline.with_given_pool(given, info, log=said.append)
    assert run.student_roles == ["vfl", "dvfl", "dvfl+unlabeled"] and run.unlabeled_dir == cfg.clips_dir
    assert said == [f"[clips] {cfg.clips_dir} holds an unlabelled pool ({POOL * cfg.data.clips_per_video} clips): a "
                    "dvfl+unlabeled student trains too (list `students` to leave it out)"]
    # the config as given is left as it is: the report records it, a protocol compares it with its other splits'
    # and a search's fingerprint holds it
    assert given.data.unlabeled is None and given.student_roles == ["vfl", "dvfl"]
    listed = tiny_config(tmp_path, [("data.clips", cfg.clips_dir), ("students", ["dvfl"]), ("seed", 3)])
    assert pipeline.with_given_pool(listed, info, log=said.append) is listed and len(said) == 1


def test_unlabelled_training_without_a_cache_covering_it_is_refused(prepared):
    cfg = prepared["cfg"]
    # the shared fixture's cache covers train only (the splits training reads); ask for its clips dir as unlabelled data
    asking = tiny_config(cfg.output_dir, [("data.unlabeled", cfg.clips_dir), ("data.clips", cfg.clips_dir)])
    with pytest.raises(CacheMismatchError, match=r"does not cover split\(s\) \['unlabeled'\]"):
        pipeline.teacher_signal(asking, prepared["teacher"], prepared["spec"], prepared["info"], kd=True)


def test_unlabelled_student_without_unlabelled_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="students .*no unlabelled clips"):
        tiny_config(tmp_path, [("students", ["vfl", "dvfl+unlabeled"])])
    with pytest.raises(ConfigError, match="students must be distinct names"):
        tiny_config(tmp_path, [("students", ["dvfl", "kd"])])
