"""HF transformers on W1 (BENCHMARKS.md): Qwen3-0.6B shape, random bf16 weights, 256
requests with prompts uniform in 100..1024 tokens (seeded), every output 523 tokens (the
workload's mean: generate_batch has no per-request length), through generate_batch (its
paged continuous batching). Prints one `hf_w1` line: output tok/s and wall time.

usage: W1_CONFIG=bench/gpu/configs/qwen3-0.6b.json python3 hf_w1.py
"""
import json
import os
import random
import time

import torch
import transformers
from transformers.generation import GenerationConfig

raw = json.load(open(os.environ["W1_CONFIG"]))
cfg = transformers.Qwen3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")})
OUT = 523
rng = random.Random(0)
prompts = [[rng.randrange(1, 100000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
model = None
for attn in ("paged|sdpa", "paged|eager"):  # transformers 5.17 names
    try:
        kw = {"attn_implementation": attn} if attn else {}
        model = transformers.Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16, **kw).cuda().eval()
        break
    except Exception as e:  # an attention implementation this version lacks
        print(f"attn_implementation {attn}: {e}")
gen = GenerationConfig(max_new_tokens=OUT, min_new_tokens=OUT, do_sample=False, pad_token_id=0)
with torch.no_grad():
    model.generate_batch(inputs=prompts[:4], generation_config=GenerationConfig(
        max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0), progress_bar=False)
    torch.cuda.synchronize()
    t = time.time()
    outs = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    torch.cuda.synchronize()
    dt = time.time() - t
produced = 0
for o in (outs.values() if isinstance(outs, dict) else outs):
    toks = getattr(o, "generated_tokens", None)
    produced += len(toks) if toks is not None else OUT
print(f"hf_w1 {produced / dt:,.0f} output tok/s ({produced} tokens in {dt:.1f} s, {len(prompts)} requests, "
      f"attn {model.config._attn_implementation})")
