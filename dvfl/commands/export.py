"""Export a trained model for deployment, checked against PyTorch before it is written.

    dvfl export --model DIR --format onnx|torchscript|export|folder --out PATH [--clips DIR]

``onnx``: one .onnx file with a dynamic batch dimension, checked with ONNX Runtime.
``torchscript``: a traced TorchScript file (LibTorch / ``torch.jit.load``). ``export``: a
``torch.export`` program (.pt2). ``folder``: safetensors weights + timm ``config.json`` + a model
card README, loadable offline with ``timm.create_model("local-dir:PATH", pretrained=True)``.

The check runs the exported model and PyTorch on the same inputs: real clips of ``--clips`` (the
ingest output's test split), the golden clip (``--golden``) when its shape fits the model, and a
fixed random clip; an export whose logits differ by more than ``--tolerance`` (default 1e-4) is
refused and nothing is written. A model directory whose model.json does not match its weights is
refused with the mismatching tensors named.

(``python pipelines/export.py`` takes the same arguments.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from dvfl.cli import absolute_path_args, local_outputs


def real_clips(clips_dir: str, spec: dict, n: int) -> list:
    """Up to ``n`` stored evaluation clips, centre-cropped and normalised as evaluation does."""
    import pyarrow.parquet as pq

    from dvfl.data.shards import shard_paths
    from dvfl.data.views import View, batch_arrays, make_clip_batch, normalize

    size = spec["kwargs"].get("img_size", 224)
    paths = shard_paths(clips_dir, ["test"]) + shard_paths(clips_dir, ["val"])
    if not paths:
        raise ValueError(f"--clips {clips_dir}: no test or val shards")
    arrays = []
    for path in paths:  # (a first shard may hold no clip: every video of it rejected at ingest)
        if len(arrays) >= n:
            break
        table = pq.read_table(path, columns=["clip_id", "label", "frames", "num_frames", "height", "width"])
        arrays += batch_arrays(table.slice(0, n - len(arrays)))[0]
    if n and not arrays:  # the check asked for real clips: never a pass on the random inputs alone
        raise ValueError(f"--clips {clips_dir}: its test and val shards hold no clips")
    return [normalize(make_clip_batch([a], size, [View()])) for a in arrays]


def clips_trained_on(dataset: dict, spec: dict) -> bool:
    """Whether ``--clips`` are the clips the model was trained on (then the model card names them);
    ValueError when their clips cannot feed the model (another frame count)."""
    frames, trained_on = spec["kwargs"].get("num_frames"), spec.get("dataset_fingerprint")
    if frames and dataset["params"]["frames"] != frames:
        raise ValueError(f"its clips have {dataset['params']['frames']} frames, the model takes {frames}")
    return not trained_on or dataset["fingerprint"] == trained_on


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (model.pt + model.json)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "export", "folder"])
    p.add_argument("--out", required=True, help="output file (onnx, torchscript, export) or folder")
    p.add_argument("--clips", help="ingest output whose test clips are used for the parity check "
                                   "(and whose dataset.json goes into the model card)")
    p.add_argument("--golden", default=None, help="a golden file {input, ...} (torch.save) checked too when it fits")
    p.add_argument("--check-clips", type=int, default=4, help="real clips for the parity check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max-abs logit difference allowed (fp32)")


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    local_outputs(p, a, "out")
    out_named_a_folder = a.out.endswith(("/", os.sep))  # (the absolute path below drops the slash)
    absolute_path_args(a, inputs=("model", "clips", "golden"), outputs=("out",))
    if not a.tolerance >= 0 or a.check_clips < 0:
        p.error("--tolerance must be >= 0 and --check-clips >= 0")
    if a.format == "onnx":  # optional: a plain `pip install -e .` met a ModuleNotFoundError after loading the model
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"error: --format onnx needs {' and '.join(missing)}: pip install -e '.[export]'", file=sys.stderr)
            return 2
    from dvfl import export as ex
    from dvfl import storage
    from dvfl.artifacts import load_model
    from dvfl.models.checkpoint import CheckpointError

    try:
        if storage.isfile(a.model):  # (load_model's advice for one, --arch, is other commands' flag)
            raise CheckpointError("a checkpoint file; export takes a model folder (model.pt + model.json: a run's "
                                  "student, or `dvfl teacher --publish DIR`'s)")
        model, spec = load_model(a.model)
    except (CheckpointError, ValueError, OSError, json.JSONDecodeError) as exc:
        print(f"error: --model {a.model}: {exc}", file=sys.stderr)
        return 2
    model.eval()
    if a.format == "folder" and not ex.replaceable_folder(a.out):
        print(f"error: --out {a.out} exists and is not an exported model folder; not overwriting it", file=sys.stderr)
        return 2
    if a.format != "folder" and (os.path.isdir(a.out) or out_named_a_folder):
        print(f"error: --out {a.out} is a folder; --format {a.format} writes one file: name it", file=sys.stderr)
        return 2

    written = [a.out] if a.format == "folder" else [a.out, f"{a.out}.json"]  # (the file and its contract)
    model_files = {"model.pt", "model.json", ex.FOLDER_WEIGHTS, "config.json", "README.md"}  # what load_model reads
    if any(storage.same_or_inside(a.model, w) or (os.path.realpath(os.path.dirname(w)) == os.path.realpath(a.model)
                                                  and os.path.basename(w) in model_files) for w in written):
        # --out MODEL/model.pt replaced the weights by the TorchScript file (exit 0): the model no longer loaded
        print(f"error: --out {a.out} would write into --model {a.model} (its weights or spec): export elsewhere",
              file=sys.stderr)
        return 2
    inputs, dataset = [], None
    if a.clips:
        from dvfl.data.shards import load_dataset_info

        try:
            dataset = load_dataset_info(a.clips)
            same_data = clips_trained_on(dataset, spec)
            inputs += real_clips(a.clips, spec, a.check_clips)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: --clips {a.clips}: {exc}", file=sys.stderr)
            return 2
        if not same_data:  # a model card must not name data the model never saw
            print(f"[export] note: the model was not trained on {a.clips}: its clips check the export, "
                  "the model card does not name them")
            dataset = None
    if a.golden:
        try:
            inputs += ex.golden_inputs(a.golden, spec)
        except ex.GoldenFileError as exc:
            print(f"error: --golden {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"[export] golden clip not used: {exc}")
    inputs += [ex.example_input(spec, 2), ex.example_input(spec, 1)]  # the dynamic batch, both ways
    from dvfl.locks import folder_lock

    with folder_lock(a.out, "export", wait=True):  # a second export to --out waits (a file and its contract: one export's)
        return _export(ex, a, model, spec, dataset, inputs)


def _export(ex, a: argparse.Namespace, model, spec: dict, dataset, inputs: list) -> int:
    from dvfl import storage

    try:
        if a.format == "onnx":
            info = ex.export_onnx(model, a.out, inputs, a.tolerance)
        elif a.format == "torchscript":
            info = ex.export_torchscript(model, a.out, inputs, a.tolerance)
        elif a.format == "export":
            info = ex.export_program(model, a.out, inputs, a.tolerance)
        else:
            info = ex.export_folder(model, spec, a.out, dataset, inputs, a.tolerance)
        if a.format != "folder":  # the file alone says nothing of class order, sizes or preprocessing
            try:
                info["contract"] = ex.write_contract(a.out, spec)
            except OSError as exc:
                # the new model beside an earlier export's contract would be read with that model's
                # classes and sizes: neither is left
                for stale in (a.out, f"{a.out}.json"):
                    with contextlib.suppress(OSError):
                        storage.remove(stale)
                print(f"error: writing {a.out}.json failed: {exc}; {a.out} removed (a model beside another "
                      "export's contract would be read with its classes and sizes)", file=sys.stderr)
                return 1
    except ex.ExportMismatch as exc:
        print(f"error: the export does not reproduce PyTorch: {exc}; nothing written", file=sys.stderr)
        return 1
    except OSError as exc:  # --out not writable, a full disk: one line (the temporary is removed)
        print(f"error: writing {a.out} failed: {exc}", file=sys.stderr)
        return 1
    print(f"[export] {info['format']} -> {info['path']}: max |exported - PyTorch| = {info['max_abs_diff']:.2e} "
          f"on {len(inputs)} input batch(es)")
    print(json.dumps(info))
    return 0
