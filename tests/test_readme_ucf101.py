"""The README's UCF101 chain, run as a user types it (issue 17): ingest, teacher, cache, distill, evaluate.

The commands are read from README.md ("## The pipeline"), so the two cannot drift. They run in a
copy of the checkout on a small UCF101-format tree of real encoded videos (several codecs,
containers, sizes and frame rates, plus a broken and a missing file). Changes to what the user
types: the dataset root points at that tree, the ingest's short side is shrunk (ingest has no
``--set``; the test first checks that the README's ingest flags are the config's), and ``--set``
overrides shrink the config-driven stages (a ``videofocalnet_base`` teacher at reduced width and
depth, 32x32 crops, 1 epoch, 1 worker, CPU). The official Kinetics-400 checkpoint is stood in for
by a file of the same format and architecture at that reduced size (400 classes: --reinit-head
is exercised). The one non-size override: the 1-epoch teacher's sanity gate is off.
"""
from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
import yaml

from conftest import make_videos
from dvfl.data.shards import read_clips_table
from test_readme_commands import checkout, readme_block, run, sets  # noqa: F401  (checkout is a fixture)

ROOT_IN_README = "/data/UCF101"
CLASSES = ["ApplyEyeMakeup", "Basketball", "Biking"]
# (codec, container), (height, width), fps: cycled over the videos
FORMATS = [("mpeg4", "avi"), ("mjpeg", "avi"), ("libx264", "mp4"), ("libx264", "mkv"), ("libvpx-vp9", "webm")]
SIZES = [(48, 64), (60, 80), (64, 48), (40, 72)]
FPS = [25, 30, 12.5, 8]
SHORT_SIDE, CROP = 36, 32
SHRINK = [("data.short_side", SHORT_SIDE), ("data.crop_size", CROP), ("scaling.use_gpu", False),
          ("scaling.num_workers", 1), ("scaling.cpus_per_worker", 1), ("scaling.concurrent_runs", 1),
          ("teacher.train.embed_dim", 16),
          ("teacher.train.depths", "[1,1,1,1]"), ("teacher.train.drop_path_rate", 0.0), ("teacher.optim.epochs", 1),
          ("teacher.optim.batch_size", 4), ("student.embed_dim", 8), ("student.depths", "[1,1,1,1]"),
          ("optim.epochs", 1), ("optim.batch_size", 4), ("teacher.min_top1_over_chance", -1)]


def ucf_tree(root) -> None:
    """3 classes; train groups g08 + g09 (one is held out for validation), test group g01; a broken and
    a missing file. 9 videos cover every codec/container, size and frame rate above."""
    specs, train, test, i = [], [], [], 0
    for c, name in enumerate(CLASSES):
        for group, clip, split in (("08", 1, train), ("09", 1, train), ("01", 1, test)):
            codec, ext = FORMATS[i % len(FORMATS)]
            h, w = SIZES[i % len(SIZES)]
            rel = f"{name}/v_{name}_g{group}_c{clip:02d}.{ext}"
            specs.append((str(root / "UCF-101" / rel), {"n": 20, "h": h, "w": w, "fps": FPS[i % len(FPS)],
                                                       "codec": codec, "seed": i}))
            split.append(f"{rel} {c + 1}" if split is train else rel)
            i += 1
    make_videos(specs)
    broken = root / "UCF-101" / "Biking" / "v_Biking_g10_c01.avi"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(500))  # a header, then nothing decodable
    train += ["Biking/v_Biking_g10_c01.avi 3", "Biking/v_Biking_g11_c01.avi 3"]  # broken, missing
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(CLASSES)))
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")


def fake_official_checkpoint(path) -> None:
    """The official checkpoint's format ({"model": state_dict}, Kinetics-400 head) at the test's size."""
    from dvfl.models import build_model

    model = build_model("videofocalnet_base", num_classes=400, num_frames=8, img_size=CROP, embed_dim=16,
                        depths=[1, 1, 1, 1], drop_path_rate=0.0)
    torch.save({"model": model.state_dict()}, path)


@pytest.mark.slow
def test_readme_ucf101_chain_as_typed(checkout, ray_local, tmp_path, monkeypatch, capsys):  # noqa: F811
    commands = readme_block("## The pipeline")
    stages = ["python pipelines/ingest.py", "python pipelines/train_teacher.py", "python pipelines/cache_teacher.py",
              "python pipelines/distill.py", "python pipelines/evaluate.py"]
    assert [next(i for i, c in enumerate(commands) if c.startswith(s)) for s in stages] == list(range(5)), commands
    config = yaml.safe_load((checkout / "configs" / "ucf101_base.yaml").read_text())
    ingest = shlex.split(commands[0])
    flag = {ingest[i]: ingest[i + 1] for i in range(len(ingest) - 1) if ingest[i].startswith("--")}
    # the README's ingest makes exactly the clips the config describes
    assert (flag["--short-side"], flag["--clips-per-video"], flag["--eval-clips"], flag["--out"], flag["--root"]) == (
        str(config["data"]["short_side"]), str(config["data"]["clips_per_video"]), str(config["data"]["eval_clips"]),
        config["data"]["clips"], ROOT_IN_README)
    assert "--config configs/ucf101_base.yaml" in commands[1] and "--out" not in commands[1]
    tree = tmp_path / "UCF101"
    tree.mkdir()
    ucf_tree(tree)
    fake_official_checkpoint(checkout / "video-focalnet_base_k400.pth")
    env = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    overrides = sets([("data.root", str(tree)), *SHRINK])
    outputs = []
    for i, line in enumerate(commands[:5]):
        args = shlex.split(line.replace(ROOT_IN_README, str(tree)))
        if i == 0:
            args[args.index("--short-side") + 1] = str(SHORT_SIDE)
        else:
            args += overrides
        r = run(args, checkout, env, timeout=600)
        outputs.append(r)
        assert r.returncode == 0, (line, r.stdout[-3000:], r.stderr[-3000:])
        if i == 2:  # the cache cache_teacher.py built, as it was before distill ran
            built = {p.name: p.stat().st_mtime_ns for p in (checkout / "data" / "ucf101_s1_cache").rglob("*")
                     if p.is_file()}
    # ingest: the broken and the missing file are quarantined, the rest written
    summary = json.loads((checkout / "data" / "ucf101_s1" / "dataset.json").read_text())
    assert summary["counts"]["train"]["videos"] == 6 and summary["counts"]["test"]["videos"] == 3
    written = read_clips_table(str(checkout / "data" / "ucf101_s1"), columns=["path"]).column("path").to_pylist()
    assert {p.rsplit(".", 1)[1] for p in written} == {ext for _, ext in FORMATS}  # every container was decoded
    # the teacher went where the config says, initialised from the checkpoint with a new head
    teacher = checkout / "models" / "ucf101_videofocalnet_base"
    spec = json.loads((teacher / "model.json").read_text())
    assert spec["name"] == "videofocalnet_base" and spec["kwargs"]["num_classes"] == 3
    # (the 400-class head skipped: its two tensors; every other tensor of the file loaded)
    assert re.search(r"\[init\] \S*video-focalnet_base_k400\.pth: loaded [1-9]\d* tensors, skipped 2 checkpoint keys",
                     outputs[1].stdout), outputs[1].stdout[-2000:]
    assert "held out of split 'train'" in spec["val_split"]
    # distill read the cache cache_teacher.py built from the config (no second cache, no rebuild)
    cache = checkout / "data" / "ucf101_s1_cache"
    assert "cache.json" in built and {p.name: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == built
    assert not (checkout / "runs" / "ucf101_base" / "teacher_cache").exists()
    report = json.loads((checkout / "runs" / "ucf101_base" / "results.json").read_text())
    assert set(report["models"]) == {"teacher", "vfl", "dvfl"} and report["splits"]["top1"] == "test"
    assert report["eval"] == "4 clips x 3 crops, split test"
    # evaluate.py: the same numbers as the pipeline's final evaluation of the same model on the same shards
    ev = json.loads((checkout / "runs" / "ucf101_base" / "teacher_eval.json").read_text())
    row = report["models"]["teacher"]
    assert (ev["top1"], ev["top5"]) == (row["top1_per_seed"][0], pytest.approx(row["top5_mean"], abs=1e-12))
    assert ev["split"] == "test" and ev["views"] == "4x3" and ev["videos"] == 3
    assert set(ev["per_class"]) == set(CLASSES) and sum(v["videos"] for v in ev["per_class"].values()) == 3
    assert (checkout / "runs" / "ucf101_base" / "teacher_eval.confusion.png").stat().st_size > 5_000
    # ... and it refuses a protocol the shards cannot serve (4 clips stored per test video); run in this
    # process (it refuses before any evaluation: a subprocess would only add its start-up)
    monkeypatch.chdir(checkout)
    from dvfl.cli import script_main

    assert script_main("evaluate", [*shlex.split(commands[4])[2:], *overrides, "--views", "8x3"]) == 2
    assert "stores 4 evaluation clip(s) per video" in capsys.readouterr().err
    # without --config: the crop the model was trained on and the views its run evaluated with (its
    # model.json: predict's and Serve's default too), not the stored short side and 1x1
    assert spec["inputs"]["eval_views"] == "4x3"
    bare = tmp_path / "bare_eval.json"
    assert script_main("evaluate", ["--model", str(teacher), "--clips", "data/ucf101_s1", "--json", str(bare)]) == 0
    bare_ev = json.loads(bare.read_text())
    assert bare_ev["crop_size"] == CROP != SHORT_SIDE and bare_ev["top1"] == ev["top1"] and bare_ev["views"] == "4x3"
    # results that cannot be written (a file where the folder should be): the numbers are still shown
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    capsys.readouterr()
    assert script_main("evaluate", ["--model", str(teacher), "--clips", "data/ucf101_s1", "--json",
                                    str(blocked / "eval.json")]) == 1
    shown = capsys.readouterr()
    assert "[evaluate]" in shown.out and "top-1" in shown.out and "error: writing the results failed" in shown.err
