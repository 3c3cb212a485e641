#!/usr/bin/env bash
# filter.sh — what the content filter costs (issue 33), on loopback:
#   1. accept rate of `backupmx run` (release build, primary down: durable
#      acceptance) with [filter] off and on (a local rspamd, Debian's
#      package, started here with the test harness's configuration),
#      interleaved, smtp-source with 10 sessions x 1 KiB;
#   2. rspamd's own time per message (its `time_real`, from our log);
#   3. 200 concurrent sessions of 100 KiB while rspamd tarpits (a listener
#      that never answers; timeout 5 s, on_error accept): peak RSS.
#
#   bench/filter.sh [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
root=$here/..
RUNS=${1:-3}
BMX_PORT=${BMX_PORT:-2727} RSPAMD_PORT=${RSPAMD_PORT:-21333} TARPIT_PORT=${TARPIT_PORT:-21444}
work=$(mktemp -d /var/tmp/bmx-filter.XXXX)
cleanup() {
  stop_bmx || true
  stop_dns "$work"
  [ -n "${rspamd_pid:-}" ] && kill "$rspamd_pid" 2>/dev/null
  [ -n "${tarpit_pid:-}" ] && kill "$tarpit_pid" 2>/dev/null
  rm -rf "$work"
  true
}
trap cleanup EXIT
start_dns "$work"
command -v rspamd > /dev/null || { echo "rspamd is not installed (scripts/install-test-deps)" >&2; exit 2; }
command -v smtp-source > /dev/null || [ -x /usr/sbin/smtp-source ] || { echo "smtp-source missing (apt-get install postfix)" >&2; exit 2; }

(cd "$root" && cargo build --release --bin backupmx >&2)
BMX=$root/target/release/backupmx

# rspamd as tests/src/rspamd.rs runs it: no network, no fuzzy, no Hyperscan.
mkdir -p "$work/rspamd/"{run,db,log,local.d}
cat > "$work/rspamd/rspamd.conf" <<EOF
.include "\$CONFDIR/common.conf"
options {
    pidfile = "\$RUNDIR/rspamd.pid";
    .include "\$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "\$LOCAL_CONFDIR/local.d/options.inc"
}
logging { type = "file"; filename = "\$LOGDIR/rspamd.log"; level = "warning"; }
worker "normal" {
    bind_socket = "127.0.0.1:$RSPAMD_PORT";
    .include "\$CONFDIR/worker-normal.inc"
    count = 1;
}
EOF
printf 'dns {\n  nameserver = ["127.0.0.1:9"];\n  timeout = 0.3s;\n  retransmits = 1;\n}\ndisable_hyperscan = true;\n' > "$work/rspamd/local.d/options.inc"
echo 'enabled = false;' > "$work/rspamd/local.d/fuzzy_check.conf"
printf 'extended_spam_headers = true;\nskip_local = false;\n' > "$work/rspamd/local.d/milter_headers.conf"
r=$work/rspamd
rspamd -f -u root -g root -i -c "$r/rspamd.conf" --var CONFDIR=/etc/rspamd --var "LOCAL_CONFDIR=$r" \
  --var "RUNDIR=$r/run" --var "DBDIR=$r/db" --var "LOGDIR=$r/log" > "$r/out.log" 2>&1 &
rspamd_pid=$!
echo "waiting for rspamd (15-40 s to load its rules)" >&2
for _ in $(seq 1 900); do
  curl -s "http://127.0.0.1:$RSPAMD_PORT/ping" | grep -q pong && break
  sleep 0.2
done

start_bmx() {  # $1: extra config
  rm -rf "$work/data"
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
$1
[[domain]]
name = "example.test"
primary = ["127.0.0.1:9"]
TOML
  : > "$work/bmx.log"
  "$BMX" run --config "$work/backupmx.toml" >> "$work/bmx.log" 2>&1 &
  bmx_pid=$!
  wait_for_port "$BMX_PORT" "$work/bmx.log"
}
stop_bmx() { [ -n "${bmx_pid:-}" ] && kill "$bmx_pid" 2>/dev/null && wait "$bmx_pid" 2>/dev/null; bmx_pid=; }

# 1 and 2: accept rate off/on, interleaved.
for round in $(seq 1 "$RUNS"); do
  for mode in off on; do
    extra=""
    [ $mode = on ] && extra=$(printf '[filter]\nrspamd = "http://127.0.0.1:%s"' "$RSPAMD_PORT")
    start_bmx "$extra"
    settle
    bash "$here/smtp_accept.sh" --target "127.0.0.1:$BMX_PORT" --domain example.test \
      --sessions 10 --count 2000 --size 1024 --runs 1 --warmup 100 --label "filter_$mode" \
      --cpu-pids-cmd "echo $bmx_pid" | grep '^RUN'
    if [ $mode = on ]; then
      for field in seconds rspamd_seconds; do
        grep filter_result "$work/bmx.log" | grep -o " $field=[0-9.]*" | cut -d= -f2 | sort -n | awk -v f=$field '
          { v[NR] = $1 } END { if (NR) printf "FILTER_TIME %s messages=%d median_ms=%.2f p99_ms=%.2f\n", f, NR, v[int(NR/2)+1]*1000, v[int(NR*0.99)+1]*1000 }'
      done
    fi
    stop_bmx
  done
done
# rspamd's own time per message without our load beside it: 200 scans of
# a 1 KiB message one after another, from a loopback client as above (an
# outside address adds rspamd's DNS checks, which here go to a dead port).
printf 'From: sender@remote.test\r\nTo: user@example.test\r\nSubject: bench\r\n\r\n%s\r\n' "$(head -c 1024 /dev/zero | tr '\0' x)" > "$work/one.eml"
for _ in $(seq 1 200); do
  curl -s --data-binary @"$work/one.eml" -H 'IP: 127.0.0.1' -H 'From: sender@remote.test' -H 'Rcpt: user@example.test' \
    "http://127.0.0.1:$RSPAMD_PORT/checkv2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["time_real"])'
done | sort -n | awk '{ v[NR] = $1 } END { printf "RSPAMD_TIME scans=%d time_real_ms_median=%.2f p99=%.2f\n", NR, v[int(NR/2)+1]*1000, v[int(NR*0.99)+1]*1000 }'

# 3: a tarpitting filter and 200 sessions at once.
python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $TARPIT_PORT)); s.listen(1024); held = []
while True:
    c, _ = s.accept(); held.append(c)
" & tarpit_pid=$!
start_bmx "$(printf '[filter]\nrspamd = "http://127.0.0.1:%s"\ntimeout = "5s"\non_error = "accept"' "$TARPIT_PORT")"
started=$(date +%s.%N)
bash "$here/smtp_accept.sh" --target "127.0.0.1:$BMX_PORT" --domain example.test \
  --sessions 200 --count 400 --size 102400 --runs 1 --label filter_tarpit | grep '^RUN' || true
secs=$(echo "$(date +%s.%N) - $started" | bc)
peak=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$bmx_pid/status")
errors=$(grep -c 'filter_failed' "$work/bmx.log" || true)
echo "RESULT case=tarpit sessions=200 messages=400 size_kib=100 timeout_s=5 seconds=$secs peak_rss_mib=$peak filter_failed_lines=$errors"
