"""The README's commands, run as a user types them (issue 24).

Each test runs the command in a subprocess from the root of a copy of this checkout (what a fresh
clone holds), with the README's relative paths, adding only ``--set`` overrides that shrink the
run. The commands are read from README.md itself, so the two cannot drift apart. A test fails on a
non-zero exit, an errored Tune trial, or results missing from the place the command printed.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dvfl.data.shards import read_clips_table

from conftest import RUNNERS, TINY, direct_top1, free_port, linux_only, set_args

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)  # the venv's python and ray, as after `source .venv/bin/activate`


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block after ``heading`` (continuations joined, comments cut)."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.strip() and not line.startswith("#")]


def command(heading: str, starts_with: str) -> list[str]:
    (line,) = [c for c in readme_block(heading) if c.startswith(starts_with)][:1]
    return shlex.split(line)


def sets(pairs) -> list[str]:
    return set_args(pairs)


def run(args, cwd, env=None, timeout=900):
    exe = [sys.executable, *args[1:]] if args[0] == "python" else args
    return subprocess.run(exe, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the files a clone of this checkout has (tracked and untracked-not-ignored)."""
    root = tmp_path_factory.mktemp("clone") / "dvfl"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


# The embedded default, shrunk: its shipped teacher (8 classes: so 8 here too), its wrong labels
# and its four students (one seed), on a few videos each; one-worker runs in runner actors, as the
# embedded default trains its students (DDP is tested elsewhere).
AS_THE_DEFAULT = {"teacher.path", "students", "long_baseline", "data.teacher_pool", "data.synthetic.num_classes",
                  "data.synthetic.label_noise", "data.synthetic.val_per_class"}
DEMO_SETS = [*[(k, v) for k, v in TINY if k not in AS_THE_DEFAULT], ("data.synthetic.train_per_class", 3),
             ("data.synthetic.test_per_class", 2), ("data.synthetic.val_per_class", 1), ("data.synthetic.unlabeled_videos", 6), *RUNNERS]


@pytest.fixture(scope="module")
def demo(checkout, ray_local):
    """`python pipelines/distill.py` from the checkout's root: outputs in ./runs/embedded."""
    env = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    first = run(["python", "pipelines/distill.py", *sets(DEMO_SETS)], checkout, env)
    again = run(["python", "pipelines/distill.py", *sets(DEMO_SETS)], checkout, env) if first.returncode == 0 else None
    return {"first": first, "again": again, "out": checkout / "runs" / "embedded", "env": env}


@pytest.mark.slow
def test_distill_as_typed_writes_where_it_says(demo, checkout):
    r, out = demo["first"], demo["out"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"results in {out}" in r.stdout  # the absolute path, printed
    report = json.loads((out / "results.json").read_text())
    models = report["models"]
    # the generator's settings recorded with the clips (a later run given them is told what differs)
    made = json.loads((out / "clips" / "dataset.json").read_text())["source"]["generator"]
    assert (made["train_per_class"], made["unlabeled_videos"], made["seed"]) == (3, 6, 0), made
    students = ("vfl", "vfl_long", "dvfl", "dvfl+unlabeled")
    assert set(models) == {"teacher", *students}
    # each row's top-1 is its model's accuracy on the test split (1 clip x 1 crop per video here)
    dirs = {"teacher": checkout / "models" / "embedded_teacher",
            **{role: next((out / "students").glob(f"{role.replace('+', '-')}-s0-*")) for role in students}}
    for role, row in models.items():
        assert row["top1_per_seed"] == [pytest.approx(direct_top1(dirs[role], str(out / "clips"), ["test"])["test"],
                                                      abs=1e-9)], role
        assert row["top1_mean"] == row["top1_per_seed"][0] and row["params"] > 0 and row["gmacs"] > 0
    # the terminal: our own lines, one per epoch, and none of Ray's or PyTorch's known noise
    output = r.stdout + r.stderr
    for noise in ("PreemptionWatcher", "Grad strides do not match", "Progress bars disabled", "DeprecationWarning",
                  "Use 'expr' instead of 'fn'", "Token authentication is enabled",
                  "has constructor arguments in the object store", "Starting execution of Dataset"):
        assert noise not in output, noise
    # the shipped teacher is used, not trained; with scaling.concurrent_runs the students train in runner actors
    assert "[teacher] training" not in output and f"[eval] {dirs['teacher']}: split test" in output
    # the test split read once, at the end: the teacher's top-1 after the students were trained, not
    # before the driver started them (session 41; the runners' own lines reach the driver's terminal late)
    teacher_eval = r.stdout.index(f"[eval] {dirs['teacher']}: split test")
    started = [m.start() for m in re.finditer(r"^\[\S+ s0\] training .* on a runner", r.stdout, re.M)]
    assert len(started) == len(students) and max(started) < teacher_eval, r.stdout[-3000:]
    assert teacher_eval < min(r.stdout.index(f"[eval] {dirs[role]}: split test") for role in students)
    assert re.search(r"^\[dvfl s0\] training .* on a runner", r.stdout, re.M), r.stdout[-3000:]
    for ours in ("[ingest] ", "[cache] ", "[vfl s0] done", "[vfl_long s0] done", "[dvfl s0] done", "[report] "):
        assert ours in output, ours
    # each epoch line once, as the runner printed it (no "(LoopRunner pid=...)" before it)
    epochs = re.findall(r"^\[(?:vfl|vfl_long|dvfl|dvfl\+unlabeled) s0\] epoch \d+/\d+: loss", output, re.M)
    assert len(epochs) == 2 + 4 + 2 + 2, output[-3000:]  # 2 epochs per student, 4 for vfl_long
    # each run's first epoch line names where it trained (on a GPU: "on cuda, bf16"), the rest do not
    where = re.findall(r"^\[(\S+) s0\] epoch (\d+)/\d+: .* on cpu, (?:fp32|bf16)$", output, re.M)
    assert sorted(where) == sorted((role, "1") for role in students), where
    # each run says it is done once, after its last epoch line (not overtaken by a line of the driver's)
    lines = r.stdout.splitlines()
    for role in students:
        done = [i for i, line in enumerate(lines) if line.startswith(f"[{role} s0] done in ")]
        last_epoch = max(i for i, line in enumerate(lines) if line.startswith(f"[{role} s0] epoch "))
        assert len(done) == 1 and done[0] > last_epoch, (role, lines[last_epoch - 2:last_epoch + 3])
    assert models["dvfl"]["params"] == models["vfl"]["params"] < models["teacher"]["params"]
    # issue 17: the table is on test, evaluated once; every choice and curve read the held-out val
    assert report["splits"]["top1"] == "test" and all(row["split"] == "test" for row in models.values())
    # the default's validation videos are a checked split of their own, not carved out of its mislabelled ones
    assert report["splits"]["validation"] == "split 'val'" == report["splits"]["history"]
    assert "Evaluation (top-1, top-5): 1 clips x 1 crops, split test" in (out / "results.md").read_text()
    # which std it is (a population std is 0.82x a 3-seed sample std): said, as protocol.json says it
    assert report["std"].startswith("sample standard deviation (n-1)")
    assert "Std: sample standard deviation (n-1) over the seeds." in (out / "results.md").read_text()
    assert report["config"]["output_dir"] == str(out)
    gains = report["kd_gains"]  # the issue-5 comparison, per seed, from the same rows
    assert gains["dvfl_minus_vfl_points"] == [
        pytest.approx(100 * (models["dvfl"]["top1_per_seed"][0] - models["vfl"]["top1_per_seed"][0]), abs=0.01)]
    assert "Per seed, DVFL-Net minus VFL-Net" in (out / "results.md").read_text()
    assert (out / "training_curves.png").stat().st_size > 10_000
    # the cached-KD student reported CE, KD and total each epoch
    (dvfl_dir,) = (out / "students").glob("dvfl-s*")
    history = json.loads((dvfl_dir / "model.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train_kd"] > 0 and h["train_ce"] > 0 for h in history)
    # the README's TensorBoard line reads the per-epoch curves of every training run
    (tb_line,) = [c for c in readme_block("### Ray Jobs and dashboards") if c.startswith("tensorboard")]
    tb = shlex.split(tb_line)
    board = subprocess.run([os.path.join(BIN, "tensorboard"), "--inspect", "--logdir", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert tb[:2] == ["tensorboard", "--logdir"] and board.returncode == 0, board.stderr[-2000:]
    assert "val_top1" in board.stdout and "train_loss" in board.stdout
    # a second run reuses every stage (fingerprints unchanged)
    again = demo["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") >= 4
    assert not re.search(r"^\[(teacher|vfl|vfl_long|dvfl|dvfl\+unlabeled)( s\d+)?\] training", again.stdout, re.M)


def search_command(*extra) -> list[str]:
    """README: `python tuning/search.py` after the demo, shrunk to 2 one-epoch trials on 1 worker
    (no front re-runs: tests/test_tune.py covers them), one at a time: the test session's shared Ray
    has 3 logical CPUs, not the 4 of the local instance a search starts on 2 cores."""
    cmd = command("## Hyper-parameter search (Ray Tune)", "python tuning/search.py")
    return cmd + sets([*DEMO_SETS, ("optim.epochs", 1), ("scaling.num_workers", 1), ("tune.num_samples", 2),
                       ("tune.space.student.embed_dim", {"choice": [8]}),  # not the grid of 3 widths
                       ("tune.asha.grace_period", 1), ("tune.front_seeds", []), ("tune.max_concurrent_trials", 1),
                       *extra]) + ["--quiet"]


@pytest.mark.slow
def test_tune_search_as_typed_after_the_demo(demo, checkout):
    assert demo["first"].returncode == 0
    r = run(search_command(), checkout, demo["env"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = demo["out"] / "tune" / "embedded-tune"  # the README's default place, under the checkout
    summary = json.loads((exp / "tune_results.json").read_text())
    assert summary["trials"] == 2 and summary["errors"] == 0, [row["error"] for row in summary["rows"]]
    assert summary["best"] is not None and summary["best"]["best_top1"] is not None
    assert (exp / "best_config.yaml").is_file()
    assert "reusing" in r.stdout  # the demo's teacher, not a new one
    # ASHA and the best config read the validation split's clips at each epoch, not the test split's
    val_clips = read_clips_table(str(demo["out"] / "clips"), ["val"], columns=["video_id"]).num_rows
    assert val_clips == 8  # 8 classes x 1 checked video (DEMO_SETS)
    for row in summary["rows"]:
        with open(Path(row["path"]) / "progress.csv") as f:
            assert {int(float(e["val_clips"])) for e in csv.DictReader(f)} == {val_clips}
    assert "trial(s) errored" not in r.stdout + r.stderr
    # --quiet: our lines only, not Ray Tune's experiment box or its TensorBoard hint to /tmp/ray
    for noise in ("Configuration for experiment", "View detailed results here", "To visualize your results"):
        assert noise not in r.stdout + r.stderr, noise
    # one line per trial-epoch, named by its trial, printed by the search before its results
    lines = r.stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if re.match(r"\[trial \w+\] epoch 1/1: loss ", line)]
    ids = {re.match(r"\[trial (\w+)\]", lines[i]).group(1) for i in epochs}
    assert len(epochs) == 2 and ids == {row["trial_id"] for row in summary["rows"]}, r.stdout[-3000:]
    assert all(re.search(r" on cpu, (?:fp32|bf16)$", lines[i]) for i in epochs), [lines[i] for i in epochs]
    assert max(epochs) < next(i for i, line in enumerate(lines) if line.startswith("[tune] best:"))


@pytest.mark.slow
def test_search_whose_trials_all_fail_exits_nonzero_with_the_first_error(demo, checkout):
    """Every trial raises (a batch larger than the training split): the command must not say
    `finished`, and the first trial's error (exception and where it was raised) is printed."""
    assert demo["first"].returncode == 0
    r = run(search_command(("optim.batch_size", 100_000), ("tune.experiment", "all-fail")), checkout, demo["env"])
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "2 of 2 trial(s) errored" in out and "all 2 trials errored" in out
    assert "Traceback" in out and "fewer than 1 worker(s) x batch size 100000" in out  # exception + where
    assert "[tune] finished" not in out
    summary = json.loads((demo["out"] / "tune" / "all-fail" / "tune_results.json").read_text())
    assert summary["errors"] == 2 and summary["best"] is None


def _group_members(pgid: int, but: int, unless: str) -> list[int]:
    """The live processes of process group ``pgid`` other than ``but`` and those whose command line
    holds ``unless``."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z" and int(pid) != but and unless not in cmdline:
            members.append(int(pid))
    return members



@linux_only
@pytest.mark.slow
def test_ray_job_as_typed_with_token_auth(prepared, checkout, tmp_path):
    """README "Ray Jobs": token auth on, `ray job submit --working-dir . -- python pipelines/distill.py`
    from the repository root; results land in ~/dvfl-jobs (the path the job prints), survive the
    head's shutdown, and a second submission reuses every stage."""
    lines = readme_block("### Ray Jobs and dashboards")
    home = tmp_path / "home"  # the token file and ~/dvfl-jobs of this test only
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(HOME=str(home), PATH=BIN + os.pathsep + env["PATH"])
    (export,) = [c for c in lines if c.startswith("export ")]
    key, value = export.split(None, 1)[1].split("=", 1)
    env[key] = value
    (token_line,) = [c for c in lines if c.startswith("ray get-auth-token")]
    subprocess.run(token_line, shell=True, cwd=checkout, env=env, check=True, timeout=120)
    assert (home / ".ray" / "auth_token").is_file()

    port, dashboard = free_port(), free_port()
    # its own temp dir: `ray start` records itself as "the current cluster" there
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's unix sockets live in it
    start = shlex.split([c for c in lines if c.startswith("ray start")][0])
    # --block keeps the head's processes in one process group: the test stops exactly this head
    # (`ray stop` would stop every Ray instance on the machine, the test session's too); other
    # ports: the session's Ray instance already holds the defaults
    head = subprocess.Popen(start + [f"--port={port}", f"--dashboard-port={dashboard}", "--object-store-memory=400000000",
                                     "--include-dashboard=true", f"--temp-dir={temp_dir}", "--block",
                                     f"--dashboard-agent-listen-port={free_port()}",
                                     f"--dashboard-agent-grpc-port={free_port()}",
                                     f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                                     f"--ray-client-server-port={free_port()}"],
                            cwd=checkout, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        submit = [a.replace("8265", str(dashboard)) for a in
                  shlex.split([c for c in lines if c.startswith("ray job submit")][0])]
        cfg = prepared["cfg"]
        args = sets([*TINY, *RUNNERS, ("baseline", False), ("optim.epochs", 1), ("data.clips", cfg.clips_dir),
                     ("teacher.path", prepared["teacher"]), ("teacher.cache", cfg.cache_dir)])

        def submit_job(env):
            deadline = time.time() + 180
            while True:  # the job server answers before its per-node agent is ready to take jobs
                job = subprocess.run(submit + args, cwd=checkout, env=env, capture_output=True, text=True,
                                     timeout=900)
                not_ready = any(m in job.stderr for m in ("No available agent", "Connection refused",
                                                          "Failed to connect to Ray at address",
                                                          # (a busy machine: the job server dropped the request)
                                                          "Remote end closed connection without response"))
                if job.returncode == 0 or not not_ready or time.time() > deadline:
                    return job
                time.sleep(3)

        refused = submit_job({k: v for k, v in env.items() if k != "RAY_AUTH_MODE"})
        assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()
        job = submit_job(env)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        out = home / "dvfl-jobs" / "runs" / "embedded"
        assert f"results: {out}" in job.stdout and f"results in {out}" in job.stdout
        report = json.loads((out / "results.json").read_text())
        assert set(report["models"]) == {"teacher", "dvfl"}
        # a job whose runtime env sets the S3 endpoint (as a user's would): the driver does not name
        # it again for its workers (Ray refuses a key set twice: "Failed to merge the Job's runtime env")
        job_env = ["--runtime-env-json", json.dumps({"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}})]
        at = submit.index("submit") + 1
        submit = submit[:at] + job_env + submit[at:]
        again = submit_job(env)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "[dvfl s0] reusing" in again.stdout and "[dvfl s0] training" not in again.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's processes exit on SIGTERM ...
        deadline = time.time() + 10
        while time.time() < deadline and _group_members(head.pid, but=head.pid, unless="monitor.py"):
            time.sleep(0.2)
        os.killpg(head.pid, signal.SIGKILL)  # ... the blocking `ray start` and the monitor do not
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert (out / "results.json").is_file()  # still there after the head is gone
