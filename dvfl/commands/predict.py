"""Recognise the action in your own video files with a trained model (student or teacher).

    dvfl predict --model DIR VIDEO_OR_FOLDER... [--views CLIPSxCROPS] [--topk K] [--json OUT]
    dvfl predict --model DIR VIDEO --stream [--window N] [--stride S]

Files are decoded in a killable child process with ingest's container checks, and seen under the
same deterministic views as evaluation, so a test video gets the prediction evaluation counted
(by default the views the run evaluated with, model.json ``inputs.eval_views``; ``--views 1x1``:
the centre crop of the stored uniform clip nearest the middle of the video, ties to the later one
- index 2 of a grid of 4 - from the grid the model's clips were stored with; ``4x3``: 4 uniform
clips x 3 crops). A folder means every video file under it (a folder without
one is an error). A bad file gets a per-file error and the others go on; the exit status is 1 if
any input failed. (``python pipelines/predict.py`` takes the same arguments.) ``--json OUT``
writes ``[{"path", "topk": [[class, probability], ...]} or {"path", "error"}]``.

``--stream`` plays one file as a live stream at its own frame rate and recognises the last
``--window`` frames every ``--stride`` frames, printing each window's latency.
"""
from __future__ import annotations

import argparse
import os
import sys

from dvfl.cli import absolute_path_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (model.pt + model.json)")
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_FOLDER")
    p.add_argument("--views", help="CLIPSxCROPS, as in evaluation (default: the views the run evaluated with, "
                                   "model.json inputs.eval_views; 1x1 for a model that records none)")
    p.add_argument("--topk", type=int, default=5, help="classes printed per file")
    p.add_argument("--json", help="write the predictions here")
    p.add_argument("--clips", help="the ingest output the model was trained on (only for a model.json "
                                   "without class names)")
    p.add_argument("--timeout-per-file", type=float, default=60.0, help="decode time limit per file (s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--stream", action="store_true", help="play the file as a live stream (sliding window)")
    p.add_argument("--window", type=int, help="frames per recognised window (default: as long as the median "
                                               "training video at the stream's frame rate, the span a training "
                                               "clip's T frames covered; T for models that do not record it)")
    p.add_argument("--stride", type=int, default=4, help="recognise a window every S new frames")
    p.add_argument("--no-realtime", action="store_true", help="--stream without waiting for the frames' clock")
    p.add_argument("--max-frames", type=int, help="--stream refuses longer files (too_long): it holds every decoded "
                                                  "frame in memory, short side x long side x 3 bytes each "
                                                  "(default: 9000, 6 minutes at 25 fps)")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    absolute_path_args(a, inputs=("model", "inputs", "clips"), plain_outputs=("json",))
    if a.topk < 1:
        p.error("--topk must be >= 1")
    from dvfl import storage

    remote = [x for x in a.inputs if storage.is_remote(x)]
    if remote:  # (it read as a local path: "missing")
        p.error(f"{remote[0]}: videos to predict must be local files: copy them here first (--model and --json take URIs)")
    if not a.timeout_per_file > 0 or (a.threads is not None and a.threads < 1):
        p.error("--timeout-per-file must be > 0 and --threads >= 1")
    from dvfl.data import decode
    from dvfl.data.manifest import printable
    from dvfl.inference import STREAM_MAX_FRAMES, PredictError, Predictor, expand_inputs, parse_views, stream_file

    try:
        views = parse_views(a.views) if a.views else None
    except ValueError as exc:
        p.error(str(exc))
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    try:
        pred = Predictor.load(a.model, a.clips, timeout=a.timeout_per_file)
    except Exception as exc:  # a missing/mismatched model: one line, not a traceback
        print(f"error: --model {a.model}: {exc}", file=sys.stderr)
        return 2
    try:
        if a.stream:
            if len(a.inputs) != 1 or os.path.isdir(a.inputs[0]):
                p.error("--stream takes one video file")
            if (a.window is not None and a.window < pred.frames) or a.stride < 1:
                p.error(f"--window must be >= the model's {pred.frames} frames and --stride >= 1")
            if a.max_frames is not None and a.max_frames < max(pred.frames, a.window or 0):
                p.error("--max-frames must be >= --window and the model's frames")
            try:
                out = stream_file(pred, a.inputs[0], a.window, a.stride, realtime=not a.no_realtime, k=a.topk,
                                  max_frames=a.max_frames or STREAM_MAX_FRAMES)
            except PredictError as exc:
                print(f"error: {a.inputs[0]}: {exc}", file=sys.stderr)
                return 1
            print(f"[stream] {len(out['windows'])} windows of {out['window']} frames every {a.stride} frames at "
                  f"{out['fps']:g} fps; real-time factor {out['real_time_factor']:.2f} (>= 1: keeps up)")
            # (a traceback after a stream that may have played for minutes)
            return 0 if _json_written(a.json, out) else 1
        if views is None:
            views = pred.eval_views or (1, 1)
            if views != (1, 1):  # (each file costs clips x crops forward passes: said once)
                print(f"[predict] views {views[0]}x{views[1]}, as the run evaluated (model.json); --views 1x1 for one "
                      "forward pass per file", file=sys.stderr)
        files, empty = expand_inputs(a.inputs)
        for folder in empty:  # a folder given and silently skipped would read as "all fine"
            print(f"{folder}: error: no video files in this folder (by extension: "
                  f"{', '.join(sorted(decode.VIDEO_EXTENSIONS))})", file=sys.stderr)
        results, failed = [{"path": f, "error": "no video files in this folder"} for f in empty], len(empty)
        if not files:
            print("error: no video files in the given inputs", file=sys.stderr)
            if results:
                _json_written(a.json, results)
            return 1
        for path in files:
            shown = printable(path)  # a Latin-1 file name made print() raise under a UTF-8 locale
            try:
                r = pred.predict_file(path, views, a.topk)
            except PredictError as exc:
                failed += 1
                results.append({"path": shown, "error": str(exc)})
                print(f"{shown}: error: {exc}", file=sys.stderr)
                continue
            results.append({"path": shown, "topk": r["topk"], **({"note": r["note"]} if r.get("note") else {})})
            print(f"{shown}: " + ", ".join(f"{c} {q:.3f}" for c, q in r["topk"]))
            if r.get("note"):
                print(f"{shown}: note: {r['note']}", file=sys.stderr)
        written = _json_written(a.json, results)  # (not a traceback after every prediction had printed)
        if failed:
            print(f"{failed} of {len(files) + len(empty)} inputs failed", file=sys.stderr)
        return 1 if failed or not written else 0
    finally:
        pred.close()


def _json_written(path, data) -> bool:
    """``--json``'s file written (True when none was asked for), or its error said in one line."""
    if not path:
        return True
    from dvfl.inference import write_json

    try:
        write_json(path, data)
    except OSError as exc:
        print(f"error: writing {path} failed: {exc}", file=sys.stderr)
        return False
    return True
