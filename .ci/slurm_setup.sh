#!/usr/bin/env bash
# Install a single-node SLURM cluster's packages (slurmctld, slurmd, client, munge) from Debian.
# Idempotent: does nothing when the binaries are already there. The test fixture
# (tests/slurm_cluster.py) writes the config and starts the daemons in a temp dir.
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "slurm_setup: slurmctld, slurmd, sbatch and munged are installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
echo "slurm_setup: missing ${need[*]}; installing slurmctld slurmd slurm-client munge"
# The package post-install scripts try to start services; there is no init here, and the
# fixture starts its own daemons, so policy-rc.d keeps them from starting at all.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || { echo "slurm_setup: $bin still missing" >&2; exit 1; }
done
echo "slurm_setup: installed $(slurmctld -V)"
