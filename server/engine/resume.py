"""What resuming needs besides the engine's bookkeeping: resending a clip from a given frame, and saving sessions to
disk across a graceful restart (and reading them back).

A saved session is one file, `<resume_dir>/<digest of its token>.pt`, written atomically: its parameters, counters
and resume token, the runner's `HostState` (kept history, chunk in flight, generator state) and its unacknowledged
clips' frames (encoded again when resent). It is read with `torch.load(weights_only=True)`: tensors and plain values
only, nothing executable. Files are consumed when read back: the engine holds those sessions in memory from then on,
and saves them again at its next stop. Engines of a cluster share one directory: each saves its own sessions when it
leaves, and a resume that reaches another engine takes the file of its token (`take_saved`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path

import torch

from ca2vdm.server.media import ClipEncoder

from .runner import HostState
from .session import Clip, Prompt, Session, SessionParams

log = logging.getLogger("ca2vdm.engine")

FORMAT_VERSION = 1


def trim_clip(clip: Clip, from_frame: int, fmt: str, encoder: ClipEncoder | None) -> Clip:
    """`clip` as a resumed consumer gets it: only its frames from `from_frame` on, with media. A whole clip keeps its
    media; a trimmed one (or one whose media was not kept) is encoded again by the consumer's new encoder."""
    start = max(0, from_frame - clip.first_frame)
    if start == 0 and (clip.media or encoder is None):
        return clip
    frames = clip.frames[start:]
    media: list[bytes] = []
    if fmt == "jpeg" and clip.media and len(clip.media) == clip.num_frames:
        media = clip.media[start:]  # one JPEG per frame: nothing to encode
    elif encoder is not None:
        media = encoder.encode(frames, clip.first_frame + start)
    return replace(clip, first_frame=clip.first_frame + start, frames=frames, media=media)


# ---- saving and reading back --------------------------------------------------------------------------------------


def _params_dict(p: SessionParams) -> dict:
    # the condition image is not kept: it is in the history (or, past the first max_cache_frames, no longer needed)
    return {"seed": p.seed, "sampler": p.sampler, "steps": p.steps, "num_frames": p.num_frames, "format": p.format,
            "pace": p.pace}  # fmt: skip


def _prompt_dict(p: Prompt | None) -> dict | None:
    return None if p is None else {"text": p.text, "y": p.y, "mask": p.mask, "guidance_scale": p.guidance_scale}


def _prompt(record: dict | None) -> Prompt | None:
    if record is None:
        return None
    return Prompt(str(record["text"]), record["y"], record["mask"], float(record["guidance_scale"]))


def _record(session: Session, state: HostState) -> dict:
    return {
        "version": FORMAT_VERSION,
        "id": session.id,
        "token": session.resume_token,
        "owner": session.owner or "",
        "client": session.client or "",
        "params": _params_dict(session.params),
        "frames_done": session.frames_done,
        "clips_done": session.clips_done,
        "acked_frames": session.acked_frames,
        "history": state.history,
        "first_frame": state.first_frame,
        "x": state.x,
        "step": state.step,
        "generator": state.generator,
        "x0_prev": state.x0_prev,
        "prompt": _prompt_dict(state.prompt),
        "pending_prompt": _prompt_dict(state.pending[0]) if state.pending else None,
        "pending_recache": bool(state.pending and state.pending[1]),
        "first_prompt": _prompt_dict(session.params.prompt),
        "clips": [
            {"index": c.index, "first_frame": c.first_frame, "frames": c.frames, "gen_ms": c.gen_ms}
            for c in session.unacked_clips()
        ],  # fmt: skip
    }


def saved_path(directory: str | Path, token: str) -> Path:
    """Where the session of `token` is saved: named by a digest of the token (a name reveals no token, and an engine
    that shares the directory finds a session by the token a client presents)."""
    return Path(directory) / f"{hashlib.sha256(token.encode()).hexdigest()[:32]}.pt"


def save_sessions(directory: str | Path, sessions: list[tuple[Session, HostState]], replace_all: bool = True) -> int:
    """Write each session to `directory`; returns how many were written. `replace_all`: what was there goes (one
    engine owns the directory); else the other files stay (engines of a cluster share it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if replace_all:
        for old in directory.glob("*.pt"):
            old.unlink()
    for session, state in sessions:
        path = saved_path(directory, session.resume_token)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(_record(session, state), tmp)
        os.replace(tmp, path)
    return len(sessions)


def take_saved(directory: str | Path, token: str) -> tuple[Session, HostState] | None:
    """The saved session of `token`, removed from `directory` (shared by engines: the rename makes the first taker
    the only one); None when there is none or it cannot be read."""
    path = saved_path(directory, token)
    taken = path.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.taken")
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return None
    try:
        session, state = _session(torch.load(taken, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - one bad file costs its session only
        log.warning("cannot read saved session %s: %s", path, exc)
        return None
    finally:
        taken.unlink(missing_ok=True)
    return (session, state) if session.resume_token == token else None


def _session(record: dict) -> tuple[Session, HostState]:
    if record.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {record.get('version')!r}, expected {FORMAT_VERSION}")
    params = SessionParams(**record["params"], prompt=_prompt(record.get("first_prompt")))
    session = Session(params, id=str(record["id"]), resume_token=str(record["token"]), owner=record["owner"] or None,
                      client=record["client"] or None)  # fmt: skip
    session.frames_done, session.clips_done = int(record["frames_done"]), int(record["clips_done"])
    session.acked_frames = int(record["acked_frames"])
    for c in record["clips"]:
        clip = Clip(index=int(c["index"]), first_frame=int(c["first_frame"]), frames=c["frames"],
                    gen_ms=float(c["gen_ms"]))  # fmt: skip
        session.add_unacked(clip.end_frame, clip)
    state = HostState(history=record["history"], first_frame=int(record["first_frame"]), x=record["x"],
                      step=int(record["step"]), generator=record["generator"],
                      x0_prev=record.get("x0_prev"), prompt=_prompt(record.get("prompt")))  # fmt: skip
    if (pending := _prompt(record.get("pending_prompt"))) is not None:
        state.pending = (pending, bool(record.get("pending_recache")))
    return session, state


def load_sessions(directory: str | Path, limit: int) -> list[tuple[Session, HostState]]:
    """Read back (and remove) the sessions saved in `directory`: at most `limit`, the most recently saved; a file
    that cannot be read is logged and skipped."""
    paths = sorted(Path(directory).glob("*.pt"), key=lambda p: p.stat().st_mtime) if Path(directory).is_dir() else []
    out = []
    for path in paths[len(paths) - limit :] if limit else []:
        try:
            out.append(_session(torch.load(path, map_location="cpu", weights_only=True)))
        except Exception as exc:  # noqa: BLE001 - one bad file costs its session only
            log.warning("cannot read saved session %s: %s", path, exc)
    for path in paths:
        path.unlink(missing_ok=True)
    return out
