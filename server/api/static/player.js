// ca2vdm web player: WS /v1/stream (fmp4) -> Media Source Extensions, clip by clip; dropped connections resume.
// `window.ca2vdm` exposes the player's state (tests read it); `?autostart=1&frames=N&steps=K&sample=NAME`
// (and `&prompt=TEXT&guidance=S` for text models) starts a stream on load.
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

// A connection that drops (no `done`, no error message) is resumed (DESIGN.md, WebSocket item 7): reconnect after
// a backoff, send `resume` with the frames fully received, and keep appending to the same SourceBuffer (the init
// segment again, then segments that land at their own tfdt), while the video plays on from its buffer.
// Tests may lower these before pressing Start.
const reconnect = (state.reconnect = { tries: 10, backoffMs: 500, maxBackoffMs: 8000 });
let session = null;  // the running stream: { stop() }

async function start() {
  const video = $("video");
  const received = [];  // for the download: the init segment, then each clip's segment once
  const t0 = performance.now();
  Object.assign(state, { clips: 0, frames: 0, error: null, done: false, ttffMs: null, running: true,
    reconnects: 0, reconnecting: false, resumedFrom: [] });
  $("start").disabled = true; $("stop").disabled = false; $("download").hidden = true;
  setStatus("connecting…");
  // the key travels as a websocket subprotocol, never in the URL (URLs end up in logs and history)
  const key = $("apikey").value;
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`;
  const protocols = key ? ["ca2vdm", `ca2vdm.key.${btoa(key).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")}`] : [];
  const frames = parseInt($("frames").value, 10);
  const startMsg = { type: "start", image: await imageBase64(), seed: parseInt($("seed").value, 10) || 0,
    sampler: $("sampler").value || null, steps: parseInt($("steps").value, 10) || null,
    num_frames: Number.isFinite(frames) ? frames : null, format: "fmp4" };
  if (state.model && state.model.text) {  // text-conditioned models: the prompt and its guidance
    const prompt = $("prompt").value.trim(), guidance = parseFloat($("guidance").value);
    if (prompt) startMsg.prompt = prompt;
    if (prompt && Number.isFinite(guidance)) startMsg.guidance_scale = guidance;
  }
  state.promptChanges = 0;
  syncPromptButton();
  const mediaSource = new MediaSource();
  video.src = URL.createObjectURL(mediaSource);
  await new Promise((r) => mediaSource.addEventListener("sourceopen", r, { once: true }));
  video.addEventListener("playing", () => { if (state.ttffMs === null) state.ttffMs = performance.now() - t0;
    $("ttff").textContent = `${(state.ttffMs / 1000).toFixed(2)} s`; }, { once: true });

  // what outlives a connection
  let queue = null, format = "fmp4", token = null, streaming = "";
  let have = 0;  // every frame before `have` has fully arrived: a resume asks for `have` on
  let tries = 0;  // reconnection attempts since the last one that brought a clip
  let final = false, stopSent = false, timer = null, ended = false;

  const finish = () => {
    if (ended) return;
    ended = true; state.running = false; state.reconnecting = false; session = null;
    syncPromptButton();
    $("start").disabled = false; $("stop").disabled = true;
    if (received.length) {
      $("download").href = URL.createObjectURL(new Blob(received, { type: "video/mp4" }));
      $("download").hidden = false;
    }
  };

  const connect = (first) => {
    // handlers are attached in this same task, so no websocket event can be missed
    const sock = (ws = new WebSocket(url, protocols));
    sock.binaryType = "arraybuffer";
    const resuming = first.type === "resume";
    let gotReady = false, busy = false, expectInit = false, clip = null;
    // acknowledge a clip once all its media are in: the server keeps at most a few clips unacknowledged
    const ack = (frames) => { if (sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify({ type: "ack", frames })); };

    sock.onopen = () => {
      sock.send(JSON.stringify(first));
      if (stopSent) sock.send(JSON.stringify({ type: "stop" }));
    };
    sock.onmessage = (ev) => {
      if (sock !== ws) return;
      if (typeof ev.data !== "string") {
        if (expectInit) {  // after each ready (fmp4); MSE takes an init segment again on the same SourceBuffer
          expectInit = false;
          if (!resuming) received.push(ev.data);
          queue.push(ev.data);
          return;
        }
        if (!clip || clip.left === 0) return;
        clip.left -= 1;  // fmp4: the clip's one segment (a resent one we have is skipped); jpeg: one frame each
        if (format === "fmp4" && clip.end > have) { queue.push(ev.data); received.push(ev.data); }
        if (clip.left > 0) return;
        const added = Math.max(0, clip.end - Math.max(clip.first, have));  // a resent clip may overlap what we have
        have = Math.max(have, clip.end);
        ack(clip.end);
        if (added > 0) {
          tries = 0;
          state.clips += 1; state.frames += added;
          $("clips").textContent = state.clips; $("nframes").textContent = state.frames;
          $("fps").textContent = (state.frames / ((performance.now() - t0) / 1000)).toFixed(1);
        }
        return;
      }
      const msg = JSON.parse(ev.data);
      if (msg.type === "ready") {
        gotReady = true;
        if (queue === null) {
          format = msg.format;
          if (!MediaSource.isTypeSupported(msg.mime)) { final = true; setStatus(`this browser cannot play ${msg.mime}`, true); sock.close(); return; }
          queue = new SegmentQueue(mediaSource, msg.mime);
          streaming = `streaming ${msg.width}×${msg.height} at ${msg.fps} fps (session ${msg.session_id})`;
          setStatus(streaming);
        } else {
          state.reconnects += 1; state.reconnecting = false; state.resumedFrom.push(msg.first_frame);
          setStatus(`${streaming}, resumed at frame ${msg.first_frame}`);
        }
        token = msg.resume_token || token;
        expectInit = format === "fmp4";
      } else if (msg.type === "clip") {
        clip = { first: msg.first_frame, end: msg.first_frame + msg.num_frames,
          left: format === "fmp4" ? 1 : msg.num_frames };
        if (video.paused) video.play().catch(() => {});
      } else if (msg.type === "done") {
        final = true; state.done = true; setStatus(`done: ${msg.frames} frames`);
      } else if (msg.type === "error") {
        if (resuming && !gotReady && msg.code === "server_busy") busy = true;  // a resume may be retried later
        else { final = true; setStatus(`${msg.code}: ${msg.message}`, true); }  // expired, replaced, ...: over
      }
    };
    sock.onclose = () => {
      if (sock !== ws) return;
      if (final) return finish();
      if (stopSent) { setStatus(`stopped: ${have} frames`); return finish(); }
      if (token === null) { setStatus(gotReady ? "connection lost" : "connection error", true); return finish(); }
      if (tries >= reconnect.tries) {
        setStatus(`connection lost: gave up after ${reconnect.tries} reconnection attempts`, true);
        return finish();
      }
      const delay = Math.min(reconnect.maxBackoffMs, reconnect.backoffMs * 2 ** tries) * (0.5 + Math.random() / 2);
      tries += 1;
      state.reconnecting = true;
      setStatus(`${busy ? "server busy" : "connection lost"}: reconnecting… (attempt ${tries}/${reconnect.tries})`);
      timer = setTimeout(() => { timer = null; connect({ type: "resume", token, from_frame: have }); }, delay);
    };
  };

  session = {
    stop() {
      stopSent = true;
      if (timer !== null) { clearTimeout(timer); timer = null; setStatus(`stopped: ${have} frames`); finish(); return; }
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "stop" }));
    },
  };
  connect(startMsg);
}

function stop() { if (session) session.stop(); }

for (const img of document.querySelectorAll(".samples img")) {
  img.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".samples img")) other.classList.remove("on");
    img.classList.add("on"); $("upload").value = "";
  });
}
$("start").addEventListener("click", () => start().catch((e) => setStatus(String(e), true)));

// A new prompt for the running stream: its next clips show it (the server allows one change a second or so).
function changePrompt() {
  const text = $("newprompt").value.trim();
  if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({ type: "prompt", text, recache: $("recache").checked }));
  state.promptChanges = (state.promptChanges || 0) + 1;
  setStatus(`prompt changed to “${text}” from the next clips`);
}
$("changeprompt").addEventListener("click", changePrompt);
$("newprompt").addEventListener("keydown", (e) => { if (e.key === "Enter") changePrompt(); });
// enabled while a stream of a text model runs (set by start and finish: no timer, which a background tab throttles)
function syncPromptButton() { $("changeprompt").disabled = !(state.running && state.model && state.model.text); }
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
  // the model's recommended schedules, default first: one click sets sampler and steps
  for (const { sampler, steps } of model.schedules || []) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `${sampler.toUpperCase()} × ${steps}`;
    button.addEventListener("click", () => { $("sampler").value = sampler; $("steps").value = String(steps); });
    $("schedules").append(button);
  }
  if (model.text) {  // a text-conditioned model: the prompt box
    $("text").hidden = false;
    $("guidance").placeholder = `model default (${model.guidance_scale})`;
  }
  state.model = model;
}

const params = new URLSearchParams(location.search);
for (const [name, id] of [["frames", "frames"], ["steps", "steps"], ["seed", "seed"], ["prompt", "prompt"],
                          ["guidance", "guidance"]]) {
  if (params.has(name)) $(id).value = params.get(name);
}
if (params.has("sample")) document.querySelector(`.samples img[data-name="${params.get("sample")}"]`)?.click();
const modelLoaded = loadModel().catch(() => {});
if (params.get("autostart") === "1") modelLoaded.then(() => start()).catch((e) => setStatus(String(e), true));
window.ca2vdm.video = () => {
  const v = $("video");
  const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : { totalVideoFrames: 0 };
  const buffered = [];
  for (let i = 0; i < v.buffered.length; i++) buffered.push([v.buffered.start(i), v.buffered.end(i)]);
  return { currentTime: v.currentTime, decodedFrames: q.totalVideoFrames, readyState: v.readyState, paused: v.paused,
    buffered };
};
