"""What the training loop is given: one typed :class:`LoopConfig` instead of a hand-packed dict.

The pipeline builds it from a run config (:func:`dvfl.pipeline.training_loop_config`); the
launcher adds what only it knows (``train_rows``, ``threads_per_worker``, ``run_name``) with
:func:`dataclasses.replace`. Object-store references (``*_ref``) are one-element lists, so that
Ray ships the reference and not the object it names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dvfl.config import KDSection, OptimSection
from dvfl.train.hooks import TestHooks

TEACHER_MODES = ("none", "cached", "online")


@dataclass(frozen=True)
class ModelSpec:
    """A model as ``build_model(name, **kwargs)`` rebuilds it (timm's argument names)."""
    name: str
    kwargs: dict


@dataclass(frozen=True)
class TeacherFeed:
    """Where the teacher's logits come from: nothing, the cache (``cache_ref``: its packed form
    in the object store) or a live model (``model`` + ``state_ref``: its weights there)."""
    mode: str = "none"
    views: tuple = ("center",)
    cache_ref: list | None = None
    model: ModelSpec | None = None
    state_ref: list | None = None

    def __post_init__(self):
        if self.mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode must be one of {TEACHER_MODES}, got {self.mode!r}")
        if self.mode == "cached" and not self.cache_ref:
            raise ValueError("a cached teacher needs cache_ref")
        if self.mode == "online" and (self.model is None or not self.state_ref):
            raise ValueError("an online teacher needs its model spec and state_ref")

    @classmethod
    def from_signal(cls, signal: dict) -> "TeacherFeed":
        """From :func:`dvfl.pipeline.teacher_signal`'s plain dict (its ``fingerprint`` is for identities)."""
        spec = signal.get("spec")
        return cls(mode=signal["mode"], views=tuple(signal.get("views") or ("center",)),
                   cache_ref=signal.get("cache_ref"), state_ref=signal.get("state_ref"),
                   model=ModelSpec(spec["name"], dict(spec["kwargs"])) if spec else None)


@dataclass(frozen=True)
class LoopConfig:
    seed: int
    model: ModelSpec
    optim: OptimSection
    kd: KDSection = field(default_factory=KDSection)
    teacher: TeacherFeed = field(default_factory=TeacherFeed)
    crop_size: int = 224
    flip: bool = False
    tensorboard_dir: str | None = None
    init_state_ref: list | None = None  # weights to start from (official checkpoint or 2D FocalNet)
    shuffle_buffer: int = 256
    hooks: TestHooks = field(default_factory=TestHooks)
    label: str = "train"  # the run's name in its terminal lines ("dvfl s0")
    optim_key: str = "optim"  # the config section of `optim`, as advice names it ("teacher.optim" for a teacher)
    print_epochs: bool = True  # False: the host prints each epoch's line (a Tune search, from its driver)
    stop_on_divergence: bool = True  # False: a non-finite loss is only reported (Tune's stopper ends the trial)
    # when the command that trains it began (its epochs carry it: a resumed run's earlier commands'
    # epochs are told apart from this one's, restarts within it included; dvfl.pipeline.whole_run_seconds)
    command_started: float = 0.0
    # set by the launcher
    train_rows: int = 0
    threads_per_worker: int = 1
    run_name: str = "run"
