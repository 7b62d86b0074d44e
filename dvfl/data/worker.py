"""A killable decode process with a per-file time limit.

decord can block inside native code *holding the GIL*, so a thread-based or
signal-based timeout in the same process cannot stop it. Each Ray decode actor
therefore owns one long-lived child process (``_decode_child.py``) and talks to it
through pipes; if a file takes longer than the limit, the child is SIGKILLed and a
fresh one is started for the next file (paid only after a kill). A crash of the child (segfault, abort) is reported as ``decoder_crash`` and
also only costs a restart. A child SIGKILLed by someone else (the OOM killer's signal) gets the
file once more in a fresh child, since the memory pressure may have come from elsewhere; killed
again, the file is rejected as ``decoder_killed``. The child runs in a network namespace of its
own where Linux allows it (``net_isolated``). The child is recycled when its resident memory passes
``max_rss_mb`` (decord's native memory growth) or after ``max_jobs`` files; not blindly, since a
restart costs as much CPU as many tiny videos (docs/ingest.md, "Measurements behind code choices").
"""
from __future__ import annotations

import io
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
_START_TIMEOUT = 60.0  # a child's start (Python + hello frame), on a busy machine
# more than any video's clips at their source size (4 clips of 8 4K frames: 0.8 GB): a larger size is
# not a result, and allocating it would fail this process
_MAX_RESULT_BYTES = 1 << 34
# The globals a decode result may name when unpickled here: numpy arrays (protocol 5, out of band or
# not), their dtypes and scalars; everything else is builtins. The child parses untrusted files:
# one taken over through a decoder bug must not run code in this process (a Serve replica, an ingest task).
RESULT_GLOBALS = frozenset((module, name) for module in ("numpy._core.numeric", "numpy.core.numeric")
                           for name in ("_frombuffer",)) | frozenset(
    (module, name) for module in ("numpy._core.multiarray", "numpy.core.multiarray")
    for name in ("scalar", "_reconstruct")) | {("numpy", "dtype"), ("numpy", "ndarray")}


class _ResultUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in RESULT_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        return super().find_class(module, name)


_warned_network = False  # say once per process that decode children have network access


class DecodeProcess:
    def __init__(self, max_jobs: int = 100_000, max_rss_mb: float = 2048):
        self.max_jobs = max_jobs
        self.max_rss_mb = max_rss_mb
        self.proc: Optional[subprocess.Popen] = None
        self.jobs_done = 0
        self.restarts = 0
        self.net_isolated: Optional[bool] = None  # known once a child has started
        self.net_detail = ""

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
        try:
            hello = self._read_frame(time.monotonic() + _START_TIMEOUT)
            if "net_isolated" not in hello:
                raise pickle.UnpicklingError(f"keys {sorted(hello)[:5]}")
        except Exception as e:  # (anything but a hello: not a child to trust)
            # killed: a late hello would otherwise be read as the next job's result, and every
            # video after it would get the clips of the one before
            self.kill()
            hello = {"net_isolated": False, "detail": f"no hello from the decode child: {type(e).__name__}"}
        self.net_isolated, self.net_detail = bool(hello["net_isolated"]), hello.get("detail", "")

    def ensure_started(self) -> bool:
        """Start the child unless it runs (also before timing a decode); False: it never said hello."""
        global _warned_network
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self._start()
            if self.proc is None:  # it never said hello (killed in _start)
                return False
            if not self.net_isolated and not _warned_network:  # (into this Ray worker's log)
                _warned_network = True
                print(f"[decode] note: {network_note(self.net_detail)}", file=sys.stderr, flush=True)
        return True

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
                self.proc.stdout.close()
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
        deadline = time.monotonic() + timeout
        res = self._run_once(job, timeout)
        if res.get("reason") == decode.DECODER_KILLED:  # once more in a fresh child, in the time left
            again = self._run_once(job, max(1.0, deadline - time.monotonic()))
            if again.get("reason") == decode.DECODER_KILLED:
                again["detail"] += " (twice: the OOM killer, or an operator)"
            return again
        return res

    def _run_once(self, job: Dict, timeout: float) -> Dict:
        if self.proc is not None and self.jobs_done >= self.max_jobs:
            self.close()
        if not self.ensure_started():  # this job gets no decoder
            return {"ok": False, "reason": decode.DECODER_CRASH, "detail": self.net_detail}
        payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        deadline = time.monotonic() + timeout
        try:
            self.proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self.proc.stdin.flush()
            res = self._read_frame(deadline)
            if "ok" not in res:
                raise pickle.UnpicklingError(f"keys {sorted(res)[:5]}")
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
            if code == -signal.SIGKILL:
                return {"ok": False, "reason": decode.DECODER_KILLED,
                        "detail": "decoder process killed by SIGKILL"}
            return {"ok": False, "reason": decode.DECODER_CRASH,
                    "detail": f"decoder process died (exit {code}): {type(e).__name__}"}
        except Exception as e:  # not a decode result (a refused global, absurd sizes): the child is not ours to trust any more
            self.kill()
            return {"ok": False, "reason": "decoder_error",
                    "detail": f"the decoder process sent something that is not a decode result "
                              f"({type(e).__name__}: {e}); killed"}
        self.jobs_done += 1
        if self.rss_mb() > self.max_rss_mb:
            self.close()
        return res

    def _read_frame(self, deadline: float):
        """One result from the child (format: _decode_child.py). The out-of-band buffers are read
        into one block, so a video's clips arrive back to back in memory: binary_column then
        hands that block to Arrow as it is."""
        n, nbuf = struct.unpack("<QQ", self._read_exact(16, deadline))
        if n > _MAX_RESULT_BYTES or nbuf > 1 << 16:  # (one buffer per clip array: a few per video)
            raise ValueError(f"a result of {n} bytes in {nbuf} buffers")
        sizes = struct.unpack(f"<{nbuf}Q", self._read_exact(8 * nbuf, deadline)) if nbuf else ()
        if sum(sizes) > _MAX_RESULT_BYTES:
            raise ValueError(f"buffers of {sum(sizes)} bytes")
        data = self._read_exact(n, deadline)
        buffers = []
        if sizes:
            block, start = memoryview(self._read_exact(sum(sizes), deadline)), 0
            for size in sizes:
                buffers.append(block[start:start + size])
                start += size
        res = _ResultUnpickler(io.BytesIO(data), buffers=buffers).load()
        if not isinstance(res, dict):
            raise pickle.UnpicklingError(f"a {type(res).__name__}, not a mapping")
        return res

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
            # poll, not select: select refuses descriptors >= 1024, which a long-lived Ray worker
            # (its RLIMIT_NOFILE raised) can hand out
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            # (in ms, a C int: a time-out beyond ~24 days, or inf, waits in slices of that)
            if not poller.poll(min(2**31 - 1, max(1, int(min(left, 2e6) * 1000 + 0.999)))):
                raise TimeoutError
            k = os.readv(fd, [view[got:]])
            if not k:
                raise EOFError("child closed stdout")
            got += k
        return buf


def network_note(detail: str) -> str:
    return (f"decode children keep network access on this machine ({detail}); "
            "only local files with a known container are decoded")


def network_isolation() -> tuple:
    """``(isolated, why_not)`` for a decode child started on this machine (one child start)."""
    p = DecodeProcess()
    p._start()
    p.close()
    return bool(p.net_isolated), p.net_detail
