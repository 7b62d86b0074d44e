#!/usr/bin/env python
"""Efficiency profile CLI (thin wrapper around :mod:`dvfl.profile`).

    python pipelines/profile.py --model videofocalnet_nano --frames 8 --size 224 \
        [--num-classes 101] [--batch 1] [--repeats 10] [--embed-dim 96]

Prints params, FLOPs per clip (torch.utils.flop_counter) and GMACs = FLOPs / 2 (what papers call
"GFLOPs"), median latency, throughput and peak memory; cuda if available, else cpu.
"""
import os
import sys

# This file is named like the stdlib module `profile`: drop its own folder from sys.path so that
# `import profile` elsewhere (cProfile, torch utilities) gets the stdlib one, and make the repo
# importable even without `pip install -e .`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from dvfl.profile import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
