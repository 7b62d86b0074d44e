"""Evaluate a trained model on ingested clips: video-level top-1/top-5, per class, confusion matrix.

    dvfl evaluate --model DIR_OR_CHECKPOINT --clips DIR [--config F] [--views CLIPSxCROPS] [--json OUT]
    dvfl evaluate --config configs/ucf101_base.yaml --model models/ucf101_videofocalnet_base

Each test video's prediction is the mean softmax over CLIPS stored uniform clips x CROPS crops
(start/centre/end along the long side): deterministic, and the same computation as the pipeline's
final evaluation (``results.json``). With ``--config`` the clips, crop size, views and split come
from the run config; without, the views are those the model's run evaluated with (model.json). A
protocol the shards cannot serve (4 clips asked, 1 stored per video) is refused, never silently
evaluated on fewer views. (``python pipelines/evaluate.py`` takes the same arguments.)
"""
from __future__ import annotations

import argparse
import os
import sys

from dvfl.cli import absolute_path_args, add_config_args, config_from_args, deprecated, uses_config


def views_arg(text: str) -> tuple[int, int]:
    """``--views``: :func:`dvfl.inference.parse_views`, its message as argparse's error."""
    from dvfl.inference import parse_views

    try:
        return parse_views(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def plot_confusion(confusion, classes, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    c = np.asarray(confusion, dtype=float)
    rows = c / np.maximum(c.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(24, max(5, 0.18 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the class's videos")
    fig.tight_layout()
    from dvfl import storage

    try:  # a local temporary file renamed over the target (removed if savefig fails), or one PUT
        storage.write_with(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    finally:
        plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--model", required=True, help="model directory (model.json) or official checkpoint file")
    p.add_argument("--arch", help="architecture of a bare checkpoint file (config: teacher.model)")
    deprecated(p, "--model-name", "--arch", "arch")
    p.add_argument("--clips", help="ingest output (config: data.clips)")
    p.add_argument("--views", type=views_arg, help="CLIPSxCROPS, e.g. 4x3 (config: eval.clips x eval.crops; default: "
                   "the views the model's run evaluated with, model.json inputs.eval_views, else 1x1)")
    p.add_argument("--test-split", help="split to evaluate, e.g. test or val (config: data.test_split; default test)")
    deprecated(p, "--split", "--test-split", "test_split")
    p.add_argument("--crop-size", type=int, help="config: data.crop_size (default: the crop the model was trained on, "
                   "from its model.json, else the stored short side)")
    p.add_argument("--json", help="write the metrics here (and the confusion matrix PNG next to it)")
    p.add_argument("--confusion", help="confusion matrix PNG (default: the --json path with .confusion.png for its "
                   "extension, when --json is given)")
    p.add_argument("--batch-size", type=int, default=16)


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from dvfl.locks import reads_held

    with reads_held():  # the clips stay locked for reading while they are evaluated (below)
        return _evaluate(a, p)


def _evaluate(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    absolute_path_args(a, inputs=("model", "clips"), outputs=("json", "confusion"))
    from dvfl import storage

    if not storage.exists(a.model):  # (a model folder may be on object storage, as distill writes it there)
        p.error(f"--model {a.model}: not found")
    clips, crop, split, views, name = a.clips, a.crop_size, a.test_split, a.views, a.arch
    if uses_config(a):
        # (no Ray: its own device); paths it never reads need not exist (a config's teacher checkpoint
        # missing here refused the evaluation of a student)
        cfg = config_from_args(a, {"data.clips": a.clips}, uses_ray_gpus=False,
                               outputs=("data.root", "data.unlabeled", "teacher.path", "student.checkpoint",
                                        "student.init_2d", "teacher.train.checkpoint", "teacher.train.init_2d"))
        clips, split, name = cfg.clips_dir, split or cfg.data.test_split, name or cfg.teacher.model
        if a.config:  # (a --set alone: the embedded default's 32-px crop and views were taken for the model's)
            crop, views = crop or cfg.crop_size, views or (cfg.eval.clips, cfg.eval.crops)
    if not clips:
        p.error("give --clips (or --config with data.clips)")
    split = split or "test"
    from dvfl.data.shards import CorruptShardError, load_dataset_info, shard_paths
    from dvfl.locks import hold_for_reading

    # an `ingest --fresh` into them from another terminal is refused meanwhile (it replaced shards under an
    # evaluation of hours, whose numbers then mixed two ingests under the first one's fingerprint)
    hold_for_reading(clips, "evaluation")
    try:
        info = load_dataset_info(clips)
        shard_paths(clips, [split])  # IncompleteClipsError: scores on part of the split
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a dataset.json cut short or edited: a JSON traceback
        print(f"error: --clips {clips}: {exc} (a dataset.json cut short or edited? ingest again)", file=sys.stderr)
        return 2
    from dvfl.artifacts import SPEC, load_model, other_class_list, read_spec
    from dvfl.inference import eval_views_problem, recorded_views
    from dvfl.models import CheckpointError
    from dvfl.train.evaluate import ProtocolError, evaluate_multiview

    # the views its run evaluated with, as predict and serve can take them (read before the weights: a
    # refusal needs only model.json, not gigabytes of a model on object storage)
    recorded = None
    if not views and storage.isdir(a.model):
        try:
            inputs = read_spec(storage.join(a.model, SPEC)).get("inputs") or {}
            recorded, problem = recorded_views(inputs), eval_views_problem(inputs)
        except (CheckpointError, OSError, ValueError, AttributeError):
            problem = None  # (said by the load below)
        if problem:
            print(f"error: --model {a.model}: {problem}; give --views", file=sys.stderr)
            return 2
    views = views or recorded or (1, 1)
    stored = info["params"]["eval_clips"]
    if views[0] > stored:
        asked = (f"the model's recorded views {views[0]}x{views[1]} (model.json inputs.eval_views) ask" if recorded
                 else f"--views {views[0]}x{views[1]} asks")
        print(f"error: {asked} for {views[0]} clips per video, but {clips} stores "
              f"{stored} evaluation clip(s) per video (ingest --eval-clips {stored}); ask for at most {stored} "
              f"(--views {stored}x{views[1]}), or ingest again with --eval-clips {views[0]}", file=sys.stderr)
        return 2
    try:
        model, spec = load_model(a.model, name=name, kwargs=None if storage.isdir(a.model) else
                                 {"num_classes": len(info["classes"]), "num_frames": info["params"]["frames"]})
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if model.num_classes != len(info["classes"]):
        print(f"error: {a.model} predicts {model.num_classes} classes; {clips} has {len(info['classes'])}",
              file=sys.stderr)
        return 2
    other = other_class_list(a.model, spec, clips, info["classes"])
    if other:
        print(f"error: {other}", file=sys.stderr)
        return 2
    inputs = spec.get("inputs") or {}
    # the clips seen at another size than the model's: each crop another field of view (the run refuses them)
    if inputs.get("short_side") is not None and inputs["short_side"] != info["params"]["short_side"]:
        print(f"[evaluate] note: {clips} stores frames at short side {info['params']['short_side']}, but {a.model} "
              f"was trained on short side {inputs['short_side']}", file=sys.stderr)
    # the crop the model was trained on (as predict and serve use it), not the clips' stored short side
    trained_crop = inputs.get("crop_size") or spec["kwargs"].get("img_size")
    crop = crop or trained_crop or info["params"]["short_side"]
    if not crop:
        p.error("the clips keep the source size (short side 0): give --crop-size")
    if trained_crop and crop != trained_crop:
        print(f"[evaluate] note: crop {crop} px, but {a.model} was trained on {trained_crop} px crops", file=sys.stderr)
    import torch

    # this process's own device: under `ray job submit` it runs where Ray put the entrypoint
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if uses_config(a) and cfg.scaling.use_gpu and device == "cpu":
        print("[evaluate] note: the config asks for GPUs (scaling.use_gpu) but this process sees none: evaluating on "
              "this machine's CPU (a large model takes hours; on a cluster, `ray job submit --entrypoint-num-gpus 1 "
              "-- python pipelines/evaluate.py ...` runs it on a GPU node)", file=sys.stderr, flush=True)
    try:
        m = evaluate_multiview(model, clips, split, crop, num_clips=views[0], num_crops=views[1],
                               batch_size=a.batch_size, details=True, device=device,
                               keep_memory=cfg.optim.keep_freed_memory if uses_config(a) else True,
                               progress=lambda line: print(f"[evaluate] {line}", flush=True))
    except CorruptShardError as exc:  # (an OSError: a damaged shard, named)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ProtocolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. no labelled clips of that split
        print(f"error: {exc}", file=sys.stderr)
        return 2
    classes = info["classes"]
    result = {"model": a.model, "weights_fingerprint": spec["weights_fingerprint"], "clips": clips,
              "dataset_fingerprint": info["fingerprint"], "split": split, "views": f"{views[0]}x{views[1]}",
              "crop_size": crop, "device": device, "top1": m["top1"], "top5": m["top5"], "videos": m["videos"],
              "per_class": {classes[c]: v for c, v in m["per_class"].items()}, "confusion": m["confusion"],
              "classes": classes}
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1]["top1"])[:5]
    # the numbers first: a write that fails must not take an evaluation of hours with it
    print(f"[evaluate] {a.model} on split {split} of {clips}: top-1 {m['top1']:.2%}, top-5 {m['top5']:.2%} "
          f"({m['videos']} videos, {views[0]} clips x {views[1]} crops, crop {crop}, on {device})", flush=True)
    print("[evaluate] weakest classes: " + ", ".join(f"{k} {v['top1']:.0%}" for k, v in worst), flush=True)
    confusion = a.confusion or (os.path.splitext(a.json)[0] + ".confusion.png" if a.json else None)
    try:
        if a.json and storage.exists(a.json):  # (an earlier evaluation's numbers must not stay beside this one's PNG)
            storage.remove(a.json)
        if confusion:
            storage.makedirs(storage.dirname(confusion) or ".")
            plot_confusion(m["confusion"], classes, confusion,
                           f"{os.path.basename(a.model.rstrip('/'))} on {split} ({views[0]}x{views[1]} views)")
            result["confusion_png"] = confusion
        if a.json:
            storage.makedirs(storage.dirname(a.json) or ".")
            storage.write_json(a.json, result)
    except OSError as exc:
        print(f"error: writing the results failed: {exc}", file=sys.stderr)
        return 1
    if a.json:
        print(f"[evaluate] {a.json}" + (f", {confusion}" if confusion else ""))
    return 0
