#!/usr/bin/env bash
# Write .env for Lepton's compose mode with fresh random secrets (mode 0600). Never overwrites an existing file.
#
#   docker/compose/gen-env.sh ROLE [OUT]   # ROLE: site | coordinator; OUT defaults to .env in the repository root
#
# ROLE picks the role file (docker/compose/<ROLE>.yml): COMPOSE_FILE in .env names both files, so a plain
# `docker-compose up -d` starts that role.
# LEPTON_TRAINER_IMAGE is filled from the newest local lepton-trainer:<hash> tag when a Docker daemon answers,
# else left empty (compose then refuses to start until you set it). DOCKER_GID comes from /var/run/docker.sock.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROLE="${1:-}"
case "$ROLE" in
  site|coordinator) ;;
  *) echo "usage: docker/compose/gen-env.sh site|coordinator [OUT]" >&2; exit 2 ;;
esac
OUT="${2:-.env}"
if [ -e "$OUT" ]; then
  echo "gen-env.sh: $OUT exists; not overwriting it (move it away first)" >&2
  exit 1
fi
command -v python3 >/dev/null || { echo "gen-env.sh: needs python3" >&2; exit 1; }

rand() { python3 -c "import secrets; print(secrets.token_hex($1))"; }
fernet() { python3 -c "import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"; }

docker_gid=""
[ -S /var/run/docker.sock ] && docker_gid=$(stat -c %g /var/run/docker.sock)
trainer_image=""
if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
  trainer_image=$(docker images lepton-trainer --format '{{.Repository}}:{{.Tag}}' | grep -v ':latest$' | head -n1 || true)
fi

umask 077
sed -e "s|^COMPOSE_FILE=.*|COMPOSE_FILE=docker-compose.yml:docker/compose/${ROLE}.yml|" \
    -e "s|^AIRFLOW_UID=.*|AIRFLOW_UID=$(id -u)|" \
    -e "s|^DOCKER_GID=.*|DOCKER_GID=${docker_gid}|" \
    -e "s|^POSTGRES_PASSWORD=.*|POSTGRES_PASSWORD=$(rand 24)|" \
    -e "s|^REDIS_PASSWORD=.*|REDIS_PASSWORD=$(rand 24)|" \
    -e "s|^AIRFLOW_FERNET_KEY=.*|AIRFLOW_FERNET_KEY=$(fernet)|" \
    -e "s|^AIRFLOW_JWT_SECRET=.*|AIRFLOW_JWT_SECRET=$(rand 32)|" \
    -e "s|^AIRFLOW_API_SECRET_KEY=.*|AIRFLOW_API_SECRET_KEY=$(rand 32)|" \
    -e "s|^AIRFLOW_ADMIN_USERNAME=.*|AIRFLOW_ADMIN_USERNAME=lepton-operator|" \
    -e "s|^AIRFLOW_ADMIN_PASSWORD=.*|AIRFLOW_ADMIN_PASSWORD=$(rand 16)|" \
    -e "s|^MINIO_ROOT_USER=.*|MINIO_ROOT_USER=lepton-root-$(rand 4)|" \
    -e "s|^MINIO_ROOT_PASSWORD=.*|MINIO_ROOT_PASSWORD=$(rand 24)|" \
    -e "s|^LEPTON_S3_ACCESS_KEY=.*|LEPTON_S3_ACCESS_KEY=lepton-airflow-$(rand 4)|" \
    -e "s|^LEPTON_S3_SECRET_KEY=.*|LEPTON_S3_SECRET_KEY=$(rand 24)|" \
    -e "s|^LEPTON_VAULT_TOKEN=.*|LEPTON_VAULT_TOKEN=$(rand 32)|" \
    -e "s|^LEPTON_TRAINER_IMAGE=.*|LEPTON_TRAINER_IMAGE=${trainer_image}|" \
    docker/compose/env.example > "$OUT"
chmod 600 "$OUT"
mkdir -p .lepton/compose && chmod 700 .lepton/compose
echo "gen-env.sh: wrote $OUT (0600) for a $ROLE. Not printed: read it with care."
if [ "$ROLE" = site ]; then
  echo "Empty values a site requires:"
  grep -E '^(DOCKER_GID|LEPTON_TRAINER_IMAGE)=$' "$OUT" | sed 's/^/  /' || echo "  (none)"
fi
