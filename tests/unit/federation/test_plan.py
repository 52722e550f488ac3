"""Which of a partner's staged drops a training run uses: the latest per inbox file."""

from __future__ import annotations

from lepton_tasks.federation.plan import latest_per_source


def _m(source: str | None, staged_at: str | None) -> dict:
    m: dict = {}
    if source is not None:
        m["source"] = {"bucket": "inbox-a", "key": source}
    if staged_at is not None:
        m["staged_at"] = staged_at
    return m


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


def test_manifests_without_a_source_each_stand_alone():
    manifests = {
        "a/banks/1/manifest.json": _m(None, None),
        "a/banks/2/manifest.json": _m(None, "2026-01-01T00:00:00+00:00"),
    }
    current, old = latest_per_source(manifests)
    assert current == sorted(manifests) and old == {}
