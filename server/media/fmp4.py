"""Fragmented MP4 (H.264) clips for Media Source Extensions.

A stream is encoded clip by clip as clips come out of the generator. For MSE the stream is one init segment
(ftyp + moov) followed by one media segment (moof + mdat) per clip. Every clip is encoded by a fresh libx264
encoder with identical settings, so each segment starts with an IDR frame and decodes on its own given the init
segment: a client may join mid-stream, or seek, by appending the init segment and any later segment.

PyAV's MP4 muxer always starts a new file at time 0 with sequence number 1, so each clip's moof is rewritten
here (tfdt = stream time of its first frame, mfhd = per-stream sequence number) with a minimal box parser.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from torch import Tensor

from .clip import check_clip, check_first_frame
from .video import encoded_size, tag_bt709, yuv420_frame

# A fixed GOP limit: x264 derives SPS fields (log2_max_frame_num) from keyint, so it must not vary per clip or
# the segments' parameter sets would differ from the init segment's. A clip longer than this still works: it
# is split into several fragments, each starting with an IDR frame.
_KEYINT = 1024

# Identical for every clip of every stream. zerolatency: no lookahead and no B-frames (frames come out as they
# go in, pts == dts, so no composition offsets or edit lists); scenecut=0: no extra keyframes mid-clip.
_X264_OPTIONS = {
    "preset": "veryfast",
    "tune": "zerolatency",
    "profile": "high",
    "bf": "0",
    "x264-params": f"keyint={_KEYINT}:min-keyint={_KEYINT}:scenecut=0:open-gop=0",
}

# empty_moov: the moov holds no samples, so it is the same for every clip and serves as the init segment;
# frag_keyframe: one fragment per IDR (one per clip); default_base_moof: trun offsets are relative to their
# own moof, so a moof + mdat pair stays valid when cut out of the file.
_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"

_TFHD_BASE_DATA_OFFSET = 0x000001
_TRUN_DATA_OFFSET = 0x000001

# Payload bytes before the child boxes of container boxes we descend into (full-box headers, sample entry).
_CHILD_OFFSET = {b"stsd": 8, b"avc1": 78, b"avc3": 78}


# --------------------------------------------------------------------------------------------------------------
# MP4 boxes


@dataclass(frozen=True)
class _Box:
    """One box inside a buffer: ``data[start:end]`` is the whole box, ``data[body:end]`` its payload."""

    type: bytes
    start: int
    body: int
    end: int


def _iter_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[_Box]:
    """The boxes laid end to end in ``data[start:end]`` (32-bit size + 4cc; size 1: 64-bit size; 0: to end)."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"truncated box header at offset {pos}")
        size, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if size == 1:
            if end - pos < 16:
                raise ValueError(f"truncated box header at offset {pos}")
            (size,) = struct.unpack_from(">Q", data, body)
            body += 8
        elif size == 0:
            size = end - pos
        if size < body - pos or pos + size > end:
            raise ValueError(f"bad size {size} for box {kind!r} at offset {pos}")
        yield _Box(kind, pos, body, pos + size)
        pos += size


def _find_box(data: bytes, path: tuple[bytes, ...], start: int = 0, end: int | None = None) -> _Box | None:
    """First box along ``path`` (e.g. ``(b"moov", b"trak", b"mdia", b"mdhd")``) below ``data[start:end]``."""
    for box in _iter_boxes(data, start, end):
        if box.type != path[0]:
            continue
        if len(path) == 1:
            return box
        found = _find_box(data, path[1:], box.body + _CHILD_OFFSET.get(box.type, 0), box.end)
        if found is not None:
            return found
    return None


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box_header(data: bytes, box: _Box) -> tuple[int, int]:
    """(version, flags) of a full box."""
    (word,) = struct.unpack_from(">I", data, box.body)
    return word >> 24, word & 0xFFFFFF


_AVCC_PATH = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"avc1", b"avcC")
_MDHD_PATH = (b"moov", b"trak", b"mdia", b"mdhd")


def _avcc(data: bytes) -> bytes:
    """Payload of the track's avcC box (AVCDecoderConfigurationRecord: SPS + PPS)."""
    box = _find_box(data, _AVCC_PATH)
    if box is None:
        raise RuntimeError("muxer output has no avcC box")
    return data[box.body : box.end]


def _timescale(data: bytes) -> int:
    """The track's media timescale (mdhd): the unit of tfdt and sample durations."""
    box = _find_box(data, _MDHD_PATH)
    if box is None:
        raise RuntimeError("muxer output has no mdhd box")
    version, _ = _full_box_header(data, box)
    offset = box.body + (20 if version == 1 else 12)  # after creation/modification times
    (timescale,) = struct.unpack_from(">I", data, offset)
    return timescale


def _rewrite_moof(data: bytes, moof: _Box, sequence: int, time_shift: int) -> bytes:
    """Copy of ``moof`` with mfhd = ``sequence`` and each tfdt moved by ``time_shift`` (written as version 1).

    Rewriting may change the moof's size (a version-0 tfdt grows to 64 bits), so trun data offsets, which count
    from the start of the moof (default-base-is-moof), are shifted by the size difference.
    """
    children: list[bytes | list[bytes]] = []  # bytes: a finished box; list: a traf's children (trun to patch)
    for box in _iter_boxes(data, moof.body, moof.end):
        if box.type == b"mfhd":
            children.append(_box(b"mfhd", struct.pack(">II", 0, sequence)))
        elif box.type == b"traf":
            traf: list[bytes] = []
            for sub in _iter_boxes(data, box.body, box.end):
                if sub.type == b"tfhd" and _full_box_header(data, sub)[1] & _TFHD_BASE_DATA_OFFSET:
                    raise RuntimeError("tfhd has an absolute base data offset; expected default-base-is-moof")
                if sub.type == b"tfdt":
                    version, _ = _full_box_header(data, sub)
                    (time,) = struct.unpack_from(">Q" if version == 1 else ">I", data, sub.body + 4)
                    traf.append(_box(b"tfdt", struct.pack(">IQ", 1 << 24, time + time_shift)))
                else:
                    traf.append(data[sub.start : sub.end])
            children.append(traf)
        else:
            children.append(data[box.start : box.end])

    new_size = 8 + sum(len(c) if isinstance(c, bytes) else 8 + sum(map(len, c)) for c in children)
    delta = new_size - (moof.end - moof.start)
    out = [struct.pack(">I4s", new_size, b"moof")]
    for child in children:
        if isinstance(child, bytes):
            out.append(child)
            continue
        out.append(struct.pack(">I4s", 8 + sum(map(len, child)), b"traf"))
        for sub_bytes in child:
            if delta and sub_bytes[4:8] == b"trun" and struct.unpack_from(">I", sub_bytes, 8)[0] & _TRUN_DATA_OFFSET:
                (offset,) = struct.unpack_from(">i", sub_bytes, 16)  # after header, version/flags, sample_count
                sub_bytes = sub_bytes[:16] + struct.pack(">i", offset + delta) + sub_bytes[20:]
            out.append(sub_bytes)
    return b"".join(out)


# --------------------------------------------------------------------------------------------------------------
# The encoder


class Fmp4Encoder:
    """H.264 in fragmented MP4 for MSE: ``init_segment()`` once, then ``encode`` per clip, appended in order.

    One per stream; not thread-safe. Odd sizes are padded to even by repeating the edge (as ``media.write_mp4``
    does), so the video is ``media.encoded_size(height, width)``. Colours are tagged and converted as BT.709,
    limited range, like ``media.write_mp4``.
    """

    def __init__(self, width: int, height: int, fps: int, crf: int = 23) -> None:
        for name, value in (("width", width), ("height", height), ("fps", fps)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        # crf 0 is lossless, which x264 only allows in the High 4:4:4 profile, not the fixed High profile.
        if isinstance(crf, bool) or int(crf) != crf or not 1 <= crf <= 51:
            raise ValueError(f"crf must be an integer in [1, 51], got {crf!r}")
        self.width, self.height, self.fps, self.crf = int(width), int(height), int(fps), int(crf)
        self._padded = encoded_size(self.height, self.width)  # (H, W) actually encoded
        self._next_frame = 0  # smallest first_frame the next clip may have
        self._sequence = 0  # mfhd of the last fragment written

        # The init segment comes from encoding one black frame: the moov of an empty_moov file does not depend
        # on the frames, and the same settings give the same SPS/PPS for every clip (checked per clip).
        black = np.zeros((1, *self._padded, 3), dtype=np.uint8)
        data = self._mux(black)
        boxes = list(_iter_boxes(data))
        ftyp = next((b for b in boxes if b.type == b"ftyp"), None)
        moov = next((b for b in boxes if b.type == b"moov"), None)
        if ftyp is None or moov is None:
            raise RuntimeError("muxer output has no ftyp/moov")
        self._init = data[ftyp.start : ftyp.end] + data[moov.start : moov.end]
        self._avcc = _avcc(data)
        self._timescale = _timescale(data)
        self._mime = f'video/mp4; codecs="avc1.{self._avcc_profile_level().hex()}"'

    def _avcc_profile_level(self) -> bytes:
        """profile_idc, constraint flags, level_idc from the (first) SPS: the 6 hex digits of an avc1 codec string."""
        avcc = self._avcc
        if len(avcc) < 8 or avcc[5] & 0x1F < 1:
            raise RuntimeError("avcC holds no SPS")
        (sps_len,) = struct.unpack_from(">H", avcc, 6)
        sps = avcc[8 : 8 + sps_len]
        if len(sps) < 4 or sps[0] & 0x1F != 7:
            raise RuntimeError("avcC holds a malformed SPS")
        return sps[1:4]

    @property
    def mime(self) -> str:
        """Type for ``MediaSource.addSourceBuffer``, e.g. ``video/mp4; codecs="avc1.64001f"`` (from the real SPS)."""
        return self._mime

    @property
    def timescale(self) -> int:
        """Units per second of the track's timeline (tfdt, sample durations), as chosen by the muxer."""
        return self._timescale

    @property
    def encoded_size(self) -> tuple[int, int]:
        """(H, W) of the coded video: the stream size rounded up to even."""
        return self._padded

    def init_segment(self) -> bytes:
        """ftyp + moov: append first (again on every new SourceBuffer); the same bytes on every call."""
        return self._init

    def _mux(self, video: np.ndarray) -> bytes:
        """(n, H, W, 3) uint8 RGB at the padded size -> a complete fragmented MP4 from a fresh encoder."""
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4", options={"movflags": _MOVFLAGS}) as container:
            stream = container.add_stream("libx264", rate=Fraction(self.fps, 1))
            stream.height, stream.width = self._padded
            stream.pix_fmt = "yuv420p"
            stream.time_base = Fraction(1, self.fps)
            stream.options = {**_X264_OPTIONS, "crf": str(self.crf)}
            tag_bt709(stream.codec_context)
            for i in range(video.shape[0]):
                frame = yuv420_frame(video[i])
                frame.pts = i
                for packet in stream.encode(frame):
                    packet.duration = 1  # every frame lasts 1/fps, the last one of the clip included
                    container.mux(packet)
            for packet in stream.encode(None):
                packet.duration = 1
                container.mux(packet)
        return buf.getvalue()

    def encode(self, frames: Tensor, first_frame: int) -> list[bytes]:
        """Encode (n, H, W, 3) uint8 RGB frames into one media segment (moof + mdat) starting with an IDR frame.

        Its decode time is ``first_frame / fps`` on the stream timeline. Clips must come in stream order:
        ``first_frame`` below the end of the previous clip raises ValueError (it would overwrite buffered media).
        """
        check_clip(frames, self.height, self.width)
        first_frame = check_first_frame(first_frame)
        if first_frame < self._next_frame:
            raise ValueError(f"first_frame {first_frame} overlaps the previous clip (next frame is {self._next_frame})")

        video = frames.detach().cpu().numpy()  # (n, H, W, 3)
        ph, pw = self._padded
        if (ph, pw) != (self.height, self.width):
            video = np.pad(video, ((0, 0), (0, ph - self.height), (0, pw - self.width), (0, 0)), mode="edge")
        data = self._mux(np.ascontiguousarray(video))

        if _avcc(data) != self._avcc:
            raise RuntimeError("encoder produced SPS/PPS that differ from the init segment's")
        if _timescale(data) != self._timescale:
            raise RuntimeError("muxer chose a different timescale than for the init segment")
        # Exact when the timescale is a multiple of fps, which it is (the muxer scales up the 1/fps time base).
        time_shift = round(Fraction(first_frame * self._timescale, self.fps))

        out: list[bytes] = []
        fragments = 0
        sequence = self._sequence
        for box in _iter_boxes(data):
            if box.type == b"moof":
                sequence += 1
                out.append(_rewrite_moof(data, box, sequence, time_shift))
            elif box.type == b"mdat":
                if not out:
                    raise RuntimeError("mdat before moof in muxer output")
                out.append(data[box.start : box.end])
                fragments += 1
        if fragments == 0:
            raise RuntimeError("muxer output has no media fragment")
        self._sequence = sequence
        self._next_frame = first_frame + frames.shape[0]
        return [b"".join(out)]
