"""Mixtures of experts from GGUF files laid out as llama.cpp's converter writes them: Mixtral as the `llama`
architecture (Q/K rows interleaved), Qwen2-MoE and Qwen3-MoE as theirs (Hugging Face's rotary layout kept),
experts stacked in `ffn_{gate,up,down}_exps`, the shared expert in `*_shexp`. Greedy tokens and logits match
transformers."""
import pytest
import torch
from safetensors import safe_open

from flexserve import LLM, SamplingParams
from flexserve.weights.gguf_reader import GGUFSource

from ..conftest import PROMPTS, hf_greedy
from .test_gguf_reader import metadata, to_interleaved, write_gguf

_ATTN = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
         "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp",
         "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
         "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_EXPERT = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
ARCH = {"mixtral": "llama", "qwen2-moe": "qwen2moe", "qwen3-moe": "qwen3moe"}


def gguf_tensors(folder: str, cfg, arch: str) -> dict[str, torch.Tensor]:
    """The converter's tensors from a saved checkpoint: per-expert matrices stacked [E, rows, cols]."""
    f = safe_open(f"{folder}/model.safetensors", "pt")
    out = {"token_embd.weight": f.get_tensor("model.embed_tokens.weight"),
           "output_norm.weight": f.get_tensor("model.norm.weight"), "output.weight": f.get_tensor("lm_head.weight")}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name in f.keys():
        parts = name.split(".")
        if parts[1] != "layers":
            continue
        i, stem, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        t = f.get_tensor(name)
        if ".experts." in stem:
            e, proj = int(parts[-3]), parts[-2]
            experts.setdefault(f"blk.{i}.ffn_{_EXPERT[proj]}_exps.weight", {})[e] = t
            continue
        if stem in ("self_attn.q_proj", "self_attn.k_proj") and arch == "llama":
            heads = cfg.num_attention_heads if stem.endswith("q_proj") else cfg.num_key_value_heads
            t = to_interleaved(t, heads)
        if stem == "mlp.shared_expert_gate":
            t = t.reshape(-1)  # a vector in GGUF
        out[f"blk.{i}.{_ATTN[stem]}.{kind}"] = t
    for name, per in experts.items():
        out[name] = torch.stack([per[e] for e in sorted(per)])
    return out


def moe_metadata(hf, arch: str) -> dict:
    c = hf.config
    meta = metadata(hf, arch)
    meta |= {f"{arch}.expert_count": getattr(c, "num_local_experts", None) or c.num_experts,
             f"{arch}.expert_used_count": c.num_experts_per_tok}
    if arch != "llama":
        meta[f"{arch}.expert_feed_forward_length"] = c.moe_intermediate_size
        meta[f"{arch}.attention.key_length"] = c.hidden_size // c.num_attention_heads
    if getattr(c, "shared_expert_intermediate_size", 0):
        meta[f"{arch}.expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    return meta


@pytest.mark.parametrize("kind", list(ARCH))
def test_moe_gguf_matches_transformers(tiny_model, tmp_path, kind):
    folder, hf = tiny_model(kind)
    arch = ARCH[kind]
    path = write_gguf(tmp_path / f"{kind}.gguf", arch, moe_metadata(hf, arch),
                      gguf_tensors(folder, hf.config, arch))
    cfg = GGUFSource(path).config
    assert cfg.num_experts == (4 if kind == "mixtral" else 8) and cfg.qk_norm == (kind == "qwen3-moe")
    assert cfg.norm_topk_prob == (kind != "qwen2-moe")
    with LLM(path, dtype="float32", device="cpu") as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]],
                            SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        logits = llm.executor.forward(llm.executor.new_block([1], 8), [torch.tensor([PROMPTS[0]])],
                                      [torch.arange(len(PROMPTS[0]))[None]], [None], all_logits=True)[0]
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 5) for p in PROMPTS[:2]]
    with torch.no_grad():
        torch.testing.assert_close(logits[0], hf(torch.tensor([PROMPTS[0]])).logits[0], atol=1e-4, rtol=1e-4)
