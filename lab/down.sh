#!/usr/bin/env bash
# Tear the lab down: power off every host, unmount and delete its overlay, remove the bridge
# and the nft table. Idempotent. The cached base image stays (DIMSE_LAB_PURGE=1 removes it).
set -euo pipefail
# shellcheck source=lab/lib.sh
source "$(dirname "$0")/lib.sh"
need_root

stop_host() {
  local name=$1 hdir="$LAB_HOSTS_DIR/$1" pid i
  if pid=$(nspawn_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
      [[ -d /proc/$pid ]] || break
      sleep 0.25
    done
    if [[ -d /proc/$pid ]]; then
      log "$name did not power off in 10 s, killing it"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
  fi
  if mountpoint -q "$hdir/root" 2>/dev/null; then
    umount "$hdir/root" 2>/dev/null || umount -l "$hdir/root"
  fi
  rm -rf "$hdir"
  rm -f "$LAB_STATE/$name".{nspawn.pid,initpid,console.log}
}

lab_hosts | while read -r name _; do stop_host "$name"; done
rm -f "$LAB_STATE/inventory.yml"
nft delete table bridge "$LAB_NFT_TABLE" 2>/dev/null || true
if ip link show "$LAB_BRIDGE" >/dev/null 2>&1; then
  ip link delete "$LAB_BRIDGE"
fi
if [[ ${DIMSE_LAB_PURGE:-0} == 1 ]]; then
  rm -rf "$LAB_BASE"
fi
log "lab down"
