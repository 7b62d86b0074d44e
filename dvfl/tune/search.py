"""Running a search: the shared stages prepared once, then Tune's trials (or a resumed experiment)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from dvfl.config import ConfigError, RunConfig, with_added_defaults
from dvfl import storage
from dvfl.runtime import signal_handlers_kept
from dvfl.tune.report import collect_trials, cost_level_bests, report_errors, require_finished, write_results
from dvfl.tune.resources import check_resources, reclaim_callback
from dvfl.tune.search_config import (FRONT_SUFFIX, TuneConfig, asha_words, experiment_dir, param_space,
                                     plain_experiment_name)
from dvfl.tune.trial import (TRIALS_DIR, diverged, epoch_lines_callback, trial_driver, trial_resources,
                              trials_in_process)


SEARCH_FILE = "dvfl_search.json"  # what the experiment searches (refuses to resume a different search)


def front_reruns(trials: list[dict], seeds) -> list[dict]:
    """The re-runs, one per trial and fresh student seed (never the search's own: its run was chosen
    as the best of its cost, so its score is biased upward and stays out of the spread)."""
    return [{"params": r["params_searched"], "seed": seed, "of": r["trial_id"]} for r in trials for seed in seeds]


def same_reruns(recorded: list, reruns: list[dict]) -> bool:
    """Whether a resumed front's recorded re-runs (as JSON) are ``reruns``, in any order: the order
    changed (cheapest first, once best first), and a restored front must keep its finished re-runs."""
    def canonical(runs):
        return sorted(json.dumps(r, sort_keys=True, default=str) for r in runs)

    return canonical(recorded) == canonical(json.loads(json.dumps(reruns, default=str)))


def _settings(t: TuneConfig, cfg: RunConfig) -> dict:
    """The part of a search's record that its configs alone give (known before any work)."""
    return {"tune": {k: v for k, v in t.to_dict().items() if k not in ("storage", "run_config", "set")},
            "run_config": cfg.as_given().to_dict()}


def _recorded_as_now(search: dict) -> dict:
    """A recorded ``search`` (:func:`_fingerprint`'s) with the fields a later version added, at their
    defaults (:func:`~dvfl.config.with_added_defaults`): such a field counted as a change, whose advice
    ("put the old values back") could not be followed, and --fresh threw the trials away."""
    defaults = json.loads(json.dumps(_settings(TuneConfig(), RunConfig()), default=str))
    return with_added_defaults(search, defaults)


def same_search(recorded: dict, fp: dict) -> bool:
    """Whether a recorded fingerprint (``dvfl_search.json``) is ``fp``'s search, as recorded or with
    the fields a later version added at their defaults."""
    return recorded.get("digest") == fp["digest"] or \
        _recorded_as_now(recorded.get("search")) == _recorded_as_now(fp["search"])


def _fingerprint(t: TuneConfig, cfg: RunConfig, dataset_info: dict, teacher: dict) -> dict:
    from dvfl.pipeline import digest

    from dvfl.pipeline import init_identity

    what = {**_settings(t, cfg), "dataset": dataset_info["fingerprint"],
            "teacher": {"mode": teacher["mode"], "fingerprint": teacher.get("fingerprint")}}
    init = init_identity(cfg.student)
    if init:  # an init checkpoint replaced under its name: another search (absent without one: older
        what["student_init"] = init  # searches still resume)
    return {"digest": digest(what), "search": what}


def changed_fields(old, new, limit: int = 6) -> str:
    """What differs between two recorded searches, as dotted fields (``tune.seed: 0 -> 1``)."""
    def leaves(tree, at=""):
        if isinstance(tree, dict) and tree:
            for k, v in tree.items():
                yield from leaves(v, f"{at}.{k}" if at else str(k))
        else:
            yield at, json.dumps(tree, sort_keys=True)

    before, after = (dict(leaves(json.loads(json.dumps(x, default=str)))) for x in (old, new))
    changes = [f"{k}: {before.get(k, '(absent)')} -> {after.get(k, '(absent)')}"
               for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
    if not changes or not isinstance(old, dict):
        return "its record differs (written by another version of this project)"
    return ", ".join(changes[:limit]) + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def prepare(cfg: RunConfig, log=print, metric: str | None = None) -> tuple[dict, dict]:
    """Clips, teacher and cache, each reused when finished (built once otherwise); the teacher
    signal every trial gets. The only place the search may touch the teacher. ``metric``: what ASHA
    stops trials by (None: it stops none)."""
    from dvfl import pipeline

    info = pipeline.ensure_clips(cfg, log)
    if metric == "val_top5" and len(info["classes"]) <= 5:  # (before the teacher and the cache)
        raise ConfigError(f"tune.metric val_top5 on {len(info['classes'])} classes: every trial scores 100 % top-5 "
                          "(5 guesses cover every class), so ASHA would stop trials at random; use val_top1 or val_loss")
    pipeline.say_validation_note(cfg, log)
    if cfg.teacher.mode == "none":
        return info, {"mode": "none"}
    teacher_path, teacher_spec = pipeline.ensure_teacher(cfg, info, log)
    pipeline.check_teacher(cfg, teacher_path, teacher_spec, info, log)
    if cfg.teacher.mode == "cached":
        pipeline.ensure_cache(cfg, teacher_path, log)
    return info, pipeline.teacher_signal(cfg, teacher_path, teacher_spec, info, kd=True, log=log)


def refuse_clips_of_an_earlier_decoder(exp: str, cfg: RunConfig, previous: dict) -> None:
    """A search on the run's own clips that an earlier decoder made: those clips are ingested again
    (:data:`dvfl.data.decode.DECODE_RULES`), and the search cannot resume on other clips. Refused now,
    before the ingest, the teacher and the cache are rebuilt for nothing, saying why."""
    from dvfl.data.ingest import older_decode_rules_note

    # (given clips, and a Kinetics run's own, are used as they are: pipeline.ready_clips)
    if cfg.data.clips or cfg.data.dataset == "kinetics" \
            or not storage.isfile(storage.join(cfg.clips_dir, "dataset.json")):
        return
    info = storage.read_json(storage.join(cfg.clips_dir, "dataset.json"))
    if previous.get("dataset") == info.get("fingerprint") and older_decode_rules_note(cfg.clips_dir, info):
        raise ConfigError(f"{exp} holds a search on clips an earlier decoder made ({cfg.clips_dir}): this version "
                          "ingests them again, and the search cannot resume on other clips: --fresh starts it over "
                          "(or pick another tune.experiment)")


def refuse_changed_settings(t: TuneConfig, cfg: RunConfig) -> None:
    """Before any work: an experiment holding a search of other settings is refused now, not after
    the videos, clips and cache were rebuilt for the new settings (and again for the old ones, to
    resume it). The data's and teacher's fingerprints are compared later (:func:`resumable`)."""
    search_file = storage.join(experiment_dir(t, cfg), SEARCH_FILE)
    if not storage.isfile(search_file):
        return
    previous = _recorded_as_now(storage.read_json(search_file).get("search") or {})
    refuse_clips_of_an_earlier_decoder(experiment_dir(t, cfg), cfg, previous)
    now = json.loads(json.dumps(_settings(t, cfg), default=str))  # as it was written
    before = {k: previous.get(k) for k in now}
    if before != now:
        raise ConfigError(f"{experiment_dir(t, cfg)} holds a different search: {changed_fields(before, now)}; "
                          + RESUME_ADVICE)


RESUME_ADVICE = ("a resumed experiment keeps the trials, resources and concurrency it started with (Tune restores "
                 "them as saved): put the old values back to resume it, pick another tune.experiment, or --fresh "
                 "to discard it")


def saved_trial_statuses(exp: str) -> list[str]:
    """The status of every trial in Tune's last saved state of ``exp`` (what a restore starts from)."""
    states = storage.listdir(exp, ".json")
    states = [p for p in states if storage.basename(p).startswith("experiment_state-")]
    if not states:
        return []
    try:
        data = storage.read_json(states[-1])
        return [json.loads(trial)["status"] for trial, _ in data.get("trial_data", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def expected_trials(t: TuneConfig) -> int:
    """How many trials the search makes: its samples times every grid's values."""
    n = t.num_samples
    for domain in t.space.values():
        if "grid" in domain:
            n *= len(domain["grid"])
    return n


def restore_words(exp: str, expected: int, what: str, log) -> bool:
    """Say what a restore of ``exp`` does; whether its errored trials run again: those of an
    interrupted run do (the interruption may be why), those of a finished one do not (a trial that
    fails the same way would cost its time again on every rerun; --fresh starts over)."""
    statuses = saved_trial_statuses(exp)
    errored = statuses.count("ERROR")
    if len(statuses) < expected or any(s not in ("TERMINATED", "ERROR") for s in statuses):
        log(f"[tune] resuming the interrupted {what} {exp} (finished trials are kept, the others rerun)")
        return True
    log(f"[tune] the {what} {exp} finished before: writing its results again"
        + (f" ({errored} errored trial(s) not retried: --fresh starts over)" if errored else ""))
    return False


def resumable(exp: str, fp: dict) -> bool:
    """Whether ``exp`` holds this search, interrupted (Tune resumes it); False where it holds none;
    :class:`ConfigError` where it holds another search, or a Tune experiment this project did not start."""
    from ray import tune

    tune_path, tune_fs = storage.ray_storage(exp)
    if not tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
        return False
    search_file = storage.join(exp, SEARCH_FILE)
    if not storage.isfile(search_file):
        # Tune resumes by unpickling the experiment's state: never from a folder this project did not
        # start (a tuner.pkl planted in a shared tune.storage would run its code here)
        raise ConfigError(f"{exp} holds a Tune experiment this project did not start (no {SEARCH_FILE}); it was "
                          "not resumed: pick another tune.experiment or tune.storage (one only you can write)")
    previous = storage.read_json(search_file)
    if not same_search(previous, fp):
        old, now = _recorded_as_now(previous.get("search")), _recorded_as_now(fp["search"])
        if (isinstance(old, dict) and old.get("dataset") != now.get("dataset")
                and {k: v for k, v in old.items() if k != "dataset"} == {k: v for k, v in now.items() if k != "dataset"}):
            # the same settings on other clips: the old clips are gone (re-ingested), "put them back" cannot be done
            raise ConfigError(f"{exp} holds this search on other clips (dataset {old.get('dataset')}, now "
                              f"{now.get('dataset')}: videos added or changed, or decoded by newer rules): --fresh starts it over on these, "
                              "or pick another tune.experiment")
        raise ConfigError(f"{exp} holds a different search: {changed_fields(old, now)}; " + RESUME_ADVICE)
    return True


def remove_experiment(exp: str | Path, name: str, log=print, why: str = "--fresh") -> None:
    """--fresh (or ``why``): delete ``exp`` (a folder or a URI prefix) only if it is one of our Tune
    experiments under a plain name."""
    exp = os.fspath(exp)
    check_removable(exp, name)
    log(f"[tune] {why}: removing {exp}")
    # Tune's state first, this project's mark last: a delete cut short leaves either nothing to resume
    # (a fresh search) or a folder that --fresh still recognises, never a resumable one without the mark
    storage.remove(storage.join(exp, "tuner.pkl"))
    for name in storage.list_entries(exp):
        if name != SEARCH_FILE:
            storage.remove_tree(storage.join(exp, name)) if storage.isdir(storage.join(exp, name)) \
                else storage.remove(storage.join(exp, name))
    storage.remove_tree(exp)


def check_removable(exp: str, name: str) -> None:
    """Raise unless ``exp`` is one of our Tune experiments under the plain name ``name``."""
    if not plain_experiment_name(name) or storage.basename(exp.rstrip("/")) != name:
        raise ConfigError(f"tune.experiment must be a plain name, got {name!r}; --fresh deletes nothing")
    if (not storage.is_remote(exp) and os.path.islink(exp)) or not storage.isfile(storage.join(exp, SEARCH_FILE)):
        raise ConfigError(f"--fresh: {exp} is not a Tune experiment of this project (no {SEARCH_FILE} in it); "
                          "it was not deleted: pick another tune.experiment or tune.storage")


@contextlib.contextmanager
def tune_output(verbose: int):
    """``verbose=0`` silent: Ray 2.60's new output engine prints its experiment box and a
    TensorBoard hint (to its own driver artifacts, not our experiment) even then; its legacy
    reporter is silent at 0. Our own lines name the experiment and its TensorBoard command."""
    if verbose != 0 or "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def run_search(t: TuneConfig, cfg: RunConfig, *, fresh: bool = False, verbose: int = 0, log=print,
               fresh_done=None) -> dict:
    """Prepare the shared stages, run (or resume) the Tune experiment, re-run each cost level's
    (width's) best trial with ``tune.front_seeds`` (in ``<experiment>-front``), draw the Pareto front
    from the re-runs' means and write the results.

    Needs Ray initialised (:func:`dvfl.runtime.ray_runtime`). Returns the results summary. One
    search per experiment on this machine: a second one (a resubmitted job) is refused (it restored
    the running search's state and ran its live trials again). ``fresh_done``: called once ``fresh``
    has deleted the earlier search.
    """
    from dvfl.locks import folder_lock

    exp = experiment_dir(t, cfg)
    with folder_lock(exp, "search"):
        return _run_search(t, cfg, fresh=fresh, verbose=verbose, log=log, fresh_done=fresh_done)


def _run_search(t: TuneConfig, cfg: RunConfig, *, fresh: bool, verbose: int, log, fresh_done=None) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from dvfl import pipeline

    check_resources(t, cfg, ray.cluster_resources())
    exp = experiment_dir(t, cfg)
    front_exp = exp + FRONT_SUFFIX
    if fresh:
        found = [(path, name) for path, name in ((exp, t.experiment), (front_exp, t.experiment + FRONT_SUFFIX))
                 if storage.exists(path)]
        for path, name in found:  # both checked before either is deleted
            check_removable(path, name)
        for path, name in found:
            remove_experiment(path, name, log)
        if fresh_done:
            fresh_done()
    else:
        refuse_changed_settings(t, cfg)
    asha_stops = t.asha.enabled and t.asha.grace_period < cfg.optim.epochs
    info, teacher = prepare(cfg, log, metric=t.metric if asha_stops else None)
    fp = _fingerprint(t, cfg, info, teacher)
    search_file = storage.join(exp, SEARCH_FILE)
    # on object storage Tune reads and writes the experiment through our filesystem (its endpoint)
    tune_path, tune_fs = storage.ray_storage(exp)
    restoring = resumable(exp, fp)
    # checked before the search too: a refusal after it would throw its trials' results away
    front_path = storage.ray_storage(front_exp)[0]
    front_file = storage.join(front_exp, SEARCH_FILE)
    front_restoring = bool(t.front_seeds) and tune.Tuner.can_restore(front_path, storage_filesystem=tune_fs)
    if front_restoring and (not storage.isfile(front_file) or not same_search(storage.read_json(front_file), fp)):
        raise ConfigError(f"{front_exp} holds the front re-runs of a different search: --fresh discards both")
    storage.makedirs(exp)
    storage.write_text(search_file, json.dumps(fp, indent=1, default=str))

    setup = {"base": cfg.to_dict(), "teacher": teacher, "num_classes": len(info["classes"]),
             "experiment": t.experiment, "train_storage": storage.join(exp, "train_runs"), "unlabeled": t.unlabeled,
             "records": storage.join(exp, TRIALS_DIR), "data": None, "hooks": pipeline.fault_hooks(cfg)}
    if trials_in_process(t, cfg):  # read, filter and shuffle the clips once, for every trial
        kd = teacher["mode"] != "none"
        setup["data"] = pipeline.shared_training_data(
            cfg, unlabeled_dir=cfg.unlabeled_dir if kd and t.unlabeled else None)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, setup=setup), trial_resources(t, cfg))

    # num_to_keep below makes Tune snapshot the experiment every 2 checkpoints of a trial, and warn
    # each time two come within 5 s (epochs of seconds, trials side by side): expected here, not news
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    def run_config(name: str, extra_callbacks=()):
        return tune.RunConfig(name=name, storage_path=storage.ray_storage(storage.dirname(exp))[0],
                              storage_filesystem=tune_fs, verbose=verbose, stop=diverged,
                              callbacks=[reclaim_callback(), epoch_lines_callback(cfg.optim.epochs), *extra_callbacks],
                              # a trial lost with its node (a preempted spot node, the OOM killer) resumes
                              # from its last checkpoint, as a distillation run does, instead of erroring
                              failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                              # an in-process trial reports a checkpoint every epoch; only the last is
                              # ever read (a resume): Tune's default kept them all (~270 MB each for nano)
                              checkpoint_config=tune.CheckpointConfig(num_to_keep=2))

    def variant_generator():
        # concurrency is the search algorithm's: Tune ignores (with a warning) max_concurrent_trials
        # given next to a BasicVariantGenerator
        return BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent_trials)

    if restoring:
        retry = restore_words(exp, expected_trials(t), "experiment", log)
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=retry,
                                   storage_filesystem=tune_fs)
    else:
        from dvfl.tune.scheduler import resumable_asha

        # the scheduler and its results callback go into the same Tuner (one pickle): a resume
        # restores the callback's results and the scheduler replays them into its rungs
        scheduler, results = (resumable_asha(t.metric, max_t=cfg.optim.epochs, grace_period=t.asha.grace_period,
                                             reduction_factor=t.asha.reduction_factor, stop_last_trials=False)
                              if t.asha.enabled else (FIFOScheduler(), None))
        tuner = tune.Tuner(
            trainable, param_space=param_space(t),
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples, scheduler=scheduler,
                                        # in-process trials keep their actor (torch imported once)
                                        reuse_actors=trials_in_process(t, cfg), search_alg=variant_generator()),
            run_config=run_config(t.experiment, [results] if results else ()))
        log(f"[tune] {t.experiment}: {t.num_samples} sample(s) of {sorted(t.space)}, "
            f"ASHA {asha_words(t, cfg)}, up to {cfg.optim.epochs} epochs per trial, "
            f"teacher signal: {teacher['mode']}; results in {exp}")
    started = time.time()
    with tune_output(verbose):
        with signal_handlers_kept(signal.SIGINT, signal.SIGUSR1):  # Tune's stay installed after its run
            grid = tuner.fit()
    require_finished(grid, "search", cfg.optim.epochs, expected_trials(t), fresh=fresh)
    rows = collect_trials(grid, t, cfg, info)
    front_rows = []
    levels = cost_level_bests(rows)
    if t.front_seeds and levels:
        # each cost level's best trial again with each extra student seed, every epoch: one grid of
        # {params, seed} (a restored front experiment keeps its finished re-runs); the front is
        # drawn from these runs' means (report.choose)
        reruns = front_reruns(levels, t.front_seeds)
        recorded = storage.read_json(front_file).get("reruns") if front_restoring else None  # None: not recorded
        if recorded is not None and not same_reruns(recorded, reruns):
            # the resumed search's front changed (a trial that had errored ran this time): start the front over
            remove_experiment(front_exp, t.experiment + FRONT_SUFFIX, log,
                              why="the front changed since its re-runs began; starting them over")
            for run in storage.list_entries(setup["train_storage"]):  # and their Ray Train runs' checkpoints
                if run.startswith(f"{t.experiment}{FRONT_SUFFIX}-"):
                    storage.remove_tree(storage.join(setup["train_storage"], run))
            front_restoring = False
        storage.makedirs(front_exp)
        storage.write_text(front_file, json.dumps({**fp, "reruns": reruns}, indent=1, default=str))
        front_trainable = tune.with_resources(
            tune.with_parameters(trial_driver, setup={**setup, "experiment": t.experiment + FRONT_SUFFIX,
                                                      "records": storage.join(front_exp, TRIALS_DIR)}),
            trial_resources(t, cfg))
        if front_restoring:
            retry = restore_words(front_exp, len(reruns), "front re-runs", log)
            front_tuner = tune.Tuner.restore(front_path, trainable=front_trainable, resume_unfinished=True,
                                             resume_errored=retry, storage_filesystem=tune_fs)
        else:
            log(f"[tune] re-running the best trial of each of {len(levels)} cost level(s) with student seed(s) "
                f"{t.front_seeds}: {len(reruns)} run(s) of {cfg.optim.epochs} epochs")
            front_tuner = tune.Tuner(
                front_trainable, param_space={"front": tune.grid_search(reruns)},
                tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, reuse_actors=trials_in_process(t, cfg),
                                            search_alg=variant_generator()),
                run_config=run_config(t.experiment + FRONT_SUFFIX))
        with tune_output(verbose):
            with signal_handlers_kept(signal.SIGINT, signal.SIGUSR1):
                front_grid = front_tuner.fit()
        require_finished(front_grid, "front's re-runs", cfg.optim.epochs, len(reruns), fresh=fresh)
        front_rows = collect_trials(front_grid, t, cfg, info, exp=front_exp)
    summary = write_results(exp, t, cfg, rows, front_rows=front_rows, wall_seconds=time.time() - started, log=log,
                            resumed=bool(restoring))
    report_errors(rows, log)
    report_errors(front_rows, log, required=False)
    return summary
