"""The report's "What protected this run": secure aggregation, DP-SGD settings, each site's budget."""

from __future__ import annotations

import re

import pytest

from lepton_tasks.core.messages import DPTraining, RoundMetrics, RunPrivacy, SitePrivacy
from lepton_tasks.federation import report
from tests.unit.federation.metrics_sample import sample_run_metrics

SECTION = "<h2>What protected this run</h2>"


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(report, "_rounds_plot", lambda rounds: None)
    monkeypatch.setattr(report, "_partner_auc_plot", lambda *args: None)


def section(page: str) -> str:
    assert page.count(SECTION) == 1
    return page.split(SECTION, 1)[1].split("<h2>", 1)[0]


def pairs(html: str) -> dict[str, str]:
    return dict(re.findall(r"<tr><th>(.*?)</th><td[^>]*>(.*?)</td></tr>", html))


def rows(html: str) -> list[list[str]]:
    body = html.split("<tbody>")[-1]
    return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)]


DP = DPTraining(noise_multiplier=1.1, l2_clip=0.8, delta=1e-5)


def test_with_dp_and_secure_aggregation_each_sites_epsilon_and_budget_is_shown():
    privacy = RunPrivacy(
        secure_aggregation=True,
        dropouts_recovered=1,
        dp=DP,
        sites={
            "bank-a": SitePrivacy(
                rounds_charged=2,
                delta=1e-5,
                epsilon_run=2.14171542,
                noise_multiplier=1.1,
                l2_clip=0.8,
                epsilon_limit=3.0,
                epsilon_spent=2.5,
                epsilon_remaining=0.5,
            ),
            "bank-b": SitePrivacy(rounds_charged=3, delta=1e-6, epsilon_run=1.25),
        },
    )
    html = section(report.render_html(sample_run_metrics(privacy)))
    settings = pairs(html)
    assert settings["secure aggregation"] == "on" and settings["dropouts recovered"] == "1"
    assert settings["differential privacy (DP-SGD)"] == "on"
    assert settings["noise multiplier σ"] == "1.1000" and settings["clipping norm C"] == "0.8000"
    assert settings["δ"] == "1e-05"
    assert rows(html) == [
        ["bank-a", "2", "1e-05", "2.1417", "2.5000", "3.0000", "0.5000"],
        ["bank-b", "3", "1e-06", "1.2500", "—", "—", "—"],  # no budget reported: no ledger columns
    ]
    assert "composed" in html


def test_with_dp_off_the_section_says_so_without_a_table():
    html = section(report.render_html(sample_run_metrics(RunPrivacy(secure_aggregation=False))))
    settings = pairs(html)
    assert settings == {
        "secure aggregation": "off",
        "dropouts recovered": "not used",
        "differential privacy (DP-SGD)": "off",
    }
    assert "Differential privacy was off in this run" in html
    assert "<thead>" not in html and "ε spent" not in html


def test_secure_aggregation_without_dropouts_shows_zero():
    html = section(report.render_html(sample_run_metrics(RunPrivacy(secure_aggregation=True))))
    assert pairs(html)["dropouts recovered"] == "0"


def test_with_dp_but_no_site_charges_the_section_says_what_is_missing():
    html = section(report.render_html(sample_run_metrics(RunPrivacy(secure_aggregation=False, dp=DP))))
    settings = pairs(html)
    assert settings["differential privacy (DP-SGD)"] == "on" and settings["noise multiplier σ"] == "1.1000"
    assert "Per-site ε is not recorded" in html and "<thead>" not in html


def test_site_names_in_the_section_are_escaped():
    privacy = RunPrivacy(
        secure_aggregation=False,
        dp=DP,
        sites={"<script>alert(1)</script>": SitePrivacy(rounds_charged=1, delta=1e-5, epsilon_run=0.5)},
    )
    html = section(report.render_html(sample_run_metrics(privacy)))
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_through_sites_under_dp_the_report_says_the_statistics_were_a_noisy_release():
    dp = DPTraining(noise_multiplier=1.1, delta=1e-5, statistics_epsilon=0.5)
    privacy = RunPrivacy(
        secure_aggregation=False,
        dp=dp,
        sites={"bank-a": SitePrivacy(rounds_charged=3, delta=1e-5, epsilon_run=2.5)},
    )
    metrics = sample_run_metrics(privacy)
    html = section(report.render_html(metrics))
    key = "statistics ε (one noisy release of each site&#39;s counts, sums and sums of squares)"
    assert pairs(html)[key] == "0.5000"
    assert (
        "the statistics round's noisy release" in html
        and "statistics the model was built with are noisy" in html
    )


def test_a_run_through_sites_shows_the_evaluations_epsilon_and_sigma():
    dp = DPTraining(noise_multiplier=1.1, l2_clip=0.8, delta=1e-5, evaluation_epsilon=1.0)
    privacy = RunPrivacy(secure_aggregation=False, dp=dp, evaluation_noise_multiplier=4.0454)
    metrics = sample_run_metrics(privacy)
    shown = pairs(section(report.render_html(metrics)))
    assert shown["evaluation ε (one noisy release of each site&#39;s score histogram)"] == "1.0000"
    assert shown["evaluation noise σ (calibrated from that ε)"] == "4.0454"


def test_a_secure_runs_rounds_show_the_summed_total_and_each_sites_count_hidden():
    secure_round = RoundMetrics(round=1, partners={"bank-a": {"loss": 0.3}, "bank-b": {}}, samples_total=4321)
    metrics = sample_run_metrics(RunPrivacy(secure_aggregation=True), rounds=[secure_round])
    page = report.render_html(metrics)
    rounds = page.split("<h2>Training rounds</h2>", 1)[1].split("<h2>", 1)[0]
    [row] = rows(rounds)
    assert "4,321" in row[3] or "4321" in row[3]
    assert (
        row[4] == (f"bank-a: {report.HIDDEN_COUNT}, bank-b: {report.HIDDEN_COUNT}")
        and report.HIDDEN_COUNT == "hidden (secure aggregation)"
    )
    # without secure aggregation: each site's stated count, and their sum
    plain_round = RoundMetrics(round=1, partners={"bank-a": {"n": 100}, "bank-b": {"n": 250}})
    plain = sample_run_metrics(RunPrivacy(secure_aggregation=False), rounds=[plain_round])
    [row] = rows(report.render_html(plain).split("<h2>Training rounds</h2>", 1)[1].split("<h2>", 1)[0])
    assert row[3] == "350" and row[4] == "bank-a: 100, bank-b: 250"
