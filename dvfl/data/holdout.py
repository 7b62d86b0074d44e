"""Held-out validation: a seeded, class-balanced slice of the training videos (pure, no Ray).

Model choices (per-epoch validation, Tune's ASHA, the best config, the teacher gate) must never
look at the test split. When an ingest output has no ``val`` split of its own, :func:`holdout_videos`
carves one out of the training videos, and every run (teacher and students) leaves those videos
out of training. Videos of one *group* always land on the same side: UCF101/UCF50 ids
(``Class/v_Class_g08_c01``) group by ``gNN`` (one actor/scene); HMDB51 ids by their source video,
the name before the metadata tail (``<source>_<class>_u_nm_np1_ba_goo_0``: cuts of one source
video differ in that tail, not only in the last number); other ids by the folder below their
class folder (``rec7/001``, ``rec7/rec7-Scene-002``: cuts of one recording), or else their name
without a cut number (``rec7_001``, ``rec7-2``, ``rec7 (3)``), except that such a
group holding more than twice the validation fraction of its class is split into groups of one:
held out whole it would take that share of the class out of training (a phone's ``IMG_1234``, a
camera's ``MVI_0042``, a day's ``VID_20240105_143012``, ``wave_001``: naming schemes, not recordings).
"""
from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass
from typing import Sequence

from dvfl.data.sampling import stable_seed

UCF_GROUP = re.compile(r"_g(\d+)_c\d+$")
# HMDB51's tail: visible body parts, camera motion, number of people, viewpoint, quality, cut number
HMDB_TAIL = re.compile(r"_[fhul]_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:bad|med|goo)_\d+$")
TRAILING_NUMBER = re.compile(r"_\d+$")
# rule 5's cut number: rec7_001, rec7-001, rec7 002, PySceneDetect's rec7-Scene-001, a copy's rec7 (2)
CUT_NUMBER = re.compile(r"(?:[-_ ]+(?:scene[-_ ]*)?\d+|\s*\(\d+\))$", re.IGNORECASE)
#: the grouping rule's version, part of a carved run's identity: another rule carves other videos.
#: 3 (session 33) differs from 2 only where a class has an oversized trailing-number group, so a
#: carve that has none keeps 2 and its trained models (:func:`grouping_version`); 4 groups
#: by the folders below the class too (``<class>/<recording>/<cut>``: every recording's ``001`` was one
#: group), and differs from 3 only where a class's videos lie in more than one folder; 5 (session 52)
#: groups a folder below the class whatever its files are called (``rec7/rec7-Scene-001``, ``rec7/out000``
#: were a group each), finds a class's folder among all classes' (``A/rec1/*``, a class recorded once, was
#: read as flat cuts), reads ``-001``, `` (2)`` and ``-Scene-001`` as cut numbers, and keeps rule 4's group
#: names where it groups alike, so it differs from 4 only where it groups otherwise
GROUPING = 5
#: the split name that means "held-out validation" (carved from training when the ingest has none)
VAL_SPLIT = "val"


def group_of(video_id: str, class_folder: str | None = None) -> str:
    """The group a video belongs to (within its class): videos of one group share a side.
    ``class_folder``: the folder of the video's class in its id (:func:`class_folder`), whose
    sub-folders are part of a name group (None: the name alone, rule 3)."""
    folder, _, name = video_id.rpartition("/")
    m = UCF_GROUP.search(name)
    if m:
        return f"g{int(m.group(1)):02d}"
    m = HMDB_TAIL.search(name)
    if m:
        return name[:m.start()]  # <source>_<class>: the class is the same within a class
    below = folder[len(class_folder):].strip("/") if class_folder is not None else ""
    if not below:
        return TRAILING_NUMBER.sub("", name)
    # rec7/001, rec7/002: the cuts of recording rec7 (by name alone, every recording's 001 was one group)
    return below if name.isdigit() else f"{below}/{TRAILING_NUMBER.sub('', name)}"


def class_folder(vids: Sequence[str]) -> str:
    """The folders one class's video ids share (``Jump``, ``train/Jump``): what lies below is theirs."""
    return "/".join(posixpath.commonprefix([vid.split("/")[:-1] for vid in vids]))


def holdout_videos(video_ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int = 0,
                   salt: str = "val-holdout") -> set:
    """The training videos held out for validation (``salt``: another draw, e.g. a folder's test split).

    Per class, the class's groups (:func:`class_groups`) are ranked by a seeded hash of the group
    name (the same order in every class, so UCF groups ``gNN`` are held out across classes alike)
    and the first ``round(fraction * groups)`` (at least 1, and never all: a class keeps a training
    group) are held out whole. Reproducible, independent of row order, balanced over classes.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction!r}")
    held = set()
    by_class = _by_class(video_ids, labels)
    within = class_dirs(by_class)
    for label, vids in by_class.items():
        by_group = class_groups(vids, fraction, within=within[label])
        names = sorted(by_group, key=lambda g: (stable_seed(salt, int(seed), g), g))
        k = min(max(1, round(fraction * len(names))), len(names) - 1)
        for g in names[:k]:
            held.update(by_group[g])
    return held


def _by_class(video_ids: Sequence[str], labels: Sequence[int]) -> dict:
    by_class: dict = {}
    for vid, label in dict(zip(video_ids, labels)).items():
        by_class.setdefault(label, []).append(vid)
    return by_class


def class_dirs(by_class: dict) -> dict:
    """label -> the folder of the class's videos (rule 5): the folders its ids share with another
    class's (``train``, ``part1``), then its own next one (``A`` of ``A/rec1/001``: a class recorded once,
    in one folder, was read as flat cuts, each its own group); at most the folders its own ids share."""
    folders = {label: class_folder(vids) for label, vids in by_class.items()}
    own = {label: folder.split("/") if folder else [] for label, folder in folders.items()}
    if len(by_class) < 2:
        return {label: "/".join(parts) for label, parts in own.items()}

    def shared(a: list, b: list) -> int:
        return len(posixpath.commonprefix([a, b]))

    return {label: "/".join(parts[:1 + max(shared(parts, other) for o, other in own.items() if o != label)])
            for label, parts in own.items()}


def _cut_group(video_id: str, within: str) -> str:
    """A video's group by rule 5: as :func:`group_of`, but a folder below the class is the group
    whatever its files are called, and :data:`CUT_NUMBER` ends a cut's name."""
    name = video_id.rpartition("/")[2]
    if UCF_GROUP.search(name) or HMDB_TAIL.search(name):
        return group_of(video_id)
    return _below(video_id, within) or CUT_NUMBER.sub("", name) or name


def _below(video_id: str, within: str) -> str:
    """The folders of ``video_id`` below its class folder ``within`` ("" where it lies in it)."""
    folder = video_id.rpartition("/")[0]
    return folder[len(within):].strip("/") if folder.startswith(within) else folder


def _named_groups(vids: Sequence[str], by_folder: bool = True, within: str | None = None) -> dict:
    """Rule 5's groups before any is split (``within``: the class folder; None: the ids' own), or
    ``by_folder=False``: rule 3's."""
    by_group: dict = {}
    if by_folder:
        within = class_folder(vids) if within is None else within
        for vid in vids:
            by_group.setdefault(_cut_group(vid, within), []).append(vid)
        return by_group
    for vid in vids:
        by_group.setdefault(group_of(vid), []).append(vid)
    return by_group


def class_groups(vids: Sequence[str], fraction: float, by_folder: bool = True, within: str | None = None,
                 rule: int = GROUPING) -> dict:
    """One class's videos by group (rule 5, ``within`` its class folder: :func:`class_dirs`), except
    that a group other than UCF's and HMDB51's holding more than ``2 * fraction`` of the class is
    broken up: held out whole it took that share of the class out of training (20 of 22 phone videos
    ``IMG_*``; one of two cameras, ``IMG_*`` and ``MVI_*``, in every class alike; a year's folder). A
    folder is grouped by the names in it (:func:`_rule5_named_groups`), and what is still that large
    becomes groups of one, keyed by the video's id. Groups of the same videos as rule 4's keep rule
    4's names (the carve ranks groups by name). ``rule=4``: rule 4's groups; ``by_folder=False``: rule 3's."""
    if not by_folder or rule < 5:
        return _rule4_groups(vids, fraction, by_folder)
    by_group = _rule5_named_groups(vids, fraction, within)
    for g in [g for g, members in by_group.items() if _oversized(members, fraction, len(vids))]:
        for vid in by_group.pop(g):  # (a naming scheme's, a class's only recording)
            by_group[f"video {vid}"] = [vid]
    # rule 4's names first where it grouped alike (the carve ranks groups by name), in a fixed order
    names4 = {frozenset(members): g for g, members in _rule4_groups(vids, fraction, True).items()}
    renamed = {names4[frozenset(m)]: m for m in by_group.values() if frozenset(m) in names4}
    for g in sorted(g for g, m in by_group.items() if frozenset(m) not in names4):
        name = g
        while name in renamed:
            name += "'"
        renamed[name] = by_group[g]
    return renamed


def _oversized(members: list, fraction: float, class_size: int) -> bool:
    """A group too large to hold out whole (UCF's and HMDB51's groups never are)."""
    return (len(members) > 1 and len(members) > 2 * fraction * class_size
            and not (UCF_GROUP.search(members[0]) or HMDB_TAIL.search(members[0])))


def _rule5_named_groups(vids: Sequence[str], fraction: float, within: str | None) -> dict:
    """Rule 5's groups before any is split into single videos: a folder too large to hold out whole
    (a camera's, a day's) grouped by the names in it."""
    within = class_folder(vids) if within is None else within
    by_group = _named_groups(vids, True, within)
    for g in [g for g, members in by_group.items()
              if _oversized(members, fraction, len(vids)) and _below(members[0], within)]:
        for vid in by_group.pop(g):
            name = vid.rpartition("/")[2]
            by_group.setdefault(f"{g}/{CUT_NUMBER.sub('', name) or name}", []).append(vid)
    return by_group


def _rule4_groups(vids: Sequence[str], fraction: float, by_folder: bool = True) -> dict:
    """Rules 3 and 4 (:func:`group_of`), a trailing-number group or a folder's numbered cuts over
    ``2 * fraction`` of the class split into groups of one."""
    within = class_folder(vids) if by_folder else None
    by_group: dict = {}
    for vid in vids:
        by_group.setdefault(group_of(vid, within), []).append(vid)
    for g in [g for g, members in by_group.items()
              if len(members) > 1 and len(members) > 2 * fraction * len(vids)
              and (_trailing_number_group(members[0]) or _numbered_cut_in_a_folder(members[0], within))]:
        for vid in by_group.pop(g):
            by_group[f"video {vid}"] = [vid]
    return by_group


def _numbered_cut_in_a_folder(video_id: str, class_folder: str | None) -> bool:
    """``<class>/2023/001``: grouped by its folder (rule 4), which may be a year's or a camera's of
    most of the class, not a recording's, as a trailing-number group may be a naming scheme's."""
    folder, _, name = video_id.rpartition("/")
    return class_folder is not None and name.isdigit() and bool(folder[len(class_folder):].strip("/"))


def _trailing_number_group(video_id: str) -> bool:
    name = video_id.rsplit("/", 1)[-1]
    return bool(TRAILING_NUMBER.search(name)) and not UCF_GROUP.search(name) and not HMDB_TAIL.search(name)


def grouping_version(video_ids: Sequence[str], labels: Sequence[int], fraction: float) -> int:
    """The rule version these videos' carve depends on: :data:`GROUPING` (5) where a class's groups
    differ from rule 4's, else 4 where they differ from rule 3's (videos in more than one folder below
    the class), else 3 where they differ from rule 2's (an oversized trailing-number group split,
    :func:`class_groups`), else 2: a model carved by an earlier rule stays valid where no later one
    carves otherwise."""
    by_class = _by_class(video_ids, labels)
    within = class_dirs(by_class)
    if any(class_groups(vids, fraction, within=within[label]) != class_groups(vids, fraction, rule=4)
           for label, vids in by_class.items()):
        return GROUPING
    classes = by_class.values()
    if any(class_groups(vids, fraction, rule=4) != class_groups(vids, fraction, by_folder=False) for vids in classes):
        return 4
    return 3 if any(class_groups(vids, fraction, by_folder=False) != _named_groups(vids, by_folder=False)
                    for vids in classes) else 2


def train_videos(clips_dir: str, split: str) -> tuple:
    """(video ids, labels) of a split's clips, read once per ingest (its fingerprint) in a process:
    a run asked for them ~20 times, each a read of every shard (on s3, a request per shard)."""
    from dvfl.data.shards import load_dataset_info

    try:
        fingerprint = load_dataset_info(clips_dir).get("fingerprint")
    except (OSError, ValueError):
        fingerprint = None
    if fingerprint is None:
        return _read_train_videos(clips_dir, split)
    return _train_videos_of(clips_dir, split, fingerprint)


def _read_train_videos(clips_dir: str, split: str) -> tuple:
    from dvfl.data.shards import read_clips_table

    ids = read_clips_table(clips_dir, [split], columns=["video_id", "label"]).to_pydict()
    return tuple(ids["video_id"]), tuple(ids["label"])


@functools.lru_cache(maxsize=4)
def _train_videos_of(clips_dir: str, split: str, fingerprint: str) -> tuple:
    return _read_train_videos(clips_dir, split)


class HoldoutError(ValueError):
    """No validation can be carved (every class a single group): a setting to change, one line."""


@dataclass(frozen=True)
class ValSource:
    """Where validation clips come from: a split of their own, or held-out training videos."""

    split: str  # the shard split to read
    videos: frozenset | None = None  # carved: only these videos of ``split``; None: the whole split
    description: str = ""  # (recorded in models: a model validated on another carve is evaluated again)

    @property
    def carved(self) -> bool:
        return self.videos is not None


def val_source(clips_dir: str, val_split: str, train_split: str, fraction: float, seed: int) -> ValSource:
    """Resolve ``data.val_split``: an existing split is used whole; ``val`` without such a split in
    the ingest output is carved out of ``train_split`` (:func:`holdout_videos`)."""
    from dvfl.data.shards import shard_paths

    if val_split != VAL_SPLIT or shard_paths(clips_dir, [val_split]):
        return ValSource(val_split, None, f"split '{val_split}'")
    video_ids, labels = train_videos(clips_dir, train_split)
    videos = frozenset(holdout_videos(video_ids, labels, fraction, seed))
    if not videos:
        raise HoldoutError(f"data.val_split is '{VAL_SPLIT}' but {clips_dir} has no such split and no class of split "
                           f"'{train_split}' has two groups of videos to hold one out: ingest a val split "
                           "(a folder dataset: dvfl ingest --val-fraction), or name another data.val_split")
    return ValSource(train_split, videos, f"'{VAL_SPLIT}': {len(videos)} videos ({fraction:g} of the groups per "
                     f"class, seed {seed}) held out of split '{train_split}'")


def carve_note(video_ids, labels, fraction: float, held, side: str = "validation",
               fix: str = "give a val split of whole recordings") -> str:
    """What the user should know of a carve: the names (``rec7`` of ``rec7_001``) too large to hold
    out whole, broken into single videos by :func:`class_groups`, and the folders too large to hold
    out whole whose files share no name (``A/rec1/001``, ...: a class's only recording), that now sit
    on both sides (``side``: the split ``held`` went to)."""
    names, classes = set(), set()
    by_class = _by_class(video_ids, labels)
    within = class_dirs(by_class)
    for label, vids in by_class.items():
        named = _rule5_named_groups(vids, fraction, within[label])
        split = [named[g] for g in set(named) - set(class_groups(vids, fraction, within=within[label]))]
        for g, members in _named_groups(vids, True, within[label]).items():
            cuts = {CUT_NUMBER.sub("", v.rpartition("/")[2]) or v for v in members}
            if _below(members[0], within[label]) and _oversized(members, fraction, len(vids)) and len(cuts) == len(members):
                split.append(members)
        for members in split:
            if 0 < sum(v in held for v in members) < len(members):
                names.add(_cut_group(members[0], within[label]).rsplit("/", 1)[-1])
                classes.add(label)
    if not names:
        return ""
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{len(names)} name(s) too large to hold out whole ({shown}; in {len(classes)} class(es)) have "
            f"videos in both training and {side}: if those are cuts of one recording, the {side} score flatters the "
            f"model; {fix}")


__all__ = ["HoldoutError", "carve_note", "group_of", "class_folder", "class_dirs", "class_groups", "grouping_version", "holdout_videos", "train_videos", "ValSource", "val_source", "VAL_SPLIT", "GROUPING"]
