#!/usr/bin/env bash
# memory.sh — peak RSS of `backupmx run` (release build) under big mail, on
# loopback:
#   1. 40 concurrent senders of 30 MiB messages (primary down)
#   2. 200 concurrent senders of 30 MiB messages (primary down)
#   3. a drain of 80 queued 30 MiB messages to a primary that comes back
# Each case starts a fresh server and reads its VmHWM (peak resident set)
# from /proc at the end. Prints one RESULT line per case; the target is
# < 512 MiB in all three (issue 13).
#
#   bench/memory.sh            all cases
#   CASES="drain" bench/memory.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
root=$here/..
BMX_PORT=${BMX_PORT:-2727} SINK_PORT=${SINK_PORT:-2626}
CASES=${CASES:-"senders40 senders200 drain"}
SIZE=$((30 << 20))
work=$(mktemp -d /var/tmp/bmx-memory.XXXX)
trap 'stop_bmx; stop_dns "$work"; [ -n "${sink_pid:-}" ] && kill "$sink_pid" 2>/dev/null; rm -rf "$work"' EXIT
start_dns "$work"

(cd "$root" && cargo build --release --bin backupmx >&2)
BMX=$root/target/release/backupmx

start_bmx() {  # keeps $work/data unless $1 = fresh
  cat > "$work/backupmx.toml" <<TOML
hostname = "mx2.bench.test"
[smtp]
listen = ["127.0.0.1:$BMX_PORT"]
max_connections_per_ip = 1000
[storage]
data_dir = "$work/data"
[greylist]
enabled = false
[dns]
servers = ["127.0.0.1:$DNS_PORT"]
[delivery]
retry_initial = "1h"
retry_max = "2h"
[[domain]]
name = "example.test"
primary = ["127.0.0.1:$SINK_PORT"]
TOML
  [ "${1:-}" = fresh ] && rm -rf "$work/data"
  "$BMX" run --config "$work/backupmx.toml" >> "$work/bmx.log" 2>&1 &
  bmx_pid=$!
  wait_for_port "$BMX_PORT" "$work/bmx.log"
}
stop_bmx() { [ -n "${bmx_pid:-}" ] && kill "$bmx_pid" 2>/dev/null && wait "$bmx_pid" 2>/dev/null; bmx_pid=; }
peak_mib() { awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$bmx_pid/status"; }
queued() { "$BMX" --config "$work/backupmx.toml" queue list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }

for case in $CASES; do
  case $case in
    senders40|senders200)
      n=${case#senders}
      start_bmx fresh
      replies=$(python3 "$here/big_mail.py" send --port "$BMX_PORT" --sessions "$n" --size $SIZE --messages "$n")
      echo "RESULT case=$case peak_rss_mib=$(peak_mib) $replies"
      stop_bmx
      ;;
    drain)
      # Queue 80 while the primary is down (senders retry 452s until 80 are in).
      start_bmx fresh
      while [ "$(queued)" -lt 80 ]; do
        python3 "$here/big_mail.py" send --port "$BMX_PORT" --sessions 10 --size $SIZE --messages $((80 - $(queued))) > /dev/null
      done
      stop_bmx
      start_bmx
      python3 "$here/big_mail.py" sink --port "$SINK_PORT" & sink_pid=$!
      sleep 0.5
      "$BMX" --config "$work/backupmx.toml" queue flush > /dev/null
      start=$(date +%s.%N)
      until [ "$(queued)" = 0 ]; do sleep 0.5; done
      secs=$(echo "$(date +%s.%N) - $start" | bc)
      echo "RESULT case=drain messages=80 size_mib=30 peak_rss_mib=$(peak_mib) seconds=$secs"
      kill "$sink_pid"; sink_pid=
      stop_bmx
      ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
done
