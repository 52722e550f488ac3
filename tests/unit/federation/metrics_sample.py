"""A :class:`RunMetrics` built by hand, shaped as ``publish.run_metrics`` builds it (report input)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lepton_tasks.core.messages import (
    ExclusionKind,
    FinalMetrics,
    Lineage,
    RoundMetrics,
    RunExclusion,
    RunMetrics,
    RunPrivacy,
)

PARTNERS = ["bank-a", "bank-b", "bank-c"]


def block(auc: float | None, n: int = 200, **extra: Any) -> dict[str, Any]:
    """A held-out metric block as ``core.metrics`` computes it."""
    return {
        "n": n,
        "positives": 20,
        "positive_rate": 0.1,
        "auc": auc,
        "pr_auc": None if auc is None else auc - 0.3,
        "accuracy": 0.9,
        "log_loss": 0.25,
        "notes": [],
        **extra,
    }


def sample_run_metrics(privacy: RunPrivacy | None = None, **over: Any) -> RunMetrics:
    """Three sites, two train rounds; bank-c refused round 2. ``over`` replaces top-level fields."""
    rounds = [
        RoundMetrics(
            round=r,
            partners={
                p: {"loss": 0.5 / r + i * 0.01, "auc": 0.8 + 0.03 * r, "n": 800}
                for i, p in enumerate(PARTNERS)
                if not (r == 2 and p == "bank-c")
            },
            excluded={"bank-c": "refused (strategy_not_allowed): trainer timed out"} if r == 2 else {},
        )
        for r in (1, 2)
    ]
    fields: dict[str, Any] = {
        "run_id": "manual__2025-01-01T00-00-00-0a1b2c3d",
        "airflow_run_id": "manual__2025-01-01T00:00:00",
        "consortium": "banks-consortium",
        "dataset": "banks",
        "contract_version": "banks@v1",
        "contract_sha256": "ab" * 32,
        "strategy": "fedprox",
        "min_partners": 2,
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
        "partners": PARTNERS,
        "statistics_round": RoundMetrics(round=0, partners={p: {"n": 800} for p in PARTNERS}),
        "rounds": rounds,
        "final": FinalMetrics(
            per_partner={p: block(0.9 + 0.01 * i) for i, p in enumerate(PARTNERS)},
            overall={**block(0.91, n=600), "method": "score-histogram"},
        ),
        "excluded": {"bank-c (round 2, train)": "refused (strategy_not_allowed): trainer timed out"},
        "exclusions": [
            RunExclusion(
                site="bank-c",
                round=2,
                mode="train",
                kind=ExclusionKind.REFUSED,
                code="strategy_not_allowed",
                reason="trainer timed out",
            )
        ],
        "lineage": Lineage(
            run_id="manual__2025-01-01T00-00-00-0a1b2c3d",
            rounds=2,
            strategy="fedprox",
            contract="banks@v1",
            sites=PARTNERS,
            published_round=2,
            global_weights_sha256="cd" * 32,
        ),
        "privacy": privacy or RunPrivacy(secure_aggregation=False),
        "warnings": ["1 exclusion(s): see the exclusions table"],
        "model_version": 7,
    }
    fields.update(over)
    return RunMetrics(**fields)
