"""The one training loop: teacher fine-tuning, the no-KD student (VFL-Net) and distillation.

:func:`run_loop` reads as set-up, resume, then per epoch: steps, end-of-epoch report. It is plain
PyTorch; everything Ray (the dataset shard, the device, DDP wrapping, the object store,
``report`` and checkpoints) goes through the ``session`` its host gives (:mod:`dvfl.train.session`).
It is given a typed :class:`~dvfl.train.loop_config.LoopConfig`. Which of the three jobs it does
is data: the teacher's mode is ``"none"`` (cross-entropy only), ``"cached"`` (KD against logits
from the teacher cache) or ``"online"`` (KD against a teacher running in the loop, the paper's way).

Augmentation and KD: a cached logit belongs to one view of one stored clip, so with a teacher
the student sees exactly the cached views (a deterministic crop, optionally flipped, picked at
random per clip among the cached views); temporal jitter comes from the several seeded training
views ingest stores per video. Without a teacher, training uses random crops (and flips when
``flip`` is on).
"""
from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dvfl.data.views import View, batch_arrays, make_clip_batch, normalize
from dvfl.losses import distillation_loss
from dvfl.config import OptimSection
from dvfl.models import build_model, set_temporal_impl
from dvfl.allocator import keep_freed_memory
from dvfl.scratch import STALE_SECONDS, make_scratch_dir
from dvfl.train.loop_config import LoopConfig, TeacherFeed

STATE_FILE = "state.pt"
VAL_COLUMNS = ["clip_id", "label", "frames", "num_frames", "height", "width"]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


def lr_schedule(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.01) -> float:
    """Linear warm-up then cosine decay, as in the official recipes (warm-up matters: without it
    from-scratch runs of this architecture collapse to one class)."""
    if step < warmup:
        return base_lr * (min_ratio + (1 - min_ratio) * (step + 1) / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class TeacherSignal:
    """Where the teacher's logits come from: the cache (lookup) or a live model (forward).
    ``fetch`` gets an object from the store (:func:`dvfl.train.session.fetch`)."""

    def __init__(self, feed: TeacherFeed, device: torch.device, fetch, temporal_impl: str = "conv1d"):
        self.mode = feed.mode
        self.views = [View.parse(v) for v in feed.views]
        self.forward_calls = 0
        if self.mode == "cached":
            from dvfl.teacher_cache import TeacherLogitCache

            self.cache = TeacherLogitCache.from_packed(fetch(feed.cache_ref))
        elif self.mode == "online":
            self.model = build_model(feed.model.name, **feed.model.kwargs)
            self.model.load_state_dict(fetch(feed.state_ref), strict=True)
            self.model.eval().to(device)
            set_temporal_impl(self.model, temporal_impl)
            for p in self.model.parameters():
                p.requires_grad_(False)

    def logits(self, clip_ids, views, x: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
        if self.mode == "cached":
            return self.cache.lookup(clip_ids, [v.name for v in views]).to(x.device)
        self.forward_calls += 1
        # on a GPU the student's precision (optim.amp: off means fp32), on a CPU fp32 as the cache's
        # logits (bf16 moved them by up to 0.09)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=x.is_cuda and bool(amp)):
            return self.model(x).float()


def _save_state(directory: str, run: "_Run", epoch: int) -> None:
    # the random streams and the fp16 loss scale too: a resumed run trains as an uninterrupted one
    path = os.path.join(directory, STATE_FILE)
    state = {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "epoch": epoch, "step": run.step, "history": run.history, "rng": run.rng.bit_generator.state,
             "world": run.world,
             "torch_rng": torch.get_rng_state(), "scaler": run.scaler.state_dict(),
             # drop-path draws from the GPU's generator on a GPU
             "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    try:
        torch.save(state, path)
    except RuntimeError as exc:  # torch's writer says "file write failed" / "unexpected pos", not why
        free = shutil.disk_usage(directory).free
        # a full disk, or a quota / file-size limit / I/O error (said with the free space, not called full)
        code = errno.ENOSPC if free < 2 ** 20 + _state_bytes(state) else errno.EIO
        raise OSError(code, f"writing epoch {epoch}'s state failed ({exc}); {free / 2**20:.0f} MiB free "
                      "there (TMPDIR)", path) from exc


def _state_bytes(state: dict) -> int:
    """Roughly what an epoch state takes on disk: its tensors' bytes."""
    tensors = [t for part in (state["model"], *state["optimizer"].get("state", {}).values())
               for t in part.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _checkpoint_dir(run_name: str):
    """A local folder for one epoch's checkpoint, named after the run (a folder left behind by a
    killed worker can be traced to it, and the next run on the machine removes it)."""
    path = make_scratch_dir("ckpt", run_name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cpu_vendor_and_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(vendor_id, flags) of this CPU's first core; ("", set()) where cpuinfo cannot be read."""
    vendor, flags = "", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AMX or AVX512-BF16); elsewhere oneDNN emulates
    bf16 (about 1,000x slower than fp32)."""
    flags = cpu_vendor_and_flags()[1]
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_autocast_pays(vendor: str, flags: set[str]) -> bool:
    """Whether bf16 autocast trains faster than fp32 on a CPU with these flags. AMX: 2.25x the
    step (benchmarks/train_step.py). AVX512-BF16 without AMX on an Intel CPU (AMX absent, or
    hidden by a hypervisor): slower, oneDNN's AVX512-BF16 matmul ran at 0.5x the fp32 peak and
    the step at 0.74x (docs/training-speed.md). AVX512-BF16 on AMD (Zen 4): bf16, as it ran since
    session 42 (the README's session-42 AMD paragraph; not timed against fp32 there)."""
    if "amx_bf16" in flags and "amx_tile" in flags:
        return True
    return "avx512_bf16" in flags and vendor != "GenuineIntel"


def amp_dtype(device: torch.device, mode: str, cpu_amp: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``optim.amp`` on this device; None: full precision (``off``, bf16 on
    a GPU without bf16 support, which falls back to fp32 rather than fail, and CPU workers unless
    ``cpu_amp`` is on and bf16 trains faster there: :func:`bf16_autocast_pays`; fp16 is never
    used on a CPU)."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_amp and mode != "off" and bf16_autocast_pays(*cpu_vendor_and_flags()) else None
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16":
        # natively only: below compute capability 8 PyTorch reports emulated bf16 as supported (slow)
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if mode == "fp16":
        return torch.float16
    raise ValueError(f"optim.amp must be bf16, fp16 or off, got {mode!r}")


def make_optimizer(model, optim: OptimSection):
    """AdamW (default) or SGD with Nesterov momentum (``optim.optimizer: sgd``, the official recipe);
    ``optim.fused``: one fused kernel over all parameters instead of a loop of small ops."""
    from timm.optim import create_optimizer_v2

    fused = {"fused": True} if optim.fused else {}
    if optim.optimizer == "sgd":  # timm's "sgd" is Nesterov momentum
        return create_optimizer_v2(model, "sgd", lr=optim.lr, weight_decay=optim.weight_decay,
                                   momentum=optim.momentum, **fused)
    if optim.optimizer != "adamw":
        raise ValueError(f"optim.optimizer must be adamw or sgd, got {optim.optimizer!r}")
    return create_optimizer_v2(model, "adamw", lr=optim.lr, weight_decay=optim.weight_decay, **fused)


def evaluate(model, dataset, crop_size: int, batch_size: int, device, amp, progress=None) -> dict:
    """top-1/top-5/CE on the stored eval views (centre crop), labelled clips only. ``progress``:
    called with (clips so far, seconds) every :data:`EPOCH_PROGRESS_SECONDS`."""
    model.eval()
    n = c1 = c5 = 0
    loss_sum = 0.0
    started = said = time.time()
    with torch.inference_mode():
        for table in dataset.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            if progress and time.time() - said >= EPOCH_PROGRESS_SECONDS:
                said = time.time()
                progress(n, said - started)
            arrays, _, labels = batch_arrays(table)
            keep = labels >= 0
            if not keep.any():
                continue
            x = normalize(make_clip_batch([a for a, k in zip(arrays, keep) if k], crop_size,
                                          [View()] * int(keep.sum())), device)
            y = torch.from_numpy(labels[keep]).to(device)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=bool(amp)):
                logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            a, b = topk_correct(logits, y)
            n, c1, c5 = n + len(y), c1 + a, c5 + b
    return {"val_top1": c1 / max(n, 1), "val_top5": c5 / max(n, 1), "val_loss": loss_sum / max(n, 1), "val_clips": n}


def epoch_line(label: str, m: dict, epochs: int, where: str = "") -> str:
    """The one terminal line per epoch (every metric also goes to the report and TensorBoard);
    ``where`` (the first epoch a process trains): the device and precision, e.g. "cuda, bf16"."""
    kd = f" (ce {m['train_ce']:.3f}, kd {m['train_kd']:.3f})" if m.get("train_kd") else ""
    return (f"[{label}] epoch {m['epoch']}/{epochs}: loss {m['train_loss']:.3f}{kd}, train top-1 {m['train_top1']:.1%}, "
            f"val top-1 {m['val_top1']:.1%}, {m['epoch_seconds']:.1f}s + val {m['val_seconds']:.1f}s"
            + (f" on {where}" if where else ""))


EPOCH_PROGRESS_SECONDS = 60.0  # an epoch longer than this says how far it is (a UCF101 epoch on CPUs: hours)


def clips_per_second(rate: float) -> str:
    """3 significant digits below 100 (".1f" said 0.0 of a teacher at 2 clips a minute), whole above."""
    return f"{rate:.3g}" if rate < 100 else f"{rate:,.0f}"


def epoch_progress_line(cfg: LoopConfig, epoch: int, stats: "_EpochStats", seconds: float, world: int) -> str:
    """Within a long epoch: the clips this worker trained on so far, its rate and the time left."""
    done = int(stats.counts[0] + stats.counts[1])
    total = max(done, -(-cfg.train_rows // max(world, 1)))
    rate = done / seconds if seconds > 0 else 0.0
    left = f", about {(total - done) / rate / 60:.0f} min left" if rate > 0 and total > done else ""
    workers = f" (one of {world} workers)" if world > 1 else ""
    return (f"[{cfg.label}] epoch {epoch + 1}/{cfg.optim.epochs}: {done:,} of {total:,} clips{workers} in "
            f"{seconds / 60:.0f} min, {clips_per_second(rate)} clips/s{left}")


def device_and_precision(device: torch.device, amp: torch.dtype | None) -> str:
    """"cuda, bf16" / "cpu, fp32": what a user checks to know the GPU was used."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return f"{device.type}, {names.get(amp, 'fp32')}"


def say(line: str) -> None:
    """One line to the worker's stdout. Ray Train 2.60 patches ``print`` in workers to tee it to
    stdout and also log it through the root logger, so a printed line reached the terminal twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _optimizer_step(model, optimizer, scaler, optim: OptimSection, step: int, total_steps: int, warmup: int) -> int:
    for group in optimizer.param_groups:
        group["lr"] = lr_schedule(step, total_steps, warmup, optim.lr)
    if optim.clip_grad:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step + 1


class _TensorBoard:
    """tensorboardX's writer; for a URI the events are written to a local temporary folder and
    uploaded (whole files, each object written once per flush) after every flush and at close."""

    def __init__(self, target: str, first_step: int = 1):
        from tensorboardX import SummaryWriter

        from dvfl import storage

        self.target = target
        self.local = make_scratch_dir("tb") if storage.is_remote(target) else None
        # TensorBoard drops the folder's earlier events from first_step on: a run started over (or an epoch
        # trained again) drew both runs' steps as one zig-zag curve
        self.writer = SummaryWriter(self.local or target, purge_step=first_step)

    def add_scalar(self, *args) -> None:
        self.writer.add_scalar(*args)

    def _upload(self, last: bool = False) -> bool:
        """Every events file again (whole files); a failed upload is said and retried at the next
        flush: an optional log must not cost the epoch its checkpoint, or hide the run's own error."""
        from dvfl import storage

        try:
            for name in os.listdir(self.local):
                storage.upload_file(os.path.join(self.local, name), storage.join(self.target, name))
            return True
        except OSError as exc:
            # (a scratch folder: a later process removes it once its owner is gone that long)
            then = (f"the events stay in {self.local} for {STALE_SECONDS // 60} minutes after this process ends: "
                    "copy them from there" if last else "retried at the next epoch")
            say(f"[tensorboard] uploading the events to {self.target} failed ({exc}): {then}")
            return False

    def flush(self) -> None:
        self.writer.flush()
        if self.local:
            self._upload()

    def close(self) -> None:
        self.writer.close()
        if self.local and self._upload(last=True):  # (failed: the only copy is kept, and said where)
            shutil.rmtree(self.local, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker of the group (Ray hands it ``{"loop": LoopConfig}``)."""
    from dvfl.train.session import TrainWorkerSession

    run_loop(config["loop"], TrainWorkerSession())


@dataclass
class _Run:
    """What set-up builds and every epoch uses; ``start_epoch``, ``step`` and ``history`` move on."""
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped on a worker group
    raw_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    teacher: TeacherSignal | None
    rng: np.random.Generator
    total_steps: int
    warmup: int
    start_epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)


@dataclass
class _EpochStats:
    loss: float = 0.0  # sums over clips: a short last batch weighs what its clips weigh
    ce: float = 0.0
    kd: float = 0.0
    batches: int = 0
    seen: int = 0  # labelled clips
    correct: int = 0
    # labelled, unlabelled, ce_clips (the clips the loss averaged CE over: its labelled mask), mixed batches
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.int64))
    pending: int = 0  # batches whose gradients wait for the next optimizer step
    teacher_wait: float = 0.0  # seconds spent getting the teacher's logits (cache lookup or forward)

    def add_batch(self, loss: float, ce: float, kd: float, ce_clips: int, predicted: np.ndarray,
                  labels: np.ndarray) -> None:
        """One batch's sums, each batch mean times the clips it covers: the loss and KD over all
        its clips, CE over ``ce_clips`` (a batch of unlabelled clips has none, and counting its 0 as
        a batch's CE made train_ce too low; a short last batch counted as a full one)."""
        self.batches += 1
        self.loss += loss * len(labels)
        self.ce += ce * ce_clips
        self.kd += kd * len(labels)
        labelled = labels >= 0
        self.correct += int((predicted == labels)[labelled].sum())
        self.seen += int(labelled.sum())
        self.counts += torch.tensor([int(labelled.sum()), int((~labelled).sum()), ce_clips,
                                     int(labelled.any() and not labelled.all())])


class _Timed:
    """An iterator that adds up the seconds spent waiting on ``next``."""

    def __init__(self, iterable):
        self._it, self.seconds = iter(iterable), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.seconds += time.perf_counter() - started


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite."""


def run_loop(cfg: LoopConfig, session) -> None:
    """Train per ``cfg`` on the host ``session`` gives (:mod:`dvfl.train.session`): set up,
    resume, one pass per epoch, report with a checkpoint at the end of each epoch."""
    checkpoint = session.checkpoint()
    state = checkpoint_state(checkpoint) if checkpoint else None
    start_epoch = state["epoch"] + 1 if state else 0
    train_shard = session.dataset("train")
    # the first epoch's stream starts while the model is set up, each next one while the last validates
    batches = _epoch_batches(train_shard, cfg, start_epoch, session) if start_epoch < cfg.optim.epochs else None
    run = set_up(cfg, session)
    resume(run, state, cfg.label)
    writer = _TensorBoard(cfg.tensorboard_dir, run.start_epoch + 1) if run.rank == 0 and cfg.tensorboard_dir else None
    val_data = session.dataset("val") if run.rank == 0 else None
    reported_at = time.time()
    try:
        for epoch in range(run.start_epoch, cfg.optim.epochs):
            started = time.time()
            stats = _EpochStats()
            run.model.train()
            said_at = started
            for table in cfg.hooks.between_steps(batches, epoch=epoch, rank=run.rank, world=run.world,
                                                 run_name=cfg.run_name, reported_at=lambda: reported_at,
                                                 node_id=session.node_id):
                train_step(run, cfg, table, stats)
                if run.rank == 0 and cfg.print_epochs and time.time() - said_at >= EPOCH_PROGRESS_SECONDS:
                    said_at = time.time()
                    say(epoch_progress_line(cfg, epoch, stats, said_at - started, run.world))
            train_seconds = time.time() - started
            if stats.pending:  # the epoch's last, partial accumulation still counts
                _finish_partial_accumulation(run, stats.pending, cfg.optim.accum_steps)
                run.step = _optimizer_step(run.model, run.optimizer, run.scaler, cfg.optim, run.step, run.total_steps,
                                           run.warmup)
            metrics = epoch_metrics(run, cfg, stats, epoch, started, train_seconds, batches.seconds)
            next_batches = _epoch_batches(train_shard, cfg, epoch + 1, session) if epoch + 1 < cfg.optim.epochs else None
            loss = metrics["train_loss"]
            if not _weights_finite(run.raw_model):  # an inf gradient on the epoch's last step(s), after its loss
                metrics["train_loss"] = float("nan")  # was counted: diverged as much (Tune's report reads the loss)
            if cfg.stop_on_divergence and not math.isfinite(metrics["train_loss"]):
                # before its checkpoint: a retry must not resume from NaN weights (after the last
                # epoch it would find nothing to train and save them as the model)
                o = cfg.optim_key
                what, fix = ((f"the training loss is {loss}", f"lower {o}.lr, raise {o}.warmup_frac or set {o}.clip_grad")
                             if not math.isfinite(loss) else  # (clipping an inf gradient makes it NaN: no help)
                             ("the weights are no longer finite (a gradient overflowed)",
                              f"lower {o}.lr or raise {o}.warmup_frac"))
                raise TrainingDiverged(f"{cfg.label}: {what} at epoch {epoch + 1}; {fix} (no model was saved)")
            end_of_epoch(run, cfg, session, epoch, metrics, val_data, writer)
            batches = next_batches
            reported_at = time.time()
    finally:  # a failed epoch still uploads its TensorBoard events and removes their local copy
        if writer is not None:
            writer.close()


def _weights_finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite (one device sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _epoch_batches(train_shard, cfg: LoopConfig, epoch: int, session) -> _Timed:
    """The epoch's batches (its own shuffle seed per rank), the first one already being fetched."""
    return _Timed(_FirstFetchedAhead(train_shard.iter_batches(
        batch_size=cfg.optim.batch_size, batch_format="pyarrow", local_shuffle_buffer_size=cfg.shuffle_buffer,
        local_shuffle_seed=cfg.seed * 1000 + epoch * session.world + session.rank)))


class _FirstFetchedAhead:
    """An iterator whose first item is fetched in a background thread from construction on.

    An epoch's first batch waits for Ray Data to start the epoch's stream and fill the local
    shuffle buffer: 1.2-1.3 s of a 21 s epoch at 8x112^2 batch 1, against 0.02 s for all the
    other batches together (docs/training-speed.md). Fetched ahead, that wait overlaps the model's
    set-up or the previous epoch's validation and checkpoint."""

    _END = object()

    def __init__(self, iterable):
        self._it, self._first, self._error = iter(iterable), None, None
        self._thread = threading.Thread(target=self._fetch_first, name="dvfl-first-batch", daemon=True)
        self._thread.start()

    def _fetch_first(self):
        try:
            self._first = next(self._it, self._END)
        except BaseException as e:  # re-raised where the batch is wanted
            self._error = e

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        if self._first is self._END:
            raise StopIteration
        first, self._first = self._first, None
        return first


def steps_per_epoch(train_rows: int, world: int, batch_size: int, accum_steps: int) -> int:
    """Optimizer steps per epoch (the schedule counts optimizer steps: one per ``accum_steps``
    batches, the last partial one included); each rank gets ``train_rows // world`` rows (an
    equal split drops the remainder), so a remainder plans no step the ranks never take."""
    return max(1, math.ceil((train_rows // world) / batch_size / accum_steps))


def set_up(cfg: LoopConfig, session) -> _Run:
    """Threads, precision, seeds, the model (DDP-wrapped by the session), teacher, optimizer, schedule."""
    rank, world, device = session.rank, session.world, session.device
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads_per_worker)
    optim = cfg.optim
    if optim.keep_freed_memory:
        keep_freed_memory()
    amp = amp_dtype(device, optim.amp, cpu_amp=optim.cpu_amp)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    set_temporal_impl(model, optim.temporal_impl)
    if cfg.init_state_ref:
        model.load_state_dict(session.fetch(cfg.init_state_ref), strict=False)
    model = session.prepare_model(model)
    if rank:  # each rank its own torch stream (drop-path masks), as its own data; rank 0 keeps the seed's
        torch.manual_seed(rank_torch_seed(cfg.seed, rank))
    raw_model = model.module if hasattr(model, "module") else model
    teacher = (TeacherSignal(cfg.teacher, device, session.fetch, optim.temporal_impl)
               if cfg.teacher.mode != "none" else None)
    total_steps = optim.epochs * steps_per_epoch(cfg.train_rows, world, optim.batch_size, optim.accum_steps)
    return _Run(rank=rank, world=world, device=device, model=model, raw_model=raw_model,
                optimizer=make_optimizer(raw_model, optim),
                # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
                scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16), amp=amp, teacher=teacher,
                rng=np.random.default_rng([cfg.seed, rank]), total_steps=total_steps,
                warmup=int(optim.warmup_frac * total_steps))


def rank_torch_seed(*key: int) -> int:
    """A torch seed of its own for ``key`` (seed, rank[, epoch]): with one seed on every rank, every
    rank dropped the same residual branches for the same sample at every step."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def checkpoint_state(checkpoint) -> dict:
    """The state a checkpoint holds: a Ray Train/Tune checkpoint's ``state.pt``, read straight from
    its filesystem (local or object store), or a runner's epoch state (``read_state``).

    Not ``Checkpoint.as_directory``: it downloads a remote checkpoint into a temporary folder that
    every process of the node shares, and a rank that arrives after another rank's download has
    finished downloads again over the file that one is reading (a restarted DDP group read a
    "corrupt" state.pt that way when both ranks shared a machine)."""
    if hasattr(checkpoint, "read_state"):
        data = checkpoint.read_state()
    else:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{STATE_FILE}") as f:
            data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def resume(run: _Run, state: dict | None, label: str = "train") -> None:
    """Weights, optimizer, epoch, step and history from the last reported checkpoint's state, if any."""
    if not state:
        return
    if state.get("world", run.world) != run.world:  # (states before session 27 do not say)
        # optim.batch_size is per worker: another worker count changes the batch and the schedule
        raise ValueError(f"the run's last checkpoint was taken with {state['world']} worker(s), this run has "
                         f"{run.world}: rerun with scaling.num_workers={state['world']} to resume it, or --fresh")
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.start_epoch, run.step, run.history = state["epoch"] + 1, state["step"], state["history"]
    if "rng" in state:  # checkpoints before session 22 have no random state: the streams restart
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], run.device)
        if run.rank == 0:  # the checkpoint holds rank 0's streams; other ranks branch off theirs by epoch
            run.rng.bit_generator.state = state["rng"]
        else:  # (manual_seed seeds the CUDA generators too: drop-path masks on a GPU come from there)
            run.rng = np.random.default_rng([*run.rng.integers(0, 2**31, 2).tolist(), run.start_epoch])
            torch.manual_seed(rank_torch_seed(*run.rng.integers(0, 2**31, 2).tolist(), run.rank))
        if state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
    if run.rank == 0:
        say(f"[{label}] resumed from checkpoint after epoch {state['epoch'] + 1}")


def _finish_partial_accumulation(run: _Run, pending: int, accum_steps: int) -> None:
    """The epoch's last batches did not complete an accumulation: they ran under DDP's no_sync, so
    their gradients are averaged over the ranks here (every rank has the same number of batches),
    and each was divided by ``accum_steps``, so they are rescaled to a mean over the ``pending``."""
    grads = [p.grad for p in run.raw_model.parameters() if p.grad is not None]
    if run.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for g in grads:
            torch.distributed.all_reduce(g)
            g.div_(run.world)
    for g in grads:
        g.mul_(accum_steps / pending)


def train_step(run: _Run, cfg: LoopConfig, table, stats: _EpochStats) -> None:
    """One batch: views, forward, loss (KD or CE), backward; an optimizer step when the
    accumulation completes; the epoch's sums."""
    optim, device = cfg.optim, run.device
    arrays, clip_ids, labels = batch_arrays(table)
    if run.teacher is not None:
        views = [run.teacher.views[i] for i in run.rng.integers(0, len(run.teacher.views), len(arrays))]
    else:
        views = [View("random", bool(cfg.flip and run.rng.random() < 0.5)) for _ in arrays]
    x = normalize(make_clip_batch(arrays, cfg.crop_size, views, run.rng), device)
    y = torch.from_numpy(labels).to(device)
    # DDP: gradients are all-reduced only on the batch that completes an accumulation
    last_of_accumulation = stats.pending + 1 >= optim.accum_steps
    defer = not last_of_accumulation and hasattr(run.model, "no_sync")
    sync = run.model.no_sync() if defer else contextlib.nullcontext()
    with sync:
        with torch.autocast(device.type, dtype=run.amp or torch.bfloat16, enabled=bool(run.amp)):
            logits = run.model(x)
        if run.teacher is not None:
            if device.type == "cuda":  # kernels run asynchronously: time the teacher's, not the student's queue
                torch.cuda.synchronize(device)
            asked = time.perf_counter()
            teacher_logits = run.teacher.logits(clip_ids, views, x, run.amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats.teacher_wait += time.perf_counter() - asked
            out = distillation_loss(logits, teacher_logits, y, alpha=cfg.kd.alpha, temperature=cfg.kd.temperature,
                                    unlabeled_weight=cfg.kd.unlabeled_weight, label_smoothing=optim.label_smoothing)
            loss, ce, kd_part, ce_clips = out.total, out.ce, out.kd, int(out.num_labelled)
        else:
            if (labels < 0).any():
                raise ValueError("unlabelled clips reached a run without a teacher: CE needs labels")
            loss = ce = F.cross_entropy(logits.float(), y, label_smoothing=optim.label_smoothing)
            kd_part, ce_clips = torch.zeros(()), len(labels)
        run.scaler.scale(loss / optim.accum_steps).backward()
    stats.pending += 1
    if stats.pending == optim.accum_steps:
        run.step = _optimizer_step(run.model, run.optimizer, run.scaler, optim, run.step, run.total_steps, run.warmup)
        stats.pending = 0
    stats.add_batch(float(loss.detach()), float(ce.detach()), float(kd_part.detach()), ce_clips,
                    logits.argmax(1).cpu().numpy(), labels)


def epoch_metrics(run: _Run, cfg: LoopConfig, stats: _EpochStats, epoch: int, started: float,
                  train_seconds: float, data_wait: float) -> dict:
    """The epoch's training metrics over all ranks: sums and counts all-reduced, then divided."""
    if stats.batches == 0:  # a loss of 0 over 0 steps would be reported as a finished epoch
        raise RuntimeError(f"epoch {epoch + 1}: rank {run.rank} of {run.world} got 0 training batches "
                           f"(batch size {cfg.optim.batch_size}): the training split is empty or too small")
    sums = torch.tensor([stats.loss, stats.ce, stats.kd, stats.batches, stats.correct, stats.seen,
                         *stats.counts.tolist()], dtype=torch.float64)
    if run.world > 1:
        import torch.distributed as dist

        reduced = sums.to(run.device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    loss, ce, kd, _batches, correct, seen = sums[:6].tolist()
    counts = sums[6:].long()
    clips = max(int(counts[0] + counts[1]), 1)
    metrics = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
               "train_loss": loss / clips, "train_ce": ce / max(int(counts[2]), 1), "train_kd": kd / clips,
               "train_top1": correct / max(seen, 1),
               "epoch_seconds": time.time() - started, "steps": run.step,
               # the share of this rank's training loop spent waiting for its next input batch
               "data_wait_fraction": data_wait / max(train_seconds, 1e-9),
               "labelled_clips": int(counts[0]), "unlabelled_clips": int(counts[1]),
               "ce_clips": int(counts[2]), "mixed_batches": int(counts[3])}
    if run.teacher is not None:  # 0 from the cache: proof that a run never ran its teacher
        metrics["teacher_forward_calls"] = run.teacher.forward_calls
        metrics["teacher_fraction"] = stats.teacher_wait / max(train_seconds, 1e-9)
    return metrics


def end_of_epoch(run: _Run, cfg: LoopConfig, session, epoch: int, metrics: dict, val_data, writer) -> None:
    """Rank 0 validates, saves the checkpoint and prints the epoch's line; every rank reports."""
    # report() (default SYNC upload) copies the checkpoint into the run's storage before it
    # returns, so the local copy is deleted right after it
    with _checkpoint_dir(cfg.run_name) if run.rank == 0 else contextlib.nullcontext() as ckpt_dir:
        if run.rank == 0:
            val_started = time.time()
            def validating(clips: int, seconds: float) -> None:  # (a UCF101 carve on CPUs: many minutes)
                say(f"[{cfg.label}] epoch {epoch + 1}/{cfg.optim.epochs}: validating, {clips:,} clips in "
                    f"{seconds / 60:.0f} min, {clips_per_second(clips / seconds if seconds > 0 else 0.0)} clips/s")

            metrics.update(evaluate(run.raw_model, val_data, cfg.crop_size, cfg.optim.batch_size, run.device, run.amp,
                                    progress=validating if cfg.print_epochs else None))
            metrics["val_seconds"] = time.time() - val_started
            metrics["device"] = device_and_precision(run.device, run.amp)  # (Tune's epoch lines print it too)
            metrics["command_started"] = cfg.command_started  # (dvfl.pipeline.whole_run_seconds)
            run.history.append(metrics)
            _save_state(ckpt_dir, run, epoch)
            if cfg.print_epochs:
                # the first epoch this process trains (a resumed run's too) names the device
                say(epoch_line(cfg.label, metrics, cfg.optim.epochs, metrics["device"] if epoch == run.start_epoch else ""))
        session.report(metrics, ckpt_dir)
        # after the checkpoint: an epoch interrupted before it is trained again on resume, and its
        # scalars, written first, were logged twice (the second from other weights)
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "command_started"):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
