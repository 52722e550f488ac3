"""The trainer gateway: how trainer containers on their own Docker network reach the loopback-only services.

Trainer containers run on a dedicated, *internal* bridge network (``lepton-trainers``: no route to the
outside world, so a trainer holding a partner's decrypted rows cannot send them anywhere). A container on a
bridge cannot reach services bound to the host's 127.0.0.1, and binding OpenBao/SeaweedFS to 0.0.0.0 would
expose them to the network. So this small TCP forwarder listens on the network's **gateway address only**
(an address of the host that exists on that bridge) and forwards to the services on 127.0.0.1:

    container ──► <gateway>:<vault port> ──► 127.0.0.1:<vault port>   (OpenBao)
    container ──► <gateway>:<s3 port>    ──► 127.0.0.1:<s3 port>      (SeaweedFS S3; presigned URLs are
                                                                      signed for <gateway>:<s3 port>, and
                                                                      the Host header passes unchanged)

Connections whose source address is outside the network's subnet are closed at once, so a neighbour that
routes to the gateway address through this host reaches nothing. Nothing else is forwarded (not the S3
master/filer, not Airflow). Run as ``python -m lepton_tasks.ops.embedded.gateway --allow CIDR
--forward LISTEN_HOST:PORT=TARGET_HOST:PORT ...``; :class:`TrainerGateway` manages it like the other services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lepton_tasks.ops.embedded.process import ManagedProcess, ServiceError, config_digest

BUFFER = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


def _handler(target: tuple[str, int], allow: ipaddress.IPv4Network | ipaddress.IPv6Network):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if not peer or ipaddress.ip_address(peer[0]) not in allow:
                print(f"refused {peer} (outside {allow})", flush=True)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*target)
            except OSError as exc:
                print(f"cannot reach {target[0]}:{target[1]}: {exc}", flush=True)
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()

    return handle


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(forwards: list[tuple[tuple[str, int], tuple[str, int]]], allow: str) -> None:
    network = ipaddress.ip_network(allow, strict=False)
    servers = []
    for listen, target in forwards:
        server = await asyncio.start_server(
            _handler(target, network), listen[0], listen[1], reuse_address=True
        )
        servers.append(server)
        print(
            f"forwarding {listen[0]}:{listen[1]} -> {target[0]}:{target[1]} (clients from {network})",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lepton_tasks.ops.embedded.gateway")
    parser.add_argument("--allow", required=True, help="the only client subnet accepted (CIDR)")
    parser.add_argument("--forward", action="append", required=True, help="LISTEN_HOST:PORT=TARGET_HOST:PORT")
    args = parser.parse_args(argv)
    forwards = []
    for spec in args.forward:
        listen, _, target = spec.partition("=")
        forwards.append((_addr(listen), _addr(target)))
    asyncio.run(serve(forwards, args.allow))
    return 0


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class TrainerGateway:
    """The forwarder of one stack, listening on ``gateway`` (the trainer network's gateway address)."""

    data_dir: Path
    gateway: str
    subnet: str
    #: ``[(port, target port)]``: ``gateway:port`` → ``127.0.0.1:target port``
    ports: tuple[tuple[int, int], ...]
    target_host: str = "127.0.0.1"

    @property
    def proc(self) -> ManagedProcess:
        return ManagedProcess("trainer-gateway", self.data_dir / "run")

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "lepton_tasks.ops.embedded.gateway", "--allow", self.subnet]
        for port, target in self.ports:
            argv += ["--forward", f"{self.gateway}:{port}={self.target_host}:{target}"]
        return argv

    def start(self, timeout: float = 15.0) -> bool:
        """Start (or restart, when the network or ports changed) the forwarder; False when unchanged."""
        argv = self.argv()
        config = config_digest(argv)
        if self.proc.running():
            if self.proc.config() == config:
                return False
            self.proc.stop()
        repo = str(Path(__file__).resolve().parents[3])
        self.proc.start(argv, env={"PYTHONPATH": repo}, config=config)
        deadline = time.monotonic() + timeout
        while not all(_listening(self.gateway, port) for port, _ in self.ports):
            if not self.proc.running():
                raise ServiceError(
                    f"trainer-gateway exited during start-up; see its log {self.proc.log_file}:\n"
                    f"{self.proc.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"trainer-gateway did not listen on {self.gateway} within {timeout:.0f}s; "
                    f"see its log {self.proc.log_file}"
                )
            time.sleep(0.1)
        return True

    def stop(self) -> bool:
        return self.proc.stop()


if __name__ == "__main__":
    sys.exit(main())
