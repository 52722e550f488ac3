#!/bin/sh
# One-shot MinIO setup for compose mode (the `minio-init` service; runs on every `docker-compose up`, idempotent):
#   1. create Lepton's shared buckets (staging, quarantine, models);
#   2. create (or update the secret of) the S3 identity Airflow uses, LEPTON_S3_ACCESS_KEY, with MinIO's built-in
#      `readwrite` policy — Airflow never holds the MinIO root credentials.
# Partner inbox buckets and partner identities are created by onboarding, not here.
# Runs in the minio/minio image (it ships `mc`). Prints no secret.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${LEPTON_S3_ACCESS_KEY:?}" "${LEPTON_S3_SECRET_KEY:?}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
BUCKETS="${LEPTON_SHARED_BUCKETS:-staging quarantine models}"

# credentials through the environment only: mc writes no config file with them
scheme="${MINIO_URL%%://*}"
hostport="${MINIO_URL#*://}"
export MC_HOST_lepton="${scheme}://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${hostport}"

i=0
until mc ready lepton >/dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -ge 60 ]; then
    echo "minio-init: MinIO at ${MINIO_URL} is not ready after 60 s" >&2
    exit 1
  fi
  sleep 1
done

for bucket in $BUCKETS; do
  mc mb --ignore-existing "lepton/${bucket}"
done

# `user add` on an existing user updates its secret: re-running after rotating LEPTON_S3_SECRET_KEY applies it
mc admin user add lepton "${LEPTON_S3_ACCESS_KEY}" "${LEPTON_S3_SECRET_KEY}" >/dev/null
if ! mc admin user info lepton "${LEPTON_S3_ACCESS_KEY}" | grep -q 'readwrite'; then
  mc admin policy attach lepton readwrite --user "${LEPTON_S3_ACCESS_KEY}" >/dev/null
fi
echo "minio-init: buckets [${BUCKETS}] exist; Airflow's S3 identity has the readwrite policy"
