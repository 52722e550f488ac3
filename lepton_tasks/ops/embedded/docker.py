"""Will trainer containers run in Docker here, and if not, why not?

:func:`docker_status` answers without raising: no Docker SDK, no socket, permission denied on the socket,
a daemon that does not respond, or a missing trainer image (``run `lepton images build```). GPU support is
detected, best effort, from the daemon's runtimes (an ``nvidia`` runtime, or the CDI ``nvidia.com/gpu``
devices of newer engines).

The daemon is addressed by ``base_url`` when given, else by ``DOCKER_HOST``, else the default socket
``unix:///var/run/docker.sock`` (the Docker SDK's own rules). No ``airflow`` import here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
DEFAULT_TRAINER_IMAGE = "lepton-trainer:latest"
START_HINT = "start one with `scripts/dockerd.sh start` (install it with `scripts/dockerd.sh install`)"


@dataclass(frozen=True)
class DockerStatus:
    """Whether per-partner trainer containers can run in Docker.

    ``available`` is True only when a daemon answers AND the trainer image exists. ``reason`` says why not
    (or, when available, what was found). ``server_version`` is set whenever a daemon answered, so
    ``server_version is not None`` means "the daemon works" even if the image is missing. ``trainer_image``
    is the image id of the trainer image when present. ``gpus``: the daemon offers an NVIDIA runtime (best
    effort).
    """

    available: bool
    reason: str
    server_version: str | None = None
    trainer_image: str | None = None
    gpus: bool = False

    @property
    def daemon_ok(self) -> bool:
        """A Docker daemon answered (whatever the trainer image)."""
        return self.server_version is not None


def docker_host(base_url: str | None = None) -> str:
    """The daemon address in use: ``base_url``, else ``DOCKER_HOST``, else the default unix socket."""
    return base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def _unix_socket_path(host: str) -> Path | None:
    if not host.startswith("unix://"):
        return None
    path = host[len("unix://") :]
    return Path(path if path.startswith("/") else "/" + path)


def _has_gpu_runtime(info: dict[str, Any]) -> bool:
    runtimes = info.get("Runtimes") or {}
    if any("nvidia" in str(name).lower() for name in runtimes):
        return True
    if "nvidia" in str(info.get("DefaultRuntime", "")).lower():
        return True
    # Docker >= 25 with CDI: DiscoveredDevices / CDISpecDirs may list nvidia.com/gpu devices
    devices = info.get("DiscoveredDevices") or []
    return any("nvidia.com/gpu" in str(dev) for dev in devices)


def docker_status(image: str | None = None, *, base_url: str | None = None, timeout: int = 5) -> DockerStatus:
    """Probe the Docker daemon and the trainer image; never raises.

    ``image`` defaults to ``$LEPTON_TRAINER_IMAGE`` or ``lepton-trainer:latest``.
    """
    image = image or os.environ.get("LEPTON_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE
    host = docker_host(base_url)
    try:
        import docker.errors
    except ImportError:
        return DockerStatus(False, "the `docker` Python package is not installed (pip install docker)")

    sock = _unix_socket_path(host)
    if sock is not None:
        if not sock.exists():
            return DockerStatus(False, f"no Docker daemon: the socket {sock} does not exist; {START_HINT}")
        if not os.access(sock, os.R_OK | os.W_OK):
            return DockerStatus(
                False,
                f"permission denied on {sock}: run as root or add this user to the socket's group "
                f"(usually `docker`: sudo usermod -aG docker $USER, then log in again)",
            )

    try:
        client = docker.DockerClient(base_url=host, version="auto", timeout=timeout)
    except docker.errors.DockerException as exc:
        return DockerStatus(
            False, f"the Docker daemon at {host} is not responding: {_short(exc)}; {START_HINT}"
        )
    try:
        try:
            version = str(client.version().get("Version") or "unknown")
            info = client.info()
        except docker.errors.APIError as exc:
            return DockerStatus(False, f"the Docker daemon at {host} returned an error: {_short(exc)}")
        except (
            OSError,
            docker.errors.DockerException,
        ) as exc:  # refused, timeouts (requests' errors are OSError)
            text = _short(exc)
            if "Permission denied" in text or "PermissionError" in text:
                return DockerStatus(False, f"permission denied talking to {host}: {text}")
            return DockerStatus(False, f"the Docker daemon at {host} is not responding: {text}; {START_HINT}")
        gpus = _has_gpu_runtime(info)
        try:
            image_id: str | None = str(client.images.get(image).id)
        except docker.errors.ImageNotFound:
            image_id = None
        except (OSError, docker.errors.DockerException) as exc:
            return DockerStatus(False, f"could not inspect {image}: {_short(exc)}", version, None, gpus)
        if image_id is None:
            return DockerStatus(
                False,
                f"Docker {version} answers at {host}, but the trainer image {image} is missing: "
                f"run `lepton images build`",
                version,
                None,
                gpus,
            )
        return DockerStatus(
            True,
            f"Docker {version} at {host}; trainer image {image} ({image_id[:19]})"
            + ("; NVIDIA runtime present" if gpus else ""),
            version,
            image_id,
            gpus,
        )
    finally:
        client.close()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# the trainers' network --------------------------------------------------------------------------------
#: the embedded stack's trainer network: an internal bridge (no route out), reached through its gateway
DEFAULT_TRAINER_NETWORK = "lepton-trainers"
#: Docker's own networks (no gateway of ours to forward on)
BUILTIN_NETWORKS = ("host", "none", "bridge", "default")
LABEL_TRAINER_NETWORK = "org.lepton.trainer-network"


class TrainerNetworkError(RuntimeError):
    """The trainers' Docker network cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class TrainerNetwork:
    """A Docker network trainer containers join: its name, gateway address (the host's address on that
    bridge), subnet, whether it is internal (no route out) and whether Lepton created it."""

    name: str
    gateway: str | None
    subnet: str | None
    internal: bool
    created: bool = False


def api_client(client: Any = None, base_url: str | None = None) -> Any:
    """The low-level ``docker.APIClient`` of ``client`` (a ``DockerClient`` or an ``APIClient``), or a new
    one for ``base_url``/``DOCKER_HOST``."""
    if client is not None:
        return getattr(client, "api", client)
    import docker

    return docker.APIClient(base_url=docker_host(base_url), version="auto", timeout=30)


def _network_info(attrs: dict[str, Any], created: bool) -> TrainerNetwork:
    configs = (attrs.get("IPAM") or {}).get("Config") or []
    ipv4 = next((c for c in configs if ":" not in str(c.get("Subnet", ""))), configs[0] if configs else {})
    return TrainerNetwork(
        name=str(attrs.get("Name")),
        gateway=ipv4.get("Gateway"),
        subnet=ipv4.get("Subnet"),
        internal=bool(attrs.get("Internal")),
        created=created,
    )


def ensure_trainer_network(
    name: str = DEFAULT_TRAINER_NETWORK, *, client: Any = None, base_url: str | None = None
) -> TrainerNetwork:
    """The network ``name``, created when missing as an *internal* bridge labelled as Lepton's.

    ``client``: a ``DockerClient`` or ``APIClient`` (default: a new one for ``base_url``/``DOCKER_HOST``).
    Raises :class:`TrainerNetworkError` for Docker's built-in networks (they are not trainer networks) or
    when the daemon refuses.
    """
    if name in BUILTIN_NETWORKS:
        raise TrainerNetworkError(f"{name!r} is Docker's own network, not a trainer network")
    import docker.errors  # binds `docker` too

    api = api_client(client, base_url)
    try:
        try:
            return _network_info(api.inspect_network(name), created=False)
        except docker.errors.NotFound:
            pass
        try:
            api.create_network(
                name,
                driver="bridge",
                internal=True,
                labels={LABEL_TRAINER_NETWORK: "1"},
                check_duplicate=True,
            )
        except docker.errors.APIError as exc:
            if "already exists" not in str(exc):  # else: created concurrently by another task
                raise TrainerNetworkError(f"cannot create the trainer network {name}: {_short(exc)}") from exc
            return _network_info(api.inspect_network(name), created=False)
        return _network_info(api.inspect_network(name), created=True)
    except (OSError, docker.errors.DockerException) as exc:
        raise TrainerNetworkError(f"cannot use the trainer network {name}: {_short(exc)}") from exc
    finally:
        if client is None:
            api.close()
