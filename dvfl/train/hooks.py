"""Test hooks of the training loop: a worker that dies once, ranks that pause mid-epoch.

Switched on by environment variables read where a command runs (:func:`dvfl.pipeline.fault_hooks`);
off by default. They act between training steps, by wrapping the epoch's batch iterator
(:meth:`TestHooks.between_steps`), so the step itself carries none of them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator


@dataclass(frozen=True)
class TestHooks:
    __test__ = False  # a dataclass named Test*, not a pytest test class

    fail_after_epoch: int | None = None  # the last rank dies once, mid-way through the epoch after this one
    fail_marker: str | None = None  # written when it has died: a restarted worker does not die again
    fail_run: str | None = None  # only in a run whose name holds this (a Tune test picks the trials that die)
    hold_after_epoch: int | None = None  # every rank pauses once, after the first step of the epoch after this one
    hold_dir: str | None = None  # where ranks announce they are held and look for their release
    hold_timeout_s: float = 600.0

    def between_steps(self, batches: Iterable, *, epoch: int, rank: int, world: int, run_name: str,
                      reported_at: Callable[[], float], node_id: Callable[[], str]) -> Iterator:
        """``batches``, with the hooks run after each step (when the next batch is asked for)."""
        if self.fail_after_epoch is None and self.hold_after_epoch is None:
            yield from batches
            return
        for i, batch in enumerate(batches):
            yield batch
            self._maybe_die(epoch, rank, world, reported_at(), run_name)
            if i == 0:
                self._maybe_hold(epoch, rank, run_name, node_id)

    def _maybe_die(self, epoch: int, rank: int, world: int, reported_at: float, run_name: str) -> None:
        """It waits a few seconds after the last report so that the controller has registered that
        epoch's checkpoint: the point is to show recovery from it, not the loss of an unacknowledged one."""
        if epoch != self.fail_after_epoch or rank != world - 1 or os.path.exists(self.fail_marker) \
                or (self.fail_run and self.fail_run not in run_name):
            return
        time.sleep(max(0.0, 3.0 - (time.time() - reported_at)))
        os.makedirs(os.path.dirname(self.fail_marker), exist_ok=True)  # (a Tune search's run folder may not exist)
        open(self.fail_marker, "w").close()
        os._exit(1)

    def _maybe_hold(self, epoch: int, rank: int, run_name: str, node_id: Callable[[], str]) -> None:
        """Wait until ``<hold_dir>/release`` (every run) or ``<hold_dir>/release-<run>`` (this run
        only) exists, after writing ``<hold_dir>/held-rank<r>.json`` (run, node id, pid): a test can
        kill the node that hosts a given rank while training is provably mid-epoch, or let some
        Tune trials go and keep another one provably unfinished. Workers restarted after
        ``release`` exists do not pause again."""
        if epoch != self.hold_after_epoch:
            return
        releases = [os.path.join(self.hold_dir, "release"), os.path.join(self.hold_dir, f"release-{run_name}")]
        if any(os.path.exists(r) for r in releases):
            return
        held = os.path.join(self.hold_dir, f"held-rank{rank}.json")
        with open(held + ".tmp", "w") as f:
            json.dump({"rank": rank, "epoch": epoch + 1, "pid": os.getpid(), "run": run_name,
                       "node_id": node_id()}, f)
        os.replace(held + ".tmp", held)
        deadline = time.time() + float(self.hold_timeout_s)
        while not any(os.path.exists(r) for r in releases) and time.time() < deadline:
            time.sleep(0.2)
