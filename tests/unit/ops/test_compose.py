"""docker-compose.yml (compose mode): loopback-only ports, pinned images, no default credentials,
required secrets, health checks, Vault not in dev mode — and `docker-compose config` accepts it (and
refuses it without its secrets).

The file is read as YAML and checked statically; no container is started here (running compose mode
for real is a later step, see README.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_DIR = REPO / "docker" / "compose"
#: the role files that go on top of docker-compose.yml (``-f docker-compose.yml -f <role file>``)
ROLE_FILES = {"site": COMPOSE_DIR / "site.yml", "coordinator": COMPOSE_DIR / "coordinator.yml"}
ENV_EXAMPLE = COMPOSE_DIR / "env.example"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}
EXPECTED_SERVICES = AIRFLOW_SERVICES | {"postgres", "redis", "minio", "minio-init", "vault", "vault-init"}
ONE_SHOT = {"airflow-init", "minio-init", "vault-init"}
#: secrets (and host-specific ids) compose must refuse to start without
REQUIRED = {
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_ADMIN_USERNAME",
    "AIRFLOW_ADMIN_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "LEPTON_S3_ACCESS_KEY",
    "LEPTON_S3_SECRET_KEY",
    "LEPTON_VAULT_TOKEN",
}
#: what only a site needs (its trainer containers): the coordinator must start without them
SITE_REQUIRED = {"LEPTON_TRAINER_IMAGE", "DOCKER_GID"}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY|_USER|USERNAME)$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
#: literal default credentials that must not appear anywhere in the compose files
FORBIDDEN = [
    (re.compile(r"minioadmin", re.IGNORECASE), "MinIO's default credentials"),
    (re.compile(r"admin:admin", re.IGNORECASE), "admin:admin"),
    (re.compile(r"airflow:airflow@", re.IGNORECASE), "Airflow's example DB password"),
    (re.compile(r"dev-root-token|VAULT_DEV_ROOT_TOKEN_ID", re.IGNORECASE), "a Vault dev-mode root token"),
    (
        re.compile(r"""(VAULT_TOKEN|token)["']?\s*[:=]\s*["']?root\b""", re.IGNORECASE),
        "the literal root token",
    ),
    (
        re.compile(r"""password["']?\s*[:=]\s*["']?(password|secret|changeme|admin)\b""", re.IGNORECASE),
        "a placeholder password",
    ),
]


def dummy_value(name: str) -> str:
    """A value of the right shape for each variable of env.example."""
    return {
        "AIRFLOW_UID": "50000",
        "DOCKER_GID": "999",
        "LEPTON_TRAINER_IMAGE": "lepton-trainer:0123456789ab",
        "LEPTON_VAULT_TOKEN": "0123456789abcdef" * 4,
        "AIRFLOW_FERNET_KEY": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=",
    }.get(name, f"dummy-{name.lower().replace('_', '-')}-0123456789")


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def dummy_env() -> dict[str, str]:
    return {k: (v or dummy_value(k)) for k, v in env_example().items()}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution: ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``${V?e}``, ``$$``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        return value or ""

    placeholder = "\0DOLLAR\0"
    return VAR_RE.sub(sub, text.replace("$$", placeholder)).replace(placeholder, "$")


def resolve(node: Any, env: dict[str, str]) -> Any:
    """Interpolate every string of the parsed file, as compose does (after parsing: comments don't count)."""
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The parsed file, variables not substituted."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The file as compose sees it with a complete .env (dummy values)."""
    return resolve(raw, dummy_env())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def test_services_and_format(raw, compose, services):
    assert set(services) == EXPECTED_SERVICES
    # compose-spec format: no top-level `version:` (obsolete in compose v2; docker-compose 1.29 accepts that)
    assert "version" not in raw
    assert all(not k.startswith("x-") or isinstance(v, dict) for k, v in compose.items())


def test_published_ports_bind_loopback_only(raw, services):
    unresolved = raw["services"]
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", f"{name} uses host networking"
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port} is not bound to 127.0.0.1"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: port {port!r} is not bound to 127.0.0.1"
        for port in unresolved[name].get("ports", []):  # also before interpolation: no variable host address
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r}"
    published = {n for n, s in services.items() if s.get("ports")}
    assert published == {"minio", "vault", "airflow-apiserver"}


def _assert_pinned(image: str, where: str) -> None:
    _, sep, tag = image.rpartition(":")
    assert sep and "/" not in tag and tag, f"{where}: image {image!r} has no tag"
    assert tag != "latest", f"{where}: image {image!r} uses :latest"
    assert "$" not in image, f"{where}: image {image!r} is not a literal"


def test_every_image_is_pinned(raw, services):
    unresolved = raw["services"]
    for name, svc in services.items():
        assert "image" in svc, f"{name} has no image"
        _assert_pinned(unresolved[name]["image"], name)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert services["vault"]["image"].startswith("hashicorp/vault:1.18")
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", services["minio"]["image"])


def test_derived_airflow_image_is_pinned_and_matches_requirements():
    dockerfile = (COMPOSE_DIR / "airflow.Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    froms = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f)
        for f in re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    ]
    assert froms == ["apache/airflow:3.3.2-python3.11"]
    for image in froms:
        _assert_pinned(image, "airflow.Dockerfile")
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in "".join(
        line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")
    )

    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                out[re.sub(r"[-_.]+", "-", name).lower()] = version
        return out

    wanted, locked = pins(COMPOSE_DIR / "requirements-airflow.txt"), pins(REPO / "requirements.txt")
    assert wanted, "requirements-airflow.txt is empty"
    for name, version in wanted.items():
        assert version, f"{name} is not pinned in requirements-airflow.txt"
        assert locked.get(name) == version, f"{name}=={version} but requirements.txt pins {locked.get(name)}"


def test_no_default_credentials_anywhere():
    files = [COMPOSE_FILE, *sorted(p for p in COMPOSE_DIR.iterdir() if p.is_file())]
    for path in files:
        text = path.read_text()
        for pattern, what in FORBIDDEN:
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(REPO)} contains {what}: {m.group(0)!r}"
    env = env_example()
    for name in REQUIRED:
        assert name in env, f"env.example does not list {name}"
        assert env[name] == "", f"env.example ships a value for {name}: leave required secrets empty"


def test_required_variables_use_required_syntax(raw):
    # `$${X}` is an escaped dollar (the container's shell expands it), not a compose variable
    refs = [ref for text in strings(raw) for ref in VAR_RE.findall(text.replace("$$", ""))]
    names = {name for name, _, _ in refs}
    assert names >= REQUIRED, f"not referenced: {REQUIRED - names}"
    for name, op, arg in refs:
        if name in REQUIRED or SECRET_NAME.search(name):
            assert op == ":?" and arg.strip(), (
                f"${{{name}}} must be written ${{{name}:?message}}, not {op or 'bare'}"
            )
    documented = set(env_example())
    assert names <= documented, f"variables missing from docker/compose/env.example: {names - documented}"
    # and compose really refuses: interpolation without them fails, naming the variable
    with pytest.raises(KeyError, match=r"set [A-Z_]+ in \.env"):
        resolve(raw, {})
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in COMPOSE_FILE.read_text()


def test_long_running_services_have_healthchecks(services):
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", f"one-shot {name} must not restart"
            continue
        assert svc.get("restart") in ("unless-stopped", "always"), (
            f"{name} has restart={svc.get('restart')!r}"
        )
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert "interval" in check and "retries" in check, f"{name}: health check without interval/retries"


def test_vault_runs_server_mode_with_persistent_storage(services):
    vault = services["vault"]
    command = vault.get("command")
    command = command if isinstance(command, list) else str(command).split()
    assert command == ["server"]
    assert not any(k.startswith("VAULT_DEV") for k in (vault.get("environment") or {}))
    assert any(v.startswith("./docker/compose/vault.hcl:/vault/config/") for v in vault["volumes"])
    assert any(v.startswith("vault-data:") for v in vault["volumes"])
    hcl = (COMPOSE_DIR / "vault.hcl").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in hcl.splitlines())
    assert re.search(r'storage\s+"(raft|file)"', code)
    assert "inmem" not in code and "-dev" not in code
    init = services["vault-init"]
    assert init["profiles"] == ["setup"], "vault-init is run by hand (docker-compose run --rm vault-init)"
    assert any(v.endswith(":/secrets") for v in init["volumes"])


def test_airflow_services_share_code_connections_and_mode(services, compose):
    for name in AIRFLOW_SERVICES:
        svc = services[name]
        env = svc["environment"]
        assert svc["image"] == "lepton-airflow:3.3.2-python3.11"
        assert env["LEPTON_MODE"] == "compose"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert "/opt/lepton" in env["PYTHONPATH"].split(":")
        mounts = {v.split(":")[0]: v.split(":")[1] for v in svc["volumes"]}
        assert mounts["./dags"] == "/opt/airflow/dags"
        assert mounts["./plugins"] == "/opt/airflow/plugins"
        assert mounts["./lepton_tasks"] == "/opt/lepton/lepton_tasks"
        assert "lepton" in svc["networks"]
        s3 = json.loads(env["AIRFLOW_CONN_LEPTON_S3"])
        assert s3["conn_type"] == "aws" and s3["login"] == dummy_value("LEPTON_S3_ACCESS_KEY")
        assert s3["password"] == dummy_value("LEPTON_S3_SECRET_KEY")
        assert s3["extra"]["endpoint_url"] == "http://minio:9000"
        vault = json.loads(env["AIRFLOW_CONN_LEPTON_VAULT"])
        assert vault["conn_type"] == "vault" and vault["password"] == dummy_value("LEPTON_VAULT_TOKEN")
        assert vault["extra"]["url"] == "http://vault:8200"
        # the role (and with it the Docker socket and the trainer settings) comes from a role file only
        assert "LEPTON_ROLE" not in env and "DOCKER_HOST" not in env
        assert not any(k.startswith("LEPTON_TRAINER_") for k in env)
    assert not any("docker.sock" in v for s in services.values() for v in s.get("volumes", []))
    assert services["airflow-init"]["build"]["dockerfile"] == "airflow.Dockerfile"
    # the MinIO root credentials never reach Airflow
    for name in AIRFLOW_SERVICES:
        assert not any("MINIO_ROOT" in k for k in services[name]["environment"])


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def _run_config(
    cmd: list[str], env_file: Path, role: str | None = None, *, quiet: bool = True
) -> subprocess.CompletedProcess[str]:
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    files = ["-f", str(COMPOSE_FILE)] + (["-f", str(ROLE_FILES[role])] if role else [])
    return subprocess.run(
        [
            *cmd,
            "--project-directory",
            str(REPO),
            *files,
            "--env-file",
            str(env_file),
            "config",
            *(["-q"] if quiet else []),
        ],
        cwd=REPO,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_config_validates_and_refuses_missing_secrets(tmp_path):
    cmd = _compose_command()
    if cmd is None:
        if IN_CI:
            pytest.fail(
                "CI=true but neither docker-compose nor `docker compose` is installed "
                "(apt-get install -y docker-compose)"
            )
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in dummy_env().items()))
    ok = _run_config(cmd, env_file)
    assert ok.returncode == 0, f"{' '.join(cmd)} config failed:\n{ok.stdout}\n{ok.stderr}"

    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = _run_config(cmd, empty)
    assert refused.returncode != 0, "compose accepted the file without any secret set"
    assert re.search(r"set [A-Z_]+ in \.env", refused.stdout + refused.stderr), refused.stderr


def _need_compose() -> list[str]:
    cmd = _compose_command()
    if cmd is None:
        if IN_CI:
            pytest.fail("CI=true but docker-compose is not installed (apt-get install -y docker-compose)")
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    return cmd


def merged(role: str, env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """docker-compose.yml + the role file as Docker Compose itself merges them (``config`` output)."""
    env_file = tmp_path / f"{role}.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    out = _run_config(_need_compose(), env_file, role, quiet=False)
    assert out.returncode == 0, f"compose config ({role}) failed:\n{out.stdout}\n{out.stderr}"
    return yaml.safe_load(out.stdout)


def test_site_role_gives_the_docker_socket_to_the_worker_only_and_an_internal_trainer_network(tmp_path):
    cfg = merged("site", dummy_env(), tmp_path)
    services = cfg["services"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["LEPTON_ROLE"] == "site"
        assert env["LEPTON_TRAINER_IMAGE"] == dummy_value("LEPTON_TRAINER_IMAGE")
    socket_users = {
        n for n, s in services.items() if any("docker.sock" in str(v) for v in s.get("volumes", []))
    }
    assert socket_users == {"airflow-worker"}
    assert [str(g) for g in services["airflow-worker"]["group_add"]] == [dummy_value("DOCKER_GID")]
    # the worker keeps its base mounts (compose merges volume lists by target)
    targets = {
        str(v).split(":")[1] if isinstance(v, str) else v["target"]
        for v in services["airflow-worker"]["volumes"]
    }
    assert {"/opt/airflow/dags", "/opt/lepton/lepton_tasks", "/var/run/docker.sock"} <= targets
    trainer_net = services["airflow-worker"]["environment"]["LEPTON_TRAINER_NETWORK"]
    (key,) = [k for k, n in cfg["networks"].items() if n.get("name") == trainer_net]
    assert cfg["networks"][key].get("internal") is True, "trainer containers must have no route out"
    # trainers reach exactly MinIO and Vault on it
    assert {n for n, s in services.items() if key in (s.get("networks") or {})} == {"minio", "vault"}


def test_coordinator_role_has_no_docker_socket_no_trainer_and_a_signing_only_vault(tmp_path):
    env = {k: v for k, v in dummy_env().items() if k not in SITE_REQUIRED}
    cfg = merged("coordinator", env, tmp_path)
    services = cfg["services"]
    for name in AIRFLOW_SERVICES:
        env_ = services[name]["environment"]
        assert env_["LEPTON_ROLE"] == "coordinator"
        assert not any(k.startswith("LEPTON_TRAINER_") for k in env_) and "DOCKER_HOST" not in env_
    assert not any("docker.sock" in str(v) for s in services.values() for v in s.get("volumes", []))
    assert not any("group_add" in s for s in services.values())
    assert services["vault-init"]["environment"]["LEPTON_ROLE"] == "coordinator"
    assert services["minio-init"]["environment"]["LEPTON_SHARED_BUCKETS"] == "models"


def test_site_role_refuses_to_start_without_its_trainer_settings(tmp_path):
    cmd = _need_compose()
    env_file = tmp_path / "site.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in dummy_env().items() if k not in SITE_REQUIRED))
    refused = _run_config(cmd, env_file, "site")
    assert refused.returncode != 0, "the site role accepted a missing LEPTON_TRAINER_IMAGE / DOCKER_GID"
    assert re.search(r"set (LEPTON_TRAINER_IMAGE|DOCKER_GID) in \.env", refused.stdout + refused.stderr)
