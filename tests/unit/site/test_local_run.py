"""Which of a partner's staged drops a site's local run uses: the latest per inbox file."""

from __future__ import annotations

from datetime import datetime

from lepton_tasks.core.features import SufficientStats
from lepton_tasks.core.messages import Manifest
from lepton_tasks.site.local_run import latest_per_source

SHA = "ab" * 32


def _m(source: str, staged_at: str, drop_id: str = "d") -> Manifest:
    return Manifest(
        partner="a",
        dataset="banks",
        drop_id=drop_id,
        drop_sha256=SHA,
        source={"bucket": "inbox-a", "key": source, "etag": "e", "size": 1},
        contract="banks@v1",
        contract_sha256=SHA,
        rows={"train": 8, "holdout": 2},
        cleaning={},
        statistics_train=SufficientStats(dataset="banks", contract_version=1),
        encryption={
            "scheme": "tink-streaming-aead/AES256_GCM_HKDF_1MB+vault-transit",
            "key_name": "lepton-a",
            "key_version": 1,
        },
        objects={"train": {"key": "a/banks/d/train.parquet.enc", "sha256": SHA}},
        staged_at=datetime.fromisoformat(staged_at),
    )


def test_a_file_uploaded_again_supersedes_its_earlier_version_and_other_files_add_up():
    manifests = {
        "a/banks/1111/manifest.json": _m("banks/2024-05.csv", "2026-11-01T10:00:00+00:00"),
        "a/banks/2222/manifest.json": _m("banks/2024-06.csv", "2026-11-02T10:00:00+00:00"),
        "a/banks/3333/manifest.json": _m(
            "banks/2024-05.csv", "2026-11-03T10:00:00.000001+00:00"
        ),  # re-upload
    }
    current, old = latest_per_source(manifests)
    assert current == ["a/banks/2222/manifest.json", "a/banks/3333/manifest.json"]
    assert old == {"a/banks/1111/manifest.json": "a/banks/3333/manifest.json"}


def test_order_is_by_time_not_by_key_and_sub_second_times_count():
    manifests = {
        "a/banks/ffff/manifest.json": _m("banks/x.csv", "2026-11-25T06:45:05+00:00"),
        "a/banks/0000/manifest.json": _m("banks/x.csv", "2026-11-25T06:45:05.500000+00:00"),
    }
    current, old = latest_per_source(manifests)
    assert current == ["a/banks/0000/manifest.json"] and list(old) == ["a/banks/ffff/manifest.json"]


def test_same_time_ties_break_on_the_key_deterministically():
    manifests = {
        "a/banks/2/manifest.json": _m("banks/x.csv", "2026-01-01T00:00:00+00:00"),
        "a/banks/1/manifest.json": _m("banks/x.csv", "2026-01-01T00:00:00+00:00"),
    }
    current, old = latest_per_source(manifests)
    assert current == ["a/banks/2/manifest.json"] and old == {
        "a/banks/1/manifest.json": "a/banks/2/manifest.json"
    }
