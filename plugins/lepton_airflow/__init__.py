"""Airflow-side adapters of Lepton: connections → settings, the inbox event trigger, the trainer runtime.

Plugins are imported by every Airflow process: keep module tops light (no pandas/tensorflow/GX).
"""
