"""hvac adapter: per-partner transit keys, least-privilege policies and short-lived scoped tokens.

Roles:
- the *root* token (embedded: ``<data_dir>/openbao/root-token``) is used only by ``lepton up`` and partner
  onboarding, run by a human operator;
- the *operator* token (policy ``lepton-operator``) is what Airflow uses: encrypt with any partner key, sign
  manifests, mint trainer tokens through the ``lepton-trainer`` token role — which can only grant
  ``lepton-partner-*`` policies — and response-wrap a trainer's whole job (``sys/wrapping/wrap``);
- a *trainer* token carries exactly one partner policy (decrypt + verify with that partner's key only), is
  non-renewable and expires with the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hvac
import hvac.adapters
import hvac.exceptions
import requests

from lepton_tasks.adapters.health import ServiceHealth, connection_problem

OPERATOR_POLICY = "lepton-operator"
TRAINER_ROLE = "lepton-trainer"


class VaultError(RuntimeError):
    """A Vault operation failed; the message says which and why (never a token)."""


class VaultUnavailable(VaultError):
    """Vault did not answer or answered 5xx (down, sealed, restarting): transient; retry later."""


#: hvac's exceptions for a Vault that is down, sealed or failing (HTTP 5xx): transient, unlike 4xx
_HVAC_TRANSIENT = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
)


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


#: the names of a site's signing keys in its own Vault (``site-sign-<site>``); the operator token may sign
#: with them, so the site's Airflow can sign its answers (a site's Vault holds no other site's key)
SITE_SIGNING_KEY_PREFIX = "site-sign-"


def operator_policy(transit_mount: str, key_prefix: str) -> str:
    """HCL of the Airflow operator's policy (no sys/ access but wrapping data, no policy writes, no root)."""
    return f"""
path "{transit_mount}/encrypt/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/decrypt/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/rewrap/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/hmac/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/verify/{key_prefix}*" {{ capabilities = ["update"] }}
path "{transit_mount}/keys/{key_prefix}*" {{ capabilities = ["read"] }}
path "auth/token/create/{TRAINER_ROLE}" {{ capabilities = ["update"] }}
# at a site, Airflow signs the site's answers with the site's own key (site.enrollment.default_key_name)
path "{transit_mount}/sign/{SITE_SIGNING_KEY_PREFIX}*" {{ capabilities = ["update"] }}
path "{transit_mount}/keys/{SITE_SIGNING_KEY_PREFIX}*" {{ capabilities = ["read"] }}
# response-wrap a trainer's whole job (presigned URLs + wrapped token): docker inspect shows a spent token
path "sys/wrapping/wrap" {{ capabilities = ["update"] }}
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

    def write_operator_policy(self, key_prefix: str) -> None:
        """(root) Write (or update) the operator policy: every ``lepton up`` and compose's vault-init run it,
        so a stack made by an older Lepton gets the capabilities this one needs."""
        self.write_policy(OPERATOR_POLICY, operator_policy(self.transit_mount, key_prefix))

    def setup_operator(self, key_prefix: str) -> str:
        """(root) Write the operator policy and trainer token role; return a new periodic operator token."""
        self.write_operator_policy(key_prefix)
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

    def wrap(self, data: dict[str, Any], ttl: int) -> str:
        """(operator) Response-wrap ``data`` (``sys/wrapping/wrap``): a single-use wrapping token valid
        for ``ttl`` seconds that :func:`unwrap_data` (once) turns back into ``data``. The wrapping
        token's creation path is :data:`WRAP_CREATION_PATH`."""
        try:
            res = self.client.sys.wrap(payload=data, ttl=ttl)
        except _HVAC_TRANSIENT as exc:
            raise VaultUnavailable(
                f"Vault at {self.client.url} could not wrap: {type(exc).__name__}"
            ) from exc
        except hvac.exceptions.Forbidden as exc:
            raise VaultError(
                f"the operator token may not use {WRAP_CREATION_PATH} (its {OPERATOR_POLICY} policy "
                "predates job wrapping): run `lepton up` (embedded) or `docker-compose run --rm vault-init` "
                "to update it"
            ) from exc
        token = ((res or {}).get("wrap_info") or {}).get("token")
        if not token:
            raise VaultError("Vault did not wrap the data (no wrap_info in its answer)")
        return str(token)

    def lookup_self(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.auth.token.lookup_self()["data"]
        return data


# response wrapping --------------------------------------------------------------------------------
#: where a trainer's wrapped token must come from (checked before unwrapping: a substituted token is refused)
TRAINER_CREATION_PATH = f"auth/token/create/{TRAINER_ROLE}"
#: where a wrapped trainer job must come from (:meth:`Vault.wrap`)
WRAP_CREATION_PATH = "sys/wrapping/wrap"


def _unavailable(addr: str, what: str, exc: BaseException, timeout: int) -> VaultUnavailable:
    if isinstance(exc, requests.RequestException):
        return VaultUnavailable(
            f"Vault at {addr} {connection_problem(exc, timeout)} (while trying to {what})"
        )
    return VaultUnavailable(f"Vault at {addr} failed to {what}: {type(exc).__name__} (down or sealed?)")


def lookup_wrapping(addr: str, wrapping_token: str, *, timeout: int = 30) -> dict[str, Any]:
    """``sys/wrapping/lookup`` of a wrapping token (creation path, ttl) without consuming it."""
    client = hvac.Client(url=addr, timeout=timeout)
    try:  # hvac has no call for it; the endpoint needs no token beyond the wrapping token itself
        res = client.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token})
        data: dict[str, Any] = res["data"]
        return data
    except (requests.RequestException, *_HVAC_TRANSIENT) as exc:
        raise _unavailable(addr, "look up a wrapping token", exc, timeout) from exc
    except hvac.exceptions.VaultError as exc:
        raise VaultError(
            "the Vault wrapping token is not valid (already used, expired or never issued): "
            f"{type(exc).__name__}"
        ) from exc


def unwrap(addr: str, wrapping_token: str, *, timeout: int = 30) -> dict[str, Any]:
    """Unwrap a response-wrapping token, once: ``sys/wrapping/unwrap`` authenticated by the wrapping token
    itself (no other credential needed). Returns the wrapped response (for a token: ``{"auth": {...}}``).

    Raises :class:`VaultError` when the token was already used, has expired or never existed — for a trainer
    that means its job may have been intercepted: treat it as a security failure — and
    :class:`VaultUnavailable` when Vault did not answer (transient).
    """
    client = hvac.Client(url=addr, token=wrapping_token, timeout=timeout)
    try:
        res = client.sys.unwrap()
    except (requests.RequestException, *_HVAC_TRANSIENT) as exc:
        raise _unavailable(addr, "unwrap", exc, timeout) from exc
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
        _check_creation_path(addr, wrapping_token, expected_creation_path, timeout)
    auth = unwrap(addr, wrapping_token, timeout=timeout).get("auth") or {}
    token = auth.get("client_token")
    if not token:
        raise VaultError("the wrapping token does not wrap a Vault token")
    return str(token)


def _check_creation_path(addr: str, wrapping_token: str, expected: str, timeout: int) -> None:
    path = str(lookup_wrapping(addr, wrapping_token, timeout=timeout).get("creation_path", ""))
    if path != expected:
        raise VaultError(f"the wrapping token was created at {path!r}, not {expected!r}: refused")


def unwrap_data(
    addr: str,
    wrapping_token: str,
    *,
    expected_creation_path: str = WRAP_CREATION_PATH,
    timeout: int = 30,
) -> dict[str, Any]:
    """The data inside a wrapping token made by :meth:`Vault.wrap`, unwrapped once.

    The wrapping token's creation path is checked first (a token wrapped elsewhere, e.g. a trainer token
    passed off as a job, is refused without being spent). Raises :class:`VaultError` (used, expired, never
    issued, substituted: a security failure for a trainer) or :class:`VaultUnavailable` (transient).
    """
    _check_creation_path(addr, wrapping_token, expected_creation_path, timeout)
    data = unwrap(addr, wrapping_token, timeout=timeout).get("data")
    if not isinstance(data, dict):
        raise VaultError("the wrapping token does not wrap data")
    return data


def spend_if_unused(addr: str, wrapping_token: str, *, timeout: int = 10) -> bool:
    """Unwrap (and discard) ``wrapping_token`` if nobody did: True when it was still valid.

    The operator calls it once a trainer ended, so a job whose trainer never started (or crashed before
    unwrapping) does not stay unwrappable until the wrapping TTL ends.
    """
    try:
        lookup_wrapping(addr, wrapping_token, timeout=timeout)
    except VaultUnavailable:
        raise
    except VaultError:
        return False  # already used or expired: the normal case once the trainer started
    unwrap(addr, wrapping_token, timeout=timeout)
    return True


def vault_health(addr: str, *, timeout: int = 5) -> ServiceHealth:
    """Probe ``sys/health`` (unauthenticated): ok when Vault answers as an active or standby node.

    Not ok when it does not answer (refused, timeout), is sealed (503), not initialized (501) or answers
    anything else; the answer's ``message`` names the address and the problem.
    """
    client = hvac.Client(url=addr, timeout=timeout, adapter=hvac.adapters.RawAdapter)  # every status
    try:
        res = client.sys.read_health_status(method="GET")
    except requests.RequestException as exc:
        return ServiceHealth("Vault", addr, False, connection_problem(exc, timeout))
    status = int(getattr(res, "status_code", 0) or 0)
    if status in (200, 429, 472, 473):  # active, standby, DR secondary, performance standby
        return ServiceHealth("Vault", addr, True)
    problem = {
        503: "is sealed (HTTP 503): unseal it",
        501: "is not initialized (HTTP 501)",
    }.get(status, f"answered its health check with HTTP {status}")
    return ServiceHealth("Vault", addr, False, problem)
