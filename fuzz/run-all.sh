#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600); stops at the first crash.
# New inputs go to corpus-work/ (ignored by git); corpus/ holds the committed seeds.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
for target in command_parser server_session bdat_framing client_replies proxy_header queue_record dnsbl_answer mta_sts_policy dane_certificate; do
  mkdir -p "corpus/$target" "corpus-work/$target"
  echo "== $target ($secs s)"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus-work/$target" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10
done
