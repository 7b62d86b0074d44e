"""What reaches a user's terminal: Ray's known notices are dropped, everything else still shows.

Worker lines go through Ray's own log deduplicator (the one the driver prints them with); the
driver's own notices through Ray's loggers. The end-to-end run (test_teacher_and_distill.py)
checks a whole pipeline's output.
"""
from __future__ import annotations

import logging

import pytest

from dvfl.runtime import quiet_known_noise

NOISE = [
    "[2026-12-01 23:04:01,889 E 8216 8283] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'1d7565fe29c49d0f7875e27b01000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.",
    "[2026-12-01 23:04:01,889 E 5342 5342] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(ShardLogitWriter))' and ID: '778be62b9e4e78037f36b24001000000' has constructor arguments "
    "in the object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
    "the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
]
KEPT = [
    '[train] {"epoch": 1, "train_loss": 1.47}',
    "[2026-12-01 23:04:02,001 E 8216 8283] core_worker.cc:901: Failed to connect to the raylet: connection refused",
    # the same notice for an actor of ours would matter: only Ray's own actors are named above
    "[2026-12-01 23:04:02,002 E 8216 8283] core_worker.cc:2465: Actor with class name: 'Teacher' and ID: "
    "'1d7565fe29c49d0f7875e27b01000000' has constructor arguments in the object store and max_restarts > 0.",
    "Traceback (most recent call last):",
    "RuntimeError: Progress bars disabled. To enable, set `ray.data.DataContext` failed",
    "MemoryError: decoding clip 3 of train-00001.parquet",
    "Failed to query Ray Train Controller actor state: the controller died",
]


def test_worker_lines_known_noise_dropped_errors_kept():
    from ray._private import ray_logging

    quiet_known_noise()
    quiet_known_noise()  # idempotent: the pattern is not added twice
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        shown = [line for batch in dedup.deduplicate({"ip": "10.0.0.1", "pid": 4242, "job": "01", "is_err": True,
                                                      "lines": NOISE + KEPT, "actor_name": "x", "task_name": "y"})
                 for line in batch["lines"]]
        assert shown == KEPT
        assert dedup.skip_re.pattern.count("PreemptionWatcher") == 1


@pytest.mark.parametrize("logger, noise", [
    ("ray.data._internal.progress", NOISE[2]),
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."),
])
def test_driver_notices_dropped_other_records_kept(logger, noise, caplog):
    quiet_known_noise()
    log = logging.getLogger(logger)
    with caplog.at_level(logging.WARNING):
        log.warning(noise)
        log.warning("Cluster resources are not enough to run any task; the dataset may hang")
        log.error("token file /root/.ray/token is unreadable")
    assert [r.getMessage() for r in caplog.records] == [
        "Cluster resources are not enough to run any task; the dataset may hang",
        "token file /root/.ray/token is unreadable"]


def test_our_lines_from_concurrent_runs_are_never_folded():
    """Two runs' epoch lines differ only in digits; from two processes Ray would print the first
    and fold the second into "[repeated 2x across cluster]". Ray's own lines still fold."""
    from ray._private import ray_logging

    quiet_known_noise()
    ours = ["[trial 4a2e1_00001] epoch 3/12: loss 1.902, train top-1 41.0%, val top-1 38.9%, 2.8s + val 0.1s",
            "[dvfl+unlabeled s1] done in 41s: val top-1 56.7%"]
    theirs = "[2026-12-01 23:04:02,001 W 8216 8283] raylet_client.cc:120: retrying a lease request"
    dedup = ray_logging.stdout_deduplicator
    shown = []
    for pid, digit in ((5001, "1"), (5002, "2")):
        lines = [line.replace("00001", f"0000{digit}").replace("s1]", f"s{digit}]") for line in ours] + [theirs]
        for batch in dedup.deduplicate({"ip": "10.0.0.1", "pid": pid, "job": "01", "is_err": False, "lines": lines,
                                        "actor_name": "x", "task_name": "y"}):
            shown.extend(batch["lines"])
    assert [s for s in shown if s.startswith("[trial") or s.startswith("[dvfl")] == [
        ours[0], ours[1], ours[0].replace("00001", "00002"), ours[1].replace("s1]", "s2]")]
    assert shown.count(theirs) == 1  # Ray's line from the second process is folded, as before
    assert dedup.allow_re.pattern.count("[a-z]") == 1
    # torch's C++ warnings are not ours
    assert not dedup.allow_re.search("[W1204 12:00:00.000000000 init.cpp:51] Warning: ...")
