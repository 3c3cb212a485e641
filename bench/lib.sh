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
