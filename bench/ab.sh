#!/usr/bin/env bash
# ab.sh — two builds of backupmx (A and B) and smtp-sink, interleaved, on
# the durable-acceptance case (primary down), for the experiment log in
# docs/BENCHMARKS.md: is change B faster than A on this noisy machine?
#
#   bench/ab.sh BIN_A BIN_B [ROUNDS]      (SESSIONS=10 SIZE=1024 COUNT=3000)
#
# Prints RUN lines (smtp_accept.sh) and the paired medians B/A and
# A/sink, B/sink. Needs smtp-source/smtp-sink (Debian's postfix package;
# bench/postfix_peer.sh install). Loopback only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
A=$(realpath "$1") B=$(realpath "$2") ROUNDS=${3:-5}
SESSIONS=${SESSIONS:-10} SIZE=${SIZE:-1024} COUNT=${COUNT:-3000}
work=$(mktemp -d /var/tmp/bmx-ab.XXXX)
out=$here/results-ab.txt
: > "$out"
declare -A port=([a]=2731 [b]=2732 [smtp-sink]=2828)
start() {  # $1 = a|b, $2 = binary
  cat > "$work/$1.toml" <<TOML
hostname = "mx2.bench.test"
[smtp]
listen = ["127.0.0.1:${port[$1]}"]
max_connections = 20000
max_connections_per_ip = 20000
[storage]
data_dir = "$work/data-$1"
[greylist]
enabled = false
[dns]
servers = ["127.0.0.1:$DNS_PORT"]
[delivery]
retry_initial = "1h"
retry_max = "2h"
[[domain]]
name = "example.test"
primary = ["127.0.0.1:9"]
TOML
  rm -rf "$work/data-$1"
  "$2" run --config "$work/$1.toml" > "$work/$1.log" 2>&1 &
  echo $! > "$work/$1.pid"
  wait_for_port "${port[$1]}" "$work/$1.log"
}
stop_all() { for f in "$work"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done; }
trap stop_all EXIT
start_dns "$work"
start a "$A"; start b "$B"
smtp-sink -u nobody "127.0.0.1:${port[smtp-sink]}" 1024 </dev/null >"$work/sink.log" 2>&1 &
echo $! > "$work/sink.pid"
sync; sleep 2
labels=(a b smtp-sink)
for round in $(seq 0 $(( ROUNDS - 1 ))); do
  for k in 0 1 2; do
    l=${labels[$(( (round + k) % 3 ))]}
    pidf=$work/sink.pid; [ "$l" != smtp-sink ] && pidf=$work/$l.pid
    settle
    bash "$here/smtp_accept.sh" --label "$l" --target "127.0.0.1:${port[$l]}" --domain example.test \
      --sessions "$SESSIONS" --count "$COUNT" --size "$SIZE" --runs 1 --warmup 50 \
      --cpu-pids-cmd "cat $pidf" | grep '^RUN' | sed "s/ run=1 / run=$(( round + 1 )) /" | tee -a "$out" || true
  done
done
python3 "$here/summarize.py" "$out" --ratio b a
python3 "$here/summarize.py" "$out" --ratio a smtp-sink
python3 "$here/summarize.py" "$out" --ratio b smtp-sink
