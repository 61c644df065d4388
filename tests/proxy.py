"""A TCP proxy for tests that cuts connections: a client's connection through it dies (both sides aborted, no close
frame, no FIN handshake) after a given number of bytes from the server, as a network switch or a proxy's timeout
does. Only connections whose request matches `match` (e.g. b"GET /v1/stream") are cut, in order, one budget each;
others (the player's page and scripts) pass untouched."""

from __future__ import annotations

import asyncio
import contextlib


class CuttingProxy:
    def __init__(self, target: str, cuts: list[int], match: bytes | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self.host, self.port_to = host, int(port)
        self.cuts, self.match = list(cuts), match
        self.cut = 0  # connections cut so far
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self._tasks):  # connections still open (a browser's keep-alive): end them
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port_to)
        except OSError:
            writer.close()
            return
        head = await reader.read(4096)
        budget = None
        if (self.match is None or self.match in head) and self.cut < len(self.cuts):
            budget = self.cuts[self.cut]
            self.cut += 1
        up_writer.write(head)

        def abort() -> None:
            for w in (writer, up_writer):
                w.transport.abort()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> None:
            sent = 0
            with contextlib.suppress(ConnectionError):
                while data := await src.read(4096):
                    if limit is not None and sent + len(data) >= limit:
                        dst.write(data[: limit - sent])
                        await dst.drain()
                        return abort()
                    sent += len(data)
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(ConnectionError, RuntimeError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, None), pipe(up_reader, writer, budget))
