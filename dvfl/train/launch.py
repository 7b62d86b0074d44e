"""Driver side of training: datasets, the TorchTrainer, and reading the result back.

Everything Ray-specific about running :func:`dvfl.train.loop.train_loop_per_worker` lives here.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass

from dvfl.data.holdout import val_source
from dvfl.data.sampling import pool_videos
from dvfl import storage
from dvfl.host import joined_address, usable_cpus
from dvfl.runtime import signal_handlers_kept
from dvfl.data.shards import (READ_TASK_CPUS, keep_clips, raise_if_corrupt, read_clip_dataset,
                              read_clips_table, shard_paths, split_sizes)
from dvfl.train.loop import VAL_COLUMNS, checkpoint_state, train_loop_per_worker
from dvfl.train.loop_config import LoopConfig

TRAIN_COLUMNS = VAL_COLUMNS


@dataclass
class Scaling:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources: dict | None = None  # custom resources per worker (e.g. a node-type marker)


def quiet_data_progress() -> None:
    """Ray Data's tqdm bars from inside Train workers garble the terminal; the loop prints one
    line per epoch instead."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


def ingest_options():
    """Ray Train's default ingest options (taken from the current DataContext) without
    ``exclude_resources``: Train's own default passes that deprecated field, and every run's
    dataset manager then warned about it."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                            verbose_progress=current.verbose_progress)


def count_rows(clips_dir: str, splits) -> int:
    return split_sizes(clips_dir, splits)[0]


def threads_per_worker(scaling: Scaling) -> int:
    # On one machine the workers share the cores; on a cluster each gets what it asked for.
    return max(1, int(round(scaling.cpus_per_worker)) if scaling.cpus_per_worker >= 1
               else usable_cpus() // max(1, scaling.num_workers))


@dataclass
class TrainingData:
    """The datasets one training run reads (built once per search and shared by its trials)."""
    train: object  # ray.data.Dataset
    val: object
    train_rows: int
    clips_dir: str
    splits: str  # the training splits, for messages ("train+unlabeled")


def training_data(
    clips_dir: str,
    *,
    seed: int,
    train_splits=("train",),
    val_split: str = "val",
    val_fraction: float = 0.1,
    val_seed: int = 0,
    unlabeled_dir: str | None = None,
    materialize_below_mb: int = 256,
    label_fraction: float = 1.0,
    teacher_pool: float = 0.0,
    role: str = "student",
) -> TrainingData:
    """The training and validation datasets of a run (see :func:`run_training` for the arguments)."""
    val_src = val_source(clips_dir, val_split, train_splits[0], val_fraction, val_seed)
    sizes = {split: split_sizes(clips_dir, [split]) for split in dict.fromkeys([*train_splits, val_src.split])}
    for split, (clips, _) in sizes.items():
        if clips == 0:
            raise ValueError(f"split '{split}' of {clips_dir} has no clips: nothing to "
                             f"{'validate' if split == val_src.split and not val_src.carved else 'train'} on")
    quiet_data_progress()
    train_rows, shard_bytes = (sum(sizes[s][k] for s in dict.fromkeys(train_splits)) for k in (0, 1))
    if not val_src.carved:  # (read and held apart from the training data, even when it is a training split)
        shard_bytes += sizes[val_src.split][1]
    unlabeled = split_sizes(unlabeled_dir, ["unlabeled"]) if unlabeled_dir else (0, 0)
    shard_bytes += unlabeled[1]
    materialize = shard_bytes < materialize_below_mb * 2**20
    # Too big to hold: streamed, in a file order drawn anew each epoch. (Ray's randomize_block_order
    # is all-to-all: every epoch read the whole training split into the object store before its first batch.)
    shuffle = None if materialize else _files_shuffled_per_epoch(seed)
    # the unlabelled pool in the same read: one file order mixes it with the labelled clips (a union of
    # two streamed reads ran out of the smaller one early, and the rest of the epoch was the other kind)
    pooled = bool(unlabeled_dir) and storage.same_or_inside(unlabeled_dir, clips_dir) \
        and storage.same_or_inside(clips_dir, unlabeled_dir)
    train = read_clip_dataset(clips_dir, [*train_splits, *(["unlabeled"] if pooled else [])], columns=TRAIN_COLUMNS,
                              shuffle=shuffle)
    val = read_clip_dataset(clips_dir, [val_src.split], columns=VAL_COLUMNS)
    if label_fraction < 1 or teacher_pool > 0 or val_src.carved:
        # Held-out validation videos first (no role trains on them), then a teacher pool and/or
        # a fraction of the rest (label-efficiency runs). Videos left out are not turned into
        # unlabelled clips: the teacher may have seen them.
        ids = read_clips_table(clips_dir, train_splits, columns=["clip_id", "video_id", "label"]).to_pydict()
        held = val_src.videos or frozenset()
        rest = [(c, v, y) for c, v, y in zip(ids["clip_id"], ids["video_id"], ids["label"]) if v not in held]
        videos = pool_videos([v for _, v, _ in rest], [y for _, _, y in rest], teacher_pool, role, label_fraction,
                             seed=seed)
        keep = {c for c, v, _ in rest if videos is None or v in videos}
        pool = set(read_clips_table(clips_dir, ["unlabeled"], columns=["clip_id"]).column("clip_id").to_pylist()) \
            if pooled else set()
        train = keep_clips(train, keep | pool)
        train_rows = len(keep)
        if val_src.carved:
            val = keep_clips(val, {c for c, v in zip(ids["clip_id"], ids["video_id"]) if v in held})
    if unlabeled_dir:
        if not pooled:
            train = train.union(read_clip_dataset(unlabeled_dir, ["unlabeled"], columns=TRAIN_COLUMNS, shuffle=shuffle))
        train_rows += unlabeled[0]
    if materialize:
        # Small datasets are read once into the object store: re-running the Parquet read
        # every epoch costs seconds of task start-up, more than a small epoch's compute.
        # Shards hold videos grouped by class, and a local shuffle buffer cannot mix classes
        # that sit thousands of rows apart: shuffle the (small) table globally, seeded.
        # in file order: Ray's shuffle seeds each input block by its arrival, so read tasks finishing in
        # another order (shards of two splits, a busy machine) gave the same seed another epoch order
        train.context.execution_options.preserve_order = True
        try:
            train, val = train.random_shuffle(seed=seed).materialize(), val.materialize()
        except Exception as exc:  # a read error of Ray's does not name the file: find it
            raise_if_corrupt(shard_paths(clips_dir, [*train_splits, val_src.split])
                             + (shard_paths(unlabeled_dir, ["unlabeled"]) if unlabeled_dir else []), exc)
            raise
    return TrainingData(train, val, train_rows, clips_dir, "+".join([*train_splits, *(["unlabeled"] if unlabeled_dir else [])]))


def _files_shuffled_per_epoch(seed: int):
    from ray.data import FileShuffleConfig

    return FileShuffleConfig(seed=seed, reseed_after_execution=True)


class NotEnoughClipsError(ValueError):
    """Fewer training clips than one batch per worker."""


def check_enough_clips(data: TrainingData, num_workers: int, batch_size: int, optim_key: str = "optim") -> None:
    """Every worker needs at least one full batch, or an epoch would train on nothing."""
    if data.train_rows < num_workers * batch_size:
        raise NotEnoughClipsError(f"split '{data.splits}' of {data.clips_dir} has {data.train_rows} training clips "
                         f"(after the validation hold-out, label_fraction and teacher_pool), fewer than {num_workers} "
                         f"worker(s) x batch size {batch_size} = {num_workers * batch_size}: use a smaller "
                         f"{optim_key}.batch_size or fewer workers, or ingest more videos")


def run_training(
    loop_cfg: LoopConfig,
    *,
    clips_dir: str,
    train_splits=("train",),
    val_split: str = "val",
    val_fraction: float = 0.1,
    val_seed: int = 0,
    data_seed: int | None = None,
    unlabeled_dir: str | None = None,
    scaling: Scaling,
    name: str,
    storage_path: str,
    max_failures: int = 1,
    materialize_below_mb: int = 256,
    label_fraction: float = 1.0,
    teacher_pool: float = 0.0,
    role: str = "student",
    callbacks=None,
    data: TrainingData | None = None,
):
    """Fit ``train_loop_per_worker`` with DDP over ``scaling.num_workers`` Ray Train workers.

    Re-running with the same ``(storage_path, name)`` resumes from the last checkpoint.
    ``label_fraction`` < 1 trains on that (class-balanced, seeded) fraction of the labelled videos;
    ``teacher_pool`` > 0 gives ``role="teacher"`` that fraction of them and students the rest
    (:func:`dvfl.data.sampling.pool_videos`).
    ``val_split`` ``"val"`` without such a split in ``clips_dir``: ``val_fraction`` of the groups
    of each class of the training videos (seeded by ``val_seed``) are held out of training for
    every role and validate each epoch (:mod:`dvfl.data.holdout`); the test split is never read.
    ``callbacks``: extra Ray Train callbacks for the run config (Tune passes its
    ``TuneReportCallback`` here, see :mod:`dvfl.tune`). ``data``: datasets already built by
    :func:`training_data` with the same arguments (a search builds them once for all its trials).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if data is None:  # ``data_seed``: the shuffle of the data a search or the runners share
        seed = loop_cfg.seed if data_seed is None else data_seed
        data = training_data(clips_dir, seed=seed, train_splits=train_splits, val_split=val_split,
                             val_fraction=val_fraction, val_seed=val_seed, unlabeled_dir=unlabeled_dir,
                             materialize_below_mb=materialize_below_mb, label_fraction=label_fraction,
                             teacher_pool=teacher_pool, role=role)
    check_enough_clips(data, scaling.num_workers, loop_cfg.optim.batch_size, loop_cfg.optim_key)
    loop_cfg = dataclasses.replace(loop_cfg, train_rows=data.train_rows, threads_per_worker=threads_per_worker(scaling),
                                   run_name=name)
    # checkpoints on a URI go through our filesystem (the S3 endpoint of AWS_ENDPOINT_URL included)
    storage_path, storage_filesystem = storage.ray_storage(storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop_cfg},  # Ray Train wants a dict
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker,
                                                           **({"GPU": 1} if scaling.use_gpu else {}),
                                                           **(scaling.resources or {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # the loop prints one line per epoch; Ray Train's per-report INFO
                             # lines (a dump of every metric, per rank) would bury it
                             logging_config=LoggingConfig(log_level="WARNING"),
                             callbacks=list(callbacks) if callbacks else None),
        datasets={"train": data.train, "val": data.val},
        # validation runs on rank 0 over the whole split: no clip is dropped by equal splitting
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
    )
    return fit_as_interruptible(trainer)


def fit_as_interruptible(trainer):
    """``trainer.fit()``; Ctrl+C is a KeyboardInterrupt. Ray Train's own Ctrl+C handler aborts the run
    with ``sys.exit(0)`` (the command ended silently, status 0 or 1, as if nothing had happened) and
    stays installed after the run; the caller's handler comes back."""
    with signal_handlers_kept(signal.SIGINT):
        try:
            return trainer.fit()
        except SystemExit:
            raise KeyboardInterrupt from None


def train_in_tune_trial(loop_cfg: LoopConfig, data: TrainingData, *, scaling: Scaling, name: str) -> None:
    """Run the loop in this Tune trial's own process (one worker: no DDP, no worker group);
    metrics and checkpoints go straight to Tune, which resumes the trial from its last one."""
    from dvfl.train.loop import run_loop
    from dvfl.train.session import TuneTrialSession

    import logging

    if scaling.num_workers != 1:
        raise ValueError(f"a trial trains in its own process only with one worker, got {scaling.num_workers}")
    check_enough_clips(data, 1, loop_cfg.optim.batch_size, loop_cfg.optim_key)
    quiet_data_progress()
    # the loop prints one line per epoch; per-epoch INFO lines of Ray Data ("execution finished")
    # and of the checkpoint upload would bury it, as LoggingConfig keeps them out of Train workers
    for name_ in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name_).setLevel(logging.WARNING)
    loop_cfg = dataclasses.replace(loop_cfg, train_rows=data.train_rows, threads_per_worker=threads_per_worker(scaling),
                                   run_name=name)
    run_loop(loop_cfg, TuneTrialSession({"train": data.train, "val": data.val}))


@dataclass
class RunnerRun:
    """One one-worker run for :func:`train_concurrently` (``run_dir``: its epoch states)."""
    name: str
    loop: object  # dvfl.train.loop_config.LoopConfig
    data: TrainingData
    run_dir: str


@dataclass
class RunnerResult:
    """What :func:`load_final_state` reads, as from a Ray Train result (``seconds``: the time
    runners spent on the run, not the time it waited for a free runner)."""
    checkpoint: object
    error: Exception | None = None
    seconds: float | None = None


class LoopRunner:
    """A long-lived process that trains runs one after another (torch imported once)."""

    def run(self, loop_cfg, datasets: dict, run_dir: str, seconds_before: float = 0.0) -> float:
        """Trains one run and says it is done (``seconds_before``: its failed attempts' time);
        returns its wall seconds in this runner."""
        import logging

        from dvfl.train.loop import run_loop, say
        from dvfl.train.session import RunnerSession

        started = time.time()
        quiet_data_progress()
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        session = RunnerSession(datasets, run_dir)
        run_loop(loop_cfg, session)
        seconds = time.time() - started
        # said here, after the epoch lines in the same stream: Ray forwards this process's output
        # with a delay, so a line the driver printed could overtake the run's last epoch line
        top1 = f": val top-1 {session.last_metrics['val_top1']:.1%}" if session.last_metrics else ""
        say(f"[{loop_cfg.label}] done in {seconds_before + seconds:.0f}s{top1}")
        return seconds


def runners_beside_reads(runs: list[RunnerRun], scaling: Scaling, concurrent: int, log=None) -> int:
    """How many runners may hold CPUs at once on this machine's Ray: data too large to hold is read
    every epoch by Ray Data tasks (``READ_TASK_CPUS`` each), which runners that took every CPU leave
    waiting for ever (an actor keeps its CPUs while it lives). Materialised data needs no read beside them."""
    import ray
    from ray.data.dataset import MaterializedDataset

    streamed = any(not isinstance(d, MaterializedDataset)
                   for run in runs for d in (run.data.train, run.data.val) if d is not None)
    # a joined cluster's autoscaler adds nodes for waiting reads (its CPUs now are no limit: the
    # shipped KubeRay head has none), as check_training_fits leaves it to size
    joined = joined_address() is not None
    if not streamed or joined or scaling.cpus_per_worker <= 0:
        return concurrent
    cpus = ray.cluster_resources().get("CPU", 0.0)
    fit = max(1, int((cpus - READ_TASK_CPUS + 1e-9) // scaling.cpus_per_worker))  # (<1: refused by check_training_fits)
    if fit < min(concurrent, len(runs)):
        (log or print)(f"[train] {fit} runner(s) at a time, not {concurrent} (scaling.concurrent_runs): the clips are "
                       f"read every epoch, and Ray's {cpus:g} CPU must keep {READ_TASK_CPUS:g} for those reads")
        return fit
    return concurrent


def train_concurrently(runs: list[RunnerRun], *, scaling: Scaling, concurrent: int, max_failures: int = 1, log=None):
    """Train one-worker ``runs`` ``concurrent`` at a time in runner actors; yields ``(run, result)``
    as each finishes. A runner that dies (killed, out of memory, node lost) is replaced and its
    run resumes from its last epoch state, up to ``max_failures`` times per run; an error raised
    by the loop itself (bad data, a bug) is not retried."""
    import ray
    from ray.exceptions import RayActorError

    from dvfl.train.session import latest_epoch_state

    if scaling.num_workers != 1:
        raise ValueError(f"concurrent runs are one-worker runs, got scaling.num_workers={scaling.num_workers}")
    for run in runs:
        check_enough_clips(run.data, 1, run.loop.optim.batch_size, run.loop.optim_key)
    concurrent = runners_beside_reads(runs, scaling, concurrent, log)
    runner = ray.remote(num_cpus=scaling.cpus_per_worker, num_gpus=1 if scaling.use_gpu else 0,
                        resources=scaling.resources or None, max_restarts=0)(LoopRunner)
    threads = threads_per_worker(Scaling(num_workers=concurrent, use_gpu=scaling.use_gpu,
                                         cpus_per_worker=scaling.cpus_per_worker))
    queue, pending, idle, actors = list(runs), {}, [], []
    failures = {run.name: 0 for run in runs}
    seconds = {run.name: 0.0 for run in runs}  # a failed attempt's time counts too
    try:
        while queue or pending:
            while queue and (idle or len(actors) < concurrent):
                if not idle:
                    actors.append(runner.remote())
                    idle.append(actors[-1])
                run, actor = queue.pop(0), idle.pop()
                loop = dataclasses.replace(run.loop, train_rows=run.data.train_rows, threads_per_worker=threads,
                                           run_name=run.name)
                ref = actor.run.remote(loop, {"train": run.data.train, "val": run.data.val}, run.run_dir,
                                       seconds[run.name])
                pending[ref] = (run, actor, time.time())
            [done], _ = ray.wait(list(pending), num_returns=1)
            run, actor, submitted = pending.pop(done)
            try:
                seconds[run.name] += ray.get(done)
            except RayActorError:
                seconds[run.name] += time.time() - submitted
                failures[run.name] += 1
                actors.remove(actor)
                if failures[run.name] > max_failures:
                    raise
                queue.insert(0, run)  # a fresh runner resumes it from its last epoch state
                continue
            if queue:
                idle.append(actor)
            else:  # nothing left to hand it: its CPU/GPU go to a runner Ray could not place yet (which
                # holds a run: waited on for ever while this idle one kept the resources)
                actors.remove(actor)
                ray.kill(actor)
            yield run, RunnerResult(latest_epoch_state(run.run_dir), seconds=seconds[run.name])
    finally:
        for actor in actors:
            ray.kill(actor)


def load_final_state(result) -> dict:
    """The model weights and per-epoch history of a finished run (from its last checkpoint)."""
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return checkpoint_state(result.checkpoint)
