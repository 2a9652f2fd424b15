#!/usr/bin/env bash
# Expert-parallel training on W CPU processes, one rank each (parallel.dispatch=msrun_cpu), via msrun.
#
# Usage:
#   run_scripts/run_msrun_cpu.sh [--workers W] [--port P] [--log-dir DIR] [--timeout SEC (1800; 0: none)] [--python PY]
#                                [--script FILE] [--] PANGU_MOE_ARGS...
# Example (2 nodes x 2 devices simulated as 4 processes):
#   run_scripts/run_msrun_cpu.sh --workers 4 -- train --config configs/demo_cpu.yaml --out runs/ep4 \
#       --set parallel.dispatch=msrun_cpu --set parallel.nodes=2 --set parallel.devices_per_node=2
#
# PANGU_MOE_ARGS go to the `pangu-moe` CLI in every worker (or to FILE with --script). W must equal
# parallel.nodes x parallel.devices_per_node. On any failure, on the timeout, and on Ctrl-C the script
# stops msrun and every worker, prints the tail of the failed worker logs and exits non-zero, so no
# process outlives it. It names its log folder at start and streams rank 0's log to stderr as it runs.
set -uo pipefail
. "$(dirname "$0")/msrun_supervise.sh"

workers=4
port=""
log_dir=""
timeout=1800
python_bin="$(command -v python || command -v python3)"
script=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --python) python_bin="$2"; shift 2 ;;
    --script) script="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option $1 (see --help; pangu-moe arguments go after --)" >&2; exit 2 ;;
    *) break ;;
  esac
done
die() { echo "run_msrun_cpu.sh: $*" >&2; exit 2; }
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers = $workers: must be a positive integer"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout = $timeout: must be a number of seconds (0: none)"
[[ -x "$python_bin" ]] || die "--python = $python_bin: not an executable (the Python with mindspore installed)"
"$python_bin" -c "import mindspore" 2>/dev/null || die "--python = $python_bin: cannot import mindspore"
msrun_bin="$(dirname "$python_bin")/msrun"
[[ -x "$msrun_bin" ]] || msrun_bin="$(command -v msrun)" || die "msrun not found next to $python_bin or on PATH"
# The package folder holding this script (physical path: run_scripts/ in a checkout is a symlink to it);
# its parent goes on PYTHONPATH, so a checkout and a wheel install both run their own package.
package="$(cd "$(dirname "$0")" && dirname "$(pwd -P)")"
repo="$(dirname "$package")"
if [[ -z "$script" ]]; then
  script="$package/cli.py"
  [[ $# -gt 0 ]] || die "no pangu-moe arguments (e.g. -- train --config FILE --set parallel.dispatch=msrun_cpu)"
fi
[[ -f "$script" ]] || die "--script = $script: no such file"
if [[ -z "$port" ]]; then  # a free port, so parallel jobs and leftovers of a crashed job do not collide
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-$(mktemp -d -t msrun_cpu_logs.XXXXXX)}"
mkdir -p "$log_dir" || die "--log-dir = $log_dir: cannot create it"

# msrun starts the `python` found first on PATH; the package is imported from this checkout.
export PATH="$(dirname "$python_bin"):$PATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
supervise_msrun run_msrun_cpu.sh "$log_dir" "$timeout" "$msrun_bin" --worker_num="$workers" \
  --local_worker_num="$workers" --master_port="$port" --log_dir="$log_dir" --join=True --cluster_time_out=120 \
  "$script" "$@"
