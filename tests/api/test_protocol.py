"""The websocket protocol's published message schemas: they are what the code sends and accepts. Real messages from a
stream through the server validate against the schemas served at /v1/stream/messages; the protocol's enumerations are
the server's; the limits in the schemas are the server's settings."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ca2vdm.client import protocol
from ca2vdm.server.api.openapi import ERROR_CODES
from ca2vdm.server.engine.session import PACES
from ca2vdm.server.media import FORMATS
from ca2vdm.server.model.diffusion import SAMPLERS
from tests.api.conftest import running_server


def test_the_protocol_enumerations_are_the_servers():
    assert protocol.SAMPLERS == tuple(SAMPLERS) and protocol.FORMATS == tuple(FORMATS)
    assert protocol.PACES == tuple(PACES)
    assert set(protocol.ErrorCode.__args__) == set(protocol.ERROR_CODES)
    from ca2vdm.server.api import stream

    assert set(stream.CLOSE_CODES) == set(protocol.ERROR_CODES)  # every error code has its close code
    assert "invalid_request" in ERROR_CODES.values()


async def _record(address: str, first: dict, send_after_clip: list[dict] | None = None) -> list:
    """Every message of one stream, text decoded, as (direction, message)."""
    messages = [("client", first)]
    async with connect(f"ws://{address}/v1/stream", max_size=2**24) as ws:
        await ws.send(json.dumps(first))
        left, end = 0, 0
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    left -= 1
                    if left == 0:
                        ack = {"type": "ack", "frames": end}
                        messages.append(("client", ack))
                        await ws.send(json.dumps(ack))
                        for extra in send_after_clip or []:
                            messages.append(("client", extra))
                            await ws.send(json.dumps(extra))
                        send_after_clip = None
                    continue
                data = json.loads(msg)
                messages.append(("server", data))
                if data["type"] == "clip":
                    left, end = (1 if first.get("format") == "fmp4" else data["num_frames"]), data["first_frame"] + \
                        data["num_frames"]  # fmt: skip
        except ConnectionClosed:
            pass
    return messages


def test_real_messages_validate_against_the_published_schemas(tiny_pipe):
    with running_server(tiny_pipe, max_frames=40, max_steps=4) as address:
        schemas = httpx.get(f"http://{address}/v1/stream/messages").json()
        # the server's limits are in the schemas it publishes
        steps = schemas["client_to_server"]["start"]["properties"]["steps"]["anyOf"][0]
        assert steps["maximum"] == 4
        assert schemas["client_to_server"]["start"]["properties"]["num_frames"]["anyOf"][0]["maximum"] == 40
        runs = [
            asyncio.run(_record(address, {"type": "start", "seed": 1, "steps": 2, "num_frames": 17, "format": "jpeg"})),
            asyncio.run(
                _record(
                    address,
                    {"type": "start", "seed": 2, "steps": 2, "format": "fmp4", "pace": "max"},
                    send_after_clip=[{"type": "stop"}],
                )
            ),  # fmt: skip
            asyncio.run(_record(address, {"type": "start", "steps": 99})),  # an error
            asyncio.run(_record(address, {"type": "resume", "token": "nope", "from_frame": 0})),
        ]
    seen = set()
    for run in runs:
        for direction, message in run:
            kind = "client_to_server" if direction == "client" else "server_to_client"
            schema = schemas[kind].get(message["type"])
            if direction == "client" and message.get("steps") == 99:
                assert schema is not None
                assert not jsonschema.Draft202012Validator(schema).is_valid(message)  # what the server refused
                continue
            assert schema is not None, message
            jsonschema.validate(message, schema, cls=jsonschema.Draft202012Validator)
            seen.add((direction, message["type"]))
    assert {("server", t) for t in ("ready", "clip", "done", "error")} <= seen
    assert {("client", t) for t in ("start", "ack", "stop", "resume")} <= seen


def test_the_python_client_refuses_messages_that_break_the_protocol():
    """A server that sends a clip with a negative index: the client stops with protocol_error instead of passing it
    on."""
    import pytest
    from websockets.asyncio.server import serve

    from ca2vdm.client.errors import StreamError
    from ca2vdm.client.stream import StreamClient

    async def fake(ws) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "ready", "session_id": "s", "width": 16, "height": 16, "fps": 8,
                                  "chunk_frames": 8, "format": "jpeg", "mime": "image/jpeg", "resume_token": None,
                                  "first_frame": 0}))  # fmt: skip
        await ws.send(json.dumps({"type": "clip", "index": -1, "first_frame": 0, "num_frames": 1, "gen_ms": 1.0}))
        await asyncio.sleep(5)

    async def main() -> None:
        async with serve(fake, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(StreamError) as err:
                async for _ in StreamClient(f"127.0.0.1:{port}").stream(format="jpeg", resume=False):
                    pass
            assert err.value.code == "protocol_error" and "index" in err.value.message

    asyncio.run(main())
