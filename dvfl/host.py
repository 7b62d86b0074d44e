"""What machine this is, for the records that measured numbers carry (stdlib only: benchmarks
read it before, or without, importing torch)."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo "model name"; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
