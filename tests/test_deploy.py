"""Using a trained model (issue 19): predict on video files, the stream mode, export, serving.

They reuse the session's ``prepared`` teacher (a tiny model trained by the pipeline on the
generated dataset) and its clips: the test videos of that dataset are real files on disk.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_in_process, linux_only

REPO = Path(__file__).resolve().parents[1]


def run_script(script, *args, timeout=300):
    """The script as a process of its own (the tests of what a user's terminal runs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "pipelines" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


run_cli = cli_in_process  # the same command in this process: the other tests' subject is what it does


def videos_of(prepared) -> dict:
    """video_id -> absolute path of every test video of the prepared dataset."""
    from dvfl.data.shards import read_clips_table

    info, clips = prepared["info"], prepared["cfg"].clips_dir
    table = read_clips_table(clips, ["test"], columns=["video_id", "path"])
    return {v: os.path.join(info["root"], p) for v, p in zip(table.column("video_id").to_pylist(),
                                                             table.column("path").to_pylist())}


def test_predict_top1_equals_evaluation_for_every_test_video(prepared, tmp_path):
    """predict.py's top-1 (same decode child, same uniform clip, same 3 crops) is the class the
    multi-view evaluation predicted for each test video; a bad file among them gets its own error,
    the rest are still predicted and the exit status says something failed."""
    from dvfl.artifacts import load_model
    from dvfl.train.evaluate import evaluate_multiview

    model, _ = load_model(prepared["teacher"])
    ev = evaluate_multiview(model, prepared["cfg"].clips_dir, "test", 32, num_clips=1, num_crops=3, per_video=True)
    videos = videos_of(prepared)
    assert set(ev["predictions"]) == set(videos) and len(videos) == 16
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n")
    out = tmp_path / "pred.json"
    raw = tmp_path / "raw"  # a folder without a video file (by extension) was skipped without a word
    raw.mkdir()
    (raw / "clip.h264").write_bytes(b"\0" * 64)
    (raw / "._clip.mp4").write_bytes(b"\0\5\26\7" + b"\0" * 60)  # a Mac's AppleDouble file: not an input that failed
    (raw / ".AppleDouble").mkdir()
    (raw / ".AppleDouble" / "clip.mp4").write_bytes(b"\0" * 64)
    r = run_script("predict.py", "--model", prepared["teacher"], *sorted(videos.values()), bad, raw, "--views", "1x3",
                   "--topk", "2", "--json", out)
    assert r.returncode == 1, r.stderr
    assert f"{bad}: error: not_video" in r.stderr and "2 of 18 inputs failed" in r.stderr
    assert f"{raw}: error: no video files in this folder" in r.stderr
    rows = {row["path"]: row for row in json.loads(out.read_text())}
    classes = prepared["info"]["classes"]
    for vid, path in videos.items():
        top = rows[path]["topk"]
        assert len(top) == 2 and top[0][1] >= top[1][1]
        assert top[0][0] == classes[ev["predictions"][vid]], vid
    assert rows[str(bad)]["error"].startswith("not_video") and rows[str(raw)]["error"] == "no video files in this folder"


def test_predict_defaults_to_the_views_the_run_evaluated_with(prepared, tmp_path):
    """model.json records the run's eval views and predict takes them unless --views is given: with
    1x1 for every model, a run evaluated 4x3 (configs/ucf101_base.yaml) was scored on 12 views and
    predicted from one, and a test video could get another class than the one evaluation counted."""
    cfg = prepared["cfg"]
    spec = json.loads((Path(prepared["teacher"]) / "model.json").read_text())
    assert spec["inputs"]["eval_views"] == f"{cfg.eval.clips}x{cfg.eval.crops}"
    model = tmp_path / "model"
    shutil.copytree(prepared["teacher"], model)
    spec["inputs"]["eval_views"] = "2x1"  # as if the run had evaluated two clips per video
    (model / "model.json").write_text(json.dumps(spec))
    videos = sorted(videos_of(prepared).values())[:4]
    probs = {}
    for views in (None, "2x1", "1x1"):
        out = tmp_path / f"{views}.json"
        r = run_cli("predict.py", "--model", model, *videos, "--topk", 3, "--json", out,
                    *(["--views", views] if views else []))
        assert r.returncode == 0, r.stderr
        assert ("[predict] views 2x1, as the run evaluated" in r.stderr) == (views is None), r.stderr
        probs[views] = json.loads(out.read_text())
    assert probs[None] == probs["2x1"] != probs["1x1"]


def test_predict_names_a_file_whose_name_is_not_utf8(prepared, tmp_path):
    """A Latin-1 file name (caf\\xe9.mp4): its line made print() raise under a UTF-8 locale, and the
    files after it were never predicted."""
    src = sorted(videos_of(prepared).values())[0]
    latin1 = os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.mp4")
    shutil.copyfile(src, latin1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}
    r = subprocess.run([sys.executable, str(REPO / "pipelines" / "predict.py"), "--model", prepared["teacher"],
                        str(tmp_path), src], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{tmp_path}/caf\\xe9.mp4: ") and lines[1].startswith(f"{src}: ")


def test_predict_whose_json_cannot_be_written_says_so_in_one_line_after_its_predictions(prepared, tmp_path):
    """--json to a path that cannot be written ended in a traceback after every prediction had printed."""
    src = sorted(videos_of(prepared).values())[0]
    (tmp_path / "a_file").write_text("")
    r = run_cli("predict.py", "--model", prepared["teacher"], src, "--json", tmp_path / "a_file" / "out.json")
    assert r.returncode == 1 and r.stdout.startswith(f"{src}: "), r.stdout + r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: writing {tmp_path / 'a_file' / 'out.json'} failed: ")
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    r = run_cli("predict.py", "--model", prepared["teacher"], src, "--stream", "--no-realtime",
                "--json", tmp_path / "a_file" / "out.json")  # the same after a stream (that may play for minutes)
    assert r.returncode == 1 and "[stream] " in r.stdout, r.stdout + r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: writing {tmp_path / 'a_file' / 'out.json'} failed: ")
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    (tmp_path / "empty").mkdir()  # and after no video was found at all
    r = cli_in_process("predict.py", "--model", prepared["teacher"], tmp_path / "empty",
                       "--json", tmp_path / "a_file" / "out.json")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: writing {tmp_path / 'a_file' / 'out.json'} failed: "), r.stderr[-3000:]


def test_a_model_without_class_names_takes_them_only_from_the_clips_it_was_trained_on(tmp_path):
    """An older model folder records no class names: --clips of another ingest (the same class count,
    maybe another order) named every prediction after that ingest's classes."""
    from dvfl.inference import input_spec

    spec = json.loads((REPO / "models" / "embedded_teacher" / "model.json").read_text())
    classes = spec.pop("classes")
    clips = tmp_path / "clips"
    clips.mkdir()
    params = {"frames": 8, "short_side": 32, "eval_clips": 1}
    info = {"classes": classes, "params": params, "fingerprint": spec["dataset_fingerprint"]}
    (clips / "dataset.json").write_text(json.dumps(info))
    assert input_spec(spec, str(clips))[0] == classes
    (clips / "dataset.json").write_text(json.dumps({**info, "classes": classes[::-1], "fingerprint": "f" * 64}))
    with pytest.raises(ValueError, match=r"records no class names and was trained on other clips .* than --clips"):
        input_spec(spec, str(clips))


def test_predict_notes_a_video_far_longer_than_the_training_videos(prepared, video_factory, tmp_path):
    """A clip's 8 frames spread over the whole file: a 40-minute recording got a frame every 5 minutes
    and a confident top-k, with nothing said (the training videos are 2 s: 16 frames at 8 fps)."""
    long = video_factory(str(tmp_path / "long.mp4"), n=40, h=32, w=32, fps=4)  # 10 s: 5x
    usual = video_factory(str(tmp_path / "usual.mp4"), n=16, h=32, w=32, fps=8)  # 2 s
    out = tmp_path / "p.json"
    r = run_cli("predict.py", "--model", prepared["teacher"], long, usual, "--json", out)
    assert r.returncode == 0, r.stderr
    assert f"{long}: note: 10 s long, 5x the training videos' median 2.0 s" in r.stderr, r.stderr
    assert "usual.mp4: note" not in r.stderr and len(r.stdout.strip().splitlines()) == 2
    notes = [x.get("note") for x in json.loads(out.read_text())]
    assert notes[0].startswith("10 s long") and notes[1] is None


def test_stream_window_count_for_a_known_video(prepared, video_factory, tmp_path):
    """40 frames, windows of 8 every 4 frames: windows end at frames 8, 12, ..., 40 -> 9 windows,
    each printed with its latency; frames arrive at the file's 40 fps (about 1 s of stream)."""
    video = video_factory(str(tmp_path / "stream.mp4"), n=40, h=32, w=32, fps=40)
    out = tmp_path / "stream.json"
    # the trained model records its training videos' median length: the generated ones, 16 frames at 8 fps
    spec = json.loads((Path(prepared["teacher"]) / "model.json").read_text())
    assert spec["inputs"]["video_seconds"] == pytest.approx(16 / 8)
    r = run_cli("predict.py", "--model", prepared["teacher"], video, "--stream", "--window", 8, "--stride", 4,
                "--json", out)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[stream] frames")]
    assert len(lines) == 9 and all("latency" in ln for ln in lines)
    got = json.loads(out.read_text())
    assert [w["end_frame"] for w in got["windows"]] == list(range(8, 41, 4))
    assert got["fps"] == pytest.approx(40) and got["real_time_factor"] > 0
    # decoding counts: each window is charged its 4 new frames' decode, its latency the last one's (the
    # factor was the model's alone, while a live source decodes every frame)
    assert got["decode_ms_per_frame"] > 0
    w = got["windows"][0]
    assert w["compute_s"] >= 4 * got["decode_ms_per_frame"] / 1000 and w["latency_s"] >= got["decode_ms_per_frame"] / 1000
    mean = sum(x["compute_s"] for x in got["windows"]) / len(got["windows"])
    assert got["real_time_factor"] == pytest.approx((1 / mean) / (40 / 4), rel=0.01)
    # a window longer than the video: no window to recognise is an error, not "0 windows" and exit 0
    out.unlink()
    r = run_cli("predict.py", "--model", prepared["teacher"], video, "--stream", "--window", 48, "--json", out)
    assert r.returncode == 1 and "too_short: 40 frames, fewer than one --window of 48" in r.stderr, r.stderr
    assert not out.exists()
    # every frame is held in memory: a longer file than --max-frames is refused, not decoded (session 29)
    r = run_cli("predict.py", "--model", prepared["teacher"], video, "--stream", "--window", 8, "--max-frames", 39,
                "--json", out)
    assert r.returncode == 1 and "too_long: 40 frames, more than --max-frames 39" in r.stderr, r.stderr
    assert not out.exists()


GOLDEN = str(REPO.parent / "shared" / "reference" / "video_focalnet_golden_tiny.pt")  # (../shared beside the clone)


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    """The reference golden model saved as a model directory."""
    import timm
    import torch

    from dvfl.artifacts import save_model

    g = torch.load(GOLDEN, weights_only=True)
    model = timm.create_model("videofocalnet_tiny", **g["config"])
    model.load_state_dict(g["state_dict"])
    out = tmp_path_factory.mktemp("golden") / "model"
    save_model(out, model, "videofocalnet_tiny", dict(g["config"]))
    return out, g


def test_onnx_and_torchscript_match_pytorch_on_golden_and_real_clips(prepared, golden_dir, tmp_path):
    """ONNX (dynamic batch) reproduces the official golden logits and the PyTorch teacher on real
    test clips within 1e-4; TorchScript and torch.export do the same after a reload."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from dvfl.commands.export import real_clips

    from dvfl.artifacts import load_model

    from dvfl import export as ex

    gdir, g = golden_dir
    golden, _ = load_model(gdir)
    inputs = ex.golden_inputs(GOLDEN, json.loads((gdir / "model.json").read_text()))
    assert ex.export_onnx(golden, tmp_path / "g.onnx", inputs)["max_abs_diff"] <= 1e-4
    assert ex.export_torchscript(golden, tmp_path / "g.ts", inputs)["max_abs_diff"] <= 1e-4
    assert ex.export_program(golden, tmp_path / "g.pt2", inputs)["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 2):  # the batch dimension is dynamic
        out = sess.run(None, {"video": g["input"][:b].numpy()})[0]
        assert np.abs(out - g["logits"][:b].numpy()).max() <= 1e-4
    ts = torch.jit.load(str(tmp_path / "g.ts"))
    assert (ts(g["input"][:1]) - g["logits"][:1]).abs().max() <= 1e-4
    ep = torch.export.load(str(tmp_path / "g.pt2")).module()
    assert (ep(g["input"]) - g["logits"]).abs().max() <= 1e-4
    # world-readable, as a model a serving account loads must be (not mkstemp's owner-only 0600)
    assert {oct((tmp_path / f).stat().st_mode & 0o777) for f in ("g.onnx", "g.ts", "g.pt2")} == {"0o644"}

    r = run_script("export.py", "--model", prepared["teacher"], "--format", "onnx", "--out", tmp_path / "t.onnx",
                   "--clips", prepared["cfg"].clips_dir)
    assert r.returncode == 0, r.stderr
    model, spec = load_model(prepared["teacher"])
    clips = torch.cat(real_clips(prepared["cfg"].clips_dir, spec, 4))
    sess = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = model.eval()(clips).numpy()
    assert clips.shape[0] == 4 and np.abs(sess.run(None, {"video": clips.numpy()})[0] - ref).max() <= 1e-4
    # the file carries no class names, sizes or preprocessing: a sidecar beside it does (said in the JSON line)
    contract = json.loads((tmp_path / "t.onnx.json").read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1])["contract"] == str(tmp_path / "t.onnx.json")
    assert contract["classes"] == spec["classes"] and len(contract["classes"]) == ref.shape[1]
    assert contract["input"]["shape"] == ["batch", *clips.shape[1:]] and contract["input"]["channels"] == "RGB"
    assert contract["preprocessing"]["crop_size"] == spec["inputs"]["crop_size"] == clips.shape[-1]
    assert contract["preprocessing"]["views"].startswith(f"{spec['inputs']['eval_views']}: 1 uniform clip(s) x ")

    r = run_script("export.py", "--model", prepared["teacher"], "--format", "torchscript", "--out", tmp_path / "t.ts",
                   "--clips", prepared["cfg"].clips_dir)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr  # torch.jit.save/load's deprecation, on every export
    ts = torch.jit.load(str(tmp_path / "t.ts"))
    with torch.inference_mode():
        assert (ts(clips) - torch.from_numpy(ref)).abs().max() <= 1e-4


def test_torch_export_from_single_clips_keeps_a_dynamic_batch(prepared, golden_dir, tmp_path):
    """`dvfl export --format export --clips DIR` (README's command): the real clips are batches of
    one, which torch.export would specialise the batch to; the program still takes any batch."""
    import torch

    from dvfl import export as ex
    from dvfl.artifacts import load_model
    from dvfl.commands.export import real_clips

    gdir, g = golden_dir
    golden, _ = load_model(gdir)
    one = [g["input"][:1]]  # a batch-1 first input, in process: the same for all three traced formats
    for fn, name in ((ex.export_program, "g.pt2"), (ex.export_onnx, "g.onnx"), (ex.export_torchscript, "g.ts")):
        assert fn(golden, tmp_path / name, one)["max_abs_diff"] <= 1e-4, name
    ep = torch.export.load(str(tmp_path / "g.pt2")).module()
    assert (ep(g["input"]) - g["logits"]).abs().max() <= 1e-4
    # frames of another size: refused by every format (a trace computed on them without a word)
    other = torch.nn.functional.pad(g["input"], (0, 8, 0, 8))
    shape, got = ", ".join(map(str, g["input"].shape[1:])), ", ".join(map(str, other.shape))
    with pytest.raises(torch.jit.Error, match=rf"input must be \(batch, {shape}\), the shape this model was exported for; "
                                           rf"got \[{got}\]"):
        torch.jit.load(str(tmp_path / "g.ts"))(other)
    with pytest.raises(Exception):
        ep(other)
    import onnxruntime as ort
    with pytest.raises(Exception, match="dimension"):
        ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"video": other.numpy()})

    out = tmp_path / "t.pt2"
    r = run_cli("export.py", "--model", prepared["teacher"], "--format", "export", "--out", out,
                "--clips", prepared["cfg"].clips_dir)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "Unable to load package" not in r.stderr and "Expect archive" not in r.stderr, r.stderr  # (a .tmp name)
    model, spec = load_model(prepared["teacher"])
    clips = real_clips(prepared["cfg"].clips_dir, spec, 3)
    assert [c.shape[0] for c in clips] == [1, 1, 1]
    ep = torch.export.load(str(out)).module()
    with torch.inference_mode():
        for x in (torch.cat(clips), clips[0]):  # a batch of 3 (never checked by the export) and of 1
            assert (ep(x) - model.eval()(x)).abs().max() <= 1e-4


@contextlib.contextmanager
def no_network(monkeypatch):
    """Every socket connection or name lookup fails while inside; the attempts are recorded."""
    import socket

    attempts = []

    def refuse(*args, **_kw):
        attempts.append(args[1:] or args)
        raise OSError("no network in this test")

    with monkeypatch.context() as m:
        m.setattr(socket.socket, "connect", refuse)
        m.setattr(socket, "create_connection", refuse)
        m.setattr(socket, "getaddrinfo", refuse)
        yield attempts


def test_model_folder_loads_with_timm_offline_and_a_mismatched_spec_is_refused(prepared, golden_dir, tmp_path,
                                                                                monkeypatch):
    """The folder round-trips through timm.create_model("local-dir:...") with identical logits and
    carries a model card; a spec that does not match the weights is refused, naming the tensors."""
    import timm
    import torch

    import dvfl.models  # noqa: F401
    from dvfl.artifacts import load_model
    from dvfl.models.checkpoint import CheckpointError

    folder = tmp_path / "student"
    r = run_cli("export.py", "--model", prepared["teacher"], "--format", "folder", "--out", folder,
                "--clips", prepared["cfg"].clips_dir, "--check-clips", 3)
    assert r.returncode == 0, r.stderr
    # the reloaded folder is compared on the same inputs as the other formats: 3 real clips + 2 examples
    assert "on 5 input batch(es)" in r.stdout and "not trained on" not in r.stdout, r.stdout
    assert {"model.safetensors", "config.json", "model.json", "README.md"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    for needle in ("## Training", "## Metrics", "short side 32", "synthetic", "validation top-1", "views: 1x1: 1 uniform clip"):
        assert needle in card, needle
    with no_network(monkeypatch) as attempts:
        import urllib.request

        with pytest.raises(OSError, match="network"):  # the guard is live
            urllib.request.urlopen("https://huggingface.co", timeout=5)
        assert len(attempts) == 1
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert len(attempts) == 1, f"the local folder load tried the network: {attempts[1:]}"
    model, _ = load_model(prepared["teacher"])
    x = torch.randn(2, 8, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model.eval()(x))
    pretrained = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert pretrained["label_names"] == prepared["info"]["classes"]
    # timm's own transforms then resize and crop as training did (not 224/0.875 bicubic)
    assert (pretrained["crop_pct"], pretrained["interpolation"], pretrained["crop_mode"]) == (1.0, "bilinear", "center")
    assert timm.data.resolve_data_config(pretrained_cfg=pretrained)["crop_pct"] == 1.0
    # and from the loaded model, as timm's docs do it (it got 224 px, bicubic, 0.875: the folder's settings dropped)
    resolved = timm.data.resolve_model_data_config(loaded)
    assert (resolved["input_size"], resolved["crop_pct"], resolved["interpolation"]) == ((3, 32, 32), 1.0, "bilinear")
    assert loaded.pretrained_cfg["label_names"] == prepared["info"]["classes"]

    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"]["embed_dim"] = 24  # the weights are 16 wide
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the model spec"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)

    gdir, _ = golden_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    spec = json.loads((gdir / "model.json").read_text())
    spec["kwargs"]["depths"] = [1, 1, 2, 1]  # one block more than the weights hold
    (bad / "model.json").write_text(json.dumps(spec))
    (bad / "model.pt").write_bytes((gdir / "model.pt").read_bytes())
    r = run_cli("export.py", "--model", bad, "--format", "onnx", "--out", tmp_path / "bad.onnx")
    assert r.returncode == 2 and "does not match" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad.onnx").exists()


def test_a_folder_export_replaces_an_earlier_export_and_nothing_else(prepared, tmp_path):
    """--out that holds an earlier export is replaced; one that merely has a config.json (a Hugging
    Face folder, a project folder) is refused with exit 2 and left as it was."""
    from dvfl.export import replaceable_folder

    folder = tmp_path / "student"
    for _ in range(2):
        r = run_cli("export.py", "--model", prepared["teacher"], "--format", "folder", "--out", folder)
        assert r.returncode == 0, r.stderr
    assert replaceable_folder(folder) and sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.json", "model.safetensors"]
    other = tmp_path / "hf_model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "notes.txt").write_text("mine")
    r = run_cli("export.py", "--model", prepared["teacher"], "--format", "folder", "--out", other)
    assert r.returncode == 2 and "not an exported model folder" in r.stderr, r.stderr
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "notes.txt"]
    assert not replaceable_folder(other) and not replaceable_folder(other / "notes.txt")


def test_a_folder_export_into_a_mounted_volume(golden_dir, tmp_path):
    """docker run -v $PWD/nano:/models/nano ... --out /models/nano: a mount point cannot be renamed
    (EBUSY), and another filesystem's temp folder cannot be renamed into it (EXDEV): the export was a
    traceback. The files now move in one by one, the spec last; a killed export's scratch folder in
    the volume does not make it look like a user's folder."""
    import subprocess

    from dvfl import export as ex
    from dvfl.artifacts import load_model

    model, spec = load_model(golden_dir[0])
    for how in (["-t", "tmpfs", "tmpfs"], ["--bind"]):  # another filesystem; the same one (ismount misses it)
        volume = tmp_path / f"volume{len(how)}"
        volume.mkdir()
        subprocess.run(["mount", *how, *([str(volume)] if how == ["--bind"] else []), str(volume)], check=True)
        try:
            for seed in (1, 2):
                ex.export_folder(model, {**spec, "seed": seed}, volume)
                assert sorted(os.listdir(volume)) == ["README.md", "config.json", "model.json", "model.safetensors"]
                assert json.loads((volume / "model.json").read_text())["seed"] == seed
            (volume / ".dvfl-export-999999-volume-x").mkdir()  # a killed export's scratch folder
            assert ex.replaceable_folder(volume)
            files = ex.export_folder(model, {**spec, "seed": 3}, volume)["files"]
            assert files == ["README.md", "config.json", "model.json", "model.safetensors"], files
        finally:
            subprocess.run(["umount", str(volume)], check=True)


def test_a_folder_export_is_swapped_in_whole_and_a_failed_one_keeps_the_earlier(golden_dir, tmp_path, monkeypatch, capsys):
    """Replacing an earlier export leaves only the new one (no hidden sibling folder); an export
    that fails its check, or whose final rename fails, leaves the earlier export as it was."""
    import torch

    from dvfl import export as ex
    from dvfl import storage
    from dvfl.artifacts import load_model

    gdir, _ = golden_dir
    model, spec = load_model(gdir)
    parent = tmp_path / "models"
    folder = parent / "golden"
    synced = []
    real_fsync_dir = storage.fsync_dir
    monkeypatch.setattr(storage, "fsync_dir", lambda d: (synced.append(os.path.abspath(d)), real_fsync_dir(d)))
    ex.export_folder(model, {**spec, "seed": 1}, folder)
    ex.export_folder(model, {**spec, "seed": 2}, folder)
    assert os.listdir(parent) == ["golden"]
    assert json.loads((folder / "model.json").read_text())["seed"] == 2
    assert str(parent) in synced  # the rename into place is made durable
    # an export into a folder another export (or a teacher's --publish) is writing waits for it: two renamed each
    # other's folders away (OSError: Directory not empty) and left full hidden copies of the model beside it
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom dvfl.locks import folder_lock\n"
                               f"with folder_lock({str(folder)!r}, 'export'):\n    print('held', flush=True)\n"
                               "    time.sleep(2)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    capsys.readouterr()
    ex.export_folder(model, {**spec, "seed": 2}, folder)
    assert f"[export] {folder} is in use by another export (pid {holder.pid}" in capsys.readouterr().out
    assert holder.wait() == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    hook = model.register_forward_hook(lambda _m, _i, y: y + 1e-3)  # PyTorch no longer matches the weights
    try:
        with pytest.raises(ex.ExportMismatch):
            ex.export_folder(model, {**spec, "seed": 3}, folder)
    finally:
        hook.remove()
    assert os.listdir(parent) == ["golden"] and {p.name: p.read_bytes() for p in folder.iterdir()} == before

    real_replace = os.replace
    calls = []

    def replace(src, dst):  # the rename of the new folder onto --out fails (a crash there, or a full disk)
        if os.fspath(dst) == str(folder) and not calls:
            calls.append(src)
            raise OSError("simulated failure of the final rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        ex.export_folder(model, {**spec, "seed": 4}, folder)
    assert calls and os.listdir(parent) == ["golden"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    import timm

    x = ex.example_input(spec, 1)
    with torch.inference_mode():  # the restored folder still loads and is the model
        assert torch.equal(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x), model.eval()(x))


def test_folder_exports_check_their_inputs_and_clips_are_named_only_when_trained_on(prepared, tmp_path):
    """The folder export was compared on one random clip whatever --clips, --golden and
    --tolerance said; --clips of another ingest went into the model card, and clips of another
    frame count ended in a traceback (session 29)."""
    import torch

    from dvfl import export as ex
    from dvfl.artifacts import load_model
    from dvfl.commands.export import clips_trained_on

    model, spec = load_model(prepared["teacher"])
    x = ex.example_input(spec, 2)
    with pytest.raises(ex.ExportMismatch, match="folder: max"):  # any difference exceeds a negative bound
        ex.export_folder(model, spec, tmp_path / "f", None, [x], -1.0)
    assert not (tmp_path / "f").exists()
    assert ex.export_folder(model, spec, tmp_path / "f", None, [x, torch.zeros_like(x)], 0.0)["max_abs_diff"] == 0.0
    info = prepared["info"]
    assert clips_trained_on(info, spec)
    assert not clips_trained_on({**info, "fingerprint": "another ingest"}, spec)
    with pytest.raises(ValueError, match="its clips have 16 frames, the model takes 8"):
        clips_trained_on({**info, "params": {**info["params"], "frames": 16}}, spec)


def test_bad_numbers_are_usage_errors_before_any_work(tmp_path):
    for args in (("predict.py", "--model", tmp_path, "v.mp4", "--timeout-per-file", 0),
                 ("predict.py", "--model", tmp_path, "v.mp4", "--threads", -1),
                 ("export.py", "--model", tmp_path, "--format", "folder", "--out", tmp_path / "f", "--tolerance", -1),
                 ("predict.py", "--model", tmp_path, "v.mp4", "--views", "2x2"),
                 ("evaluate.py", "--model", tmp_path, "--views", "2x2")):
        r = run_cli(*args)
        assert r.returncode == 2 and "must be" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # (one rule for --views, evaluate's and predict's alike)
    for args in (("evaluate.py", "--model", tmp_path), ("predict.py", "--model", tmp_path, "v.mp4")):
        r = run_cli(*args, "--views", "4x")
        assert r.returncode == 2 and "--views '4x': expected CLIPSxCROPS, e.g. 1x1 or 4x3" in r.stderr, r.stderr
    assert not (tmp_path / "f").exists()


def test_evaluate_refuses_a_model_trained_on_another_class_list(prepared, tmp_path):
    """Same class count, another order: every score would be named after the wrong class."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(prepared["teacher"], model)
    spec = json.loads((model / "model.json").read_text())
    spec["classes"] = spec["classes"][::-1]
    (model / "model.json").write_text(json.dumps(spec))
    r = run_cli("evaluate.py", "--model", model, "--clips", prepared["cfg"].clips_dir)
    assert r.returncode == 2 and "trained on another class list" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # clips stored at another short side than the model's: each crop another field of view, said (the run refuses)
    spec["classes"] = spec["classes"][::-1]
    spec["inputs"]["short_side"] *= 2
    (model / "model.json").write_text(json.dumps(spec))
    r = run_cli("evaluate.py", "--model", model, "--clips", prepared["cfg"].clips_dir)
    assert r.returncode == 0 and f"stores frames at short side {spec['inputs']['short_side'] // 2}, but {model} was " \
        f"trained on short side {spec['inputs']['short_side']}" in r.stderr, r.stderr
    # a recorded eval_views that is not one (hand-edited): refused, not scored 1x1 under its name
    spec["inputs"]["eval_views"] = "2x2"
    (model / "model.json").write_text(json.dumps(spec))
    r = run_cli("evaluate.py", "--model", model, "--clips", prepared["cfg"].clips_dir)
    assert r.returncode == 2 and "model.json 'inputs.eval_views' is '2x2', not CLIPSxCROPS" in r.stderr, r.stderr
    assert run_cli("evaluate.py", "--model", model, "--clips", prepared["cfg"].clips_dir, "--views", "1x1").returncode == 0
    # clips whose dataset.json was cut short (a half copy): one line, not a JSON traceback
    clips = tmp_path / "clips"
    shutil.copytree(prepared["cfg"].clips_dir, clips)
    (clips / "dataset.json").write_text((clips / "dataset.json").read_text()[:40])
    r = run_cli("evaluate.py", "--model", prepared["teacher"], "--clips", clips)
    assert r.returncode == 2 and "dataset.json cut short or edited?" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_evaluate_says_its_device_and_that_a_gpu_config_runs_on_the_cpu_here(prepared, tmp_path):
    """`ray job submit -- python pipelines/evaluate.py --config configs/ucf101_base.yaml ...` runs
    where the job's driver runs (a head node without a GPU): a 4x3 evaluation of Video-FocalNet-B
    on its CPUs took hours, and nothing said so."""
    r = run_cli("evaluate.py", "--model", prepared["teacher"], "--clips", prepared["cfg"].clips_dir,
                "--set", "scaling.use_gpu=true", "--json", tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr
    assert "but this process sees none: evaluating on this machine's CPU" in r.stderr
    assert "--entrypoint-num-gpus 1" in r.stderr
    assert ", on cpu)" in r.stdout and json.loads((tmp_path / "eval.json").read_text())["device"] == "cpu"
    # results that cannot be written: the earlier evaluation's JSON does not stay as if it were this one's
    (tmp_path / "not-a-folder").write_text("")
    r = run_cli("evaluate.py", "--model", prepared["teacher"], "--clips", prepared["cfg"].clips_dir,
                "--json", tmp_path / "eval.json", "--confusion", tmp_path / "not-a-folder" / "c.png")
    assert r.returncode == 1 and "error: writing the results failed" in r.stderr, r.stderr
    assert not (tmp_path / "eval.json").exists()


def test_an_export_never_writes_over_the_model_it_exports(prepared, tmp_path):
    """`--format torchscript --out MODEL/model.pt` replaced the model's weights with the TorchScript
    file (exit 0; the model no longer loaded); `--out MODEL/model` wrote its contract over model.json."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(prepared["teacher"], model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for fmt, out in (("torchscript", model / "model.pt"), ("torchscript", model / "model")):
        r = run_cli("export.py", "--model", model, "--format", fmt, "--out", out)
        assert r.returncode == 2 and "would write into --model" in r.stderr, (fmt, out, r.stderr)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    for _ in range(2):  # a file of its own beside them is fine, again and again
        r = run_cli("export.py", "--model", model, "--format", "torchscript", "--out", model / "model.ts")
        assert r.returncode == 0 and (model / "model.ts").is_file(), r.stderr
    (tmp_path / "t.ts.json").mkdir()  # a contract that cannot be written: no model left without its own
    r = run_cli("export.py", "--model", model, "--format", "torchscript", "--out", tmp_path / "t.ts")
    assert r.returncode == 1 and f"error: writing {tmp_path / 't.ts'}.json failed: " in r.stderr, r.stderr
    assert not (tmp_path / "t.ts").exists()
    exported = tmp_path / "exported"  # an exported folder given as the model, exported onto itself
    assert run_cli("export.py", "--model", model, "--format", "folder", "--out", exported).returncode == 0
    r = run_cli("export.py", "--model", exported, "--format", "folder", "--out", exported)
    assert r.returncode == 2 and "would write into --model" in r.stderr, r.stderr


def test_a_clips_folder_missing_a_listed_shard_is_refused_not_scored_on_part_of_a_split(prepared, tmp_path):
    """A finished ingest copied or synced partway: evaluation (and training) read whatever shard files
    were there and reported top-1 over part of the test split, exit 0; a stray copy of a shard
    (``test-00000 (1).parquet``) was read as more test clips."""
    from dvfl.data.shards import IncompleteClipsError, shard_paths

    clips = tmp_path / "clips"
    shutil.copytree(prepared["cfg"].clips_dir, clips)
    tests = sorted((clips / "shards").glob("test-*.parquet"))
    shutil.copy(tests[0], clips / "shards" / f"{tests[0].stem} (1).parquet")
    assert shard_paths(str(clips), ["test"]) == [str(p) for p in tests]  # the stray copy is not a shard
    tests[-1].unlink()
    for splits in (["test"], None):
        with pytest.raises(IncompleteClipsError, match=rf"1 of the \d+ shard files its dataset.json lists"
                                                       rf"( for split\(s\) test)? are missing \({tests[-1].name}\)"):
            shard_paths(str(clips), splits)
    assert shard_paths(str(clips), ["train"])  # a split whose files are all there is still read
    r = run_cli("evaluate.py", "--model", prepared["teacher"], "--clips", clips)
    assert r.returncode == 2 and "the folder is incomplete" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_export_names_a_bad_clips_folder_or_golden_file(prepared, tmp_path):
    """--clips that is not a finished ingest, or a --golden file that is not a golden clip: exit 2
    with one line naming the flag, no traceback, nothing written."""
    notes = tmp_path / "golden.pt"
    notes.write_text("not a tensor file")
    for flag, value, says in (("--clips", tmp_path / "nothing", "is not a finished ingest output"),
                              ("--golden", notes, "not a readable golden clip")):
        out = tmp_path / f"m{flag}.onnx"
        r = run_cli("export.py", "--model", prepared["teacher"], "--format", "onnx", "--out", out, flag, value)
        assert r.returncode == 2 and f"error: {flag} " in r.stderr and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not out.exists()
    # model files go to local disk only: a URI is refused, not written under ./s3:/...
    r = run_cli("export.py", "--model", prepared["teacher"], "--format", "onnx", "--out", "s3://bucket/m.onnx")
    assert r.returncode == 2 and "--out s3://bucket/m.onnx: must be a local path" in r.stderr, r.stderr
    # a file format's --out naming a folder: refused before any work (was: a traceback after the
    # whole check, or the model written as a file called "exports")
    (tmp_path / "exports").mkdir()
    for out in (tmp_path / "exports", f"{tmp_path / 'new'}/"):
        r = run_cli("export.py", "--model", prepared["teacher"], "--format", "onnx", "--out", out)
        assert r.returncode == 2 and "is a folder; --format onnx writes one file" in r.stderr, r.stderr
    assert os.listdir(tmp_path / "exports") == [] and not (tmp_path / "new").exists()
    # an --out that cannot be written (its parent is a file): one line after the check, no traceback
    (tmp_path / "a_file").write_text("")
    r = run_cli("export.py", "--model", prepared["teacher"], "--format", "torchscript", "--out", tmp_path / "a_file" / "m.ts")
    assert r.returncode == 1 and f"error: writing {tmp_path / 'a_file' / 'm.ts'} failed: " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_an_export_whose_output_is_not_finite_is_refused():
    """max(0.0, nan) is 0.0: a NaN output passed the parity check as a difference of 0."""
    import torch

    from dvfl.export import ExportMismatch, _check

    model, x = torch.nn.Linear(4, 3).eval(), [torch.randn(2, 4)]
    assert _check("onnx", lambda t: model(t).detach().numpy(), model, x, 1e-4) == 0.0
    with pytest.raises(ExportMismatch, match="not finite"):
        _check("onnx", lambda t: np.full((2, 3), np.nan, np.float32), model, x, 1e-4)
    with torch.no_grad():
        model.weight.fill_(float("nan"))  # the reference itself NaN: no difference can be checked
    with pytest.raises(ExportMismatch):
        _check("onnx", lambda t: np.zeros((2, 3), np.float32), model, x, 1e-4)


def test_serve_settings_from_command_line_strings(prepared):
    """`serve run dvfl.serve:build_app model=DIR topk=3` passes strings: numbers are read as their
    fields' types, and a value that is not one is a settings error naming the field."""
    from dvfl.serve import ServeSettings

    s = ServeSettings.from_args({"model": prepared["teacher"], "topk": "3", "max_upload_mb": "1.5"})
    assert (s.topk, s.max_upload_mb) == (3, 1.5)
    with pytest.raises(ValueError, match=r"serve args: topk must be an integer, got 'many'"):
        ServeSettings.from_args({"model": prepared["teacher"], "topk": "many"})
    with pytest.raises(ValueError, match=r"serve args: request_timeout_s must be a number"):
        ServeSettings.from_args({"model": prepared["teacher"], "request_timeout_s": "soon"})
    # a YAML number where a whole one is wanted (it started, then failed every request or replica)
    assert ServeSettings.from_args({"model": prepared["teacher"], "topk": 3.0}).topk == 3
    with pytest.raises(ValueError, match=r"serve args: torch_threads must be an integer, got 1\.5"):
        ServeSettings.from_args({"model": prepared["teacher"], "torch_threads": 1.5})
    # a replica asks Ray for a GPU only when told to; its model then runs there (dvfl.inference)
    from dvfl.serve import build_app

    for gpus in ("0", "0.5"):
        app = build_app({"model": prepared["teacher"], "gpus_per_replica": gpus})
        assert app._bound_deployment.ray_actor_options["num_gpus"] == float(gpus)
    with pytest.raises(ValueError, match="gpus_per_replica must be >= 0"):
        ServeSettings.from_args({"model": prepared["teacher"], "gpus_per_replica": "-1"})


def test_serve_refuses_a_model_folder_without_classes_or_input_sizes_before_any_replica(tmp_path):
    # it passed (model.json exists), then every replica failed at start, telling to "pass --clips"
    from dvfl.serve import ServeSettings

    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "embedded_teacher", model)
    ServeSettings.from_args({"model": str(model)})
    spec = json.loads((model / "model.json").read_text())
    del spec["inputs"]
    (model / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"serve args: model: .* records no class names or input sizes"):
        ServeSettings.from_args({"model": str(model)})
    # inputs the weights cannot take, or class names of another count: refused here too (the first failed every
    # request with a 500, the second every replica at start)
    spec = json.loads((REPO / "models" / "embedded_teacher" / "model.json").read_text())
    for bad, says in (({"inputs": {**spec["inputs"], "frames": spec["kwargs"]["num_frames"] * 2}},
                       r"inputs of \d+ frames .* for a model built for 8"),
                      ({"classes": spec["classes"][:-1]}, r"\d+ class names for a model with \d+ outputs"),
                      ({"inputs": {**spec["inputs"], "eval_views": "2x2"}}, r"model.json 'inputs.eval_views' is '2x2', not")):
        (model / "model.json").write_text(json.dumps({**spec, **bad}))
        with pytest.raises(ValueError, match=r"serve args: model: [^:]*: " + says):
            ServeSettings.from_args({"model": str(model)})


def test_serve_answers_from_one_view_or_the_models_own_and_says_which(tmp_path, capsys):
    """Serve answers from 1x1 (one forward pass a request) unless told `views: eval`, the views the
    model's run evaluated with (predict's default); a model evaluated otherwise is said at start."""
    from dataclasses import asdict

    from dvfl.serve import Recognizer, ServeSettings, build_app

    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "embedded_teacher", model)
    spec = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**spec, "inputs": {**spec["inputs"], "eval_views": "2x3"}}))
    for views, expected in (({}, (1, 1)), ({"views": "eval"}, (2, 3)), ({"views": "2x1"}, (2, 1))):
        app = build_app({"model": str(model), **views})
        said = "[serve] answering from" in capsys.readouterr().err
        # the replicas get the views said here (not "eval": one started after a rerun rewrote model.json)
        assert app._bound_deployment.init_args[0]["views"] == f"{expected[0]}x{expected[1]}"
        assert said == (expected != (2, 3)), views
        replica = Recognizer.func_or_class(asdict(ServeSettings.from_args({"model": str(model), **views})))
        try:
            assert replica.views == expected
        finally:
            replica.pred.close()
            shutil.rmtree(replica.tmp, ignore_errors=True)
    with pytest.raises(ValueError, match=r"serve args: views: --views 'none': expected CLIPSxCROPS.* \(or 'eval'"):
        ServeSettings.from_args({"model": str(model), "views": "none"})


def test_serve_refuses_a_model_folder_whose_weights_cannot_load_before_any_replica(tmp_path):
    """Only model.json's classes were checked: truncated weights or a spec of another version
    passed, then every replica failed in its constructor and Serve restarted it, over and over."""
    from dvfl.serve import build_app

    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "embedded_teacher", model)
    build_app({"model": str(model)})
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=r"^serve args: model: .* cannot be loaded: "):
        build_app({"model": str(model)})
    (model / "model.safetensors").write_bytes(weights)
    spec = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**spec, "kwargs": {**spec["kwargs"], "bogus": 1}}))
    with pytest.raises(ValueError, match=r"cannot be loaded: .*model\.json does not build videofocalnet_nano: .*bogus"):
        build_app({"model": str(model)})
    (model / "model.json").write_text(json.dumps(spec)[:40])  # cut short: named, not a bare JSON error
    with pytest.raises(ValueError, match=r"^serve args: model: .*model\.json is not a model spec"):
        build_app({"model": str(model)})


def test_export_and_predict_say_what_is_wrong_with_their_inputs_in_one_line(tmp_path):
    """A mistyped --model folder was told to give --arch (export has none); a model.json of another
    version was a traceback; an s3:// video read as a missing local file."""
    r = run_cli("export.py", "--model", tmp_path / "typo", "--format", "folder", "--out", tmp_path / "f")
    assert r.returncode == 2 and "typo: not found (no such model folder or checkpoint file)" in r.stderr, r.stderr
    ckpt = tmp_path / "video-focalnet_base_k400.pth"  # a checkpoint file: told to give --arch, which export lacks
    ckpt.write_bytes(b"weights")
    r = run_cli("export.py", "--model", ckpt, "--format", "folder", "--out", tmp_path / "f")
    assert r.returncode == 2 and "a checkpoint file; export takes a model folder" in r.stderr, r.stderr
    assert "--arch" not in r.stderr
    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "embedded_teacher", model)
    spec = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**spec, "kwargs": {**spec["kwargs"], "bogus": 1}}))
    r = run_cli("export.py", "--model", model, "--format", "folder", "--out", tmp_path / "f")
    assert r.returncode == 2 and "model.json does not build videofocalnet_nano" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "f").exists()
    r = run_cli("predict.py", "--model", REPO / "models" / "embedded_teacher", "s3://bucket/v.mp4")
    assert r.returncode == 2 and "s3://bucket/v.mp4: videos to predict must be local files" in r.stderr, r.stderr


def test_a_timed_out_request_keeps_the_replica_until_its_decode_ends():
    """The 408 comes at the time limit, but the next request waits for the timed-out one's thread
    (a thread cannot be cancelled): two requests never drive one decode child at the same time."""
    import asyncio

    from dvfl.serve import run_exclusive

    spans = []

    lefts = {}

    def work(name, seconds):
        def fn(seconds_left):
            lefts[name] = seconds_left
            t0 = time.perf_counter()
            time.sleep(seconds)
            spans.append((name, t0, time.perf_counter()))
            return name
        return fn

    async def two_requests():
        lock = asyncio.Lock()
        t0 = time.perf_counter()
        with pytest.raises(asyncio.TimeoutError):
            await run_exclusive(lock, work("slow", 0.6), 0.1)
        assert time.perf_counter() - t0 < 0.5  # the client had its answer at the limit
        # a request waiting behind it gets its answer at its own limit too, not when the lock frees
        t1 = time.perf_counter()
        with pytest.raises(asyncio.TimeoutError):
            await run_exclusive(lock, work("never", 0.0), 0.1)
        assert time.perf_counter() - t1 < 0.4
        assert await run_exclusive(lock, work("next", 0.0), 5) == "next"
        assert 4 < lefts["next"] <= 5  # it waited a little for the slow one's thread
        # one limit for the wait and the work: 1 s behind another, then 1 s of work, is past 1.5 s
        # (each stage had its own limit: answered after 2 s as a success; margins for a busy machine)
        asyncio.ensure_future(run_exclusive(lock, work("ahead", 1.0), 5))
        await asyncio.sleep(0.01)
        t2 = time.perf_counter()
        with pytest.raises(asyncio.TimeoutError):
            await run_exclusive(lock, work("late", 1.0), 1.5)
        # (~0.5 s left after ~1 s behind "ahead"; a limit of its own would leave 1.5 s)
        assert time.perf_counter() - t2 < 1.85 and lefts["late"] < 1.0
        await run_exclusive(lock, work("last", 0.0), 5)

    asyncio.run(two_requests())
    (first, _, slow_end), (second, next_start, _) = spans[:2]
    assert (first, second) == ("slow", "next") and next_start >= slow_end, spans


def test_frames_smaller_than_the_crop_are_a_per_file_error_not_a_crash():
    """A model trained at the source size (data.short_side 0) meets a smaller video: crop_box's
    ValueError gave serve a 500 and aborted a whole predict run; now a PredictError (422)."""
    from types import SimpleNamespace

    from dvfl.inference import PredictError, Predictor
    from dvfl.serve import STATUS

    with pytest.raises(PredictError) as err:
        Predictor.probabilities(SimpleNamespace(crop_size=32), [np.zeros((8, 24, 40, 3), np.uint8)])
    assert err.value.reason == "too_small" and "24x40" in err.value.detail and STATUS["too_small"] == 422


def test_an_upload_that_trickles_in_gets_408_within_the_requests_limit(prepared, video_factory, tmp_path):
    """The request's limit started once the body was in: a client sending its body a byte at a time
    held one of the replica's two slots for as long as it liked (no proxy limit under `serve run`).
    The replica's own class, driven with a real starlette request whose body stalls."""
    import asyncio
    from dataclasses import asdict

    from starlette.requests import Request

    from dvfl.serve import INFERENCE_SLACK_S, Recognizer, ServeSettings

    settings = ServeSettings.from_args({"model": prepared["teacher"], "request_timeout_s": "1"})
    replica = Recognizer.func_or_class(asdict(settings))
    # a replica started after a new export was published into the folder (autoscaling, a restart) served a
    # model `serve run` never loaded, beside replicas of the first one, without a word: said (and every answer
    # names its weights)
    import contextlib
    import io

    told = io.StringIO()
    with contextlib.redirect_stderr(told):
        other = Recognizer.func_or_class(asdict(settings), "0" * 64)
    assert "now holds other weights" in told.getvalue() and "than `serve run` loaded (0000" in told.getvalue()
    assert other.weights == replica.weights == prepared["spec"]["weights_fingerprint"]

    async def trickle():
        yield_once = [{"type": "http.request", "body": b"\x00" * 10, "more_body": True}]

        async def receive():
            if yield_once:
                return yield_once.pop()
            await asyncio.sleep(3600)  # the rest never comes

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"1000")],
                 "query_string": b""}
        t0 = time.monotonic()
        response = await asyncio.wait_for(replica(Request(scope, receive)), 30)  # (it waited for ever)
        return response, time.monotonic() - t0

    try:
        response, seconds = asyncio.run(trickle())
        assert response.status_code == 408 and b"upload did not arrive" in response.body
        assert seconds < 1 + INFERENCE_SLACK_S + 2
        assert not list(Path(replica.tmp).glob("*.video"))  # the partial upload is gone
        # and a whole upload is still answered
        good = Path(video_factory(str(tmp_path / "good.mp4"), n=16, h=32, w=32, fps=8)).read_bytes()
        chunks = [{"type": "http.request", "body": good, "more_body": False}]

        async def whole():
            async def receive():
                return chunks.pop() if chunks else {"type": "http.disconnect"}
            scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
            return await replica(Request(scope, receive))

        assert asyncio.run(whole()).status_code == 200
    finally:
        replica.pred.close()
        shutil.rmtree(replica.tmp, ignore_errors=True)


def test_serve_answers_good_uploads_and_rejects_bad_ones_with_4xx(prepared, ray_local, video_factory, tmp_path):
    """The Serve app from configs/serve.yaml's args (smaller limits): a good upload -> 200 top-k;
    empty, not a video, truncated, oversized, too long -> 4xx with the reason; then a good upload
    is still answered; shutdown leaves no app and no temp folder."""
    import socket
    import urllib.error
    import urllib.request

    import yaml
    from ray import serve

    from dvfl.serve import build_app

    before = {p for p in os.listdir(tempfile_dir()) if p.startswith("dvfl-serve-")}  # (a killed earlier run's)

    good = Path(video_factory(str(tmp_path / "good.mp4"), n=16, h=32, w=32, fps=8))
    long = Path(video_factory(str(tmp_path / "long.mp4"), n=112, h=32, w=32, fps=8))  # 14 s
    # 10 s: within the limit, 5x the training videos' 2 s: answered with predict's note
    sparse = Path(video_factory(str(tmp_path / "sparse.mp4"), n=80, h=32, w=32, fps=8))
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    args = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["applications"][0]["args"]
    args.update(model=prepared["teacher"], topk=2, max_upload_mb=0.1, max_video_seconds=12, cpus_per_replica=0.5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def post(body: bytes):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="dvfl-test", route_prefix="/")
        status, out = post(good.read_bytes())
        assert status == 200 and len(out["topk"]) == 2 and out["topk"][0][0] in prepared["info"]["classes"], out
        assert out["weights"] == prepared["spec"]["weights_fingerprint"]  # which model answered
        assert out["views"] == "1x1"  # (configs/serve.yaml's)
        assert "note" not in out
        # the answer predict gives for the same file with the same views (classes, order, probabilities)
        from dvfl.inference import Predictor, parse_views

        local = Predictor.load(prepared["teacher"], device="cpu")  # (the replica's: gpus_per_replica 0)
        try:
            expected = local.predict_file(str(good), parse_views(args["views"]), k=2)["topk"]
        finally:
            local.close()
        assert [c for c, _ in out["topk"]] == [c for c, _ in expected], (out, expected)
        assert [p for _, p in out["topk"]] == pytest.approx([p for _, p in expected], abs=1e-4), (out, expected)
        status, out = post(sparse.read_bytes())
        assert status == 200 and out["note"].startswith("10 s long, 5x the training videos' median 2.0 s"), out
        for body, code, reason in ((b"", 400, "empty"), (b"just some text\n" * 10, 415, "not_video"),
                                   (truncated.read_bytes(), 400, "truncated"),
                                   (b"\0" * 200_000, 413, "too_large"), (long.read_bytes(), 413, "too_long")):
            status, out = post(body)
            assert (status, out["error"]) == (code, reason), out
            assert out["detail"]
        # a file the decoder fails on names the upload, not the server's temp file (its path and pid)
        rng = np.random.default_rng(2)
        status, out = post(b"FLV\x01\x05" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
        assert (status, out["error"]) == (400, "corrupt") and "<upload>" in out["detail"], out
        assert "dvfl-serve-" not in out["detail"] and ".video" not in out["detail"], out
        status, again = post(good.read_bytes())
        assert status == 200 and again["topk"][0][0] == post(good.read_bytes())[1]["topk"][0][0]
    finally:
        serve.shutdown()
    assert not [p for p in os.listdir(tempfile_dir()) if p.startswith("dvfl-serve-") and p not in before]


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def test_predict_equals_evaluation_on_every_test_video_of_the_embedded_default(ray_local, tmp_path):
    """The embedded default's own test videos (the first 320 of them: a test video's seed
    depends only on the run seed, its class and index, not on the training split's size), ingested
    with the default's parameters: predict.py's top-1 (the default's eval views) is evaluation's video-level
    prediction (the default's eval views) for every one of them, on a model of the student's shape."""
    import torch

    from dvfl import pipeline
    from dvfl.artifacts import save_model
    from dvfl.models import build_model
    from dvfl.config import load_config
    from dvfl.data.adapters import build_manifest
    from dvfl.data.ingest import IngestConfig, ingest
    from dvfl.data.shards import load_dataset_info, read_clips_table
    from dvfl.train.evaluate import evaluate_multiview

    default = load_config(None, [("output_dir", str(tmp_path))])
    # the first 40 test videos of each class: the same files as in the whole test split
    cfg = load_config(None, [("output_dir", str(tmp_path)), ("data.synthetic.train_per_class", 0),
                             ("data.synthetic.unlabeled_videos", 0), ("data.synthetic.test_per_class", 40),
                             ("data.synthetic.val_per_class", 0)])
    generated = pipeline.ensure_videos(cfg, log=None)
    ingest(build_manifest("synthetic", generated["root"], 1),
           IngestConfig(out=cfg.clips_dir, frames=cfg.data.frames, clips_per_video=cfg.data.clips_per_video,
                        eval_clips=cfg.data.eval_clips, short_side=cfg.data.short_side, seed=cfg.seed,
                        progress=False), log=lambda *_: None)
    info = load_dataset_info(cfg.clips_dir)
    torch.manual_seed(0)
    kwargs = pipeline.model_kwargs(default.student, len(info["classes"]), default)
    model = build_model(default.student.model, **kwargs).eval()
    model_dir = tmp_path / "student"
    save_model(model_dir, model, default.student.model, kwargs, classes=info["classes"],
               inputs=pipeline.model_inputs(default, info))

    ev = evaluate_multiview(model, cfg.clips_dir, "test", default.crop_size, num_clips=default.eval.clips,
                            num_crops=default.eval.crops, per_video=True)
    table = read_clips_table(cfg.clips_dir, ["test"], columns=["video_id", "path"])
    videos = dict(zip(table.column("video_id").to_pylist(), table.column("path").to_pylist()))
    s = default.data.synthetic
    assert len(videos) == len(ev["predictions"]) == s.num_classes * 40 == 320
    out = tmp_path / "pred.json"
    r = run_cli("predict.py", "--model", model_dir, generated["root"], "--topk", 1, "--json", out,
                "--views", f"{default.eval.clips}x{default.eval.crops}")
    assert r.returncode == 0, r.stderr[-2000:]
    top1 = {row["path"]: row["topk"][0][0] for row in json.loads(out.read_text())}
    assert len(top1) == 320
    wrong = [v for v, p in videos.items() if top1[os.path.join(info["root"], p)] != info["classes"][ev["predictions"][v]]]
    assert not wrong, f"{len(wrong)} of 320 test videos predicted differently from evaluation: {wrong[:5]}"


def test_predict_takes_the_clips_evaluation_takes_from_a_larger_stored_grid(video_factory, tmp_path):
    """Clips stored with eval_clips 3, evaluated with 1 or 2: evaluation scores the clips of the
    3-clip grid that spread_clips picks (dvfl.train.evaluate; since session 28 not the first ones),
    so predict --views 1xC must decode those, not a grid of its own nor the grid's first clips."""
    from dvfl.data import decode as D
    from dvfl.data.sampling import spread_clips
    from dvfl.inference import Predictor

    path = video_factory(str(tmp_path / "v.mp4"), n=40, h=32, w=32)
    job = {"path": path, "video_id": "v", "split": "test", "frames": 8, "clips_per_video": 1, "eval_clips": 3,
           "seed": 0, "short_side": 32, "min_frames": 8}
    stored = D.decode_video(job)["views"]  # what ingest stores for a test video
    pred = Predictor(model=None, classes=["a"], frames=8, short_side=32, crop_size=32, eval_clips=3)
    try:
        for n in (1, 2, 3, 4):
            got = pred.decode(path, n)["views"]
            assert len(got) == n
            if n <= 3:
                taken = [stored[k] for k in sorted(spread_clips(n, 3))]
                assert [k for _, k, _, _ in taken] == ([1] if n == 1 else [0, 2] if n == 2 else [0, 1, 2])
                for (v0, k0, idx0, clip0), (v1, k1, idx1, clip1) in zip(taken, got):
                    assert (v0, k0) == (v1, k1) and idx0.tolist() == idx1.tolist()
                    np.testing.assert_array_equal(clip0, clip1)
    finally:
        pred.close()


def test_a_video_shorter_than_a_clip_is_refused_as_ingest_refuses_it(video_factory, tmp_path):
    """predict and serve decoded with min_frames 1: a 5-frame upload became a clip of repeated
    frames and got a confident answer; ingest rejects it (too_short), so evaluation never saw one."""
    from dvfl.data import decode as D
    from dvfl.inference import PredictError, Predictor
    from dvfl.serve import STATUS

    short = video_factory(str(tmp_path / "short.mp4"), n=5, h=32, w=32)
    pred = Predictor(model=None, classes=["a"], frames=8, short_side=32, crop_size=32)
    try:
        with pytest.raises(PredictError) as err:
            pred.decode(short)
        assert err.value.reason == D.TOO_SHORT and STATUS[D.TOO_SHORT] == 422, err.value
        assert len(pred.decode(video_factory(str(tmp_path / "ok.mp4"), n=8, h=32, w=32))["views"]) == 1
    finally:
        pred.close()


@pytest.mark.parametrize("crop, short_side", [(224, 300), (224, 256), (32, 36), (112, 128), (32, 32)])
def test_timms_transform_from_the_exported_config_resizes_to_the_stored_short_side(crop, short_side):
    # crop_pct rounded to 6 digits made timm resize 300 -> 299 and 36 -> 35 before its centre crop
    import timm.data

    from dvfl.export import timm_config

    cfg = timm_config({"name": "videofocalnet_nano", "kwargs": {"img_size": crop, "num_classes": 2},
                       "inputs": {"short_side": short_side}, "classes": ["a", "b"]})["pretrained_cfg"]
    resize, center_crop = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg)).transforms[:2]
    assert (resize.size, list(center_crop.size)) == (short_side, [crop, crop])


def test_a_model_trained_at_source_size_is_described_as_uncropped_not_resized():
    """``data.short_side: 0`` (clips stored at their source size, a centre crop of them trained on):
    the sidecar said "short side to short_side" with short_side 0 and the card "resized to short side 0"."""
    from dvfl.export import input_contract, model_card

    spec = {"name": "videofocalnet_nano", "kwargs": {"img_size": 32, "num_classes": 2, "num_frames": 8},
            "inputs": {"short_side": 0, "crop_size": 32, "frames": 8}, "classes": ["a", "b"]}
    assert input_contract(spec)["preprocessing"]["resize"].startswith("none: a centre crop of crop_size")
    card = model_card(spec)
    assert "no resize: a 32² crop of the frames at their source size" in card and "short side 0" not in card
    resized = {**spec, "inputs": {**spec["inputs"], "short_side": 36}}
    assert "video resized to short side 36, then a 32² crop" in model_card(resized)


def test_a_streams_default_window_spans_a_training_video(video_factory, tmp_path):
    """A training clip's T frames are spread over a whole video; the stream's default window was T
    consecutive frames (0.27 s at 30 fps), a time scale the model never saw. Now it spans the
    median training video (model.json inputs.video_seconds) at the stream's rate."""
    import torch

    from dvfl.inference import Predictor, stream_file

    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2)

    video = video_factory(str(tmp_path / "s.mp4"), n=40, h=32, w=32, fps=40)

    def windows(**kw):
        pred = Predictor(model=Uniform(), classes=["a", "b"], frames=8, short_side=32, crop_size=32, **kw)
        try:
            out = stream_file(pred, video, None, 4, realtime=False, log=lambda *_: None)
        finally:
            pred.close()
        return out["window"], [w["end_frame"] for w in out["windows"]]

    assert windows(video_seconds=0.5) == (20, list(range(20, 41, 4)))  # 0.5 s at 40 fps
    assert windows(video_seconds=5.0) == (40, [40])  # longer than the file: the whole file, once
    assert windows() == (8, list(range(8, 41, 4)))  # a model that does not record it: T


def test_an_export_removes_the_temporaries_a_killed_export_left_beside_it(tmp_path):
    """An export writes beside its file and renames; a SIGKILLed export left its temporary (the
    whole size of a model) there for good. The next export into that folder removes those of
    dead owners that nobody has written for 10 minutes, and nothing else."""
    import subprocess
    import sys
    import time

    import torch

    from dvfl.export import export_torchscript

    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    old = time.time() - 3600
    left_file = tmp_path / f".dvfl-export-{killed.pid}-k2j3-model.ts.tmp"
    left_dir = tmp_path / f".dvfl-export-{killed.pid}-student-x8y9"
    alive = tmp_path / ".dvfl-export-1-abcd-model.ts.tmp"  # pid 1 runs: another export in progress
    mine = tmp_path / "model.ts.tmp"  # not ours
    theirs = tmp_path / f"dvfl-export-{killed.pid}-03.onnx"  # a user's file that looks like ours, not hidden
    left_dir.mkdir()
    for f in (left_file, left_dir / "model.safetensors", alive, mine, theirs):
        f.write_bytes(b"weights")
        os.utime(f, (old, old))
    os.utime(left_dir, (old, old))
    export_torchscript(torch.nn.Linear(4, 3).eval(), tmp_path / "model.ts", [torch.randn(2, 4)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.ts", alive.name, mine.name, theirs.name])


def test_exported_files_take_the_users_umask(tmp_path):
    """Exports were forced to 0644 (world-readable) whatever the umask: under `umask 077` the
    weights of a model trained on private data became readable by every user of the machine."""
    import torch

    from dvfl.export import export_torchscript

    model, x = torch.nn.Linear(4, 3).eval(), [torch.randn(2, 4)]
    old = os.umask(0o077)
    try:
        export_torchscript(model, tmp_path / "private.ts", x)
    finally:
        os.umask(old)
    assert (tmp_path / "private.ts").stat().st_mode & 0o777 == 0o600
    export_torchscript(model, tmp_path / "shared.ts", x)
    assert (tmp_path / "shared.ts").stat().st_mode & 0o777 == 0o666 & ~old


def test_the_model_card_says_which_frames_a_one_clip_view_takes():
    """The card said "TSN segment centres" for every model; with 4 evaluation clips stored per video
    (the UCF101/HMDB51/K400 configs) a one-clip view is clip 2 of 4, at 0.625 of each segment."""
    from dvfl.export import frame_sampling

    assert frame_sampling({"eval_clips": 1}, 8) == ("8 frames, one from each of 8 equal segments of the video, at "
                                                    "the centre of each segment")
    assert frame_sampling({"eval_clips": 4}, 16).endswith("at 0.625 of the way of each segment (clip 2 of the 4 "
                                                          "evaluation clips stored per video)")
    assert "at the centre" in frame_sampling({"eval_clips": 3}, 8)


def test_a_model_folder_whose_weights_changed_after_it_was_saved_is_refused(golden_dir, tmp_path):
    """model.json records the weights' fingerprint; the shipped teacher was loaded without comparing
    it (the README said the demo checks it): weights edited or swapped later ran under the folder's
    recorded accuracy and cache keys."""
    import shutil

    import torch

    from dvfl.artifacts import load_model
    from dvfl.models import CheckpointError

    gdir, _ = golden_dir
    model, spec = load_model(gdir)  # as saved: loads
    edited = tmp_path / "edited"
    shutil.copytree(gdir, edited)
    state = torch.load(edited / "model.pt", weights_only=True)
    state["head.bias"] = state["head.bias"] + 0.5
    torch.save(state, edited / "model.pt")
    with pytest.raises(CheckpointError, match=rf"its weights do not match its model.json \(weights_fingerprint "
                                              rf"{spec['weights_fingerprint']}"):
        load_model(edited)
    # a folder saved before the fingerprint flattened its tensors (2026-12-02) records the older hash
    from dvfl.artifacts import state_dict_fingerprint

    older = tmp_path / "older"
    shutil.copytree(gdir, older)
    legacy = state_dict_fingerprint(model.state_dict(), legacy=True)
    assert legacy != spec["weights_fingerprint"]
    (older / "model.json").write_text(json.dumps({**json.loads((gdir / "model.json").read_text()),
                                                  "weights_fingerprint": legacy}))
    assert load_model(older)[1]["weights_fingerprint"] == legacy  # (its caches and evaluations are keyed by it)


def test_the_deploy_benchmark_keeps_the_sections_it_skips_with_the_run_that_measured_them(tmp_path, capsys):
    """The README's figures come from two runs with --skip: each wrote its sections alone over the
    other's file (the shipped file was merged by hand)."""
    from benchmarks import deploy

    out = tmp_path / "deploy.json"
    shutil.copy(REPO / "benchmarks" / "results" / "deploy.json", out)
    shipped = json.loads(out.read_text())
    skip_all = [arg for s in deploy.SECTION_KEYS for arg in ("--skip", s)]
    for _ in range(2):  # the second run keeps what the first kept, with the same measuring runs
        assert deploy.main([*skip_all, "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    for key in ("accuracy", "latency_8x224_b1", "int8", "streaming", "serve"):
        assert merged[key] == shipped[key], key
        assert merged["kept_from_earlier_runs"][key]["cpu"] == shipped["cpu"]
    assert merged["command"].startswith("benchmarks/deploy.py --skip")
    assert "| c16 |" in capsys.readouterr().out  # the table printed from the kept sections


def test_an_export_onto_a_full_disk_is_an_oserror_naming_the_file_and_leaves_nothing(golden_dir, tmp_path):
    """A full disk (here a file-size limit: the write fails with EFBIG): TorchScript and torch.export,
    saved by torch's zip writer to a path, aborted the process (a C++ exception in a destructor), the
    TorchScript temporary left filling the disk; a folder's safetensors error was a traceback."""
    import subprocess
    import sys

    gdir, _ = golden_dir
    out = tmp_path / "out"
    code = f"""
import resource, signal
from pathlib import Path
from dvfl import export as ex
from dvfl.artifacts import load_model
model, spec = load_model({str(gdir)!r})
inputs = [ex.example_input(spec, 1)]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
out = Path({str(out)!r})
for name, export in (("m.ts", lambda p: ex.export_torchscript(model, p, inputs)),
                     ("m.pt2", lambda p: ex.export_program(model, p, inputs)),
                     ("folder", lambda p: ex.export_folder(model, spec, p, inputs=inputs))):
    try:
        export(out / name)
        print(name, "written")
    except OSError as exc:
        print(name, "OSError", str(exc).replace(chr(10), " "))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [line.split(" ")[:2] for line in lines] == [["m.ts", "OSError"], ["m.pt2", "OSError"],
                                                       ["folder", "OSError"]], r.stdout
    assert str(out) in lines[2] and "model.safetensors" in lines[2], lines[2]  # the weights file is named
    assert os.listdir(out) == [], os.listdir(out)  # no temporary left behind


def test_an_upload_the_server_cannot_store_is_the_apis_507_not_a_bare_500(tmp_path):
    """A full disk (here: the upload's path is a folder, a real OSError from open) escaped the
    endpoint, and the client got Serve's generic 500 instead of the API's {error, detail}."""
    import asyncio

    from dvfl.serve import Recognizer

    class Upload:  # what _read_body asks of a Starlette request
        headers = {"content-length": "2"}

        async def stream(self):
            yield b"x"
            yield b"y"

    response = asyncio.run(Recognizer.func_or_class._read_body(None, Upload(), 1000, str(tmp_path)))
    assert response.status_code == 507, response
    body = json.loads(response.body)
    assert body["error"] == "storage" and "the server could not store the upload" in body["detail"], body


_FAULTS = """
import ctypes, ctypes.util, resource
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: one fault per base page, whatever the host's THP setting
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
PAGES = (48 << 20) // resource.getpagesize()

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def kept():
    \"\"\"Whether a freed 48 MiB block comes back without faulting its pages in again (glibc's own
    settings map a block that large afresh every time; malloc itself: numpy's and torch's caches aside).\"\"\"
    for _ in range(2):
        block = libc.malloc(48 << 20)
        before = faults()
        ctypes.memset(block, 1, 48 << 20)
        libc.free(block)
    n = faults() - before
    assert n < 0.08 * PAGES or n > 0.8 * PAGES, (n, PAGES)
    return n < 0.08 * PAGES
"""


def _kept_after(body: str) -> list[bool]:
    """Run ``body`` in a fresh process; it prints kept() after each step it checks."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FAULTS + body], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return [{"True": True, "False": False}[v] for v in r.stdout.split()]


@linux_only
def test_predict_keeps_freed_memory_as_training_does(prepared):
    """predict/serve ran their forwards with glibc's settings: every clip's activations above its
    thresholds were handed back and faulted in again (benchmarks/evaluate_speed.py)."""
    assert _kept_after(f"""
from dvfl.inference import Predictor
print(kept())
Predictor.load({prepared['teacher']!r}, device='cpu').close()
print(kept())
""") == [False, True]


@linux_only
def test_evaluation_keeps_freed_memory_in_a_process_of_its_own_not_in_a_runs_driver(prepared):
    """The evaluate command and an evaluation task keep freed memory (as training workers do); a run's
    driver evaluating between stages does not (it goes on to other work, and glibc's settings once
    changed never adapt again)."""
    assert _kept_after(f"""
from dvfl import pipeline
from dvfl.train.evaluate import evaluate_multiview
from dvfl.artifacts import load_model
model = load_model({prepared['teacher']!r})[0]
views = dict(num_clips=1, num_crops=1, keep_memory=True)
args = ({prepared['teacher']!r}, None, 8, 8, {prepared['cfg'].clips_dir!r}, 'test', 32, views)
pipeline._evaluate_model(*args, model=model, device='cpu')  # the driver's path
print(kept())
evaluate_multiview(model, {prepared['cfg'].clips_dir!r}, 'test', 32, device='cpu', keep_memory=True)
print(kept())
""") == [False, True]


def test_predict_finds_the_videos_of_linked_sub_folders_once_and_no_systems_files(tmp_path):
    """``predict FOLDER`` skipped linked sub-folders without a word (Path.rglob does not follow
    them): a folder of links was 'no video files in this folder'. Each real folder is read once (a
    link loop ends); hidden files, a Mac's ._ copies and a NAS's @eaDir previews are not videos."""
    from dvfl.inference import expand_inputs

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deeper").mkdir(parents=True)
    for rel in ("e.mp4", "deeper/g.webm"):
        (elsewhere / rel).write_bytes(b"x")
    top = tmp_path / "in"
    for rel in ("a.mp4", "sub/d.MP4", ".hidden/b.mp4", "._c.mp4", "@eaDir/a.mp4/SYNOPHOTO_FILM_M.mp4", "notes.txt"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(b"x")
    (top / "linked").symlink_to(elsewhere, target_is_directory=True)
    (top / "sub" / "loop").symlink_to(top, target_is_directory=True)
    files, empty = expand_inputs([str(top)])
    assert files == sorted(str(top / rel) for rel in ("a.mp4", "linked/deeper/g.webm", "linked/e.mp4", "sub/d.MP4"))
    assert not empty
    only_links = tmp_path / "only_links"
    only_links.mkdir()
    (only_links / "videos").symlink_to(elsewhere, target_is_directory=True)
    assert expand_inputs([str(only_links)]) == (sorted(str(only_links / "videos" / r) for r in ("deeper/g.webm", "e.mp4")), [])
