"""What every benchmark result records about the machine it ran on."""
from __future__ import annotations

import os


def cpu_model() -> str:
    from dvfl.host import cpu_model as read  # stdlib only: no torch in a benchmark's driver for this

    return read()


def cpu_flags(wanted=("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx2")) -> list[str]:
    """The listed instruction-set flags this CPU has (bf16 and int8 matrix instructions, chiefly)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def load_average() -> float:
    return round(os.getloadavg()[0], 2)
