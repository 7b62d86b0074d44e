"""Efficiency profile of a video model: params, FLOPs, latency, throughput, peak memory.

Library only (no Ray); ``dvfl profile`` (:mod:`dvfl.commands.profile`) is the command-line front
end and ``benchmarks/model_efficiency.py`` uses it for the teacher/student comparison.

* **FLOPs** are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
  multiply-add; it counts matmuls and convolutions, not element-wise ops). The forward runs on the
  ``meta`` device, so counting the base model is instant and allocates nothing; if a model cannot
  run on ``meta`` the count falls back to a real forward on the CPU. **GMACs = FLOPs / 2**, which
  is what papers (and the Video-FocalNet paper) call "GFLOPs".
* **Latency** is the median wall time of ``repeats`` forward passes at batch 1 after ``warmup``
  passes, in eval mode under ``torch.inference_mode`` (synchronised on CUDA).
* **Throughput** is clips per second at ``throughput_batch`` (total clips / total time).
* **Peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` during the timed forwards; on the
  CPU the process resident set size (RSS) is sampled every ~1 ms by a background thread during the
  timed forwards (``psutil`` if installed, else ``/proc/self/statm``). Reported as the peak RSS and
  as the peak above the RSS just before the forwards (activations and workspace; the weights are
  already resident). ``tracemalloc`` does not see torch's allocator; ``ru_maxrss``, a lifetime
  high-water mark, is read only where neither of those exists (macOS without psutil): there the rise
  above it reads low, or 0 where building the model peaked higher.
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dvfl.host import cpu_model
from dvfl.models import build_model, set_temporal_impl

# the profile's default model: the paper's UCF101 classifier on 8 x 224^2 clips
DEFAULT_MODEL_KWARGS = {"num_classes": 101, "num_frames": 8, "img_size": 224}

__all__ = [
    "ProfileResult", "available_cpus", "count_params", "count_flops", "default_device",
    "measure_latency", "measure_throughput", "profile_model", "format_profile", "RssSampler",
]


def available_cpus() -> int:
    """CPU cores this process may run on (affinity and a container's quota)."""
    from dvfl.host import usable_cpus

    return usable_cpus()


def default_device() -> torch.device:
    """CUDA if available, else CPU (never hard-coded)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def count_params(model: nn.Module) -> dict:
    """Total and trainable parameter counts (shared parameters counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad)}


def _flops_of_forward(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def count_flops(name: str, *, batch: int = 1, **model_kwargs) -> dict:
    """FLOPs of one forward of ``batch`` clips of the model ``build_model(name, **model_kwargs)``
    (timm's argument names, defaults :data:`DEFAULT_MODEL_KWARGS`).

    Runs on the ``meta`` device (no memory, no compute); falls back to a real CPU forward if the
    model does not support ``meta``. Returns ``{"flops", "flops_per_clip", "gmacs_per_clip",
    "flops_counted_on"}``.
    """
    model_kwargs = {**DEFAULT_MODEL_KWARGS, **model_kwargs}
    size = model_kwargs["img_size"]
    shape = (batch, model_kwargs["num_frames"], 3, size, size)
    try:
        model = build_model(name, device="meta", **model_kwargs)
        flops = _flops_of_forward(model, torch.empty(shape, device="meta"))
        where = "meta"
    except (NotImplementedError, RuntimeError):
        model = build_model(name, device="cpu", **model_kwargs)
        flops = _flops_of_forward(model, torch.randn(shape))
        where = "cpu"
    del model
    per_clip = flops / batch
    return {"flops": flops, "flops_per_clip": per_clip, "gmacs_per_clip": per_clip / 2 / 1e9,
            "flops_counted_on": where}


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _rss_reader() -> Callable[[], int]:
    try:
        import psutil

        proc = psutil.Process(os.getpid())
        return lambda: proc.memory_info().rss
    except ImportError:
        if not os.path.exists("/proc/self/statm"):  # (macOS: no /proc) the peak so far, in bytes there
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # (ru_maxrss: bytes on macOS, KiB elsewhere)
            return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * page

        return read


class RssSampler:
    """Context manager sampling this process's RSS in a background thread.

    ``baseline`` is the RSS at entry, ``peak`` the largest sample (bytes), ``delta = peak -
    baseline``. Torch releases the GIL inside its kernels, so the thread keeps sampling while a
    forward runs.
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self._read = _rss_reader()
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        gc.collect()
        self.baseline = self.peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, x: torch.Tensor, *, warmup: int = 2,
                    repeats: int = 10) -> list:
    """Wall-clock seconds of each of ``repeats`` forwards after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    model.eval()
    device = x.device
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    return times


def measure_throughput(model: nn.Module, x: torch.Tensor, *, warmup: int = 1,
                       repeats: int = 3) -> float:
    """Clips per second processing batches like ``x`` (total clips / total time)."""
    times = measure_latency(model, x, warmup=warmup, repeats=repeats)
    return x.shape[0] * len(times) / sum(times)


# ---------------------------------------------------------------------------------------------
# the whole profile
# ---------------------------------------------------------------------------------------------
@dataclass
class ProfileResult:
    model: str
    num_classes: int
    frames: int
    size: int
    embed_dim: Optional[int]
    device: str
    threads: int
    params: int
    trainable_params: int
    flops_per_clip: float
    gflops_per_clip: float
    gmacs_per_clip: float
    flops_counted_on: str
    latency_batch: int
    latency_warmup: int
    latency_repeats: int
    latency_ms_median: float
    latency_ms_min: float
    latency_ms_all: list = field(default_factory=list)
    throughput_batch: int = 0
    throughput_clips_per_s: Optional[float] = None
    peak_memory_kind: str = ""
    peak_memory_mib: Optional[float] = None
    peak_memory_delta_mib: Optional[float] = None
    torch_version: str = torch.__version__
    cpu_model: str = field(default_factory=cpu_model)  # the host CPU (on cuda too: it feeds the GPU)
    temporal_impl: str = "conv1d"  # the temporal path timed (conv2d: what predict and Serve run)
    allocator: str = "default"     # "kept": freed memory kept for reuse, as predict and Serve run on a CPU

    def to_dict(self) -> dict:
        return asdict(self)


def profile_model(name: str, *, batch: int = 1, warmup: int = 2, repeats: int = 10,
                  throughput_batch: Optional[int] = None, throughput_repeats: int = 3,
                  device: "torch.device | str | None" = None, threads: Optional[int] = None, seed: int = 0,
                  temporal_impl: str = "conv1d", keep_memory: bool = False, **model_kwargs) -> ProfileResult:
    """Profile ``build_model(name, **model_kwargs)`` (timm's argument names): see the module
    docstring for the method.

    ``batch`` is the latency batch (1 = per-clip latency); ``throughput_batch`` (default
    ``batch``) the batch of the throughput run, skipped when ``throughput_repeats`` is 0.
    ``threads`` sets ``torch.set_num_threads`` (default: leave torch's setting);
    ``temporal_impl``: the temporal path (``conv2d``: what predict and Serve run); ``keep_memory``: on a
    CPU, freed memory kept for reuse, as predict and Serve run (:func:`dvfl.allocator.keep_freed_memory`,
    process-wide).
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    device = torch.device(device) if device is not None else default_device()
    kept = False
    if keep_memory and device.type == "cpu":
        from dvfl.allocator import keep_freed_memory

        kept = keep_freed_memory()
    model_kwargs = {**DEFAULT_MODEL_KWARGS, **model_kwargs}
    frames, size = model_kwargs["num_frames"], model_kwargs["img_size"]
    torch.manual_seed(seed)
    flops = count_flops(name, batch=1, **model_kwargs)
    model = build_model(name, device=device, **model_kwargs).eval()
    set_temporal_impl(model, temporal_impl)
    counts = count_params(model)
    x = torch.randn(batch, frames, 3, size, size, device=device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        times = measure_latency(model, x, warmup=warmup, repeats=repeats)
        peak = torch.cuda.max_memory_allocated(device)
        peak_kind, peak_mib, delta_mib = "cuda_max_memory_allocated", peak / 2**20, None
    else:
        # memory on forwards of their own: a 1 ms sampler thread beside the timed ones took CPU from
        # torch's threads (+6-11 % latency, measured in session 47)
        with RssSampler() as rss:
            measure_latency(model, x, warmup=0, repeats=1)
        times = measure_latency(model, x, warmup=warmup, repeats=repeats)
        peak_kind, peak_mib, delta_mib = "cpu_rss", rss.peak / 2**20, rss.delta / 2**20

    tp_batch = throughput_batch or batch
    throughput = None
    if throughput_repeats > 0:
        xt = x if tp_batch == batch else torch.randn(tp_batch, frames, 3, size, size,
                                                     device=device)
        throughput = measure_throughput(model, xt, warmup=1, repeats=throughput_repeats)

    ms = [t * 1e3 for t in times]
    return ProfileResult(
        model=name, num_classes=model_kwargs["num_classes"], frames=frames, size=size,
        embed_dim=model_kwargs.get("embed_dim"),
        device=str(device), threads=torch.get_num_threads(), cpu_model=cpu_model(),
        params=counts["params"], trainable_params=counts["trainable_params"],
        flops_per_clip=flops["flops_per_clip"], gflops_per_clip=flops["flops_per_clip"] / 1e9,
        gmacs_per_clip=flops["gmacs_per_clip"], flops_counted_on=flops["flops_counted_on"],
        latency_batch=batch, latency_warmup=warmup, latency_repeats=repeats,
        latency_ms_median=statistics.median(ms), latency_ms_min=min(ms), latency_ms_all=ms,
        throughput_batch=tp_batch, throughput_clips_per_s=throughput,
        peak_memory_kind=peak_kind, peak_memory_mib=peak_mib, peak_memory_delta_mib=delta_mib,
        temporal_impl=temporal_impl, allocator="kept" if kept else "default",
    )


def format_profile(r: ProfileResult) -> str:
    """Human-readable report, one ``key: value`` line per field."""
    lines = [
        f"model: {r.model} (num_classes={r.num_classes}, frames={r.frames}, size={r.size}"
        + (f", embed_dim={r.embed_dim}" if r.embed_dim is not None else "") + ")",
        f"device: {r.device} (threads={r.threads}, torch {r.torch_version})",
        f"path: temporal {r.temporal_impl}" + (" (the official one)" if r.temporal_impl == "conv1d" else
                                                 " (what predict and Serve run)")
        + (", freed memory kept for reuse (as predict and Serve on a CPU)" if r.allocator == "kept" else ""),
        f"cpu: {r.cpu_model}",
        f"params: {r.params:,} ({r.params / 1e6:.2f} M)",
        # three significant figures: an embedded-size model's 0.0162 GMACs printed as 0.02 (width 4: 0.00)
        f"FLOPs per clip: {r.flops_per_clip:,.0f} ({r.gflops_per_clip:.3g} GFLOPs, "
        f"FlopCounterMode, 2 per MAC)",
        f"GMACs per clip: {r.gmacs_per_clip:.3g} (what papers call \"GFLOPs\")",
        f"latency (batch {r.latency_batch}, median of {r.latency_repeats} after "
        f"{r.latency_warmup} warm-up): {r.latency_ms_median:.1f} ms (min {r.latency_ms_min:.1f})",
    ]
    if r.throughput_clips_per_s is not None:
        lines.append(f"throughput (batch {r.throughput_batch}): "
                     f"{r.throughput_clips_per_s:.2f} clips/s")
    if r.peak_memory_kind == "cpu_rss":
        lines.append(f"peak memory: {r.peak_memory_mib:.0f} MiB RSS "
                     f"(+{r.peak_memory_delta_mib:.0f} MiB during forward)")
    else:
        lines.append(f"peak memory: {r.peak_memory_mib:.0f} MiB ({r.peak_memory_kind})")
    return "\n".join(lines)
