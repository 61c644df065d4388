"""A text-conditioned model behind the real server (tiny-text model with its tiny random T5, on loopback): streams
with a prompt and guidance, the prompt changed mid-stream in both modes, a REST job with a prompt, and the refusals
(a video-prediction model takes no prompt; guidance needs a prompt; too long; too frequent)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ca2vdm.server.api.requests import Reject, RequestDecoder
from ca2vdm.server.api.settings import Settings
from ca2vdm.server.media import read_video
from ca2vdm.server.model.loader import load_pipeline
from tests.api.conftest import running_server
from tests.api.test_stream import run_stream
from tests.api.test_videos import wait_for

SEED = 21


@pytest.fixture(scope="module")
def text_server():
    pipe = load_pipeline("random:tiny-text", device="cpu")
    # max_pending_clips=1: a stream cannot run clips ahead of its client, so a prompt change sent on clip 1 lands
    # while clip 2 or 3 is generated, whatever the machine's speed
    with running_server(pipe, max_sessions=4, max_batch=4, min_prompt_interval_s=0.5, max_pending_clips=1) as address:
        yield address


def start(**kwargs) -> dict:
    return {"type": "start", "seed": SEED, "steps": 2, "num_frames": 41, "format": "jpeg", "pace": "max", **kwargs}


def jpegs(messages) -> list[bytes]:
    return [m for kind, m in messages if kind == "bytes"]


def switched_stream(address, first: str, second: str | None, recache: bool, after_clip: int = 1) -> list[bytes]:
    """A stream's JPEG frames, its prompt changed to `second` once clip `after_clip` has arrived, acknowledging
    each clip only after that (so the session cannot run ahead of the change)."""
    frames: list[bytes] = []
    with connect(f"ws://{address}/v1/stream", max_size=2**25) as ws:
        ws.send(json.dumps(start(prompt=first)))
        left, end = 0, 0
        try:
            while True:
                msg = ws.recv(timeout=60)
                if isinstance(msg, bytes):
                    frames.append(msg)
                    left -= 1
                    if left == 0:
                        ws.send(json.dumps({"type": "ack", "frames": end}))
                    continue
                data = json.loads(msg)
                if data["type"] == "clip":
                    left, end = data["num_frames"], data["first_frame"] + data["num_frames"]
                    if data["index"] == after_clip and second is not None:
                        ws.send(json.dumps({"type": "prompt", "text": second, "recache": recache}))
                elif data["type"] in ("done", "error"):
                    assert data["type"] == "done", data
                    break
        except ConnectionClosed:
            pass
    return frames


def test_models_say_the_model_takes_text(text_server):
    info = httpx.get(f"http://{text_server}/v1/models").json()
    assert info["text"] is True and info["guidance_scale"] == 3.0


def test_a_prompt_decides_the_video_and_guidance_matters(text_server):
    one = jpegs(run_stream(text_server, start(prompt="a red circle moves left"))[0])
    again = jpegs(run_stream(text_server, start(prompt="a red circle moves left"))[0])
    other = jpegs(run_stream(text_server, start(prompt="two blue squares bounce"))[0])
    unguided = jpegs(run_stream(text_server, start(prompt="a red circle moves left", guidance_scale=1.0))[0])
    none = jpegs(run_stream(text_server, start())[0])
    assert len(one) == 41 and one == again
    for different in (other, unguided, none):
        assert len(different) == 41 and different[1:] != one[1:]


@pytest.mark.parametrize("recache", [False, True])
def test_a_prompt_change_mid_stream_applies_from_a_later_clip(text_server, recache):
    plain = switched_stream(text_server, "a red circle moves left", None, recache)
    changed = switched_stream(text_server, "a red circle moves left", "two blue squares bounce", recache)
    assert len(plain) == len(changed) == 41
    assert changed[:17] == plain[:17]  # clips 0 and 1 (and the chunk in flight at the change, at least)
    assert changed[25:] != plain[25:]


def test_a_rest_job_takes_a_prompt(text_server, tmp_path):
    base = f"http://{text_server}"
    job = httpx.post(f"{base}/v1/videos", json={"num_frames": 9, "seed": 3, "prompt": "a green triangle",
                                                "guidance_scale": 2.0}).json()  # fmt: skip
    done = wait_for(text_server, job["id"])
    assert done["prompt"] == "a green triangle" and done["guidance_scale"] == 2.0
    (tmp_path / "v.mp4").write_bytes(httpx.get(f"{base}/v1/videos/{job['id']}/content").content)
    assert read_video(tmp_path / "v.mp4").shape == (9, 16, 16, 3)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (start(guidance_scale=2.0), "guidance_scale needs a prompt"),
        (start(prompt="x" * 2001), "prompt"),
        (start(prompt="   "), "empty"),
        (start(prompt="a", guidance_scale=51.0), "guidance_scale"),
    ],
)
def test_bad_prompts_are_refused(text_server, message, reason):
    messages, code = run_stream(text_server, message)
    error = messages[-1][1]
    assert error["type"] == "error" and error["code"] == "invalid_request" and reason in error["message"]


def test_prompt_changes_are_rate_limited(text_server):
    with connect(f"ws://{text_server}/v1/stream", max_size=2**25) as ws:
        ws.send(json.dumps(start(prompt="a red circle", num_frames=None, pace="realtime")))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        for _ in range(2):
            ws.send(json.dumps({"type": "prompt", "text": "a blue square"}))
        error = None
        while error is None:
            msg = ws.recv(timeout=30)
            if isinstance(msg, str) and json.loads(msg)["type"] == "error":
                error = json.loads(msg)
        assert error["code"] == "invalid_request" and "at most one prompt change" in error["message"]


def test_a_video_prediction_model_refuses_a_prompt(server):
    messages, _ = run_stream(server, start(prompt="a red circle"))
    error = messages[-1][1]
    assert error["code"] == "invalid_request" and "not text-conditioned" in error["message"]
    response = httpx.post(f"http://{server}/v1/videos", json={"num_frames": 9, "prompt": "a red circle"})
    assert response.status_code == 422 and "not text-conditioned" in response.json()["error"]["message"]
    assert httpx.get(f"http://{server}/v1/models").json()["text"] is False


def test_a_queued_prompt_encode_is_not_refused_for_other_requests_load():
    """A running stream's prompt change and a queued job encode with `queued`: when other clients' large requests
    fill `max_pending_requests`, a new request's prompt is refused as busy, theirs waits for the encoder (a refusal
    would end the stream or fail the job)."""
    decoder = RequestDecoder(Settings(max_pending_requests=1), load_pipeline("random:tiny-text", device="cpu"))
    try:
        decoder._pending = 1  # another client's image is being decoded
        with pytest.raises(Reject, match="too many large requests") as busy:
            asyncio.run(decoder.prompt("a red ball"))
        assert busy.value.code == "server_busy"
        prompt = asyncio.run(decoder.prompt("a red ball", queued=True))
        assert prompt is not None and prompt.text == "a red ball" and prompt.y.shape[0] == 8
    finally:
        decoder.close()
