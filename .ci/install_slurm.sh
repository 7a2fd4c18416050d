#!/usr/bin/env bash
# Install the SLURM daemons, clients and munge used by tests/cluster (Debian/Ubuntu, as root).
# Idempotent: exits at once when every package is already installed.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_slurm: already installed: ${PACKAGES[*]}"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_slurm: installing ${missing[*]}"
$SUDO apt-get update -q
# --no-install-recommends: the daemons and clients are enough; no mail, no docs, no mysql.
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# The packaged services are not used (tests start their own daemons); don't leave them running.
for svc in slurmctld slurmd munge; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        $SUDO systemctl stop "$svc" || true
    fi
done
echo "install_slurm: done"
