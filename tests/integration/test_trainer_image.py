"""The trainer image: hermetic build (or reuse), no-op rebuild, imports, non-root user. Needs a Docker daemon.

Policy (fixture ``require_docker``): with ``CI=true`` a missing Docker daemon FAILS the test; elsewhere it
skips.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lepton_tasks.ops.embedded.docker import docker_status
from lepton_tasks.ops.images import (
    LABEL_HASH,
    LATEST_TAG,
    BuildResult,
    build_trainer_image,
    default_cache_dir,
    docker_client,
    trainer_build_inputs,
)

if TYPE_CHECKING:
    import docker

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def require_docker() -> Iterator[docker.DockerClient]:
    """A Docker client for a daemon that answers. Without one: FAIL when ``CI=true`` (CI must provide Docker:
    ``scripts/dockerd.sh install && scripts/dockerd.sh start``), skip otherwise."""
    status = docker_status()
    if not status.daemon_ok:
        message = f"Docker is required for this test and is not available: {status.reason}"
        if _in_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    client = docker_client(timeout=1800)
    yield client
    client.close()


@pytest.fixture(scope="session")
def repo_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A frozen copy of the image's inputs: edits made to the checkout while the tests run cannot change the
    content hash between the two builds. The hash ignores absolute paths, so the tag equals the checkout's."""
    dest = tmp_path_factory.mktemp("repo")
    for path in trainer_build_inputs(REPO_ROOT):
        target = dest / path.relative_to(REPO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if (REPO_ROOT / "README.md").is_file():
        shutil.copy2(REPO_ROOT / "README.md", dest / "README.md")
    return dest


@pytest.fixture(scope="session")
def trainer_image(require_docker: docker.DockerClient, repo_snapshot: Path) -> BuildResult:
    """Build the trainer image, or reuse it when its content tag already exists."""
    return build_trainer_image(repo_snapshot, cache_dir=default_cache_dir(), client=require_docker)


def _run(client: docker.DockerClient, tag: str, *args: str, entrypoint: str | None = None) -> str:
    """``docker run --rm --network none [--entrypoint E] TAG ARGS…``; returns stdout+stderr, raises on
    exit != 0."""
    out = client.containers.run(
        tag, list(args), entrypoint=entrypoint, network_mode="none", remove=True, stdout=True, stderr=True
    )
    return out.decode() if isinstance(out, bytes) else str(out)


def test_second_build_is_a_noop(
    require_docker: docker.DockerClient, trainer_image: BuildResult, repo_snapshot: Path
) -> None:
    again = build_trainer_image(repo_snapshot, cache_dir=default_cache_dir(), client=require_docker)
    assert again.skipped, again
    assert again.tag == trainer_image.tag
    assert again.seconds < 10, f"no-op rebuild took {again.seconds:.1f}s"
    image = require_docker.images.get(trainer_image.tag)
    assert require_docker.images.get(LATEST_TAG).id == image.id
    assert image.labels[LABEL_HASH].startswith(trainer_image.tag.split(":")[1])


def test_runtime_dependencies_import(require_docker: docker.DockerClient, trainer_image: BuildResult) -> None:
    out = _run(
        require_docker,
        trainer_image.tag,
        "-c",
        "import tensorflow, pandas, pyarrow, minio, hvac, tink, sklearn, pydantic, pydantic_settings, "
        "yaml, lepton_tasks; print('ok', tensorflow.__version__)",
        entrypoint="python",
    )
    assert "ok 2." in out, out


def test_runs_as_non_root(require_docker: docker.DockerClient, trainer_image: BuildResult) -> None:
    out = _run(
        require_docker,
        trainer_image.tag,
        "-c",
        "import os; print(os.getuid(), os.getgid())",
        entrypoint="python",
    )
    assert out.split()[-2:] == ["10001", "10001"], out
    config = require_docker.images.get(trainer_image.tag).attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python", "-m", "lepton_tasks.trainer"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1" and env["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_image_is_hermetic_and_clean(require_docker: docker.DockerClient, trainer_image: BuildResult) -> None:
    """No wheelhouse left in the image, dependencies consistent, the venv not writable by the trainer user."""
    out = _run(
        require_docker,
        trainer_image.tag,
        "-c",
        "set -e; test ! -e /wheels; test ! -e /tmp/project; test ! -w /opt/venv/lib; pip check; echo clean",
        entrypoint="sh",
    )
    assert "No broken requirements found" in out and out.strip().endswith("clean"), out


def test_stale_image_is_detected_against_changed_sources(
    require_docker: docker.DockerClient, trainer_image: BuildResult, repo_snapshot: Path, tmp_path: Path
) -> None:
    """The image just built holds its sources; a trainer edited since makes it stale, with the fix named."""
    from lepton_tasks.ops.images import StaleImageError, check_trainer_image, trainer_image_freshness

    fresh = trainer_image_freshness(require_docker, trainer_image.tag, repo_snapshot)
    assert not fresh.stale and fresh.tag == trainer_image.tag, fresh
    edited = tmp_path / "edited"
    shutil.copytree(repo_snapshot, edited)
    main = edited / "lepton_tasks/trainer/__main__.py"
    main.write_text(main.read_text() + "\n# changed after the last build\n")
    with pytest.raises(
        StaleImageError,
        match=r"^trainer image lepton-trainer:[0-9a-f]{12} is stale \(sources hash to [0-9a-f]{12}\): "
        r"run `lepton images build`$",
    ):
        check_trainer_image(require_docker.api, trainer_image.tag, edited)
