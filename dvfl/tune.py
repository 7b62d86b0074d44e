"""Hyper-parameter search with Ray Tune: which temperature, α, learning rate and student width?

Every trial is a distillation run of the shared loop (:func:`dvfl.train.loop.train_loop_per_worker`)
on the same clip shards against the same teacher-logit cache: the clips, the teacher and the cache
are prepared once, before the search (:mod:`dvfl.pipeline` reuses finished stages by
fingerprint), so no trial ever runs the teacher.

The Ray 2.60 pattern (Train V2): a Tune trial is a light driver function
(:func:`trial_driver`, ``tune.with_resources(..., {"cpu": driver_cpus})``) that builds and fits a
``TorchTrainer`` through :func:`dvfl.train.launch.run_training`, whose Train ``RunConfig`` carries
``TuneReportCallback`` so rank 0's per-epoch metrics reach Tune; ASHA stops weak trials on the
validation top-1 of each epoch (``time_attr="epoch"``: an epoch number survives a resumed Train run).

The search is data: a YAML file (``configs/tune_*.yaml``, see :class:`TuneConfig`) names the run
config every trial starts from and the space as dotted config fields::

    space:
      kd.temperature: {loguniform: [1, 20]}
      student.embed_dim: {choice: [12, 16, 24]}

Results live under ``<storage>/<experiment>`` (Tune's per-trial TensorBoard events, the trial
table, a Pareto plot and the best configuration as a run config ``pipelines/distill.py`` takes);
an interrupted experiment resumes with ``Tuner.restore``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dvfl.config import CONFIG_DIR, ConfigError, RunConfig, _build, _set_path, load_config, parse_override
from dvfl.data.shards import atomic_write_text

# Fields a search may vary. Data and teacher fields would invalidate the shared shards and cache;
# scaling fields change the resources the search reserves; epochs are ASHA's to decide.
SEARCHABLE_SECTIONS = ("kd.", "optim.", "student.")
NOT_SEARCHABLE = {"optim.epochs": "ASHA decides how many epochs a trial gets (max_t = optim.epochs)",
                  "student.checkpoint": "a path, not a hyper-parameter", "student.init_2d": "a path, not a hyper-parameter"}
DOMAINS = ("loguniform", "uniform", "choice", "grid")
METRICS = {"val_top1": "max", "val_top5": "max", "val_loss": "min"}
TRIAL_FILE = "dvfl_trial.json"  # written by each trial driver into its Tune trial directory
SEARCH_FILE = "dvfl_search.json"  # what the experiment searches (refuses to resume a different search)
RESULTS_JSON, RESULTS_MD, PARETO_PNG, BEST_CONFIG = "tune_results.json", "tune_results.md", "pareto.png", "best_config.yaml"
# a leftover ``--set`` target for the tune file itself (the rest go to the run config)
TUNE_PREFIX = "tune."


# ----------------------------------------------------------------------------- the search config
@dataclass
class AshaSection:
    enabled: bool = True
    grace_period: int = 1  # epochs every trial gets before it can be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung


@dataclass
class TuneConfig:
    run_config: str | None = None  # the run config every trial starts from (relative to configs/); None: embedded
    set: dict = field(default_factory=dict)  # overrides of run_config, {"optim.epochs": 3}
    experiment: str = "tune"  # the Tune experiment name (results in <storage>/<experiment>)
    storage: str | None = None  # default: <output_dir>/tune
    num_samples: int = 4  # samples of the space (times the size of any grid)
    seed: int = 0  # of the search's random sampling
    metric: str = "val_top1"
    mode: str = "max"
    max_concurrent_trials: int = 1
    driver_cpus: float = 0.25  # the trial driver only builds and fits the TorchTrainer
    unlabeled: bool = False  # trials distil on the unlabelled clips too (the dvfl+unlabeled student)
    asha: AshaSection = field(default_factory=AshaSection)
    space: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(name: str, value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _parse_tune(tree: dict) -> TuneConfig:
    if not isinstance(tree, dict):
        raise ConfigError(f"tune config must be a mapping, got {type(tree).__name__}")
    fields = {f.name for f in dataclasses.fields(TuneConfig)}
    for key in tree:
        if key not in fields:
            raise ConfigError(f"tune.{key} is not a known field (known: {', '.join(sorted(fields))})")
    t = TuneConfig()
    for key in ("run_config", "storage"):
        if tree.get(key) is not None and not isinstance(tree[key], str):
            raise ConfigError(f"tune.{key} must be a path, got {tree[key]!r}")
        setattr(t, key, tree.get(key, getattr(t, key)))
    for key in ("experiment", "metric", "mode"):
        value = tree.get(key, getattr(t, key))
        if not isinstance(value, str) or not value:
            raise ConfigError(f"tune.{key} must be a non-empty string, got {value!r}")
        setattr(t, key, value)
    for key in ("num_samples", "seed", "max_concurrent_trials"):
        setattr(t, key, _number(f"tune.{key}", tree.get(key, getattr(t, key)), int))
    t.driver_cpus = _number("tune.driver_cpus", tree.get("driver_cpus", t.driver_cpus))
    if not isinstance(tree.get("unlabeled", False), bool):
        raise ConfigError(f"tune.unlabeled must be true or false, got {tree['unlabeled']!r}")
    t.unlabeled = tree.get("unlabeled", False)
    overrides = tree.get("set") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"tune.set must be a mapping of section.field: value, got {overrides!r}")
    t.set = dict(overrides)
    asha = tree.get("asha") or {}
    if not isinstance(asha, dict):
        raise ConfigError(f"tune.asha must be a mapping, got {asha!r}")
    for key in asha:
        if key not in {f.name for f in dataclasses.fields(AshaSection)}:
            raise ConfigError(f"tune.asha.{key} is not a known field (known: enabled, grace_period, reduction_factor)")
    if not isinstance(asha.get("enabled", True), bool):
        raise ConfigError(f"tune.asha.enabled must be true or false, got {asha['enabled']!r}")
    t.asha = AshaSection(enabled=asha.get("enabled", True),
                         grace_period=_number("tune.asha.grace_period", asha.get("grace_period", 1), int),
                         reduction_factor=_number("tune.asha.reduction_factor", asha.get("reduction_factor", 2.0)))
    space = tree.get("space") or {}
    if not isinstance(space, dict):
        raise ConfigError(f"tune.space must be a mapping of section.field: {{domain: values}}, got {space!r}")
    t.space = dict(space)
    return t


def _tree_of(cfg: RunConfig) -> dict:
    return copy.deepcopy(cfg.to_dict())


def apply_params(base: RunConfig | dict, params: dict) -> RunConfig:
    """``base`` with ``{"kd.temperature": 3.0}`` (or Tune's nested ``{"kd": {"temperature": 3.0}}``)
    applied, validated (paths are not re-checked)."""
    tree = copy.deepcopy(base) if isinstance(base, dict) else _tree_of(base)
    for key, value in flatten(params).items():
        _set_path(tree, key, _plain(value))
    try:
        return _build(RunConfig, tree, "").validate(check_paths=False)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value):
    """numpy scalars (Tune samples with numpy) -> Python numbers, so config type checks pass."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _domain_values(name: str, spec) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{name} must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                          f"{{choice: [...]}}, {{grid: [...]}}; got {spec!r}")
    (kind, values), = spec.items()
    if kind not in DOMAINS:
        raise ConfigError(f"{name} has unknown domain {kind!r} (known: {', '.join(DOMAINS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{name}.{kind} must be a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform"):
        if len(values) != 2:
            raise ConfigError(f"{name}.{kind} must be [low, high], got {values!r}")
        low, high = (_number(f"{name}.{kind}", v) for v in values)
        if not low < high:
            raise ConfigError(f"{name}.{kind} needs low < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{name}.loguniform needs low > 0, got {values!r}")
    return kind, values


def validate_tune(t: TuneConfig, base: RunConfig) -> TuneConfig:
    """Everything checkable before Ray starts: field names, domains, and every bound or choice of
    the space applied to the run config (so a trial can never fail on a bad value)."""
    if t.num_samples < 1:
        raise ConfigError(f"tune.num_samples must be >= 1, got {t.num_samples}")
    if t.max_concurrent_trials < 1:
        raise ConfigError(f"tune.max_concurrent_trials must be >= 1, got {t.max_concurrent_trials}")
    if not t.driver_cpus > 0:
        raise ConfigError(f"tune.driver_cpus must be > 0, got {t.driver_cpus}")
    if t.metric not in METRICS:
        raise ConfigError(f"tune.metric must be one of {sorted(METRICS)} (reported every epoch), got {t.metric!r}")
    if t.mode not in ("max", "min"):
        raise ConfigError(f"tune.mode must be max or min, got {t.mode!r}")
    if t.mode != METRICS[t.metric]:
        raise ConfigError(f"tune.mode must be {METRICS[t.metric]} for {t.metric}, got {t.mode!r}")
    if "/" in t.experiment or t.experiment in (".", ".."):
        raise ConfigError(f"tune.experiment must be a plain name, got {t.experiment!r}")
    if t.asha.grace_period < 1:
        raise ConfigError(f"tune.asha.grace_period must be >= 1, got {t.asha.grace_period}")
    if t.asha.grace_period > base.optim.epochs:
        raise ConfigError(f"tune.asha.grace_period ({t.asha.grace_period}) must not exceed optim.epochs "
                          f"({base.optim.epochs}), the most epochs a trial gets")
    if not t.asha.reduction_factor > 1:
        raise ConfigError(f"tune.asha.reduction_factor must be > 1, got {t.asha.reduction_factor}")
    if not t.space:
        raise ConfigError("tune.space is empty: name at least one field to search")
    if t.unlabeled and not (base.unlabeled_dir and base.teacher.mode != "none"):
        raise ConfigError("tune.unlabeled needs unlabelled clips (data.unlabeled, or data.synthetic.unlabeled_videos "
                          "> 0) and a teacher (teacher.mode cached or online)")
    for key, spec in t.space.items():
        name = f"tune.space.{key}"
        if not isinstance(key, str) or not key.startswith(SEARCHABLE_SECTIONS) or key in NOT_SEARCHABLE:
            why = NOT_SEARCHABLE.get(key, f"only {', '.join(s + '*' for s in SEARCHABLE_SECTIONS)} fields "
                                          "can be searched (the trials share one set of clips and one teacher cache)")
            raise ConfigError(f"{name} cannot be searched: {why}")
        if key.startswith("kd.") and base.teacher.mode == "none":
            raise ConfigError(f"{name}: searching a KD field needs a teacher (teacher.mode is none)")
        if key == "kd.unlabeled_weight" and not t.unlabeled:
            raise ConfigError(f"{name}: searching it needs trials on unlabelled clips (tune.unlabeled: true)")
        kind, values = _domain_values(name, spec)
        for value in values:
            try:
                apply_params(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    return t


def load_tune_config(path: str | os.PathLike | None = None, overrides=(), *, output_dir: str | None = None,
                     check_paths: bool = True) -> tuple[TuneConfig, RunConfig]:
    """Read a search config and the run config it names; apply ``--set`` overrides (``tune.*`` to
    the search, the rest to the run config after the file's own ``set:``); validate both."""
    path = Path(path) if path else CONFIG_DIR / "tune_embedded.yaml"
    if not path.is_file():
        raise ConfigError(f"tune config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    run_overrides = []
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        if key.startswith(("tune.space.", "tune.set.")):  # their keys are dotted field names
            section, field_name = key[len(TUNE_PREFIX):].split(".", 1)
            if not isinstance(tree.get(section) or {}, dict):
                raise ConfigError(f"tune.{section} must be a mapping")
            tree[section] = {**(tree.get(section) or {}), field_name: value}
        elif key.startswith(TUNE_PREFIX):
            _set_path(tree, key[len(TUNE_PREFIX):], value)
        else:
            run_overrides.append((key, value))
    t = _parse_tune(tree)
    from dvfl import paths

    t.storage = paths.absolute(t.storage, paths.output_base())  # before any trial's working directory
    run_path = None
    if t.run_config:
        run_path = Path(t.run_config)
        if not run_path.is_absolute():
            run_path = (path.parent / run_path) if (path.parent / run_path).is_file() else CONFIG_DIR / run_path
        t.run_config = str(run_path)
    sets = list(t.set.items()) + run_overrides + ([("output_dir", output_dir)] if output_dir else [])
    base = load_config(run_path, sets, check_paths=check_paths)
    from dvfl.storage import is_remote

    # Tune's experiment folder (trial records, restore) is read and written as local files here
    for name, where in (("tune.storage", t.storage), ("output_dir", None if t.storage else base.output_dir)):
        if where and is_remote(where):
            raise ConfigError(f"{name} is {where}: a Tune experiment on object storage is not supported yet; "
                              "give tune.storage a local or shared-file-system path (the run's data.clips, "
                              "teacher and cache may stay on object storage)")
    return validate_tune(t, base), base


# ----------------------------------------------------------------------------- resources
def required_resources(t: TuneConfig, cfg: RunConfig) -> dict:
    """What the search holds at most at once: every concurrent trial's driver and Train workers,
    plus one CPU for Ray Data's read tasks (ray-2.60-notes: hangs #1 and #4)."""
    per_trial = t.driver_cpus + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    need = {"CPU": t.max_concurrent_trials * per_trial + 1.0}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(t.max_concurrent_trials * cfg.scaling.num_workers)
    return need


def check_resources(t: TuneConfig, cfg: RunConfig, available: dict) -> None:
    for key, amount in required_resources(t, cfg).items():
        if available.get(key, 0.0) + 1e-9 < amount:
            raise ConfigError(
                f"tune.max_concurrent_trials={t.max_concurrent_trials} needs {amount:g} {key} "
                f"({t.max_concurrent_trials} x (tune.driver_cpus {t.driver_cpus:g} + scaling.num_workers "
                f"{cfg.scaling.num_workers} x scaling.cpus_per_worker {cfg.scaling.cpus_per_worker:g})"
                f"{' + 1 for Ray Data' if key == 'CPU' else ''}) but Ray has {available.get(key, 0.0):g}: "
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


def _reclaim_callback():
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


# ----------------------------------------------------------------------------- one trial
def diverged(trial_id: str, result: dict) -> bool:
    """Tune stopper: a trial whose training loss is no longer finite stops at once (a NaN metric
    would never fall below an ASHA cutoff, so the trial would otherwise run to the end)."""
    loss = result.get("train_loss")
    return isinstance(loss, float) and not math.isfinite(loss)


def trial_driver(params: dict, setup: dict) -> None:
    """One Tune trial: a distillation run with ``params`` applied to the base run config.

    Runs in a light Tune actor; the Train workers get their own resources. The teacher signal
    (the shared cache, already in the object store) comes from the search driver: the trial
    never loads or runs a teacher in cached mode.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dvfl import pipeline
    from dvfl.train.launch import Scaling, run_training

    cfg = apply_params(setup["base"], params)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    teacher = setup["teacher"]
    kd = teacher["mode"] != "none"
    loop = pipeline._loop_config(cfg, cfg.student, cfg.optim, setup["num_classes"], cfg.seed,
                                 {k: v for k, v in teacher.items() if k != "fingerprint"}, tensorboard_dir=None)
    kwargs = loop["model"]["kwargs"]
    loop["init_state_ref"] = pipeline._init_state_ref(cfg.student, kwargs, log=print)
    name = f"{setup['experiment']}-{trial_id}"
    record = {"trial_id": trial_id, "params": flatten(params), "train_run": name,
              "teacher_mode": loop["teacher"]["mode"], "teacher_model_shipped": "state_ref" in loop["teacher"],
              "starts": []}
    trial_dir = ctx.get_trial_dir()
    if trial_dir:  # one entry per start: a trial restarted after an interruption has two
        path = Path(trial_dir, TRIAL_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            record["starts"] = json.loads(path.read_text()).get("starts", [])
        record["starts"].append(time.time())
        atomic_write_text(path, json.dumps(record, indent=1))
    result = run_training(
        loop, clips_dir=cfg.clips_dir, **pipeline.validation_args(cfg),
        unlabeled_dir=cfg.unlabeled_dir if kd and setup["unlabeled"] else None,
        scaling=Scaling(cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker,
                        cfg.scaling.worker_resources),
        name=name, storage_path=setup["train_storage"], max_failures=cfg.max_failures,
        label_fraction=cfg.data.label_fraction, teacher_pool=cfg.data.teacher_pool, role="student",
        callbacks=[TuneReportCallback()])
    if result.error is not None:
        raise result.error


# ----------------------------------------------------------------------------- the search
def param_space(t: TuneConfig) -> dict:
    from ray import tune

    space: dict = {}
    for key, spec in t.space.items():
        (kind, values), = spec.items()
        domain = {"loguniform": lambda v: tune.loguniform(float(v[0]), float(v[1])),
                  "uniform": lambda v: tune.uniform(float(v[0]), float(v[1])),
                  "choice": tune.choice, "grid": tune.grid_search}[kind](values)
        node = space
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = domain
    return space


def experiment_dir(t: TuneConfig, cfg: RunConfig) -> Path:
    return Path(os.path.abspath(t.storage or os.path.join(cfg.output_dir, "tune"))) / t.experiment


def _fingerprint(t: TuneConfig, cfg: RunConfig, dataset_info: dict, teacher: dict) -> dict:
    from dvfl.pipeline import _digest

    what = {"tune": {k: v for k, v in t.to_dict().items() if k not in ("storage", "run_config", "set")},
            "run_config": cfg.to_dict(), "dataset": dataset_info["fingerprint"],
            "teacher": {"mode": teacher["mode"], "fingerprint": teacher.get("fingerprint")}}
    return {"digest": _digest(what), "search": what}


def prepare(cfg: RunConfig, log=print) -> tuple[dict, dict]:
    """Clips, teacher and cache, each reused when finished (built once otherwise); the teacher
    signal every trial gets. The only place the search may touch the teacher."""
    from dvfl import pipeline

    info = pipeline.ensure_clips(cfg, log)
    if cfg.teacher.mode == "none":
        return info, {"mode": "none"}
    teacher_path, teacher_spec = pipeline.ensure_teacher(cfg, info, log)
    pipeline.check_teacher(cfg, teacher_path, teacher_spec, info, log)
    if cfg.teacher.mode == "cached":
        pipeline.ensure_cache(cfg, teacher_path, log)
    return info, pipeline.teacher_signal(cfg, teacher_path, teacher_spec, info, kd=True)


def remove_experiment(exp: Path, name: str, log=print) -> None:
    """--fresh: delete ``exp`` only if it is one of our Tune experiments under a plain name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or exp.name != name:
        raise ConfigError(f"tune.experiment must be a plain name (letters, digits, '.', '_', '-'), got {name!r}; "
                          "--fresh deletes nothing")
    if exp.is_symlink() or not (exp / SEARCH_FILE).is_file():
        raise ConfigError(f"--fresh: {exp} is not a Tune experiment of this project (no {SEARCH_FILE} in it); "
                          "it was not deleted: pick another tune.experiment or tune.storage")
    log(f"[tune] --fresh: removing {exp}")
    shutil.rmtree(exp)


def run_search(t: TuneConfig, cfg: RunConfig, *, fresh: bool = False, verbose: int = 1, log=print) -> dict:
    """Prepare the shared stages, run (or resume) the Tune experiment, write the results.

    Needs Ray initialised (:func:`dvfl.runtime.ray_runtime`). Returns the results summary.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    check_resources(t, cfg, ray.cluster_resources())
    exp = experiment_dir(t, cfg)
    if fresh and exp.exists():
        remove_experiment(exp, t.experiment, log)
    info, teacher = prepare(cfg, log)
    fp = _fingerprint(t, cfg, info, teacher)
    search_file = exp / SEARCH_FILE
    restoring = tune.Tuner.can_restore(str(exp))
    if restoring and search_file.is_file():
        previous = json.loads(search_file.read_text())
        if previous["digest"] != fp["digest"]:
            raise ConfigError(f"{exp} holds a different search (its search config, run config, clips or teacher "
                              "changed): pick another tune.experiment, or --fresh to discard it")
    exp.mkdir(parents=True, exist_ok=True)
    atomic_write_text(search_file, json.dumps(fp, indent=1, default=str))

    setup = {"base": cfg.to_dict(), "teacher": teacher, "num_classes": len(info["classes"]),
             "experiment": t.experiment, "train_storage": str(exp / "train_runs"), "unlabeled": t.unlabeled}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, setup=setup), {"cpu": t.driver_cpus})
    if restoring:
        log(f"[tune] resuming the interrupted experiment {exp} (finished trials are kept, the others rerun)")
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs, grace_period=t.asha.grace_period,
                                   reduction_factor=t.asha.reduction_factor, stop_last_trials=False)
                     if t.asha.enabled else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space(t),
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                        max_concurrent_trials=t.max_concurrent_trials, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=t.seed,
                                                                         max_concurrent=t.max_concurrent_trials)),
            run_config=tune.RunConfig(name=t.experiment, storage_path=str(exp.parent), verbose=verbose, stop=diverged,
                                      callbacks=[_reclaim_callback()],
                                      failure_config=tune.FailureConfig(max_failures=0)))
        log(f"[tune] {t.experiment}: {t.num_samples} sample(s) of {sorted(t.space)}, "
            f"ASHA {'on ' + t.metric if t.asha.enabled else 'off'}, up to {cfg.optim.epochs} epochs per trial, "
            f"teacher signal: {teacher['mode']}; results in {exp}")
    started = time.time()
    grid = tuner.fit()
    wall = time.time() - started
    rows = collect_trials(grid, t, cfg, info)
    summary = write_results(exp, t, cfg, rows, wall_seconds=wall, log=log)
    report_errors(rows, log)
    return summary


# ----------------------------------------------------------------------------- results
_COST: dict = {}


def student_cost(cfg: RunConfig, num_classes: int) -> dict:
    """GMACs per clip, parameters and width of the student a config trains (cached per model)."""
    from dvfl.pipeline import model_kwargs
    from dvfl.profile import build_model, count_flops, count_params

    kwargs = model_kwargs(cfg.student, num_classes, cfg)
    key = json.dumps([cfg.student.model, kwargs], sort_keys=True)
    if key not in _COST:
        extra = {k: v for k, v in kwargs.items() if k not in ("num_classes", "num_frames", "img_size", "embed_dim",
                                                              "drop_path_rate")}
        common = dict(num_classes=num_classes, frames=cfg.data.frames, size=cfg.crop_size,
                      embed_dim=kwargs.get("embed_dim"), **extra)
        model = build_model(cfg.student.model, device="meta", **common)
        _COST[key] = {"gmacs": count_flops(cfg.student.model, **common)["gmacs_per_clip"],
                      "params": count_params(model)["params"], "width": int(getattr(model, "embed_dim", 0)) or None}
    return _COST[key]


def collect_trials(grid, t: TuneConfig, cfg: RunConfig, dataset_info: dict) -> list[dict]:
    """One row per trial, from Tune's ResultGrid (also after a restore)."""
    num_classes = len(dataset_info["classes"])
    rows = []
    for result in grid:
        params = flatten(result.config or {})
        trial_cfg = apply_params(cfg, params)
        df = result.metrics_dataframe
        history = [] if df is None or "epoch" not in getattr(df, "columns", []) else \
            df.dropna(subset=["epoch"]).sort_values("epoch").drop_duplicates("epoch", keep="last").to_dict("records")
        record = {}
        if result.path and os.path.isfile(os.path.join(result.path, TRIAL_FILE)):
            record = json.loads(Path(result.path, TRIAL_FILE).read_text())
        epochs_run = int(max((h["epoch"] for h in history), default=0))
        top1 = [h["val_top1"] for h in history if h.get("val_top1") == h.get("val_top1")]
        best_i = max(range(len(top1)), key=lambda i: (top1[i], -i)) if top1 else None
        losses = [h.get("train_loss") for h in history]
        status = ("error" if result.error is not None else
                  "diverged" if losses and isinstance(losses[-1], float) and not math.isfinite(losses[-1]) else
                  "completed" if epochs_run >= cfg.optim.epochs else "stopped early")
        forwards = [h.get("teacher_forward_calls") for h in history]
        forwards = [int(f) for f in forwards if f == f and f is not None]
        rows.append({
            "trial_id": record.get("trial_id") or os.path.basename(result.path or "").split("_")[-1],
            "status": status, "error": _error_text(result) if result.error is not None else None,
            "temperature": trial_cfg.kd.temperature, "alpha": trial_cfg.kd.alpha, "lr": trial_cfg.optim.lr,
            "unlabeled_weight": trial_cfg.kd.unlabeled_weight,
            "params_searched": {k: _plain(v) for k, v in params.items()},
            **student_cost(trial_cfg, num_classes),
            "best_top1": top1[best_i] if best_i is not None else None,
            "best_epoch": int(history[best_i]["epoch"]) if best_i is not None else None,
            "final_top1": top1[-1] if top1 else None, "epochs_run": epochs_run, "max_epochs": cfg.optim.epochs,
            "epoch_seconds": [round(float(h["epoch_seconds"]), 2) for h in history if "epoch_seconds" in h],
            "teacher_mode": record.get("teacher_mode"), "starts": len(record.get("starts", [])),
            "teacher_forward_calls": max(forwards) if forwards else None,
            "path": result.path,
        })
    rows.sort(key=lambda r: (r["best_top1"] is None, -(r["best_top1"] or 0.0), r["gmacs"]))
    return rows


def _error_text(result) -> str:
    """The trial's traceback as Tune stored it (``error.txt`` in the trial dir), else the repr."""
    from ray.tune.result import EXPR_ERROR_FILE

    path = os.path.join(result.path or "", EXPR_ERROR_FILE)
    if result.path and os.path.isfile(path):
        return Path(path).read_text().strip()
    return repr(result.error)


class SearchFailed(RuntimeError):
    """Every trial of a search errored: nothing was found, and the command must not say otherwise."""


def report_errors(rows: list[dict], log=print) -> None:
    """Say how many trials errored and show the first one's traceback; raise if all did."""
    failed = sorted((r for r in rows if r["status"] == "error"), key=lambda r: r["trial_id"])
    if not failed:
        return
    first = failed[0]
    tail = "\n".join(first["error"].splitlines()[-25:])
    log(f"[tune] {len(failed)} of {len(rows)} trial(s) errored. First error (trial {first['trial_id']}):\n{tail}")
    if len(failed) > 1:
        from ray.tune.result import EXPR_ERROR_FILE

        log("[tune] the other errored trials' logs: " + ", ".join(
            os.path.join(r["path"] or "?", EXPR_ERROR_FILE) for r in failed[1:]))
    if len(failed) == len(rows):
        raise SearchFailed(f"all {len(rows)} trials errored (first error above; trial dir {first['path']})")


def pareto_front(rows: list[dict]) -> list[int]:
    """Indices of trials no other trial beats on both top-1 (higher) and GMACs (lower)."""
    pts = [(r["gmacs"], r["best_top1"]) for r in rows]
    front = []
    for i, (g, a) in enumerate(pts):
        if a is None:
            continue
        dominated = any(b is not None and h <= g and b >= a and (h < g or b > a) for j, (h, b) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return front


def markdown_table(rows: list[dict], t: TuneConfig) -> str:
    extra = sorted(k for k in t.space if k not in ("kd.temperature", "kd.alpha", "optim.lr", "student.embed_dim"))
    head = ["trial", "T", "width", "α", "lr", *extra, "GMACs/clip", "params", "best top-1", "epochs run", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 1 + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        cells = [r["trial_id"], f"{r['temperature']:.2f}", str(r["width"]), f"{r['alpha']:.2f}", f"{r['lr']:.2e}",
                 *[_fmt(r["params_searched"].get(k)) for k in extra], f"{r['gmacs']:.4f}", f"{r['params'] / 1e6:.3f}M",
                 "—" if r["best_top1"] is None else f"{r['best_top1']:.1%}", f"{r['epochs_run']}/{r['max_epochs']}",
                 r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def plot_pareto(rows: list[dict], front: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [(r["gmacs"], r["best_top1"], r) for r in rows if r["best_top1"] is not None]
    if pts:
        full = [p for p in pts if p[2]["status"] == "completed"]
        early = [p for p in pts if p[2]["status"] != "completed"]
        for group, marker, label in ((full, "o", "ran to the end"), (early, "x", "stopped early (ASHA)")):
            if group:
                ax.scatter([p[0] for p in group], [p[1] for p in group], marker=marker, color="0.55", label=label, zorder=2)
        fr = sorted((rows[i]["gmacs"], rows[i]["best_top1"]) for i in front)
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "-o", color="tab:red", lw=1.5, ms=8, mfc="none", mew=2,
                label="Pareto front", zorder=3)
        for g, a, r in pts:
            ax.annotate(f"T={r['temperature']:.1f} α={r['alpha']:.2f}", (g, a), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color="0.3")
    ax.set(xlabel="student GMACs per clip", ylabel="best validation top-1", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(exp: Path, t: TuneConfig, cfg: RunConfig, rows: list[dict], *, wall_seconds: float,
                  log=print) -> dict:
    """tune_results.{json,md}, pareto.png and best_config.yaml in the experiment directory."""
    from dvfl.config import dump_config
    from dvfl.data.shards import atomic_write_json

    front = pareto_front(rows)
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    ok = [r for r in rows if r["best_top1"] is not None]
    best = ok[0] if ok else None
    summary = {
        "experiment": t.experiment, "path": str(exp), "metric": t.metric, "mode": t.mode,
        "search": t.to_dict(), "asha": t.asha.enabled, "trials": len(rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "diverged": sum(r["status"] == "diverged" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "trial_epochs_run": sum(r["epochs_run"] for r in rows),
        "trial_epochs_if_all_ran_to_the_end": len(rows) * cfg.optim.epochs,
        "wall_seconds": round(wall_seconds, 1), "best": best, "rows": rows,
        "best_config": str(exp / BEST_CONFIG) if best else None,
    }
    summary["trial_epochs_saved_by_asha"] = summary["trial_epochs_if_all_ran_to_the_end"] - summary["trial_epochs_run"]
    atomic_write_json(exp / RESULTS_JSON, summary)
    md = (f"Trials of `{t.experiment}` sorted by best validation top-1 (ASHA on {t.metric} per epoch: "
          f"{summary['stopped_early']} of {len(rows)} stopped early; {summary['errors']} errored; "
          f"{summary['trial_epochs_run']} of "
          f"{summary['trial_epochs_if_all_ran_to_the_end']} trial-epochs run). Width = student embed_dim; "
          "GMACs per clip at the trained input size.\n\n" + markdown_table(rows, t) + "\n")
    atomic_write_text(exp / RESULTS_MD, md)
    plot_pareto(rows, front, exp / PARETO_PNG, f"{t.experiment}: top-1 vs cost ({len(rows)} trials)")
    if best:
        dump_config(apply_params(cfg, best["params_searched"]), exp / BEST_CONFIG)
    log("\n" + md)
    if best:
        log(f"[tune] best: trial {best['trial_id']} T={best['temperature']:.3g} width={best['width']} "
            f"α={best['alpha']:.3g} lr={best['lr']:.3g}: top-1 {best['best_top1']:.1%} "
            f"-> {exp / BEST_CONFIG} (python pipelines/distill.py --config {exp / BEST_CONFIG})")
    log(f"[tune] {exp / RESULTS_JSON}, {exp / RESULTS_MD}, {exp / PARETO_PNG}; "
        f"tensorboard --logdir {exp}")
    return summary


__all__ = ["TuneConfig", "SearchFailed", "load_tune_config", "validate_tune", "apply_params", "run_search", "prepare",
           "required_resources", "check_resources", "reclaim_orphaned_placement_groups", "pareto_front",
           "collect_trials", "write_results", "trial_driver", "experiment_dir"]
