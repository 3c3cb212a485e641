# lib.sh — shell functions the bench scripts share (sourced, not run).

# Waits (at most 10 s) until something listens on 127.0.0.1:$1; if nothing
# does, prints $2 (the server's log) and exits.
wait_for_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2; cat "$2" >&2; exit 1
}

# Waits (at most 60 s) until this machine's own CPU use (user, system,
# interrupts; not steal or iowait) stays under 15 % for half a second, so
# the work one server does after its run (Postfix's queue manager trying
# the dead primary for what it just accepted, writeback) is not charged
# to the next server's run.
settle() {
  local busy0 all0 busy1 all1
  for _ in $(seq 1 120); do
    read -r busy0 all0 < <(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    sleep 0.5
    read -r busy1 all1 < <(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    [ $(( (busy1 - busy0) * 100 )) -le $(( (all1 - all0) * 15 )) ] && return 0
  done
  echo "bench: machine still busy after 60 s, going on" >&2
}

# A local DNS server that answers at once (dnsmasq, installed if missing)
# on 127.0.0.1:$DNS_PORT (default 5353): the sender domain of the load,
# remote.test, publishes SPF (127.0.0.0/8 may send) and DMARC p=reject;
# every other name under test. is NXDOMAIN, anything else REFUSED.
# Sender authentication (per domain `auth`, on by default) asks it what it
# would ask a local caching resolver. As such a resolver does, answers
# carry a TTL (300 s) and NXDOMAIN its zone's SOA, so our resolver caches
# them: dnsmasq's local data alone has TTL 0 and no SOA, which would make
# every message ask again.
# $1 = a directory for its pid file. Stop it with stop_dns.
DNS_PORT=${DNS_PORT:-5353}
start_dns() {
  command -v dnsmasq >/dev/null 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsmasq-base >&2
  }
  dnsmasq --keep-in-foreground --conf-file=/dev/null --port="$DNS_PORT" \
    --listen-address=127.0.0.1 --bind-interfaces --no-resolv --no-hosts \
    --auth-server=ns.test,127.0.0.1 --auth-zone=test --auth-ttl=300 --local-ttl=300 \
    --local=/in-addr.arpa/ \
    --txt-record='remote.test,v=spf1 ip4:127.0.0.0/8 -all' \
    --txt-record='_dmarc.remote.test,v=DMARC1; p=reject' \
    --pid-file="$1/dnsmasq.pid" >"$1/dnsmasq.log" 2>&1 &
  echo $! > "$1/dnsmasq.shell.pid"
  for _ in $(seq 1 50); do
    [ -s "$1/dnsmasq.pid" ] && return 0
    sleep 0.1
  done
  echo "dnsmasq did not start" >&2; cat "$1/dnsmasq.log" >&2; exit 1
}
stop_dns() {
  [ -f "$1/dnsmasq.pid" ] && kill "$(cat "$1/dnsmasq.pid")" 2>/dev/null || true
}
