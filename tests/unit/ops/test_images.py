"""The trainer image's content hash: pure, on a fake repository tree (no Docker)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lepton_tasks.ops.images import (
    LABEL_BASE,
    LABEL_GPU,
    LABEL_HASH,
    StaleImageError,
    check_trainer_image,
    content_hash,
    gpu_requirements,
    trainer_build_inputs,
    trainer_image_freshness,
    trainer_tag,
)

BASE = "lepton-base:bookworm@sha256:" + "ab" * 32


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "docker/trainer").mkdir(parents=True)
    (root / "docker/trainer/Dockerfile").write_text("FROM scratch\n")
    (root / "requirements-trainer.txt").write_text("numpy==2.4.6\ntensorflow_cpu==2.21.0\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'lepton'\n")
    (root / "lepton_tasks/trainer").mkdir(parents=True)
    (root / "lepton_tasks/__init__.py").write_text('"""pkg"""\n')
    (root / "lepton_tasks/trainer/__main__.py").write_text("print('train')\n")
    (root / "lepton_tasks/core/contracts").mkdir(parents=True)
    (root / "lepton_tasks/core/__init__.py").write_text("")
    (root / "lepton_tasks/core/contracts/iris.yaml").write_text("name: iris\n")
    (root / "lepton_tasks/adapters").mkdir()
    (root / "lepton_tasks/adapters/vault.py").write_text("VAULT = 1\n")
    # parts the trainer never runs: the coordinator's and the operator's code, the DAGs
    for part in ("ops", "federation", "ingest"):
        (root / "lepton_tasks" / part).mkdir()
        (root / "lepton_tasks" / part / "mod.py").write_text("X = 1\n")
    (root / "dags").mkdir()
    (root / "dags/lepton_x.py").write_text("DAG = 1\n")
    # not inputs: bytecode, other suffixes, files outside the package
    (root / "lepton_tasks/__pycache__").mkdir()
    (root / "lepton_tasks/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    (root / "lepton_tasks/notes.txt").write_text("not hashed\n")
    (root / "README.md").write_text("readme\n")
    (root / "tests").mkdir()
    (root / "tests/test_x.py").write_text("def test(): pass\n")
    return root


def _hash(root: Path, *, base: str = BASE, gpu: bool = False) -> str:
    return content_hash(root, base_ref=base, gpu=gpu)


def test_inputs_are_sorted_and_limited(repo: Path) -> None:
    rel = [p.relative_to(repo).as_posix() for p in trainer_build_inputs(repo)]
    assert rel == sorted(rel)
    assert set(rel) == {
        "docker/trainer/Dockerfile",
        "requirements-trainer.txt",
        "pyproject.toml",
        "lepton_tasks/__init__.py",
        "lepton_tasks/trainer/__main__.py",
        "lepton_tasks/core/__init__.py",
        "lepton_tasks/adapters/vault.py",
    }


def test_missing_dockerfile_is_an_error(repo: Path) -> None:
    (repo / "docker/trainer/Dockerfile").unlink()
    with pytest.raises(FileNotFoundError, match="Dockerfile"):
        trainer_build_inputs(repo)


def test_hash_is_stable(repo: Path, tmp_path: Path) -> None:
    first = _hash(repo)
    assert first == _hash(repo)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    # the same tree elsewhere (absolute paths are not part of the hash), with different mtimes
    copy = tmp_path / "elsewhere"
    for path in trainer_build_inputs(repo):
        dest = copy / path.relative_to(repo)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    assert _hash(copy) == first


@pytest.mark.parametrize(
    "change",
    [
        lambda r: (r / "lepton_tasks/trainer/__main__.py").write_text("print('train v2')\n"),
        lambda r: (r / "lepton_tasks/adapters/vault.py").write_text("VAULT = 2\n"),
        lambda r: (r / "lepton_tasks/trainer/new_module.py").write_text(""),
        lambda r: (r / "lepton_tasks/trainer/__main__.py").rename(r / "lepton_tasks/trainer/main.py"),
        lambda r: (r / "requirements-trainer.txt").write_text("numpy==2.4.5\ntensorflow_cpu==2.21.0\n"),
        lambda r: (r / "docker/trainer/Dockerfile").write_text("FROM scratch\nUSER 1\n"),
        lambda r: (r / "pyproject.toml").write_text("[project]\nname = 'lepton'\nversion = '2'\n"),
    ],
    ids=[
        "module-edit",
        "adapter-edit",
        "module-added",
        "module-renamed",
        "requirements",
        "dockerfile",
        "pyproject",
    ],
)
def test_hash_changes_with_inputs(repo: Path, change) -> None:  # type: ignore[no-untyped-def]
    before = _hash(repo)
    change(repo)
    assert _hash(repo) != before


def test_hash_ignores_non_inputs(repo: Path) -> None:
    before = _hash(repo)
    (repo / "lepton_tasks/notes.txt").write_text("edited\n")
    (repo / "lepton_tasks/__pycache__/x.cpython-311.pyc").write_bytes(b"\1")
    (repo / "README.md").write_text("edited\n")
    (repo / "tests/test_x.py").write_text("# edited\n")
    assert _hash(repo) == before


@pytest.mark.parametrize(
    "path",
    [
        "lepton_tasks/ops/mod.py",
        "lepton_tasks/federation/mod.py",
        "lepton_tasks/ingest/mod.py",
        "dags/lepton_x.py",
        "lepton_tasks/core/contracts/iris.yaml",
    ],
)
def test_tag_ignores_what_the_trainer_never_runs(repo: Path, path: str) -> None:
    """Editing the CLI, the coordinator, ingest, a DAG or a contract (it travels with each job) keeps the
    tag."""
    before = _hash(repo)
    (repo / path).write_text("# edited\n")
    assert _hash(repo) == before


def test_hash_covers_base_and_gpu(repo: Path) -> None:
    cpu = _hash(repo)
    assert _hash(repo, gpu=True) != cpu
    assert _hash(repo, base="python:3.11-slim-bookworm@sha256:" + "cd" * 32) != cpu
    assert _hash(repo, base="lepton-base:bookworm@sha256:" + "ef" * 32) != cpu  # same name, rebuilt base


def test_tag_format(repo: Path) -> None:
    digest = _hash(repo)
    tag = trainer_tag(digest)
    assert tag == f"lepton-trainer:{digest[:12]}"
    assert re.fullmatch(r"lepton-trainer:[0-9a-f]{12}", tag)
    with pytest.raises(ValueError):
        trainer_tag("not-a-digest")


def test_gpu_requirements_swaps_tensorflow() -> None:
    text = "# pins\nnumpy==2.4.6\ntensorflow_cpu==2.21.0\nwrapt==2.5.2\n"
    out = gpu_requirements(text)
    assert "tensorflow[and-cuda]==2.21.0" in out.splitlines()
    assert "tensorflow_cpu" not in out
    assert "numpy==2.4.6" in out and "wrapt==2.5.2" in out
    with pytest.raises(ValueError):
        gpu_requirements("numpy==2.4.6\n")


def test_real_repo_requirements_are_pinned() -> None:
    """requirements-trainer.txt pins everything with == at the versions of requirements.txt."""
    root = Path(__file__).resolve().parents[3]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    dev = {}
    for line in (root / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            dev[norm(name)] = version.strip()
    names = set()
    for line in (root / "requirements-trainer.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert "==" in line, f"not pinned: {line}"
        name, version = line.split("==")
        names.add(norm(name))
        if norm(name) in dev:
            assert dev[norm(name)] == version, (
                f"{name}: {version} here, {dev[norm(name)]} in requirements.txt"
            )
    assert {
        "tensorflow-cpu",
        "pandas",
        "pyarrow",
        "numpy",
        "minio",
        "hvac",
        "tink",
        "pydantic",
        "pydantic-settings",
        "pyyaml",
        "scikit-learn",
    } <= names
    assert not names & {"apache-airflow", "great-expectations", "matplotlib"}


class _FakeAPI:
    """``inspect_image`` of a low-level Docker client, for one image with ``labels``."""

    def __init__(self, labels: dict[str, str] | None) -> None:
        self.labels = labels

    def inspect_image(self, name: str) -> dict:
        if self.labels is None:
            import docker.errors

            raise docker.errors.ImageNotFound(name)
        return {"Config": {"Labels": self.labels}}


def _labels(digest: str) -> dict[str, str]:
    return {LABEL_HASH: digest, LABEL_BASE: BASE, LABEL_GPU: "0"}


def test_an_image_of_the_current_sources_is_fresh(repo: Path) -> None:
    digest = _hash(repo)
    fresh = trainer_image_freshness(_FakeAPI(_labels(digest)), "lepton-trainer:latest", repo)
    assert not fresh.stale and fresh.tag == trainer_tag(digest) and fresh.sources_hash == digest
    assert "holds the current sources" in check_trainer_image(_FakeAPI(_labels(digest)), "x", repo)


def test_a_changed_trainer_makes_the_image_stale(repo: Path) -> None:
    old = _hash(repo)
    (repo / "lepton_tasks/trainer/__main__.py").write_text("print('train v2')\n")
    new = _hash(repo)
    with pytest.raises(StaleImageError) as err:
        check_trainer_image(_FakeAPI(_labels(old)), "lepton-trainer:latest", repo)
    assert str(err.value) == (
        f"trainer image lepton-trainer:{old[:12]} is stale (sources hash to {new[:12]}): "
        "run `lepton images build`"
    )


def test_a_missing_image_is_reported_and_an_unlabelled_one_is_unknown(repo: Path) -> None:
    assert trainer_image_freshness(_FakeAPI(None), "lepton-trainer:latest", repo).stale
    unknown = trainer_image_freshness(_FakeAPI({}), "someone/else:1", repo)
    assert not unknown.stale and "freshness unknown" in unknown.reason


def test_sources_absent_here_mean_unknown_not_stale(repo: Path, tmp_path: Path) -> None:
    fresh = trainer_image_freshness(_FakeAPI(_labels(_hash(repo))), "x", tmp_path / "no-repo")
    assert not fresh.stale and "freshness unknown" in fresh.reason
