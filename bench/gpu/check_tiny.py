"""Tiny fixtures on the GPU in float32: last-prompt-position logits within 1e-3 of the HF
reference (reference.json) and teacher-forced argmax equal to the reference greedy ids.

usage: check_tiny.py BIN_DIR FIXTURES_DIR WORK_DIR  -> prints one line per model, exits 1 on failure
"""
import json
import os
import subprocess
import sys

import numpy as np

bin_dir, fixtures, work = sys.argv[1:4]
ok = True
for name in ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral"]:
    model = os.path.join(fixtures, name)
    ref = json.load(open(os.path.join(model, "reference.json")))
    prompt = ref.get("prompt_ids") or ref.get("prompt_token_ids") or ref["prompt"]
    greedy = ref.get("greedy_ids") or ref.get("greedy_token_ids") or ref["greedy"]
    last = np.array(ref.get("last_logits") or ref.get("logits"), dtype=np.float32)
    tokens = os.path.join(work, f"{name}.json")
    out = os.path.join(work, f"{name}.f32")
    json.dump({"prompt": prompt, "continuation": greedy}, open(tokens, "w"))
    for chunk in [None, 5]:
        cmd = [f"{bin_dir}/vllm-logits", model, "--tokens", tokens, "--out", out,
               "--device", "cuda", "--dtype", "float32", "--block-size", "4"]
        if chunk:
            cmd += ["--chunk", str(chunk)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL {name}: vllm-logits exited {r.returncode}: {r.stderr.strip()[-500:]}")
            ok = False
            continue
        rows = np.fromfile(out, dtype=np.float32).reshape(len(greedy), -1)
        err = float(np.abs(rows[0] - last).max())
        argmax = rows.argmax(axis=1).tolist()
        good = err < 1e-3 and argmax == greedy
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name} chunk={chunk}: max |logit - ref| {err:.2e}, "
              f"teacher-forced greedy {sum(a == b for a, b in zip(argmax, greedy))}/{len(greedy)}")
sys.exit(0 if ok else 1)
