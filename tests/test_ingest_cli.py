"""pipelines/ingest.py: flag validation (fails fast, naming the flag) and a real SIGKILL in
the middle of a run: no partial shard is ever visible, and re-running the same command
completes with exactly the shards an uninterrupted run writes."""
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from dvfl.cli import main as dvfl_main  # noqa: E402


@pytest.mark.parametrize("argv, flag", [
    (["--dataset", "ucf101", "--out", "o"], "--root"),
    (["--dataset", "ucf101", "--root", "/nonexistent", "--out", "o"], "--root"),
    (["--dataset", "ucf101", "--root", ".", "--split", "4", "--out", "o"], "--split"),
    (["--dataset", "ucf50", "--root", ".", "--split", "26", "--out", "o"], "--split"),
    (["--dataset", "synthetic", "--out", "o", "--frames", "0"], "--frames"),
    (["--dataset", "synthetic", "--out", "o", "--clips-per-video", "0"], "--clips-per-video"),
    (["--dataset", "synthetic", "--out", "o", "--timeout-per-file", "0"], "--timeout-per-file"),
    (["--dataset", "synthetic", "--out", "o", "--short-side", "-1"], "--short-side"),
    (["--dataset", "synthetic", "--out", "o", "--video-size", "33"], "--video-size"),
    (["--dataset", "synthetic", "--out", "o", "--unlabeled", "/nonexistent"], "--unlabeled"),
    (["--dataset", "kinetics", "--root", ".", "--out", "o", "--annotations", "nope.csv"], "--annotations"),
    (["--dataset", "folder", "--root", ".", "--out", "o", "--test-fraction", "1.5"], "--test-fraction"),
    (["--dataset", "hmdb", "--root", ".", "--out", "o"], "--dataset"),
    # the folder, dvfl-csv and ucf50 adapters find videos under --root: every entry would be "missing"
    (["--dataset", "folder", "--root", ".", "--videos-dir", ".", "--out", "o"], "--videos-dir is not used"),
    (["--dataset", "synthetic", "--out", "o", "--frames", "32"], "--video-frames 16 is fewer than a clip needs"),
    # "--root $UNSET": "" was the working directory (every folder of it a class)
    (["--dataset", "folder", "--root", "", "--out", "o"], "--root is empty"),
    # a bucket as --root: "no such directory" (videos are read from local or mounted folders)
    (["--dataset", "ucf101", "--root", "s3://b/UCF101", "--out", "o"], "--root s3://b/UCF101: the videos are read "
                                                                       "from a local or mounted folder, not a URI"),
    (["--dataset", "synthetic", "--out", ""], "--out is empty"),
    # a URI where a local folder is read: the generator made ./s3:/... here, then failed in the encoder
    (["--dataset", "synthetic", "--out", "o", "--videos-dir", "s3://bucket/videos"],
     "--videos-dir s3://bucket/videos: videos and lists are read from local files"),
    (["--dataset", "ucf101", "--root", ".", "--lists-dir", "gs://bucket/lists", "--out", "o"],
     "--lists-dir gs://bucket/lists: videos and lists are read from local files"),
    # flags the layout never reads: ignored (--test-fraction with split folders was even recorded)
    (["--dataset", "ucf101", "--root", ".", "--test-fraction", "0.2", "--out", "o"],
     "--test-fraction is not used by --dataset ucf101 (only by folder)"),
    (["--dataset", "ucf50", "--root", ".", "--classes", "c.txt", "--out", "o"], "--classes is not used by --dataset ucf50"),
    (["--dataset", "kinetics", "--root", ".", "--num-classes", "3", "--out", "o"], "--num-classes is not used"),
])
def test_bad_flags_fail_fast_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        dvfl_main(["ingest", *argv])
    assert e.value.code == 2
    # the error line itself (the usage above it lists every flag: any message would have passed)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dvfl ingest: error: ") and flag in error, error


def _hashes(out):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(out, "shards", "*.parquet")))}


def _tmp_shards(out):
    """Half-written files: a shard's, or a piece's (a shard cut into several decode tasks)."""
    return glob.glob(os.path.join(out, "shards", ".*.tmp")) + glob.glob(os.path.join(out, "_parts", "**", ".*.tmp"), recursive=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_completes(tmp_path, ray_local, video_factory):
    from dvfl.data import adapters as A
    from dvfl.data.decode import TEST_HANG_MAGIC
    from dvfl.data.ingest import IngestConfig, ingest
    from dvfl.data.sampling import stable_seed

    # the last shard (split "unlabeled") holds a real video and then a file that hangs the decoder
    # (test hook, see test_ingest_bad_inputs.py) with a long limit: the run cannot finish before we
    # kill it, and the shard's temporary file (opened for the real video, which comes first in the
    # shard's seeded order) is on disk when we do
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "hang.mp4").write_bytes(TEST_HANG_MAGIC + b"\0" * 64)
    order = lambda name: stable_seed(0, "shard-order", f"unlabeled/pool/{name}")  # noqa: E731
    real = next(n for n in (f"v{i}" for i in range(100)) if order(n) < order("hang"))
    video_factory(str(pool / f"{real}.mp4"), n=12, h=40, w=48, seed=7)
    (tmp_path / "list.txt").write_text(f"pool/{real}.mp4\npool/hang.mp4\n")
    out = str(tmp_path / "out")
    args = [sys.executable, os.path.join(REPO, "pipelines", "ingest.py"), "--dataset", "synthetic", "--out", out,
            "--synthetic-classes", "4", "--train-per-class", "3", "--test-per-class", "1", "--videos-per-shard", "2",
            # one video per decode task: the real video's result is not held back by the hanging one
            "--videos-per-task", "1", "--unlabeled", str(tmp_path / "list.txt"), "--num-cpus", "3",
            "--object-store-mb", "256", "--quiet"]
    env = dict(os.environ, DVFL_INGEST_TEST_HOOKS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args + ["--timeout-per-file", "600"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # one video per task: the shard's second piece (the hanging file) is half-written in its worker; its
        # first (the real video) runs beside it, its own temporary file there for a moment on a busy machine
        hanging_only = lambda: [os.path.basename(p).split(".")[1:3] for p in _tmp_shards(out)] == [  # noqa: E731
            ["unlabeled-00000", "00001"]]
        deadline = time.time() + 300
        while time.time() < deadline and (len(_hashes(out)) < 8 or not hanging_only()):
            assert proc.poll() is None, "the run ended on its own"
            time.sleep(0.2)
        assert len(_hashes(out)) == 8, "the 8 shards before the hanging one were not written in time"
        partial = _tmp_shards(out)
        assert hanging_only(), partial
        # the driver and every Ray process it started, at once, mid-run, with a shard half-written
        # (killing the driver alone lets a decode worker notice and exit cleanly first, now and then)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # Ray processes the killed driver had started (its own session/process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert all(os.path.exists(p) for p in partial)  # the killed run left its temporary file behind
    shard_dir = os.path.join(out, "shards")
    assert not os.path.exists(os.path.join(shard_dir, "unlabeled-00000.parquet"))
    assert not os.path.exists(os.path.join(out, "dataset.json"))   # incomplete ingests have no dataset.json
    # every visible shard is complete and readable; temp files are invisible to Parquet readers
    for p in glob.glob(os.path.join(shard_dir, "*.parquet")):
        assert pq.read_table(p).num_rows == pq.ParquetFile(p).metadata.num_rows > 0
    assert pads.dataset(shard_dir, format="parquet").count_rows() == 28 - 0  # 12 train x 2 + 4 test x 1

    # re-run the same command (without the test hook the magic file is simply not a video)
    env.pop("DVFL_INGEST_TEST_HOOKS")
    r = subprocess.run(args + ["--timeout-per-file", "60"], env=env, capture_output=True, text=True, timeout=400,
                       start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "8 already done" in r.stdout and "== inputs 18" in r.stdout, r.stdout
    assert not _tmp_shards(out)  # the rerun removed the killed run's temporary file
    assert not os.path.exists(os.path.join(out, "_parts"))

    # identical to an uninterrupted run of the same inputs and parameters
    m = A.ucf101(os.path.join(out, "videos"), 1)
    m.dataset = "synthetic"
    m.extend(A.unlabeled(str(tmp_path / "list.txt")))
    ref = str(tmp_path / "ref")
    s = ingest(m, IngestConfig(out=ref, short_side=32, videos_per_shard=2), log=None)
    assert _hashes(ref) == _hashes(out) and len(_hashes(ref)) == 9
    assert s["rejects_by_reason"] == {"unknown_container": 1}  # the hang file, without test hooks
    import json

    written = json.load(open(os.path.join(out, "dataset.json")))
    assert written["fingerprint"] == s["fingerprint"]  # (the generator's settings, recorded, are not in it)
    assert (written["source"]["generator"]["num_classes"], written["source"]["generator"]["train_per_class"]) == (4, 3)


def test_out_inside_the_dataset_folder_is_refused(tmp_path, capsys):
    """An --out under --root of a layout whose sub-folders are classes would be read as one more
    class on the next run (``--dataset folder``, ``ucf50``): refused before any work."""
    from dvfl.cli import build_parser
    from dvfl.commands.ingest import validate

    root = tmp_path / "my_videos"
    (root / "cats").mkdir(parents=True)
    for argv, flag, src in (
            (["--dataset", "folder", "--root", str(root), "--out", str(root / "clips")], "--root", root),
            (["--dataset", "folder", "--root", str(root), "--out", str(root)], "--root", root),
            (["--dataset", "ucf50", "--root", str(root), "--out", str(root / "cats" / "o")], "--root", root)):
        with pytest.raises(SystemExit) as e:
            dvfl_main(["ingest", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--out {argv[argv.index('--out') + 1]} is inside {flag} {src}" in err, err
    # a sibling folder, even one whose name starts like the root's, is fine; so is a list-based
    # layout's output inside its root (its lists name the videos)
    for argv in (["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "my_videos_clips")],
                 ["--dataset", "ucf101", "--root", str(root), "--out", str(root / "clips")]):
        a = build_parser().parse_args(["ingest", *argv])
        validate(a.command_parser, a)


def test_unlabeled_videos_inside_a_class_folder_root_are_refused(tmp_path, capsys):
    """--unlabeled root/unlabeled with --dataset folder: the pool was also read as a labelled class
    'unlabeled' and trained on, and every pool entry refused as a duplicate."""
    root = tmp_path / "my_videos"
    (root / "cats").mkdir(parents=True)
    (root / "unlabeled").mkdir()
    with pytest.raises(SystemExit) as e:
        dvfl_main(["ingest", "--dataset", "folder", "--root", str(root), "--unlabeled", str(root / "unlabeled"),
                   "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert f"--unlabeled {root / 'unlabeled'} is inside --root {root}" in capsys.readouterr().err
    # beside the classes of a UCF50 archive (root/UCF50/<class>), or hidden: not a class, accepted
    from dvfl.cli import build_parser
    from dvfl.commands.ingest import validate

    ucf50 = tmp_path / "ucf50"
    for folder in ("UCF50/Biking", "pool", ".pool"):
        (ucf50 / folder).mkdir(parents=True)
    for pool in ("pool", ".pool"):
        a = build_parser().parse_args(["ingest", "--dataset", "ucf50", "--root", str(ucf50), "--unlabeled",
                                       str(ucf50 / pool), "--out", str(tmp_path / "out")])
        validate(a.command_parser, a)


def test_annotation_paths_may_hold_an_equals_sign_or_a_tilde(tmp_path, monkeypatch, capsys):
    """train=/lake/k400/v=2/train.csv was split at its last '=' (split "train=/lake/k400/v"): "no such file"."""
    from dvfl.cli import build_parser
    from dvfl.commands.ingest import validate

    lists = tmp_path / "v=2"
    lists.mkdir()
    for name in ("train.csv", "val.csv"):
        (lists / name).write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    a = build_parser().parse_args(["ingest", "--dataset", "kinetics", "--root", str(tmp_path), "--out",
                                   str(tmp_path / "out"), "--annotations", f"train={lists / 'train.csv'}",
                                   "--annotations", "Val=~/v=2/val.csv", "--annotations", str(lists / "train.csv")])
    validate(a.command_parser, a)
    assert a.annotations == [("train", str(lists / "train.csv")), ("val", str(lists / "val.csv")),
                             (None, str(lists / "train.csv"))]
    a = build_parser().parse_args(["ingest", "--dataset", "kinetics", "--root", str(tmp_path), "--out",
                                   str(tmp_path / "out"), "--annotations", "trian=x.csv"])
    with pytest.raises(SystemExit):
        validate(a.command_parser, a)
    assert "--annotations trian=x.csv: no such file (SPLIT= must be train, val or test)" in capsys.readouterr().err


def test_malformed_annotation_json_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "ssv2"
    root.mkdir()
    (root / "labels.json").write_text('{"Holding something": "0"}')
    (root / "train.json").write_text('[{"id": "1", "template": "Holding [something]"')  # cut short
    rc = dvfl_main(["ingest", "--dataset", "ssv2", "--root", str(root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "train.json: not a readable JSON file" in err, err


def test_given_clips_holding_an_unfinished_ingest_of_other_settings_are_a_config_error(tmp_path):
    """data.clips given, holding an interrupted ingest of other inputs or settings (the README's
    --unlabeled ingest cut short, then a run of the config): a ValueError traceback whose advice
    (--out, --fresh) named flags of `dvfl ingest`, not of the run."""
    import json

    from conftest import tiny_config
    from dvfl import pipeline
    from dvfl.config import ConfigError

    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "_plan.json").write_text(json.dumps({"fingerprint": "another", "shards": []}))
    cfg = tiny_config(tmp_path / "run", [("data.clips", str(clips))])
    with pytest.raises(ConfigError, match=r"^data.clips: .* holds an unfinished ingest of other inputs or settings "
                                          r"than this config's: finish the ingest that wrote it, or re-ingest it with "
                                          r"`dvfl ingest ... --out .* --fresh`"):
        pipeline.ensure_clips(cfg, log=lambda *_: None)
    assert json.loads((clips / "_plan.json").read_text())["fingerprint"] == "another"  # never overwritten


def test_the_drivers_size_probe_opens_only_files_of_a_supported_container(tmp_path, video_factory):
    """--short-side 0 sizes tasks from the largest source frame, probed in the driver before the
    decode child's checks: FFmpeg followed a listed concat file (or playlist) to a video outside the
    root, and would hang on a FIFO with no time limit."""
    from dvfl.data import decode
    from dvfl.data.ingest import _checked_coded_size

    outside = video_factory(str(tmp_path / "outside" / "secret.ts"), h=48, w=64)
    playlist = tmp_path / "root" / "A" / "local.m3u8"
    playlist.parent.mkdir(parents=True)
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{outside}\n#EXT-X-ENDLIST\n")
    assert decode.coded_size(str(playlist)) == (48, 64)  # what FFmpeg's own probing does with it
    assert _checked_coded_size(str(playlist)) is None
    assert _checked_coded_size(outside) == (48, 64)
    os.mkfifo(tmp_path / "root" / "A" / "pipe.ts")
    assert _checked_coded_size(str(tmp_path / "root" / "A" / "pipe.ts")) is None  # at once, not a hang


def test_ingest_fresh_says_once_it_has_deleted_the_earlier_ingest(tmp_path, video_factory):
    """Ctrl+C in `ingest --fresh` advised "run the same command again without --fresh to resume"
    even before the delete, where that rerun is refused (another fingerprint): the command now
    learns when the delete is done (dvfl.cli.run_command's hint)."""
    from dvfl.data.adapters import folder
    from dvfl.data.ingest import IngestConfig, ingest

    root, out = tmp_path / "videos", tmp_path / "out"
    for c in ("a", "b"):
        video_factory(str(root / c / "1.mp4"))
    out.mkdir()
    (out / "_plan.json").write_text('{"fingerprint": "an earlier ingest"}')
    (out / "dataset.json").write_text("{}")

    class Deleted(Exception):
        pass

    def deleted():
        assert not (out / "_plan.json").exists() and not (out / "dataset.json").exists()
        raise Deleted  # (stops before any decode: no Ray needed)

    with pytest.raises(Deleted):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32, overwrite=True), log=None, fresh_done=deleted)


def test_a_command_whose_output_goes_to_a_pipe_writes_each_line_when_printed(tmp_path, video_factory):
    """`python pipelines/ingest.py ... > run.log` (or `| tee`): Python held 8 KiB of stdout back, so
    a waiting ingest's line (and a long run's epoch lines) showed only when the command ended."""
    import select

    from test_reliability import _hold_lock

    root, out = tmp_path / "videos", tmp_path / "out"
    for c in ("a", "b"):
        video_factory(str(root / c / "1.mp4"))
    holder = _hold_lock(out, 120, "ingest")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (as a user's shell has it)
    env["PYTHONPATH"] = REPO
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "pipelines", "ingest.py"), "--dataset", "folder",
                             "--root", str(root), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and "waiting for it to end" in proc.stdout.readline(), proc.poll()
    finally:
        proc.terminate()  # (while it waits: before any video is read or Ray starts)
        proc.wait(60)
        holder.kill()
        holder.wait()
    assert proc.returncode == 143, proc.stderr.read()


class Planned(Exception):
    """The ingest planned its work and would decode next (raised by :func:`_logging_until_planned`)."""


def _logging_until_planned(logged: list):
    """An ingest log that keeps its lines in ``logged`` and stops the ingest once its plan is written
    and the decode is next: what comes before needs no Ray."""
    def log(line):
        if line.startswith("[ingest] folder: "):
            raise Planned(line)
        logged.append(line)
    return log


def test_the_plan_of_an_ingest_that_committed_nothing_is_replaced_without_fresh(tmp_path, video_factory):
    """An ingest of a root with no video it could take wrote its _plan.json and nothing else; the
    corrected rerun was refused ("already holds an ingest with a different fingerprint ... --fresh").
    A shard or a dataset.json in the folder still refuses it: that is an ingest's work. The ingest
    command replaces such a plan (``replace_uncommitted``); a run's given data.clips never does."""
    from dvfl.data.adapters import folder
    from dvfl.data.ingest import IngestConfig, ingest

    root, out = tmp_path / "videos", tmp_path / "out"
    for seed, c in enumerate("ab"):
        video_factory(str(root / c / "1.mp4"), seed=seed)
    out.mkdir()
    (out / "_plan.json").write_text('{"fingerprint": "an ingest that wrote nothing", "shards": []}')

    logged = []
    log = _logging_until_planned(logged)
    with pytest.raises(Planned):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32, replace_uncommitted=True), log=log)
    assert f"[ingest] note: {out} holds the plan of an ingest that committed no shard: replaced" in logged
    assert json.loads((out / "_plan.json").read_text())["fingerprint"] != "an ingest that wrote nothing"
    for committed in ("dataset.json", "shards/_meta/train-00000.json", "shards/train-00000.parquet"):
        (out / "_plan.json").write_text('{"fingerprint": "an ingest that wrote nothing", "shards": []}')
        (out / committed).parent.mkdir(parents=True, exist_ok=True)
        (out / committed).write_text("{}")
        with pytest.raises(ValueError, match="already holds an ingest with a different fingerprint"):
            ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32, replace_uncommitted=True), log=None)
        (out / committed).unlink()
    # the ingest command's choice: a run's given data.clips is never replaced
    # (test_given_clips_holding_an_unfinished_ingest_of_other_settings_are_a_config_error)
    with pytest.raises(ValueError, match="already holds an ingest with a different fingerprint"):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32), log=None)


def test_an_ingest_whose_every_input_was_rejected_is_replaced_without_fresh(tmp_path, video_factory):
    """Every input rejected (a codec it cannot read): the run committed shards of no clip, exited 1, and
    its rerun on the re-encoded videos was refused ("... different fingerprint ...; pass --fresh").
    The ingest command replaces it; a shard holding a clip, a finished ingest, or a file of the
    user's in shards/ still refuses it, deleting nothing."""
    from dvfl.data.adapters import folder
    from dvfl.data.ingest import IngestConfig, ingest

    root, out = tmp_path / "videos", tmp_path / "out"
    for seed, c in enumerate("ab"):
        video_factory(str(root / c / "1.mp4"), seed=seed)

    def rejected_run(clips=0):
        (out / "shards" / "_meta").mkdir(parents=True, exist_ok=True)
        (out / "_plan.json").write_text('{"fingerprint": "the inputs before re-encoding", "shards": []}')
        (out / "rejects.jsonl").write_text('{"video_id": "a/1", "reason": "decode_error"}\n')
        (out / "shards" / "train-00000.parquet").write_text("an empty shard")
        (out / "shards" / "_meta" / "train-00000.json").write_text(json.dumps({"clips": clips, "videos": 1}))

    logged = []
    log = _logging_until_planned(logged)
    rejected_run()
    with pytest.raises(Planned):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32, replace_uncommitted=True), log=log)
    assert f"[ingest] note: {out} holds an ingest that wrote no clip (every input rejected): replaced" in logged
    assert not (out / "rejects.jsonl").exists() and not (out / "shards" / "train-00000.parquet").exists()
    assert json.loads((out / "_plan.json").read_text())["fingerprint"] != "the inputs before re-encoding"

    rejected_run()  # the settings a run gives never replace it
    with pytest.raises(ValueError, match="already holds an ingest with a different fingerprint"):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32), log=None)
    rejected_run(clips=3)  # a shard of clips is work
    with pytest.raises(ValueError, match="already holds an ingest with a different fingerprint"):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32, replace_uncommitted=True), log=None)
    rejected_run()
    (out / "shards" / "my_notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match=r"replacing an ingest that wrote no clip deletes .*shards, which holds "
                                         r"files no ingest writes \(my_notes\.txt\): nothing was deleted"):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32, replace_uncommitted=True), log=None)
    assert (out / "rejects.jsonl").exists() and (out / "shards" / "train-00000.parquet").exists()
    (out / "shards" / "my_notes.txt").unlink()
    (out / "dataset.json").write_text("{}")  # a finished ingest (of no clip) is never replaced
    with pytest.raises(ValueError, match="already holds an ingest with a different fingerprint"):
        ingest(folder(str(root)), IngestConfig(out=str(out), short_side=32, replace_uncommitted=True), log=None)


def test_keeping_an_earlier_draw_names_the_classes_it_left_without_a_training_video(tmp_path):
    """Split rule 1 drew video by video: B's only video went to test. Kept for the folder it made,
    that draw teaches no model class B; the notes printed with the listing describe the new draw,
    which keeps every class a training video, so the kept draw's gap is said when it is kept."""
    from dvfl.data.adapters import folder
    from dvfl.data.ingest import IngestConfig, _plan_ingest

    root, out = tmp_path / "videos", tmp_path / "out"
    for rel in ("A/a0", "A/a1", "A/a2", "A/a3", "A/a4", "B/b2"):  # (bytes of their own; no decode here)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{rel}.mp4").write_text(rel)
    cfg = IngestConfig(out=str(out), short_side=32)
    earlier = folder(str(root), test_fraction=0.2)
    assert earlier.earlier_splits["B/b2"] == "test" and {e.video_id: e.split for e in earlier.entries}["B/b2"] == "train"
    for e in earlier.entries:
        e.split = earlier.earlier_splits[e.video_id]
    earlier.earlier_splits = {}
    out.mkdir()
    (out / "_plan.json").write_text(json.dumps({"fingerprint": _plan_ingest(earlier, cfg, None).fingerprint}))
    logged = []
    _plan_ingest(folder(str(root), test_fraction=0.2), cfg, logged.append)
    assert any("drew video by video (cuts of one recording can be on both sides): kept" in ln for ln in logged), logged
    assert "[ingest] note: in that draw 1 class(es) have no training video (B): no model learns them" in logged
