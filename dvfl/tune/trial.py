"""One Tune trial: a distillation run of the shared loop with the trial's parameters applied."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from dvfl.config import RunConfig
from dvfl import storage
from dvfl.tune.search_config import TuneConfig, apply_params, flatten


# each trial driver's record, <experiment>/dvfl_trials/<trial id>.json: written straight into the
# experiment (Tune syncs a trial's own folder later, and a search killed meanwhile would lose it)
TRIALS_DIR = "dvfl_trials"


def diverged(trial_id: str, result: dict) -> bool:
    """Tune stopper: a trial whose training loss is no longer finite stops at once (a NaN metric
    would never fall below an ASHA cutoff, so the trial would otherwise run to the end)."""
    loss = result.get("train_loss")
    return isinstance(loss, float) and not math.isfinite(loss)


def trial_driver(params: dict, setup: dict) -> None:
    """One Tune trial: a distillation run with ``params`` applied to the base run config.

    A one-worker trial trains in this process on the datasets the search built once (no worker
    group, no placement group, no dataset to read again: seconds instead of most of a minute on a
    small machine); a trial of several workers is a Ray Train run of its own, whose rank-0
    metrics reach Tune through ``TuneReportCallback``. The teacher signal (the shared cache,
    already in the object store) comes from the search driver: a trial never loads or runs a
    teacher in cached mode.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dvfl import pipeline

    # a re-run of a cost level's best trial with another student seed: {"front": {"params", "seed", "of"}}
    front = params.get("front")
    cfg = apply_params(setup["base"], front["params"] if front else params)
    seed = front["seed"] if front else cfg.seed
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    teacher = setup["teacher"]
    kd = teacher["mode"] != "none"
    loop = pipeline.training_loop_config(cfg, cfg.student, cfg.optim, setup["num_classes"], seed,
                                         {k: v for k, v in teacher.items() if k != "fingerprint"},
                                         tensorboard_dir=None, hooks=setup.get("hooks"))
    # the search's driver prints each epoch's line (epoch_lines_callback): in order with its own
    # lines, whereas a worker's printed line reaches the terminal whenever Ray forwards it
    loop = dataclasses.replace(loop, label=trial_label(trial_id, front), print_epochs=False, stop_on_divergence=False)
    name = f"{setup['experiment']}-{trial_id}"
    in_process = setup.get("data") is not None
    if not in_process:  # Tune restarts a failed trial (it resumes the run): a retry inside it too made (m + 1)^2 tries
        cfg = dataclasses.replace(cfg, max_failures=0)
    record = {"trial_id": trial_id, "params": flatten(front["params"] if front else params), "seed": seed,
              "front_of": front["of"] if front else None, "train_run": None if in_process else name,
              "in_process": in_process, "pid": os.getpid(),
              "teacher_mode": loop.teacher.mode, "teacher_model_shipped": loop.teacher.state_ref is not None,
              "starts": []}
    path = storage.join(setup["records"], f"{trial_id}.json")
    storage.makedirs(setup["records"])
    if storage.isfile(path):  # one entry per start: a trial restarted after an interruption has two
        record["starts"] = storage.read_json(path).get("starts", [])
    record["starts"].append(time.time())
    storage.write_text(path, json.dumps(record, indent=1))
    result = pipeline.launch_training(
        cfg, loop, role="dvfl+unlabeled" if kd and setup["unlabeled"] else "dvfl" if kd else "vfl", name=name,
        storage_path=setup["train_storage"], unlabeled_dir=cfg.unlabeled_dir if kd and setup["unlabeled"] else None,
        callbacks=None if in_process else [TuneReportCallback()], data=setup.get("data"), in_tune_trial=in_process)
    if result is not None and result.error is not None:
        raise result.error


def trial_label(trial_id: str, front: dict | None) -> str:
    """A trial's name in terminal lines: concurrent trials print side by side."""
    return f"trial {trial_id}" + (f" s{front['seed']}" if front else "")


def epoch_lines_callback(epochs: int):
    """Tune callback: each trial's epoch line, printed on the search driver's stdout as results
    arrive (Tune pickles its callbacks with the experiment: no reference to a log function)."""
    from ray import tune

    from dvfl.train.loop import epoch_line

    class EpochLines(tune.Callback):
        def __init__(self):
            self.told = set()  # trials whose first line named the device

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "train_loss" in result and "val_top1" in result:
                where = "" if trial.trial_id in self.told else result.get("device", "")
                self.told.add(trial.trial_id)
                line = epoch_line(trial_label(trial.trial_id, trial.config.get("front")), result, epochs, where)
                sys.stdout.write(line + "\n")
                sys.stdout.flush()

    return EpochLines()


def trials_in_process(t: TuneConfig, cfg: RunConfig) -> bool:
    """One worker per trial (and ``tune.in_process``): the trial trains in its own process."""
    return t.in_process and cfg.scaling.num_workers == 1


def trial_resources(t: TuneConfig, cfg: RunConfig) -> dict:
    """What one trial's actor reserves: the whole trial when it trains in-process, else only the
    light driver (its Train workers reserve their own)."""
    if not trials_in_process(t, cfg):
        return {"cpu": t.driver_cpus}
    # the worker's custom resources too (e.g. {train_node: 1}): the trial is the worker, and they
    # keep it on the nodes meant for training (docs/cluster.md)
    return {"cpu": t.driver_cpus + cfg.scaling.cpus_per_worker, **({"gpu": 1} if cfg.scaling.use_gpu else {}),
            "custom_resources": dict(cfg.scaling.worker_resources or {})}
