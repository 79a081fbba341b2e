#!/usr/bin/env bash
# Resident set size of a command over time: runs it, samples VmRSS every 0.5 s into TRACE (seconds, GiB),
# and prints the peak (as /usr/bin/time -v would). Usage: bash scripts/rss_trace.sh TRACE.tsv COMMAND...
set -uo pipefail
trace=$1; shift
"$@" &
pid=$!
start=$(date +%s.%N)
: > "$trace"
peak=0
while kill -0 "$pid" 2>/dev/null; do
  # The largest process of the job (the command may be a wrapper around python).
  kb=0
  for p in $pid $(pgrep -P "$pid"); do
    k=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    [ "${k:-0}" -gt "$kb" ] && kb=$k
  done
  now=$(date +%s.%N)
  awk -v t="$(echo "$now - $start" | bc)" -v kb="$kb" 'BEGIN {printf "%.1f\t%.3f\n", t, kb / 1048576}' >> "$trace"
  [ "$kb" -gt "$peak" ] && peak=$kb
  sleep 0.5
done
wait "$pid"
rc=$?
awk -v kb="$peak" 'BEGIN {printf "peak RSS %.2f GiB\n", kb / 1048576}'
exit $rc
