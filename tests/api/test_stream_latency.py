"""bench/stream_latency.py against a real server: what it reports matches what was streamed."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("stream_latency", ROOT / "bench" / "stream_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_stream_latency_reports_first_clip_and_rate(server):
    bench = _load_bench()
    args = argparse.Namespace(url=server, api_key=None, image=None, frames=25, sessions=2)
    result = asyncio.run(bench.run(args))
    assert result["sessions"] == 2 and len(result["per_session"]) == 2
    for row in result["per_session"]:
        assert row["clips"] == 4  # no image: all 25 frames are generated, in clips of 8, 8, 8, 1
        assert 0 < row["first_clip_s"] < 60 and row["frames_per_s_after_first"] > 0
    assert result["first_clip_s_p50"] > 0


def test_stream_latency_with_an_image_skips_the_condition_frame(server, tmp_path):
    from PIL import Image

    from tests.images import smooth_image

    path = tmp_path / "cond.png"
    Image.fromarray(smooth_image(16, 16).numpy()).save(path)
    bench = _load_bench()
    args = argparse.Namespace(url=server, api_key=None, image=str(path), frames=25, sessions=1)
    (row,) = asyncio.run(bench.run(args))["per_session"]
    assert row["clips"] == 3  # frame 0 is the image; frames 1-24 come in three generated clips
