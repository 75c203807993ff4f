"""A minimal HTTP/1.1 client on raw asyncio protocols, for the storms.

aiohttp's client costs more CPU per request than the servers it measures; this one writes
prebuilt request bytes and parses only the status line, ``X-Cache`` and ``Content-Length``.
Connections are opened (with retries, in batches) before any timing starts, and each request's
send and completion times are taken in the callbacks, so the client's start-up is never
counted and its own event-loop delays are kept small.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass


@dataclass(slots=True)
class Result:
    """One answer: when it was sent and completed (monotonic), and its raw bytes."""

    sent: float = 0.0
    done: float = 0.0
    head: bytes = b""
    body: bytes = b""

    @property
    def latency(self) -> float:
        return self.done - self.sent

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def header(self, name: str) -> str:
        wanted = name.lower().encode()
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == wanted:
                return value.strip().decode("latin-1")
        return ""

    @property
    def cache(self) -> str:
        return self.header("X-Cache")

    @property
    def content_type(self) -> str:
        return self.header("Content-Type")


def post_bytes(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/json; charset=UTF-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_LENGTH = b"\r\ncontent-length:"


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; the completion time is taken as the
    last byte arrives, and nothing is parsed until then but the length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the whole answer, once its head is in
        self.sent = 0.0
        self.finished: asyncio.Future[Result] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, raw: bytes) -> asyncio.Future[Result]:
        assert self.transport is not None
        self.buf.clear()
        self.need = -1
        self.finished = asyncio.get_running_loop().create_future()
        self.sent = time.monotonic()
        self.transport.write(raw)
        return self.finished

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            at = head.lower().find(_LENGTH)
            if at < 0:
                raise RuntimeError("bench client: an answer without Content-Length")
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + len(_LENGTH) : stop if stop > 0 else len(head)])
            self.need = end + 4 + length
        if len(buf) < self.need or self.finished is None or self.finished.done():
            return
        done = time.monotonic()
        end = buf.find(b"\r\n\r\n")
        result = Result(self.sent, done, bytes(buf[:end]), bytes(buf[end + 4 : self.need]))
        self.finished.set_result(result)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished is not None and not self.finished.done():
            self.finished.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)


class Pool:
    """``n`` open connections to ``port``; ``fire`` sends one request on each at once."""

    def __init__(self) -> None:
        self.conns: list[_Conn] = []

    async def open(self, port: int, n: int, batch: int = 100) -> None:
        loop = asyncio.get_running_loop()

        async def one() -> _Conn:
            for attempt in range(50):
                try:
                    _, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
                    return conn
                except OSError:
                    await asyncio.sleep(0.05 * (attempt + 1))
            raise ConnectionError(f"cannot connect to {port}")

        for start in range(0, n, batch):
            self.conns += await asyncio.gather(*(one() for _ in range(min(batch, n - start))))

    async def fire(self, requests: list[bytes], within: float) -> list[Result]:
        """Send ``requests[i]`` on connection ``i`` back to back; wait for every answer."""
        futures = [conn.send(raw) for conn, raw in zip(self.conns, requests, strict=False)]
        async with asyncio.timeout(within):
            return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.gather(*(conn.lost for conn in self.conns), return_exceptions=True)
        self.conns.clear()


async def get_json(port: int, path: str) -> dict[str, object]:
    """A small GET on a fresh connection (stats, arrivals)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    _, _, body = data.partition(b"\r\n\r\n")
    parsed: dict[str, object] = json.loads(body)
    return parsed


async def get_text(port: int, path: str, method: str = "GET") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    writer.write((request + "Content-Length: 0\r\n\r\n").encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.partition(b"\r\n\r\n")[2].decode()
