"""Which Lepton DAGs an Airflow serves: those of its organization's role (``Settings.role``, ``LEPTON_ROLE``).

A coordinator's Airflow has no ingest and no trainer: it cannot touch a partner's rows even by mistake. A
site's has ingest and the site job DAG, not the coordinator's. ``single`` (the stack ``lepton up`` starts)
is an ingest-only development stack: it trains nothing — the only training path is a coordinator and its
sites (``lepton demo topology``). Read at parse time from the environment and ``<data_dir>/lepton.env``:
no service is contacted.
"""

from __future__ import annotations

from lepton_tasks.adapters.settings import Role, load_settings

#: the DAG ids of each role
DAGS_BY_ROLE: dict[Role, frozenset[str]] = {
    "single": frozenset({"lepton_ingest"}),
    "site": frozenset({"lepton_ingest", "lepton_site"}),
    "coordinator": frozenset({"lepton_federated"}),
}


def serves(dag: str) -> bool:
    """Whether this Airflow's role runs ``dag``."""
    return dag in DAGS_BY_ROLE[load_settings().role]
