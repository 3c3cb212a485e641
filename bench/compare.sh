#!/usr/bin/env bash
# compare.sh — backupmx and Postfix as backup MX, side by side, in one run,
# on loopback. Prints RUN/MEDIAN lines (see smtp_accept.sh) and the ratios.
#
#   bench/compare.sh accept   [RUNS]   durable acceptance, primary down (and smtp-sink as the ceiling):
#                                      sessions 1/10/50 x 1 KiB/100 KiB
#   bench/compare.sh relay    [RUNS]   relay-through to smtp-sink (primary up)
#   bench/compare.sh idle     [N]      RSS of backupmx holding N idle sessions after EHLO
#   bench/compare.sh recovery [N]      N queued messages, primary comes up: seconds to the first
#                                      delivery and to empty
#   bench/compare.sh auth     [RUNS]   the cost of sender authentication: backupmx with auth = "annotate"
#                                      against auth = "off", 10 and 50 sessions x 1 KiB, primary down
#   bench/compare.sh relay-ab [RUNS]   relay-through of two builds, BMX (a) and BMX_B (b), and Postfix,
#                                      interleaved (AUTH_B=off|annotate: b's domain `auth`; a gets none,
#                                      so a build older than sender authentication can be a)
#   bench/compare.sh scale             the scale curve: SCALE="1000 10000 100000" queued 1 KiB messages
#                                      drained to a primary that comes back, backupmx (`queue flush`)
#                                      and Postfix (`postqueue -f`); `queue list --json` time and RSS
#   bench/compare.sh etrn [N]          the same released by ETRN alone (probe 1 h)
#                                      (SINK_OPTS=-p: a primary without PIPELINING; PROBE=1s: probe interval)
#
# BMX=PATH uses that backupmx binary instead of building one.
# Needs root (installs Debian's postfix for smtp-source/smtp-sink and the
# peer). Results go to bench/results-<scenario>.txt as well.
# accept takes SIZES="1024 102400" and SESSIONS="1 10 50" from the
# environment to run only some cases. DNS is a local dnsmasq that answers at
# once (lib.sh, start_dns); AUTH=off|annotate|enforce sets the domain's
# sender authentication (unset: the default, annotate).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
root=$here/..
scenario=${1:-accept}
RUNS=${2:-5}
BMX_PORT=2727 PEER_PORT=2525 SINK_PORT=2626 REF_PORT=2828 DOMAIN=example.test
export PEER_PORT SINK_PORT PEER_DOMAIN=$DOMAIN
work=$(mktemp -d /var/tmp/bmx-bench.XXXX)
out=$here/results-$scenario.txt
: > "$out"

bash "$here/postfix_peer.sh" install >&2
# BMX=PATH benchmarks that build instead (an A/B of two commits).
if [ -z "${BMX:-}" ]; then
  (cd "$root" && cargo build --release --bin backupmx >&2)
  BMX=$root/target/release/backupmx
fi

# The configuration of one backupmx: $1 = SMTP port, $2 = data directory;
# the domain's `auth` from $AUTH (unset: not written, the default).
bmx_config() {
  cat <<TOML
hostname = "mx2.bench.test"
[smtp]
listen = ["127.0.0.1:$1"]
max_connections = 20000
max_connections_per_ip = 20000
[storage]
data_dir = "$2"
[greylist]
enabled = false
[dns]
servers = ["127.0.0.1:$DNS_PORT"]
[delivery]
retry_initial = "1h"
retry_max = "2h"
probe_interval = "${PROBE:-5s}"
etrn_networks = ["127.0.0.0/8"]
[[domain]]
name = "$DOMAIN"
primary = ["127.0.0.1:$SINK_PORT"]
${AUTH:+auth = \"$AUTH\"}
TOML
}
start_bmx() {  # config in $work
  bmx_config "$BMX_PORT" "$work/data" > "$work/backupmx.toml"
  rm -rf "$work/data"
  "$BMX" run --config "$work/backupmx.toml" > "$work/bmx.log" 2>&1 &
  echo $! > "$work/bmx.pid"
  wait_for_port "$BMX_PORT" "$work/bmx.log"
}
stop_bmx() { kill "$(cat "$work/bmx.pid")" 2>/dev/null || true; sleep 1; }
# The ceiling: smtp-sink speaks SMTP and stores nothing.
start_ref() {
  smtp-sink -u nobody "127.0.0.1:$REF_PORT" 1024 </dev/null >"$work/ref-sink.log" 2>&1 &
  echo $! > "$work/ref.pid"
}
stop_ref() { [ -f "$work/ref.pid" ] && kill "$(cat "$work/ref.pid")" 2>/dev/null || true; }
trap 'stop_bmx; stop_ref; [ -f "$work/bmx-b.pid" ] && kill "$(cat "$work/bmx-b.pid")" 2>/dev/null; stop_dns "$work"; bash "$here/postfix_peer.sh" stop >/dev/null 2>&1 || true' EXIT
start_dns "$work"

accept() {
  bash "$here/postfix_peer.sh" start down >&2
  # Both start from an empty queue (backupmx from an empty data directory).
  bash "$here/postfix_peer.sh" flush >&2
  start_bmx
  start_ref
  for size in ${SIZES:-1024 102400}; do
    for sessions in ${SESSIONS:-1 10 50}; do
      count=$(( size > 10000 ? 1000 : 3000 ))
      [ "$sessions" = 1 ] && count=$(( count / 4 ))
      # Each case starts from empty queues and clean page cache, so one
      # case's backlog (Postfix's qmgr scanning it, dirty pages being
      # written back) does not slow the next.
      bash "$here/postfix_peer.sh" flush >&2
      stop_bmx; start_bmx; sync; sleep 2
      # Interleaved rounds: each round runs every server once, in an order
      # that rotates, so a quiet or a busy minute of this shared machine
      # falls on all of them alike, and each round gives a paired ratio.
      servers=(postfix:127.0.0.1:$PEER_PORT backupmx:127.0.0.1:$BMX_PORT smtp-sink:127.0.0.1:$REF_PORT)
      for round in $(seq 0 $(( RUNS - 1 ))); do
        for k in 0 1 2; do
          t=${servers[$(( (round + k) % 3 ))]}
          label=${t%%:*}
          cpu="bash $here/postfix_peer.sh pid"
          [ "$label" = backupmx ] && cpu="cat $work/bmx.pid"
          [ "$label" = smtp-sink ] && cpu="cat $work/ref.pid"
          settle
          bash "$here/smtp_accept.sh" --label "$label" --target "${t#*:}" --domain "$DOMAIN" \
            --sessions "$sessions" --count "$count" --size "$size" --runs 1 --warmup 50 \
            --cpu-pids-cmd "$cpu" | grep '^RUN' | sed "s/ run=1 / run=$(( round + 1 )) /" | tee -a "$out" || true
        done
      done
    done
  done
  python3 "$here/summarize.py" "$out" --ratio backupmx postfix
  python3 "$here/summarize.py" "$out" --ratio backupmx smtp-sink
}

relay() {
  bash "$here/postfix_peer.sh" start up >&2
  bash "$here/postfix_peer.sh" flush >&2
  start_bmx
  drain_bmx="for i in \$(seq 1 600); do [ \"\$($BMX --config $work/backupmx.toml queue list --json | grep -c '\"id\"')\" = 0 ] && exit 0; sleep 0.2; done; exit 1"
  # Interleaved rounds, as in accept().
  servers=(postfix:127.0.0.1:$PEER_PORT backupmx:127.0.0.1:$BMX_PORT)
  for round in $(seq 0 $(( RUNS - 1 ))); do
    for k in 0 1; do
      t=${servers[$(( (round + k) % 2 ))]}
      label=${t%%:*}
      drain="bash $here/postfix_peer.sh wait-empty 120"
      [ "$label" = backupmx ] && drain=$drain_bmx
      cpu="bash $here/postfix_peer.sh pid"
      [ "$label" = backupmx ] && cpu="cat $work/bmx.pid"
      settle
      bash "$here/smtp_accept.sh" --label "$label" --target "${t#*:}" --domain "$DOMAIN" \
        --sessions 10 --count 3000 --size 1024 --runs 1 --warmup 50 --drain-cmd "$drain" \
        --cpu-pids-cmd "$cpu" | grep '^RUN' | sed "s/ run=1 / run=$(( round + 1 )) /" | tee -a "$out" || true
    done
  done
  python3 "$here/summarize.py" "$out" --ratio backupmx postfix
}

relay_ab() {
  [ -n "${BMX_B:-}" ] || { echo "compare.sh relay-ab: set BMX=A and BMX_B=B (two builds)" >&2; exit 2; }
  local b_port=2730
  bash "$here/postfix_peer.sh" start up >&2
  bash "$here/postfix_peer.sh" flush >&2
  AUTH="" start_bmx
  AUTH=${AUTH_B:-} bmx_config "$b_port" "$work/data-b" > "$work/backupmx-b.toml"
  rm -rf "$work/data-b"
  "$BMX_B" run --config "$work/backupmx-b.toml" > "$work/bmx-b.log" 2>&1 &
  echo $! > "$work/bmx-b.pid"
  wait_for_port "$b_port" "$work/bmx-b.log"
  empty() {  # $1 binary, $2 config: waits until its queue is empty
    echo "for i in \$(seq 1 600); do [ \"\$($1 --config $2 queue list --json | grep -c '\"id\"')\" = 0 ] && exit 0; sleep 0.2; done; exit 1"
  }
  servers=(postfix:127.0.0.1:$PEER_PORT a:127.0.0.1:$BMX_PORT b:127.0.0.1:$b_port)
  for round in $(seq 0 $(( RUNS - 1 ))); do
    for k in 0 1 2; do
      t=${servers[$(( (round + k) % 3 ))]}
      label=${t%%:*}
      case $label in
        postfix) drain="bash $here/postfix_peer.sh wait-empty 120"; cpu="bash $here/postfix_peer.sh pid" ;;
        a) drain=$(empty "$BMX" "$work/backupmx.toml"); cpu="cat $work/bmx.pid" ;;
        b) drain=$(empty "$BMX_B" "$work/backupmx-b.toml"); cpu="cat $work/bmx-b.pid" ;;
      esac
      settle
      bash "$here/smtp_accept.sh" --label "$label" --target "${t#*:}" --domain "$DOMAIN" \
        --sessions 10 --count 3000 --size 1024 --runs 1 --warmup 50 --drain-cmd "$drain" \
        --cpu-pids-cmd "$cpu" | grep '^RUN' | sed "s/ run=1 / run=$(( round + 1 )) /" | tee -a "$out" || true
    done
  done
  python3 "$here/summarize.py" "$out" --ratio b a
  python3 "$here/summarize.py" "$out" --ratio a postfix
  python3 "$here/summarize.py" "$out" --ratio b postfix
}

scale() {
  local n t0 t1 flush_s list list_s list_kib rss_kib
  for n in ${SCALE:-1000 10000 100000}; do
    poll=0.1
    # backupmx: fill while the primary is down, then bring it back and flush.
    bash "$here/postfix_peer.sh" start down >&2
    bash "$here/postfix_peer.sh" flush >&2
    stop_bmx; start_bmx
    smtp-source -s 20 -m "$n" -l 1024 -f a@remote.test -t "u@$DOMAIN" "127.0.0.1:$BMX_PORT"
    sleep 8   # every message has had its first (failed) attempt
    list=$( { /usr/bin/time -f '%e %M' "$BMX" --config "$work/backupmx.toml" queue list --json > "$work/list.json"; } 2>&1 | tail -1)
    read -r list_s list_kib <<< "$list"
    [ "$(grep -c '"id"' "$work/list.json")" = "$n" ] || echo "scale: queue list shows $(grep -c '"id"' "$work/list.json") of $n" >&2
    settle
    t0=$(date +%s.%N)
    bash "$here/postfix_peer.sh" primary up >&2
    flush_s=$( { /usr/bin/time -f '%e' "$BMX" --config "$work/backupmx.toml" queue flush > /dev/null; } 2>&1 | tail -1)
    # Counted with a read-only query of the store: `queue list` of 100 000
    # entries every second would take most of a core from the drain.
    while [ "$(python3 -c "import sqlite3; print(sqlite3.connect('file:$work/data/backupmx.db?mode=ro', uri=True).execute('SELECT count(*) FROM queue').fetchone()[0])")" != 0 ]; do
      sleep "$poll"
    done
    t1=$(date +%s.%N)
    rss_kib=$(awk '/VmHWM/ { print $2 }' "/proc/$(cat "$work/bmx.pid")/status")
    echo "SCALE server=backupmx queued=$n drain_s=$(echo "$t1 - $t0" | bc) mps=$(echo "$n / ($t1 - $t0)" | bc) flush_s=$flush_s list_s=$list_s list_peak_kib=$list_kib server_peak_kib=$rss_kib" | tee -a "$out"
    stop_bmx
    [ "${SCALE_ONLY:-}" = backupmx ] && continue
    # Postfix: the same, `postqueue -f` after the primary is back.
    bash "$here/postfix_peer.sh" primary down >&2
    bash "$here/postfix_peer.sh" flush >&2
    smtp-source -s 20 -m "$n" -l 1024 -f a@remote.test -t "u@$DOMAIN" "127.0.0.1:$PEER_PORT"
    sleep 8
    settle
    t0=$(date +%s.%N)
    bash "$here/postfix_peer.sh" primary up >&2
    flush_s=$( { /usr/bin/time -f '%e' postqueue -f; } 2>&1 | tail -1)
    bash "$here/postfix_peer.sh" wait-empty 1800
    t1=$(date +%s.%N)
    echo "SCALE server=postfix queued=$n drain_s=$(echo "$t1 - $t0" | bc) mps=$(echo "$n / ($t1 - $t0)" | bc) flush_s=$flush_s" | tee -a "$out"
  done
}

idle() {
  local n=${RUNS:-10000}
  ulimit -n "$(ulimit -Hn)"
  bash "$here/postfix_peer.sh" start down >&2
  start_bmx
  pid=$(cat "$work/bmx.pid")
  python3 "$here/idle_conns.py" --target 127.0.0.1:$BMX_PORT --conns "$n" --sources 50 --greet-timeout 120 \
    --cmd "grep VmRSS /proc/$pid/status" | tee -a "$out"
}

# Seconds until the queue holds fewer than $1 messages (the first delivery)
# and until it is empty, from t0; printed as "FIRST EMPTY".
drain_times() {
  local n=$1 t0=$2 first="" left
  while :; do
    left=$($BMX --config "$work/backupmx.toml" queue list --json | grep -c '"id"' || true)
    now=$(date +%s.%N)
    [ -z "$first" ] && [ "$left" -lt "$n" ] && first=$(echo "$now - $t0" | bc)
    [ "$left" = 0 ] && { echo "$first $(echo "$now - $t0" | bc)"; return; }
    sleep 0.1
  done
}

recovery() {
  local n=${RUNS:-10000}
  bash "$here/postfix_peer.sh" start down >&2
  start_bmx
  bash "$here/smtp_accept.sh" --label fill --target 127.0.0.1:$BMX_PORT --domain "$DOMAIN" \
    --sessions 20 --count "$n" --size 1024 --runs 1 >&2
  sleep 8   # every message has had its first (failed) attempt
  # The clock starts before the primary is started: the figure includes
  # starting it, so it is an upper bound on "primary answers -> queue empty".
  t0=$(date +%s.%N)
  bash "$here/postfix_peer.sh" primary up >&2
  read -r first empty < <(drain_times "$n" "$t0")
  echo "RECOVERY messages=$n probe=${PROBE:-5s} sink_opts=${SINK_OPTS:-none} first=$first seconds=$empty" | tee -a "$out"
}

# ETRN (RFC 1985) from the primary's side: the probe is set to an hour, so
# only the ETRN can release the queue; seconds from the ETRN to the first
# delivery and to an empty queue.
etrn() {
  local n=${RUNS:-1000}
  PROBE=1h
  bash "$here/postfix_peer.sh" start down >&2
  start_bmx
  bash "$here/smtp_accept.sh" --label fill --target 127.0.0.1:$BMX_PORT --domain "$DOMAIN" \
    --sessions 20 --count "$n" --size 1024 --runs 1 >&2
  sleep 8
  bash "$here/postfix_peer.sh" primary up >&2
  sleep 1
  t0=$(date +%s.%N)
  exec 3<>/dev/tcp/127.0.0.1/$BMX_PORT
  read -r _ <&3
  printf 'EHLO primary.bench.test\r\n' >&3
  while read -r line <&3; do [[ $line == 250\ * ]] && break; done
  printf 'ETRN %s\r\n' "$DOMAIN" >&3
  read -r reply <&3
  printf 'QUIT\r\n' >&3
  exec 3>&-
  read -r first empty < <(drain_times "$n" "$t0")
  echo "ETRN messages=$n reply=${reply%%$'\r'} sink_opts=${SINK_OPTS:-none} first=$first seconds=$empty" | tee -a "$out"
}

# Two backupmx, the same but for the domain's `auth`, in interleaved
# rounds (as accept()); prints the annotate/off ratio per case.
auth() {
  bash "$here/postfix_peer.sh" start down >&2
  declare -A ports=([off]=2737 [annotate]=2747)
  start_mode() {  # $1 = off|annotate, from an empty data directory
    mkdir -p "$work/$1"
    [ -f "$work/$1/bmx.pid" ] && kill "$(cat "$work/$1/bmx.pid")" 2>/dev/null && sleep 1
    rm -rf "$work/$1/data"
    AUTH=$1 bmx_config "${ports[$1]}" "$work/$1/data" > "$work/$1/backupmx.toml"
    "$BMX" run --config "$work/$1/backupmx.toml" > "$work/$1/bmx.log" 2>&1 &
    echo $! > "$work/$1/bmx.pid"
    wait_for_port "${ports[$1]}" "$work/$1/bmx.log"
  }
  for sessions in ${SESSIONS:-10 50}; do
    start_mode off; start_mode annotate
    sync; sleep 2
    labels=(auth-off auth-annotate)
    for round in $(seq 0 $(( RUNS - 1 ))); do
      for k in 0 1; do
        label=${labels[$(( (round + k) % 2 ))]}
        mode=${label#auth-}
        settle
        bash "$here/smtp_accept.sh" --label "$label" --target "127.0.0.1:${ports[$mode]}" --domain "$DOMAIN" \
          --sessions "$sessions" --count 3000 --size 1024 --runs 1 --warmup 50 \
          --cpu-pids-cmd "cat $work/$mode/bmx.pid" | grep '^RUN' | sed "s/ run=1 / run=$(( round + 1 )) /" | tee -a "$out" || true
      done
    done
  done
  echo "auth_result log lines (annotate): $(grep -c 'event="auth_result"' "$work/annotate/bmx.log")" >&2
  grep -m1 'event="auth_result"' "$work/annotate/bmx.log" >&2 || true
  for mode in off annotate; do kill "$(cat "$work/$mode/bmx.pid")" 2>/dev/null || true; done
  python3 "$here/summarize.py" "$out" --ratio auth-annotate auth-off
}

"${scenario//-/_}"
