"""The HTML run report: complete, partial and hostile metrics (a :class:`RunMetrics`, as in metrics.json)."""

from __future__ import annotations

import re

import pytest

from lepton_tasks.core.messages import FinalMetrics, Lineage, RoundMetrics, dump
from lepton_tasks.federation import report
from tests.unit.federation.metrics_sample import PARTNERS, sample_run_metrics


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)


def test_full_report(tmp_path):
    path = report.render_report(sample_run_metrics(), tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert len(_images(page)) == 2  # rounds plot + per-partner AUC bars
    for text in (
        "banks@v1",
        "fedprox",
        '<th>model version</th><td class="num">7</td>',
        "cd" * 32,  # the published weights' sha256, in the lineage
        "trainer timed out",
        "1 exclusion(s): see the exclusions table",
        "2025-01-01T00:00:00+00:00",
        "0.9100",
    ):
        assert text in page, text
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "default-src 'none'" in page
    assert not list((tmp_path / "out").glob(".report-*"))  # no temp file left behind


def test_minimal_report_and_missing_parts(tmp_path):
    bare = sample_run_metrics(rounds=[], final=FinalMetrics(per_partner={}, overall={}), warnings=[])
    page = report.render_report(bare, tmp_path).read_text()
    assert "No per-round metrics available" in page and "No per-partner evaluation available" in page
    assert not _images(page) and "Warnings" not in page

    full = sample_run_metrics()
    per_partner = {
        **full.final.per_partner,
        "bank-a": {"n": 5, "positives": 0, "auc": None, "notes": ["one"]},
    }
    partial = sample_run_metrics(
        final=FinalMetrics(per_partner=per_partner, overall={"n": 600, "accuracy": 0.9}), model_version=None
    )
    page = report.render_html(partial)
    assert len(_images(page)) == 2
    assert "overall AUC" not in page and "overall accuracy" in page
    assert "<td>one</td>" in page  # a site's notes
    assert "model version" not in page.split("<h2>Lineage</h2>", 1)[0]  # not published yet: not shown


def test_everything_is_escaped():
    evil = "<script>alert(1)</script>"
    full = sample_run_metrics()
    rounds = [
        RoundMetrics(round=1, partners={evil: {"loss": 0.3, "auc": 0.6, "n": 10}}, excluded={evil: evil}),
    ]
    metrics = sample_run_metrics(
        run_id=evil,
        dataset=evil,
        warnings=[evil],
        partners=[*PARTNERS, evil],
        rounds=rounds,
        final=FinalMetrics(
            per_partner={**full.final.per_partner, evil: {"n": 3, "auc": 0.5, "notes": [evil], evil: 1}},
            overall=full.final.overall,
        ),
        excluded={evil: evil},
        lineage=Lineage(**{**full.lineage.model_dump(), "sites": [evil], "contract": evil}),
    )
    page = report.render_html(metrics)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: &lt;script&gt;alert(1)&lt;/script&gt;" in page  # excluded


def test_odd_values_do_not_break_rendering():
    full = sample_run_metrics()
    metrics = sample_run_metrics(
        partners=["$x$ & co", "a_b^c"],
        final=FinalMetrics(
            per_partner={"$x$ & co": {"n": 1, "auc": float("nan")}, "a_b^c": {"n": 2, "auc": 0.7}},
            overall=full.final.overall,
        ),
        rounds=[RoundMetrics(round=1, partners={"$x$ & co": {"loss": "n/a", "auc": None}})],
    )
    page = report.render_html(metrics)
    assert "$x$ &amp; co" in page and "nan" in page


def test_input_is_not_mutated():
    metrics = sample_run_metrics()
    before = dump(metrics)
    report.render_html(metrics)
    assert dump(metrics) == before


# ---------------------------------------------------------------------------------------------- templates
@pytest.fixture
def no_plots(monkeypatch):
    """Skip matplotlib where a test is about the tables (keeps these tests fast)."""
    monkeypatch.setattr(report, "_rounds_plot", lambda rounds: None)
    monkeypatch.setattr(report, "_partner_auc_plot", lambda *args: None)


def _rounds_rows(page: str) -> list[str]:
    rounds = page.split("<h2>Training rounds</h2>", 1)[1].split("<h2>", 1)[0]
    return re.findall(r"<tr>.*?</tr>", rounds, flags=re.S)


def test_excluded_partners_with_their_reasons(no_plots):
    rows = _rounds_rows(report.render_html(sample_run_metrics()))
    assert "excluded (reason)" in rows[0]
    assert "bank-c: refused (strategy_not_allowed): trainer timed out" in rows[2]  # header, round 1, round 2
    assert "<td>—</td>" in rows[1]  # round 1 excluded no one


def test_the_lineage_names_the_published_weights_and_the_sites_that_trained_them(no_plots):
    page = report.render_html(sample_run_metrics())
    lineage = page.split("<h2>Lineage</h2>", 1)[1]
    assert "<th>global weights sha256</th><td>" + "cd" * 32 + "</td>" in lineage
    assert "<th>sites that trained it</th><td>bank-a, bank-b, bank-c</td>" in lineage
    assert '<th>published round</th><td class="num">2</td>' in lineage


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

    metrics = sample_run_metrics()
    context = report._context(metrics)
    assert templates.render(report.TEMPLATE, **context) == report.render_html(metrics)
    for key in context:
        with pytest.raises(jinja2.UndefinedError, match=key):
            templates.render(report.TEMPLATE, **{k: v for k, v in context.items() if k != key})


def test_the_exclusions_table_names_who_and_why_escaped():
    metrics = sample_run_metrics(
        excluded={
            "bank-c (round 1, train)": "verification_failed (bad_signature): signature does not verify",
            "bank-d (round 0, statistics)": "<script>alert(1)</script>",
        }
    )
    page = report.render_html(metrics)
    assert "Exclusions" in page and "bank-c (round 1, train)" in page
    assert "verification_failed (bad_signature): signature does not verify" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
