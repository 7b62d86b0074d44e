"""Command-line plumbing shared by the entry points: config file + overrides, Ray session."""
from __future__ import annotations

import argparse
import sys

from dvfl.config import ConfigError, RunConfig, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (default: configs/embedded.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value, e.g. --set kd.temperature=2 (repeatable)")
    p.add_argument("--output-dir", help="where every stage writes (config: output_dir)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: 2 x cores)")


def config_from_args(a: argparse.Namespace, extra: dict | None = None) -> RunConfig:
    """Load + override + validate; on a bad value print the field and exit before any work."""
    overrides = list(a.overrides)
    if a.output_dir:
        overrides.append(("output_dir", a.output_dir))
    for key, value in (extra or {}).items():
        if value is not None:
            overrides.append((key, value))
    try:
        return load_config(a.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)
