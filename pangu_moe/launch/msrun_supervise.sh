# Sourced by the msrun launch scripts: start msrun and supervise it so that no worker outlives the job.
#
# supervise_msrun NAME LOG_DIR TIMEOUT MSRUN_COMMAND...
#   Runs MSRUN_COMMAND (msrun's output goes to LOG_DIR/msrun.log, the workers' to LOG_DIR/worker_*.log).
#   On a worker error (a traceback in any worker log; the other workers may be blocked in a collective),
#   on TIMEOUT seconds (0: none), on a non-zero msrun exit and on Ctrl-C it stops msrun and every worker,
#   names the ranks whose processes ended first (a worker killed without a traceback: msrun notices it
#   by its heartbeat, within about 35 s on CPU), prints the tail of the failed workers' logs and exits 1
#   (130 on Ctrl-C, 143 on SIGTERM). It names LOG_DIR at start and streams the log of this node's first
#   worker (rank 0's on node 0) to stderr as it grows, without MindSpore's WARNING/INFO lines.

descendants() {  # every process below $1; msrun puts each worker in its own session, so no group kill
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}

stop_all() {  # msrun and every process it started, collected before they are re-parented
  local pids
  pids="$leader $known $(descendants "$leader")"
  kill -TERM $pids 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 $pids 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL $pids 2>/dev/null
  wait "$leader" 2>/dev/null
}

worker_rank() {  # the RANK_ID msrun gave worker process $1, or nothing for another process (the scheduler)
  local env
  env="$(tr '\0' '\n' < "/proc/$1/environ" 2>/dev/null)" || return
  grep -qx "MS_ROLE=MS_WORKER" <<<"$env" && sed -n 's/^RANK_ID=//p' <<<"$env"
}

shown=0  # lines of the first worker's log already streamed
stream_first_worker() {  # print the new lines of this node's first worker log (stderr)
  local first total
  first="$(ls -v "$1"/worker_*.log 2>/dev/null | head -n 1)"
  [[ -n "$first" ]] || return 0
  total="$(wc -l < "$first")"
  (( total > shown )) || return 0
  sed -n "$((shown + 1)),${total}p" "$first" | grep -vE "^\[(WARNING|INFO)\]" >&2
  shown=$total
}

supervise_msrun() {
  local name="$1" log_dir="$2" timeout="$3"
  shift 3
  # A reused log dir must not hold an earlier job's tracebacks: they would stop this job at once.
  rm -f "$log_dir"/worker_*.log "$log_dir"/scheduler.log "$log_dir"/msrun.log
  "$@" >"$log_dir/msrun.log" 2>&1 &
  leader=$!
  echo "$name: logs in $log_dir (msrun.log, worker_<rank>.log); the first worker's log follows" >&2
  known=""
  trap 'echo "$name: interrupted; stopping workers" >&2; stop_all; exit 130' INT
  trap 'echo "$name: terminated; stopping workers" >&2; stop_all; exit 143' TERM
  local deadline=$((SECONDS + timeout)) status="" code pid rank ended=""
  declare -A rank_of=()
  while kill -0 "$leader" 2>/dev/null; do
    known="$(descendants "$leader" | tr '\n' ' ')"  # live workers, remembered in case msrun dies first
    for pid in $known; do
      [[ -n "${rank_of[$pid]+x}" ]] || rank_of[$pid]="$(worker_rank "$pid")"
    done
    for pid in "${!rank_of[@]}"; do  # a worker that ended while msrun runs: killed, crashed, or done first
      if [[ -n "${rank_of[$pid]}" ]] && ! kill -0 "$pid" 2>/dev/null; then
        ended+="${ended:+, }rank ${rank_of[$pid]} (pid $pid, after ${SECONDS}s)"
        rank_of[$pid]=""
      fi
    done
    if (( timeout > 0 && SECONDS >= deadline )); then status="timeout after ${timeout}s"; break; fi
    stream_first_worker "$log_dir"
    if grep -qs "Traceback (most recent call last)" "$log_dir"/worker_*.log; then
      sleep 2  # let msrun notice the failure itself first
      kill -0 "$leader" 2>/dev/null && { status="worker failed"; break; }
    fi
    sleep 1
  done
  if [[ -z "$status" ]]; then
    wait "$leader"; code=$?
    [[ $code -eq 0 ]] || status="msrun exited with $code"
  fi
  if [[ -n "$status" ]]; then
    stop_all
    echo "$name: $status; workers stopped; logs in $log_dir" >&2
    [[ -z "$ended" ]] || echo "$name: worker processes that ended before the job did, earliest first: $ended" >&2
    for f in "$log_dir"/worker_*.log; do
      if grep -qs "Traceback" "$f"; then
        echo "---- $f" >&2
        grep -vE "^\[(WARNING|INFO)\]" "$f" | tail -n 15 >&2
      fi
    done
    exit 1
  fi
  stream_first_worker "$log_dir"
  exit 0
}
