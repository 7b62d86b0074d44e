"""Per-video decoding: container sanity checks, decord decode, sampling, resize.

:func:`decode_video` is the whole per-video job. It is a pure function of the file and
the job parameters and runs inside a disposable child process (see
:mod:`dvfl.data.worker`), because decord can hang while holding the GIL or crash
the process on a bad file; the parent kills the child on a time limit.

This module is imported both as ``dvfl.data.decode`` and as a top-level module
``decode`` by ``_decode_child.py`` (which avoids importing the heavy ``dvfl``
package, whose ``__init__`` imports torch). Keep its imports to stdlib, numpy,
PIL, decord, PyAV (headers, and the frames of a turned video that decord refuses) and the
sibling :mod:`sampling`.
"""
from __future__ import annotations

import functools
import os
import re
import struct
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

try:  # package import
    from . import sampling
except ImportError:  # top-level import inside the decode child
    import sampling  # type: ignore[no-redef]

# ---------------------------------------------------------------------------------------
# reject reasons (stable strings: they appear in rejects files and summaries)
MISSING = "missing"              # listed / given but no such file
UNREADABLE = "unreadable"        # there, but this process may not read it (permissions, I/O error)
EMPTY = "empty"                  # 0 bytes, or a container with 0 frames
NOT_VIDEO = "not_video"          # a text file, not a video
UNKNOWN_CONTAINER = "unknown_container"  # binary, but not one of the supported containers (magic bytes)
PLAYLIST = "playlist"            # an HLS/DASH/concat/SDP text that makes FFmpeg open other files or URLs
CORRUPT = "corrupt"              # a video container whose demux/decode fails
NO_VIDEO_STREAM = "no_video_stream"  # a container with no video stream (an audio-only .mp4/.m4a)
TRUNCATED = "truncated"          # container declares more bytes than the file holds (a stream: ends mid-packet)
BAD_FRAME_SIZE = "bad_frame_size"  # frames whose aspect ratio no camera makes (a forged or broken header)
TOO_SHORT = "too_short"          # fewer decodable frames than --min-frames
TOO_LONG = "too_long"            # over the caller's length limit (serve's max_video_seconds, predict --stream's --max-frames)
TIMEOUT = "timeout"              # the decoder exceeded --timeout-per-file (child killed)
DECODER_CRASH = "decoder_crash"  # the decoder process died (segfault/abort) on this file
DECODER_KILLED = "decoder_killed"  # the decoder process was SIGKILLed twice (OOM killer) on this file
# manifest-level reasons, produced by the adapters
UNKNOWN_CLASS = "unknown_class"
NO_CLASS = "no_class"              # a folder dataset's video beside the class folders, in none of them
LINKED_FOLDER = "linked_folder"    # a linked folder that leaves its class folder or pool: its videos are not read
LABEL_OUT_OF_RANGE = "label_out_of_range"
LABEL_MISMATCH = "label_mismatch"
BAD_LINE = "bad_line"
UNTRIMMED = "untrimmed"            # a Kinetics row whose only file is <youtube_id>.*, not its segment
DUPLICATE = "duplicate"
OUTSIDE_ROOT = "outside_root"    # the entry's real path (symlinks resolved) is outside its root
DUPLICATE_CONTENT = "duplicate_content"  # same bytes as another entry (another id, split or pool)

# The containers decoded (magic bytes, :func:`probe_container`): everything else is refused
# before FFmpeg sees it, so its other demuxers (HLS, concat, SDP, image2 ...) never run.
CONTAINERS = ("mp4", "avi", "matroska", "mpeg-ts", "mpeg-ps", "flv", "ogg", "asf")
# Text that FFmpeg would follow to other files or URLs (after an optional BOM/whitespace).
_PLAYLIST_HEADS = (b"#extm3u", b"ffconcat", b"[playlist]", b"<mpd", b"<smil", b"v=0", b"#ext-x",
                   b"rtsptext", b"rtmp://", b"http://", b"https://", b"file:")

# The revision of the rules that decide which frames a video's clips store, in every ingest's
# fingerprint: bump it with every change to the frames stored, or the clips of an earlier version are
# reused as they are. 1 (session 48): FFmpeg's in-order decode for AVIs with B-frames, H.264 & co. in
# AVI, MPEG-4 Part 2 with B-frames in MP4/Matroska, WMV/ASF, mid-GOP starts (VP8/VP9 too), an MP4's
# second video track, damaged packets (sessions 42-47); earlier ingests name none.
DECODE_RULES = 1

# (.asf, .3g2 and .f4v: containers of CONTAINERS that the folder layouts skipped, a root of them "no video")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".asf", ".3gp", ".3g2", ".f4v", ".ogv", ".ts", ".mts", ".m2ts", ".vob")

# test hooks (honest simulation of decoder failure modes; only active when a job has
# ``test_hooks=True``, which the ingest library sets only when asked explicitly)
TEST_HANG_MAGIC = b"DVFL-TEST-HANG"
TEST_CRASH_MAGIC = b"DVFL-TEST-CRASH"
TEST_URL_MAGIC = b"DVFL-TEST-URL "


class DecodeReject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# a frame's long side over its short side: panoramas are 2:1, ultra-wide cinema 2.8:1; an 8x16384
# header (forged in a few-KB upload) asked for 524288x256 frames at short side 256, 3 GiB for 8 of them
MAX_ASPECT = 8


def stored_hw(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """:func:`dvfl.data.sampling.resized_hw`, refusing (:class:`DecodeReject`) frames whose aspect
    ratio is beyond :data:`MAX_ASPECT`, before anything of that size is allocated."""
    if max(height, width) > MAX_ASPECT * max(1, min(height, width)):
        raise DecodeReject(BAD_FRAME_SIZE, f"{width}x{height} frames: an aspect ratio over {MAX_ASPECT}:1")
    return sampling.resized_hw(height, width, short_side)


# ---------------------------------------------------------------------------------------
# container probing: cheap structural checks before handing the file to the decoder

def _ebml_vint(buf: bytes, pos: int, keep_marker: bool) -> Tuple[Optional[int], int]:
    """Read an EBML variable-size integer. Returns (value or None for 'unknown size', new pos)."""
    if pos >= len(buf):
        raise ValueError("eof")
    first = buf[pos]
    length = 1
    mask = 0x80
    while length <= 8 and not first & mask:
        mask >>= 1
        length += 1
    if length > 8 or pos + length > len(buf):
        raise ValueError("bad vint")
    value = first if keep_marker else first & (mask - 1)
    all_ones = (first & (mask - 1)) == (mask - 1)
    for b in buf[pos + 1:pos + length]:
        value = (value << 8) | b
        all_ones = all_ones and b == 0xFF
    if not keep_marker and all_ones:
        return None, pos + length
    return value, pos + length


def probe_container(path: str) -> Tuple[str, Optional[str]]:
    """Identify the container from magic bytes and check declared sizes against the file size.

    Returns ``(kind, problem)``: kind is one of :data:`CONTAINERS` (``mp4`` covers MOV/M4V/3GP,
    ``matroska`` WebM), ``playlist``, ``text`` or ``unknown``; problem is ``None``,
    :data:`EMPTY`, :data:`TRUNCATED`, :data:`CORRUPT`, :data:`PLAYLIST`, :data:`NOT_VIDEO` or
    :data:`UNKNOWN_CONTAINER`. Only a known container without a problem reaches the decoder:
    FFmpeg's own probing would also accept playlists that make it open other files or URLs.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "unknown", EMPTY
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
            return "mp4", _check_mp4_boxes(f, size)
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        declared = struct.unpack("<I", head[4:8])[0] + 8
        return "avi", (TRUNCATED if declared > size else None)
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska", _check_matroska(head, path, size)
    # MPEG-TS: 188-byte packets, each starting with the sync byte 0x47 (three in a row); a file
    # ending inside a packet was cut short (a stream declares no length: the only sign of a cut)
    if len(head) >= 2 * 188 + 1 and all(head[i] == 0x47 for i in (0, 188, 376)):
        return "mpeg-ts", (TRUNCATED if size % 188 else None)
    # M2TS (camcorders' .mts/.m2ts): 192-byte packets, a 4-byte timestamp before each sync byte
    if len(head) >= 2 * 192 + 5 and all(head[i] == 0x47 for i in (4, 196, 388)):
        return "mpeg-ts", (TRUNCATED if size % 192 else None)
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg-ps", None
    if head[:3] == b"FLV":
        return "flv", None
    if head[:4] == b"OggS":
        return "ogg", None
    if head[:4] == b"\x30\x26\xb2\x75":
        return "asf", None
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.lower().startswith(_PLAYLIST_HEADS):
        return "playlist", PLAYLIST
    # XML: a DASH manifest or SMIL playlist by its root element; other XML (an object store's
    # <Error> body saved under a video's name by a failed download) is text, not a playlist
    if text.lower().startswith(b"<?xml") and re.search(rb"<(mpd|smil)\b", text[:4096].lower()):
        return "playlist", PLAYLIST
    if _looks_like_text(head):
        return "text", NOT_VIDEO
    return "unknown", UNKNOWN_CONTAINER


def _looks_like_text(head: bytes) -> bool:
    sample = head[:4096]
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(sample) - 4:  # not just a character cut at the end of the sample
            return False
    return not any(b < 9 or 13 < b < 32 for b in sample if b != 27)


def _check_mp4_boxes(f, size: int) -> Optional[str]:
    """Walk the top-level ISO-BMFF boxes; a box reaching past EOF means a truncated file."""
    pos = 0
    have_moov = False
    while pos < size:
        f.seek(pos)
        hdr = f.read(16)
        if len(hdr) < 8:
            return TRUNCATED
        box_size = struct.unpack(">I", hdr[:4])[0]
        box_type = hdr[4:8]
        if box_size == 1:
            if len(hdr) < 16:
                return TRUNCATED
            box_size = struct.unpack(">Q", hdr[8:16])[0]
        elif box_size == 0:  # box extends to EOF
            box_size = size - pos
        if box_size < 8:
            return CORRUPT
        if box_type == b"moov":
            have_moov = True
        if pos + box_size > size:
            return TRUNCATED
        pos += box_size
    return None if have_moov else TRUNCATED


def _check_matroska(head: bytes, path: str, size: int) -> Optional[str]:
    try:
        _, p = _ebml_vint(head, 0, keep_marker=True)          # EBML header id
        hsize, p = _ebml_vint(head, p, keep_marker=False)
        if hsize is None:
            return CORRUPT
        p += hsize
        seg_id, p = _ebml_vint(head, p, keep_marker=True)
        if seg_id != 0x18538067:
            return CORRUPT
        seg_size, p = _ebml_vint(head, p, keep_marker=False)
    except ValueError:
        return TRUNCATED if size < 64 else CORRUPT
    if seg_size is not None and p + seg_size > size:
        return TRUNCATED
    return None


# ---------------------------------------------------------------------------------------

def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames (N, h, w, 3) to (N, height, width, 3): antialiased bilinear (PIL)."""
    n, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    from PIL import Image

    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(frames[i]).resize((width, height), Image.BILINEAR))
    return out


def coded_size(path: str) -> Optional[Tuple[int, int]]:
    """``(height, width)`` of the first video stream from the container headers, or ``None``
    when it cannot be read (the caller then resizes after decoding). MP4/MOV: the sample entry
    of the first video track (:func:`mp4_video_track`, cheap); other containers: PyAV, whose
    open probes the streams (costly next to a small clip's decode; docs/ingest.md)."""
    track = mp4_video_track(path)
    if track is not None:
        return track[0], track[1]
    probe = _pyav_probe(path)
    return probe.size if probe else None


class StreamProbe(NamedTuple):
    size: Optional[Tuple[int, int]]  # (height, width) as stored
    rotation: int                    # from the stream's `rotate` tag, as decord reads it
    b_vops: bool                     # MPEG-4 Part 2 with B-frames (only looked for when asked)
    codec: str = ""                  # FFmpeg's decoder name


# Codecs whose AVI files decord seeks to other frames (their timestamps are shifted against the
# decode order: H.264 in AVI came out as frames 1, 16, 1, 16, ... even without B-frames)
AVI_REORDERING_CODECS = {"h264", "hevc", "mpeg2video", "mpeg1video", "vp9", "av1"}


def _av():
    """PyAV with FFmpeg's own log lines off: a file's damage is reported as its reject reason,
    not as decoder chatter on the user's terminal (predict and serve decode in-process)."""
    import av
    import av.logging

    av.logging.set_level(av.logging.PANIC)
    return av


def _pyav_probe(path: str, b_vops: bool = False) -> Optional[StreamProbe]:
    """The first video stream of a file as PyAV opens it, or ``None``."""
    try:
        with _av().open(path) as container:
            stream = container.streams.video[0]
            cc = stream.codec_context
            h, w = int(cc.height), int(cc.width)
            rotation = _tag_rotation(stream)
            found = b_vops and cc.name == "mpeg4" and _has_b_vops(container, stream)
        return StreamProbe((h, w) if h > 0 and w > 0 else None, rotation, found, cc.name)
    except Exception:
        return None


def _tag_rotation(stream) -> int:
    """A stream's ``rotate`` tag (clockwise degrees, FFmpeg 4's way of writing the display matrix,
    e.g. in Matroska; decord obeys it) as :func:`rotation_degrees` gives it; 0 if not a quarter turn."""
    tag = {k.lower(): v for k, v in stream.metadata.items()}.get("rotate", "0")
    try:
        degrees = float(tag)
    except ValueError:
        return 0
    return int(-degrees) % 360 if degrees % 90 == 0 else 0


def _has_b_vops(container, stream, packets: int = 64) -> bool:
    """Whether an MPEG-4 Part 2 stream (Xvid/DivX) holds B-frames, from the coding type of the VOP
    headers in its first packets (no decoding): decord seeks such AVIs to the wrong frames."""
    for i, packet in enumerate(container.demux(stream)):
        data = bytes(packet)
        at = data.find(b"\x00\x00\x01\xb6")
        while 0 <= at < len(data) - 4:
            if data[at + 4] >> 6 == 2:  # vop_coding_type: 0 I, 1 P, 2 B, 3 S
                return True
            at = data.find(b"\x00\x00\x01\xb6", at + 4)
        if i >= packets:
            break
    return False


def _iter_boxes(buf: bytes, start: int, end: int):
    """``(type, payload_start, box_end)`` of the ISO-BMFF boxes in ``buf[start:end]``."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", buf[pos:pos + 8])
        head = 8
        if size == 1:
            if pos + 16 > end:
                return
            size, head = struct.unpack(">Q", buf[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            return
        yield kind, pos + head, pos + size
        pos += size


def _read_moov(path: str, max_moov: int) -> Optional[bytes]:
    fsize = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos + 8 <= fsize:
            f.seek(pos)
            hdr = f.read(16)
            size, kind = struct.unpack(">I4s", hdr[:8])
            if size == 1:
                size = struct.unpack(">Q", hdr[8:16])[0]
            elif size == 0:
                size = fsize - pos
            if size < 8:
                return None
            if kind == b"moov":
                if size > max_moov:
                    return None
                f.seek(pos)
                return f.read(size)
            pos += size
    return None


def _matrix_2x2(buf: bytes, at: int) -> Tuple[float, float, float, float]:
    """``a, b, c, d`` (16.16 fixed point) of an ISO-BMFF transformation matrix starting at ``at``."""
    a, b, _, c, d = struct.unpack(">5i", buf[at:at + 20])
    return a / 65536.0, b / 65536.0, c / 65536.0, d / 65536.0


def _header_matrix(buf: bytes, payload: int, v0_offset: int, v1_offset: int) -> Tuple[float, float, float, float]:
    """The matrix of a ``tkhd``/``mvhd`` box whose payload starts at ``payload`` (version 0 or 1 layout)."""
    return _matrix_2x2(buf, payload + (v1_offset if buf[payload] == 1 else v0_offset))


def rotation_degrees(a: float, b: float, c: float, d: float) -> int:
    """The display rotation of the 2x2 matrix ``[[a, b], [c, d]]`` (ISO-BMFF order: x' = a x + c y),
    counter-clockwise degrees in {0, 90, 180, 270}, as FFmpeg reads it (``av_display_rotation_get``
    negated: a phone's portrait video, a = d = 0, b = 1, c = -1, is shown turned 90 degrees
    clockwise = 270 here). 0 for a mirrored matrix or one not turned by a multiple of 90 degrees,
    which are left as stored (docs/data-format.md)."""
    import math

    if a * d - b * c <= 0:
        return 0
    angle = -math.degrees(math.atan2(b, a)) % 360
    k = round(angle / 90) % 4
    return 90 * k if abs(angle - 90 * round(angle / 90)) < 1 else 0


class Mp4Track(NamedTuple):
    height: int
    width: int
    rotation: int       # display rotation, counter-clockwise degrees (:func:`rotation_degrees`)
    mirrored: bool      # the display matrix mirrors: decord turns such frames instead (docs/data-format.md)
    trimmed: bool       # an edit list hides frames that decord would count and seek into
    codec: str = ""     # the sample entry's type: avc1, hvc1, mp4v (MPEG-4 Part 2), ...
    data_end: int = 0   # where the track's last chunk of frames ends in the file (0: its tables unreadable)
    more_video: bool = False  # another video track follows (decord may pick it: a dual-camera file)


def mp4_video_track(path: str, max_moov: int = 64 << 20) -> Optional[Tuple[int, int, int]]:
    """``(height, width, rotation)`` of an MP4/MOV file's first video track (:func:`mp4_track`)."""
    track = mp4_track(path, max_moov)
    return None if track is None else (track.height, track.width, track.rotation)


def _u32s(buf: bytes, at: int, count: int) -> Tuple[int, ...]:
    return struct.unpack(f">{count}I", buf[at:at + 4 * count])


def _sample_count(moov: bytes, stbl: dict, file_size: int) -> int:
    """The track's sample count (``stsz``/``stz2``), refused (ValueError) where it claims more samples
    than the bytes that must hold them: a few-KB file could otherwise make the timing tables
    below expand to gigabytes."""
    if b"stsz" in stbl:
        start, end = stbl[b"stsz"]
        size, count = _u32s(moov, start + 4, 2)
        # a size per sample, or one for all (no video frame is under 64 bytes: a forged size of 1 let a
        # 64 MB upload claim 64 M samples, ~2.5 GiB of timing tables)
        fits = (end - start - 12) // 4 if size == 0 else file_size // max(size, 64)
    elif b"stz2" in stbl:
        start, end = stbl[b"stz2"]
        count = _u32s(moov, start + 8, 1)[0]
        fits = (end - start - 12) * 8 // max(moov[start + 7], 1)  # field size in bits
    else:
        raise ValueError("no sample size table")
    if count > fits:
        raise ValueError(f"{count} samples claimed, room for {fits}")
    return count


def _last_chunk_end(moov: bytes, stbl: dict, file_size: int) -> int:
    """Where the track's last chunk ends: its offset (``stco``/``co64``) plus the sizes (``stsz``) of
    the samples ``stsc`` puts in it. Past the file's end, the file is cut short, even where the
    media box says it runs "to the end of the file" (size 0) and so passes the box walk."""
    if b"stco" in stbl or b"co64" in stbl:
        wide = b"stco" not in stbl
        start = stbl[b"co64" if wide else b"stco"][0]
        chunks = _u32s(moov, start + 4, 1)[0]
        if chunks == 0:
            return 0
        at = start + 8 + (chunks - 1) * (8 if wide else 4)
        last = struct.unpack(">Q" if wide else ">I", moov[at:at + (8 if wide else 4)])[0]
    else:
        raise ValueError("no chunk offset table")
    start = stbl[b"stsc"][0]
    entries = _u32s(moov, start + 4, 1)[0]
    per_chunk = _u32s(moov, start + 8 + (entries - 1) * 12 + 4, 1)[0] if entries else 0
    count = _sample_count(moov, stbl, file_size)
    start = stbl[b"stsz"][0] if b"stsz" in stbl else None
    if start is None:  # (compact sizes: the chunk's offset alone)
        return last
    size = _u32s(moov, start + 4, 1)[0]
    n = min(per_chunk, count)
    if size:
        return last + n * size
    sizes = np.frombuffer(moov, dtype=">u4", count=n, offset=start + 12 + 4 * (count - n))
    return last + int(sizes.sum())


def _edit_hides_frames(moov: bytes, trak: dict, mdia: dict, stbl: dict, movie_scale: int, file_size: int) -> bool:
    """Whether the track's edit list (``edts/elst``) hides frames: a head or tail cut (``ffmpeg -ss
    ... -t ... -c copy``) or a splice of several edits. Players drop those frames; decord counts
    them and seeks into them (docs/data-format.md). A lone edit that only shifts presentation by
    the B-frame delay, as every muxer writes, hides nothing. A frame is shown when its display
    interval (composition time from ``stts`` + ``ctts``, for its duration) overlaps the edit."""
    if b"edts" not in trak:
        return False
    elst = next(((a, b) for k, a, b in _iter_boxes(moov, *trak[b"edts"]) if k == b"elst"), None)
    if elst is None or b"mdhd" not in mdia or b"stts" not in stbl:
        return False
    at, v1 = elst[0], moov[elst[0]] == 1
    edits, pos = [], at + 8
    for _ in range(_u32s(moov, at + 4, 1)[0]):
        duration, media_time = struct.unpack(">Qq" if v1 else ">Ii", moov[pos:pos + (16 if v1 else 8)])
        edits.append((duration, media_time))
        pos += 20 if v1 else 12
    edits = [e for e in edits if e[1] != -1]  # an empty edit delays the start; it hides nothing
    if len(edits) != 1:
        return len(edits) > 1
    duration, media_time = edits[0]
    m = mdia[b"mdhd"][0]
    scale = _u32s(moov, m + (20 if moov[m] == 1 else 12), 1)[0]

    def table(box: bytes) -> np.ndarray:  # (count, value) rows of an stts/ctts box
        start = stbl[box][0]
        rows = _u32s(moov, start + 4, 1)[0]
        return np.frombuffer(moov, dtype=">i4", count=2 * rows, offset=start + 8).reshape(rows, 2).astype(np.int64)

    samples = _sample_count(moov, stbl, file_size)
    stts = table(b"stts")
    if (stts[:, 0] < 0).any() or stts[:, 0].sum() != samples:  # (np.repeat allocates what they claim)
        raise ValueError("stts does not time every sample")
    deltas = np.repeat(stts[:, 1], stts[:, 0])
    if deltas.size == 0:
        return False
    shown_at = np.concatenate([[0], np.cumsum(deltas)[:-1]])  # decode times
    if b"ctts" in stbl:
        ctts = table(b"ctts")
        if (ctts[:, 0] < 0).any() or ctts[:, 0].sum() > samples:
            raise ValueError("ctts offsets more samples than the track has")
        offsets = np.repeat(ctts[:, 1], ctts[:, 0])[:deltas.size]
        shown_at[:offsets.size] += offsets
    end = media_time + duration * scale / max(movie_scale, 1) if duration else np.inf
    shown = (shown_at + deltas > media_time) & (shown_at < end)
    return not bool(shown.all())


def mp4_track(path: str, max_moov: int = 64 << 20) -> Optional[Mp4Track]:
    """An MP4/MOV file's first video track, read without the probing PyAV does on open: the
    sample entry's size (``moov/trak/mdia/minf/stbl/stsd``, what FFmpeg decodes to, before aspect
    correction), the display rotation of the track matrix (``tkhd``, composed with the movie's
    ``mvhd``; :func:`rotation_degrees`), whether that matrix mirrors and whether an edit list hides
    frames. ``None`` if not MP4 or unreadable."""
    try:
        moov = _read_moov(path, max_moov)
        if moov is None:
            return None
        top = {k: (a, b) for k, a, b in _iter_boxes(moov, 8, len(moov)) if k == b"mvhd"}
        # mvhd: version/flags 4, times 16 (v0) or 28 (v1), rate 4, volume 2, reserved 10, then the matrix
        movie = _header_matrix(moov, top[b"mvhd"][0], 36, 48) if b"mvhd" in top else (1.0, 0.0, 0.0, 1.0)
        movie_scale = (_u32s(moov, top[b"mvhd"][0] + (20 if moov[top[b"mvhd"][0]] == 1 else 12), 1)[0]
                       if b"mvhd" in top else 1)
        traks = [(p0, p1) for kind, p0, p1 in _iter_boxes(moov, 8, len(moov)) if kind == b"trak"]
        for i, (p0, p1) in enumerate(traks):
            trak = {k: (a, b) for k, a, b in _iter_boxes(moov, p0, p1)}
            boxes = _video_media(moov, trak)
            if boxes is None:
                continue
            more_video = any(_video_media(moov, {k: (a, b) for k, a, b in _iter_boxes(moov, *t)}) is not None
                             for t in traks[i + 1:])
            node = boxes.get(b"minf")
            node = next(((a, b) for k, a, b in _iter_boxes(moov, *node) if k == b"stbl"), None) if node else None
            stbl = {k: (a, b) for k, a, b in _iter_boxes(moov, *node)} if node else {}
            if b"stsd" not in stbl:
                return None
            entry = stbl[b"stsd"][0] + 8                          # version/flags, entry_count
            w, h = struct.unpack(">HH", moov[entry + 32:entry + 36])  # VisualSampleEntry width, height
            if not (h > 0 and w > 0):
                return None
            matrix = (1.0, 0.0, 0.0, 1.0)
            if b"tkhd" in trak:
                # tkhd: version/flags 4, times/id/duration 20 (v0) or 32 (v1), reserved 8, layer/group/volume 6, reserved 2
                ta, tb, tc, td = _header_matrix(moov, trak[b"tkhd"][0], 40, 52)
                ma, mb, mc, md = movie
                # a point goes through the track matrix, then the movie's (row vectors: [x y] M)
                matrix = (ta * ma + tb * mc, ta * mb + tb * md, tc * ma + td * mc, tc * mb + td * md)
            try:
                trimmed = _edit_hides_frames(moov, trak, boxes, stbl, movie_scale, os.path.getsize(path))
            except (struct.error, ValueError, IndexError, MemoryError):  # a damaged table: the decoders will tell
                trimmed = False
            codec = moov[entry + 4:entry + 8].decode("latin-1")
            try:
                data_end = _last_chunk_end(moov, stbl, os.path.getsize(path))
            except (struct.error, ValueError, IndexError, KeyError):
                data_end = 0
            return Mp4Track(h, w, rotation_degrees(*matrix), matrix[0] * matrix[3] - matrix[1] * matrix[2] < 0, trimmed,
                            codec, data_end, more_video)
        return None  # no video track
    except (OSError, struct.error, ValueError, IndexError):
        return None


def _video_media(moov: bytes, trak: dict) -> Optional[dict]:
    """A ``trak``'s ``mdia`` boxes if its handler is video (``vide``), else None."""
    mdia = trak.get(b"mdia")
    if mdia is None:
        return None
    boxes = {k: (a, b) for k, a, b in _iter_boxes(moov, *mdia)}
    if b"hdlr" not in boxes or moov[boxes[b"hdlr"][0] + 8:boxes[b"hdlr"][0] + 12] != b"vide":
        return None
    return boxes


_CUT_DETAIL = {
    None: "the {kind} container declares more bytes than the file holds",
    "mpeg-ts": "the MPEG transport stream ends inside a packet (the file is cut short)",
}


def _cut_detail(kind: str) -> str:
    return _CUT_DETAIL.get(kind, _CUT_DETAIL[None]).format(kind=kind)


_PROBLEM_DETAIL = {
    EMPTY: "0 bytes",
    PLAYLIST: "a playlist/reference text (HLS, DASH, concat, SDP or a URL), not a video file",
    NOT_VIDEO: "a text file, not a video",
    UNKNOWN_CONTAINER: f"magic bytes match none of the supported containers ({', '.join(CONTAINERS)})",
}


def _run_test_hooks(path: str, job: Dict) -> None:
    marker = job.get("test_hang_once")
    if marker and not os.path.exists(marker):  # hang on the first attempt only (retry tests)
        open(marker, "w").close()
        import ctypes

        ctypes.PyDLL(None).sleep(3600)
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(TEST_URL_MAGIC):
        # Hands a URL straight to decord/FFmpeg, as if the container checks were bypassed: shows
        # what the decode child's network isolation alone stops.
        import decord

        url = head[len(TEST_URL_MAGIC):].split(b"\n")[0].decode().strip()
        try:
            decord.VideoReader(url)
        except Exception as e:
            raise DecodeReject(CORRUPT, _short(e))
    if head.startswith(TEST_HANG_MAGIC):
        # Simulates decord's failure mode: a native call that blocks *while holding the GIL*
        # (ctypes.PyDLL does not release the GIL), so no Python-level timeout, signal
        # handler or watchdog thread in this process could interrupt it. Only killing
        # the process stops it.
        import ctypes

        ctypes.PyDLL(None).sleep(3600)
    if head.startswith(TEST_CRASH_MAGIC):
        os.abort()  # simulates a native crash (SIGABRT) inside the decoder


@functools.lru_cache(maxsize=None)
def decord_version() -> str | None:
    """decord's version, or None where it is not installed (it publishes x86_64 wheels only: on
    macOS and Linux aarch64 every video is decoded by FFmpeg through PyAV, the reference decode)."""
    try:
        import decord
    except ImportError:
        return None
    return decord.__version__


def pyav_version() -> str:
    return _av().__version__


def decode_video(job: Dict) -> Dict:
    """Decode, sample and resize every stored view of one video.

    ``job`` keys: ``path`` (absolute), ``video_id``, ``split``, ``frames`` (T),
    ``clips_per_video``, ``eval_clips``, ``seed``, ``short_side``, ``min_frames``,
    optional ``root`` (the folder the file must resolve into), optional ``test_hooks``, optional ``all_frames`` (one view of every frame instead; at most ``max_frames`` of them), optional
    ``view_indices`` (only these planned views), optional ``whole_file`` (a file cut short is
    rejected ``truncated`` instead of keeping the frames before the cut).

    Frames are turned upright by the container's display rotation (MP4/MOV), as a player shows them.

    Returns ``{"ok": True, "src_fps", "src_num_frames", "height", "width", "src_height", "src_width",
    "rotation", "views": [(view, view_index, indices int32 array, frames uint8 (T,H,W,3)), ...]}``
    or ``{"ok": False, "reason", "detail"}``.
    """
    try:
        return _decode_video(job)
    except DecodeReject as e:
        return {"ok": False, "reason": e.reason, "detail": e.detail}
    except OSError as e:
        if type(e).__module__.split(".")[0] == "av":  # PyAV's errors are OSErrors too: the file's, a bug's
            raise
        # permissions (another user id on a worker node), an I/O error: the file's access here, not a decoder bug;
        # a permission is this machine's (``denied``: an ingest fails the task), a bad sector the file's
        return {"ok": False, "reason": UNREADABLE, "detail": _short(e), "denied": isinstance(e, PermissionError)}


def _decode_video(job: Dict) -> Dict:
    # an absolute path: FFmpeg reads "name:..." as a protocol, "/..." only as a local file
    path = os.path.abspath(job["path"])
    if not os.path.isfile(path):  # (follows symlinks: devices, FIFOs and folders are refused)
        raise DecodeReject(MISSING, "no such regular file")
    root = os.path.realpath(job["root"]) if job.get("root") else None  # (resolved on this node)
    if root and os.path.commonpath([os.path.realpath(path), root]) != root:
        # checked when the manifest was made; a file swapped for a link since must not be read
        raise DecodeReject(OUTSIDE_ROOT, f"resolves to {os.path.realpath(path)}, outside the root {root}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a name in another encoding: decord and PyAV can only open UTF-8 paths
        import tempfile

        with tempfile.TemporaryDirectory(prefix="dvfl-name-") as d:
            ext = os.path.splitext(os.fsencode(path))[1].decode("ascii", "replace").replace("\ufffd", "")
            link = os.path.join(d, "video" + ext)
            os.symlink(path, link)
            return _decode_file(link, job)
    return _decode_file(path, job)


def _decode_file(path: str, job: Dict) -> Dict:
    if job.get("test_hooks"):
        _run_test_hooks(path, job)
    kind, problem = probe_container(path)
    track = mp4_track(path) if kind == "mp4" else None
    if problem is None and track is not None and track.data_end > os.path.getsize(path):
        problem = TRUNCATED  # its frames end past the file (a media box of size 0 passed the box walk)
    # cut short (an interrupted copy): like a damaged tail, what decodes is the video, except where
    # the caller wants the whole file (predict, serve: a half-uploaded file is refused)
    if problem == TRUNCATED and not job.get("whole_file"):
        # a fast-start MP4's header is whole: its matrix, as for an uncut file (FFmpeg's frame
        # rotation reads a mirrored matrix as a half turn; it is left as stored)
        try:
            return _decode_reference(path, job, track.rotation if track else None, "", cut=True)
        except DecodeReject as e:
            raise DecodeReject(TRUNCATED, f"{_cut_detail(kind)}; {e.detail}")
    if problem == TRUNCATED:
        raise DecodeReject(problem, _cut_detail(kind))
    if problem is not None:
        raise DecodeReject(problem, _PROBLEM_DETAIL.get(problem, f"{kind} container check"))
    if decord_version() is None:  # (no decord wheel: macOS, Linux aarch64) FFmpeg through PyAV, in order
        return _decode_reference(path, job, track.rotation if track else None, "")

    import decord

    # Resize inside FFmpeg when the coded size is known: YUV->RGB at the small size costs less
    # than decode alone (docs/ingest.md).
    short_side = int(job.get("short_side") or 0)
    # decord turns frames by the container's display rotation itself (a phone's portrait video
    # comes out upright), but for a quarter turn it must be told the turned size: asked nothing,
    # it fails; asked the stored size, it squeezes the turned frames into it (docs/data-format.md).
    # other containers: PyAV's probe for the size and a `rotate` tag, which decord obeys (AVI:
    # B-frames too); an open costs ~1 ms (docs/ingest.md)
    # MPEG-4 Part 2 in any container (and in MP4, whose header says mp4v): B-frames are looked for
    probe = _pyav_probe(path, b_vops=True) if track is None or track.codec == "mp4v" else None
    # (None: unreadable here; the reference decode then takes FFmpeg's)
    rotation = track.rotation if track else (probe.rotation if probe else None)
    # Where decord's frames are not the player's (docs/data-format.md), FFmpeg's own decode order
    # through PyAV: MPEG program/transport streams and AVIs with B-frames (decord seeks to other
    # frames; MPEG-4 Part 2 with B-frames in any container, H.264 & co. in AVI), edit lists that hide
    # frames (decord counts and seeks into them), mirrored matrices
    # (decord turns them instead) and a rotate tag outside MP4 (the size decord must be told is unknown);
    # ASF (WMV): decord's seeks land one or two keyframe intervals early, its timestamps may all be 0.
    # An MP4 with a second video track: decord may decode that one (at the first one's size).
    if (kind in ("mpeg-ts", "mpeg-ps", "asf") or (track is not None and (track.trimmed or track.mirrored
                                                                         or track.more_video))
            or (probe is not None and (probe.b_vops or (track is None and rotation)
                                       or (kind == "avi" and probe.codec in AVI_REORDERING_CODECS)))):
        return _decode_reference(path, job, rotation, "")
    turned = rotation in (90, 270)  # (known only for MP4, or where the probe ran)
    src = track[:2] if track and (short_side or turned) else (probe.size if probe and short_side else None)
    if src and turned:
        src = src[::-1]  # the size as shown
    target = stored_hw(src[0], src[1], short_side) if src else None
    scaled = target is not None and (target != src or turned)

    def open_reader(scale: bool):
        size = {"width": target[1], "height": target[0]} if scale else {}
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **size)

    try:
        try:
            vr = open_reader(scaled)
        except Exception:
            if not scaled:
                raise
            scaled = False
            vr = open_reader(False)
    except Exception as e:  # decord raises RuntimeError / DECORDError on open failure
        # e.g. H.264 in MPEG-TS, a live WebM without duration: FFmpeg itself may still decode it
        return _decode_reference(path, job, rotation, _short(e))
    try:
        n = len(vr)
        try:
            keys = vr.get_key_indices() if n else []
        except Exception:  # (no index to read: decoded as before)
            keys = []
        if len(keys) and keys[0] != 0:
            # starts mid-GOP (a stream copy cut at a P-frame): decord counts the undecodable leading
            # packets as frames and its indices drift; what FFmpeg decodes in order is the video
            return _decode_reference(path, job, rotation, "")
        fps = _finite_rate(vr.get_avg_fps())
        T = int(job["frames"])
        if n == 0:
            raise DecodeReject(EMPTY, "0 frames")
        _check_length(job, n, fps)
        min_frames = int(job.get("min_frames") or T)
        if n < min_frames:
            raise DecodeReject(TOO_SHORT, f"{n} frames < min_frames {min_frames}")
        views = _plan_views(job, n)
        uniq = sampling.unique_sorted(v[2] for v in views)
        arr = None
        if scaled:
            # decord rejects a few output widths (docs/ingest.md): those, and any other
            # disagreement, take the plain decode + PIL path.
            try:
                arr = vr.get_batch(uniq.tolist()).asnumpy()
            except Exception:
                arr = None
            if arr is None or arr.shape[1:3] != tuple(target):
                arr, scaled, vr = None, False, None
                if turned:  # decord refused the turned size: FFmpeg via PyAV, resized as decoded, turned here
                    try:
                        stored = _decode_stored(path, uniq, lambda h, w: (target[1], target[0]))
                        arr, scaled = np.rot90(stored, rotation // 90, axes=(1, 2)), True
                    except DecodeReject as e:  # a damaged tail of a turned video
                        return _decode_reference(path, job, rotation, e.detail, listed=n)
                else:
                    try:
                        vr = open_reader(False)
                    except Exception as e:
                        return _decode_reference(path, job, rotation, _short(e))
        if arr is None:
            try:
                # No vr.seek(0) (the usual cure for get_batch's memory growth): this reader is
                # dropped right after; DecodeProcess still recycles a child that grows (docs/ingest.md).
                arr = vr.get_batch(uniq.tolist()).asnumpy()
            except Exception as e:
                # a damaged or cut tail (fewer decodable frames than the container lists), or a
                # file only decord fails on: what FFmpeg decodes in order is the video
                return _decode_reference(path, job, rotation, _short(e), listed=n)
    finally:
        del vr
    return _stored_views(arr, uniq, views, src if scaled else None, target if scaled else None,
                         short_side, fps, n, rotation or 0)


UNKNOWN_RATE_FPS = 30.0  # a video's duration for a length limit when its container gives no frame rate


def _check_length(job: Dict, n: int, fps: float) -> None:
    """The caller's ``max_seconds`` (serve's upload limit), judged as soon as ``n`` frames are known:
    before the frames are decoded, so a long upload is refused in time, not after the whole decode."""
    limit = job.get("max_seconds")
    seconds = n / (fps or UNKNOWN_RATE_FPS)
    if limit and seconds > limit:
        raise DecodeReject(TOO_LONG, f"video of {seconds:.1f} s > limit {limit:g} s")


def _finite_rate(rate) -> float:
    """A frame rate, 0.0 when unknown (some files give NaN, inf or nothing)."""
    fps = float(rate or 0.0)
    return fps if np.isfinite(fps) and fps > 0 else 0.0


def _plan_views(job: Dict, n: int):
    if job.get("all_frames"):  # every frame, in order (the streaming mode of predict)
        limit = job.get("max_frames")
        if limit and n > limit:  # refused before a frame is kept: memory grows with the file's length
            raise DecodeReject(TOO_LONG, f"{n} frames, more than --max-frames {limit} (the stream mode holds "
                                         "every decoded frame in memory)")
        return [(sampling.UNIFORM_VIEW, 0, np.arange(n, dtype=np.int32))]
    views = sampling.plan_views(n, int(job["frames"]), job["split"], int(job["seed"]), job["video_id"],
                                int(job["clips_per_video"]), int(job["eval_clips"]))
    # (predict: the clips evaluation takes from a larger stored grid)
    return [views[i] for i in job["view_indices"]] if job.get("view_indices") is not None else views


def _decode_reference(path: str, job: Dict, rotation: Optional[int], why: str, listed: Optional[int] = None,
                      cut: bool = False) -> Dict:
    """The video as FFmpeg decodes it in order (PyAV, one thread): its frames are those decoded
    before the first failure (a damaged or cut tail ends the video there), the views are planned
    on them, and the sampled ones are decoded in a second pass. Slower than decord's seeking
    (two passes, PIL resize), so only where decord's frames are wrong or decord fails; ``why``:
    decord's error, if any; ``rotation``: None to take the stream's; ``listed``: the frames decord
    counted, if it opened the file; ``cut``: the file is cut short (:func:`_frames_in_order`)."""
    T = int(job["frames"])
    min_frames = int(job.get("min_frames") or T)
    n, fps, stream_rotation = _decodable_prefix(path, cut, job)
    rotation = stream_rotation if rotation is None else rotation
    cause = f": {why}" if why else ""
    of = f" of {listed}" if listed else ""
    if n == 0:
        raise DecodeReject(CORRUPT, f"no frame{of} decodes{cause}")
    if n < min_frames:
        raise DecodeReject(TOO_SHORT, f"{n}{of} frames decodable (min_frames {min_frames}){cause}")
    views = _plan_views(job, n)
    uniq = sampling.unique_sorted(v[2] for v in views)
    short_side = int(job.get("short_side") or 0)
    # each frame resized as it is decoded (every frame of a long file at full size would not fit),
    # to the size the first one sets (a stream may change size), then turned: stored as shown
    turned = rotation in (90, 270)
    first: List[Tuple[int, int]] = []

    def stored_size(h: int, w: int) -> Tuple[int, int]:
        if not first:
            first.append((w, h) if turned else (h, w))  # as shown
        H, W = stored_hw(*first[0], short_side)
        return (W, H) if turned else (H, W)

    arr = np.rot90(_decode_stored(path, uniq, stored_size, cut), rotation // 90, axes=(1, 2))
    return _stored_views(arr, uniq, views, first[0], tuple(arr.shape[1:3]), short_side, fps, n, rotation)


def _stored_views(arr: np.ndarray, uniq: np.ndarray, views, src, target, short_side: int, fps: float, n: int,
                  rotation: int) -> Dict:
    """decode_video's result from the decoded frames ``arr`` (one per ``uniq`` index): resized to
    the stored size unless decoded at it (``src``/``target`` given), cut into the views."""
    if arr.ndim != 4 or arr.shape[0] != len(uniq) or arr.shape[-1] != 3:
        raise DecodeReject(CORRUPT, f"decoder returned shape {arr.shape}")
    if target is not None:
        (h, w), (H, W) = src, target
    else:
        h, w = arr.shape[1:3]
        H, W = stored_hw(h, w, short_side)
        arr = resize_frames(np.ascontiguousarray(arr, dtype=np.uint8), H, W)
    pos = {int(f): i for i, f in enumerate(uniq)}
    out_views: List = []
    for view, k, idx in views:
        clip = arr[[pos[int(f)] for f in idx]]
        out_views.append((view, k, idx.astype(np.int32), np.ascontiguousarray(clip)))
    return {"ok": True, "src_fps": fps, "src_num_frames": n, "height": H, "width": W,
            "src_height": int(h), "src_width": int(w), "rotation": rotation, "views": out_views}


def _open_in_one_thread(path: str):
    container = _av().open(path)
    if not container.streams.video:  # (decord's failure on it read "corrupt: ... Check failed: st_nb >= 0")
        container.close()
        raise DecodeReject(NO_VIDEO_STREAM, "the container has no video stream (audio only?)")
    stream = container.streams.video[0]
    stream.thread_type, stream.codec_context.thread_count = "NONE", 1  # the same frames every time
    return container, stream


def _frames_in_order(container, stream, cut: bool = False):
    """The stream's frames as FFmpeg decodes them, in display order, to its end or first failure.
    Where it ends early (``cut``: the file is cut short; or a packet fails) only frames whose every
    predecessor was received: a cut file's last packet may be partial, so it is left out, and of
    the frames the decoder still holds back (B-frames) those shown after the last decoded packet's
    decode time are dropped, since a frame never received would be shown before them (pts >= dts)."""
    last_dts, pending, ended_early, started = None, None, cut, False
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream packet: the decoder is flushed below
            if cut:  # one packet behind
                packet, pending = pending, packet
                if packet is None:
                    continue
            try:
                frames = packet.decode()
            except Exception:
                if started:
                    raise
                continue  # before any packet decoded: a stream copy cut mid-GOP (VP8/VP9 raise where H.264 skips)
            started = True  # (a damaged packet after it ends the video, even before reordering gave a frame)
            yield from frames
            last_dts = packet.dts
    except Exception:
        ended_early = True
    try:
        for frame in stream.codec_context.decode(None):  # the frames held back for reordering
            if ended_early and None not in (last_dts, frame.pts) and frame.pts > last_dts:
                return
            yield frame
    except Exception:
        pass


def _decodable_prefix(path: str, cut: bool = False, job: Optional[Dict] = None) -> Tuple[int, float, int]:
    """How many frames decode in order from the first before one fails (PyAV, one thread), the
    stream's average frame rate (0.0 if unknown) and its display rotation, as decord turns
    frames (:func:`rotation_degrees`' convention): the matrix FFmpeg attaches to the frames, else a
    ``rotate`` tag (0 if neither, or not a quarter turn). The ``job``'s length limit stops the count
    where it is passed (:data:`TOO_LONG`)."""
    limit = (job or {}).get("max_seconds")
    n, fps, rotation = 0, 0.0, 0
    try:
        container, stream = _open_in_one_thread(path)
        with container:
            fps = _finite_rate(stream.average_rate)
            rotation = _tag_rotation(stream)
            for frame in _frames_in_order(container, stream, cut):
                if n == 0 and frame.rotation:
                    rotation = int(round(frame.rotation)) % 360 if frame.rotation % 90 == 0 else 0
                n += 1
                if limit and n > limit * (fps or UNKNOWN_RATE_FPS):
                    _check_length(job, n, fps)
    except DecodeReject:
        raise
    except Exception:
        pass
    return n, fps, rotation


def _decode_stored(path: str, indices: np.ndarray, size=None, cut: bool = False) -> np.ndarray:
    """Frames ``indices`` (sorted, in decode order) as stored, RGB, by PyAV, which leaves the
    display rotation to the caller; ``size(h, w) -> (H, W)``: each resized so as it is decoded."""
    want, out = set(int(i) for i in indices), []
    try:
        container, stream = _open_in_one_thread(path)
        with container:
            for i, frame in enumerate(_frames_in_order(container, stream, cut)):
                if i in want:
                    rgb = frame.to_ndarray(format="rgb24")
                    out.append(resize_frames(rgb[None], *size(*rgb.shape[:2]))[0] if size else rgb)
                if i >= indices[-1]:
                    break
    except DecodeReject:  # (bad_frame_size, from size()) is not a decode failure
        raise
    except Exception as e:
        raise DecodeReject(CORRUPT, _short(e))
    if len(out) != len(indices):
        raise DecodeReject(CORRUPT, f"PyAV decoded {len(out)} of the {len(indices)} frames asked")
    return np.stack(out)


def _short(e: BaseException, limit: int = 300) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + "..."
