#!/usr/bin/env bash
# Local single-node Slurm for tests / CI: ensure (install + configure + start) | start | stop | status.
# Thin wrapper over `python -m slurm.local_cluster` (see docs/slurm.md); idempotent, bounded waits,
# stops only the daemons it started (PID files in $CROSSMAE_SLURM_STATE, default /var/tmp/crossmae-slurm).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m slurm.local_cluster "${@:-ensure}"
