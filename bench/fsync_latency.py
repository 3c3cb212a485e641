#!/usr/bin/env python3
"""fsync_latency.py — what one durable commit costs on this disk, at least.

Writes N times 4 KiB (overwriting a preallocated file, as SQLite reuses its
WAL) and calls fdatasync after each, and prints the median and 90th
percentile latency of the fdatasync, and the CPU time per call. No server
can answer "250 queued" sooner than this after the end of DATA.

usage: bench/fsync_latency.py [DIR] [N]     (DIR defaults to /var/tmp)
"""
import os
import statistics
import sys
import tempfile
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
page = b"x" * 4096
fd, path = tempfile.mkstemp(dir=directory, prefix="fsync-latency.")
try:
    os.write(fd, page * 1024)
    os.fsync(fd)
    lat = []
    cpu0 = time.process_time()
    for i in range(n):
        os.pwrite(fd, page, (i % 1024) * 4096)
        t = time.perf_counter()
        os.fdatasync(fd)
        lat.append((time.perf_counter() - t) * 1e6)
    cpu = (time.process_time() - cpu0) * 1e6 / n
    lat.sort()
    print(
        f"FSYNC dir={directory} n={n} median_us={statistics.median(lat):.0f} "
        f"p90_us={lat[int(n * 0.9)]:.0f} min_us={lat[0]:.0f} cpu_us_per_call={cpu:.0f}"
    )
finally:
    os.close(fd)
    os.unlink(path)
