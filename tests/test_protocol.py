"""Protocols over several splits (issue 17): pipelines/protocol.py runs the distillation pipeline per
UCF101/HMDB51 split (or UCF50 fold) and reports each split's figures and their mean ± std.

The end-to-end tests run the command-line entry point on tiny dataset trees of real encoded videos,
joined to the session's Ray; the rest check the refusals that keep splits apart, without Ray.
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_videos

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Archery", "Biking"]
# tiny sizes; the teacher is given (one per split, {split} in teacher.path), so each split trains one student
TINY_RUN = {"seed": 0, "baseline": False, "students": ["dvfl"],
            "data": {"frames": 4, "clips_per_video": 2, "eval_clips": 1, "short_side": 24, "crop_size": 24},
            # online: the teacher runs inside training (no cache stage per split; the cache is tested elsewhere)
            "teacher": {"mode": "online", "min_top1_over_chance": -1},
            "student": {"embed_dim": 8, "depths": [1, 1, 1, 1], "drop_path_rate": 0.0},
            "optim": {"epochs": 1, "batch_size": 4},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "concurrent_runs": 1}, "eval": {"clips": 1, "crops": 1}}


def video_specs(root: Path, groups, layout: str) -> list:
    """One short clip per class and group: ``<root>/<Class>/v_<Class>_gGG_c01.avi`` (UCF naming)."""
    specs = []
    for c, name in enumerate(CLASSES):
        for g in groups:
            rel = f"{name}/v_{name}_g{g:02d}_c01.avi"
            specs.append((str(root / layout / rel) if layout else str(root / rel),
                          {"n": 10, "h": 24, "w": 32, "fps": 10, "codec": "mpeg4", "seed": 10 * c + g}))
    return specs


def ucf101_tree(root: Path, splits=(1, 2), groups=(1, 2, 3, 4)) -> None:
    """Split N tests on group N (like the official lists, whose split 1 tests on g01-g07)."""
    make_videos(video_specs(root, groups, "UCF-101"))
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(CLASSES)))
    for s in splits:
        train = [f"{n}/v_{n}_g{g:02d}_c01.avi {c + 1}" for c, n in enumerate(CLASSES) for g in groups if g != s]
        test = [f"{n}/v_{n}_g{s:02d}_c01.avi" for n in CLASSES]
        (lists / f"trainlist0{s}.txt").write_text("\n".join(train) + "\n")
        (lists / f"testlist0{s}.txt").write_text("\n".join(test) + "\n")


def teacher_dirs(base: Path, ids) -> str:
    """A (random-weight) teacher per split, saved as a model directory: ``base/s{split}``."""
    from dvfl.artifacts import save_model
    from dvfl.models import build_model

    kwargs = {"num_classes": len(CLASSES), "num_frames": 4, "img_size": 24, "embed_dim": 8, "depths": [1, 1, 1, 1],
              "drop_path_rate": 0.0}
    for i in ids:
        save_model(base / f"s{i}", build_model("videofocalnet_nano", **kwargs), "videofocalnet_nano", kwargs)
    return str(base / "s{split}")


def write_config(path: Path, **data) -> Path:
    tree = json.loads(json.dumps(TINY_RUN))
    for key, value in data.items():
        section, _, field = key.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[field] = value
    path.write_text(yaml.safe_dump(tree))
    return path


def run_protocol(args, ray_local, cwd):
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "protocol.py"), *args], cwd=cwd,
                          env={**__import__("os").environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
                          capture_output=True, text=True, timeout=600)


def check_aggregate(report: dict, kind: str, ran: list) -> None:
    """The aggregate is the mean / sample std of the per-split figures the protocol ran, and those
    are the figures each split's own results.json holds."""
    assert report[f"{kind}s_run"] == ran and [r["split"] for r in report["runs"]] == ran
    for run in report["runs"]:
        own = json.loads((Path(run["output_dir"]) / "results.json").read_text())
        assert {r: (m["top1"], m["top5"]) for r, m in run["models"].items()} == {
            r: (m["top1_mean"], m["top5_mean"]) for r, m in own["models"].items()}
        assert own["splits"]["top1"] == "test"
    for role, agg in report["aggregate"].items():
        top1 = [r["models"][role]["top1"] for r in report["runs"]]
        top5 = [r["models"][role]["top5"] for r in report["runs"]]
        assert agg["n"] == len(ran) and agg["top1_per_split"] == top1
        assert agg["top1_mean"] == pytest.approx(statistics.fmean(top1))
        assert agg["top1_std"] == pytest.approx(statistics.stdev(top1))
        assert agg["top5_mean"] == pytest.approx(statistics.fmean(top5))
        assert agg["top5_std"] == pytest.approx(statistics.stdev(top5))


def test_ucf101_splits_run_per_split_and_report_mean_and_std(tmp_path, ray_local):
    tree = tmp_path / "UCF101"
    ucf101_tree(tree)
    cfg = write_config(tmp_path / "ucf101.yaml", **{"data.dataset": "ucf101", "data.root": str(tree),
                                                   "data.clips": str(tmp_path / "clips" / "ucf101_s{split}"),
                                                   "teacher.path": teacher_dirs(tmp_path / "teachers", (1, 2)),
                                                   "output_dir": "runs/ucf101"})
    r = run_protocol(["--config", str(cfg), "--splits", "1,2"], ray_local, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = tmp_path / "runs" / "ucf101"
    report = json.loads((out / "protocol.json").read_text())
    check_aggregate(report, "split", [1, 2])
    assert report["splits_total"] == 3 and report["complete"] is False
    assert set(report["aggregate"]) == {"teacher", "dvfl"}
    # each split ingested its own official split ({split} in data.clips) and ran in its own output dir
    for s in (1, 2):
        info = json.loads((tmp_path / "clips" / f"ucf101_s{s}" / "dataset.json").read_text())
        assert info["source"]["split"] == s
        assert report["runs"][s - 1]["output_dir"] == str(out / f"split{s}")
        assert yaml.safe_load((out / f"split{s}" / "config.yaml").read_text())["data"]["split"] == s
    md = (out / "protocol.md").read_text()
    assert "2 of 3 splits ran (1, 2)" in md and " ± " in md
    # rerun with a config split 1 cannot train with: one error line, exit 1, and no earlier results
    # left beside split 1's new config.yaml (they read as its results; session 30)
    r = run_protocol(["--config", str(cfg), "--splits", "1", "--set", "optim.batch_size=100000"], ray_local, tmp_path)
    assert r.returncode == 1 and re.search(r"^\[protocol\] error: split 'train' of .* fewer than", r.stderr, re.M), \
        (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and not (out / "split1" / "results.json").exists()
    assert yaml.safe_load((out / "split1" / "config.yaml").read_text())["optim"]["batch_size"] == 100000


def test_ucf50_leave_one_group_out_folds_aggregate_and_say_how_many_ran(tmp_path, ray_local):
    """A UCF50 tree (archive layout: <root>/UCF50/<Class>/) with groups g01-g03 and a stray g26 file;
    folds 1 and 2 of the 25 run: each tests on its own group, and the output says 2 of 25 ran."""
    root = tmp_path / "UCF50data"
    make_videos(video_specs(root, (1, 2, 3), "UCF50") + video_specs(root, (26,), "UCF50")[:1])
    cfg = write_config(tmp_path / "ucf50.yaml", **{"data.dataset": "ucf50", "data.root": str(root),
                                                  "teacher.path": teacher_dirs(tmp_path / "teachers", (1, 2)),
                                                  "output_dir": str(tmp_path / "logo")})
    r = run_protocol(["--config", str(cfg), "--folds", "1-2"], ray_local, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((tmp_path / "logo" / "protocol.json").read_text())
    check_aggregate(report, "fold", [1, 2])
    assert (report["folds_total"], report["complete"]) == (25, False)
    assert "2 of 25 folds ran (1, 2)" in (tmp_path / "logo" / "protocol.md").read_text()
    for fold in (1, 2):
        clips = Path(report["runs"][fold - 1]["output_dir"]) / "clips"
        info = json.loads((clips / "dataset.json").read_text())
        assert info["source"]["test_group"] == fold and info["counts"]["test"]["videos"] == len(CLASSES)
        rejects = [json.loads(line) for line in (clips / "rejects.jsonl").read_text().splitlines()]
        assert [(x["reason"], "g26" in x["detail"]) for x in rejects] == [("bad_name", True)]
    for role, agg in report["aggregate"].items():  # pooled: every test video of the folds counted once
        runs = [r["models"][role] for r in report["runs"]]
        assert agg["pooled_videos"] == sum(m["videos"] for m in runs) == 2 * len(CLASSES)
        assert agg["pooled_top1"] == pytest.approx(sum(m["top1"] * m["videos"] for m in runs) / agg["pooled_videos"])


def test_folds_run_a_few_at_a_time_count_together(tmp_path, monkeypatch):
    """docs/protocols.md runs UCF50's 25 folds a few at a time: each command rewrote protocol.json
    with its own folds only, and the 25-fold mean needed every fold run again in one command. Folds
    an earlier command finished with the same configuration now count; one of another
    configuration does not, and is said. (The pipeline itself is stubbed: the protocol's
    bookkeeping is the subject; the runs are test_ucf50_leave_one_group_out_...'s.)"""
    from dvfl import pipeline
    from dvfl.protocol import PROTOCOLS, run_protocol, split_configs

    (tmp_path / "UCF50data").mkdir()
    cfg_path = write_config(tmp_path / "ucf50.yaml", **{"data.dataset": "ucf50", "data.root": str(tmp_path / "UCF50data"),
                                                      "teacher.path": None,
                                                      "output_dir": str(tmp_path / "logo")})
    proto, out = PROTOCOLS["ucf50"], str(tmp_path / "logo")

    def fake_run_all(cfg, log):
        top1 = cfg.data.split / 100
        clips = Path(cfg.clips_dir) / "dataset.json"
        if not clips.exists():  # (the fold's ingest, stubbed too)
            clips.parent.mkdir(parents=True, exist_ok=True)
            clips.write_text(json.dumps({"fingerprint": f"fold {cfg.data.split}"}))
        result = {"config": cfg.as_given().to_dict(), "evaluation_method": pipeline.EVALUATION_METHOD,
                  "dataset_fingerprint": pipeline.clips_fingerprint(cfg),
                  "models": {"dvfl": {"top1_mean": top1, "top5_mean": 1.0, "videos": 4, "seeds": [0],
                                      "top1_per_seed": [top1]}}}
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(pipeline, "run_all", fake_run_all)

    def batch(ids, overrides=()):
        others = [i for i in proto.ids if i not in ids]
        lines = []
        report = run_protocol(proto, split_configs(cfg_path, list(overrides), ids), ids, out, log=lines.append,
                              others=dict(zip(others, split_configs(cfg_path, list(overrides), others, check_paths=False))))
        return report, lines

    batch([1, 2])
    report, _ = batch([3])
    assert (report["folds_run"], report["folds_run_before"]) == ([1, 2, 3], [1, 2])
    assert report["aggregate"]["dvfl"]["top1_per_split"] == [0.01, 0.02, 0.03]
    assert "3 of 25 folds ran (1, 2, 3); 2 of them by earlier commands (1, 2)" in (tmp_path / "logo" / "protocol.md").read_text()
    # a fold evaluated by an older version (its views cut otherwise) is not averaged with these
    fold1 = tmp_path / "logo" / "split1" / "results.json"
    older = json.loads(fold1.read_text())
    fold1.write_text(json.dumps({k: v for k, v in older.items() if k != "evaluation_method"}))
    report, lines = batch([3])
    assert report["folds_run"] == [2, 3] and [ln for ln in lines if "not counted" in ln and "older version" in ln], lines
    # a fold finished before a config field existed (data.decode_tasks): at its default, the same
    # configuration (every such fold had to run again to count)
    before_field = json.loads(json.dumps(older))
    del before_field["config"]["data"]["decode_tasks"]
    fold1.write_text(json.dumps(before_field))
    report, lines = batch([3])
    assert report["folds_run"] == [1, 2, 3] and not [ln for ln in lines if "not counted" in ln], lines
    # a fold whose clips were ingested again since (a newer decoder's rules, videos added): not counted
    fold1.write_text(json.dumps(older))
    clips1 = Path(split_configs(cfg_path, [], [1])[0].clips_dir) / "dataset.json"
    clips1.write_text(json.dumps({"fingerprint": "fold 1, ingested again"}))
    report, lines = batch([3])
    assert report["folds_run"] == [2, 3] and [ln for ln in lines if "not counted" in ln and "1" in ln], lines
    clips1.unlink()  # deleted once the fold's results were written (docs/protocols.md): the fold still counts
    report, lines = batch([3])
    assert report["folds_run"] == [1, 2, 3] and not [ln for ln in lines if "not counted" in ln], lines
    clips1.write_text(json.dumps({"fingerprint": "fold 1"}))
    report, lines = batch([4], overrides=[("optim.lr", 0.5)])  # another configuration: the others do not count
    assert report["folds_run"] == [4] and [ln for ln in lines if "not counted" in ln and "1, 2, 3" in ln], lines

    # two commands at once (two machines, one output folder): the one that ends last keeps the
    # other's folds, finished while it ran (it wrote only what it had read when it started)
    def beside(cfg, log):  # fold 6 finishes while fold 5 trains
        if cfg.data.split == 5:
            fake_run_all(split_configs(cfg_path, [], [6])[0], log)
        return fake_run_all(cfg, log)

    monkeypatch.setattr(pipeline, "run_all", beside)
    report, _ = batch([5])
    assert report["folds_run"] == [1, 2, 3, 5, 6], report["folds_run"]
    # each command reads the others' results and writes the files under one lock: a fold that finished between
    # another command's read and its write was left out (its write landed last)
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom dvfl.locks import folder_lock\n"
                               f"with folder_lock({str(tmp_path / 'logo' / 'protocol.json')!r}, 'protocol results'):\n"
                               "    print('held', flush=True)\n    time.sleep(2)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.time()
    batch([7])
    assert time.time() - started > 1.5 and holder.wait() == 0


def test_a_model_some_splits_did_not_train_is_reported_with_how_many_did(tmp_path):
    """A split whose clips hold an unlabelled pool trains DVFL+unlabelled too: the summary took its
    models from the first split, so the row vanished when split 1 had no pool (and a model of split
    1 alone read as a 3-of-3 mean)."""
    from dvfl.protocol import PROTOCOLS, write_results

    def run(split, **top1):
        return {"split": split, "models": {role: {"top1": v, "top5": 1.0, "videos": 10, "seeds": [0], "top1_per_seed": [v]}
                                           for role, v in top1.items()}}

    runs = [run(1, vfl=0.5, dvfl=0.6), run(2, vfl=0.52, dvfl=0.62, **{"dvfl+unlabeled": 0.85}),
            run(3, vfl=0.54, dvfl=0.64, **{"dvfl+unlabeled": 0.87})]
    report = write_results(str(tmp_path), PROTOCOLS["hmdb51"], [1, 2, 3], runs, log=lambda *_: None)
    assert list(report["aggregate"]) == ["vfl", "dvfl", "dvfl+unlabeled"]
    assert report["aggregate"]["dvfl+unlabeled"]["n"] == 2
    assert report["aggregate"]["dvfl+unlabeled"]["top1_per_split"] == [0.85, 0.87]
    assert report["aggregate"]["dvfl+unlabeled"]["splits"] == [2, 3] and report["aggregate"]["vfl"]["splits"] == [1, 2, 3]
    md = (tmp_path / "protocol.md").read_text()
    assert re.search(r"^\| .* \(2 of 3 splits\) \| 86\.0% ± 1\.4 \| .* \| - \| 85\.0% \| 87\.0% \|$", md, re.M), md
    assert re.search(r"^\| VFL-Net \(student, no KD\) \| 52\.0% ± 2\.0 \|", md, re.M), md  # (every split: no count)
    # folds: the pooled line says it too
    write_results(str(tmp_path / "folds"), PROTOCOLS["ucf50"], [1, 2, 3], runs, log=lambda *_: None)
    md = (tmp_path / "folds" / "protocol.md").read_text()
    assert re.search(r"^Pooled top-1 .*unlabelled clips\) \(2 of 3 folds\) 86\.0%\.$", md, re.M), md


# ---------------------------------------------------------------------------------------
# refusals, before any work (no Ray)

def test_a_path_shared_by_every_split_is_refused_naming_the_field(tmp_path):
    from dvfl.config import ConfigError
    from dvfl.protocol import PROTOCOLS, split_configs

    (tmp_path / "UCF101").mkdir()
    cfg = write_config(tmp_path / "c.yaml", **{"data.dataset": "ucf101", "data.root": str(tmp_path / "UCF101"),
                                               "data.clips": "data/ucf101_s1"})
    with pytest.raises(ConfigError, match=r"data\.clips is data/ucf101_s1 for every split.*data/ucf101_s\{split\}"):
        split_configs(cfg, [], [1, 2])
    with pytest.raises(ConfigError, match=r"teacher\.path is models/t for every split"):
        split_configs(cfg, [("data.clips", None), ("teacher.path", "models/t")], [1])
    # {split} placeholders are filled per split; output_dir without one gets split<N>
    configs = split_configs(cfg, [("data.clips", "data/u_s{split}"), ("output_dir", str(tmp_path / "runs"))], [1, 3])
    assert [(c.data.split, c.output_dir) for c in configs] == [(1, str(tmp_path / "runs" / "split1")),
                                                                (3, str(tmp_path / "runs" / "split3"))]
    assert configs[0].data.clips.endswith("/data/u_s1") and configs[1].data.clips.endswith("/data/u_s3")
    assert PROTOCOLS["ucf101"].ids == (1, 2, 3)
    # start weights: one UCF101-trained checkpoint (a head of 101 classes) for every split saw the
    # other splits' test videos, whatever reinit_head says; per-split weights, or another dataset's
    # (Kinetics-400: 400 classes) with a new head, are fine
    import torch

    for name, classes in (("s1", 101), ("s2", 101), ("k400", 400)):
        torch.save({"head.weight": torch.zeros(classes, 4), "head.bias": torch.zeros(classes)}, tmp_path / f"{name}.pth")
    per_split = [("data.clips", None), ("output_dir", str(tmp_path / "runs"))]
    for field in ("student.checkpoint", "teacher.train.checkpoint"):
        head = field.replace(".checkpoint", ".reinit_head")
        for reinit in (False, True):
            with pytest.raises(ConfigError, match=rf"^{re.escape(field)} is .*/s1\.pth for every split, and its "
                                                  r"classifier has 101 classes, ucf101's own"):
                split_configs(cfg, [*per_split, (field, str(tmp_path / "s1.pth")), (head, reinit)], [1, 2])
        configs = split_configs(cfg, [*per_split, (field, str(tmp_path / "s{split}.pth"))], [1, 2])
        assert [c.student.checkpoint if field.startswith("student") else c.teacher.train.checkpoint
                for c in configs] == [str(tmp_path / "s1.pth"), str(tmp_path / "s2.pth")]
        split_configs(cfg, [*per_split, (field, str(tmp_path / "k400.pth")), (head, True)], [1, 2])
    # UCF50's videos are UCF101's (its 50 classes, their groups): weights trained on one saw the other's test videos
    torch.save({"head.weight": torch.zeros(50, 4), "head.bias": torch.zeros(50)}, tmp_path / "ucf50.pth")
    with pytest.raises(ConfigError, match=r"^teacher\.train\.checkpoint is .*/ucf50\.pth, and its classifier has 50 "
                                          r"classes, ucf50's: ucf50 and ucf101 share videos"):
        split_configs(cfg, [*per_split, ("teacher.train.checkpoint", str(tmp_path / "ucf50.pth")),
                            ("teacher.train.reinit_head", True)], [1, 2])

def protocol_main():
    """`dvfl protocol` (pipelines/protocol.py), in this process (the refusals need no Ray and no subprocess)."""
    from dvfl.cli import main

    return lambda argv: main(["protocol", *argv])


def test_protocol_flags_are_checked_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = protocol_main()
    root = tmp_path / "UCF101"
    root.mkdir()
    cfg = write_config(tmp_path / "c.yaml", **{"data.dataset": "ucf101", "data.root": str(root)})
    other = write_config(tmp_path / "k.yaml", **{"data.dataset": "kinetics", "data.root": str(root)})
    for args, message in ((["--splits", "1,4"], "--splits '1,4': UCF101 official splits 1-3 has splits 1..3, got [4]"),
                          (["--folds", "1"], "--folds does not apply to UCF101 official splits 1-3: use --splits"),
                          (["--splits", "x"], "--splits 'x': expected numbers like 1,2,3 or 1-5 or all"),
                          (["--config", str(other)], "data.dataset is 'kinetics', which has one fixed split"),
                          # (session 28: AttributeError and TypeError tracebacks)
                          (["--set", "data=5"], "data must be a mapping, got 5"),
                          (["--set", "data.dataset=[x]"], "data.dataset is ['x'], which has one fixed split")):
        assert main(["--config", str(cfg), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_a_protocol_beside_a_run_in_one_of_its_split_folders_is_refused_before_any_work(tmp_path, capsys,
                                                                                       monkeypatch):
    """A resubmitted protocol job (or a distill into one split's folder) beside a running one: every
    split's run folder is locked before the first split starts, so the refusal comes first."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "UCF101"
    root.mkdir()
    cfg = write_config(tmp_path / "c.yaml", **{"data.dataset": "ucf101", "data.root": str(root),
                                               "data.clips": str(tmp_path / "clips" / "s{split}"),
                                               "teacher.path": teacher_dirs(tmp_path / "teachers", (1, 2)),
                                               "output_dir": "runs/ucf101"})
    split2 = tmp_path / "runs" / "ucf101" / "split2"
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom dvfl.locks import folder_lock\n"
                               f"with folder_lock({str(split2)!r}, 'run'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as stop:
            protocol_main()(["--config", str(cfg), "--splits", "1,2"])
    finally:
        holder.kill()
        holder.wait()
    assert stop.value.code == 1
    assert f"[protocol] error: {split2} is in use by another run (pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "ucf101" / "split1").exists() and not (tmp_path / "clips").exists()


def test_clips_of_another_split_are_refused():
    from dvfl.config import load_config
    from dvfl.pipeline import check_clips_match

    cfg = load_config(None, [("data.dataset", "ucf101"), ("data.root", "/nowhere"), ("data.split", 2)],
                      check_paths=False)
    info = {"dataset": "ucf101", "source": {"split": 1},
            "params": {"frames": cfg.data.frames, "short_side": cfg.data.short_side, "eval_clips": 1},
            "counts": {"train": {"videos": 1, "clips": 1}, "test": {"videos": 1, "clips": 1}}}
    with pytest.raises(ValueError, match="data.split is 2, the clips were ingested from split 1"):
        check_clips_match(cfg, info)
    check_clips_match(cfg, {**info, "source": {"split": 2}})
    ucf50 = load_config(None, [("data.dataset", "ucf50"), ("data.root", "/nowhere"), ("data.split", 7)],
                        check_paths=False)
    with pytest.raises(ValueError, match="data.split is 7, the clips were ingested from split 3"):
        check_clips_match(ucf50, {**info, "dataset": "ucf50", "source": {"test_group": 3}})


def test_clips_of_a_folder_without_a_test_split_say_how_to_ingest_one():
    """A folder dataset ingested without --test-fraction holds only 'train': the advice "set these fields
    to the ingest's values" cannot be taken (data.test_split may not be the training split)."""
    from dvfl.config import load_config
    from dvfl.pipeline import check_clips_match

    cfg = load_config(None, [("data.dataset", "folder"), ("data.root", "/nowhere")], check_paths=False)
    info = {"dataset": "folder", "source": {"split_dirs": [], "test_fraction": 0.0},
            "params": {"frames": cfg.data.frames, "short_side": cfg.data.short_side, "eval_clips": 1},
            "counts": {"train": {"videos": 2, "clips": 2}}}
    with pytest.raises(ValueError, match=r"data.test_split is 'test', the clips hold split\(s\) 'train'\. Set these "
                                         r"fields to the ingest's values, or ingest again with the config's \(clips "
                                         r"without a 'test' split: ingest them again with a test split, pipelines/"
                                         r"ingest.py --dataset folder --test-fraction F \(or root/\{train,val,test\}/"
                                         r"<class>/ folders\), with --out \S+ --fresh\)\.$"):
        check_clips_match(cfg, info)
    with pytest.raises(ValueError, match=r"the config's\.$"):  # a misspelt test split: its fields are the fix
        check_clips_match(cfg, {**info, "counts": {**info["counts"], "tset": {"videos": 1, "clips": 1}}})


def test_fewer_evaluation_clips_than_stored_are_spread_over_the_video():
    """eval.clips below data.eval_clips took the first stored clips: 1 of 4 was the clip centred at
    1/8 of every segment, 2 of 4 both lay in the first half. Now the stored clip under each wanted
    centre: (k + 0.5) / stored nearest (j + 0.5) / wanted."""
    from dvfl.data.sampling import uniform_clip_indices
    from dvfl.data.sampling import spread_clips

    assert spread_clips(1, 4) == {2} and spread_clips(2, 4) == {1, 3} and spread_clips(1, 3) == {1}
    assert spread_clips(3, 3) == {0, 1, 2} and spread_clips(4, 2) == {0, 1, 2, 3} and spread_clips(2, 6) == {1, 4}
    # 1 of 3 stored clips is exactly the 1-clip evaluation's clip
    (k,) = spread_clips(1, 3)
    assert uniform_clip_indices(64, 8, k, 3).tolist() == uniform_clip_indices(64, 8, 0, 1).tolist()
