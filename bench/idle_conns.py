#!/usr/bin/env python3
"""Open N idle SMTP connections (banner + EHLO), hold them, optionally run a
command while they are held (e.g. to sample the server's memory), then QUIT.

Loopback targets only. Prints one machine-readable line:
  IDLE target=H:P wanted=N connected=C greeted=G ehlo_ok=E hold_s=S [cmd_out="..."]

usage: bench/idle_conns.py --target 127.0.0.1:2525 --conns 1000 --hold 10 \
           [--sources 50] [--settle 3] [--cmd "bench/postfix_peer.sh mem"]
"""
import argparse
import ipaddress
import resource
import selectors
import socket
import subprocess
import sys
import time


def is_loopback(host):
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--hold", type=float, default=10.0,
                    help="seconds to hold after all greetings (or timeout)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait after greeting before running --cmd")
    ap.add_argument("--greet-timeout", type=float, default=30.0)
    ap.add_argument("--cmd", default=None)
    ap.add_argument("--sources", type=int, default=1,
                    help="spread connections over this many client addresses 127.0.0.2, 127.0.0.3, ...")
    a = ap.parse_args()
    # many connections need many descriptors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, a.conns + 100))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    host, _, port = a.target.rpartition(":")
    if not is_loopback(host):
        sys.exit(f"idle_conns: refusing non-loopback target {a.target}")
    port = int(port)

    sel = selectors.DefaultSelector()
    state = {}  # sock -> [phase, buffer]; phase 0=await banner, 1=await ehlo reply, 2=idle
    connected = 0
    for i in range(a.conns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if a.sources > 1:
            s.bind((f"127.0.0.{2 + i % min(a.sources, 250)}", 0))
        s.setblocking(False)
        try:
            s.connect((host.strip("[]"), port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        connected += 1
        state[s] = [0, b""]
        sel.register(s, selectors.EVENT_READ)

    greeted = ehlo_ok = 0
    deadline = time.time() + a.greet_timeout
    while time.time() < deadline and ehlo_ok + sum(1 for v in state.values() if v[0] < 0) < connected:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                state[s][0] = -1
                continue
            st = state[s]
            st[1] += data
            # a complete reply ends with a line "ddd " + CRLF
            lines = st[1].split(b"\r\n")
            if len(lines) < 2 or not any(len(l) >= 4 and l[3:4] == b" " for l in lines[:-1]):
                continue
            st[1] = b""
            if st[0] == 0:
                greeted += 1
                s.send(b"EHLO idle.remote.test\r\n")
                st[0] = 1
            elif st[0] == 1:
                ehlo_ok += 1
                st[0] = 2
        if greeted == connected and ehlo_ok == connected:
            break

    time.sleep(a.settle)
    out = ""
    if a.cmd:
        out = subprocess.run(a.cmd, shell=True, capture_output=True, text=True).stdout.strip()
    time.sleep(max(0.0, a.hold - a.settle))
    for s in list(state):
        try:
            s.setblocking(True)
            s.settimeout(1)
            s.send(b"QUIT\r\n")
        except OSError:
            pass
        s.close()
    line = (f"IDLE target={a.target} wanted={a.conns} connected={connected} "
            f"greeted={greeted} ehlo_ok={ehlo_ok} hold_s={a.hold}")
    if a.cmd:
        line += f' cmd_out="{out}"'
    print(line)


if __name__ == "__main__":
    main()
