"""Clip encoders: fMP4 segments must play as one continuous MSE timeline, and each must decode on its own."""

from __future__ import annotations

import io
import re
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from ca2vdm.server.media import FORMATS, ClipEncoder, Fmp4Encoder, JpegEncoder, encoded_size, fmp4, make_encoder
from ca2vdm.server.media.video import _frame_to_rgb

FPS = 8
CLIPS = ((0, 1), (1, 8), (9, 8))  # (first_frame, n): 17 frames in all


def _video(n: int, h: int, w: int, start: int = 0) -> torch.Tensor:
    """Smooth colour gradients drifting over time, (n, H, W, 3) uint8: realistic for a codec, unlike noise."""
    t = np.arange(start, start + n, dtype=np.float64)[:, None, None]
    y = np.arange(h, dtype=np.float64)[None, :, None]
    x = np.arange(w, dtype=np.float64)[None, None, :]
    r = 128 + 90 * np.sin(2 * np.pi * (x / 64 + t / 20))
    g = 128 + 90 * np.cos(2 * np.pi * (y / 48 - t / 25))
    b = 128 + 60 * np.sin(2 * np.pi * ((x + y) / 80 + t / 15))
    rgb = np.stack(np.broadcast_arrays(r, g, b), axis=-1)
    return torch.from_numpy(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


# -- an independent little MP4 reader (not the module's own) -------------------------------------------------


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the boxes in data[start:end]."""
    end = len(data) if end is None else end
    out, pos = [], start
    while pos < end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, body)
            body += 8
        out.append((kind, body, pos + size))
        pos += size
    assert pos == end
    return out


def _child(data: bytes, parent: tuple[bytes, int, int], kind: bytes) -> tuple[bytes, int, int]:
    (found,) = [b for b in _boxes(data, parent[1], parent[2]) if b[0] == kind]
    return found


# tfhd optional fields in order: (flag bit, name, bytes)
_TFHD_FIELDS = ((0x1, "base", 8), (0x2, "desc", 4), (0x8, "dur", 4), (0x10, "size", 4), (0x20, "flags", 4))


def _fragment_info(segment: bytes) -> dict[str, object]:
    """mfhd sequence, tfdt, and per-sample (duration, flags) of a one-fragment media segment."""
    top = _boxes(segment)
    assert [b[0] for b in top] == [b"moof", b"mdat"]
    moof = top[0]
    (seq,) = struct.unpack_from(">I", segment, _child(segment, moof, b"mfhd")[1] + 4)
    traf = _child(segment, moof, b"traf")
    tfdt = _child(segment, traf, b"tfdt")
    (vf,) = struct.unpack_from(">I", segment, tfdt[1])
    (time,) = struct.unpack_from(">Q" if vf >> 24 == 1 else ">I", segment, tfdt[1] + 4)

    tfhd = _child(segment, traf, b"tfhd")
    (tf_flags,) = struct.unpack_from(">I", segment, tfhd[1])
    pos = tfhd[1] + 8  # version/flags, track_ID
    defaults = {}
    for bit, name, width in _TFHD_FIELDS:
        if tf_flags & bit:
            defaults[name] = int.from_bytes(segment[pos : pos + width], "big")
            pos += width

    trun = _child(segment, traf, b"trun")
    flags, count = struct.unpack_from(">II", segment, trun[1])
    flags &= 0xFFFFFF
    pos = trun[1] + 8 + (4 if flags & 0x1 else 0)
    first_flags = None
    if flags & 0x4:
        (first_flags,) = struct.unpack_from(">I", segment, pos)
        pos += 4
    samples = []
    for i in range(count):
        dur, sflags = defaults.get("dur"), defaults.get("flags")
        if flags & 0x100:
            (dur,) = struct.unpack_from(">I", segment, pos)
            pos += 4
        if flags & 0x200:
            pos += 4
        if flags & 0x400:
            (sflags,) = struct.unpack_from(">I", segment, pos)
            pos += 4
        if flags & 0x800:
            pos += 4
        if i == 0 and first_flags is not None:
            sflags = first_flags
        samples.append((dur, sflags))
    return {"sequence": seq, "tfdt": time, "samples": samples}


def _decode(data: bytes) -> list[tuple[np.ndarray, Fraction, bool]]:
    """Every frame of an MP4 in memory: (RGB (H, W, 3), presentation time in seconds, is keyframe)."""
    with av.open(io.BytesIO(data)) as container:
        return [(_frame_to_rgb(f), Fraction(f.pts) * f.time_base, bool(f.key_frame)) for f in container.decode(video=0)]


def _encode_stream(w: int, h: int) -> tuple[Fmp4Encoder, torch.Tensor, list[bytes]]:
    enc = Fmp4Encoder(w, h, FPS)
    video = _video(17, h, w)
    segments = [enc.encode(video[ff : ff + n], ff)[0] for ff, n in CLIPS]
    return enc, video, segments


@pytest.fixture(scope="module", params=[(32, 32), (33, 17)], ids=["32x32", "33x17"])
def stream(request: pytest.FixtureRequest) -> tuple[Fmp4Encoder, torch.Tensor, list[bytes]]:
    return _encode_stream(*request.param)


def _check_frames(decoded: list[tuple[np.ndarray, Fraction, bool]], video: torch.Tensor, first_frame: int) -> None:
    n, h, w, _ = video.shape
    assert len(decoded) == n
    for i, (rgb, t, _) in enumerate(decoded):
        assert rgb.shape == (*encoded_size(h, w), 3)
        assert t == Fraction(first_frame + i, FPS)
        err = np.abs(rgb[:h, :w].astype(np.int16) - video[i].numpy().astype(np.int16)).mean()
        assert err < 6, f"frame {first_frame + i}: mean abs error {err:.2f}"
    assert decoded[0][2], "a segment must start with a keyframe"


def test_fmp4_concatenated_stream_decodes_continuously(stream: tuple[Fmp4Encoder, torch.Tensor, list[bytes]]) -> None:
    enc, video, segments = stream
    decoded = _decode(enc.init_segment() + b"".join(segments))
    _check_frames(decoded, video, 0)
    times = [t for _, t, _ in decoded]
    assert times == sorted(set(times))


def test_fmp4_each_segment_decodes_alone(stream: tuple[Fmp4Encoder, torch.Tensor, list[bytes]]) -> None:
    """A client joining mid-stream (or MSE seeking) appends init + a later segment only."""
    enc, video, segments = stream
    for (ff, n), segment in zip(CLIPS, segments, strict=True):
        _check_frames(_decode(enc.init_segment() + segment), video[ff : ff + n], ff)
    # Joining at the last clip and carrying on from there.
    _check_frames(_decode(enc.init_segment() + segments[2]), video[9:], 9)


def test_fmp4_fragment_boxes(stream: tuple[Fmp4Encoder, torch.Tensor, list[bytes]]) -> None:
    enc, _, segments = stream
    ts = enc.timescale
    assert ts % FPS == 0
    for i, ((ff, n), segment) in enumerate(zip(CLIPS, segments, strict=True)):
        info = _fragment_info(segment)
        assert info["sequence"] == i + 1
        assert info["tfdt"] == ff * ts // FPS
        samples = info["samples"]
        assert isinstance(samples, list) and len(samples) == n
        assert all(dur == ts // FPS for dur, _ in samples)  # no gaps or overlaps on the timeline
        first_flags = samples[0][1]
        assert first_flags is not None and not first_flags & 0x10000, "first sample must be a sync sample"
        assert (first_flags >> 24) & 0x3 == 2, "first sample must not depend on others"


def test_fmp4_init_segment(stream: tuple[Fmp4Encoder, torch.Tensor, list[bytes]]) -> None:
    enc, video, _ = stream
    init = enc.init_segment()
    assert init == enc.init_segment()
    assert [b[0] for b in _boxes(init)] == [b"ftyp", b"moov"]
    moov = _boxes(init)[1]
    assert any(b[0] == b"mvex" for b in _boxes(init, moov[1], moov[2])), "fragmented MP4 needs mvex"
    h, w = video.shape[1:3]
    assert init == Fmp4Encoder(w, h, FPS).init_segment(), "deterministic for the same stream parameters"
    assert enc.encoded_size == encoded_size(h, w)


def test_fmp4_mime(stream: tuple[Fmp4Encoder, torch.Tensor, list[bytes]]) -> None:
    enc, _, _ = stream
    m = re.fullmatch(r'video/mp4; codecs="avc1\.([0-9a-f]{6})"', enc.mime)
    assert m is not None, enc.mime
    assert m.group(1)[:2] == "64"  # High profile
    assert bytes.fromhex(m.group(1)) in enc.init_segment()  # the SPS bytes (and avcC header) carry them


def test_fmp4_content_changes_keep_parameter_sets() -> None:
    """Noise then flat frames: per-clip encoders must keep SPS/PPS identical to the init segment (else raise)."""
    enc = Fmp4Encoder(32, 32, FPS)
    gen = torch.Generator().manual_seed(0)
    enc.encode(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=gen), 0)
    enc.encode(torch.full((3, 32, 32, 3), 200, dtype=torch.uint8), 4)


def test_fmp4_tfdt_beyond_32_bits() -> None:
    enc = Fmp4Encoder(32, 32, FPS)
    ff = 10**7  # ~14.5 days at 8 fps: past 2**32 timescale units
    (segment,) = enc.encode(_video(2, 32, 32, ff), ff)
    assert _fragment_info(segment)["tfdt"] == ff * enc.timescale // FPS > 2**32
    _check_frames(_decode(enc.init_segment() + segment), _video(2, 32, 32, ff), ff)


def test_fmp4_long_clip_splits_into_fragments(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip longer than the GOP limit becomes several moof + mdat pairs, each an IDR with its own time."""
    monkeypatch.setitem(fmp4._X264_OPTIONS, "x264-params", "keyint=4:min-keyint=4:scenecut=0:open-gop=0")
    enc = Fmp4Encoder(32, 32, FPS)
    video = _video(12, 32, 32)
    segments = [enc.encode(video[:10], 0)[0], enc.encode(video[10:], 10)[0]]
    boxes = _boxes(segments[0])
    assert [b[0] for b in boxes] == [b"moof", b"mdat"] * 3
    pairs = [segments[0][boxes[i][1] - 8 : boxes[i + 1][2]] for i in (0, 2, 4)] + [segments[1]]
    infos = [_fragment_info(p) for p in pairs]
    assert [i["sequence"] for i in infos] == [1, 2, 3, 4]
    assert [i["tfdt"] for i in infos] == [f * enc.timescale // FPS for f in (0, 4, 8, 10)]
    _check_frames(_decode(enc.init_segment() + b"".join(segments)), video, 0)
    _check_frames(_decode(enc.init_segment() + pairs[1]), video[4:8], 4)


def _downgrade_tfdt(segment: bytes) -> bytes:
    """The segment with a 32-bit (version 0) tfdt, as other muxers write it: moof shrinks by 4 bytes."""
    moof, mdat = _boxes(segment)
    traf = _child(segment, moof, b"traf")
    tfdt = _child(segment, traf, b"tfdt")
    trun = _child(segment, traf, b"trun")
    (time,) = struct.unpack_from(">Q", segment, tfdt[1] + 4)
    (offset,) = struct.unpack_from(">i", segment, trun[1] + 8)
    new_trun = segment[trun[1] - 8 : trun[1] + 8] + struct.pack(">i", offset - 4) + segment[trun[1] + 12 : trun[2]]
    new_tfdt = struct.pack(">I4sII", 16, b"tfdt", 0, time)
    parts = []
    for kind, body, end in _boxes(segment, traf[1], traf[2]):
        parts.append(new_tfdt if kind == b"tfdt" else new_trun if kind == b"trun" else segment[body - 8 : end])
    new_traf = struct.pack(">I4s", 8 + sum(map(len, parts)), b"traf") + b"".join(parts)
    rest = [segment[body - 8 : end] for kind, body, end in _boxes(segment, moof[1], moof[2]) if kind != b"traf"]
    new_moof = struct.pack(">I4s", 8 + sum(map(len, rest)) + len(new_traf), b"moof") + b"".join(rest) + new_traf
    return new_moof + segment[mdat[1] - 8 : mdat[2]]


def test_rewrite_moof_grows_version0_tfdt() -> None:
    """A 32-bit tfdt is widened to 64 bits; the trun data offset must follow the moof's new size."""
    enc = Fmp4Encoder(32, 32, FPS)
    video = _video(3, 32, 32, 4)
    v0 = _downgrade_tfdt(enc.encode(video, 0)[0])
    moof = next(fmp4._iter_boxes(v0))
    assert moof.type == b"moof"
    shift = 4 * enc.timescale // FPS
    rewritten = fmp4._rewrite_moof(v0, moof, 7, shift) + v0[moof.end :]
    assert len(rewritten) == len(v0) + 4
    info = _fragment_info(rewritten)
    assert info["sequence"] == 7 and info["tfdt"] == shift
    _check_frames(_decode(enc.init_segment() + rewritten), video, 4)


def test_fmp4_rejects_bad_clips() -> None:
    enc = Fmp4Encoder(32, 32, FPS)
    good = _video(2, 32, 32)
    with pytest.raises(ValueError):
        enc.encode(good.float(), 0)
    for bad in (good[..., :2], good[:, :16], good[:, :, :31], good[0], good[:0], torch.cat([good, good[..., :1]], -1)):
        with pytest.raises(ValueError):
            enc.encode(bad, 0)
    with pytest.raises(ValueError):
        enc.encode(good, -1)
    enc.encode(good, 0)
    with pytest.raises(ValueError, match="overlaps"):
        enc.encode(good, 1)
    enc.encode(good, 2)
    with pytest.raises(ValueError):
        Fmp4Encoder(0, 32, FPS)
    with pytest.raises(ValueError):
        Fmp4Encoder(32, 32, FPS, crf=0)


def test_jpeg_encoder() -> None:
    h, w = 17, 33
    video = _video(3, h, w)
    enc = JpegEncoder()
    assert enc.mime == "image/jpeg"
    jpegs = enc.encode(video, 5)
    assert len(jpegs) == 3
    for jpeg, frame in zip(jpegs, video, strict=True):
        with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as im:
            assert im.size == (w, h) and im.mode == "RGB"
            rgb = np.asarray(im)
        assert np.abs(rgb.astype(np.int16) - frame.numpy().astype(np.int16)).mean() < 4
    with pytest.raises(ValueError):
        enc.encode(video.float(), 0)
    with pytest.raises(ValueError):
        enc.encode(video[0], 0)


def test_make_encoder_gives_a_clip_encoder_per_format() -> None:
    encoders = {fmt: make_encoder(fmt, 32, 16, FPS) for fmt in FORMATS}
    assert isinstance(encoders["fmp4"], Fmp4Encoder) and encoders["fmp4"].encoded_size == (16, 32)
    assert isinstance(encoders["jpeg"], JpegEncoder) and encoders["jpeg"].init_segment() is None
    video = _video(3, 16, 32)
    for fmt, enc in encoders.items():  # the protocol the engine relies on: mime, init segment, messages per clip
        assert isinstance(enc, ClipEncoder) and enc.mime.startswith({"fmp4": "video/mp4", "jpeg": "image/jpeg"}[fmt])
        media = enc.encode(video, 0)
        assert isinstance(media, list) and all(isinstance(m, bytes) and m for m in media)
        assert len(media) == {"fmp4": 1, "jpeg": 3}[fmt]
    with pytest.raises(ValueError):
        encoders["jpeg"].encode(_video(1, 32, 32), 0)  # the stream size is enforced
    with pytest.raises(ValueError, match="unknown output format"):
        make_encoder("gif", 32, 16, FPS)
