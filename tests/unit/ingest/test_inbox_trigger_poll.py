"""The inbox trigger's decision per poll (pure: the inbox listing and each drop's state are given).

A key counts as handled once ingest recorded it (``_seen``), not when it was announced: an announced drop
that is still pending ``retry_after`` later is announced again (its ingest failed for a transient reason),
unless an ingest is at work on it right now; the wait doubles after each retry."""

from __future__ import annotations

from lepton_airflow.inbox_trigger import MAX_DOUBLINGS, new_drops, poll


def inbox(*keys: str, etag: str = "e1", modified: str = "2026-12-01T10:00:00+00:00") -> dict:
    return {f"p/{k}": {"partner": "p", "key": k, "etag": etag, "modified": modified} for k in keys}


class States:
    """A stand-in for ``stage.drop_state``: what every check returns, and which keys were checked."""

    def __init__(self, default: str = "pending") -> None:
        self.default, self.checked = default, []

    def __call__(self, drop: dict) -> str:
        self.checked.append(drop["key"])
        return self.default


def keys(drops: list[dict]) -> list[str]:
    return [d["key"] for d in drops]


def test_a_new_drop_is_announced_once_and_not_checked_before_retry_after():
    found, check = inbox("banks/a.csv"), States()
    drops, state = poll(found, {}, 1000.0, check, retry_after=600)
    assert keys(drops) == ["banks/a.csv"]
    drops, state = poll(found, state, 1599.0, check, retry_after=600)
    assert drops == [] and check.checked == []  # nothing is looked at before retry_after


def test_a_drop_whose_ingest_failed_is_announced_again_with_a_growing_wait():
    found, check = inbox("banks/a.csv"), States("pending")
    _, state = poll(found, {}, 0.0, check, retry_after=600)
    drops, state = poll(found, state, 600.0, check, retry_after=600)
    assert keys(drops) == ["banks/a.csv"] and state["p/banks/a.csv"]["tries"] == 1
    assert poll(found, state, 600.0 + 1199, check, retry_after=600)[0] == []  # now waits 2 x 600
    drops, state = poll(found, state, 600.0 + 1200, check, retry_after=600)
    assert keys(drops) == ["banks/a.csv"] and state["p/banks/a.csv"]["tries"] == 2
    state["p/banks/a.csv"]["tries"] = 99
    assert poll(found, state, 1800.0 + 600 * 2**MAX_DOUBLINGS, check, retry_after=600)[0] != []  # capped


def test_a_handled_drop_is_never_announced_or_checked_again():
    found, check = inbox("banks/a.csv"), States("handled")
    _, state = poll(found, {}, 0.0, check, retry_after=600)
    drops, state = poll(found, state, 600.0, check, retry_after=600)
    assert drops == [] and state["p/banks/a.csv"]["handled"] is True
    drops, state = poll(found, state, 10**6, check, retry_after=600)
    assert drops == [] and check.checked == ["banks/a.csv"]  # checked once, at retry_after


def test_a_drop_being_ingested_is_not_announced_again_but_checked_later():
    found, check = inbox("banks/a.csv"), States("in_progress")
    _, state = poll(found, {}, 0.0, check, retry_after=600)
    drops, state = poll(found, state, 700.0, check, retry_after=600)
    assert drops == [] and state["p/banks/a.csv"]["at"] == 700.0 and state["p/banks/a.csv"]["tries"] == 0
    check.default = "pending"  # the ingest died: its lease went stale
    assert keys(poll(found, state, 1300.0, check, retry_after=600)[0]) == ["banks/a.csv"]


def test_changed_content_and_reuploads_are_new_and_deleted_keys_are_forgotten():
    _, state = poll(inbox("banks/a.csv", "banks/b.csv"), {}, 0.0, States(), retry_after=600)
    found = {**inbox("banks/a.csv", etag="e2"), **inbox("banks/b.csv", modified="2026-12-02T09:00:00+00:00")}
    drops, state = poll(found, state, 10.0, States(), retry_after=600)
    assert keys(drops) == ["banks/a.csv", "banks/b.csv"]  # new bytes; the same bytes uploaded again
    drops, state = poll(inbox("banks/a.csv", etag="e2"), state, 20.0, States(), retry_after=600)
    assert drops == [] and list(state) == ["p/banks/a.csv"]


def test_state_written_before_retries_existed_is_read():
    found = inbox("banks/a.csv")
    drops, state = poll(found, {"p/banks/a.csv": "e1"}, 0.0, States("handled"), retry_after=600)
    assert drops == [] and state["p/banks/a.csv"]["etag"] == "e1"
    assert keys(poll(found, {"p/banks/a.csv": "e0"}, 0.0, States(), retry_after=600)[0]) == ["banks/a.csv"]


def test_checks_per_poll_are_bounded_oldest_first():
    found = inbox(*(f"banks/{i:03d}.csv" for i in range(10)))
    _, state = poll(found, {}, 0.0, States(), retry_after=600)
    for i, key in enumerate(sorted(state)):
        state[key]["at"] = float(100 - i)  # the last keys waited longest
    check = States("handled")
    poll(found, state, 10_000.0, check, retry_after=600, max_checks=3)
    assert check.checked == ["banks/009.csv", "banks/008.csv", "banks/007.csv"]


def test_new_drops_compares_etags_only():
    found = {"p/banks/x.csv": {"partner": "p", "key": "banks/x.csv", "etag": "1"}}
    assert new_drops(found, {}) == [found["p/banks/x.csv"]]
    assert new_drops(found, {"p/banks/x.csv": "1"}) == []
    assert new_drops(found, {"p/banks/x.csv": "0"}) == [found["p/banks/x.csv"]]
