"""The HTML run report: complete, partial, and hostile metrics."""

from __future__ import annotations

import copy
import re

import pytest

from lepton_tasks.federation import report


def _full_metrics() -> dict:
    partners = ["bank-a", "bank-b", "bank-c"]

    def m(auc, n=200, **extra):
        return {
            "n": n,
            "positives": 20,
            "positive_rate": 0.1,
            "auc": auc,
            "pr_auc": auc - 0.3,
            "accuracy": 0.9,
            "log_loss": 0.25,
            "notes": [],
            **extra,
        }

    return {
        "run_id": "manual__2025-01-01T00:00:00",
        "dataset": "credit_default",
        "contract_version": "credit_default@v1",
        "strategy": "fedprox(mu=0.01)",
        "model_version": "credit_default-7",
        "runtime": "local",
        "partners": partners,
        "rounds": [
            {
                "round": r,
                "partners": {
                    p: {"loss": 0.5 / r + i * 0.01, "auc": 0.8 + 0.03 * r, "n": 800}
                    for i, p in enumerate(partners)
                    if not (r == 2 and p == "bank-c")
                },
                "excluded": [{"partner": "bank-c", "reason": "trainer timed out"}] if r == 2 else [],
                "global": {"log_loss": 0.4 / r, "auc": 0.82 + 0.03 * r, "n": 600},
            }
            for r in (1, 2, 3)
        ],
        "final": {
            "per_partner": {p: m(0.9 + 0.01 * i) for i, p in enumerate(partners)},
            "overall": {**m(0.91, n=600), "method": "score-histogram"},
        },
        "local_only": {p: m(0.85 - 0.05 * i) for i, p in enumerate(partners)},
        "centralized": {"overall": m(0.93, n=600)},
        "lineage": {
            "drops": {p: [{"drop_id": f"d-{p}-1", "sha256": "ab" * 32, "rows": 1000}] for p in partners},
            "initial_model_fingerprint": "cd" * 32,
        },
        "warnings": ["bank-c missed round 2"],
    }


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)


def test_full_report(tmp_path):
    path = report.render_report(_full_metrics(), tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert len(_images(page)) == 2  # rounds plot + per-partner AUC bars
    for text in (
        "credit_default@v1",
        "fedprox(mu=0.01)",
        "credit_default-7",
        "d-bank-b-1",
        "ab" * 32,
        "trainer timed out",
        "bank-c missed round 2",
        "LOCAL runtime, not Docker",
        "not available in a real federation",
        "initial_model_fingerprint",
        "0.9100",
    ):
        assert text in page, text
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "default-src 'none'" in page
    assert not list((tmp_path / "out").glob(".report-*"))  # no temp file left behind


def test_minimal_report_and_missing_parts(tmp_path):
    page = report.render_report({"run_id": "r1"}, tmp_path).read_text()
    assert "No per-round metrics available" in page and "No per-partner evaluation available" in page
    assert not _images(page)

    partial = _full_metrics()
    for key in ("centralized", "local_only", "lineage", "warnings", "runtime", "model_version"):
        partial.pop(key)
    partial["final"]["overall"] = {"n": 600, "accuracy": 0.9, "auc_weighted_mean": 0.88, "method": "weighted"}
    partial["rounds"][0]["global"] = {}
    partial["final"]["per_partner"]["bank-a"] = {
        "n": 5,
        "positives": 0,
        "auc": None,
        "notes": ["only one class present"],
    }
    page = report.render_html(partial)
    assert len(_images(page)) == 2
    assert "not available in a real federation" not in page and "Warnings" not in page
    assert "sample-weighted mean of partner AUCs, approximate" in page
    assert "only one class present" in page


def test_everything_is_escaped():
    evil = "<script>alert(1)</script>"
    metrics = _full_metrics()
    metrics["run_id"] = evil
    metrics["dataset"] = evil
    metrics["warnings"] = [evil]
    metrics["partners"].append(evil)
    metrics["final"]["per_partner"][evil] = {"n": 3, "auc": 0.5, "notes": [evil]}
    metrics["rounds"][0]["partners"][evil] = {"loss": 0.3, "auc": 0.6, "n": 10}
    metrics["rounds"][1]["excluded"].append({"partner": evil, "reason": evil})
    metrics["lineage"]["drops"][evil] = [{"drop_id": evil, "sha256": evil, evil: evil}]
    metrics["lineage"][evil] = {"nested": evil}
    page = report.render_html(metrics)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page


def test_odd_values_do_not_break_rendering():
    metrics = _full_metrics()
    metrics["partners"] = ["$x$ & co", "a_b^c"]
    metrics["final"]["per_partner"] = {
        "$x$ & co": {"n": 1, "auc": float("nan")},
        "a_b^c": {"n": 2, "auc": 0.7},
    }
    metrics["rounds"][0]["global"] = {"loss": "n/a", "auc": None}
    metrics["lineage"] = "not a dict"
    page = report.render_html(metrics)
    assert "$x$ &amp; co" in page and "nan" in page


def test_rejects_metrics_without_run_id():
    with pytest.raises(ValueError, match="run_id"):
        report.render_html({"dataset": "x"})
    with pytest.raises(TypeError):
        report.render_html([])  # type: ignore[arg-type]


def test_input_is_not_mutated():
    metrics = _full_metrics()
    before = copy.deepcopy(metrics)
    report.render_html(metrics)
    assert metrics == before
