"""`ca2vdm-client`: stream, submit, status and download against a ca2vdm server.

Exit codes: 0 success, 1 server or connection error (one line on stderr), 2 usage error, 130 aborted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ._util import http_base, open_part
from .errors import ClientError
from .jobs import JobsClient
from .stream import Clip, Done, Ready, StreamClient

DEFAULT_URL = "http://127.0.0.1:8000"
PROG = "ca2vdm-client"


class _Usage(Exception):
    """A usage error found after parsing (exit 2)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Client of a ca2vdm video generation server.")
    parser.add_argument("--url", default=os.environ.get("CA2VDM_URL", DEFAULT_URL),
                        help=f"server URL (env CA2VDM_URL, default {DEFAULT_URL})")  # fmt: skip
    parser.add_argument("--api-key", default=os.environ.get("CA2VDM_API_KEY") or None,
                        help="API key, sent as 'Authorization: Bearer' (env CA2VDM_API_KEY)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def generation_flags(p: argparse.ArgumentParser, frames_required: bool) -> None:
        p.add_argument("--image", type=Path, help="condition image (PNG/JPEG); default: none")
        p.add_argument("--seed", type=_seed)
        p.add_argument("--sampler", help="a sampler the model offers (GET /v1/models lists them); default: the model's")
        p.add_argument("--steps", type=_positive, help="denoising steps per chunk")
        p.add_argument("--prompt", help="text-conditioned models: what the video shows")
        p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (1: off; default: the model's)")
        p.add_argument("--frames", type=_positive, required=frames_required,
                       help="frames to generate" + ("" if frames_required else " (default: until Ctrl-C)"))  # fmt: skip

    p = sub.add_parser("stream", help="stream a video over the websocket into a fragmented MP4 (resumes drops)")
    generation_flags(p, frames_required=False)
    p.add_argument("--out", type=Path, required=True, help="output .mp4 (fragmented)")
    p.add_argument("--max-reconnects", type=_count, default=10,
                   help="times a dropped connection is resumed, in all (default 10; 0: never)")  # fmt: skip
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("submit", help="submit a video job; prints the job JSON")
    generation_flags(p, frames_required=True)
    p.add_argument("--wait", action="store_true", help="wait for the job with a progress bar")
    p.add_argument("--out", type=Path, help="download the finished video here (implies --wait)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits (default 3600)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="print a job's JSON")
    p.add_argument("id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("download", help="download a completed job's MP4")
    p.add_argument("id")
    p.add_argument("--out", type=Path, required=True, help="output file (or directory)")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check(args)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except _Usage as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130


def _check(args: argparse.Namespace) -> None:
    try:
        http_base(args.url)
    except ValueError as exc:
        raise _Usage(str(exc)) from exc
    image = getattr(args, "image", None)
    if image is not None and not image.is_file():
        raise _Usage(f"--image {image}: no such file")
    out = getattr(args, "out", None)
    if out is not None and not out.is_dir() and not out.parent.is_dir():
        raise _Usage(f"--out {out}: directory {out.parent} does not exist")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# ---- stream ---------------------------------------------------------------------------------------------------


class _PartFile:
    """Bytes go to a hidden temp file beside `path`; `finish` renames it into place or removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp, self._file = open_part(path)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()  # the part file is a valid fMP4 after every segment

    def finish(self, keep: bool) -> None:
        self._file.close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def cmd_stream(args: argparse.Namespace) -> int:
    return asyncio.run(_stream(args))


def _install_sigint(handler: Callable[[], None]) -> Callable[[], None]:
    """Route Ctrl-C to `handler` on the running loop; returns the function that undoes it."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
        return lambda: loop.remove_signal_handler(signal.SIGINT)
    except NotImplementedError:  # Windows: plain signal handler, hopped onto the loop
        try:
            previous = signal.signal(signal.SIGINT, lambda *_: loop.call_soon_threadsafe(handler))
        except ValueError:  # not the main thread: leave Ctrl-C alone
            return lambda: None
        return lambda: signal.signal(signal.SIGINT, previous)
    except (ValueError, RuntimeError):  # not the main thread
        return lambda: None


async def _stream(args: argparse.Namespace) -> int:
    client = StreamClient(args.url, args.api_key)
    main_task = asyncio.current_task()
    assert main_task is not None
    interrupts = 0
    pending: set[asyncio.Task[None]] = set()

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            tqdm.write("stopping (Ctrl-C again to abort)...", file=sys.stderr)
            task = asyncio.get_running_loop().create_task(client.stop())
            pending.add(task)
            task.add_done_callback(pending.discard)
        else:
            main_task.cancel()

    def on_reconnect(attempt: int, delay: float, error: ClientError) -> None:
        tqdm.write(f"connection lost ({error}); resuming at frame {received} in {delay:.1f} s "
                   f"(attempt {attempt}/{args.max_reconnects})", file=sys.stderr)  # fmt: skip

    out = args.out / "stream.mp4" if args.out.is_dir() else args.out
    part = _PartFile(out)
    uninstall = _install_sigint(on_sigint)
    bar: tqdm | None = None
    ready: Ready | None = None
    received = 0
    done: Done | None = None
    aborted = False
    recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=8)
    try:
        # a dropped connection is resumed inside: the clips stay contiguous, so the file is as if uninterrupted
        events = client.stream(image=args.image, seed=args.seed, sampler=args.sampler, steps=args.steps,
                               num_frames=args.frames, format="fmp4", prompt=args.prompt,
                               guidance_scale=args.guidance_scale, resume=args.max_reconnects > 0,
                               max_reconnects=args.max_reconnects, on_reconnect=on_reconnect)  # fmt: skip
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Ready):
                    ready = event
                    part.write(event.init_segment or b"")
                    bar = tqdm(total=args.frames, unit="frame", desc=out.name, dynamic_ncols=True, file=sys.stderr)
                    recent.append((time.monotonic(), 0))
                elif isinstance(event, Clip):
                    part.write(event.media[0])
                    received += event.num_frames
                    now = time.monotonic()
                    recent.append((now, received))
                    (t0, f0) = recent[0]
                    fps = (received - f0) / (now - t0) if now > t0 else 0.0
                    if bar is not None:
                        bar.update(event.num_frames)
                        bar.set_postfix(fps=f"{fps:.1f}", gen_ms=f"{event.gen_ms:.0f}")
                elif isinstance(event, Done):
                    done = event
    except asyncio.CancelledError:
        aborted = True
    finally:
        uninstall()
        if bar is not None:
            bar.close()
        part.finish(keep=received > 0)
        if received:
            size = f" {ready.width}x{ready.height} @ {ready.fps:g} fps" if ready is not None else ""
            state = "wrote" if done is not None else "stream ended early; kept"
            print(f"{state} {received} frames{size} to {out}", file=sys.stderr)
        elif aborted or done is not None:
            print(f"no frames received; {out} not written", file=sys.stderr)
    return 130 if aborted else 0


# ---- jobs -----------------------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    with JobsClient(args.url, args.api_key) as jobs:
        job = jobs.submit(
            args.frames,
            image=args.image,
            seed=args.seed,
            sampler=args.sampler,
            steps=args.steps,
            prompt=args.prompt,
            guidance_scale=args.guidance_scale,
        )
        if not (args.wait or args.out):
            _print_json(job)
            return 0
        print(f"submitted {job['id']}", file=sys.stderr)
        with tqdm(total=100, unit="%", desc="job", dynamic_ncols=True, file=sys.stderr) as bar:

            def progress(state: dict[str, Any]) -> None:
                bar.n = int(state.get("progress") or 0)
                bar.set_postfix_str(str(state.get("status")))  # refreshes

            try:
                job = jobs.wait(job["id"], timeout=args.timeout, on_progress=progress)
            except KeyboardInterrupt:
                bar.close()
                print(f"stopped waiting; job {job['id']} goes on on the server", file=sys.stderr)
                return 130
        if args.out is not None:
            path = jobs.download(job["id"], args.out)
            print(f"saved {path}", file=sys.stderr)
        _print_json(job)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with JobsClient(args.url, args.api_key) as jobs:
        _print_json(jobs.get(args.id))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with JobsClient(args.url, args.api_key) as jobs:
        print(jobs.download(args.id, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
