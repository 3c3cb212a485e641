#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600); stops at the first crash.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
for target in command_parser server_session client_replies proxy_header queue_record dnsbl_answer; do
  mkdir -p "corpus/$target"
  echo "== $target ($secs s)"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10
done
