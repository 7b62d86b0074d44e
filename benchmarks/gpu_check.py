#!/usr/bin/env python
"""GPU readiness check: a bf16 DDP training step on Ray Train, nano/base latency, cached vs online KD.

    python benchmarks/gpu_check.py                 # on a CUDA machine -> benchmarks/results/gpu.json
    python benchmarks/gpu_check.py --dry-run       # the same logic on the CPU with tiny models (a test runs it)

On CUDA: (1) a Ray Train run of the nano student with one worker per GPU (DDP when there are
several), bf16 autocast, ``--steps`` steps at 8x112^2 batch 8, timing each step after the
first; (2) the nano and base forward latency at 8x224^2, batch 1, bf16, with their ratio per
interleaved round (median and min-max); (3) one training step of the student with the teacher's
logits from a cache (a tensor lookup) against one with the base teacher's forward in the step
(online KD), interleaved, with the ratio online/cached. The GPU's name, CUDA and torch versions go
into the results, with the host's CPU model. ``--dry-run`` (or no CUDA) runs the same code on the
CPU with 2 Ray workers (gloo DDP) and tiny models, fp32; it proves the logic, not the speed, so it
writes only to an explicit --out (without one it prints the results and leaves gpu.json alone).
Ray Train's run folder is a temporary folder, removed when the run ends.
Wall time: about 3 minutes on one GPU; --dry-run about 1 minute on a quiet 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.machine import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"


def settings(dry_run: bool) -> dict:
    if dry_run:  # tiny, so the logic runs in seconds on a CPU
        small = {"embed_dim": 8, "depths": [1, 1, 1, 1]}
        return {"student": ("videofocalnet_nano", small), "teacher": ("videofocalnet_nano", {"embed_dim": 16}),
                "train_size": 32, "train_batch": 2, "latency_size": 32, "rounds": 2, "workers": 2}
    return {"student": ("videofocalnet_nano", {}), "teacher": ("videofocalnet_base", {}),
            "train_size": 112, "train_batch": 8, "latency_size": 224, "rounds": 10,
            "workers": max(1, torch.cuda.device_count())}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ddp_train_loop(cfg: dict) -> dict:
    """Ray Train worker: ``steps`` training steps on random clips, autocast as configured."""
    import ray.train
    import ray.train.torch

    from dvfl.models import build_model
    from dvfl.config import OptimSection
    from dvfl.train.loop import make_optimizer

    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    name, kw = cfg["model"]
    model = ray.train.torch.prepare_model(build_model(name, num_classes=101, num_frames=8, img_size=cfg["size"], **kw))
    raw = model.module if hasattr(model, "module") else model
    opt = make_optimizer(raw, OptimSection(lr=1e-4, weight_decay=0.05))
    g = torch.Generator().manual_seed(ray.train.get_context().get_world_rank())
    x = torch.randn(cfg["batch"], 8, 3, cfg["size"], cfg["size"], generator=g).to(device)
    y = torch.randint(0, 101, (cfg["batch"],), generator=g).to(device)
    times, losses = [], []
    for _ in range(cfg["steps"]):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"]):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    ctx = ray.train.get_context()
    # rank 0's return value is the run's result (Result.return_value)
    return {"step_s": times, "losses": losses, "world_size": ctx.get_world_size(),
            "ddp": hasattr(model, "module"), "device": str(device)}


def ddp_step(s: dict, use_gpu: bool, steps: int, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ddp_train_loop,
        train_loop_config={"model": s["student"], "size": s["train_size"], "batch": s["train_batch"],
                           "steps": steps, "bf16": use_gpu},
        scaling_config=ScalingConfig(num_workers=s["workers"], use_gpu=use_gpu,
                                     # on a CPU dry run the 2 workers must leave Ray a CPU
                                     resources_per_worker={"CPU": 1} if use_gpu else {"CPU": 0.5}),
        run_config=RunConfig(name=f"gpu-check-{time.time_ns()}", storage_path=storage))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    m = result.return_value
    timed = m["step_s"][1:] or m["step_s"]  # the first step includes cuDNN/oneDNN autotuning
    return {"world_size": m["world_size"], "ddp": m["ddp"], "device": m["device"], "bf16": use_gpu,
            "steps": len(m["step_s"]), "step_s_median": statistics.median(timed),
            "step_s_min": min(timed), "step_s_max": max(timed), "losses": m["losses"]}


def _spread(v) -> dict:
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def latency(s: dict, device, bf16: bool) -> dict:
    from dvfl.models import build_model

    models = {k: build_model(name, num_classes=101, num_frames=8, img_size=s["latency_size"], **kw).eval().to(device)
              for k, (name, kw) in (("nano", s["student"]), ("base", s["teacher"]))}
    x = torch.randn(1, 8, 3, s["latency_size"], s["latency_size"], device=device)
    ms = {"nano": [], "base": []}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for m in models.values():  # warm-up
            m(x)
        for _ in range(s["rounds"]):
            for k, m in models.items():
                _sync(device)
                t = time.perf_counter()
                m(x)
                _sync(device)
                ms[k].append((time.perf_counter() - t) * 1e3)
    ratios = [b / n for b, n in zip(ms["base"], ms["nano"])]
    return {"nano_ms": _spread(ms["nano"]), "base_ms": _spread(ms["base"]), "base_over_nano": _spread(ratios)}


def kd_steps(s: dict, device, bf16: bool) -> dict:
    """One student step with cached teacher logits vs one with the teacher's forward (online)."""
    from dvfl.models import build_model
    from dvfl.losses import distillation_loss

    size, batch = s["train_size"], s["train_batch"]
    student = build_model(s["student"][0], num_classes=101, num_frames=8, img_size=size, **s["student"][1]).to(device)
    teacher = build_model(s["teacher"][0], num_classes=101, num_frames=8, img_size=size, **s["teacher"][1]).eval().to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x = torch.randn(batch, 8, 3, size, size, device=device)
    y = torch.randint(0, 101, (batch,), device=device)
    cache = torch.randn(1000, 101).half()  # a cache: fp16 logits in host memory, looked up by row
    rows = torch.arange(batch)

    def step(online: bool):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if online:
                with torch.no_grad():
                    t_logits = teacher(x).float()
            else:
                t_logits = cache[rows].float().to(device, non_blocking=True)
            out = distillation_loss(student(x), t_logits, y, alpha=0.7, temperature=4.0)
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t

    step(False), step(True)  # warm-up
    times = {"cached": [], "online": []}
    for r in range(s["rounds"]):
        for mode in (("cached", "online") if r % 2 == 0 else ("online", "cached")):
            times[mode].append(step(mode == "online"))
    ratios = [o / c for o, c in zip(times["online"], times["cached"])]
    return {"cached_step_s": _spread(times["cached"]), "online_step_s": _spread(times["online"]),
            "online_over_cached": _spread(ratios)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the logic")
    p.add_argument("--steps", type=int, default=None, help="DDP training steps (default 20 on GPU, 2 dry)")
    p.add_argument("--out", help=f"the results file (default: {RESULTS} on CUDA; a dry run writes only to an "
                                  "explicit --out and otherwise prints the results)")
    a = p.parse_args(argv)

    import ray

    from dvfl.runtime import ray_runtime

    use_gpu = torch.cuda.is_available() and not a.dry_run
    device = torch.device("cuda" if use_gpu else "cpu")
    s = settings(dry_run=not use_gpu)
    started = time.time()
    # a dry run (logic only) must not replace the measured gpu.json unless asked to
    out = Path(a.out) if a.out else (RESULTS if use_gpu else None)
    storage = tempfile.mkdtemp(prefix="dvfl-gpu-check-ray-")  # Ray Train's run folder: nothing in it is needed
    steps = a.steps or (20 if use_gpu else 2)
    try:
        with ray_runtime(num_cpus=None if ray.is_initialized() else max(s["workers"], os.cpu_count() or 1)):
            train = ddp_step(s, use_gpu, steps, storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    results = {
        "device": torch.cuda.get_device_name(0) if use_gpu else "cpu (dry run: logic only, not speed)",
        "host_cpu": cpu_model(), "host_cpus": os.cpu_count(),
        "dry_run": not use_gpu, "torch": torch.__version__, "cuda": torch.version.cuda if use_gpu else None,
        "load_average": os.getloadavg(),
        "models": {"student": s["student"], "teacher": s["teacher"]},
        "ddp_train_step": train,
        "latency": latency(s, device, bf16=use_gpu),
        "kd": kd_steps(s, device, bf16=use_gpu),
    }
    results["wall_seconds"] = time.time() - started
    if out is None:
        print(json.dumps(results, indent=2))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".tmp").write_text(json.dumps(results, indent=2) + "\n")
        os.replace(out.with_suffix(".tmp"), out)
    t, lat, kd = train, results["latency"], results["kd"]
    print(f"[gpu_check] {results['device']}: DDP x{t['world_size']} {'bf16' if t['bf16'] else 'fp32'} step "
          f"{t['step_s_median']:.3f} s ({t['step_s_min']:.3f}-{t['step_s_max']:.3f}); base/nano latency "
          f"{lat['base_over_nano']['median']:.2f}x ({lat['base_over_nano']['min']:.2f}-{lat['base_over_nano']['max']:.2f}); "
          f"online/cached KD step {kd['online_over_cached']['median']:.2f}x; "
          + (f"wrote {out}" if out else "dry run: not written (give --out to keep it)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
