"""Efficiency profile of a Video-FocalNet model: params, FLOPs/GMACs per clip, latency, throughput, peak memory.

    dvfl profile --arch videofocalnet_nano --frames 8 --size 224 [--num-classes 101] [--batch-size 1]

(``python pipelines/profile_model.py`` takes the same arguments.) FLOPs per clip are counted with
torch.utils.flop_counter; GMACs = FLOPs / 2 is what papers call "GFLOPs". Latency is the median of
the timed forwards; cuda if available, else cpu. See :mod:`dvfl.profile`.
"""
from __future__ import annotations

import argparse
import sys

from dvfl.cli import absolute_path_args, deprecated


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="videofocalnet_nano", help="architecture (a timm model name)")
    p.add_argument("--model", default=None,
                   help="a trained model's directory (model.json, e.g. runs/embedded/students/dvfl-s0-...): its "
                        "architecture, width, classes, frames and crop size (--arch, --frames, --size, "
                        "--num-classes and --embed-dim are then not used)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--size", type=int, default=224, help="frame size (square)")
    p.add_argument("--num-classes", type=int, default=101)
    p.add_argument("--embed-dim", type=int, default=None, help="override the model width")
    p.add_argument("--batch-size", type=int, default=1, help="latency batch size")
    deprecated(p, "--batch", "--batch-size", "batch_size", type=int)
    p.add_argument("--throughput-batch-size", type=int, default=None,
                   help="batch size of the throughput run (default: --batch-size)")
    deprecated(p, "--throughput-batch", "--throughput-batch-size", "throughput_batch_size", type=int)
    p.add_argument("--repeats", type=int, default=10, help="timed forwards (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first")
    p.add_argument("--throughput-repeats", type=int, default=3, help="timed throughput batches; 0 skips throughput")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the available CPU cores)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    # (inside a Ray job a relative --json went into the job's temporary copy of the project)
    absolute_path_args(a, plain_outputs=("json",))
    # (0 threads, a negative warm-up: tracebacks after the model was built; a throughput batch of 0 was
    # silently --batch-size)
    for flag in ("frames", "size", "num_classes", "batch_size", "repeats", "threads", "throughput_batch_size",
                 "embed_dim"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("warmup", "throughput_repeats"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    import timm
    import torch

    import dvfl.models  # noqa: F401  (registers the variants)
    from dvfl.profile import available_cpus, format_profile, profile_model

    if a.arch not in timm.list_models("videofocalnet_*"):  # (a 33-line traceback from the model factory)
        p.error(f"--arch {a.arch!r}: choose one of {', '.join(timm.list_models('videofocalnet_*'))}")
    if a.device:
        try:
            device = torch.device(a.device)
        except RuntimeError as exc:
            p.error(f"--device {a.device!r}: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {a.device}: torch sees no GPU on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {a.device}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0..)")
    width = {} if a.embed_dim is None else {"embed_dim": a.embed_dim}
    model_kwargs = {"num_classes": a.num_classes, "num_frames": a.frames, "img_size": a.size, **width}
    if a.model:  # (--model was an old spelling of --arch: a name still works, with a warning)
        from dvfl import storage
        from dvfl.artifacts import SPEC

        if a.model in timm.list_models("videofocalnet_*"):
            print("warning: --model NAME is deprecated; use --arch NAME (--model takes a model folder)", file=sys.stderr)
            a.arch, a.model = a.model, None  # (profiled as --arch NAME is, with its temporal path)
        elif not storage.isfile(storage.join(a.model, SPEC)):
            p.error(f"--model {a.model}: not a model folder (no {SPEC}); an architecture name goes to --arch")
        else:  # the architecture as trained, at its crop size: what predict and Serve run
            from dvfl.artifacts import read_spec
            from dvfl.models import CheckpointError

            try:
                spec = read_spec(storage.join(a.model, SPEC))
            except CheckpointError as exc:
                p.error(f"--model {exc}")
            a.arch = spec["name"]
            crop = (spec.get("inputs") or {}).get("crop_size")
            model_kwargs = {**spec.get("kwargs", {}), **({"img_size": int(crop)} if crop else {})}
            model_kwargs.pop("drop_path_rate", None)
    result = profile_model(
        a.arch, **model_kwargs, temporal_impl="conv2d" if a.model else "conv1d", keep_memory=bool(a.model),
        batch=a.batch_size, warmup=a.warmup, repeats=a.repeats, throughput_batch=a.throughput_batch_size,
        throughput_repeats=a.throughput_repeats, device=a.device,
        threads=a.threads if a.threads is not None else available_cpus())
    print(format_profile(result), flush=True)
    if a.json:  # written whole (a temporary file renamed), locally or on an object store
        from dvfl import storage

        try:
            storage.write_json(storage.absolute(a.json), result.to_dict())
        except OSError as exc:
            from dvfl.cli import os_error_line

            print(f"error: writing {a.json} failed: {os_error_line(exc)}", file=sys.stderr)
            return 1
    return 0
