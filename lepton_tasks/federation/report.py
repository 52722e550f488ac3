"""The run report: one self-contained ``report.html`` (plots embedded as base64 PNG, no script, no fetch).

:func:`render_report` takes the run's metrics dict. Every part but ``run_id`` is optional; a missing part is
shown as "not available", never an error. The page is the Jinja2 template
``lepton_tasks/templates/run_report.html`` rendered with autoescape (every value is text, never markup) and
``StrictUndefined``; it carries a Content-Security-Policy that forbids scripts and remote loads anyway.

Metrics schema (``metrics``)::

    {
      "run_id": str,                      # required
      "dataset": str, "contract_version": str | int, "strategy": str,   # e.g. "fedavg", "fedprox(mu=0.01)"
      "model_version": str, "runtime": "docker" | "local",             # "local" adds a warning
      "created_at": str,                  # ISO time of the run (the caller's logical date, not now())
      "partners": [str, ...],             # defaults to the partners seen in the metrics
      "rounds": [                         # one entry per federated round, in order
        {"round": int,
         "partners": {name: {"loss", "auc", "n", ...}},   # each partner's local training metrics
         "samples_total": int,            # secure aggregation: the unmasked sum's count (no per-site n)
         "excluded": {name: reason} | [name | {"partner": name, "reason": str}, ...],  # name: "no update"
         "global": {"loss" | "log_loss", "auc", "pr_auc", "accuracy", "n", ...}},   # global model, held-out
        ...],
      "final": {"per_partner": {name: metrics}, "overall": metrics},   # final global model on each holdout
      "local_only": {name: metrics} | {"per_partner": {name: metrics}, "overall": metrics},
      "centralized": metrics | {"overall": metrics, "per_partner": {...}},  # reference only, demo only
      "lineage": {"drops": {partner: [sha256 | {"drop_id", "sha256" | "drop_sha256", ...}]},
                  <any key>: <JSON value>, ...},
      "warnings": [str, ...],
      "hparams": {"dp_noise_multiplier": float | None, "dp_l2_clip": float, "dp_delta": float, ...},
      "privacy": {                        # RunMetrics.privacy (core.privacy.run_privacy)
        "secure_aggregation": bool, "dropouts_recovered": int | None,
        "dp": {"noise_multiplier", "l2_clip", "delta", "evaluation_epsilon"} | None,
        "evaluation_noise_multiplier": float | None,   # through sites: the evaluation release's sigma
        "sites": {name: {"rounds_charged", "delta", "epsilon_run", "noise_multiplier", "l2_clip",
                         "epsilon_limit", "epsilon_spent", "epsilon_remaining"}}},
    }

where ``metrics`` is a dict as returned by :func:`lepton_tasks.core.metrics.binary_metrics` (``n``,
``positives``, ``positive_rate``, ``auc``, ``pr_auc``, ``accuracy``, ``log_loss``, ``notes``; ``loss`` is read
as a synonym of ``log_loss``; an ``overall`` from :func:`lepton_tasks.core.metrics.weighted_overall` has
``auc_weighted_mean`` instead of ``auc`` and is labelled so). Unknown keys are ignored. A drop given only by
its SHA-256 (as a lineage may record it) is shown with the drop id
derived from it, as :func:`lepton_tasks.ingest.stage.drop_id_of` names drops.

"What protected this run" reads ``privacy``; without it (metrics written before it existed) the DP-SGD
settings come from ``hparams`` and per-site epsilons are "not recorded" (each round's ``dp_epsilon`` is that
update's alone: summing them would over-state the run's cost, and composing them needs the charges). With DP
off the section says so in a sentence, without a table.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lepton_tasks import templates

REPORT_NAME = "report.html"
TEMPLATE = "run_report.html"
CENTRALIZED_LABEL = "centralized reference (not available in a real federation)"
_METRIC_COLUMNS = (
    ("n", "n"),
    ("positives", "positives"),
    ("positive_rate", "positive rate"),
    ("auc", "AUC"),
    ("pr_auc", "PR-AUC"),
    ("accuracy", "accuracy"),
    ("log_loss", "log-loss"),
)
#: a drop's id is the first 16 hex digits of its SHA-256 (lepton_tasks.ingest.stage.drop_id_of; not imported:
#: that module pulls in the storage and Vault adapters)
DROP_ID_DIGITS = 16
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
NO_UPDATE = "no update"


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


def _dict(value: Any) -> dict:
    return dict(value) if isinstance(value, Mapping) else {}


def _loss(m: Mapping[str, Any]) -> float | None:
    return _num(m.get("loss", m.get("log_loss")))


def _auc(m: Mapping[str, Any]) -> float | None:
    return _num(m.get("auc", m.get("auc_weighted_mean")))


def _split(section: Any) -> tuple[dict[str, dict], dict]:
    """(per_partner, overall) of a ``local_only``/``centralized`` section in either accepted shape."""
    section = _dict(section)
    if "per_partner" in section or "overall" in section:
        return {str(k): _dict(v) for k, v in _dict(section.get("per_partner")).items()}, _dict(
            section.get("overall")
        )
    if "auc" in section or "n" in section or "log_loss" in section:
        return {}, section
    return {str(k): _dict(v) for k, v in section.items() if isinstance(v, Mapping)}, {}


def excluded_reasons(excluded: Any) -> list[tuple[str, str]]:
    """``[(partner, reason)]`` of a round's ``excluded``: a ``{partner: reason}`` mapping, or a list of names
    (reason "no update": the partner sent none) and/or ``{"partner", "reason"}`` dicts."""
    if isinstance(excluded, Mapping):
        return [(str(p), "no reason given" if r is None else str(r)) for p, r in excluded.items()]
    out = []
    for e in excluded or []:
        if isinstance(e, Mapping):
            out.append((str(e.get("partner", "?")), str(e.get("reason", "no reason given"))))
        else:
            out.append((str(e), NO_UPDATE))
    return out


def _drop_id(sha256: Any) -> str | None:
    """The drop id of a drop's SHA-256 hex digest (None for anything else)."""
    if isinstance(sha256, str) and _SHA256_HEX.fullmatch(sha256.lower()):
        return sha256.lower()[:DROP_ID_DIGITS]
    return None


# ---------------------------------------------------------------------------------------------- plots
def _plot_label(text: Any) -> str:
    return str(text).replace("$", r"\$")  # keep matplotlib from reading partner names as mathtext


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rounds_plot(rounds: list[dict]) -> str | None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    xs = [r.get("round", i + 1) for i, r in enumerate(rounds)]
    partner_names = sorted({str(p) for r in rounds for p in _dict(r.get("partners"))})
    series: list[tuple[str, int, str]] = [("loss", 0, "loss"), ("auc", 1, "AUC")]
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    drew = False
    for key, col, title in series:
        ax = axes[col]
        getter = _loss if key == "loss" else _auc
        glob = [getter(_dict(r.get("global"))) for r in rounds]
        if any(v is not None for v in glob):
            ax.plot(
                xs,
                [math.nan if v is None else v for v in glob],
                "o-",
                color="black",
                lw=2.2,
                label="global model (held-out)",
            )
            drew = True
        for name in partner_names:
            vals = [getter(_dict(_dict(r.get("partners")).get(name))) for r in rounds]
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


def _partner_auc_plot(names: list[str], final_pp: dict, local_pp: dict, central_overall: dict) -> str | None:
    from matplotlib.figure import Figure

    glob = [_auc(final_pp.get(n, {})) for n in names]
    local = [_auc(local_pp.get(n, {})) for n in names]
    central = _auc(central_overall)
    if not any(v is not None for v in glob + local):
        return None
    fig = Figure(figsize=(max(5.0, 1.3 * len(names) + 2), 3.8))
    ax = fig.subplots()
    width = 0.38
    pos = list(range(len(names)))
    for offset, values, label in (
        (-width / 2, glob, "federated global model"),
        (width / 2, local, "local-only model"),
    ):
        bars = ax.bar(
            [p + offset for p in pos], [math.nan if v is None else v for v in values], width, label=label
        )
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3f}" for v in values], fontsize=7, padding=2)
    if central is not None:
        ax.axhline(central, color="crimson", ls="--", lw=1.5, label=f"{CENTRALIZED_LABEL}: {central:.3f}")
    ax.set_xticks(pos)
    ax.set_xticklabels([_plot_label(n) for n in names], rotation=20 if len(names) > 4 else 0)
    ax.set_ylabel("held-out AUC")
    lows = [v for v in glob + local + [central] if v is not None]
    ax.set_ylim(max(0.0, min(lows) - 0.1) if lows else 0.0, 1.02)
    ax.set_title("AUC per partner: federated vs local-only")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- sections
def _noisy_evaluation(metrics: Mapping[str, Any]) -> bool:
    """Whether the held-out numbers were merged from noisy histograms: a run through sites with DP, whose
    evaluation answers are Gaussian releases (``site.training.private_evaluation``)."""
    return metrics.get("runtime") == "sites" and bool(_dict(metrics.get("privacy")).get("dp"))


def _secure(metrics: Mapping[str, Any]) -> bool:
    """Whether the run used secure aggregation (its sites' training sample counts never crossed alone)."""
    return _dict(metrics.get("privacy")).get("secure_aggregation") is True


def _summary(
    metrics: Mapping[str, Any], rounds: list[dict], partners: list[str], overall: dict
) -> list[tuple[str, Cell]]:
    pairs = [
        ("run id", metrics.get("run_id")),
        ("dataset", metrics.get("dataset")),
        ("contract version", metrics.get("contract_version")),
        ("strategy", metrics.get("strategy")),
        ("rounds", len(rounds) if rounds else _dict(metrics.get("lineage")).get("rounds")),
        ("partners", ", ".join(partners) if partners else None),
        ("model version", metrics.get("model_version")),
        ("trainer runtime", metrics.get("runtime")),
        ("created at", metrics.get("created_at")),
    ]
    if overall:
        auc = overall.get("auc")
        if auc is not None:
            pairs.append((f"overall AUC ({overall.get('method', 'pooled')})", auc))
        elif overall.get("auc_weighted_mean") is not None:
            pairs.append(
                (
                    "overall AUC (sample-weighted mean of partner AUCs, approximate)",
                    overall["auc_weighted_mean"],
                )
            )
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


def _drop_rows(drops: Mapping[str, Any]) -> tuple[list[list[Any]], bool]:
    """Rows (partner, drop id, sha256, details) of the lineage's drops, and whether a drop id was derived."""
    rows, derived = [], False
    for partner, items in drops.items():
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, Mapping):
                sha = item.get("sha256", item.get("drop_sha256"))
                drop_id = item.get("drop_id")
                extra = {k: v for k, v in item.items() if k not in {"drop_id", "sha256", "drop_sha256"}}
            else:
                sha, drop_id, extra = item, None, None
            if drop_id is None and (drop_id := _drop_id(sha)) is not None:
                derived = True
            rows.append([partner, drop_id, sha, extra or None])
    return rows, derived


def _lineage(metrics: Mapping[str, Any], rounds: list[dict], partners: list[str]) -> dict[str, Any]:
    lineage = _dict(metrics.get("lineage"))
    pairs: list[tuple[str, Any]] = []
    for key in ("run_id", "dataset", "contract_version", "strategy", "model_version"):
        value = lineage.get(key, metrics.get(key))
        if value is not None:
            pairs.append((key.replace("_", " "), value))
    pairs.append(("rounds", lineage.get("rounds", len(rounds) if rounds else None)))
    pairs.append(("partners", lineage.get("partners", partners or None)))
    shown = {
        "run_id",
        "dataset",
        "contract_version",
        "strategy",
        "model_version",
        "rounds",
        "partners",
        "drops",
    }
    drops = lineage.get("drops")
    if drops is not None and not (isinstance(drops, Mapping) and drops):
        pairs.append(("drops", drops))
    table, derived = None, False
    if isinstance(drops, Mapping) and drops:
        rows, derived = _drop_rows(drops)
        table = _table(["partner", "drop id", "sha256", "details"], rows)
    other = [(k, v) for k, v in lineage.items() if k not in shown]
    return {
        "pairs": _kv(pairs),
        "drops": table,
        "derived_drop_ids": derived,
        "drop_id_digits": DROP_ID_DIGITS,
        "other": _kv(other) if other else None,
    }


def _partner_table(names: list[str], final_pp: dict, local_pp: dict, central_pp: dict) -> Table:
    header = (
        ["partner"] + [label for _, label in _METRIC_COLUMNS] + ["local-only AUC", "Δ AUC (global − local)"]
    )
    if central_pp:
        header.append("centralized AUC (reference)")
    header.append("notes")
    rows = []
    for name in names:
        m = final_pp.get(name, {})
        g, loc = _auc(m), _auc(local_pp.get(name, {}))
        row = [name] + [m.get(k, m.get("loss") if k == "log_loss" else None) for k, _ in _METRIC_COLUMNS]
        row += [loc, (g - loc) if g is not None and loc is not None else None]
        if central_pp:
            row.append(_auc(central_pp.get(name, {})))
        notes = m.get("notes")
        row.append("; ".join(map(str, notes)) if isinstance(notes, list) and notes else None)
        rows.append(row)
    return _table(header, rows)


#: what the report shows for a site's training sample count in a secure run (it never crossed on its own)
HIDDEN_COUNT = "hidden (secure aggregation)"


def _samples(r: Mapping[str, Any], secure: bool) -> tuple[Any, str | None]:
    """A round's training samples: (the total, per site). Under secure aggregation the total is the
    unmasked sum's (``samples_total``) and each site's count is :data:`HIDDEN_COUNT`; otherwise the
    sites' stated counts and their sum."""
    partners = {str(k): _dict(m) for k, m in _dict(r.get("partners")).items()}
    if secure or r.get("samples_total") is not None:
        per_site = ", ".join(f"{p}: {HIDDEN_COUNT}" for p in sorted(partners)) or None
        return _num(r.get("samples_total")), per_site
    counts = {p: _num(m.get("n")) for p, m in sorted(partners.items())}
    per_site = ", ".join(f"{p}: {int(n)}" for p, n in counts.items() if n is not None) or None
    return sum(int(n or 0) for n in counts.values()) or None, per_site


def _rounds_table(rounds: list[dict], *, secure: bool = False) -> Table:
    rows = []
    for i, r in enumerate(rounds):
        excluded = [f"{p}: {reason}" for p, reason in excluded_reasons(r.get("excluded"))]
        g = _dict(r.get("global"))
        total, per_site = _samples(r, secure)
        rows.append(
            [
                r.get("round", i + 1),
                ", ".join(sorted(map(str, _dict(r.get("partners"))))) or None,
                "; ".join(excluded) or None,
                total,
                per_site,
                _loss(g),
                _auc(g),
            ]
        )
    return _table(
        [
            "round",
            "partners trained",
            "excluded (reason)",
            "training samples",
            "training samples per site",
            "global loss",
            "global AUC",
        ],
        rows,
    )


def _warnings(metrics: Mapping[str, Any]) -> list[str]:
    out = [str(w) for w in metrics.get("warnings") or [] if w is not None]
    runtime = metrics.get("runtime")
    if isinstance(runtime, str) and runtime.lower() == "local":
        msg = "The trainer ran with the LOCAL runtime, not Docker: partner isolation was not enforced."
        if not any("LOCAL runtime" in w for w in out):
            out.append(msg)
    return out


def _small(value: Any) -> str | None:
    """A probability such as delta, readable (``1e-05``), or None."""
    f = _num(value)
    return None if f is None else f"{f:g}"


def _protection(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The "What protected this run" section: secure aggregation, DP-SGD settings, each site's budget."""
    recorded = isinstance(metrics.get("privacy"), Mapping)
    priv = _dict(metrics.get("privacy"))
    hp = _dict(metrics.get("hparams"))
    dp = _dict(priv.get("dp")) if recorded else {}
    if not recorded and _num(hp.get("dp_noise_multiplier")) is not None:
        dp = {
            "noise_multiplier": hp["dp_noise_multiplier"],
            "l2_clip": hp.get("dp_l2_clip"),
            "delta": hp.get("dp_delta"),
        }
    secagg = priv.get("secure_aggregation") if recorded else None
    if secagg is None:
        secagg_text, dropouts = "not recorded", "not recorded"
    elif secagg:
        secagg_text, dropouts = "on", str(int(_num(priv.get("dropouts_recovered")) or 0))
    else:
        secagg_text, dropouts = "off", "not used"
    pairs: list[tuple[str, Any]] = [
        ("secure aggregation", secagg_text),
        ("dropouts recovered", dropouts),
        ("differential privacy (DP-SGD)", "on" if dp else "off"),
    ]
    sites_table = None
    if dp:
        pairs += [
            ("noise multiplier σ", _num(dp.get("noise_multiplier"))),
            ("clipping norm C", _num(dp.get("l2_clip"))),
            ("δ", _small(dp.get("delta"))),
        ]
        if metrics.get("runtime") == "sites":  # the evaluation round's release (site.training)
            pairs += [
                (
                    "evaluation ε (one noisy release of each site's score histogram)",
                    _num(dp.get("evaluation_epsilon")),
                ),
                (
                    "evaluation noise σ (calibrated from that ε)",
                    _num(priv.get("evaluation_noise_multiplier")),
                ),
                (  # federation.private_statistics: the statistics round under DP is never exact
                    "statistics ε (one noisy release of each site's counts, sums and sums of squares)",
                    _num(dp.get("statistics_epsilon")),
                ),
            ]
        sites = {str(k): _dict(v) for k, v in _dict(priv.get("sites")).items()}
        rows = [
            [
                name,
                s.get("rounds_charged"),
                _small(s.get("delta")),
                _num(s.get("epsilon_run")),
                _num(s.get("epsilon_spent")),
                _num(s.get("epsilon_limit")),
                _num(s.get("epsilon_remaining")),
            ]
            for name, s in sorted(sites.items())
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
        "dp": bool(dp),
        "recorded": recorded,
        "pairs": _kv([(k, v) for k, v in pairs if v is not None]),
        "sites": sites_table,
    }


# ---------------------------------------------------------------------------------------------- entry point
def _context(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The template's variables for ``metrics``: plain text, numbers and :class:`Cell`/:class:`Table`."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    if not metrics.get("run_id"):
        raise ValueError("metrics need a 'run_id'")
    rounds = [_dict(r) for r in metrics.get("rounds") or [] if isinstance(r, Mapping)]
    final = _dict(metrics.get("final"))
    final_pp = {str(k): _dict(v) for k, v in _dict(final.get("per_partner")).items()}
    overall = _dict(final.get("overall"))
    local_pp, local_overall = _split(metrics.get("local_only"))
    central_pp, central_overall = _split(metrics.get("centralized"))
    declared = [str(p) for p in metrics.get("partners") or []]
    seen = set(final_pp) | set(local_pp) | {str(p) for r in rounds for p in _dict(r.get("partners"))}
    partners = declared + sorted(seen - set(declared))
    names = [p for p in partners if p in final_pp or p in local_pp or p in central_pp]
    local_auc = _auc(local_overall)
    centralized = None
    if central_overall or central_pp:
        reference = [(k, label) for k, label in _METRIC_COLUMNS if central_overall.get(k) is not None]
        centralized = {
            "label": CENTRALIZED_LABEL,
            "overall": _kv([(label, central_overall[k]) for k, label in reference if k in central_overall])
            if central_overall
            else None,
        }
    return {
        "title": f"Lepton run {metrics['run_id']}",
        "dataset": str(metrics.get("dataset") or "dataset not recorded"),
        "strategy": str(metrics.get("strategy") or "strategy not recorded"),
        "warnings": _warnings(metrics),
        "exclusions": sorted((str(k), str(v)) for k, v in _dict(metrics.get("excluded")).items()),
        "summary": _summary(metrics, rounds, partners, overall),
        "protection": _protection(metrics),
        "local_only_overall": None
        if local_auc is None
        else {"what": str(local_overall.get("note") or "overall AUC"), "auc": _text(local_auc)[0]},
        "overall_notes": "; ".join(map(str, overall["notes"])) if overall.get("notes") else None,
        "rounds_plot": _rounds_plot(rounds) if rounds else None,
        "rounds_table": _rounds_table(rounds, secure=_secure(metrics)) if rounds else None,
        "partner_plot": _partner_auc_plot(names, final_pp, local_pp, central_overall) if names else None,
        "partner_table": _partner_table(names, final_pp, local_pp, central_pp) if names else None,
        "centralized": centralized,
        "lineage": _lineage(metrics, rounds, partners),
    }


def render_html(metrics: Mapping[str, Any]) -> str:
    """The report page for ``metrics`` (see the module docstring) as an HTML string."""
    return templates.render(TEMPLATE, **_context(metrics))


def render_report(metrics: Mapping[str, Any], out_dir: Path) -> Path:
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
