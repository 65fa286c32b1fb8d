"""Random-weight models of real shapes in bfloat16 (and float16 with DTYPES="bfloat16 float16"): our engine vs HF transformers on the same
GPU with the same weights (saved as safetensors here).

For each architecture: HF greedy-generates a continuation of a random prompt; both sides are
then teacher-forced over prompt + continuation, and we compare the rows that predict each
continuation token: argmax agreement (asked: >= 90%) and relative L2 error of the logits
(asked for Qwen3 and Llama: < 2e-2; reported for Qwen2.5).

The Llama shape (group 4, head_dim 128, the attention of Llama-3 8B / W2) runs three times on
our side: as is, and with VLLM_ATT_BATCH_ROWS=1 so that its one-row decode steps go through
attention_batch's group-4 kernel (the tensor-core form W2's wide decode steps take), once at
its default split of 256 positions (one split for these contexts) and once at 64 (3-4 splits,
combined by the last). SHAPES="llama-gqa4" (names below, space separated) runs only those.

usage: check_hf.py BIN_DIR WORK_DIR  -> a line per model; exits 1 on failure
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

bin_dir, work = sys.argv[1:3]
torch.manual_seed(0)
SHAPES = {
    # Qwen2.5-0.5B: QKV bias, 14 heads over 2 KV heads (group 7), head_dim 64, tied.
    "qwen2.5-0.5b": (transformers.Qwen2Config, dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # Qwen3-0.6B: q/k RMSNorm, head_dim 128 != hidden/heads, 16 heads over 8 KV heads.
    "qwen3-0.6b": (transformers.Qwen3Config, dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # Llama-3's attention geometry at a small width: 8 heads over 2 KV heads (group 4),
    # head_dim 128, rope_theta 500000, Llama-3's vocabulary, untied. Default rotary: our loader
    # refuses Llama-3.1's "llama3" rope scaling (it would change the rotary frequencies).
    "llama-gqa4": (transformers.LlamaConfig, dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
# Prompt lengths: the Llama shape's decode steps all see more than 128 positions.
PROMPT_LENS = {"llama-gqa4": 150}
CONT_LEN = 64
# Our side's runs per shape: (label, extra environment).
ENGINE_RUNS = {"llama-gqa4": [("", {}), ("att_batch", {"VLLM_ATT_BATCH_ROWS": "1"}),
                              ("att_batch p64", {"VLLM_ATT_BATCH_ROWS": "1", "VLLM_ATT_PARTITION": "64"})]}
only = os.environ.get("SHAPES", "").split()
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ok = True
for dtype_name, (name, (cfg_cls, kw)) in [(d, item) for d in os.environ.get("DTYPES", "bfloat16").split()
                                          for item in SHAPES.items() if not only or item[0] in only]:
    PROMPT_LEN = PROMPT_LENS.get(name, 100)
    cfg = cfg_cls(**kw)
    cfg.architectures = [cfg_cls.__name__.replace("Config", "ForCausalLM")]
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=TORCH_DTYPES[dtype_name]).cuda().eval()
    # The default init (std 0.02) leaves logits nearly flat; scale the embeddings up so that
    # the argmax is decided by the network, not by rounding noise.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    path = os.path.join(work, name)
    model.save_pretrained(path, safe_serialization=True)
    prompt = torch.randint(1, 10000, (1, PROMPT_LEN), device="cuda")
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=CONT_LEN, do_sample=False, min_new_tokens=CONT_LEN)
        full = gen[:, : PROMPT_LEN + CONT_LEN]
        ref = model(full).logits[0, PROMPT_LEN - 1 : PROMPT_LEN + CONT_LEN - 1].float().cpu().numpy()
    cont = full[0, PROMPT_LEN:].tolist()
    tokens = os.path.join(work, f"{name}.json")
    json.dump({"prompt": prompt[0].tolist(), "continuation": cont}, open(tokens, "w"))
    out = os.path.join(work, f"{name}.f32")
    del model
    torch.cuda.empty_cache()
    for label, extra_env in ENGINE_RUNS.get(name, [("", {})]):
        tag = f"{name} {dtype_name}" + (f" ({label})" if label else "")
        r = subprocess.run([f"{bin_dir}/vllm-logits", path, "--tokens", tokens, "--out", out,
                            "--device", "cuda", "--dtype", dtype_name, "--chunk", "37"],
                           capture_output=True, text=True, env={**os.environ, **extra_env})
        if r.returncode != 0:
            print(f"FAIL {tag}: vllm-logits exited {r.returncode}: {r.stderr.strip()[-800:]}")
            ok = False
            continue
        ours = np.fromfile(out, dtype=np.float32).reshape(len(cont), -1)
        agree = float((ours.argmax(1) == ref.argmax(1)).mean())
        agree_cont = float((ours.argmax(1) == np.array(cont)).mean())
        rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
        # The issue asks the L2 bound of the Qwen3 shape; Qwen2's QKV bias adds a rounding step
        # that HF fuses into its matmul (we add it in fp32 then round), so it is reported only.
        good = agree >= 0.9 and (rel < 2e-2 or name.startswith("qwen2.5"))
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {tag}: argmax agreement with HF {agree:.1%} "
              f"(with HF's greedy ids {agree_cont:.1%}), relative L2 {rel:.2e}")
sys.exit(0 if ok else 1)
