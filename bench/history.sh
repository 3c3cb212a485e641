#!/usr/bin/env bash
# history.sh — what the outage history costs the status page at its
# largest: DOMAINS hosted domains (default 1 000), OUTAGES outages in all
# (default 10 000, spread over them and over 90 days) and 7 days of
# queue-depth samples for every domain (a point each minute: 10 million
# rows at the defaults, the worst case — real domains have mail queued a
# few hours a month). The store is seeded directly (sqlite3, the
# embedded schema), then each page is asked RUNS times (default 20) and
# the median and worst times are printed.
#
#   bench/history.sh
#   DOMAINS=100 RUNS=50 bench/history.sh
#   BMX=/path/to/older/backupmx bench/history.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
root=$here/..
BMX_PORT=${BMX_PORT:-2729} ADMIN_PORT=${ADMIN_PORT:-9328}
DOMAINS=${DOMAINS:-1000} OUTAGES=${OUTAGES:-10000} RUNS=${RUNS:-20}
work=$(mktemp -d /var/tmp/bmx-history.XXXX)
trap '[ -n "${bmx_pid:-}" ] && kill "$bmx_pid" 2>/dev/null; rm -rf "$work"' EXIT

if [ -z "${BMX:-}" ]; then
  (cd "$root" && cargo build --release --bin backupmx >&2)
  BMX=$root/target/release/backupmx
fi
{
  cat <<TOML
hostname = "mx2.bench.test"
[smtp]
listen = ["127.0.0.1:$BMX_PORT"]
[storage]
data_dir = "$work/data"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[dns]
servers = ["127.0.0.1:9"]
timeout = "1s"
[delivery]
retry_initial = "1h"
retry_max = "2h"
TOML
  for i in $(seq 1 "$DOMAINS"); do
    printf '[[domain]]\nname = "d%d.example"\nprimary = ["127.0.0.1:9"]\n' "$i"
  done
} > "$work/backupmx.toml"
"$BMX" run --config "$work/backupmx.toml" > "$work/bmx.log" 2>&1 &
bmx_pid=$!
wait_for_port "$BMX_PORT" "$work/bmx.log"

# The seed: what a store looks like after 90 days of such outages and a
# week of queue everywhere.
python3 - "$work/data/backupmx.db" "$DOMAINS" "$OUTAGES" <<'PY'
import random, sqlite3, sys, time
path, domains, outages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
db = sqlite3.connect(path, timeout=60)
now = int(time.time())
random.seed(1)
cols = ("accepted_messages, accepted_recipients, refused_greylist, refused_dnsbl, "
        "refused_unknown_user, refused_auth, refused_filter, delivered_messages, "
        "delivered_recipients, bounced_recipients, held_recipients, finished_messages, deleted_messages")
per = max(1, outages // domains)
rows = []
for d in range(1, domains + 1):
    start = now - 90 * 86400
    for n in range(1, per + 1):
        start += random.randint(3600, 90 * 86400 // per)
        dur = random.randint(300, 6 * 3600)
        m = random.randint(1, 500)
        rows.append((f"d{d}.example", n, start, start + dur, start + dur + 60, m, m + 10, 5, 7, 3, 0, 1,
                     m, m + 10, 0, 0, m, 0))
db.executemany(f"INSERT INTO outages (domain, number, start, ended, drained, {cols}) "
               "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
first = now - now % 60 - 7 * 86400
def samples():
    for d in range(1, domains + 1):
        for minute in range(first, now, 60):
            yield (f"d{d}.example", minute, (minute // 60 + d) % 200, 60)
db.executemany("INSERT INTO queue_samples (domain, minute, count, oldest_age) VALUES (?,?,?,?)", samples())
db.execute("INSERT INTO queue_peaks (hour, domain, peak) SELECT minute - minute % 3600, domain, max(count) "
           "FROM queue_samples GROUP BY 1, 2")
db.commit()
print(f"seeded: {len(rows)} outages, {domains} domains x 7 days of samples", file=sys.stderr)
PY
settle
for page in / /domain/d1.example "/domain/d1.example?days=30" /api/domains/d1.example/history; do
  times=$(for _ in $(seq 1 "$RUNS"); do
    curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$ADMIN_PORT$page"
  done | sort -n)
  median=$(echo "$times" | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  worst=$(echo "$times" | tail -1)
  bytes=$(curl -s "http://127.0.0.1:$ADMIN_PORT$page" | wc -c)
  echo "RESULT page=$page domains=$DOMAINS outages=$OUTAGES median_seconds=$median worst_seconds=$worst bytes=$bytes"
done
