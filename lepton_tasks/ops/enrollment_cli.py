"""``lepton coordinator …`` and ``lepton site …``: enrollment, one command on each side (a startup kit).

At the coordinator::

    lepton coordinator init                                  # its signing key; prints the fingerprint
    lepton coordinator enroll hosp-a --out hosp-a.bundle.json    # exchange bucket + scoped credentials
    lepton coordinator pin hosp-a --key-file hosp-a.key.json --fingerprint <what the partner read out>
    lepton coordinator sites | remove hosp-a

At the site, with the bundle received over a private channel and the coordinator's fingerprint heard by
voice::

    lepton site import hosp-a.bundle.json --coordinator-fingerprint <heard> --dataset banks

The logic is in :mod:`lepton_tasks.federation.enrollment` and :mod:`lepton_tasks.site.enrollment`; this module
only turns settings into clients and results into lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from lepton_tasks.adapters.settings import Settings
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.core.site_policy import Approval
    from lepton_tasks.federation.enrollment import EnrollmentBundle
    from lepton_tasks.site.enrollment import SiteIdentity

coordinator_app = typer.Typer(
    help="The coordinator: its signing key, enrolling sites, pinning their keys.", no_args_is_help=True
)
site_app = typer.Typer(help="A site: import the coordinator's enrollment bundle.", no_args_is_help=True)


def _console() -> Any:
    from lepton_tasks.ops.cli import console

    return console


def _fail(msg: str) -> None:
    from lepton_tasks.ops.cli import _fail as fail

    fail(msg)


def _admin() -> tuple[Any, Any, Any, Any]:
    """(settings, admin storage, root Vault, bucket identities) of THIS organization's own stack."""
    from lepton_tasks.ops.cli import _onboarding

    return _onboarding()


def _coordinator_signer(settings: Any, vault: Any) -> Any:
    from lepton_tasks.adapters.signing import TransitSigner

    return TransitSigner.from_vault(vault, settings.coordinator_key_name)


@coordinator_app.command("init")
def coordinator_init() -> None:
    """Create the coordinator's Ed25519 signing key (idempotent) and print its fingerprint."""
    settings, _, vault, _ = _admin()
    signer = _coordinator_signer(settings, vault)
    created = signer.create_key()
    public = signer.public_key()
    _console().print(
        f"coordinator signing key {settings.coordinator_key_name} "
        f"{'created' if created else 'already there'} "
        f"(version {public.version}); fingerprint, to read out to every site's operator:\n"
        f"  {public.fingerprint}"
    )


@coordinator_app.command("enroll")
def coordinator_enroll(
    site: str,
    out: Annotated[Path, typer.Option(help="Where to write the bundle (0600; it holds a secret).")],
    endpoint: Annotated[
        str | None, typer.Option(help="The S3 endpoint as the site reaches it (default: this stack's).")
    ] = None,
) -> None:
    """Create SITE's exchange bucket and bucket-scoped credentials and write its enrollment bundle."""
    from lepton_tasks.federation.enrollment import EnrollmentError, SiteRegistry, enroll_site, write_bundle

    settings, storage, vault, identities = _admin()
    try:
        bundle = enroll_site(
            storage,
            identities,
            _coordinator_signer(settings, vault),
            registry=SiteRegistry(settings.site_registry_file),
            consortium=settings.consortium,
            site=site,
            endpoint=endpoint or settings.s3_endpoint,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        write_bundle(bundle, out)
    except EnrollmentError as exc:
        _fail(str(exc))
    _console().print(
        f"enrolled [bold]{site}[/]: exchange bucket {bundle.bucket}; bundle written to {out} (0600). Send it "
        f"over a private channel and read out the coordinator fingerprint: {bundle.coordinator_fingerprint}"
    )


@coordinator_app.command("pin")
def coordinator_pin(
    site: str,
    key_file: Annotated[
        Path, typer.Option(help="The site's public key file (`lepton site import` wrote it).")
    ],
    fingerprint: Annotated[str, typer.Option(help="The fingerprint the site's operator read out to you.")],
    replace: Annotated[bool, typer.Option(help="Replace a key already pinned (a rotation).")] = False,
) -> None:
    """Pin SITE's signing key, only if FINGERPRINT (heard from the partner) matches the key file."""
    from lepton_tasks.adapters.settings import load_settings
    from lepton_tasks.federation.enrollment import EnrollmentError, SiteRegistry, pin_site_key

    settings = load_settings()
    try:
        doc = json.loads(key_file.read_text(encoding="utf-8"))
        if doc.get("site") != site:
            raise EnrollmentError(f"{key_file} is the key of site {doc.get('site')!r}, not of {site!r}")
        entry = pin_site_key(
            SiteRegistry(settings.site_registry_file),
            site,
            str(doc["public_key"]),
            fingerprint,
            key_version=int(doc.get("key_version", 1)),
            replace=replace,
        )
    except (OSError, ValueError, KeyError) as exc:  # EnrollmentError is a ValueError
        _fail(f"{site}: {exc}")
    _console().print(f"pinned {site}'s key {entry.fingerprint}: its answers are accepted from now on")


@coordinator_app.command("remove")
def coordinator_remove(
    site: str,
    delete_bucket: Annotated[
        bool, typer.Option(help="Also delete the exchange bucket (its history).")
    ] = False,
) -> None:
    """Revoke SITE's exchange credentials and forget its key."""
    from lepton_tasks.federation.enrollment import EnrollmentError, SiteRegistry, remove_site

    settings, storage, _, identities = _admin()
    try:
        remove_site(
            SiteRegistry(settings.site_registry_file),
            identities,
            site,
            admin_storage=storage,
            delete_bucket=delete_bucket,
        )
    except EnrollmentError as exc:
        _fail(str(exc))
    _console().print(f"removed {site}: its exchange credentials are revoked")


@coordinator_app.command("sites")
def coordinator_sites() -> None:
    """List enrolled sites and their pinned keys."""
    from lepton_tasks.adapters.settings import load_settings
    from lepton_tasks.federation.enrollment import EnrollmentError, SiteRegistry
    from lepton_tasks.ops.cli import print_table

    try:
        entries = SiteRegistry(load_settings().site_registry_file).load()
    except EnrollmentError as exc:
        _fail(str(exc))
    rows = [
        [e.site, e.bucket, e.fingerprint or "NOT PINNED", e.enrolled_at.isoformat(timespec="seconds")]
        for e in entries.values()
    ]
    print_table(["site", "exchange bucket", "pinned key", "enrolled"], rows)


@site_app.command("import")
def site_import(
    bundle_file: Path,
    coordinator_fingerprint: Annotated[
        str, typer.Option(help="The coordinator fingerprint its operator read out to you.")
    ],
    dataset: Annotated[
        list[str],
        typer.Option("--dataset", "-d", help="A dataset this site trains on (its current contract)."),
    ],
) -> None:
    """Set this site up from the coordinator's bundle: its signing key, its policy, its exchange access."""
    from lepton_tasks.federation.enrollment import EnrollmentError, read_bundle

    settings, _, vault, _ = _admin()
    try:
        identity = set_up_site(
            settings,
            vault,
            read_bundle(bundle_file),
            confirmed_coordinator_fingerprint=coordinator_fingerprint,
            datasets=dataset,
        )
    except (EnrollmentError, OSError, KeyError) as exc:
        _fail(str(exc))
    _console().print(
        f"site [bold]{identity.site}[/] of {identity.consortium} is set up: policy {identity.policy_path} "
        f"(review it), signing key {identity.key_name}.\nSend {settings.site_key_file} to the coordinator "
        f"and read out the fingerprint: {identity.fingerprint}"
    )


def set_up_site(
    settings: Settings,
    site_root_vault: Vault,
    bundle: EnrollmentBundle,
    *,
    confirmed_coordinator_fingerprint: str,
    datasets: Iterable[str],
    min_partners: int = 3,
    approval: Approval | None = None,
) -> SiteIdentity:
    """The site's half of enrollment (``site.enrollment.import_bundle``) plus where the site keeps the
    result: its private directory (0700), the bundle (0600) for its exchange watcher, and its public key
    file for the coordinator; and the site's ``aes256-gcm96`` key for its secure-aggregation secrets
    (``site.enrollment.secagg_key_name``, created once). ``min_partners``/``approval`` shape a NEW policy
    only (default: approval required)."""
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.core.site_policy import DatasetGrant
    from lepton_tasks.federation.enrollment import write_bundle
    from lepton_tasks.site.enrollment import DEFAULT_APPROVAL, import_bundle, secagg_key_name

    settings.site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(settings.site_dir, 0o700)
    identity = import_bundle(
        bundle,
        site_root_vault,
        policy_path=settings.site_policy_file,
        confirmed_coordinator_fingerprint=confirmed_coordinator_fingerprint,
        datasets=[DatasetGrant(name=d, contract_sha256=load_contract(d).sha256) for d in datasets],
        min_partners=min_partners,
        approval=approval or DEFAULT_APPROVAL,
    )
    site_root_vault.ensure_key(secagg_key_name(bundle.site, settings.key_prefix))
    write_bundle(bundle, settings.site_bundle_file)
    settings.site_key_file.write_text(
        json.dumps(identity.for_coordinator(), indent=2) + "\n", encoding="utf-8"
    )
    return identity
