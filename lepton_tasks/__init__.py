"""Lepton: federated learning across partners, orchestrated by Apache Airflow.

This package is the pure core. It never imports ``airflow``: the same code runs inside
Airflow tasks, inside the per-partner trainer container and in the ``lepton`` CLI.
"""

__version__ = "0.1.0"
