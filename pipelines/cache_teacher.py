#!/usr/bin/env python
"""Run the teacher once over every stored clip view and cache its raw logits (Ray Data).

    python pipelines/cache_teacher.py --clips DIR --teacher DIR_OR_FILE --out DIR

The cache is content-addressed (teacher weights + architecture, the clips' ingest fingerprint,
the view spec); rerunning reuses a finished cache and resumes an interrupted one.
"""
from __future__ import annotations

import argparse
import os
import sys

import _bootstrap  # noqa: F401

from dvfl.cli import absolute_path_args
from dvfl.runtime import ray_runtime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", required=True, help="ingest output (shards/ + dataset.json)")
    p.add_argument("--teacher", required=True, help="teacher model dir (model.json) or official checkpoint file")
    p.add_argument("--teacher-model", help="architecture of a bare checkpoint file, e.g. videofocalnet_base")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--crop-size", type=int, help="default: the stored short side")
    p.add_argument("--views", default="center", help="comma-separated cached views, e.g. center,center+flip")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=1, help="teacher replicas (one per GPU on a cluster)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--verify", type=int, default=32, help="cached rows to recompute and compare")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another teacher/clips in --out")
    p.add_argument("--num-cpus", type=int)
    a = p.parse_args(argv)
    absolute_path_args(a, inputs=("clips", "teacher"), outputs=("out",))
    if not os.path.isfile(os.path.join(a.clips, "dataset.json")):
        p.error(f"--clips {a.clips}: not a finished ingest output (no dataset.json)")
    if not os.path.exists(a.teacher):
        p.error(f"--teacher {a.teacher}: not found")
    if os.path.isfile(a.teacher) and not a.teacher_model:
        p.error("--teacher-model is required when --teacher is a checkpoint file")
    for flag, v in (("--batch-size", a.batch_size), ("--actors", a.actors)):
        if v < 1:
            p.error(f"{flag} must be >= 1")
    from dvfl.models import CheckpointError
    from dvfl.teacher_cache import CacheMismatchError, build_teacher_cache

    with ray_runtime(num_cpus=a.num_cpus):
        try:
            build_teacher_cache(a.clips, a.teacher, a.out, teacher_name=a.teacher_model, crop_size=a.crop_size,
                                views=a.views.split(","), dtype=a.dtype, batch_size=a.batch_size,
                                num_actors=a.actors, use_gpu=a.gpu, verify_samples=a.verify,
                                overwrite=a.overwrite)
        except (CacheMismatchError, CheckpointError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # disk full, quota: finished shards stay, a rerun resumes
            print(f"error: writing the cache to {a.out} failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
