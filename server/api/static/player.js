// ca2vdm web player: WS /v1/stream (fmp4) -> Media Source Extensions, clip by clip.
// `window.ca2vdm` exposes the player's state (tests read it); `?autostart=1&frames=N&steps=K&sample=NAME`
// starts a stream on load.
"use strict";

const $ = (id) => document.getElementById(id);
const state = (window.ca2vdm = { clips: 0, frames: 0, error: null, done: false, ttffMs: null, running: false });
let ws = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
  if (isError) state.error = text;
}

async function imageBase64() {
  const file = $("upload").files[0];
  const blob = file || (await (await fetch(document.querySelector(".samples img.on").src)).blob());
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

// Appends segments to a SourceBuffer one at a time (appendBuffer is asynchronous).
class SegmentQueue {
  constructor(mediaSource, mime) {
    this.sb = mediaSource.addSourceBuffer(mime);
    this.pending = [];
    this.sb.addEventListener("updateend", () => this.pump());
  }
  push(buf) { this.pending.push(buf); this.pump(); }
  pump() {
    if (this.sb.updating || !this.pending.length) return;
    try { this.sb.appendBuffer(this.pending.shift()); } catch (e) { setStatus(`append failed: ${e}`, true); }
  }
}

async function start() {
  const video = $("video");
  const received = [];
  const t0 = performance.now();
  Object.assign(state, { clips: 0, frames: 0, error: null, done: false, ttffMs: null, running: true });
  $("start").disabled = true; $("stop").disabled = false; $("download").hidden = true;
  setStatus("connecting…");
  // the key travels as a websocket subprotocol, never in the URL (URLs end up in logs and history)
  const key = $("apikey").value;
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`;
  const protocols = key ? ["ca2vdm", `ca2vdm.key.${btoa(key).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")}`] : [];
  const mediaSource = new MediaSource();
  video.src = URL.createObjectURL(mediaSource);
  await new Promise((r) => mediaSource.addEventListener("sourceopen", r, { once: true }));
  // handlers are attached in this same task, so no websocket event can be missed
  ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";
  let queue = null;
  let mediaLeft = 0, clipEnd = 0, format = "fmp4";
  // acknowledge a clip once all its media are in: the server keeps at most a few clips unacknowledged
  const ack = () => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "ack", frames: clipEnd })); };
  video.addEventListener("playing", () => { if (state.ttffMs === null) state.ttffMs = performance.now() - t0;
    $("ttff").textContent = `${(state.ttffMs / 1000).toFixed(2)} s`; }, { once: true });

  ws.onopen = async () => {
    const frames = parseInt($("frames").value, 10);
    ws.send(JSON.stringify({ type: "start", image: await imageBase64(), seed: parseInt($("seed").value, 10) || 0,
      sampler: $("sampler").value || null, steps: parseInt($("steps").value, 10) || null,
      num_frames: Number.isFinite(frames) ? frames : null, format: "fmp4" }));
  };
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") {
      received.push(ev.data);
      if (queue) queue.push(ev.data);
      if (mediaLeft > 0 && --mediaLeft === 0) ack();
      return;
    }
    const msg = JSON.parse(ev.data);
    if (msg.type === "ready") {
      format = msg.format;
      if (!MediaSource.isTypeSupported(msg.mime)) { setStatus(`this browser cannot play ${msg.mime}`, true); ws.close(); return; }
      queue = new SegmentQueue(mediaSource, msg.mime);
      setStatus(`streaming ${msg.width}×${msg.height} at ${msg.fps} fps (session ${msg.session_id})`);
    } else if (msg.type === "clip") {
      mediaLeft = format === "fmp4" ? 1 : msg.num_frames; clipEnd = msg.first_frame + msg.num_frames;
      state.clips += 1; state.frames += msg.num_frames;
      $("clips").textContent = state.clips; $("nframes").textContent = state.frames;
      $("fps").textContent = (state.frames / ((performance.now() - t0) / 1000)).toFixed(1);
      if (video.paused) video.play().catch(() => {});
    } else if (msg.type === "done") {
      state.done = true; setStatus(`done: ${msg.frames} frames`);
    } else if (msg.type === "error") {
      setStatus(`${msg.code}: ${msg.message}`, true);
    }
  };
  ws.onclose = () => {
    state.running = false;
    $("start").disabled = false; $("stop").disabled = true;
    if (received.length) {
      $("download").href = URL.createObjectURL(new Blob(received, { type: "video/mp4" }));
      $("download").hidden = false;
    }
  };
  ws.onerror = () => setStatus("connection error", true);
}

function stop() { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "stop" })); }

for (const img of document.querySelectorAll(".samples img")) {
  img.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".samples img")) other.classList.remove("on");
    img.classList.add("on"); $("upload").value = "";
  });
}
$("start").addEventListener("click", () => start().catch((e) => setStatus(String(e), true)));
$("stop").addEventListener("click", stop);

// The model's samplers and defaults come from the server (/v1/models), the one list the API validates against.
async function loadModel() {
  const key = $("apikey").value;
  const res = await fetch("/v1/models", key ? { headers: { Authorization: `Bearer ${key}` } } : {});
  if (!res.ok) return;  // e.g. a key is needed: the server's defaults still apply
  const model = await res.json();
  const select = $("sampler");
  for (const name of model.samplers) select.add(new Option(name.toUpperCase(), name, false, name === model.default_sampler));
  if (!$("steps").value) $("steps").placeholder = `server default (${model.default_steps})`;
  state.model = model;
}

const params = new URLSearchParams(location.search);
for (const [name, id] of [["frames", "frames"], ["steps", "steps"], ["seed", "seed"]]) {
  if (params.has(name)) $(id).value = params.get(name);
}
if (params.has("sample")) document.querySelector(`.samples img[data-name="${params.get("sample")}"]`)?.click();
const modelLoaded = loadModel().catch(() => {});
if (params.get("autostart") === "1") modelLoaded.then(() => start()).catch((e) => setStatus(String(e), true));
window.ca2vdm.video = () => {
  const v = $("video");
  const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : { totalVideoFrames: 0 };
  return { currentTime: v.currentTime, decodedFrames: q.totalVideoFrames, readyState: v.readyState, paused: v.paused };
};
