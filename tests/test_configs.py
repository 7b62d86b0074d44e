"""The shipped run configs (issue 17): each loads and passes the validation every entry point runs
before work starts, and says what its dataset needs (no flips for SSv2, one path per split for the
protocols). No Ray; paths that name the user's data are checked in a temporary tree."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from dvfl.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = {"embedded.yaml": "synthetic", "embedded_teacher.yaml": "synthetic",
               "ucf101_base.yaml": "ucf101", "hmdb51.yaml": "hmdb51",
               "ucf50.yaml": "ucf50", "ssv2.yaml": "ssv2", "kinetics400.yaml": "kinetics"}


def test_every_run_config_is_listed_here():
    # serve.yaml and tune_*.yaml have schemas of their own (dvfl/serve.py, dvfl/tune.py)
    shipped = {p.name for p in CONFIGS.glob("*.yaml") if p.name != "serve.yaml" and not p.name.startswith("tune_")}
    assert shipped == set(RUN_CONFIGS)


@pytest.mark.parametrize("name", sorted(RUN_CONFIGS))
def test_config_loads_and_validates(name):
    cfg = load_config(CONFIGS / name, check_paths=False)
    assert cfg.data.dataset == RUN_CONFIGS[name]
    if not name.startswith("embedded"):  # the paper's setting: Video-FocalNet-B teacher, nano student, 8 x 224^2
        assert (cfg.data.frames, cfg.crop_size, cfg.student.model) == (8, 224, "videofocalnet_nano")
        assert cfg.teacher.model == "videofocalnet_base" or cfg.teacher.train.model == "videofocalnet_base"
        assert cfg.eval.clips <= cfg.data.eval_clips and cfg.data.val_split == "val"


def test_the_default_students_follow_the_data():
    """The embedded default trains four students; its data changed (no unlabelled pool, another
    dataset's clips) keeps the roles that still make sense instead of refusing the run."""
    def roles(*overrides):
        return load_config(None, list(overrides), check_paths=False).student_roles

    assert roles() == ["vfl", "vfl_long", "dvfl", "dvfl+unlabeled"]
    assert roles(("data.synthetic.unlabeled_videos", 0)) == ["vfl", "vfl_long", "dvfl"]
    assert roles(("data.dataset", "ucf101"), ("data.root", "/nowhere")) == ["vfl", "vfl_long", "dvfl"]
    assert roles(("baseline", False)) == ["dvfl", "dvfl+unlabeled"]  # no student without KD at all
    with pytest.raises(ConfigError, match="students has dvfl\\+unlabeled but there are no unlabelled clips"):
        roles(("data.synthetic.unlabeled_videos", 0), ("students", ["dvfl", "dvfl+unlabeled"]))  # asked for: refused


def test_ssv2_never_flips():
    cfg = load_config(CONFIGS / "ssv2.yaml", check_paths=False)
    assert cfg.data.flip is False and not any("flip" in v for v in cfg.teacher.views)
    with pytest.raises(ConfigError, match="data.flip must not flip ssv2 clips: its classes are directions"):
        load_config(CONFIGS / "ssv2.yaml", [("data.flip", True)], check_paths=False)
    with pytest.raises(ConfigError, match="teacher.views must not flip ssv2 clips"):
        load_config(CONFIGS / "ssv2.yaml", [("teacher.views", ["center", "center+flip"])], check_paths=False)
    # the generated dataset's classes are directions of motion too: a flipped clip trained under the wrong label
    for override in (("data.flip", True), ("teacher.views", ["center", "center+flip"])):
        with pytest.raises(ConfigError, match=r"must not flip synthetic clips: its classes are directions"):
            load_config(None, [override], check_paths=False)


def test_a_wrong_key_or_dataset_is_refused_naming_it(tmp_path):
    tree = yaml.safe_load((CONFIGS / "kinetics400.yaml").read_text())
    tree["data"]["flips"] = True
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"data\.flips is not a known field"):
        load_config(tmp_path / "typo.yaml", check_paths=False)
    with pytest.raises(ConfigError, match=r"data\.dataset is 'kinetics-400'; choose one of"):
        load_config(CONFIGS / "kinetics400.yaml", [("data.dataset", "kinetics-400")], check_paths=False)


@pytest.mark.parametrize("override, message", [
    (("student.depths", [1, 1, 2, "x"]), r"student\.depths\[3\] must be int, got 'x'"),
    (("teacher.views", ["center", 3]), r"teacher\.views\[1\] must be str, got 3"),
    (("seeds", [0, "1"]), r"seeds\[1\] must be int, got '1'"),
])
def test_a_wrong_list_item_is_refused_naming_it(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], check_paths=False)


@pytest.mark.parametrize("override, message", [
    # a value that slipped past every `x < 0` check and surfaced epochs later as a diverged loss
    ("optim.weight_decay=.nan", r"optim\.weight_decay must be a finite number, got nan"),
    ("kd.unlabeled_weight=.nan", r"kd\.unlabeled_weight must be a finite number"),
    ("optim.lr=.inf", r"optim\.lr must be a finite number, got inf"),
    # these were tracebacks (ZeroDivisionError, TypeError, YAML's ParserError) instead of the field
    ("data.synthetic.num_classes=0", r"data\.synthetic\.num_classes must be in 2\.\.36, got 0"),
    ("data.synthetic.size=33", r"data\.synthetic\.size is not a dataset the generator can make: size must be an even"),
    ("data.synthetic.speed=[a,b]", r"data\.synthetic\.speed\[0\] must be float, got 'a'"),
    ("output_dir={split}/run", r"override 'output_dir=\{split\}/run': the value is not valid YAML .*quote it"),
    ("teacher.path=@x", r"not valid YAML"),
    # YAML's comment: the run went to the folder "runs/lr sweep" (another run's)
    ("output_dir=runs/lr sweep #2", r"YAML reads '#' after a space as the start of a comment; quote"),
    ("seeds=[0, -2]", r"seeds must be >= 0 and < 2\*\*31, got \[0, -2\]"),  # numpy refuses it, in the middle of the run
    # a millisecond timestamp: Ray's shuffle refused it at the first in-memory training run, after the cache
    ("seed=1733570000000", r"seed must be >= 0 and < 2\*\*31, got 1733570000000"),
    # "teacher.path=$UNSET" read as null: a teacher trained from scratch for hours instead of the given one
    ("teacher.path=", r"override 'teacher.path=': no value after '=' \(an unset shell variable\?\); give a value, or null"),
    ("data.clips= ", r"no value after '='"),
    # yes/no/on/off read as bools became the strings "on"/"off" in every text field (a run named "off")
    ("name=no", r"name must be a string, got False: YAML reads yes/no/on/off/true/false as a bool; quote it"),
])
def test_a_bad_override_is_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], check_paths=False)


def test_a_teacher_cache_in_the_clips_folder_is_refused():
    """`teacher.cache` = `data.clips`: its build waited on the clips' run-long read lock (or ran beside
    another run's build unlocked). A cache folder inside the clips folder is its own folder."""
    with pytest.raises(ConfigError, match=r"teacher\.cache must be a folder of its own, not data\.clips \(/data/clips\)"):
        load_config(None, ["data.clips=/data/clips", "teacher.cache=/data/clips/"], check_paths=False)
    assert load_config(None, ["data.clips=/data/clips", "teacher.cache=/data/clips/cache"], check_paths=False)


def test_a_field_of_a_section_left_empty_in_the_file_can_be_set(tmp_path):
    """`kd:` with nothing under it reads as None: `--set kd.temperature=2` said "kd is not a section"."""
    (tmp_path / "run.yaml").write_text("kd:\nstudent:\n")
    cfg = load_config(tmp_path / "run.yaml", ["kd.temperature=2", "student.embed_dim=8"], check_paths=False)
    assert (cfg.kd.temperature, cfg.student.embed_dim) == (2, 8)


def test_a_quoted_value_keeps_its_hash():
    cfg = load_config(None, ['output_dir="runs/lr sweep #2"', "data.clips=runs/x#1"], check_paths=False)
    assert cfg.output_dir.endswith("runs/lr sweep #2") and cfg.data.clips.endswith("runs/x#1")


def test_floats_in_exponent_notation_are_floats():
    # PyYAML (YAML 1.1) reads 1e-3 as a string: `--set optim.lr=1e-3` was refused as "not a float"
    cfg = load_config(None, ["optim.lr=1e-3", "kd.temperature=2E+0"], check_paths=False)
    assert cfg.optim.lr == 0.001 and cfg.kd.temperature == 2.0
    with pytest.raises(ConfigError, match=r"optim\.epochs must be int, got '1e1'"):
        load_config(None, ["optim.epochs=1e1"], check_paths=False)


def test_setting_one_teacher_field_keeps_the_default_teacher_and_naming_a_model_gives_its_own_width(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {dataset: synthetic}\n")  # no teacher.train section
    default = load_config(tmp_path / "c.yaml", check_paths=False).teacher.train
    one_field = load_config(tmp_path / "c.yaml", ["teacher.train.drop_path_rate=0.2"], check_paths=False).teacher.train
    assert (one_field.model, one_field.embed_dim, one_field.drop_path_rate) == (default.model, default.embed_dim, 0.2)
    assert default.embed_dim == 32  # (was None: the variant's full width, another teacher)
    base = load_config(CONFIGS / "ucf101_base.yaml", check_paths=False).teacher.train
    assert (base.model, base.embed_dim, base.depths) == ("videofocalnet_base", None, None)
    # naming the default's own model (`teacher --config ... --arch videofocalnet_nano`) is that variant as
    # registered: nano's width 96, not the default teacher's 32
    for named in (load_config(CONFIGS / "ucf101_base.yaml", ["teacher.train.model=videofocalnet_nano"],
                              check_paths=False).teacher.train,
                  load_config(tmp_path / "c.yaml", ["teacher.train.model=videofocalnet_nano"], check_paths=False).teacher.train):
        assert (named.model, named.embed_dim, named.depths) == ("videofocalnet_nano", None, None)


def test_a_bare_teacher_command_trains_the_named_variant_on_the_clips_as_they_are(tmp_path, capsys):
    """`dvfl teacher --clips DIR --out DIR` built on the embedded default: it trained a 4-block
    width-48 model and called it Video-FocalNet-B, and refused 32-frame clips as "synthetic"."""
    import argparse
    import json

    from dvfl.commands import teacher

    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "dataset.json").write_text(json.dumps({
        "fingerprint": "f" * 32, "dataset": "ucf101", "classes": [f"c{i}" for i in range(5)],
        "params": {"frames": 32, "short_side": 128, "eval_clips": 1, "clips_per_video": 1}}))
    p = argparse.ArgumentParser()
    teacher.add_arguments(p)
    cfg, info, _, out, _ = teacher.teacher_run_config(p.parse_args(["--clips", str(clips), "--out", str(tmp_path / "t")]), p)
    t = cfg.teacher.train
    assert (t.model, t.embed_dim, t.depths) == ("videofocalnet_base", None, None)
    assert (cfg.data.dataset, cfg.data.frames, cfg.data.short_side) == ("ucf101", 32, 128)
    assert out == str(tmp_path / "t") and info["params"]["frames"] == 32
    # --publish onto a folder of the user's: refused before the training, not after it (a traceback)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as refused:
        teacher.teacher_run_config(p.parse_args(["--clips", str(clips), "--out", str(tmp_path / "t"),
                                                 "--publish", str(tmp_path / "mine")]), p)
    assert refused.value.code == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    # a --set is not a config: it made the command the embedded default's again (a width-48 nano "teacher" on
    # clips taken for synthetic ones, unchecked); clips of split 2 were refused as split 1's; 2 workers were
    # refused for the default's side-by-side students
    meta = json.loads((clips / "dataset.json").read_text())
    (clips / "dataset.json").write_text(json.dumps({**meta, "source": {"split": 2}}))
    cfg, *_ = teacher.teacher_run_config(p.parse_args(["--clips", str(clips), "--out", str(tmp_path / "t"),
                                                       "--num-workers", "2",
                                                       "--set", "teacher.optim.weight_decay=0.01"]), p)
    assert (cfg.teacher.train.model, cfg.teacher.train.depths, cfg.data.dataset, cfg.data.split) == (
        "videofocalnet_base", None, "ucf101", 2)
    assert (cfg.teacher.optim.weight_decay, cfg.scaling.num_workers, cfg.output_dir) == (0.01, 2, str(tmp_path / "t" / "_work"))
    # --publish with a --test-config of another official split: refused before the training (its test
    # videos are this split's training videos; session 41: found after the whole training, or never)
    (tmp_path / "UCF101").mkdir()
    (tmp_path / "test_s1.yaml").write_text(json.dumps({"data": {"dataset": "ucf101", "root": str(tmp_path / "UCF101"),
                                                                "split": 1, "clips": str(clips)}}))
    with pytest.raises(SystemExit) as refused:
        teacher.teacher_run_config(p.parse_args(["--clips", str(clips), "--out", str(tmp_path / "t"), "--publish",
                                                 str(tmp_path / "pub"), "--test-config", str(tmp_path / "test_s1.yaml")]), p)
    assert refused.value.code == 2
    assert "its test split is ucf101 split 1, the teacher trains on split 2" in capsys.readouterr().err
    # a --set of what the clips say, that disagrees with them: refused (the clips' values replaced it silently)
    assert teacher.teacher_run_config(p.parse_args(["--clips", str(clips), "--out", str(tmp_path / "t"),
                                                    "--set", "data.frames=16"]), p) == 2
    cfg, *_ = teacher.teacher_run_config(p.parse_args(["--clips", str(clips), "--out", str(tmp_path / "t"),
                                                       "--set", "data.frames=32"]), p)
    assert cfg.data.frames == 32
    # an output that is a given checkpoint file or an exported folder: refused before the training (a
    # FileExistsError after it; a folder of the new model.pt beside the old safetensors and card)
    (tmp_path / "t.pth").write_bytes(b"weights")
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "model.safetensors").write_bytes(b"weights")
    for out in ("t.pth", "exported"):
        with pytest.raises(SystemExit) as refused:
            teacher.teacher_run_config(p.parse_args(["--clips", str(clips), "--out", str(tmp_path / out)]), p)
        assert refused.value.code == 2
    assert (tmp_path / "t.pth").read_bytes() == b"weights"
    assert "holds model.safetensors, not only a teacher" in (teacher.teacher_output_refusal(str(tmp_path / "exported")))
    (tmp_path / "t" / "_work").mkdir(parents=True)
    (tmp_path / "t" / "model.pt").write_bytes(b"an earlier teacher")
    assert teacher.teacher_output_refusal(str(tmp_path / "t")) is None


def test_protocol_configs_give_every_split_its_own_files(tmp_path, monkeypatch):
    """hmdb51.yaml (splits 1-3) and ucf50.yaml (25 folds) pass the protocol's checks as shipped: every
    split gets its own clips, cache, teacher and output dir, validated with the user's paths present."""
    from dvfl.protocol import split_configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_root").mkdir()
    for s in (1, 2, 3):
        (tmp_path / "models" / f"hmdb51_s{s}_videofocalnet_base").mkdir(parents=True)
    (tmp_path / "video-focalnet_base_k400.pth").write_bytes(b"")
    root = [("data.root", str(tmp_path / "data_root"))]
    hmdb = split_configs(CONFIGS / "hmdb51.yaml", root, [1, 2, 3])
    ucf50 = split_configs(CONFIGS / "ucf50.yaml", root, [1, 25])
    for configs in (hmdb, ucf50):
        for field in ("clips_dir", "cache_dir", "output_dir"):
            assert len({getattr(c, field) for c in configs}) == len(configs), field
    assert [c.teacher.path for c in hmdb] == [str(tmp_path / "models" / f"hmdb51_s{s}_videofocalnet_base")
                                              for s in (1, 2, 3)]
    assert [c.clips_dir for c in ucf50] == [str(tmp_path / "data" / f"ucf50_g{g}") for g in (1, 25)]
    assert all(c.teacher.path is None and c.teacher.train.reinit_head for c in ucf50)  # a teacher per fold
    # a teacher missing for one split is named before any split runs
    (tmp_path / "models" / "hmdb51_s3_videofocalnet_base").rmdir()
    with pytest.raises(ConfigError, match=r"split 3: teacher\.path path does not exist: .*hmdb51_s3_videofocalnet"):
        split_configs(CONFIGS / "hmdb51.yaml", root, [1, 2, 3])


def test_protocol_refuses_a_run_without_a_teacher_before_any_work(tmp_path, monkeypatch, capsys):
    # distill refused teacher.mode none; protocol took it and distilled online from a trained teacher
    from dvfl.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_root").mkdir()
    (tmp_path / "video-focalnet_base_k400.pth").write_bytes(b"")
    code = main(["protocol", "--config", str(CONFIGS / "ucf50.yaml"), "--folds", "1",
                 "--set", f"data.root={tmp_path / 'data_root'}", "--set", "teacher.mode=none"])
    assert code == 2 and "teacher.mode is none" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_distill_ingests_missing_clips_from_data_root_and_refuses_them_without_one(tmp_path, capsys):
    # configs/ucf101_base.yaml says distill.py ingests data.clips from data.root; it refused instead
    from dvfl.cli import main

    (tmp_path / "UCF101").mkdir()  # no split lists: the ingest's own error, after validation
    clips = str(tmp_path / "data" / "ucf101_s1")
    args = ["distill", "--config", str(CONFIGS / "ucf101_base.yaml"), "--set", f"data.clips={clips}",
            "--set", "teacher.path=null", "--set", f"output_dir={tmp_path / 'run'}", "--num-cpus", "1",
            "--set", "scaling.use_gpu=false",  # (the config's GPUs: refused on a machine without one)
            "--set", "scaling.num_workers=1", "--set", "scaling.cpus_per_worker=0.5"]  # (and its 16 CPUs on this Ray)
    with pytest.raises(SystemExit) as failed:  # (a traceback before session 32)
        main(args + ["--set", f"data.root={tmp_path / 'UCF101'}"])
    err = capsys.readouterr().err
    assert failed.value.code == 2 and "config error: data.root: " in err, err
    assert "classInd.txt not found" in err, err  # the adapter read data.root
    with pytest.raises(SystemExit):
        main(args + ["--set", "data.root=null"])
    assert re.search(r"data\.clips path does not exist: .*no data\.root to ingest it from", capsys.readouterr().err)


def test_start_weights_a_model_cannot_take_are_refused_before_any_work(tmp_path, capsys):
    """A student checkpoint of another width, a teacher checkpoint with another head and no
    reinit_head, a bare teacher file with no teacher.model: each failed when its run was planned
    (after ingest, teacher and cache), as a traceback; now a config error before Ray starts."""
    import torch

    from dvfl.cli import main
    from dvfl.models import build_model
    from dvfl.pipeline import check_given_inputs

    def saved(name, **kwargs):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": build_model("videofocalnet_nano", num_frames=8, **kwargs).state_dict()}, path)
        return str(path)

    def check(*overrides):
        check_given_inputs(load_config(None, [("output_dir", str(tmp_path / "run")), *overrides]))

    wide16 = saved("w16", num_classes=8, embed_dim=16, depths=[1, 1, 2, 1], img_size=32)  # the embedded default's
    check(("student.checkpoint", wide16))  # fits: no error
    with pytest.raises(ConfigError, match=r"^student\.checkpoint: .*w16\.pth does not match the model spec .*differ in shape"):
        check(("student.checkpoint", wide16), ("student.embed_dim", 8))
    five = saved("five", num_classes=5, embed_dim=48, depths=[1, 1, 2, 1], img_size=32)
    trained_teacher = [("teacher.path", None), ("teacher.train.checkpoint", five)]
    with pytest.raises(ConfigError, match=r"^teacher\.train\.checkpoint: .*five\.pth: class count differs"):
        check(*trained_teacher)
    check(*trained_teacher, ("teacher.train.reinit_head", True))  # a new head for the 8 classes
    with pytest.raises(ConfigError, match=r"^teacher\.path .*five\.pth is a checkpoint file: set teacher\.model"):
        check(("teacher.path", five))
    with pytest.raises(ConfigError, match=r"^teacher\.path: .*w16\.pth does not match the model spec"):
        check(("teacher.path", wide16), ("teacher.model", "videofocalnet_nano"))  # built at nano's own width, 96
    (tmp_path / "run_folder").mkdir()  # the run folder above the model's own: found after the ingest, as a traceback
    with pytest.raises(ConfigError, match=r"^teacher\.path .*run_folder is a folder without model\.json"):
        check(("teacher.path", str(tmp_path / "run_folder")))
    # the command: one line, exit 2, nothing made
    code = main(["distill", "--out", str(tmp_path / "cli"), "--set", f"student.checkpoint={wide16}",
                 "--set", "student.embed_dim=8"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("config error: student.checkpoint: ") and "Traceback" not in err, err
    assert not (tmp_path / "cli").exists()


def test_a_models_identity_holds_what_changes_its_training(tmp_path):
    """A finished model is reused when its identity matches. Left out were: the data seed (a given
    data.clips' fingerprint does not hold it, yet it orders the data), the worker count (batch_size
    is per worker: another global batch and schedule), the checkpoint's content (a file replaced
    under its name) and a re-initialised head: each reused a model trained otherwise."""
    from dvfl.pipeline import digest, init_identity, student_run_args

    ckpt = tmp_path / "k400.pth"
    ckpt.write_bytes(b"a" * 1000)
    info = {"fingerprint": "f" * 64, "classes": ["a", "b", "c"]}

    def student(*overrides):
        cfg = load_config(None, [("data.clips", str(tmp_path)), *overrides], check_paths=False)
        return digest(student_run_args(cfg, info, {"mode": "none"}, 0, "vfl")["identity"])

    base = student()
    assert student() == base
    assert student(("seed", 1)) != base
    assert student(("scaling.num_workers", 2), ("scaling.concurrent_runs", 0)) != base
    with_ckpt = student(("student.checkpoint", str(ckpt)))
    assert student(("student.checkpoint", str(ckpt)), ("student.reinit_head", True)) != with_ckpt
    ckpt.write_bytes(b"b" * 1000)  # new weights under the same name
    assert student(("student.checkpoint", str(ckpt))) != with_ckpt
    # the same bytes at another path (a job's working directory moves every session): the same run
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "k400.pth").write_bytes(ckpt.read_bytes())
    assert student(("student.checkpoint", str(tmp_path / "job" / "k400.pth"))) == student(("student.checkpoint", str(ckpt)))
    # memory-only settings, the usual fixes of an out-of-memory run: the same run, resumed (it started
    # again from epoch 1); the precision is another training
    assert student(("student.use_checkpoint", True), ("optim.keep_freed_memory", False)) == base
    assert student(("optim.amp", "off")) != base
    # a model finished with activation checkpointing before it left the identity is still reused, not retrained
    from dvfl.pipeline import SPEC, STUDENTS_DIR, plan_model_run

    cfg = load_config(None, [("data.clips", str(tmp_path)), ("output_dir", str(tmp_path / "run")),
                             ("student.use_checkpoint", True)], check_paths=False)
    args = student_run_args(cfg, info, {"mode": "none"}, 0, "vfl")
    earlier = tmp_path / "run" / STUDENTS_DIR / f"vfl-s0-{digest({**args['identity'], 'model': {**args['identity']['model'], 'use_checkpoint': True}})}"
    earlier.mkdir(parents=True)
    (earlier / SPEC).write_text("{}")
    assert plan_model_run(cfg, **args, log=lambda *_: None) == str(earlier)
    plain = load_config(None, [("data.clips", str(tmp_path)), ("output_dir", str(tmp_path / "run2"))], check_paths=False)
    args = student_run_args(plain, info, {"mode": "none"}, 0, "vfl")
    unkept = tmp_path / "run2" / STUDENTS_DIR / f"vfl-s0-{digest({**args['identity'], 'optim': {**args['identity']['optim'], 'keep_freed_memory': False}})}"
    unkept.mkdir(parents=True)
    (unkept / SPEC).write_text("{}")
    assert plan_model_run(plain, **args, log=lambda *_: None) == str(unkept)
    # the teacher's identity takes the same init part; runs from scratch add nothing (kept reusable)
    cfg = load_config(None, [("teacher.train.checkpoint", str(ckpt)), ("teacher.train.reinit_head", True)],
                      check_paths=False)
    assert init_identity(cfg.teacher.train)["reinit_head"] is True and init_identity(cfg.student) == {}


@pytest.mark.parametrize("override, message", [
    (("kd", 0), r"^kd must be a mapping"),                     # was: the kd defaults, silently
    (("eval", []), r"^eval must be a mapping"),
    (("data.crop_size", 0), r"^data\.crop_size must be > 0"),  # was: short_side (`or`)
    (("data.short_side", -8), r"^data\.short_side must be >= 0 .*got -8"),  # was blamed on data.crop_size
    (("data.clips_per_video", 0), r"^data\.clips_per_video must be >= 1"),  # was: inside the ingest, naming a flag
    (("data.split", 0), r"^data\.split must be >= 1"),
    (("data.eval_clips", 0), r"^data\.eval_clips must be >= 1"),  # was blamed on eval.clips
    (("output_dir", ""), r"^output_dir must not be empty"),    # was: the current directory
    (("teacher.cache", " "), r"^teacher\.cache must not be empty"),
    (("scaling.worker_resources", {"x": float("inf")}), r"^scaling\.worker_resources amounts must be > 0 and finite"),
    # session 30: each passed and failed after the ingest (or chose on the training clips)
    (("data.test_split", "unlabeled"), r"^data\.test_split must not be 'unlabeled'"),
    (("data.synthetic.test_per_class", 0), r"^data\.synthetic\.test_per_class must be >= 1"),
    (("optim", {"optimizer": "sgd", "momentum": 0}), r"^optim\.momentum must be in \(0, 1\)"),
    (("name", "ucf101/split1"), r"^name must be letters, digits"),  # a folder and temp-file name
    (("data", {"dataset": "hmdb51", "split": 4}), r"^data\.split must be in 1\.\.3 for hmdb51"),
    # session 34: a generated dataset's misspelt split was found after generation and ingest; init_2d
    # beside a checkpoint was dropped
    (("data.train_split", "tran"), r"^data\.train_split is 'tran'; the generated dataset has the split\(s\) 'train', 'test'"),
    (("data.val_split", "valid"), r"^data\.val_split is 'valid'; the generated dataset has .*\('val' without one: carved"),
    (("student", {"checkpoint": "k400.pth", "init_2d": "in1k.pth"}), r"^student\.init_2d and student\.checkpoint are alternatives"),
    # a variant's name over the config's pinned depths of another (`dvfl teacher --config ... --arch`)
    (("student.model", "videofocalnet_tiny"), r"^student\.depths \[1, 1, 2, 1\] are the depths of videofocalnet_nano, not videofocalnet_tiny's"),
])
def test_values_that_were_accepted_or_changed_silently_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], check_paths=False)


def test_yaml_words_and_duplicate_keys(tmp_path):
    """`amp: off` (documented) read as a boolean by YAML 1.1 was refused; a key written twice in a
    file silently lost the first; a search file that is not YAML ended in a traceback."""
    from dvfl.tune import load_tune_config

    assert load_config(None, ["optim.amp=off"], check_paths=False).optim.amp == "off"
    twice = tmp_path / "twice.yaml"
    twice.write_text("optim: {lr: 0.1}\noptim: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: .*key 'optim' is written twice"):
        load_config(twice, check_paths=False)
    listed = tmp_path / "listed.yaml"  # a key that is a list: one line, not a TypeError traceback
    listed.write_text("? [1, 2]\n: 3\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: .*a key must be a plain value, not a list or mapping"):
        load_config(listed, check_paths=False)
    merged = tmp_path / "merged.yaml"  # YAML's merge key is not a key written twice ("not valid YAML")
    merged.write_text("optim: &o {epochs: 3, batch_size: 4, lr: 0.001}\nteacher: {optim: {<<: *o, epochs: 5}}\n")
    cfg = load_config(merged, check_paths=False)
    assert (cfg.teacher.optim.epochs, cfg.teacher.optim.batch_size, cfg.optim.epochs) == (5, 4, 3)
    aliased = tmp_path / "aliased.yaml"  # one recipe for both: an override of the student's is not the teacher's
    aliased.write_text("optim: &o {epochs: 3, batch_size: 4, lr: 0.001}\nteacher: {optim: *o}\n")
    cfg = load_config(aliased, ["optim.epochs=7", "optim={lr: 0.01}"], check_paths=False)
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.teacher.optim.epochs, cfg.teacher.optim.lr) == (7, 0.01, 3, 0.001)
    recursive = tmp_path / "recursive.yaml"  # one line, not a RecursionError traceback; nor minutes of expansion
    recursive.write_text("seeds: &s [1, *s]\n")
    with pytest.raises(ConfigError, match=r"recursive\.yaml: an alias refers to a mapping or list that contains it"):
        load_config(recursive, check_paths=False)
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)))
    with pytest.raises(ConfigError, match=r"laughs\.yaml: its aliases expand to more than 100,000 values"):
        load_config(laughs, check_paths=False)
    # 1e-3 where a number goes: a float everywhere (three places still refused it as a string)
    assert load_config(None, ["scaling.worker_resources={a: 1e-3}"], check_paths=False).scaling.worker_resources == {"a": 0.001}
    t = load_tune_config(None, ["tune.driver_cpus=1e-1", "tune.asha.reduction_factor=3e0"], check_paths=False)[0]
    assert (t.driver_cpus, t.asha.reduction_factor) == (0.1, 3.0)
    floats = tmp_path / "floats.yaml"  # 1e-4 is a string to PyYAML: "must be a finite number", or strings for Tune
    floats.write_text("space:\n  optim.lr: {loguniform: [1e-4, 1e-2]}\n  optim.weight_decay: {choice: [0, 5e-2]}\n")
    space = load_tune_config(floats, check_paths=False)[0].space
    assert space == {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "optim.weight_decay": {"choice": [0, 0.05]}}, space
    broken = tmp_path / "search.yaml"
    broken.write_text("space: {kd.temperature: {loguniform: [1, 8]\n")
    with pytest.raises(ConfigError, match=r"^tune config file .*search\.yaml is not valid YAML"):
        load_tune_config(broken, check_paths=False)
    with pytest.raises(ConfigError, match=r"^tune\.set must be a mapping"):
        load_tune_config(None, [("tune.set", {1: 2})], check_paths=False)
    with pytest.raises(ConfigError, match=r"^tune\.driver_cpus must be a finite number"):
        load_tune_config(None, [("tune.driver_cpus", float("inf"))], check_paths=False)


def test_a_mapping_for_a_section_sets_those_fields_and_keeps_the_others(tmp_path):
    """``--set 'kd={temperature: 2}'`` (or a search's nested ``set:``) replaced the whole section:
    kd.alpha fell back to its default and ``student={drop_path_rate: 0.1}`` became a full-width nano."""
    from dvfl.tune import load_tune_config

    base = load_config(None, check_paths=False)
    cfg = load_config(None, ["kd={temperature: 2}", "student={drop_path_rate: 0.1}"], check_paths=False)
    assert base.kd.alpha != type(base.kd)().alpha and base.student.embed_dim != type(base.student)().embed_dim
    assert cfg.kd.temperature == 2 and cfg.kd.alpha == base.kd.alpha
    assert cfg.student.embed_dim == base.student.embed_dim and cfg.student.drop_path_rate == 0.1
    # a mapping naming another model: that variant's own widths (as a file's section gets them);
    # an empty section in a file (None) takes a mapping too
    tiny = load_config(None, ["student={model: videofocalnet_tiny}"], check_paths=False).student
    assert tiny.model == "videofocalnet_tiny" and tiny.embed_dim is None and tiny.depths is None
    # naming the section's own model keeps its fields (a 16-wide student became a 96-wide nano), and the
    # teacher section's `model` (a bare file's architecture) replaced views, cache and epochs
    same = load_config(None, [f"student={{model: {base.student.model}, drop_path_rate: 0.05}}"], check_paths=False).student
    assert (same.embed_dim, same.depths, same.drop_path_rate) == (base.student.embed_dim, base.student.depths, 0.05)
    hmdb = load_config(CONFIGS / "hmdb51.yaml", check_paths=False)
    given = load_config(CONFIGS / "hmdb51.yaml", ["teacher={path: /x/t.pth, model: videofocalnet_base}"],
                        check_paths=False).teacher
    assert (given.path, given.model) == ("/x/t.pth", "videofocalnet_base")
    assert (given.views, given.cache, given.optim.epochs) == (hmdb.teacher.views, hmdb.teacher.cache, hmdb.teacher.optim.epochs)
    empty = tmp_path / "empty_kd.yaml"
    empty.write_text("kd:\n")
    assert load_config(empty, ["kd={temperature: 2}"], check_paths=False).kd.temperature == 2
    # a search's asha: likewise (its grace period went back to 1)
    t0 = load_tune_config(None, check_paths=False)[0]
    t = load_tune_config(None, ["tune.asha={reduction_factor: 3}"], check_paths=False)[0]
    assert (t.asha.reduction_factor, t.asha.grace_period) == (3, t0.asha.grace_period) and t0.asha.grace_period != 1
    # a field whose value is a mapping is still replaced whole
    cfg = load_config(None, [("scaling.worker_resources", {"a": 1}), ("scaling.worker_resources", {"b": 2})],
                      check_paths=False)
    assert cfg.scaling.worker_resources == {"b": 2}
    for override, message in ((("tune.seed", -1), r"^tune\.seed must be >= 0"),
                              (("tune.storage", ""), r"^tune\.storage must be a path")):
        with pytest.raises(ConfigError, match=message):
            load_tune_config(None, [override], check_paths=False)


def test_the_shipped_default_runs_from_any_folder_and_a_users_config_stays_where_the_user_is(tmp_path, monkeypatch):
    """`dvfl distill` outside the checkout failed: the default's teacher (models/embedded_teacher,
    shipped in the checkout) was looked up in the current folder. A shipped config's input found
    only in the checkout is the checkout's; outputs, and a user's own config, stay relative to here."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config()  # paths checked: the teacher exists
    assert cfg.teacher.path == str(CONFIGS.parent / "models" / "embedded_teacher")
    assert cfg.output_dir == str(tmp_path / "runs" / "embedded")
    mine = tmp_path / "mine.yaml"
    mine.write_text((CONFIGS / "embedded.yaml").read_text())
    assert load_config(mine, check_paths=False).teacher.path == str(tmp_path / "models" / "embedded_teacher")
    (tmp_path / "models" / "embedded_teacher").mkdir(parents=True)  # here first, where the user is
    assert load_config(check_paths=False).teacher.path == str(tmp_path / "models" / "embedded_teacher")


def test_finished_given_clips_need_no_data_root(tmp_path):
    """configs/ucf101_base.yaml names data.root /data/UCF101; a job given finished clips (an s3:// or
    shared-volume ingest) was refused because that folder was not on the head node."""
    clips = tmp_path / "clips"
    clips.mkdir()
    overrides = ["data.dataset=ucf101", f"data.root={tmp_path / 'not_here'}", f"data.clips={clips}",
                 "teacher.path=null"]
    with pytest.raises(ConfigError, match="data.root"):  # not a finished ingest: the videos are needed
        load_config(None, overrides)
    (clips / "dataset.json").write_text("{}")
    assert load_config(None, overrides).data.clips == str(clips)


def test_a_wheel_install_without_the_checkout_says_how_to_install(monkeypatch, tmp_path):
    """`pip install .` puts dvfl/ alone in site-packages: the default run read configs/ beside it and
    failed with "config file not found: .../site-packages/configs/embedded.yaml", no hint why."""
    import dvfl.config

    monkeypatch.setattr(dvfl.config, "CONFIG_DIR", tmp_path / "site-packages" / "configs")
    with pytest.raises(ConfigError, match=r"^the embedded default's config is not here .*`pip install -e \.`"):
        load_config(None)
    given = tmp_path / "run.yaml"  # a config of the user's own still loads
    given.write_text(f"output_dir: {tmp_path / 'out'}\n")
    assert load_config(given, check_paths=False).output_dir == str(tmp_path / "out")


def test_an_output_folder_whose_name_is_not_utf8_is_refused_in_one_line(tmp_path):
    """An output folder with a Latin-1 name (an old NAS's): pyarrow, which writes every artefact,
    cannot open it, and the run lock's name failed first (a UnicodeEncodeError traceback)."""
    import subprocess
    import sys

    from dvfl.locks import folder_lock

    repo = CONFIGS.parent

    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9_out")
    with pytest.raises(ConfigError, match=r"output_dir: b'.*/caf\\xe9_out' is not a UTF-8 name"):
        load_config(None, [("output_dir", bad)])
    with folder_lock(bad, "run", log=None):  # (the lock's file is named from the folder's bytes)
        pass
    r = subprocess.run([sys.executable, "pipelines/ingest.py", "--dataset", "synthetic", "--out", os.fsencode(bad)],
                       capture_output=True, text=True, timeout=120, cwd=repo)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith("is not a UTF-8 name, which pyarrow (it writes the outputs) "
                                                      "cannot open: write elsewhere, or rename the folder"), r.stderr
    # predict's and profile's JSON reports are written by Python itself: such a folder still takes them
    import argparse

    from dvfl.cli import absolute_path_args

    a = argparse.Namespace(json=bad + "/preds.json")
    absolute_path_args(a, plain_outputs=("json",))
    assert a.json == bad + "/preds.json"


def test_given_generated_clips_made_with_other_settings_are_said():
    """`--set data.clips=...` with `--set seed=7` or another `data.synthetic.label_noise`: the run trained and
    reported on the earlier clips, its results naming the new settings, without a word."""
    from dvfl.config import load_config
    from dvfl.pipeline import _note_generator

    made = load_config(None, check_paths=False)
    info = {"source": {"generator": made.data.synthetic.generator_config(made.seed).as_dict()}}
    said = []
    _note_generator(made, info, said.append)
    assert said == []
    for override, words in ((("seed", 7), "seed 0 (config: 7)"),
                            (("data.synthetic.label_noise", 0.0), "data.synthetic.label_noise 0.4 (config: 0)")):
        _note_generator(load_config(None, [override], check_paths=False), info, said.append)
        assert len(said) == 1 and said.pop().startswith(f"[clips] note: {made.clips_dir} was generated with {words}: "
                                                         "used as given"), said
    _note_generator(made, {"source": {}}, said.append)  # clips ingested before session 49 record nothing
    assert said == []
