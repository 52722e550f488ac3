"""The embedded stack: OpenBao, SeaweedFS and Airflow on one machine, bound to 127.0.0.1."""
