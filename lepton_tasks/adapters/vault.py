"""hvac adapter: per-partner transit keys, least-privilege policies and short-lived scoped tokens.

Roles:
- the *root* token (embedded: ``<data_dir>/openbao/root-token``) is used only by ``lepton up`` and partner
  onboarding, run by a human operator;
- the *operator* token (policy ``lepton-operator``) is what Airflow uses: encrypt with any partner key, sign
  manifests, and mint trainer tokens through the ``lepton-trainer`` token role — which can only grant
  ``lepton-partner-*`` policies;
- a *trainer* token carries exactly one partner policy (decrypt + verify with that partner's key only), is
  non-renewable and expires with the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hvac
import hvac.exceptions

OPERATOR_POLICY = "lepton-operator"
TRAINER_ROLE = "lepton-trainer"


class VaultError(RuntimeError):
    """A Vault operation failed; the message says which and why (never a token)."""


def partner_policy_name(partner: str) -> str:
    return f"lepton-partner-{partner}"


def partner_policy(transit_mount: str, key_name: str) -> str:
    """HCL of a partner's policy: decrypt data keys and verify manifests with its own key, nothing else."""
    return f"""
# Lepton partner policy for key {key_name}: decrypt its data keys and verify its manifests. Nothing else.
path "{transit_mount}/decrypt/{key_name}" {{ capabilities = ["update"] }}
path "{transit_mount}/verify/{key_name}" {{ capabilities = ["update"] }}
path "{transit_mount}/verify/{key_name}/*" {{ capabilities = ["update"] }}
"""


def operator_policy(transit_mount: str, key_prefix: str) -> str:
    """HCL of the Airflow operator's policy (no sys/ access, no policy writes, no root)."""
    return f"""
path "{transit_mount}/encrypt/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/decrypt/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/rewrap/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/hmac/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/verify/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/keys/{key_prefix}*" {{ capabilities = ["read"] }}
path "auth/token/create/{TRAINER_ROLE}" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
"""


@dataclass
class Vault:
    """Typed operations over an authenticated :class:`hvac.Client`."""

    client: hvac.Client
    transit_mount: str = "transit"

    @classmethod
    def connect(cls, addr: str, token: str, transit_mount: str = "transit") -> Vault:
        return cls(hvac.Client(url=addr, token=token, timeout=30), transit_mount)

    # keys ------------------------------------------------------------------------------------------------
    def key_exists(self, name: str) -> bool:
        try:
            self.client.secrets.transit.read_key(name=name, mount_point=self.transit_mount)
        except hvac.exceptions.InvalidPath:
            return False
        return True

    def ensure_key(self, name: str) -> bool:
        """Create an ``aes256-gcm96`` transit key if missing; return True when created."""
        if self.key_exists(name):
            return False
        self.client.secrets.transit.create_key(
            name=name, key_type="aes256-gcm96", mount_point=self.transit_mount
        )
        return True

    def key_info(self, name: str) -> dict[str, Any]:
        res = self.client.secrets.transit.read_key(name=name, mount_point=self.transit_mount)
        info: dict[str, Any] = res["data"]
        return info

    def rotate_key(self, name: str) -> int:
        """Rotate ``name``; return the new latest version."""
        self.client.secrets.transit.rotate_key(name=name, mount_point=self.transit_mount)
        return int(self.key_info(name)["latest_version"])

    def set_min_decryption_version(self, name: str, version: int) -> None:
        self.client.secrets.transit.update_key_configuration(
            name=name, min_decryption_version=version, mount_point=self.transit_mount
        )

    def delete_key(self, name: str) -> None:
        if not self.key_exists(name):
            return
        self.client.secrets.transit.update_key_configuration(
            name=name, deletion_allowed=True, mount_point=self.transit_mount
        )
        self.client.secrets.transit.delete_key(name=name, mount_point=self.transit_mount)

    # manifests: HMAC with the partner's key --------------------------------------------------------------
    def sign(self, key_name: str, data: bytes) -> str:
        import base64

        res = self.client.secrets.transit.generate_hmac(
            name=key_name,
            hash_input=base64.b64encode(data).decode(),
            algorithm="sha2-256",
            mount_point=self.transit_mount,
        )
        hmac: str = res["data"]["hmac"]
        return hmac

    def verify(self, key_name: str, data: bytes, hmac: str) -> bool:
        import base64

        res = self.client.secrets.transit.verify_signed_data(
            name=key_name,
            hash_input=base64.b64encode(data).decode(),
            hmac=hmac,
            hash_algorithm="sha2-256",
            mount_point=self.transit_mount,
        )
        return bool(res["data"]["valid"])

    # policies and tokens ---------------------------------------------------------------------------------
    def write_policy(self, name: str, hcl: str) -> None:
        self.client.sys.create_or_update_acl_policy(name=name, policy=hcl)

    def delete_policy(self, name: str) -> None:
        self.client.sys.delete_acl_policy(name=name)

    def policy_exists(self, name: str) -> bool:
        try:
            self.client.sys.read_acl_policy(name=name)
        except hvac.exceptions.InvalidPath:
            return False
        return True

    def setup_operator(self, key_prefix: str) -> str:
        """(root) Write the operator policy and trainer token role; return a new periodic operator token."""
        self.write_policy(OPERATOR_POLICY, operator_policy(self.transit_mount, key_prefix))
        # hvac's create_or_update_role has no allowed_policies_glob: write the role through the raw API
        self.client.adapter.post(
            f"/v1/auth/token/roles/{TRAINER_ROLE}",
            json={
                "allowed_policies_glob": ["lepton-partner-*"],
                "orphan": True,
                "renewable": False,
                "token_explicit_max_ttl": "24h",
                "token_no_default_policy": True,
            },
        )
        res = self.client.auth.token.create(
            policies=[OPERATOR_POLICY],
            no_parent=True,
            period="768h",
            display_name="lepton-operator",
            no_default_policy=True,
        )
        token: str = res["auth"]["client_token"]
        return token

    def _create_trainer_token(self, partner: str, ttl: str, wrap_ttl: str | None = None) -> dict[str, Any]:
        """The token-create response for a trainer token scoped to ``partner`` (wrapped when ``wrap_ttl``)."""
        res: dict[str, Any] = self.client.auth.token.create(
            role_name=TRAINER_ROLE,
            policies=[partner_policy_name(partner)],
            ttl=ttl,
            explicit_max_ttl=ttl,
            renewable=False,
            display_name=f"trainer-{partner}",
            no_default_policy=True,
            wrap_ttl=wrap_ttl,
        )
        return res

    def trainer_token(self, partner: str, ttl: str = "1h") -> str:
        """(operator) A non-renewable token that can only decrypt/verify with ``partner``'s key."""
        token: str = self._create_trainer_token(partner, ttl)["auth"]["client_token"]
        return token

    def trainer_token_wrapped(self, partner: str, ttl: str = "1h", wrap_ttl: str = "5m") -> str:
        """(operator) Like :meth:`trainer_token`, but response-wrapped: a single-use *wrapping* token
        valid for ``wrap_ttl``. Only :func:`unwrap_token` (once) turns it into the trainer token, so a
        wrapping token read later from ``docker inspect`` is useless, and one used by someone else first
        makes the trainer's own unwrap fail loudly."""
        res = self._create_trainer_token(partner, ttl, wrap_ttl=wrap_ttl)
        wrap = (res or {}).get("wrap_info") or {}
        if not wrap.get("token"):
            raise VaultError(
                f"Vault did not wrap the trainer token for {partner} (no wrap_info in its answer)"
            )
        return str(wrap["token"])

    def lookup_self(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.auth.token.lookup_self()["data"]
        return data


# response wrapping --------------------------------------------------------------------------------
#: where a trainer's wrapped token must come from (checked before unwrapping: a substituted token is refused)
TRAINER_CREATION_PATH = f"auth/token/create/{TRAINER_ROLE}"


def lookup_wrapping(addr: str, wrapping_token: str, *, timeout: int = 30) -> dict[str, Any]:
    """``sys/wrapping/lookup`` of a wrapping token (creation path, ttl) without consuming it."""
    client = hvac.Client(url=addr, timeout=timeout)
    try:  # hvac has no call for it; the endpoint needs no token beyond the wrapping token itself
        res = client.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token})
        data: dict[str, Any] = res["data"]
        return data
    except hvac.exceptions.VaultError as exc:
        raise VaultError(
            "the Vault wrapping token is not valid (already used, expired or never issued): "
            f"{type(exc).__name__}"
        ) from exc


def unwrap(addr: str, wrapping_token: str, *, timeout: int = 30) -> dict[str, Any]:
    """Unwrap a response-wrapping token, once: ``sys/wrapping/unwrap`` authenticated by the wrapping token
    itself (no other credential needed). Returns the wrapped response (for a token: ``{"auth": {...}}``).

    Raises :class:`VaultError` when the token was already used, has expired or never existed — for a trainer
    that means its job may have been intercepted: treat it as a security failure.
    """
    client = hvac.Client(url=addr, token=wrapping_token, timeout=timeout)
    try:
        res = client.sys.unwrap()
    except hvac.exceptions.VaultError as exc:
        raise VaultError(
            "cannot unwrap the Vault wrapping token (already used, expired or never issued — "
            f"possibly intercepted): {type(exc).__name__}"
        ) from exc
    if not isinstance(res, dict):
        raise VaultError("Vault's unwrap answer is empty")
    return res


def unwrap_token(
    addr: str,
    wrapping_token: str,
    *,
    expected_creation_path: str | None = TRAINER_CREATION_PATH,
    timeout: int = 30,
) -> str:
    """The client token inside a wrapping token (see :meth:`Vault.trainer_token_wrapped`), unwrapped once.

    When ``expected_creation_path`` is set (default: the trainer token role), the wrapping token's creation
    path is checked first, so a token wrapped elsewhere (a substitute) is refused. Raises :class:`VaultError`.
    """
    if expected_creation_path is not None:
        path = str(lookup_wrapping(addr, wrapping_token, timeout=timeout).get("creation_path", ""))
        if path != expected_creation_path:
            raise VaultError(
                f"the wrapping token was created at {path!r}, not {expected_creation_path!r}: refused"
            )
    auth = unwrap(addr, wrapping_token, timeout=timeout).get("auth") or {}
    token = auth.get("client_token")
    if not token:
        raise VaultError("the wrapping token does not wrap a Vault token")
    return str(token)
