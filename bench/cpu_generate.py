"""CPU speed of flexserve vs transformers `generate` on the default SmolLM2-135M GGUF.

Both run greedy decoding in float32 on the same prompts in the same process; eos is ignored so every row makes
exactly --max-tokens tokens. Prints one table row per (engine, batch) and a JSON line.

    .venv/bin/python bench/cpu_generate.py --batches 1 16 --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from flexserve import LLM, SamplingParams
    from flexserve.weights import default_model_path

    path = default_model_path()
    llm = LLM(dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    tok = llm.tokenizer
    base = "Write a short story about a robot who learns to paint. Story number"
    rows = []
    for b in args.batches:
        prompts = [tok.encode(f"{base} {i}:") for i in range(b)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts[:1]], SamplingParams(max_tokens=2))  # warm-up
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        ours = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        # transformers: left-padded batch, the same greedy work
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            hf.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
            t = time.perf_counter()
            hf.generate(ids, attention_mask=mask, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                        do_sample=False, pad_token_id=0)
            theirs = time.perf_counter() - t
        row = dict(batch=b, tokens=n, flexserve_tok_s=n / ours, transformers_tok_s=n / theirs,
                   ratio=(n / ours) / (n / theirs))
        rows.append(row)
        print(f"batch {b:3d}: flexserve {row['flexserve_tok_s']:8.1f} tok/s, transformers "
              f"{row['transformers_tok_s']:8.1f} tok/s, ratio {row['ratio']:.2f}x", flush=True)
    print("RESULT " + json.dumps(dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                                      max_tokens=args.max_tokens, rows=rows)))


if __name__ == "__main__":
    main()
