"""Build the per-partner trainer image hermetically, and skip the build when nothing changed.

The trainer image (``docker/trainer/Dockerfile``) runs ``python -m lepton_tasks.trainer`` inside each
partner's container. It is built without any network access during ``docker build``:

1. a *wheelhouse* of every pinned runtime dependency (``requirements-trainer.txt``) is downloaded on the host
   with the host's ``pip`` for the image's interpreter (CPython 3.11, manylinux up to glibc 2.36 = Debian
   bookworm) into ``cache_dir/wheelhouse``, reused across builds (only missing wheels are fetched; when every
   wheel is already there nothing touches the network);
2. a wheel of the project itself is built from a private copy of exactly the hashed sources;
3. the base image is ``python:3.11-slim-bookworm`` when it exists locally, else ``lepton-base:bookworm``, a
   Debian bookworm root file system made once with ``debootstrap`` and ``docker import`` (no registry needed);
4. a small build context (Dockerfile, requirements, hard links to the needed wheels, the project wheel) is
   sent to the daemon and built with ``network_mode="none"``.

The image is tagged ``lepton-trainer:<hash12>`` where the hash covers every build input (see
:func:`trainer_build_inputs` and :func:`content_hash`), and ``lepton-trainer:latest``. When the content tag
already exists, :func:`build_trainer_image` only re-tags ``latest``.

This module never imports ``airflow``; the Docker SDK is imported lazily so ``lepton_tasks`` stays importable
inside the trainer image (which does not ship the SDK).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # pragma: no cover
    import docker

TRAINER_REPOSITORY = "lepton-trainer"
LATEST_TAG = f"{TRAINER_REPOSITORY}:latest"
SLIM_BASE = "python:3.11-slim-bookworm"
DEBOOTSTRAP_BASE = "lepton-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_SUITE = "bookworm"

DOCKERFILE = Path("docker/trainer/Dockerfile")
REQUIREMENTS = Path("requirements-trainer.txt")
PYPROJECT = Path("pyproject.toml")
PACKAGE_DIR = Path("lepton_tasks")
#: the parts of the package the trainer runs; only these go into the image and its content hash, so editing
#: ``ops/``, ``ingest/``, ``federation/`` or a DAG never rebuilds the image
TRAINER_PACKAGES: tuple[str, ...] = ("core", "adapters", "trainer")
#: files of those parts that go into the image (contracts travel with each job, not in the image)
PACKAGE_PATTERNS: tuple[str, ...] = ("*.py",)

#: the interpreter inside the image: bookworm's python3 and python:3.11-slim are both CPython 3.11, glibc 2.36
TARGET_PYTHON = "3.11"
TARGET_GLIBC_MINOR = 36

LABEL_HASH = "org.lepton.content-hash"
LABEL_BASE = "org.lepton.base-image"
LABEL_GPU = "org.lepton.gpu"

#: seconds the Docker client waits on one request (a build streams for minutes)
DOCKER_TIMEOUT_S = 1800


class ImageBuildError(RuntimeError):
    """Building the trainer image failed; the message names the step and the log file."""


@dataclass(frozen=True)
class BuildResult:
    """Outcome of :func:`build_trainer_image`.

    ``tag`` is the content tag (``lepton-trainer:<hash12>``), ``skipped`` is True when that image already
    existed (only ``latest`` was re-tagged), ``seconds`` the wall time of the whole call. ``steps`` holds the
    wall time of each step that ran (``wheelhouse``, ``project_wheel``, ``base``, ``build``).
    """

    tag: str
    skipped: bool
    seconds: float
    base: str = ""
    log_path: Path | None = None
    steps: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# content hash (pure)
# ------------------------------------------------------------------------------------------------------------


def trainer_build_inputs(repo_root: Path) -> list[Path]:
    """Every file whose bytes go into the trainer image, sorted by repo-relative path.

    The Dockerfile, ``requirements-trainer.txt``, ``pyproject.toml``, ``lepton_tasks/__init__.py`` and the
    ``*.py`` files of :data:`TRAINER_PACKAGES` (``__pycache__`` excluded). Raises :class:`FileNotFoundError`
    when one of the first three is missing.
    """
    root = Path(repo_root).resolve()
    fixed = [root / DOCKERFILE, root / REQUIREMENTS, root / PYPROJECT]
    for path in fixed:
        if not path.is_file():
            raise FileNotFoundError(f"trainer image input missing: {path}")
    package: set[Path] = {root / PACKAGE_DIR / "__init__.py"}
    for sub in TRAINER_PACKAGES:
        for pattern in PACKAGE_PATTERNS:
            for path in (root / PACKAGE_DIR / sub).rglob(pattern):
                if path.is_file() and "__pycache__" not in path.relative_to(root).parts:
                    package.add(path)
    return sorted([*fixed, *package], key=lambda p: p.relative_to(root).as_posix())


def snapshot_inputs(repo_root: Path) -> dict[str, bytes]:
    """The bytes of every :func:`trainer_build_inputs` file, keyed by repo-relative POSIX path (sorted).

    A build hashes and packages this one snapshot, so files edited while it runs cannot make the image differ
    from what its tag says.
    """
    root = Path(repo_root).resolve()
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in trainer_build_inputs(root)}


def snapshot_hash(snapshot: dict[str, bytes], *, base_ref: str, gpu: bool) -> str:
    """:func:`content_hash` of an already read :func:`snapshot_inputs`."""
    digest = hashlib.sha256()

    def put(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    put("format", b"lepton-trainer/1")
    for rel in sorted(snapshot):
        put("path", rel.encode())
        put("bytes", snapshot[rel])
    put("base", base_ref.encode())
    put("gpu", b"1" if gpu else b"0")
    return digest.hexdigest()


def content_hash(repo_root: Path, *, base_ref: str, gpu: bool) -> str:
    """sha256 (hex) over the build inputs (relative path + bytes, sorted by path), the base image and the GPU
    flag.

    ``base_ref`` identifies the base image, e.g. ``"lepton-base:bookworm@sha256:…"`` (name and image id), so
    a rebuilt base gives a new tag. The encoding is length-prefixed, so no two different inputs collide by
    concatenation. Absolute paths and modification times play no part.
    """
    return snapshot_hash(snapshot_inputs(repo_root), base_ref=base_ref, gpu=gpu)


def trainer_tag(digest: str) -> str:
    """The content tag for a :func:`content_hash`: ``lepton-trainer:<first 12 hex digits>``."""
    if len(digest) < 12 or any(c not in "0123456789abcdef" for c in digest[:12]):
        raise ValueError(f"not a hex digest: {digest!r}")
    return f"{TRAINER_REPOSITORY}:{digest[:12]}"


def gpu_requirements(text: str) -> str:
    """``requirements-trainer.txt`` for a GPU image: ``tensorflow-cpu==X`` becomes
    ``tensorflow[and-cuda]==X``.

    The Dockerfile applies the same substitution (with sed) when ``GPU=1``.
    """
    out: list[str] = []
    replaced = False
    for line in text.splitlines():
        low = line.strip().lower()
        if low.startswith(("tensorflow-cpu==", "tensorflow_cpu==")):
            out.append("tensorflow[and-cuda]==" + line.split("==", 1)[1].strip())
            replaced = True
        else:
            out.append(line)
    if not replaced:
        raise ValueError(
            "requirements-trainer.txt has no tensorflow-cpu==… pin to turn into tensorflow[and-cuda]"
        )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------------
# Docker client helpers
# ------------------------------------------------------------------------------------------------------------


def docker_client(*, base_url: str | None = None, timeout: int = 60) -> docker.DockerClient:
    """A Docker SDK client. Honours ``DOCKER_HOST`` (and ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH``) unless
    ``base_url`` is given; the API version is negotiated with the daemon.

    Raises ``docker.errors.DockerException`` when no daemon can be reached.
    """
    import docker

    if base_url:
        return docker.DockerClient(base_url=base_url, version="auto", timeout=timeout)
    return docker.from_env(version="auto", timeout=timeout)


def image_id(client: docker.DockerClient, name: str) -> str | None:
    """The local image id of ``name`` (``sha256:…``), or None when no such image exists locally."""
    import docker

    try:
        return str(client.images.get(name).id)
    except docker.errors.ImageNotFound:
        return None


class StaleImageError(RuntimeError):
    """The trainer image does not hold the trainer code of this checkout; the message says what to run."""


@dataclass(frozen=True)
class ImageFreshness:
    """Whether an image holds the current trainer sources (see :func:`trainer_image_freshness`).

    ``stale`` is True only when it is known not to; ``reason`` says why (or why it cannot be told: an image
    not built by ``lepton images build``, sources not present on this machine). ``tag`` is the image's
    content tag (``lepton-trainer:<hash12>``), ``sources_hash`` what this checkout hashes to with the image's
    own base and GPU flag.
    """

    image: str
    stale: bool
    reason: str
    tag: str | None = None
    sources_hash: str | None = None


def default_repo_root() -> Path:
    """The checkout these modules were imported from (the sources the trainer image must hold)."""
    return Path(__file__).resolve().parents[2]


def trainer_image_freshness(client: Any, image: str, repo_root: Path | None = None) -> ImageFreshness:
    """Compare ``image``'s content-hash label with the hash of the current sources (same base image and GPU
    flag as the image, from its labels): a trainer changed since the last ``lepton images build`` makes the
    image stale. ``client``: a ``docker.DockerClient`` or ``docker.APIClient``. Pure reads: one image
    inspect and the trainer's source files (a few ms)."""
    import docker.errors

    api = getattr(client, "api", client)  # a DockerClient or its low-level APIClient
    try:
        labels = (api.inspect_image(image).get("Config") or {}).get("Labels") or {}
    except docker.errors.ImageNotFound:
        return ImageFreshness(image, True, f"trainer image {image} is missing: run `lepton images build`")
    label_hash, base_ref = labels.get(LABEL_HASH), labels.get(LABEL_BASE)
    if not label_hash or not base_ref:
        return ImageFreshness(image, False, f"{image} has no {LABEL_HASH} label: freshness unknown")
    tag = trainer_tag(label_hash)
    root = Path(repo_root or default_repo_root())
    try:
        current = snapshot_hash(snapshot_inputs(root), base_ref=base_ref, gpu=labels.get(LABEL_GPU) == "1")
    except FileNotFoundError as exc:
        return ImageFreshness(image, False, f"sources not found here ({exc}): freshness unknown", tag)
    if current != label_hash:
        return ImageFreshness(
            image,
            True,
            f"trainer image {tag} is stale (sources hash to {current[:12]}): run `lepton images build`",
            tag,
            current,
        )
    return ImageFreshness(image, False, f"trainer image {tag} holds the current sources", tag, current)


def check_trainer_image(client: Any, image: str, repo_root: Path | None = None) -> str:
    """Raise :class:`StaleImageError` when ``image`` is missing or stale; return the freshness reason."""
    fresh = trainer_image_freshness(client, image, repo_root)
    if fresh.stale:
        raise StaleImageError(fresh.reason)
    return fresh.reason


# ------------------------------------------------------------------------------------------------------------
# build steps
# ------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$LEPTON_DATA_DIR/cache/trainer-image`` (``.lepton`` by default): where wheels and build logs live."""
    return Path(os.environ.get("LEPTON_DATA_DIR", ".lepton")).resolve() / "cache" / "trainer-image"


def _target_pip_args(arch: str) -> list[str]:
    """pip options that select wheels for the image's interpreter, not the host's."""
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(TARGET_GLIBC_MINOR, 16, -1)]
    if arch in ("x86_64", "i686"):
        platforms += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    else:
        platforms += [f"manylinux2014_{arch}"]
    args = [
        "--only-binary=:all:",
        "--python-version",
        TARGET_PYTHON,
        "--implementation",
        "cp",
        "--abi",
        "cp" + TARGET_PYTHON.replace(".", ""),
    ]
    for plat in platforms:
        args += ["--platform", plat]
    return args


def _run_logged(cmd: list[str], log: IO[str], *, step: str, log_path: Path, **kwargs: Any) -> None:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False, **kwargs)
    log.write(f"[{step}: exit {proc.returncode} after {time.monotonic() - started:.1f}s]\n")
    log.flush()
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{step} failed (exit {proc.returncode}): `{' '.join(cmd[:6])} …`; see {log_path}"
        )


def _resolve_offline(
    req_file: Path, wheelhouse: Path, pip_target: list[str], log: IO[str], log_path: Path, *, check: bool
) -> list[Path] | None:
    """Resolve ``req_file`` against the wheelhouse only; the wheel files needed, or None when some are
    missing."""
    report = wheelhouse.parent / "resolve-report.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--no-index",
        "--find-links",
        str(wheelhouse),
        "--report",
        str(report),
        "--quiet",
        *pip_target,
        "-r",
        str(req_file),
    ]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        if check:
            raise ImageBuildError(f"the wheelhouse {wheelhouse} does not satisfy {req_file}; see {log_path}")
        log.write("(wheelhouse incomplete: downloading the missing wheels)\n")
        return None
    files: list[Path] = []
    for item in json.loads(report.read_text())["install"]:
        url = urlparse(item["download_info"]["url"])
        if url.scheme != "file":
            raise ImageBuildError(
                f"offline resolution returned a non-local wheel {url.geturl()}; see {log_path}"
            )
        src = Path(unquote(url.path))
        dest = wheelhouse / src.name
        if (
            src.resolve() != dest.resolve()
        ):  # found through a pip.conf find-links: keep a copy in the wheelhouse
            shutil.copy2(src, dest)
        files.append(dest)
    return sorted(files)


def ensure_wheelhouse(
    requirements: bytes, cache_dir: Path, *, arch: str, gpu: bool, log: IO[str], log_path: Path
) -> list[Path]:
    """Make ``cache_dir/wheelhouse`` hold every wheel ``requirements`` needs; return exactly those files.

    Offline first: when the wheelhouse already satisfies the requirements, nothing is downloaded and the
    network is not used. Otherwise ``pip download`` (host pip, target CPython 3.11 manylinux wheels) fetches
    the missing ones (files already present are not downloaded again).
    """
    wheelhouse = cache_dir / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    text = requirements.decode()
    req_file = cache_dir / ("requirements-trainer-gpu.txt" if gpu else "requirements-trainer.txt")
    req_file.write_text(gpu_requirements(text) if gpu else text)
    target = _target_pip_args(arch)
    files = _resolve_offline(req_file, wheelhouse, target, log, log_path, check=False)
    if files is None:
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--progress-bar",
                "off",
                "--dest",
                str(wheelhouse),
                *target,
                "-r",
                str(req_file),
            ],
            log,
            step="downloading the wheelhouse",
            log_path=log_path,
        )
        files = _resolve_offline(req_file, wheelhouse, target, log, log_path, check=True)
        assert files is not None
    return files


def build_project_wheel(
    repo_root: Path,
    snapshot: dict[str, bytes],
    out_dir: Path,
    wheelhouse: Path,
    *,
    log: IO[str],
    log_path: Path,
) -> Path:
    """Build the ``lepton`` wheel from a private copy of exactly the hashed sources (never the live tree, so
    the image matches its tag and no ``build/`` or ``*.egg-info`` appears in the checkout). The build backend
    (setuptools) comes from the wheelhouse, so this works offline."""
    root = Path(repo_root).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="lepton-src-") as tmp:
        src = Path(tmp)
        for rel, data in snapshot.items():
            if rel in (DOCKERFILE.as_posix(), REQUIREMENTS.as_posix()):
                continue
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        for extra in ("README.md", "README.rst", "LICENSE", "LICENSE.txt"):
            if (root / extra).is_file():
                shutil.copy2(root / extra, src / extra)
        if not (src / "README.md").exists():  # pyproject names it as the readme
            (src / "README.md").write_text("Lepton\n")
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-index",
                "--find-links",
                str(wheelhouse),
                "--wheel-dir",
                str(out_dir),
                str(src),
            ],
            log,
            step="building the lepton wheel",
            log_path=log_path,
        )
    wheels = sorted(out_dir.glob("lepton-*.whl"))
    if len(wheels) != 1:
        raise ImageBuildError(f"expected one lepton wheel in {out_dir}, found {wheels}; see {log_path}")
    return wheels[0]


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (an interrupted debootstrap can leave /proc, /sys mounted)."""
    prefix = str(path.resolve())
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[1].replace("\\040", " ") for line in lines if len(line.split()) > 1]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _safe_rmtree(path: Path, log: IO[str]) -> None:
    """rmtree, but never into a mounted file system (a bind-mounted /dev would be the host's)."""
    mounts = _mounts_under(path)
    if mounts:
        log.write(f"NOT removing {path}: still mounted there: {mounts} (umount them, then delete it)\n")
        return
    shutil.rmtree(path, ignore_errors=True)


def build_debootstrap_base(
    client: docker.DockerClient,
    cache_dir: Path,
    *,
    name: str = DEBOOTSTRAP_BASE,
    mirror: str = DEBIAN_MIRROR,
    security_updates: bool = True,
    log: IO[str],
    log_path: Path,
) -> str:
    """Build the base image ``name`` from a Debian bookworm minbase root file system; returns its image id.

    ``debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm DIR MIRROR``, then
    (``security_updates``) apt-get upgrade inside the chroot from bookworm-updates and bookworm-security, then
    the tree is streamed into ``docker import``. Needs root and ``debootstrap`` on the host, and http access
    to the Debian mirror; no registry.
    """
    if os.geteuid() != 0:
        raise ImageBuildError("building the debootstrap base image needs root (debootstrap creates a chroot)")
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None
    )
    if debootstrap is None:
        raise ImageBuildError(
            "debootstrap is not installed: run `scripts/dockerd.sh install` "
            "(apt-get install docker.io debootstrap)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("rootfs-*"):  # left by an interrupted build
        _safe_rmtree(stale, log)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache_dir))
    rootfs.chmod(0o755)  # becomes "/" of the image; mkdtemp makes it 0700 (apt's _apt user needs to enter it)
    try:
        _run_logged(
            [
                debootstrap,
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                DEBIAN_SUITE,
                str(rootfs),
                mirror,
            ],
            log,
            step="debootstrap",
            log_path=log_path,
        )
        if security_updates:
            (rootfs / "etc/apt/sources.list").write_text(
                f"deb {mirror} {DEBIAN_SUITE} main\n"
                f"deb {mirror} {DEBIAN_SUITE}-updates main\n"
                f"deb {DEBIAN_SECURITY_MIRROR} {DEBIAN_SUITE}-security main\n"
            )
            env = {
                k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")
            }
            env |= {
                "DEBIAN_FRONTEND": "noninteractive",
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8",
            }
            _run_logged(
                [
                    "chroot",
                    str(rootfs),
                    "sh",
                    "-c",
                    "apt-get update -q && apt-get -y -q -o Dpkg::Options::=--force-confold upgrade",
                ],
                log,
                step="apt-get upgrade in the base chroot",
                log_path=log_path,
                env=env,
            )
        # the host's name and resolver must not end up in the image (Docker provides both at run time)
        for rel in ("etc/resolv.conf", "etc/hostname"):
            (rootfs / rel).unlink(missing_ok=True)
        # what a container never needs: package caches and lists, manual pages (copyright files stay)
        for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/man", "usr/share/info"):
            target = rootfs / rel
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    elif child.name != "lock":
                        child.unlink(missing_ok=True)
        log.write(f"\n$ tar -C {rootfs} -c . | docker import - {name}\n")
        log.flush()
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE, stderr=log
        )
        repository, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
        try:
            assert tar.stdout is not None
            out = client.api.import_image_from_stream(
                tar.stdout,
                repository=repository,
                tag=tag,
                changes=[
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "ENV LANG=C.UTF-8",
                    'CMD ["/bin/bash"]',
                ],
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            rc = tar.wait()
        log.write(f"{out}\n")
        if rc != 0:
            raise ImageBuildError(f"tar of the base root file system failed (exit {rc}); see {log_path}")
    finally:
        _safe_rmtree(rootfs, log)
    found = image_id(client, name)
    if found is None:
        raise ImageBuildError(f"docker import did not create {name}; see {log_path}")
    return found


def resolve_base(
    client: docker.DockerClient, base: str, cache_dir: Path, *, log: IO[str], log_path: Path
) -> tuple[str, str, float]:
    """Pick (and if needed create) the base image; returns ``(name, image id, seconds spent building it)``.

    ``"auto"``: ``python:3.11-slim-bookworm`` if present locally, else ``lepton-base:bookworm`` (built once
    with debootstrap when missing and possible), else a pull of ``python:3.11-slim-bookworm``.
    ``lepton-base:bookworm``: that image, built when missing. Any other name: that local image, else a pull
    of it.
    """
    import docker

    def pull(name: str) -> str:
        log.write(f"\npulling {name}\n")
        try:
            return str(client.images.pull(name).id)
        except docker.errors.APIError as exc:
            raise ImageBuildError(
                f"base image {name} is not present locally and could not be pulled: {exc}"
            ) from exc

    def debootstrap_possible() -> bool:
        return os.geteuid() == 0 and (
            shutil.which("debootstrap") is not None or Path("/usr/sbin/debootstrap").exists()
        )

    candidates = [SLIM_BASE, DEBOOTSTRAP_BASE] if base == "auto" else [base]
    for name in candidates:
        found = image_id(client, name)
        if found:
            return name, found, 0.0
    if base in ("auto", DEBOOTSTRAP_BASE) and (base == DEBOOTSTRAP_BASE or debootstrap_possible()):
        started = time.monotonic()
        found = build_debootstrap_base(client, cache_dir, log=log, log_path=log_path)
        return DEBOOTSTRAP_BASE, found, time.monotonic() - started
    name = SLIM_BASE if base == "auto" else base
    return name, pull(name), 0.0


def _assemble_context(ctx: Path, snapshot: dict[str, bytes], wheels: list[Path], project_wheel: Path) -> None:
    """Dockerfile + requirements + wheels/ (hard links, copies across file systems) + project/."""
    (ctx / "Dockerfile").write_bytes(snapshot[DOCKERFILE.as_posix()])
    (ctx / "requirements-trainer.txt").write_bytes(snapshot[REQUIREMENTS.as_posix()])
    for sub, files in (("wheels", wheels), ("project", [project_wheel])):
        (ctx / sub).mkdir()
        for src in files:
            try:
                os.link(src, ctx / sub / src.name)
            except OSError:
                shutil.copy2(src, ctx / sub / src.name)


def _docker_build(
    client: docker.DockerClient,
    ctx: Path,
    *,
    tag: str,
    buildargs: dict[str, str],
    labels: dict[str, str],
    log: IO[str],
    log_path: Path,
) -> str:
    """Legacy-builder build of ``ctx`` with no network; streams the log; returns the image id."""
    log.write(
        f"\n$ docker build --network none --tag {tag} "
        f"{' '.join(f'--build-arg {k}={v}' for k, v in buildargs.items())} {ctx}\n"
    )
    log.flush()
    image: str | None = None
    try:
        stream: Iterator[dict[str, Any]] = client.api.build(
            path=str(ctx),
            tag=tag,
            buildargs=buildargs,
            labels=labels,
            network_mode="none",
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            use_config_proxy=False,
        )
        for chunk in stream:
            if "stream" in chunk:
                log.write(chunk["stream"])
            elif "status" in chunk:
                log.write(f"{chunk['status']}\n")
            if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                image = chunk["aux"]["ID"]
            if "error" in chunk:
                log.write(f"ERROR: {chunk['error']}\n")
                log.flush()
                raise ImageBuildError(
                    f"docker build of {tag} failed: {chunk['error'].strip()}; see {log_path}"
                )
            log.flush()
    except ImageBuildError:
        raise
    except Exception as exc:  # docker.errors.APIError, connection errors, …
        log.write(f"ERROR: {exc!r}\n")
        raise ImageBuildError(f"docker build of {tag} failed: {exc}; see {log_path}") from exc
    found = image_id(client, tag)
    if found is None:
        raise ImageBuildError(f"docker build reported success but {tag} does not exist; see {log_path}")
    return image or found


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    """One build at a time per cache dir (the wheelhouse and the base image are shared)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_trainer_image(
    repo_root: Path,
    *,
    base: str = "auto",
    gpu: bool = False,
    cache_dir: Path,
    client: docker.DockerClient | None = None,
    tag_latest: bool = True,
) -> BuildResult:
    """Build ``lepton-trainer:<hash12>`` (and tag ``lepton-trainer:latest``) unless it already exists.

    ``base``: ``"auto"`` (see :func:`resolve_base`), ``"lepton-base:bookworm"`` or any image name. ``gpu``:
    install ``tensorflow[and-cuda]`` instead of ``tensorflow-cpu`` (untested here). ``cache_dir`` keeps the
    wheelhouse, the project wheel, temporary build contexts and ``logs/``. Raises :class:`ImageBuildError`
    (naming the log file) on failure.
    """
    started = time.monotonic()
    root = Path(repo_root).resolve()
    cache_dir = Path(cache_dir).resolve()
    own_client = client is None
    client = client or docker_client(timeout=DOCKER_TIMEOUT_S)
    try:
        return _build(
            root, client, base=base, gpu=gpu, cache_dir=cache_dir, tag_latest=tag_latest, started=started
        )
    finally:
        if own_client:
            client.close()


def _build(
    root: Path,
    client: docker.DockerClient,
    *,
    base: str,
    gpu: bool,
    cache_dir: Path,
    tag_latest: bool,
    started: float,
) -> BuildResult:
    steps: dict[str, float] = {}
    (cache_dir / "logs").mkdir(parents=True, exist_ok=True)
    snapshot = snapshot_inputs(root)

    with _build_lock(cache_dir):
        log_path = cache_dir / "logs" / "trainer-build.log"
        if log_path.exists() and log_path.stat().st_size > 20 * 2**20:  # keep one previous log
            log_path.replace(log_path.with_suffix(".log.1"))
        with open(log_path, "a") as log:
            log.write(
                f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} build_trainer_image base={base} gpu={gpu}\n"
            )
            t0 = time.monotonic()
            base_name, base_id, base_seconds = resolve_base(
                client, base, cache_dir, log=log, log_path=log_path
            )
            if base_seconds:
                steps["base"] = base_seconds
            digest = snapshot_hash(snapshot, base_ref=f"{base_name}@{base_id}", gpu=gpu)
            tag = trainer_tag(digest)
            log.write(f"base {base_name}@{base_id}; content tag {tag}\n")

            if image_id(client, tag) is not None:
                if tag_latest:
                    client.images.get(tag).tag(TRAINER_REPOSITORY, "latest")
                log.write(f"{tag} exists: nothing to build ({time.monotonic() - t0:.2f}s)\n")
                return BuildResult(
                    tag=tag,
                    skipped=True,
                    seconds=time.monotonic() - started,
                    base=base_name,
                    log_path=log_path,
                    steps=steps,
                )

            for stale in cache_dir.glob("context-*"):  # left by an interrupted build
                shutil.rmtree(stale, ignore_errors=True)
            arch = str(client.info().get("Architecture") or platform.machine())
            t1 = time.monotonic()
            wheels = ensure_wheelhouse(
                snapshot[REQUIREMENTS.as_posix()], cache_dir, arch=arch, gpu=gpu, log=log, log_path=log_path
            )
            steps["wheelhouse"] = time.monotonic() - t1

            t1 = time.monotonic()
            project_wheel = build_project_wheel(
                root, snapshot, cache_dir / "project", cache_dir / "wheelhouse", log=log, log_path=log_path
            )
            steps["project_wheel"] = time.monotonic() - t1

            t1 = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="context-", dir=cache_dir) as ctx:
                _assemble_context(Path(ctx), snapshot, wheels, project_wheel)
                _docker_build(
                    client,
                    Path(ctx),
                    tag=tag,
                    buildargs={"BASE_IMAGE": base_name, "GPU": "1" if gpu else "0"},
                    labels={
                        LABEL_HASH: digest,
                        LABEL_BASE: f"{base_name}@{base_id}",
                        LABEL_GPU: "1" if gpu else "0",
                    },
                    log=log,
                    log_path=log_path,
                )
            steps["build"] = time.monotonic() - t1
            log.write(f"[docker build: {steps['build']:.1f}s]\n")
            if tag_latest:
                client.images.get(tag).tag(TRAINER_REPOSITORY, "latest")
            log.write(f"built {tag} in {time.monotonic() - started:.1f}s: {steps}\n")
    return BuildResult(
        tag=tag,
        skipped=False,
        seconds=time.monotonic() - started,
        base=base_name,
        log_path=log_path,
        steps=steps,
    )
