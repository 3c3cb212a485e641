#!/usr/bin/env python3
"""Turn smtp_accept.sh output into markdown tables, and ratios between labels.

usage: bench/summarize.py results.txt [more.txt ...]          # one table of MEDIAN lines
       bench/summarize.py results.txt --ratio rust-down postfix-down
           # per (sessions, size): accept_mps(A)/accept_mps(B) and cpu_us_per_msg(B)/cpu_us_per_msg(A)
If several MEDIAN lines share (label, sessions, size), the median is recomputed
over all their RUN lines.
"""
import argparse
import shlex
import statistics
import sys
from collections import defaultdict


def parse(line):
    kind, _, rest = line.partition(" ")
    kv = {}
    for tok in shlex.split(rest):
        k, _, v = tok.partition("=")
        kv[k] = v
    return kind, kv


def fnum(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ratio", nargs=2, metavar=("A", "B"))
    a = ap.parse_args()

    runs = defaultdict(list)  # (label, sessions, size) -> list of kv
    order = []
    for fn in a.files:
        with open(fn) as f:
            for line in f:
                if not line.startswith("RUN "):
                    continue
                _, kv = parse(line.strip())
                key = (kv["label"], int(kv["sessions"]), int(kv["size"]))
                if key not in runs:
                    order.append(key)
                if kv.get("rc") == "0":
                    runs[key].append(kv)

    def stats(key, field):
        vals = [fnum(r.get(field)) for r in runs.get(key, [])]
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return statistics.median(vals), min(vals), max(vals), len(vals)

    def paired(ka, kb):
        """Run i of A against run i of B: with interleaved rounds (compare.sh)
        both ran within the same minute, so machine noise mostly cancels."""
        rates_b = {r["run"]: fnum(r.get("accept_mps")) for r in runs.get(kb, [])}
        ratios = sorted(
            fnum(r.get("accept_mps")) / rates_b[r["run"]]
            for r in runs.get(ka, [])
            if rates_b.get(r["run"]) and fnum(r.get("accept_mps"))
        )
        if not ratios:
            return "n/a"
        return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}, {len(ratios)} pairs)"

    if a.ratio:
        A, B = a.ratio
        print(f"| sessions | size B | {A} msg/s | {B} msg/s | throughput ratio {A}/{B} | CPU µs/msg {A} | CPU µs/msg {B} | CPU-efficiency ratio {B}/{A} | paired ratio {A}/{B}: median (min–max) of runs |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in order:
            if key[0] != A:
                continue
            kb = (B, key[1], key[2])
            sa, sb = stats(key, "accept_mps"), stats(kb, "accept_mps")
            ca, cb = stats(key, "cpu_us_per_msg"), stats(kb, "cpu_us_per_msg")
            if not sa or not sb:
                continue
            r = sa[0] / sb[0]
            cr = f"{cb[0] / ca[0]:.2f}" if ca and cb and ca[0] > 0 else "n/a"
            print(f"| {key[1]} | {key[2]} | {sa[0]:.0f} | {sb[0]:.0f} | {r:.2f} | "
                  f"{ca[0]:.0f} | {cb[0]:.0f} | {cr} |" if ca and cb else
                  f"| {key[1]} | {key[2]} | {sa[0]:.0f} | {sb[0]:.0f} | {r:.2f} | n/a | n/a | n/a |",
                  end="")
            print(f" {paired(key, kb)} |")
        # Relay-through: accepted *and* delivered, per second.
        for key in order:
            if key[0] != A:
                continue
            ea, eb = stats(key, "e2e_mps"), stats((B, key[1], key[2]), "e2e_mps")
            if ea and eb:
                print(f"\nend to end, sessions={key[1]} size={key[2]}: {A} {ea[0]:.0f} msg/s "
                      f"({ea[1]:.0f}–{ea[2]:.0f}), {B} {eb[0]:.0f} msg/s ({eb[1]:.0f}–{eb[2]:.0f}), "
                      f"ratio {ea[0] / eb[0]:.2f}")
        return

    print("| label | sessions | size B | runs | accept msg/s median | min–max | spread % | e2e msg/s median | CPU µs/msg median |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in order:
        s = stats(key, "accept_mps")
        if not s:
            print(f"| {key[0]} | {key[1]} | {key[2]} | 0 | failed | | | | |")
            continue
        m, lo, hi, n = s
        e = stats(key, "e2e_mps")
        c = stats(key, "cpu_us_per_msg")
        print(f"| {key[0]} | {key[1]} | {key[2]} | {n} | {m:.0f} | {lo:.0f}–{hi:.0f} | "
              f"{(hi - lo) / m * 100:.0f} | {e[0]:.0f} |" if e else
              f"| {key[0]} | {key[1]} | {key[2]} | {n} | {m:.0f} | {lo:.0f}–{hi:.0f} | "
              f"{(hi - lo) / m * 100:.0f} | – |", end="")
        print(f" {c[0]:.0f} |" if c else " – |")


if __name__ == "__main__":
    main()
