#!/usr/bin/env python
"""``dvfl protocol`` as a script (``ray job submit -- python pipelines/protocol.py ...``): see :mod:`dvfl.commands.protocol`.

Needs the package installed (``pip install -e .``, as ``make venv`` and the cluster configs do).
"""
import sys

try:
    from dvfl.cli import script_main
except ModuleNotFoundError as exc:  # a checkout that was never installed
    if exc.name != "dvfl":
        raise
    sys.exit("error: the dvfl package is not installed for this python: `source .venv/bin/activate` (made by `make venv`), or run `pip install -e .` in the checkout")

if __name__ == "__main__":
    sys.exit(script_main("protocol"))
