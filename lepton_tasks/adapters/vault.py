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

    def key_info(self, name: str) -> dict:
        return self.client.secrets.transit.read_key(name=name, mount_point=self.transit_mount)["data"]

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
        return res["data"]["hmac"]

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
        return res["auth"]["client_token"]

    def trainer_token(self, partner: str, ttl: str = "1h") -> str:
        """(operator) A non-renewable token that can only decrypt/verify with ``partner``'s key."""
        res = self.client.auth.token.create(
            role_name=TRAINER_ROLE,
            policies=[partner_policy_name(partner)],
            ttl=ttl,
            explicit_max_ttl=ttl,
            renewable=False,
            display_name=f"trainer-{partner}",
            no_default_policy=True,
        )
        return res["auth"]["client_token"]

    def lookup_self(self) -> dict:
        return self.client.auth.token.lookup_self()["data"]
