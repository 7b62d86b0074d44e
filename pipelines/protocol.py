#!/usr/bin/env python
"""Run a dataset's evaluation protocol: the distillation pipeline once per split, then mean ± std.

    python pipelines/protocol.py --config configs/hmdb51.yaml --splits 1,2,3
    python pipelines/protocol.py --config configs/ucf50.yaml --folds all      # leave-one-group-out, 25 folds
    python pipelines/protocol.py --config configs/ucf50.yaml --folds 1-5      # a subset (the results say so)

UCF101 and HMDB51 have official splits 1-3 (``--splits``); UCF50 has 25 leave-one-group-out folds
(``--folds``; fold N tests on group gNN). Each split gets ``data.split`` and its own output dir
(``<output_dir>/split<N>``, or the config's ``output_dir`` with ``{split}`` filled in); ``data.clips``,
``teacher.cache`` and ``teacher.path`` must hold ``{split}`` or be null. Every split's config is
validated before any work starts. Results: ``<output_dir>/protocol.json`` and ``protocol.md``
(``--out`` to put them elsewhere), rewritten after every split.
"""
from __future__ import annotations

import argparse
import sys
import time

import _bootstrap  # noqa: F401
from dvfl.cli import add_config_args

from dvfl.runtime import ray_runtime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--splits", help="UCF101/HMDB51 splits to run, e.g. 1,2,3 (default: all three)")
    p.add_argument("--folds", help="UCF50 leave-one-group-out folds, e.g. 1-5 or all (default: all 25)")
    p.add_argument("--out", help="folder for protocol.json/protocol.md (default: the config's output_dir)")
    a = p.parse_args(argv)
    from dvfl import protocol as P
    from dvfl.cli import absolute_path_args
    from dvfl.config import ConfigError, config_tree

    absolute_path_args(a, outputs=("out",) if a.out else ())
    overrides = list(a.overrides) + ([("output_dir", a.output_dir)] if a.output_dir else [])
    try:
        dataset = (config_tree(a.config, overrides).get("data") or {}).get("dataset", "synthetic")
        proto = P.protocol_for(dataset)
        flag, wrong = ("--splits", "--folds") if proto.kind == "split" else ("--folds", "--splits")
        if getattr(a, wrong.lstrip("-")):
            raise ConfigError(f"{wrong} does not apply to {proto.description}: use {flag}")
        ids = P.parse_ids(getattr(a, flag.lstrip("-")) or "all", proto, flag)
        configs = P.split_configs(a.config, overrides, ids)
        out = P.results_dir(a.config, overrides, a.out)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    print(f"[protocol] {proto.description}: {proto.kind}s {', '.join(map(str, ids))} "
          f"({len(ids)} of {len(proto.ids)}); results in {out}")
    with ray_runtime(num_cpus=a.num_cpus):
        P.run_protocol(proto, configs, ids, out)
    print(f"[protocol] finished in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
