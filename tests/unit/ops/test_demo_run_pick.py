"""The demo follows the training run that trains on ITS drops, not the first run that happens to start."""

from __future__ import annotations

from types import SimpleNamespace

from lepton_tasks.ops import demo

SETTINGS = SimpleNamespace(models_bucket="models")


class FakeStorage:
    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}

    def exists(self, bucket: str, key: str) -> bool:
        return key in self.objects

    def get_json(self, bucket: str, key: str) -> dict:
        return self.objects[key]


class FakeAPI:
    def __init__(self, runs: list[dict]) -> None:
        self._runs = runs  # newest first, as the REST API orders them
        self.triggered: list[str] = []

    def runs(self, dag_id: str) -> list[dict]:
        return list(self._runs)

    def trigger(self, dag_id: str, conf: dict) -> str:
        self.triggered.append(dag_id)
        return "manual-1"


def _plan(*manifests: str) -> dict:
    return {"drops": {m.split("/")[0]: [{"manifest": m}] for m in manifests}}


def _pick(api, storage, expected, monkeypatch, on_sleep=None):
    clock = {"t": 0.0}

    def sleep(s: float) -> None:
        clock["t"] += s
        if on_sleep:
            on_sleep(clock["t"])

    monkeypatch.setattr(demo.time, "sleep", sleep)
    monkeypatch.setattr(demo.time, "monotonic", lambda: clock["t"])
    return list(demo._training_run(api, storage, SETTINGS, "lepton_train_banks", {"old"}, expected, 5))


def test_a_run_planned_with_only_some_of_the_drops_is_skipped_for_the_next(monkeypatch):
    expected = {"a/banks/1/manifest.json", "b/banks/2/manifest.json"}
    storage = FakeStorage()
    storage.objects["early/plan.json"] = _plan("a/banks/1/manifest.json", "b/banks/0/manifest.json")
    api = FakeAPI(
        [
            {"dag_run_id": "late", "state": "queued"},
            {"dag_run_id": "early", "state": "running"},
            {"dag_run_id": "old", "state": "success"},
        ]
    )

    def late_gets_planned(t: float) -> None:
        if t >= 9:
            storage.objects["late/plan.json"] = _plan(*expected)

    lines = _pick(api, storage, expected, monkeypatch, late_gets_planned)
    assert lines[-1] == "run:late"
    assert any("early started before all drops were staged" in line for line in lines)
    assert api.triggered == []


def test_with_no_covering_run_one_is_started_after_120_s(monkeypatch):
    storage = FakeStorage()
    api = FakeAPI([{"dag_run_id": "old", "state": "success"}])
    lines = _pick(api, storage, {"a/banks/1/manifest.json"}, monkeypatch)
    assert lines == ["run:manual-1"] and api.triggered == ["lepton_train_banks"]


def test_drops_staged_before_start_a_run_at_once(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(demo.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))
    monkeypatch.setattr(demo.time, "monotonic", lambda: clock["t"])
    api = FakeAPI([{"dag_run_id": "old", "state": "success"}])
    lines = list(
        demo._training_run(
            api,
            FakeStorage(),
            SETTINGS,
            "lepton_train_banks",
            {"old"},
            {"a/banks/1/manifest.json"},
            5,
            wait_for_asset_run=0.0,
        )
    )
    assert lines == ["run:manual-1"] and clock["t"] == 0.0
