"""Validate Ray cluster launcher YAMLs, KubeRay manifests and the project's Dockerfile offline (see docs/cluster.md).

    dvfl validate-cluster cluster/*.yaml cluster/kuberay/*.yaml docker/Dockerfile

Prints ``OK`` or the errors per file; exits non-zero if any file fails.
"""
from __future__ import annotations

import argparse
import logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dvfl.cluster.validate import CRD_DIR_ENV, DEFAULT_CRD_DIR

    p.add_argument("paths", nargs="+", help="YAML files (launcher configs or KubeRay manifests) and Dockerfiles")
    p.add_argument("--crd-dir", default=None,
                   help=f"KubeRay CRD directory (default: ${CRD_DIR_ENV} or {DEFAULT_CRD_DIR})")
    p.add_argument("-q", "--quiet", action="store_true", help="print failures only")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from dvfl.cluster.validate import validate_file

    # prepare_config logs an INFO line per node type; keep the output to the verdicts. (Importing
    # ray configures the "ray" logger, so import it before lowering the level.)
    import ray  # noqa: F401

    logging.getLogger("ray").setLevel(logging.WARNING)
    failed = 0
    for path in a.paths:
        report = validate_file(path, a.crd_dir)
        if report.ok:
            if not a.quiet:
                print(f"OK    {path}")
                for s in report.summaries:
                    print(f"      {s}")
                for n in report.notes:
                    print(f"      not checked: {n}")
        else:
            failed += 1
            print(f"FAIL  {path}")
            for e in report.errors:
                print(f"      {e}")
    if len(a.paths) > 1 or failed:
        print(f"{len(a.paths) - failed}/{len(a.paths)} files valid")
    return 1 if failed else 0
