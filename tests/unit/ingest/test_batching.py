"""More drops than Airflow maps (``max_map_length``, 1,024) are ingested in batches; a run's summary names
every drop that was not staged."""

from __future__ import annotations

import pytest

from lepton_tasks.core.drops import batch_drops, batch_label
from lepton_tasks.ingest.stage import summarize


def drops(n: int) -> list[dict[str, str]]:
    return [{"partner": "bank-a", "key": f"banks/{i:05d}.csv"} for i in range(n)]


def test_1025_drops_fit_in_1024_mapped_tasks_in_order_and_complete():
    batches = batch_drops(drops(1025), 1024)
    assert len(batches) <= 1024
    assert [d for b in batches for d in b] == drops(1025)  # every drop once, in order
    assert {len(b) for b in batches} == {2, 1} and len(batches) == 513


@pytest.mark.parametrize("n", [0, 1, 5, 1024])
def test_up_to_the_limit_every_drop_gets_its_own_task(n):
    assert batch_drops(drops(n), 1024) == [[d] for d in drops(n)]


def test_many_drops_are_spread_evenly():
    batches = batch_drops(drops(10_000), 1024)
    assert len(batches) <= 1024 and max(len(b) for b in batches) == 10
    assert [d for b in batches for d in b] == drops(10_000)


def test_batch_limit_must_be_positive():
    with pytest.raises(ValueError, match="max_batches"):
        batch_drops(drops(3), 0)


def test_the_grid_label_names_the_partner_and_key():
    assert batch_label(drops(1)) == "bank-a/banks/00000.csv"
    assert batch_label(drops(3)) == "bank-a/banks/00000.csv (+2 more)"


def test_summary_names_quarantined_failed_and_missing_drops():
    ds = drops(4)
    results = [
        {"partner": "bank-a", "object_key": "banks/00000.csv", "status": "staged", "error": None},
        {
            "partner": "bank-a",
            "object_key": "banks/00001.csv",
            "status": "quarantined",
            "error": "[wrong_type] x",
        },
        {
            "partner": "bank-a",
            "object_key": "banks/00002.csv",
            "status": "failed",
            "error": "StorageError: down",
        },
    ]
    text, problems = summarize(ds, results)
    assert text.splitlines()[0] == "4 drop(s): 1 failed, 1 no result, 1 quarantined, 1 staged"
    assert problems == [
        "bank-a/banks/00001.csv: quarantined: [wrong_type] x",
        "bank-a/banks/00002.csv: failed: StorageError: down",
        "bank-a/banks/00003.csv: no result (its ingest task failed before reporting: see its log)",
    ]
    assert summarize(ds[:1], results[:1])[1] == []
