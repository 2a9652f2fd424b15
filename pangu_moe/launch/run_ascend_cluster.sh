#!/usr/bin/env bash
# Expert-parallel training on an Ascend cluster with msrun (parallel.dispatch=hccl): run this script
# once on every node with the same arguments except --node-rank. NOT RUN IN THIS REPOSITORY'S CI (no
# Ascend hardware there; CI checks its arguments and its --dry-run line); see README "What runs where".
#
# Usage:
#   run_scripts/run_ascend_cluster.sh --nodes N --devices-per-node D --node-rank R
#       (--master-addr ADDR | --hostfile FILE) [--master-port P] [--rank-table FILE] [--devices 0,1,...]
#       [--log-dir DIR] [--cluster-time-out S] [--exchange flat|hierarchical] [--hccl-connect-timeout S]
#       [--hccl-exec-timeout S] [--hccl-buffsize MB] [--timeout S] [--python PY] [--dry-run]
#       -- PANGU_MOE_ARGS...
# Example, 2 nodes x 8 NPUs, hierarchical exchange (padded buffers: the ragged exchange is flat-only on hccl);
# on node 0 (10.0.0.1), then on node 1 with --node-rank 1:
#   run_scripts/run_ascend_cluster.sh --nodes 2 --devices-per-node 8 --node-rank 0 --master-addr 10.0.0.1 \
#       --log-dir logs/ep16 --exchange hierarchical \
#       -- train --config configs/demo_cpu.yaml --out runs/ep16 --set moe.num_experts=16 --set train.batch_size=64 \
#       --set parallel.exchange_layout=padded
#
# --hostfile FILE: one host per line, node 0 first (# comments and blank lines skipped); its first host is the
# master address and its host count must equal --nodes. --rank-table FILE: an HCCL rank table, passed to msrun
# (--rank_table_file) and exported as RANK_TABLE_FILE. --devices: the NPU ids this node uses (default
# 0..D-1), exported as ASCEND_RT_VISIBLE_DEVICES. --cluster-time-out S (default 600): how long msrun waits
# for every node to join. CANN's own logs go to LOG_DIR/plog (ASCEND_PROCESS_LOG_PATH); HCCL_CONNECT_TIMEOUT,
# HCCL_EXEC_TIMEOUT and HCCL_BUFFSIZE come from the --hccl-* flags.
#
# The script sets parallel.dispatch=hccl, runtime.device=Ascend, parallel.nodes = N and
# parallel.devices_per_node = D, prints the exact msrun line (with the variables it sets) on stderr and runs
# it; --dry-run prints the line on stdout and exits. On failure or after --timeout seconds (0, the default:
# none) it stops this node's workers and exits non-zero (run_scripts/msrun_supervise.sh).
set -uo pipefail
. "$(dirname "$0")/msrun_supervise.sh"
# The package folder holding this script (physical path: run_scripts/ in a checkout is a symlink to it);
# its parent goes on PYTHONPATH, so a checkout and a wheel install both run their own package.
package="$(cd "$(dirname "$0")" && dirname "$(pwd -P)")"
repo="$(dirname "$package")"
nodes=""
devices_per_node=""
node_rank=""
master_addr=""
master_port=8118
hostfile=""
rank_table=""
devices=""
log_dir="logs/ascend"
cluster_time_out=600
exchange=flat
connect_timeout=600
exec_timeout=1800
buffsize=200
timeout=0
dry_run=0
python_bin="$(command -v python || command -v python3)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --devices-per-node) devices_per_node="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) master_port="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --rank-table) rank_table="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --cluster-time-out) cluster_time_out="$2"; shift 2 ;;
    --exchange) exchange="$2"; shift 2 ;;
    --hccl-connect-timeout) connect_timeout="$2"; shift 2 ;;
    --hccl-exec-timeout) exec_timeout="$2"; shift 2 ;;
    --hccl-buffsize) buffsize="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --python) python_bin="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option $1 (see --help; pangu-moe arguments go after --)" >&2; exit 2 ;;
    *) break ;;
  esac
done
die() { echo "run_ascend_cluster.sh: $*" >&2; exit 2; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 = ${2:-<missing>}: must be a positive integer"; }
positive --nodes "$nodes"
positive --devices-per-node "$devices_per_node"
positive --master-port "$master_port"
positive --cluster-time-out "$cluster_time_out"
positive --hccl-connect-timeout "$connect_timeout"
positive --hccl-exec-timeout "$exec_timeout"
positive --hccl-buffsize "$buffsize"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout = $timeout: must be a number of seconds (0: none)"
[[ "$node_rank" =~ ^[0-9]+$ ]] && (( node_rank < nodes )) \
  || die "--node-rank = ${node_rank:-<missing>}: must be in [0, $nodes)"
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || die "--hostfile = $hostfile: no such file"
  mapfile -t hosts < <(sed -e 's/#.*//' "$hostfile" | awk 'NF { print $1 }')  # the first field: host [slots=...]
  (( ${#hosts[@]} == nodes )) || die "--hostfile = $hostfile: ${#hosts[@]} hosts; must list --nodes = $nodes, node 0 first"
  [[ -z "$master_addr" || "$master_addr" == "${hosts[0]}" ]] \
    || die "--master-addr = $master_addr: differs from the hostfile's node 0 (${hosts[0]}); pass one of them"
  master_addr="${hosts[0]}"
fi
[[ -n "$master_addr" ]] || die "--master-addr: required (the address of node 0), or --hostfile"
[[ -z "$rank_table" || -f "$rank_table" ]] || die "--rank-table = $rank_table: no such file"
[[ "$exchange" == flat || "$exchange" == hierarchical ]] || die "--exchange = $exchange: must be flat or hierarchical"
if [[ -z "$devices" ]]; then
  devices="$(seq -s, 0 $((devices_per_node - 1)))"
fi
[[ "$devices" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--devices = $devices: must be NPU ids separated by commas"
IFS=, read -ra device_ids <<<"$devices"
(( ${#device_ids[@]} == devices_per_node )) \
  || die "--devices = $devices: ${#device_ids[@]} ids; must name --devices-per-node = $devices_per_node"
[[ "$(printf '%s\n' "${device_ids[@]}" | sort -u | wc -l)" -eq "$devices_per_node" ]] \
  || die "--devices = $devices: an id appears twice"
[[ $# -gt 0 ]] || die "no pangu-moe arguments (e.g. -- train --config FILE --out DIR)"
msrun_bin="$(dirname "$python_bin")/msrun"
[[ -x "$msrun_bin" ]] || msrun_bin="$(command -v msrun)" || msrun_bin=""
(( dry_run )) && msrun_bin="${msrun_bin:-msrun}"
[[ -n "$msrun_bin" ]] || die "msrun not found next to $python_bin or on PATH"

job_env=(ASCEND_RT_VISIBLE_DEVICES="$devices" ASCEND_PROCESS_LOG_PATH="$log_dir/plog"
         HCCL_CONNECT_TIMEOUT="$connect_timeout" HCCL_EXEC_TIMEOUT="$exec_timeout" HCCL_BUFFSIZE="$buffsize")
[[ -z "$rank_table" ]] || job_env+=(RANK_TABLE_FILE="$rank_table")
command=("$msrun_bin" --worker_num=$((nodes * devices_per_node)) --local_worker_num="$devices_per_node"
         --master_addr="$master_addr" --master_port="$master_port" --node_rank="$node_rank" --log_dir="$log_dir"
         --join=True --cluster_time_out="$cluster_time_out")
[[ -z "$rank_table" ]] || command+=(--rank_table_file="$rank_table")
command+=("$package/cli.py" "$@" --set parallel.dispatch=hccl --set runtime.device=Ascend
          --set "parallel.exchange=$exchange" --set "parallel.nodes=$nodes"
          --set "parallel.devices_per_node=$devices_per_node")
quote() {  # a word as the shell reads it back: plain when it holds only safe characters, else %q-quoted
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi
}
line=""
for word in "${job_env[@]}" "${command[@]}"; do
  line+="${line:+ }$(quote "$word")"
done
if (( dry_run )); then
  echo "$line"
  exit 0
fi
echo "run_ascend_cluster.sh: $line" >&2
mkdir -p "$log_dir/plog" || die "--log-dir = $log_dir: cannot create it"
export "${job_env[@]}"
export PATH="$(dirname "$python_bin"):$PATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
supervise_msrun run_ascend_cluster.sh "$log_dir" "$timeout" "${command[@]}"
