"""The training loop's typed config, its test hooks (no Ray: the hooks act on any iterator) and its checkpoint reading."""
import json
import threading
import time

import pytest

from dvfl.config import OptimSection, load_config
from dvfl.train.hooks import TestHooks
from dvfl.train.loop_config import LoopConfig, ModelSpec, TeacherFeed


def _between(hooks, batches, **kw):
    args = dict(epoch=0, rank=0, world=1, run_name="r", reported_at=time.time, node_id=lambda: "node-a")
    return hooks.between_steps(iter(batches), **{**args, **kw})


def test_without_hooks_the_batches_pass_unchanged():
    assert list(_between(TestHooks(), [1, 2, 3])) == [1, 2, 3]


def test_the_hold_hook_pauses_after_the_first_step_until_released(tmp_path):
    hooks = TestHooks(hold_after_epoch=0, hold_dir=str(tmp_path), hold_timeout_s=30)
    batches = _between(hooks, [1, 2, 3])
    assert next(batches) == 1
    held = tmp_path / "held-rank0.json"
    assert not held.exists()  # the first step runs before the hook: it acts between steps
    threading.Timer(0.5, (tmp_path / "release-r").touch).start()
    started = time.time()
    assert next(batches) == 2
    assert time.time() - started >= 0.4  # held until this run's release
    record = json.loads(held.read_text())
    assert {k: record[k] for k in ("rank", "epoch", "run", "node_id")} == {"rank": 0, "epoch": 1, "run": "r",
                                                                        "node_id": "node-a"}
    assert list(batches) == [3]
    # another epoch, or a released run, is not held
    assert list(_between(hooks, [1, 2], epoch=1)) == [1, 2]
    assert list(_between(hooks, [1, 2])) == [1, 2]


def test_the_loop_config_is_typed_and_refuses_an_incomplete_teacher(tmp_path):
    from dvfl.pipeline import training_loop_config

    cfg = load_config(None, [("output_dir", str(tmp_path)), ("kd.temperature", 2.5)])
    loop = training_loop_config(cfg, cfg.student, cfg.optim, 5, 3, {"mode": "none"}, tensorboard_dir=None,
                                hooks=TestHooks())
    assert isinstance(loop, LoopConfig) and isinstance(loop.optim, OptimSection)
    assert (loop.seed, loop.kd.temperature, loop.model.kwargs["num_classes"], loop.teacher.mode) == (3, 2.5, 5, "none")
    assert loop.optim is not cfg.optim  # a copy: a trial's changes to its config do not reach a running loop
    with pytest.raises(ValueError, match="cache_ref"):
        TeacherFeed.from_signal({"mode": "cached", "views": ["center"]})
    with pytest.raises(ValueError, match="state_ref"):
        TeacherFeed(mode="online", model=ModelSpec("videofocalnet_nano", {}))
    with pytest.raises(ValueError, match="teacher mode"):
        TeacherFeed(mode="cache")


def test_the_failure_hook_kills_the_last_rank_once_after_a_step(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "failed"
    script = f"""
import sys
from dvfl.train.hooks import TestHooks
hooks = TestHooks(fail_after_epoch=0, fail_marker={str(marker)!r})
for b in hooks.between_steps(iter([1, 2]), epoch=0, rank=0, world=1, run_name="r", reported_at=lambda: 0.0,
                             node_id=lambda: "n"):
    print("step", b, flush=True)
"""
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (first.returncode, first.stdout.split()) == (1, ["step", "1"]), first.stderr  # died after step 1
    assert marker.exists()
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (again.returncode, again.stdout.split()) == (0, ["step", "1", "step", "2"]), again.stderr  # once only


def test_checkpoint_state_reads_through_the_checkpoints_filesystem_not_a_shared_temp_copy(tmp_path, monkeypatch):
    """A Ray checkpoint on a filesystem other than the local one (an object store's case) is read
    straight through that filesystem: ``Checkpoint.as_directory`` downloads into a temp folder the
    node's processes share, where two resuming ranks overwrite each other's file. A runner's epoch
    state reads the same."""
    import pyarrow.fs
    import ray.train
    import torch

    from dvfl.train.loop import STATE_FILE, checkpoint_state
    from dvfl.train.session import EpochStateCheckpoint

    state = {"model": {"w": torch.arange(6.0)}, "epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}]}
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / STATE_FILE)
    torch.save(state, tmp_path / "epoch_000002.pt")

    def no_temp_copy(self):
        raise AssertionError("as_directory used")

    monkeypatch.setattr(ray.train.Checkpoint, "as_directory", no_temp_copy)
    remote = ray.train.Checkpoint("ckpt", filesystem=pyarrow.fs.SubTreeFileSystem(str(tmp_path),
                                                                                 pyarrow.fs.LocalFileSystem()))
    for checkpoint in (remote, ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt")),
                       EpochStateCheckpoint(str(tmp_path / "epoch_000002.pt"))):
        got = checkpoint_state(checkpoint)
        assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["history"] == state["history"]


def _epoch_metrics_on_rank(rank: int, port: int, out: str) -> None:
    """One gloo rank of two: rank 0 got 9 of 10 clips right at loss 0.1, rank 1 got 1 of 10 at 2.0
    (the stats hold sums over clips)."""
    import os

    import torch
    import torch.distributed as dist

    from dvfl.train import loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = torch.nn.Linear(2, 2)
        run = loop._Run(rank=rank, world=2, device=torch.device("cpu"), model=m, raw_model=m,
                        optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                        scaler=torch.amp.GradScaler("cpu", enabled=False), amp=None, teacher=None, rng=None,
                        total_steps=1, warmup=0)
        stats = loop._EpochStats(loss=1.0 if rank == 0 else 20.0, batches=1, seen=10, correct=9 if rank == 0 else 1,
                                 counts=torch.tensor([10, 0, 10, 0]))
        metrics = loop.epoch_metrics(run, LoopConfig(seed=0, model=None, optim=OptimSection()), stats, 0, 0.0, 1.0, 0.0)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


def test_training_metrics_are_over_every_rank_not_rank_0s(tmp_path):
    """The epoch's train loss and top-1 next to clip counts summed over the ranks: rank 0 used to
    report its own loss and accuracy (0.1, 90 %) beside both ranks' 20 clips."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_epoch_metrics_on_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        m = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert m["labelled_clips"] == 20 and m["ce_clips"] == 20
        assert m["train_top1"] == pytest.approx(0.5) and m["train_loss"] == pytest.approx(1.05)


@pytest.mark.parametrize("rows, world, batch, accum, steps", [
    (101, 2, 2, 1, 25),  # each rank gets 50 rows (an equal split drops one): 25 batches, not 26
    (101, 1, 2, 1, 51),
    (8, 1, 2, 3, 2),  # 4 batches, a step every 3: the partial last one is a step too
    (3, 4, 8, 1, 1),
])
def test_the_schedule_plans_the_optimizer_steps_the_ranks_take(rows, world, batch, accum, steps):
    from dvfl.train.loop import steps_per_epoch

    assert steps_per_epoch(rows, world, batch, accum) == steps


def test_a_checkpoint_of_another_worker_count_is_not_resumed():
    """optim.batch_size is per worker: a 2-worker run killed and rerun with one worker resumed the
    2-worker state with a schedule twice as long; now refused, saying how to resume it."""
    from types import SimpleNamespace

    from dvfl.train.loop import resume

    with pytest.raises(ValueError, match=r"taken with 2 worker\(s\), this run has 1: rerun with scaling\.num_workers=2"):
        resume(SimpleNamespace(world=1), {"world": 2, "epoch": 0, "step": 3, "history": []})


def test_each_rank_draws_its_own_drop_path_masks():
    """torch was seeded alike on every rank and nothing branched it: sample i of every rank lost the
    same residual branches at every step (stochastic depth perfectly correlated across ranks), and a
    resume copied rank 0's stream to all. Rank 0 keeps the seed's stream (one-worker runs unchanged)."""
    from types import SimpleNamespace

    import torch

    from dvfl.train.loop import resume, set_up

    cfg = LoopConfig(seed=3, model=ModelSpec("videofocalnet_nano", {"num_classes": 4, "num_frames": 4, "img_size": 32,
                                                                      "embed_dim": 8, "drop_path_rate": 0.5}),
                     optim=OptimSection(), train_rows=8)
    x = torch.randn(2, 4, 3, 32, 32)  # (B, T, C, H, W)

    def rank(r, state=None):
        session = SimpleNamespace(rank=r, world=2, device=torch.device("cpu"), prepare_model=lambda m: m,
                                  fetch=lambda ref: None)
        run = set_up(cfg, session)
        resume(run, state)
        return run, run.model.train()(x)

    run0, out0 = rank(0)
    _, again0 = rank(0)
    _, out1 = rank(1)
    assert torch.equal(out0, again0)  # deterministic per rank
    assert not torch.allclose(out0, out1)  # (same weights: DDP broadcasts rank 0's; here the same seed)
    state = {"model": run0.raw_model.state_dict(), "optimizer": run0.optimizer.state_dict(), "epoch": 0, "step": 1,
             "history": [], "rng": run0.rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "world": 2}
    _, resumed0 = rank(0, state)
    _, resumed1 = rank(1, state)
    assert not torch.allclose(resumed0, resumed1)


def test_train_ce_is_the_mean_over_the_clips_it_covers():
    """A batch of unlabelled clips has no CE; its 0 was averaged in as a batch's CE, so a run with
    unlabelled clips reported train_ce too low (here half of it)."""
    import numpy as np
    import torch

    from dvfl.train import loop

    stats = loop._EpochStats()
    stats.add_batch(0.5, 0.0, 0.5, 0, np.array([1, 2]), np.array([-1, -1]))  # unlabelled only
    stats.add_batch(1.0, 1.2, 0.8, 2, np.array([1, 2]), np.array([1, 0]))
    stats.add_batch(1.0, 0.6, 0.8, 1, np.array([3, 0]), np.array([3, -1]))
    m = torch.nn.Linear(1, 1)
    run = loop._Run(rank=0, world=1, device=torch.device("cpu"), model=m, raw_model=m,
                    optimizer=torch.optim.SGD(m.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu", enabled=False),
                    amp=None, teacher=None, rng=None, total_steps=1, warmup=0)
    metrics = loop.epoch_metrics(run, LoopConfig(seed=0, model=None, optim=OptimSection()), stats, 0, 0.0, 1.0, 0.0)
    assert metrics["train_ce"] == pytest.approx((1.2 * 2 + 0.6) / 3) and metrics["ce_clips"] == 3
    assert metrics["train_loss"] == pytest.approx(2.5 / 3) and metrics["train_top1"] == pytest.approx(2 / 3)
    assert metrics["labelled_clips"] == 3 and metrics["unlabelled_clips"] == 3 and metrics["mixed_batches"] == 1


def test_train_loss_and_kd_are_means_over_clips_not_batches():
    """A short last batch (1 clip after a batch of 4) weighed as much as a full one: the mean of
    the batch means (2.0) instead of the mean over the 5 clips (1.4)."""
    import numpy as np
    import torch

    from dvfl.train import loop

    stats = loop._EpochStats()
    stats.add_batch(1.0, 1.0, 0.5, 4, np.zeros(4, dtype=int), np.zeros(4, dtype=int))
    stats.add_batch(3.0, 3.0, 2.5, 1, np.zeros(1, dtype=int), np.zeros(1, dtype=int))
    m = torch.nn.Linear(1, 1)
    run = loop._Run(rank=0, world=1, device=torch.device("cpu"), model=m, raw_model=m,
                    optimizer=torch.optim.SGD(m.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu", enabled=False),
                    amp=None, teacher=None, rng=None, total_steps=1, warmup=0)
    metrics = loop.epoch_metrics(run, LoopConfig(seed=0, model=None, optim=OptimSection()), stats, 0, 0.0, 1.0, 0.0)
    assert metrics["train_loss"] == pytest.approx(7 / 5) and metrics["train_kd"] == pytest.approx(4.5 / 5)
    assert metrics["train_ce"] == pytest.approx(7 / 5)


def test_ctrl_c_during_a_ray_train_run_is_an_interrupt_not_a_silent_exit():
    """Ray Train's Ctrl+C handler ends fit() with sys.exit(0): the command ended without a word,
    status 0 or 1, as if the run had finished. Its handler also stayed installed after the run."""
    import signal

    from dvfl.train.launch import fit_as_interruptible

    class Trainer:  # fit() as Ray Train's handler ends it, after installing that handler
        def __init__(self, exit_with):
            self.exit_with = exit_with

        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: None)
            raise self.exit_with

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit_as_interruptible(Trainer(SystemExit(0)))
    assert signal.getsignal(signal.SIGINT) is before


def test_an_epoch_state_that_does_not_fit_on_disk_is_an_oserror_naming_the_file(tmp_path):
    """torch.save on a full disk raises RuntimeError ("file write failed", "unexpected pos"): not an
    OSError, so a full TMPDIR ended in Ray Train's retries and a traceback naming neither the disk
    nor the folder, instead of the one-line disk error. (A file-size limit makes the write fail here.)"""
    import errno
    import subprocess
    import sys

    code = f"""
import errno, resource, signal, types, numpy as np, torch
from dvfl.train.loop import _save_state
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
model = torch.nn.Linear(100, 100)
run = types.SimpleNamespace(raw_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=3, history=[],
                            rng=np.random.default_rng(0), world=1, scaler=torch.amp.GradScaler("cpu", enabled=False),
                            device=torch.device("cpu"))
try:
    _save_state({str(tmp_path)!r}, run, 2)
except OSError as exc:
    print(exc.errno, exc.filename, exc.strerror)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    code, path, words = r.stdout.split(" ", 2)
    # a file-size limit with the disk not full: an I/O error said with the free space, not "disk full"
    assert code == str(errno.EIO) and path == str(tmp_path / "state.pt"), r.stdout
    assert "writing epoch 2's state failed" in words and "MiB free there" in words, r.stdout


def test_a_run_started_over_in_its_tensorboard_folder_replaces_its_steps(tmp_path):
    """A run that starts over (another launch mode, a teacher rerun with another worker count) or trains
    an epoch again in a TensorBoard folder holding earlier events: TensorBoard drew both runs' steps as
    one zig-zag curve. The writer now purges the folder's events from its first step on."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from dvfl.train.loop import _TensorBoard

    def run(first_step, steps, offset):
        writer = _TensorBoard(str(tmp_path / "tb" / "student"), first_step)
        for step in steps:
            writer.add_scalar("val_top1", offset + 0.1 * step, step)
        writer.close()
        time.sleep(1.1)  # (tensorboardX names its file by the second: one a second)

    def curve():
        board = EventMultiplexer()
        board.AddRunsFromDirectory(str(tmp_path / "tb"))
        board.Reload()
        return [(e.step, round(e.value, 2)) for e in board.Scalars("student", "val_top1")]

    run(1, (1, 2, 3), 0.0)
    run(1, (1, 2, 3, 4), 0.5)  # started over at epoch 1
    assert curve() == [(1, 0.6), (2, 0.7), (3, 0.8), (4, 0.9)]
    run(3, (3, 4, 5), 0.0)  # resumed after epoch 2: epochs 3 and 4 trained again
    assert curve() == [(1, 0.6), (2, 0.7), (3, 0.3), (4, 0.4), (5, 0.5)]


def test_a_slow_epoch_s_progress_line_gives_its_rate_in_significant_digits():
    """A CPU teacher at 2 clips a minute read "0.0 clips/s, about 485 min left"."""
    from types import SimpleNamespace

    import torch

    from dvfl.train.loop import _EpochStats, epoch_progress_line

    cfg = SimpleNamespace(label="teacher", train_rows=1000, optim=SimpleNamespace(epochs=3))
    stats = _EpochStats(counts=torch.tensor([30, 0, 30, 0]))
    assert epoch_progress_line(cfg, 0, stats, 900.0, 1) == (
        "[teacher] epoch 1/3: 30 of 1,000 clips in 15 min, 0.0333 clips/s, about 485 min left")
    assert epoch_progress_line(cfg, 1, _EpochStats(counts=torch.tensor([500, 0, 500, 0])), 40.0, 2).endswith(
        "500 of 500 clips (one of 2 workers) in 1 min, 12.5 clips/s")
    assert epoch_progress_line(cfg, 1, _EpochStats(counts=torch.tensor([300, 0, 300, 0])), 0.2, 1).endswith(
        "300 of 1,000 clips in 0 min, 1,500 clips/s, about 0 min left")  # (not 1.5e+03)
