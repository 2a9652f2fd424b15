#!/usr/bin/env bash
# Expert-parallel training on an Ascend cluster with msrun (parallel.dispatch=hccl): run this script
# once on every node with the same arguments except --node-rank. NOT RUN IN THIS REPOSITORY'S CI (no
# Ascend hardware there); see README "What runs where".
#
# Usage:
#   run_scripts/run_ascend_cluster.sh --worker-num W --local-worker-num D --master-addr ADDR
#       [--master-port P] --node-rank R [--log-dir DIR] [--exchange flat|hierarchical]
#       [--hccl-connect-timeout S] [--hccl-exec-timeout S] [--hccl-buffsize MB] [--timeout S] [--python PY]
#       -- PANGU_MOE_ARGS...
# Example, 2 nodes x 8 NPUs, hierarchical exchange; on node 0 (10.0.0.1), then on node 1 with --node-rank 1:
#   run_scripts/run_ascend_cluster.sh --worker-num 16 --local-worker-num 8 --master-addr 10.0.0.1 \
#       --master-port 8118 --node-rank 0 --log-dir logs/ep16 --exchange hierarchical \
#       -- train --config configs/demo_cpu.yaml --out runs/ep16 --set moe.num_experts=16 --set train.batch_size=64
#
# The script sets parallel.dispatch=hccl, runtime.device=Ascend, parallel.nodes = W / D and
# parallel.devices_per_node = D, and exports the HCCL settings CANN reads (HCCL_CONNECT_TIMEOUT,
# HCCL_EXEC_TIMEOUT, HCCL_BUFFSIZE). On failure or after --timeout seconds (0, the default: none) it
# stops this node's workers and exits non-zero (run_scripts/msrun_supervise.sh).
set -uo pipefail
. "$(dirname "$0")/msrun_supervise.sh"
# The package folder holding this script (physical path: run_scripts/ in a checkout is a symlink to it);
# its parent goes on PYTHONPATH, so a checkout and a wheel install both run their own package.
package="$(cd "$(dirname "$0")" && dirname "$(pwd -P)")"
repo="$(dirname "$package")"
worker_num=""
local_num=""
master_addr=""
master_port=8118
node_rank=""
log_dir="logs/ascend"
exchange=flat
connect_timeout=600
exec_timeout=1800
buffsize=200
timeout=0
python_bin="$(command -v python || command -v python3)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker-num) worker_num="$2"; shift 2 ;;
    --local-worker-num) local_num="$2"; shift 2 ;;
    --master-addr) master_addr="$2"; shift 2 ;;
    --master-port) master_port="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --exchange) exchange="$2"; shift 2 ;;
    --hccl-connect-timeout) connect_timeout="$2"; shift 2 ;;
    --hccl-exec-timeout) exec_timeout="$2"; shift 2 ;;
    --hccl-buffsize) buffsize="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --python) python_bin="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option $1 (see --help; pangu-moe arguments go after --)" >&2; exit 2 ;;
    *) break ;;
  esac
done
die() { echo "run_ascend_cluster.sh: $*" >&2; exit 2; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 = ${2:-<missing>}: must be a positive integer"; }
positive --worker-num "$worker_num"
positive --local-worker-num "$local_num"
positive --master-port "$master_port"
positive --hccl-connect-timeout "$connect_timeout"
positive --hccl-exec-timeout "$exec_timeout"
positive --hccl-buffsize "$buffsize"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout = $timeout: must be a number of seconds (0: none)"
(( worker_num % local_num == 0 )) || die "--worker-num = $worker_num: must be a multiple of --local-worker-num = $local_num"
[[ "$node_rank" =~ ^[0-9]+$ ]] && (( node_rank < worker_num / local_num )) \
  || die "--node-rank = ${node_rank:-<missing>}: must be in [0, $((worker_num / local_num)))"
[[ -n "$master_addr" ]] || die "--master-addr: required (the address of node 0)"
[[ "$exchange" == flat || "$exchange" == hierarchical ]] || die "--exchange = $exchange: must be flat or hierarchical"
[[ $# -gt 0 ]] || die "no pangu-moe arguments (e.g. -- train --config FILE --out DIR)"
msrun_bin="$(dirname "$python_bin")/msrun"
[[ -x "$msrun_bin" ]] || msrun_bin="$(command -v msrun)" || die "msrun not found next to $python_bin or on PATH"
mkdir -p "$log_dir" || die "--log-dir = $log_dir: cannot create it"

export HCCL_CONNECT_TIMEOUT="$connect_timeout" HCCL_EXEC_TIMEOUT="$exec_timeout" HCCL_BUFFSIZE="$buffsize"
export PATH="$(dirname "$python_bin"):$PATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
supervise_msrun run_ascend_cluster.sh "$log_dir" "$timeout" "$msrun_bin" --worker_num="$worker_num" \
  --local_worker_num="$local_num" --master_addr="$master_addr" --master_port="$master_port" \
  --node_rank="$node_rank" --log_dir="$log_dir" --join=True \
  "$package/cli.py" "$@" --set parallel.dispatch=hccl --set runtime.device=Ascend \
  --set "parallel.exchange=$exchange" --set "parallel.nodes=$((worker_num / local_num))" \
  --set "parallel.devices_per_node=$local_num"
