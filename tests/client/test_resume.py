"""StreamClient and `ca2vdm-client stream` resuming dropped connections, against a fake server (fake_stream.py)."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from ca2vdm.client import Clip, Done, Ready, StreamClient, StreamError, TransportError
from ca2vdm.client.cli import main
from tests.client.fake_stream import INIT, SESSION, TOKEN, FakeStream, clips_from, frame, segment

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05}


Reconnects = list[tuple[int, float, Exception]]


def run(events_of, reconnects: Reconnects | None = None) -> list:
    """The events of `events_of(on_reconnect)`; the reconnections reported go to `reconnects`."""
    hook = (lambda *a: reconnects.append(a)) if reconnects is not None else None

    async def go() -> list:
        async with aclosing(events_of(hook)) as events:
            return [event async for event in events]

    return asyncio.run(go())


def stream(fake: FakeStream, fmt: str = "jpeg", **kwargs):
    client = StreamClient(fake.url, open_timeout=2)
    return lambda hook: client.stream(num_frames=fake.total, format=fmt, on_reconnect=hook, **{**FAST, **kwargs})


def check_contiguous(events: list, total: int, fmt: str) -> None:
    assert isinstance(events[0], Ready) and events[-1] == Done(total)
    assert sum(isinstance(e, Ready) for e in events) == 1 and sum(isinstance(e, Done) for e in events) == 1
    clips = events[1:-1]
    assert all(isinstance(c, Clip) for c in clips)
    expect = 0
    for clip in clips:  # contiguous, no duplicates, media matching the header
        assert clip.first_frame == expect and clip.num_frames >= 1
        assert len(clip.media) == (1 if fmt == "fmp4" else clip.num_frames)
        expect += clip.num_frames
    assert expect == total
    if fmt == "jpeg":
        assert [m for c in clips for m in c.media] == [frame(i) for i in range(total)]
    else:
        assert events[0].init_segment == INIT
        assert [c.media[0] for c in clips] == [segment(f, n) for f, n in clips_from(0, total, 8)]


@pytest.mark.parametrize("fmt", ["jpeg", "fmp4"])
def test_drops_are_resumed_into_the_uninterrupted_sequence(fmt):
    with FakeStream(drop_at_clips=[1, 3, 4]) as fake:  # mid-clip drops, one of them on a resumed connection
        events = run(stream(fake, fmt), reconnects := [])
    assert not fake.errors
    check_contiguous(events, 33, fmt)
    ready = events[0]
    assert (ready.session_id, ready.resume_token, ready.first_frame, ready.format) == (SESSION, TOKEN, 0, fmt)
    assert fake.connections == 4 and [m["type"] for m in fake.first_messages] == ["start"] + ["resume"] * 3
    assert fake.acked_at_drops == [1, 9, 9]  # the clips fully received before each drop...
    assert fake.resumed_from == fake.acked_at_drops  # ...are exactly what the client resumed from
    assert [m["token"] for m in fake.first_messages[1:]] == [TOKEN] * 3
    assert [a for a, _, _ in reconnects] == [1, 2, 3]
    assert all(isinstance(e, StreamError) and e.code == "disconnected" for _, _, e in reconnects)


def test_a_resent_overlapping_clip_is_trimmed():
    # on resume the server restarts 3 frames early, in clips of its own boundaries: [14, 22) and on
    with FakeStream(drop_at_clips=[3], overlap=3) as fake:
        events = run(stream(fake))
    check_contiguous(events, 33, "jpeg")
    assert fake.resumed_from == [17]
    assert [(c.first_frame, c.num_frames) for c in events[1:-1]] == [(0, 1), (1, 8), (9, 8), (17, 5), (22, 8),
                                                                      (30, 3)]  # fmt: skip


def test_expired_is_final():
    with FakeStream(drop_at_clips=[2], expire=True) as fake:
        with pytest.raises(StreamError) as info:
            run(stream(fake))
    assert info.value.code == "expired" and info.value.close_code == 1008
    assert fake.connections == 2  # no retry after `expired`


def test_server_busy_on_resume_is_retried():
    with FakeStream(drop_at_clips=[2], busy_resumes=2) as fake:
        events = run(stream(fake), reconnects := [])
    check_contiguous(events, 33, "jpeg")
    assert fake.connections == 4  # start, two busy resumes, the resume that goes on
    assert [e.code for _, _, e in reconnects] == ["disconnected", "server_busy", "server_busy"]


def test_reconnects_stop_after_max_reconnects_with_growing_backoff():
    reconnects: Reconnects = []
    with FakeStream(drop_at_clips=[2], drop_resumes=100) as fake:
        with pytest.raises(StreamError) as info:
            run(stream(fake, max_reconnects=5, backoff_s=0.01, max_backoff_s=0.04), reconnects)
    assert info.value.code == "disconnected" and "gave up after 5 reconnection attempts" in info.value.message
    assert fake.connections == 1 + 5 and [a for a, _, _ in reconnects] == [1, 2, 3, 4, 5]
    delays = [d for _, d, _ in reconnects]
    nominal = [0.01, 0.02, 0.04, 0.04, 0.04]  # doubling up to the cap, times a factor in [0.5, 1]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal, strict=True)), delays
    assert delays[:3] == sorted(delays[:3]) and delays[2] > delays[0]  # grows until the cap


def test_unreachable_server_on_reconnect_is_retried_then_a_transport_error():
    with FakeStream(drop_at_clips=[2], refuse_after_drop=True) as fake:
        with pytest.raises(TransportError) as info:
            run(stream(fake, max_reconnects=3))
    assert "gave up after 3" in str(info.value) and fake.connections == 1


def test_no_resume_raises_on_the_first_drop():
    with FakeStream(drop_at_clips=[2]) as fake:
        with pytest.raises(StreamError) as info:
            run(stream(fake, resume=False))
    assert info.value.code == "disconnected" and fake.connections == 1


def test_a_drop_in_the_first_clip_resumes_from_frame_0():
    with FakeStream(drop_at_clips=[0]) as fake:
        events = run(stream(fake))
    check_contiguous(events, 33, "jpeg")
    assert fake.resumed_from == [0]


def test_a_drop_before_ready_cannot_be_resumed():
    with FakeStream(drop_start=True) as fake:  # no token yet
        with pytest.raises(StreamError) as info:
            run(stream(fake))
    assert info.value.code == "disconnected" and fake.connections == 1


def test_public_resume_from_another_client():
    with FakeStream(drop_at_clips=[2]) as fake:
        first = StreamClient(fake.url)

        async def go() -> tuple[list, list]:
            before = []
            with pytest.raises(StreamError):
                async with aclosing(first.stream(format="jpeg", resume=False)) as events:
                    async for event in events:
                        before.append(event)
            ready = before[0]
            have = sum(c.num_frames for c in before[1:])
            after = [e async for e in StreamClient(fake.url).resume(ready.resume_token, have, **FAST)]
            return before, after

        before, after = asyncio.run(go())
    assert fake.resumed_from == [9]
    ready = after[0]
    assert isinstance(ready, Ready) and (ready.session_id, ready.first_frame, ready.resume_token) == (SESSION, 9, TOKEN)
    frames = [m for e in before[1:] + after[1:-1] for m in e.media]
    assert frames == [frame(i) for i in range(33)] and after[-1] == Done(33)


def test_stop_while_streaming_still_ends_with_done():
    with FakeStream(total=200, drop_at_clips=[3]) as fake:
        client = StreamClient(fake.url)

        async def go() -> list:
            out = []
            async with aclosing(client.stream(format="jpeg", **FAST)) as events:
                async for event in events:
                    out.append(event)
                    if isinstance(event, Clip) and event.first_frame >= 25:  # after the resume
                        await client.stop()
            return out

        events = asyncio.run(go())
    assert isinstance(events[-1], Done) and fake.resumed_from == [17]
    assert [m for e in events[1:-1] for m in e.media] == [frame(i) for i in range(events[-1].frames)]


def test_cli_stream_survives_drops(tmp_path, capsys):
    out = tmp_path / "s.mp4"
    start = time.monotonic()
    with FakeStream(drop_at_clips=[1, 3]) as fake:
        assert main(["--url", fake.url, "stream", "--frames", "33", "--out", str(out)]) == 0
    assert time.monotonic() - start < 5
    # byte for byte what an uninterrupted stream writes: the init segment once, then every clip's segment
    assert out.read_bytes() == INIT + b"".join(segment(f, n) for f, n in clips_from(0, 33, 8))
    err = capsys.readouterr().err
    assert err.count("connection lost") == 2 and "resuming at frame 1 " in err and "resuming at frame 9 " in err
    assert "wrote 33 frames" in err
    assert [p.name for p in tmp_path.iterdir()] == ["s.mp4"]


def test_cli_stream_gives_up_and_keeps_what_it_has(tmp_path, capsys):
    out = tmp_path / "s.mp4"
    with FakeStream(drop_at_clips=[2], drop_resumes=100) as fake:
        assert main(["--url", fake.url, "stream", "--frames", "33", "--max-reconnects", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("connection lost") == 2 and "gave up after 2" in err and "kept 9 frames" in err
    assert out.read_bytes() == INIT + segment(0, 1) + segment(1, 8)


def test_stop_during_the_backoff_resumes_at_once_for_done():
    with FakeStream(total=200, drop_at_clips=[2]) as fake:
        client = StreamClient(fake.url)
        tasks = []

        def on_reconnect(*_: object) -> None:  # the stop comes while the client waits out a long backoff
            tasks.append(asyncio.get_running_loop().create_task(client.stop()))

        async def go() -> list:
            events = client.stream(format="jpeg", backoff_s=30, max_backoff_s=30, on_reconnect=on_reconnect)
            async with aclosing(events):
                return [event async for event in events]

        start = time.monotonic()
        events = asyncio.run(go())
    assert time.monotonic() - start < 5
    assert fake.resumed_from == [9] and fake.first_messages[-1]["type"] == "resume"
    assert isinstance(events[-1], Done) and events[-1].frames < 200
    assert [m for e in events[1:-1] for m in e.media] == [frame(i) for i in range(events[-1].frames)]
