"""`StreamClient` and the real server together, through a TCP proxy that cuts the connection (no close frame) after a
given number of bytes from the server, several times: the client resumes on its own and yields exactly the frames of
an uninterrupted stream. The fake-server tests (test_resume.py) cover the client's edge cases; this is the two real
halves of the protocol against each other."""

from __future__ import annotations

import asyncio

from ca2vdm.client.stream import Clip, Done, Ready, StreamClient
from tests.proxy import CuttingProxy

START = {"seed": 8, "steps": 2, "num_frames": 1 + 8 * 9, "format": "jpeg"}


async def frames_of(url: str, **kwargs) -> tuple[list, list]:
    events, reconnects = [], []
    client = StreamClient(url)
    async for event in client.stream(**START, backoff_s=0.05, on_reconnect=lambda *a: reconnects.append(a), **kwargs):
        events.append(event)
    return events, reconnects


def test_the_client_resumes_the_real_server_through_cut_connections(server):
    async def main():
        reference, _ = await frames_of(server)
        async with CuttingProxy(server, cuts=[3_000, 9_000, 5_000]) as proxied:
            events, reconnects = await frames_of(proxied)
        return reference, events, reconnects

    reference, events, reconnects = asyncio.run(main())
    assert len(reconnects) == 3
    assert isinstance(events[0], Ready) and isinstance(events[-1], Done)
    assert sum(isinstance(e, Ready) for e in events) == 1
    clips = [e for e in events if isinstance(e, Clip)]
    ref_clips = [e for e in reference if isinstance(e, Clip)]

    def jpegs(cs):
        return [j for c in cs for j in c.media]

    assert jpegs(clips) == jpegs(ref_clips)  # byte for byte: the same frames
    assert events[-1].frames == START["num_frames"]
