"""The one training loop: teacher fine-tuning, the no-KD student (VFL-Net) and distillation.

``train_loop_per_worker`` is plain PyTorch; Ray appears only at the edges (the dataset shard,
the device, DDP wrapping, ``report`` and checkpoints). Which of the three jobs it does is data:
``teacher.mode`` is ``"none"`` (cross-entropy only), ``"cached"`` (KD against logits from the
teacher cache) or ``"online"`` (KD against a teacher running in the loop, the paper's way).

Augmentation and KD: a cached logit belongs to one view of one stored clip, so with a teacher
the student sees exactly the cached views (a deterministic crop, optionally flipped, picked at
random per clip among the cached views); temporal jitter comes from the several seeded training
views ingest stores per video. Without a teacher, training uses random crops (and flips when
``flip`` is on).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from dvfl.data.views import View, batch_arrays, make_clip_batch, normalize
from dvfl.losses import distillation_loss
from dvfl.models import build_model

STATE_FILE = "state.pt"
VAL_COLUMNS = ["clip_id", "label", "frames", "num_frames", "height", "width"]


def lever(optim: dict, name: str):
    """A speed option of ``optim`` (cpu_amp, fused, temporal_impl); absent: the config's default."""
    from dvfl.config import OptimSection

    return optim[name] if name in optim else getattr(OptimSection(), name)


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
    """Where the teacher's logits come from: the cache (lookup) or a live model (forward)."""

    def __init__(self, cfg: dict, device: torch.device):
        import ray

        self.mode = cfg["teacher"]["mode"]
        self.views = [View.parse(v) for v in cfg["teacher"].get("views", ["center"])]
        self.forward_calls = 0
        if self.mode == "cached":
            from dvfl.teacher_cache import TeacherLogitCache

            self.cache = TeacherLogitCache.from_packed(ray.get(cfg["teacher"]["cache_ref"][0]))
        elif self.mode == "online":
            spec = cfg["teacher"]["spec"]
            self.model = build_model(spec["name"], **spec["kwargs"])
            self.model.load_state_dict(ray.get(cfg["teacher"]["state_ref"][0]), strict=True)
            self.model.eval().to(device)
            set_temporal_impl(self.model, lever(cfg.get("optim", {}), "temporal_impl"))
            for p in self.model.parameters():
                p.requires_grad_(False)

    def logits(self, clip_ids, views, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cached":
            return self.cache.lookup(clip_ids, [v.name for v in views]).to(x.device)
        self.forward_calls += 1
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            return self.model(x).float()


def _save_state(directory: str, model, optimizer, epoch: int, step: int, history: list) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "step": step, "history": history}, os.path.join(directory, STATE_FILE))


def checkpoint_tmp_prefix(run_name: str) -> str:
    """Temp folders of a run's checkpoints are named after the run, so any left behind (a
    worker killed between save and report) can be traced to it."""
    return f"dvfl-ckpt-{run_name}-"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere oneDNN emulates
    bf16 and autocast would be slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def amp_dtype(device: torch.device, mode: str, cpu_amp: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``optim.amp`` on this device; None: full precision (``off``, bf16 on
    a GPU without bf16 support, which falls back to fp32 rather than fail, and CPU workers unless
    ``cpu_amp`` is on and the CPU has bf16 instructions; fp16 is never used on a CPU)."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_amp and mode != "off" and cpu_has_bf16() else None
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if mode == "fp16":
        return torch.float16
    raise ValueError(f"optim.amp must be bf16, fp16 or off, got {mode!r}")


def make_optimizer(model, optim: dict):
    """AdamW (default) or SGD with Nesterov momentum (``optim.optimizer: sgd``, the official recipe);
    ``optim.fused``: one fused kernel over all parameters instead of a loop of small ops."""
    from timm.optim import create_optimizer_v2

    name = optim.get("optimizer", "adamw")
    fused = {"fused": True} if lever(optim, "fused") else {}
    if name == "sgd":  # timm's "sgd" is Nesterov momentum
        return create_optimizer_v2(model, "sgd", lr=optim["lr"], weight_decay=optim["weight_decay"],
                                   momentum=optim.get("momentum", 0.9), **fused)
    if name != "adamw":
        raise ValueError(f"optim.optimizer must be adamw or sgd, got {name!r}")
    return create_optimizer_v2(model, "adamw", lr=optim["lr"], weight_decay=optim["weight_decay"], **fused)


def set_temporal_impl(model, impl: str) -> None:
    """``optim.temporal_impl`` on every focal-modulation block (no parameter changes)."""
    from dvfl.models.video_focalnet import SpatioTemporalFocalModulation

    if impl not in ("conv2d", "conv1d"):
        raise ValueError(f"optim.temporal_impl must be conv2d or conv1d, got {impl!r}")
    for module in model.modules():
        if isinstance(module, SpatioTemporalFocalModulation):
            module.temporal_impl = impl


def evaluate(model, dataset, crop_size: int, batch_size: int, device, amp) -> dict:
    """top-1/top-5/CE on the stored eval views (centre crop), labelled clips only."""
    model.eval()
    n = c1 = c5 = 0
    loss_sum = 0.0
    with torch.inference_mode():
        for table in dataset.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
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


def _maybe_inject_failure(cfg: dict, epoch: int, rank: int, world: int, reported_at: float) -> None:
    """Test hook: the last rank dies once, mid-way through the epoch after ``fail_after_epoch``.

    It waits a few seconds after the last report so that the controller has registered that
    epoch's checkpoint: the point is to show recovery from it, not the loss of an unacknowledged one.
    """
    fail_after = cfg.get("fail_after_epoch")
    if fail_after is None or epoch != fail_after or rank != world - 1 or os.path.exists(cfg["fail_marker"]):
        return
    time.sleep(max(0.0, 3.0 - (time.time() - reported_at)))
    open(cfg["fail_marker"], "w").close()
    os._exit(1)


def _maybe_hold(cfg: dict, epoch: int, rank: int) -> None:
    """Test hook: every rank pauses once, after the first step of the epoch after
    ``hold_after_epoch``, until ``<hold_dir>/release`` (every run) or ``<hold_dir>/release-<run>``
    (this run only) exists.

    Each rank first writes ``<hold_dir>/held-rank<r>.json`` (its run, node id and pid), so that a
    test can kill the node that hosts a given rank while training is provably mid-epoch, or let
    some Tune trials go and keep another one provably unfinished. Workers restarted after
    ``release`` exists do not pause again.
    """
    if cfg.get("hold_after_epoch") is None or epoch != cfg["hold_after_epoch"]:
        return
    run = cfg.get("run_name", "run")
    releases = [os.path.join(cfg["hold_dir"], "release"), os.path.join(cfg["hold_dir"], f"release-{run}")]
    if any(os.path.exists(r) for r in releases):
        return
    import ray

    held = os.path.join(cfg["hold_dir"], f"held-rank{rank}.json")
    with open(held + ".tmp", "w") as f:
        json.dump({"rank": rank, "epoch": epoch + 1, "pid": os.getpid(), "run": run,
                   "node_id": ray.get_runtime_context().get_node_id()}, f)
    os.replace(held + ".tmp", held)
    deadline = time.time() + float(cfg.get("hold_timeout_s", 600))
    while not any(os.path.exists(r) for r in releases) and time.time() < deadline:
        time.sleep(0.2)


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


def _say(line: str) -> None:
    """One line to the worker's stdout. Ray Train 2.60 patches ``print`` in workers to tee it to
    stdout and also log it through the root logger, so a printed line reached the terminal twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _optimizer_step(model, optimizer, scaler, optim: dict, step: int, total_steps: int, warmup: int) -> int:
    for group in optimizer.param_groups:
        group["lr"] = lr_schedule(step, total_steps, warmup, optim["lr"])
    if optim.get("clip_grad"):
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim["clip_grad"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step + 1


class _TensorBoard:
    """tensorboardX's writer; for a URI the events are written to a local temporary folder and
    uploaded (whole files, each object written once per flush) after every flush and at close."""

    def __init__(self, target: str):
        from tensorboardX import SummaryWriter

        from dvfl import storage

        self.target = target
        self.local = tempfile.mkdtemp(prefix="dvfl-tb-") if storage.is_remote(target) else None
        self.writer = SummaryWriter(self.local or target)

    def add_scalar(self, *args) -> None:
        self.writer.add_scalar(*args)

    def _upload(self) -> None:
        from dvfl import storage

        for name in os.listdir(self.local):
            storage.upload_file(os.path.join(self.local, name), storage.join(self.target, name))

    def flush(self) -> None:
        self.writer.flush()
        if self.local:
            self._upload()

    def close(self) -> None:
        self.writer.close()
        if self.local:
            try:
                self._upload()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train's entry point on every worker of the group."""
    from dvfl.train.session import TrainWorkerSession

    _quiet_train_report_log()
    run_loop(cfg, TrainWorkerSession())


def run_loop(cfg: dict, session) -> None:
    """Train per ``cfg`` on the host ``session`` gives (:mod:`dvfl.train.session`): set up,
    resume, one pass per epoch, report with a checkpoint at the end of each epoch."""
    rank, world, device = session.rank, session.world, session.device
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads_per_worker"])
    amp = amp_dtype(device, cfg["optim"].get("amp", "bf16"), cpu_amp=lever(cfg["optim"], "cpu_amp"))
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    seed = cfg["seed"]
    torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    rng = np.random.default_rng([seed, rank])

    spec = cfg["model"]
    model = build_model(spec["name"], **spec["kwargs"])
    set_temporal_impl(model, lever(cfg["optim"], "temporal_impl"))
    if cfg.get("init_state_ref"):
        import ray

        model.load_state_dict(ray.get(cfg["init_state_ref"][0]), strict=False)
    model = session.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    teacher = TeacherSignal(cfg, device) if cfg["teacher"]["mode"] != "none" else None
    kd = cfg["kd"]
    optim = cfg["optim"]
    optimizer = make_optimizer(raw_model, optim)
    accum = int(optim.get("accum_steps", 1))

    batch_size = optim["batch_size"]
    # one optimizer step per `accum` batches (the schedule counts optimizer steps)
    steps_per_epoch = max(1, math.ceil(cfg["train_rows"] / world / batch_size / accum))
    total_steps = optim["epochs"] * steps_per_epoch
    warmup = int(optim["warmup_frac"] * total_steps)
    start_epoch, step, history = 0, 0, []
    checkpoint = session.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        if rank == 0:
            _say(f"[train] resumed from checkpoint after epoch {state['epoch'] + 1}")

    writer = None
    if rank == 0 and cfg.get("tensorboard_dir"):
        writer = _TensorBoard(cfg["tensorboard_dir"])

    train_shard = session.dataset("train")
    val_data = session.dataset("val") if rank == 0 else None
    crop_size, flip = cfg["crop_size"], cfg["flip"]

    reported_at = time.time()
    for epoch in range(start_epoch, optim["epochs"]):
        model.train()
        started = time.time()
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        seen = correct = batches = 0
        # Clip accounting (issue 9): the CE count comes from the loss itself, the labelled and
        # unlabelled counts from the label column, so a loss that let an unlabelled clip into
        # CE would show up as ce_clips > labelled_clips in the reported metrics.
        counts = torch.zeros(4, dtype=torch.int64)  # labelled, unlabelled, ce_clips, mixed batches
        pending = 0  # batches whose gradients wait for the next optimizer step
        batches_in = iter(train_shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                                   local_shuffle_buffer_size=cfg.get("shuffle_buffer", 256),
                                                   local_shuffle_seed=seed * 1000 + epoch * world + rank))
        data_wait = 0.0  # seconds this rank waited on Ray Data for its next batch
        teacher_wait = 0.0  # seconds spent getting the teacher's logits (cache lookup or forward)
        while True:
            waited = time.perf_counter()
            table = next(batches_in, None)
            data_wait += time.perf_counter() - waited
            if table is None:
                break
            arrays, clip_ids, labels = batch_arrays(table)
            if teacher is not None:
                views = [teacher.views[i] for i in rng.integers(0, len(teacher.views), len(arrays))]
            else:
                views = [View("random", bool(flip and rng.random() < 0.5)) for _ in arrays]
            x = normalize(make_clip_batch(arrays, crop_size, views, rng), device)
            y = torch.from_numpy(labels).to(device)
            # DDP: gradients are all-reduced only on the batch that completes an accumulation
            sync = model.no_sync() if pending + 1 < accum and hasattr(model, "no_sync") else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=bool(amp)):
                    logits = model(x)
                if teacher is not None:
                    asked = time.perf_counter()
                    teacher_logits = teacher.logits(clip_ids, views, x)
                    teacher_wait += time.perf_counter() - asked
                    out = distillation_loss(logits, teacher_logits, y,
                                            alpha=kd["alpha"], temperature=kd["temperature"],
                                            unlabeled_weight=kd.get("unlabeled_weight", 1.0),
                                            label_smoothing=optim.get("label_smoothing", 0.0))
                    loss, ce, kd_part, ce_clips = out.total, out.ce, out.kd, int(out.num_labelled)
                else:
                    if (labels < 0).any():
                        raise ValueError("unlabelled clips reached a run without a teacher: CE needs labels")
                    loss = ce = F.cross_entropy(logits.float(), y, label_smoothing=optim.get("label_smoothing", 0.0))
                    kd_part, ce_clips = torch.zeros(()), len(labels)
                scaler.scale(loss / accum).backward()
            pending += 1
            if pending == accum:
                step = _optimizer_step(model, optimizer, scaler, optim, step, total_steps, warmup)
                pending = 0
            _maybe_inject_failure(cfg, epoch, rank, world, reported_at)
            if batches == 0:
                _maybe_hold(cfg, epoch, rank)
            batches += 1
            sums["loss"] += float(loss.detach())
            sums["ce"] += float(ce.detach())
            sums["kd"] += float(kd_part.detach())
            labelled = labels >= 0
            correct += int((logits.argmax(1).cpu().numpy() == labels)[labelled].sum())
            seen += int(labelled.sum())
            counts += torch.tensor([int(labelled.sum()), int((~labelled).sum()), ce_clips,
                                    int(labelled.any() and not labelled.all())])
        train_seconds = time.time() - started
        if pending:  # the epoch's last, partial accumulation still counts
            step = _optimizer_step(model, optimizer, scaler, optim, step, total_steps, warmup)
        if batches == 0:  # a loss of 0 over 0 steps would be reported as a finished epoch
            raise RuntimeError(f"epoch {epoch + 1}: rank {rank} of {world} got 0 training batches "
                               f"(batch size {batch_size}): the training split is empty or too small")
        if world > 1:
            import torch.distributed as dist

            reduced = counts.to(device)
            dist.all_reduce(reduced)
            counts = reduced.cpu()
        metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": sums["loss"] / max(batches, 1), "train_ce": sums["ce"] / max(batches, 1),
                   "train_kd": sums["kd"] / max(batches, 1), "train_top1": correct / max(seen, 1),
                   "epoch_seconds": time.time() - started, "steps": step,
                   # the share of this rank's training loop spent waiting for its next input batch
                   "data_wait_fraction": data_wait / max(train_seconds, 1e-9),
                   "labelled_clips": int(counts[0]), "unlabelled_clips": int(counts[1]),
                   "ce_clips": int(counts[2]), "mixed_batches": int(counts[3])}
        if teacher is not None:  # 0 from the cache: proof that a run never ran its teacher
            metrics["teacher_forward_calls"] = teacher.forward_calls
            metrics["teacher_fraction"] = teacher_wait / max(train_seconds, 1e-9)
        # report() (default SYNC upload) copies the checkpoint into the run's storage before it
        # returns, so the local copy is deleted right after it
        with (tempfile.TemporaryDirectory(prefix=checkpoint_tmp_prefix(cfg.get("run_name", "run")))
              if rank == 0 else contextlib.nullcontext()) as ckpt_dir:
            if rank == 0:
                val_started = time.time()
                metrics.update(evaluate(raw_model, val_data, crop_size, batch_size, device, amp))
                metrics["val_seconds"] = time.time() - val_started
                history.append(metrics)
                _save_state(ckpt_dir, raw_model, optimizer, epoch, step, history)
                _say("[train] " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
                if writer is not None:
                    for k, v in metrics.items():
                        if isinstance(v, (int, float)) and k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                    writer.flush()
            session.report(metrics, ckpt_dir)
        reported_at = time.time()
    if writer is not None:
        writer.close()
