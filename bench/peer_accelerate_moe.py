"""Peer: Hugging Face Accelerate's big-model offloading (`device_map="auto"` under a `max_memory` cap) of a
Mixtral-shaped model with random weights, batch-1 greedy decode.

Accelerate places whole decoder layers: as many as fit under the GPU cap on the GPU, the rest in host memory
(and on disk past the CPU cap), and moves each offloaded layer's weights, all of its experts included, to the
GPU at every forward. The model is built on the meta device, the placement is inferred with Accelerate's own
`infer_auto_device_map`, and each weight is then drawn at random straight on its device (no 93 GB copy on the
host first). Prints `PEER_RESULT {json}` with prefill seconds and decode tokens/s (tokens counted from the
output).

    .venv/bin/python bench/peer_accelerate_moe.py --preset mixtral-8x7b --gpu-mem 24GiB --cpu-mem 110GiB \\
        --prompt-len 128 --gen-len 32
    .venv/bin/python bench/peer_accelerate_moe.py --tiny --device cpu --gpu-mem 30MiB   # a check on a CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

sys.path.insert(0, ".")
from flexserve.config import PRESETS  # noqa: E402

TINY = dict(model_type="mixtral", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, num_local_experts=8,
            num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def build(args):
    """The model with its weights on the devices Accelerate chose, and that device map."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import MixtralConfig, MixtralForCausalLM

    shape = dict(TINY if args.tiny else PRESETS[args.preset])
    shape.pop("model_type", None)
    if shape.get("rope_scaling") is None:
        shape.pop("rope_scaling", None)
    cfg = MixtralConfig(**shape)
    dtype = getattr(torch, args.dtype)
    with init_empty_weights():
        model = MixtralForCausalLM(cfg).to(dtype).eval()
    main = 0 if args.device == "cuda" else "cpu"
    cap = {main: args.gpu_mem} if args.device == "cuda" else {}
    cap["cpu"] = args.cpu_mem if args.device == "cuda" else args.gpu_mem  # on a CPU the cap is the host's
    device_map = infer_auto_device_map(model, max_memory=cap, no_split_module_classes=model._no_split_modules,
                                       dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):  # random weights, drawn on their device
        where = _device_of(device_map, name)
        target = "cpu" if where in ("cpu", "disk") else f"cuda:{where}" if isinstance(where, int) else where
        t = torch.empty(p.shape, dtype=dtype, device=target)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.uniform_(-0.02, 0.02, generator=gen if t.device.type == "cpu" else None)
        _set(model, name, torch.nn.Parameter(t, requires_grad=False))
    model = dispatch_model(model, device_map=device_map, main_device=main,
                           offload_dir=args.offload_dir or tempfile.mkdtemp(prefix="accelerate-offload-"))
    return model, device_map


def _device_of(device_map: dict, name: str):
    best = ""
    for prefix in device_map:
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) >= len(best):
            best = prefix
    return device_map[best]


def _set(model, name: str, value) -> None:
    *path, leaf = name.split(".")
    mod = model
    for part in path:
        mod = getattr(mod, part)
    setattr(mod, leaf, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mixtral-8x7b", help="a flexserve preset of the Mixtral family")
    ap.add_argument("--tiny", action="store_true", help="a small Mixtral shape, to check the script on a CPU")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpu-mem", default="24GiB", help="Accelerate's max_memory for the GPU (the host on a CPU)")
    ap.add_argument("--cpu-mem", default="110GiB", help="max_memory for host memory; the rest goes to disk")
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, device_map = build(args)
    placed = {str(d): sum(1 for v in device_map.values() if v == d) for d in set(device_map.values())}
    print(f"built in {time.perf_counter() - t0:.1f} s; modules per device: {placed}", file=sys.stderr, flush=True)
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    ids = ids.to("cuda:0" if args.device == "cuda" else "cpu")

    def run(n: int) -> tuple[float, int]:
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out.shape[1] - ids.shape[1]

    run(2)  # warm-up
    prefill_s, _ = run(1)
    total_s, made = run(args.gen_len)
    decode_tok_s = (made - 1) / max(total_s - prefill_s, 1e-9)
    print("PEER_RESULT " + json.dumps({
        "peer": "accelerate device_map=auto", "model": "tiny-mixtral" if args.tiny else args.preset,
        "max_memory_gpu": args.gpu_mem, "max_memory_cpu": args.cpu_mem, "device_map": placed, "batch": 1,
        "prompt_len": args.prompt_len, "generated_tokens": made, "prefill_s": prefill_s, "total_s": total_s,
        "decode_tok_s": decode_tok_s}))


if __name__ == "__main__":
    main()
