"""From stored uint8 clips to model inputs: decode, crop, flip, normalise.

A *view* of a stored clip is its crop position plus an optional horizontal flip. Views have
names (``"center"``, ``"start+flip"``, ...) because the teacher-logit cache is keyed by them: a
cached logit belongs to exactly one view of one clip.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dvfl.data.shards import decode_frames

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_POSITIONS = ("start", "center", "end", "random")
# the test crops per clip of the multi-view protocol: 1 centre crop, or 3 along the long side of
# frames first resized to the crop's size on their short side (:func:`frames_to_crop`)
CROPS = {1: ("center",), 3: ("start", "center", "end")}


@dataclass(frozen=True)
class View:
    crop: str = "center"  # start / center / end along the long side, or random (training)
    flip: bool = False

    @property
    def name(self) -> str:
        return self.crop + ("+flip" if self.flip else "")

    @classmethod
    def parse(cls, name: str) -> "View":
        crop, _, flip = name.partition("+")
        if crop not in CROP_POSITIONS or flip not in ("", "flip"):
            raise ValueError(f"unknown view {name!r}: use <start|center|end|random>[+flip]")
        return cls(crop, flip == "flip")


def crop_box(height: int, width: int, size: int, crop: str, rng: np.random.Generator | None = None):
    """Top-left corner of a ``size``x``size`` crop. start/center/end move along the long side
    (the paper's three test crops); the short side is always centred."""
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds the stored frame size {height}x{width}")
    if crop == "random":
        rng = rng or np.random.default_rng()
        return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    frac = {"start": 0.0, "center": 0.5, "end": 1.0}[crop]
    top, left = (height - size) // 2, (width - size) // 2
    if height > width:
        top = int(round((height - size) * frac))
    else:
        left = int(round((width - size) * frac))
    return top, left


def make_clip_batch(arrays, size: int, views, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Crop/flip each ``(T, H, W, 3)`` array by its view -> uint8 tensor ``(B, T, size, size, 3)``."""
    out = np.empty((len(arrays), arrays[0].shape[0], size, size, 3), dtype=np.uint8)
    for i, (clip, view) in enumerate(zip(arrays, views)):
        top, left = crop_box(clip.shape[1], clip.shape[2], size, view.crop, rng)
        patch = clip[:, top : top + size, left : left + size]
        out[i] = patch[:, :, ::-1] if view.flip else patch
    return torch.from_numpy(out)


def frames_to_crop(arrays, size: int, num_crops: int) -> list[np.ndarray]:
    """The frames the multi-view protocol crops. 3 crops: each clip resized (bilinear) so its short
    side is ``size``, so that every crop spans the whole short side, as the official Video-FocalNet
    test pipeline does; 1 crop: the stored frames (a centre crop of the stored short side)."""
    if num_crops == 1:
        return list(arrays)
    return [resize_short_side(clip, size) for clip in arrays]


def resize_short_side(clip: np.ndarray, size: int) -> np.ndarray:
    """A ``(T, H, W, 3)`` uint8 clip whose short side is larger than ``size``, resized to it
    (the long side rounded, aspect kept); a clip no larger is returned as it is."""
    height, width = clip.shape[1:3]
    if min(height, width) <= size:
        return clip
    scale = size / min(height, width)
    new = (size, int(width * scale + 0.5)) if height <= width else (int(height * scale + 0.5), size)
    x = torch.from_numpy(np.array(clip)).permute(0, 3, 1, 2).float()  # a copy: stored frames are read-only
    x = torch.nn.functional.interpolate(x, size=new, mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def normalize(clips_uint8: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(B, T, H, W, 3)`` -> float ``(B, T, 3, H, W)``, ImageNet-normalised, on ``device``.

    The uint8 tensor is moved first: 4x fewer bytes over PCIe than floats.
    """
    x = clips_uint8.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def batch_arrays(table) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """A pyarrow batch of clip rows -> (frame arrays, clip ids, labels with -1 for unlabelled)."""
    arrays = list(decode_frames(table))  # one zero-copy view of the batch when the clips share a shape
    labels = np.array([-1 if v is None else int(v) for v in table.column("label").to_pylist()], dtype=np.int64)
    return arrays, table.column("clip_id").to_pylist(), labels
