"""Run configuration: YAML files are data, validated in full before any work starts.

A config is a tree of small dataclasses. :func:`load_config` reads a YAML file, applies
``section.field=value`` overrides (from the command line), and :meth:`RunConfig.validate`
rejects bad values with a message that names the field (``kd.temperature must be > 0``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


STUDENT_ROLES = ("vfl", "vfl_long", "dvfl", "dvfl+unlabeled")
# vfl_long: VFL-Net given this many times the epochs of optim.epochs (KD at convergence, not just earlier)
LONG_EPOCHS_FACTOR = 2
# datasets whose classes name directions ("Pushing something from left to right"): a flip changes the label
DIRECTIONAL_DATASETS = ("ssv2", "synthetic")  # (the generated classes are directions of motion)
# the numbered official splits (UCF101, HMDB51) or leave-one-group-out folds (UCF50) there are
SPLIT_COUNTS = {"ucf101": 3, "hmdb51": 3, "ucf50": 25}


# Path fields that may hold SPLIT_PLACEHOLDER (as (section path, field)); see RunConfig.expand_split.
SPLIT_PLACEHOLDER = "{split}"
SPLIT_PATH_FIELDS = ((), "output_dir"), (("data",), "root"), (("data",), "clips"), (("data",), "unlabeled"), \
    (("teacher",), "path"), (("teacher",), "cache"), (("student",), "checkpoint"), (("teacher", "train"), "checkpoint")
# Path fields a command reads (as (section path, field)); see RunConfig.resolve_paths.
INPUT_PATH_FIELDS = ((("data",), "root"), (("data",), "clips"), (("data",), "unlabeled"), (("teacher",), "path"),
                     (("teacher",), "cache"), (("student",), "checkpoint"), (("student",), "init_2d"),
                     (("teacher", "train"), "checkpoint"), (("teacher", "train"), "init_2d"))


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending field."""


@dataclass
class SyntheticSection:
    """The embedded default's generated dataset (used when ``data.dataset`` is ``synthetic``)."""

    num_classes: int = 8
    train_per_class: int = 160
    test_per_class: int = 40
    val_per_class: int = 0  # validation videos with checked labels, a split of their own (0: carved from train)
    unlabeled_videos: int = 0
    size: int = 32
    frames: int = 16
    motion: str = "bounded"  # or "wrap" or "stop" (see dvfl/data/synthetic.py; wrap is not learnable here)
    angle_jitter_deg: float = 8.0  # direction = class angle +- this (22.5: neighbouring classes touch)
    distractors: list[int] = field(default_factory=lambda: [0, 0])  # static blobs per video, [min, max]
    speed: list[float] = field(default_factory=lambda: [1.2, 2.2])  # px per video frame, [min, max]
    noise_std: float = 6.0
    background: str = "textured"  # or "plain" (one colour: the moving object is all that changes)
    label_noise: float = 0.0  # share of training videos filed under a wrong class (test never)
    luma_contrast: float = 0.0  # least brightness gap between object and background (0-127)

    def generator_config(self, seed: int):
        """The :class:`dvfl.data.synthetic.SyntheticConfig` these settings describe (checked by it)."""
        from dvfl.data.synthetic import SyntheticConfig

        return SyntheticConfig(num_classes=self.num_classes, train_per_class=self.train_per_class,
                               test_per_class=self.test_per_class, val_per_class=self.val_per_class,
                               unlabeled_videos=self.unlabeled_videos, frames=self.frames, size=self.size,
                               motion=self.motion, angle_jitter_deg=self.angle_jitter_deg,
                               distractors=tuple(self.distractors), speed=tuple(self.speed),
                               noise_std=self.noise_std, background=self.background,
                               label_noise=self.label_noise, luma_contrast=self.luma_contrast, seed=seed)


@dataclass
class DataSection:
    dataset: str = "synthetic"  # synthetic, or a name pipelines/ingest.py knows (ucf101, hmdb51, ...)
    root: str | None = None  # the videos + split files (not for synthetic)
    split: int = 1
    clips: str | None = None  # ingest output; default <output_dir>/clips
    unlabeled: str | None = None  # ingest output of unlabelled videos (split "unlabeled")
    frames: int = 8
    clips_per_video: int = 2
    eval_clips: int = 1
    short_side: int = 32
    crop_size: int | None = None  # default: short_side
    flip: bool = False  # horizontal flips (never for direction-of-motion classes)
    # students use this (class-balanced) fraction of the labelled training videos, drawn by `seed` (the
    # same subset for every student seed); the teacher always uses all of them. Label-efficiency runs (benchmarks/label_efficiency.py).
    label_fraction: float = 1.0
    # > 0: this (class-balanced, seeded) fraction of the labelled training videos trains the
    # teacher and no student ever sees them; students get the rest. A real teacher is
    # pre-trained on data of its own: its logits on clips it memorised are near one-hot (docs/embedded-default.md).
    teacher_pool: float = 0.0
    train_split: str = "train"
    # Model choices (per-epoch validation, Tune/ASHA, the best config, the teacher gate) read
    # val_split; the test split is evaluated once, at the end. "val" with no val split in the
    # ingest output: val_fraction of each class's groups (UCF gNN) of the training videos are
    # held out of training for every model, seeded by val_seed (dvfl/data/holdout.py).
    val_split: str = "val"
    val_fraction: float = 0.1
    val_seed: int = 0
    test_split: str = "test"
    # decode tasks in flight when a run ingests data.root; 0: one per CPU Ray has when the ingest
    # starts (an autoscaling cluster that starts with a CPU-less head: set the CPUs it may add)
    decode_tasks: int = 0
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


@dataclass
class ModelSection:
    model: str = "videofocalnet_nano"
    embed_dim: int | None = None  # None: the variant's own width
    depths: list[int] | None = None
    drop_path_rate: float = 0.1
    checkpoint: str | None = None  # initialise from an official Video-FocalNet checkpoint
    init_2d: str | None = None  # or from a 2D ImageNet FocalNet state dict
    reinit_head: bool = False
    use_checkpoint: bool = False  # activation checkpointing: less memory for more compute, same math


@dataclass
class OptimSection:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 7e-4
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (SGD with Nesterov momentum, the official recipe's)
    momentum: float = 0.9  # sgd only
    amp: str = "bf16"  # autocast on GPU workers: bf16 | fp16 (with a GradScaler) | off
    # bf16 autocast on CPU workers where it is the faster precision (AMX; AVX512-BF16 on AMD), fp32
    # on others (dvfl.train.loop.bf16_autocast_pays); 2.2x the fp32 step on an AMX Xeon (benchmarks/train_step.py)
    cpu_amp: bool = True
    fused: bool = True  # the optimizer's fused kernel (one pass over all parameters), CPU or GPU
    # focal modulation's temporal path: the same math as a (k, 1) Conv2d, or the official conv1d
    # (conv1d's bf16 backward is the slower one)
    temporal_impl: str = "conv2d"
    # glibc keeps the memory each step (and each evaluation or cache batch) frees instead of faulting
    # it back in (dvfl/allocator.py)
    keep_freed_memory: bool = True
    accum_steps: int = 1  # gradient accumulation: one optimizer step per accum_steps batches


@dataclass
class TeacherSection:
    mode: str = "cached"  # cached | online | none
    path: str | None = None  # model directory or official checkpoint; default: train one
    model: str | None = None  # architecture, when `path` is a bare checkpoint file
    cache: str | None = None  # default <output_dir>/teacher_cache
    views: list[str] = field(default_factory=lambda: ["center"])
    cache_dtype: str = "float16"
    # Distillation is refused when the teacher's validation top-1 is below chance + this
    # (a fraction, 0.05 = 5 points; chance: the largest validation class's share, 1/C when balanced):
    # KD from a chance-level teacher only adds noise. < 0: no gate.
    min_top1_over_chance: float = 0.05
    train: ModelSection = field(default_factory=lambda: ModelSection(model="videofocalnet_nano", embed_dim=32))
    optim: OptimSection = field(default_factory=OptimSection)


@dataclass
class KDSection:
    alpha: float = 0.7
    temperature: float = 4.0
    unlabeled_weight: float = 1.0


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    # custom resources each Train worker also needs, e.g. {train_node: 1} to keep training on
    # the nodes that advertise it (a node type on a cluster; the multi-node test uses it)
    worker_resources: dict[str, float] | None = None
    # 0: every training run is a Ray Train worker group (DDP over num_workers). N >= 1: the
    # one-worker runs (teacher, then the students N at a time) train in long-lived runner actors
    # (no worker group to start per run: for small models on a few cores, where start-up dominates).
    concurrent_runs: int = 0


@dataclass
class EvalSection:
    clips: int = 1  # uniform clips per test video (<= data.eval_clips stored)
    crops: int = 1  # 1 = centre; 3 = start/centre/end along the long side (the paper)


def with_added_defaults(old, defaults):
    """A recorded config (a dict, as written by an earlier version) with the fields a later version
    added at their values in ``defaults``: what that version ran with. Mappings are filled key by
    key; anything else is kept as recorded."""
    if not isinstance(old, dict) or not isinstance(defaults, dict):
        return old
    out = dict(old)
    for k, v in defaults.items():
        out[k] = v if k not in out else with_added_defaults(out[k], v)
    return out


@dataclass
class RunConfig:
    name: str = "embedded"
    output_dir: str = "runs/embedded"
    seed: int = 0
    seeds: list[int] | None = None  # several seeds -> mean and spread in the results table
    baseline: bool = True  # also train the student without KD (VFL-Net) for the table
    long_baseline: bool = False  # with baseline, also for twice the epochs (vfl_long): is KD's gain only speed?
    # Which students to train, in order: vfl (no KD), vfl_long (no KD, twice the epochs),
    # dvfl (KD on the labelled clips), dvfl+unlabeled (KD on labelled + unlabelled clips).
    # Default: vfl (if baseline), vfl_long (if baseline and long_baseline), dvfl, dvfl+unlabeled when there
    # are unlabelled clips (so a config's data can change without its student list).
    students: list[str] | None = None
    max_failures: int = 1
    data: DataSection = field(default_factory=DataSection)
    student: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    kd: KDSection = field(default_factory=KDSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    # ------------------------------------------------------------------ derived paths
    @property
    def clips_dir(self) -> str:
        from dvfl.storage import join

        return self.data.clips or join(self.output_dir, "clips")

    @property
    def cache_dir(self) -> str:
        from dvfl.storage import join

        return self.teacher.cache or join(self.output_dir, "teacher_cache")

    @property
    def cache_actors(self) -> int:
        """Teacher replicas building the logit cache: one per training GPU (one on CPUs, where the
        cores are the limit and one replica uses them all)."""
        return self.scaling.num_workers if self.scaling.use_gpu else 1

    @property
    def unlabeled_dir(self) -> str | None:
        """The ingest output holding split ``unlabeled`` (the clips dir for a generated pool)."""
        if self.data.unlabeled:
            return self.data.unlabeled
        if self.data.dataset == "synthetic" and self.data.synthetic.unlabeled_videos > 0 and not self.data.clips:
            return self.clips_dir
        return None

    @property
    def student_roles(self) -> list[str]:
        if self.students is not None:
            return list(self.students)
        without_kd = (["vfl"] + (["vfl_long"] if self.long_baseline else [])) if self.baseline else []
        return without_kd + ["dvfl"] + (["dvfl+unlabeled"] if self.unlabeled_dir else [])

    @property
    def crop_size(self) -> int:
        return self.data.crop_size or self.data.short_side

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def expand_split(self) -> "RunConfig":
        """Put ``data.split`` where a path says ``{split}`` (``data/hmdb51_s{split}``): one config
        serves every split of a protocol (pipelines/protocol.py) and each split keeps its own files."""
        for owner, name in self._fields(SPLIT_PATH_FIELDS):
            value = getattr(owner, name)
            if isinstance(value, str) and SPLIT_PLACEHOLDER in value:
                setattr(owner, name, value.replace(SPLIT_PLACEHOLDER, str(self.data.split)))
        return self

    def resolve_paths(self, cwd: str | None = None) -> "RunConfig":
        """Make every local path absolute (URIs untouched), so that no Ray worker, Tune trial or
        job resolves it against a working directory of its own (:mod:`dvfl.paths`)."""
        from dvfl import paths

        checked = (((), "output_dir"), *INPUT_PATH_FIELDS)
        for (section, name), (owner, _) in zip(checked, self._fields(checked)):
            if isinstance(getattr(owner, name), str) and not getattr(owner, name).strip():  # ("" was the cwd)
                raise ConfigError(f"{'.'.join((*section, name))} must not be empty (leave it out, or null, to unset it)")
        try:
            self.output_dir = paths.writable_name(paths.absolute(self.output_dir, paths.output_base(cwd)))
        except ValueError as exc:  # (file://HOST/...: a traceback)
            raise ConfigError(f"output_dir: {exc}") from None
        for (section, name), (owner, _) in zip(INPUT_PATH_FIELDS, self._fields(INPUT_PATH_FIELDS)):
            try:
                setattr(owner, name, paths.absolute_input(getattr(owner, name), cwd))
            except ValueError as exc:
                raise ConfigError(f"{'.'.join((*section, name))}: {exc}") from None
        return self

    def kinetics_ingest_command(self) -> str:
        """The ingest of this config's Kinetics clips (its settings; test = the validate.csv videos)."""
        return self.ingest_command("--annotations train=annotations/train.csv --annotations test=annotations/validate.csv")

    def ingest_command(self, annotations: str = "--annotations train=FILE --annotations test=FILE") -> str:
        """`dvfl ingest` of this config's dataset with its clip settings, into the folder it reads."""
        d = self.data
        return (f"dvfl ingest --dataset {d.dataset} --root {d.root or 'ROOT'} {annotations} --frames {d.frames} "
                f"--clips-per-video {d.clips_per_video} --eval-clips {d.eval_clips} --short-side {d.short_side} "
                f"--seed {self.seed} --out {self.clips_dir}")

    def as_given(self, cwd: str | None = None) -> "RunConfig":
        """A copy to write into a file that outlives this process (:func:`dvfl.paths.as_given`):
        under a Ray job, inputs inside the job's temporary copy of the working directory are
        relative again, so the file still runs from the user's checkout after ``ray stop``."""
        from dvfl import paths

        out = copy.deepcopy(self)
        for owner, name in out._fields(INPUT_PATH_FIELDS):
            setattr(owner, name, paths.as_given(getattr(owner, name), cwd))
        return out

    def _fields(self, fields):
        """(the object holding it, its name) for each (section path, field) of ``fields``."""
        for section, name in fields:
            owner = self
            for part in section:
                owner = getattr(owner, part)
            yield owner, name

    # ------------------------------------------------------------------ validation
    def require_teacher(self) -> None:
        """Refuse ``teacher.mode: none`` for commands that distil (distill, protocol)."""
        if self.teacher.mode == "none":  # run_all would train a teacher and distil online from it anyway
            raise ConfigError("teacher.mode is none, but this command trains the students against a teacher "
                              "(cached or online); `none` is for Tune searches without KD")

    def validate(self, check_paths: bool = True, outputs=()) -> "RunConfig":
        """``outputs``: path fields this command writes (not required to exist yet)."""
        import timm

        from dvfl.models import VARIANTS  # (importing it registers the variants with timm)
        from dvfl import storage

        def fail(name, msg):
            raise ConfigError(f"{name} {msg}")

        known = set(timm.list_models("videofocalnet_*"))
        for name, section in (("student", self.student), ("teacher.train", self.teacher.train)):
            if section.model not in known:
                fail(f"{name}.model", f"is {section.model!r}; choose one of {sorted(known)}")
            if section.embed_dim is not None and (not isinstance(section.embed_dim, int) or section.embed_dim <= 0):
                fail(f"{name}.embed_dim", f"must be a positive integer, got {section.embed_dim!r}")
            if section.depths is not None and (len(section.depths) != 4 or any(d < 1 for d in section.depths)):
                fail(f"{name}.depths", f"must be 4 positive integers, got {section.depths!r}")
            if not 0 <= section.drop_path_rate < 1:
                fail(f"{name}.drop_path_rate", f"must be in [0, 1), got {section.drop_path_rate!r}")
            own = VARIANTS.get(section.model, {}).get("depths")
            others = [v for v, spec in VARIANTS.items() if spec["depths"] == section.depths]
            if section.depths is not None and own is not None and section.depths != own and others:
                # (--set student.model=videofocalnet_tiny on a config pinning nano's depths built a nano)
                fail(f"{name}.depths", f"{section.depths} are the depths of {' and '.join(others)}, not "
                     f"{section.model}'s {own}: set {name}.depths to null for {section.model}'s own, or "
                     f"{name}.model to {others[0]}")
        if self.teacher.model is not None and self.teacher.model not in known:
            fail("teacher.model", f"is {self.teacher.model!r}; choose one of {sorted(known)}")
        if self.students is not None:
            bad = [r for r in self.students if r not in STUDENT_ROLES]
            if bad or not self.students or len(set(self.students)) != len(self.students):
                fail("students", f"must be distinct names from {list(STUDENT_ROLES)}, got {self.students!r}")
            if "dvfl+unlabeled" in self.students and not self.unlabeled_dir:
                fail("students", "has dvfl+unlabeled but there are no unlabelled clips: set data.unlabeled "
                     "(or data.synthetic.unlabeled_videos > 0 for the generated dataset)")
        if self.teacher.mode not in ("cached", "online", "none"):
            fail("teacher.mode", f"must be cached, online or none, got {self.teacher.mode!r}")
        if self.data.unlabeled and self.data.unlabeled.rstrip("/") != self.clips_dir.rstrip("/"):
            # one ingest rejects unlabelled copies of test and validation videos; separate ingests
            # cannot see each other (a test video in the pool would be trained on), and one cache covers both
            fail("data.unlabeled", "must be the ingest output of data.clips (ingest them together with --unlabeled: "
                 "that ingest rejects unlabelled copies of test and validation videos, and one teacher cache "
                 "covers both)")
        if not (isinstance(self.kd.alpha, (int, float)) and 0 <= self.kd.alpha <= 1):
            fail("kd.alpha", f"must be in [0, 1], got {self.kd.alpha!r}")
        if not (isinstance(self.kd.temperature, (int, float)) and self.kd.temperature > 0):
            fail("kd.temperature", f"must be > 0, got {self.kd.temperature!r}")
        if self.kd.unlabeled_weight < 0:
            fail("kd.unlabeled_weight", f"must be >= 0, got {self.kd.unlabeled_weight!r}")
        for name, o in (("optim", self.optim), ("teacher.optim", self.teacher.optim)):
            if o.epochs < 1:
                fail(f"{name}.epochs", f"must be >= 1, got {o.epochs!r}")
            if o.batch_size < 1:
                fail(f"{name}.batch_size", f"must be >= 1, got {o.batch_size!r}")
            if not o.lr > 0:
                fail(f"{name}.lr", f"must be > 0, got {o.lr!r}")
            if not 0 <= o.warmup_frac < 1:
                fail(f"{name}.warmup_frac", f"must be in [0, 1), got {o.warmup_frac!r}")
            if o.weight_decay < 0:
                fail(f"{name}.weight_decay", f"must be >= 0, got {o.weight_decay!r}")
            if not 0 <= o.label_smoothing < 1:
                fail(f"{name}.label_smoothing", f"must be in [0, 1), got {o.label_smoothing!r}")
            if o.optimizer not in ("adamw", "sgd"):
                fail(f"{name}.optimizer", f"must be adamw or sgd, got {o.optimizer!r}")
            if not 0 <= o.momentum < 1 or (o.optimizer == "sgd" and o.momentum == 0):
                # (SGD is Nesterov's: timm refuses it without momentum, inside the first training run)
                fail(f"{name}.momentum", f"must be in {'(0' if o.optimizer == 'sgd' else '[0'}, 1), got {o.momentum!r}")
            if o.amp not in ("bf16", "fp16", "off"):
                fail(f"{name}.amp", f"must be bf16, fp16 or off, got {o.amp!r}")
            if o.temporal_impl not in ("conv2d", "conv1d"):
                fail(f"{name}.temporal_impl", f"must be conv2d or conv1d, got {o.temporal_impl!r}")
            if o.accum_steps < 1:
                fail(f"{name}.accum_steps", f"must be >= 1, got {o.accum_steps!r}")
            if o.clip_grad is not None and o.clip_grad < 0:  # a negative max norm flips every gradient
                fail(f"{name}.clip_grad", f"must be > 0 (0 or null: no clipping), got {o.clip_grad!r}")
        # numpy's seed sequence refuses negative seeds, Ray's shuffle (RandomState(seed + block)) those from
        # 2**32: each failed mid-run, after the ingest and the cache
        if not 0 <= self.seed < 2 ** 31 or any(not 0 <= v < 2 ** 31 for v in self.seeds or ()):
            fail("seed" if not 0 <= self.seed < 2 ** 31 else "seeds",
                 f"must be >= 0 and < 2**31, got {self.seed if not 0 <= self.seed < 2 ** 31 else self.seeds!r}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            # one seed twice is one run reported as two (and two runners writing one folder)
            fail("seeds", f"must be a non-empty list of distinct student seeds, got {self.seeds!r}")
        if self.max_failures < 0:
            fail("max_failures", f"must be >= 0 (restarts allowed per run), got {self.max_failures!r}")
        if self.scaling.num_workers < 1:
            fail("scaling.num_workers", f"must be >= 1, got {self.scaling.num_workers!r}")
        if not isinstance(self.scaling.concurrent_runs, int) or self.scaling.concurrent_runs < 0:
            fail("scaling.concurrent_runs", f"must be an integer >= 0, got {self.scaling.concurrent_runs!r}")
        if self.scaling.concurrent_runs and self.scaling.num_workers != 1:
            fail("scaling.concurrent_runs", f"runs one-worker runs side by side; scaling.num_workers is "
                 f"{self.scaling.num_workers} (set it to 1, or concurrent_runs to 0 for DDP)")
        if not self.scaling.cpus_per_worker > 0:
            fail("scaling.cpus_per_worker", f"must be > 0, got {self.scaling.cpus_per_worker!r}")
        resources = self.scaling.worker_resources or {}
        for key, amount in resources.items():
            resources[key] = amount = yaml11_float(amount)  # (1e-3: a string to PyYAML)
            if key in ("CPU", "GPU", "memory") or not isinstance(key, str):
                fail("scaling.worker_resources", f"names custom resources only (CPU/GPU come from "
                     f"cpus_per_worker/use_gpu), got {key!r}")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < math.inf:
                fail("scaling.worker_resources", f"amounts must be > 0 and finite, got {key}: {amount!r}")
        if not 2 <= self.data.synthetic.num_classes <= 36:  # (the next check divides by it)
            fail("data.synthetic.num_classes", f"must be in 2..36, got {self.data.synthetic.num_classes!r}")
        if not 0 <= self.data.synthetic.angle_jitter_deg <= 180.0 / self.data.synthetic.num_classes:
            fail("data.synthetic.angle_jitter_deg", f"must be in [0, 180/num_classes], got "
                 f"{self.data.synthetic.angle_jitter_deg!r}")
        d = self.data.synthetic.distractors
        if not (len(d) == 2 and all(isinstance(v, int) and v >= 0 for v in d) and d[0] <= d[1]):
            fail("data.synthetic.distractors", f"must be [min, max] with 0 <= min <= max, got {d!r}")
        if self.data.synthetic.motion not in ("bounded", "stop", "wrap"):
            fail("data.synthetic.motion", f"must be bounded, stop or wrap, got {self.data.synthetic.motion!r}")
        sp = self.data.synthetic.speed
        if not (isinstance(sp, list) and len(sp) == 2 and 0 < sp[0] <= sp[1]):
            fail("data.synthetic.speed", f"must be [min, max] px per frame with 0 < min <= max, got {sp!r}")
        if not 0 <= self.data.synthetic.noise_std:
            fail("data.synthetic.noise_std", f"must be >= 0, got {self.data.synthetic.noise_std!r}")
        if not 0 <= self.data.synthetic.label_noise < 1:
            fail("data.synthetic.label_noise", f"must be in [0, 1), got {self.data.synthetic.label_noise!r}")
        if not 0 <= self.data.synthetic.luma_contrast <= 127:
            fail("data.synthetic.luma_contrast", f"must be in [0, 127], got {self.data.synthetic.luma_contrast!r}")
        if self.data.dataset == "synthetic" and self.data.synthetic.frames < self.data.frames:
            # else every generated video would be rejected as too short, after minutes of generation
            fail("data.synthetic.frames", f"({self.data.synthetic.frames}) must be >= data.frames "
                 f"({self.data.frames}), the frames of a clip")
        if self.data.synthetic.background not in ("textured", "plain"):
            fail("data.synthetic.background", f"must be textured or plain, got {self.data.synthetic.background!r}")
        try:  # what the generator checks beyond the above (an even size, room to move an object)
            self.data.synthetic.generator_config(self.seed).validate()
        except ValueError as exc:
            field_name = str(exc).split(" ", 1)[0]
            fail(f"data.synthetic.{field_name}" if field_name in SyntheticSection.__dataclass_fields__
                 else "data.synthetic", f"is not a dataset the generator can make: {exc}")
        if not 0 <= self.data.teacher_pool < 1:
            fail("data.teacher_pool", f"must be in [0, 1), got {self.data.teacher_pool!r}")
        if not 0 < self.data.val_fraction < 1:
            fail("data.val_fraction", f"must be in (0, 1), got {self.data.val_fraction!r}")
        if self.data.test_split == self.data.train_split:
            fail("data.test_split", f"must differ from data.train_split ({self.data.train_split!r})")
        if self.data.val_split == self.data.test_split:  # choices are made on validation; test is read once
            fail("data.val_split", f"must differ from data.test_split ({self.data.test_split!r})")
        for split_field in ("train_split", "val_split", "test_split"):
            if getattr(self.data, split_field) == "unlabeled":  # clips without labels: nothing to learn or score
                fail(f"data.{split_field}", "must not be 'unlabeled' (the unlabelled pool; see data.unlabeled)")
        if self.data.dataset == "synthetic" and not self.data.clips:  # (found after generation and ingest)
            made = ["train", "test"] + (["val"] if self.data.synthetic.val_per_class > 0 else [])
            for split_field in ("train_split", "test_split", "val_split"):
                split = getattr(self.data, split_field)
                if split not in made and not (split_field == "val_split" and split == "val"):  # "val": carved
                    fail(f"data.{split_field}", f"is {split!r}; the generated dataset has the split(s) "
                         f"{', '.join(map(repr, made))}" + ("" if split_field != "val_split" else
                                                            " ('val' without one: carved from train)"))
        for name, section in (("student", self.student), ("teacher.train", self.teacher.train)):
            if section.checkpoint and section.init_2d:  # (init_2d was dropped silently)
                fail(f"{name}.init_2d", f"and {name}.checkpoint are alternatives (a video checkpoint, or 2D "
                     "ImageNet weights inflated); set one")
        if self.data.synthetic.test_per_class < 1:  # the split every run reports (0 train: an evaluation sample)
            fail("data.synthetic.test_per_class", f"must be >= 1, got {self.data.synthetic.test_per_class!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):  # it names folders and temp files
            fail("name", f"must be letters, digits, '.', '_' or '-' (not starting with '.', '_' or '-'), "
                 f"got {self.name!r}")
        from dvfl.data.adapters import DATASETS

        if self.data.dataset not in DATASETS:
            fail("data.dataset", f"is {self.data.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.data.dataset in DIRECTIONAL_DATASETS:
            flips = [v for v in self.teacher.views if "flip" in v]
            if self.data.flip or flips:
                fail("data.flip" if self.data.flip else "teacher.views",
                     f"must not flip {self.data.dataset} clips: its classes are directions (left to right "
                     "becomes right to left)")
        if not self.teacher.min_top1_over_chance < 1:
            fail("teacher.min_top1_over_chance", f"must be < 1, got {self.teacher.min_top1_over_chance!r}")
        if not 0 < self.data.label_fraction <= 1:
            fail("data.label_fraction", f"must be in (0, 1], got {self.data.label_fraction!r}")
        if self.data.frames < 1:
            fail("data.frames", f"must be >= 1, got {self.data.frames!r}")
        if self.data.short_side < 0:
            fail("data.short_side", f"must be >= 0 (0: clips at their source size), got {self.data.short_side!r}")
        elif self.crop_size < 1:  # a model of 0-pixel inputs would fail deep inside training
            fail("data.crop_size", "must be > 0: with data.short_side 0 (clips at their source size) give the crop size")
        elif self.data.short_side and self.crop_size > self.data.short_side:
            fail("data.crop_size", f"({self.crop_size}) must not exceed data.short_side ({self.data.short_side})")
        if self.eval.crops not in (1, 3):
            fail("eval.crops", f"must be 1 or 3, got {self.eval.crops!r}")
        if self.data.crop_size is not None and self.data.crop_size < 1:  # (0 became short_side: `or`)
            fail("data.crop_size", f"must be > 0 (or unset: data.short_side), got {self.data.crop_size!r}")
        for name, value in (("data.eval_clips", self.data.eval_clips), ("data.clips_per_video", self.data.clips_per_video),
                            ("data.split", self.data.split)):
            if value < 1:  # (they failed inside the ingest, naming a flag)
                fail(name, f"must be >= 1, got {value!r}")
        if self.data.decode_tasks < 0:
            fail("data.decode_tasks", f"must be >= 0 (0: one per CPU of the cluster), got {self.data.decode_tasks!r}")
        if self.data.split > SPLIT_COUNTS.get(self.data.dataset, self.data.split):  # (the adapter refused it, in Ray)
            fail("data.split", f"must be in 1..{SPLIT_COUNTS[self.data.dataset]} for {self.data.dataset}, "
                 f"got {self.data.split!r}")
        if not 1 <= self.eval.clips <= self.data.eval_clips:
            fail("eval.clips", f"must be in [1, data.eval_clips={self.data.eval_clips}], got {self.eval.clips!r}")
        if self.teacher.cache_dtype not in ("float16", "float32"):
            fail("teacher.cache_dtype", f"must be float16 or float32, got {self.teacher.cache_dtype!r}")
        if self.teacher.cache and self.teacher.cache.rstrip("/") == self.clips_dir.rstrip("/"):
            # (its build waited on the clips' run-long read lock, or ran beside another run's build unlocked)
            fail("teacher.cache", f"must be a folder of its own, not data.clips ({self.clips_dir})")
        from dvfl.data.views import View

        if not self.teacher.views:  # an empty cache would "build" and fail at the first training step
            fail("teacher.views", "must name at least one view, e.g. [center]")
        seen = {}
        for v in self.teacher.views:
            try:
                view = View.parse(v)
                if view.crop == "random":
                    raise ValueError("random crops cannot be cached")
            except ValueError as exc:
                fail("teacher.views", f"has {v!r}: {exc}")
            if view.name in seen:  # ("center+" is "center")
                fail("teacher.views", f"names the view {view.name!r} twice ({seen[view.name]!r}, {v!r})")
            seen[view.name] = v
        if self.data.dataset != "synthetic" and not self.data.clips and not self.data.root:
            fail("data.root", f"is required for dataset {self.data.dataset!r} (or give data.clips)")
        if check_paths:
            for name, value in (("data.root", self.data.root), ("data.clips", self.data.clips),
                                ("data.unlabeled", self.data.unlabeled), ("teacher.path", self.teacher.path),
                                ("student.checkpoint", self.student.checkpoint),
                                ("student.init_2d", self.student.init_2d),
                                ("teacher.train.checkpoint", self.teacher.train.checkpoint),
                                ("teacher.train.init_2d", self.teacher.train.init_2d)):
                if not value:
                    continue
                if name == "data.root" and self.data.clips and _finished_ingest(self.data.clips):
                    continue  # finished given clips are used as they are: the videos' folder is not read
                why = storage.reachable(value) if storage.is_remote(value) or name not in outputs else None
                if why and name == "data.clips" and self.data.dataset == "kinetics" and not storage.is_remote(value):
                    # not there at all (distill says it in ensure_clips); a bucket that does not answer is that
                    why += (", and a run does not ingest Kinetics itself (which CSV is the test split decides what "
                            f"the results compare with): ingest it first, with this config's settings: "
                            f"`{self.kinetics_ingest_command()}`")
                if why:
                    fail(name, why)
            if ("data.clips" in outputs and self.data.clips and self.data.dataset != "synthetic"
                    and not self.data.root and not storage.exists(self.data.clips)):
                fail("data.clips", f"path does not exist: {self.data.clips}, and there is no data.root to ingest "
                     "it from")
            # outputs on object storage: the bucket must answer before any work starts
            for name, value in (("output_dir", self.output_dir), ("teacher.cache", self.teacher.cache)):
                if value and storage.is_remote(value):
                    why = storage.reachable(value)
                    if why:
                        fail(name, why)
        if (storage.is_remote(self.output_dir) and self.data.dataset == "synthetic" and not self.data.clips
                and not self.data.root):
            fail("data.clips", "is required when output_dir is a URI and the dataset is generated: the generated "
                 "videos are made and decoded on local disk (run the command once with a local output folder and "
                 "data.clips=s3://...: it generates them there and ingests them into that URI; then pass it here)")
        return self


# ---------------------------------------------------------------------- loading
class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML's safe loader, refusing a key written twice in one mapping (last-wins lost the first)."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: construct_mapping merges it, explicit keys winning
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:  # (`? [1, 2]`: a traceback)
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value, not a list or mapping",
                                                    key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path | str, what: str = "config file") -> object:
    """A config file's YAML (refusing duplicate keys); :class:`ConfigError` if it is not valid YAML.
    ``path`` may be an object-store URI (a search's best_config.yaml on s3://)."""
    from dvfl import storage

    try:
        return _unshared(yaml.load(storage.read_text(os.fspath(path)), Loader=_UniqueKeyLoader), [], [0])
    except _AliasError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:  # (Latin-1 text, or UTF-16 as Windows editors save it)
        raise ConfigError(f"{what} {path} is not UTF-8 text: save it as UTF-8") from None


class _AliasError(ValueError):
    pass


_MAX_CONFIG_NODES = 100_000  # far above any config; aliases of aliases multiply (a "billion laughs" file)


def _unshared(tree: object, inside: list, count: list) -> object:
    """``tree`` with every mapping and list its own: an alias (``teacher: {optim: *recipe}``) is one
    object to PyYAML, and an override edits in place, so ``--set optim.lr=..`` changed the teacher's too.
    ``inside``: the containers being copied (an alias inside itself is refused); ``count``: nodes so far."""
    if not isinstance(tree, (dict, list)):
        return tree
    if any(tree is t for t in inside):
        raise _AliasError("an alias refers to a mapping or list that contains it (a recursive structure)")
    count[0] += len(tree)
    if count[0] > _MAX_CONFIG_NODES:
        raise _AliasError(f"its aliases expand to more than {_MAX_CONFIG_NODES:,} values")
    inside.append(tree)
    copied = ({k: _unshared(v, inside, count) for k, v in tree.items()} if isinstance(tree, dict)
              else [_unshared(v, inside, count) for v in tree])
    inside.pop()
    return copied


_YAML11_ONLY_STRING_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml11_float(value):
    """``1e-3`` is a float in YAML 1.2 and a string to PyYAML (YAML 1.1 wants ``1.0e-3``): the float."""
    if isinstance(value, str) and _YAML11_ONLY_STRING_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _check_type(name: str, value, annotation) -> object:
    """Values from YAML or the command line must have the field's type (ints pass as floats)."""
    import types

    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if is_union else (annotation,)
    allowed = [t for t in members if t is not type(None)]
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(f"{name} must not be empty")
    for t in allowed:
        origin = typing.get_origin(t) or t
        if origin is float:
            value = yaml11_float(value)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every `x < 0` check and surfaces epochs later
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is list and isinstance(value, list) and typing.get_args(t):  # list[int]: each item too
            return [_check_type(f"{name}[{i}]", v, typing.get_args(t)[0]) for i, v in enumerate(value)]
        if origin in (str, bool, list, dict) and isinstance(value, origin):
            return value
    if str in allowed and isinstance(value, bool):
        if name.rsplit(".", 1)[-1] == "amp":  # `amp: off` (YAML 1.1 reads off/no as false)
            return "on" if value else "off"
        # (`--set name=no` named the run "off"; data.train_split=no was refused as 'off', never typed)
        raise ConfigError(f"{name} must be a string, got {value!r}: YAML reads yes/no/on/off/true/false as a "
                          f"bool; quote it: --set '{name}=\"{'yes' if value else 'no'}\"'")
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _build(cls, data: dict, prefix: str, base=None):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{name} is not a known field (known: {', '.join(sorted(fields))})")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            # over the field's own default (teacher.train's width stays when only its drop path is
            # set), unless the section names a model, even the default's: then it is that variant as
            # registered, its width and depths its own (`--arch videofocalnet_nano` built width 32, not 96)
            names_model = isinstance(value, dict) and hasattr(default, "model") and value.get("model") is not None
            # (empty in YAML, `kd:`, is the defaults; a scalar or a list is an error, not the defaults)
            value = _build(type(default), {} if value is None else value, name + ".",
                           base=None if names_model else default)
        else:
            value = _check_type(name, value, hints[key])
        kwargs[key] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def set_field(tree: dict, dotted: str, value) -> None:
    """Set ``section.field`` in a config tree (the mapping a YAML file reads as)."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:  # (an empty section in a file, `kd:`, reads as None)
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
    node[keys[-1]] = value


def _section_default(dotted: str):
    """The default of the run-config section ``dotted`` names (``kd``, ``teacher.train``), else None."""
    default = RunConfig()
    for key in dotted.split("."):
        default = getattr(default, key, None)
        if not dataclasses.is_dataclass(default):
            return None
    return default


def override_field(tree: dict, dotted: str, value) -> None:
    """:func:`set_field` for a run-config tree: a mapping given for a whole section
    (``--set 'kd={temperature: 2}'``) sets those fields only; replacing the section would put
    every other field of it back to its default. A mapping naming another model than the section's
    replaces a model section: that variant's own widths, not the section's (as in a file)."""
    default = _section_default(dotted) if isinstance(value, dict) else None
    node = tree
    for k in dotted.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    current = (node if isinstance(node, dict) else {}).get("model", getattr(default, "model", None))
    another_model = isinstance(default, ModelSection) and "model" in value and value["model"] != current
    if default is not None and not another_model:
        node = tree
        for k in dotted.split("."):
            if not isinstance(node.get(k), dict):  # (an empty section in a file reads as None)
                node[k] = {}
            node = node[k]
        for key, sub in value.items():
            override_field(tree, f"{dotted}.{key}", sub)
        return
    set_field(tree, dotted, value)


def _finished_ingest(clips: str) -> bool:
    """``clips`` holds a finished ingest (its dataset.json); False where that cannot be told (an
    unreachable bucket: data.clips' own check says why)."""
    from dvfl import storage

    try:
        return storage.isfile(storage.join(clips, "dataset.json"))
    except (OSError, ValueError):
        return False


def build_config(tree: dict) -> RunConfig:
    """A run config from a config tree, every field type-checked by name (not yet validated)."""
    try:
        return _build(RunConfig, tree, "")
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def parse_override(text: str) -> tuple[str, object]:
    """``kd.temperature=2`` -> ``("kd.temperature", 2)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    if not raw.strip():  # "teacher.path=$UNSET" read as null: a teacher trained for hours instead of the given one
        raise ConfigError(f"override {text!r}: no value after '=' (an unset shell variable?); give a value, or "
                          f"null to unset {key.strip()}")
    if re.search(r"(^|\s)#", raw) and not raw.strip().startswith(("'", '"')):
        # YAML reads " #..." as a comment: "output_dir=runs/lr sweep #2" became "runs/lr sweep"
        raise ConfigError(f"override {text!r}: YAML reads '#' after a space as the start of a comment; quote "
                          f"the value: --set '{key.strip()}=\"{raw}\"'")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); quote it: "
                          f"--set '{key.strip()}=\"{raw}\"'") from None


def load_config(path: str | os.PathLike | None = None, overrides=(), check_paths: bool = True,
                outputs=()) -> RunConfig:
    """Read a YAML config (or the embedded default), apply overrides, make its paths absolute
    (relative to the current directory; see :mod:`dvfl.paths` for Ray jobs), validate. A shipped
    config's (``configs/``) relative input that is not in the current directory but in the
    checkout is the checkout's (``models/embedded_teacher``: ``dvfl distill`` from any folder)."""
    cfg = build_config(config_tree(path, overrides)).expand_split()
    shipped = path is None or Path(os.fspath(path)).resolve().parent == CONFIG_DIR
    if shipped:
        from dvfl import paths

        for owner, name in cfg._fields(INPUT_PATH_FIELDS):
            value = getattr(owner, name)
            if (isinstance(value, str) and value.strip() and not paths.is_uri(value) and not os.path.isabs(value)
                    and not os.path.exists(value) and os.path.exists(CONFIG_DIR.parent / value)):
                setattr(owner, name, str(CONFIG_DIR.parent / value))
    return cfg.resolve_paths().validate(check_paths=check_paths, outputs=outputs)


def in_job_root(path: str) -> str:
    """A relative config file missing here, inside a Ray job's copy of the working directory, looked
    up under the job root (an earlier job's best_config.yaml), as every other input is; else ``path``."""
    from dvfl import paths

    if paths.is_uri(path) or os.path.exists(path):
        return path
    elsewhere = paths.absolute_input(path)
    return elsewhere if os.path.exists(elsewhere) else path


def config_tree(path: str | os.PathLike | None = None, overrides=()) -> dict:
    """The YAML tree of a config with the overrides applied: values as written (``{split}`` unexpanded)."""
    from dvfl import storage

    if not path and not CONFIG_DIR.is_dir():  # dvfl installed as a wheel: configs/ and models/ stayed in the checkout
        raise ConfigError(f"the embedded default's config is not here ({CONFIG_DIR} does not exist): the project runs "
                          "from its checkout; install it there with `pip install -e .`, or give --config FILE")
    path = in_job_root(os.fspath(path)) if path else str(CONFIG_DIR / "embedded.yaml")
    try:
        found = storage.isfile(path)
    except (OSError, ValueError) as exc:  # an unreachable bucket, a malformed URI
        raise ConfigError(f"config file {path}: {exc}") from None
    if not found:
        raise ConfigError(f"config file not found: {path}")
    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping, got {type(tree).__name__}")
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        override_field(tree, key, value)
    return tree


def dump_config(config: RunConfig, path: str | os.PathLike) -> None:
    from dvfl import storage

    storage.write_bytes(path, yaml.safe_dump(config.as_given().to_dict(), sort_keys=False).encode())
