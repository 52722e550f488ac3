"""Site side of enrollment: import the coordinator's bundle, create the site's own signing key, pin the
coordinator's key in the site's policy.

:func:`import_bundle` is run once by the partner's operator with an admin token of the SITE's Vault:

1. it checks the coordinator fingerprint the operator heard from the coordinator (by voice, or any channel
   other than the one the bundle came by) against the bundle's key — a replaced bundle is refused here;
2. it creates the site's non-exportable ``ed25519`` transit key in the site's Vault
   (:meth:`~lepton_tasks.adapters.signing.TransitSigner.create_key`; the name must not start with
   ``lepton-``, the operator token's key prefix) and a Vault policy that can only sign with it and read
   its public half (:func:`~lepton_tasks.adapters.signing.signer_policy`) — the token the site's Airflow
   signs answers with gets exactly that policy;
3. it writes the policy skeleton (mode 0600) with the coordinator's key pinned and safe defaults: no
   dataset granted (every job is refused until the partner lists its datasets and their contracts) and
   approval required. An existing policy is kept if it already pins the same coordinator key; one that
   pins another key is an error, never silently re-pinned.

It returns a :class:`SiteIdentity`: the site's public key and fingerprint, for the coordinator's operator to
pin (:func:`lepton_tasks.federation.enrollment.pin_site_key`) after the partner reads the fingerprint out.
The bundle's S3 credentials stay at the site (:func:`exchange_storage` builds the client from them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from lepton_tasks.adapters.signing import TransitSigner, signer_policy
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import SITE_SIGNING_KEY_PREFIX
from lepton_tasks.core.signatures import normalize_fingerprint
from lepton_tasks.core.site_policy import (
    Approval,
    DatasetGrant,
    PolicyError,
    SitePolicy,
    TrustedCoordinator,
    load_policy,
    write_policy,
)
from lepton_tasks.federation.enrollment import EnrollmentBundle, EnrollmentError

if TYPE_CHECKING:
    from lepton_tasks.adapters.vault import Vault

__all__ = [
    "DEFAULT_APPROVAL",
    "SiteFiles",
    "SiteIdentity",
    "default_key_name",
    "exchange_storage",
    "import_bundle",
    "secagg_key_name",
    "signer_policy_name",
]

DEFAULT_APPROVAL = Approval(required=True, deadline=timedelta(hours=24))
RESERVED_KEY_PREFIX = "lepton-"


@dataclass(frozen=True)
class SiteFiles:
    """Where a site keeps its own files: ``settings.site_dir`` (``<data dir>/site``, mode 0700), written by
    ``lepton site import`` (bundle, policy) and by the site's job DAG (state, outbound log); the privacy
    ledger lives beside the state. None of them ever goes to the exchange bucket."""

    root: Path

    @property
    def bundle(self) -> Path:
        """The enrollment bundle (0600: it holds the exchange credentials)."""
        return self.root / "enrollment.json"

    @property
    def policy(self) -> Path:
        return self.root / "policy.yaml"

    @property
    def state(self) -> Path:
        """:class:`~lepton_tasks.site.state.SiteState`: seen ids, rounds, handled and waiting job keys."""
        return self.root / "state.json"

    @property
    def outbound_log(self) -> Path:
        """:class:`~lepton_tasks.core.outbound_log.OutboundLog`: what the site wrote to the exchange."""
        return self.root / "outbound.jsonl"


def default_key_name(site: str) -> str:
    return f"{SITE_SIGNING_KEY_PREFIX}{site}"


def secagg_key_name(site: str, key_prefix: str = RESERVED_KEY_PREFIX) -> str:
    """The site's ``aes256-gcm96`` transit key that keeps its secure-aggregation secrets and held inputs
    encrypted at rest (``site.secagg.VaultSecretBox``): under ``key_prefix`` (``Settings.key_prefix``), so
    the site's Airflow encrypts and decrypts with it under the operator policy and cannot sign with it."""
    return f"{key_prefix}secagg-{site}"


def signer_policy_name(key_name: str) -> str:
    """The site's Vault policy that may only sign with ``key_name`` (not a ``lepton-partner-*`` name, which
    the coordinator-era trainer role may grant)."""
    return f"site-signer-{key_name}"


@dataclass(frozen=True)
class SiteIdentity:
    """The site's signing key as the coordinator must pin it, and where the site keeps its policy."""

    site: str
    consortium: str
    key_name: str
    key_version: int
    public_key: str
    fingerprint: str
    policy_path: Path
    #: the site Vault policy for the token that signs answers
    vault_policy: str

    def for_coordinator(self) -> dict[str, str | int]:
        """What the partner hands to the coordinator (public key by file/mail, fingerprint by voice)."""
        return {
            "site": self.site,
            "public_key": self.public_key,
            "key_version": self.key_version,
            "fingerprint": self.fingerprint,
        }


def exchange_storage(bundle: EnrollmentBundle) -> Storage:
    """An S3 client with the site's own exchange credentials (they reach its exchange bucket only)."""
    return Storage(
        bundle.endpoint,
        bundle.access_key,
        bundle.secret_key.get_secret_value(),
        secure=bundle.secure,
        region=bundle.region,
    )


def _skeleton(
    bundle: EnrollmentBundle,
    *,
    datasets: Iterable[DatasetGrant],
    min_partners: int,
    max_rounds: int,
    allowed_strategies: Iterable[str],
    require_secure_aggregation: bool,
    approval: Approval,
) -> SitePolicy:
    return SitePolicy(
        schema_version=1,
        site=bundle.site,
        consortium=bundle.consortium,
        coordinator=TrustedCoordinator(
            public_key=bundle.coordinator_public_key,
            fingerprint=bundle.coordinator_fingerprint,
            key_version=bundle.coordinator_key_version,
        ),
        datasets=tuple(datasets),
        min_partners=min_partners,
        max_rounds=max_rounds,
        allowed_strategies=frozenset(allowed_strategies),
        require_secure_aggregation=require_secure_aggregation,
        approval=approval,
    )


def import_bundle(
    bundle: EnrollmentBundle,
    site_vault_admin: Vault,
    *,
    policy_path: Path,
    confirmed_coordinator_fingerprint: str,
    key_name: str | None = None,
    datasets: Iterable[DatasetGrant] = (),
    min_partners: int = 3,
    max_rounds: int = 20,
    allowed_strategies: Iterable[str] = ("fedavg",),
    require_secure_aggregation: bool = False,
    approval: Approval = DEFAULT_APPROVAL,
) -> SiteIdentity:
    """Set up the site from ``bundle`` (see the module docstring); idempotent for the same bundle.

    ``confirmed_coordinator_fingerprint``: what the site's operator heard from the coordinator's operator.
    The keyword arguments after it shape a NEW policy file only; an existing one is kept as the partner
    edited it.
    """
    try:
        heard = normalize_fingerprint(confirmed_coordinator_fingerprint)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from None
    if heard != bundle.coordinator_fingerprint:
        raise EnrollmentError(
            f"the coordinator fingerprint you confirmed ({heard}) is not the bundle's "
            f"({bundle.coordinator_fingerprint}): the bundle may have been replaced; nothing was set up"
        )
    key_name = key_name or default_key_name(bundle.site)
    if key_name.startswith(RESERVED_KEY_PREFIX):
        raise EnrollmentError(
            f"signing key name {key_name!r} starts with {RESERVED_KEY_PREFIX!r}, the prefix the operator "
            "token may use: choose another name"
        )

    existing: SitePolicy | None = None
    if policy_path.exists():
        try:
            existing = load_policy(policy_path)
        except PolicyError as exc:
            raise EnrollmentError(str(exc)) from None
        if (existing.site, existing.consortium) != (bundle.site, bundle.consortium):
            raise EnrollmentError(
                f"{policy_path} is the policy of site {existing.site!r} in {existing.consortium!r}, "
                f"not of {bundle.site!r} in {bundle.consortium!r}"
            )
        if existing.coordinator.public_key != bundle.coordinator_public_key:
            raise EnrollmentError(
                f"{policy_path} pins another coordinator key ({existing.coordinator.fingerprint}); "
                "re-pinning is a decision for a human: edit the policy, then import again"
            )

    signer = TransitSigner.from_vault(site_vault_admin, key_name)
    signer.create_key()
    vault_policy = signer_policy_name(key_name)
    site_vault_admin.write_policy(vault_policy, signer_policy(site_vault_admin.transit_mount, key_name))
    public = signer.public_key()

    if existing is None:
        write_policy(
            _skeleton(
                bundle,
                datasets=datasets,
                min_partners=min_partners,
                max_rounds=max_rounds,
                allowed_strategies=allowed_strategies,
                require_secure_aggregation=require_secure_aggregation,
                approval=approval,
            ),
            policy_path,
        )
    return SiteIdentity(
        site=bundle.site,
        consortium=bundle.consortium,
        key_name=key_name,
        key_version=public.version,
        public_key=public.public_key_b64,
        fingerprint=public.fingerprint,
        policy_path=policy_path,
        vault_policy=vault_policy,
    )
