"""The trainer gateway's forwarder: bytes pass both ways for an allowed client subnet; any other client is
closed without reaching the target."""

from __future__ import annotations

import asyncio
import socket

from lepton_tasks.ops.embedded.gateway import serve
from lepton_tasks.ops.embedded.process import free_port


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader, writer):
        writer.write(b"echo:" + await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _roundtrip(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    await writer.drain()
    writer.write_eof()
    try:
        data = await asyncio.wait_for(reader.read(100), 5)
    except ConnectionResetError:  # closed unread: the kernel answers with a reset
        data = b""
    writer.close()
    return data


def _run(allow: str) -> bytes:
    async def main() -> bytes:
        target, target_port = await _echo_server()
        port = free_port()
        task = asyncio.create_task(serve([(("127.0.0.1", port), ("127.0.0.1", target_port))], allow))
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.02)
        try:
            return await _roundtrip(port)
        finally:
            task.cancel()
            target.close()

    return asyncio.run(main())


def test_forwards_for_the_allowed_subnet():
    assert _run("127.0.0.0/8") == b"echo:ping"


def test_closes_clients_outside_the_subnet():
    assert _run("172.18.0.0/16") == b""
