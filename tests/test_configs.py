"""The shipped run configs (issue 17): each loads and passes the validation every entry point runs
before work starts, and says what its dataset needs (no flips for SSv2, one path per split for the
protocols). No Ray; paths that name the user's data are checked in a temporary tree."""
from __future__ import annotations

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
