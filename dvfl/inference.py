"""Recognising actions in video files with a trained model: the deployment side of the project.

A :class:`Predictor` decodes a file through the same killable decode process and container
checks as ingest (:class:`dvfl.data.worker.DecodeProcess`, :func:`dvfl.data.decode.decode_video`),
samples the same deterministic uniform clips (``split="test"``: :func:`dvfl.data.sampling.plan_views`)
at the model's stored short side, and crops/normalises them as evaluation does
(:mod:`dvfl.train.evaluate`): a prediction on a test video equals the evaluation's prediction for it.

What a model needs to know about its inputs (class names, frames, short side, crop size) is in
its ``model.json`` (``classes`` and ``inputs``, written by the pipeline); for an older model
directory without them, the ingest output it was trained on (``dataset.json``) supplies them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dvfl.allocator import keep_freed_memory
from dvfl.artifacts import SPEC, load_model
from dvfl.data import decode
from dvfl.data.sampling import spread_clips, uniform_clip_indices
from dvfl.data.shards import load_dataset_info
from dvfl.data.worker import DecodeProcess
from dvfl.data.views import CROPS, View, frames_to_crop, make_clip_batch, normalize
from dvfl.models.video_focalnet import set_temporal_impl

DEFAULT_TIMEOUT = 60.0
# predict --stream holds a file's every frame: 6 minutes at 25 fps, ~0.6 GB at a 128-pixel short side (4:3)
STREAM_MAX_FRAMES = 9000


class PredictError(Exception):
    """A file that cannot be recognised; ``reason`` is one of the decode reject reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_views(text: str) -> tuple[int, int]:
    """``"4x3"`` -> (4 clips, 3 crops); crops are 1 (centre) or 3 (start/centre/end)."""
    try:
        clips, crops = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--views {text!r}: expected CLIPSxCROPS, e.g. 1x1 or 4x3") from None
    if clips < 1 or crops not in CROPS:
        raise ValueError(f"--views {text!r}: clips must be >= 1 and crops one of {sorted(CROPS)}")
    return clips, crops


def input_spec(spec: dict, clips_dir: str | None = None) -> tuple[list[str], dict]:
    """(class names, {frames, short_side, crop_size}) of a model: from its spec, else its clips."""
    classes, inputs = spec.get("classes"), spec.get("inputs")
    if (classes is None or inputs is None) and clips_dir:
        info = load_dataset_info(clips_dir)
        trained = spec.get("dataset_fingerprint")
        if classes is None and trained not in (None, info["fingerprint"]):
            # the class names would come from another ingest: same count, maybe another order
            raise ValueError(f"the model records no class names and was trained on other clips (dataset "
                             f"{trained[:12]}) than --clips {clips_dir} (dataset {info['fingerprint'][:12]}): "
                             f"pass the ingest output it was trained on")
        classes = classes or info["classes"]
        p = info["params"]
        inputs = inputs or {"frames": p["frames"], "short_side": p["short_side"],
                            "crop_size": spec["kwargs"].get("img_size", p["short_side"]), "eval_clips": p["eval_clips"],
                            "min_frames": p.get("min_frames") or p["frames"]}
    if classes is None or inputs is None:
        raise ValueError("the model directory records no class names / input sizes (model.json 'classes', "
                         "'inputs'): pass --clips, the ingest output it was trained on")
    if len(classes) != spec["kwargs"]["num_classes"]:
        raise ValueError(f"{len(classes)} class names for a model with {spec['kwargs']['num_classes']} outputs")
    missing = [k for k in ("frames", "short_side", "crop_size") if inputs.get(k) is None]
    if missing:
        raise ValueError(f"model.json 'inputs' lacks {', '.join(missing)}")
    problem = eval_views_problem(inputs)
    if problem:
        raise ValueError(problem)
    built = spec["kwargs"].get("num_frames")
    if built is not None and int(inputs["frames"]) != int(built):  # (every file failed in the model, untold why)
        raise ValueError(f"inputs of {inputs['frames']} frames (model.json 'inputs', or --clips) for a model built "
                         f"for {built} (model.json 'kwargs.num_frames')")
    return list(classes), dict(inputs)


def recorded_views(inputs: dict) -> tuple[int, int] | None:
    """The evaluation views a model.json records (models saved before session 50 record none)."""
    try:
        return parse_views(inputs["eval_views"])
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def eval_views_problem(inputs: dict) -> str | None:
    """What is wrong with a recorded ``inputs.eval_views`` (None: fine, or none recorded): read as
    1x1, a hand-edited "2x2" would have been scored and answered from another view than it says."""
    if inputs.get("eval_views") is not None and recorded_views(inputs) is None:
        return f"model.json 'inputs.eval_views' is {inputs['eval_views']!r}, not CLIPSxCROPS (e.g. 4x3)"
    return None


@dataclass
class Predictor:
    model: torch.nn.Module
    classes: list[str]
    frames: int
    short_side: int
    crop_size: int
    spec: dict = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT
    # the stored evaluation grid: evaluation of N clips uses the N of its clips nearest N evenly spaced
    # positions (spread_clips; 1 of 4 is index 2), as dvfl.train.evaluate does
    eval_clips: int = 1
    # fewer decodable frames are refused (too_short), as ingest refused them for training and
    # evaluation; a 1-frame upload repeated T times is no video the model was scored on
    min_frames: int | None = None  # None: frames
    video_seconds: float | None = None  # median length of the training videos (a stream's default window)
    eval_views: tuple[int, int] | None = None  # (clips, crops) the run evaluated with; None: not recorded
    device: str = "cpu"
    proc: DecodeProcess = field(default_factory=DecodeProcess)

    @classmethod
    def load(cls, model_dir: str, clips_dir: str | None = None, **kw) -> "Predictor":
        from dvfl import storage

        if not storage.isfile(storage.join(model_dir, SPEC)):  # (local, or on object storage as distill writes it)
            raise ValueError(f"{model_dir} is not a model directory (no {SPEC})")
        model, spec = load_model(model_dir)
        # the Conv2d temporal path: the same outputs, faster on CPUs (README's deployment table)
        set_temporal_impl(model, "conv2d")
        classes, inputs = input_spec(spec, clips_dir)
        # a GPU when this process has one (a Serve replica gets one only with num_gpus in its options)
        kw.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(kw["device"]).type == "cpu":  # each clip's activations reused, not faulted back in
            keep_freed_memory()
        return cls(model.eval().to(kw["device"]), classes, int(inputs["frames"]), int(inputs["short_side"]),
                   int(inputs["crop_size"]), spec, eval_clips=int(inputs.get("eval_clips", 1)),
                   min_frames=int(inputs.get("min_frames") or inputs["frames"]),
                   video_seconds=inputs.get("video_seconds"), eval_views=recorded_views(inputs), **kw)

    def close(self) -> None:
        self.proc.close()

    # -- decoding ------------------------------------------------------------------------
    def decode(self, path: str, num_clips: int = 1, timeout: float | None = None,
               max_seconds: float | None = None) -> dict:
        """The video's ``num_clips`` uniform clips (uint8 ``(T, H, W, 3)`` each) through the
        killable decode child, the clips evaluation scores: those of the grid the model's clips were
        stored with that :func:`dvfl.data.sampling.spread_clips` picks (a grid of ``num_clips``
        when it asks for more); raises :class:`PredictError` for a bad file, or one longer than
        ``max_seconds`` (``too_long``; an unknown frame rate counts as 30 fps)."""
        grid = max(num_clips, self.eval_clips)
        job = {"path": os.path.abspath(path), "video_id": os.path.basename(path), "split": "test",
               "frames": self.frames, "clips_per_video": 1, "eval_clips": grid,
               "view_indices": sorted(spread_clips(num_clips, grid)), "seed": 0, "short_side": self.short_side,
               "min_frames": self.min_frames or self.frames, "whole_file": True,  # a cut upload is refused, not recognised from its first part
               "max_seconds": max_seconds}
        res = self.proc.run(job, timeout or self.timeout)
        if not res.get("ok"):
            raise PredictError(res.get("reason", "error"), res.get("detail", ""))
        return res

    def decode_all(self, path: str, max_frames: int = STREAM_MAX_FRAMES) -> dict:
        """Every frame of the file at the model's short side (the streaming input), through the
        same decode child; raises :class:`PredictError` for a bad file or one of more than
        ``max_frames`` frames (``too_long``: all of them are held in memory)."""
        job = {"path": os.path.abspath(path), "video_id": os.path.basename(path), "split": "test",
               "frames": self.frames, "clips_per_video": 1, "eval_clips": 1, "seed": 0,
               "short_side": self.short_side, "min_frames": self.min_frames or self.frames, "all_frames": True,
               "whole_file": True,
               "max_frames": max_frames}
        res = self.proc.run(job, self.timeout)
        if not res.get("ok"):
            raise PredictError(res.get("reason", "error"), res.get("detail", ""))
        return {"frames": res["views"][0][3], "fps": res["src_fps"]}

    # -- recognition ---------------------------------------------------------------------
    def probabilities(self, clips: list[np.ndarray], num_crops: int = 1) -> np.ndarray:
        """Mean softmax over every clip x crop view (evaluation's video-level score); raises
        :class:`PredictError` (``too_small``) for frames smaller than the model's crop (possible
        with a model trained at the source size, ``data.short_side 0``)."""
        h, w = clips[0].shape[1:3]
        if min(h, w) < self.crop_size:
            raise PredictError("too_small", f"frames of {h}x{w} are smaller than the model's {self.crop_size}-pixel crop")
        views = [View(c) for c in CROPS[num_crops]]
        clips = frames_to_crop(clips, self.crop_size, num_crops)
        total = 0
        for view in views:
            x = normalize(make_clip_batch(clips, self.crop_size, [view] * len(clips)), self.device)
            with torch.inference_mode():
                total = total + self.model(x).float().softmax(dim=1).sum(0).cpu().numpy()
        return total / (len(views) * len(clips))

    def topk(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(probs)))]
        return [(self.classes[i], float(probs[i])) for i in order]

    def predict_file(self, path: str, views: tuple[int, int] = (1, 1), k: int = 5) -> dict:
        """``{"path", "topk": [[class, prob], ...], "frames", "fps", "seconds"}`` or raises PredictError."""
        t0 = time.perf_counter()
        res = self.decode(path, views[0])
        clips = [v[3] for v in res["views"]]
        probs = self.probabilities(clips, views[1])
        out = {"path": path, "topk": [[c, round(p, 6)] for c, p in self.topk(probs, k)],
               "frames": res["src_num_frames"], "fps": res["src_fps"],
               "seconds": round(time.perf_counter() - t0, 4)}
        note = self.length_note(res["src_num_frames"], res["src_fps"])
        return {**out, "note": note} if note else out

    def length_note(self, frames: int, fps: float) -> str | None:
        """A warning where a clip's T frames spread over a video far longer than the training videos
        (a 40-minute recording: a frame every 5 minutes), whose top-k then means little."""
        if not (self.video_seconds and fps and frames):
            return None
        seconds = frames / fps
        if seconds <= LONG_VIDEO_FACTOR * self.video_seconds:
            return None
        return (f"{seconds:.0f} s long, {seconds / self.video_seconds:.0f}x the training videos' median "
                f"{self.video_seconds:.1f} s: each clip's {self.frames} frames span the whole file (cut it into "
                "pieces of about the training videos' length)")


#: a video this many times longer than the training videos' median gets a note (its clips are sparse)
LONG_VIDEO_FACTOR = 4.0


def expand_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """(files, folders without a video file): files as given; a folder becomes its video files (by
    extension, sorted, recursively, linked sub-folders too, each real folder once)."""
    out, empty = [], []
    for item in items:
        if os.path.isdir(item):
            found = sorted(_video_files(item))
            out.extend(found)
            if not found:
                empty.append(item)
        else:
            out.append(item)
    return out, empty


def _video_files(folder: str) -> list[str]:
    """The video files under ``folder``. Linked sub-folders are followed (``Path.rglob`` skipped them
    without a word), each real folder once (a link loop ends); hidden files and folders are a
    system's (a Mac's copy leaves "._<name>.mp4" beside each video), and so are a NAS's or a
    Windows drive's own folders."""
    from dvfl.data.adapters import SYSTEM_FOLDERS

    seen, found = set(), []
    for dirpath, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SYSTEM_FOLDERS]
        found += [os.path.join(dirpath, n) for n in names if not n.startswith(".")
                  and os.path.splitext(n)[1].lower() in decode.VIDEO_EXTENSIONS
                  and os.path.isfile(os.path.join(dirpath, n))]
    return found


# ----------------------------------------------------------------------------- streaming
def stream_windows(num_frames: int, window: int, stride: int) -> list[int]:
    """End frames (exclusive) of the sliding windows over a stream of ``num_frames`` frames: a
    window of ``window`` frames is recognised every ``stride`` new frames once it is full."""
    if window < 1 or stride < 1:
        raise ValueError("window and stride must be >= 1")
    return list(range(window, num_frames + 1, stride))


def default_window(pred: Predictor, fps: float) -> int:
    """Frames per window: as long as the median training video (the span a training clip's T
    frames were spread over), at the stream's rate; the model's T where that is unknown."""
    if not pred.video_seconds:
        return pred.frames
    return max(pred.frames, int(round(pred.video_seconds * fps)))


def stream_file(pred: Predictor, path: str, window: int | None, stride: int, *, realtime: bool = True,
                k: int = 1, max_frames: int = STREAM_MAX_FRAMES, log=print) -> dict:
    """Play ``path`` as a live stream at its own frame rate; every ``stride`` frames recognise the
    last ``window`` frames (None: :func:`default_window`; the model's T frames sampled uniformly
    from them). Each window's latency (from its last frame's arrival to its result) is logged;
    with ``realtime`` the frames arrive on the file's clock, so a slow model falls behind, as it
    would on a camera.

    The file is decoded up front; a live source decodes as frames arrive, so each window is
    charged the decode of its ``stride`` new frames (the file's mean decode time per frame) and
    its latency the decode of its last one: the real-time factor counts decoding, not only the model."""
    pred.proc.ensure_started()  # (its start is no per-frame cost)
    started = time.perf_counter()
    res = pred.decode_all(path, max_frames)
    frames, fps = res["frames"], res["fps"] or 25.0
    decode_s = (time.perf_counter() - started) / max(1, len(frames))  # per frame, resize to the short side included
    # a file shorter than the default window is one window, the whole file (as evaluation sees a video)
    window = window or max(pred.frames, min(default_window(pred, fps), len(frames)))
    ends = stream_windows(len(frames), window, stride)
    if not ends:  # nothing would be recognised: not a success with a NaN real-time factor
        raise PredictError("too_short", f"{len(frames)} frames, fewer than one --window of {window}")
    pred.probabilities([frames[uniform_clip_indices(window, pred.frames)]], 1)  # warm-up: one-time set-up untimed
    start = time.perf_counter()
    rows, ready = [], start  # ready: when the CPU is done with the last window
    for end in ends:
        arrival = start + end / fps  # the window's last frame is there at this wall time
        if realtime:  # the new frames are decoded as they arrive, or once the CPU is free
            decoded = max(arrival + decode_s, ready + stride * decode_s)
            wait = decoded - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        t0 = time.perf_counter()
        idx = uniform_clip_indices(window, pred.frames) + (end - window)
        probs = pred.probabilities([frames[idx]], 1)
        ready = done = time.perf_counter()
        latency = done - arrival if realtime else decode_s + done - t0
        top = pred.topk(probs, k)
        rows.append({"end_frame": end, "latency_s": round(latency, 4),
                     "compute_s": round(stride * decode_s + done - t0, 4),  # the model + its new frames' decode
                     "topk": [[c, round(p, 6)] for c, p in top]})
        log(f"[stream] frames {end - window:>5}-{end - 1:<5} {top[0][0]} ({top[0][1]:.2f})  "
            f"latency {latency * 1000:.0f} ms")
    # windows processed per second / windows arriving per second
    rtf = (1.0 / np.mean([r["compute_s"] for r in rows])) / (fps / stride)
    return {"path": path, "fps": fps, "frames": len(frames), "window": window, "stride": stride,
            "decode_ms_per_frame": round(1000 * decode_s, 3), "windows": rows, "real_time_factor": round(float(rtf), 3)}


def write_json(path: str, obj) -> None:
    from dvfl import storage

    storage.write_json(storage.absolute(path), obj)
