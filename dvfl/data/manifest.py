"""The manifest: what every dataset adapter produces and ingest consumes."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple


# Which entry of a video_id listed twice is kept (and of the same bytes under two ids, in
# dvfl.data.ingest): the evaluation copy, so that a test video never silently trains instead.
KEEP_FIRST = {"test": 0, "val": 1, "train": 2, "unlabeled": 3}


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: a file name in another encoding (``caf\\xe9`` from Latin-1
    bytes; Python holds them as lone surrogates) cannot be a Parquet or JSON string, so its
    undecodable bytes are written as ``\\xNN``. Valid names are returned unchanged."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class VideoEntry:
    video_id: str            # unique, deterministic (usually the path without extension)
    path: str                # absolute path of the file
    label: Optional[int]     # None for unlabelled videos
    class_name: Optional[str]
    split: str               # train | val | test | unlabeled
    root: Optional[str] = None  # its source's root (absolute), checked again where the file is decoded

    def relpath(self, root: str) -> str:
        """``path`` relative to ``root`` (POSIX), or absolute when the file lies outside it, as
        :func:`printable` text (``path`` itself stays the name that opens the file)."""
        rel = os.path.relpath(self.path, root)
        if rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
            return printable(os.path.abspath(self.path))
        return printable(rel.replace(os.sep, "/"))


@dataclass
class Problem:
    """A listed input that cannot become clips, found before decoding (one rejected input)."""
    reason: str
    path: str
    video_id: Optional[str] = None
    detail: str = ""
    split: Optional[str] = None

    def __post_init__(self):  # (a list file's name in another encoding: printed and written as text)
        self.path, self.detail = printable(self.path), printable(self.detail)
        self.video_id = self.video_id and printable(self.video_id)

    def as_dict(self) -> Dict:
        return asdict(self)


@dataclass
class Manifest:
    dataset: str
    root: str
    classes: List[str]
    entries: List[VideoEntry] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    source: Dict = field(default_factory=dict)   # adapter parameters (split number, list files ...)
    excluded: int = 0   # listed but deliberately unused by the protocol (e.g. HMDB51 id 0): not inputs
    notes: List[str] = field(default_factory=list)  # what the user should know of the listing (printed, not recorded)
    # video id -> split as an earlier split rule drew it: kept by an ingest into a folder holding that draw's ingest
    earlier_splits: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = [printable(c) for c in self.classes]  # (folder names; same order, so labels hold)

    @property
    def num_inputs(self) -> int:
        return len(self.entries) + len(self.problems)

    def extend(self, other: "Manifest") -> None:
        self.entries.extend(other.entries)
        self.problems.extend(other.problems)
        self.excluded += other.excluded
        self.notes.extend(other.notes)

    def dedupe(self) -> None:
        """Entries sharing a video_id: one is kept, the evaluation split's first (``KEEP_FIRST``: test,
        val, train, unlabeled; the first listed within a split), the others become ``duplicate``
        problems naming the kept copy and its split."""
        best: Dict[str, int] = {}
        for i, e in enumerate(self.entries):
            j = best.get(e.video_id)
            if j is None or KEEP_FIRST.get(e.split, 9) < KEEP_FIRST.get(self.entries[j].split, 9):
                best[e.video_id] = i
        keep: List[VideoEntry] = []
        for i, e in enumerate(self.entries):
            kept = self.entries[best[e.video_id]]
            if best[e.video_id] == i:
                keep.append(e)
            else:
                self.problems.append(Problem("duplicate", e.path, e.video_id,
                                             f"video_id also listed for {kept.path}; the {kept.split} copy is kept",
                                             e.split))
        # one file under two ids of one split (a list naming a.avi, gone, and a.mp4, taken for it): one
        # video (across splits, the ingest's content check keeps the evaluation split's copy)
        first: Dict[Tuple[str, str], VideoEntry] = {}
        self.entries = []
        for e in keep:
            kept = first.setdefault((e.split, e.path), e)
            if kept is e:
                self.entries.append(e)
            else:
                self.problems.append(Problem("duplicate", e.path, e.video_id,
                                             f"the same file is also listed as {kept.video_id}; that one is kept",
                                             e.split))
