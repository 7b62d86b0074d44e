"""The cluster configs in cluster/ validate offline, and broken copies of them do not.

Every check is the real validator (Ray's schema and private prepare/validate helpers, Ray's KubeRay
translation, the KubeRay CRDs from ../shared/reference): nothing is mocked. Each broken copy
changes one thing and must fail in the layer that is meant to catch it.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dvfl.cli import main as dvfl_main
from dvfl.cluster import validate as cv

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = {"aws": ROOT / "cluster" / "aws.yaml", "gcp": ROOT / "cluster" / "gcp.yaml"}
KUBERAY = {
    "raycluster": ROOT / "cluster" / "kuberay" / "raycluster.yaml",
    "rayjob": ROOT / "cluster" / "kuberay" / "rayjob.yaml",
}
ALL_FILES = [*LAUNCHER.values(), *KUBERAY.values()]


@pytest.fixture(scope="module", autouse=True)
def fresh_schema_cache(tmp_path_factory):
    """The strict CRD schemas are built from the CRD YAML in this run (not read from a cache left
    by an earlier version of the code); the CLI subprocess below then reuses this run's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    cv._kuberay_crd_schema_cached.cache_clear()
    cv._crd_validator.cache_clear()
    yield
    cv._kuberay_crd_schema_cached.cache_clear()
    cv._crd_validator.cache_clear()
    mp.undo()


def _load(path: Path) -> dict:
    """The file's Ray document (a KubeRay file also holds its NetworkPolicies)."""
    (doc,) = [d for d in cv.load_documents(path) if d.get("kind") != "NetworkPolicy"]
    return doc


def _policies(path: Path) -> list[tuple[int, dict]]:
    return [(n, d) for n, d in enumerate(cv.load_documents(path)) if d.get("kind") == "NetworkPolicy"]


@pytest.fixture(scope="module")
def launcher_docs() -> dict[str, dict]:
    return {name: _load(p) for name, p in LAUNCHER.items()}


@pytest.fixture(scope="module")
def kuberay_docs() -> dict[str, dict]:
    return {name: _load(p) for name, p in KUBERAY.items()}


def _assert_fails(errors: list[str], layer: str, *fragments: str) -> None:
    assert errors, "the broken copy passed validation"
    hits = [e for e in errors if e.startswith(f"[{layer}]") and all(f in e for f in fragments)]
    assert hits, f"no [{layer}] error mentioning {fragments}; got:\n" + "\n".join(errors)


# ------------------------------------------------------------------------------------------
# the shipped configs
# ------------------------------------------------------------------------------------------
def test_crds_found_beside_the_repository():
    # CI: a clean clone with shared/ copied beside it at ../shared (same layout as here).
    assert cv.find_crd_dir() == cv.DEFAULT_CRD_DIR
    assert cv.DEFAULT_CRD_DIR == ROOT.parent / "shared" / "reference" / "kuberay-crd-v1.7.0"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_every_config_validates(path):
    report = cv.validate_file(path)
    assert report.ok, "\n".join(report.errors)
    assert report.summaries


def test_validation_never_touches_the_network(monkeypatch):
    """prepare_config/validate_config and the KubeRay translation run offline (no cloud, no API
    server): any socket connection attempt during validation fails this test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for path in ALL_FILES:
        assert cv.validate_file(path).ok


def test_translation_gives_cpu_and_gpu_worker_groups(kuberay_docs):
    for doc in kuberay_docs.values():
        ((_, spec),) = cv._cluster_specs(doc)
        config = cv._translate(doc, spec)
        types = config["available_node_types"]
        assert types["headgroup"]["resources"]["CPU"] == 0
        assert types["cpu-workers"]["resources"].get("GPU", 0) == 0
        assert types["cpu-workers"]["max_workers"] >= 1
        assert types["gpu-workers"]["resources"]["GPU"] >= 1
        assert types["gpu-workers"]["min_workers"] == 0 < types["gpu-workers"]["max_workers"]


def test_rayjob_entrypoint_is_the_main_job(kuberay_docs):
    """The RayJob runs the UCF101 config as written (from the project image), with every relative
    path of it pointed at the volume every pod mounts."""
    spec = kuberay_docs["rayjob"]["spec"]
    assert spec["entrypoint"].startswith(f"python {cv.PROJECT_DIR_IN_IMAGE}/pipelines/distill.py "
                                         f"--config {cv.PROJECT_DIR_IN_IMAGE}/configs/ucf101_base.yaml ")
    # the config itself keeps relative paths (for a local run); the job overrides each of them
    tree = yaml.safe_load((ROOT / "configs" / "ucf101_base.yaml").read_text())
    relative = {"output_dir": tree["output_dir"], "data.clips": tree["data"]["clips"],
                "teacher.path": tree["teacher"]["path"], "teacher.cache": tree["teacher"]["cache"]}
    assert all(not v.startswith("/") for v in relative.values())
    assert cv.job_config_path_errors(kuberay_docs["rayjob"]) == []
    assert "working_dir" not in (yaml.safe_load(spec["runtimeEnvYAML"]) or {})   # the code is in the image


# the UCF101 search as a RayJob runs it, every path of its run config on the shared volume
_UCF101_SEARCH = (f"python {cv.PROJECT_DIR_IN_IMAGE}/tuning/search.py --search {cv.PROJECT_DIR_IN_IMAGE}/configs/"
                  "tune_ucf101.yaml --out /data/runs/tune --set data.clips=/data/ucf101_s1 --set teacher.path=/data/"
                  "models/ucf101_teacher --set teacher.cache=/data/ucf101_s1_cache")


_UCF101_PROTOCOL = (f"python {cv.PROJECT_DIR_IN_IMAGE}/pipelines/protocol.py --config {cv.PROJECT_DIR_IN_IMAGE}/configs/"
                    "ucf101_base.yaml --splits 1 --out /data/protocol --set output_dir=/data/runs/proto --set "
                    "data.clips=/data/ucf101_s1 --set teacher.path=/data/models/t --set teacher.cache=/data/ucf101_s1_cache")
_UCF101_TEACHER = (f"dvfl teacher --config {cv.PROJECT_DIR_IN_IMAGE}/configs/ucf101_base.yaml --out /data/models/t "
                   "--set output_dir=/data/runs/t --set data.clips=/data/ucf101_s1 --set teacher.cache=/data/c")
_UCF101_INGEST = (f"python {cv.PROJECT_DIR_IN_IMAGE}/pipelines/ingest.py --dataset ucf101 --root /data/UCF101 --split 1 "
                  "--out /data/ucf101_s1 --short-side 256 --clips-per-video 4 --eval-clips 4")


def _entrypoint(doc, fn):
    doc["spec"]["entrypoint"] = fn(doc["spec"]["entrypoint"])
    return doc


@pytest.mark.parametrize("breakage, fragments", [
    # the config's own relative path: resolved in the job's temporary directory on the head pod
    (lambda d: _entrypoint(d, lambda e: e.replace(" --set data.clips=/data/ucf101_s1", "")),
     ("spec.entrypoint", "data.clips is 'data/ucf101_s1' (relative")),
    (lambda d: _entrypoint(d, lambda e: e.replace("--out /data/runs/ucf101_base", "--out runs/x")),
     ("output_dir is 'runs/x' (relative",)),
    # the same with the flags' other spellings
    (lambda d: _entrypoint(d, lambda e: e.replace("--out /data/runs/ucf101_base", "--output-dir=runs/x")),
     ("output_dir is 'runs/x' (relative",)),
    (lambda d: _entrypoint(d, lambda e: e.replace("--set data.clips=/data/ucf101_s1", "--clips=data/c")),
     ("data.clips is 'data/c' (relative",)),
    # no --config: the embedded default, whose output_dir is relative
    (lambda d: _entrypoint(d, lambda e: "python /home/ray/dvfl/pipelines/distill.py"),
     ("output_dir is 'runs/embedded' (relative, from configs/embedded.yaml",)),
    (lambda d: _entrypoint(d, lambda e: "python /home/ray/dvfl/tuning/search.py --out runs/t"),
     ("output_dir is 'runs/t' (relative, from configs/tune_embedded.yaml",)),
    # absolute, but on the head pod's own disk
    (lambda d: _entrypoint(d, lambda e: e.replace("teacher.cache=/data/", "teacher.cache=/tmp/")),
     ("teacher.cache is '/tmp/ucf101_s1_cache': not on a volume",)),
    # the volume is not mounted in every group: the GPU workers would not see the clips
    (lambda d: _set(d, lambda d: _ray_container(_group(d, "gpu-workers")).update(
        volumeMounts=[m for m in _ray_container(_group(d, "gpu-workers"))["volumeMounts"] if m["name"] != "data"])),
     ("data.clips is '/data/ucf101_s1': not on a volume",)),
    # a search's experiment storage, from its --set or its search file (session 28: not checked before)
    (lambda d: _entrypoint(d, lambda e: _UCF101_SEARCH + " --set tune.storage=tune_runs"),
     ("tune.storage is 'tune_runs' (relative, from configs/tune_ucf101.yaml",)),
    (lambda d: _entrypoint(d, lambda e: _UCF101_SEARCH + " --set tune.storage=/tmp/tune"),
     ("tune.storage is '/tmp/tune': not on a volume",)),
    # the same search through the `dvfl` entry point (read as a distill of configs/embedded.yaml before)
    (lambda d: _entrypoint(d, lambda e: _UCF101_SEARCH.replace(f"python {cv.PROJECT_DIR_IN_IMAGE}/tuning/search.py",
                                                               "dvfl tune") + " --set tune.storage=tune_runs"),
     ("tune.storage is 'tune_runs' (relative, from configs/tune_ucf101.yaml",)),
    # a path flag wins over a --set of its field wherever it stands (the commands apply it last)
    (lambda d: _entrypoint(d, lambda e: e.replace("--out /data/runs/ucf101_base", "--out /tmp/x")
                           + " --set output_dir=/data/runs/x"),
     ("output_dir is '/tmp/x': not on a volume",)),
    # /data in every pod, but not the same files: a pod's own emptyDir, or another claim
    (lambda d: _set(d, lambda d: _replace_volume(_group(d, "gpu-workers"), {"name": "data", "emptyDir": {}})),
     ("data.clips is '/data/ucf101_s1': not on a volume", "not an emptyDir")),
    (lambda d: _set(d, lambda d: _replace_volume(_group(d, "cpu-workers"),
                                                 {"name": "data", "persistentVolumeClaim": {"claimName": "other"}})),
     ("teacher.cache is '/data/ucf101_s1_cache': not on a volume",)),
    # --out is not output_dir for every command (session 41: a protocol's --out hid its relative runs)
    (lambda d: _entrypoint(d, lambda e: _UCF101_PROTOCOL.replace(" --set output_dir=/data/runs/proto", "")),
     ("output_dir is 'runs/ucf101_base' (relative",)),
    (lambda d: _entrypoint(d, lambda e: _UCF101_PROTOCOL.replace("--out /data/protocol", "--out protocol")),
     ("--out is 'protocol' (relative, from configs/ucf101_base.yaml",)),
    (lambda d: _entrypoint(d, lambda e: _UCF101_TEACHER + " --checkpoint video-focalnet_base_k400.pth"),
     ("teacher.train.checkpoint is 'video-focalnet_base_k400.pth' (relative",)),
    (lambda d: _entrypoint(d, lambda e: _UCF101_INGEST.replace("--out /data/ucf101_s1", "--out data/ucf101_s1")),
     ("--out is 'data/ucf101_s1' (relative, from `ingest`'s flags",)),
    (lambda d: _entrypoint(d, lambda e: _UCF101_INGEST.replace("--root /data/UCF101", "--root /tmp/UCF101")),
     ("--root is '/tmp/UCF101': not on a volume",)),
    (lambda d: _entrypoint(d, lambda e: "python /home/ray/my_job.py --out /data/x"),
     ("runs none of the commands whose paths can be checked",)),
    # a chained entrypoint: every command's paths (only the first one's were read)
    (lambda d: _entrypoint(d, lambda e: _UCF101_INGEST + " && " + e.replace(" --set data.clips=/data/ucf101_s1", "")),
     ("data.clips is 'data/ucf101_s1' (relative",)),
    (lambda d: _entrypoint(d, lambda e: e + "; " + e.replace("--out /data/runs/ucf101_base", "--out runs/x")),
     ("output_dir is 'runs/x' (relative",)),
    (lambda d: _entrypoint(d, lambda e: _UCF101_INGEST + "\n" + e.replace("--out /data/runs/ucf101_base", "--out runs/x")),
     ("output_dir is 'runs/x' (relative",)),
    # a comment line is not run, the command after it is
    (lambda d: _entrypoint(d, lambda e: "# " + e + "\n" + e.replace("--out /data/runs/ucf101_base", "--out runs/x")),
     ("output_dir is 'runs/x' (relative",)),
    (lambda d: _entrypoint(d, lambda e: e.replace("--out /data/runs/ucf101_base", "--out /data/../tmp/runs")),
     ("output_dir is '/data/../tmp/runs': not on a volume",)),
], ids=["config_relative_path", "relative_output_dir", "relative_output_dir_old_flag", "relative_clips_flag",
        "embedded_default", "embedded_search", "path_off_the_volume", "volume_not_on_every_group",
        "search_storage_relative", "search_storage_off_the_volume", "dvfl_tune_entry_point",
        "path_flag_before_set", "emptydir_at_the_mount_path", "another_claim_at_the_mount_path",
        "protocol_runs_relative", "protocol_out_relative", "teacher_checkpoint_relative", "ingest_out_relative",
        "ingest_videos_off_the_volume", "another_program", "chained_second_command", "chained_with_semicolon", "chained_on_lines", "after_a_comment_line",
        "dot_dot_off_the_volume"])
def test_rayjob_paths_must_be_uris_or_on_a_shared_volume(kuberay_docs, breakage, fragments):
    broken = breakage(copy.deepcopy(kuberay_docs["rayjob"]))
    _assert_fails(cv.validate_kuberay_manifest(broken), "policy", *fragments)


def test_rayjob_path_flags_are_read_as_their_command_reads_them(kuberay_docs):
    """--out is the teacher's teacher.path (a teacher job on the claim was refused for its config's
    output_dir... and a protocol's relative runs passed); an ingest job reads no run config. The
    table agrees with the commands' own parsers."""
    import argparse

    from dvfl.cli import COMMANDS, command_module

    distill = kuberay_docs["rayjob"]["spec"]["entrypoint"]
    for entry in (_UCF101_PROTOCOL, _UCF101_TEACHER, _UCF101_INGEST,
                  # a commented-out command (its relative paths) is not run
                  f"# python {cv.PROJECT_DIR_IN_IMAGE}/pipelines/distill.py --out runs/x\n" + _UCF101_INGEST + "  # the clips",
                  _UCF101_TEACHER.replace("dvfl teacher", "python -m dvfl teacher"),
                  # `dvfl` after a cd or an assignment (refused as another program by the first version)
                  distill.replace(f"python {cv.PROJECT_DIR_IN_IMAGE}/pipelines/distill.py", f"cd {cv.PROJECT_DIR_IN_IMAGE} && dvfl distill"),
                  distill.replace(f"python {cv.PROJECT_DIR_IN_IMAGE}/pipelines/distill.py", "PYTHONUNBUFFERED=1 dvfl distill"),
                  f"python {cv.PROJECT_DIR_IN_IMAGE}/pipelines/train_teacher.py --clips /data/c --out /data/m "
                  "--set output_dir=/data/runs/t",
                  # from flags alone its run folder is beside the model (dvfl/commands/teacher.py): /data/m/_work
                  "dvfl teacher --clips /data/c --out /data/m --epochs 3"):
        assert cv.job_config_path_errors(_entrypoint(copy.deepcopy(kuberay_docs["rayjob"]), lambda e: entry)) == [], entry
    # a teacher from flags alone still reads its --set paths (its output_dir holds Ray Train's checkpoints),
    # and a published teacher's --test-config ingests under that config's own paths
    for entry, says in ((f"dvfl teacher --clips /data/c --out /data/m --set output_dir=runs/t", "output_dir is 'runs/t'"),
                        (f"dvfl teacher --clips /data/c --out m", "output_dir is 'm/_work' (relative"),
                        (_UCF101_TEACHER + f" --publish /data/pub --test-config {cv.PROJECT_DIR_IN_IMAGE}/configs/ucf101_base.yaml",
                         "--test-config's data.clips is 'data/ucf101_s1' (relative"),
                        (_UCF101_TEACHER + " --publish /data/pub --test-config /data/test.yaml",
                         "--test-config /data/test.yaml: not a file of this project"),
                        # no data.clips in it: its clips go to output_dir/clips (not checked at first)
                        (_UCF101_TEACHER + f" --publish /data/pub --test-config {cv.PROJECT_DIR_IN_IMAGE}/configs/embedded.yaml",
                         "--test-config's data.clips is 'runs/embedded/clips' (relative")):
        errors = cv.job_config_path_errors(_entrypoint(copy.deepcopy(kuberay_docs["rayjob"]), lambda e: entry))
        assert any(says in e for e in errors), (entry, errors)
    for name, (script, flags) in cv.JOB_COMMANDS.items():
        assert COMMANDS[name][1] == script
        p = argparse.ArgumentParser()
        command_module(name).add_arguments(p)
        assert set(flags) <= set(p._option_string_actions), name


def test_rayjob_paths_may_be_on_any_shared_volume(kuberay_docs):
    """A GCS-FUSE (CSI) bucket mounted at /data in every group is shared like the claim; a claim
    mounted with a per-pod subPathExpr is not."""
    csi = {"name": "data", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": {"bucketName": "b"}}}
    doc = copy.deepcopy(kuberay_docs["rayjob"])
    for group in _groups(doc):
        _replace_volume(group, csi)
    assert cv.job_config_path_errors(doc) == []
    per_pod = copy.deepcopy(kuberay_docs["rayjob"])
    for m in _ray_container(_group(per_pod, "cpu-workers"))["volumeMounts"]:
        if m["name"] == "data":
            m["subPathExpr"] = "$(POD_NAME)"
    assert any("not on a volume" in e for e in cv.job_config_path_errors(per_pod))


def test_rayjob_paths_may_be_uris(kuberay_docs):
    doc = _entrypoint(copy.deepcopy(kuberay_docs["rayjob"]), lambda e: e.replace("/data/runs", "s3://bucket/runs")
                      .replace("data.clips=/data/", "data.clips=gs://bucket/"))
    assert "s3://bucket/runs/ucf101_base" in doc["spec"]["entrypoint"]
    assert cv.job_config_path_errors(doc) == []
    # a search: its experiment under output_dir by default, or on a bucket
    search = _entrypoint(copy.deepcopy(kuberay_docs["rayjob"]), lambda e: _UCF101_SEARCH)
    assert cv.job_config_path_errors(search) == []
    assert cv.job_config_path_errors(_entrypoint(search, lambda e: e + " --set tune.storage=s3://bucket/tune")) == []


DOCKERFILE = ROOT / "docker" / "Dockerfile"


@pytest.mark.parametrize("breakage, fragments", [
    (lambda t: t.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.9.0"), ("FROM", "rayproject/ray:2.9.0")),
    (lambda t: t.replace("WORKDIR /home/ray/dvfl", "WORKDIR /app"), ("WORKDIR", "/app")),
    (lambda t: t.replace("COPY --chown=ray:users configs ./configs\n", ""), ("configs/ is not copied",)),
    (lambda t: t.replace("pip install --no-cache-dir -e .", "pip install --no-cache-dir torch"), ("no `pip install .`",)),
    (lambda t: t.replace("pip install --no-cache-dir -e .", "pip install --no-cache-dir ."), ("without -e",)),
], ids=["other_ray", "workdir", "no_configs", "not_installed", "not_editable"])
def test_dockerfile_builds_what_the_configs_expect(breakage, fragments):
    text = DOCKERFILE.read_text()
    assert cv.dockerfile_errors(text) == []
    broken = breakage(text)
    assert broken != text
    _assert_fails(cv.dockerfile_errors(broken), "policy", *fragments)
    # every image the configs name is this Dockerfile's tag scheme
    for path in ALL_FILES:
        for image in set(__import__("re").findall(r"image: (\S+)", path.read_text())):
            assert cv.project_image_error(image) is None, (path, image)
            # pinned by digest as well as tag: still the project image
            assert cv.project_image_error(image + "@sha256:" + "0" * 64) is None, image


# ------------------------------------------------------------------------------------------
# launcher configs: one broken copy per kind of breakage, for AWS and GCP
# ------------------------------------------------------------------------------------------
def _worker_types(cfg: dict) -> list[str]:
    return [n for n in cfg["available_node_types"] if n != cfg["head_node_type"]]


def _gpu_type(cfg: dict) -> str:
    return next(n for n in _worker_types(cfg) if cfg["available_node_types"][n]["resources"].get("GPU"))


def _cpu_type(cfg: dict) -> str:
    return next(n for n in _worker_types(cfg) if not cfg["available_node_types"][n]["resources"].get("GPU"))


def _set(cfg, fn):
    fn(cfg)
    return cfg


LAUNCHER_BREAKAGES = {
    # typo of a top-level key: Ray's schema has additionalProperties: false
    "unknown_top_level_key": (
        lambda c: _set(c, lambda c: c.update(idle_timeout_minute=5)),
        ("schema", "idle_timeout_minute", "unknown field"),
    ),
    "unknown_node_type_key": (
        lambda c: _set(c, lambda c: c["available_node_types"][_cpu_type(c)].update(max_worker=3)),
        ("schema", "max_worker", "unknown field"),
    ),
    "fractional_resources": (
        lambda c: _set(c, lambda c: c["available_node_types"][_gpu_type(c)]["resources"].update(GPU=0.5)),
        ("schema", "GPU", "is not of type 'integer'"),
    ),
    # 32.0 passes the draft-7 schema and Ray's validate_config; the project policy wants ints
    "float_resources": (
        lambda c: _set(c, lambda c: c["available_node_types"][_cpu_type(c)]["resources"].update(CPU=32.0)),
        ("policy", "CPU", "must be non-negative integers"),
    ),
    "string_resources": (
        lambda c: _set(c, lambda c: c["available_node_types"][_cpu_type(c)]["resources"].update(CPU="32")),
        ("schema", "CPU", "is not of type 'integer'"),
    ),
    "missing_node_config": (
        lambda c: _set(c, lambda c: c["available_node_types"][_cpu_type(c)].pop("node_config")),
        ("schema", "'node_config' is a required property"),
    ),
    # Ray's own validate_config: sum of min_workers above the global max_workers
    "min_workers_above_max_workers": (
        lambda c: _set(c, lambda c: (c.update(max_workers=1),
                                     c["available_node_types"][_cpu_type(c)].update(min_workers=2))),
        ("ray", "smaller than the sum of `min_workers`"),
    ),
    "head_type_not_declared": (
        lambda c: _set(c, lambda c: c.update(head_node_type="no-such-type")),
        ("ray", "`head_node_type` must be one of `available_node_types`"),
    ),
    # Ray's prepare_config (validate_docker_config): a container name without an image
    "docker_without_image": (
        lambda c: _set(c, lambda c: c["docker"].pop("image")),
        ("ray", "Must provide a container & image name"),
    ),
    "dashboard_on_all_interfaces": (
        lambda c: _set(c, lambda c: c.update(head_start_ray_commands=[
            cmd.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
            for cmd in c["head_start_ray_commands"]])),
        ("policy", "--dashboard-host=0.0.0.0"),
    ),
    # without its own start commands the config inherits Ray's defaults.yaml, which bind 0.0.0.0
    "dashboard_from_ray_defaults": (
        lambda c: _set(c, lambda c: c.pop("head_start_ray_commands")),
        ("policy", "--dashboard-host=0.0.0.0", "inherited from Ray's provider defaults"),
    ),
    # an empty host binds every interface (session 41: passed)
    "dashboard_host_empty": (
        lambda c: _set(c, lambda c: c.update(head_start_ray_commands=[
            cmd.replace("--dashboard-host=127.0.0.1", '--dashboard-host=""') for cmd in c["head_start_ray_commands"]])),
        ("policy", "head_start_ray_commands", "--dashboard-host=''"),
    ),
    # the token inline through its file, and no token file for the nodes (session 41: both passed)
    "token_written_inline_to_its_file": (
        lambda c: _set(c, lambda c: c.update(setup_commands=[
            "mkdir -p ~/.ray && echo 9f3c2a1b7d6e4f5a8b0c1d2e3f4a5b6c > ~/.ray/auth_token"])),
        ("policy", "setup_commands", "writes Ray's token file (~/.ray/auth_token) from the config's own text"),
    ),
    "token_printed_into_its_file_on_the_start_line": (
        lambda c: _set(c, lambda c: c.update(head_start_ray_commands=[
            c["head_start_ray_commands"][0], "printf '%s' 9f3c2a1b7d6e > ~/.ray/auth_token; " + c["head_start_ray_commands"][1]])),
        ("policy", "head_start_ray_commands", "writes Ray's token file (~/.ray/auth_token) from the config's own text"),
    ),
    "token_file_not_mounted": (
        lambda c: _set(c, lambda c: c.update(file_mounts={})),
        ("policy", "file_mounts", "no ~/.ray/auth_token"),
    ),
    # the shell reads a line in order: what comes later, or in a sub-shell, is what `ray start` sees
    # (session 28: each of these passed a text match)
    "token_auth_disabled_later_on_the_line": (
        lambda c: _set(c, lambda c: c.update(head_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "export RAY_AUTH_MODE=token; export RAY_AUTH_MODE=disabled;")
            for cmd in c["head_start_ray_commands"]])),
        ("policy", "head_start_ray_commands", "RAY_AUTH_MODE 'disabled' where it runs"),
    ),
    "token_auth_unset_by_env": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=[
            cmd.replace("ray start", "env -u RAY_AUTH_MODE ray start") for cmd in c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "RAY_AUTH_MODE unset where it runs"),
    ),
    "token_auth_in_a_background_subshell": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "export RAY_AUTH_MODE=token &")
            for cmd in c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "RAY_AUTH_MODE unset where it runs"),
    ),
    "token_auth_not_exported": (
        lambda c: _set(c, lambda c: c.update(head_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "RAY_AUTH_MODE=token;") for cmd in c["head_start_ray_commands"]])),
        ("policy", "head_start_ray_commands", "RAY_AUTH_MODE unset where it runs"),
    ),
    "ray_start_with_two_spaces": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "").replace("ray start", "ray  start")
            for cmd in c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "without token authentication"),
    ),
    "ray_start_inside_bash_c": (
        lambda c: _set(c, lambda c: c.update(head_start_ray_commands=[
            "export RAY_AUTH_MODE=token; bash -c 'RAY_AUTH_MODE=disabled ray start --head --dashboard-host=127.0.0.1'"])),
        ("policy", "head_start_ray_commands", "cannot tell whether its `ray start` runs with token authentication"),
    ),
    # shell the reader cannot follow makes a `ray start` line fail as "cannot tell" (review of session 28)
    "token_auth_unset_inside_an_if": (
        lambda c: _set(c, lambda c: c.update(head_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "export RAY_AUTH_MODE=token; if true; then unset RAY_AUTH_MODE; fi;")
            for cmd in c["head_start_ray_commands"]])),
        ("policy", "head_start_ray_commands", "cannot tell whether its `ray start` runs with token authentication"),
    ),
    "token_auth_unexported_by_export_n": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "export RAY_AUTH_MODE=token; export -n RAY_AUTH_MODE;")
            for cmd in c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "cannot tell"),
    ),
    "token_auth_after_a_hash_inside_a_word": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "export RAY_AUTH_MODE=token; echo x#; unset RAY_AUTH_MODE;")
            for cmd in c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "RAY_AUTH_MODE unset where it runs"),  # (shlex read x# as a comment)
    ),
    "ray_start_after_an_option": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "").replace("ray start", "ray --logging-level=info start")
            for cmd in c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "without token authentication"),
    ),
    "ray_start_without_token_auth": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=[
            cmd.replace("export RAY_AUTH_MODE=token;", "") for cmd in c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "without token authentication"),
    ),
    "dashboard_port_open_to_world": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])),
        ("policy", "8265-8265/tcp to the world"),
    ),
    # not the world, yet not the cluster's own nodes either: the whole VPC may reach the GCS and
    # the Ray Client port (which runs arbitrary code)
    "ray_ports_open_to_the_vpc": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 6379, "ToPort": 10001, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])),
        ("policy", "opens Ray port(s) 6379, 8265, 10001, 8076 to 10.0.0.0/8"),
    ),
    # the world spelt otherwise (session 28: each passed an exact match on 0.0.0.0/0 and ::/0)
    "serve_port_open_to_the_world_as_0_colon_colon": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 8000, "ToPort": 8000, "IpProtocol": "tcp", "Ipv6Ranges": [{"CidrIpv6": "0::/0"}]}])),
        ("policy", "8000-8000/tcp to the world (0::/0: not a private network)"),
    ),
    "port_range_open_to_two_halves_of_the_internet": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 30000, "ToPort": 52000, "IpProtocol": "tcp",
             "IpRanges": [{"CidrIp": "0.0.0.0/1"}, {"CidrIp": "128.0.0.0/1"}]}])),
        ("policy", "30000-52000/tcp to the world (0.0.0.0/1, 128.0.0.0/1: not a private network)"),
    ),
    "metrics_port_open_to_a_public_range": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 8080, "ToPort": 8080, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "8.8.0.0/16"}]}])),
        ("policy", "8080-8080/tcp to the world (8.8.0.0/16"),
    ),
    "port_open_to_an_unreadable_range": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 8000, "ToPort": 8000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "everyone"}]}])),
        ("policy", "8000-8000/tcp to the world (everyone"),
    ),
    # sources that are not address ranges: a managed prefix list, another security group
    "ray_ports_open_to_a_prefix_list": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 6379, "ToPort": 6379, "IpProtocol": "tcp", "PrefixListIds": [{"PrefixListId": "pl-0a1b"}]}])),
        ("policy", "opens Ray port(s) 6379 to prefix list pl-0a1b"),
    ),
    "worker_ports_open_to_another_group": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 10002, "ToPort": 19999, "IpProtocol": "tcp", "UserIdGroupPairs": [{"GroupId": "sg-0bad"}]}])),
        ("policy", "opens Ray port(s) 10002-19999 to security group sg-0bad"),
    ),
    # Serve's port, or ports Ray picks at random (raylet, metrics and runtime-env agents: up to 65535), to the VPC
    "serve_and_random_ports_open_to_the_vpc": (
        lambda c: _set(c, lambda c: c["provider"].setdefault("security_group", {}).update(IpPermissions=[
            {"FromPort": 8000, "ToPort": 8000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
            {"FromPort": 52366, "ToPort": 65535, "IpProtocol": "tcp", "UserIdGroupPairs": [{"GroupId": "sg-0bad"}]}])),
        ("policy", "opens ports 8000-8000/tcp (Ray picks some of its ports at random", "to 10.0.0.0/8"),
    ),
    # no image at all: Ray's default runs the nodes on the bare VM image
    "no_container_image": (
        lambda c: _set(c, lambda c: [c.pop("docker", None)]
                       + [nt.pop("docker", None) for nt in c["available_node_types"].values()]),
        ("policy", "no container image"),
    ),
    "credential_in_setup_commands": (
        lambda c: _set(c, lambda c: c["setup_commands"].append(
            "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY")),
        ("policy", "setup_commands", "a secret assigned in a command"),
    ),
    "access_key_id_in_env": (
        lambda c: _set(c, lambda c: c.update(metadata={"note": "AKIAIOSFODNN7EXAMPLE"})),
        ("policy", "metadata.note", "an AWS access key id"),
    ),
    "no_gpu_worker_type": (
        lambda c: _set(c, lambda c: c["available_node_types"].pop(_gpu_type(c))),
        ("policy", "no GPU worker type"),
    ),
    # node_config is free-form for Ray's schema; without an instance type no launch can be formed
    "instance_type_missing": (
        lambda c: _set(c, lambda c: [c["available_node_types"][_cpu_type(c)]["node_config"].pop(k, None)
                                     for k in ("InstanceType", "machineType")]),
        ("policy", "the instance type must be a non-empty string"),
    ),
    # the stock image: every node start would pip-install the project and torch
    "stock_ray_image": (
        lambda c: _set(c, lambda c: c["docker"].update(image="rayproject/ray:2.60.0-py311-gpu")),
        ("policy", "docker.image", "not the project image"),
    ),
    "stock_worker_image": (
        lambda c: _set(c, lambda c: c["available_node_types"][_cpu_type(c)]["docker"].update(
            worker_image="rayproject/ray:2.60.0-py311")),
        ("policy", "docker.worker_image", "not the project image"),
    ),
    "project_image_of_another_ray": (
        lambda c: _set(c, lambda c: c["docker"].update(head_image="ghcr.io/your-org/dvfl:0.1.0-ray2.9.0-py311")),
        ("policy", "docker.head_image", "must name the pinned Ray version"),
    ),
    "pip_install_at_node_start": (
        lambda c: _set(c, lambda c: c.update(setup_commands=["python -m pip install -q torch timm"])),
        ("policy", "setup_commands", "installs packages at every node start"),
    ),
    # (its start commands are as much "every node start" as its setup commands)
    "pip_install_in_a_worker_start_command": (
        lambda c: _set(c, lambda c: c.update(worker_start_ray_commands=["pip install -q torch timm",
                                                                        *c["worker_start_ray_commands"]])),
        ("policy", "worker_start_ray_commands", "installs packages at every node start"),
    ),
}


def test_a_token_file_written_from_a_secret_or_named_by_its_path_passes(launcher_docs):
    """The token from a secret's environment variable, or a token file mounted where
    RAY_AUTH_TOKEN_PATH says, is not inline."""
    from_env = copy.deepcopy(launcher_docs["aws"])
    from_env["setup_commands"] = ['mkdir -p ~/.ray && echo "$RAY_TOKEN_FROM_SECRET" > ~/.ray/auth_token']
    assert cv.validate_launcher_config(from_env) == []
    elsewhere = copy.deepcopy(launcher_docs["aws"])
    elsewhere["file_mounts"] = {"/etc/ray/token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        elsewhere[key] = [cmd.replace("export RAY_AUTH_MODE=token;", "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/ray/token;")
                          for cmd in elsewhere[key]]
    assert cv.validate_launcher_config(elsewhere) == []
    # piped from a secret, the token itself from a secret's variable, the token's folder mounted
    piped = copy.deepcopy(launcher_docs["aws"])
    piped["setup_commands"] = ['echo "$RAY_TOKEN_FROM_SECRET" | tee ~/.ray/auth_token > /dev/null']
    assert cv.validate_launcher_config(piped) == []
    from_var = copy.deepcopy(launcher_docs["aws"])
    from_var["file_mounts"] = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        from_var[key] = [cmd.replace("export RAY_AUTH_MODE=token;", 'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$DVFL_TOKEN";')
                         for cmd in from_var[key]]
    assert cv.validate_launcher_config(from_var) == []
    folder = copy.deepcopy(launcher_docs["aws"])
    folder["file_mounts"] = {"~/.ray": "~/.ray"}
    assert cv.validate_launcher_config(folder) == []
    # a secret manager's CLI, a mounted secret, a here-string of a variable: not the config's text
    for fetched in ("aws secretsmanager get-secret-value --secret-id ray --query SecretString --output text > ~/.ray/auth_token",
                    "cat /run/secrets/ray_token > ~/.ray/auth_token", "sudo tee ~/.ray/auth_token < /mnt/secret/token",
                    'cat > ~/.ray/auth_token <<< "$RAY_TOKEN"', "echo `vault kv get -field=token secret/ray` > ~/.ray/auth_token"):
        fetching = copy.deepcopy(launcher_docs["aws"])
        fetching["setup_commands"] = ["mkdir -p ~/.ray && " + fetched]
        assert cv.validate_launcher_config(fetching) == [], fetched
    # ... but a literal into the file RAY_AUTH_TOKEN_PATH names, said once (setup_commands run in both roles)
    for write in ("echo 9f3c2a1b7d6e4f5a > /etc/ray/token", 'echo 9f3c2a1b7d6e4f5a > "$RAY_AUTH_TOKEN_PATH"',
                  "cat > /etc/ray/token << EOF\n9f3c2a1b7d6e4f5a\nEOF", "cat > /etc/ray/token <<< 9f3c2a1b7d6e4f5a",
                  # through a filter, sudo, a sub-shell or a group (each passed the first reading of a pipeline)
                  "echo 9f3c2a1b7d6e4f5a | sudo tee /etc/ray/token > /dev/null",
                  "echo ZGVhZGJlZWY= | base64 -d > /etc/ray/token", "sudo -u ray sh -c 'echo 9f3c > /etc/ray/token'",
                  "{ echo 9f3c2a1b7d6e4f5a; } > /etc/ray/token", "echo 9f3c2a1b7d6e4f5a >| /etc/ray/token"):
        literal = copy.deepcopy(elsewhere)
        literal["setup_commands"] = [write]
        errors = cv.validate_launcher_config(literal)
        assert len(errors) == 1 and "writes Ray's token file" in errors[0], (write, errors)
    # a secret's value that happens to start with "/" is still a secret (the name says where one is)
    secret = copy.deepcopy(launcher_docs["aws"])
    secret["setup_commands"] = ["export API_TOKEN=/Rfi8sdfkjhQ2x"]
    assert any("a secret assigned in a command" in e for e in cv.validate_launcher_config(secret))
    secret["setup_commands"] = ["export SECRETS_MOUNT=/run/secrets VAULT_TOKEN_HELPER=/usr/local/bin/vh"]
    assert cv.validate_launcher_config(secret) == []  # where secrets are, not one
    assert not cv.is_dockerfile("docker/Dockerfile.dockerignore") and cv.is_dockerfile("docker/gpu.Dockerfile")


@pytest.mark.parametrize("target", sorted(LAUNCHER))
@pytest.mark.parametrize("breakage", sorted(LAUNCHER_BREAKAGES))
def test_broken_launcher_config_fails(launcher_docs, target, breakage):
    mutate, (layer, *fragments) = LAUNCHER_BREAKAGES[breakage]
    broken = mutate(copy.deepcopy(launcher_docs[target]))
    _assert_fails(cv.validate_launcher_config(broken), layer, *fragments)


# ------------------------------------------------------------------------------------------
# KubeRay manifests: one broken copy per kind of breakage, for the RayCluster and the RayJob
# ------------------------------------------------------------------------------------------
def _cluster(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _head(doc: dict) -> dict:
    return _cluster(doc)["headGroupSpec"]


def _group(doc: dict, name: str) -> dict:
    return next(g for g in _cluster(doc)["workerGroupSpecs"] if g["groupName"] == name)


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def _replace_volume(group: dict, volume: dict) -> None:
    volumes = group["template"]["spec"]["volumes"]
    volumes[[v["name"] for v in volumes].index(volume["name"])] = volume


KUBERAY_BREAKAGES = {
    # KubeRay runs a Ray container's own command with (or, holding `ray start`, instead of) its own
    "own_ray_start_with_auth_off": (
        lambda d: _set(d, lambda d: _head(d)["template"]["spec"]["containers"][0].update(
            args=["RAY_AUTH_MODE=disabled ray start --head --dashboard-host=0.0.0.0 --block"])),
        ("policy", "containers[0].args", "leave it to KubeRay"),
    ),
    # Ray's ports on the node's own address, outside the cluster's Service
    "head_on_host_network": (
        lambda d: _set(d, lambda d: _head(d)["template"]["spec"].update(hostNetwork=True)),
        ("policy", "hostNetwork", "the node's own address"),
    ),
    # the API server would silently prune it and the group would get the default maxReplicas
    "typo_maxReplica": (
        lambda d: _set(d, lambda d: _group(d, "gpu-workers").update(maxReplica=_group(d, "gpu-workers").pop("maxReplicas"))),
        ("crd", "maxReplica", "unknown field"),
    ),
    "unknown_key_deep_in_pod_template": (
        lambda d: _set(d, lambda d: _ray_container(_group(d, "cpu-workers")).update(imagePullPolicyy="Always")),
        ("crd", "containers[0].imagePullPolicyy", "unknown field"),
    ),
    "unknown_top_level_spec_key": (
        lambda d: _set(d, lambda d: _cluster(d).update(enableInTreeAutoscalling=True)),
        ("crd", "enableInTreeAutoscalling", "unknown field"),
    ),
    "missing_maxReplicas": (
        lambda d: _set(d, lambda d: _group(d, "cpu-workers").pop("maxReplicas")),
        ("crd", "'maxReplicas' is a required property"),
    ),
    "missing_groupName": (
        lambda d: _set(d, lambda d: _cluster(d)["workerGroupSpecs"][0].pop("groupName")),
        ("crd", "'groupName' is a required property"),
    ),
    "non_string_rayStartParams": (
        lambda d: _set(d, lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0})),
        ("crd", "rayStartParams.num-cpus", "is not of type 'string'"),
    ),
    "wrong_type_replicas": (
        lambda d: _set(d, lambda d: _group(d, "cpu-workers").update(minReplicas="0")),
        ("crd", "minReplicas", "is not of type 'integer'"),
    ),
    "int32_overflow": (
        lambda d: _set(d, lambda d: _group(d, "cpu-workers").update(maxReplicas=2**40)),
        ("crd", "maxReplicas", "is not a 'int32'"),
    ),
    "wrong_apiVersion": (
        lambda d: _set(d, lambda d: d.update(apiVersion="ray.io/v2")),
        ("crd", "apiVersion", "'ray.io/v1' was expected"),
    ),
    "duplicate_volume_name": (
        lambda d: _set(d, lambda d: _group(d, "cpu-workers")["template"]["spec"]["volumes"].append(
            {"name": "data", "emptyDir": {}})),
        ("crd", "duplicate list entry", "name='data'"),
    ),
    # Ray's autoscaler could not derive a node type: int("1.5") fails in its translation
    "fractional_num_cpus": (
        lambda d: _set(d, lambda d: _group(d, "cpu-workers")["rayStartParams"].update({"num-cpus": "1.5"})),
        ("ray-kuberay", "ValueError"),
    ),
    "fractional_cpu_limit": (
        lambda d: _set(d, lambda d: _ray_container(_group(d, "cpu-workers"))["resources"]["limits"].update(cpu="1500m")),
        ("policy", "cpu limits '1500m' is not a whole number"),
    ),
    "fractional_group_resource": (
        lambda d: _set(d, lambda d: _group(d, "gpu-workers").update(resources={"GPU": "0.5"})),
        ("policy", "resource GPU '0.5' is not a whole number"),
    ),
    "min_above_max_replicas": (
        lambda d: _set(d, lambda d: _group(d, "cpu-workers").update(minReplicas=9, maxReplicas=8)),
        ("policy", "minReplicas 9 > maxReplicas 8"),
    ),
    "service_type_load_balancer": (
        lambda d: _set(d, lambda d: _head(d).update(serviceType="LoadBalancer")),
        ("policy", "LoadBalancer exposes"),
    ),
    "ingress_enabled": (
        lambda d: _set(d, lambda d: _head(d).update(enableIngress=True)),
        ("policy", "an Ingress exposes the dashboard"),
    ),
    "autoscaling_off": (
        lambda d: _set(d, lambda d: _cluster(d).update(enableInTreeAutoscaling=False)),
        ("policy", "enableInTreeAutoscaling", "must be true"),
    ),
    "ray_version_skew": (
        lambda d: _set(d, lambda d: _ray_container(_group(d, "gpu-workers")).update(image="rayproject/ray:2.9.0-gpu")),
        ("policy", "Ray image must be 2.60.0"),
    ),
    "literal_secret_in_env": (
        lambda d: _set(d, lambda d: _ray_container(_head(d)).update(env=[{"name": "WANDB_API_KEY", "value": "0123456789abcdef"}])),
        ("policy", "credential-like key 'WANDB_API_KEY'"),
    ),
    "no_gpu_worker_group": (
        lambda d: _set(d, lambda d: _cluster(d).update(workerGroupSpecs=[_group(d, "cpu-workers")])),
        ("policy", "no GPU worker type"),
    ),
    "token_auth_off": (
        lambda d: _set(d, lambda d: _cluster(d).pop("authOptions")),
        ("policy", "authOptions.mode", "token authentication must be on"),
    ),
    "token_auth_disabled": (
        lambda d: _set(d, lambda d: _cluster(d).update(authOptions={"mode": "disabled"})),
        ("policy", "authOptions.mode", "'disabled'"),
    ),
    # KubeRay sets RAY_AUTH_MODE from authOptions; a pod's own entry can override it (session 28)
    "token_auth_disabled_in_the_pod_env": (
        lambda d: _set(d, lambda d: _ray_container(_group(d, "gpu-workers")).setdefault("env", []).append(
            {"name": "RAY_AUTH_MODE", "value": "disabled"})),
        ("policy", "workerGroupSpecs[1]", "env[", "RAY_AUTH_MODE set to 'disabled' in the pod"),
    ),
    "token_auth_from_a_config_map": (
        lambda d: _set(d, lambda d: _ray_container(_head(d)).setdefault("env", []).append(
            {"name": "RAY_AUTH_MODE", "valueFrom": {"configMapKeyRef": {"name": "ray", "key": "auth"}}})),
        ("policy", "headGroupSpec", "RAY_AUTH_MODE set to a reference in the pod"),
    ),
    "head_service_on_external_ips": (
        lambda d: _set(d, lambda d: _head(d).setdefault("headService", {}).setdefault("spec", {}).update(
            externalIPs=["198.51.100.7"])),
        ("policy", "headService.spec.externalIPs", "198.51.100.7", "outside the cluster"),
    ),
    "stock_ray_image": (
        lambda d: _set(d, lambda d: _ray_container(_group(d, "cpu-workers")).update(image="rayproject/ray:2.60.0-py311")),
        ("policy", "containers[0].image", "not the project image"),
    ),
}


def _rules(policies: list[tuple[int, dict]]) -> list:
    """The ingress rules of the file's first NetworkPolicy (the one for all of the cluster's pods)."""
    return policies[0][1]["spec"]["ingress"]


def _own_peer(policies: list[tuple[int, dict]]) -> dict:
    """The pod selector of the first policy's own-pods peer (`ray.io/cluster` or the RayJob's label)."""
    return _rules(policies)[0]["from"][0]["podSelector"]


def _every_policy(policies: list[tuple[int, dict]], fn) -> None:
    for _, p in policies:
        fn(p)


def _groups(doc: dict) -> list[dict]:
    return [_head(doc), *_cluster(doc)["workerGroupSpecs"]]


def _policy(name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name}, "spec": spec}


def _per_node_type(policies, one_rule: bool) -> None:
    """The own-pods peer split into one peer per node type, in one rule or in one rule each."""
    labels = _own_peer(policies)["matchLabels"]
    peers = [{"podSelector": {"matchLabels": {**labels, "ray.io/node-type": t}}} for t in ("head", "worker")]
    _rules(policies)[:1] = [{"from": peers}] if one_rule else [{"from": [p]} for p in peers]


def _labels_in_groups(doc, policies, value=None) -> None:
    """Every group labelled `tier: <the manifest's name>` (or ``value``) by its own `labels` field
    (KubeRay 1.7), which the first policy selects and admits."""
    value = value or doc["metadata"]["name"]
    for g in _groups(doc):
        g["labels"] = {"tier": value}
    policies[0][1]["spec"]["podSelector"] = {"matchLabels": {"tier": value}}
    _own_peer(policies)["matchLabels"] = {"tier": value}


def _job_server_rule(doc, policies) -> dict:
    """The rule that opens the job server (the RayJob's second policy); one is added to a RayCluster's."""
    if doc["kind"] == "RayJob":
        return policies[1][1]["spec"]["ingress"][0]
    rule = {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}}],
            "ports": [{"port": 8265, "protocol": "TCP"}]}
    _rules(policies).append(rule)
    return rule


def _dashboard_port(doc, port: int) -> None:
    _head(doc).setdefault("rayStartParams", {})["dashboard-port"] = str(port)


def _in_expression(policies, extra=()) -> None:
    """The own-pods peer written as a matchExpressions `In` (with ``extra`` values)."""
    sel = _own_peer(policies)
    ((key, value),) = sel.pop("matchLabels").items()
    sel["matchExpressions"] = [{"key": key, "operator": "In", "values": [value, *extra]}]


# one broken copy per kind of breakage; each mutates (the Ray document, the file's policies)
NETWORK_POLICY_BREAKAGES = {
    # no policy: every pod of every namespace reaches the GCS, the Ray Client and the metrics
    "no_policy": (lambda d, ps: ps.clear(), ("workerGroupSpecs[1]", "no ingress NetworkPolicy")),
    # the policy covers the head only: the workers' ports stay open
    "head_only": (lambda d, ps: _every_policy(ps, lambda p: p["spec"]["podSelector"]["matchLabels"].update(
        {"ray.io/node-type": "head"})), ("workerGroupSpecs[0]", "no ingress NetworkPolicy")),
    "egress_only": (lambda d, ps: _every_policy(ps, lambda p: p["spec"].update(policyTypes=["Egress"])),
                    ("headGroupSpec", "no ingress NetworkPolicy")),
    "gcs_to_every_namespace": (lambda d, ps: _rules(ps).append({"from": [{"namespaceSelector": {}}], "ports": [{"port": 6379}]}),
                               ("pods outside the cluster's own to 6379",)),
    "client_port_to_any_source": (lambda d, ps: _rules(ps).append({"ports": [{"port": 10001, "protocol": "TCP"}]}),
                                  ("admits any source to 10001",)),
    "job_server_as_a_port_range": (lambda d, ps: _rules(ps).append(
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 8265, "endPort": 10001}]}),
        ("pods outside the cluster's own to 8265",)),
    # "own pods" named by a label every Ray pod of the namespace carries, not this cluster's
    "own_pods_too_broad": (lambda d, ps: _own_peer(ps).update(matchLabels={"ray.io/is-ray-node": "yes"}),
                           ("to every port",)),
    # an empty policyTypes is Ingress, as a missing one: its rules count
    "empty_policy_types_count_as_ingress": (lambda d, ps: (
        _every_policy(ps, lambda p: p["spec"].update(policyTypes=[])),
        _rules(ps).append({"from": [{"namespaceSelector": {}}], "ports": [{"port": 6379}]})),
        ("pods outside the cluster's own to 6379",)),
    # every policy of the file is checked, whichever pods the validator thinks it selects
    "unrelated_policy_in_the_file": (lambda d, ps: ps.append((len(ps) + 1, _policy("other", {
        "podSelector": {"matchLabels": {"app": "other"}}, "ingress": [{"ports": [{"port": 10001}]}]}))),
        ("NetworkPolicy other", "admits any source to 10001")),
    "policy_on_kuberay_labels": (lambda d, ps: ps.append((len(ps) + 1, _policy("metrics", {
        "podSelector": {"matchLabels": {"app.kubernetes.io/created-by": "kuberay-operator"}},
        "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}]}))),
        ("NetworkPolicy metrics", "pods outside the cluster's own to 8080")),
    # a group's own `labels` override its template's: the policy no longer selects the CPU workers
    "group_labels_override_the_template": (lambda d, ps: (
        [g["template"].setdefault("metadata", {}).setdefault("labels", {}).update(tier="ray") for g in _groups(d)],
        _group(d, "cpu-workers").update(labels={"tier": "batch"}),
        _every_policy(ps, lambda p: p["spec"]["podSelector"]["matchLabels"].update(tier="ray"))),
        ("workerGroupSpecs[0]", "no ingress NetworkPolicy")),
    # policies that would break the cluster: nothing admitted, or the own pods to the GCS only
    "no_ingress_rules": (lambda d, ps: _every_policy(ps, lambda p: p["spec"].update(ingress=[])),
                         ("headGroupSpec", "workers could not reach the GCS")),
    "own_pods_to_the_gcs_only": (lambda d, ps: _rules(ps)[0].update(ports=[{"port": 6379}]),
                                 ("workerGroupSpecs[1]", "workers could not reach the GCS")),
    "own_pods_head_peer_only": (lambda d, ps: (_per_node_type(ps, one_rule=False), _rules(ps).pop(1)),
                                ("workerGroupSpecs[0]", "not admitted from workerGroupSpecs[0], workerGroupSpecs[1]")),
    # an `In` with a value of no pod of this cluster: another cluster's pods
    "own_pods_in_with_a_foreign_value": (lambda d, ps: _in_expression(ps, extra=["other"]), ("to every port",)),
    # a peer that selects none of the cluster's pods is not the cluster's own
    "own_peer_selects_no_group": (lambda d, ps: _own_peer(ps)["matchLabels"].update({"ray.io/node-type": "driver"}),
                                  ("pods outside the cluster's own to every port",)),
    # the policies of another namespace do not cover the cluster's pods
    "policies_in_another_namespace": (lambda d, ps: _every_policy(ps, lambda p: p["metadata"].update(namespace="other")),
                                      ("headGroupSpec", "no ingress NetworkPolicy")),
    "ray_document_in_a_namespace": (lambda d, ps: d["metadata"].update(namespace="ml"),
                                    ("workerGroupSpecs[0]", "no ingress NetworkPolicy")),
    # egress is not checked, so not allowed: workers that cannot resolve or reach the GCS never join
    "egress_restricted_too": (lambda d, ps: _every_policy(ps, lambda p: p["spec"].update(policyTypes=["Ingress", "Egress"])),
                              ("headGroupSpec", "restricts these pods' egress")),
    "egress_to_dns_only": (lambda d, ps: ps.append((len(ps) + 1, _policy("dns-only", {
        "podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}))),
        ("workerGroupSpecs[0]", "NetworkPolicy dns-only restricts these pods' egress")),
    # "own pods" named by a label all groups share but whose value is not the cluster's name: every
    # `team: ml` pod of the namespace would reach the GCS and the Ray Client
    "own_pods_by_a_shared_team_label": (lambda d, ps: _labels_in_groups(d, ps, value="ml"), ("to every port",)),
    # the job server to addresses, not pods: on many clouds pod IPs are routable from the whole VPC
    "job_server_to_any_source": (lambda d, ps: _job_server_rule(d, ps).pop("from"),
                                 ("admits any source to the job server port 8265",)),
    "job_server_to_an_ip_block": (lambda d, ps: _job_server_rule(d, ps)["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
                                  ("admits an IP block to the job server port 8265",)),
    # the dashboard moved: 8265 is now an ordinary port opened beyond the cluster
    "job_server_port_moved": (lambda d, ps: (_job_server_rule(d, ps), _dashboard_port(d, 8266)),
                              ("pods outside the cluster's own to 8265", "job server port 8266")),
}


@pytest.mark.parametrize("target", sorted(KUBERAY))
@pytest.mark.parametrize("breakage", sorted(NETWORK_POLICY_BREAKAGES))
def test_kuberay_pods_behind_network_policies(target, breakage):
    doc, policies = _load(KUBERAY[target]), _policies(KUBERAY[target])
    assert policies and cv.network_policy_errors(doc, policies) == []
    mutate, fragments = NETWORK_POLICY_BREAKAGES[breakage]
    mutate(doc, policies)
    _assert_fails(cv.network_policy_errors(doc, policies), "policy", *fragments)


# policies that keep the cluster working and closed: each must pass
SAFE_NETWORK_POLICIES = {
    "empty_policy_types": lambda d, ps: _every_policy(ps, lambda p: p["spec"].update(policyTypes=[])),
    "no_policy_types": lambda d, ps: _every_policy(ps, lambda p: p["spec"].pop("policyTypes")),
    "own_pods_by_match_expressions": lambda d, ps: _in_expression(ps),
    "own_pods_per_node_type": lambda d, ps: _per_node_type(ps, one_rule=True),
    "own_pods_per_node_type_in_two_rules": lambda d, ps: _per_node_type(ps, one_rule=False),
    # KubeRay's labels beside the user's: selected by what KubeRay sets on every pod it creates
    "selected_by_kuberay_app_labels": lambda d, ps: ps[0][1]["spec"]["podSelector"]["matchLabels"].update(
        {"app.kubernetes.io/created-by": "kuberay-operator", "app.kubernetes.io/name": "kuberay"}),
    "labels_in_the_group_spec": _labels_in_groups,
    # KubeRay's ray.io/* labels win over the user's
    "user_labels_cannot_override_kuberays": lambda d, ps: [g.update(labels={
        "ray.io/cluster": "other", "ray.io/node-type": "other", "ray.io/group": "other"}) for g in _groups(d)],
    "same_namespace": lambda d, ps: [m.update(namespace="ml") for m in [d["metadata"], *(p["metadata"] for _, p in ps)]],
    # KubeRay names the head's dashboard port `dashboard`
    "job_server_by_port_name": lambda d, ps: _job_server_rule(d, ps).update(ports=[{"port": "dashboard", "protocol": "TCP"}]),
    "job_server_port_moved_with_its_policy": lambda d, ps: (
        _job_server_rule(d, ps).update(ports=[{"port": 8266, "protocol": "TCP"}]), _dashboard_port(d, 8266)),
}


@pytest.mark.parametrize("target", sorted(KUBERAY))
@pytest.mark.parametrize("variant", sorted(SAFE_NETWORK_POLICIES))
def test_safe_network_policies_pass(target, variant):
    doc, policies = _load(KUBERAY[target]), _policies(KUBERAY[target])
    SAFE_NETWORK_POLICIES[variant](doc, policies)
    assert cv.network_policy_errors(doc, policies) == []


def _job_server_peers(policies) -> list:
    return policies[1][1]["spec"]["ingress"][0]["from"]


# the RayJob's head admits its callers to the job server: (mutation, error fragments or None: passes)
JOB_SERVER_CASES = {
    "job_server_policy_deleted": (lambda d, ps: ps.pop(1), ("headGroupSpec", "the job would never be submitted")),
    "operator_not_admitted": (lambda d, ps: _job_server_peers(ps).pop(1), ("headGroupSpec", "its status never read")),
    "submitter_not_admitted": (lambda d, ps: _job_server_peers(ps).pop(0), ("the job would never be submitted",)),
    "submitter_of_another_rayjob": (lambda d, ps: _job_server_peers(ps)[0]["podSelector"]["matchLabels"].update(
        {"ray.io/originated-from-cr-name": "other"}), ("the job would never be submitted",)),
    # K8sJobMode is the CRD's default
    "default_mode_without_submitter": (lambda d, ps: (d["spec"].pop("submissionMode"), _job_server_peers(ps).pop(0)),
                                       ("the job would never be submitted",)),
    "operator_on_another_port": (lambda d, ps: ps[1][1]["spec"]["ingress"][0].update(ports=[{"port": 8266}]),
                                 ("its status never read",)),
    # HTTPMode: the operator submits, no submitter pod
    "http_mode_without_submitter": (lambda d, ps: (d["spec"].update(submissionMode="HTTPMode"),
                                                   _job_server_peers(ps).pop(0)), None),
    # every pod of every namespace may call the job server (session 28: it passed before)
    "job_server_to_every_namespace": (lambda d, ps: ps[1][1]["spec"]["ingress"][0].update(
        **{"from": [{"namespaceSelector": {}}]}), ("admits every pod of every namespace to the job server port",)),
    "job_server_to_every_pod_of_the_namespace": (lambda d, ps: _job_server_peers(ps).append({"podSelector": {}}),
                                                 ("admits every pod of its namespace",)),
    "job_server_to_every_pod_of_labelled_namespaces": (lambda d, ps: _job_server_peers(ps).append(
        {"namespaceSelector": {"matchLabels": {"team": "ml"}}}), ("admits every pod of the selected namespaces",)),
}


@pytest.mark.parametrize("case", sorted(JOB_SERVER_CASES))
def test_rayjob_job_server_admits_its_callers(case):
    doc, policies = _load(KUBERAY["rayjob"]), _policies(KUBERAY["rayjob"])
    mutate, fragments = JOB_SERVER_CASES[case]
    mutate(doc, policies)
    errors = cv.network_policy_errors(doc, policies)
    if fragments is None:
        assert errors == []
    else:
        _assert_fails(errors, "policy", *fragments)


def test_network_policy_selectors_and_files(tmp_path):
    """matchExpressions select like matchLabels; a RayJob's cluster name is generated, so
    `ray.io/cluster` selects none of its pods; the file check reads the file's own policies."""
    doc, policies = _load(KUBERAY["raycluster"]), _policies(KUBERAY["raycluster"])
    sel = policies[0][1]["spec"]["podSelector"]
    sel["matchExpressions"] = [{"key": "ray.io/cluster", "operator": "In", "values": [sel.pop("matchLabels")["ray.io/cluster"]]}]
    assert cv.network_policy_errors(doc, policies) == []
    # KubeRay's identifier label, known for a RayCluster
    sel["matchExpressions"] = [{"key": "ray.io/identifier", "operator": "In", "values": ["dvfl-head", "dvfl-worker"]}]
    assert cv.network_policy_errors(doc, policies) == []
    sel["matchExpressions"][0]["operator"] = "NotIn"
    _assert_fails(cv.network_policy_errors(doc, policies), "policy", "no ingress NetworkPolicy")

    job, job_policies = _load(KUBERAY["rayjob"]), _policies(KUBERAY["rayjob"])
    for _, p in job_policies:
        p["spec"]["podSelector"]["matchLabels"] = {"ray.io/cluster": "dvfl-distill"}
    _assert_fails(cv.network_policy_errors(job, job_policies), "policy", "headGroupSpec", "no ingress NetworkPolicy")
    # ... yet it is there, with a generated value
    for _, p in job_policies:
        p["spec"]["podSelector"] = {"matchExpressions": [{"key": "ray.io/cluster", "operator": "Exists"}]}
    assert cv.network_policy_errors(job, job_policies) == []

    alone = tmp_path / "raycluster-alone.yaml"
    alone.write_text(yaml.safe_dump(doc))
    report = cv.validate_file(alone)
    assert not report.ok and any("no ingress NetworkPolicy" in e for e in report.errors), report.errors


@pytest.mark.parametrize("target", sorted(KUBERAY))
@pytest.mark.parametrize("breakage", sorted(KUBERAY_BREAKAGES))
def test_broken_kuberay_manifest_fails(kuberay_docs, target, breakage):
    mutate, (layer, *fragments) = KUBERAY_BREAKAGES[breakage]
    broken = mutate(copy.deepcopy(kuberay_docs[target]))
    _assert_fails(cv.validate_kuberay_manifest(broken), layer, *fragments)


@pytest.mark.parametrize("field", ["maxReplicas", "minReplicas", "groupName"])
def test_rays_translation_catches_missing_group_fields(kuberay_docs, field):
    """Independently of the CRD schema, Ray's own RayCluster -> node-type translation fails on a
    worker group without minReplicas / maxReplicas / groupName."""
    broken = copy.deepcopy(kuberay_docs["raycluster"])
    _group(broken, "gpu-workers").pop(field)
    _assert_fails(cv.validate_kuberay_manifest(broken), "ray-kuberay", repr(field))


def test_raycluster_dashboard_on_all_interfaces_fails(kuberay_docs):
    broken = copy.deepcopy(kuberay_docs["raycluster"])
    _head(broken)["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    _assert_fails(cv.validate_kuberay_manifest(broken), "policy", "dashboard-host", "0.0.0.0")


def test_a_ray_start_param_carrying_more_options_fails(kuberay_docs):
    """KubeRay pastes ``--key=value`` unquoted into a bash line: a value with a space added a second
    ``--dashboard-host=0.0.0.0`` (the last one wins) past the dashboard-host check."""
    for value in ("8076 --dashboard-host=0.0.0.0", "8076;curl x|sh", "$(id)", '"a" --dashboard-host=0.0.0.0',
                  '"$(id)"', "$A $B"):
        broken = copy.deepcopy(kuberay_docs["raycluster"])
        _head(broken)["rayStartParams"]["object-manager-port"] = value
        _assert_fails(cv.validate_kuberay_manifest(broken), "policy", "object-manager-port", "shell character")
    # KubeRay's documented forms: one double-quoted word (custom resources) and one variable the pod
    # fills from its own fields; a variable holding a literal (split into words by bash) is refused
    fine = copy.deepcopy(kuberay_docs["raycluster"])
    _head(fine)["rayStartParams"].update({"resources": '"{\\"Custom1\\": 1}"', "node-ip-address": "$MY_POD_IP"})
    container = _head(fine)["template"]["spec"]["containers"][0]
    container.setdefault("env", []).append({"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    assert cv.validate_kuberay_manifest(fine) == []
    container["env"].append({"name": "EXTRA", "value": "8076 --dashboard-host=0.0.0.0"})
    for value in ("$EXTRA", "${EXTRA}", "${MY_POD_IP", "$UNSET"):
        broken = copy.deepcopy(fine)
        _head(broken)["rayStartParams"]["object-manager-port"] = value
        _assert_fails(cv.validate_kuberay_manifest(broken), "policy", "object-manager-port", "shell character")


def test_raycluster_without_dashboard_host_fails(kuberay_docs):
    # KubeRay's default is 0.0.0.0
    broken = copy.deepcopy(kuberay_docs["raycluster"])
    del _head(broken)["rayStartParams"]["dashboard-host"]
    _assert_fails(cv.validate_kuberay_manifest(broken), "policy", "no dashboard-host")


def test_rayjob_dashboard_may_bind_pod_only_behind_cluster_ip(kuberay_docs):
    doc = kuberay_docs["rayjob"]
    assert _head(doc)["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert _head(doc)["serviceType"] == "ClusterIP"
    broken = copy.deepcopy(doc)
    _head(broken)["headService"] = {"spec": {"type": "NodePort"}}
    _assert_fails(cv.validate_kuberay_manifest(broken), "policy", "headService.spec.type", "NodePort")


@pytest.mark.parametrize(
    "runtime_env, fragments",
    [
        ("workingdir: https://example.com/x.zip\n", ("workingdir", "unknown runtime_env field")),
        ("pip: {pakages: [torch]}\n", ("ValueError", "pakages")),
        ("working_dir: [1, 2]\n", ("TypeError", "working_dir")),
        ("working_dir: 'x\n", ("not valid YAML",)),
    ],
    ids=["typo_field", "bad_pip", "bad_working_dir", "bad_yaml"],
)
def test_rayjob_broken_runtime_env_fails(kuberay_docs, runtime_env, fragments):
    broken = copy.deepcopy(kuberay_docs["rayjob"])
    broken["spec"]["runtimeEnvYAML"] = runtime_env
    _assert_fails(cv.validate_kuberay_manifest(broken), "runtime-env", *fragments)


@pytest.mark.parametrize("runtime_env", ["pip: [torch]\n", "conda: {dependencies: [pytorch]}\n", "uv: [torch]\n"])
def test_rayjob_runtime_env_installs_nothing(kuberay_docs, runtime_env):
    """The code and its dependencies are in the image: a runtime env that installs packages
    repeats minutes and gigabytes of downloads on every node the job starts on."""
    broken = copy.deepcopy(kuberay_docs["rayjob"])
    broken["spec"]["runtimeEnvYAML"] = runtime_env
    _assert_fails(cv.validate_kuberay_manifest(broken), "policy", "spec.runtimeEnvYAML." + runtime_env.split(":")[0],
                  "installs packages")


def test_rayjob_without_entrypoint_fails(kuberay_docs):
    broken = copy.deepcopy(kuberay_docs["rayjob"])
    del broken["spec"]["entrypoint"]
    _assert_fails(cv.validate_kuberay_manifest(broken), "policy", "needs an entrypoint")


def test_validator_reports_instead_of_crashing_on_mangled_configs(launcher_docs, kuberay_docs):
    """Random deletions and wrong-typed values anywhere in the configs give error lines (or a valid
    config), never an exception from the validator."""
    import random

    rng = random.Random(7)
    docs = [*launcher_docs.values(), *kuberay_docs.values()]
    for _ in range(60):
        doc = copy.deepcopy(rng.choice(docs))
        path = _mangle(rng, doc)
        errors = cv.validate_document(doc)
        assert isinstance(errors, list) and all(isinstance(e, str) for e in errors), path


_MANGLED_VALUES = [None, 0, -1, 1.5, "x", "0.0.0.0", [], {}, True, [1], {"a": 1}]


def _mangle(rng, doc, values=_MANGLED_VALUES):
    """Delete one random key/item of ``doc`` or give it a wrong-typed value; returns its path."""

    def paths(node, prefix=()):
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            return
        for k, v in items:
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))

    path = rng.choice(list(paths(doc)))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.5:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(values))
    return path


@pytest.mark.parametrize("target", sorted(KUBERAY))
def test_network_policy_check_reports_instead_of_crashing_on_mangled_documents(target):
    """The same for a KubeRay file's NetworkPolicies and the Ray document they guard: a few
    mangled values at once, in any of the file's documents."""
    import random

    rng = random.Random(11)
    for _ in range(300):
        doc, policies = _load(KUBERAY[target]), _policies(KUBERAY[target])
        docs = [doc, *(p for _, p in policies)]
        # lists of odd items too: selectors' values, peers and ports
        mangled = [_mangle(rng, rng.choice(docs), [*_MANGLED_VALUES, [[1]], [{"key": [1]}], [None]])
                   for _ in range(rng.randint(1, 3))]
        errors = cv.network_policy_errors(doc, policies)
        for _, p in policies:
            errors += cv.validate_document(p)
        assert isinstance(errors, list) and all(isinstance(e, str) for e in errors), mangled


# ------------------------------------------------------------------------------------------
# the strict-schema conversion itself
# ------------------------------------------------------------------------------------------
def test_strict_schema_respects_preserve_unknown_fields():
    import jsonschema

    crd_like = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {"type": "string"}},
            },
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "maybe": {"type": "string", "nullable": True},
            "port": {"x-kubernetes-int-or-string": True},
        },
    }
    v = jsonschema.Draft7Validator(cv._strict(crd_like))
    assert v.is_valid({"open": {"a": "x", "anything": 1}, "free": {"b": [1]}, "maybe": None, "port": 80})
    assert v.is_valid({"port": "http"})
    assert not v.is_valid({"closed": {"a": "x", "anything": 1}})
    assert not v.is_valid({"open": {"a": 1}})  # known fields are still typed
    assert not v.is_valid({"unknown": 1})
    assert not v.is_valid({"port": 1.5})


def test_schema_cache_round_trips():
    # With the fresh cache directory of this module, the in-memory schema was converted from the
    # CRD YAML; the JSON file written beside it must be the same schema.
    crd_dir = cv.find_crd_dir()
    for kind, name in cv.CRD_FILES.items():
        fresh = cv.kuberay_crd_schema(kind)
        cached = cv._schema_cache_file((crd_dir / name).read_bytes(), kind)
        assert json.loads(cached.read_text()) == fresh


def test_crd_schema_is_strict_everywhere_but_preserved_fields():
    """No object schema in the strict CRD is left open unless the CRD preserves unknown fields."""
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node and not node.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                open_objects.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    for kind in ("RayCluster", "RayJob"):
        walk(cv.kuberay_crd_schema(kind), kind)
    assert open_objects == []


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def test_cli_reports_ok_and_failures(tmp_path, capsys, kuberay_docs):
    broken = copy.deepcopy(kuberay_docs["raycluster"])
    _group(broken, "cpu-workers")["maxReplica"] = _group(broken, "cpu-workers").pop("maxReplicas")
    bad = tmp_path / "broken-raycluster.yaml"
    bad.write_text(yaml.safe_dump(broken))

    assert dvfl_main(["validate-cluster", *map(str, ALL_FILES)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == len(ALL_FILES) and "FAIL" not in out

    # security groups given by id are valid but unread: the OK says so
    grouped = copy.deepcopy(_load(LAUNCHER["aws"]))
    grouped["available_node_types"]["ray.head"]["node_config"]["SecurityGroupIds"] = ["sg-0123"]
    (tmp_path / "grouped.yaml").write_text(yaml.safe_dump(grouped))
    assert dvfl_main(["validate-cluster", str(tmp_path / "grouped.yaml")]) == 0
    assert "not checked: available_node_types.ray.head.node_config: security group(s) sg-0123" in capsys.readouterr().out

    assert dvfl_main(["validate-cluster", str(LAUNCHER["aws"]), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "OK    " + str(LAUNCHER["aws"]) in out
    assert "FAIL  " + str(bad) in out and "maxReplica: unknown field" in out


def test_cli_checks_a_dockerfile(tmp_path, capsys):
    """`dvfl validate-cluster ... docker/Dockerfile` (the docs' command): the Dockerfile was read as
    YAML ("did not find expected <document start>"), and a broken one was never checked by a user command."""
    assert dvfl_main(["validate-cluster", str(DOCKERFILE)]) == 0
    assert "OK    " + str(DOCKERFILE) in capsys.readouterr().out
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.9.0")
                      .replace("configs ./configs", "tuning ./tuning2"))
    assert dvfl_main(["validate-cluster", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  " + str(broken) in out and "rayproject/ray:2.60.0-*" in out and "configs/ is not copied" in out


def test_cli_as_module(tmp_path):
    """`python -m dvfl validate-cluster ...` (`dvfl validate-cluster`, the command in docs/cluster.md)."""
    not_a_config = tmp_path / "x.yaml"
    not_a_config.write_text(json.dumps({"hello": "world"}))
    proc = subprocess.run(
        [sys.executable, "-m", "dvfl", "validate-cluster", *map(str, ALL_FILES), str(not_a_config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("OK ") == len(ALL_FILES)
    assert f"FAIL  {not_a_config}" in proc.stdout
    assert f"{len(ALL_FILES)}/{len(ALL_FILES) + 1} files valid" in proc.stdout


def test_gcp_configs_say_their_firewall_is_not_read():
    """The shipped gcp.yaml's nodes sit on the region's first subnet: on the `default` network every
    VM of the project reaches their Ray ports, which no file can show; the OK said nothing."""
    assert any("GCP firewall rules are not read" in n for n in cv.launcher_notes(_load(LAUNCHER["gcp"])))
    assert not any("GCP" in n for n in cv.launcher_notes(_load(LAUNCHER["aws"])))


def test_a_worker_without_a_cloud_identity_and_a_launch_template_are_noted():
    """Ray gives its instance profile (AWS) or service account (GCP) to the head node only: workers
    without one of their own could not write the s3:// or gs:// shards, checkpoints and logits the
    driver had checked (noted, not failed: a cluster on a shared file system needs none; the shipped
    files give each worker one). A launch template's security groups are merged at `ray up`, unread."""
    for provider, worker, key in (("aws", "ray.worker.cpu", "IamInstanceProfile"),
                                  ("gcp", "ray_worker_gpu", "serviceAccounts")):
        shipped = _load(LAUNCHER[provider])
        assert shipped["available_node_types"][worker]["node_config"][key]
        assert not any(f"no {key}" in n for n in cv.launcher_notes(shipped))
        without = copy.deepcopy(shipped)
        del without["available_node_types"][worker]["node_config"][key]
        assert cv.validate_launcher_config(without) == []
        assert any(f"{worker}.node_config: no {key}: Ray attaches" in n for n in cv.launcher_notes(without))
    templated = copy.deepcopy(_load(LAUNCHER["aws"]))
    templated["available_node_types"]["ray.head"]["node_config"]["LaunchTemplate"] = {"LaunchTemplateName": "open"}
    assert any("ray.head.node_config: LaunchTemplate is not read" in n for n in cv.launcher_notes(templated))
    assert not any("LaunchTemplate" in n for n in cv.launcher_notes(_load(LAUNCHER["aws"])))
    odd = copy.deepcopy(_load(LAUNCHER["aws"]))
    odd["provider"]["type"] = ["aws"]  # (the schema's error, not a traceback from the notes)
    assert cv.launcher_notes(odd) == [] and any("provider.type" in e for e in cv.validate_launcher_config(odd))


def test_a_file_uri_on_a_shared_volume_is_read_as_the_path_it_names():
    """``file:///mnt/shared%20vol/runs`` is ``/mnt/shared vol/runs`` at run time (dvfl.storage decodes
    %XX): the validator compared the escaped text with the mounts and refused it."""
    from dvfl.cluster.validate import _job_path_errors

    assert _job_path_errors(("job",), {"output_dir": "file:///mnt/shared%20vol/runs"}, {"/mnt/shared vol"}, "c") == []
    (error,) = _job_path_errors(("job",), {"output_dir": "file:///mnt/other%20vol/runs"}, {"/mnt/shared vol"}, "c")
    assert "not on a volume that the head and every worker group mount" in error
