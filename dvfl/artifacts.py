"""Model artefacts on disk: weights plus the spec needed to rebuild the network.

A saved model is a directory with ``model.pt`` (a plain state dict, loadable with
``weights_only=True``) and ``model.json`` (``{"name", "kwargs", ...extra}``). An official
checkpoint file is accepted wherever an artefact is, together with an explicit spec.
"""
from __future__ import annotations

import hashlib
import io
import os

import torch
import torch.nn as nn

from dvfl import storage
from dvfl.models import build_model
from dvfl.models.checkpoint import CheckpointError, load_checkpoint
from dvfl.models.video_focalnet import FOLDER_WEIGHTS, VARIANTS

WEIGHTS = "model.pt"
SPEC = "model.json"
# timm.create_model arguments that fetch or read weights (a spec's kwargs never need them)
FETCHING_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "cache_dir",
                   "checkpoint_path"}


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor], legacy: bool = False) -> str:
    """A content hash of the weights: same tensors -> same hash, any changed value -> new hash.
    ``legacy``: as folders saved before 2026-12-02 recorded it (each tensor's own shape hashed)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        # flattened: a contiguous tensor may still have odd strides on size-1 dims (channels-last convs)
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(state_dict[key].shape if legacy else t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_model(directory: str | os.PathLike, model: nn.Module, name: str, kwargs: dict, **extra) -> dict:
    """Save weights + spec atomically; returns the spec (with the weights fingerprint)."""
    directory = os.fspath(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    spec = {"name": name, "kwargs": kwargs, "weights_fingerprint": state_dict_fingerprint(state), **extra}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # weights first, the spec last: a folder with model.json is a whole model (on object stores too)
    storage.write_bytes(storage.join(directory, WEIGHTS), buffer.getvalue())
    storage.write_json(storage.join(directory, SPEC), spec)
    return spec


def read_spec(spec_file: str) -> dict:
    """A model folder's spec; a damaged one is a :class:`CheckpointError` naming the file (not a bare
    JSON, key or type error from deep inside a command)."""
    try:
        spec = storage.read_json(spec_file)
    except ValueError as exc:  # (invalid JSON, not UTF-8)
        raise CheckpointError(f"{spec_file} is not a model spec: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs"), dict):
        raise CheckpointError(f"{spec_file} is not a model spec: it needs a \"name\" and a \"kwargs\" mapping")
    # a folder from elsewhere rebuilds one of our models from its own weights file: another timm name
    # or timm's weight arguments would have timm download (any URL) or read other files
    if spec["name"] not in VARIANTS:
        raise CheckpointError(f"{spec_file} is not a model spec: model {spec['name']!r} is not one of {sorted(VARIANTS)}")
    fetching = sorted(set(spec["kwargs"]) & FETCHING_KWARGS)
    if fetching:
        raise CheckpointError(f"{spec_file} is not a model spec: kwargs {', '.join(fetching)} name other weights "
                              f"than the folder's own")
    placing = sorted(set(spec["kwargs"]) & {"device", "dtype"})
    if placing:  # (where to build it is the loader's: "cuda" on a CPU machine was a driver traceback)
        raise CheckpointError(f"{spec_file} is not a model spec: kwargs {', '.join(placing)} say where to build the "
                              "model, not what it is")
    return spec


def load_model(path: str | os.PathLike, name: str | None = None, kwargs: dict | None = None,
               reinit_head: bool = False) -> tuple[nn.Module, dict]:
    """Load an artefact directory, or an official checkpoint file with an explicit spec.

    Loading is strict (:func:`dvfl.models.load_checkpoint`): a teacher never runs with a
    silently re-initialised head.
    """
    path = os.fspath(path)
    if storage.isdir(path):
        spec_file = storage.join(path, SPEC)
        if not storage.isfile(spec_file):
            raise CheckpointError(f"{path} is not a model directory (no {SPEC})")
        spec = read_spec(spec_file)
        weights = storage.join(path, WEIGHTS)
        if not storage.isfile(weights) and storage.isfile(storage.join(path, FOLDER_WEIGHTS)):  # an exported model folder
            weights = storage.join(path, FOLDER_WEIGHTS)
    else:
        if not storage.exists(path):  # (a mistyped folder was told to give --arch)
            raise CheckpointError(f"{path}: not found (no such model folder or checkpoint file)")
        if name is None:
            raise CheckpointError(f"{path}: a checkpoint file needs the model name (--arch videofocalnet_base; "
                                  "in a run config teacher.model)")
        spec = {"name": name, "kwargs": dict(kwargs or {})}
        weights = path
    if kwargs:  # explicit overrides, e.g. the dataset's class count
        spec = {**spec, "kwargs": {**spec.get("kwargs", {}), **kwargs}}
    try:
        model = build_model(spec["name"], **spec.get("kwargs", {}))
    except TypeError as exc:  # a hand-edited spec, or one of another version: a kwarg this model does not take
        raise CheckpointError(f"{path}: its {SPEC} does not build {spec['name']}: {exc}") from None
    load_checkpoint(model, weights, reinit_head=reinit_head)
    stored, spec["weights_fingerprint"] = spec.get("weights_fingerprint"), state_dict_fingerprint(model.state_dict())
    if stored and not reinit_head and stored == state_dict_fingerprint(model.state_dict(), legacy=True):
        spec["weights_fingerprint"] = stored  # (as its caches and evaluations were keyed)
    elif stored and not reinit_head and stored != spec["weights_fingerprint"]:
        # (a model folder whose weights were edited or swapped after it was saved: its recorded
        # accuracy, identity and cache keys describe other weights)
        raise CheckpointError(f"{path}: its weights do not match its {SPEC} (weights_fingerprint {stored}, the file "
                              f"holds {spec['weights_fingerprint']}): changed or replaced after the model was saved")
    return model, spec


def load_model_for(path: str | os.PathLike, name: str | None, num_classes: int,
                   num_frames: int) -> tuple[nn.Module, dict]:
    """A model folder as it was saved, or a checkpoint file built for a dataset's classes and frames
    (a file carries no spec: without them timm's defaults, 1,000 classes, would be built)."""
    path = os.fspath(path)
    return load_model(path, name=name, kwargs=None if storage.isdir(path) else
                      {"num_classes": num_classes, "num_frames": num_frames})


def other_class_list(model: str, spec: dict, clips: str, classes: list) -> str | None:
    """Why a model's outputs are not these clips' labels (a folder records its class names), or None:
    the same count in another order (another ingest's class list, a renamed class folder) passed
    every count check and misnamed every score, or distilled swapped classes."""
    if len(spec.get("classes") or []) != len(classes) or list(spec["classes"]) == list(classes):
        return None
    differ = next(i for i, (m, c) in enumerate(zip(spec["classes"], classes)) if m != c)
    return (f"{model}'s output {differ} is class {spec['classes'][differ]!r}, {clips}'s label {differ} is "
            f"{classes[differ]!r}: the model was trained on another class list")
