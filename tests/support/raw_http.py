"""HTTP/1.x over a raw socket: requests sent byte for byte, responses read as they come."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reply:
    version: str
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    names: list[str]  # every header name, lower-case, repeats included
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_replies(reader: asyncio.StreamReader, count: int | None = None) -> list[Reply]:
    """Every response on the connection until it closes (1xx interim responses skipped), or
    the first ``count``."""
    replies: list[Reply] = []
    while count is None or len(replies) < count:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return replies  # closed (possibly without a response)
        except ConnectionResetError:
            return replies
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        names = [line.split(":", 1)[0].strip().lower() for line in header_lines]
        headers = {
            line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
            for line in header_lines
        }
        if 100 <= int(status) < 200:
            continue
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        replies.append(Reply(version, int(status), headers, names, body))
        connection = headers.get("connection", "").lower()
        if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
            return replies
    return replies


async def exchange(port: int, raw: bytes, *, half_close: bool = False) -> list[Reply]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(10):
            return await read_replies(reader)
    finally:
        writer.close()
