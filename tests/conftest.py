"""Shared test fixtures.

``ray_local``: one local Ray instance per test process (start-up costs seconds; one per pytest-xdist worker),
with explicit logical CPUs and a small object store, as verified in
shared/reference/ray-2.60-notes.md. 3 logical CPUs on a 2-core machine keep one CPU
free for Ray Data next to 2 decode tasks / 2 fractional Train workers. Tests that need
Ray take this fixture; it shuts Ray down at the end of the session.

Video factories (real encoded files through PyAV) for the data tests live here too.

``prepared``: one tiny synthetic dataset ingested with the real Ray Data pipeline, a tiny teacher
trained on it with 2 DDP workers, and its logit cache, built once per run and shared by the
distillation and the Tune tests (``TINY`` is its run config); under pytest-xdist (``make test``) each
worker gets its own copy of the one build, since tests write into its folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys

import numpy as np
import pytest

RAY_TEST_CPUS = 3
RAY_TEST_OBJECT_STORE = 512 * 2 ** 20
# Ray Train starts a spot-preemption watcher actor for every run (a process, ~2.5 s of CPU here);
# nothing in the tests is ever preempted. Processes started by the tests inherit this.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


TINY = [
    ("data.synthetic.num_classes", 4), ("data.synthetic.train_per_class", 12),
    ("data.synthetic.test_per_class", 4), ("teacher.train.embed_dim", 16), ("teacher.optim.epochs", 4),
    ("teacher.optim.lr", 0.001), ("student.embed_dim", 8), ("optim.epochs", 2), ("teacher.train.drop_path_rate", 0.0),
    # no unlabelled pool here: the tests that need one add it (see test_unlabeled_distill.py)
    ("data.synthetic.unlabeled_videos", 0), ("data.clips_per_video", 2),
    # a 4-epoch teacher on 44 videos is near chance by design (it only has to run): the sanity
    # gate is tested on its own (test_holdout.py), not on every tiny run
    ("teacher.min_top1_over_chance", -1.0),
    # the embedded default ships its teacher (models/embedded_teacher) and runs four students x
    # three seeds side by side in runner actors; the tiny runs train their own teacher on a pool of
    # their own and use Ray Train (DDP) instead
    ("teacher.path", None), ("seeds", [0]), ("students", None), ("long_baseline", False), ("data.teacher_pool", 0.6667),
    # the mechanics on clean labels: wrong labels unbalance the tiny classes and slow the fit the tests check
    ("data.synthetic.label_noise", 0.0),
    # validation carved from the training videos (the default's own checked split: test_readme_commands)
    ("data.synthetic.val_per_class", 0),
    ("teacher.optim.batch_size", 16), ("scaling.num_workers", 2), ("scaling.cpus_per_worker", 0.5),
    ("scaling.concurrent_runs", 0),
]
# One-worker runs in runner actors (teacher, then students two at a time): what the embedded default
# does, for the tests whose subject is not DDP; a Ray Train worker group costs ~30 s to start here.
RUNNERS = [("scaling.num_workers", 1), ("scaling.cpus_per_worker", 1), ("scaling.concurrent_runs", 2)]


# `make test` hands whole files to two workers (--dist loadfile). xdist orders them by test count;
# the files that take minutes go first instead, longest first, so both workers end together (session
# 29: ~1,050 s of test time each, the count order left one ~50 s behind). The second needs no
# `prepared`, which the first worker builds meanwhile. Files not named keep xdist's order after them.
LONGEST_FILES_FIRST = ("test_teacher_and_distill.py", "test_object_storage.py", "test_tune.py",
                       "test_readme_commands.py", "test_reliability.py", "test_deploy.py", "test_cluster_runs.py",
                       "test_readme_ucf101.py", "test_protocol.py")


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFilesFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            if not getattr(self, "reordered", False):  # the queue is complete before the first unit goes out
                rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
                for scope in sorted(self.workqueue, key=lambda s: rank.get(os.path.basename(s), len(rank))):
                    self.workqueue.move_to_end(scope)
                self.reordered = True
            super()._assign_work_unit(node)

    return LongestFilesFirst(config, log)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a Ray started beside the session's needs ports of its own)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_args(pairs) -> list[str]:
    """``--set key=value`` flags for (key, value) pairs, values written as YAML reads them back
    (None -> null, True -> true, lists as lists)."""
    import json

    return [arg for key, value in pairs
            for arg in ("--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}")]


def cli_in_process(script: str, *args):
    """``python pipelines/<script> ARGS`` run in this test process: the script's own parser and
    ``run_command``, its exit status, stdout and stderr (a ``CompletedProcess``), without a new
    interpreter importing torch and the package (~5 s a command on 2 busy cores). Tests whose
    subject is the process (signals, entry points, what it leaves at exit) start a real one."""
    import contextlib
    import io
    import subprocess

    import torch

    from dvfl.cli import COMMANDS, script_main

    (name,) = [n for n, (_, path) in COMMANDS.items() if path and os.path.basename(path) == script]
    argv = [str(a) for a in args]
    threads = torch.get_num_threads()  # a command's --threads must not slow the tests after it
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = script_main(name, argv)
        except SystemExit as exc:  # argparse's usage errors (2), sys.exit(message)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def tiny_config(output_dir, extra=()):
    from dvfl.config import load_config

    return load_config(None, [("output_dir", str(output_dir)), *TINY, *extra])


@pytest.fixture(scope="session", autouse=True)
def no_scratch_left_by_killed_processes():
    """The fault tests SIGKILL workers and runners, which leave their scratch folders behind (a
    later run would sweep them after STALE_SECONDS); remove those of dead owners when the tests end."""
    yield
    from dvfl.scratch import SCRATCH_KINDS, sweep_dead

    for kind in SCRATCH_KINDS:
        sweep_dead(kind, stale_seconds=0)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    started = False
    if not ray.is_initialized():
        # its workers do not inherit what the package sets in a driver's environment, as those of a
        # cluster a user's command joins do not (the commands the tests start join this instance)
        data_log_level = os.environ.pop("RAY_DATA_LOG_LEVEL", None)
        # address="local": a fresh instance even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=RAY_TEST_CPUS, object_store_memory=RAY_TEST_OBJECT_STORE, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
        if data_log_level is not None:
            os.environ["RAY_DATA_LOG_LEVEL"] = data_log_level
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, ray_local):
    """Clips (several shards), a teacher trained with 2 DDP workers, and its cache. Under
    pytest-xdist the first worker builds it (a file lock) and every worker works on its own copy:
    tests write into its folder."""
    import shutil

    from filelock import FileLock  # installed with torch (one of its requirements)

    from dvfl import pipeline

    out = tmp_path_factory.mktemp("prepared")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _build_prepared(out)
    run_dir = tmp_path_factory.getbasetemp().parent   # shared by this run's workers
    shared = run_dir / "prepared-shared"
    with FileLock(str(run_dir / "prepared-shared.lock")):
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)
            _build_prepared(shared)
            (shared / ".built").touch()
    shutil.copytree(shared, out, dirs_exist_ok=True)   # copy2: mtimes kept, so nothing looks rebuilt
    cfg = tiny_config(out)
    info = _load_info(cfg)
    # the copy is found valid as it is: the teacher and the cache are reused, not rebuilt
    teacher_path, spec = pipeline.ensure_teacher(cfg, info, log=lambda *_: None)
    cache_info = pipeline.ensure_cache(cfg, teacher_path, log=lambda *_: None)
    return {"cfg": cfg, "info": info, "teacher": teacher_path, "spec": spec, "cache": cache_info}


def _load_info(cfg):
    from dvfl.data.shards import load_dataset_info

    return load_dataset_info(cfg.clips_dir)


def checkpoint_temp_folders_of(history: list) -> list:
    """``dvfl-ckpt-*`` folders in the temp dir holding one of this run's epoch states (found by
    content: a leaked state.pt holds one of the run's epochs, down to its measured epoch time)."""
    import glob
    import tempfile

    import torch

    marks = {h["epoch_seconds"] for h in history}
    leaked = []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "dvfl-ckpt-*")):
        try:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # another run's folder, being written or not a checkpoint
            continue
        if state.get("history") and state["history"][-1]["epoch_seconds"] in marks:
            leaked.append(d)
    return leaked


def _build_prepared(out) -> dict:
    from dvfl import pipeline
    from dvfl.data.adapters import build_manifest
    from dvfl.data.ingest import IngestConfig, ingest

    cfg = tiny_config(out)
    generated = pipeline.ensure_videos(cfg, log=None)
    ingest(build_manifest("synthetic", generated["root"], 1),
           IngestConfig(out=cfg.clips_dir, frames=8, clips_per_video=2, eval_clips=1, short_side=32,
                        videos_per_shard=8, progress=False), log=lambda *_: None)
    info = _load_info(cfg)
    ctrl_c = signal.getsignal(signal.SIGINT)
    teacher_path, spec = pipeline.ensure_teacher(cfg, info)  # a Ray Train run in this process
    # (Ray Train's fit() left its own Ctrl+C handler installed: test_teacher_and_distill reads this)
    (out / "sigint_after_ray_train.json").write_text(json.dumps({"kept": signal.getsignal(signal.SIGINT) is ctrl_c}))
    # its checkpoints' temp folders, looked for now: later training processes sweep dead owners' ones
    (out / "ckpt_temp_folders_left.json").write_text(json.dumps(checkpoint_temp_folders_of(spec["history"])))
    cache_info = pipeline.ensure_cache(cfg, teacher_path)
    return {"cfg": cfg, "info": info, "teacher": teacher_path, "spec": spec, "cache": cache_info}


def direct_top1(model_dir, clips_dir, splits=None) -> dict:
    """Top-1 per split of a plain forward on every clip's centre view (the reference computation)."""
    import torch

    from dvfl.artifacts import load_model
    from dvfl.data.shards import read_clips_table
    from dvfl.data.views import View, batch_arrays, make_clip_batch, normalize

    clips = read_clips_table(clips_dir, splits, columns=["clip_id", "label", "split", "frames", "num_frames",
                                                         "height", "width"])
    model, _ = load_model(model_dir)
    arrays, _, labels = batch_arrays(clips)
    with torch.inference_mode():
        hits = model.eval()(normalize(make_clip_batch(arrays, 32, [View()] * len(arrays)))).argmax(1).numpy() == labels
    split_of = clips.column("split").to_pylist()
    return {s: float(hits[[x == s for x in split_of]].mean()) for s in set(split_of)}


# What only Linux has (/proc, prctl, network namespaces, glibc's allocator, the unshare tool) and
# what only decord's x86_64 wheels give: skipped on a Mac's or an aarch64 laptop's `make test`
# (never on CI, x86_64 Linux, where every test runs)
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc or needs Linux-only calls")
# (found, not imported: decord's own FFmpeg libraries loaded first break PyAV's VP9 encoder in the
# processes that write the tests' videos)
needs_decord = pytest.mark.skipif(importlib.util.find_spec("decord") is None,
                                  reason="compares with decord or reads what its path says (a frame count it lists); "
                                         "decord has no wheel for this machine")


# ---------------------------------------------------------------------------------------
# real video files

def moving_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, h, w, 3): a bright square moving over a gradient; every frame differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 80)], -1)
    base = (base + rng.integers(0, 40, size=3)).clip(0, 255).astype(np.uint8)
    out = np.repeat(base[None], n, axis=0)
    s = max(2, min(h, w) // 4)
    for t in range(n):
        y = (t * 2) % max(h - s, 1)
        x = (t * 3) % max(w - s, 1)
        out[t, y:y + s, x:x + s] = (255, 255, 255)
    return out


def write_video(path: str, n: int = 12, h: int = 32, w: int = 32, fps: float = 8, codec: str = "libx264",
                seed: int = 0, rotation: int = 0, options: dict | None = None, tags: dict | None = None,
                container_options: dict | None = None) -> str:
    """Encode a real video file with PyAV. Containers from the extension (mp4, avi, webm, mkv, mpg,
    ts, ...); ``rotation``: a display rotation in the container (counter-clockwise degrees, FFmpeg's
    convention; a phone's portrait video has -90), the frames stored as given; ``options``: the
    encoder's (``{"bf": "2"}``: B-frames); ``tags``: the stream's metadata (``{"rotate": "90"}``);
    ``container_options``: the muxer's (``{"movflags": "faststart"}``: the MP4 header first)."""
    import fractions

    import av

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames = moving_frames(n, h, w, seed)
    rate = fractions.Fraction(fps).limit_denominator(1000)
    with av.open(path, "w", options=container_options or {}) as c:
        st = c.add_stream(codec, rate=rate)
        st.width, st.height = w, h
        st.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if rotation:
            st.set_display_rotation(rotation)
        if codec == "libx264":
            st.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        if options:
            st.options = {**st.options, **options}
        for key, value in (tags or {}).items():
            st.metadata[key] = value
        for f in frames:
            for p in st.encode(__import__("av").VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return path


def make_videos(specs) -> None:
    """Write many videos in a fresh subprocess: ``specs = [(path, {n, h, w, fps, codec, seed}), ...]``.

    Encoding runs outside the test process on purpose: once decord (which bundles its own
    FFmpeg libraries) is loaded in a process, PyAV's libvpx-vp9 encoder fails to open there.
    """
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from conftest import write_video\n"
            "for path, kw in json.load(sys.stdin): write_video(path, **kw)\n")
    subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                   input=json.dumps([[p, kw] for p, kw in specs]), text=True, check=True)


@pytest.fixture(scope="session")
def video_factory():
    """``video_factory(path, n=12, h=32, w=32, fps=8, codec="libx264", seed=0, rotation=0) -> path`` (subprocess)."""
    def make(path, **kw):
        make_videos([(path, kw)])
        return path
    return make


# ---------------------------------------------------------------------------------------
# a real S3 API server (moto's standalone server) on 127.0.0.1

S3_ENV = {"AWS_ACCESS_KEY_ID": "dvfl-test", "AWS_SECRET_ACCESS_KEY": "dvfl-test", "AWS_SESSION_TOKEN": None,
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": None, "AWS_ENDPOINT_URL_S3": None,
          # no ~/.aws files, no instance-metadata lookups: only the dummy credentials above
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """``{"endpoint", "env", "new_bucket()"}``: moto's S3 server on a free port, with dummy
    credentials and AWS_ENDPOINT_URL set in this process's environment for the session (restored
    afterwards). Processes started from the tests (pipelines/*.py, their local Ray) inherit it;
    the session Ray of ``ray_local`` may predate it, so in-process Ray tests do not use S3."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    import uuid

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    # its request log goes to a file: a pipe nobody reads fills up and then blocks every request
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    log_file = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log_file.close()
                raise RuntimeError(f"moto server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

    def new_bucket(prefix: str = "dvfl") -> str:
        import pyarrow.fs as pafs

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir(name)
        return name

    try:
        yield {"endpoint": endpoint, "env": {k: v for k, v in env.items() if v is not None}, "new_bucket": new_bucket}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def s3_objects(uri: str) -> dict:
    """``{key below uri: size}`` of every object under an s3:// prefix (through dvfl.storage)."""
    import pyarrow.fs as pafs

    from dvfl import storage

    fs, p = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=True))
    return {i.path[len(p) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}
