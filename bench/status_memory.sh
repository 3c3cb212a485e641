#!/usr/bin/env bash
# status_memory.sh — what the status page, the admin API and `queue list`
# cost the MX when its queue is long (an outage is when operators look):
# queues QUEUED 1 KiB messages (default 100 000) with smtp-source while the
# primary is down, then asks each page once and prints, per page, the
# server's resident set after it (VmRSS: what the page left the process
# holding), the time and the answer's size; and `queue list --json`'s time
# and peak RSS (its own process).
#
#   bench/status_memory.sh
#   QUEUED=1000000 bench/status_memory.sh
#   BMX=/path/to/older/backupmx bench/status_memory.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
root=$here/..
BMX_PORT=${BMX_PORT:-2728} ADMIN_PORT=${ADMIN_PORT:-9327}
QUEUED=${QUEUED:-100000}
work=$(mktemp -d /var/tmp/bmx-status.XXXX)
trap '[ -n "${bmx_pid:-}" ] && kill "$bmx_pid" 2>/dev/null; stop_dns "$work"; rm -rf "$work"' EXIT
start_dns "$work"
command -v smtp-source > /dev/null || { echo "status_memory.sh: smtp-source is needed (Debian package postfix)" >&2; exit 1; }

# BMX=path measures another build (an older one, for a before/after).
if [ -z "${BMX:-}" ]; then
  (cd "$root" && cargo build --release --bin backupmx >&2)
  BMX=$root/target/release/backupmx
fi
cat > "$work/backupmx.toml" <<TOML
hostname = "mx2.bench.test"
[smtp]
listen = ["127.0.0.1:$BMX_PORT"]
[storage]
data_dir = "$work/data"
[greylist]
enabled = false
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[dns]
servers = ["127.0.0.1:$DNS_PORT"]
[delivery]
retry_initial = "1h"
retry_max = "2h"
[[domain]]
name = "example.test"
primary = ["127.0.0.1:9"]
TOML
"$BMX" run --config "$work/backupmx.toml" > "$work/bmx.log" 2>&1 &
bmx_pid=$!
wait_for_port "$BMX_PORT" "$work/bmx.log"
smtp-source -s 20 -m "$QUEUED" -l 1024 -f a@remote.test -t u@example.test "127.0.0.1:$BMX_PORT"
# Every message attempted once (the dead primary), so each has an error.
sleep 3
settle
rss_mib() { awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$bmx_pid/status"; }
echo "RESULT page=idle queued=$QUEUED rss_mib=$(rss_mib)"
for page in / /domain/example.test "/domain/example.test?q=nomatch" /api/status "/api/queue?domain=example.test"; do
  read -r secs bytes < <(curl -s -o /dev/null -w '%{time_total} %{size_download}\n' "http://127.0.0.1:$ADMIN_PORT$page")
  echo "RESULT page=$page queued=$QUEUED rss_mib=$(rss_mib) seconds=$secs bytes=$bytes"
done
read -r secs peak < <({ /usr/bin/time -f '%e %M' "$BMX" --config "$work/backupmx.toml" queue list --json > /dev/null; } 2>&1)
echo "RESULT command=queue-list-json queued=$QUEUED seconds=$secs peak_rss_mib=$((peak / 1024))"
