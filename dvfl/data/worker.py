"""A killable decode process with a per-file time limit.

decord can block inside native code *holding the GIL*, so a thread-based or
signal-based timeout in the same process cannot stop it. Each Ray decode actor
therefore owns one long-lived child process (``_decode_child.py``) and talks to it
through pipes; if a file takes longer than the limit, the child is SIGKILLed and a
fresh one is started for the next file (cost measured: ~0.1-0.2 s, only paid after a
kill). A crash of the child (segfault, abort) is reported as ``decoder_crash`` and
also only costs a restart. The child is recycled when its resident memory passes
``max_rss_mb`` (decord's native memory growth; measured flat at 48-56 MiB over 6,000 synthetic
and 512 UCF-like files, one fresh reader per file) or after ``max_jobs`` files. A
restart costs ~0.25 s of CPU, as much as decoding 100 tiny videos, so it is not done blindly.
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Dict, Optional

from . import decode

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_decode_child.py")


class DecodeProcess:
    def __init__(self, max_jobs: int = 100_000, max_rss_mb: float = 2048):
        self.max_jobs = max_jobs
        self.max_rss_mb = max_rss_mb
        self.proc: Optional[subprocess.Popen] = None
        self.jobs_done = 0
        self.restarts = 0

    # -- process management ----------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-u", _CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, close_fds=True)
        self.jobs_done = 0
        try:  # a 1 MiB pipe instead of 64 KiB: a video's clips cross in a few reads, not dozens
            import fcntl

            fcntl.fcntl(self.proc.stdout.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:
            pass

    def kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except Exception:
                pass
            for s in (self.proc.stdin, self.proc.stdout):
                try:
                    s.close()
                except Exception:
                    pass
            self.proc = None
            self.restarts += 1

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except Exception:
                self.kill()
            self.proc = None

    def __del__(self):
        try:
            self.kill()
        except Exception:
            pass

    # -- one job -------------------------------------------------------------------------
    def run(self, job: Dict, timeout: float) -> Dict:
        """Decode one video in the child; never raises for a bad file."""
        if self.proc is not None and self.jobs_done >= self.max_jobs:
            self.close()
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self._start()
        payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self.proc.stdin.flush()
            hdr = self._read_exact(8, deadline)
            (n,) = struct.unpack("<Q", hdr)
            data = self._read_exact(n, deadline)
        except TimeoutError:
            self.kill()
            return {"ok": False, "reason": decode.TIMEOUT,
                    "detail": f"no result after {timeout:g} s; decoder process killed"}
        except (EOFError, BrokenPipeError, OSError) as e:
            code = self.proc.poll() if self.proc is not None else None
            if code is None and self.proc is not None:
                try:
                    code = self.proc.wait(timeout=5)
                except Exception:
                    code = None
            self.kill()
            return {"ok": False, "reason": decode.DECODER_CRASH,
                    "detail": f"decoder process died (exit {code}): {type(e).__name__}"}
        self.jobs_done += 1
        if self.rss_mb() > self.max_rss_mb:
            self.close()
        return pickle.loads(data)

    def rss_mb(self) -> float:
        """The child's resident memory in MiB (0 if unknown)."""
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError, AttributeError):
            return 0.0

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                raise TimeoutError
            k = os.readv(fd, [view[got:]])
            if not k:
                raise EOFError("child closed stdout")
            got += k
        return buf
