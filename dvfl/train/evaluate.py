"""Deterministic multi-clip x multi-crop evaluation (the paper's protocol, e.g. 4 x 3 views).

Every stored uniform clip of a test video is seen under fixed crops (the centre, or start/centre/end
along the long side after resizing the short side to the crop); the video's prediction is the mean of the views' softmax. Nothing is random, so the
same weights always give the same numbers (the official code samples test clips randomly).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from dvfl.data.shards import load_dataset_info, parquet_file, raise_if_corrupt, shard_paths
from dvfl.data.sampling import spread_clips
from dvfl.data.views import CROPS, View, batch_arrays, make_clip_batch, normalize, frames_to_crop
from dvfl.allocator import keep_freed_memory


class ProtocolError(ValueError):
    """The shards cannot serve the asked views (e.g. 4 clips per video asked, 1 stored)."""


def evaluate_multiview(model: torch.nn.Module, clips_dir: str, split: str, crop_size: int, *,
                       num_clips: int = 1, num_crops: int = 1, batch_size: int = 32,
                       device: torch.device | str | None = None, videos=None, view_kind: str = "uniform",
                       details: bool = False, per_video: bool = False, progress=None,
                       progress_seconds: float = 30.0, keep_memory: bool = False) -> dict:
    """Video-level top-1/top-5 over ``num_clips`` stored uniform clips x ``num_crops`` crops.

    ``videos``: only these videos of ``split`` (a validation hold-out carved from training, whose
    stored views are ``view_kind="train"``). Every video must have ``num_clips`` stored views, or
    :class:`ProtocolError` (never silently fewer views). ``details``: also per-class accuracy,
    the confusion matrix and the class names. ``per_video``: also ``predictions``, video id ->
    predicted class index. ``progress``: called with a line every ``progress_seconds`` (a 4x3
    evaluation of Video-FocalNet-B on CPUs takes hours). ``keep_memory``: on a CPU, this process keeps
    the memory each batch frees from now on (docs/training-speed.md): for a process of its own (the
    evaluate command, a Ray task), not a run's driver, which goes on to other stages.
    """
    if num_crops not in CROPS:
        raise ProtocolError(f"crops per clip must be one of {sorted(CROPS)}, got {num_crops}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if keep_memory and device.type == "cpu":
        keep_freed_memory()
    model = model.eval().to(device)
    views = [View(c) for c in CROPS[num_crops]]
    prob_sum: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    n_views: dict[str, int] = {}
    columns = ["clip_id", "video_id", "label", "view", "view_index", "frames", "num_frames", "height", "width"]
    wanted = set(range(num_clips))
    if view_kind == "uniform":  # the stored clips nearest to num_clips evenly spaced ones, not the first
        wanted = spread_clips(num_clips, int(load_dataset_info(clips_dir)["params"].get("eval_clips", num_clips)))
    paths = shard_paths(clips_dir, [split])
    started = said = time.monotonic()
    for done, path in enumerate(paths):
        if progress and time.monotonic() - said >= progress_seconds:
            said = time.monotonic()
            progress(f"{done}/{len(paths)} shards of split {split!r}, {len(prob_sum)} videos, {said - started:.0f}s")
        try:
            _add_shard(model, path, batch_size, columns, view_kind, wanted, videos, crop_size, num_crops, views,
                       device, prob_sum, n_views, labels)
        except (OSError, pa.ArrowException) as exc:  # a damaged shard: named, not a traceback through pyarrow
            raise_if_corrupt([path], exc)
            raise
    vids = sorted(v for v in prob_sum if labels[v] >= 0)
    if not vids:
        raise ValueError(f"no labelled {view_kind} clips of split {split!r} in {clips_dir}")
    short = sorted(v for v in vids if n_views[v] < num_clips * num_crops)
    if short:
        raise ProtocolError(f"{len(short)} of {len(vids)} videos of split {split!r} have fewer than {num_clips} "
                            f"stored {view_kind} clips (e.g. {short[0]}: {n_views[short[0]] // num_crops}): the shards "
                            f"cannot serve {num_clips} clips x {num_crops} crops; ingest with more eval clips or ask "
                            "for fewer")
    probs = np.stack([prob_sum[v] for v in vids])
    y = np.array([labels[v] for v in vids])
    k = min(5, probs.shape[1])
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = {
        "top1": float((topk[:, 0] == y).mean()),
        "top5": float((topk == y[:, None]).any(axis=1).mean()),
        "videos": len(vids),
        "views_per_video": float(np.mean([n_views[v] for v in vids])),
        "clips": num_clips,
        "crops": num_crops,
        **(_details(topk[:, 0], y, probs.shape[1]) if details else {}),
    }
    if per_video:
        out["predictions"] = {v: int(t) for v, t in zip(vids, topk[:, 0])}
    return out


def _add_shard(model, path, batch_size, columns, view_kind, wanted, videos, crop_size, num_crops, views, device,
               prob_sum: dict, n_views: dict, labels: dict) -> None:
    """Add one shard's views' softmax to ``prob_sum`` (per video), counting them in ``n_views``."""
    for record_batch in parquet_file(path).iter_batches(batch_size=batch_size, columns=columns):
        table = pa.Table.from_batches([record_batch])
        keep = [v == view_kind and i in wanted and (videos is None or vid in videos) for v, i, vid in
                zip(table.column("view").to_pylist(), table.column("view_index").to_pylist(),
                    table.column("video_id").to_pylist())]
        table = table.filter(pa.array(keep))
        if table.num_rows == 0:
            continue
        arrays, _, y = batch_arrays(table)
        arrays = frames_to_crop(arrays, crop_size, num_crops)
        batch_videos = table.column("video_id").to_pylist()
        for view in views:
            x = normalize(make_clip_batch(arrays, crop_size, [view] * len(arrays)), device)
            with torch.inference_mode():
                probs = model(x).float().softmax(dim=1).cpu().numpy()
            for vid, p, lab in zip(batch_videos, probs, y):
                prob_sum[vid] = prob_sum.get(vid, 0) + p
                n_views[vid] = n_views.get(vid, 0) + 1
                labels[vid] = int(lab)


def _details(pred: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class = {int(c): {"videos": int(confusion[c].sum()), "top1": float(confusion[c, c] / confusion[c].sum())}
                 for c in range(num_classes) if confusion[c].sum()}
    return {"per_class": per_class, "confusion": confusion.tolist()}
