"""Peer: Hugging Face transformers' continuous batching (`generate_batch`) on the workload of REFERENCE.md.

Llama-3-8B shape, random bf16 weights, 256 requests with prompts of 64/128/256/512 tokens (cycling) and 128
new tokens each, eos disabled. Prints `PEER_RESULT {json}` with generated tokens/s (tokens counted from the
outputs, not assumed).
"""
import json
import sys
import time

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, ".")
from flexserve.config import PRESETS  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
cfg = LlamaConfig(**{k: v for k, v in PRESETS["llama-3-8b"].items() if k not in ("model_type", "architectures")})
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).eval()
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(10, cfg.vocab_size, ((64, 128, 256, 512)[i % 4],), generator=gen).tolist() for i in range(n)]
gc = GenerationConfig(max_new_tokens=128, min_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0)
model.generate_batch(prompts[:8], generation_config=gc)  # warm-up (kernels, graphs)
torch.cuda.synchronize()
t = time.perf_counter()
outs = model.generate_batch(prompts, generation_config=gc)
torch.cuda.synchronize()
dt = time.perf_counter() - t
tokens = sum(len(o.generated_tokens) for o in outs.values())
print("PEER_RESULT " + json.dumps({"peer": "transformers generate_batch", "requests": n, "generated_tokens": tokens,
                                   "seconds": dt, "tok_s": tokens / dt}))
