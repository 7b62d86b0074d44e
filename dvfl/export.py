"""Exporting a trained model: ONNX, TorchScript / torch.export, and a self-describing model folder.

Every export is checked against the PyTorch model it came from on the inputs given (the golden
clip, real clips) before it is published: the max-abs difference of the logits must stay within
``tolerance`` (1e-4 in fp32), else the file is not written. The batch dimension is dynamic in all
formats; frames, channels and the spatial size are those the model was trained with.

The model folder holds ``model.safetensors`` (no pickle), ``config.json`` in timm's hub format
(``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds it offline, after
``import dvfl.models`` registers the architecture), ``model.json`` (our spec: class names, input
sizes, so ``pipelines/predict.py --model FOLDER`` works too) and a model card ``README.md``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from dvfl.artifacts import SPEC
from dvfl import storage
from dvfl.data.sampling import spread_clips
from dvfl.scratch import kind_prefix, make_scratch_dir, make_scratch_file
from dvfl.models.video_focalnet import FOLDER_WEIGHTS, set_temporal_impl

TOLERANCE = 1e-4
FORMATS = ("onnx", "torchscript", "export", "folder")


class ExportMismatch(RuntimeError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


@contextlib.contextmanager
def _quiet_tracing():
    # Tracing warns that the frame-count and padding checks become constants: they are, by design
    # (T, H, W are fixed per export; only the batch is dynamic), and the parity check proves it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.(trace|script|save|load).*is deprecated.*")
        yield


def example_input(spec: dict, batch: int = 2) -> torch.Tensor:
    kw = spec["kwargs"]
    size = kw.get("img_size", 224)
    return torch.randn(batch, kw.get("num_frames", 8), 3, size, size, generator=torch.Generator().manual_seed(0))


def _check(name: str, run, model: torch.nn.Module, inputs: list[torch.Tensor], tolerance: float) -> float:
    worst = 0.0
    with torch.inference_mode():
        for x in inputs:
            ref = model(x).float().numpy()
            got = np.asarray(run(x))
            if got.shape != ref.shape:
                raise ExportMismatch(f"{name}: output shape {got.shape} != PyTorch {ref.shape}")
            if not np.isfinite(got).all():  # (a NaN difference would vanish in max() below)
                raise ExportMismatch(f"{name}: the exported model's output is not finite (NaN or inf)")
            diff = float(np.abs(got - ref).max())
            if not diff <= tolerance:  # NaN included: the reference itself not finite
                raise ExportMismatch(f"{name}: max |exported - PyTorch| = {diff:.3g} > {tolerance:g}")
            worst = max(worst, diff)
    if not worst <= tolerance:
        raise ExportMismatch(f"{name}: max |exported - PyTorch| = {worst:.3g} > {tolerance:g}")
    return worst


def _publish_file(tmp: Path, out: Path) -> None:
    """The checked file ``tmp`` renamed to ``out``, on disk first (a crash never leaves a short
    model under its final name)."""
    from dvfl.storage import fsync_dir

    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    fsync_dir(str(out.parent))


def _write_through_memory(tmp: Path, save) -> None:
    """``save(file)`` into memory, then the bytes to ``tmp``: torch's zip writer, given a path,
    aborted the process on a full disk (a C++ exception in a destructor), leaving ``tmp`` behind."""
    buffer = io.BytesIO()
    save(buffer)
    with open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def _trace_example(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The first input with a batch of at least 2: tracing on a batch of 1 lets torch.export (and
    possibly a tracer) specialise the batch to the constant 1, which a dynamic batch must not be."""
    x = inputs[0]
    return x if x.shape[0] >= 2 else x.expand(2, *x.shape[1:]).contiguous()


def _umask() -> int:
    """The process's umask, read without setting it (a set-and-restore would leave every other
    thread's files of that moment world-writable) where the kernel says it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # (elsewhere: the strictest mask for the instant it is read)
    os.umask(mask)
    return mask


def _tmp_path(out: Path, ending: str = "") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    # named with this process's PID: the next export into this folder removes one a SIGKILL left;
    # ``ending``: what a reader wants the name to end with (torch.export warns on every other name)
    tmp = make_scratch_file("export", suffix=f"-{out.name}.tmp{ending}", tmpdir=str(out.parent))
    # mkstemp's 0600 would follow the file through the rename: the mode a plain write gets (the umask's)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def export_onnx(model, out: str | os.PathLike, inputs: list[torch.Tensor], tolerance: float = TOLERANCE,
                opset: int = 17, temporal_impl: str = "conv2d") -> dict:
    """ONNX (one file, dynamic batch), checked with ONNX Runtime on ``inputs`` against ``model``
    as given.

    The graph is traced from a copy whose temporal path runs as ``(k, 1)`` Conv2d over
    ``(B, C, T, H*W)`` (``temporal_impl="conv2d"``, see ``set_temporal_impl``: same weights, same outputs): ONNX
    Runtime runs one large convolution per level in its blocked NCHWc layout instead of one tiny
    GEMM per spatial location (0.70x the Conv1d graph's latency at 8x224², benchmarks/results/deploy.json)."""
    import onnx
    import onnxruntime as ort

    out, model = Path(out), model.eval()
    traced = copy.deepcopy(model)
    set_temporal_impl(traced, temporal_impl)
    tmp = _tmp_path(out)
    try:
        with _quiet_tracing(), torch.inference_mode():
            # the TorchScript-based exporter: the dynamo one needs onnxscript, which nothing else uses
            torch.onnx.export(traced, (_trace_example(inputs),), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["video"], output_names=["logits"],
                              dynamic_axes={"video": {0: "batch"}, "logits": {0: "batch"}})
        onnx.checker.check_model(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff = _check("onnx", lambda x: session.run(None, {"video": x.numpy()})[0], model, inputs, tolerance)
        _publish_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"format": "onnx", "path": str(out), "max_abs_diff": diff, "opset": opset, "checked_inputs": len(inputs),
            "temporal_impl": temporal_impl}


class _InputShapeChecked(torch.nn.Module):
    """A traced model behind a check of its input's shape past the batch: a trace computes on
    frames of another size without a word (ONNX and torch.export refuse them)."""

    def __init__(self, model, shape: list[int]):
        super().__init__()
        self.model = model
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size()[1:] != self.shape:
            raise RuntimeError("input must be (batch, " + ", ".join([str(d) for d in self.shape])
                               + "), the shape this model was exported for; got " + str(x.size()))
        return self.model(x)


def export_torchscript(model, out: str | os.PathLike, inputs: list[torch.Tensor],
                       tolerance: float = TOLERANCE) -> dict:
    """TorchScript (``torch.jit.trace``, loadable from C++ LibTorch), checked after a reload; it
    refuses an input of another shape than ``inputs``' (past the batch)."""
    out, model = Path(out), model.eval()
    tmp = _tmp_path(out)
    try:
        with _quiet_tracing(), torch.inference_mode():
            example = _trace_example(inputs)
            traced = torch.jit.trace(model, (example,), check_trace=False)
            traced = torch.jit.script(_InputShapeChecked(traced, list(example.shape[1:])))
        with _quiet_tracing():
            _write_through_memory(tmp, lambda f: torch.jit.save(traced, f))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        diff = _check("torchscript", lambda x: loaded(x).float().numpy(), model, inputs, tolerance)
        _publish_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"format": "torchscript", "path": str(out), "max_abs_diff": diff, "checked_inputs": len(inputs)}


def export_program(model, out: str | os.PathLike, inputs: list[torch.Tensor], tolerance: float = TOLERANCE) -> dict:
    """``torch.export`` ExportedProgram (.pt2) with a dynamic batch, checked after a reload on
    ``inputs`` themselves (a batch of 1 included, e.g. single ``--clips`` clips)."""
    out, model = Path(out), model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (_trace_example(inputs),), dynamic_shapes=({0: batch},))
    tmp = _tmp_path(out, ending=".pt2")
    try:
        _write_through_memory(tmp, lambda f: torch.export.save(program, f))
        loaded = torch.export.load(str(tmp)).module()
        diff = _check("torch.export", lambda x: loaded(x).float().detach().numpy(), model, inputs, tolerance)
        _publish_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"format": "export", "path": str(out), "max_abs_diff": diff, "checked_inputs": len(inputs)}


# ----------------------------------------------------------------------------- model folder
def _crop_pct(crop: int, short_side: int) -> float:
    """crop / short side as timm reads it back (resize to floor(crop / crop_pct)): rounded, or
    by float division alone, 224/300 came back as 299."""
    pct = crop / short_side
    while math.floor(crop / pct) < short_side:
        pct = math.nextafter(pct, 0)
    return pct


def timm_config(spec: dict) -> dict:
    """timm's hub ``config.json``: architecture, constructor arguments, label names."""
    kw = dict(spec["kwargs"])
    size = kw.get("img_size", 224)
    short_side = (spec.get("inputs") or {}).get("short_side")
    # how training and evaluation fed it: short side resized (PIL bilinear), then a centred crop
    view = {"crop_pct": _crop_pct(size, short_side), "interpolation": "bilinear", "crop_mode": "center"} \
        if short_side else {}
    return {"architecture": spec["name"], "num_classes": kw["num_classes"], "model_args": kw,
            "pretrained_cfg": {"input_size": [3, size, size], "num_frames": kw.get("num_frames", 8),
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], **view,
                               "fixed_input_size": True, "label_names": spec.get("classes"),
                               "license": "apache-2.0"}}


def resize_words(inputs: dict) -> str:
    """How a frame becomes the model's input, in words (``short_side`` 0: stored at source size)."""
    crop = inputs.get("crop_size", "?")
    if inputs.get("short_side") == 0:
        return (f"no resize: a {crop}² crop of the frames at their source size (timm's data config cannot "
                "say this: its transform resizes; use predict.py or this description)")
    return f"video resized to short side {inputs.get('short_side', '?')}, then a {crop}² crop"


def views_words(inputs: dict) -> str:
    """The views the run's top-1 scored a video from (predict's default), in words."""
    from dvfl.inference import recorded_views

    views = recorded_views(inputs)
    if views is None:
        return "not recorded (predict takes 1x1: the one crop above)"
    clips, crops = views
    how = ("the one crop above" if crops == 1 else
           f"each frame resized (bilinear) so its short side is the crop size {inputs.get('crop_size', '?')}, then "
           "crops at the start, centre and end of the long side")
    return (f"{clips}x{crops}: {clips} uniform clip(s) x {crops} crop(s), {how}; softmax averaged over them "
            "(the run's evaluation)")


def frame_sampling(inputs: dict, frames) -> str:
    """Which frames a one-clip view takes (what predict feeds the model), in words."""
    stored = int(inputs.get("eval_clips") or 1)
    (k,) = spread_clips(1, stored)
    where = "the centre" if 2 * k + 1 == stored else f"{(k + 0.5) / stored:.3g} of the way"
    return (f"{frames} frames, one from each of {frames} equal segments of the video, at {where} of each segment"
            + (f" (clip {k} of the {stored} evaluation clips stored per video)" if stored > 1 else ""))


def input_contract(spec: dict) -> dict:
    """What an exported file expects and returns (a sidecar next to it: ONNX, TorchScript and .pt2
    files carry no class names, sizes or preprocessing)."""
    kw, inputs = spec["kwargs"], spec.get("inputs") or {}
    frames, size = inputs.get("frames", kw.get("num_frames", 8)), kw.get("img_size", 224)
    return {"name": spec["name"], "classes": spec.get("classes"),
            "input": {"shape": ["batch", frames, 3, size, size], "dtype": "float32", "channels": "RGB",
                      "scale": "[0, 1], then (x - mean) / std", "mean": [0.485, 0.456, 0.406],
                      "std": [0.229, 0.224, 0.225]},
            "preprocessing": {"short_side": inputs.get("short_side"), "crop_size": inputs.get("crop_size", size),
                              "resize": ("none: a centre crop of crop_size from the frames at their source size"
                                         if inputs.get("short_side") == 0 else
                                         "short side to short_side, then a centre crop of crop_size"),
                              "frames": frame_sampling(inputs, frames),
                              # what the run's reported top-1 scored a video from (predict's default)
                              "views": views_words(inputs)},
            "output": f"logits (batch, {kw['num_classes']}), in the order of classes"}


def write_contract(out: str | os.PathLike, spec: dict) -> str:
    """``<out>.json``: :func:`input_contract`, written whole."""
    path = f"{os.fspath(out)}.json"
    storage.write_json(path, input_contract(spec))
    return path


def model_card(spec: dict, dataset: dict | None = None) -> str:
    """README.md of an exported folder: what the model is, what it was trained and checked on."""
    kw, inputs, ident = spec["kwargs"], spec.get("inputs") or {}, spec.get("identity") or {}
    classes = spec.get("classes") or []
    evals = {k: v for k, v in spec.items() if k.startswith("eval_") and isinstance(v, dict)}
    lines = [f"# {spec['name']} ({spec.get('role', 'model')}), exported by dvfl", "",
             "A Video-FocalNet action-recognition model trained with the DVFL-Net on Ray pipeline.", "",
             "## Load it", "", "```python",
             "import dvfl.models, timm  # the import registers the videofocalnet_* architectures",
             "model = timm.create_model('local-dir:THIS_FOLDER', pretrained=True).eval()",
             "```", "", "or `python pipelines/predict.py --model THIS_FOLDER video.mp4`.", "",
             "## Inputs", "",
             f"- float32 `(batch, {kw.get('num_frames', 8)}, 3, {kw.get('img_size', 224)}, {kw.get('img_size', 224)})`, "
             "RGB in [0, 1] normalised with the ImageNet mean/std",
             f"- frames: {frame_sampling(inputs, inputs.get('frames', kw.get('num_frames')))}; "
             f"{resize_words(inputs)}; views: {views_words(inputs)}",
             f"- output: logits over {kw['num_classes']} classes: {', '.join(classes) if classes else '(not recorded)'}",
             "", "## Training", "",
             f"- role: {spec.get('role', '?')}, seed {spec.get('seed', '?')}, trained on split "
             f"`{ident.get('split', '?')}` of the dataset with fingerprint `{spec.get('dataset_fingerprint', '?')}`"]
    if dataset:
        counts = ", ".join(f"{s}: {c['videos']} videos" for s, c in dataset.get("counts", {}).items())
        lines.append(f"- dataset: {dataset.get('dataset')} ({dataset.get('source', '')}); {counts}")
    if ident.get("kd"):
        lines.append(f"- knowledge distillation from teacher `{ident.get('teacher')}` (weights fingerprint), "
                     f"alpha {ident['kd'].get('alpha')}, temperature {ident['kd'].get('temperature')}")
    elif spec.get("role"):
        lines.append("- no teacher (trained on labels only)")
    if ident.get("label_fraction"):
        lines.append(f"- labelled fraction: {ident['label_fraction']}")
    if ident.get("teacher_pool"):
        lines.append(f"- teacher pool (held out from the student): {ident['teacher_pool']}")
    lines += ["", "## Metrics", ""]
    if spec.get("val_top1") is not None:
        lines.append(f"- validation top-1 at the end of training (stored views): {spec['val_top1']:.1%}")
    for key, m in evals.items():
        lines.append(f"- `{key}`: top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%} ({m['clips']}x{m['crops']} views, "
                     f"{m['videos']} videos)")
    if not (evals or spec.get("val_top1") is not None):
        lines.append("- (none recorded)")
    lines += ["", f"Weights fingerprint: `{spec.get('weights_fingerprint')}`.", ""]
    return "\n".join(lines)


FOLDER_FILES = (FOLDER_WEIGHTS, "config.json", SPEC, "README.md")


def replaceable_folder(path: str | os.PathLike) -> bool:
    """``path`` may be replaced by an exported model folder: it does not exist, is an empty folder,
    or holds an earlier export's files and nothing else (never a folder that merely has a config.json)."""
    path = Path(path)
    if not path.exists():
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    names = {n for n in os.listdir(path) if not n.startswith(kind_prefix("export"))}  # a killed export's, in a mount
    if "lost+found" in names and is_mount_point(path):  # a freshly formatted volume's own folder
        names.discard("lost+found")
    return not names or ({FOLDER_WEIGHTS, SPEC} <= names and names <= set(FOLDER_FILES))


def is_mount_point(path: str | os.PathLike) -> bool:
    """``path`` is where a filesystem is mounted, a bind mount included (``os.path.ismount`` compares
    devices, so it misses a bind mount of the same filesystem; Linux lists every one in mountinfo)."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo") as f:  # field 5: the mount point, spaces as \040
            points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                      for line in f if len(line.split()) > 4}
    except OSError:  # not Linux
        return False
    return os.path.realpath(path) in points


def _publish_into(tmp: Path, out: Path) -> None:
    """``out`` is a mount point (a container's bind-mounted volume), which cannot be renamed or
    replaced: the finished files move into it one by one from ``tmp`` (inside it, on its own
    filesystem), the spec last, so that a folder with a new spec holds the new weights."""
    names = sorted(os.listdir(tmp), key=lambda n: n == SPEC)
    for name in names:
        os.replace(tmp / name, out / name)
    for stale in set(FOLDER_FILES) - set(names):
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / stale)
    storage.fsync_dir(str(out))


def _publish_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``. An earlier ``out`` is first renamed aside (a
    directory cannot be renamed over a non-empty one), removed only once the new one is in place,
    and put back if that rename fails: ``out`` is never deleted before its replacement is there."""
    old = Path(storage.local_tmp_name(str(out))) if out.exists() else None
    if old is not None:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    finally:
        storage.fsync_dir(str(out.parent))  # make the renames durable before the old copy goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_folder(model, spec: dict, out: str | os.PathLike, dataset: dict | None = None, inputs=None,
                  tolerance: float = 0.0) -> dict:
    """A model folder (safetensors + timm config + our spec + model card), written to a temp
    folder and renamed into place; reloaded through ``timm.create_model`` and compared on
    ``inputs`` (default: one example clip), as the other formats are. An existing ``out`` is
    replaced only if it is an earlier export (:func:`replaceable_folder`)."""
    from dvfl.locks import folder_lock

    out = Path(out)
    # two exports (or a teacher's --publish) into one folder renamed each other's folders away: errors,
    # and full copies of the model left hidden beside it
    with folder_lock(str(out), "export", wait=True):
        return _export_folder(model, spec, out, dataset, inputs, tolerance)


def _export_folder(model, spec: dict, out: Path, dataset: dict | None, inputs, tolerance: float) -> dict:
    import timm
    from safetensors.torch import save

    if not replaceable_folder(out):
        raise ValueError(f"{out} exists and is not an exported model folder; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    mounted = out.is_dir() and is_mount_point(out)  # renaming a mount point fails (EBUSY), into one too (EXDEV)
    tmp = Path(make_scratch_dir("export", out.name, tmpdir=str(out if mounted else out.parent)))  # (see _tmp_path)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # through storage, as the other files: each one is fsynced before the folder is published
        # (serialised in memory: safetensors' own file errors are not OSErrors, a full disk was a traceback)
        storage.write_bytes(tmp / FOLDER_WEIGHTS, save(state, metadata={"format": "pt"}))
        storage.write_json(tmp / "config.json", timm_config(spec))
        keep = {k: v for k, v in spec.items() if k != "history"}
        storage.write_json(tmp / SPEC, keep)
        storage.write_text(tmp / "README.md", model_card(spec, dataset))
        loaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        diff = _check("folder", lambda x: loaded(x).float().numpy(), model.eval(), inputs or [example_input(spec, 1)],
                      tolerance)
        # mkdtemp and safetensors create owner-only files: a shipped folder gets the modes the umask gives
        mask = _umask()
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        storage.fsync_dir(str(tmp))
        (_publish_into if mounted else _publish_folder)(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": "folder", "path": str(out), "max_abs_diff": diff,
            "files": sorted(p.name for p in out.iterdir() if not p.name.startswith(kind_prefix("export")))}


class GoldenFileError(Exception):
    """A --golden file that cannot be read as a golden clip (missing, not a dict with "input", unsafe)."""


def golden_inputs(path: str, spec: dict) -> list[torch.Tensor]:
    """The reference golden clip when its shape fits the model (the golden tiny model itself);
    ``ValueError`` when it does not fit, :class:`GoldenFileError` when it cannot be read."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)["input"].float()
    except Exception as exc:  # whatever the reason, the file is not a golden clip
        raise GoldenFileError(f"{path}: not a readable golden clip ({type(exc).__name__}: {exc})") from None
    kw = spec["kwargs"]
    if tuple(x.shape[1:]) != (kw.get("num_frames", 8), 3, kw.get("img_size", 224), kw.get("img_size", 224)):
        raise ValueError(f"golden clip {tuple(x.shape)} does not fit the model's input")
    return [x]


__all__ = ["export_onnx", "export_torchscript", "export_program", "export_folder", "replaceable_folder",
           "timm_config", "model_card", "input_contract", "write_contract", "ExportMismatch", "GoldenFileError", "TOLERANCE", "FORMATS"]
