"""Where the training loop meets Ray: everything :func:`dvfl.train.loop.run_loop` asks of its host.

Two hosts run the same loop:

* :class:`TrainWorkerSession`: a Ray Train worker, one of a DDP worker group (``TorchTrainer``);
* :class:`TuneTrialSession`: a one-worker Tune trial that trains in its own process, with no
  worker group to start (a Train worker group costs a controller, a placement group and fresh
  worker processes per trial, which on a small machine is most of a short trial's time).
"""
from __future__ import annotations

import torch


def fetch(ref: list):
    """The object a one-element reference list names (see :mod:`dvfl.train.loop_config`)."""
    import ray

    return ray.get(ref[0])


class _RaySession:
    """What both hosts share: the object store and the node."""

    fetch = staticmethod(fetch)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _quiet_train_report_log() -> None:
    """Ray Train 2.60 logs every report (all metrics, per rank) at INFO through a logger named
    after its module file, outside the ``ray.train`` tree that ``LoggingConfig`` sets; the loop
    prints its own line per epoch."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: leave its logging alone
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class TrainWorkerSession(_RaySession):
    """A rank of a Ray Train worker group: DDP, dataset shards and checkpoints through ``ray.train``."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        _quiet_train_report_log()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """A barrier: every rank reports once per epoch; only rank 0 carries the checkpoint."""
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None)


class TuneTrialSession(_RaySession):
    """The Tune trial's own process as the only worker: datasets given, metrics and checkpoints
    straight to Tune (``tune.report`` persists the checkpoint before it returns)."""

    rank, world = 0, 1

    def __init__(self, datasets: dict):
        import ray

        self.device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self._datasets = datasets

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def dataset(self, name: str):
        return self._datasets[name]

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


class RunnerSession(_RaySession):
    """A one-worker run in a long-lived runner actor (:func:`dvfl.train.launch.train_concurrently`):
    datasets given, each epoch's state written to ``run_dir`` (a local path or URI) as one file,
    the newest resumed; the older ones are removed once a newer one is written."""

    rank, world = 0, 1
    KEEP = 2

    def __init__(self, datasets: dict, run_dir: str):
        import ray

        from dvfl.data.shards import remove_stale_tmp

        self.device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self._datasets = datasets
        self.run_dir = run_dir
        # a runner killed mid-write (ray.kill on Ctrl+C, a lost node) left its hidden temporary epoch
        # state (~1 GB for Video-FocalNet-B) that nothing read or removed; one runner at a time writes here
        remove_stale_tmp(run_dir)
        self.last_metrics: dict | None = None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def checkpoint(self):
        return latest_epoch_state(self.run_dir)

    def dataset(self, name: str):
        return self._datasets[name]

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import os

        from dvfl import storage
        from dvfl.train.loop import STATE_FILE

        self.last_metrics = metrics
        if not checkpoint_dir:
            return
        # one object per epoch, written whole (an atomic rename locally, one PUT on object stores)
        with open(os.path.join(checkpoint_dir, STATE_FILE), "rb") as f:
            storage.write_bytes(storage.join(self.run_dir, f"epoch_{metrics['epoch']:06d}.pt"), f.read())
        for old in epoch_states(self.run_dir)[:-self.KEEP]:
            storage.remove(old)


def epoch_states(run_dir: str) -> list[str]:
    """The epoch state files (paths or URIs) of a runner run, oldest first."""
    from dvfl import storage

    return [p for p in storage.listdir(run_dir, suffix=".pt") if storage.basename(p).startswith("epoch_")]


class EpochStateCheckpoint:
    """The newest epoch state of a runner run, read like a Ray checkpoint by
    :func:`dvfl.train.loop.checkpoint_state` (the loop's resume, :func:`dvfl.train.launch.load_final_state`)."""

    def __init__(self, path: str):
        self.path = path

    def read_state(self) -> bytes:
        from dvfl import storage

        return storage.read_bytes(self.path)


def latest_epoch_state(run_dir: str) -> EpochStateCheckpoint | None:
    states = epoch_states(run_dir)
    return EpochStateCheckpoint(states[-1]) if states else None
