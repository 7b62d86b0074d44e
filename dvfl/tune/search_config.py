"""The search as data: a YAML file (``configs/tune_*.yaml``) read into a :class:`TuneConfig`,
checked against the run config every trial starts from before Ray starts."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


from dvfl import storage
from dvfl.config import (CONFIG_DIR, ConfigError, RunConfig, build_config, in_job_root, load_config, parse_override,
                         read_yaml, set_field, yaml11_float)


# Fields a search may vary. Data and teacher fields would invalidate the shared shards and cache;
# scaling fields change the resources the search reserves; epochs are ASHA's to decide.
SEARCHABLE_SECTIONS = ("kd.", "optim.", "student.")
NOT_SEARCHABLE = {"optim.epochs": "ASHA decides how many epochs a trial gets (max_t = optim.epochs)",
                  "student.checkpoint": "a path, not a hyper-parameter", "student.init_2d": "a path, not a hyper-parameter"}
DOMAINS = ("loguniform", "uniform", "choice", "grid")
METRICS = {"val_top1": "max", "val_top5": "max", "val_loss": "min"}
# a leftover ``--set`` target for the tune file itself (the rest go to the run config)
TUNE_PREFIX = "tune."
FRONT_SUFFIX = "-front"  # <experiment>-front: each cost level's best trial re-run with tune.front_seeds
def plain_experiment_name(name: str) -> bool:
    """A folder name under the storage, never a path: what a search may be named and --fresh may delete."""
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


@dataclass
class AshaSection:
    enabled: bool = True
    grace_period: int = 1  # epochs every trial gets before it can be stopped
    reduction_factor: float = 2.0  # keep the best 1/reduction_factor at each rung


@dataclass
class TuneConfig:
    run_config: str | None = None  # the run config every trial starts from (relative: to the current
    # directory, the search file's, then configs/); None: embedded
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
    # a one-worker trial trains in the trial's own process, not in a Ray Train worker group of its own
    in_process: bool = True
    asha: AshaSection = field(default_factory=AshaSection)
    space: dict = field(default_factory=dict)
    # after the search, each cost level's best trial again with each of these student seeds, every
    # epoch (no ASHA): the Pareto front is drawn from their means, with their seed spread
    front_seeds: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(name: str, value, kind=float):
    value = yaml11_float(value) if kind is float else value  # (1e-1: a string to PyYAML)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int))
            or not math.isfinite(value)):
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
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
        if tree.get(key) is not None and (not isinstance(tree[key], str) or not tree[key].strip()):
            # ('' would become the current directory)
            raise ConfigError(f"tune.{key} must be a path (or left out), got {tree[key]!r}")
        setattr(t, key, tree.get(key, getattr(t, key)))
    for key in ("experiment", "metric", "mode"):
        value = tree.get(key, getattr(t, key))
        if not isinstance(value, str) or not value:
            raise ConfigError(f"tune.{key} must be a non-empty string, got {value!r}")
        setattr(t, key, value)
    for key in ("num_samples", "seed", "max_concurrent_trials"):
        setattr(t, key, _number(f"tune.{key}", tree.get(key, getattr(t, key)), int))
    t.driver_cpus = _number("tune.driver_cpus", tree.get("driver_cpus", t.driver_cpus))
    for key in ("unlabeled", "in_process"):
        if not isinstance(tree.get(key, getattr(t, key)), bool):
            raise ConfigError(f"tune.{key} must be true or false, got {tree[key]!r}")
        setattr(t, key, tree.get(key, getattr(t, key)))
    overrides = tree.get("set") or {}
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
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
    # written 1e-4 in a search file, a bound or a choice was a string ("must be a finite number")
    t.space = {key: ({kind: [yaml11_float(v) for v in values] for kind, values in spec.items()}
                     if isinstance(spec, dict) and all(isinstance(v, list) for v in spec.values()) else spec)
               for key, spec in space.items()}
    seeds = tree.get("front_seeds") or []
    if (not isinstance(seeds, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"tune.front_seeds must be a list of distinct integer student seeds, got {seeds!r}")
    if any(v < 0 for v in seeds):  # numpy's seed sequence refuses them: each re-run would fail after the search
        raise ConfigError(f"tune.front_seeds must be seeds >= 0, got {seeds!r}")
    t.front_seeds = list(seeds)
    return t


def _tree_of(cfg: RunConfig) -> dict:
    return copy.deepcopy(cfg.to_dict())


def apply_params(base: RunConfig | dict, params: dict) -> RunConfig:
    """``base`` with ``{"kd.temperature": 3.0}`` (or Tune's nested ``{"kd": {"temperature": 3.0}}``)
    applied, validated (paths are not re-checked)."""
    tree = copy.deepcopy(base) if isinstance(base, dict) else _tree_of(base)
    for key, value in flatten(params).items():
        set_field(tree, key, plain_value(value))
    return build_config(tree).validate(check_paths=False)


def flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def plain_value(value):
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
    if not 0 <= t.seed < 2 ** 32:  # Tune's sampler (numpy's RandomState) refuses it, after the clips and the cache
        raise ConfigError(f"tune.seed must be >= 0 and < 2**32, got {t.seed}")
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
    if not plain_experiment_name(t.experiment):
        raise ConfigError(f"tune.experiment must be a plain name, got {t.experiment!r}")
    if t.experiment.endswith("-front"):  # (<experiment>-front holds a search's front re-runs: another search's
        raise ConfigError(f"tune.experiment must not end in -front, got {t.experiment!r}: <experiment>-front is "
                          "where a search re-runs its front")  # front would be this one, and --fresh deleted it)
    if t.asha.grace_period < 1:
        raise ConfigError(f"tune.asha.grace_period must be >= 1, got {t.asha.grace_period}")
    if t.asha.enabled and t.asha.grace_period > base.optim.epochs:
        raise ConfigError(f"tune.asha.grace_period ({t.asha.grace_period}) must not exceed optim.epochs "
                          f"({base.optim.epochs}), the most epochs a trial gets")
    if not t.asha.reduction_factor > 1:
        raise ConfigError(f"tune.asha.reduction_factor must be > 1, got {t.asha.reduction_factor}")
    if not t.space:
        raise ConfigError("tune.space is empty: name at least one field to search")
    if base.seed in t.front_seeds:
        raise ConfigError(f"tune.front_seeds: {base.seed} is the seed the search's own trials ran with (the run "
                          "config's seed); list other seeds")
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
        if kind in ("uniform", "loguniform"):  # a draw between whole-number bounds is fractional
            low, high = values
            try:
                apply_params(base, {key: low + 0.37 * (high - low)})
            except ConfigError:
                raise ConfigError(f"{name}: {kind} draws fractional values and {key} takes whole numbers: "
                                  f"use {{choice: [...]}} or {{grid: [...]}}") from None
    # values valid alone, not together (sgd with momentum 0): found in a trial, after the clips,
    # teacher and cache were made; every pair of fields, at each choice or range end
    probes = {key: list(spec.values())[0] for key, spec in t.space.items()}
    for (k1, values1), (k2, values2) in itertools.combinations(probes.items(), 2):
        for v1, v2 in itertools.product(values1, values2):
            try:
                apply_params(base, {k1: v1, k2: v2})
            except ConfigError as exc:
                raise ConfigError(f"tune.space: {k1} {v1!r} with {k2} {v2!r} is not a valid run ({exc})") from None
    if "optim.momentum" in probes and "sgd" not in probes.get("optim.optimizer", [base.optim.optimizer]):
        raise ConfigError("tune.space.optim.momentum has no effect: it is SGD's, and no trial uses sgd "
                          "(optim.optimizer)")
    return t


def check_start_weights_fit_space(t: TuneConfig, base: RunConfig) -> None:
    """A ``student.checkpoint`` fits one student shape: every searched ``student.*`` value (each
    choice, or a range's ends) must take it, or its trials failed one by one after the clips and the
    cache were made (and the search chose among the rest). A :class:`ConfigError` naming the value."""
    from dvfl.pipeline import check_start_weights, image_init_matches

    if not (base.student.checkpoint or base.student.init_2d):
        return
    for key, spec in t.space.items():
        if not key.startswith("student."):
            continue
        values = _domain_values(f"tune.space.{key}", spec)[1]
        for value in values:
            try:
                check_start_weights(apply_params(base, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key} {value!r}: the student's start weights do not fit it ({exc}); "
                                  f"search only values that student.checkpoint or student.init_2d fits, or start "
                                  "from scratch") from None
        # 2D weights load wherever a name and shape agree: a width they were not made for takes a few
        # tensors (a head's bias) and trains from scratch, against the other widths' initialised runs.
        # Judged by the share of each model's own tensors (a shallower variant takes fewer, all fitting)
        matches = {repr(v): image_init_matches(c, c.student) for v in values
                   for c in [apply_params(base, {key: v})]} if base.student.init_2d else {}
        shares = {v: m[0] / max(m[1], 1) for v, m in matches.items() if m is not None}
        best = max(shares.values(), default=None)
        for value, share in shares.items():
            if best and share < best / 2:
                m = matches[value]
                raise ConfigError(f"tune.space.{key} {value}: student.init_2d {base.student.init_2d} fits it only "
                                  f"in part ({m[0]} of its {m[1]} tensors, {best:.0%} at another value): its trials "
                                  "would start from other weights than the rest; search the values it was made for")


def load_tune_config(path: str | os.PathLike | None = None, overrides=(), *, output_dir: str | None = None,
                     check_paths: bool = True) -> tuple[TuneConfig, RunConfig]:
    """Read a search config and the run config it names; apply ``--set`` overrides (``tune.*`` to
    the search, the rest to the run config after the file's own ``set:``); validate both."""
    path = Path(in_job_root(os.fspath(path))) if path else CONFIG_DIR / "tune_embedded.yaml"
    if not path.is_file():
        raise ConfigError(f"tune config file not found: {path}")
    tree = read_yaml(path, "tune config file") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"tune config file {path} must be a mapping, got {type(tree).__name__}")
    run_overrides = []
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        if key.startswith(("tune.space.", "tune.set.")):  # their keys are dotted field names
            section, field_name = key[len(TUNE_PREFIX):].split(".", 1)
            if not isinstance(tree.get(section) or {}, dict):
                raise ConfigError(f"tune.{section} must be a mapping")
            tree[section] = {**(tree.get(section) or {}), field_name: value}
        elif key == "tune.asha" and isinstance(value, dict) and isinstance(tree.get("asha") or {}, dict):
            # those fields only, as a run-config section's mapping (the others went back to their defaults:
            # a grace period of 1). (tune.set= still replaces the file's set:, whose entries nest and repeat.)
            tree["asha"] = {**(tree.get("asha") or {}), **value}
        elif key.startswith(TUNE_PREFIX):
            set_field(tree, key[len(TUNE_PREFIX):], value)
        else:
            run_overrides.append((key, value))
    t = _parse_tune(tree)
    from dvfl import paths

    try:  # before any trial's working directory
        t.storage = paths.absolute(t.storage, paths.output_base())
    except ValueError as exc:  # (file://HOST/...: a traceback)
        raise ConfigError(f"tune.storage: {exc}") from None
    run_path = None
    if t.run_config:
        run_path = Path(os.path.expanduser(t.run_config))  # inside YAML or after --set k=, no shell expands ~
        if not run_path.is_absolute():  # where the user is (in a Ray job: or the job root), next to the search file, then configs/
            run_path = next((c for c in (Path(in_job_root(str(run_path))).absolute(), path.parent / run_path)
                             if c.is_file()), CONFIG_DIR / run_path)
        t.run_config = str(run_path)
    sets = list(t.set.items()) + run_overrides + ([("output_dir", output_dir)] if output_dir else [])
    base = load_config(run_path, sets, check_paths=check_paths)
    if check_paths and t.storage and storage.is_remote(t.storage):
        problem = storage.reachable(t.storage)
        if problem:
            raise ConfigError(f"tune.storage {t.storage}: {problem}")
    return validate_tune(t, base), base


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


def asha_words(t: TuneConfig, cfg: RunConfig) -> str:
    """How the search's log line names its scheduler (a grace period of every epoch leaves ASHA no
    rung before the end: it stops nothing, and the line says so)."""
    # tune.metric is what ASHA stops trials by; the best and the front are validation top-1's (report.choose)
    chosen = "" if t.metric == "val_top1" else "; the best config and the front by val_top1"
    if not t.asha.enabled:
        return "off" + (f" (tune.metric {t.metric} unused{chosen})" if chosen else "")
    if t.asha.grace_period >= cfg.optim.epochs:
        return f"on {t.metric} (grace period {t.asha.grace_period} = every epoch: it stops no trial{chosen})"
    return f"on {t.metric}" + (f" (it stops trials{chosen})" if chosen else "")


def experiment_dir(t: TuneConfig, cfg: RunConfig) -> str:
    """``<tune.storage or output_dir/tune>/<experiment>``: an absolute local path or a URI."""
    base = t.storage or storage.join(cfg.output_dir, "tune")
    return storage.join(storage.absolute(base), t.experiment)
