"""The web player in headless Chromium against a real server: video actually plays.

Chromium is driven over the DevTools protocol (a websocket), so no driver binary is needed. CI installs
Debian's chromium and sets CA2VDM_REQUIRE_BROWSER=1, which turns a missing browser into a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
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
        browser.call("Page.navigate", url=f"http://{address}/?autostart=1&frames=41&steps=2&sample=sky")
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
        shot = os.environ.get("CA2VDM_PLAYER_SCREENSHOT")  # for a person to look at
        if shot:
            import base64

            Path(shot).write_bytes(base64.b64decode(browser.call("Page.captureScreenshot")["data"]))
