#!/usr/bin/env bash
# smtp_accept.sh - measure SMTP acceptance rate (messages/second) of any SMTP
# server with Postfix's smtp-source, N times, and print one machine-readable
# line per run plus a MEDIAN line. Target-agnostic: run it against the Rust
# ingest and against the Postfix peer with the same arguments to get a ratio.
#
# Output (stdout; diagnostics go to stderr), key=value, space separated:
#   RUN    label=L target=H:P sessions=S count=C size=B run=I load1=L rc=0 accept_s=X accept_mps=Y
#          [drain_s=D e2e_mps=E] [cpu_s=T cpu_us_per_msg=U]
#   MEDIAN label=L target=H:P sessions=S count=C size=B runs=N ok_runs=K accept_mps=M min_mps=A
#          max_mps=B spread_pct=P [e2e_mps=E e2e_min=.. e2e_max=..] [cpu_us_per_msg=U cpu_min=.. cpu_max=..]
# accept_mps = count / wall time of smtp-source (all messages got 250 after DATA).
# e2e_mps    = count / (accept_s + drain_s), only with --drain-cmd.
# spread_pct = (max - min) / median * 100 over successful runs.
# load1      = 1-minute load average just before the run (noise indicator).
# cpu_us_per_msg = server CPU (user+sys, whole process tree) per message, with --cpu-pids-cmd.
# A run with rc!=0 (smtp-source aborted on a non-2xx reply or I/O error) is
# reported with err="..." and excluded from the median.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/smtp_accept.sh --target HOST:PORT --domain DOMAIN [options]
  --target HOST:PORT   server under test (loopback only: 127.x.x.x, localhost)
  --domain DOMAIN      recipient domain (recipient = RCPT_LOCAL@DOMAIN)
  --sessions N         parallel SMTP sessions (smtp-source -s)          [1]
  --count N            messages per run (smtp-source -m)                [1000]
  --size BYTES         body payload bytes per message (smtp-source -l)  [1024]
  --runs N             measured runs                                    [3]
  --warmup N           messages sent once before the runs, not measured [0]
  --label TEXT         free label (no spaces) copied into every line    [run]
  --from ADDR          envelope sender                                  [sender@remote.test]
  --rcpt-local USER    recipient local part                             [user]
  --unique-rcpt        prepend a sequence number to each recipient (-N)
  --reuse-conn         send all of a session's messages over one connection (-d);
                       default is one message per connection, like real MX traffic
  --before-each CMD    shell command run (untimed) before every run, e.g. flush a queue
  --drain-cmd CMD      shell command run after every run whose duration is
                       reported as drain_s (e.g. wait until the relay queue is empty)
  --cpu-pids-cmd CMD   shell command printing the server's root PID(s); the CPU time
                       (user+sys) of those processes and all their descendants, reaped
                       children included, is measured over the run (+ drain) and
                       reported as cpu_s and cpu_us_per_msg: robust on a noisy machine
env: SMTP_SOURCE=path to smtp-source (default: from PATH or /usr/sbin)
EOF
}

TARGET= DOMAIN= SESSIONS=1 COUNT=1000 SIZE=1024 RUNS=3 WARMUP=0 LABEL=run
FROM=sender@remote.test RCPT_LOCAL=user EXTRA=() BEFORE= DRAIN= CPUCMD=
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET=$2; shift 2;;
    --domain) DOMAIN=$2; shift 2;;
    --sessions) SESSIONS=$2; shift 2;;
    --count) COUNT=$2; shift 2;;
    --size) SIZE=$2; shift 2;;
    --runs) RUNS=$2; shift 2;;
    --warmup) WARMUP=$2; shift 2;;
    --label) LABEL=$2; shift 2;;
    --from) FROM=$2; shift 2;;
    --rcpt-local) RCPT_LOCAL=$2; shift 2;;
    --unique-rcpt) EXTRA+=(-N); shift;;
    --reuse-conn) EXTRA+=(-d); shift;;
    --before-each) BEFORE=$2; shift 2;;
    --drain-cmd) DRAIN=$2; shift 2;;
    --cpu-pids-cmd) CPUCMD=$2; shift 2;;
    -h|--help) usage; exit 0;;
    *) echo "smtp_accept: unknown argument '$1'" >&2; usage >&2; exit 2;;
  esac
done
[ -n "$TARGET" ] && [ -n "$DOMAIN" ] || { usage >&2; exit 2; }
for v in SESSIONS COUNT SIZE RUNS WARMUP; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "smtp_accept: --${v,,} must be an integer" >&2; exit 2; }
done
case "$LABEL" in *[[:space:]]*) echo "smtp_accept: --label must not contain spaces" >&2; exit 2;; esac

# Loopback only: this workplace forbids load against any other address.
host=${TARGET%:*}
case "$host" in
  127.*|localhost|'[::1]'|::1) ;;
  *) echo "smtp_accept: refusing non-loopback target '$TARGET'" >&2; exit 2;;
esac

SRC=${SMTP_SOURCE:-$(command -v smtp-source || echo /usr/sbin/smtp-source)}
[ -x "$SRC" ] || { echo "smtp_accept: smtp-source not found (apt-get install postfix)" >&2; exit 2; }

now_ns() { date +%s%N; }
# CPU ticks (utime+stime+cutime+cstime) of the given root PIDs and all descendants.
tree_ticks() {
  [ $# -gt 0 ] || { echo 0; return; }
  # processes may vanish while being read: never let that fail the pipeline
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v roots="$*" '
    { line=$0; pid=$1; sub(/^.*\) /, "", line); split(line, f, " ")
      ppid[pid]=f[2]; t[pid]=f[12]+f[13]+f[14]+f[15] }
    END { n=split(roots, r, " "); for (i=1;i<=n;i++) in_tree[r[i]]=1
          changed=1; while (changed) { changed=0
            for (p in ppid) if (!(p in in_tree) && (ppid[p] in in_tree)) { in_tree[p]=1; changed=1 } }
          s=0; for (p in in_tree) if (p in t) s+=t[p]; print s }'
}
HZ=$(getconf CLK_TCK)
cpu_roots() { [ -n "$CPUCMD" ] && bash -c "$CPUCMD" 2>/dev/null | tr '\n' ' '; true; }
fmt() { awk -v n="$1" -v d="$2" 'BEGIN{printf "%.3f", n/d}'; }

send() {  # $1 = message count; stderr of smtp-source -> $ERRF
  "$SRC" -s "$SESSIONS" -m "$1" -l "$SIZE" -f "$FROM" -t "$RCPT_LOCAL@$DOMAIN" \
    ${EXTRA[@]+"${EXTRA[@]}"} "$TARGET" >/dev/null 2>"$ERRF"
}

ERRF=$(mktemp); trap 'rm -f "$ERRF"' EXIT
common="label=$LABEL target=$TARGET sessions=$SESSIONS count=$COUNT size=$SIZE"

if [ "$WARMUP" -gt 0 ]; then
  [ -n "$BEFORE" ] && bash -c "$BEFORE"
  send "$WARMUP" || echo "smtp_accept: warmup failed: $(head -c 300 "$ERRF")" >&2
  [ -n "$DRAIN" ] && bash -c "$DRAIN"
fi

rates=() e2es=() cpus=()
for i in $(seq 1 "$RUNS"); do
  [ -n "$BEFORE" ] && bash -c "$BEFORE"
  load1=$(cut -d' ' -f1 /proc/loadavg)
  roots=$(cpu_roots); c0=$(tree_ticks $roots)
  t0=$(now_ns); rc=0; send "$COUNT" || rc=$?; t1=$(now_ns)
  acc_s=$(fmt $((t1 - t0)) 1000000000)
  line="RUN $common run=$i load1=$load1 rc=$rc accept_s=$acc_s"
  if [ "$rc" = 0 ]; then
    mps=$(fmt "$COUNT" "$acc_s"); rates+=("$mps"); line+=" accept_mps=$mps"
  else
    line+=" accept_mps=NA"
  fi
  if [ -n "$DRAIN" ]; then
    t2=$(now_ns); drc=0; bash -c "$DRAIN" || drc=$?; t3=$(now_ns)
    dr_s=$(fmt $((t3 - t2)) 1000000000)
    if [ "$rc" = 0 ] && [ "$drc" = 0 ]; then
      e2e=$(awk -v c="$COUNT" -v a="$acc_s" -v d="$dr_s" 'BEGIN{printf "%.3f", c/(a+d)}')
      e2es+=("$e2e"); line+=" drain_s=$dr_s e2e_mps=$e2e"
    else
      line+=" drain_s=$dr_s drain_rc=$drc e2e_mps=NA"
    fi
  fi
  if [ -n "$CPUCMD" ]; then
    c1=$(tree_ticks $roots)
    cpu_s=$(fmt $((c1 - c0)) "$HZ"); cpu_us=$(awk -v c="$cpu_s" -v n="$COUNT" 'BEGIN{printf "%.1f", c*1e6/n}')
    line+=" cpu_s=$cpu_s cpu_us_per_msg=$cpu_us"; [ "$rc" = 0 ] && cpus+=("$cpu_us")
  fi
  if [ "$rc" != 0 ]; then
    err=$(tr '\n"' ' '"'"'' <"$ERRF" | head -c 300); line+=" err=\"$err\""
  fi
  echo "$line"
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{ if (NR==0) {print "NA"; exit}
  m = (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2; printf "%.3f %.3f %.3f %.1f\n", m, a[1], a[NR], (m>0)?(a[NR]-a[1])/m*100:0 }'; }

line="MEDIAN $common runs=$RUNS ok_runs=${#rates[@]}"
if [ ${#rates[@]} -gt 0 ]; then
  read -r m lo hi sp <<<"$(median "${rates[@]}")"
  line+=" accept_mps=$m min_mps=$lo max_mps=$hi spread_pct=$sp"
else
  line+=" accept_mps=NA"
fi
if [ -n "$DRAIN" ]; then
  if [ ${#e2es[@]} -gt 0 ]; then
    read -r m lo hi sp <<<"$(median "${e2es[@]}")"; line+=" e2e_mps=$m e2e_min=$lo e2e_max=$hi"
  else line+=" e2e_mps=NA"; fi
fi
if [ -n "$CPUCMD" ]; then
  if [ ${#cpus[@]} -gt 0 ]; then
    read -r m lo hi sp <<<"$(median "${cpus[@]}")"; line+=" cpu_us_per_msg=$m cpu_min=$lo cpu_max=$hi"
  else line+=" cpu_us_per_msg=NA"; fi
fi
echo "$line"
[ ${#rates[@]} -eq "$RUNS" ]
