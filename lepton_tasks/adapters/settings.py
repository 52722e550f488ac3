"""The one settings object. Every endpoint, bucket, port and name comes from here.

Values come from environment variables prefixed ``LEPTON_`` (e.g. ``LEPTON_S3_ENDPOINT``), then from
``<data_dir>/lepton.env`` written by ``lepton up`` (so every process started by the embedded stack sees the
same values), then from the defaults below. Secrets are ``SecretStr`` so they never print in logs or reprs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: which organization a Lepton stack is (see ``Settings.role``)
Role = Literal["single", "coordinator", "site"]


def _default_data_dir() -> Path:
    return Path(os.environ.get("LEPTON_DATA_DIR", ".lepton")).resolve()


class Settings(BaseSettings):
    """Lepton configuration (env prefix ``LEPTON_``)."""

    model_config = SettingsConfigDict(env_prefix="LEPTON_", extra="ignore")

    mode: Literal["embedded", "compose"] = "embedded"
    #: which organization this Lepton is: ``site`` (a partner: ingest, site jobs, trainers), ``coordinator``
    #: (the consortium: federated runs over the exchange), or ``single`` (stage 1: one stack does it all)
    role: Role = "single"
    data_dir: Path = Field(default_factory=_default_data_dir)
    bind_host: str = "127.0.0.1"

    # object storage (SeaweedFS embedded, MinIO in compose)
    s3_endpoint: str = "127.0.0.1:8333"
    s3_secure: bool = False
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_region: str = "us-east-1"
    s3_master_port: int = 9333
    inbox_bucket_prefix: str = "inbox-"
    staging_bucket: str = "staging"
    quarantine_bucket: str = "quarantine"
    models_bucket: str = "models"

    # vault (OpenBao embedded, HashiCorp Vault in compose)
    vault_addr: str = "http://127.0.0.1:8200"
    vault_token: SecretStr = SecretStr("")
    transit_mount: str = "transit"
    key_prefix: str = "lepton-"

    # airflow
    airflow_port: int = 8080

    # coordinator (federated runs over the sites' exchange buckets)
    #: the consortium the coordinator runs (the id in every signed job; sites enroll into it)
    consortium: str = Field("lepton", pattern=r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
    #: the coordinator's ed25519 signing key in its Vault's transit engine (its token needs only
    #: ``adapters.signing.signer_policy`` on it; deliberately outside ``key_prefix``, the partner keys)
    coordinator_key_name: str = "coordinator-signing"
    #: a cron (UTC) on which ``lepton_federated`` also runs with its Params' defaults, besides the sites'
    #: announcements of new staged data; empty: announcements (and the UI) only. Read at DAG parse time.
    federated_cron: str = ""
    #: whether the sites' announcements of new staged data start ``lepton_federated``. Off by default: a run
    #: starts on the FIRST announcement, before the other sites may have staged (they then refuse with
    #: ``no_usable_data``); until the watcher waits for a quorum of sites, turn it on only where the sites
    #: stage together. Off: the cron and the UI/REST only.
    federated_on_announcements: bool = False
    #: seconds between two listings of the sites' ``announcements/`` by the coordinator's watcher
    announcements_poll_seconds: float = Field(30.0, gt=0, allow_inf_nan=False)

    # site (a partner's own Lepton: its exchange watcher and job DAG, ``dags/lepton_site.py``)
    #: the partner whose staged data the site trains (its name in this site's own staging); empty: the
    #: site's name in the consortium (its policy's ``site``)
    site_partner: str = ""
    #: the site's ed25519 signing key in its own Vault; empty: ``site-sign-<site>``, what ``lepton site
    #: import`` creates (``site.enrollment.default_key_name``)
    site_key_name: str = ""
    #: seconds between two listings of the site's exchange bucket by its exchange watcher (the
    #: ``ExchangeTrigger`` of ``dags/lepton_site.py``, read when the DAG file is parsed): how long a new job
    #: may wait before the site sees it; each listing is one request to the coordinator's storage
    exchange_poll_seconds: float = Field(10.0, gt=0, allow_inf_nan=False)

    # training
    trainer_image: str = "lepton-trainer:latest"
    trainer_runtime: Literal["auto", "docker", "local"] = "auto"
    #: GPUs requested per trainer container (``device_requests``); 0 = CPU
    trainer_gpus: int = 0
    #: the trainer containers' network: ``host`` in the embedded stack (services bind 127.0.0.1), the compose
    #: network's name in compose mode. The Docker daemon itself is found through the standard ``DOCKER_HOST``.
    trainer_network: str = "host"
    #: memory limit of one trainer container (Docker ``mem_limit``, no swap beyond it; its tmpfs ``/tmp`` and
    #: home count against it)
    trainer_memory: str = "4g"
    #: CPUs of one trainer container (Docker ``nano_cpus``)
    trainer_cpus: float = 1.0

    @property
    def env_file(self) -> Path:
        return self.data_dir / "lepton.env"

    @property
    def registry_file(self) -> Path:
        return self.data_dir / "partners.yaml"

    @property
    def site_dir(self) -> Path:
        """(site) the site's own files: its enrollment bundle, policy, state, outbound log, privacy ledger."""
        return self.data_dir / "site"

    @property
    def site_bundle_file(self) -> Path:
        """(site) the coordinator's enrollment bundle (0600: it holds the exchange credentials)."""
        return self.site_dir / "enrollment.json"

    @property
    def site_policy_file(self) -> Path:
        """(site) the site's policy (``core.site_policy``): what it trains on, for whom, with which budget."""
        return self.site_dir / "policy.yaml"

    @property
    def site_key_file(self) -> Path:
        """(site) the site's public signing key and fingerprint, for the coordinator to pin (no secret)."""
        return self.site_dir / "site-key.json"

    @property
    def site_registry_file(self) -> Path:
        """The coordinator's registry of enrolled sites and their pinned keys
        (``federation.enrollment.SiteRegistry``)."""
        return self.data_dir / "sites.yaml"

    def inbox_bucket(self, partner: str) -> str:
        return f"{self.inbox_bucket_prefix}{partner}"

    def transit_key(self, partner: str) -> str:
        return f"{self.key_prefix}{partner}"

    def shared_buckets(self) -> list[str]:
        return [self.staging_bucket, self.quarantine_bucket, self.models_bucket]


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, then ``<data_dir>/lepton.env`` when it exists, then defaults."""
    data_dir = Path(str(overrides.get("data_dir") or _default_data_dir()))
    env_file = data_dir / "lepton.env"
    if env_file.is_file():
        return Settings(_env_file=env_file, **overrides)
    return Settings(**overrides)
