"""Talk to a Redis registered as a TCP endpoint, from anywhere, with asyncio streams.

    pico server &
    redis-server --port 6379 &
    pico agent tcp my-db localhost:6379 &           # registers endpoint "my-db"
    python examples/connect_redis.py                # PING, SET, GET through the node

PICO_PROXY_URL (default http://localhost:8000) is a node's proxy port.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pico.sdk


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *args: str) -> str:
    """Send one command in RESP and read a simple or bulk string reply."""
    parts = [f"*{len(args)}\r\n"] + [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
    writer.write("".join(parts).encode())
    line = (await reader.readline()).decode().rstrip("\r\n")
    if line.startswith("$"):
        size = int(line[1:])
        return "(nil)" if size < 0 else (await reader.readexactly(size + 2))[:-2].decode()
    return line[1:]


async def main() -> int:
    url = os.environ.get("PICO_PROXY_URL", "http://localhost:8000")
    try:
        reader, writer = await pico.sdk.connect("my-db", url=url)
    except pico.sdk.ConnectError as exc:
        print(exc, file=sys.stderr)  # e.g. cannot connect to endpoint 'my-db': 502 no ...
        return 1
    try:
        print("PING ->", await command(reader, writer, "PING"))
        print("SET  ->", await command(reader, writer, "SET", "greeting", "hello from pico"))
        print("GET  ->", await command(reader, writer, "GET", "greeting"))
    finally:
        writer.close()
        await writer.wait_closed()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
