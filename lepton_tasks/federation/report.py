"""The run report: one self-contained ``report.html`` (plots embedded as base64 PNG, no script, no fetch).

:func:`render_report` takes the run's :class:`~lepton_tasks.core.messages.RunMetrics` (``metrics.json``, as
the coordinator writes it; a reader loads the file through the model first, so every field the page reads is
there and typed). The page is the Jinja2 template ``lepton_tasks/templates/run_report.html`` rendered with
autoescape (every value is text, never markup) and ``StrictUndefined``; it carries a Content-Security-Policy
that forbids scripts and remote loads anyway.

The metric blocks (``RoundMetrics.partners``, ``FinalMetrics``) are dicts as returned by
:func:`lepton_tasks.core.metrics.binary_metrics` (``n``, ``positives``, ``positive_rate``, ``auc``,
``pr_auc``, ``accuracy``, ``log_loss``, ``notes``; ``loss`` is read as a synonym of ``log_loss``; an
``overall`` merged from score histograms has ``method``). A key a block lacks is shown as "—"; unknown
keys are ignored.

"What protected this run" reads ``RunMetrics.privacy``. With DP off the section says so in a sentence,
without a table.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lepton_tasks import templates

if TYPE_CHECKING:
    from lepton_tasks.core.messages import RoundMetrics, RunMetrics

REPORT_NAME = "report.html"
TEMPLATE = "run_report.html"
_METRIC_COLUMNS = (
    ("n", "n"),
    ("positives", "positives"),
    ("positive_rate", "positive rate"),
    ("auc", "AUC"),
    ("pr_auc", "PR-AUC"),
    ("accuracy", "accuracy"),
    ("log_loss", "log-loss"),
)


# ---------------------------------------------------------------------------------------------- view model
class Cell(NamedTuple):
    """A table cell as plain text (the template escapes it); ``num``: right-aligned, ``pre``: a JSON block."""

    text: str
    num: bool = False
    pre: bool = False


class Table(NamedTuple):
    header: list[str]
    rows: list[list[Cell]]


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> tuple[str, bool]:
    """A value as ``(plain text, is a JSON block)``: None → —, floats with 4 decimals, containers as JSON."""
    if value is None:
        return "—", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int):
        return str(value), False
    if isinstance(value, float):
        return (f"{value:.4f}" if math.isfinite(value) else str(value)), False
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        try:
            return _text(value.item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, (list, tuple)) and not any(isinstance(v, (Mapping, list, tuple)) for v in value):
        return (", ".join(_text(v)[0] for v in value) if value else "—"), False
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, indent=1, sort_keys=True, default=str), True
    return str(value), False


def _cell(value: Any) -> Cell:
    text, pre = _text(value)
    return Cell(text, num=_is_num(value), pre=pre)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    return Table([str(h) for h in header], [[_cell(v) for v in row] for row in rows])


def _kv(pairs: Sequence[tuple[str, Any]]) -> list[tuple[str, Cell]]:
    return [(str(k), _cell(v)) for k, v in pairs]


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _loss(m: Mapping[str, Any]) -> float | None:
    return _num(m.get("loss", m.get("log_loss")))


def _auc(m: Mapping[str, Any]) -> float | None:
    return _num(m.get("auc"))


# ---------------------------------------------------------------------------------------------- plots
def _plot_label(text: Any) -> str:
    return str(text).replace("$", r"\$")  # keep matplotlib from reading partner names as mathtext


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rounds_plot(rounds: Sequence[RoundMetrics]) -> str | None:
    """Each site's local training loss and AUC per train round."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = [r.round for r in rounds]
    partner_names = sorted({p for r in rounds for p in r.partners})
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    drew = False
    for ax, getter, title in ((axes[0], _loss, "loss"), (axes[1], _auc, "AUC")):
        for name in partner_names:
            vals = [getter(r.partners.get(name, {})) for r in rounds]
            if any(v is not None for v in vals):
                ax.plot(
                    xs,
                    [math.nan if v is None else v for v in vals],
                    ".--",
                    lw=1,
                    alpha=0.8,
                    label=f"{_plot_label(name)} (local training)",
                )
                drew = True
        ax.set_title(f"{title} per round")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig) if drew else None


def _partner_auc_plot(names: list[str], final_pp: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The final global model's held-out AUC at each site."""
    from matplotlib.figure import Figure

    glob = [_auc(final_pp.get(n, {})) for n in names]
    if not any(v is not None for v in glob):
        return None
    fig = Figure(figsize=(max(5.0, 1.0 * len(names) + 2), 3.8))
    ax = fig.subplots()
    pos = list(range(len(names)))
    bars = ax.bar(pos, [math.nan if v is None else v for v in glob], 0.6, label="federated global model")
    ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3f}" for v in glob], fontsize=7, padding=2)
    ax.set_xticks(pos)
    ax.set_xticklabels([_plot_label(n) for n in names], rotation=20 if len(names) > 4 else 0)
    ax.set_ylabel("held-out AUC")
    lows = [v for v in glob if v is not None]
    ax.set_ylim(max(0.0, min(lows) - 0.1) if lows else 0.0, 1.02)
    ax.set_title("AUC per partner: final global model")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- sections
def _noisy_evaluation(metrics: RunMetrics) -> bool:
    """Whether the held-out numbers were merged from noisy histograms: a run with DP, whose evaluation
    answers are Gaussian releases (``site.training.private_evaluation``)."""
    return metrics.privacy.dp is not None


def _summary(metrics: RunMetrics) -> list[tuple[str, Cell]]:
    overall = metrics.final.overall
    pairs: list[tuple[str, Any]] = [
        ("run id", metrics.run_id),
        ("dataset", metrics.dataset),
        ("contract version", metrics.contract_version),
        ("strategy", metrics.strategy),
        ("rounds", len(metrics.rounds)),
        ("partners", ", ".join(metrics.partners)),
        ("min partners", metrics.min_partners),
        ("model version", metrics.model_version),
        ("trainer runtime", metrics.runtime),
        ("created at", metrics.created_at.isoformat()),
    ]
    if overall.get("auc") is not None:
        pairs.append((f"overall AUC ({overall.get('method', 'pooled')})", overall["auc"]))
    for key, label in (
        ("pr_auc", "overall PR-AUC"),
        ("accuracy", "overall accuracy"),
        ("log_loss", "overall log-loss"),
        ("n", "held-out samples"),
    ):
        if overall.get(key) is not None:
            pairs.append((label, overall[key]))
    if _noisy_evaluation(metrics):  # the overall numbers above are DP estimates, not exact values
        noisy = ("overall", "held-out")
        pairs = [(f"{k} (noisy: DP)" if k.startswith(noisy) else k, v) for k, v in pairs]
    return _kv([(k, v) for k, v in pairs if v is not None])


def _lineage(metrics: RunMetrics) -> list[tuple[str, Cell]]:
    lineage = metrics.lineage
    return _kv(
        [
            ("run id", lineage.run_id),
            ("dataset", metrics.dataset),
            ("contract", lineage.contract),
            ("strategy", lineage.strategy),
            ("rounds", lineage.rounds),
            ("sites that trained it", lineage.sites),
            ("published round", lineage.published_round),
            ("global weights sha256", lineage.global_weights_sha256),
            ("model version", metrics.model_version),
        ]
    )


def _partner_table(names: list[str], final_pp: Mapping[str, Mapping[str, Any]]) -> Table:
    header = ["partner"] + [label for _, label in _METRIC_COLUMNS] + ["notes"]
    rows = []
    for name in names:
        m = final_pp.get(name, {})
        row = [name] + [m.get(k, m.get("loss") if k == "log_loss" else None) for k, _ in _METRIC_COLUMNS]
        notes = m.get("notes")
        row.append("; ".join(map(str, notes)) if isinstance(notes, list) and notes else None)
        rows.append(row)
    return _table(header, rows)


#: what the report shows for a site's training sample count in a secure run (it never crossed on its own)
HIDDEN_COUNT = "hidden (secure aggregation)"


def _samples(r: RoundMetrics, secure: bool) -> tuple[Any, str | None]:
    """A round's training samples: (the total, per site). Under secure aggregation the total is the
    unmasked sum's (``samples_total``) and each site's count is :data:`HIDDEN_COUNT`; otherwise the
    sites' stated counts and their sum."""
    if secure or r.samples_total is not None:
        per_site = ", ".join(f"{p}: {HIDDEN_COUNT}" for p in sorted(r.partners)) or None
        return r.samples_total, per_site
    counts = {p: _num(m.get("n")) for p, m in sorted(r.partners.items())}
    per_site = ", ".join(f"{p}: {int(n)}" for p, n in counts.items() if n is not None) or None
    return sum(int(n or 0) for n in counts.values()) or None, per_site


def _rounds_table(rounds: Sequence[RoundMetrics], *, secure: bool = False) -> Table:
    rows = []
    for r in rounds:
        total, per_site = _samples(r, secure)
        rows.append(
            [
                r.round,
                ", ".join(sorted(r.partners)) or None,
                "; ".join(f"{p}: {reason}" for p, reason in r.excluded.items()) or None,
                total,
                per_site,
            ]
        )
    return _table(
        [
            "round",
            "partners trained",
            "excluded (reason)",
            "training samples",
            "training samples per site",
        ],
        rows,
    )


def _small(value: float | None) -> str | None:
    """A probability such as delta, readable (``1e-05``), or None."""
    return None if value is None else f"{value:g}"


def _protection(metrics: RunMetrics) -> dict[str, Any]:
    """The "What protected this run" section: secure aggregation, DP-SGD settings, each site's budget."""
    priv = metrics.privacy
    dp = priv.dp
    if priv.secure_aggregation:
        secagg_text, dropouts = "on", str(priv.dropouts_recovered or 0)
    else:
        secagg_text, dropouts = "off", "not used"
    pairs: list[tuple[str, Any]] = [
        ("secure aggregation", secagg_text),
        ("dropouts recovered", dropouts),
        ("differential privacy (DP-SGD)", "on" if dp else "off"),
    ]
    sites_table = None
    if dp is not None:
        pairs += [
            ("noise multiplier σ", dp.noise_multiplier),
            ("clipping norm C", dp.l2_clip),
            ("δ", _small(dp.delta)),
            ("evaluation ε (one noisy release of each site's score histogram)", dp.evaluation_epsilon),
            ("evaluation noise σ (calibrated from that ε)", priv.evaluation_noise_multiplier),
            (  # federation.private_statistics: the statistics round under DP is never exact
                "statistics ε (one noisy release of each site's counts, sums and sums of squares)",
                dp.statistics_epsilon,
            ),
        ]
        rows = [
            [
                name,
                s.rounds_charged,
                _small(s.delta),
                s.epsilon_run,
                s.epsilon_spent,
                s.epsilon_limit,
                s.epsilon_remaining,
            ]
            for name, s in sorted(priv.sites.items())
        ]
        if rows:
            sites_table = _table(
                [
                    "site",
                    "rounds charged",
                    "δ",
                    "ε spent in this run",
                    "ε spent in total (site's ledger)",
                    "ε limit",
                    "ε remaining",
                ],
                rows,
            )
    return {
        "dp": dp is not None,
        "pairs": _kv([(k, v) for k, v in pairs if v is not None]),
        "sites": sites_table,
    }


# ---------------------------------------------------------------------------------------------- entry point
def _context(metrics: RunMetrics) -> dict[str, Any]:
    """The template's variables for ``metrics``: plain text, numbers and :class:`Cell`/:class:`Table`."""
    final_pp = metrics.final.per_partner
    overall = metrics.final.overall
    names = [p for p in metrics.partners if p in final_pp] + sorted(set(final_pp) - set(metrics.partners))
    secure = metrics.privacy.secure_aggregation
    return {
        "title": f"Lepton run {metrics.run_id}",
        "dataset": metrics.dataset,
        "strategy": metrics.strategy,
        "warnings": list(metrics.warnings),
        "exclusions": sorted(metrics.excluded.items()),
        "summary": _summary(metrics),
        "protection": _protection(metrics),
        "overall_notes": "; ".join(map(str, overall["notes"])) if overall.get("notes") else None,
        "rounds_plot": _rounds_plot(metrics.rounds) if metrics.rounds else None,
        "rounds_table": _rounds_table(metrics.rounds, secure=secure) if metrics.rounds else None,
        "partner_plot": _partner_auc_plot(names, final_pp) if names else None,
        "partner_table": _partner_table(names, final_pp) if names else None,
        "lineage": _lineage(metrics),
    }


def render_html(metrics: RunMetrics) -> str:
    """The report page for ``metrics`` as an HTML string."""
    return templates.render(TEMPLATE, **_context(metrics))


def render_report(metrics: RunMetrics, out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` for ``metrics`` (atomically: a reader never sees half a page)."""
    page = render_html(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / REPORT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
