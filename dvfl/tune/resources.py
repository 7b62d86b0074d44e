"""What a search holds in Ray at once, and taking back what stopped trials leave behind."""
from __future__ import annotations

import time

from dvfl.config import ConfigError, RunConfig
from dvfl.host import joined_address
from dvfl.tune.search_config import TuneConfig


def required_resources(t: TuneConfig, cfg: RunConfig) -> dict:
    """What the search holds at most at once: every concurrent trial's driver and Train workers,
    plus one CPU for Ray Data's read tasks (ray-2.60-notes: hangs #1 and #4)."""
    per_trial = t.driver_cpus + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    need = {"CPU": t.max_concurrent_trials * per_trial + 1.0}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(t.max_concurrent_trials * cfg.scaling.num_workers)
    for key, amount in (cfg.scaling.worker_resources or {}).items():  # each Train worker asks for them too
        need[key] = float(t.max_concurrent_trials * cfg.scaling.num_workers * amount)
    return need


def check_resources(t: TuneConfig, cfg: RunConfig, available: dict, nodes: list[dict] | None = None) -> None:
    """A search the local Ray cannot hold is refused; on a joined cluster (left to its autoscaler) a
    trial that no node (``nodes``: each alive node's resources; default Ray's) can hold is said."""
    joined = joined_address() is not None
    if joined:
        from dvfl.runtime import alive_node_resources, note_no_node_holds, worker_bundle
        from dvfl.tune.trial import trials_in_process

        worker = worker_bundle(cfg.scaling)
        in_process = trials_in_process(t, cfg)  # the trial is its worker, beside its light driver
        note_no_node_holds("one trial" if in_process else "one trial's training worker",
                           {**worker, "CPU": t.driver_cpus + worker["CPU"]} if in_process else worker,
                           alive_node_resources() if nodes is None else nodes,
                           "lower tune.driver_cpus / scaling.cpus_per_worker / scaling.worker_resources")
    for key, amount in required_resources(t, cfg).items():
        if available.get(key, 0.0) + 1e-9 >= amount:
            continue
        if joined:  # a joined cluster's autoscaler may start the nodes (a head with 0 CPUs and 0 GPUs, at first)
            continue
        if key not in ("CPU", "GPU"):
            raise ConfigError(
                f"tune.max_concurrent_trials={t.max_concurrent_trials} needs {amount:g} {key} (scaling.worker_resources "
                f"x scaling.num_workers {cfg.scaling.num_workers} per trial) but Ray has {available.get(key, 0.0):g}: "
                "run the search on a cluster whose nodes advertise it, or drop scaling.worker_resources")
        per_trial = (f"scaling.num_workers {cfg.scaling.num_workers}, a GPU each" if key == "GPU" else
                     f"tune.driver_cpus {t.driver_cpus:g} + scaling.num_workers {cfg.scaling.num_workers} x "
                     f"scaling.cpus_per_worker {cfg.scaling.cpus_per_worker:g}")
        raise ConfigError(
            f"tune.max_concurrent_trials={t.max_concurrent_trials} needs {amount:g} {key} "
            f"({t.max_concurrent_trials} x ({per_trial}){' + 1 for Ray Data' if key == 'CPU' else ''}) "
            f"but Ray has {available.get(key, 0.0):g}: "
            "lower tune.max_concurrent_trials or the per-trial resources, or the search would hang")


def reclaim_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead.

    When Tune stops a Train V2 trial early (ASHA), the trial driver and with it the Train
    controller die; the workers' placement group belongs to the job, not to the dead controller,
    and Train's own cleaner needs the State API (the dashboard) to notice (ray-2.60-notes, hang #3;
    ray-project/ray#54305). Without this the next trial waits forever for those CPUs. A placement
    group whose creating actor is dead can never be used again, so removing it is safe.
    Reads the GCS table directly (private API; ray is pinned to 2.60).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    nil = ray.ActorID.nil().binary()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # a group the driver created (Tune's own per-trial groups) has a nil creator actor, which
        # the GCS reports as "dead": only groups created by an actor that has died qualify
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or not pg.creator_actor_dead
                or not pg.creator_actor_id or pg.creator_actor_id == nil or pg.creator_job_id.hex() != job):
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        except Exception:  # already removed by Train's own cleaner
            pass
    return removed


def reclaim_callback():
    from ray import tune

    class ReclaimStoppedTrialResources(tune.Callback):
        """After a trial stops, reclaim its Train placement group once its controller is gone."""

        def __init__(self, window_s: float = 60.0):
            self.window_s, self._until, self._last = window_s, 0.0, 0.0
            self.reclaimed = 0

        def _arm(self):
            self._until = time.monotonic() + self.window_s

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._arm()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._arm()

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now < self._until and now - self._last >= 1.0:
                self._last = now
                self.reclaimed += reclaim_orphaned_placement_groups()

    return ReclaimStoppedTrialResources()
