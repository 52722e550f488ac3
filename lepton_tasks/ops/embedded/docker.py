"""Will trainer containers run in Docker here, and if not, why not?

:func:`docker_status` answers without raising: no Docker SDK, no socket, permission denied on the socket, a
daemon that does not respond, or a missing trainer image (``run `lepton images build```). GPU support is
detected, best effort, from the daemon's runtimes (an ``nvidia`` runtime, or the CDI ``nvidia.com/gpu`` devices
of newer engines).

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

    ``available`` is True only when a daemon answers AND the trainer image exists. ``reason`` says why not (or,
    when available, what was found). ``server_version`` is set whenever a daemon answered, so
    ``server_version is not None`` means "the daemon works" even if the image is missing. ``trainer_image`` is
    the image id of the trainer image when present. ``gpus``: the daemon offers an NVIDIA runtime (best effort).
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
