#!/usr/bin/env python3
"""Where a run's forward time goes, from a VLLM_STEP_LOG file (runner.rs): steps with
prompt tokens apart, decode steps by rows, each with the KV bytes its attention reads
per second (sum of contexts x kv_bytes_per_token / forward time).

usage: step_log_summary.py LOG KV_BYTES_PER_CONTEXT_TOKEN  (all layers: W1 28 x 4096)
"""
import sys


def main():
    path, per_token = sys.argv[1], float(sys.argv[2])
    steps = []
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        tokens, seqs, decode_rows, max_ctx, sum_ctx, fwd, outside = line.split()
        steps.append((int(tokens), int(seqs), int(decode_rows), int(max_ctx), int(sum_ctx), float(fwd), float(outside)))
    total = sum(s[5] for s in steps)
    outside = sum(s[6] for s in steps)
    print(f"step log {path}: {len(steps)} steps, forward {total / 1e3:.3f} s, outside the runner {outside / 1e3:.3f} s")
    prefill = [s for s in steps if s[0] != s[2]]
    if prefill:
        t = sum(s[5] for s in prefill)
        toks = sum(s[0] for s in prefill)
        print(f"  steps with prompt tokens: {len(prefill)}, {t / 1e3:.3f} s ({100 * t / total:.1f}%), "
              f"{t / len(prefill):.2f} ms each, {toks} tokens")
    buckets = [(1, 8), (9, 32), (33, 64), (65, 128), (129, 192), (193, 256), (257, 1 << 30)]
    for lo, hi in buckets:
        sel = [s for s in steps if s[0] == s[2] and lo <= s[0] <= hi]
        if not sel:
            continue
        t = sum(s[5] for s in sel)
        ctx = sum(s[4] for s in sel)
        gbs = ctx * per_token / (t * 1e-3) / 1e9 if t > 0 else 0
        print(f"  decode rows {lo:3d}..{hi:<4d}: {len(sel):5d} steps, {t / 1e3:.3f} s ({100 * t / total:.1f}%), "
              f"{t / len(sel):.3f} ms each, mean context {ctx / max(1, sum(s[1] for s in sel)):.0f}, "
              f"KV {gbs:.0f} GB/s over the whole step")


if __name__ == "__main__":
    main()
