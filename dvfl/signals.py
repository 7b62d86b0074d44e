"""SIGTERM as Ctrl+C: one line and Ray shut down (no Ray import here: a command installs it first)."""
from __future__ import annotations

_sigterm_received = False


def sigterm_received() -> bool:
    """Whether :func:`terminate_in_one_line`'s handler has run in this process."""
    return _sigterm_received


def forget_sigterm() -> None:
    """A command's start: a SIGTERM an earlier command in this process received is not this one's
    (its Ctrl+C was reported as "terminated (SIGTERM)", exit 143)."""
    global _sigterm_received
    _sigterm_received = False


def note_sigterm() -> None:
    """A SIGTERM that another handler took (``ray.init``'s own, which exits with status 15) counted
    as ours: the command ends as :func:`terminate_in_one_line`'s handler ends it."""
    global _sigterm_received
    _sigterm_received = True


def terminate_in_one_line():
    """Before a command's work, and again after ``ray.init`` (which installs its own): SIGTERM (``ray
    job stop``, a pod's stop, ``kill``) unwinds the command as Ctrl+C does, so that Ray is shut down
    and locks released, and the command says so in one line (:func:`sigterm_received`). A KeyboardInterrupt because Ray's blocking calls (``ray.wait``,
    ``ray.get``) turn any other exception raised by a signal handler into ``SystemExit(1)``. Ray's
    core hands SIGTERM to Abseil's crash handler first, which printed a stack dump of every thread
    and armed a 3-second alarm that aborted (core dump) a shutdown taking longer. Main thread only;
    returns the handler it replaced (None elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        global _sigterm_received
        _sigterm_received = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, terminated)  # the handler it replaced
