"""Sums an `ncu --csv --metrics gpu__time_duration.sum` log per (kernel, grid): launches, total
and mean microseconds, largest first. Usage: python3 ncu_summary.py LOG.csv"""
import csv
import sys
from collections import defaultdict

scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
rows = defaultdict(list)
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"].split("(")[0]
    value = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1.0)
    rows[(name, r.get("Grid Size", ""))].append(value)
total = sum(sum(v) for v in rows.values())
print(f"ncu: {sum(len(v) for v in rows.values())} kernels, {total:.1f} us in all")
for (name, grid), v in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
    print(f"  {name:<40} grid {grid:<14} {len(v):4d} x {sum(v) / len(v):7.2f} us = {sum(v):8.1f} us")
