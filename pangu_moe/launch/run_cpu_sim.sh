#!/usr/bin/env bash
# A simulated N-node x D-device cluster in one CPU process (parallel.dispatch=simulated): each of the
# W = N x D ranks routes its own batch_size/W sequences with its own capacity, sends through a
# destination-major buffer and a transposing exchange, and the node accounting counts what a real
# cluster would move.
#
# Usage:
#   run_scripts/run_cpu_sim.sh [--nodes N] [--devices-per-node D] [--exchange flat|hierarchical]
#                              [--config FILE] [--out DIR] [--python PY] [--] [MORE pangu-moe train ARGS]
# Example: run_scripts/run_cpu_sim.sh --nodes 2 --devices-per-node 4 --exchange hierarchical \
#              --out runs/sim2x4 -- --set moe.router=locmoe --set train.batch_size=16
set -euo pipefail
# The package folder holding this script (physical path: run_scripts/ in a checkout is a symlink to it);
# its parent goes on PYTHONPATH, so a checkout and a wheel install both run their own package.
package="$(cd "$(dirname "$0")" && dirname "$(pwd -P)")"
repo="$(dirname "$package")"
nodes=2
devices=2
exchange=flat
config="$package/configs/demo_cpu.yaml"
out=""
python_bin="$(command -v python || command -v python3)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --devices-per-node) devices="$2"; shift 2 ;;
    --exchange) exchange="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --python) python_bin="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option $1 (see --help; pangu-moe arguments go after --)" >&2; exit 2 ;;
    *) break ;;
  esac
done
die() { echo "run_cpu_sim.sh: $*" >&2; exit 2; }
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes = $nodes: must be a positive integer"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-node = $devices: must be a positive integer"
[[ "$exchange" == flat || "$exchange" == hierarchical ]] || die "--exchange = $exchange: must be flat or hierarchical"
[[ -f "$config" ]] || die "--config = $config: no such file"
out="${out:-runs/sim_${nodes}x${devices}}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package; paths stay the caller's
exec "$python_bin" -m pangu_moe.cli train --config "$config" --out "$out" \
  --set parallel.dispatch=simulated --set "parallel.exchange=$exchange" \
  --set "parallel.nodes=$nodes" --set "parallel.devices_per_node=$devices" "$@"
