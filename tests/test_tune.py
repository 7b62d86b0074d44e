"""Ray Tune search over distillation runs (issue 6).

One search on the shared tiny dataset (``prepared`` in conftest.py: clips, a trained teacher and
its logit cache) with 3 trials, run the way a user would meet it: ``tuning/search.py`` is killed
(SIGKILL) after two trials and the experiment is resumed with ``Tuner.restore``. The search must
finish all 3 trials, ASHA must have stopped one early, every trial must have distilled from the
shared cache without ever running the teacher, and the best configuration must be a run config
``pipelines/distill.py`` takes. Config validation is checked without Ray.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import cli_in_process
from dvfl.config import ConfigError, dump_config, load_config
from dvfl.pipeline import FAIL_ENV, FAIL_RUN_ENV

REPO = Path(__file__).resolve().parents[1]
SPACE = {"kd.temperature": {"loguniform": [1.0, 20.0]}, "kd.alpha": {"uniform": [0.1, 0.9]},
         "student.embed_dim": {"choice": [8, 12]}}


def write_search(tmp: Path, prepared, name: str, *, space: dict, extra: dict | None = None, run_extra=()) -> Path:
    """A run config on the prepared clips/teacher/cache (shared, never rebuilt) and a search over it."""
    cfg = prepared["cfg"]
    run = load_config(None, [("output_dir", str(tmp / "out")), ("data.clips", cfg.clips_dir),
                             ("teacher.path", prepared["teacher"]), ("teacher.cache", cfg.cache_dir),
                             ("baseline", False)] + [(k, v) for k, v in _tiny() if not k.startswith("teacher.")]
                   # one Train worker per trial: every trial starts its own worker processes, and on
                   # 2 cores their start-up, not the tiny epochs, is most of a trial's time
                   + [("scaling.num_workers", 1), *run_extra])
    dump_config(run, tmp / "run.yaml")
    search = {"run_config": str(tmp / "run.yaml"), "experiment": name, "storage": str(tmp / "tune"),
              "num_samples": 1, "seed": 0, "max_concurrent_trials": 1, "driver_cpus": 0.25,
              "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2}, "space": space, **(extra or {})}
    (tmp / "search.yaml").write_text(yaml.safe_dump(search, sort_keys=False))
    return tmp / "search.yaml"


def _tiny():
    from conftest import TINY

    return TINY


def _mtimes(prepared) -> dict:
    cfg = prepared["cfg"]
    files = [*Path(cfg.cache_dir).rglob("*"), *Path(prepared["teacher"]).rglob("*")]
    return {str(p): p.stat().st_mtime_ns for p in files if p.is_file()}


# ----------------------------------------------------------------------------- one search, several checks
def _held_run(hold: Path) -> str | None:
    """The run the loop's test hook holds right now (its last ``held-rank0.json``)."""
    try:
        return json.loads((hold / "held-rank0.json").read_text())["run"]
    except (OSError, ValueError, KeyError):
        return None


def _experiment_state(exp: Path) -> dict:
    """Trial id -> status, from Tune's saved experiment state (what a restore starts from)."""
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    return {json.loads(t)["trial_id"]: json.loads(t)["status"] for t, _ in data.get("trial_data", [])}


def _trials_with_saved_results(exp: Path) -> int:
    """How many trials' results Tune has saved with its callbacks' state (the ASHA rungs a resume
    replays). Not a comparison of file times: Tune's syncer copies the experiment state and this
    file in either order, and with ``CheckpointConfig(num_to_keep)`` it snapshots in bursts."""
    import pickle

    saved = sorted(exp.glob("callback-states-*.pkl"))
    try:
        states = pickle.loads(saved[-1].read_bytes()) if saved else {}
    except (OSError, EOFError, pickle.UnpicklingError):
        return 0  # being written
    return max((len(s["results"]) for s in states.values() if isinstance(s, dict) and "results" in s), default=0)


@pytest.fixture(scope="module")
def search(prepared, tmp_path_factory, ray_local):
    """3 trials, up to 2 epochs each, ASHA forced to stop one: the learning rate is a grid in this
    order (3e-3, 1e-12, 1e-12), the validation split is the training split, batches are small, and
    ASHA judges val_loss after epoch 1. The first trial fits its training clips in 24 steps; the
    others cannot move from their initialisation (loss ~ln 4), so whatever the random draws of T,
    α and width, the second trial is below the first one's cutoff and is stopped.

    ``tuning/search.py`` runs it in a subprocess, killed once two trials are finished and saved
    (the forced stop among them); the same search is then resumed here, and the third trial, which
    cannot learn either, must be judged against the first two's results from before the break.
    """
    from dvfl.tune import load_tune_config, run_search

    tmp = tmp_path_factory.mktemp("tune")
    before = _mtimes(prepared)
    path = write_search(tmp, prepared, "forced-asha", space={**SPACE, "optim.lr": {"grid": [0.003, 1e-12, 1e-12]}},
                        extra={"metric": "val_loss", "mode": "min", "front_seeds": [1]},
                        run_extra=[("data.val_split", "train"), ("optim.batch_size", 4)])
    exp = tmp / "tune" / "forced-asha"
    # Every trial pauses after its first step (the loop's test hook) until the test releases it:
    # the first two trials are let go, the third is held, so it is provably unfinished when the
    # search is killed however fast the machine (Tune saves its state with a lag).
    hold = tmp / "hold"
    hold.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "DVFL_HOLD_AFTER_EPOCH": "0", "DVFL_HOLD_DIR": str(hold)}
    started = time.time()
    released: list[str] = []
    with open(tmp / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tuning" / "search.py"), "--search", str(path)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.time() < started + 600 and proc.poll() is None:
                held = _held_run(hold)
                if held and held not in released and len(released) < 2:
                    released.append(held)
                    (hold / f"release-{held}").touch()
                if len(released) == 2 and held and held not in released \
                        and list(_experiment_state(exp).values()).count("TERMINATED") >= 2 \
                        and _trials_with_saved_results(exp) >= 2:
                    break
                time.sleep(0.2)
            was_running = proc.poll() is None
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its trials die with it
            proc.wait()
    interrupted = _experiment_state(exp)
    from ray import tune

    can_restore = tune.Tuner.can_restore(str(exp))
    tune_cfg, run_cfg = load_tune_config(path)
    logs = []
    ctrl_c = signal.getsignal(signal.SIGINT)
    # and the first front re-run dies in its second epoch (a node lost under it): it must resume
    os.environ.update({FAIL_ENV: "1", FAIL_RUN_ENV: "-front-"})
    try:
        summary = run_search(tune_cfg, run_cfg, verbose=0, log=logs.append)
    finally:
        del os.environ[FAIL_ENV], os.environ[FAIL_RUN_ENV]
    return {"summary": summary, "exp": exp, "seconds": time.time() - started, "before": before,
            "ctrl_c_kept": signal.getsignal(signal.SIGINT) is ctrl_c,
            "interrupted": interrupted, "was_running": was_running, "can_restore": can_restore, "log": logs,
            "first_log": (tmp / "first.log").read_text(), "path": path}


@pytest.mark.slow
def test_search_with_three_trials_completes(search):
    s, exp = search["summary"], search["exp"]
    # Tune's fit() left its own Ctrl+C handler installed: the next presses were swallowed
    assert search["ctrl_c_kept"]
    rows = s["rows"]
    assert s["trials"] == len(rows) == 3 and s["errors"] == 0, [r["error"] for r in rows]
    for r in rows:
        # the best validation top-1 of the trial's own epochs, as Tune logged them in its progress.csv
        with open(Path(r["path"]) / "progress.csv") as f:
            logged = {int(float(e["epoch"])): float(e["val_top1"]) for e in csv.DictReader(f) if e.get("val_top1")}
        assert r["best_top1"] == max(logged.values()) == logged[r["best_epoch"]], (r, logged)
        assert r["final_top1"] == logged[max(logged)]  # the last epoch's: what distill.py would ship
        assert r["gmacs"] > 0 and r["params"] > 0 and r["width"] in (8, 12) and r["epochs_run"] >= 1
    # sorted by accuracy, the best config is the top row's, widths change GMACs
    assert [r["best_top1"] for r in rows] == sorted((r["best_top1"] for r in rows), reverse=True)
    by_width = {r["width"]: r["gmacs"] for r in rows}
    assert len(by_width) == 2 and all(by_width[a] < by_width[b] for a in by_width for b in by_width if a < b)
    md = (exp / "tune_results.md").read_text()
    assert md.split("The best trial of each cost")[0].count("\n| ") == 4 and "GMACs/clip" in md and "epochs run" in md
    assert json.loads((exp / "tune_results.json").read_text())["trials"] == 3
    assert (exp / "pareto.png").stat().st_size > 10_000
    assert any(r["pareto"] for r in rows)
    # Tune's TensorBoard event files, one per trial, under <storage>/<experiment>
    trial_dirs = {Path(r["path"]) for r in rows}
    assert all(list(d.glob("events.out.tfevents.*")) for d in trial_dirs) and len(trial_dirs) == 3


@pytest.mark.slow
def test_each_cost_levels_best_is_rerun_with_another_seed_and_the_front_is_their_means(search):
    """tune.front_seeds [1]: the best trial of each width once more with student seed 1, every
    epoch; the front is drawn from those re-runs and the best config is the level with the highest mean."""
    from dvfl.tune.report import usable

    s, exp = search["summary"], search["exp"]
    levels = {}
    for r in s["rows"]:  # best first
        if usable(r):
            levels.setdefault(r["width"], r)
    front = [r for r in s["rows"] if r["pareto"]]
    reruns = s["front_reruns"]
    assert front and len(reruns) == len(levels), (levels, reruns)
    assert sorted(r["front_of"] for r in reruns) == sorted(r["trial_id"] for r in levels.values())
    assert {r["trial_id"] for r in front} <= {r["trial_id"] for r in levels.values()}
    assert all(r["seed"] == 1 and r["status"] == "completed" and r["epochs_run"] == r["max_epochs"] for r in reruns)
    for r in levels.values():
        rerun = next(x for x in reruns if x["front_of"] == r["trial_id"])
        # the search's own run (chosen, so biased upward) stays out of the front's figures
        assert r["top1_by_seed"] == {"1": rerun["best_top1"]}
        assert r["top1_min"] == r["top1_mean"] == r["top1_max"] == rerun["best_top1"]
        assert (r["temperature"], r["width"], r["lr"]) == (rerun["temperature"], rerun["width"], rerun["lr"])
        # the re-run trained with seed 1 (the trial driver's record), in the front's own experiment
        record = json.loads((exp.parent / "forced-asha-front" / "dvfl_trials" / f"{rerun['trial_id']}.json").read_text())
        assert record["seed"] == 1 and record["front_of"] == r["trial_id"]
    assert s["best"]["trial_id"] in {r["trial_id"] for r in front}
    assert s["best"]["top1_mean"] == max(r["top1_mean"] for r in levels.values())
    assert "re-run with fresh student seed(s) [1]" in (exp / "tune_results.md").read_text()
    # TensorBoard's curves of both experiments: the search's trials and the front's re-runs
    hint = f"tensorboard --logdir_spec search:{exp},front:{exp.parent / 'forced-asha-front'}"
    assert any(line.endswith(hint) for line in search["log"]), search["log"][-3:]


@pytest.mark.slow
def test_a_trial_whose_process_dies_resumes_from_its_checkpoint_and_finishes(search):
    """A preempted node or the OOM killer takes a trial's process (the loop's hook: the first front
    re-run dies in its second epoch, after its first epoch's checkpoint): Tune starts it again from
    that checkpoint (the run config's max_failures) instead of leaving it errored, which kept its
    width out of the front and, on a rerun of the finished search, was never retried."""
    exp = search["exp"]
    assert (exp.parent.parent / "out" / ".fail-injected").exists()  # a trial did die
    reruns = search["summary"]["front_reruns"]
    starts = {r["trial_id"]: len(json.loads((exp.parent / "forced-asha-front" / "dvfl_trials" /
                                             f"{r['trial_id']}.json").read_text())["starts"]) for r in reruns}
    assert sorted(starts.values()) == [1] * (len(reruns) - 1) + [2], starts
    died = next(r for r in reruns if starts[r["trial_id"]] == 2)
    with open(Path(died["path"]) / "progress.csv") as f:
        epochs = [int(float(e["epoch"])) for e in csv.DictReader(f)]
    assert epochs == [1, 2], epochs  # epoch 1 once: resumed from its checkpoint, not started over
    assert died["status"] == "completed" and died["epochs_run"] == died["max_epochs"] == 2, died
    rows = search["summary"]["rows"] + reruns
    assert not [r for r in rows if r["status"] == "error"], rows


@pytest.mark.slow
def test_front_reruns_of_a_different_search_are_not_resumed(search):
    """A front experiment whose recorded search differs is refused, not restored into this one."""
    from dvfl.tune import load_tune_config, run_search

    front_file = search["exp"].parent / "forced-asha-front" / "dvfl_search.json"
    kept = front_file.read_text()
    lines = []
    try:
        other = json.loads(kept)
        other["search"]["tune"]["seed"] += 1  # (the digest alone is not compared: a recorded search may predate fields)
        front_file.write_text(json.dumps({**other, "digest": "another search"}))
        tune_cfg, run_cfg = load_tune_config(search["path"])
        with pytest.raises(ConfigError, match=r"forced-asha-front holds the front re-runs of a different search"):
            run_search(tune_cfg, run_cfg, verbose=0, log=lines.append)
        # refused before the search resumed: a refusal after it would throw the trials' results away
        assert not any("resuming" in line for line in lines), lines
    finally:
        front_file.write_text(kept)


@pytest.mark.slow
def test_a_changed_search_is_refused_naming_what_changed(search):
    """Resuming the experiment with another seed is refused before any trial, naming the field."""
    from dvfl.tune import load_tune_config, run_search

    tune_cfg, run_cfg = load_tune_config(search["path"])
    tune_cfg.seed = 7
    lines = []
    with pytest.raises(ConfigError, match=r"forced-asha holds a different search: tune\.seed: 0 -> 7; "):
        run_search(tune_cfg, run_cfg, verbose=0, log=lines.append)
    # before the shared stages: another data setting rebuilt the clips and the cache, then was refused
    assert lines == [], lines


@pytest.mark.slow
def test_asha_stops_a_trial_early(search):
    s = search["summary"]
    stopped = [r for r in s["rows"] if r["status"] == "stopped early"]
    assert stopped, [(r["lr"], r["epochs_run"]) for r in s["rows"]]
    assert all(r["epochs_run"] < r["max_epochs"] for r in stopped)
    assert all(r["lr"] == 1e-12 for r in stopped)  # a trial that cannot learn, never the good one
    assert s["trial_epochs_saved_by_asha"] >= 1
    assert s["trial_epochs_run"] < s["trial_epochs_if_all_ran_to_the_end"]


@pytest.mark.slow
def test_a_resumed_search_judges_its_last_trial_against_the_trials_before_the_break(search):
    """Tune restores ASHA with empty rungs: the third trial, resumed alone, used to meet no cutoff
    and run every epoch although it learns nothing."""
    resumed = [t for t, s in search["interrupted"].items() if s != "TERMINATED"]
    rows = {r["trial_id"]: r for r in search["summary"]["rows"]}
    assert len(resumed) == 1 and rows[resumed[0]]["lr"] == 1e-12, (resumed, rows)
    assert rows[resumed[0]]["status"] == "stopped early", rows[resumed[0]]
    assert rows[resumed[0]]["epochs_run"] == 1


@pytest.mark.slow
def test_trials_share_one_cache_and_never_run_the_teacher(search, prepared):
    rows = search["summary"]["rows"]
    # every trial's loop got the cache (no teacher weights shipped) and counted 0 teacher forwards
    assert [r["teacher_mode"] for r in rows] == ["cached"] * 3
    assert [r["teacher_forward_calls"] for r in rows] == [0] * 3
    for r in rows:
        record = json.loads((search["exp"] / "dvfl_trials" / f"{r['trial_id']}.json").read_text())
        assert record["teacher_mode"] == "cached" and record["teacher_model_shipped"] is False
    # the search used the prepared cache and teacher as they were: nothing rebuilt or retrained
    assert _mtimes(prepared) == search["before"]
    used = json.loads((search["exp"] / "dvfl_search.json").read_text())["search"]["teacher"]
    assert used == {"mode": "cached", "fingerprint": prepared["cache"]["fingerprint"]}


@pytest.mark.slow
def test_one_worker_trials_train_in_the_trial_process(search):
    """No worker group per trial: each one-worker trial trained inside its Tune trial actor, and
    the two trials of the first (interrupted) run shared one process (torch imported once)."""
    records = {r["trial_id"]: json.loads((search["exp"] / "dvfl_trials" / f"{r['trial_id']}.json").read_text())
               for r in search["summary"]["rows"]}
    assert all(rec["in_process"] and rec["train_run"] is None for rec in records.values()), records
    done = [t for t, s in search["interrupted"].items() if s == "TERMINATED"]
    assert len(done) == 2 and records[done[0]]["pid"] == records[done[1]]["pid"], records
    assert not (search["exp"] / "train_runs").exists()  # no Ray Train run was started


@pytest.mark.slow
def test_two_trials_side_by_side_killed_mid_run_resume_from_their_last_kept_checkpoints(prepared, tmp_path, ray_local):
    """max_concurrent_trials 2 (the embedded search's): two trial actors train at the same time,
    each in its own process. Trials keep their last two checkpoints (Tune's default kept every
    epoch's: ~270 MB each for nano). A search SIGKILLed while both trials are in epoch 3 of 4
    resumes each from epoch 2's checkpoint: Tune's results say epochs 1..4 once each (a restart
    from scratch repeats 1 and 2), side by side again, and two checkpoints are left."""
    from dvfl.tune import load_tune_config, run_search

    path = write_search(tmp_path, prepared, "pair", space={"kd.temperature": {"grid": [2.0, 4.0]}},
                        extra={"max_concurrent_trials": 2, "front_seeds": [], "asha": {"enabled": False}},
                        # 2 x (0.25 + 0.5) + 1 for Ray Data fits the session's 3 logical CPUs
                        run_extra=[("scaling.cpus_per_worker", 0.5), ("scaling.concurrent_runs", 0),
                                   ("optim.epochs", 4), ("optim.batch_size", 4)])
    exp, hold = tmp_path / "tune" / "pair", tmp_path / "hold"
    hold.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "DVFL_HOLD_AFTER_EPOCH": "2", "DVFL_HOLD_DIR": str(hold)}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tuning" / "search.py"), "--search", str(path)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:  # both held in epoch 3 (neither can finish), and Tune's saved state knows both epoch-2 checkpoints
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None \
                    and not (_held_run(hold) and list(_saved_epochs(exp).values()) == [2, 2]):
                time.sleep(0.2)
            assert proc.poll() is None and _held_run(hold), (tmp_path / "first.log").read_text()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (hold / "release").touch()
    tune_cfg, run_cfg = load_tune_config(path)
    summary = run_search(tune_cfg, run_cfg, verbose=0, log=lambda *_: None)
    rows = summary["rows"]
    assert summary["trials"] == 2 and summary["errors"] == 0, [r["error"] for r in rows]
    records = [json.loads((exp / "dvfl_trials" / f"{r['trial_id']}.json").read_text()) for r in rows]
    assert records[0]["pid"] != records[1]["pid"]  # two actors (one at a time reuses one: see above)
    spans = []
    for r, rec in zip(rows, records):
        assert r["status"] == "completed" and r["starts"] == 2, r
        with open(Path(r["path"]) / "progress.csv") as f:
            progress = list(csv.DictReader(f))
        assert [int(e["epoch"]) for e in progress] == [1, 2, 3, 4]
        spans.append((rec["starts"][-1], max(float(e["timestamp"]) for e in progress)))
        assert sorted(p.name for p in Path(r["path"]).glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000003"]
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # each resumed before the other's last epoch was reported


def _saved_epochs(exp: Path) -> dict:
    """Trial id -> the last epoch in Tune's saved experiment state (what a restore resumes from)."""
    states = sorted(exp.glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text()) if states else {}
    except (json.JSONDecodeError, OSError):
        return {}
    return {json.loads(t)["trial_id"]: json.loads(m)["last_result"].get("epoch") for t, m in data.get("trial_data", [])}


def test_a_top5_search_on_five_classes_or_fewer_is_refused_before_the_teacher(prepared, ray_local, tmp_path):
    """Five guesses cover every class of 5 or fewer: every trial's val_top5 is 100 %, and ASHA stopped
    trials at random. Refused once the clips say how many classes (4 here), before the teacher."""
    from conftest import tiny_config
    from dvfl.config import ConfigError
    from dvfl.tune.search import prepare

    # the clips given, as they are (the fixture's own config would re-ingest them in its shard layout)
    cfg = tiny_config(tmp_path, [("data.clips", prepared["cfg"].clips_dir)])
    before = {str(p): p.stat().st_mtime_ns for p in Path(cfg.data.clips).rglob("*")}
    with pytest.raises(ConfigError, match=r"tune\.metric val_top5 on 4 classes: every trial scores 100 % top-5"):
        prepare(cfg, log=lambda *_: None, metric="val_top5")
    assert {str(p): p.stat().st_mtime_ns for p in Path(cfg.data.clips).rglob("*")} == before


def test_teacher_proof_can_fail(prepared, ray_local):
    """The check above is not vacuous: the loop counts teacher forwards when a teacher runs."""
    from dvfl import pipeline

    cfg = load_config(None, [("output_dir", prepared["cfg"].output_dir), *_tiny(), ("teacher.mode", "online")])
    signal_ = pipeline.teacher_signal(cfg, prepared["teacher"], prepared["spec"], prepared["info"], kd=True)
    assert signal_["mode"] == "online" and "state_ref" in signal_
    from dvfl.train.loop import TeacherSignal
    from dvfl.train.loop_config import TeacherFeed
    from dvfl.train.session import fetch
    import torch

    teacher = TeacherSignal(TeacherFeed.from_signal(signal_), torch.device("cpu"), fetch)
    teacher.logits(["x"], [None], torch.zeros(1, 8, 3, 32, 32))
    assert teacher.forward_calls == 1


@pytest.mark.slow
def test_the_terminal_shows_the_projects_lines_not_tunes_tables(search):
    """`python tuning/search.py` as typed: the stages and each trial's epochs, one line each; Ray
    Tune's status tables (536 of the embedded search's 1,175 lines) only with --tables."""
    log = search["first_log"]
    assert "[tune] forced-asha:" in log and re.search(r"^\[trial \w+\] epoch 1/\d+: loss", log, re.M), log[-3000:]
    assert "Trial status" not in log and "\u256d" not in log and "Configuration for experiment" not in log, log[-3000:]


@pytest.mark.slow
def test_interrupted_experiment_restores(search):
    """Killed after two trials, resumed: the finished trials are kept (not rerun), the third completes."""
    assert search["was_running"], "the search finished before it could be interrupted: " + search["first_log"][-3000:]
    interrupted, exp = search["interrupted"], search["exp"]
    done = {t for t, s in interrupted.items() if s == "TERMINATED"}
    assert len(done) == 2 and search["can_restore"]
    assert any("resuming the interrupted experiment" in line for line in search["log"])
    final = _experiment_state(exp)
    assert set(final) == set(interrupted) and set(final.values()) == {"TERMINATED"}
    rows = search["summary"]["rows"]
    assert {r["trial_id"] for r in rows} == set(final)
    for r in rows:  # a trial finished before the interruption ran once; its epochs were not redone
        if r["trial_id"] in done:
            assert r["starts"] == 1


@pytest.mark.slow
def test_best_config_runs_with_distill(search, ray_local):
    """The best configuration of a search is a run config distill.py takes."""
    exp = search["exp"]
    best = json.loads((exp / "tune_results.json").read_text())["best"]
    best_file = exp / "best_config.yaml"
    cfg = load_config(best_file)  # accepted and validated unchanged
    assert cfg.kd.temperature == pytest.approx(best["temperature"]) and cfg.kd.alpha == pytest.approx(best["alpha"])
    assert cfg.optim.lr == pytest.approx(best["lr"]) and cfg.student.embed_dim == best["width"]
    # `dvfl distill` (pipelines/distill.py), in this process (it joins the session's Ray instance)
    from dvfl.cli import main as dvfl_main

    # the changes: this search validated on the training clips (to force ASHA), so the run
    # validates on the held-out training videos (never the test split), where the tiny teacher is
    # near chance (the teacher gate would refuse it, rightly); its one-worker run in a runner actor
    # (a Ray Train worker group costs ~20 s more to start, and is not this test's subject)
    assert dvfl_main(["distill", "--config", str(best_file), "--set", "data.val_split=val",
                      "--set", "teacher.min_top1_over_chance=-1", "--set", "scaling.num_workers=1",
                      "--set", "scaling.cpus_per_worker=1", "--set", "scaling.concurrent_runs=1"]) == 0
    report = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    assert set(report["models"]) == {"teacher", "dvfl"}
    assert report["config"]["kd"]["temperature"] == pytest.approx(best["temperature"])


# ----------------------------------------------------------------------------- validation (no Ray)
@pytest.mark.parametrize("override, message", [
    (("tune.space.kd.temperature", {"loguniform": [0, 20]}), r"tune\.space\.kd\.temperature\.loguniform needs low > 0"),
    (("tune.space.kd.alpha", {"uniform": [0.1, 1.5]}), r"tune\.space\.kd\.alpha: kd\.alpha must be in \[0, 1\]"),
    (("tune.space.data.frames", {"choice": [4, 8]}), r"tune\.space\.data\.frames cannot be searched"),
    (("tune.space.optim.epochs", {"choice": [1, 2]}), r"tune\.space\.optim\.epochs cannot be searched: ASHA"),
    (("tune.space.student.embed_dim", {"choice": [12, "wide"]}), r"tune\.space\.student\.embed_dim: student\.embed_dim must be int"),
    (("tune.space.kd.unlabeled_weight", {"choice": [0.5, 1.0]}), r"tune\.space\.kd\.unlabeled_weight: .*tune\.unlabeled"),
    (("tune.unlabeled", "yes"), r"tune\.unlabeled must be true or false"),
    (("tune.in_process", 1), r"tune\.in_process must be true or false"),
    (("tune.space.kd.alpha", {"gauss": [0.5, 0.1]}), r"tune\.space\.kd\.alpha has unknown domain 'gauss'"),
    (("tune.metric", "accuracy"), r"tune\.metric must be one of"),
    (("tune.mode", "min"), r"tune\.mode must be max for val_top1"),
    (("tune.asha.grace_period", 99), r"tune\.asha\.grace_period \(99\) must not exceed optim\.epochs"),
    (("tune.num_samples", 0), r"tune\.num_samples must be >= 1"),
    (("tune.max_concurent_trials", 2), r"tune\.max_concurent_trials is not a known field"),
    (("kd.temperature", -1), r"kd\.temperature must be > 0"),
    (("tune.front_seeds", [0, 1]), r"tune\.front_seeds: 0 is the seed the search's own trials ran with"),
    (("tune.front_seeds", [1, 1]), r"tune\.front_seeds must be a list of distinct integer student seeds"),
    # numpy refuses a negative seed: every re-run failed, after the whole search
    (("tune.front_seeds", [-1, 2]), r"tune\.front_seeds must be seeds >= 0, got \[-1, 2\]"),
    # Tune would draw 7.3 for a width and every trial would fail after the clips, teacher and cache
    (("tune.space.student.embed_dim", {"uniform": [4, 16]}),
     r"tune\.space\.student\.embed_dim: uniform draws fractional values and student\.embed_dim takes whole numbers"),
    (("tune.space.optim.batch_size", {"loguniform": [4, 32]}), r"tune\.space\.optim\.batch_size: loguniform draws"),
    (("tune.experiment", "runs/x"), r"tune\.experiment must be a plain name, got 'runs/x'"),
    # <experiment>-front holds a search's front re-runs: another search's --fresh deleted this one
    (("tune.experiment", "embedded-tune-front"), r"tune\.experiment must not end in -front"),
])
def test_bad_search_configs_are_rejected_naming_the_field(override, message):
    from dvfl.tune import load_tune_config

    with pytest.raises(ConfigError, match=message):
        load_tune_config(None, [override])


def test_searched_widths_a_start_checkpoint_does_not_fit_are_refused_before_any_work(tmp_path):
    """A width-16 student.checkpoint with the default space (widths 4, 8, 16): it passed every check,
    then the width-4 and width-8 trials failed one by one after the clips and the cache were made,
    and the search exited 0 with a 'front' of one width."""
    import torch

    from dvfl.models import build_model
    from dvfl.pipeline import model_kwargs
    from dvfl.tune import load_tune_config
    from dvfl.tune.search_config import check_start_weights_fit_space

    _, base = load_tune_config(None)
    ckpt = tmp_path / "student16.pt"
    torch.save(build_model(base.student.model, **model_kwargs(base.student, 8, base)).state_dict(), ckpt)
    search, cfg = load_tune_config(None, [("student.checkpoint", str(ckpt))])
    with pytest.raises(ConfigError, match=r"^tune\.space\.student\.embed_dim 4: the student's start weights do not "
                                          r"fit it \(student\.checkpoint: .*differ in shape"):
        check_start_weights_fit_space(search, cfg)
    check_start_weights_fit_space(*load_tune_config(None, [("student.checkpoint", str(ckpt)),
                                                           ("tune.space.student.embed_dim", {"choice": [16]})]))


def test_searched_widths_2d_start_weights_do_not_fit_are_refused_before_any_work(tmp_path):
    """student.init_2d of a width-16 2D FocalNet with the default widths 4, 8, 16: the widths it was
    not made for took one tensor each and trained from scratch beside initialised width-16 trials
    (session 41's review); weights that fit no width failed every trial after the clips and cache."""
    import torch
    from timm.models.focalnet import FocalNet

    from dvfl.pipeline import check_start_weights
    from dvfl.tune import load_tune_config
    from dvfl.tune.search_config import check_start_weights_fit_space

    image16 = tmp_path / "focalnet16.pt"
    torch.save(FocalNet(embed_dim=16, depths=(1, 1, 2, 1), num_classes=8).state_dict(), image16)
    search, cfg = load_tune_config(None, [("student.init_2d", str(image16))])
    with pytest.raises(ConfigError, match=r"^tune\.space\.student\.embed_dim 4: student\.init_2d .* fits it only in "
                                          r"part \(1 of its \d+ tensors, \d+% at another value\)"):
        check_start_weights_fit_space(search, cfg)
    check_start_weights_fit_space(*load_tune_config(None, [("student.init_2d", str(image16)),
                                                           ("tune.space.student.embed_dim", {"choice": [16]})]))
    # a shallower variant takes fewer tensors, all of them fitting: judged by its own share, not refused
    tiny16 = tmp_path / "focalnet_tiny16.pt"
    torch.save(FocalNet(embed_dim=16, depths=(2, 2, 6, 2), num_classes=8).state_dict(), tiny16)
    check_start_weights_fit_space(*load_tune_config(None, [
        ("student.init_2d", str(tiny16)), ("student.depths", None), ("tune.space.student.embed_dim", {"choice": [16]}),
        ("tune.space.student.model", {"choice": ["videofocalnet_nano", "videofocalnet_tiny"]})]))
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.proj.weight": torch.zeros(3, 3)}, unrelated)
    _, single = load_tune_config(None, [("student.init_2d", str(unrelated))])
    with pytest.raises(ConfigError, match=r"^student\.init_2d .*unrelated\.pt: no tensor of it fits videofocalnet_nano"):
        check_start_weights(single)


def test_search_values_that_cannot_go_together_are_refused_before_any_trial():
    """sgd and momentum 0 are each valid alone: the trials drawing both failed after the clips,
    teacher and cache were made. A momentum no trial's optimizer uses searched nothing."""
    from dvfl.tune import load_tune_config

    both = [("tune.space.optim.optimizer", {"choice": ["adamw", "sgd"]}),
            ("tune.space.optim.momentum", {"choice": [0.0, 0.9]})]
    with pytest.raises(ConfigError, match=r"^tune\.space: optim\.optimizer 'sgd' with optim\.momentum 0\.0 is not a "
                                          r"valid run \(optim\.momentum must be in \(0, 1\)"):
        load_tune_config(None, both)
    load_tune_config(None, [both[0], ("tune.space.optim.momentum", {"uniform": [0.5, 0.95]})])  # fine together
    with pytest.raises(ConfigError, match=r"^tune\.space\.optim\.momentum has no effect: it is SGD's"):
        load_tune_config(None, [("optim.optimizer", "adamw"), ("tune.space.optim.momentum", {"choice": [0.8, 0.9]})])


def test_an_interrupted_search_chooses_nothing_and_says_how_to_resume():
    """Ctrl+C (or a job's stop signal) makes Tune's fit() return the grid as it stands; its cut-off
    trials looked stopped early, and the search wrote a best config and exited 0."""
    from ray.tune import Result

    from dvfl.tune.report import SearchFailed, require_finished

    # Tune's own Result objects, as Ray 2.60 hands them back: a trial that returned or that ASHA or
    # the stopper stopped has a last result with done=True; the ones an interrupt cut off were
    # marked TERMINATED too (runner.cleanup() after the loop), their last result without done; an
    # errored one has its error (the status count missed the cut-off ones: session 28)
    def result(**kw):
        return Result(metrics=kw.pop("metrics", {}), checkpoint=None, error=kw.pop("error", None), path="/x")

    # A trial that returned after its last epoch may lack done: Tune sets it in place on a last
    # result an experiment snapshot (forced by CheckpointConfig(num_to_keep)) had already saved,
    # and a restore reads that copy (the resumed search was refused as unfinished for ever)
    ended = [result(metrics={"epoch": 12, "done": True}), result(metrics={"epoch": 6, "done": True}),
             result(error=RuntimeError("boom")), result(metrics={"epoch": 12})]
    require_finished(ended, "search", 12)
    cut = ended + [result(metrics={"epoch": 3, "done": False}), result(metrics={})]  # (the last one never started)
    with pytest.raises(SearchFailed, match=r"search was interrupted with 2 of 6 trial\(s\) unfinished.*same command"):
        require_finished(cut, "search", 12)
    # cut off before Tune created them all (an empty grid at its start): every one it made had ended
    require_finished(ended, "search", 12, expected=4)
    for grid in (ended, []):
        with pytest.raises(SearchFailed, match=rf"interrupted after {len(grid)} of its 6 trial\(s\) had started"):
            require_finished(grid, "search", 12, expected=6)
    # started with --fresh: the same command again would delete the search it resumes
    with pytest.raises(SearchFailed, match=r"run the same command again without --fresh to resume it$"):
        require_finished(cut, "search", 12, fresh=True)


def test_fresh_checks_the_search_and_its_front_before_deleting_either(tmp_path, ray_local):
    """A front folder that is not a search's (a folder of the user's, an older version's) was refused
    only after --fresh had deleted the main experiment."""
    from dvfl.tune import load_tune_config, run_search

    t, cfg = load_tune_config(None, [("tune.storage", str(tmp_path)), ("output_dir", str(tmp_path / "run")),
                                     ("tune.max_concurrent_trials", 1)])
    exp, front = tmp_path / t.experiment, tmp_path / f"{t.experiment}-front"
    exp.mkdir()
    (exp / "dvfl_search.json").write_text("{}")
    front.mkdir()
    (front / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"--fresh: {re.escape(str(front))} is not a Tune experiment of this project"):
        run_search(t, cfg, fresh=True, log=lambda *_: None)
    assert (exp / "dvfl_search.json").exists() and (front / "notes.txt").exists()


def test_a_grace_period_of_every_epoch_is_said_to_stop_nothing():
    from dvfl.tune import load_tune_config
    from dvfl.tune.search_config import asha_words

    t, cfg = load_tune_config(None, ["optim.epochs=12"])  # the shipped grace period is 12
    assert asha_words(t, cfg) == "on val_top1 (grace period 12 = every epoch: it stops no trial)"
    assert asha_words(*load_tune_config(None)) == "on val_top1"
    # another metric steers ASHA only: the line says what chooses (a user read it as the objective)
    loss = load_tune_config(None, [("tune.metric", "val_loss"), ("tune.mode", "min")])
    assert asha_words(*loss) == "on val_loss (it stops trials; the best config and the front by val_top1)"


def test_a_search_recorded_before_a_config_field_existed_is_the_same_search(tmp_path):
    """A search an earlier version started records no field added since (``data.decode_tasks``): that
    counted as a change, whose advice ("put the old values back") could not be followed, so resuming
    or re-reporting it took --fresh, throwing its trials away. An added field at its default is not a
    change; at another value it is."""
    import dvfl.tune.search as S
    from dvfl.tune import load_tune_config

    t, cfg = load_tune_config(None, [("tune.storage", str(tmp_path))])
    exp = Path(S.experiment_dir(t, cfg))
    exp.mkdir(parents=True)
    older = json.loads(json.dumps(S._settings(t, cfg), default=str))
    del older["run_config"]["data"]["decode_tasks"]
    (exp / S.SEARCH_FILE).write_text(json.dumps({"digest": "an older version's", "search": older}))
    S.refuse_changed_settings(t, cfg)  # not refused
    fp = {"digest": "today's", "search": json.loads(json.dumps(S._settings(t, cfg), default=str))}
    assert S.same_search(json.loads((exp / S.SEARCH_FILE).read_text()), fp)
    t2, cfg2 = load_tune_config(None, [("tune.storage", str(tmp_path)), ("data.decode_tasks", 4)])
    with pytest.raises(ConfigError, match=r"holds a different search: run_config.data.decode_tasks: 0 -> 4"):
        S.refuse_changed_settings(t2, cfg2)


def test_a_search_on_its_own_clips_of_an_earlier_decoder_is_refused_before_any_work(tmp_path):
    """Clips an earlier decoder made are ingested again by a run on its own clips folder: a search on
    them could not resume, and was refused only after the ingest, the teacher and the cache were
    rebuilt, saying its videos had changed."""
    import dvfl.tune.search as S
    from dvfl.tune import load_tune_config

    t, cfg = load_tune_config(None, [("tune.storage", str(tmp_path / "tune")), ("output_dir", str(tmp_path / "run"))])
    exp = Path(S.experiment_dir(t, cfg))
    exp.mkdir(parents=True)
    recorded = {**json.loads(json.dumps(S._settings(t, cfg), default=str)), "dataset": "the old clips"}
    (exp / S.SEARCH_FILE).write_text(json.dumps({"digest": "old", "search": recorded}))
    Path(cfg.clips_dir).mkdir(parents=True)
    (Path(cfg.clips_dir) / "dataset.json").write_text(json.dumps({"fingerprint": "the old clips",
                                                                   "params": {"frames": 8}}))
    with pytest.raises(ConfigError, match=r"holds a search on clips an earlier decoder made .* --fresh starts it over"):
        S.refuse_changed_settings(t, cfg)
    from dvfl.data.decode import DECODE_RULES

    (Path(cfg.clips_dir) / "dataset.json").write_text(json.dumps({"fingerprint": "the old clips",
                                                                   "params": {"decode_rules": DECODE_RULES}}))
    S.refuse_changed_settings(t, cfg)  # today's decoder: resumed as before
    # a Kinetics run's own clips are used as they are (a run never ingests Kinetics itself): not refused
    cfg.data.dataset = "kinetics"
    (Path(cfg.clips_dir) / "dataset.json").write_text(json.dumps({"fingerprint": "the old clips",
                                                                   "params": {"frames": 8}}))
    S.refuse_clips_of_an_earlier_decoder(str(exp), cfg, recorded)


def test_a_run_config_under_home_is_found(tmp_path, monkeypatch):
    """``run_config: ~/runs/mine.yaml`` (in the search file, or after ``--set``: no shell expands it
    there) was looked up as ``configs/~/runs/mine.yaml``."""
    from dvfl.tune import load_tune_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "runs").mkdir()
    dump_config(load_config(None, [("name", "mine")]), tmp_path / "runs" / "mine.yaml")
    tune_cfg, run_cfg = load_tune_config(None, [("tune.run_config", "~/runs/mine.yaml")])
    assert tune_cfg.run_config == str(tmp_path / "runs" / "mine.yaml") and run_cfg.name == "mine"


def test_a_relative_run_config_is_found_where_the_user_is(tmp_path, monkeypatch):
    # `--set tune.run_config=configs/embedded.yaml` from the repository root looked for configs/configs/...
    from dvfl.tune import load_tune_config

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run.yaml").write_text((REPO / "configs" / "embedded.yaml").read_text()
                                                .replace("name: embedded", "name: mine"))
    monkeypatch.chdir(tmp_path)
    t, cfg = load_tune_config(None, ["tune.run_config=mine/run.yaml"], check_paths=False)
    assert t.run_config == str(tmp_path / "mine" / "run.yaml") and cfg.name == "mine"
    monkeypatch.chdir(REPO)
    t, _ = load_tune_config(None, ["tune.run_config=configs/embedded.yaml"], check_paths=False)
    assert t.run_config == str(REPO / "configs" / "embedded.yaml")


def test_shipped_search_configs_are_valid():
    from dvfl.tune import load_tune_config

    t, cfg = load_tune_config(None)  # the embedded default: small widths, every one of them tried
    assert set(t.space) >= {"kd.temperature", "kd.alpha", "optim.lr", "student.embed_dim"}
    assert t.space["student.embed_dim"] == {"grid": [4, 8, 16]} and cfg.optim.epochs == 24
    assert t.max_concurrent_trials == 2 and t.driver_cpus == 0.25 and t.asha.enabled and t.front_seeds == [1, 2, 3]
    # with ASHA off its grace period is not a bound on the epochs
    t, cfg = load_tune_config(None, ["tune.asha.enabled=false", "optim.epochs=6"])
    assert not t.asha.enabled and cfg.optim.epochs == 6 < t.asha.grace_period
    t, cfg = load_tune_config(REPO / "configs" / "tune_ucf101.yaml", check_paths=False)
    assert t.space["student.embed_dim"] == {"choice": [48, 64, 96]}
    assert cfg.student.model == "videofocalnet_nano" and cfg.teacher.mode == "cached"
    # judged after the learning-rate warm-up (not on its last step), and a front of full-length re-runs
    assert t.asha.grace_period > cfg.optim.warmup_frac * cfg.optim.epochs and len(t.front_seeds) >= 2


def test_resources_that_cannot_fit_are_refused_before_any_trial(monkeypatch):
    from dvfl.tune import check_resources, load_tune_config, required_resources

    t, cfg = load_tune_config(None, [("tune.max_concurrent_trials", 2), ("scaling.num_workers", 2),
                                     ("scaling.cpus_per_worker", 0.5), ("scaling.concurrent_runs", 0)])
    assert required_resources(t, cfg)["CPU"] == pytest.approx(2 * (0.25 + 2 * 0.5) + 1)
    check_resources(t, cfg, {"CPU": 4.0})  # fits: 3.5 of 4
    with pytest.raises(ConfigError, match=r"tune\.max_concurrent_trials=2 needs 3\.5 CPU .* Ray has 3"):
        check_resources(t, cfg, {"CPU": 3.0})
    # GPUs: the count is trials x workers, one GPU each (it printed the CPU formula, driver CPUs and all)
    t, cfg = load_tune_config(None, [("tune.max_concurrent_trials", 2), ("scaling.use_gpu", True)])
    with pytest.raises(ConfigError, match=r"needs 2 GPU \(2 x \(scaling\.num_workers 1, a GPU each\)\) but Ray has 1:"):
        check_resources(t, cfg, {"CPU": 16.0, "GPU": 1.0})
    # a custom resource each worker asks for (scaling.worker_resources) that a local Ray lacks: the
    # search's first training run waited for ever (session 30); a joined cluster may add such nodes
    t, cfg = load_tune_config(None, [("scaling.worker_resources", {"train_node": 1}), ("scaling.concurrent_runs", 0)])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"needs 2 train_node \(scaling\.worker_resources x scaling\.num_workers 1 "
                                          r"per trial\) but Ray has 0"):
        check_resources(t, cfg, {"CPU": 16.0})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check_resources(t, cfg, {"CPU": 16.0}, nodes=[{"CPU": 16.0, "train_node": 1.0}])


def test_a_trial_no_node_of_a_joined_cluster_holds_is_said(monkeypatch, capsys):
    """On a joined cluster a trial (an in-process trial is its worker, beside its driver's CPUs) or
    a trial's Train worker that fits no node waited without a word: one line names what it needs."""
    from dvfl.tune import check_resources, load_tune_config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    t, cfg = load_tune_config(None, [("scaling.cpus_per_worker", 2), ("tune.driver_cpus", 0.5)])
    check_resources(t, cfg, {}, nodes=[{"CPU": 2.5}])
    assert capsys.readouterr().err == ""
    check_resources(t, cfg, {}, nodes=[{"CPU": 2.0}, {"CPU": 1.0}])
    assert "[ray] note: one trial needs 2.5 CPU on one node, and no node of the cluster has them now (its nodes: " \
           "2 CPU; 1 CPU)" in capsys.readouterr().err
    t, cfg = load_tune_config(None, [("scaling.concurrent_runs", 0), ("scaling.num_workers", 2),
                                     ("scaling.use_gpu", True), ("scaling.cpus_per_worker", 2)])
    check_resources(t, cfg, {}, nodes=[{"CPU": 8.0}])  # a CPU head: each Train worker wants a GPU
    assert "[ray] note: one trial's training worker needs 2 CPU, 1 GPU on one node" in capsys.readouterr().err


def test_an_in_process_trial_asks_for_the_workers_custom_resources():
    """A one-worker trial is its worker: scaling.worker_resources ({train_node: 1}, docs/cluster.md)
    must be in what its actor reserves, or the search trains on whatever node Tune picks."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from dvfl.tune import load_tune_config
    from dvfl.tune.trial import trial_resources

    t, cfg = load_tune_config(None, [("scaling.worker_resources", {"train_node": 1})])
    bundle = resource_dict_to_pg_factory(trial_resources(t, cfg)).bundles[0]
    assert bundle["train_node"] == 1 and bundle["CPU"] == t.driver_cpus + cfg.scaling.cpus_per_worker
    t, cfg = load_tune_config(None, [])
    assert set(resource_dict_to_pg_factory(trial_resources(t, cfg)).bundles[0]) <= {"CPU", "GPU", "memory"}


def test_pareto_front_and_cli_config_error(tmp_path):
    from dvfl.tune import diverged, pareto_front

    # a trial whose loss is NaN is stopped (ASHA never would: NaN is below no cutoff)
    assert diverged("t", {"train_loss": float("nan")}) and not diverged("t", {"train_loss": 1.3})
    assert not diverged("t", {"epoch": 1})

    def trial(gmacs, top1, status="completed"):
        return {"gmacs": gmacs, "best_top1": top1, "status": status}

    rows = [trial(1.0, 0.5), trial(2.0, 0.5), trial(2.0, 0.7), trial(3.0, 0.6), trial(0.5, None),
            # an errored or diverged trial's last score is no recipe: never on the front, whatever it reached
            trial(0.4, 0.9, "error"), trial(0.4, 0.95, "diverged"), trial(0.8, 0.6, "stopped early")]
    assert pareto_front(rows) == [2, 7]
    # (in this process: tuning/search.py itself runs as a program in the search fixture)
    r = cli_in_process("search.py", "--out", tmp_path / "never", "--set", "tune.space.kd.alpha={uniform: [0.5, 2]}")
    assert r.returncode == 2 and "config error: tune.space.kd.alpha" in r.stderr
    assert not (tmp_path / "never").exists()


def test_front_reruns_and_separation():
    """Re-runs use fresh seeds only; their spread and the separation verdicts leave out the
    search's own run (chosen as the best of its cost, so biased upward); neighbouring cost levels
    count as separated only when their re-runs' ranges do not overlap."""
    from dvfl.tune.report import front_separation, rerun_spread
    from dvfl.tune.search import front_reruns

    def row(tid, width, gmacs, top1, status="completed"):
        return {"trial_id": tid, "width": width, "gmacs": gmacs, "temperature": 4.0, "best_top1": top1, "seed": 0,
                "status": status, "params_searched": {"student.embed_dim": width}}

    rows = [row("a", 4, 1.0, 0.40, "stopped early"), row("b", 8, 2.0, 0.95), row("c", 16, 4.0, 0.91),
            row("d", 32, 8.0, 0.93)]
    runs = front_reruns(rows, [1, 2])
    assert [(r["of"], r["seed"]) for r in runs] == [(t, s) for t in "abcd" for s in (1, 2)]
    def rerun(of, seed, top1, status="completed"):
        return {"front_of": of, "seed": seed, "best_top1": top1, "status": status}

    reruns = [rerun("a", 1, 0.85), rerun("a", 2, 0.75), rerun("b", 1, 0.845), rerun("b", 2, 0.853),
              rerun("c", 1, 0.90), rerun("c", 2, 0.881), rerun("d", 1, 0.92),
              rerun("d", 2, 0.99, "error"), rerun("c", 3, 0.5, "diverged")]  # no part of any spread
    spread = rerun_spread(rows, reruns)
    assert rows[1]["top1_by_seed"] == {"1": 0.845, "2": 0.853} and rows[1]["best_top1"] == 0.95
    assert rows[3]["top1_by_seed"] == {"1": 0.92} and rows[2]["top1_by_seed"] == {"1": 0.90, "2": 0.881}
    assert rows[1]["top1_max"] == 0.853  # b's chosen 95 % would have hidden that it is below c
    pairs = front_separation(spread)
    # d has one re-run: no range, so no verdict on c vs d
    assert [(p["widths"], p["separated"]) for p in pairs] == [([4, 8], False), ([8, 16], True)]
    assert pairs[1]["ranges"] == [[0.845, 0.853], [0.881, 0.90]]


def test_the_front_comes_from_every_cost_levels_reruns_not_from_a_lucky_single_run():
    """A lucky seed-0 run (width 8: 95 %) beat width 16's 91 % and drew a front without width 16,
    which was then never re-run and could not be chosen; re-running each width's best lets the
    re-runs decide: width 8 averages 81 %, width 16 90 %, so width 16 is on the front and best, and
    width 24 (85 %) is dominated by it."""
    from dvfl.tune.report import choose, cost_level_bests, usable

    def row(tid, width, gmacs, top1, status="completed"):
        return {"trial_id": tid, "width": width, "gmacs": gmacs, "best_top1": top1, "seed": 0, "status": status}

    rows = [row("b", 8, 2.0, 0.95), row("d", 24, 6.0, 0.93), row("c", 16, 4.0, 0.91), row("c2", 16, 4.0, 0.90),
            row("a", 4, 1.0, 0.50), row("e", 32, 8.0, 0.99, "error")]  # sorted best first, as collect_trials returns them
    assert [r["trial_id"] for r in cost_level_bests(rows)] == ["a", "b", "c", "d"]  # cheapest first, errors never

    def rerun(of, seed, top1):
        return {"front_of": of, "seed": seed, "best_top1": top1, "status": "completed"}

    reruns = [rerun(of, seed, v) for of, vs in (("a", (0.5, 0.52, 0.48)), ("b", (0.80, 0.82, 0.81)),
                                                  ("c", (0.90, 0.89, 0.91)), ("d", (0.84, 0.86, 0.85)))
              for seed, v in zip((1, 2, 3), vs)]
    levels, front, best = choose(rows, reruns)
    assert [r["trial_id"] for r in levels] == ["a", "b", "c", "d"]
    assert [r["trial_id"] for r in front] == ["a", "b", "c"]  # d (mean 85 %) costs more than c (90 %)
    assert best["trial_id"] == "c" and abs(best["top1_mean"] - 0.90) < 1e-9
    assert [r["trial_id"] for r in rows if r["pareto"]] == ["b", "c", "a"]
    # without re-runs (tune.front_seeds: []) the single runs decide, as before
    levels, front, best = choose([dict(r) for r in rows], [])
    assert levels == [] and [r["trial_id"] for r in front] == ["b", "a"] and best["trial_id"] == "b"
    assert all(usable(r) for r in front)


def test_a_resumed_front_keeps_reruns_recorded_in_another_order():
    """Re-runs recorded best-first (older code) are the same re-runs cheapest-first: a resumed front
    keeps them instead of starting over; another seed or trial is another front."""
    from dvfl.tune.search import same_reruns

    new = [{"params": {"kd": {"alpha": 0.5}}, "seed": s, "of": of} for of in ("cheap", "best") for s in (1, 2)]
    recorded = json.loads(json.dumps(new[2:] + new[:2]))
    assert same_reruns(recorded, new)
    assert not same_reruns(recorded[:-1] + [{**recorded[-1], "seed": 3}], new)
    assert not same_reruns(recorded[1:], new)


def test_trials_tied_at_one_width_are_ranked_by_trial_id(monkeypatch):
    """Equal top-1 at one cost (plausible on a small validation split): the row order, and so the
    trial cost_level_bests re-runs, does not depend on the order Tune lists the trials in."""
    import pandas as pd

    from dvfl.tune import load_tune_config
    from dvfl.tune import report
    from dvfl.tune.report import collect_trials, cost_level_bests

    monkeypatch.setattr(report, "student_cost", lambda cfg, n: {"gmacs": 1.0, "params": 10, "width": 8})
    t, cfg = load_tune_config(None, [])

    class Result:
        def __init__(self, tid):
            self.config, self.metrics, self.error, self.path = {}, {"trial_id": tid}, None, f"/x/{tid}"
            self.metrics_dataframe = pd.DataFrame({"epoch": [e + 1 for e in range(cfg.optim.epochs)],
                                                   "val_top1": [0.5] * cfg.optim.epochs,
                                                   "train_loss": [1.0] * cfg.optim.epochs})

    for order in (["b", "a", "c"], ["c", "a", "b"]):
        rows = collect_trials([Result(tid) for tid in order], t, cfg, {"classes": ["x", "y"]})
        assert [r["trial_id"] for r in rows] == ["a", "b", "c"]
        assert [r["trial_id"] for r in cost_level_bests(rows)] == ["a"]


def test_results_say_which_reruns_are_missing_and_when_none_is_usable(tmp_path):
    """A cost level without a usable re-run (errored, diverged or never run) is named as such; when
    no re-run is usable, the results say the front and best config come from the single runs."""
    from dvfl.tune import load_tune_config, write_results

    t, cfg = load_tune_config(None, [("tune.experiment", "exp"), ("tune.storage", str(tmp_path / "tune")),
                                     ("tune.front_seeds", [1])])
    exp = tmp_path / "tune" / "exp"
    exp.mkdir(parents=True)

    def row(tid, width, gmacs, top1):
        return {"trial_id": tid, "status": "completed", "best_top1": top1, "epochs_run": 1, "max_epochs": 1,
                "temperature": 4.0, "width": width, "alpha": 0.5, "lr": 1e-3, "gmacs": gmacs, "params": 1000,
                "params_searched": {}, "seed": 0}

    def rerun(of, status, top1=0.5):
        return {"trial_id": f"r{of}", "front_of": of, "seed": 1, "best_top1": top1, "status": status}

    write_results(exp, t, cfg, [row("b", 16, 2.0, 0.7), row("a", 8, 1.0, 0.6)],
                  front_rows=[rerun("a", "completed"), rerun("b", "diverged")], wall_seconds=1.0, log=lambda *_: None)
    md = (exp / "tune_results.md").read_text()
    assert "No usable re-run of trial(s) b (errored, diverged or not run): left out above." in md
    assert "finished (see the errors)" not in md and "come from the single runs" not in md
    summary = write_results(exp, t, cfg, [row("b", 16, 2.0, 0.7), row("a", 8, 1.0, 0.6)],  # best first
                            front_rows=[rerun("a", "error", None), rerun("b", "diverged")], wall_seconds=1.0,
                            log=lambda *_: None)
    md = (exp / "tune_results.md").read_text()
    assert "the Pareto front and the best config come from the single runs above" in md
    assert summary["best"]["trial_id"] == "b"
    # a cheaper level with the higher mean but a diverged seed: on the front, not chosen, and said
    # (the results said "the highest mean" beside a best config the front dominated)
    t2, cfg2 = load_tune_config(None, [("tune.experiment", "exp"), ("tune.storage", str(tmp_path / "tune")),
                                       ("tune.front_seeds", [1, 2])])
    summary = write_results(exp, t2, cfg2, [row("b", 16, 2.0, 0.7), row("a", 8, 1.0, 0.6)],
                            front_rows=[rerun("a", "completed", 0.9), {**rerun("a", "diverged", None), "seed": 2},
                                        rerun("b", "completed", 0.8), {**rerun("b", "completed", 0.8), "seed": 2}],
                            wall_seconds=1.0, log=lambda *_: None)
    md = (exp / "tune_results.md").read_text()
    assert summary["best"]["trial_id"] == "b" and [r["trial_id"] for r in summary["rows"] if r["pareto"]] == ["a"]
    assert "Passed over for a failed re-run (seeds 2): trial a, mean 90.0% over its other seeds." in md
    assert "among the levels none of whose re-runs errored or diverged" in summary["best_chosen_by"]
    # every level with a failed re-run: the rule had nothing to pick from, and the results say so
    summary = write_results(exp, t2, cfg2, [row("b", 16, 2.0, 0.7), row("a", 8, 1.0, 0.6)],
                            front_rows=[rerun("a", "completed", 0.9), {**rerun("a", "diverged", None), "seed": 2},
                                        rerun("b", "completed", 0.8), {**rerun("b", "error", None), "seed": 2}],
                            wall_seconds=1.0, log=lambda *_: None)
    md = (exp / "tune_results.md").read_text()
    assert summary["best"]["trial_id"] == "a" and summary["best_chosen_by"].endswith("every level having a failed re-run")
    assert "Every cost level had a failed re-run: the best config is the highest mean over the seeds that ran " \
           "(trial a, failed seeds 2)" in md


def test_a_search_with_no_usable_trial_fails():
    """Every trial errored or diverged: nothing was found, and the search must not exit 0 (before,
    only an all-errored search failed; diverged trials kept their pre-NaN peaks and could be chosen)."""
    from dvfl.tune import SearchFailed, report_errors

    diverged_rows = [{"trial_id": f"t{i}", "status": "diverged", "best_top1": 0.9, "path": "p", "error": None}
                     for i in range(2)]
    with pytest.raises(SearchFailed, match="all 2 trials diverged"):
        report_errors(diverged_rows, log=lambda *_: None)
    mixed = diverged_rows + [{"trial_id": "e", "status": "error", "best_top1": 0.95, "path": "p", "error": "Boom"}]
    with pytest.raises(SearchFailed, match=r"no trial of 3 finished \(1 errored, the rest diverged"):
        report_errors(mixed, log=lambda *_: None)
    report_errors(mixed + [{"trial_id": "ok", "status": "stopped early", "best_top1": 0.3, "path": "p",
                            "error": None}], log=lambda *_: None)  # one usable trial: the search found something


# last of the module: it re-runs the shared search's front (earlier tests read the first one's records)
@pytest.mark.slow
def test_a_changed_front_starts_its_reruns_over(search):
    """Front re-runs recorded for another front (a resumed search whose errored trial now ran) are
    not restored into this front: they start over, one per front trial and seed."""
    from dvfl.tune import load_tune_config, run_search

    front_file = search["exp"].parent / "forced-asha-front" / "dvfl_search.json"
    front_file.write_text(json.dumps({**json.loads(front_file.read_text()), "reruns": []}))
    runs = search["exp"] / "train_runs"  # the old front's Ray Train checkpoints go with it; a trial's stay
    (runs / "forced-asha-front-old0" / "checkpoint_000000").mkdir(parents=True)
    (runs / "forced-asha-trial0").mkdir(parents=True)
    lines = []
    tune_cfg, run_cfg = load_tune_config(search["path"])
    s = run_search(tune_cfg, run_cfg, verbose=0, log=lines.append)
    assert any("the front changed since its re-runs began; starting them over" in line for line in lines), lines
    from dvfl.tune.report import cost_level_bests

    levels = cost_level_bests(s["rows"])
    assert sorted(r["front_of"] for r in s["front_reruns"]) == sorted(r["trial_id"] for r in levels)
    assert all(r["status"] == "completed" for r in s["front_reruns"])
    assert json.loads(front_file.read_text())["reruns"]  # the new front's list, for the next resume
    assert not (runs / "forced-asha-front-old0").exists() and (runs / "forced-asha-trial0").exists()


def test_a_level_with_a_failed_rerun_is_said_and_not_chosen_over_a_steady_one():
    """A re-run that diverged or errored was dropped from its level's mean without a word: a level
    averaged over one seed could beat levels averaged over two, and a recipe that diverges on a
    fresh seed became the best config. The failure is now in the row and the table, and the best
    is chosen among the levels none of whose re-runs failed."""
    from dvfl.tune.report import choose, front_table

    def row(tid, width, gmacs, top1, status="completed", **kw):
        return dict(trial_id=tid, width=width, gmacs=gmacs, best_top1=top1, status=status, temperature=4.0,
                    alpha=0.9, lr=1e-3, epochs_run=12, max_epochs=12, **kw)

    rows = [row("a", 16, 0.2, 0.62), row("b", 8, 0.1, 0.55)]
    reruns = [row("a1", 16, 0.2, 0.70, front_of="a", seed=1), row("a2", 16, 0.2, None, "diverged", front_of="a", seed=2),
              row("b1", 8, 0.1, 0.60, front_of="b", seed=1), row("b2", 8, 0.1, 0.61, front_of="b", seed=2)]
    levels, front, best = choose(rows, reruns)
    a = next(r for r in levels if r["trial_id"] == "a")
    assert a["top1_mean"] == 0.70 and a["failed_seeds"] == {"2": "diverged"}
    assert best["trial_id"] == "b"  # steady on both seeds, though a's one usable seed scored higher
    assert "diverged (seed 2)" in front_table(levels)
    # every level failed somewhere: the best mean still, as before
    reruns[2] = row("b1", 8, 0.1, None, "error", front_of="b", seed=1)
    assert choose([dict(r) for r in rows], reruns)[2]["trial_id"] == "a"


def test_front_reruns_that_all_fail_leave_the_search_found_and_said():
    """The fallback best config (from the single runs) was written, then the search exited 1
    ("all trials diverged"): the front's re-runs are not the search."""
    from dvfl.tune.report import SearchFailed, report_errors

    failed = [dict(trial_id="x", status="diverged", best_top1=None, error=None, path="/p"),
              dict(trial_id="y", status="error", best_top1=None, error="Traceback\nboom", path="/q")]
    lines = []
    report_errors(failed, lines.append, required=False)
    assert any("none of the front's 2 re-run(s) finished (1 errored, the rest diverged): the front and the best "
               "config come from the single runs" in x for x in lines), lines
    with pytest.raises(SearchFailed):
        report_errors(failed, lines.append)


def test_a_search_from_an_init_checkpoint_replaced_under_its_name_is_another_search(tmp_path):
    """The resume digest held the run config as given (paths): a student.checkpoint replaced in
    place resumed the interrupted search, ranking trials from two different starting weights together."""
    from dvfl.config import load_config
    from dvfl.tune.search import _fingerprint
    from dvfl.tune.search_config import TuneConfig

    ckpt = tmp_path / "k400.pth"
    ckpt.write_bytes(b"a" * 1000)

    def search_digest(cfg):
        return _fingerprint(TuneConfig(), cfg, {"fingerprint": "d"}, {"mode": "cache"})

    cfg = load_config(None, [("student.checkpoint", str(ckpt))], check_paths=False)
    before = search_digest(cfg)
    ckpt.write_bytes(b"b" * 1000)  # same name, same size, other weights
    assert search_digest(cfg)["digest"] != before["digest"]
    # a search without an init checkpoint keeps the digest it had before session 30 (it still resumes)
    assert "student_init" not in search_digest(load_config(None, check_paths=False))["search"]


def test_a_finished_search_run_again_retries_no_errored_trial(tmp_path):
    """The same command again on a finished search restored it with Tune's resume_errored: every
    errored trial (an out-of-memory width, say) ran again on every rerun, and the line said
    "resuming the interrupted experiment". An interrupted one still retries them."""
    from dvfl.tune import load_tune_config
    from dvfl.tune.search import expected_trials, restore_words

    def state(*statuses):
        trials = [[json.dumps({"trial_id": f"t{i}", "status": st}), "{}"] for i, st in enumerate(statuses)]
        (tmp_path / "experiment_state-2026-12-06_10-00-00.json").write_text(json.dumps({"trial_data": trials}))

    t, _ = load_tune_config(None, [("tune.num_samples", 2), ("tune.space.kd.temperature", {"grid": [2.0, 4.0]})])
    assert expected_trials(t) == 2 * 2 * 3  # x the shipped search's three widths (a grid too)
    lines = []
    state("TERMINATED", "ERROR", "TERMINATED", "TERMINATED")
    assert restore_words(str(tmp_path), 4, "experiment", lines.append) is False
    assert "finished before: writing its results again (1 errored trial(s) not retried" in lines[-1], lines
    state("TERMINATED", "ERROR", "RUNNING", "TERMINATED")  # killed mid-run
    assert restore_words(str(tmp_path), 4, "experiment", lines.append) is True
    assert "resuming the interrupted experiment" in lines[-1]
    state("TERMINATED", "ERROR")  # killed before the generator made the last two trials
    assert restore_words(str(tmp_path), 4, "experiment", lines.append) is True


def test_a_tune_experiment_this_project_did_not_start_is_never_resumed(tmp_path):
    """Tune resumes by unpickling tuner.pkl: a folder holding one but no dvfl_search.json (planted
    in a shared tune.storage, say) was restored unchecked, running whatever the pickle holds."""
    import pickle

    from dvfl.tune import SEARCH_FILE
    from dvfl.tune.search import resumable

    exp = tmp_path / "embedded-tune"
    exp.mkdir()
    assert resumable(str(exp), {"digest": "d"}) is False  # nothing to resume
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"anything": 1}))
    with pytest.raises(ConfigError, match=r"holds a Tune experiment this project did not start \(no dvfl_search"):
        resumable(str(exp), {"digest": "d"})
    (exp / SEARCH_FILE).write_text(json.dumps({"digest": "d", "search": {}}))
    assert resumable(str(exp), {"digest": "d"}) is True
    with pytest.raises(ConfigError, match="holds a different search"):
        resumable(str(exp), {"digest": "e", "search": {"tune": {"seed": 1}}})
    # the same search on re-ingested clips (videos added): "put the old values back" could not be done
    (exp / SEARCH_FILE).write_text(json.dumps({"digest": "d", "search": {"tune": {"seed": 0}, "dataset": "a"}}))
    with pytest.raises(ConfigError, match=r"holds this search on other clips \(dataset a, now b: .*--fresh starts it over"):
        resumable(str(exp), {"digest": "e", "search": {"tune": {"seed": 0}, "dataset": "b"}})
