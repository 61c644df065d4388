"""The web player in headless Chromium against a real server: video actually plays.

Chromium is driven over the DevTools protocol (a websocket), so no driver binary is needed. CI installs
Debian's chromium and sets CA2VDM_REQUIRE_BROWSER=1, which turns a missing browser into a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.api.conftest import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class DevTools:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("CA2VDM_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required (CA2VDM_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="ca2vdm-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=2**24) as ws:
            yield DevTools(ws)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def test_player_plays_streamed_video(browser, tiny_pipe):
    with running_server(tiny_pipe) as address:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"http://{address}/?autostart=1&frames=41&steps=2&sample=shapes")
        samples = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            probe = browser.evaluate(
                "window.ca2vdm && window.ca2vdm.video ? JSON.stringify({s: {clips: ca2vdm.clips, "
                "frames: ca2vdm.frames, error: ca2vdm.error, done: ca2vdm.done}, v: ca2vdm.video()}) : null"
            )
            if probe:
                data = json.loads(probe)
                assert data["s"]["error"] is None, data
                samples.append(data)
                playing = [d["v"]["currentTime"] for d in samples if d["v"]["currentTime"] > 0]
                if data["v"]["decodedFrames"] > 0 and len(playing) > 2 and playing[-1] > playing[0]:
                    break
            time.sleep(0.2)
        assert samples, "the player never started"
        last = samples[-1]
        assert last["v"]["decodedFrames"] > 0, last
        assert last["v"]["currentTime"] > samples[0]["v"]["currentTime"], [s["v"] for s in samples]
        assert last["s"]["clips"] >= 1
        # the model's recommended schedules (here only its default) set sampler and steps in one click
        picked = json.loads(browser.evaluate(
            "(() => { const b = document.querySelectorAll('#schedules button'); b[0].click(); return JSON.stringify("
            "{n: b.length, text: b[0].textContent, sampler: document.getElementById('sampler').value,"
            " steps: document.getElementById('steps').value}); })()"
        ))  # fmt: skip
        info = httpx.get(f"http://{address}/v1/models").json()
        assert picked["n"] == len(info["schedules"]) >= 1, picked
        assert (picked["sampler"], picked["steps"]) == (info["default_sampler"], str(info["default_steps"])), picked
        shot = os.environ.get("CA2VDM_PLAYER_SCREENSHOT")  # for a person to look at
        if shot:
            import base64

            Path(shot).write_bytes(base64.b64decode(browser.call("Page.captureScreenshot")["data"]))


# ---- resume: the player against a fake server that drops the connection ------------------------------------------

STATIC = Path(__file__).resolve().parents[2] / "server" / "api" / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".png": "image/png"}


class FakePlayerServer:
    """Serves the player's files and a `/v1/stream` of real fMP4 clips (64x64, 8 fps) that drops its first
    connection after `drop_after` clips (mid-clip: a clip header, then a TCP reset). A resume is answered with
    the frames from `from_frame` on, re-encoded in clips of 5 frames (other boundaries than the first connection's
    8, so each segment must land at its own tfdt), or with `expired`, or (`drop_resumes`) dropped again."""

    def __init__(self, total: int = 41, drop_after: int = 2, expire: bool = False, drop_resumes: bool = False):
        import torch

        self.total, self.drop_after, self.expire, self.drop_resumes = total, drop_after, expire, drop_resumes
        t = torch.arange(total).view(-1, 1, 1)  # a moving gradient: every frame differs
        y, x = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
        channels = [(x + 4 * t) % 256, (y * 4 + 0 * t) % 256, (x + y + 8 * t) % 256]
        self.frames = torch.stack(channels, dim=-1).to(torch.uint8)  # (total, 64, 64, 3)
        self.connections, self.resumed_from, self.acks = 0, [], []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakePlayerServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        from websockets.asyncio.server import serve

        self.server = await serve(self._stream, "127.0.0.1", 0, process_request=self._http, compression=None)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def _http(self, connection, request):
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        path = request.path.split("?")[0]
        if path == "/v1/stream":
            return None  # the websocket handshake
        file = STATIC / "index.html" if path == "/" else STATIC / path.removeprefix("/static/")
        if not path.startswith(("/static/", "/")) or ".." in path or not file.is_file():
            body, status, ctype = b"not found", 404, "text/plain"
        else:
            body, status, ctype = file.read_bytes(), 200, TYPES.get(file.suffix, "application/octet-stream")
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")])
        return Response(status, "OK" if status == 200 else "Not Found", headers, body)

    async def _stream(self, ws) -> None:
        from ca2vdm.server.media.fmp4 import Fmp4Encoder

        self.connections += 1
        first = json.loads(await ws.recv())
        encoder = Fmp4Encoder(64, 64, 8)
        if first["type"] == "resume":
            assert first["token"] == "tok"
            if self.expire:
                await ws.send(json.dumps({"type": "error", "code": "expired", "message": "session expired"}))
                return await ws.close(1008)
            if self.drop_resumes:
                return ws.transport.abort()
            start, size = first["from_frame"], 5
            self.resumed_from.append(start)
            clips = [(f, min(size, self.total - f)) for f in range(start, self.total, size)]
        else:
            start = 0
            clips = [(0, 1)] + [(f, min(8, self.total - f)) for f in range(1, self.total, 8)]
        await ws.send(json.dumps({"type": "ready", "session_id": "s1", "width": 64, "height": 64, "fps": 8,
                                  "chunk_frames": 8, "format": "fmp4", "mime": encoder.mime, "resume_token": "tok",
                                  "first_frame": start}))  # fmt: skip
        await ws.send(encoder.init_segment())
        for number, (f, n) in enumerate(clips):
            await ws.send(json.dumps({"type": "clip", "index": number, "first_frame": f, "num_frames": n}))
            if first["type"] == "start" and number == self.drop_after:
                await asyncio.sleep(0.1)
                return ws.transport.abort()  # a TCP reset mid-clip: no close frame, no error
            await ws.send(encoder.encode(self.frames[f : f + n], f)[0])
            self.acks.append(json.loads(await ws.recv()))  # lock step: the next clip once this one is acknowledged
            await asyncio.sleep(0.05)
        await ws.send(json.dumps({"type": "done", "frames": self.total}))
        await ws.close(1000)


def _poll(browser, until, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = json.loads(browser.evaluate(
            "JSON.stringify({s: {clips: ca2vdm.clips, frames: ca2vdm.frames, error: ca2vdm.error, done: ca2vdm.done,"
            " running: ca2vdm.running, reconnects: ca2vdm.reconnects, resumedFrom: ca2vdm.resumedFrom},"
            " v: ca2vdm.video(), status: document.getElementById('status').textContent})"
        ))  # fmt: skip
        if until(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def _open_player(browser, address: str, **reconnect) -> None:
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"http://{address}/?frames=41&sample=shapes")
    deadline = time.monotonic() + 30
    while not browser.evaluate("!!(window.ca2vdm && window.ca2vdm.reconnect && document.readyState == 'complete')"):
        assert time.monotonic() < deadline, "the player did not load"
        time.sleep(0.1)
    browser.evaluate(
        f"Object.assign(ca2vdm.reconnect, {json.dumps(reconnect)}); document.getElementById('start').click()"
    )


def test_player_resumes_a_dropped_stream(browser):
    with FakePlayerServer() as fake:
        _open_player(browser, fake.address, backoffMs=100)
        data = _poll(browser, lambda d: d["s"]["done"] or d["s"]["error"] or not d["s"]["running"])
        assert data["s"]["done"] and data["s"]["error"] is None, data
        assert fake.resumed_from == [9] and data["s"]["resumedFrom"] == [9] and data["s"]["reconnects"] == 1
        assert "resumed at frame 9" in data["status"] or "done" in data["status"]
        assert data["s"]["frames"] == 41 and fake.connections == 2
        assert [a["frames"] for a in fake.acks] == [1, 9] + [14, 19, 24, 29, 34, 39, 41]
        # one buffered range from 0 to the end: the resumed segments (re-encoded, other boundaries) fill the gap
        played = _poll(browser, lambda d: d["v"]["currentTime"] > 1.0 and len(d["v"]["buffered"]) == 1, timeout=15)
    (start, end), *rest = played["v"]["buffered"]
    assert not rest and start < 0.01 and abs(end - 41 / 8) < 0.01, played["v"]
    assert played["v"]["currentTime"] > 1.0 and played["v"]["decodedFrames"] > 0, played["v"]


def test_player_expired_is_final(browser):
    with FakePlayerServer(expire=True) as fake:
        _open_player(browser, fake.address, backoffMs=50)
        data = _poll(browser, lambda d: not d["s"]["running"])
        time.sleep(0.3)
        assert fake.connections == 2  # the drop, one resume answered `expired`, no more tries
    assert not data["s"]["running"] and data["s"]["error"].startswith("expired"), data


def test_player_gives_up_after_its_tries(browser):
    with FakePlayerServer(drop_resumes=True) as fake:
        _open_player(browser, fake.address, tries=3, backoffMs=20, maxBackoffMs=50)
        data = _poll(browser, lambda d: not d["s"]["running"])
        assert fake.connections == 1 + 3
    assert "gave up after 3 reconnection attempts" in data["s"]["error"], data


def test_player_resumes_the_real_server_through_cut_connections(browser, tiny_pipe):
    """The real server behind a proxy that kills the player's websocket twice mid-stream: the player reconnects on
    its own, resumes, and ends with every frame in one buffered range, playing."""
    from tests.proxy import CuttingProxy

    with running_server(tiny_pipe) as address:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        proxy = CuttingProxy(address, cuts=[4_000, 4_000], match=b"GET /v1/stream")
        proxied = asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(10)
        try:
            browser.call("Page.enable")
            browser.call("Page.navigate", url=f"http://{proxied}/?frames=81&steps=2&sample=shapes")
            deadline = time.monotonic() + 30
            while not browser.evaluate("!!(window.ca2vdm && window.ca2vdm.reconnect && "
                                       "document.readyState == 'complete')"):  # fmt: skip
                assert time.monotonic() < deadline, "the player did not load"
                time.sleep(0.1)
            browser.evaluate("Object.assign(ca2vdm.reconnect, {backoffMs: 100}); "
                             "document.getElementById('start').click()")  # fmt: skip
            data = _poll(browser, lambda d: d["s"]["done"] or d["s"]["error"] or not d["s"]["running"], timeout=90)
            assert data["s"]["done"] and data["s"]["error"] is None, data
            assert proxy.cut == 2 and data["s"]["reconnects"] == 2, data
            assert data["s"]["frames"] == 81, data
            played = _poll(browser, lambda d: d["v"]["currentTime"] > 1.0 and len(d["v"]["buffered"]) == 1, 20)
            assert len(played["v"]["buffered"]) == 1, played
            (start, end), *_ = played["v"]["buffered"]
            assert start <= 0.05 and end >= 80 / 8 - 0.2, played
            assert played["v"]["currentTime"] > 1.0, played
        finally:
            asyncio.run_coroutine_threadsafe(proxy.__aexit__(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


def test_player_streams_a_text_model_with_a_prompt_and_changes_it(browser):
    """A text-conditioned model: the player shows its prompt box, starts with the prompt, plays, and the live
    field changes the prompt (the server counts the switch, with the mode asked for)."""
    from ca2vdm.server.model.loader import load_pipeline

    pipe = load_pipeline("random:tiny-text", device="cpu")
    with running_server(pipe, min_prompt_interval_s=0.0, max_sessions=4, max_batch=4) as address:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"http://{address}/?autostart=1&steps=2&sample=shapes"
                                          "&prompt=a%20red%20circle&guidance=2")  # fmt: skip
        deadline = time.monotonic() + 90
        state = {}
        while time.monotonic() < deadline:
            probe = browser.evaluate("window.ca2vdm && window.ca2vdm.video ? JSON.stringify({clips: ca2vdm.clips, "
                                     "error: ca2vdm.error, box: !document.getElementById('text').hidden, "
                                     "t: ca2vdm.video().currentTime}) : null")  # fmt: skip
            if probe:
                state = json.loads(probe)
                assert state["error"] is None, state
                if state["clips"] >= 2 and state["t"] > 0:
                    break
            time.sleep(0.2)
        assert state.get("box") and state["clips"] >= 2 and state["t"] > 0, state
        browser.evaluate("document.getElementById('newprompt').value = 'two blue squares'; "
                         "document.getElementById('recache').checked = true; "
                         "document.getElementById('changeprompt').click()")  # fmt: skip
        deadline = time.monotonic() + 30
        switched = 0.0
        while time.monotonic() < deadline and switched < 1:
            text = httpx.get(f"http://{address}/metrics").text
            switched = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith('ca2vdm_prompt_switches_total{mode="recache"}'))  # fmt: skip
            time.sleep(0.2)
        assert switched == 1
        assert browser.evaluate("ca2vdm.promptChanges") == 1 and browser.evaluate("ca2vdm.error") is None
        browser.evaluate("document.getElementById('stop').click()")
