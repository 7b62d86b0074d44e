"""The pre-trained demo teacher (models/embedded_teacher, made by `make teacher` from
configs/embedded_teacher.yaml, for the embedded default, configs/embedded.yaml): what it is, that its weights
are the ones its spec names, and that it reproduces the test accuracy recorded in it on a sample of
that config's test videos. Skipped (not counted) while the folder is not in the checkout: run
`make teacher` first."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvfl.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "embedded.yaml"
FOLDER = REPO / "models" / "embedded_teacher"
SAMPLE_PER_CLASS = 10


@pytest.mark.skipif(not (FOLDER / "model.json").is_file(), reason="no models/embedded_teacher: run `make teacher`")
def test_shipped_teacher_fingerprint_spec_and_recorded_accuracy(ray_local, tmp_path):
    from dvfl import pipeline
    from dvfl.artifacts import load_model
    from dvfl.data.adapters import build_manifest
    from dvfl.data.ingest import IngestConfig, ingest
    from dvfl.data.shards import load_dataset_info
    from dvfl.profile import count_flops
    from dvfl.train.evaluate import evaluate_multiview

    default = load_config(CONFIG, [("output_dir", str(tmp_path))], check_paths=False)
    folder = Path(default.teacher.path)
    assert folder == FOLDER
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {"model.safetensors", "model.json", "config.json", "README.md"} <= set(files)
    assert sum(files.values()) <= 25 * 2 ** 20
    shipped = json.loads((folder / "model.json").read_text())
    model, spec = load_model(folder)  # strict: every weight present, none left over
    assert spec["weights_fingerprint"] == shipped["weights_fingerprint"]  # the weights are the ones named
    assert shipped["role"] == "teacher" and shipped["classes"] == [
        "MoveRight", "MoveUpRight", "MoveUp", "MoveUpLeft", "MoveLeft", "MoveDownLeft", "MoveDown", "MoveDownRight"]
    # trained on a seed stream of its own: none of the default's videos (seed 0) is one of its
    assert shipped["seed"] != default.seed and shipped["identity"]["dataset"] != ""

    def gmacs(name, kw):
        return count_flops(name, **kw)["gmacs_per_clip"]

    student = pipeline.model_kwargs(default.student, 8, default)
    assert gmacs(shipped["name"], shipped["kwargs"]) >= 4 * gmacs(default.student.model, student)

    recorded = shipped["eval_embedded_test"]
    s = default.data.synthetic
    assert recorded["videos"] == s.num_classes * s.test_per_class
    assert recorded["dataset_fingerprint"] and recorded["synthetic"]["motion"] == s.motion
    # a sample: the first test videos of each class are the same files whatever test_per_class is
    cfg = load_config(CONFIG, [("output_dir", str(tmp_path)), ("teacher.path", None), ("students", None), ("data.synthetic.train_per_class", 0),
                             ("data.synthetic.unlabeled_videos", 0), ("data.synthetic.val_per_class", 0),
                             ("data.synthetic.test_per_class", SAMPLE_PER_CLASS)])
    generated = pipeline.ensure_videos(cfg, log=None)
    ingest(build_manifest("synthetic", generated["root"], 1),
           IngestConfig(out=cfg.clips_dir, frames=cfg.data.frames, clips_per_video=cfg.data.clips_per_video,
                        eval_clips=cfg.data.eval_clips, short_side=cfg.data.short_side, seed=cfg.seed,
                        progress=False), log=lambda *_: None)
    assert len(load_dataset_info(cfg.clips_dir)["classes"]) == 8
    ev = evaluate_multiview(model, cfg.clips_dir, "test", cfg.crop_size, num_clips=cfg.eval.clips,
                            num_crops=cfg.eval.crops, per_video=True)
    assert len(ev["predictions"]) == 8 * SAMPLE_PER_CLASS
    expected = {v: recorded["predictions"][v] for v in ev["predictions"]}
    assert ev["predictions"] == expected  # each sampled video gets the class recorded for it


_TINY = """
name: {name}
output_dir: {out}
seed: {seed}
data:
  dataset: synthetic
  frames: 8
  clips_per_video: 1
  eval_clips: 1
  short_side: 32
  flip: false
  synthetic: {{num_classes: 4, train_per_class: {train}, test_per_class: {test}, unlabeled_videos: 0, size: 32,
              frames: 16, motion: stop, background: plain, speed: [2.5, 3.5]}}
teacher:
  path: {teacher}
  train: {{model: videofocalnet_nano, embed_dim: 8, depths: [1, 1, 1, 1]}}
  optim: {{epochs: 1, batch_size: 8, lr: 0.001}}
student: {{model: videofocalnet_nano, embed_dim: 8, depths: [1, 1, 1, 1]}}
scaling: {{num_workers: 1, cpus_per_worker: 1}}
"""


def test_make_teacher_path_trains_on_its_own_videos_and_publishes_with_the_students_test_accuracy(ray_local, tmp_path):
    """`make teacher` as a command: a synthetic teacher config generates and ingests its own
    videos, trains, and publishes a folder whose spec records each of the students' test videos'
    prediction, which the published weights reproduce."""
    from dvfl.artifacts import load_model
    from dvfl.cli import main
    from dvfl.train.evaluate import evaluate_multiview

    teacher_cfg, student_cfg = tmp_path / "teacher.yaml", tmp_path / "students.yaml"
    teacher_cfg.write_text(_TINY.format(name="tiny-teacher", out=tmp_path / "t", seed=1000, train=6, test=1,
                                        teacher=tmp_path / "t" / "model"))
    student_cfg.write_text(_TINY.format(name="tiny", out=tmp_path / "s", seed=0, train=2, test=3,
                                        teacher=tmp_path / "published")
                           + "eval: {clips: 1, crops: 3}\n")  # (square frames: the 3 crops are one)
    published = tmp_path / "published"
    assert main(["teacher", "--config", str(teacher_cfg), "--publish", str(published),
                 "--test-config", str(student_cfg)]) == 0
    spec = json.loads((published / "model.json").read_text())
    assert spec["role"] == "teacher" and spec["seed"] == 1000 and spec["kwargs"]["embed_dim"] == 8
    recorded = spec["eval_tiny_test"]
    # the views of the accuracy it is published with, predict's default (not its training config's 1x1)
    assert (recorded["clips"], recorded["crops"]) == (1, 3) and spec["inputs"]["eval_views"] == "1x3"
    assert recorded["videos"] == 4 * 3 and len(recorded["predictions"]) == 12
    model, loaded = load_model(published)
    assert loaded["weights_fingerprint"] == spec["weights_fingerprint"]
    ev = evaluate_multiview(model, str(tmp_path / "s" / "clips"), "test", 32, num_clips=1, num_crops=1, per_video=True)
    assert ev["predictions"] == recorded["predictions"]
