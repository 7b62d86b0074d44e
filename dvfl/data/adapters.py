"""Dataset adapters: each layout -> one :class:`~dvfl.data.manifest.Manifest`.

Every adapter is tolerant: unknown class names, labels out of range, malformed lines
and listed-but-missing files become :class:`Problem` records (they end up in the
rejects file and the summary), never exceptions. Only a missing *split/list file*
itself (nothing to ingest at all) raises :class:`AdapterError`.

``video_id`` is the path relative to the video root without extension for
path-based datasets (UCF101, HMDB51, UCF50, folder, DVFL csv), the clip name
``<youtube_id>_<start:06d>_<end:06d>`` for Kinetics and the numeric id for SSv2.

Nothing is read from outside a source's root (``Manifest.root``): the videos folder for the
labelled datasets (``--videos-dir``, else the dataset's usual folder under ``--root``), the folder
of an unlabelled pool, or the folder holding an unlabelled list. An entry whose real path leaves
its root (``../``, absolute paths, symlinks) is an ``outside_root`` problem.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import decode as _d
from .manifest import Manifest, Problem, VideoEntry, printable
from .sampling import stable_seed

DATASETS = ("ucf101", "hmdb51", "ucf50", "kinetics", "ssv2", "dvfl-csv", "folder", "synthetic")


class AdapterError(ValueError):
    pass


def _is_video(name: str) -> bool:
    # (a hidden file is a system's or a tool's: macOS copies leave an AppleDouble "._<name>.avi" beside each video)
    return not name.startswith(".") and name.lower().endswith(_d.VIDEO_EXTENSIONS)


def _strip_ext(rel: str) -> str:
    return os.path.splitext(rel)[0]


def _first_existing(cands: Iterable[Optional[str]], what: str, must: bool = True) -> Optional[str]:
    cands = [c for c in cands if c]
    for c in cands:
        if os.path.exists(c):
            return c
    if must:
        raise AdapterError(f"{what} not found (looked for: {', '.join(cands)})")
    return None


def _add(m: Manifest, video_id: str, path: str, label: Optional[int], class_name: Optional[str],
         split: str) -> None:
    """Add an entry, or an ``outside_root`` problem when its real path (``..``, absolute paths and
    symlinks resolved) leaves the manifest's root, or a ``missing`` one when the file is not there.
    The stored path opens the checked file: the listed path made absolute when it lies under the root
    and resolves to that file, else the real path re-expressed under the root (``link/../x``)."""
    if "\0" in path:  # (a list saved as UTF-16, or written by find -print0: no file has such a name)
        m.problems.append(Problem(_d.BAD_LINE, path.replace("\0", ""), video_id and video_id.replace("\0", ""),
                                  "a NUL byte in the path: the list is not UTF-8 text, one path per line", split))
        return
    if not os.path.lexists(path):  # a transcoded copy (UCF101's .avi as .mp4), .AVI, a Mac-made NFD name
        path = _same_video_otherwise_named(path) or path
    real, root = os.path.realpath(path), os.path.realpath(m.root)
    if os.path.commonpath([real, root]) != root:
        m.problems.append(Problem(_d.OUTSIDE_ROOT, path, video_id, f"resolves to {real}, outside the root {root}",
                                  split))
        return
    if not os.path.isfile(real):
        try:
            os.stat(real)
            why = (_d.MISSING, "listed but not a file")
        except FileNotFoundError:
            why = (_d.MISSING, "listed but no such file")
        except OSError as ex:  # a folder on the way this process may not enter: not "missing"
            why = (_d.UNREADABLE, f"{ex.strerror or ex}")
        m.problems.append(Problem(why[0], path, video_id, why[1], split))
        return
    stored, abs_root = os.path.abspath(path), os.path.abspath(m.root)
    # abspath drops "link/.." as text while the kernel follows the link first: it may name another file
    if os.path.commonpath([stored, abs_root]) != abs_root or os.path.realpath(stored) != real:
        stored = os.path.join(abs_root, os.path.relpath(real, root))
    # the root as listed: resolved again where the file is decoded (a node may mount it elsewhere)
    m.entries.append(VideoEntry(printable(video_id), stored, label, class_name and printable(class_name), split,
                                abs_root))


def _same_video_otherwise_named(path: str) -> Optional[str]:
    """The one video file beside a listed file that is not there whose name is the listed one up to
    the extension (a video's), letter case and Unicode form (NFC/NFD); None if none or several.
    The official UCF101/HMDB51 lists name ``.avi`` files, which users often transcode to ``.mp4``;
    a list typed on Linux names in NFC what a Mac wrote in NFD: every video was "missing"."""
    folder, name = os.path.split(path)
    try:
        stamp = os.stat(folder or ".").st_mtime_ns
    except OSError:
        return None
    found = _videos_by_loose_name(folder or ".", stamp).get(_loose_name(name), ())
    return os.path.join(folder, found[0]) if len(found) == 1 else None


def _loose_name(name: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", os.path.splitext(name)[0]).casefold()


@functools.lru_cache(maxsize=64)
def _videos_by_loose_name(folder: str, stamp: int) -> Dict[str, Tuple[str, ...]]:
    """A folder's video files by :func:`_loose_name`, listed once per folder and content (``stamp``:
    its modification time): a flat folder of 220k SSv2 videos was listed again per missing video."""
    index: Dict[str, List[str]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    for n in names:
        if not n.startswith(".") and os.path.splitext(n)[1].lower() in _d.VIDEO_EXTENSIONS:
            index.setdefault(_loose_name(n), []).append(n)
    return {k: tuple(v) for k, v in index.items()}


def _read_lines(path: str) -> List[Tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines. None of the list formats read here has
    comments: a line starting with ``#`` is an entry (HMDB51 has videos named ``#20_Rhythm_clap_...``)."""
    # surrogateescape: a name in another encoding (Latin-1 bytes) still opens the file it names
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = [(i + 1, ln.strip()) for i, ln in enumerate(f) if ln.strip()]
    if any("\0" in ln for _, ln in lines):  # (its every path would be a bad line)
        raise AdapterError(f"{path} holds NUL bytes: not UTF-8 text with one entry per line (saved as UTF-16, or "
                           "written by find -print0?); save it as UTF-8, one per line")
    return lines


def _class_names(path: str) -> List[str]:
    """A class-names file: one name per line, or the DVFL-Net repository's ``labels/*.csv`` (an
    ``id,name`` header, then ``0,ApplyEyeMakeup`` lines), whose every line read as a name shifted the
    classes by one and added an ``id,name`` class."""
    # (its SSv2 file ends every line with a comma: "id,name," then "0,Approaching something ...,")
    lines = [(n, ln.rstrip(",").strip()) for n, ln in _read_lines(path)]
    head = [f.strip().lower() for f in lines[0][1].split(",")] if lines else []
    rows = lines[1:] if len(head) == 2 and not _is_int(head[0]) and head[1] in ("name", "class", "class_name", "label") \
        else lines
    pairs = [(n, ln.split(",", 1)) for n, ln in rows]
    if rows is lines and not all(len(f) == 2 and _is_int(f[0]) for _, f in pairs):
        if len(lines) > 1 and head in (["name"], ["class"], ["class_name"], ["classes"], ["label"]):
            lines = lines[1:]  # a one-column header (read as a class, it shifted every label by one)
        return [ln for _, ln in lines]  # one name per line (a name may hold a comma)
    bad = [(n, f) for n, f in pairs if len(f) != 2 or not _is_int(f[0])]
    if bad:
        raise AdapterError(f"{os.path.basename(path)}:{bad[0][0]}: expected ID,NAME after the header, got {','.join(bad[0][1])!r}")
    ids = [int(f[0]) for _, f in pairs]
    if sorted(ids) != list(range(len(ids))):
        raise AdapterError(f"{os.path.basename(path)}: class ids {sorted(ids)[:5]}... are not 0..{len(ids) - 1}, "
                           "each once (number the classes from 0, as the lists' labels are)")
    return [f[1].strip() for _, f in sorted(pairs, key=lambda p: int(p[1][0]))]


_SPLITS = ("train", "val", "test")
_SPLIT_NAMES_HELP = "train, val/validation or test"


def _split_of_name(path: str) -> Optional[str]:
    """The split an annotation file's name says: its whole stem or the stem's last ``-``/``_`` part
    (``something-something-v2-validation.json`` -> ``val``), read by :func:`_norm_split`; else None."""
    stem = os.path.splitext(os.path.basename(path))[0].strip().lower()
    for cand in (stem, re.split(r"[-_]", stem)[-1]):
        if _norm_split(cand) in _SPLITS:
            return _norm_split(cand)
    return None


def _split_from_name(path: str, flag: str) -> str:
    """:func:`_split_of_name`, or an AdapterError: guessing a split would train on evaluation videos."""
    split = _split_of_name(path)
    if split is None:
        raise AdapterError(f"{path}: the file name {os.path.basename(path)!r} does not say the split: name it "
                           f"{_SPLIT_NAMES_HELP} (alone or after '-'/'_', e.g. something-something-v2-validation"
                           f"{os.path.splitext(path)[1]}) or pass {flag} SPLIT={path}")
    return split


# ---------------------------------------------------------------------------------------
# UCF101

def read_class_ind(path: str) -> List[str]:
    """``classInd.txt``: lines ``<1-based id> <ClassName>`` -> class list (index = id - 1)."""
    ids: Dict[int, str] = {}
    for lineno, ln in _read_lines(path):
        parts = ln.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AdapterError(f"{path}:{lineno}: expected '<id> <ClassName>', got {ln!r}")
        ids[int(parts[0])] = parts[1]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise AdapterError(f"{path}: class ids are not 1..{len(ids)}")
    return [ids[i] for i in range(1, len(ids) + 1)]


def ucf101(root: str, split: int = 1, lists_dir: Optional[str] = None,
           videos_dir: Optional[str] = None) -> Manifest:
    """UCF101 official splits: ``classInd.txt``, ``trainlist0N.txt`` (path, 1-based label),
    ``testlist0N.txt`` (path only; label from the folder name). An optional ``vallist0N.txt`` (not
    a UCF101 file; the test list's format) is a validation split of its own, e.g. videos whose
    labels were checked: runs then validate on it instead of carving one out of the training list."""
    if split not in (1, 2, 3):
        raise AdapterError(f"--split must be 1, 2 or 3 for ucf101, got {split}")
    dirs = [lists_dir] if lists_dir else [os.path.join(root, "ucfTrainTestlist"), root]
    cands = [os.path.join(c, "classInd.txt") for c in dirs]
    class_ind = _first_existing(cands, "classInd.txt")
    ldir = os.path.dirname(class_ind)
    classes = read_class_ind(class_ind)
    index = {c: i for i, c in enumerate(classes)}
    vdir = videos_dir or (os.path.join(root, "UCF-101") if os.path.isdir(os.path.join(root, "UCF-101")) else root)
    m = Manifest("ucf101", os.path.abspath(vdir), classes, source={"split": split, "lists_dir": os.path.abspath(ldir)})
    train = _first_existing([os.path.join(ldir, f"trainlist0{split}.txt")], "train list")
    test = _first_existing([os.path.join(ldir, f"testlist0{split}.txt")], "test list")
    val = os.path.join(ldir, f"vallist0{split}.txt")
    lists = [(train, "train"), (test, "test")] + ([(val, "val")] if os.path.isfile(val) else [])
    for lst, split_name in lists:
        for lineno, ln in _read_lines(lst):
            parts = ln.split()
            rel = parts[0].replace("\\", "/")
            path = os.path.join(vdir, rel)
            vid = _strip_ext(rel)
            folder = rel.split("/")[0] if "/" in rel else None
            where = f"{os.path.basename(lst)}:{lineno}"
            if len(parts) > 2 or (len(parts) == 2 and not re.fullmatch(r"-?\d+", parts[1])):
                m.problems.append(Problem(_d.BAD_LINE, path, vid, f"{where}: {ln!r}", split_name))
                continue
            if len(parts) == 2:
                lab = int(parts[1]) - 1
                if not 0 <= lab < len(classes):
                    m.problems.append(Problem(_d.LABEL_OUT_OF_RANGE, path, vid,
                                              f"{where}: label {parts[1]} not in 1..{len(classes)}", split_name))
                    continue
                if folder is not None and folder != classes[lab]:
                    m.problems.append(Problem(_d.LABEL_MISMATCH, path, vid,
                                              f"{where}: label {parts[1]} is {classes[lab]}, folder is {folder}",
                                              split_name))
                    continue
            else:
                if folder not in index:
                    m.problems.append(Problem(_d.UNKNOWN_CLASS, path, vid,
                                              f"{where}: class {folder!r} not in classInd.txt", split_name))
                    continue
                lab = index[folder]
            _add(m, vid, path, lab, classes[lab], split_name)
    return m


# ---------------------------------------------------------------------------------------
# HMDB51

def hmdb51(root: str, split: int = 1, lists_dir: Optional[str] = None,
           videos_dir: Optional[str] = None) -> Manifest:
    """HMDB51 official splits: ``<class>_test_split{N}.txt`` with lines ``<video>.avi <id>``;
    id 1 = train, 2 = test, 0 = not used by this split (excluded, not an input)."""
    if split not in (1, 2, 3):
        raise AdapterError(f"--split must be 1, 2 or 3 for hmdb51, got {split}")
    cands = [lists_dir] if lists_dir else [os.path.join(root, "testTrainMulti_7030_splits"),
                                            os.path.join(root, "splits"), root]
    suffix = f"_test_split{split}.txt"
    ldir = None
    for c in cands:
        if c and os.path.isdir(c) and any(n.endswith(suffix) and not n.startswith(".") for n in os.listdir(c)):
            ldir = c
            break
    if ldir is None:
        raise AdapterError(f"no *{suffix} files found (looked in: {', '.join(c for c in cands if c)})")
    # classes in the order of their names (as the folder and CSV adapters give them), not of the
    # list files' names: climb_stairs_test_split1.txt sorts before climb_test_split1.txt
    # (not hidden files: a macOS copy leaves "._brush_hair_test_split1.txt" beside each list, 51 more classes)
    classes = sorted(n[: -len(suffix)] for n in os.listdir(ldir) if n.endswith(suffix) and not n.startswith("."))
    files = [c + suffix for c in classes]
    vdir = videos_dir or root
    m = Manifest("hmdb51", os.path.abspath(vdir), classes, source={"split": split, "lists_dir": os.path.abspath(ldir)})
    for lab, (fname, cls) in enumerate(zip(files, classes)):
        for lineno, ln in _read_lines(os.path.join(ldir, fname)):
            parts = ln.split()
            rel = f"{cls}/{parts[0]}"
            path = os.path.join(vdir, rel)
            vid = _strip_ext(rel)
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                m.problems.append(Problem(_d.BAD_LINE, path, vid, f"{fname}:{lineno}: {ln!r}"))
                continue
            if parts[1] == "0":
                m.excluded += 1
                continue
            _add(m, vid, path, lab, cls, "train" if parts[1] == "1" else "test")
    return m


# ---------------------------------------------------------------------------------------
# UCF50 (leave-one-group-out)

_GROUP_RE = re.compile(r"_g(\d+)_c(\d+)", re.IGNORECASE)


def ucf50(root: str, test_group: int = 1) -> Manifest:
    """UCF50: folder per class, files ``v_<Class>_gGG_cCC.avi``; the protocol is
    leave-one-group-out over 25 groups: group ``test_group`` is the test split."""
    if not 1 <= test_group <= 25:
        raise AdapterError(f"--split (the held-out group) must be 1..25 for ucf50, got {test_group}")
    if not os.path.isdir(root):
        raise AdapterError(f"--root {root} is not a directory")
    if os.path.isdir(os.path.join(root, "UCF50")):  # the archive unpacks to <root>/UCF50/<Class>/...
        root = os.path.join(root, "UCF50")
    classes = _subfolders(root)
    m = Manifest("ucf50", os.path.abspath(root), classes, source={"test_group": test_group})
    _refuse_class_links(root, [(None, root)], classes)
    for lab, cls in enumerate(classes):
        outside: List[Tuple[str, str]] = []
        for dirpath, _, names in _walk(os.path.join(root, cls), os.path.join(root, cls), outside):
            videos = [n for n in names if _is_video(n)]
            for n, last in zip(videos, _id_parts(videos)):
                path = os.path.join(dirpath, n)
                vid = os.path.relpath(os.path.join(dirpath, last), root).replace(os.sep, "/")
                g = _GROUP_RE.search(n)
                if not g:
                    m.problems.append(Problem("bad_name", path, vid, "no _gGG_cCC in the file name"))
                    continue
                if not 1 <= int(g.group(1)) <= 25:  # it would train in every fold and test in none
                    m.problems.append(Problem("bad_name", path, vid,
                                              f"group g{g.group(1)} is not one of UCF50's 25 groups g01..g25"))
                    continue
                _add(m, vid, path, lab, cls, "test" if int(g.group(1)) == test_group else "train")
        _linked_folder_problems(m, outside, os.path.join(root, cls), None)  # (the split: in each file's name)
    return m


# ---------------------------------------------------------------------------------------
# Kinetics-400 CSV

# a Mac zip's resource forks, a volume's fsck folder, a Synology NAS's thumbnails (with .mp4 previews),
# recycle bin and snapshots, Windows' recycle bins and volume data: never classes, nothing in them a video
SYSTEM_FOLDERS = ("__MACOSX", "lost+found", "@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "RECYCLER",
                  "System Volume Information")


def _walk(top: str, root: Optional[str] = None, outside: Optional[List[Tuple[str, str]]] = None):
    """``os.walk`` in sorted order that raises :class:`AdapterError` on a folder it cannot list
    (os.walk skips it: its videos were neither inputs nor rejects). A linked sub-folder is walked
    when it resolves inside ``root`` (default ``top``; its files are judged by :func:`_add`) to a
    folder no plain path reaches, once; one that leaves ``root`` is not walked but appended to
    ``outside`` as (link, target), for the caller to report as ``linked_folder`` (os.walk skipped
    every linked folder: its videos were neither inputs nor rejects)."""
    def refuse(ex: OSError):
        if os.path.basename(str(ex.filename)) in SYSTEM_FOLDERS:
            return  # a volume's own lost+found (root's, mode 700) is not part of the dataset
        raise AdapterError(f"cannot read the folder {ex.filename}: {ex.strerror or ex}: fix its permissions, or "
                           "move it out of the dataset")

    def visible(dirs):  # (.AppleDouble, .Trashes: not the dataset's)
        return sorted(d for d in dirs if not d.startswith(".") and d not in SYSTEM_FOLDERS)

    real_root = os.path.realpath(root or top)
    # every folder reachable without a link is read under its own name (a link to one, at any depth,
    # would otherwise give its videos the link's ids, and with them another --test-fraction draw)
    seen = {os.path.realpath(top)}
    for dirpath, dirs, _ in os.walk(top, onerror=refuse):
        dirs[:] = [d for d in visible(dirs) if not os.path.islink(os.path.join(dirpath, d))]
        seen.update(os.path.realpath(os.path.join(dirpath, d)) for d in dirs)
    for dirpath, dirs, names in os.walk(top, onerror=refuse, followlinks=True):
        keep = []
        for d in visible(dirs):
            path = os.path.join(dirpath, d)
            if not os.path.islink(path):
                keep.append(d)
                continue
            real = os.path.realpath(path)
            if os.path.commonpath([real, real_root]) != real_root:
                if outside is not None:
                    outside.append((path, real))
            elif real not in seen:  # (a link back up the tree, or to a folder read already)
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        yield dirpath, dirs, sorted(names)


def _refuse_class_links(root: str, bases, classes: List[str]) -> None:
    """A class folder linked into the dataset would label its videos twice: refused, naming it."""
    real_root = os.path.realpath(root)
    for _, b in bases:
        for cls in classes:
            link, target = os.path.join(b, cls), os.path.realpath(os.path.join(b, cls))
            if os.path.islink(link) and (target == real_root or target.startswith(real_root + os.sep)
                                         or real_root.startswith(target + os.sep)):
                raise AdapterError(f"class folder {link} is a link to {target}, inside the dataset: its videos "
                                   "would also be filed under this class; remove the link (links to folders "
                                   "elsewhere are refused per video as outside_root)")


def _linked_folder_problems(m: Manifest, outside: List[Tuple[str, str]], within: str, split: Optional[str],
                            prefix: str = "") -> None:
    """A linked folder that leaves ``within`` (its class folder, or a pool's): one ``linked_folder``
    reject, its videos not read there (another class's folder would file them under two labels)."""
    root = os.path.realpath(m.root)
    for link, real in outside:
        vid = prefix + os.path.relpath(link, m.root).replace(os.sep, "/")
        where = (f"another part of the dataset, outside {os.path.realpath(within)}: its videos are not read here "
                 "(under a second label)" if os.path.commonpath([real, root]) == root
                 else f"outside the root {root}: its videos are not read (move them under the root)")
        m.problems.append(Problem(_d.LINKED_FOLDER, link, vid, f"a link to the folder {real}, {where}", split))


def _id_parts(names: list[str]) -> list[str]:
    """Video file names (or relative paths) -> their ids: without the extension, or with it where two
    differ only by it (a.avi and a.mp4 are two videos, not a duplicate)."""
    count = Counter(_strip_ext(n) for n in set(names))  # (a list may name one file twice: a duplicate)
    return [n if count[_strip_ext(n)] > 1 else _strip_ext(n) for n in names]


def _subfolders(base: str) -> list[str]:
    """The folders under ``base`` that are classes (or split folders): all but hidden ones and
    :data:`SYSTEM_FOLDERS`."""
    try:
        names = os.listdir(base)
    except OSError as ex:
        raise AdapterError(f"cannot read the folder {base}: {ex.strerror or ex}") from None
    return sorted(d for d in names if os.path.isdir(os.path.join(base, d)) and not d.startswith(".")
                  and d not in SYSTEM_FOLDERS)


def _norm_split(s: str) -> str:
    s = (s or "").strip().lower()
    return {"validate": "val", "validation": "val", "valid": "val", "training": "train", "testing": "test"}.get(s, s)


def _index_videos(vdir: str, outside: Optional[List[Tuple[str, str]]] = None) -> Dict[str, str]:
    idx: Dict[str, str] = {}
    for dirpath, dirs, names in _walk(vdir, vdir, outside):
        for n in names:
            if _is_video(n):
                idx.setdefault(os.path.splitext(n)[0], os.path.join(dirpath, n))
    return idx


def kinetics(root: str, annotations: Optional[Sequence[Tuple[Optional[str], str]]] = None,
             videos_dir: Optional[str] = None, classes_file: Optional[str] = None) -> Manifest:
    """Kinetics CSV (header ``label,youtube_id,time_start,time_end,split``); files named
    ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere under the video root (per-label
    or per-split folders are fine). Classes: ``classes_file`` (one per line) or the sorted
    labels found in the CSVs."""
    if not annotations:
        found = []
        for d in (root, os.path.join(root, "annotations")):
            if os.path.isdir(d):
                found += [(None, os.path.join(d, n)) for n in sorted(os.listdir(d))
                          if n.endswith(".csv") and not n.startswith(".")]
        if not found:
            raise AdapterError(f"no Kinetics CSV given (--annotations) or found in {root}")
        annotations = found
    rows: List[Tuple[str, int, Dict[str, str]]] = []
    for split_hint, path in annotations:
        if not os.path.isfile(path):
            raise AdapterError(f"annotation file {path} not found")
        default_split = _norm_split(split_hint) if split_hint else (
            _split_of_name(path) or _norm_split(os.path.splitext(os.path.basename(path))[0]))
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                need = {"label", "youtube_id", "time_start", "time_end"}
                if not reader.fieldnames or not need <= set(reader.fieldnames):
                    raise AdapterError(f"{path}: header must contain {sorted(need)}, got {reader.fieldnames}")
                for i, r in enumerate(reader):
                    r = dict(r)
                    own = _norm_split(r.get("split") or "")
                    r["_where"] = f"{os.path.basename(path)}:{i + 2}"
                    if split_hint and own in ("val", "test") and _norm_split(split_hint) == "train":
                        # (train=all.csv, or files swapped: held-out videos trained on, silently; training rows
                        # held out as val or test, and val rows as the test split, test=validate.csv, stay allowed)
                        raise AdapterError(f"{r['_where']}: a {own} video (its split column) given as the train split "
                                           f"({split_hint}={os.path.basename(path)}): give the train split a file of "
                                           "training rows, or leave SPLIT= out to take the column")
                    r["_split"] = _norm_split(split_hint) if split_hint else (own or default_split)
                    rows.append((path, i, r))
        except UnicodeDecodeError as exc:  # (a ValueError: it escaped the commands' error handling as a traceback)
            raise AdapterError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
        except csv.Error as exc:  # (a stray quote makes the rest of the file one field: a traceback)
            raise AdapterError(f"{path}: {exc} (a quote left open?)") from None
    trained = {_kinetics_key(r) for _, _, r in rows if r["_split"] == "train"}
    for _, _, r in rows:
        if r["_split"] != "train" and _norm_split(r.get("split") or "") == "train" and _kinetics_key(r) in trained:
            # (a combined file as val= or test=: the held-out copy is kept at dedupe, the training split emptied)
            raise AdapterError(f"{r['_where']}: a training video (its split column) given as the {r['_split']} split "
                               "is in a train file too: give the held-out split a file of its own rows")
    if classes_file:
        classes = _class_names(classes_file)  # (one per line, or an id,name file as dvfl-csv takes)
    else:
        classes = sorted({r["label"].strip() for _, _, r in rows if (r.get("label") or "").strip()})
    index = {c: i for i, c in enumerate(classes)}
    vdir = videos_dir or root
    outside: List[Tuple[str, str]] = []  # (per-split folders linked from another disk are not read)
    files = _index_videos(vdir, outside)
    m = Manifest("kinetics", os.path.abspath(vdir), classes,
                 source={"annotations": [os.path.abspath(p) for _, p in annotations]})
    for _, _, r in rows:
        yid = (r.get("youtube_id") or "").strip()
        try:
            stem = f"{yid}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        except (TypeError, ValueError, OverflowError):  # (int(float("inf")) overflows)
            m.problems.append(Problem(_d.BAD_LINE, yid, yid or None, f"{r['_where']}: bad time_start/time_end"))
            continue
        split = r["_split"]
        if split not in ("train", "val", "test"):  # guessing "train" would train on validation videos
            raise AdapterError(f"{r['_where']}: split {split!r} is not train, val or test: name the file "
                               "train/val/test.csv, give it a split column, or pass --annotations SPLIT=PATH")
        path = files.get(stem) or os.path.join(vdir, stem + ".mp4")
        label_name = (r.get("label") or "").strip()
        if label_name not in index:
            m.problems.append(Problem(_d.UNKNOWN_CLASS, path, stem, f"{r['_where']}: label {label_name!r}", split))
            continue
        if stem not in files and yid in files:
            # the whole YouTube video, or a segment named without its times: either way, its frames
            # may come from outside time_start..time_end, which is what the label is about
            m.problems.append(Problem(_d.UNTRIMMED, files[yid], stem, f"{r['_where']}: only "
                                      f"{os.path.basename(files[yid])} found, not {stem}.*; cut the segment "
                                      f"(ffmpeg -ss {r['time_start']} -to {r['time_end']}) into {stem}.mp4", split))
            continue
        _add(m, stem, path, index[label_name], label_name, split)
    if outside:  # (the detail is not in the fingerprint: an earlier ingest keeps its own)
        hint = (f" (the video root links to folders outside it, which are not read: {outside[0][0]} -> "
                f"{outside[0][1]}{' ...' if len(outside) > 1 else ''}; if the videos are there, pass --videos-dir)")
        for p in m.problems:
            if p.reason == _d.MISSING:
                p.detail += hint
    return m


# ---------------------------------------------------------------------------------------
# Something-Something v2

def _kinetics_key(row: Dict[str, str]) -> Tuple[str, str, str]:
    """A Kinetics row's video: its YouTube id and segment."""
    return ((row.get("youtube_id") or "").strip(), (row.get("time_start") or "").strip(),
            (row.get("time_end") or "").strip())


def ssv2_class_name(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def ssv2(root: str, annotations: Optional[Sequence[Tuple[Optional[str], str]]] = None,
         labels_file: Optional[str] = None, videos_dir: Optional[str] = None) -> Manifest:
    """SSv2: ``labels.json`` (class name -> id string), ``train.json`` / ``validation.json``
    (lists of ``{"id", "template", ...}``; class = template without brackets); ``<id>.webm``. The
    official names ``something-something-v2-{labels,train,validation}.json`` are found as well. An
    annotation file given without ``SPLIT=`` takes its split from its name (:func:`_split_from_name`)."""
    lab_dirs = [root, os.path.join(root, "labels"), os.path.join(root, "annotations")]
    labels_file = labels_file or _first_existing(
        [os.path.join(d, n) for d in lab_dirs for n in ("labels.json", "something-something-v2-labels.json")],
        "labels.json")
    try:
        with open(labels_file, encoding="utf-8-sig") as f:
            name_to_id = {k: int(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise AdapterError(f"{labels_file}: not a JSON object of class name -> integer id ({exc})") from None
    if any(v < 0 for v in name_to_id.values()) or len(set(name_to_id.values())) != len(name_to_id):
        raise AdapterError(f"{labels_file}: class ids must be distinct integers >= 0")
    n = max(name_to_id.values()) + 1 if name_to_id else 0
    classes = [""] * n
    for k, v in name_to_id.items():
        classes[v] = k
    if not annotations:
        annotations = []
        # the official test file has no labels: it is not looked for
        for split, fname in (("train", "train.json"), ("val", "validation.json")):
            p = _first_existing([os.path.join(d, n) for d in lab_dirs
                                 for n in (fname, "something-something-v2-" + fname)], fname, must=False)
            if p:
                annotations.append((split, p))
        if not annotations:
            raise AdapterError(f"no train.json/validation.json (or something-something-v2-train.json/-validation.json) "
                               f"found under {root} (use --annotations)")
    vdir = videos_dir or (os.path.join(root, "20bn-something-something-v2")
                          if os.path.isdir(os.path.join(root, "20bn-something-something-v2")) else root)
    m = Manifest("ssv2", os.path.abspath(vdir), classes,
                 source={"labels": os.path.abspath(labels_file),
                         "annotations": [os.path.abspath(p) for _, p in annotations]})
    for split_hint, path in annotations:
        split = _norm_split(split_hint) if split_hint else _split_from_name(path, "--annotations")
        try:
            with open(path, encoding="utf-8-sig") as f:
                items = json.load(f)
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise AdapterError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(items, list):
            raise AdapterError(f"{path}: expected a JSON list of {{\"id\", \"template\", ...}} objects, "
                               f"got a {type(items).__name__}")
        if items and not any(isinstance(it, dict) and (it.get("template") or it.get("label")) for it in items):
            # (each entry was an unknown class '', said only after the whole training split was decoded)
            raise AdapterError(f"{path} has no labels (SSv2's test.json is unlabelled): give validation.json as the "
                               "test split (test=validation.json), as configs/ssv2.yaml does")
        for i, it in enumerate(items):
            where = f"{os.path.basename(path)}[{i}]"
            if not isinstance(it, dict):
                m.problems.append(Problem(_d.BAD_LINE, path, None, f"{where}: not an object: {it!r}"[:300], split))
                continue
            vid = "" if it.get("id") is None else str(it["id"]).strip()
            vpath = os.path.join(vdir, vid + ".webm")
            if not os.path.exists(vpath) and os.path.exists(os.path.join(vdir, vid + ".mp4")):
                vpath = os.path.join(vdir, vid + ".mp4")
            if not vid:
                m.problems.append(Problem(_d.BAD_LINE, path, None, f"{where}: no id", split))
                continue
            cname = ssv2_class_name(str(it.get("template", it.get("label", ""))))
            if cname not in name_to_id:
                m.problems.append(Problem(_d.UNKNOWN_CLASS, vpath, vid, f"{where}: class {cname!r}", split))
                continue
            _add(m, vid, vpath, name_to_id[cname], cname, split)
    return m


# ---------------------------------------------------------------------------------------
# DVFL-Net repository lists: "relative/path.avi,<int label>[,<class name>]", with or without a header

# header names accepted for each column (lower-cased); a header-less file is path,label[,class name]
CSV_PATH_COLUMNS = ("path", "video", "video_path", "filename", "file", "relative_path", "clip", "name")
# ("directory_number": the DVFL-Net repository's own csv_writer.py writes "Video Path,Directory Number")
CSV_LABEL_COLUMNS = ("label", "label_id", "class_id", "target", "class_index", "id", "directory_number")
CSV_CLASS_COLUMNS = ("class_name", "class", "label_name", "category", "action")


def _csv_columns(header: List[str], where: str) -> Tuple[int, int, Optional[int]]:
    """(path, label, class name) column indexes of a header row, or an AdapterError naming what is missing."""
    names = [re.sub(r"[\s-]+", "_", h.strip().lower()) for h in header]   # "Video Path" is video_path

    def find(options):
        return next((names.index(o) for o in options if o in names), None)

    path_col, label_col, class_col = find(CSV_PATH_COLUMNS), find(CSV_LABEL_COLUMNS), find(CSV_CLASS_COLUMNS)
    if label_col is not None and label_col == path_col:
        path_col = None
    if path_col is None or label_col is None:
        missing = "a path column (" + "/".join(CSV_PATH_COLUMNS) + ")" if path_col is None else \
            "a label column (" + "/".join(CSV_LABEL_COLUMNS) + ")"
        raise AdapterError(f"{where}: the header row {header} has no {missing}")
    return path_col, label_col, class_col


def _is_int(text: str) -> bool:
    return re.fullmatch(r"\s*-?\d+\s*", text or "") is not None


def _dense_labels(found: Sequence[int], num_classes: Optional[int], n_names: Optional[int],
                  what: str) -> Dict[int, int]:
    """Map the labels the lists use to 0..K-1. Labels already inside 0..K-1 (K = ``num_classes``, the
    class list's length, else the number of distinct labels) stay as they are; otherwise, when the lists
    use exactly K distinct labels (HMDB51's 2..52: 51 classes, not 53), they are numbered in sorted order.
    Anything else is refused: no guess would be right."""
    distinct = sorted(set(found))
    k = n_names if n_names is not None else (num_classes if num_classes else len(distinct))
    if all(0 <= v < k for v in distinct):
        return {v: v for v in distinct}
    if len(distinct) == k:
        return {v: i for i, v in enumerate(distinct)}
    if num_classes and n_names is None and distinct[0] == 0:
        return {v: v for v in distinct}  # 0-based with stray labels: those lines are label_out_of_range
    raise AdapterError(f"{what}: the lists use {len(distinct)} distinct labels ({distinct[0]}..{distinct[-1]}), which "
                       f"are neither inside 0..{k - 1} nor exactly {k} labels to number 0..{k - 1} "
                       f"({'the class list' if n_names is not None else '--num-classes'} says {k} classes)")


def _lists_number_folders_differently(parsed, folder_of) -> Optional[str]:
    """Where each split's list alone files its labels one to one in class folders, but one folder
    has two labels across the lists: where, in words; else None (not a class-folder layout, or
    one numbering)."""
    per_split: Dict[str, Dict[int, Dict[str, str]]] = {}  # split -> label -> folder -> where
    for split, rel, lab, where in parsed:
        if lab >= 0 and "/" in rel:
            per_split.setdefault(split, {}).setdefault(lab, {}).setdefault(folder_of(rel), where)
    for labels in per_split.values():
        folders = [f for fs in labels.values() for f in fs]
        if len(labels) < 2 or any(len(fs) != 1 for fs in labels.values()) or len(set(folders)) != len(folders):
            return None
    first: Dict[str, Tuple[int, str]] = {}  # folder -> (label, where)
    for labels in per_split.values():
        for lab, fs in labels.items():
            (folder, where), = fs.items()
            lab0, where0 = first.setdefault(folder, (lab, where))
            if lab0 != lab:
                return f"folder {folder!r} is label {lab0} at {where0} but label {lab} at {where}"
    return None


def _spelling(name: str) -> str:
    """A class name as compared with a folder's: case, Unicode normalisation and end spaces aside."""
    import unicodedata

    return unicodedata.normalize("NFC", name).strip().casefold()


def _mostly_class_names(folders, classes: List[str]) -> bool:
    """Whether most of ``folders`` are names of ``classes`` (class folders, one perhaps misspelt), not
    folders of another meaning (participants, sessions)."""
    folders, names = list(folders), {_spelling(c) for c in classes}
    return bool(folders) and sum(_spelling(f) in names for f in folders) * 2 > len(folders)


def _folders_of_other_classes(parsed, dense: Dict[int, int], classes: List[str]) -> Optional[str]:
    """Where the lists file each label's videos in one folder named after a class of ``classes``, but
    not the class the label is there: the first such line, in words; else None (folders are not
    class names, or they agree)."""
    for folder_of in (lambda rel: rel.split("/")[0], lambda rel: rel.split("/")[-2]):
        folders: Dict[int, Dict[str, str]] = {}  # class index -> folder -> where
        for _, rel, lab, where in parsed:
            if rel.count("/") >= 1 and lab in dense:
                folders.setdefault(dense[lab], {}).setdefault(folder_of(rel), where)
        if not folders or any(len(f) != 1 for f in folders.values()):
            continue
        names = {i: next(iter(f)) for i, f in folders.items()}
        if len(set(names.values())) != len(names) or not _mostly_class_names(names.values(), classes):
            continue
        for i, folder in sorted(names.items()):
            if i < len(classes) and _spelling(classes[i]) != _spelling(folder):
                return (f"{folders[i][folder]}: a video of folder {folder!r} has the label of class {classes[i]!r} "
                        f"(class {i} of the class list)")
    return None


def dvfl_csv(root: str, annotations: Optional[Sequence[Tuple[Optional[str], str]]] = None,
             num_classes: Optional[int] = None, classes_file: Optional[str] = None) -> Manifest:
    """The DVFL-Net repo's own split lists (not the official splits: train and val share
    actor groups): ``relative/path.avi,<int label>`` lines, optionally a third column with the class
    name, optionally a header row (columns found by name: ``path``/``video``..., ``label``...,
    ``class_name``...). Labels need not start at 0: the labels the lists use are numbered 0..K-1 in
    sorted order (:func:`_dense_labels`). Class names come from ``classes_file`` if given, else from
    the class-name column, else from the first folder of the paths when each label maps to one
    folder, else ``class_<i>``. A list given without ``SPLIT=`` takes its split from its file name
    (:func:`_split_from_name`). Lines have no comments: a ``#`` path is a path."""
    if not annotations:
        annotations = []
        for split, names in (("train", ("train.csv",)), ("val", ("val.csv", "validation.csv")), ("test", ("test.csv",))):
            for d in (root, os.path.join(root, "lists")):
                p = _first_existing([os.path.join(d, nm) for nm in names], "", must=False)
                if p:
                    annotations.append((split, p))
                    break
        if not annotations:
            raise AdapterError(f"no train.csv/val.csv/test.csv under {root} (use --annotations split=FILE)")
    parsed: List[Tuple[str, str, int, str]] = []   # split, rel, label as written, where
    named: Dict[int, Tuple[str, str]] = {}   # label as written -> (class name, where it was first given)
    m = Manifest("dvfl-csv", os.path.abspath(root), [],
                 source={"annotations": [os.path.abspath(p) for _, p in annotations]})
    for split_hint, path in annotations:
        if not os.path.isfile(path):
            raise AdapterError(f"annotation file {path} not found")
        split = _norm_split(split_hint) if split_hint else _split_from_name(path, "--annotations")
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            try:  # (a stray quote makes the rest of the file one field: a traceback)
                rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if any(c.strip() for c in r)]
            except csv.Error as exc:
                raise AdapterError(f"{path}: {exc} (a quote left open?)") from None
        header = None
        if rows and not any(_is_int(c) or _is_video(c.strip()) for c in rows[0][1]):
            # a first row with no number and no video file in it is a header: its names place the columns
            header = _csv_columns(rows[0][1], f"{os.path.basename(path)}:{rows[0][0]}")
            rows = rows[1:]
        path_col, label_col, class_col = header or (0, 1, 2)
        for lineno, r in rows:
            where = f"{os.path.basename(path)}:{lineno}"
            rel = r[path_col].strip().replace("\\", "/") if len(r) > path_col else ""
            lab = r[label_col] if len(r) > label_col else ""
            if not rel or not _is_int(lab) or (header is None and len(r) > 3):
                m.problems.append(Problem(_d.BAD_LINE, os.path.join(root, rel or ",".join(r)), None,
                                          f"{where}: {','.join(r)!r}", split))
                continue
            label = int(lab)
            cname = r[class_col].strip() if class_col is not None and len(r) > class_col else ""
            if cname:
                first = named.setdefault(label, (cname, where))
                if first[0] != cname:
                    raise AdapterError(f"{where}: class_name {cname!r} for label {label}, but {first[1]} names label "
                                       f"{label} {first[0]!r}: one label, two classes")
            parsed.append((split, rel, label, where))
    if not parsed:
        m.classes = []
        return m
    names_file = _class_names(classes_file) if classes_file else None
    in_range = [p[2] for p in parsed if p[2] >= 0]
    for split, rel, lab, where in parsed:
        if lab < 0:
            m.problems.append(Problem(_d.LABEL_OUT_OF_RANGE, os.path.join(root, rel), _strip_ext(rel),
                                      f"{where}: label {lab} is negative", split))
    if not in_range:
        m.classes = []
        return m
    dense = _dense_labels(in_range, num_classes, len(names_file) if names_file is not None else None,
                          "label (column 2)" if not classes_file else f"label vs {os.path.basename(classes_file)}")
    k = len(names_file) if names_file is not None else (num_classes or len(set(in_range)))
    if named and len({named[v][0] for v in named}) != len(named):
        raise AdapterError("class_name: two labels share one class name (" + ", ".join(
            f"{v}: {named[v][0]!r}" for v in sorted(named, key=lambda v: (named[v][0], v))) + ")")
    for folder_of in (lambda rel: rel.split("/")[0], lambda rel: rel.split("/")[-2]):
        if named and all(v in named for v in dense):
            break  # a class-name column naming every label is the numbering: folders may be anything (participants)
        if names_file is not None and not _mostly_class_names({folder_of(rel) for _, rel, _, _ in parsed if "/" in rel},
                                                              names_file):
            continue  # folders that are not the class file's names say nothing of its numbering
        why = _lists_number_folders_differently(parsed, folder_of)
        if why:  # (silently: labels that mean one class in train, another in test)
            raise AdapterError(f"the lists number the classes differently: {why}. Lists written one by one "
                               "(e.g. DVFL-Net's csv_writer.py per split folder) must share one numbering: "
                               "renumber them from one class list")
    if names_file is not None:
        classes = names_file
        for v in sorted(named):  # the lists' own names must agree: a shifted numbering files every video wrongly
            i = dense.get(v)
            if i is not None and i < len(classes) and classes[i] != named[v][0]:
                raise AdapterError(f"{named[v][1]}: class_name {named[v][0]!r} for label {v}, but label {v} is "
                                   f"{classes[i]!r} in {os.path.basename(classes_file)} (class {i} of the labels "
                                   f"{min(dense)}..{max(dense)} the lists use): number the lists as the class list, "
                                   "or leave --classes out to take the lists' names")
        misfiled = _folders_of_other_classes(parsed, dense, classes)
        if misfiled:  # (the class list sorted, the lists numbered in folder walk order: every video misnamed)
            raise AdapterError(f"{misfiled}: number the lists as {os.path.basename(classes_file)}, or leave --classes "
                               "out to take the class folders' names")
    elif named:
        by_dense = {dense[v]: named[v][0] for v in named if v in dense and dense[v] < k}
        classes = [by_dense.get(i, f"class_{i:03d}") for i in range(k)]
    else:
        # the folder naming each label's videos: the first one (Class/v.avi), else the file's own
        # (hmdb51/train/brush_hair/v.avi, as DVFL-Net's csv_writer.py writes them)
        classes = [f"class_{i:03d}" for i in range(k)]
        for folder_of in (lambda rel: rel.split("/")[0], lambda rel: rel.split("/")[-2]):
            folders: Dict[int, set] = {}
            for _, rel, lab, _ in parsed:
                if "/" in rel and lab in dense:
                    folders.setdefault(dense[lab], set()).add(folder_of(rel))
            if all(len(folders.get(i, ())) == 1 for i in range(k)):
                names = [next(iter(folders[i])) for i in range(k)]
                if len(set(names)) == k:
                    classes = names
                    break
    m.classes = classes
    m.source["labels"] = {"as_written": [min(dense), max(dense)], "classes": len(classes),
                          "renumbered": any(a != b for a, b in dense.items())}
    for split, rel, lab, where in parsed:
        if lab < 0:
            continue
        path = os.path.join(root, rel)
        i = dense[lab]
        if not 0 <= i < len(classes):
            m.problems.append(Problem(_d.LABEL_OUT_OF_RANGE, path, _strip_ext(rel),
                                      f"{where}: label {lab} not in 0..{len(classes) - 1}", split))
            continue
        _add(m, _strip_ext(rel), path, i, classes[i], split)
    return m


# ---------------------------------------------------------------------------------------
# plain folder-per-class

# how --test-fraction/--val-fraction draw a folder's splits: 1 (before session 52) video by video, so
# cuts of one recording fell on both sides; 2 per class, whole recordings (dvfl.data.holdout's groups)
FOLDER_SPLIT_RULE = 2


def fraction_splits(video_ids: Sequence[str], labels: Sequence[int], test_fraction: float,
                    val_fraction: float) -> Tuple[Dict[str, str], List[str]]:
    """Each video's split (rule 2): per class, whole groups of videos (cuts of one recording,
    :func:`dvfl.data.holdout.class_groups`) ranked by a stable hash of the group's name, ``round(fraction x
    groups)`` of them (at least one, while the class keeps a training group) to test, then to val from
    the rest; the same on every ingest whatever ``--seed``. And a note per split that took part of a
    name too large to draw whole."""
    from .holdout import carve_note, holdout_videos

    split, notes = dict.fromkeys(video_ids, "train"), []
    for name, fraction, of_rest in (("test", test_fraction, 1.0), ("val", val_fraction, 1.0 - test_fraction)):
        rest = [(v, c) for v, c in zip(video_ids, labels) if split[v] == "train"]
        if fraction and rest:
            ids, classes = [v for v, _ in rest], [c for _, c in rest]
            held = holdout_videos(ids, classes, fraction / of_rest, salt=f"dvfl-folder-{name}")
            for v in held:
                split[v] = name
            note = carve_note(ids, classes, fraction / of_rest, held, side=name,
                              fix="give the splits as root/{train,val,test}/<class>/ folders of whole recordings")
            if note:
                notes.append(f"--{name}-fraction: {note}")
    return split, notes


def _fraction_split(video_id: str, test_fraction: float, val_fraction: float) -> str:
    """A video's split under rule 1 (kept for the ingests it made): drawn from a stable hash of its id
    alone, whatever ``--seed`` (the views' seed: with it, a re-ingest moved test videos a teacher had
    trained on into train). Seed 0's draw, which every earlier ingest of the default seed made."""
    u = stable_seed("dvfl-folder-split", 0, video_id) / 2.0 ** 63
    return "test" if u < test_fraction else ("val" if u < test_fraction + val_fraction else "train")


def folder(root: str, test_fraction: float = 0.0, val_fraction: float = 0.0) -> Manifest:
    """``root/<class>/**/<video>`` (all ``train`` unless fractions are given: :func:`fraction_splits`
    draws whole recordings per class), or ``root/{train,val,test}/<class>/**/<video>``."""
    if not os.path.isdir(root):
        raise AdapterError(f"--root {root} is not a directory")
    top = _subfolders(root)
    # split folders by their meaning, not their spelling: Train/ and Test/ were read as two classes
    split_of = {d: _norm_split(d) for d in top if _norm_split(d) in ("train", "val", "test")}
    split_dirs = sorted(split_of)
    others = [d for d in top if d not in split_of]
    if split_dirs and others:  # split folders' classes would be read and these folders never looked at
        raise AdapterError(f"--root {root} has split folders ({', '.join(split_dirs)}) and other folders "
                           f"({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}): lay it out as "
                           "root/<class>/... or as root/{train,val,test}/<class>/... (a class named "
                           f"{split_dirs[0]!r}: rename its folder)")
    twice = sorted({s for s in split_of.values() if list(split_of.values()).count(s) > 1})
    if twice:
        raise AdapterError(f"--root {root}: more than one folder is the {twice[0]} split "
                           f"({', '.join(d for d in split_dirs if split_of[d] == twice[0])}): merge them")
    if split_dirs and (test_fraction or val_fraction):  # (ignored, and recorded in dataset.json as if applied)
        raise AdapterError(f"--root {root} has split folders ({', '.join(split_dirs)}): they give the splits; "
                           "leave out --test-fraction/--val-fraction")
    bases = [(split_of[d], os.path.join(root, d)) for d in split_dirs] if split_dirs else [(None, root)]
    folders = sorted({d for _, b in bases for d in _subfolders(b)})
    # train/Café (NFC, Linux) and test/Café (NFD, a Mac's copy), train/Run and test/run: two classes,
    # the test videos' labels ones no training video had
    spelt = {}
    for c in folders:
        spelt.setdefault(_spelling(c), []).append(c)
    same = next((names for names in spelt.values() if len(names) > 1), None)
    if same:
        raise AdapterError(f"--root {root}: class folders {' and '.join(map(repr, same))} differ only in letter case "
                           "or Unicode normalisation, or spaces at an end (copied from another system?): give them one "
                           "spelling")
    _refuse_class_links(root, bases, folders)
    # every class folder's videos, (path, id), before any is a class: a folder holding no video file (notes,
    # stills, nothing) was a class no video teaches, an output the model could never be trained to give
    walked: Dict[Tuple[Optional[str], str], Tuple[str, List[Tuple[str, str]], List[Tuple[str, str]]]] = {}
    for split_dir, base in bases:
        for d in _subfolders(base):
            cdir, videos, outside = os.path.join(base, d), [], []
            for dirpath, dirs, names in _walk(cdir, cdir, outside):
                found = [n for n in names if _is_video(n)]
                for n, last in zip(found, _id_parts(found)):
                    videos.append((os.path.join(dirpath, n),
                                   os.path.relpath(os.path.join(dirpath, last), root).replace(os.sep, "/")))
            walked[(split_dir, d)] = (cdir, videos, outside)
    classes = sorted({d for (_, d), (_, videos, _) in walked.items() if videos})
    looked_for = f"looked for {', '.join(_d.VIDEO_EXTENSIONS)}"
    train_base = next((b for s, b in bases if s == "train"), None)
    if train_base is not None:
        trained = {d for (s, d), (_, videos, _) in walked.items() if s == "train" and videos}
        untrained = [(s, d) for (s, d), (_, videos, _) in walked.items() if s in ("val", "test") and videos
                     and d not in trained]
        if untrained:  # (a class no training video teaches: a misspelt folder, every video of it scored wrong)
            s, d = untrained[0]
            if os.path.isdir(os.path.join(train_base, d)):  # (train/Jump/notes.txt passed as "a train/ folder")
                raise AdapterError(f"--root {root}: class folder {s}/{d!r} has videos but {os.path.join(train_base, d)} "
                                   f"holds no video file ({looked_for}): no training video teaches it; add its "
                                   "training videos there, or move the class out of the dataset")
            raise AdapterError(f"--root {root}: class folder {s}/{d!r} has no train/ folder: no training video teaches "
                               "it (a misspelt folder name?); give it the spelling of its train/ folder, or add its "
                               "training videos")
    if not classes:  # (Ray started, every input "rejected", an empty rejects file, and the next run refused)
        top_videos = [n for _, b in bases for n in os.listdir(b) if _is_video(n)]
        raise AdapterError(f"--root {root}: no video file in a class folder ({looked_for}; "
                           + (f"{len(top_videos)} beside the class folders: put them in root/<class>/)"
                              if top_videos else "a video's class is the folder holding it: root/<class>/*.mp4)"))
    if len(classes) < 2:  # (every model scores 100 % and distillation has nothing to teach)
        inner = _subfolders(os.path.join(root, classes[0])) if not split_dirs else []
        hint = ("add a class folder" if split_dirs else f"is --root one level too high? found one folder {classes[0]!r}"
                + (f", holding the folders {', '.join(map(repr, inner[:5]))}{' ...' if len(inner) > 5 else ''}: "
                   f"--root {os.path.join(root, classes[0])}" if len(inner) > 1 else "; else add a class folder"))
        raise AdapterError(f"--root {root}: one class ({classes[0]!r}); a classifier needs at least 2: {hint}")
    # (an empty test/Jump of a class train/ teaches is that class's missing test videos, not a non-class)
    empty = sorted(os.path.relpath(cdir, root) for (_, d), (cdir, videos, _) in walked.items()
                   if not videos and d not in classes)
    unfilled = sorted(os.path.relpath(cdir, root) for (_, d), (cdir, videos, _) in walked.items()
                      if not videos and d in classes)
    m = Manifest("folder", os.path.abspath(root), classes,
                 source={"split_dirs": split_dirs, "test_fraction": test_fraction, "val_fraction": val_fraction})
    if empty:
        m.notes.append(f"{len(empty)} class folder(s) hold no video file and are not classes ({', '.join(empty[:5])}"
                       f"{', ...' if len(empty) > 5 else ''}; {looked_for})")
    if unfilled:
        m.notes.append(f"{len(unfilled)} split folder(s) of a class hold no video file ({', '.join(unfilled[:5])}"
                       f"{', ...' if len(unfilled) > 5 else ''}): that split says nothing of those classes")
    drawn_split: Dict[str, str] = {}
    if test_fraction or val_fraction:
        listed = [(vid, classes.index(d)) for (_, d), (_, videos, _) in walked.items() for _, vid in videos]
        drawn_split, split_notes = fraction_splits([v for v, _ in listed], [c for _, c in listed],
                                                   test_fraction, val_fraction)
        m.notes.extend(split_notes)
        m.source["split_rule"] = FOLDER_SPLIT_RULE
        m.earlier_splits = {v: _fraction_split(v, test_fraction, val_fraction) for v, _ in listed}
    for (split_dir, d), (cdir, videos, outside) in walked.items():
        for path, vid in videos:
            _add(m, vid, path, classes.index(d), d, split_dir or drawn_split.get(vid, "train"))
        _linked_folder_problems(m, outside, cdir, split_dir)
    if test_fraction or val_fraction:  # (whole recordings per class: a class of one video has no test video)
        drawn = Counter((e.label, e.split) for e in m.entries)
        for split, fraction in (("test", test_fraction), ("val", val_fraction)):
            lacking = [c for i, c in enumerate(classes) if fraction and not drawn[(i, split)]]
            if lacking:
                m.notes.append(f"{len(lacking)} class(es) drew no {split} video ({', '.join(lacking[:5])}"
                               f"{', ...' if len(lacking) > 5 else ''}): --test-fraction/--val-fraction draw whole "
                               "recordings per class (rec7_001, rec7_002 or rec7/001, rec7/002 stay together, and a "
                               f"class keeps one for training), too few here, and the {split} score says nothing of "
                               "them; add videos to those classes, or give the splits as root/{train,val,test}/<class>/")
    # a video beside the class folders has no class: a reject, not silently left out of "inputs"
    # (outside the ingest fingerprint: an ingest made before these were listed keeps its own)
    for split_dir, base in ([(None, root)] if split_dirs else []) + bases:
        loose = sorted(n for n in os.listdir(base) if _is_video(n) and os.path.isfile(os.path.join(base, n)))
        for n, last in zip(loose, _id_parts(loose)):
            vid = os.path.relpath(os.path.join(base, last), root).replace(os.sep, "/")
            m.problems.append(Problem(_d.NO_CLASS, os.path.join(base, n), vid,
                                      "not inside a class folder: no label (move it into one)", split_dir or "train"))
    return m


# ---------------------------------------------------------------------------------------
# unlabelled videos

def unlabeled(dir_or_list: str, pool: int = 0) -> Manifest:
    """Videos without labels: a folder tree (every video file under it) or a text file with
    one path per line (relative to the list's folder, or absolute; no comments: a line starting with
    ``#`` is a path). The pool's root is the folder,
    or the list's folder: entries whose real path is elsewhere are ``outside_root``. Entries get
    ``label=None``, ``class_name=None``, ``split="unlabeled"`` and
    ``video_id = "unlabeled/" + <path relative to the folder/list, without extension>``; the
    extension stays where two files of the pool differ only by it (``x.mp4``, ``x.avi``), and the
    ``pool``-th pool (from 0, ``--unlabeled`` given more than once) has ``pool<N>/`` after
    ``unlabeled/`` for N > 0, so that different videos never share an id."""
    if os.path.isdir(dir_or_list):
        base = os.path.abspath(dir_or_list)
        paths, outside = [], []
        for dirpath, dirs, names in _walk(base, base, outside):
            paths += [os.path.join(dirpath, n) for n in names if _is_video(n)]
    elif os.path.isfile(dir_or_list):
        base, outside = os.path.dirname(os.path.abspath(dir_or_list)), []
        paths = [ln if os.path.isabs(ln) else os.path.join(base, ln) for _, ln in _read_lines(dir_or_list)]
    else:
        raise AdapterError(f"--unlabeled {dir_or_list}: no such folder or list file")
    if not paths and not outside:  # (a wrong folder made a pool of nothing, silently)
        raise AdapterError(f"--unlabeled {dir_or_list}: " + ("no video files in it (looked for "
                           f"{', '.join(_d.VIDEO_EXTENSIONS)})" if os.path.isdir(dir_or_list) else "lists no video"))
    m = Manifest("unlabeled", base, [], source={"unlabeled": os.path.abspath(dir_or_list)})
    rels = [os.path.relpath(p, base).replace(os.sep, "/") for p in paths]
    prefix = "unlabeled/" + (f"pool{pool}/" if pool else "")
    for p, vid in zip(paths, _id_parts(rels)):
        _add(m, prefix + vid, p, None, None, "unlabeled")
    _linked_folder_problems(m, outside, base, "unlabeled", prefix)
    if not m.entries:  # (every line rejected, e.g. outside_root: an ingest that "succeeded" with no pool)
        first = m.problems[0]
        outside = all(q.reason == _d.OUTSIDE_ROOT for q in m.problems)
        hint = ("" if not outside else f"; the pool's root is {base}, the list's own folder: put the list in a folder "
                "above its videos" if os.path.isfile(dir_or_list) else f"; links out of {base} are not followed")
        raise AdapterError(f"--unlabeled {dir_or_list}: none of its {len(m.problems)} videos can be taken (e.g. "
                           f"{first.reason}: {first.detail}){hint}")
    return m


def build_manifest(dataset: str, root: str, split: int = 1, *, annotations=None, lists_dir=None,
                   videos_dir=None, classes_file=None, num_classes=None, test_fraction: float = 0.0,
                   val_fraction: float = 0.0) -> Manifest:
    """Dispatch on the dataset name (``synthetic`` is handled by ingest as ``ucf101`` after generating)."""
    m = _manifest_of(dataset, root, split, annotations=annotations, lists_dir=lists_dir, videos_dir=videos_dir,
                     classes_file=classes_file, num_classes=num_classes, test_fraction=test_fraction,
                     val_fraction=val_fraction)
    if len(m.classes) < 2 and dataset != "synthetic":  # (folder refuses earlier, with its own hints)
        names = f" ({m.classes[0]!r})" if m.classes else ""
        where = {"ucf50": "class folders", "kinetics": "labels in the annotations (or --classes)",
                 "ssv2": "labels in --classes", "dvfl-csv": "labels (or --num-classes / --classes)"}.get(
                     dataset, "classes in its class list")
        raise AdapterError(f"--root {root}: {dataset} found {len(m.classes)} class{'' if len(m.classes) == 1 else 'es'}"
                           f"{names}; a classifier needs at least 2 (every model scores 100 % on one): check the "
                           f"{where}")
    return m


def _manifest_of(dataset: str, root: str, split: int, *, annotations, lists_dir, videos_dir, classes_file,
                 num_classes, test_fraction: float, val_fraction: float) -> Manifest:
    if dataset in ("ucf101", "synthetic"):
        m = ucf101(root, split, lists_dir=lists_dir, videos_dir=videos_dir)
        m.dataset = dataset
        return m
    if dataset == "hmdb51":
        return hmdb51(root, split, lists_dir=lists_dir, videos_dir=videos_dir)
    if dataset == "ucf50":
        return ucf50(root, split)
    if dataset == "kinetics":
        return kinetics(root, annotations, videos_dir=videos_dir, classes_file=classes_file)
    if dataset == "ssv2":
        return ssv2(root, annotations, labels_file=classes_file, videos_dir=videos_dir)
    if dataset == "dvfl-csv":
        return dvfl_csv(root, annotations, num_classes=num_classes, classes_file=classes_file)
    if dataset == "folder":
        return folder(root, test_fraction=test_fraction, val_fraction=val_fraction)
    raise AdapterError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
