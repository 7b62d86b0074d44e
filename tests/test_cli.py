"""The `dvfl` command: one subcommand per stage, one argument vocabulary, help that shows defaults,
and `python pipelines/<stage>.py` / `python tuning/search.py` as thin wrappers of it (issue 22).

Two real subprocesses (`python -m dvfl --help` and a wrapper script); every subcommand's help is
built in this process through the same `dvfl.cli.main` (a subprocess each would import torch ten
more times for the same text).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dvfl.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("pipelines/*.py"), REPO / "tuning" / "search.py"])


def subparsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def visible_options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"dvfl"}
    module, _, name = scripts["dvfl"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


def test_dvfl_help_and_a_wrapper_run_as_commands(tmp_path):
    """`python -m dvfl --help` lists every stage; `python pipelines/distill.py --help` works from any
    directory with no sys.path help (both started at once: each imports torch)."""
    runs = {"dvfl": [sys.executable, "-m", "dvfl", "--help"],
            "distill": [sys.executable, str(REPO / "pipelines" / "distill.py"), "--help"]}
    procs = {k: subprocess.Popen(v, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, v in runs.items()}
    out = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0 and not stderr, (k, stderr[-2000:])
        out[k] = stdout
    assert out["dvfl"].startswith("usage: dvfl ")
    listed = out["dvfl"].split("positional arguments:")[1]
    for name in COMMANDS:
        assert f"\n    {name}" in listed, name
    assert out["distill"].startswith("usage: python pipelines/distill.py ")
    assert "--num-workers" in out["distill"] and "--out OUT" in out["distill"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_help_shows_its_defaults(name, capsys):
    text = help_text([name, "--help"], capsys)
    assert text.startswith(f"usage: dvfl {name} ")
    for option, action in visible_options(subparsers()[name]).items():
        if option.startswith("--") and option != "--help":
            assert option in text, option
        if action.default not in (None, False, [], argparse.SUPPRESS) and option.startswith("--"):
            # every option with a value when not given says so in its help
            assert f"(default: {action.default})" in " ".join(text.split()), (name, option)


def test_every_stage_script_is_a_thin_wrapper_of_a_subcommand(capsys):
    """pipelines/*.py and tuning/search.py: each one subcommand, none named like a standard-library
    module (pipelines/ comes first on sys.path when a script in it runs), no sys.path changes."""
    wrapped = {script for script in (s for _, s in COMMANDS.values()) if script}
    assert {str(p.relative_to(REPO)) for p in SCRIPTS} == wrapped
    for path in SCRIPTS:
        assert path.stem not in sys.stdlib_module_names, path
        source = path.read_text()
        assert "sys.path" not in source and len(source.splitlines()) < 25, path
        name = next(n for n, (_, s) in COMMANDS.items() if s == str(path.relative_to(REPO)))
        argv = sys.argv
        sys.argv = [str(path), "--help"]
        try:
            with pytest.raises(SystemExit) as e:
                runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = argv
        assert e.value.code == 0, path
        assert capsys.readouterr().out.startswith(f"usage: python {path.relative_to(REPO)} "), name


OLD_SPELLINGS = {"--output-dir", "--overwrite", "--workers", "--gen-workers", "--model-name", "--teacher-model",
                 "--batch", "--throughput-batch"}


def test_one_vocabulary_across_subcommands():
    parsers = subparsers()
    options = {name: visible_options(p) for name, p in parsers.items()}
    for name, opts in options.items():
        assert not OLD_SPELLINGS & set(opts), (name, OLD_SPELLINGS & set(opts))
    # a flag shared by several commands means one thing: the same help (and default) everywhere
    for flag in ("--num-cpus", "--num-workers"):
        seen = {(o[flag].help, o[flag].default) for o in options.values() if flag in o}
        assert len(seen) == 1, (flag, seen)
    assert {n for n, o in options.items() if "--num-cpus" in o} == {
        "ingest", "teacher", "cache", "distill", "evaluate", "protocol", "tune"}
    # --config is a run config wherever it is accepted; the search config has its own flag
    assert "--config" not in options["tune"] and "--search" in options["tune"]
    assert all("run config" in o["--config"].help for o in options.values() if "--config" in o)
    # starting over is --fresh; every command that writes somewhere takes --out
    for name in ("ingest", "cache", "distill", "tune"):
        assert "--fresh" in options[name], name
    for name in ("ingest", "teacher", "cache", "distill", "protocol", "tune", "export"):
        assert "--out" in options[name], name
    # --model is a trained model (a path) and --arch an architecture name, wherever they appear
    for name, o in options.items():
        if "--model" in o:
            assert "director" in o["--model"].help, name
    assert {n for n, o in options.items() if "--arch" in o} == {"teacher", "cache", "evaluate", "profile"}


@pytest.mark.parametrize("argv, dest, value, new", [
    (["distill", "--output-dir", "runs/x"], "out", "runs/x", "--out"),
    (["distill", "--workers", "3"], "num_workers", 3, "--num-workers"),
    (["teacher", "--workers", "2"], "num_workers", 2, "--num-workers"),
    (["teacher", "--model", "videofocalnet_tiny"], "arch", "videofocalnet_tiny", "--arch"),
    (["ingest", "--workers", "2"], "decode_tasks", 2, "--decode-tasks"),
    (["ingest", "--overwrite"], "fresh", True, "--fresh"),
    (["ingest", "--gen-workers", "2"], "gen_processes", 2, "--gen-processes"),
    (["cache", "--overwrite"], "fresh", True, "--fresh"),
    (["cache", "--teacher-model", "videofocalnet_base"], "arch", "videofocalnet_base", "--arch"),
    (["cache", "--views", "center,center+flip"], "cache_views", "center,center+flip", "--cache-views"),
    (["cache", "--output-dir", "runs/x"], "output_dir", "runs/x", "--set output_dir=DIR"),
    (["evaluate", "--model-name", "videofocalnet_base"], "arch", "videofocalnet_base", "--arch"),
    (["evaluate", "--split", "val"], "test_split", "val", "--test-split"),
    (["protocol", "--output-dir", "runs/x"], "output_dir", "runs/x", "--set output_dir=DIR"),
    (["tune", "--config", "configs/tune_ucf101.yaml"], "search", "configs/tune_ucf101.yaml", "--search"),
    (["tune", "--output-dir", "runs/x"], "out", "runs/x", "--out"),
    (["profile", "--batch", "2"], "batch_size", 2, "--batch-size"),
    (["profile", "--throughput-batch", "4"], "throughput_batch_size", 4, "--throughput-batch-size"),
])
def test_old_spellings_still_work_with_one_warning_line(argv, dest, value, new, capsys):
    required = {"ingest": ["--dataset", "synthetic", "--out", "o"], "evaluate": ["--model", "m"]}
    a = build_parser().parse_args([argv[0], *required.get(argv[0], []), *argv[1:]])
    assert getattr(a, dest) == value
    assert capsys.readouterr().err == f"warning: {argv[1]} is deprecated; use {new}\n"


def test_an_old_spelling_reaches_the_new_flags_check(capsys):
    """`ingest --workers 0` is refused naming --decode-tasks, after one deprecation line."""
    with pytest.raises(SystemExit) as e:
        main(["ingest", "--dataset", "synthetic", "--out", "o", "--workers", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: --workers is deprecated; use --decode-tasks\n")
    assert "--decode-tasks must be >= 1, got 0" in err


def test_ingest_starts_ray_with_the_same_cpu_default_as_every_command(monkeypatch):
    """ingest's local Ray gets ray_runtime's default logical CPUs (no ingest-only default)."""
    import ray

    from dvfl import runtime
    from dvfl.data import ingest

    asked = []

    @contextlib.contextmanager
    def record(num_cpus=None, object_store_mb=1024, **kwargs):
        asked.append(num_cpus)
        yield {"CPU": 4.0}

    monkeypatch.setattr(runtime, "ray_runtime", record)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    lines = []
    with ingest.ray_session(log=lines.append):
        pass
    assert asked == [None]
    assert lines == ["[ingest] local Ray, 4 logical CPUs, 1024 MiB object store"]



@pytest.mark.parametrize("argv", [["distill", "--out", ""], ["tune", "--out", ""], ["cache", "--output-dir", ""],
                                  ["protocol", "--out", ""], ["evaluate", "--model", "m", "--json", ""],
                                  ["predict", "--model", "m", "x.mp4", ""], ["ingest", "--dataset", "synthetic",
                                                                              "--out", "o", "--unlabeled", ""]])
def test_an_empty_path_flag_is_refused_before_any_work(argv, capsys):
    """"--out $UNSET": tune read "" as no flag and searched in the config's default folder; ingest's
    "" was the working directory."""
    from dvfl.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "is empty: give a path" in capsys.readouterr().err


def test_flags_are_never_abbreviated(capsys):
    # argparse took --conf for --config; the cluster validator checks a job's flags by their names
    with pytest.raises(SystemExit) as e:
        main(["distill", "--conf", "configs/ucf101_base.yaml"])
    assert e.value.code == 2 and "unrecognized arguments: --conf" in capsys.readouterr().err


def test_ray_address_local_starts_our_own_local_instance_and_stops_it():
    # any RAY_ADDRESS took the join-a-cluster path: "local" started Ray with all its defaults
    # (every core, 30 % of RAM for objects) and nothing of ours shut it down
    code = ("import ray\nfrom dvfl.runtime import ray_runtime\n"
            "with ray_runtime(num_cpus=1, dashboard=False) as res:\n    print('cpus', res['CPU'])\n"
            "print('after', ray.is_initialized())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "RAY_ADDRESS": "local"})
    assert r.returncode == 0 and "cpus 1.0" in r.stdout and "after False" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_num_cpus_below_one_is_refused_by_the_parser(value, capsys):
    """--num-cpus 0 silently meant the default and -1 reached ray.init after the videos were made."""
    from dvfl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--num-cpus", value])
    assert exc.value.code == 2 and "--num-cpus: must be >= 1" in capsys.readouterr().err


def test_cache_flags_are_checked_before_ray_starts(tmp_path, capsys):
    """`dvfl cache --cache-views/--crop-size` bypassed the config's checks: a repeated or unknown view
    was found inside Ray, a crop larger than the clips never (session 28)."""
    import json

    from dvfl.cli import main

    clips, teacher = tmp_path / "clips", tmp_path / "teacher"
    clips.mkdir()
    teacher.mkdir()
    (clips / "dataset.json").write_text(json.dumps({"params": {"short_side": 32}}))
    base = ["cache", "--clips", str(clips), "--teacher", str(teacher), "--out", str(tmp_path / "c"), "--num-cpus", "1"]
    (clips / "dataset.json").write_text('{"params": {"short_')  # cut short: one line naming the file, not a traceback
    with pytest.raises(SystemExit) as exc:
        main(base)
    assert exc.value.code == 2 and f"{clips / 'dataset.json'} is not valid JSON" in capsys.readouterr().err
    (clips / "dataset.json").write_text(json.dumps({"params": {"short_side": 32}}))
    for extra, message in ((["--cache-views", "center,center+"], "name a view twice"),
                           (["--cache-views", "middle"], "unknown view 'middle'"),
                           (["--crop-size", "64"], "--crop-size 64 exceeds the clips' short side 32"),
                           (["--crop-size", "0"], "--crop-size must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "c").exists()
    # clips at their source size: the smallest stored frame decides (a Ray task error mid-build before)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (clips / "dataset.json").write_text(json.dumps({"params": {"short_side": 0}, "shards": [{"file": "shards/a.parquet"}]}))
    (clips / "shards").mkdir()
    pq.write_table(pa.table({"height": pa.array([40, 24], pa.int32()), "width": pa.array([60, 32], pa.int32())}),
                   clips / "shards" / "a.parquet")
    for extra, message in (([], "keeps the source size (short side 0): give --crop-size"),
                           (["--crop-size", "28"], "--crop-size 28 exceeds the smallest stored frame side 24")):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err, extra
    # a teacher folder: the crop it was trained on, not the clips' short side
    (teacher / "model.json").write_text(json.dumps({"kwargs": {"img_size": 48}, "inputs": {"crop_size": 28}}))
    with pytest.raises(SystemExit) as exc:
        main(base)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "crop 28 px: the crop" in err and "--crop-size 28 exceeds the smallest" in err
    # ... unless the clips' short side is smaller (then that, said), or an earlier build's crop (its rerun resumes)
    from dvfl.commands.cache import built_crop, default_crop

    assert default_crop(str(teacher), 24) == 24 and "larger than the clips' short side 24" in capsys.readouterr().err
    assert default_crop(str(teacher), 32) == 28 and default_crop(str(tmp_path / "file.pth"), 32) == 32
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cache.json").write_text(json.dumps({"view_spec": {"crop_size": 32, "views": ["center"]}}))
    assert built_crop(str(tmp_path / "c")) == 32 and built_crop(str(tmp_path)) is None
    assert "crop 32 px: the crop of the cache already in" in capsys.readouterr().err
    (tmp_path / "c" / "cache.json").unlink()
    (tmp_path / "c").rmdir()
    (clips / "dataset.json").unlink()  # an interrupted ingest: told how to finish it
    with pytest.raises(SystemExit) as exc:
        main(base)
    assert exc.value.code == 2 and "or its same command again to finish an interrupted one" in capsys.readouterr().err


def test_gpu_training_asked_on_a_machine_without_one_is_refused_before_work(tmp_path, capsys, monkeypatch):
    """scaling.use_gpu on a machine with no GPU and no cluster to join: Ray waited for a GPU for ever.
    Joining a cluster (RAY_ADDRESS), whose autoscaler may add GPU nodes, it is left to Ray."""
    import torch

    from dvfl.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (as on CI's machines: no GPU)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--out", str(tmp_path / "run"), "--gpu"])
    assert exc.value.code == 2 and "scaling.use_gpu is true, but this machine has no GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # session 30: the cache from flags alone and a protocol's split configs were not checked (hung)
    for d in ("clips", "teacher", "model"):
        (tmp_path / d).mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["cache", "--clips", str(tmp_path / "clips"), "--teacher", str(tmp_path / "teacher"),
              "--out", str(tmp_path / "c"), "--gpu"])
    assert exc.value.code == 2 and "scaling.use_gpu is true, but this machine has no GPU" in capsys.readouterr().err
    assert main(["protocol", "--config", str(REPO / "configs" / "ucf101_base.yaml"), "--splits", "1",
                 *[x for kv in (f"data.root={tmp_path}", f"output_dir={tmp_path / 'p'}", "data.clips=null",
                                "teacher.cache=null", "teacher.path=null") for x in ("--set", kv)]]) == 2
    assert "scaling.use_gpu is true, but this machine has no GPU" in capsys.readouterr().err
    # evaluate starts no Ray and picks its own device: a GPU config (the README's UCF101 line) is fine
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--clips", str(tmp_path / "clips"),
                 "--set", "scaling.use_gpu=true"]) == 2
    assert "is not a finished ingest output" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("c", "p"))


def test_own_clips_with_no_config_are_refused_not_trained_with_the_embedded_recipe(tmp_path, capsys):
    """`dvfl distill --clips MINE` with no --config trained the demo's 16-wide student, 12 runs, with
    its 8-class teacher (a user's first try); the default's own generated clips stay accepted."""
    from dvfl.cli import main

    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "dataset.json").write_text(json.dumps({"dataset": "folder", "classes": ["a", "b"], "params": {}}))
    assert main(["distill", "--clips", str(clips), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"data.clips {clips} holds folder clips" in err and "give --config" in err and "Traceback" not in err, err
    for how in (["--set", f"data.clips={clips}"], ["--set", "data.dataset=folder", "--set", f"data.root={tmp_path}"]):
        assert main(["distill", *how, "--out", str(tmp_path / "run")]) == 2
        assert "with no --config the embedded default's recipe" in capsys.readouterr().err, how
    assert not (tmp_path / "run").exists()
    (clips / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "classes": ["a", "b"], "shards": [],
                                                    "params": {"frames": 8, "short_side": 16, "eval_clips": 1}}))
    assert main(["distill", "--clips", str(clips), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err  # the default's own clips pass on to the check of what they hold
    assert "holds synthetic clips" not in err and "data.short_side is 32, the clips were stored at short side 16" in err


def test_training_that_the_local_ray_cannot_place_is_refused(monkeypatch):
    """More workers than a local Ray instance has CPUs (or GPUs, or a custom resource) for: Ray Train
    retried its worker group for ever, after the ingest and the cache. A joined cluster's
    autoscaler may add nodes: left to Ray."""
    from dvfl.cli import check_training_fits
    from dvfl.config import ConfigError, load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, [("scaling.concurrent_runs", 0), ("scaling.num_workers", 8),
                             ("scaling.cpus_per_worker", 1)], check_paths=False)
    check_training_fits(cfg, {"CPU": 8.25})
    # all 8 for the workers: Ray Data's read tasks (0.25 CPU) could never run beside them (hang #1)
    for cpus in (4.0, 8.0):
        with pytest.raises(ConfigError, match=r"scaling\.num_workers 8 x \(scaling\.cpus_per_worker 1\) \+ 0\.25 CPU "
                                              rf"for Ray Data's reads needs 8\.25 CPU \(Ray has {cpus:g}\)"):
            check_training_fits(cfg, {"CPU": cpus})
    gpu = load_config(None, [("scaling.concurrent_runs", 0), ("scaling.num_workers", 2), ("scaling.use_gpu", True),
                             ("scaling.worker_resources", {"train_node": 1})], check_paths=False)
    with pytest.raises(ConfigError, match=r"needs 2 GPU \(Ray has 1\), 2 train_node \(Ray has 0\)"):
        check_training_fits(gpu, {"CPU": 16.0, "GPU": 1.0})
    # an empty RAY_ADDRESS (a Makefile's `export RAY_ADDRESS=`) starts a local instance: refused as one (it was
    # taken for a joined cluster and waited for ever)
    for local in ("", "local"):
        monkeypatch.setenv("RAY_ADDRESS", local)
        with pytest.raises(ConfigError, match=r"needs 8\.25 CPU \(Ray has 4\)"):
            check_training_fits(cfg, {"CPU": 4.0})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check_training_fits(cfg, {"CPU": 4.0}, nodes=[{"CPU": 2.0}, {"CPU": 2.0}])


def test_a_run_the_local_ray_lacks_cpus_for_is_refused_before_the_videos_are_made(tmp_path):
    """The embedded default's videos (minutes) were generated before Ray started, and only then was
    the run refused for want of CPUs (README: "says what Ray lacks before any work"). Real processes:
    in this one a Ray instance may be up (a joined one is checked once Ray is up)."""
    import glob
    import re

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runs = {"distill": ([sys.executable, "pipelines/distill.py", "--num-cpus", "2", "--set",
                         f"output_dir={tmp_path / 'distill'}", "--set", "scaling.cpus_per_worker=4"],
                        r"needs 4\.25 CPU \(Ray has 2\)"),
            "teacher": ([sys.executable, "pipelines/train_teacher.py", "--num-cpus", "2", "--out", str(tmp_path / "t"),
                         "--set", f"output_dir={tmp_path / 'teacher'}", "--set", "scaling.cpus_per_worker=4"],
                        r"needs 4\.25 CPU \(Ray has 2\)"),
            "tune": ([sys.executable, "tuning/search.py", "--num-cpus", "2", "--set", f"output_dir={tmp_path / 'tune'}",
                      "--set", "tune.max_concurrent_trials=3"], r"tune\.max_concurrent_trials=3 needs 4\.75 CPU")}
    for name, (argv, message) in runs.items():
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and re.search("^config error: .*" + message, done.stderr, re.M), done.stderr
        assert "Traceback" not in done.stderr and "local Ray started" not in done.stdout
        assert not glob.glob(str(tmp_path / name / "**" / "*.mp4"), recursive=True)  # no video made


def test_a_file_uri_naming_another_host_is_a_config_error_not_a_traceback(tmp_path):
    """`--set output_dir=file://nas/runs` or `--clips file://nas/clips` ended in a ValueError traceback."""
    from dvfl.config import ConfigError, load_config

    for field in ("output_dir", "data.clips"):
        with pytest.raises(ConfigError, match=rf"^{field}: file://nas/x: a file:// URI must name a local path"):
            load_config(None, [(field, "file://nas/x")], check_paths=False)
    from dvfl.tune import load_tune_config

    with pytest.raises(ConfigError, match=r"^tune\.storage: file://nas/x: a file:// URI must name a local path"):
        load_tune_config(None, [("tune.storage", "file://nas/x")])
    from conftest import cli_in_process

    done = cli_in_process("cache_teacher.py", "--clips", "file://nas/clips", "--teacher", tmp_path, "--out", tmp_path / "c")
    assert done.returncode == 2 and "error: --clips: file://nas/clips: a file:// URI must name a local path" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_no_node_of_a_joined_cluster_holds_is_said(monkeypatch, capsys):
    """On a joined cluster (left to its autoscaler) a worker that fits no node's resources waited
    without a word, for ever if no autoscaler adds such a node: one line names what it needs."""
    from dvfl.cli import check_training_fits
    from dvfl.config import load_config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    gpu = load_config(None, [("scaling.concurrent_runs", 0), ("scaling.num_workers", 2), ("scaling.use_gpu", True),
                             ("scaling.cpus_per_worker", 4),
                             ("scaling.worker_resources", {"train_node": 1})], check_paths=False)
    cpu_head, gpu_node = {"CPU": 8.0, "memory": 1e9}, {"CPU": 8.0, "GPU": 1.0, "train_node": 1.0}
    check_training_fits(gpu, {"CPU": 16.0, "GPU": 1.0}, nodes=[cpu_head, gpu_node])
    assert capsys.readouterr().err == ""  # one worker per node is enough: Ray Train places the rest as nodes come
    for nodes in ([cpu_head], [cpu_head, {**gpu_node, "CPU": 2.0}], [cpu_head, {**gpu_node, "train_node": 0.0}]):
        check_training_fits(gpu, {}, nodes=nodes)
        err = capsys.readouterr().err
        assert err.startswith("[ray] note: one training worker needs 4 CPU, 1 GPU, 1 train_node on one node, and no "
                              "node of the cluster has them now (its nodes: 8 CPU, 0 GPU, 0 train_node") and \
            err.count("\n") == 1, err


def test_errors_found_once_ray_is_up_end_with_one_line(capsys):
    """Inside a command's Ray block: a config error found late (the splits data.root lists) exits 2
    with one line; an error the user can act on, wrapped the way Ray wraps it, exits 1 with one
    line; anything else keeps its traceback."""
    from dvfl.cli import failures_as_one_line
    from dvfl.config import ConfigError
    from dvfl.train.launch import NotEnoughClipsError

    with pytest.raises(SystemExit) as exc:
        with failures_as_one_line("distill"):
            raise ConfigError("data.test_split is 'test'")
    assert exc.value.code == 2 and capsys.readouterr().err == "config error: data.test_split is 'test'\n"

    class WrappedLikeRay(RuntimeError):  # RayTaskError(X): the original as its `cause`
        def __init__(self, cause):
            super().__init__("ray wrapper")
            self.cause = cause

    with pytest.raises(SystemExit) as exc:
        with failures_as_one_line("teacher"):
            raise WrappedLikeRay(NotEnoughClipsError("56 training clips, fewer than 2 x 100"))
    assert exc.value.code == 1 and capsys.readouterr().err == "[teacher] error: 56 training clips, fewer than 2 x 100\n"
    with pytest.raises(KeyError):
        with failures_as_one_line("tune"):
            raise KeyError("a bug")
    # a full disk or a permission, wrapped the way Ray wraps it: the error itself in one line
    with pytest.raises(SystemExit) as exc:
        with failures_as_one_line("distill"):
            raise WrappedLikeRay(OSError(28, "No space left on device", "/runs/x/shard.tmp"))
    assert exc.value.code == 1
    assert capsys.readouterr().err == "[distill] error: [Errno 28] No space left on device: '/runs/x/shard.tmp'\n"
    # an error raised "from None" while handling an OSError says what it says, not the OSError
    with pytest.raises(ValueError, match="a folder it cannot read"):
        with failures_as_one_line("distill"):
            try:
                raise PermissionError(13, "Permission denied", "/data/x")
            except OSError:
                raise ValueError("a folder it cannot read: fix its permissions") from None


def test_an_interrupt_during_freshs_deletions_does_not_say_to_drop_fresh(capsys):
    """Ctrl+C while `distill --fresh` was still deleting told the user to rerun without --fresh, which
    resumed from the models --fresh was meant to discard (or from a half-deleted Ray Train folder)."""
    import argparse
    from types import SimpleNamespace

    from dvfl.cli import run_command

    def interrupted(**state):
        def run(a, p):
            vars(a).update(state)
            raise KeyboardInterrupt
        return SimpleNamespace(run=run)

    p = argparse.ArgumentParser()
    for state, hint in (({"fresh_done": False}, "run the same command again, with --fresh (it had not finished "
                                                "deleting)"),
                        ({"fresh_done": True}, "run the same command again without --fresh to resume"),
                        ({}, "run the same command again without --fresh to resume")):
        assert run_command("distill", interrupted(**state), argparse.Namespace(fresh=True), p) == 130
        assert capsys.readouterr().err.strip() == f"[distill] interrupted: {hint}", state
    assert run_command("distill", interrupted(), argparse.Namespace(fresh=False), p) == 130
    assert capsys.readouterr().err.strip() == "[distill] interrupted: run the same command again to resume"


def test_a_ctrl_c_after_an_earlier_commands_sigterm_is_an_interrupt(capsys):
    """Two commands in one process (a notebook, the tests' in-process runner): the first ended by
    SIGTERM (143), the second by Ctrl+C, which was also reported as SIGTERM, exit 143."""
    import os
    import signal
    import types

    from dvfl.cli import run_command

    def terminated(a, p):
        assert callable(signal.getsignal(signal.SIGTERM)), "no handler installed: the kill would end pytest"
        os.kill(os.getpid(), signal.SIGTERM)  # the handler run_command installed raises here
        raise AssertionError("SIGTERM did not unwind the command")

    def interrupted(a, p):
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGTERM)
    a, p = argparse.Namespace(), argparse.ArgumentParser()
    assert run_command("export", types.SimpleNamespace(run=terminated), a, p) == 143
    assert run_command("export", types.SimpleNamespace(run=interrupted), a, p) == 130
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "[export] terminated (SIGTERM)" in err and "[export] interrupted" in err


def test_evaluate_with_a_config_needs_only_the_paths_it_reads(tmp_path):
    """`dvfl evaluate --config configs/ucf50.yaml --model M` was refused because the config's teacher
    checkpoint (video-focalnet_base_k400.pth) was not in the working directory: evaluate never reads it."""
    from conftest import cli_in_process

    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "dataset.json").write_text(json.dumps({"classes": ["a"], "fingerprint": "x", "shards": {},
                                                    "params": {"eval_clips": 1, "short_side": 32, "frames": 8}}))
    repo = Path(__file__).resolve().parents[1]
    r = cli_in_process("evaluate.py", "--config", repo / "configs" / "ucf50.yaml", "--model",
                       repo / "models" / "embedded_teacher", "--set", f"data.clips={clips}")
    assert r.returncode == 2 and "teacher.train.checkpoint" not in r.stderr, r.stderr
    assert "stores 1 evaluation clip(s) per video" in r.stderr  # it got as far as the clips it reads


def test_an_unreadable_config_an_unwritable_synthetic_out_and_a_job_submission_address_are_one_line(tmp_path, video_factory):
    """A config saved as Latin-1 or UTF-16 (Windows editors), a generated dataset's --out that cannot
    be written, RAY_ADDRESS set to the dashboard's http:// address (docs/cluster.md exports it for
    `ray job submit`): each ended in a traceback."""
    import subprocess

    from conftest import cli_in_process

    from dvfl.config import ConfigError, load_config

    for name, data in (("latin1.yaml", "# r\xe9sum\xe9\nseed: 1\n".encode("latin-1")),
                       ("utf16.yaml", "seed: 1\n".encode("utf-16"))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=rf"{name} is not UTF-8 text"):
            load_config(tmp_path / name, check_paths=False)
    # a cut-short dataset.json of given clips: a config error before Ray (tune and protocol showed a traceback)
    from dvfl.pipeline import check_given_inputs

    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "dataset.json").write_text('{"classes": ["a"')
    with pytest.raises(ConfigError, match=r"^data\.clips: .*dataset\.json is not valid JSON"):
        check_given_inputs(load_config(None, [("data.clips", str(tmp_path / "cut"))], check_paths=False))
    (tmp_path / "file").write_text("not a folder")
    done = cli_in_process("ingest.py", "--dataset", "synthetic", "--out", tmp_path / "file" / "x")
    assert done.returncode == 1 and "error: generating videos in" in done.stderr and "Traceback" not in done.stderr, done.stderr
    video_factory(str(tmp_path / "root" / "a" / "v.mp4"))
    video_factory(str(tmp_path / "root" / "b" / "v.mp4"), seed=1)
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "ingest.py"), "--dataset", "folder", "--root",
                           str(tmp_path / "root"), "--out", str(tmp_path / "clips"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "RAY_ADDRESS http://127.0.0.1:8265 is a cluster's job-submission" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "clips").exists(), done.stderr
    # the flag named as given, before any video is made
    done = cli_in_process("ingest.py", "--dataset", "synthetic", "--out", tmp_path / "gen", "--address", "https://head:8265")
    assert done.returncode == 2 and "--address https://head:8265 is a cluster's job-submission" in done.stderr
    assert not (tmp_path / "gen").exists()
