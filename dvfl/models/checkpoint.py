"""Loading official Video-FocalNet / DVFL-Net checkpoints and 2D ImageNet FocalNet weights.

Every file goes through ``torch.load(..., weights_only=True)``: checkpoints come from the
internet and a pickle can run code. The official trainer also pickles its yacs config beside the
weights: that class (and argparse's Namespace) is read as a plain OrderedDict by the same
weights-only unpickler (:data:`METADATA_GLOBALS`); every other global is refused as before.
Official checkpoints keep their weights under ``"model"``; a bare state dict is accepted too.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "LoadReport",
    "read_state_dict",
    "checkpoint_filter_fn",
    "load_checkpoint",
    "check_checkpoint",
    "init_from_image_focalnet",
    "image_focalnet_matches",
]

HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for the requested model; the message says why."""


@dataclass
class LoadReport:
    """What a non-strict load did, so callers can log it instead of guessing."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    missing: list[str] = field(default_factory=list)  # model keys left at their init

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)} checkpoint keys, "
            f"{len(self.missing)} model keys kept their initialisation"
        )


# Classes that training scripts pickle next to the weights (a yacs config, parsed arguments):
# torch's weights-only unpickler reads them as plain OrderedDicts (their items, nothing called);
# every other global stays refused.
METADATA_GLOBALS = ("yacs.config.CfgNode", "argparse.Namespace")


def _torch_load(source) -> object:
    from collections import OrderedDict

    with torch.serialization.safe_globals([(OrderedDict, name) for name in METADATA_GLOBALS]):
        return torch.load(source, map_location="cpu", weights_only=True)


def checkpoint_file(path: str | os.PathLike) -> str:
    """The weights file a checkpoint path names: the path itself (made absolute), or a model folder's
    ``model.pt`` / ``model.safetensors`` (a folder given as a checkpoint was "not found")."""
    from dvfl import storage

    path = os.fspath(path)
    remote = storage.is_remote(path)
    path = storage.absolute(path)  # (a file:// URI: the local file it names)
    if storage.isdir(path) if remote else os.path.isdir(path):
        inside = [storage.join(path, n) for n in ("model.pt", "model.safetensors")]
        found = [f for f in inside if (storage.isfile(f) if remote else os.path.isfile(f))]
        if not found:
            raise CheckpointError(f"{path} is a folder without model.pt or model.safetensors: give a checkpoint file")
        return found[0]
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return its state dict (``["model"]``, ``["state_dict"]``
    or the file itself). Raises :class:`CheckpointError` for missing or unreadable files."""
    from dvfl import storage

    path = checkpoint_file(path)
    remote = storage.is_remote(path)
    if not (storage.isfile(path) if remote else os.path.isfile(path)):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):  # (no pickle at all: an exported model folder)
            from safetensors.torch import load, load_file

            obj = load(storage.read_bytes(path)) if remote else load_file(path, device="cpu")
        else:
            source = io.BytesIO(storage.read_bytes(path)) if remote else path
            obj = _torch_load(source)
    except Exception as exc:  # corrupt file, truncated download, or a pickle with code in it
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not contain a state dict of tensors")
    # DDP / torch.compile wrappers prefix every key, in either order; the weights are the same.
    stripped = True
    while stripped:
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in obj):
                obj = {k[len(prefix) :]: v for k, v in obj.items()}
                stripped = True
    return obj


def _is_timm_image_focalnet(state_dict: dict) -> bool:
    return "stem.proj.weight" in state_dict


def _map_timm_image_focalnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's FocalNet layout -> the official layout our video model uses.

    timm names the stem ``stem``, puts each downsample at the start of the following stage,
    stores the linear layers of the modulation and MLP as 1x1 convs and wraps the classifier in
    ``head.fc``.
    """
    mapped = {}
    for key, value in state_dict.items():
        new = key
        if new.startswith("stem."):
            new = "patch_embed." + new[len("stem.") :]
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", new)
        if m:
            new = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        if new.startswith("head.fc."):
            new = "head." + new[len("head.fc.") :]
        if re.search(r"\.(modulation\.f|modulation\.proj|mlp\.fc1|mlp\.fc2)\.weight$", new) and value.ndim == 4:
            value = value.flatten(1)
        mapped[new] = value
    return mapped


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a foreign checkpoint onto ``model``'s key names (timm convention).

    Official Video-FocalNet / DVFL-Net and official 2D FocalNet checkpoints already use our
    names; timm's 2D FocalNet layout is renamed.
    """
    if _is_timm_image_focalnet(state_dict):
        return _map_timm_image_focalnet(state_dict)
    return dict(state_dict)


def _head_mismatch(state_dict: dict, own: dict) -> str | None:
    for key in HEAD_KEYS:
        # only another class count (rows) is a head to re-initialise; other shapes are a wrong spec
        if key in state_dict and key in own and state_dict[key].shape[:1] != own[key].shape[:1]:
            return f"checkpoint head {tuple(state_dict[key].shape)} vs model head {tuple(own[key].shape)}"
    return None


def _fitted_state(model: nn.Module, path, reinit_head: bool, state_dict: dict | None = None) -> tuple[dict, LoadReport]:
    """``path``'s tensors as ``model`` takes them (a head of another class count dropped where
    ``reinit_head``), or :class:`CheckpointError` naming what does not fit. Compares names and
    shapes only, so a model on the meta device checks a checkpoint before any work."""
    state_dict = checkpoint_filter_fn(read_state_dict(path) if state_dict is None else state_dict, model)
    own = model.state_dict()
    mismatch = _head_mismatch(state_dict, own)
    report = LoadReport()
    if mismatch:
        if not reinit_head:
            raise CheckpointError(
                f"{path}: class count differs ({mismatch}). A model that predicts (a teacher, a model to "
                "evaluate) must have the dataset's classes; to fine-tune from it with a new classifier: "
                "teacher.train.reinit_head or student.reinit_head in a run config (dvfl teacher --reinit-head)."
            )
        for key in HEAD_KEYS:
            if key in state_dict:
                report.skipped[key] = "head re-initialised: class count differs"
                state_dict.pop(key)
    elif reinit_head and not any(key in own for key in HEAD_KEYS):  # a model without a classifier (num_classes=0)
        for key in HEAD_KEYS:
            if key in state_dict:
                report.skipped[key] = "no classifier in the model"
                state_dict.pop(key)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and own[k].shape != v.shape]
    if shapes:  # (load_state_dict would raise too, with a page of size mismatches)
        raise CheckpointError(f"{path} does not match the model spec ({type(model).__name__}): {len(shapes)} tensors "
                              f"differ in shape (checkpoint vs model), e.g. {shapes[:2]}{_architecture_of(state_dict)}")
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict and not (mismatch and k in HEAD_KEYS)]
    if unexpected or missing:
        video = any("temporal" in k for k in state_dict)  # (a 2D hint for a video model's file misled)
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            + (_architecture_of(state_dict) if video else
               ". A 2D ImageNet FocalNet is loaded with init_from_image_focalnet (--init-2d).")
        )
    return state_dict, report


def _architecture_of(state_dict: dict) -> str:
    """What a Video-FocalNet checkpoint's tensors say it is, as words to add to an error ("" if unknown):
    its width and depths, and the variant of that size."""
    proj = state_dict.get("patch_embed.proj.weight")
    depths: dict[int, int] = {}
    for key in state_dict:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            depths[int(m.group(1))] = max(depths.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    if proj is None or not depths:
        return ""
    from .video_focalnet import VARIANTS

    dims, stages = int(proj.shape[0]), [depths.get(i, 0) for i in range(max(depths) + 1)]
    named = [n for n, v in VARIANTS.items() if v["embed_dim"] == dims and list(v["depths"]) == stages]
    return (f"; the file holds a Video-FocalNet of embed_dim {dims} and depths {stages}"
            + (f" ({named[0]})" if named else ""))


def check_checkpoint(model: nn.Module, path: str | os.PathLike, *, reinit_head: bool = False) -> None:
    """What :func:`load_checkpoint` would refuse, refused now (``model`` may be on the meta device)."""
    _fitted_state(model, path, reinit_head)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    reinit_head: bool = False,
    state_dict: dict | None = None,
) -> LoadReport:
    """Load an official Video-FocalNet / DVFL-Net checkpoint into ``model`` strictly.

    Every key and shape must match. A classifier of another size (e.g. a Kinetics-400 checkpoint
    for a 101-class model) is an error unless ``reinit_head=True``, in which case every other
    tensor still loads strictly and only the head keeps its fresh initialisation. A teacher is
    always loaded with ``reinit_head=False``: its head *is* the knowledge being distilled.
    ``state_dict``: ``path``'s tensors already read (:func:`read_state_dict`), not read again.
    """
    state_dict, report = _fitted_state(model, path, reinit_head, state_dict)
    result = model.load_state_dict(state_dict, strict=False)
    report.loaded = [k for k in state_dict]
    report.missing = [k for k in result.missing_keys]
    return report


def init_from_image_focalnet(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Initialise a video model from a 2D ImageNet FocalNet state dict (timm or official layout).

    Spatial weights load by name where the shapes agree; the temporal branches
    (``f_temporal``, ``h_temporal``, ``focal_layers_temporal``) have no 2D counterpart and keep
    their initialisation, as does a classifier of another size. Nothing is loaded silently: the
    report lists every loaded, skipped and untouched key.
    """
    to_load, report = _image_focalnet_fit(model, path)
    if not to_load:
        raise CheckpointError(f"{path}: no tensor matches the video model; is it a FocalNet checkpoint?")
    model.load_state_dict(to_load, strict=False)
    return report


def _image_focalnet_fit(model: nn.Module, path) -> tuple[dict, LoadReport]:
    """The tensors of a 2D FocalNet that ``model`` takes (by name and shape), and the report."""
    state_dict = checkpoint_filter_fn(read_state_dict(path), model)
    own = model.state_dict()
    report = LoadReport()
    to_load, other_shape = {}, []
    for key, value in state_dict.items():
        if key not in own:
            report.skipped[key] = "no such parameter in the video model"
        elif own[key].shape != value.shape:
            report.skipped[key] = f"shape {tuple(value.shape)} != {tuple(own[key].shape)}"
            if key not in HEAD_KEYS:  # (a classifier of another class count keeps its init, as documented)
                other_shape.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            to_load[key] = value
    stem = "patch_embed.proj.weight"
    if other_shape and stem in to_load:
        # the model's width, another focal level (an lrf file for an srf model): those weights stayed random beside
        # the loaded rest (another width fits in part: the callers judge the share)
        raise CheckpointError(f"{len(other_shape)} tensors of the model have another shape in the file (file vs model), "
                              f"e.g. {other_shape[:2]}: a 2D FocalNet of another focal level (lrf vs srf?); give the "
                              "file of the model's architecture")
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load)
    return to_load, report


def image_focalnet_matches(model: nn.Module, path: str | os.PathLike) -> tuple[int, int]:
    """How many tensors :func:`init_from_image_focalnet` would load, of the model's own (``model``
    may be on the meta device): names and shapes only."""
    report = _image_focalnet_fit(model, path)[1]
    return len(report.loaded), len(report.loaded) + len(report.missing)
