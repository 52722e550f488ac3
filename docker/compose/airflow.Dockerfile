# Lepton's Airflow image for compose mode: the official Airflow image + Lepton's runtime dependencies.
#
#   docker-compose build          (builds it through the airflow-init service; context: docker/compose/)
#
# Why a derived image and not _PIP_ADDITIONAL_REQUIREMENTS: that variable re-installs packages on EVERY
# container start (slow, needs the network, not reproducible); Airflow's own docs reserve it for quick checks.
# The project's code (dags/, plugins/, lepton_tasks/) is NOT copied in: docker-compose.yml mounts it read-only,
# so a code change needs a restart, not a rebuild. Untested here (no registry on the build machine).
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}
ARG AIRFLOW_VERSION

# LEPTON_DATA_DIR inside the containers (partner registry); a named volume is mounted here and inherits this
# ownership on first use. Group 0 + g+rwX because the official image supports any AIRFLOW_UID with gid 0.
USER root
RUN mkdir -p /opt/lepton/data \
    && chown -R airflow:0 /opt/lepton \
    && chmod -R g+rwX /opt/lepton
USER airflow

# Installed as the airflow user (the official image's documented way), with Airflow held at its version so
# pip cannot up- or downgrade it while resolving Lepton's pins.
COPY --chown=airflow:0 requirements-airflow.txt /tmp/requirements-airflow.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/requirements-airflow.txt \
    && pip check \
    && rm /tmp/requirements-airflow.txt

ENV PYTHONPATH=/opt/lepton:/opt/airflow/plugins \
    PYTHONDONTWRITEBYTECODE=1
