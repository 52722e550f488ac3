#!/usr/bin/env bash
# Manage a Docker daemon for Lepton's trainer containers on a machine without systemd (CI, dev VMs).
#
#   scripts/dockerd.sh install   apt-get install docker.io + debootstrap, only if dockerd/debootstrap are missing
#   scripts/dockerd.sh start     start dockerd in the background unless a daemon already answers `docker info`
#   scripts/dockerd.sh stop      stop the dockerd THIS script started (pid file); never anything found by name
#   scripts/dockerd.sh status    say whether a daemon answers and whether this script started it
#
# Files (LEPTON_DATA_DIR defaults to .lepton, relative to the current directory like lepton's settings):
#   $LEPTON_DATA_DIR/logs/dockerd.log   the daemon's log
#   $LEPTON_DATA_DIR/run/dockerd.pid    "<pid> <kernel start time of pid>" — written only when we started it
#
# DOCKER_HOST: when it is a unix:// socket, the daemon listens there (and `docker info` checks there).
# DOCKERD_START_TIMEOUT: seconds to wait for `docker info` to succeed after starting (default 60).
# DOCKERD_EXTRA_ARGS: extra dockerd flags, word-split (e.g. "--data-root /srv/docker").
set -euo pipefail

DATA_DIR="${LEPTON_DATA_DIR:-.lepton}"
LOG_DIR="$DATA_DIR/logs"
RUN_DIR="$DATA_DIR/run"
LOG_FILE="$LOG_DIR/dockerd.log"
PID_FILE="$RUN_DIR/dockerd.pid"
TIMEOUT="${DOCKERD_START_TIMEOUT:-60}"

say() { printf 'dockerd.sh: %s\n' "$*"; }
die() { printf 'dockerd.sh: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root for: $* (no sudo found)"; fi
}

daemon_answers() {
  command -v docker >/dev/null 2>&1 || return 1
  timeout 10 docker info >/dev/null 2>&1
}

# field 22 of /proc/PID/stat (start time in clock ticks), which tells a recycled pid apart
proc_start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  set -- $stat
  echo "${20}"
}

# prints the pid from the pid file when that exact process (same start time, still dockerd) is alive
our_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid started now exe
  read -r pid started < "$PID_FILE" || return 1
  [ -n "${pid:-}" ] || return 1
  now=$(proc_start_time "$pid") || return 1
  [ "$now" = "${started:-}" ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  case "$exe" in */dockerd) ;; *) return 1 ;; esac
  echo "$pid"
}

cmd_install() {
  local missing=0
  command -v dockerd >/dev/null 2>&1 || missing=1
  command -v docker-compose >/dev/null 2>&1 || missing=1
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing=1
  if [ "$missing" -eq 0 ]; then
    say "dockerd and debootstrap are already installed; nothing to do"
    return 0
  fi
  say "installing docker.io and debootstrap with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y docker.io debootstrap docker-compose || {
    as_root apt-get update && as_root apt-get install -y docker.io debootstrap docker-compose
  }
}

cmd_start() {
  local pid
  if pid=$(our_pid); then
    if daemon_answers; then
      say "dockerd already running (started by this script, pid $pid, log $LOG_FILE)"
      return 0
    fi
  elif daemon_answers; then
    say "a Docker daemon already answers (not started by this script); leaving it alone"
    return 0
  fi
  command -v dockerd >/dev/null 2>&1 || die "dockerd is not installed: run 'scripts/dockerd.sh install'"
  command -v docker >/dev/null 2>&1 || die "the docker client is not installed: run 'scripts/dockerd.sh install'"
  [ "$(id -u)" -eq 0 ] || die "dockerd must run as root here (rootless Docker is not set up by this script)"

  mkdir -p "$LOG_DIR" "$RUN_DIR"
  local args=()
  case "${DOCKER_HOST:-}" in
    unix://*) args+=(-H "$DOCKER_HOST") ;;
    "") ;;
    *) die "DOCKER_HOST=$DOCKER_HOST is not a unix socket; start that daemon yourself" ;;
  esac
  # shellcheck disable=SC2206  # word splitting wanted
  [ -n "${DOCKERD_EXTRA_ARGS:-}" ] && args+=(${DOCKERD_EXTRA_ARGS})
  say "starting dockerd (log $LOG_FILE)"
  printf '\n==== %s dockerd.sh start ====\n' "$(date -u +%FT%TZ)" >> "$LOG_FILE"
  # own session/process group, detached from this shell's terminal and stdin
  setsid dockerd "${args[@]}" >> "$LOG_FILE" 2>&1 < /dev/null &
  pid=$!
  local started
  started=$(proc_start_time "$pid") || die "dockerd exited immediately; see $LOG_FILE"
  echo "$pid $started" > "$PID_FILE"

  local waited=0
  until daemon_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      die "dockerd (pid $pid) exited during start-up; see $LOG_FILE:
$(tail -n 15 "$LOG_FILE")"
    fi
    if [ "$waited" -ge "$TIMEOUT" ]; then
      die "dockerd (pid $pid) did not answer 'docker info' within ${TIMEOUT}s; see $LOG_FILE (it is still running: 'scripts/dockerd.sh stop' stops it)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  say "dockerd is up (pid $pid, ${waited}s); stop it with 'scripts/dockerd.sh stop'"
}

cmd_stop() {
  local pid
  if ! pid=$(our_pid); then
    rm -f "$PID_FILE"
    if daemon_answers; then
      say "the running Docker daemon was not started by this script; leaving it alone"
    else
      say "no dockerd started by this script is running"
    fi
    return 0
  fi
  say "stopping dockerd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge 30 ]; then
      say "dockerd (pid $pid) still running after 30s; sending SIGKILL to its process group"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 1
    waited=$((waited + 1))
  done
  rm -f "$PID_FILE"
  say "dockerd stopped"
}

cmd_status() {
  local pid version
  if daemon_answers; then
    version=$(timeout 10 docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')
    if pid=$(our_pid); then
      say "running: Docker $version, started by this script (pid $pid, log $LOG_FILE)"
    else
      say "running: Docker $version, not started by this script"
    fi
    return 0
  fi
  if pid=$(our_pid); then
    say "dockerd pid $pid (started by this script) is alive but does not answer 'docker info'; see $LOG_FILE"
  else
    say "no Docker daemon answers 'docker info'"
  fi
  return 1
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
