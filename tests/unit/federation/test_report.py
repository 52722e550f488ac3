"""The HTML run report: complete, partial, and hostile metrics."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------- templates
@pytest.fixture
def no_plots(monkeypatch):
    """Skip matplotlib where a test is about the tables (keeps these tests fast)."""
    monkeypatch.setattr(report, "_rounds_plot", lambda rounds: None)
    monkeypatch.setattr(report, "_partner_auc_plot", lambda *args: None)


def _collected_metrics() -> dict:
    """Metrics shaped as plan.collect_metrics writes them: drops by SHA-256 only, excluded as bare names."""
    metrics = _full_metrics()
    for r in metrics["rounds"]:
        r["excluded"] = [e["partner"] for e in r["excluded"]]
    metrics["lineage"] = {
        "run_id": metrics["run_id"],
        "rounds": 3,
        "drops": {p: [f"{i:x}" * 64] for i, p in enumerate(metrics["partners"], start=10)},
    }
    return metrics


def _rounds_rows(page: str) -> list[str]:
    rounds = page.split("<h2>Training rounds</h2>", 1)[1].split("<h2>", 1)[0]
    return re.findall(r"<tr>.*?</tr>", rounds, flags=re.S)


def test_drop_id_is_derived_from_the_sha256_when_the_lineage_has_only_that(no_plots):
    page = report.render_html(_collected_metrics())
    drops = page.split("Staged drops that fed this model", 1)[1]
    for sha in ("a" * 64, "b" * 64, "c" * 64):
        assert f"<td>{sha[:16]}</td><td>{sha}</td>" in drops
    assert "first 16" in drops and "hex digits" in drops  # the page says where the id comes from
    # given ids are shown as given, and then the page does not claim to derive them
    page = report.render_html(_full_metrics())
    assert "<td>d-bank-a-1</td>" in page and "hex digits" not in page


def test_drop_id_digits_match_ingest():
    # ingest.stage.drop_id_of compiled alone: importing stage would load the storage and Vault adapters
    source = Path(report.__file__).parents[1] / "ingest" / "stage.py"
    (fn,) = [n for n in ast.parse(source.read_text()).body if getattr(n, "name", "") == "drop_id_of"]
    fn.returns, fn.args.args[0].annotation = None, None
    namespace: dict = {}
    exec(compile(ast.Module([fn], []), str(source), "exec"), namespace)
    drop_id_of = namespace["drop_id_of"]

    sha = "0123456789abcdef" * 4
    assert report._drop_id(sha) == drop_id_of(sha) and report._drop_id("not a hash") is None


@pytest.mark.parametrize(
    ("excluded", "shown"),
    [
        (["bank-c"], "bank-c: no update"),
        ({"bank-c": "bad signature", "bank-b": None}, "bank-c: bad signature; bank-b: no reason given"),
        ([{"partner": "bank-c", "reason": "trainer timed out"}, "bank-b"], "timed out; bank-b: no update"),
    ],
)
def test_excluded_partners_with_their_reasons(no_plots, excluded, shown):
    metrics = _full_metrics()
    metrics["rounds"][1]["excluded"] = excluded
    rows = _rounds_rows(report.render_html(metrics))
    assert "excluded (reason)" in rows[0]
    assert shown in rows[2]  # header, round 1, round 2
    assert "<td>—</td>" in rows[1]  # round 1 excluded no one


def test_centralized_reference_has_a_heading(no_plots):
    page = report.render_html(_full_metrics())
    heading = "<h3>Centralized reference (not available in a real federation)</h3>"
    assert heading in page
    assert page.index(heading) < page.index('<th>PR-AUC</th><td class="num">0.6300</td>')


def test_hostile_names_reasons_and_column_names_are_escaped(no_plots):
    evil = "<script>alert(1)</script>"
    metrics = _collected_metrics()
    metrics["partners"].append(evil)
    metrics["rounds"][0]["partners"][evil] = {"loss": 0.3, "auc": 0.6, "n": 10}
    metrics["rounds"][1]["excluded"] = {evil: evil}
    metrics["rounds"][2]["excluded"] = [evil]
    metrics["final"]["per_partner"][evil] = {"n": 3, "auc": 0.5, evil: 1}
    metrics["lineage"]["drops"][evil] = [{"drop_sha256": "f" * 64, evil: evil}]
    metrics["lineage"][evil] = evil  # a key: a row label
    page = report.render_html(metrics)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: &lt;script&gt;alert(1)&lt;/script&gt;" in page  # dict
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: no update" in page  # list
    assert "<th>&lt;script&gt;alert(1)&lt;/script&gt;</th>" in page  # lineage key
    assert "<td>ffffffffffffffff</td>" in page


def test_templates_are_autoescaped_and_strict():
    import jinja2

    from lepton_tasks import templates

    env = templates.environment()
    assert env.undefined is jinja2.StrictUndefined
    assert env.from_string("{{ x }}").render(x="<b>") == "&lt;b&gt;"
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ typo }}").render()


def test_every_template_variable_is_required(no_plots):
    """A template typo (or a variable the code stops passing) fails the render instead of printing nothing."""
    import jinja2

    from lepton_tasks import templates

    context = report._context(_full_metrics())
    assert templates.render(report.TEMPLATE, **context) == report.render_html(_full_metrics())
    for key in context:
        with pytest.raises(jinja2.UndefinedError, match=key):
            templates.render(report.TEMPLATE, **{k: v for k, v in context.items() if k != key})


def test_the_exclusions_table_names_who_and_why_escaped():
    metrics = {
        "run_id": "r",
        "excluded": {
            "bank-c (round 1)": "security error: manifest signature does not verify",
            "drop a/banks/x/manifest.json": "<script>alert(1)</script>",
        },
    }
    page = report.render_html(metrics)
    assert "Exclusions" in page and "bank-c (round 1)" in page
    assert "security error: manifest signature does not verify" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
