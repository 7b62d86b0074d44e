"""The ``dvfl`` command and the plumbing its subcommands share: one argument vocabulary, help that
shows defaults, config file + overrides, deprecated spellings, path flags made absolute.

One name per concept, in every subcommand:

- ``--config FILE``: a run config (YAML); ``--set SECTION.FIELD=VALUE`` overrides one field.
- ``--out PATH``: where this command writes what it makes (for ``distill`` and ``tune``: the run's
  ``output_dir``); ``--json FILE``: also write the printed result as JSON.
- ``--fresh``: start over instead of resuming (or refusing) what is already in ``--out``.
- ``--num-workers N``: Ray Train workers (config: ``scaling.num_workers``); ``--decode-tasks N``:
  ingest's decode tasks in flight; ``--num-cpus N``: logical CPUs of a local Ray instance.
- ``--model PATH``: a trained model (folder or checkpoint); ``--arch NAME``: an architecture.
- ``--batch-size N``, ``--threads N``, ``--gpu``, ``--quiet``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import sys

from dvfl import paths
from dvfl.config import ConfigError, RunConfig, load_config
from dvfl.host import joined_address

# subcommand -> (module in dvfl.commands, the script that runs it as ``python SCRIPT``)
COMMANDS = {
    "ingest": ("ingest", "pipelines/ingest.py"),
    "teacher": ("teacher", "pipelines/train_teacher.py"),
    "cache": ("cache", "pipelines/cache_teacher.py"),
    "distill": ("distill", "pipelines/distill.py"),
    "evaluate": ("evaluate", "pipelines/evaluate.py"),
    "protocol": ("protocol", "pipelines/protocol.py"),
    "tune": ("tune", "tuning/search.py"),
    "predict": ("predict", "pipelines/predict.py"),
    "export": ("export", "pipelines/export.py"),
    "profile": ("profile", "pipelines/profile_model.py"),
    "validate-cluster": ("validate_cluster", None),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and ends every option's help with its default, unless the
    option has none (unset, off) or its help already says what happens by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            action = copy.copy(action)  # argparse prints no help line (so no default) for an option without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def parser(module_doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    # no abbreviated flags: `--conf` for --config ran, while the cluster validator checks flags by name
    return argparse.ArgumentParser(prog=prog, description=module_doc, formatter_class=HelpFormatter, allow_abbrev=False)


def deprecated(p: argparse.ArgumentParser, old: str, use: str, dest: str, *, flag: bool = False, **kwargs) -> None:
    """Accept an old spelling, hidden from ``--help``; using it prints one warning line. It stores
    into ``dest`` (the new flag's), so nothing after parsing knows which spelling was typed."""

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {use}", file=sys.stderr)
            setattr(namespace, self.dest, True if flag else values)

    p.add_argument(old, dest=dest, action=Alias, nargs=0 if flag else None, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS, **kwargs)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 silently meant the default, -1 reached ray.init)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_num_cpus(p) -> None:
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="logical CPUs of a local Ray instance (default: 2 x cores, dvfl.runtime.ray_runtime); "
                        "ignored when joining a cluster")


def add_config_args(p: argparse.ArgumentParser, out_is_output_dir: bool = False) -> None:
    """``--config``/``--set``/``--num-cpus``. ``out_is_output_dir``: the command's ``--out`` is the
    run's ``output_dir`` (distill, tune); elsewhere the old ``--output-dir`` is ``--set output_dir=``."""
    p.add_argument("--config", help="YAML run config (default: configs/embedded.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value, e.g. --set kd.temperature=2 (repeatable)")
    add_num_cpus(p)
    if out_is_output_dir:
        deprecated(p, "--output-dir", "--out", "out")
    else:
        deprecated(p, "--output-dir", "--set output_dir=DIR", "output_dir")


def add_fresh(p, what: str, old: str | None = None) -> None:
    p.add_argument("--fresh", action="store_true", help=f"start over: {what}")
    if old:
        deprecated(p, old, "--fresh", "fresh", flag=True)


def add_num_workers(p, help_text: str = "Ray Train workers (config: scaling.num_workers)") -> None:
    p.add_argument("--num-workers", type=int, help=help_text)
    deprecated(p, "--workers", "--num-workers", "num_workers", type=int)


def check_gpu_reachable(use_gpu: bool) -> None:
    """GPUs asked of Ray on a machine with none and no cluster joined: Ray would wait for ever."""
    if use_gpu and not joined_address():
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("scaling.use_gpu is true, but this machine has no GPU (torch sees none) and "
                              "no cluster is joined (RAY_ADDRESS): leave out --gpu, --set scaling.use_gpu=false for a "
                              "config that asks for GPUs, or run it on a GPU machine")


def check_training_fits(cfg: RunConfig, resources: dict, nodes: list[dict] | None = None) -> None:
    """A training run whose workers the local Ray instance cannot place waits for ever (Ray Train
    retries its worker group without end), after the ingest and the cache: refused up front. A
    joined cluster (RAY_ADDRESS) is left to Ray, as its autoscaler may add the nodes, but a worker
    that no node (``nodes``: each alive node's resources; default Ray's) can hold is said."""
    if joined_address():
        from dvfl.runtime import alive_node_resources, note_no_node_holds, worker_bundle

        note_no_node_holds("one training worker", worker_bundle(cfg.scaling),
                           alive_node_resources() if nodes is None else nodes,
                           "lower scaling.cpus_per_worker / scaling.worker_resources")
        return
    from dvfl.data.shards import READ_TASK_CPUS

    s = cfg.scaling
    # + a read task's 0.25 CPU: data too large to hold is read every epoch beside the workers (hang #1)
    need = {"CPU": s.num_workers * s.cpus_per_worker + READ_TASK_CPUS,
            **({"GPU": float(s.num_workers)} if s.use_gpu else {}),
            **{k: s.num_workers * v for k, v in (s.worker_resources or {}).items()}}
    short = [f"{amount:g} {key} (Ray has {resources.get(key, 0.0):g})" for key, amount in need.items()
             if resources.get(key, 0.0) + 1e-9 < amount]
    if short:
        raise ConfigError(f"scaling.num_workers {s.num_workers} x (scaling.cpus_per_worker {s.cpus_per_worker:g}"
                          f"{', a GPU' if s.use_gpu else ''}{', scaling.worker_resources' if s.worker_resources else ''})"
                          f" + {READ_TASK_CPUS:g} CPU for Ray Data's reads needs {', '.join(short)}: lower "
                          "scaling.num_workers or the per-worker resources, or give Ray more (--num-cpus), or "
                          "training would wait for ever")


def fits_ray(cfg: RunConfig, resources: dict, paths: tuple[dict, dict] | None = None) -> bool:
    """:func:`check_training_fits` and :func:`paths_on_every_node` (of ``paths``, default
    :func:`run_paths`), a refusal printed as a config error."""
    try:
        check_training_fits(cfg, resources)
        return paths_on_every_node(*(paths or run_paths(cfg)))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return False


def cpus_refused_before_videos(cfg: RunConfig, num_cpus: int | None, check=None) -> bool:
    """Before the embedded default's videos are made (minutes; before Ray starts, as the generator
    forks): a run the local Ray instance about to start lacks the CPUs for, refused now as it would
    be once Ray is up (``check(cfg, resources)``, default :func:`check_training_fits`), the config
    error printed. GPUs and custom resources are checked then (only Ray knows a machine's)."""
    import dataclasses

    import ray

    from dvfl.host import usable_cpus
    from dvfl.runtime import LOCAL_CPU_OVERSUBSCRIPTION

    if ray.is_initialized() or joined_address():
        return False
    cpus_only = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, use_gpu=False, worker_resources=None))
    try:
        (check or check_training_fits)(cpus_only, {"CPU": float(num_cpus or usable_cpus() * LOCAL_CPU_OVERSUBSCRIPTION)})
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return True
    return False


def clips_own_settings(clips: str | None) -> dict:
    """What an ingest's ``dataset.json`` says of its clips, as ``data.*`` fields ({} where there is none
    yet: the command says so)."""
    from dvfl import pipeline
    from dvfl.data.shards import load_dataset_info

    try:
        info = load_dataset_info(clips) if clips else None
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict) or not isinstance(info.get("params"), dict):
        return {}
    own = {"dataset": info.get("dataset"), "short_side": info["params"].get("short_side"),
           "frames": info["params"].get("frames"), "clips_per_video": info["params"].get("clips_per_video"),
           "split": pipeline.clips_split(info)}
    return {k: v for k, v in own.items() if v is not None}


def run_paths(cfg: RunConfig, *, clips_only: bool = False) -> tuple[dict, dict]:
    """(outputs, inputs): the folders a run's Ray tasks and actors write and read, by field. A given
    teacher is not one: the driver loads it and sends its weights. ``clips_only``: what training a
    teacher or testing one reads (no cache, no unlabelled pool)."""
    from dvfl import storage
    from dvfl.data.shards import DATASET_JSON
    from dvfl.teacher_cache import CACHE_JSON

    clips_done = storage.isfile(storage.join(cfg.clips_dir, DATASET_JSON))
    cache = cfg.cache_dir if cfg.teacher.mode == "cached" and not clips_only else None
    cache_done = bool(cache) and storage.isfile(storage.join(cache, CACHE_JSON))
    outputs = {"output_dir": cfg.output_dir, "data.clips": None if clips_done else cfg.clips_dir,
               "teacher.cache": None if cache_done else cache}
    inputs = {"data.clips": cfg.clips_dir if clips_done else None, "teacher.cache": cache if cache_done else None,
              "data.unlabeled": None if clips_only else cfg.data.unlabeled,
              "data.root": None if clips_done else cfg.data.root}  # (not read once the clips are made)
    return outputs, inputs


def paths_on_every_node(outputs: dict, inputs: dict | None = None) -> bool:
    """False, with a config error printed, where a local path (field -> path) is not
    on every node of the cluster Ray runs (:func:`dvfl.runtime.unseen_local_paths`)."""
    from dvfl.runtime import NO_PATH_PROBE_ENV, unseen_local_paths

    unseen = unseen_local_paths(outputs, inputs)
    if unseen:
        print(f"config error: {'; '.join(unseen)}: Ray's tasks on other nodes write and read it there. On a "
              "cluster of several nodes give a URI (s3://, gs://) or a folder every node mounts at the same path "
              f"(a shared mount slow to show new files to other nodes: {NO_PATH_PROBE_ENV}=1)", file=sys.stderr)
    return not unseen


def config_from_args(a: argparse.Namespace, extra: dict | None = None, outputs=(), uses_ray_gpus: bool = True) -> RunConfig:
    """Load + override + validate; on a bad value print the field and exit before any work.
    ``outputs``: path fields the command writes (e.g. ``teacher.path`` for ``dvfl teacher``);
    ``uses_ray_gpus=False``: a command that picks its own device (evaluate) takes a GPU config anywhere."""
    overrides = list(a.overrides)
    if getattr(a, "output_dir", None):
        overrides.append(("output_dir", a.output_dir))
    for key, value in (extra or {}).items():
        if value is not None:
            overrides.append((key, value))
    try:
        cfg = load_config(a.config, overrides, outputs=outputs)
        if uses_ray_gpus:
            check_gpu_reachable(cfg.scaling.use_gpu)
        return cfg
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)


def set_value(a: argparse.Namespace, key: str):
    """The last ``--set KEY=VALUE`` of the command line (None without one; a malformed ``--set`` is
    left to the config's own error)."""
    from dvfl.config import ConfigError, parse_override

    found = None
    for item in a.overrides:
        try:
            k, v = parse_override(item) if isinstance(item, str) else item
        except ConfigError:
            continue
        found = v if k == key else found
    return found


def uses_config(a: argparse.Namespace) -> bool:
    """A stage run from a config file (``--config`` or ``--set``) derives its paths from it."""
    return bool(a.config or a.overrides)


def absolute_path_args(a: argparse.Namespace, inputs=(), outputs=(), plain_outputs=()) -> None:
    """Make path flags absolute before Ray sees them (:mod:`dvfl.paths`): ``inputs`` relative to
    the current directory, ``outputs`` likewise, or under the job root inside a Ray job, and refused
    where pyarrow cannot open their names (not UTF-8), except ``plain_outputs``: files Python itself
    writes (predict's and profile's JSON reports)."""
    def fix(value, resolve):
        return [resolve(v) for v in value] if isinstance(value, list) else resolve(value)

    for name in (*inputs, *outputs, *plain_outputs):  # "" is the working directory (single flags: run_command)
        if isinstance(getattr(a, name), list) and "" in getattr(a, name):
            flag = "a path argument" if name == "inputs" else f"--{name.replace('_', '-')}"
            print(f"error: {flag} is empty: give a path (an unset shell variable?)", file=sys.stderr)
            raise SystemExit(2)
    for names, resolve in ((inputs, paths.absolute_input),
                           (outputs, lambda v: paths.writable_name(paths.absolute(v, paths.output_base()))),
                           (plain_outputs, lambda v: paths.absolute(v, paths.output_base()))):
        for name in names:
            try:
                setattr(a, name, fix(getattr(a, name), resolve))
            except ValueError as exc:  # (file://HOST/...: a traceback)
                print(f"error: --{name.replace('_', '-')}: {exc}", file=sys.stderr)
                raise SystemExit(2)


def local_outputs(p: argparse.ArgumentParser, a: argparse.Namespace, *names: str) -> None:
    """Outputs written to local disk only (model files for serving and export): an object-store
    URI is refused before any work, not turned into a folder called ``s3:`` in the working directory."""
    from dvfl import storage

    for name in names:
        value = getattr(a, name, None)
        if value and storage.is_remote(value):
            p.error(f"--{name.replace('_', '-')} {value}: must be a local path (this output is not written to "
                    "object storage)")


def announce_job_outputs(output_dir: str, log=print) -> None:
    """Under ``ray job submit``, say where the results go: not the job's temporary working copy."""
    if paths.in_job_working_dir():
        log(f"[paths] Ray job {paths.ray_job_id() or ''}: relative output paths resolve under {paths.job_root()} "
            f"(${paths.JOB_ROOT_ENV}), outside the job's temporary working directory; results: {output_dir}")


def command_module(name: str):
    return importlib.import_module(f"dvfl.commands.{COMMANDS[name][0]}")


def script_main(name: str, argv=None) -> int:
    """``python pipelines/<stage>.py ...``: the subcommand under the script's own name."""
    module = command_module(name)
    script = COMMANDS[name][1]
    p = parser(module.__doc__, prog=f"python {script}" if script else f"dvfl {name}")
    module.add_arguments(p)
    a = p.parse_args(argv)
    return run_command(name, module, a, p)


def build_parser() -> argparse.ArgumentParser:
    p = parser("DVFL-Net on Ray: every stage of the pipeline as a subcommand. "
               "`dvfl COMMAND --help` shows a command's options and their defaults.", prog="dvfl")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = command_module(name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sp = sub.add_parser(name, help=summary, description=module.__doc__, formatter_class=HelpFormatter,
                            allow_abbrev=False)
        module.add_arguments(sp)
        sp.set_defaults(command_parser=sp)  # run() reports usage errors against the subcommand
    return p


def main(argv=None) -> int:
    """The ``dvfl`` console script (``[project.scripts]``) and ``python -m dvfl``."""
    a = build_parser().parse_args(argv)
    return run_command(a.command, command_module(a.command), a, a.command_parser)


PATH_FLAGS = ("out", "root", "clips", "teacher", "model", "json", "confusion", "config", "search", "output_dir",
              "videos_dir", "lists_dir", "classes", "checkpoint", "init_2d", "test_config", "publish", "golden",
              "crd_dir")
RESUMABLE = {"ingest", "teacher", "cache", "distill", "protocol", "tune"}  # a rerun continues where they stopped


def line_buffered_stdout() -> None:
    """Each line of ours (and of Ray's forwarded worker output) written when printed, also into a
    file or a pipe (``> run.log``, ``| tee``), where Python would hold 8 KiB of them back: epoch
    lines would show up hours late, after the stderr lines printed after them."""
    if isinstance(sys.stdout, io.TextIOWrapper) and not sys.stdout.line_buffering:
        sys.stdout.reconfigure(line_buffering=True)


def run_command(name: str, module, a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """Run a subcommand; Ctrl+C or SIGTERM ends it with one line and exit status 130 or 143, not a
    traceback (Ray is shut down and locks released on the way out)."""
    line_buffered_stdout()
    def hint() -> str:  # the same command with --fresh would delete what was done again
        if name not in RESUMABLE:
            return ""
        if getattr(a, "fresh", False) and not getattr(a, "fresh_done", True):  # (a command that says when it is)
            return ": run the same command again, with --fresh (it had not finished deleting)"
        return ": run the same command again" + (" without --fresh" if getattr(a, "fresh", False) else "") + " to resume"

    for dest in PATH_FLAGS:  # "--out $UNSET": "" read as the working directory, or as no flag (the default folder)
        if getattr(a, dest, None) == "":
            p.error(f"--{dest.replace('_', '-')} is empty: give a path (an unset shell variable?)")
    if name in RESUMABLE:  # before the videos they make ahead of Ray (found at Ray's start, after them)
        from dvfl.host import job_submission_address

        refusal = job_submission_address(getattr(a, "address", None))
        if refusal:
            print(f"config error: {refusal}", file=sys.stderr)
            return 2
    from dvfl import signals

    # (before any work: a SIGTERM while the embedded default's videos are made, before Ray starts,
    # killed the command without a word and left the generator's processes writing the run folder)
    signals.forget_sigterm()
    previous = signals.terminate_in_one_line()
    try:
        return module.run(a, p)
    except KeyboardInterrupt:
        if signals.sigterm_received():
            print(f"[{name}] terminated (SIGTERM){hint()}", file=sys.stderr, flush=True)
            return 143  # 128 + SIGTERM, as a shell reports a process the signal ended
        print(f"\n[{name}] interrupted{hint()}", file=sys.stderr, flush=True)
        return 130
    finally:
        if previous is not None:  # (a command run in a caller's process leaves its handler as it was)
            import signal

            signal.signal(signal.SIGTERM, previous)


def generate_videos(cfg) -> bool:
    """The embedded default's videos, made before Ray starts (the generator forks processes);
    False, with the config error printed, where they cannot be (output_dir a URI without clips)."""
    from dvfl import pipeline
    from dvfl.data.synthetic import VideoFolderError

    try:
        pipeline.ensure_videos(cfg)
    except (ConfigError, VideoFolderError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return False
    return True


def actionable_failure(exc: BaseException) -> BaseException | None:
    """The error a user can act on (a diverged loss, a teacher near chance, a mismatched cache, too
    few or damaged clips, a folder another command is writing), found through Ray's wrappers (a
    runner's RayTaskError, a worker group's TrainingFailedError), to print as one line instead of a
    traceback through Ray's internals; None for anything else."""
    from dvfl.data.holdout import HoldoutError
    from dvfl.data.ingest import NothingWrittenError, VideoNotOnNodeError
    from dvfl.data.shards import ClipReadError, CorruptShardError, IncompleteClipsError
    from dvfl.locks import FolderBusyError
    from dvfl.models import CheckpointError
    from dvfl.pipeline import TeacherGateError
    from dvfl.teacher_cache import CacheMismatchError
    from dvfl.train.launch import NotEnoughClipsError
    from dvfl.train.loop import TrainingDiverged

    known = (TrainingDiverged, TeacherGateError, CacheMismatchError, NotEnoughClipsError, CorruptShardError,
             IncompleteClipsError, FolderBusyError, HoldoutError, CheckpointError, VideoNotOnNodeError,
             NothingWrittenError, ClipReadError)
    return _behind(exc, known)


def _behind(exc: BaseException, kinds: tuple, *, suppressed_context: bool = True) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``'s chain, through Ray's wrappers (a RayTaskError(X)
    is an X whose ``cause`` is the original, returned; a worker group's failures);
    ``suppressed_context=False``: not behind an error raised ``from None``."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, kinds):
            return cause if isinstance(cause, kinds) else e
        context = e.__context__ if suppressed_context or not e.__suppress_context__ else None
        todo += [e.__cause__, context, cause, *(getattr(e, "worker_failures", None) or {}).values()]
    return None


def os_error_line(exc: BaseException) -> str:
    """An OSError's own text (disk full, quota, permissions), not Ray's reformatted remote traceback
    that ``str()`` of a ``RayTaskError(OSError)`` gives."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)


def environment_failure(exc: BaseException) -> OSError | None:
    """The OSError (a full disk, a quota, a permission) behind ``exc``, through Ray's wrappers; not
    one behind an error raised ``from None`` (its own words count)."""
    return _behind(exc, (OSError,), suppressed_context=False)


@contextlib.contextmanager
def failures_as_one_line(stage: str):
    """Inside: an error the user can act on (:func:`actionable_failure`, or an OSError: a full disk,
    a permission) ends the command with one ``[stage] error: ...`` line and exit status 1, a config
    error with ``config error: ...`` and 2; anything else propagates with its traceback."""
    try:
        yield
    except ConfigError as exc:  # found once Ray is up (splits data.root lists): exit 2, as before Ray
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        known = actionable_failure(exc) or environment_failure(exc)
        if known is None:
            raise
        print(f"[{stage}] error: {known}", file=sys.stderr)
        raise SystemExit(1) from None
