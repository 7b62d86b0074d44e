"""Where relative paths point: resolved once, at the entry point, before Ray sees them.

Ray runs Tune trials in per-trial working directories and ``ray job submit`` runs the driver in a
temporary copy of the working directory that ``ray stop`` deletes; a relative path handed to
either silently means another place. So every path of a run config is made absolute by
:meth:`dvfl.config.RunConfig.resolve_paths` while the process still stands where the user typed the command.

Under a Ray job, outputs go to a persistent folder outside the temporary copy
(``$DVFL_JOB_ROOT``, default ``~/dvfl-jobs``), so results survive the job and ``ray stop`` and a
second submission of the same job reuses its finished stages.
"""
from __future__ import annotations

import json
import os

JOB_ROOT_ENV = "DVFL_JOB_ROOT"
DEFAULT_JOB_ROOT = "~/dvfl-jobs"
# Ray unpacks a job's --working-dir below <session>/runtime_resources/working_dir_files/
_JOB_WORKING_DIR_MARK = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint


def is_uri(path: str) -> bool:
    """``s3://b/x``, ``gs://b/x``, ``file:///x``: left as they are."""
    return "://" in path


def ray_job_id() -> str | None:
    """The submission id when this process is a ``ray job submit`` entrypoint, else None."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or "unknown"
    except ValueError:
        return "unknown"


def in_job_working_dir(cwd: str | None = None) -> bool:
    """True when the current directory is a Ray job's temporary copy of the working directory."""
    return _JOB_WORKING_DIR_MARK in os.path.join(os.path.abspath(cwd or os.getcwd()), "")


def job_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(JOB_ROOT_ENV) or DEFAULT_JOB_ROOT))


def output_base(cwd: str | None = None) -> str:
    """What a relative *output* path is relative to: the job root inside a job's temporary
    working directory, the current directory otherwise."""
    cwd = os.path.abspath(cwd or os.getcwd())
    return job_root() if in_job_working_dir(cwd) else cwd


def absolute(path: str | None, base: str) -> str | None:
    """``path`` made absolute against ``base`` (``~`` expanded); None and URIs unchanged, except
    ``file://`` URIs, which become the local path they name."""
    if path is not None and path.startswith("file://"):
        from dvfl.storage import local_path  # (taken literally: '#' and '?' are part of the path)

        return os.path.normpath(local_path(path))
    if path is None or is_uri(path):
        return path
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def writable_name(path: str | None) -> str | None:
    """``path``, refused (ValueError) where its name is not UTF-8 (a Latin-1 folder of an old NAS):
    pyarrow, which writes every artefact, cannot open it (a traceback from the first write)."""
    try:
        (path or "").encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{path.encode('utf-8', 'surrogateescape')!r} is not a UTF-8 name, which pyarrow (it "
                         "writes the outputs) cannot open: write elsewhere, or rename the folder") from None
    return path


def absolute_input(path: str | None, cwd: str | None = None) -> str | None:
    """An input: relative to the current directory; inside a job's temporary working directory a
    path that is not among the shipped files is looked up under the job root (an earlier job's
    output, e.g. clips ingested by a previous submission)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    here = absolute(path, cwd)
    if here is None or is_uri(here) or not in_job_working_dir(cwd) or os.path.exists(here):
        return here
    return absolute(path, job_root())


def as_given(path: str | None, cwd: str | None = None) -> str | None:
    """A resolved input path as it should be written into a file that outlives this process:
    inside a job's temporary working directory, a path into that copy becomes relative (to the
    current directory) again (the user's checkout has the same files; the copy goes with ``ray
    stop``). Otherwise unchanged."""
    cwd = os.path.abspath(cwd or os.getcwd())
    if path is None or is_uri(path) or not in_job_working_dir(cwd):
        return path
    root = _job_copy_root(cwd)
    if path == root or path.startswith(root + os.sep):
        return os.path.relpath(path, cwd)  # ('..' too: the entrypoint may have changed into a subfolder)
    return path


def _job_copy_root(cwd: str) -> str:
    """The root of the job's temporary copy holding ``cwd``: <...>/working_dir_files/<package dir>."""
    head, _, rest = os.path.join(cwd, "").partition(_JOB_WORKING_DIR_MARK)
    return head + _JOB_WORKING_DIR_MARK + rest.split(os.sep, 1)[0]
