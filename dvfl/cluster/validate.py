"""Offline validation of the Ray cluster configs in ``cluster/``.

Nothing here contacts a cloud, a Kubernetes API server or the network: every check runs on the
YAML alone, so a broken config fails CI instead of a ``ray up`` / ``kubectl apply`` later.

Ray cluster launcher configs (``cluster/aws.yaml``, ``cluster/gcp.yaml``):

* ``[schema]``  the JSON schema shipped inside the installed ray wheel (``ray/autoscaler/ray-schema.json``);
* ``[ray]``     Ray's own config preparation and validation, the steps ``ray up`` runs before it talks to
  the cloud: ``prepare_config`` (merges the provider's defaults.yaml, setup commands, docker checks,
  per-type min/max workers) then ``validate_config`` (schema again on the merged config, head type,
  sum of ``min_workers`` <= ``max_workers``). Private API of ray 2.60.0, hence the pin in pyproject.toml;
  the provider's ``bootstrap_config`` (which does call the cloud) is never run;
* ``[policy]``  project rules: node ``resources`` are integers, the dashboard binds to loopback (checked
  on the *prepared* config, so dropping ``head_start_ray_commands`` and inheriting Ray's default
  ``--dashboard-host=0.0.0.0`` fails too), every ``ray start`` runs with token authentication
  (``RAY_AUTH_MODE=token`` as its shell line exports it: :func:`ray_start_auth_modes`), no
  security-group rule opens anything but SSH to addresses outside private networks (security groups
  named by id in a ``node_config`` are reported as not checked),
  nothing that looks like a credential, a CPU worker type and a GPU worker type that can scale, every
  node runs the project image (docker/Dockerfile, tag naming the pinned Ray) and no command
  pip-installs anything at node start.

KubeRay manifests (``cluster/kuberay/*.yaml``, kinds RayCluster and RayJob):

* ``[crd]``         the openAPIV3Schema of the ``v1`` version of the KubeRay v1.7.0 CRDs in
  ``../shared/reference/kuberay-crd-v1.7.0/``, made strict: every object schema that lists its
  properties gets ``additionalProperties: false`` unless it carries
  ``x-kubernetes-preserve-unknown-fields: true`` (the API server silently prunes unknown fields, so a
  typo such as ``maxReplica`` would otherwise pass unnoticed); ``nullable``, int-or-string, int32/int64
  ranges and list-map / list-set key uniqueness are honoured; ``metadata`` is checked as ObjectMeta;
  CEL rules (``x-kubernetes-validations``) are not evaluated;
* ``[ray-kuberay]`` Ray's own translation of the RayCluster spec into autoscaler node types
  (``ray.autoscaler._private.kuberay.autoscaling_config``), which also runs ``validate_config`` on the
  result: what the in-tree autoscaler would do with the manifest at start-up;
* ``[runtime-env]`` a RayJob's ``runtimeEnvYAML`` parsed and built as a ``ray.runtime_env.RuntimeEnv``;
* ``[policy]``      project rules: dashboard on loopback (a RayJob may bind the pod's interfaces, which the
  operator needs, but only behind a ClusterIP Service), no LoadBalancer/NodePort/Ingress, whole-number
  CPU/GPU resources, ``rayVersion`` and images match the pinned ray, the Ray containers run the project
  image, token authentication on (``authOptions.mode: token``, no pod ``env`` entry setting
  ``RAY_AUTH_MODE`` to anything but ``token``), no ``externalIPs`` on the head Service, autoscaling on, CPU and GPU worker
  groups, no credentials; a RayJob's run config (its entrypoint's ``--config`` with ``--set`` and
  its path flags) names every path as a URI or an absolute path on a volume every pod mounts (the
  same claim or NFS export); its ``runtimeEnvYAML`` installs no packages (``pip``, ``uv``, ``conda``);
  NetworkPolicies in the same file and namespace select every group's pods and admit the cluster's
  own pods to every port, a RayJob's head admits the KubeRay operator and its submitter pod to the
  job server port, and no rule of the file admits anything else but to that port
  (:func:`network_policy_errors`).

CLI: ``dvfl validate-cluster cluster/*.yaml cluster/kuberay/*.yaml`` (:mod:`dvfl.commands.validate_cluster`)
prints ``OK`` or the errors per file and exits non-zero if any file fails.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

# The private Ray helpers used below were read in, and verified against, this exact release.
PINNED_RAY_VERSION = "2.60.0"

REPO_ROOT = Path(__file__).resolve().parents[2]
# CI runs on a clean clone with a copy of shared/ beside it: <root>/../shared/reference/...
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "reference" / "kuberay-crd-v1.7.0"
CRD_DIR_ENV = "DVFL_KUBERAY_CRD_DIR"

KUBERAY_GROUP = "ray.io"
KUBERAY_VERSION = "v1"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
WORLD_CIDRS = {"0.0.0.0/0", "::/0"}
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = [
    "FileReport",
    "PINNED_RAY_VERSION",
    "find_crd_dir",
    "kuberay_crd_schema",
    "load_documents",
    "network_policy_errors",
    "ray_launcher_schema",
    "validate_document",
    "validate_file",
    "validate_kuberay_manifest",
    "validate_launcher_config",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _path_text(path: Iterable[Any]) -> str:
    """``("spec", "workerGroupSpecs", 0)`` -> ``spec.workerGroupSpecs[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _error_line(layer: str, path: Iterable[Any], message: str) -> str:
    return f"[{layer}] {_path_text(path)}: {message}"


def _require_pinned_ray() -> None:
    import ray

    if ray.__version__ != PINNED_RAY_VERSION:
        raise RuntimeError(
            f"dvfl.cluster.validate uses private ray {PINNED_RAY_VERSION} helpers "
            f"(prepare_config/validate_config, the KubeRay autoscaling translation) but ray "
            f"{ray.__version__} is installed; re-check those helpers and update PINNED_RAY_VERSION"
        )


def _as_mapping(value: Any) -> dict:
    """``value`` if it is a mapping, else ``{}``: policy checks read broken configs too."""
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list:
    """``value`` if it is a list, else ``[]``."""
    return value if isinstance(value, list) else []


def _is_name_in(value: Any, names: Any) -> bool:
    """``value in names`` for string sets, False for anything unhashable or not a string."""
    return isinstance(value, str) and value in names


def _is_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_documents(path: str | os.PathLike) -> list[Any]:
    """All YAML documents of a file (empty documents dropped)."""
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_YAML_LOADER) if d is not None]


def _jsonschema_errors(
    layer: str, validator: Any, instance: Any, base: tuple = ()
) -> list[str]:
    """Every jsonschema error, one line each, unknown keys named one by one."""
    out = []
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    for e in errors:
        path = base + tuple(e.absolute_path)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            known = set(e.schema.get("properties", {}))
            patterns = e.schema.get("patternProperties", {})
            extra = [
                k
                for k in e.instance
                if k not in known and not any(re.search(p, k) for p in patterns)
            ]
            if extra:
                for k in extra:
                    out.append(_error_line(layer, path + (k,), "unknown field (not in the schema)"))
                continue
        out.append(_error_line(layer, path, e.message))
    return out


# --------------------------------------------------------------------------------------------
# policy checks shared by both kinds
# --------------------------------------------------------------------------------------------
_SECRET_VALUE_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r'"type"\s*:\s*"service_account"|"private_key(?:_id)?"\s*:'), "a GCP service-account key"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{30,}"), "a GitHub token"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "a Slack token"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "a Hugging Face token"),
    (re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{20,}"), "a bearer token"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I), "a password in a URL"),
    (re.compile(r"--[a-z-]*password[= ]+(?!\$)\S+", re.I), "a password on a command line"),
    (
        re.compile(
            r"\b[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY)[A-Z0-9_]*"
            # (a name for where a secret is, RAY_AUTH_TOKEN_PATH=/etc/..., is not one)
            r"(?<!_PATH)(?<!_PATHS)(?<!_FILE)(?<!_FILES)(?<!_DIR)(?<!_DIRS)(?<!_MOUNT)(?<!_HELPER)"
            r"\s*=\s*['\"]?(?![$'\"\s])[^\s'\";]{6,}"
        ),
        "a secret assigned in a command",
    ),
]
_SECRET_KEY = re.compile(
    r"(?i)(passw(?:or)?d|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)$"
)
# Keys that name or point at a secret instead of holding it (secretName, claimName, key paths).
_REFERENCE_KEY = re.compile(r"(?i)(name|ref|path|file|mode)$")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../", "$")) and "\n" not in value


def credential_errors(obj: Any, base: tuple = ()) -> list[str]:
    """Strings that look like credentials, anywhere in a config (values and sensitive keys)."""
    out: list[str] = []

    def visit(node: Any, path: tuple, key: str | None) -> None:
        if isinstance(node, dict):
            # Kubernetes env entries: {name: FOO_TOKEN, value: literal} -> the name is the key.
            if isinstance(node.get("name"), str) and "value" in node and "valueFrom" not in node:
                visit(node["value"], path + ("value",), node["name"])
                rest = {k: v for k, v in node.items() if k != "value"}
            else:
                rest = node
            for k, v in rest.items():
                visit(v, path + (k,), str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, path + (i,), key)
        elif isinstance(node, str):
            for pattern, what in _SECRET_VALUE_PATTERNS:
                if pattern.search(node):
                    out.append(_error_line("policy", path, f"looks like {what}; credentials never go in these files"))
                    return
            if (
                key
                and _SECRET_KEY.search(key)
                and not _REFERENCE_KEY.search(key)
                and node.strip()
                and not _looks_like_path(node)
            ):
                out.append(
                    _error_line("policy", path, f"a literal value for the credential-like key {key!r}; "
                         "use the cloud's identity (instance profile / service account) or a "
                         "Kubernetes Secret reference")
                )

    visit(obj, base, None)
    return out


def _roles_errors(layer: str, node_types: dict[str, dict], head: str, where: tuple) -> list[str]:
    """The project's clusters need a CPU worker type (decode/ingest) and a GPU worker type
    (teacher inference, training), each able to scale out."""
    cpu = gpu = False
    out = []
    for name, nt in _as_mapping(node_types).items():
        if name == head or not isinstance(nt, dict):
            continue
        res = _as_mapping(nt.get("resources"))
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers", 0)
        if _is_plain_int(lo) and _is_plain_int(hi) and lo > hi:
            out.append(_error_line(layer, where + (name,), f"min workers {lo} > max workers {hi}"))
        if not (_is_plain_int(hi) and hi >= 1):
            continue
        gpus, cpus = res.get("GPU") or 0, res.get("CPU") or 0
        if isinstance(gpus, (int, float)) and gpus > 0:
            gpu = True
        elif isinstance(cpus, (int, float)) and cpus > 0:
            cpu = True
    if not cpu:
        out.append(_error_line(layer, where, "no CPU-only worker type that can scale out (max >= 1), "
                        "needed for video decoding / ingest"))
    if not gpu:
        out.append(_error_line(layer, where, "no GPU worker type that can scale out (max >= 1), "
                        "needed for teacher inference and training"))
    return out


# --------------------------------------------------------------------------------------------
# Ray cluster launcher configs
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def ray_launcher_schema() -> dict:
    """The JSON schema for launcher YAMLs that ships in the installed ray wheel."""
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _launcher_validator():
    import jsonschema

    schema = ray_launcher_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


_DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)(['\"]?)([^\s'\";]*)\1")  # "" too: every interface


def _dashboard_host_errors(commands: Iterable[str], where: tuple) -> list[str]:
    out = []
    for i, cmd in enumerate(_as_list(commands)):
        if not isinstance(cmd, str):
            continue
        for m in _DASHBOARD_HOST.finditer(cmd):
            host = m.group(2)
            if host not in LOOPBACK_HOSTS:
                out.append(_error_line("policy", where + (i,), f"--dashboard-host={host or repr(host)}: the dashboard and "
                                "job server must bind to loopback (127.0.0.1) and be reached through "
                                "`ray dashboard` port-forwarding"))
    return out


_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_SHELL_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "\n"}
# commands that cannot change the environment a later `ray start` sees; any other one (if/then,
# source, eval, declare, sudo, ...) makes a line with a `ray start` unreadable here
_ENV_NEUTRAL_COMMANDS = {"ray", "ulimit", "echo", "printf", "true", ":", "sleep", "mkdir", "cd", "ls", "cat",
                         "touch", "chmod", "rm", "cp", "mv", "test", "["}
RAY_START_MENTION = re.compile(r"\bray\b[^;&|\n]*?\bstart\b")  # (options may come between)


def ray_start_auth_modes(cmd: str) -> list[str | None] | None:
    """RAY_AUTH_MODE as each ``ray start`` of one shell command line sees it (None: unset), read
    through ``export``/``unset``/``env`` and per-command assignments in order; None when the line
    cannot be read as plain shell (then nothing about it can be vouched for). ``&&`` and ``||``
    are read as ``;``: an export they skip is taken as done."""
    import shlex

    lexer = shlex.shlex(cmd.replace("\n", " \n "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace = " \t\r"  # newlines separate commands
    lexer.whitespace_split = True
    lexer.commenters = ""  # (shlex ends a line at any '#', the shell only at a word's start)
    try:
        tokens = list(lexer)
    except ValueError:
        return None
    if "(" in tokens or ")" in tokens:  # sub-shells and $(...): what they export does not persist
        return None
    if any(t.startswith("#") for t in tokens):  # a comment: what follows it is not run
        return None
    shell: dict[str, str] = {}  # the line's shell variables, and which of them are exported
    exported: set[str] = set()
    modes: list[str | None] = []
    words: list[str] = []
    before = ";"
    for token in [*tokens, ";"]:
        if token not in _SHELL_SEPARATORS:
            words.append(token)
            continue
        # a command in a pipeline or in the background runs in a sub-shell of its own
        own_shell, before = token in ("|", "&") or before == "|", token
        saved = (dict(shell), set(exported))
        prefix: dict[str, str | None] = {}
        while words and _ASSIGNMENT.match(words[0]):
            name, value = _ASSIGNMENT.match(words.pop(0)).groups()
            prefix[name] = value
        cleared = False
        if words and words[0] == "env":  # env [-i] [-u NAME] [NAME=value ...] command
            words.pop(0)
            while words and (words[0] in ("-i", "-", "--ignore-environment", "-u") or _ASSIGNMENT.match(words[0])):
                word = words.pop(0)
                if word == "-u":
                    prefix[words.pop(0) if words else ""] = None
                elif _ASSIGNMENT.match(word):
                    prefix.update([_ASSIGNMENT.match(word).groups()])
                else:
                    cleared = True
        if words and (words[0] in ("export", "unset") and any(w.startswith("-") for w in words[1:])
                      or words[0] not in ("export", "unset") and words[0].rsplit("/", 1)[-1] not in _ENV_NEUTRAL_COMMANDS):
            return None  # export -n, unset -f, if/then, source, eval, declare, sudo, ...: not read here
        if not words:  # a bare assignment sets a shell variable (seen by children once exported)
            shell.update({k: v for k, v in prefix.items() if v is not None})
        elif words[0] == "export":
            for word in words[1:]:
                m = _ASSIGNMENT.match(word)
                if m:
                    shell[m.group(1)] = m.group(2)
                exported.add(m.group(1) if m else word)
        elif words[0] == "unset":
            for word in words[1:]:
                shell.pop(word, None)
                exported.discard(word)
        elif words[0].rsplit("/", 1)[-1] == "ray" and "start" in words[1:]:
            env = {} if cleared else {k: v for k, v in shell.items() if k in exported}
            env.update(prefix)
            modes.append(env.get("RAY_AUTH_MODE"))
        if own_shell:
            shell, exported = saved
        words = []
    return modes


def _auth_errors(prepared: dict) -> list[str]:
    """Every `ray start` runs with token authentication (RAY_AUTH_MODE=token); a node without it
    accepts any job or Ray Client connection that reaches its ports. Each command runs in a shell of
    its own, so only what the same line exports (or sets on the command) counts."""
    out = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, cmd in enumerate(_as_list(prepared.get(key))):
            if not isinstance(cmd, str):
                continue
            modes = ray_start_auth_modes(cmd)
            mentions = len(RAY_START_MENTION.findall(cmd))
            if not mentions and not modes:
                continue  # (a line without `ray start` may hold any shell)
            if modes is None or len(modes) < mentions:
                out.append(_error_line("policy", (key, i), "cannot tell whether its `ray start` runs with token "
                                       "authentication: write it as a plain command after `export "
                                       "RAY_AUTH_MODE=token;` (no quoting, eval or sub-shell around it)"))
            elif any(mode != "token" for mode in modes):
                seen = next(mode for mode in modes if mode != "token")
                out.append(_error_line("policy", (key, i), "`ray start` without token authentication "
                                       f"(RAY_AUTH_MODE {'unset' if seen is None else repr(seen)} where it runs): "
                                       "prefix it with `export RAY_AUTH_MODE=token;` (the token file comes "
                                       "from file_mounts, never inline)"))
    return out


LAUNCHER_COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                         "head_start_ray_commands", "worker_start_ray_commands")
_TOKEN_PATH = re.compile(r"\bRAY_AUTH_TOKEN_PATH=(['\"]?)([^\s'\";]+)\1")
_TOKEN_FROM_ENV = re.compile(r"\bRAY_AUTH_TOKEN=['\"]?\$")  # the token itself from a secret's variable
_WRITE_TARGET = re.compile(r"((?<![0-9&])>[>|]?|\btee\b(?:\s+-a)?)\s*(['\"]?)([^\s'\";|&<>]+)\2")
_COMMAND_SEPARATOR = re.compile(r";|&&|\|\||\n")


def _token_sources(cfg: dict) -> tuple[set[str], bool]:
    """The token file paths the start lines name (RAY_AUTH_TOKEN_PATH), and whether they take the
    token itself from a variable (RAY_AUTH_TOKEN=$...)."""
    lines = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
             for c in _as_list(cfg.get(key)) if isinstance(c, str)]
    return {m.group(2) for c in lines for m in _TOKEN_PATH.finditer(c)}, any(_TOKEN_FROM_ENV.search(c) for c in lines)


_COMMAND_WRAPPERS = {"sudo", "env", "command", "exec", "nohup", "time", "(", "{"}


def _literal_into(segment: str, write: int) -> bool:
    """Whether what a pipeline writes at ``write`` (its ``>`` or ``tee``) is text of the command
    itself: a heredoc, a here-string without a variable, or a pipeline that starts with an
    echo/printf without a variable (``$``, a backtick), whatever filters or ``sudo tee`` follow, also
    inside ``sh -c '...'``. Any other first command (a secret manager's CLI, ``cat`` of a mounted
    secret, ``tee < file``) is a secret's source."""
    if re.search(r"(?<!<)<<(?!<)", segment):  # a heredoc: its lines are the config's
        return True
    here = re.search(r"<<<\s*(\S+)", segment)
    if here:
        return not re.search(r"[$`]", here.group(1))
    before = segment[:write]
    words = before.split("|")[0].replace("(", " ( ").replace("{", " { ").split()
    while words and (words[0] in _COMMAND_WRAPPERS or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])
                     or (words[0].startswith("-") and len(words) > 1)):  # (env -i; sudo -u USER: its argument too)
        words = words[2:] if words[0] in ("-u", "-g") else words[1:]
    if len(words) > 2 and os.path.basename(words[0]) in ("sh", "bash", "dash", "zsh") and words[1] == "-c":
        script = before.split(words[1], 1)[1].strip().lstrip("'\"")  # the quoted script, up to the write
        return _literal_into(script, len(script))
    return bool(words) and os.path.basename(words[0]) in ("echo", "printf") and not re.search(r"[$`]", before)


def _token_file_errors(raw: dict, cfg: dict) -> list[str]:
    """The nodes' token: a file the launcher copies from the user's machine (file_mounts), or a
    secret's variable; never written by a command from the config's own text. With neither, every
    `ray start` with token authentication fails (Ray 2.60 creates no token on a node)."""
    paths, from_env = _token_sources(cfg)
    out = []
    for key in LAUNCHER_COMMAND_KEYS:  # (the file's own keys: Ray copies setup_commands into both roles')
        for i, cmd in enumerate(_as_list(raw.get(key))):
            if not isinstance(cmd, str):
                continue
            # ({ a; } groups its commands: one pipeline for what it writes)
            for segment in _COMMAND_SEPARATOR.split(re.sub(r"\{([^{}]*?);\s*\}", r"( \1 )", cmd)):
                for m in _WRITE_TARGET.finditer(segment):
                    target = m.group(3)
                    if not (target.endswith("auth_token") or target in paths or "RAY_AUTH_TOKEN_PATH" in target):
                        continue
                    if _literal_into(segment, m.start()):
                        out.append(_error_line("policy", (key, i), f"writes Ray's token file ({target}) from the "
                                               "config's own text: the token inline; copy the file with file_mounts "
                                               "(or write it from a secret: its variable, file or manager)"))
    if from_env:
        return out
    wanted = paths or {"~/.ray/auth_token"}
    targets = {str(t).rstrip("/") for t in _as_mapping(cfg.get("file_mounts"))}
    if not any(w == t or w.startswith(t + "/") or (not paths and t.endswith("/.ray/auth_token"))
               for t in targets for w in wanted):
        out.append(_error_line("policy", ("file_mounts",), f"no {' or '.join(sorted(wanted))}: the nodes' `ray start` "
                               "with token authentication finds no token and fails; mount the token file "
                               "(\"~/.ray/auth_token\": \"~/.ray/auth_token\") or set RAY_AUTH_TOKEN from a secret"))
    return out


# GCS, dashboard, Ray Client (runs arbitrary code), object manager (as the launcher configs set it),
# dashboard agent; and Ray's default worker port range
RAY_PORTS = (6379, 8265, 10001, 8076, 52365)
WORKER_PORTS = (10002, 19999)


def _ray_ports_in(rule: dict) -> list:
    if rule.get("IpProtocol") in ("-1", -1, "all"):
        return [*RAY_PORTS, "{}-{}".format(*WORKER_PORTS)]
    lo, hi = rule.get("FromPort"), rule.get("ToPort")
    if not (_is_plain_int(lo) and _is_plain_int(hi)):
        return []
    workers = ["{}-{}".format(*WORKER_PORTS)] if lo <= WORKER_PORTS[1] and hi >= WORKER_PORTS[0] else []
    return [p for p in RAY_PORTS if lo <= p <= hi] + workers


# The address ranges that stay inside a VPC or an office network (RFC 1918, carrier-grade NAT,
# IPv6 unique-local); every other range, however it is spelt (0::/0, 0.0.0.0/1 + 128.0.0.0/1, a
# public /24), reaches the internet.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in
                         ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


def _is_public_cidr(cidr: Any) -> bool:
    """A rule source that is an address range outside :data:`PRIVATE_NETWORKS` (an unreadable one
    counts as public: it cannot be vouched for). Prefix lists and security groups are not ranges."""
    if isinstance(cidr, str) and cidr.startswith(("prefix list ", "security group ")):
        return False
    try:
        net = ipaddress.ip_network(str(cidr), strict=False)
    except ValueError:
        return True
    return not any(net.version == p.version and net.subnet_of(p) for p in PRIVATE_NETWORKS)


def _security_group_errors(config: dict) -> list[str]:
    out = []
    sg = _as_mapping(_as_mapping(config.get("provider")).get("security_group"))
    for i, rule in enumerate(_as_list(sg.get("IpPermissions"))):
        if not isinstance(rule, dict):
            continue
        cidrs = [r.get("CidrIp") for r in _as_list(rule.get("IpRanges")) if isinstance(r, dict)]
        cidrs += [r.get("CidrIpv6") for r in _as_list(rule.get("Ipv6Ranges")) if isinstance(r, dict)]
        # a managed prefix list or another security group is a source outside the cluster as well
        cidrs += [f"prefix list {r.get('PrefixListId')}" for r in _as_list(rule.get("PrefixListIds"))
                  if isinstance(r, dict)]
        cidrs += [f"security group {r.get('GroupId') or r.get('GroupName')}"
                  for r in _as_list(rule.get("UserIdGroupPairs")) if isinstance(r, dict)]
        public = [c for c in cidrs if _is_public_cidr(c)]
        ssh_only = rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == 22 and rule.get("ToPort") == 22
        if not public:
            # a network range (the VPC, an office): still not the cluster's own nodes, which reach
            # each other through the group's self rule that `ray up` adds. Any port but SSH: the
            # raylet's, the metrics agent's and the runtime-env agent's are picked at random up to 65535
            exposed = _ray_ports_in(rule)
            if cidrs and (exposed or not ssh_only):
                what = (f"Ray port(s) {', '.join(map(str, exposed))}" if exposed else
                        f"ports {rule.get('FromPort')}-{rule.get('ToPort')}/{rule.get('IpProtocol')} (Ray picks "
                        "some of its ports at random, up to 65535; Serve listens on 8000)")
                out.append(_error_line("policy", ("provider", "security_group", "IpPermissions", i),
                                f"opens {what} to {', '.join(map(str, cidrs))}; "
                                "only the cluster's own nodes (the group itself) may reach the GCS, Ray "
                                "Client and dashboard ports"))
            continue
        if not ssh_only:
            world = "" if set(public) <= WORLD_CIDRS else f" ({', '.join(map(str, public))}: not a private network)"
            out.append(_error_line("policy", ("provider", "security_group", "IpPermissions", i),
                            f"opens ports {rule.get('FromPort')}-{rule.get('ToPort')}/"
                            f"{rule.get('IpProtocol')} to the world{world}; only SSH (22) may be reachable "
                            "from outside (dashboard via `ray dashboard`)"))
    return out


# Ray's schema leaves node_config free-form (it goes to the cloud API at launch); these are the
# fields without which the launch request cannot even be formed.
_NODE_CONFIG_REQUIRED = {"aws": ("InstanceType",), "gcp": ("machineType",)}


def _node_config_errors(raw: dict) -> list[str]:
    out = []
    ptype = _as_mapping(raw.get("provider")).get("type")
    required = _NODE_CONFIG_REQUIRED.get(ptype, ()) if isinstance(ptype, str) else ()
    for name, nt in _as_mapping(raw.get("available_node_types")).items():
        node_config = _as_mapping(_as_mapping(nt).get("node_config"))
        for key in required:
            value = node_config.get(key)
            if not (isinstance(value, str) and value.strip()):
                out.append(_error_line("policy", ("available_node_types", name, "node_config", key),
                                f"{value!r}: the instance type must be a non-empty string"))
    return out


# The project image (docker/Dockerfile): <registry>/dvfl:<version>-ray<pinned Ray>-py311[-gpu]
PROJECT_IMAGE_NAME = "dvfl"
PROJECT_DIR_IN_IMAGE = "/home/ray/dvfl"  # WORKDIR of docker/Dockerfile
_PIP_INSTALL = re.compile(r"\bpip3?\s+install\b|\buv\s+pip\s+install\b|\bconda\s+install\b")


def project_image_error(image: Any) -> str | None:
    """Why ``image`` is not the project image of the pinned Ray version (None when it is)."""
    if not isinstance(image, str):
        return None  # the schema reports the type
    image_ref = image.split("@", 1)[0]  # a digest pin (...@sha256:...) keeps the tag before it
    name, _, tag = image_ref.rpartition(":") if ":" in image_ref.rsplit("/", 1)[-1] else (image_ref, "", "latest")
    if name.rsplit("/", 1)[-1] != PROJECT_IMAGE_NAME:
        return (f"{image}: not the project image (docker/Dockerfile, <registry>/{PROJECT_IMAGE_NAME}:<version>-"
                f"ray{PINNED_RAY_VERSION}-py311[-gpu]); a stock image would install the project and torch at "
                "every node start")
    if f"ray{PINNED_RAY_VERSION}" not in tag:
        return f"{image}: the project image's tag must name the pinned Ray version (ray{PINNED_RAY_VERSION})"
    return None


def dockerfile_errors(text: str) -> list[str]:
    """docker/Dockerfile builds what the configs expect: FROM rayproject/ray of the pinned version,
    the project under PROJECT_DIR_IN_IMAGE with the entry points and configs a RayJob runs, and
    the package installed (static checks: no Docker daemon needed)."""
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = {}
    for ln in lines:
        m = re.match(r"ARG\s+(\w+)(?:=(\S*))?$", ln)
        if m and m.group(2) is not None:
            args.setdefault(m.group(1), m.group(2))

    def expand(v: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), v)

    out = []
    froms = [expand(ln.split(None, 1)[1]) for ln in lines if ln.upper().startswith("FROM ")]
    if not froms or not froms[-1].startswith(f"rayproject/ray:{PINNED_RAY_VERSION}-"):
        out.append(_error_line("policy", ("FROM",), f"{froms[-1] if froms else 'no FROM'}: the image must be built on "
                        f"rayproject/ray:{PINNED_RAY_VERSION}-* (the pinned Ray)"))
    workdirs = [ln.split(None, 1)[1] for ln in lines if ln.upper().startswith("WORKDIR ")]
    if not workdirs or workdirs[-1] != PROJECT_DIR_IN_IMAGE:
        out.append(_error_line("policy", ("WORKDIR",), f"{workdirs[-1] if workdirs else 'none'}: must be "
                        f"{PROJECT_DIR_IN_IMAGE} (where the RayJob's entrypoint runs the project from)"))
    copied = {ln.split()[-1].rstrip("/").removeprefix("./") for ln in lines if ln.upper().startswith("COPY ")}
    for need in ("dvfl", "pipelines", "configs"):
        if need not in copied:
            out.append(_error_line("policy", ("COPY",), f"{need}/ is not copied into the image (the RayJob runs "
                            "pipelines/*.py with configs/*.yaml from it)"))
    installs = [ln for ln in lines if ln.upper().startswith("RUN ") and re.search(r"pip3?\s+install\b[^&;]*\s\.(\s|$)", ln)]
    if not installs:
        out.append(_error_line("policy", ("RUN",), "no `pip install .`: the package and its dependencies must be "
                        "installed in the image"))
    elif not any(re.search(r"pip3?\s+install\b[^&;]*\s(-e|--editable)\s+\.(\s|$)", ln) for ln in installs):
        out.append(_error_line("policy", ("RUN",), "`pip install .` without -e: the package lands in site-packages, "
                        "apart from the configs/ and models/ a command without --config reads beside it"))
    return out


def _image_errors(prepared: dict) -> list[str]:
    """Every node runs the project image, and nothing is pip-installed when a node starts."""
    out = []
    docker = _as_mapping(prepared.get("docker"))
    head_type = prepared.get("head_node_type")
    for name, nt in _as_mapping(prepared.get("available_node_types")).items():
        # a node without an image runs on the bare VM and would install the project at every start
        own = _as_mapping(_as_mapping(nt).get("docker"))
        role = "head_image" if name == head_type else "worker_image"
        if not (docker.get("image") or docker.get(role) or own.get(role) or own.get("image")):
            out.append(_error_line("policy", ("available_node_types", name),
                                   f"no container image (docker.image or {role}): every node runs the project "
                                   f"image (docker/Dockerfile, <registry>/{PROJECT_IMAGE_NAME}:<version>-"
                                   f"ray{PINNED_RAY_VERSION}-py311[-gpu])"))
    for key in ("image", "head_image", "worker_image"):
        why = project_image_error(docker.get(key)) if key in docker else None
        if why:
            out.append(_error_line("policy", ("docker", key), why))
    for name, nt in _as_mapping(prepared.get("available_node_types")).items():
        for key, image in _as_mapping(_as_mapping(nt).get("docker")).items():
            why = project_image_error(image) if key.endswith("image") else None
            if why:
                out.append(_error_line("policy", ("available_node_types", name, "docker", key), why))
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for i, cmd in enumerate(_as_list(prepared.get(key))):
            if isinstance(cmd, str) and _PIP_INSTALL.search(cmd):
                out.append(_error_line("policy", (key, i), "installs packages at every node start; put them in the "
                                "project image (docker/Dockerfile) instead"))
    return out


def _launcher_policy_errors(raw: dict, prepared: dict | None) -> list[str]:
    out: list[str] = []
    node_types = raw.get("available_node_types") or {}
    for name, nt in _as_mapping(node_types).items():
        res = _as_mapping(nt).get("resources")
        if not isinstance(res, dict):
            continue
        for rname, value in res.items():
            if not _is_plain_int(value) or value < 0:
                out.append(_error_line("policy", ("available_node_types", name, "resources", rname),
                                f"{value!r} ({type(value).__name__}): node resources must be "
                                "non-negative integers"))
    # The dashboard check runs on the prepared config: commands inherited from Ray's provider
    # defaults.yaml (which bind the dashboard to 0.0.0.0) count as much as the file's own.
    cfg = prepared if prepared is not None else raw
    out += _dashboard_host_errors(cfg.get("head_start_ray_commands"), ("head_start_ray_commands",))
    if prepared is not None and "head_start_ray_commands" not in raw:
        out = [e + " (inherited from Ray's provider defaults; set head_start_ray_commands)"
               if "dashboard-host" in e else e for e in out]
    out += _auth_errors(cfg)
    out += _token_file_errors(raw, cfg)
    out += _security_group_errors(raw)
    out += _node_config_errors(raw)
    if _as_mapping(raw.get("provider")).get("gcp_credentials"):
        out.append(_error_line("policy", ("provider", "gcp_credentials"),
                        "inline GCP credentials; use Application Default Credentials"))
    out += credential_errors(raw)
    if prepared is not None:
        out += _image_errors(prepared)
        out += _roles_errors("policy", prepared.get("available_node_types") or {},
                             prepared.get("head_node_type"), ("available_node_types",))
    return out


def validate_launcher_config(config: Any) -> list[str]:
    """Errors of a Ray cluster launcher config (a dict from the YAML); ``[]`` when valid."""
    _require_pinned_ray()
    if not isinstance(config, dict):
        return [_error_line("schema", (), f"a launcher config is a mapping, got {type(config).__name__}")]
    errors = _jsonschema_errors("schema", _launcher_validator(), config)

    prepared = None
    if not errors:
        from ray.autoscaler._private.util import prepare_config, validate_config

        ptype = (config.get("provider") or {}).get("type")
        if ptype in ("local", "kuberay", "external", "readonly"):
            # prepare_config short-circuits (kuberay), rewrites node lists (local) or imports a
            # user module (external): none of them is a launcher config for this project.
            errors.append(_error_line("ray", ("provider", "type"), f"{ptype!r} is not a cloud launcher "
                               "provider (expected aws, gcp, azure, ...)"))
        else:
            try:
                prepared = prepare_config(copy.deepcopy(config))
                validate_config(prepared)
            except Exception as e:  # jsonschema.ValidationError, ValueError, AssertionError, ...
                msg = getattr(e, "message", None) or str(e) or type(e).__name__
                path = tuple(getattr(e, "absolute_path", ()) or ())
                errors.append(_error_line("ray", path, f"{type(e).__name__}: {msg}"))
                prepared = None
    return errors + _launcher_policy_errors(config, prepared)


# A worker's own cloud identity: Ray gives its instance profile (AWS) or service account (GCP) to
# the head node only, so a worker's decode tasks, Train checkpoints and cache writers had no
# credentials for the s3:// or gs:// paths the driver had checked (a note: a cluster on a shared
# file system needs none)
_WORKER_IDENTITY = {"aws": ("IamInstanceProfile", "its instance profile"),
                    "gcp": ("serviceAccounts", "its service account")}


def launcher_notes(config: Any) -> list[str]:
    """What a valid launcher config leaves unchecked: security groups given by id in a node's
    ``node_config`` (their rules live in the cloud account, not in the file)."""
    out = []
    ptype = _as_mapping(_as_mapping(config).get("provider")).get("type")
    identity = _WORKER_IDENTITY.get(ptype) if isinstance(ptype, str) else None
    for name, nt in _as_mapping(_as_mapping(config).get("available_node_types")).items():
        node_config = _as_mapping(_as_mapping(nt).get("node_config"))
        groups = [*_as_list(node_config.get("SecurityGroupIds")), *_as_list(node_config.get("SecurityGroups"))]
        groups += [g for nic in _as_list(node_config.get("NetworkInterfaces")) for g in _as_list(_as_mapping(nic).get("Groups"))]
        if groups:
            out.append(f"available_node_types.{name}.node_config: security group(s) {', '.join(map(str, groups))} are "
                       "not read (their rules live in the cloud account): check that no Ray port is open beyond "
                       "the cluster's own nodes (docs/cluster.md)")
        if (identity and name != _as_mapping(config).get("head_node_type") and not node_config.get(identity[0])
                and not node_config.get("LaunchTemplate")):  # (a template may carry one: noted below)
            out.append(f"available_node_types.{name}.node_config: no {identity[0]}: Ray attaches {identity[1]} to "
                       "the head node only, so this worker cannot read or write s3:// or gs:// paths (decode tasks, "
                       "Ray Train workers and cache writers run on workers); fine if every path is on a shared file "
                       "system (docs/cluster.md)")
        if node_config.get("LaunchTemplate"):  # (merged at `ray up`: its groups and interfaces were never named)
            out.append(f"available_node_types.{name}.node_config: LaunchTemplate is not read (it lives in the cloud "
                       "account; Ray merges its security groups and network interfaces at `ray up`): check that no Ray "
                       "port is open beyond the cluster's own nodes (docs/cluster.md)")
    if _as_mapping(_as_mapping(config).get("provider")).get("type") == "gcp":
        # GCP firewall rules belong to the network, not the file; Ray puts nodes on the region's first subnet
        out.append("GCP firewall rules are not read (they belong to the VPC network): on the `default` network "
                   "`default-allow-internal` opens every Ray port to every VM of the project; use a VPC of the "
                   "cluster's own (docs/cluster.md, Firewall)")
    return out


def launcher_summary(config: dict) -> str:
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy.deepcopy(config))
    parts = []
    for name, nt in prepared["available_node_types"].items():
        res = ",".join(f"{k}={v}" for k, v in nt.get("resources", {}).items())
        role = "head" if name == prepared["head_node_type"] else f"{nt['min_workers']}..{nt['max_workers']}"
        parts.append(f"{name}[{role}] {res}")
    return f"{prepared['provider']['type']} launcher: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------
def find_crd_dir() -> Path:
    """KubeRay CRDs: $DVFL_KUBERAY_CRD_DIR, else ../shared/reference/kuberay-crd-v1.7.0 beside the repo."""
    env = os.environ.get(CRD_DIR_ENV)
    path = Path(env) if env else DEFAULT_CRD_DIR
    if not all((path / f).is_file() for f in CRD_FILES.values()):
        raise FileNotFoundError(
            f"KubeRay CRDs not found in {path} (expected {', '.join(CRD_FILES.values())}); "
            f"put the shared/ reference copy beside the repository or set {CRD_DIR_ENV}"
        )
    return path


# ObjectMeta as a manifest may carry it (the API server validates metadata itself; the CRD only
# says `type: object`). Server-populated fields (uid, resourceVersion, ...) do not belong in a file.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _strict(schema: Any) -> Any:
    """Copy of a CRD structural schema where unknown keys are errors (see module doc)."""
    if not isinstance(schema, dict):
        return schema
    s = dict(schema)
    preserve = s.get("x-kubernetes-preserve-unknown-fields") is True
    if isinstance(s.get("properties"), dict):
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _strict(s["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(s.get(key), list):
            s[key] = [_strict(x) for x in s[key]]
    if isinstance(s.get("not"), dict):
        s["not"] = _strict(s["not"])
    if s.get("x-kubernetes-embedded-resource") is True and not preserve:
        props = s.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", _OBJECT_META)
    if s.get("x-kubernetes-int-or-string") is True and "type" not in s and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") is True and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("type") == "object" and not preserve and "additionalProperties" not in s:
        s["additionalProperties"] = False
    return s


# Bump when _strict or the root rules below change: it keys the on-disk cache of strict schemas.
_STRICT_SCHEMA_REV = 1


def _schema_cache_file(crd_bytes: bytes, kind: str) -> Path:
    digest = hashlib.sha256(crd_bytes).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dvfl" / f"kuberay-{kind}-{digest}-r{_STRICT_SCHEMA_REV}.json"


@functools.lru_cache(maxsize=None)
def _kuberay_crd_schema_cached(kind: str, crd_dir: str) -> dict:
    # Parsing the CRD YAML (1-1.4 MB) dominates a run; the strict schema derived from it is cached
    # as JSON keyed by the CRD's hash, so an edited CRD is never served stale.
    crd_bytes = (Path(crd_dir) / CRD_FILES[kind]).read_bytes()
    cache = _schema_cache_file(crd_bytes, kind)
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    schema = _strict_crd_schema(kind, yaml.load(crd_bytes, Loader=_YAML_LOADER))
    try:  # written whole (a temporary file renamed, removed if the write fails)
        from dvfl import storage

        storage.write_json(str(cache), schema)
    except OSError:
        pass  # read-only home: just no cache
    return schema


def _strict_crd_schema(kind: str, crd: dict) -> dict:
    versions = [v for v in crd["spec"]["versions"] if v["name"] == KUBERAY_VERSION]
    if not versions:
        raise ValueError(f"{CRD_FILES[kind]} has no {KUBERAY_VERSION} version")
    schema = _strict(copy.deepcopy(versions[0]["schema"]["openAPIV3Schema"]))
    props = schema["properties"]
    props.pop("status", None)  # written by the operator, never by a manifest
    props["apiVersion"] = {"const": f"{KUBERAY_GROUP}/{KUBERAY_VERSION}"}
    props["kind"] = {"const": kind}
    props["metadata"] = _OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema["additionalProperties"] = False
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return schema


def kuberay_crd_schema(kind: str, crd_dir: str | os.PathLike | None = None) -> dict:
    """The strict JSON schema (draft 7) of a KubeRay kind from its CRD's v1 openAPIV3Schema."""
    if kind not in CRD_FILES:
        raise KeyError(f"no CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    return _kuberay_crd_schema_cached(kind, str(Path(crd_dir) if crd_dir else find_crd_dir()))


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str, crd_dir: str):
    import jsonschema

    checker = jsonschema.FormatChecker(formats=())

    @checker.checks("int32")
    def _int32(value: Any) -> bool:
        return not _is_plain_int(value) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: Any) -> bool:
        return not _is_plain_int(value) or -(2**63) <= value < 2**63

    return jsonschema.Draft7Validator(kuberay_crd_schema(kind, crd_dir), format_checker=checker)


def _list_key_errors(schema: dict, inst: Any, path: tuple, out: list[str]) -> None:
    """x-kubernetes-list-type map/set: entries must be unique by key (the API server rejects dups)."""
    if isinstance(inst, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        for k, v in inst.items():
            sub = props.get(k, addl if isinstance(addl, dict) else None)
            if isinstance(sub, dict):
                _list_key_errors(sub, v, path + (k,), out)
    elif isinstance(inst, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        kind = schema.get("x-kubernetes-list-type")
        seen: dict[Any, int] = {}
        for i, item in enumerate(inst):
            if kind == "map" and isinstance(item, dict):
                keys = schema.get("x-kubernetes-list-map-keys") or []
                values = [
                    item.get(k, _as_mapping(_as_mapping(items.get("properties")).get(k)).get("default")) for k in keys
                ]
                ident = json.dumps(values, sort_keys=True, default=str)
                label = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values))
            elif kind == "set":
                ident = json.dumps(item, sort_keys=True, default=str)
                label = ident
            else:
                ident = None
            if ident is not None:
                if ident in seen:
                    out.append(_error_line("crd", path + (i,),
                                           f"duplicate list entry ({label}), also at [{seen[ident]}]"))
                else:
                    seen[ident] = i
            _list_key_errors(items, item, path + (i,), out)


def _cluster_specs(doc: dict) -> list[tuple[tuple, dict]]:
    """(path, RayCluster spec) pairs of a manifest: a RayCluster's spec, a RayJob's rayClusterSpec."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return []
    if doc.get("kind") == "RayCluster":
        return [(("spec",), spec)]
    if doc.get("kind") == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        return [(("spec", "rayClusterSpec"), spec["rayClusterSpec"])]
    return []


def _translate(doc: dict, spec: dict) -> dict:
    """Ray's own RayCluster -> autoscaler config translation (what the in-tree autoscaler runs)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    meta = _as_mapping(doc.get("metadata"))
    cr = {
        "apiVersion": f"{KUBERAY_GROUP}/{KUBERAY_VERSION}",
        "kind": "RayCluster",
        "metadata": {"name": meta.get("name", "unnamed"), "namespace": meta.get("namespace", "default")},
        "spec": copy.deepcopy(spec),
    }
    return _derive_autoscaling_config_from_ray_cr(cr)


def _translation_errors(doc: dict, where: tuple, spec: dict) -> tuple[dict | None, list[str]]:
    try:
        return _translate(doc, spec), []
    except KeyError as e:
        key = e.args[0] if e.args else "?"
        groups = [
            (where + ("workerGroupSpecs", i), g)
            for i, g in enumerate(_as_list(spec.get("workerGroupSpecs")))
            if isinstance(g, dict)
        ]
        if isinstance(spec.get("headGroupSpec"), dict):  # the head needs no replica fields
            groups.append((where + ("headGroupSpec",), spec["headGroupSpec"]))
        missing = [p for p, g in groups if key not in g] or [where]
        return None, [_error_line("ray-kuberay", p, f"Ray's autoscaling translation (the node types the "
                           f"in-tree autoscaler builds) fails: KeyError {key!r}, a field it needs "
                           "is missing") for p in missing[:1]]
    except Exception as e:  # ValueError (no CPU count), jsonschema.ValidationError, ...
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        return None, [_error_line("ray-kuberay", where, f"{type(e).__name__}: {msg}")]


_K8S_INT_QUANTITY = re.compile(r"^\+?[0-9]+$")


def _whole_quantity_errors(value: Any, path: tuple, what: str) -> list[str]:
    from ray.autoscaler._private.kuberay import utils as kuberay_utils

    if _is_plain_int(value) and value >= 0:
        return []
    try:
        q = kuberay_utils.parse_quantity(str(value))
    except Exception:
        return [_error_line("policy", path, f"{value!r} is not a Kubernetes quantity")]
    if q != q.to_integral_value() or q < 0:
        return [_error_line("policy", path, f"{what} {value!r} is not a whole number; Ray's autoscaler rounds "
                     "it up, so it would plan with more than the node has")]
    return []


_SHELL_CHARS = re.compile(r"[\s;&|$`'\"<>()\\]")  # what makes a pasted value more than one word, or a command


def _downward_env(group: dict, name: str) -> bool:
    """Whether the group's Ray container sets ``name`` from a field of its pod (``valueFrom.fieldRef``)."""
    containers = _as_list(_as_mapping(_as_mapping(group.get("template")).get("spec")).get("containers"))
    env = _as_list(_as_mapping(containers[0]).get("env")) if containers else []
    return any(isinstance(e, dict) and e.get("name") == name and "value" not in e
               and _as_mapping(_as_mapping(e.get("valueFrom")).get("fieldRef")).get("fieldPath") for e in env)


def _group_policy_errors(kind: str, where: tuple, spec: dict, group: dict, is_head: bool) -> list[str]:
    out: list[str] = []
    params = _as_mapping(group.get("rayStartParams"))
    for key in ("num-cpus", "num-gpus"):
        if key in params and not (isinstance(params[key], str) and _K8S_INT_QUANTITY.match(params[key])):
            out.append(_error_line("policy", where + ("rayStartParams", key),
                            f"{params[key]!r}: must be a string holding a non-negative integer"))
    for key, value in params.items():
        # KubeRay writes ` --key=value ` unquoted into a bash line: a space or shell character in a value adds
        # options (a second --dashboard-host=0.0.0.0) or commands this check never reads. Its documented forms
        # pass: one double-quoted word (resources: '"{\"Custom1\": 1}"') and one variable ($MY_POD_IP)
        text = str(value)
        variable = re.fullmatch(r"\$(?:([A-Za-z_]\w*)|\{([A-Za-z_]\w*)\})", text)
        one_word = (re.fullmatch(r'"(?:[^"\\$`\n]|\\.)*"', text)
                    # ($MY_POD_IP) bash splits an unquoted variable's value into words: only one the pod spec
                    # fills from the downward API (a field of the pod), never a literal of its own
                    or (variable and _downward_env(group, variable.group(1) or variable.group(2))))
        if _SHELL_CHARS.search(str(key)) or (not one_word and _SHELL_CHARS.search(text)):
            out.append(_error_line("policy", where + ("rayStartParams", key),
                            f"{value!r}: a space or shell character in a rayStartParams key or value; KubeRay "
                            "pastes them unquoted into the ray start line"))
    for rname, value in _as_mapping(group.get("resources")).items():
        if rname != "memory":
            out += _whole_quantity_errors(value, where + ("resources", rname), f"resource {rname}")
    pod = _as_mapping(_as_mapping(group.get("template")).get("spec"))
    if pod.get("hostNetwork") is True:  # Ray's ports on the node's own address, outside the Service
        out.append(_error_line("policy", where + ("template", "spec", "hostNetwork"),
                               "true: the GCS, Ray Client and dashboard ports would listen on the node's own "
                               "address, reachable from the whole network"))
    for i, c in enumerate(_as_list(pod.get("containers"))):
        for j, port in enumerate(_as_list(_as_mapping(c).get("ports"))):
            if isinstance(port, dict) and port.get("hostPort"):
                out.append(_error_line("policy", where + ("template", "spec", "containers", i, "ports", j, "hostPort"),
                                       f"{port['hostPort']}: a host port puts a Ray port on the node's own address"))
    for j, c in enumerate(_as_list(pod.get("containers"))):
        for k, env in enumerate(_as_list(_as_mapping(c).get("env"))):
            if _as_mapping(env).get("name") != "RAY_AUTH_MODE" or env.get("value") == "token" and "valueFrom" not in env:
                continue
            value = "a reference" if "valueFrom" in env else repr(env.get("value"))
            out.append(_error_line("policy", where + ("template", "spec", "containers", j, "env", k),
                                   f"RAY_AUTH_MODE set to {value} in the pod: it can override authOptions "
                                   "{mode: token}; leave RAY_AUTH_MODE to KubeRay"))
    if is_head:
        ips = _as_list(_as_mapping(_as_mapping(group.get("headService")).get("spec")).get("externalIPs"))
        if ips:
            out.append(_error_line("policy", where + ("headService", "spec", "externalIPs"),
                                   f"{', '.join(map(str, ips))}: the head's Service (GCS, Ray Client, dashboard) "
                                   "would answer on these addresses, outside the cluster; use ClusterIP + "
                                   "port-forward"))
    containers = _as_list(pod.get("containers"))
    if containers and isinstance(containers[0], dict):  # the Ray container is the first one
        # KubeRay runs a Ray container's own command before (or, holding `ray start`, instead of) its
        # own `ray start`: it can turn token auth off or bind the dashboard to every interface unchecked
        for key in ("command", "args"):
            if containers[0].get(key):
                out.append(_error_line("policy", where + ("template", "spec", "containers", 0, key),
                                       "a command of the Ray container's own: KubeRay runs it with (or instead of) "
                                       "its `ray start`, which it could change (auth off, the dashboard on every "
                                       "interface, packages installed at every start); leave it to KubeRay"))
        for section in ("limits", "requests"):
            for rname, value in _as_mapping(_as_mapping(containers[0].get("resources")).get(section)).items():
                if rname == "cpu" or rname.endswith("gpu"):
                    out += _whole_quantity_errors(
                        value,
                        where + ("template", "spec", "containers", 0, "resources", section, rname),
                        f"{rname} {section}",
                    )
    for i, c in enumerate(containers):
        image = _as_mapping(c).get("image")
        if isinstance(image, str) and image.split(":")[0].endswith("rayproject/ray"):
            tag = image.split(":", 1)[1] if ":" in image else "latest"
            if not tag.startswith(PINNED_RAY_VERSION):
                out.append(_error_line("policy", where + ("template", "spec", "containers", i, "image"),
                                f"{image}: Ray image must be {PINNED_RAY_VERSION} (the version the "
                                "project and this validator pin)"))
        why = project_image_error(image) if i == 0 else None  # the Ray container
        if why:
            out.append(_error_line("policy", where + ("template", "spec", "containers", i, "image"), why))
    if is_head:
        host = params.get("dashboard-host")
        if host is None and kind == "RayCluster":
            out.append(_error_line("policy", where + ("rayStartParams",), "no dashboard-host: KubeRay then binds "
                            "the dashboard to 0.0.0.0; set dashboard-host: \"127.0.0.1\" and use "
                            "kubectl port-forward"))
        elif host is not None and not _is_name_in(host, LOOPBACK_HOSTS) and kind != "RayJob":
            out.append(_error_line("policy", where + ("rayStartParams", "dashboard-host"),
                            f"{host}: the dashboard must bind to loopback (127.0.0.1) and be reached "
                            "with kubectl port-forward (only a RayJob, whose operator must reach the "
                            "job server, may bind the pod's interfaces behind a ClusterIP Service)"))
        stype = group.get("serviceType")
        if _is_name_in(stype, EXPOSED_SERVICE_TYPES):
            out.append(_error_line("policy", where + ("serviceType",), f"{stype} exposes the dashboard, GCS and "
                            "Ray client ports outside the cluster; use ClusterIP + port-forward"))
        svc_type = _as_mapping(_as_mapping(group.get("headService")).get("spec")).get("type")
        if _is_name_in(svc_type, EXPOSED_SERVICE_TYPES):
            out.append(_error_line("policy", where + ("headService", "spec", "type"), f"{svc_type} exposes the "
                            "head outside the cluster; use ClusterIP + port-forward"))
        if group.get("enableIngress") is True:
            out.append(_error_line("policy", where + ("enableIngress",), "an Ingress exposes the dashboard; "
                            "use kubectl port-forward"))
    else:
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if _is_plain_int(lo) and _is_plain_int(hi) and lo > hi:
            out.append(_error_line("policy", where, f"minReplicas {lo} > maxReplicas {hi}"))
    return out


# runtime_env fields that install packages when a job's workers start
RUNTIME_ENV_INSTALLERS = {"pip", "uv", "conda"}


def _runtime_env_errors(doc: dict) -> list[str]:
    text = _as_mapping(doc.get("spec")).get("runtimeEnvYAML")
    if text is None:
        return []
    where = ("spec", "runtimeEnvYAML")
    if not isinstance(text, str):
        return []  # the CRD schema already reports the type
    try:
        env = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        return [_error_line("runtime-env", where, f"not valid YAML: {e}")]
    if env is None:
        return []
    if not isinstance(env, dict):
        return [_error_line("runtime-env", where, "must be a YAML mapping")]
    from ray.runtime_env import RuntimeEnv

    out = []
    unknown = sorted(set(env) - set(RuntimeEnv.known_fields) - set(RuntimeEnv.extensions_fields))
    for k in unknown:
        out.append(_error_line("runtime-env", where + (k,), "unknown runtime_env field (Ray would ignore it)"))
    try:
        RuntimeEnv(**{k: v for k, v in env.items() if k not in unknown})
    except Exception as e:
        out.append(_error_line("runtime-env", where, f"{type(e).__name__}: {e}"))
    for k in sorted(set(env) & RUNTIME_ENV_INSTALLERS):
        out.append(_error_line("policy", where + (k,), f"installs packages on every node the job starts on (torch: "
                               "minutes and gigabytes per node); the project image has them (docker/Dockerfile)"))
    out += credential_errors(env, where)
    return out


def validate_kuberay_manifest(doc: Any, crd_dir: str | os.PathLike | None = None) -> list[str]:
    """Errors of a KubeRay RayCluster or RayJob manifest (a dict from the YAML); ``[]`` when valid."""
    _require_pinned_ray()
    if not isinstance(doc, dict):
        return [_error_line("crd", (), f"a manifest is a mapping, got {type(doc).__name__}")]
    kind = doc.get("kind")
    if not _is_name_in(kind, CRD_FILES):
        return [_error_line("crd", ("kind",), f"{kind!r}: expected one of {sorted(CRD_FILES)}")]
    crd_key = str(Path(crd_dir) if crd_dir else find_crd_dir())
    schema = kuberay_crd_schema(kind, crd_key)
    errors = _jsonschema_errors("crd", _crd_validator(kind, crd_key), doc)
    _list_key_errors(schema, doc, (), errors)

    for where, spec in _cluster_specs(doc):
        config, terr = _translation_errors(doc, where, spec)
        errors += terr
        if spec.get("enableInTreeAutoscaling") is not True:
            errors.append(_error_line("policy", where + ("enableInTreeAutoscaling",),
                               "must be true: the cluster scales its worker groups with Ray's autoscaler"))
        if _as_mapping(spec.get("authOptions")).get("mode") != "token":
            errors.append(_error_line("policy", where + ("authOptions", "mode"),
                               f"{_as_mapping(spec.get('authOptions')).get('mode')!r}: token authentication must be on "
                               "(authOptions: {mode: token}); without it anyone who reaches the head's ports "
                               "can submit jobs or run code through the Ray Client"))
        if spec.get("rayVersion") != PINNED_RAY_VERSION:
            errors.append(_error_line("policy", where + ("rayVersion",),
                               f"{spec.get('rayVersion')!r}: must be {PINNED_RAY_VERSION!r}"))
        head = spec.get("headGroupSpec")
        if isinstance(head, dict):
            errors += _group_policy_errors(kind, where + ("headGroupSpec",), spec, head, True)
        for i, group in enumerate(_as_list(spec.get("workerGroupSpecs"))):
            if isinstance(group, dict):
                errors += _group_policy_errors(kind, where + ("workerGroupSpecs", i), spec, group, False)
        if config is not None:
            errors += _roles_errors("policy", config["available_node_types"], config["head_node_type"],
                                    where + ("workerGroupSpecs",))
    if kind == "RayJob":
        spec = _as_mapping(doc.get("spec"))
        if not (isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip()):
            errors.append(_error_line("policy", ("spec", "entrypoint"), "a RayJob needs an entrypoint"))
        errors += _runtime_env_errors(doc)
        errors += job_config_path_errors(doc)
    errors += credential_errors(doc)
    return errors


# The commands a job may run (script name; `dvfl COMMAND`), each with its path flags: the run-config
# field the flag sets, or None for a path of the command's own. One flag means different things:
# --out is distill's output_dir, the teacher's teacher.path, the cache's teacher.cache, protocol's
# report folder, the ingest's clips (tests/test_cluster_configs.py checks the table against dvfl.cli).
JOB_COMMANDS = {
    "distill": ("pipelines/distill.py", {"--out": "output_dir", "--output-dir": "output_dir", "--clips": "data.clips",
                                         "--teacher": "teacher.path", "--unlabeled": "data.unlabeled"}),
    "tune": ("tuning/search.py", {"--out": "output_dir", "--output-dir": "output_dir"}),
    "protocol": ("pipelines/protocol.py", {"--out": None, "--output-dir": "output_dir"}),
    "teacher": ("pipelines/train_teacher.py", {"--out": "teacher.path", "--output-dir": "output_dir",
                                               "--clips": "data.clips", "--checkpoint": "teacher.train.checkpoint",
                                               "--init-2d": "teacher.train.init_2d", "--publish": None}),
    "cache": ("pipelines/cache_teacher.py", {"--out": "teacher.cache", "--output-dir": "output_dir",
                                             "--clips": "data.clips", "--teacher": "teacher.path"}),
    # no run config: its flags are all its paths (the videos too: decode tasks run on any node)
    "ingest": ("pipelines/ingest.py", {"--out": None, "--root": None, "--videos-dir": None, "--lists-dir": None,
                                       "--classes": None, "--unlabeled": None}),
}
JOB_PATH_FIELDS = ("output_dir", "data.root", "data.clips", "data.unlabeled", "teacher.path", "teacher.cache",
                   "student.checkpoint", "student.init_2d", "teacher.train.checkpoint", "teacher.train.init_2d")


# pod volumes that are the pod's or its node's own, however alike their specs in every group
POD_LOCAL_VOLUMES = ("emptyDir", "hostPath", "configMap", "secret", "downwardAPI", "ephemeral", "projected")


def _volume_identity(volume: dict) -> str | None:
    """What a pod volume is, when every pod that mounts it sees the same files: its spec without
    its name (the same claim, NFS export, CSI bucket, ...). ``None`` for a pod's or node's own."""
    if any(k in volume for k in POD_LOCAL_VOLUMES):
        return None
    spec = {k: v for k, v in volume.items() if k != "name"}
    return json.dumps(spec, sort_keys=True, default=str) if spec else None


def _shared_mounts(spec: dict) -> set[str]:
    """Mount paths where the Ray container of the head and of every worker group sees the same
    files: the same shared volume (claim, NFS export, CSI bucket; and subPath) at the same path in all."""
    groups = [_as_mapping(spec.get("headGroupSpec"))] + [_as_mapping(g) for g in _as_list(spec.get("workerGroupSpecs"))]
    shared = None
    for g in groups:
        pod = _as_mapping(_as_mapping(g.get("template")).get("spec"))
        volumes = {v.get("name"): _volume_identity(v) for v in _as_list(pod.get("volumes")) if isinstance(v, dict)}
        containers = _as_list(pod.get("containers"))
        mounts = {(m["mountPath"].rstrip("/") or "/", volumes.get(m.get("name")), m.get("subPath") or "")
                  for m in _as_list(_as_mapping(containers[0]).get("volumeMounts") if containers else [])
                  # subPathExpr ($(POD_NAME), ...): another folder in every pod
                  if isinstance(m, dict) and isinstance(m.get("mountPath"), str) and not m.get("subPathExpr")}
        mounts = {m for m in mounts if m[1] is not None}
        shared = mounts if shared is None else shared & mounts
    return {path for path, _, _ in shared or set()}


def _job_command(argv: list[str]) -> str | None:
    """The command of :data:`JOB_COMMANDS` an entrypoint runs: ``python .../pipelines/distill.py``,
    ``dvfl distill`` or ``python -m dvfl distill``; None for anything else."""
    for i, arg in enumerate(argv):
        for name, (script, _) in JOB_COMMANDS.items():
            if arg == script or arg.endswith("/" + script):
                return name
        # (`dvfl distill`, `python -m dvfl distill`, `cd X && dvfl distill`, `VAR=1 dvfl distill`)
        if os.path.basename(arg) == "dvfl" and argv[i + 1:i + 2] and argv[i + 1] in JOB_COMMANDS:
            return argv[i + 1]
    return None


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The last value of ``flag`` (``--flag value`` or ``--flag=value``) in an entrypoint."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def _project_config(config: str) -> str:
    """A config path as this checkout holds it (the image has the project under PROJECT_DIR_IN_IMAGE)."""
    return config[len(PROJECT_DIR_IN_IMAGE) + 1:] if config.startswith(PROJECT_DIR_IN_IMAGE + "/") else config


# what a teacher trained from flags alone (`--clips` and `--out`, no --config) writes and reads:
# the embedded default's other paths (its videos, cache, students) are not its
BARE_TEACHER_FIELDS = ("output_dir", "data.clips", "teacher.path", "teacher.train.checkpoint", "teacher.train.init_2d")


def job_config_path_errors(doc: dict) -> list[str]:
    """A RayJob's run config (``--config`` of the entrypoint, this checkout's copy, with the
    entrypoint's ``--set`` and path flags: ``--out``, ``--clips``, ...; without ``--config`` the
    command's default) names every path as a URI or an absolute path on a
    volume that the head and every worker group mount: a relative path would resolve in the job's
    temporary working directory on the head pod, which no worker sees and which goes with the
    cluster. Offline: the config is read, never checked against a filesystem or bucket."""
    import shlex

    spec = _as_mapping(doc.get("spec"))
    entry = spec.get("entrypoint")
    if not isinstance(entry, str):
        return []
    where = ("spec", "entrypoint")
    lexer = shlex.shlex(entry.replace("\n", " \n "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace = " \t\r"  # a newline ends a command, as in a YAML block scalar's lines
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError as e:
        return [_error_line("policy", where, f"cannot be split into arguments: {e}")]
    # every command of a chained entrypoint (`ingest ... && distill ...`): only the first was read
    commands, argv, comment = [], [], False
    for token in [*tokens, ";"]:
        if token == "\n":
            comment = False  # (a comment ends with its line)
        if token and set(token) <= set(";&|()\n"):
            if (command := _job_command(argv)) is not None:  # (the words before a comment)
                commands.append((command, argv))
            argv = []
        elif comment or token.startswith("#"):  # a comment: the rest of the line is not run
            comment = True
        else:
            argv.append(token)
    if not commands:
        return [_error_line("policy", where, "runs none of the commands whose paths can be checked ("
                            + ", ".join(script for script, _ in JOB_COMMANDS.values()) + ", or `dvfl` with one of "
                            + ", ".join(JOB_COMMANDS) + ")")]
    mounts = _shared_mounts(_as_mapping(spec.get("rayClusterSpec")))
    out = []
    for command, argv in commands:
        out += _job_command_path_errors(where, command, argv, mounts)
    return out


def _job_command_path_errors(where: tuple, command: str, argv: list[str], mounts: set[str]) -> list[str]:
    """:func:`job_config_path_errors` for one command of the entrypoint."""
    from dvfl.config import ConfigError, build_config, config_tree, parse_override

    search = command == "tune"
    flags = JOB_COMMANDS[command][1]
    config_flags = ("--search", "--config") if search else ("--config",)
    config, overrides, path_flags, own_paths, args = None, [], [], {}, list(argv)
    while args:
        flag, eq, inline = args.pop(0).partition("=")  # --flag value, or --flag=value
        if flag not in (*config_flags, "--set", *flags):
            continue
        value = inline if eq else (args.pop(0) if args else None)
        if value is None:
            continue
        if flag in config_flags:
            config = value
        elif flag == "--set":
            overrides.append(value)
        elif flags[flag] is None:  # a path of the command's own (--unlabeled may be given twice)
            own_paths[f"{flag} {value}" if flag in own_paths else flag] = value
        else:
            path_flags.append(f"{flags[flag]}={value}")
    # no run config: the ingest, and a cache given its inputs and output by flags alone
    if command == "ingest" or (command == "cache" and config is None and not overrides):
        return _job_path_errors(where, {**{p.partition("=")[0]: p.partition("=")[2] for p in path_flags}, **own_paths},
                                mounts, f"`{command}`'s flags")
    # a teacher from flags alone: the embedded default's config under its --set and flags (its
    # output_dir holds Ray Train's checkpoints), only the paths it uses
    bare_teacher = command == "teacher" and config is None and {"--clips", "--out"} <= {a.partition("=")[0] for a in argv}
    out = []
    test_config = _flag_value(argv, "--test-config") if command == "teacher" else None
    if test_config:  # a published teacher's test clips: ingested under that config's own paths (no --set)
        test_rel = _project_config(test_config)
        try:
            if os.path.isabs(test_rel):
                raise ConfigError(f"not a file of this project (under {PROJECT_DIR_IN_IMAGE} in the image), so "
                                  "its paths cannot be checked")
            test_cfg = build_config(config_tree(REPO_ROOT / test_rel, [])).expand_split()
        except (ConfigError, ValueError, OSError, yaml.YAMLError) as e:
            out.append(_error_line("policy", where, f"--test-config {test_config}: {e}"))
        else:
            # as dvfl/commands/teacher.py reads it: its clips (data.clips, or output_dir/clips), its videos, and
            # for generated data the output_dir they are made in
            paths = {"data.root": test_cfg.data.root, "data.clips": test_cfg.clips_dir}
            if test_cfg.data.dataset == "synthetic":
                paths["output_dir"] = test_cfg.output_dir
            out += _job_path_errors(where, {f"--test-config's {k}": v for k, v in paths.items()}, mounts, test_rel)
    overrides += path_flags  # the commands apply their path flags after every --set (dvfl.cli.config_from_args)
    # no --config: the command's default (the embedded run config, or the embedded search's)
    rel = ("configs/tune_embedded.yaml" if search else "configs/embedded.yaml") if config is None else _project_config(config)
    if os.path.isabs(rel):
        return [_error_line("policy", where, f"--config {config}: not a file of this project (under "
                     f"{PROJECT_DIR_IN_IMAGE} in the image), so it cannot be checked")]
    try:
        parsed = [parse_override(o) for o in overrides]
        run_path = REPO_ROOT / rel
        fields = {}
        if search:  # the search's run config with its own `set:` (read as written: paths stay relative)
            tune_tree = yaml.safe_load(run_path.read_text()) or {}
            run_path = run_path.parent / (tune_tree.get("run_config") or "embedded.yaml")
            # the experiment's storage (default: under output_dir, checked below); --set wins
            fields["tune.storage"] = tune_tree.get("storage")
            fields.update((k, v) for k, v in parsed if k == "tune.storage")
            parsed = [*(tune_tree.get("set") or {}).items(), *[(k, v) for k, v in parsed if not k.startswith("tune.")]]
        cfg = build_config(config_tree(run_path, parsed)).expand_split()
    except (ConfigError, ValueError, OSError, yaml.YAMLError) as e:
        return [_error_line("policy", where, f"--config {config or rel}: {e}")]
    for name in BARE_TEACHER_FIELDS if bare_teacher else JOB_PATH_FIELDS:
        fields[name] = _field(cfg, name)
    if bare_teacher and not any(k == "output_dir" for k, _ in parsed):  # (dvfl/commands/teacher.py: beside the model)
        fields["output_dir"] = (_flag_value(argv, "--out") or "").rstrip("/") + "/_work"
    return _job_path_errors(where, {**fields, **own_paths}, mounts, rel) + out


def _field(cfg, name: str):
    """``cfg``'s dotted field (``teacher.train.checkpoint``); None where a section lacks it."""
    for part in name.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _job_path_errors(where: tuple, fields: dict, mounts: set[str], source: str) -> list[str]:
    """Each path (a run-config field or a command's own flag) a URI or absolute on a shared volume."""
    out = []
    for name, value in fields.items():
        if not isinstance(value, str) or ("://" in value and not value.startswith("file://")):
            continue  # unset, or a URI (s3://, gs://)
        from dvfl import storage

        try:  # (the local path dvfl.storage reads at run time: a file:// URI's %XX escapes decoded)
            local = storage.local_path(value)
        except ValueError as exc:  # file://HOST/...
            out.append(_error_line("policy", where, f"{name}: {exc}"))
            continue
        local = os.path.normpath(local) if os.path.isabs(local) else local  # (/data/../tmp is the pod's own /tmp)
        if not os.path.isabs(local):
            how = "" if name.startswith("--") else f" (--set {name}=...)"
            out.append(_error_line("policy", where, f"{name} is {value!r} (relative, from {source}): in a job it resolves in "
                            f"the job's temporary working directory on the head pod; give a URI or an absolute "
                            f"path on a volume every pod mounts{how}"))
        elif not any(local == m or local.startswith(m.rstrip("/") + "/") for m in mounts):
            out.append(_error_line("policy", where, f"{name} is {value!r}: not on a volume that the head and every "
                            f"worker group mount ({', '.join(sorted(mounts)) or 'none'}: the same "
                            "shared volume in each: a claim, an NFS export, a CSI bucket; not an emptyDir or hostPath); give a URI "
                            "or a path on such a volume"))
    return out


def kuberay_summary(doc: dict) -> str:
    parts = []
    for where, spec in _cluster_specs(doc):
        config = _translate(doc, spec)
        for name, nt in config["available_node_types"].items():
            res = ",".join(f"{k}={v}" for k, v in nt["resources"].items())
            role = "head" if name == config["head_node_type"] else f"{nt['min_workers']}..{nt['max_workers']}"
            parts.append(f"{name}[{role}] {res}")
    return f"{doc['kind']}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# NetworkPolicies beside a KubeRay manifest
# --------------------------------------------------------------------------------------------
NETWORK_POLICY_API = "networking.k8s.io/v1"
# The only port that pods outside the cluster may reach: the dashboard's job server (token
# authentication), which a RayJob's submitter pod and the KubeRay operator call; the head's
# `dashboard-port` start parameter moves it (KubeRay names the container port `dashboard`).
JOB_SERVER_PORT = 8265
# The KubeRay operator's pods (its Helm chart and kustomize both set this), in a namespace of its own.
OPERATOR_LABELS = {"app.kubernetes.io/component": "kuberay-operator"}
# Labels KubeRay puts on every pod it creates unless the user's labels set them.
KUBERAY_APP_LABELS = {"app.kubernetes.io/created-by": "kuberay-operator", "app.kubernetes.io/name": "kuberay"}
# A label KubeRay sets to a value not known here (a RayJob's generated cluster name): it exists,
# so `Exists` selects it, but it equals no value a selector can name.
_GENERATED = object()


def _is_network_policy(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("apiVersion") == NETWORK_POLICY_API and doc.get("kind") == "NetworkPolicy"


def _pod_labels(doc: dict, where: tuple, spec: dict) -> list[tuple[tuple, dict, set]]:
    """(path, labels, the user's own (key, value) labels) of each group's pods. The labels: the pod
    template's, the group's ``labels`` over them (KubeRay 1.7), KubeRay's app labels where the user
    set none, then KubeRay's ray.io/* labels, which nothing overrides (``ray.io/cluster`` and
    ``ray.io/identifier`` are generated for a RayJob's cluster)."""
    name = _as_mapping(doc.get("metadata")).get("name")
    cluster = name if doc.get("kind") == "RayCluster" and isinstance(name, str) else None
    groups = [(where + ("headGroupSpec",), spec.get("headGroupSpec"), "head", "headgroup")] + [
        (where + ("workerGroupSpecs", i), g, "worker", _as_mapping(g).get("groupName"))
        for i, g in enumerate(_as_list(spec.get("workerGroupSpecs")))
    ]
    out = []
    for path, group, node_type, group_name in groups:
        if not isinstance(group, dict):
            continue
        template = _as_mapping(_as_mapping(_as_mapping(group.get("template")).get("metadata")).get("labels"))
        user = {k: v for k, v in {**template, **_as_mapping(group.get("labels"))}.items()
                if isinstance(k, str) and isinstance(v, str)}
        labels = {**KUBERAY_APP_LABELS, **user, "ray.io/node-type": node_type, "ray.io/is-ray-node": "yes",
                  "ray.io/group": group_name if isinstance(group_name, str) else _GENERATED,
                  "ray.io/cluster": cluster or _GENERATED,
                  "ray.io/identifier": f"{cluster}-{node_type}" if cluster else _GENERATED}
        # KubeRay's own values name every KubeRay pod of the namespace, not this cluster's
        out.append((path, labels, {(k, v) for k, v in user.items()
                                   if labels[k] == v and KUBERAY_APP_LABELS.get(k) != v}))
    return out


def _selects(selector: Any, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) applied to ``labels``."""
    if not isinstance(selector, dict):
        return False
    if any(labels.get(k) != v for k, v in _as_mapping(selector.get("matchLabels")).items()):
        return False
    for e in _as_list(selector.get("matchExpressions")):
        key, op, values = _as_mapping(e).get("key"), _as_mapping(e).get("operator"), _as_list(_as_mapping(e).get("values"))
        held = labels.get(key) if isinstance(key, str) else None
        if not ((op == "In" and held in values) or (op == "NotIn" and held not in values)
                or (op == "Exists" and held is not None) or (op == "DoesNotExist" and held is None)):
            return False
    return True


def _applies_to_ingress(policy: dict) -> bool:
    types = _as_mapping(policy.get("spec")).get("policyTypes")
    # absent or empty: Ingress (plus Egress with egress rules), as the API server defaults it
    return types is None or types == [] or (isinstance(types, list) and "Ingress" in types)


def _applies_to_egress(policy: dict) -> bool:
    spec = _as_mapping(policy.get("spec"))
    types = spec.get("policyTypes")
    if types is None or types == []:
        return "egress" in spec
    return isinstance(types, list) and "Egress" in types


def _job_server_port(spec: dict) -> int:
    """The head's dashboard (job server) port: its ``dashboard-port`` start parameter, else 8265."""
    params = _as_mapping(_as_mapping(spec.get("headGroupSpec")).get("rayStartParams"))
    try:
        return int(params.get("dashboard-port", JOB_SERVER_PORT))
    except (TypeError, ValueError):
        return JOB_SERVER_PORT


def _ingress_rules(policy: dict) -> list[tuple[int, list, list]]:
    """(index, peers, ports) of a policy's ingress rules: no peers admit any source, no ports every port."""
    return [(k, _as_list(_as_mapping(rule).get("from")), _as_list(_as_mapping(rule).get("ports")))
            for k, rule in enumerate(_as_list(_as_mapping(policy.get("spec")).get("ingress")))]


def _is_job_server_port(port: Any, number: int) -> bool:
    return (isinstance(port, dict) and port.get("port") in (number, "dashboard") and "endPort" not in port
            and port.get("protocol", "TCP") == "TCP")


def _own_groups(peer: Any, groups: list[tuple[tuple, dict, set]], identity: set) -> set[int]:
    """The groups whose pods a peer selects if it is one of the cluster's own pods, else none: a pod
    selector alone (other namespaces and IP blocks are never the cluster's pods) that names an
    identity key, in matchLabels or in an ``In`` of values the cluster's pods carry, so that it
    cannot select another cluster's pods."""
    sel = _as_mapping(peer).get("podSelector")
    if set(_as_mapping(peer)) != {"podSelector"} or not isinstance(sel, dict):
        return set()
    carried = {k: {labels.get(k) for _, labels, _ in groups} for k in identity}
    named = [k for k in _as_mapping(sel.get("matchLabels")) if k in identity] + [
        e["key"] for e in map(_as_mapping, _as_list(sel.get("matchExpressions")))
        if e.get("operator") == "In" and _is_name_in(e.get("key"), identity) and _as_list(e.get("values"))
        and all(_is_name_in(v, carried[e["key"]]) for v in e["values"])]
    return {i for i, (_, labels, _) in enumerate(groups) if _selects(sel, labels)} if named else set()


def _admits(peer: Any, labels: dict, same_namespace: bool) -> bool:
    """Whether a peer admits a pod with ``labels`` from the policy's namespace or another one (the
    namespaces' labels are not known here: any namespaceSelector is taken to match)."""
    peer = _as_mapping(peer)
    if "namespaceSelector" in peer:
        return isinstance(peer["namespaceSelector"], dict) and _selects(peer.get("podSelector", {}), labels)
    return same_namespace and "ipBlock" not in peer and _selects(peer.get("podSelector"), labels)


def _selects_every_pod(peer: Any) -> bool:
    """A pod peer without a podSelector, or with an empty one: every pod of its namespaces."""
    sel = _as_mapping(peer).get("podSelector")
    return "ipBlock" not in _as_mapping(peer) and not (
        _as_mapping(sel).get("matchLabels") or _as_mapping(sel).get("matchExpressions"))


def _peer_namespaces(peers: list) -> str:
    broad = [p for p in peers if _selects_every_pod(p)]
    selectors = [_as_mapping(p).get("namespaceSelector") for p in broad if "namespaceSelector" in _as_mapping(p)]
    if any(not (_as_mapping(n).get("matchLabels") or _as_mapping(n).get("matchExpressions")) for n in selectors):
        return "every namespace"
    return "the selected namespaces" if selectors else "its namespace"


def _job_server_errors(doc: dict, path: tuple, covering: list[dict], port: int) -> list[str]:
    """A RayJob's head admits its callers outside the Ray cluster to the job server: the KubeRay
    operator and, in K8sJobMode (also when ``submissionMode`` is unset: the CRD default), the
    submitter pod."""
    spec, name = _as_mapping(doc.get("spec")), _as_mapping(doc.get("metadata")).get("name")
    callers = [(OPERATOR_LABELS, False, "the KubeRay operator (a peer with a namespaceSelector and a podSelector "
                "matching app.kubernetes.io/component: kuberay-operator)", "the job would never be submitted "
                "(HTTPMode) or its status never read")]
    if spec.get("submissionMode") in (None, "K8sJobMode"):
        submitter = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": name}
        callers.append((submitter, True, f"the submitter pod (a peer whose podSelector matches "
                        f"ray.io/originated-from-crd: RayJob, ray.io/originated-from-cr-name: {name})",
                        "the job would never be submitted"))
    out = []
    for labels, same_namespace, who, consequence in callers:
        if not any((not ports or any(_is_job_server_port(p, port) for p in ports))
                   and (not peers or any(_admits(peer, labels, same_namespace) for peer in peers))
                   for policy in covering for _, peers, ports in _ingress_rules(policy)):
            out.append(_error_line("policy", path, f"no ingress rule admits {who} to the job server port "
                                   f"{port}/TCP of these pods: {consequence}"))
    return out


def network_policy_errors(doc: Any, policies: list[tuple[int, Any]]) -> list[str]:
    """A KubeRay manifest's pods behind the NetworkPolicies of its file (``(document number,
    policy)`` pairs). Every group's pods are selected by an ingress policy of the manifest's
    namespace whose rules admit the cluster's own pods (:func:`_own_groups`) to every port; a
    RayJob's head admits the KubeRay operator and its submitter pod to the job server port; no
    rule of any ingress policy in the file admits other sources except pods to that port; and no
    policy restricts the pods' egress (not checked here). Offline: the policies are read, not
    enforced; the network plugin must support NetworkPolicy."""
    if not isinstance(doc, dict):
        return []
    namespace = _as_mapping(doc.get("metadata")).get("namespace")
    ingress = [(n, p) for n, p in policies if _is_network_policy(p) and _applies_to_ingress(p)]
    out: list[str] = []
    for where, spec in _cluster_specs(doc):
        groups = _pod_labels(doc, where, spec)
        if not groups:
            continue
        # the labels that name this cluster's pods and no others: ray.io/cluster (a RayCluster's name),
        # or a label every group carries whose value is the RayCluster's or RayJob's name (a label
        # merely shared by all groups, `team: ml`, names every pod of the team)
        name = _as_mapping(doc.get("metadata")).get("name")
        identity = {"ray.io/cluster"} | {k for k, v in set.intersection(*(items for _, _, items in groups)) if v == name}
        port = _job_server_port(spec)

        def own(policy: dict, peer: Any) -> set[int]:
            # a policy of another namespace selects none of the cluster's pods, its peers neither
            in_namespace = _as_mapping(policy.get("metadata")).get("namespace") == namespace
            return _own_groups(peer, groups, identity) if in_namespace else set()

        for path, labels, _ in groups:
            covering = [p for _, p in ingress if _as_mapping(p.get("metadata")).get("namespace") == namespace
                        and _selects(_as_mapping(p.get("spec")).get("podSelector"), labels)]
            limiting = sorted(str(_as_mapping(p.get("metadata")).get("name")) for _, p in policies
                              if _is_network_policy(p) and _applies_to_egress(p)
                              and _as_mapping(p.get("metadata")).get("namespace") == namespace
                              and _selects(_as_mapping(p.get("spec")).get("podSelector"), labels))
            if limiting:
                out.append(_error_line("policy", path, f"NetworkPolicy {', '.join(limiting)} restricts these pods' "
                                       "egress, which this check does not verify (DNS, the cluster's own pods on "
                                       "every port and object storage must stay reachable, or workers never join): "
                                       "restrict ingress only (policyTypes: [Ingress])"))
            if not covering:
                out.append(_error_line("policy", path, "no ingress NetworkPolicy of its namespace in this file "
                                       "selects these pods: pods of every namespace reach their Ray ports (GCS "
                                       "6379, Ray Client 10001, metrics 8080, workers); add one that admits the "
                                       "cluster's own pods"))
                continue
            reached = set()  # the groups admitted to every port of these pods
            for policy in covering:
                for _, peers, ports in _ingress_rules(policy):
                    if not ports and not peers:
                        reached |= set(range(len(groups)))
                    elif not ports:
                        reached |= set().union(*(own(policy, peer) for peer in peers))
            missing = [_path_text(src[len(where):]) for i, (src, _, _) in enumerate(groups) if i not in reached]
            if missing:
                out.append(_error_line("policy", path, "the cluster's own pods are not admitted to every port of "
                                       f"these pods (not admitted from {', '.join(missing)}): workers could not "
                                       "reach the GCS or each other; add a rule without `ports` whose peers "
                                       "select the cluster's own pods"))
            if doc.get("kind") == "RayJob" and labels["ray.io/node-type"] == "head":
                out += _job_server_errors(doc, path, covering, port)
        for n, policy in ingress:  # any policy in the file is about this cluster
            name = _as_mapping(policy.get("metadata")).get("name")
            for k, peers, ports in _ingress_rules(policy):
                if peers and all(own(policy, peer) for peer in peers):
                    continue
                bad = [p for p in ports if not _is_job_server_port(p, port)]
                where = (f"document {n + 1} (NetworkPolicy {name})", "spec", "ingress", k)
                if not ports or bad:
                    opened = "every port" if not ports else ", ".join(str(_as_mapping(p).get("port", p)) for p in bad)
                    sources = "any source" if not peers else "pods outside the cluster's own"
                    out.append(_error_line("policy", where, f"admits {sources} to {opened}: only the job server port "
                                           f"{port}/TCP (token authentication) may be opened beyond the "
                                           "cluster's own pods"))
                elif not peers or any("ipBlock" in _as_mapping(peer) for peer in peers):
                    # pod IPs are routable from the VPC on many clouds (GKE VPC-native, EKS VPC CNI)
                    sources = "any source" if not peers else "an IP block"
                    out.append(_error_line("policy", where, f"admits {sources} to the job server port {port}/TCP, "
                                           "which runs any code it is sent with the token: admit pods (its "
                                           "submitter, the KubeRay operator), not addresses"))
                elif any(_selects_every_pod(peer) for peer in peers):
                    out.append(_error_line("policy", where, f"admits every pod of {_peer_namespaces(peers)} to the job "
                                           f"server port {port}/TCP: name the pods (its submitter, the KubeRay "
                                           "operator) with a podSelector"))
    return out


def _network_policy_document_errors(doc: dict) -> list[str]:
    spec = doc.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("podSelector"), dict):
        return [_error_line("schema", ("spec", "podSelector"), "a NetworkPolicy needs spec.podSelector (a mapping)")]
    return credential_errors(doc)


# --------------------------------------------------------------------------------------------
# files and CLI
# --------------------------------------------------------------------------------------------
def _kind_of(doc: Any) -> str:
    if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(f"{KUBERAY_GROUP}/"):
        return "kuberay"
    if isinstance(doc, dict) and "provider" in doc:
        return "launcher"
    if _is_network_policy(doc):
        return "networkpolicy"
    return "unknown"


def validate_document(doc: Any, crd_dir: str | os.PathLike | None = None) -> list[str]:
    kind = _kind_of(doc)
    if kind == "kuberay":
        return validate_kuberay_manifest(doc, crd_dir)
    if kind == "launcher":
        return validate_launcher_config(doc)
    if kind == "networkpolicy":
        return _network_policy_document_errors(doc)
    return [_error_line("schema", (), "neither a Ray cluster launcher config (no `provider`), a KubeRay "
                 f"manifest (apiVersion {KUBERAY_GROUP}/...) nor a {NETWORK_POLICY_API} NetworkPolicy")]


@dataclass
class FileReport:
    path: str
    errors: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a valid file leaves unchecked

    @property
    def ok(self) -> bool:
        return not self.errors


def is_dockerfile(path: str | os.PathLike) -> bool:
    """``Dockerfile``, ``Dockerfile.gpu``, ``gpu.Dockerfile``: checked by :func:`dockerfile_errors`."""
    name = os.path.basename(str(path)).lower()
    if name.endswith(".dockerignore"):  # (BuildKit's per-Dockerfile ignore file)
        return False
    return name == "dockerfile" or name.startswith("dockerfile.") or name.endswith(".dockerfile")


def validate_file(path: str | os.PathLike, crd_dir: str | os.PathLike | None = None) -> FileReport:
    report = FileReport(str(path))
    if is_dockerfile(path):
        try:
            report.errors += dockerfile_errors(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as e:
            report.errors.append(f"[dockerfile] {e}")
        if not report.errors:
            report.summaries.append(f"Dockerfile: rayproject/ray:{PINNED_RAY_VERSION}-*, the project in "
                                    f"{PROJECT_DIR_IN_IMAGE}, installed editable")
        return report
    try:
        docs = load_documents(path)
    except (OSError, yaml.YAMLError) as e:
        report.errors.append(f"[yaml] {e}")
        return report
    if not docs:
        report.errors.append("[yaml] no YAML document in the file")
    policies = [(n, doc) for n, doc in enumerate(docs) if _is_network_policy(doc)]
    for n, doc in enumerate(docs):
        prefix = f"document {n + 1}: " if len(docs) > 1 else ""
        errors = validate_document(doc, crd_dir)
        if _kind_of(doc) == "kuberay":  # its pods behind the file's NetworkPolicies
            errors += network_policy_errors(doc, policies)
        report.errors += [prefix + e for e in errors]
        if _kind_of(doc) == "launcher":
            report.notes += [prefix + n for n in launcher_notes(doc)]
        if not errors:
            try:
                kind = _kind_of(doc)
                summary = (kuberay_summary(doc) if kind == "kuberay" else launcher_summary(doc) if kind == "launcher"
                           else f"NetworkPolicy {doc['metadata']['name']}")
                report.summaries.append(prefix + summary)
            except Exception:  # a summary is a courtesy; validity was decided above
                pass
    return report
