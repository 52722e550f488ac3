"""One-shot HashiCorp Vault setup for Lepton's compose mode (the ``vault-init`` service).

    docker-compose run --rm vault-init

Idempotent; safe to re-run. In order:

1. waits until the ``vault`` server answers;
2. first run only: ``sys/init`` with Shamir unseal keys (``VAULT_KEY_SHARES``/``VAULT_KEY_THRESHOLD``, default
   5/3); the unseal keys and the initial root token are written ONCE, mode 0600, to ``VAULT_INIT_FILE``
   (default ``/secrets/vault-init.json`` = ``.lepton/compose/vault-init.json`` on the host) and never printed;
   the server is then unsealed with them. Move the unseal keys off this machine afterwards;
3. a sealed server (any later restart) is NOT unsealed from that file: the script stops and says how to unseal
   by hand (``docker-compose exec vault vault operator unseal``), then re-run it;
4. with the root token (from ``VAULT_INIT_FILE``, else asked for on the terminal): enables the transit engine
   and AppRole, a file audit device (``/vault/logs/audit.log`` on the server), writes Lepton's operator
   policy and trainer token role (``lepton_tasks.adapters.vault.Vault.setup_operator``: the same code as the
   embedded stack), and installs the operator token whose id is ``LEPTON_VAULT_TOKEN`` from ``.env`` (so
   Airflow's ``AIRFLOW_CONN_LEPTON_VAULT`` and Vault agree without copying tokens around). A re-run renews
   it. With ``LEPTON_ROLE=coordinator`` (docker/compose/coordinator.yml) it writes no operator policy and no
   trainer role: it creates the coordinator's Ed25519 signing key (``LEPTON_COORDINATOR_KEY_NAME``) and
   installs ``LEPTON_VAULT_TOKEN`` with a policy that can sign with that key and read its public half, nothing
   else.

It runs in the lepton-airflow image with ``lepton_tasks`` mounted (hvac, pydantic-settings). It prints no
secret.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
import time
from pathlib import Path

import hvac
import hvac.exceptions
import requests

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.signing import COORDINATOR_SIGNER_POLICY, TransitSigner, setup_coordinator_signer
from lepton_tasks.adapters.vault import OPERATOR_POLICY, Vault

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
OPERATOR_PERIOD = "768h"


class InitError(RuntimeError):
    """A step failed; the message says which and what to do."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def wait_for_server(client: hvac.Client, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            client.sys.is_initialized()
            return
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            last = str(exc)
            time.sleep(1.0)
    raise InitError(f"Vault at {client.url} did not answer within {timeout:.0f}s (last error: {last})")


def write_secret_file(path: Path, data: dict) -> None:
    """Create ``path`` mode 0600; refuse to overwrite an existing one (it may hold the only copy of keys)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise InitError(
            f"{path} already exists but Vault is not initialized: the vault-data volume was probably "
            f"recreated. "
            f"Move the old file away (it belongs to the old Vault) and re-run."
        ) from exc
    except PermissionError as exc:
        raise InitError(
            f"cannot write {path} (uid {os.getuid()}): create the host directory first, owned by "
            f"AIRFLOW_UID, "
            f"e.g. `mkdir -p .lepton/compose && chmod 700 .lepton/compose`"
        ) from exc
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(path, 0o600)


def initialize(client: hvac.Client, out: Path, shares: int, threshold: int) -> str:
    """``sys/init`` + first unseal; return the root token (kept in memory and in ``out``)."""
    if not 1 <= threshold <= shares:
        raise InitError(f"need 1 <= VAULT_KEY_THRESHOLD ({threshold}) <= VAULT_KEY_SHARES ({shares})")
    res = client.sys.initialize(secret_shares=shares, secret_threshold=threshold)
    write_secret_file(
        out,
        {
            "note": "Lepton compose Vault: unseal keys + initial root token. Move the keys off this machine.",
            "unseal_keys_b64": res["keys_base64"],
            "unseal_threshold": threshold,
            "root_token": res["root_token"],
        },
    )
    print(
        f"vault-init: initialized ({shares} unseal keys, threshold {threshold}); keys and root token written "
        f"to {out} (0600)"
    )
    client.sys.submit_unseal_keys(res["keys_base64"][:threshold])
    if client.sys.is_sealed():
        raise InitError("Vault is still sealed after submitting the unseal keys")
    print("vault-init: unsealed")
    return res["root_token"]


def root_token_from(out: Path) -> str:
    if out.is_file():
        return json.loads(out.read_text())["root_token"]
    if sys.stdin.isatty():
        return getpass.getpass("Vault root token (not echoed): ").strip()
    raise InitError(f"no root token: {out} is missing and there is no terminal to ask for it")


def enable_engines(root: hvac.Client, *, transit_mount: str, audit: bool) -> None:
    """The transit engine, AppRole and (unless ``audit`` is false) a file audit device."""
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    if f"{transit_mount}/" not in mounts:
        root.sys.enable_secrets_engine("transit", path=transit_mount)
        print(f"vault-init: enabled the transit engine at {transit_mount}/")
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
        print("vault-init: enabled AppRole")
    if audit:
        devices = root.sys.list_enabled_audit_devices()["data"]
        if "file/" not in devices:
            try:
                root.sys.enable_audit_device("file", options={"file_path": "/vault/logs/audit.log"})
            except hvac.exceptions.VaultError as exc:
                raise InitError(
                    f"could not enable the file audit device: {exc} (a server that only accepts "
                    f"audit devices from its config file, like OpenBao: declare one there and set "
                    f"LEPTON_VAULT_AUDIT=0)"
                ) from exc
            print("vault-init: enabled the file audit device (/vault/logs/audit.log in the vault container)")
    else:
        print("vault-init: WARNING: audit device not managed (LEPTON_VAULT_AUDIT=0)")


def install_token(root: hvac.Client, token_id: str, policy: str) -> None:
    """Install Airflow's token with the id ``LEPTON_VAULT_TOKEN`` and exactly ``policy`` (renew it when it is
    already there; refuse a token of that id with other policies)."""
    try:
        info = root.auth.token.lookup(token_id)["data"]
    except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
        info = None
    if info is None:
        root.auth.token.create(
            id=token_id,
            policies=[policy],
            no_parent=True,
            period=OPERATOR_PERIOD,
            display_name=policy,
            no_default_policy=True,
        )
        print(
            f"vault-init: installed Airflow's token (LEPTON_VAULT_TOKEN, policy {policy}; "
            f"periodic, {OPERATOR_PERIOD})"
        )
    else:
        if sorted(info.get("policies") or []) != [policy]:
            raise InitError(
                f"a token with the id LEPTON_VAULT_TOKEN exists with policies {info.get('policies')}, "
                f"not [{policy}]: choose a new LEPTON_VAULT_TOKEN"
            )
        root.auth.token.renew(token_id)
        print(f"vault-init: Airflow's token already installed; renewed (period {OPERATOR_PERIOD})")


def configure(
    root: hvac.Client, operator_token: str, *, transit_mount: str, key_prefix: str, audit: bool
) -> None:
    """A site (or the single-stack mode): the operator policy and the trainer token role."""
    enable_engines(root, transit_mount=transit_mount, audit=audit)
    vault = Vault(root, transit_mount)
    # setup_operator writes the operator policy and the trainer token role (single source of truth, shared
    # with the embedded stack) and mints a token we do not need: revoke that one at once.
    root.auth.token.revoke(vault.setup_operator(key_prefix))
    print(f"vault-init: wrote policy {OPERATOR_POLICY} and the trainer token role")
    install_token(root, operator_token, OPERATOR_POLICY)


def configure_coordinator(
    root: hvac.Client, token: str, *, transit_mount: str, key_name: str, audit: bool
) -> None:
    """The coordinator: its Ed25519 signing key and a token that may sign with it and read its public half,
    nothing else (``adapters.signing.setup_coordinator_signer``, shared with the embedded stack)."""
    enable_engines(root, transit_mount=transit_mount, audit=audit)
    created = setup_coordinator_signer(root, key_name, transit_mount=transit_mount)
    public = TransitSigner(root, key_name, transit_mount=transit_mount).public_key()
    print(
        f"vault-init: signing key {key_name} {'created' if created else 'already there'}; policy "
        f"{COORDINATOR_SIGNER_POLICY}; public key fingerprint {public.fingerprint} (sites confirm it)"
    )
    install_token(root, token, COORDINATOR_SIGNER_POLICY)


def main() -> int:
    addr = os.environ.get("VAULT_ADDR", "http://vault:8200")
    out = Path(os.environ.get("VAULT_INIT_FILE", "/secrets/vault-init.json"))
    operator_token = os.environ.get("LEPTON_VAULT_TOKEN", "").strip()
    if not TOKEN_RE.fullmatch(operator_token):
        raise InitError(
            "LEPTON_VAULT_TOKEN must be 32-128 characters of [A-Za-z0-9_-] (no '.'), e.g. "
            "`openssl rand -hex 32`"
        )
    settings = Settings()
    client = hvac.Client(url=addr, timeout=30)
    wait_for_server(client)

    root_token = None
    if not client.sys.is_initialized():
        root_token = initialize(
            client, out, _env_int("VAULT_KEY_SHARES", 5), _env_int("VAULT_KEY_THRESHOLD", 3)
        )
    elif client.sys.is_sealed():
        print(
            "vault-init: Vault is initialized but SEALED. Unseal it by hand (threshold of the unseal keys):\n"
            "    docker-compose exec vault vault operator unseal      # repeat until 'Sealed false'\n"
            "then re-run: docker-compose run --rm vault-init",
            file=sys.stderr,
        )
        return 3
    root = hvac.Client(url=addr, token=root_token or root_token_from(out), timeout=30)
    try:
        root.auth.token.lookup_self()
    except hvac.exceptions.Forbidden as exc:
        raise InitError(
            "the root token was rejected (revoked?): generate one with `vault operator generate-root` "
            "and enter it when asked"
        ) from exc
    audit = os.environ.get("LEPTON_VAULT_AUDIT", "1") != "0"
    role = os.environ.get("LEPTON_ROLE", "site")
    if role == "coordinator":
        configure_coordinator(
            root,
            operator_token,
            transit_mount=settings.transit_mount,
            key_name=settings.coordinator_key_name,
            audit=audit,
        )
    elif role == "site":
        configure(
            root,
            operator_token,
            transit_mount=settings.transit_mount,
            key_prefix=settings.key_prefix,
            audit=audit,
        )
    else:
        raise InitError(f"LEPTON_ROLE must be 'site' or 'coordinator', not {role!r}")
    print(
        "vault-init: done. Keep the unseal keys and root token offline; revoke the root token when not "
        "onboarding (`vault token revoke`), regenerate it with `vault operator generate-root`."
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InitError as err:
        print(f"vault-init: ERROR: {err}", file=sys.stderr)
        sys.exit(1)
