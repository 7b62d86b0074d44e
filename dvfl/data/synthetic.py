"""The synthetic action dataset the project generates itself (the embedded default is one of its configs).

Every video shows one asymmetric object moving in a straight line on a textured or plain,
noisy background (optionally with static distractors). The class is the *direction of motion*
(8 directions by default: right, up-right, up, ...). Colours, object shape and
orientation, size, speed, background and distractors are random and independent of the
class; the object's position is not (it stays inside the frame, and with ``motion="stop"``
rests against the wall it moved towards for several frames: the most repeated position is the
end, so with ``stop`` the frames give the class even with their order ignored; docs/ingest.md
has the measured figures).

* Real encoded files: H.264 in MP4 through PyAV (libx264, ``threads=1`` so the
  encoder is deterministic), in the UCF101 layout with official-format split files
  (``ucfTrainTestlist/classInd.txt``, ``trainlist01.txt``, ``testlist01.txt``);
  file names ``<Class>/v_<Class>_gGG_cCC.mp4``, test groups g01-g07 as in UCF101.
* Deterministic: every video is drawn from a generator seeded by
  ``(seed, split, class, index)``; the same config gives byte-identical files.
* ``motion="bounded"`` (default): the object stays inside the frame. Its start is drawn so
  that the whole path fits; a path longer than the room starts at the wall it moves away
  from and the object stops at the opposite wall. A frame at a random time then says little
  about the class (where the object rests: ~25-29 % top-1 from one frame's position on 8 classes,
  chance 12.5 %), and the *set* of frames (order ignored) gives at most the axis of motion,
  never its sense: a reversed "MoveLeft" video is a valid "MoveRight" video. Only the order
  of the frames tells the class. ``motion="stop"`` (the embedded default's): the object starts
  inside the frame, moves in the video's direction and stops at the first wall it reaches, so
  every step of motion has the video's direction (in ``bounded`` it waits at a start wall or
  slides along one, which turns the apparent direction). ``motion="wrap"`` (toroidal: leaves one edge, re-enters at
  the opposite one) is kept for comparison: the from-scratch teacher memorises appearance
  instead of learning it (docs/embedded-default.md).
* ``unlabeled_videos=N`` writes an extra pool ``unlabeled_pool/u_NNNNN.mp4`` (for distillation
  on unlabelled clips) drawn with a different seed stream (disjoint from the labelled videos). Its true
  classes go to ``unlabeled_pool_truth.csv`` for evaluation only; ingest never reads it.

What the default sizes give (clips, motion per sampled frame) and why: docs/ingest.md.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .sampling import stable_seed

GENERATOR_VERSION = 2  # 2: bounded motion by default
LIST_DIR = "ucfTrainTestlist"
VAL_LIST = "vallist01.txt"  # with val_per_class: the checked-label validation videos (not a UCF101 file)
UNLABELED_DIR = "unlabeled_pool"
INFO_FILE = "synthetic.json"
TRAIN_TRUTH = "train_truth.csv"  # the true class of each training video (with label_noise)
MOTIONS = ("bounded", "wrap", "stop")
BACKGROUNDS = ("textured", "plain")

_NAMES_8 = ["MoveRight", "MoveUpRight", "MoveUp", "MoveUpLeft", "MoveLeft", "MoveDownLeft", "MoveDown",
            "MoveDownRight"]


@dataclass
class SyntheticConfig:
    num_classes: int = 8
    train_per_class: int = 160
    test_per_class: int = 40
    # Validation videos with checked labels (never wrong), a split 'val' of their own; 0: the
    # pipeline carves validation out of the (possibly mislabelled) training videos instead.
    val_per_class: int = 0
    unlabeled_videos: int = 0
    frames: int = 16            # frames per video
    size: int = 32              # frame height = width (even, for yuv420p)
    fps: int = 8
    speed: Tuple[float, float] = (1.2, 2.2)          # px per video frame
    object_size: Tuple[int, int] = (8, 12)
    # Static blobs per video; none by default: with them a from-scratch teacher memorised the
    # training videos instead of learning motion (docs/embedded-default.md).
    distractors: Tuple[int, int] = (0, 0)
    noise_std: float = 6.0
    angle_jitter_deg: float = 8.0
    crf: int = 20
    motion: str = "bounded"     # "bounded" | "wrap" | "stop" (see the module docstring)
    # "plain": one colour, so the moving object is all that changes; "textured": a coarse colour
    # field with fine static texture (harder: a from-scratch model finds the motion much later)
    background: str = "textured"
    # Share of the training videos filed under a wrong class (uniformly another), as annotators'
    # labels of one's own videos are: the video still shows its own class's motion. Test videos
    # are always filed right; the true classes go to train_truth.csv, which ingest never reads.
    label_noise: float = 0.0
    # Least brightness (luma, 0-255) between the object's colour and the background's mean: yuv420p
    # keeps colour at half resolution, so at 32 px an object that differs mostly in hue reaches the
    # model as a smear (it delays when a student finds the motion: docs/embedded-default.md).
    luma_contrast: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if not 2 <= self.num_classes <= 36:
            raise ValueError(f"num_classes must be in 2..36, got {self.num_classes}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be an even number >= 16, got {self.size}")
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        if not 0 <= self.angle_jitter_deg <= 180.0 / self.num_classes:
            raise ValueError(f"angle_jitter_deg must be in [0, 180/num_classes], got {self.angle_jitter_deg}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if not 0 < self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed must be (min, max) with 0 < min <= max, got {self.speed}")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")
        if self.size - self.object_size[1] < 4:
            raise ValueError(f"size {self.size} leaves no room to move an object of {self.object_size[1]} px")
        for k in ("train_per_class", "test_per_class", "val_per_class", "unlabeled_videos"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if not 0 <= self.luma_contrast <= 127:
            raise ValueError(f"luma_contrast must be in [0, 127], got {self.luma_contrast}")

    def as_dict(self) -> Dict:
        d = asdict(self)
        d["speed"] = list(self.speed)
        d["object_size"] = list(self.object_size)
        d["distractors"] = list(self.distractors)
        for k in ("label_noise", "luma_contrast", "val_per_class"):  # datasets generated before the option keep their identity
            if not d[k]:
                del d[k]
        return d


def class_names(num_classes: int) -> List[str]:
    if num_classes == 8:
        return list(_NAMES_8)
    if num_classes == 4:
        return [_NAMES_8[i] for i in (0, 2, 4, 6)]
    return [f"MoveAngle{int(round(360.0 * k / num_classes)):03d}" for k in range(num_classes)]


# ---------------------------------------------------------------------------------------
# rendering

def _shape_mask(rng: np.random.Generator, s: int) -> np.ndarray:
    """A random asymmetric shape (no rotational/mirror symmetry) in an s x s box."""
    m = np.zeros((s, s), bool)
    kind = rng.integers(0, 4)
    t = max(2, s // 3)
    if kind == 0:      # L
        m[:, :t] = True
        m[-t:, :] = True
    elif kind == 1:    # right triangle with a notch
        m = np.tri(s, s, dtype=bool)
        m[: s // 3, : t // 2 + 1] = False
    elif kind == 2:    # P / flag
        m[:, :t] = True
        m[: s // 2, :] = True
        m[t: s // 2 - 1, t: s - t] = False if s // 2 - 1 > t else m[t: s // 2 - 1, t: s - t]
    else:              # F-like comb
        m[:, :t] = True
        m[:t, :] = True
        m[s // 2 - t // 2: s // 2 + (t + 1) // 2, : (2 * s) // 3] = True
    m = np.rot90(m, int(rng.integers(0, 4)))
    if rng.integers(0, 2):
        m = m[:, ::-1]
    return np.ascontiguousarray(m)


def _background(rng: np.random.Generator, size: int, kind: str = "textured") -> np.ndarray:
    from PIL import Image

    base = rng.uniform(40, 215, size=3)
    if kind == "plain":
        return np.broadcast_to(base.astype(np.float32), (size, size, 3)).copy()
    coarse = np.clip(base + rng.uniform(-45, 45, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    bg = bg + rng.uniform(-12, 12, size=(size, size, 1)).astype(np.float32)  # fine static texture
    return bg


_LUMA = np.array([0.299, 0.587, 0.114])  # BT.601, as the encoder's yuv420p


def _contrasting_colour(rng: np.random.Generator, ref: np.ndarray, luma_contrast: float = 0.0) -> np.ndarray:
    for _ in range(200 if luma_contrast else 50):
        c = rng.uniform(0, 255, size=3)
        if np.abs(c - ref).sum() > 160 and abs(float(_LUMA @ (c - ref))) >= luma_contrast:
            return c
    if luma_contrast:  # black or white, whichever is further from the background
        return np.full(3, 0.0 if float(_LUMA @ ref) > 127.5 else 255.0)
    return 255.0 - ref


def render_video(cfg: SyntheticConfig, class_index: int, rng: np.random.Generator, return_track: bool = False):
    """uint8 frames (F, size, size, 3) of one video of class ``class_index``.

    With ``return_track=True`` also returns ``{"positions": (F, 2) int (y, x) of the
    object's top-left corner as drawn (before wrapping), "velocity": (dy, dx), "colour",
    "mask"}`` (used by the tests)."""
    S, F = cfg.size, cfg.frames
    bg = _background(rng, S, cfg.background)
    yy, xx = np.mgrid[0:S, 0:S]
    for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
        c = rng.uniform(0, 255, size=3)
        r = rng.uniform(1.5, 3.5)
        cy, cx = rng.uniform(0, S, size=2)
        if rng.integers(0, 2):
            sel = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
        else:
            sel = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * rng.uniform(0.5, 1.5))
        bg[sel] = c
    s = int(rng.integers(cfg.object_size[0], cfg.object_size[1] + 1))
    mask = _shape_mask(rng, s)
    my, mx = np.nonzero(mask)
    colour = _contrasting_colour(rng, bg.mean(axis=(0, 1)), cfg.luma_contrast)
    angle = 2 * math.pi * class_index / cfg.num_classes + math.radians(rng.uniform(-1, 1) * cfg.angle_jitter_deg)
    speed = rng.uniform(cfg.speed[0], cfg.speed[1])
    d = np.array([-math.sin(angle), math.cos(angle)]) * speed      # (dy, dx); image y points down
    if cfg.motion == "wrap":
        p0 = rng.uniform(0, S, size=2)
        pos = np.stack([np.rint(p0 + t * d) for t in range(F)]).astype(int)
    else:
        room = S - s
        path = d * (F - 1)
        lo, hi = np.maximum(0.0, -path), np.minimum(room, room - path)
        p0 = rng.uniform(lo, np.maximum(lo, hi))  # hi < lo: path longer than the room
        if cfg.motion == "stop":
            # along the class direction from inside the room until the first wall, then still:
            # every step of motion a clip sees has the video's direction (a start clipped at the
            # wall or sliding along one would turn it)
            p0 = np.clip(p0, 0, room)
            with np.errstate(divide="ignore", invalid="ignore"):
                to_wall = np.where(d > 0, (room - p0) / d, np.where(d < 0, -p0 / d, np.inf))
            stop = min(float(F - 1), float(to_wall.min()))
            pos = np.clip(np.rint(np.stack([p0 + min(t, stop) * d for t in range(F)])), 0, room).astype(int)
        else:
            pos = np.clip(np.rint(np.stack([p0 + t * d for t in range(F)])), 0, room).astype(int)
    noise = rng.normal(0.0, cfg.noise_std, size=(F, S, S, 3)).astype(np.float32)
    out = np.empty((F, S, S, 3), np.uint8)
    for t in range(F):
        fr = bg.copy()
        py, px = pos[t]
        fr[(my + py) % S, (mx + px) % S] = colour
        out[t] = np.clip(fr + noise[t], 0, 255).astype(np.uint8)
    if return_track:
        return out, {"positions": pos, "velocity": d, "colour": colour, "mask": mask}
    return out


def _x264_cpu_option() -> Dict[str, str]:
    """Cap x264's SIMD at AVX2 on CPUs with AVX-512: its AVX-512 code encodes the same frames to
    different bytes now and then (measured in docs/ingest.md). Only passed where the CPU has AVX2
    (x264 trusts the list it is given, so naming a missing extension would crash the encoder)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return {}
    return {"x264-params": "asm=AVX2"} if "avx512f" in flags and "avx2" in flags else {}


_X264_CPU_OPTION = _x264_cpu_option()


def encode_mp4(frames: np.ndarray, path: str, fps: int, crf: int = 20) -> None:
    """Write frames as H.264/MP4 (libx264, yuv420p, one thread: deterministic bytes), atomically."""
    import av

    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with av.open(tmp, "w", format="mp4") as c:
            st = c.add_stream("libx264", rate=fps)
            st.width, st.height = frames.shape[2], frames.shape[1]
            st.pix_fmt = "yuv420p"
            st.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", **_X264_CPU_OPTION}
            st.codec_context.thread_count = 1
            for f in frames:
                # yuv420p here: the encoder's own conversion is not deterministic (docs/ingest.md)
                frame = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                for pkt in st.encode(frame):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------
# dataset layout

@dataclass
class _Job:
    rel: str
    class_index: int
    seed: int


def _plan(cfg: SyntheticConfig) -> Tuple[List[_Job], List[str], List[str], List[str], List[Tuple[str, int]],
                                        List[Tuple[str, int]]]:
    names = class_names(cfg.num_classes)
    jobs: List[_Job] = []
    train_lines, val_lines, test_lines, train_truth = [], [], [], []
    filed_count = [0] * cfg.num_classes
    for c, name in enumerate(names):
        for j in range(cfg.train_per_class):
            filed = c
            if cfg.label_noise:
                noise = np.random.default_rng(stable_seed("dvfl-synth", cfg.seed, "label-noise", c, j))
                if noise.random() < cfg.label_noise:
                    filed = (c + int(noise.integers(1, cfg.num_classes))) % cfg.num_classes
            k, filed_count[filed] = filed_count[filed], filed_count[filed] + 1
            fname = names[filed]
            rel = f"{fname}/v_{fname}_g{8 + k % 18:02d}_c{k // 18 + 1:02d}.mp4"
            jobs.append(_Job(rel, c, stable_seed("dvfl-synth", cfg.seed, "train", c, j)))
            train_lines.append(f"{rel} {filed + 1}")
            train_truth.append((rel, c))
        for j in range(cfg.test_per_class):
            rel = f"{name}/v_{name}_g{1 + j % 7:02d}_c{j // 7 + 1:02d}.mp4"
            jobs.append(_Job(rel, c, stable_seed("dvfl-synth", cfg.seed, "test", c, j)))
            test_lines.append(rel)
        for j in range(cfg.val_per_class):  # groups g26.. : no file name shared with train (g08-g25) or test (g01-g07)
            rel = f"{name}/v_{name}_g{26 + j % 7:02d}_c{j // 7 + 1:02d}.mp4"
            jobs.append(_Job(rel, c, stable_seed("dvfl-synth", cfg.seed, "val", c, j)))
            val_lines.append(rel)
    truth = []
    for j in range(cfg.unlabeled_videos):
        s = stable_seed("dvfl-synth", cfg.seed, "unlabeled", j)
        c = int(np.random.default_rng(s).integers(0, cfg.num_classes))
        rel = f"{UNLABELED_DIR}/u_{j:05d}.mp4"
        jobs.append(_Job(rel, c, s))
        truth.append((rel, c))
    return jobs, train_lines, val_lines, test_lines, truth, train_truth


def _make_one(args: Tuple[Dict, str, _Job]) -> int:
    cfg_d, root, job = args
    cfg = SyntheticConfig(**cfg_d)
    frames = render_video(cfg, job.class_index, np.random.default_rng(job.seed))
    path = os.path.join(root, job.rel)
    encode_mp4(frames, path, cfg.fps, cfg.crf)
    return os.path.getsize(path)


class VideoFolderError(ValueError):
    """The videos folder holds something ``generate`` must not delete or reuse."""


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _deleting_prefix(root: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(root)), f".{os.path.basename(os.path.abspath(root))}.deleting-")


def _delete_dataset(root: str) -> None:
    """Move the old dataset aside in one rename, then delete it: a delete cut short (Ctrl+C, SIGKILL)
    left a folder without its synthetic.json that every later run refused to touch."""
    if os.path.islink(root):
        raise VideoFolderError(f"{root} is a link to {os.path.realpath(root)}, holding a dataset of another "
                               "configuration: delete it there yourself, or use another folder")
    aside = f"{_deleting_prefix(root)}{os.getpid()}-{time.time_ns()}"
    try:
        os.replace(root, aside)
    except OSError:  # a mount point, or a parent folder this user may not write: delete in place
        aside = root
    shutil.rmtree(aside)


def _sweep_deleted(root: str) -> None:
    """Finish the deletes of old datasets that an earlier run moved aside and did not get to remove."""
    import glob

    for aside in glob.glob(glob.escape(_deleting_prefix(root)) + "*"):
        shutil.rmtree(aside, ignore_errors=True)


def generate(root: str, cfg: Optional[SyntheticConfig] = None, workers: Optional[int] = None,
             overwrite: bool = False, log: Optional[Callable[[str], None]] = print) -> Dict:
    """Write the synthetic dataset under ``root`` (the UCF101-style video root).

    Idempotent: files that already exist (written atomically by an earlier run with the
    same config) are kept. A different config in an existing folder is refused unless
    ``overwrite`` (which deletes the folder, only if it holds a generated dataset).
    Returns a dict with counts, bytes and seconds.
    """
    cfg = cfg or SyntheticConfig()
    cfg.validate()
    info_path = os.path.join(root, INFO_FILE)
    want = {"generator": "dvfl-synthetic", "version": GENERATOR_VERSION, "config": cfg.as_dict()}
    if os.path.exists(info_path):
        with open(info_path) as f:
            have = json.load(f)
        if have != want:
            if not overwrite:
                raise VideoFolderError(f"{root} holds a synthetic dataset with a different configuration; "
                                       f"use another folder or --fresh")
            _delete_dataset(root)
    elif os.path.isdir(root) and [n for n in os.listdir(root) if not n.startswith(f".{INFO_FILE}.")]:
        # (generating there replaced a real dataset's split lists, and the synthetic.json it left
        # then let --fresh delete the whole folder; hidden files: a killed first run's temporary)
        raise VideoFolderError(f"refusing to {'delete' if overwrite else 'generate into'} {root}: it holds files "
                               f"but no generated dataset ({INFO_FILE}); generate into an empty or new folder")
    _sweep_deleted(root)
    os.makedirs(root, exist_ok=True)
    from dvfl.host import usable_cpus
    from dvfl.storage import write_bytes as atomic_write

    def atomic_write_bytes(path: str, data: bytes) -> None:
        # a finished folder is left as it is (an ingest beside the clips' readers rewrote its lists)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read() == data:
                    return
        atomic_write(path, data)

    atomic_write_bytes(info_path, (json.dumps(want, indent=2, sort_keys=True) + "\n").encode())
    jobs, train_lines, val_lines, test_lines, truth, train_truth = _plan(cfg)
    t0 = time.perf_counter()
    todo = [j for j in jobs if not os.path.exists(os.path.join(root, j.rel))]
    workers = workers if workers is not None else min(4, usable_cpus())
    cfg_d = cfg.as_dict()
    args = [(cfg_d, root, j) for j in todo]
    if log and todo:
        log(f"[synthetic] generating {len(todo)} of {len(jobs)} videos in {root} ({workers} processes)")
    if workers > 1 and len(todo) >= 64:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # forkserver: a child forked from a process where Ray runs can crash in Ray's finalizers
        # (seen: a segfault in the GC of an ObjectRefGenerator); an executor raises on a dead
        # worker (BrokenProcessPool) where multiprocessing.Pool waits for it forever
        # Ctrl+C reaches the whole process group: the parent stops the pool, the workers say nothing
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"), initializer=_ignore_sigint) as pool:
            try:
                for _ in pool.map(_make_one, args, chunksize=16):
                    pass
            except BaseException:  # Ctrl+C, SIGTERM: the chunks not started are dropped, not made after the command
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        for a in args:
            _make_one(a)
    names = class_names(cfg.num_classes)
    ldir = os.path.join(root, LIST_DIR)
    atomic_write_bytes(os.path.join(ldir, "classInd.txt"),
                       "".join(f"{i + 1} {n}\n" for i, n in enumerate(names)).encode())
    atomic_write_bytes(os.path.join(ldir, "trainlist01.txt"), "".join(l + "\n" for l in train_lines).encode())
    atomic_write_bytes(os.path.join(ldir, "testlist01.txt"), "".join(l + "\n" for l in test_lines).encode())
    if val_lines:  # read by the ucf101 adapter as split 'val' (its labels from the folder, as the test list's)
        atomic_write_bytes(os.path.join(ldir, VAL_LIST), "".join(l + "\n" for l in val_lines).encode())
    for rows, fname in ((truth, "unlabeled_pool_truth.csv"), (train_truth if cfg.label_noise else [], TRAIN_TRUTH)):
        if rows:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["path", "label", "class_name"])
            for rel, c in rows:
                w.writerow([rel, c, names[c]])
            atomic_write_bytes(os.path.join(root, fname), buf.getvalue().encode())
    secs = time.perf_counter() - t0
    total = sum(os.path.getsize(os.path.join(root, j.rel)) for j in jobs)
    return {"root": root, "videos": len(jobs), "generated": len(todo), "train": len(train_lines),
            "val": len(val_lines), "test": len(test_lines), "unlabeled": len(truth), "bytes": total, "seconds": secs,
            "unlabeled_dir": os.path.join(root, UNLABELED_DIR) if truth else None}
