"""Coordinator side of enrolling a site: its exchange bucket, its bucket-scoped credentials, its pinned key.

Enrollment is the one moment the two organizations trust each other's keys, so it is done by people, out of
band, in this order:

1. the coordinator's operator runs :func:`enroll_site`: it creates the site's exchange bucket
   ``exchange-<site>`` and S3 credentials that reach that bucket only (read, write, list), records the site
   in the :class:`SiteRegistry` (not yet trusted: no key) and returns an :class:`EnrollmentBundle` —
   endpoint, bucket, the credentials and the coordinator's public signing key with its fingerprint. The
   bundle goes to the partner (:func:`write_bundle`: a 0600 file; it holds a secret);
2. the partner imports it at its site (:func:`lepton_tasks.site.enrollment.import_bundle`): the site pins
   the coordinator's key in its policy after comparing the fingerprint by voice or another channel, creates
   its OWN signing key in its OWN Vault and hands back the public half with its fingerprint;
3. the operator pins that key (:func:`pin_site_key`), typing the fingerprint the partner read out: a key whose
   fingerprint differs is refused.

The coordinator keeps no site credential: the registry holds the bucket, the S3 user *name* and the pinned
public key. The secret key exists only in the bundle (and, in SeaweedFS/MinIO, in the identity store).
:func:`remove_site` revokes the credentials (and, on request, deletes the bucket).

Identities are created through the same backends as partner inboxes (``ops.partners.SeaweedIdentities`` —
``weed shell s3.configure`` with bucket-scoped actions, the scoping that isolates on SeaweedFS 4.48 — or
``MinioIdentities``); any object with ``grant_bucket``/``revoke`` does (:class:`BucketIdentities`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from lepton_tasks.core.exchange import BUCKET_PATTERN, ID_PATTERN
from lepton_tasks.core.files import write_private
from lepton_tasks.core.signatures import PublicKey, fingerprint, load_public_key, normalize_fingerprint

if TYPE_CHECKING:
    from lepton_tasks.adapters.storage import Storage

__all__ = [
    "BucketIdentities",
    "EnrollmentBundle",
    "EnrollmentError",
    "KeyHolder",
    "SiteEntry",
    "SiteRegistry",
    "access_key_id",
    "enroll_site",
    "exchange_bucket",
    "exchange_user",
    "pin_site_key",
    "read_bundle",
    "remove_site",
    "validate_site_name",
    "write_bundle",
]

#: names a site may not take (they collide with the coordinator's own buckets or roles)
RESERVED: Final = frozenset({"staging", "quarantine", "models", "admin", "root", "lepton", "operator"})
REGISTRY_SCHEMA_VERSION: Final = 1
SECRET_FILE_MODE: Final = 0o600


class EnrollmentError(ValueError):
    """Enrollment cannot proceed (bad name, duplicate, unknown site, fingerprint mismatch): nothing
    changed."""


class BucketIdentities(Protocol):
    """Creates and revokes S3 credentials scoped to one bucket (``ops.partners.SeaweedIdentities`` is one)."""

    def grant_bucket(self, user: str, access_key: str, secret_key: str, bucket: str) -> None: ...

    def revoke(self, user: str, access_key: str) -> None: ...


class KeyHolder(Protocol):
    """The coordinator's signer as enrollment needs it: the public half of its key
    (:class:`lepton_tasks.adapters.signing.TransitSigner` is one)."""

    def public_key(self) -> PublicKey: ...


def validate_site_name(site: str) -> str:
    """A site name: the id rule of the exchange envelope (3–32 lower-case letters, digits, inner single
    hyphens, starting with a letter), not reserved. It becomes the bucket ``exchange-<site>``."""
    if not re.fullmatch(ID_PATTERN, site) or "--" in site:
        raise EnrollmentError(
            f"invalid site name {site!r}: use 3-32 lowercase letters, digits or single hyphens, starting "
            f"with a letter and not ending with a hyphen (it becomes the bucket exchange-{site})"
        )
    if site in RESERVED:
        raise EnrollmentError(f"invalid site name {site!r}: reserved")
    return site


def exchange_bucket(site: str) -> str:
    return f"exchange-{site}"


def exchange_user(site: str) -> str:
    """The S3 user (identity name) that owns a site's exchange credentials."""
    return f"exchange-{site}"


def access_key_id(user: str) -> str:
    """The access key *id* of ``user``: derived from the name, so the registry need not store it to revoke.
    (An access key id is not a secret — S3 sends it in clear with every request; the secret key is.)"""
    return "LX" + hashlib.sha256(f"lepton-exchange/{user}".encode()).hexdigest()[:18].upper()


# ----------------------------------------------------------------------------------------------------
# the bundle handed to the partner
# ----------------------------------------------------------------------------------------------------


class EnrollmentBundle(BaseModel):
    """What the partner receives to set up its site (schema version 1). Holds a secret: hand it over as a
    0600 file (:func:`write_bundle`), never by mail in clear, and never log it (its repr hides the secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    consortium: str = Field(pattern=ID_PATTERN)
    site: str = Field(pattern=ID_PATTERN)
    #: the coordinator's S3 endpoint (``host:port``), the only address a site ever connects to
    endpoint: str = Field(min_length=1)
    secure: bool = False
    region: str = "us-east-1"
    bucket: str = Field(pattern=BUCKET_PATTERN)
    access_key: str = Field(min_length=1)
    secret_key: SecretStr
    #: the coordinator's Ed25519 public key (base64), its version and its fingerprint, read out at enrollment
    coordinator_public_key: str
    coordinator_key_version: int = Field(ge=1)
    coordinator_fingerprint: str
    issued_at: AwareDatetime

    @field_validator("coordinator_public_key")
    @classmethod
    def _valid_key(cls, value: str) -> str:
        load_public_key(value)
        return value

    @field_validator("coordinator_fingerprint")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return normalize_fingerprint(value)

    @model_validator(mode="after")
    def _consistent(self) -> EnrollmentBundle:
        if fingerprint(self.coordinator_public_key) != self.coordinator_fingerprint:
            raise ValueError("coordinator_fingerprint does not match coordinator_public_key")
        if self.bucket != exchange_bucket(self.site):
            raise ValueError(f"bucket {self.bucket!r} is not the exchange bucket of site {self.site!r}")
        return self

    def coordinator_key(self) -> PublicKey:
        return PublicKey("coordinator", self.coordinator_key_version, self.coordinator_public_key)

    def document(self) -> dict[str, Any]:
        """The bundle as JSON-ready data WITH the secret key (for :func:`write_bundle` only)."""
        doc = self.model_dump(mode="json")
        doc["secret_key"] = self.secret_key.get_secret_value()
        return doc


def _check_private(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise EnrollmentError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise EnrollmentError(f"{path}: mode {st.st_mode & 0o777:o}; a file holding a secret must be 600")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` mode 0600, atomically (a temp file renamed over it)."""
    write_private(path, data, SECRET_FILE_MODE)


def write_bundle(bundle: EnrollmentBundle, path: Path) -> None:
    """Write the bundle (secret included) as JSON, mode 0600."""
    _write_private(path, json.dumps(bundle.document(), indent=2, sort_keys=True).encode() + b"\n")


def read_bundle(path: Path) -> EnrollmentBundle:
    """Read a bundle written by :func:`write_bundle`; refuses one that others may read."""
    _check_private(path)
    try:
        return EnrollmentBundle.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise EnrollmentError(f"{path}: not an enrollment bundle (field {where}: {err['msg']})") from None


# ----------------------------------------------------------------------------------------------------
# the coordinator's registry of sites
# ----------------------------------------------------------------------------------------------------


class SiteEntry(BaseModel):
    """One enrolled site as the coordinator knows it: where to exchange, and whose key signs its answers.
    No site address (the coordinator never connects to a site) and no credential."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(pattern=ID_PATTERN)
    consortium: str = Field(pattern=ID_PATTERN)
    bucket: str = Field(pattern=BUCKET_PATTERN)
    #: the S3 identity's name (for revocation); its secret is not kept here
    s3_user: str
    enrolled_at: AwareDatetime
    #: the site's Ed25519 public key, pinned by :func:`pin_site_key` (``None``: not trusted yet)
    public_key: str | None = None
    key_version: int | None = Field(default=None, ge=1)
    fingerprint: str | None = None
    pinned_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _pin_complete(self) -> SiteEntry:
        pin = (self.public_key, self.key_version, self.fingerprint, self.pinned_at)
        if any(v is None for v in pin) and any(v is not None for v in pin):
            raise ValueError("public_key, key_version, fingerprint and pinned_at are set together")
        if self.public_key is not None and fingerprint(self.public_key) != self.fingerprint:
            raise ValueError(f"the pinned fingerprint of site {self.site!r} does not match its key")
        return self

    @property
    def pinned(self) -> bool:
        return self.public_key is not None

    def pinned_key(self) -> PublicKey:
        """The key :func:`lepton_tasks.core.exchange.open_message` verifies this site's answers with."""
        if self.public_key is None or self.key_version is None:
            raise EnrollmentError(
                f"site {self.site!r} has no pinned key yet: pin it with pin_site_key after the partner "
                "reads out its fingerprint"
            )
        return PublicKey(f"site:{self.site}", self.key_version, self.public_key)


class SiteRegistry:
    """The coordinator's YAML file of enrolled sites (mode 0600, replaced atomically). A registry that
    others may write is refused: it is where site keys are pinned."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"SiteRegistry({str(self.path)!r})"

    def load(self) -> dict[str, SiteEntry]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise EnrollmentError(f"{self.path}: group or others may modify the site registry: chmod 600")
        raw = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict) or raw.get("schema_version") != REGISTRY_SCHEMA_VERSION:
            raise EnrollmentError(f"{self.path}: not a version-{REGISTRY_SCHEMA_VERSION} site registry")
        sites = raw.get("sites") or {}
        try:
            entries = {name: SiteEntry.model_validate(doc) for name, doc in sites.items()}
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            raise EnrollmentError(f"{self.path}: field {where}: {err['msg']}") from None
        for name, entry in entries.items():
            if entry.site != name:
                raise EnrollmentError(f"{self.path}: entry {name!r} names site {entry.site!r}")
        return entries

    def save(self, entries: Mapping[str, SiteEntry]) -> None:
        doc = {
            "schema_version": REGISTRY_SCHEMA_VERSION,
            "sites": {
                name: entry.model_dump(mode="json", exclude_none=True)
                for name, entry in sorted(entries.items())
            },
        }
        _write_private(self.path, yaml.safe_dump(doc, sort_keys=False).encode())

    def get(self, site: str) -> SiteEntry:
        entries = self.load()
        if site not in entries:
            raise EnrollmentError(
                f"unknown site {site!r}; enrolled: {', '.join(sorted(entries)) or '(none)'}"
            )
        return entries[site]

    def put(self, entry: SiteEntry) -> None:
        entries = self.load()
        entries[entry.site] = entry
        self.save(entries)

    def delete(self, site: str) -> None:
        entries = self.load()
        entries.pop(site, None)
        self.save(entries)


# ----------------------------------------------------------------------------------------------------
# enroll, pin, remove
# ----------------------------------------------------------------------------------------------------


def enroll_site(
    admin_storage: Storage,
    identities: BucketIdentities,
    coordinator_signer: KeyHolder,
    *,
    registry: SiteRegistry,
    consortium: str,
    site: str,
    endpoint: str,
    secure: bool = False,
    region: str = "us-east-1",
    now: datetime | None = None,
) -> EnrollmentBundle:
    """Create ``site``'s exchange bucket and bucket-scoped credentials, record it (unpinned), return the
    bundle.

    Order: validate (a bad or duplicate name changes nothing) → bucket → credentials → registry entry
    (written last). The coordinator's public key is read before anything is created.
    """
    validate_site_name(site)
    if not re.fullmatch(ID_PATTERN, consortium):
        raise EnrollmentError(f"invalid consortium id {consortium!r}")
    if site in registry.load():
        raise EnrollmentError(f"site {site!r} is already enrolled (remove_site first to re-enroll it)")
    coordinator_key = coordinator_signer.public_key()
    bucket, user = exchange_bucket(site), exchange_user(site)
    access_key, secret_key = access_key_id(user), secrets.token_urlsafe(30)

    admin_storage.ensure_bucket(bucket)
    identities.grant_bucket(user, access_key, secret_key, bucket)
    issued = (now or datetime.now(UTC)).astimezone(UTC)
    registry.put(SiteEntry(site=site, consortium=consortium, bucket=bucket, s3_user=user, enrolled_at=issued))
    return EnrollmentBundle(
        consortium=consortium,
        site=site,
        endpoint=endpoint,
        secure=secure,
        region=region,
        bucket=bucket,
        access_key=access_key,
        secret_key=SecretStr(secret_key),
        coordinator_public_key=coordinator_key.public_key_b64,
        coordinator_key_version=coordinator_key.version,
        coordinator_fingerprint=coordinator_key.fingerprint,
        issued_at=issued,
    )


def pin_site_key(
    registry: SiteRegistry,
    site: str,
    public_key: str,
    confirmed_fingerprint: str,
    *,
    key_version: int = 1,
    replace: bool = False,
    now: datetime | None = None,
) -> SiteEntry:
    """Pin ``site``'s signing key, only if ``confirmed_fingerprint`` — what the operator heard from the
    partner and typed — is the fingerprint of ``public_key`` (the key that arrived by the other channel).

    Re-pinning a different key (a rotation, a re-enrollment) needs ``replace=True``.
    """
    entry = registry.get(site)
    try:
        actual = fingerprint(public_key)
    except ValueError as exc:
        raise EnrollmentError(f"site {site!r}: the public key is not an Ed25519 key: {exc}") from None
    try:
        typed = normalize_fingerprint(confirmed_fingerprint)
    except ValueError as exc:
        raise EnrollmentError(f"site {site!r}: {exc}") from None
    if typed != actual:
        raise EnrollmentError(
            f"site {site!r}: the fingerprint you confirmed ({typed}) is not the fingerprint of the key "
            f"received ({actual}); the key is NOT pinned — check both with the partner"
        )
    if entry.pinned and entry.public_key != public_key and not replace:
        raise EnrollmentError(
            f"site {site!r} already has key {entry.fingerprint} pinned; pass replace=True to re-pin"
        )
    pinned = entry.model_copy(
        update={
            "public_key": public_key,
            "key_version": key_version,
            "fingerprint": actual,
            "pinned_at": (now or datetime.now(UTC)).astimezone(UTC),
        }
    )
    pinned = SiteEntry.model_validate(pinned.model_dump())  # re-run the validators on the copy
    registry.put(pinned)
    return pinned


def remove_site(
    registry: SiteRegistry,
    identities: BucketIdentities,
    site: str,
    *,
    admin_storage: Storage | None = None,
    delete_bucket: bool = False,
) -> None:
    """Revoke ``site``'s exchange credentials and forget its key. The bucket (the exchange history) is kept
    unless ``delete_bucket`` (which needs ``admin_storage``)."""
    entry = registry.get(site)
    if delete_bucket and admin_storage is None:
        raise EnrollmentError("delete_bucket needs admin_storage")
    identities.revoke(entry.s3_user, access_key_id(entry.s3_user))
    if delete_bucket and admin_storage is not None:
        admin_storage.remove_bucket(entry.bucket)
    registry.delete(site)
