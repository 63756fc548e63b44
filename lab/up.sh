#!/usr/bin/env bash
# Create and boot the dimse-relay lab: Debian bookworm hosts with systemd as PID 1
# (systemd-nspawn), one overlayfs each over a cached debootstrap base, on bridge br-dimse.
# Idempotent: running hosts are left alone. Writes .lab/<host>.initpid (read by
# inventories/lab) and .lab/inventory.yml (the same facts as an inventory fragment).
set -euo pipefail
# shellcheck source=lab/lib.sh
source "$(dirname "$0")/lib.sh"
need_root

build_base() {
  local stamp="$LAB_BASE/.dimse-lab-base" want
  want="bookworm $LAB_PACKAGES"
  if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
    return 0
  fi
  log "building base image in $LAB_BASE (debootstrap, about a minute, cached afterwards)"
  local tmp="$LAB_BASE.tmp"
  rm -rf "$tmp"
  mkdir -p "$LAB_CACHE"
  debootstrap --variant=minbase --include="$LAB_PACKAGES" bookworm "$tmp" "$LAB_MIRROR" \
    >"$LAB_CACHE/debootstrap.log" 2>&1 || { tail -20 "$LAB_CACHE/debootstrap.log" >&2; exit 1; }
  : >"$tmp/etc/machine-id"
  rm -f "$tmp/var/lib/dbus/machine-id"
  # Static network from systemd-networkd (config per host is written into its overlay).
  ln -sf /lib/systemd/system/systemd-networkd.service \
    "$tmp/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
  # Nothing in the lab needs these; they only slow boot or fail without a console.
  for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    console-getty.service getty@tty1.service; do
    ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
  done
  apt_clean="$tmp/var/cache/apt/archives"
  find "$apt_clean" -name '*.deb' -delete 2>/dev/null || true
  echo "$want" >"$tmp/.dimse-lab-base"
  rm -rf "$LAB_BASE"
  mv "$tmp" "$LAB_BASE"
  log "base image ready ($(du -sh "$LAB_BASE" | cut -f1))"
}

setup_network() {
  if ! ip link show "$LAB_BRIDGE" >/dev/null 2>&1; then
    ip link add "$LAB_BRIDGE" type bridge
  fi
  ip link set "$LAB_BRIDGE" mtu "$LAB_MTU"
  ip addr replace "$LAB_GATEWAY/$LAB_PREFIX" dev "$LAB_BRIDGE"
  ip link set "$LAB_BRIDGE" up
  # A bridge-family table for partitions between lab hosts (tests add drop rules to it).
  if ! nft list table bridge "$LAB_NFT_TABLE" >/dev/null 2>&1; then
    nft -f - <<NFT
table bridge $LAB_NFT_TABLE {
  chain forward {
    type filter hook forward priority 0; policy accept;
  }
}
NFT
  fi
}

write_host_files() {
  local name=$1 addr=$2 root=$3
  echo "$name" >"$root/etc/hostname"
  {
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    lab_hosts | while read -r h a; do echo "$a $h.$LAB_DOMAIN $h"; done
    echo "$LAB_GATEWAY controller.$LAB_DOMAIN controller"
  } >"$root/etc/hosts"
  # A fresh identity for every host.
  tr -d '-' </proc/sys/kernel/random/uuid >"$root/etc/machine-id"
  # Units that have nothing to do in a container (the overlay root is already writable).
  ln -sf /dev/null "$root/etc/systemd/system/systemd-remount-fs.service"
  mkdir -p "$root/etc/systemd/network"
  cat >"$root/etc/systemd/network/10-host0.network" <<NET
[Match]
Name=host0

[Link]
MTUBytes=$LAB_MTU

[Network]
Address=$addr/$LAB_PREFIX
Gateway=$LAB_GATEWAY
LinkLocalAddressing=no
IPv6AcceptRA=no
NET
}

boot_host() {
  local name=$1 addr=$2 hdir="$LAB_HOSTS_DIR/$1"
  if nspawn_pid "$name" >/dev/null; then
    log "$name already running"
    return 0
  fi
  mkdir -p "$hdir/upper" "$hdir/work" "$hdir/root"
  if ! mountpoint -q "$hdir/root"; then
    mount -t overlay overlay \
      -o "lowerdir=$LAB_BASE,upperdir=$hdir/upper,workdir=$hdir/work" "$hdir/root"
  fi
  write_host_files "$name" "$addr" "$hdir/root"
  setsid systemd-nspawn -D "$hdir/root" -b -M "$name" --register=no --keep-unit \
    --network-bridge="$LAB_BRIDGE" --resolv-conf=copy-host --console=passive \
    >"$LAB_STATE/$name.console.log" 2>&1 </dev/null &
  echo $! >"$LAB_STATE/$name.nspawn.pid"
}

wait_host() {
  local name=$1 pid state i
  for i in $(seq 1 120); do
    if pid=$(init_pid "$name" 2>/dev/null); then
      state=$(nsenter -t "$pid" -a -- systemctl is-system-running 2>/dev/null || true)
      case $state in
        running) echo "$pid" >"$LAB_STATE/$name.initpid"; return 0 ;;
        degraded)
          log "$name is degraded: $(nsenter -t "$pid" -a -- systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
          echo "$pid" >"$LAB_STATE/$name.initpid"; return 0 ;;
      esac
    elif ! nspawn_pid "$name" >/dev/null; then
      log "$name: systemd-nspawn exited; see $LAB_STATE/$name.console.log"
      tail -20 "$LAB_STATE/$name.console.log" >&2
      return 1
    fi
    sleep 0.5
  done
  log "$name did not reach 'running' in 60 s"
  return 1
}

# Hospital hosts only dial out: like a hospital firewall, drop every connection that starts
# outside the host (rules loaded into the host's network namespace with the controller's nft).
edge_firewall() {
  local name=$1 pid
  [[ $(lab_zone "$name") == edge ]] || return 0
  pid=$(<"$LAB_STATE/$name.initpid")
  nsenter -t "$pid" -n -- nft -f - <<NFT
table inet hospital_edge
delete table inet hospital_edge
table inet hospital_edge {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    ct state invalid drop
    icmp type { echo-request, destination-unreachable, time-exceeded } accept
  }
}
NFT
}

main() {
  local t0=$SECONDS
  mkdir -p "$LAB_STATE" "$LAB_HOSTS_DIR"
  build_base
  setup_network
  lab_hosts | while read -r name addr; do boot_host "$name" "$addr"; done
  lab_hosts | while read -r name _; do wait_host "$name"; done
  lab_hosts | while read -r name _; do edge_firewall "$name"; done
  {
    echo "# Generated by lab/up.sh: connection facts of the running lab (pids change at every boot)."
    echo "all:"
    echo "  hosts:"
    lab_hosts | while read -r name addr; do
      echo "    $name:"
      echo "      ansible_connection: community.docker.nsenter"
      echo "      ansible_nsenter_pid: $(<"$LAB_STATE/$name.initpid")"
      echo "      lab_address: $addr"
    done
  } >"$LAB_STATE/inventory.yml"
  log "lab up in $((SECONDS - t0)) s: $(lab_hosts | awk '{printf "%s=%s ", $1, $2}')"
}

main "$@"
