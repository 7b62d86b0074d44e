"""Decode child process: reads pickled jobs on stdin, writes pickled results on stdout.

Started by :class:`dvfl.data.worker.DecodeProcess` as ``python _decode_child.py`` (by file
path, not ``-m dvfl...``): importing the ``dvfl`` package would import torch (~2 s and
~300 MB per child) for nothing. Jobs in: 8-byte little-endian length + pickle. Results out:
pickle protocol 5 with the large arrays (the clips) out of band: a header (pickle length, number
of buffers, each buffer's length; little-endian u64), the pickle, then the buffers' raw bytes,
so the parent reads the clips into one block and uses them without copying them again. The
first frame the child sends is a hello saying whether it runs without network access.
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


CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


def _no_network() -> str:
    """Move this process into a new, empty network namespace (no interface but a down loopback):
    FFmpeg here can then reach no host, whatever a file makes it open. Returns "" on success,
    else why not. Done before numpy/decord start threads (a user namespace needs one thread)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) == 0:
            return ""
        err = ctypes.get_errno()
        # unprivileged: a user namespace of our own grants the right to make a network namespace
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
            return ""
        return f"unshare(CLONE_NEWNET): {os.strerror(err)}; with CLONE_NEWUSER: {os.strerror(ctypes.get_errno())}"
    except Exception as e:  # not Linux, no libc
        return f"unshare unavailable: {type(e).__name__}: {e}"


OUT_OF_BAND_MIN = 1 << 16  # arrays this large cross as raw bytes after the pickle (the clips)


def _send(out, obj) -> None:
    bufs = []
    # the callback returns True (in band) for a small buffer, None (out of band) after keeping a large one
    data = pickle.dumps(obj, protocol=5, buffer_callback=lambda b: b.raw().nbytes < OUT_OF_BAND_MIN or bufs.append(b))
    raws = [b.raw() for b in bufs]
    out.write(struct.pack(f"<QQ{len(raws)}Q", len(data), len(raws), *(r.nbytes for r in raws)))
    out.write(data)
    for r in raws:
        out.write(r)
    out.flush()


def main() -> None:
    _die_with_parent()
    why_not = _no_network()
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    _send(out, {"net_isolated": not why_not, "detail": why_not})  # the hello frame
    import decode  # noqa: E402  (sibling module, imported top-level)

    # ffmpeg/decord print to fd 2, never to stdout (the frames' pipe); the parent points fd 2 at
    # /dev/null (FFmpeg's warnings on every bad upload would fill the terminal via Ray's log forwarding)
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
        _send(out, res)


if __name__ == "__main__":
    main()
