# Shared settings for the dimse-relay lab scripts (sourced, not run).
# shellcheck shell=bash
# Strict mode for the lab scripts, not for an interactive shell that sources this file to use
# lab_exec by hand (a failing command would otherwise close the terminal).
if [[ $- != *i* ]]; then
  set -euo pipefail
fi

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LAB_DIR/.." && pwd)
# Base image and per-host overlays live outside the repository.
LAB_CACHE=${DIMSE_LAB_CACHE:-/var/cache/dimse-relay-lab}
LAB_BASE=$LAB_CACHE/base-bookworm
LAB_HOSTS_DIR=${DIMSE_LAB_HOSTS:-/var/lib/dimse-relay-lab}
# Run-time state (pids, generated inventory fragment): gitignored, inside the repository.
LAB_STATE=${DIMSE_LAB_STATE:-$REPO_DIR/.lab}
LAB_BRIDGE=${DIMSE_LAB_BRIDGE:-br-dimse}
LAB_GATEWAY=10.213.0.1
LAB_PREFIX=24
LAB_SUBNET=10.213.0.0/24
LAB_MTU=${DIMSE_LAB_MTU:-1400}
LAB_NFT_TABLE=dimse_lab
LAB_DOMAIN=lab.dimse-relay.test
LAB_MIRROR=${DIMSE_LAB_MIRROR:-http://deb.debian.org/debian}
# Everything the roles need on a host is in the base image: the deployment itself is offline.
LAB_PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,dcmtk,ca-certificates,iproute2,procps,curl,passwd

log() { printf 'lab: %s\n' "$*" >&2; }

need_root() {
  [[ $(id -u) -eq 0 ]] || { log "must run as root (systemd-nspawn, overlayfs, bridge)"; exit 1; }
}

# "name address" for every lab host.
lab_hosts() { grep -Ev '^\s*(#|$)' "$LAB_DIR/hosts.conf" | awk '{print $1, $2}'; }
lab_zone() { grep -Ev '^\s*(#|$)' "$LAB_DIR/hosts.conf" | awk -v n="$1" '$1 == n {print $3}'; }

# PID of the systemd-nspawn process of a host, if it is running.
nspawn_pid() {
  local f="$LAB_STATE/$1.nspawn.pid" pid
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ -d /proc/$pid ]] && grep -q systemd-nspawn "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

# PID of the container's init (systemd), the child of the nspawn process.
init_pid() {
  local npid child
  npid=$(nspawn_pid "$1") || return 1
  child=$(cat /proc/"$npid"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+$' | head -1)
  [[ -n $child ]] || return 1
  echo "$child"
}

# Run a command inside a lab host (all namespaces of its init).
lab_exec() {
  local name=$1 pid
  shift
  pid=$(init_pid "$name") || { log "host $name is not running"; return 1; }
  nsenter -t "$pid" -a -- "$@"
}

# Address of a lab host by name.
lab_addr() { lab_hosts | awk -v n="$1" '$1 == n {print $2}'; }
