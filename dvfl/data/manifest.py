"""The manifest: what every dataset adapter produces and ingest consumes."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass
class VideoEntry:
    video_id: str            # unique, deterministic (usually the path without extension)
    path: str                # absolute path of the file
    label: Optional[int]     # None for unlabelled videos
    class_name: Optional[str]
    split: str               # train | val | test | unlabeled

    def relpath(self, root: str) -> str:
        """``path`` relative to ``root`` (POSIX), or absolute when the file lies outside it."""
        rel = os.path.relpath(self.path, root)
        if rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
            return os.path.abspath(self.path)
        return rel.replace(os.sep, "/")


@dataclass
class Problem:
    """A listed input that cannot become clips, found before decoding (one rejected input)."""
    reason: str
    path: str
    video_id: Optional[str] = None
    detail: str = ""
    split: Optional[str] = None

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

    @property
    def num_inputs(self) -> int:
        return len(self.entries) + len(self.problems)

    def extend(self, other: "Manifest") -> None:
        self.entries.extend(other.entries)
        self.problems.extend(other.problems)
        self.excluded += other.excluded

    def dedupe(self) -> None:
        """Second and later entries with an already seen video_id become ``duplicate`` problems."""
        seen: Dict[str, VideoEntry] = {}
        keep: List[VideoEntry] = []
        for e in self.entries:
            if e.video_id in seen:
                self.problems.append(Problem("duplicate", e.path, e.video_id,
                                             f"video_id also listed for {seen[e.video_id].path}", e.split))
            else:
                seen[e.video_id] = e
                keep.append(e)
        self.entries = keep
