"""Command-line plumbing shared by the entry points: config file + overrides, Ray session."""
from __future__ import annotations

import argparse
import sys

from dvfl import paths
from dvfl.config import ConfigError, RunConfig, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (default: configs/embedded.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value, e.g. --set kd.temperature=2 (repeatable)")
    p.add_argument("--output-dir", help="where every stage writes (config: output_dir)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: 2 x cores)")


def config_from_args(a: argparse.Namespace, extra: dict | None = None, outputs=()) -> RunConfig:
    """Load + override + validate; on a bad value print the field and exit before any work.
    ``outputs``: path fields the command writes (e.g. ``teacher.path`` for train_teacher.py)."""
    overrides = list(a.overrides)
    if a.output_dir:
        overrides.append(("output_dir", a.output_dir))
    for key, value in (extra or {}).items():
        if value is not None:
            overrides.append((key, value))
    try:
        return load_config(a.config, overrides, outputs=outputs)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)


def uses_config(a: argparse.Namespace) -> bool:
    """A stage run from a config file (``--config`` or ``--set``) derives its paths from it."""
    return bool(a.config or a.overrides)


def absolute_path_args(a: argparse.Namespace, inputs=(), outputs=()) -> None:
    """Make path flags absolute before Ray sees them (:mod:`dvfl.paths`): ``inputs`` relative to
    the current directory, ``outputs`` likewise, or under the job root inside a Ray job."""
    def fix(value, resolve):
        return [resolve(v) for v in value] if isinstance(value, list) else resolve(value)

    for name in inputs:
        setattr(a, name, fix(getattr(a, name), paths.absolute_input))
    for name in outputs:
        setattr(a, name, fix(getattr(a, name), lambda v: paths.absolute(v, paths.output_base())))


def announce_job_outputs(output_dir: str, log=print) -> None:
    """Under ``ray job submit``, say where the results go: not the job's temporary working copy."""
    if paths.in_job_working_dir():
        log(f"[paths] Ray job {paths.ray_job_id() or ''}: relative output paths resolve under {paths.job_root()} "
            f"(${paths.JOB_ROOT_ENV}), outside the job's temporary working directory; results: {output_dir}")
