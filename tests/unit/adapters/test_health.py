"""Health probes (adapters.health, vault.vault_health, Storage.health): what a task says when Vault or S3 is
down, and how each answer is classified. Real sockets on 127.0.0.1: a closed port (refused), a listener that
never answers (timeout) and a tiny HTTP server answering fixed status codes (sealed Vault, failing S3)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from lepton_tasks.adapters.health import RETRY_HINT, ServiceHealth, ServicesDown, require_up
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import vault_health


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the with block ends: nothing listens there


@pytest.fixture
def status_server() -> Iterator[tuple[list[int], str]]:
    """An HTTP server on 127.0.0.1 answering every request with ``codes[0]`` (a list the test sets)."""
    codes = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = b'{"sealed": true}' if codes[0] == 503 else b"{}"
            self.send_response(codes[0])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = _answer

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # a short poll interval: shutdown() otherwise waits up to 0.5 s per test
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield codes, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_message_names_each_service_down_its_address_and_the_retry():
    vault = ServiceHealth(
        "Vault", "http://127.0.0.1:8200", False, "is unreachable: [Errno 111] Connection refused"
    )
    s3 = ServiceHealth("S3", "http://127.0.0.1:8333", True)
    with pytest.raises(ServicesDown) as err:
        require_up(vault, s3)
    assert str(err.value) == (
        "Vault at http://127.0.0.1:8200 is unreachable: [Errno 111] Connection refused; "
        "Airflow retries this task with backoff"
    )
    assert err.value.down == [vault]
    assert isinstance(err.value, RuntimeError)  # transient: not an AirflowFailException, so retries apply


def test_every_service_down_is_named_once_and_all_up_passes():
    a = ServiceHealth("Vault", "http://v:8200", False, "is sealed (HTTP 503): unseal it")
    b = ServiceHealth("S3", "http://s:8333", False, "answered HTTP 503")
    with pytest.raises(
        ServicesDown, match=r"^Vault at http://v:8200 is sealed .*; S3 at http://s:8333 answered HTTP 503; "
    ) as err:
        require_up(a, b)
    assert str(err.value).count(RETRY_HINT) == 1
    require_up(ServiceHealth("Vault", "x", True), ServiceHealth("S3", "y", True))  # no exception


def test_vault_refusing_connections_is_unreachable():
    addr = f"http://127.0.0.1:{_closed_port()}"
    h = vault_health(addr, timeout=2)
    assert not h.ok
    assert h.message == f"Vault at {addr} is unreachable: [Errno 111] Connection refused"


def test_vault_that_never_answers_is_unreachable_after_the_timeout():
    with socket.socket() as listener:  # accepts connections in the kernel, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        addr = f"http://127.0.0.1:{listener.getsockname()[1]}"
        h = vault_health(addr, timeout=1)
    assert not h.ok and h.problem == "is unreachable: no answer within 1 s"


@pytest.mark.parametrize(
    ("code", "ok", "problem"),
    [
        (200, True, ""),
        (429, True, ""),  # a standby answers for the active node
        (503, False, "is sealed (HTTP 503): unseal it"),
        (501, False, "is not initialized (HTTP 501)"),
        (500, False, "answered its health check with HTTP 500"),
    ],
)
def test_vault_health_status_codes(status_server, code, ok, problem):
    codes, hostport = status_server
    codes[0] = code
    h = vault_health(f"http://{hostport}", timeout=2)
    assert (h.ok, h.problem) == (ok, problem)


def test_s3_refusing_connections_is_unreachable():
    port = _closed_port()
    h = Storage(f"127.0.0.1:{port}", "ak", "sk").health("models")
    assert not h.ok
    assert h.message == f"S3 at http://127.0.0.1:{port} is unreachable: [Errno 111] Connection refused"


@pytest.mark.parametrize(("code", "ok"), [(200, True), (403, True), (404, True), (503, False), (500, False)])
def test_s3_that_answers_is_up_unless_it_fails(status_server, code, ok):
    """Any S3 answer (even access denied or no such bucket) means the service is up; 5xx means it is not."""
    codes, hostport = status_server
    codes[0] = code
    h = Storage(hostport, "ak", "sk").health("models")
    assert h.ok is ok
    if not ok:
        assert h.problem == f"answered HTTP {code}"


def test_the_s3_probe_does_not_retry(status_server):
    """One request, no SDK retries: a failing S3 is reported in well under the SDK's retry time."""
    import time

    codes, hostport = status_server
    codes[0] = 503
    started = time.monotonic()
    assert not Storage(hostport, "ak", "sk").health("models").ok
    assert time.monotonic() - started < 1.0
