"""The statistics round under DP (``federation.private_statistics``): sensitivity, noise, charge.

Numbers (banks contract: ``balance`` clipped to [0, 5000], ``income`` to [0, 250000], ``student`` No/Yes,
labels No/Yes): K = 9 blocks (rows, labels, 3 per numeric feature, 1 per categorical one), so an entry of
block b gets noise of std sigma x 3 x Delta_b. Sums are centred on the range's midpoint m, so one record moves
a sum by at most the half-width h (2500 and 125,000) and a sum of squares by h^2.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lepton_tasks.core import privacy
from lepton_tasks.core.contracts import Contract, load_contract
from lepton_tasks.core.features import (
    CategoricalStats,
    GlobalStats,
    NumericStats,
    SufficientStats,
    merge,
)
from lepton_tasks.core.messages import DPTraining, PrivacyCharge, RoundAnswer
from lepton_tasks.federation import private_statistics as ps
from lepton_tasks.federation.coordinator import RunSetupError
from lepton_tasks.federation.secagg_round import StatisticsCodec, statistics_layout
from tests.unit.federation.test_secure_rounds import HP, _start, world  # noqa: F401  (the fixture)

DELTA = 1e-5


@pytest.fixture(scope="module")
def banks() -> Contract:
    return load_contract("banks")


def _frame(rows: list[tuple[float, float, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(len(rows))],
            "student": pd.Series([r[2] for r in rows], dtype="str"),
            "balance": [r[0] for r in rows],
            "income": [r[1] for r in rows],
            "default": pd.Series([r[3] for r in rows], dtype="str"),
        }
    )


def _big(banks: Contract, n: int = 1_000_000) -> SufficientStats:
    """Exact statistics far from every clamp: means off the range's midpoint, variances well above zero."""
    return SufficientStats(
        dataset=banks.name,
        contract_version=banks.version,
        rows=n,
        numeric={
            "balance": NumericStats(count=n, sum=1000.0 * n, sum_sq=(1000.0**2 + 1000.0**2) * n),
            "income": NumericStats(count=n, sum=60_000.0 * n, sum_sq=(60_000.0**2 + 30_000.0**2) * n),
        },
        categorical={"student": CategoricalStats(counts={"No": n // 2, "Yes": n // 2})},
        label_counts={"No": n // 2, "Yes": n // 2},
    )


# ------------------------------------------------------------------------------------------ sensitivity


def test_the_blocks_and_their_per_record_bounds(banks):
    assert [(b.name, b.sensitivity) for b in ps.blocks(banks)] == [
        ("rows", 1.0),
        ("labels", 1.0),
        ("balance.count", 1.0),
        ("balance.sum", 2500.0),
        ("balance.sum_sq", 6.25e6),
        ("income.count", 1.0),
        ("income.sum", 125_000.0),
        ("income.sum_sq", 15.625e9),
        ("student", 1.0),
    ]
    assert ps.noise_std(banks, 2.0) == {b.name: 2.0 * 3 * b.sensitivity for b in ps.blocks(banks)}
    # the same bounds secure aggregation scales the sums by
    assert statistics_layout(banks).bounds == {"balance": 5000.0, "income": 250_000.0}


@pytest.mark.parametrize(
    "record",
    [
        (5000.0, 250_000.0, "Yes", "Yes"),  # every value at an end of its range: the worst case, exactly 1
        (0.0, 0.0, "No", "No"),  # the other end: as far from the midpoint
        (1234.5, 99_999.0, "No", "Yes"),
        (None, None, None, "No"),  # missing values count as nulls
    ],
)
def test_one_record_moves_the_scaled_vector_by_at_most_one(banks, record):
    base = [(100.0, 20_000.0, "No", "No"), (4000.0, 180_000.0, "Yes", "Yes"), (0.0, 0.0, "No", "No")]
    without = SufficientStats.from_frame(_frame(base), banks)
    with_it = SufficientStats.from_frame(_frame([*base, record]), banks)
    moved = float(np.linalg.norm(ps.scaled(with_it, banks) - ps.scaled(without, banks)))
    assert moved <= 1.0 + 1e-12
    if record[0] in (0.0, 5000.0):
        assert moved == pytest.approx(1.0, rel=1e-9)  # the bound is tight: no block is over-scaled


def test_cleaning_clips_so_a_value_beyond_the_bound_moves_it_no_more(banks):
    from lepton_tasks.ingest.clean import Cleaner

    base = _frame([(100.0, 20_000.0, "No", "No")])
    extreme = _frame([(100.0, 20_000.0, "No", "No"), (9e9, 7e12, "Yes", "Yes")])
    cleaned = [Cleaner(banks).apply(f) for f in (base, extreme)]
    a, b = (SufficientStats.from_frame(f, banks) for f in cleaned)
    assert float(np.linalg.norm(ps.scaled(b, banks) - ps.scaled(a, banks))) == pytest.approx(1.0, rel=1e-9)
    unclipped = SufficientStats.from_frame(extreme, banks)  # what the clip prevents
    assert float(np.linalg.norm(ps.scaled(unclipped, banks) - ps.scaled(a, banks))) > 1e3


def test_statistics_no_bounded_records_could_produce_are_never_released(banks):
    stats = SufficientStats.from_frame(_frame([(100.0, 20_000.0, "No", "No")]), banks)
    stats.numeric["income"] = NumericStats(count=1, sum=300_000.0, sum_sq=9e10)  # beyond the clip
    with pytest.raises(ValueError, match="numeric feature 'income' exceed count x its declared range"):
        ps.noisy_statistics(stats, banks, 1.0, rng=np.random.default_rng(0))


def test_a_contract_whose_ranges_ingest_does_not_enforce_is_refused_naming_the_columns(banks):
    hospitals = load_contract("hospitals")  # min only: no upper bound
    with pytest.raises(ps.UnboundedStatistics, match="'mean_radius', 'mean_texture'"):
        ps.blocks(hospitals)
    document = banks.document()
    document["columns"]["income"].update(clip=None, min=0, max=250_000, critical=False)
    loose = Contract.model_validate(document)  # a non-critical range lets out-of-range values through
    assert ps.unbounded_columns(loose) == ["income"]
    document["columns"]["income"]["critical"] = True  # validation quarantines any drop outside it
    assert ps.unbounded_columns(Contract.model_validate(document)) == []


# ------------------------------------------------------------------------------------------------ noise


def test_the_noise_has_the_calibrated_std_on_every_block(banks):
    exact, sigma, draws = _big(banks), 1.5, 3000
    rng = np.random.default_rng(20261202)
    std = ps.noise_std(banks, sigma)
    base = ps.dense(exact, banks)
    errors: dict[str, list[np.ndarray]] = {b: [] for b in base}
    for _ in range(draws):
        noisy = ps.dense(ps.noisy_statistics(exact, banks, sigma, rng=rng), banks)
        for b in base:
            errors[b].append(noisy[b] - base[b])
    for b, errs in errors.items():
        far = np.abs(base[b]) > 10 * std[b]  # entries the clamp at 0 cannot reach (the zero ones are clamped)
        assert far.any(), b
        e = np.concatenate([err[far] for err in errs])
        # counts are rounded (+1/12 variance); 3000 draws: the std estimate is within ~2.6% (2 s.e.)
        expected = math.sqrt(std[b] ** 2 + (1 / 12 if std[b] < 100 else 0.0))
        assert float(np.std(e)) == pytest.approx(expected, rel=0.05), b
        assert abs(float(np.mean(e))) < 4 * expected / math.sqrt(e.size), b


def test_every_entry_gets_noise_empty_categories_included(banks):
    exact = _big(banks, 10_000)
    exact.categorical["student"] = CategoricalStats(counts={"No": 10_000})  # no "Yes" at all
    seen_yes = [
        "Yes"
        in ps.noisy_statistics(exact, banks, 1.0, rng=np.random.default_rng(s)).categorical["student"].counts
        for s in range(40)
    ]
    assert any(seen_yes) and not all(seen_yes)  # sometimes a noisy positive count, sometimes clamped to 0


def test_the_noisy_statistics_fit_the_secure_codec_and_normalize(banks):
    tiny = SufficientStats.from_frame(_frame([(10.0, 1000.0, "No", "No")]), banks)
    codec = StatisticsCodec(banks, statistics_layout(banks), max_sites=3)
    for seed in range(30):
        noisy = ps.noisy_statistics(tiny, banks, 1.0, rng=np.random.default_rng(seed))
        codec.encode(noisy)  # counts in [0, max_rows], sums within max_rows x bound: accepted
        for c, (lo, hi) in {"balance": (0, 5000), "income": (0, 250_000)}.items():
            n = noisy.numeric[c]
            assert n.count >= 0 and lo * n.count <= n.sum <= hi * n.count
            assert n.count == 0 or n.sum_sq >= n.sum**2 / n.count * (1 - 1e-12)
        g = GlobalStats.from_stats(merge([noisy, noisy]), banks)
        assert all(math.isfinite(s.mean) and s.std > 0 for s in g.numeric.values())


def test_the_default_generator_is_not_seeded_by_the_data(banks):
    exact = _big(banks, 10_000)
    assert ps.noisy_statistics(exact, banks, 1.0) != ps.noisy_statistics(exact, banks, 1.0)


# ------------------------------------------------------------------------------------------------ charge


def test_the_charge_is_one_gaussian_release_at_the_calibrated_sigma():
    dp = DPTraining(noise_multiplier=1.1, statistics_epsilon=1.0, delta=DELTA)
    sigma = ps.statistics_sigma(dp)
    entry = ps.statistics_charge(dp, run_id="run-1", round=0, dataset="banks")
    assert (entry.noise_multiplier, entry.sampling_rate, entry.steps, entry.release) == (
        sigma,
        1.0,
        1,
        "statistics",
    )
    # GaussianDpEvent(sigma): RDP alpha / (2 sigma^2), converted by the ledger's conversion
    reference = np.array([a / (2 * sigma**2) for a in privacy.DEFAULT_ORDERS])
    eps = privacy.rdp_to_epsilon(privacy.DEFAULT_ORDERS, reference, DELTA)[0]
    assert privacy.epsilon_of([entry], DELTA) == pytest.approx(eps, rel=1e-12)
    assert 0.999 * dp.statistics_epsilon <= eps <= dp.statistics_epsilon  # the smallest sigma within ε


def test_the_charge_composes_with_dp_sgd_as_the_reference_rdp_sum():
    dp = DPTraining(noise_multiplier=1.1, statistics_epsilon=0.5, delta=DELTA)
    stats = ps.statistics_charge(dp, run_id="run-1", round=0, dataset="banks")
    sgd = privacy.ledger_charge(
        privacy.planned_charge(dp, 1200, 32, 2), run_id="run-1", round=1, dataset="banks"
    )
    sigma = stats.noise_multiplier
    reference = privacy.rdp_curve(sgd.noise_multiplier, sgd.sampling_rate, sgd.steps) + np.array(
        [a / (2 * sigma**2) for a in privacy.DEFAULT_ORDERS]
    )
    composed = privacy.epsilon_of([stats, sgd], DELTA)
    assert composed == pytest.approx(privacy.rdp_to_epsilon(privacy.DEFAULT_ORDERS, reference, DELTA)[0])
    assert privacy.epsilon_of([sgd], DELTA) < composed < privacy.epsilon_of([sgd], DELTA) + 0.5


def test_the_run_epsilon_in_the_report_includes_the_statistics_release():
    dp = DPTraining(noise_multiplier=1.1, statistics_epsilon=0.5, delta=DELTA)
    stats_cost = privacy.gaussian_privacy_charge(ps.statistics_sigma(dp), DELTA)
    train_cost = privacy.planned_charge(dp, 1200, 32, 2)
    answers = {
        "bank-a": [
            RoundAnswer(mode="statistics", n_samples=1200, privacy=stats_cost),
            RoundAnswer(mode="train", n_samples=1200, privacy=train_cost),
        ]
    }
    site = privacy.run_privacy(answers, dp=dp, secure_aggregation=False).sites["bank-a"]
    assert site.rounds_charged == 2
    assert site.epsilon_run == pytest.approx(privacy.epsilon_of([stats_cost, train_cost], DELTA))
    assert site.epsilon_run > privacy.epsilon_of([train_cost], DELTA)
    assert isinstance(stats_cost, PrivacyCharge) and stats_cost.l2_clip == 1.0  # the scaled sensitivity


# ------------------------------------------------------------------------------------------ run setup


def test_a_dp_run_on_a_contract_without_enforced_ranges_is_refused_before_it_starts(world):  # noqa: F811
    dp_hparams = HP.model_copy(update={"dp": DPTraining(noise_multiplier=1.1)})
    with pytest.raises(RunSetupError, match=r"numeric feature\(s\) 'mean_radius', .* Declare `clip`"):
        _start(world, dataset="hospitals", hparams=dp_hparams, secure_aggregation=False)
    assert world[0].puts() == []  # nothing written: no spec, no job
    assert not _start(world, dataset="hospitals", secure_aggregation=False).secure_aggregation  # without DP
    assert _start(world, hparams=dp_hparams).hparams.dp is not None  # banks: every range is clipped
