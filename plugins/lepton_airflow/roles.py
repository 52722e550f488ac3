"""Which Lepton DAGs an Airflow serves: those of its organization's role (``Settings.role``, ``LEPTON_ROLE``).

A coordinator's Airflow has no ingest and no trainer: it cannot touch a partner's rows even by mistake. A
site's has ingest and the site job DAG, not the coordinator's. ``single`` is stage 1 (one stack does ingest
and training for every partner). Read at parse time from the environment and ``<data_dir>/lepton.env``:
no service is contacted.
"""

from __future__ import annotations

from lepton_tasks.adapters.settings import Role, load_settings

#: the DAG ids (``lepton_train`` stands for its per-dataset ``lepton_train_<dataset>`` DAGs) of each role
DAGS_BY_ROLE: dict[Role, frozenset[str]] = {
    "single": frozenset({"lepton_ingest", "lepton_train"}),
    "site": frozenset({"lepton_ingest", "lepton_site"}),
    "coordinator": frozenset({"lepton_federated"}),
}


def serves(dag: str) -> bool:
    """Whether this Airflow's role runs ``dag``."""
    return dag in DAGS_BY_ROLE[load_settings().role]
