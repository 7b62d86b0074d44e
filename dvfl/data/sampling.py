"""Frame sampling for clip views: pure functions, no Ray, no decoder.

Two kinds of views are stored per video (see ``docs/data-format.md``):

* ``"train"`` views: TSN-style segment sampling. The video's ``n`` frames are cut
  into ``T`` segments ``[floor(s*n/T), floor((s+1)*n/T))`` and one frame is drawn
  uniformly at random inside each segment. The randomness comes from a generator seeded by
  ``(seed, video_id, view_index)`` only, so a view is exactly reproducible and
  independent of worker scheduling, shard layout or which other videos exist.
* ``"uniform"`` views (evaluation): deterministic. For ``K`` evaluation clips, clip
  ``k`` takes the frame at relative position ``(k + 0.5) / K`` inside every segment
  (``K = 1`` gives the segment centres, the classic TSN test sampling).

Both work for videos shorter than ``T`` (frames are then repeated), but ingest
rejects videos with fewer than ``min_frames`` frames (default ``T``).

This module is also imported as a top-level module by the decode child process
(``dvfl/data/_decode_child.py``), so it must only import the standard library and numpy.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, List, Sequence, Tuple, Union

import numpy as np

SAMPLING_SCHEME = "tsn-segments-v1"
TRAIN_VIEW = "train"
UNIFORM_VIEW = "uniform"
#: splits whose videos get seeded random training views; every other split gets uniform views
TRAIN_LIKE_SPLITS = ("train", "unlabeled")

SeedLike = Union[int, np.random.Generator, None]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from arbitrary parts, stable across processes and Python versions, except for
    a text holding characters that only a newer Python's Unicode database knows (an emoji added in
    2022 or later): ``repr`` escapes them on Python 3.11 and not on 3.12+, so such a video's views,
    shard and ``--test-fraction`` draw differ between the two (changing the hash would change every
    video's, and with them every figure measured).

    (Python's ``hash()`` of strings is salted per process, so it must not be used.)
    """
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        b = repr(p).encode("utf-8")
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return int.from_bytes(h.digest(), "little") >> 1


def view_rng(seed: int, video_id: str, view_index: int) -> np.random.Generator:
    """The generator that draws training view ``view_index`` of ``video_id``."""
    return np.random.default_rng(stable_seed("dvfl-view", int(seed), str(video_id), int(view_index)))


def segment_bounds(num_frames: int, T: int) -> np.ndarray:
    """``T + 1`` integer segment boundaries ``floor(s * n / T)``: segment ``s`` is ``[b[s], b[s+1])``."""
    return (np.arange(T + 1, dtype=np.int64) * int(num_frames)) // int(T)


def _positions_to_indices(num_frames: int, T: int, offsets: np.ndarray) -> np.ndarray:
    """Frame at relative position ``offsets[s]`` (in [0, 1)) inside segment ``s``.

    With ``n >= T`` every segment holds at least one frame, so the indices are strictly
    increasing (no frame twice). With ``n < T`` segments are shorter than a frame and
    frames repeat (position ``(s + offset) * n / T``).
    """
    if num_frames >= T:
        b = segment_bounds(num_frames, T)
        idx = b[:-1] + np.floor(offsets * (b[1:] - b[:-1])).astype(np.int64)
    else:
        idx = np.floor((np.arange(T, dtype=np.float64) + offsets) * (num_frames / T)).astype(np.int64)
    return np.clip(idx, 0, num_frames - 1).astype(np.int32)


def tsn_train_indices(num_frames: int, T: int, rng: SeedLike) -> np.ndarray:
    """TSN segment sampling: one uniformly random frame inside each of ``T`` segments."""
    _check(num_frames, T)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    offsets = rng.random(T)
    return _positions_to_indices(num_frames, T, offsets)


def spread_clips(wanted: int, stored: int) -> set[int]:
    """Which of ``stored`` evenly spaced clips (clip k centred at (k + 0.5) / stored of every
    segment) stand for ``wanted`` evenly spaced ones: the one under each wanted centre (evaluation
    and predict with fewer clips than were stored). The first ``wanted`` would all lie early in
    the video (1 of 4: the clip at 1/8, not the middle)."""
    if wanted >= stored:
        return set(range(wanted))
    return {int((j + 0.5) * stored / wanted) for j in range(wanted)}


def uniform_clip_indices(num_frames: int, T: int, clip_index: int = 0, num_clips: int = 1) -> np.ndarray:
    """Deterministic evaluation clip ``clip_index`` of ``num_clips``: position ``(k+.5)/K`` per segment."""
    _check(num_frames, T)
    if not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index {clip_index} not in [0, {num_clips})")
    offsets = np.full(T, (clip_index + 0.5) / num_clips)
    return _positions_to_indices(num_frames, T, offsets)


def sample_clip_indices(num_frames_in_video: int, T: int, mode: str, rng_or_seed: SeedLike = None,
                        clip_index: int = 0, num_clips: int = 1) -> np.ndarray:
    """Frame indices (int32, length ``T``, non-decreasing) of one clip.

    ``mode="train"``: TSN random segment sampling from ``rng_or_seed``.
    ``mode="uniform"``: deterministic clip ``clip_index`` of ``num_clips``.
    """
    if mode == TRAIN_VIEW:
        return tsn_train_indices(num_frames_in_video, T, rng_or_seed)
    if mode == UNIFORM_VIEW:
        return uniform_clip_indices(num_frames_in_video, T, clip_index, num_clips)
    raise ValueError(f"unknown sampling mode {mode!r} (expected 'train' or 'uniform')")


def plan_views(num_frames: int, T: int, split: str, seed: int, video_id: str,
               clips_per_video: int, eval_clips: int) -> List[Tuple[str, int, np.ndarray]]:
    """All views stored for one video: ``[(view, view_index, frame_indices), ...]``.

    Train-like splits (``train``, ``unlabeled``) get ``clips_per_video`` seeded TSN views;
    other splits (``val``, ``test``) get ``eval_clips`` uniform views.
    """
    if split in TRAIN_LIKE_SPLITS:
        return [(TRAIN_VIEW, k, tsn_train_indices(num_frames, T, view_rng(seed, video_id, k)))
                for k in range(clips_per_video)]
    return [(UNIFORM_VIEW, k, uniform_clip_indices(num_frames, T, k, eval_clips)) for k in range(eval_clips)]


def clip_id(video_id: str, view: str, view_index: int) -> str:
    """The unique, deterministic id of a stored clip view, e.g. ``"MoveUp/v_MoveUp_g01_c01|uniform0"``."""
    return f"{video_id}|{view}{int(view_index)}"


def resized_hw(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """Stored size: the short side becomes ``short_side``, the aspect ratio is kept (rounded)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bad frame size {height}x{width}")
    if short_side <= 0:
        return height, width
    if height <= width:
        return short_side, max(1, int(round(width * short_side / height)))
    return max(1, int(round(height * short_side / width))), short_side


def _check(num_frames: int, T: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")


def unique_sorted(index_lists: Iterable[Sequence[int]]) -> np.ndarray:
    """Sorted unique frame indices over several views (decode each frame once)."""
    arrs = [np.asarray(a, dtype=np.int64) for a in index_lists]
    if not arrs:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(arrs))


def labelled_subset(video_ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int = 0) -> set:
    """The videos whose labels a run may use when only ``fraction`` of them are labelled.

    Per class, videos are ranked by a seeded hash of their id and the first
    ``max(1, round(fraction * n_class))`` are kept: the subset is balanced, reproducible,
    independent of row order, and nested (a smaller fraction keeps a subset of a larger one).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    by_class: dict = {}
    for vid, label in dict(zip(video_ids, labels)).items():
        by_class.setdefault(label, []).append(vid)
    keep = set()
    for vids in by_class.values():
        ranked = sorted(vids, key=lambda v: stable_seed("label-subset", seed, v))
        keep.update(ranked[: max(1, round(fraction * len(ranked)))])
    return keep


def pool_videos(video_ids: Sequence[str], labels: Sequence[int], teacher_pool: float, role: str,
                label_fraction: float = 1.0, seed: int = 0) -> set | None:
    """The labelled training videos a run of ``role`` ("teacher" or a student) may use.

    ``teacher_pool`` > 0 reserves that class-balanced, seeded fraction of the labelled videos
    for the teacher; students never see them and get the rest (the way a real teacher is
    pre-trained on data of its own). Students then keep ``label_fraction`` of their pool, drawn by
    ``seed`` (the data seed: every student seed of a run trains on one subset; the teacher's pool is
    fixed, as the teacher is trained once). ``None``: no restriction (every labelled video).
    """
    if not 0 <= teacher_pool < 1:
        raise ValueError(f"teacher_pool must be in [0, 1), got {teacher_pool!r}")
    pairs = dict(zip(video_ids, labels))
    if teacher_pool == 0:
        if role == "teacher" or label_fraction >= 1:
            return None
        return labelled_subset(list(pairs), list(pairs.values()), label_fraction, seed=seed)
    teacher = labelled_subset(list(pairs), list(pairs.values()), teacher_pool, seed=stable_seed("teacher-pool"))
    if role == "teacher":
        return teacher
    rest = {v: y for v, y in pairs.items() if v not in teacher}
    if label_fraction >= 1:
        return set(rest)
    return labelled_subset(list(rest), list(rest.values()), label_fraction, seed=seed)
