"""Decode child process: reads pickled jobs on stdin, writes pickled results on stdout.

Started by :class:`dvfl.data.worker.DecodeProcess` as ``python _decode_child.py`` (by file
path, not ``-m dvfl...``): importing the ``dvfl`` package would import torch (~2 s and
~300 MB per child) for nothing. Frames: 8-byte little-endian length + pickle.
"""
import os
import pickle
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent (the Ray worker) dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def main() -> None:
    _die_with_parent()
    import decode  # noqa: E402  (sibling module, imported top-level)

    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    # ffmpeg/decord print to fd 2; keep it (it goes to the worker log), but never to stdout.
    while True:
        hdr = inp.read(8)
        if len(hdr) < 8:
            return  # parent closed the pipe
        (n,) = struct.unpack("<Q", hdr)
        job = pickle.loads(inp.read(n))
        try:
            res = decode.decode_video(job)
        except Exception as e:  # a bug, not a bad file: report it as such
            res = {"ok": False, "reason": "decoder_error", "detail": decode._short(e)}
        data = pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(struct.pack("<Q", len(data)))
        out.write(data)
        out.flush()


if __name__ == "__main__":
    main()
