"""Run a dataset's evaluation protocol: the distillation pipeline once per split, then mean ± std.

    dvfl protocol --config configs/hmdb51.yaml --splits 1,2,3
    dvfl protocol --config configs/ucf50.yaml --folds all      # leave-one-group-out, 25 folds
    dvfl protocol --config configs/ucf50.yaml --folds 1-5      # a subset (the results say so)

UCF101 and HMDB51 have official splits 1-3 (``--splits``); UCF50 has 25 leave-one-group-out folds
(``--folds``; fold N tests on group gNN). Each split gets ``data.split`` and its own output dir
(``<output_dir>/split<N>``, or the config's ``output_dir`` with ``{split}`` filled in); ``data.clips``,
``teacher.cache`` and ``teacher.path`` must hold ``{split}`` or be null. Every split's config is
validated before any work starts. Results: ``<output_dir>/protocol.json`` and ``protocol.md``
(``--out`` to put them elsewhere), rewritten after every split. ``python pipelines/protocol.py``
takes the same arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

from dvfl.cli import absolute_path_args, add_config_args, check_gpu_reachable, failures_as_one_line, fits_ray


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--splits", help="UCF101/HMDB51 splits to run, e.g. 1,2,3 (default: all three)")
    p.add_argument("--folds", help="UCF50 leave-one-group-out folds, e.g. 1-5 or all (default: all 25)")
    p.add_argument("--out", help="folder for protocol.json/protocol.md (default: the config's output_dir)")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from dvfl import protocol as P
    from dvfl.pipeline import check_given_inputs
    from dvfl.config import ConfigError, config_tree
    from dvfl.locks import folder_lock, reads_held
    from dvfl.runtime import ray_runtime

    absolute_path_args(a, outputs=("out",) if a.out else ())
    output_dir = getattr(a, "output_dir", None)
    overrides = list(a.overrides) + ([("output_dir", output_dir)] if output_dir else [])
    try:
        data = config_tree(a.config, overrides).get("data") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"data must be a mapping, got {data!r}")
        proto = P.protocol_for(data.get("dataset", "synthetic"))
        flag, wrong = ("--splits", "--folds") if proto.kind == "split" else ("--folds", "--splits")
        if getattr(a, wrong.lstrip("-")):
            raise ConfigError(f"{wrong} does not apply to {proto.description}: use {flag}")
        ids = P.parse_ids(getattr(a, flag.lstrip("-")) or "all", proto, flag)
        configs = P.split_configs(a.config, overrides, ids)
        for cfg in configs:
            cfg.require_teacher()
            check_gpu_reachable(cfg.scaling.use_gpu)
            check_given_inputs(cfg)  # every split's, before the first split trains
        out = P.results_dir(a.config, overrides, a.out)
        # the splits not asked for this time, to count the ones earlier commands finished
        others = [i for i in proto.ids if i not in ids]
        other_configs = dict(zip(others, P.split_configs(a.config, overrides, others, check_paths=False)))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    print(f"[protocol] {proto.description}: {proto.kind}s {', '.join(map(str, ids))} "
          f"({len(ids)} of {len(proto.ids)}); results in {out}")
    with failures_as_one_line("protocol"), contextlib.ExitStack() as held, reads_held():
        for cfg in configs:  # every split's run folder before the first split: a refusal comes before any work
            held.enter_context(folder_lock(cfg.output_dir, "run"))
        with ray_runtime(num_cpus=a.num_cpus) as resources:
            if not all(fits_ray(cfg, resources) for cfg in configs):
                return 2
            P.run_protocol(proto, configs, ids, out, others=other_configs)
    print(f"[protocol] finished in {time.time() - started:.0f}s")
    return 0
