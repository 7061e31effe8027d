"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) reproduce Hugging Face transformers in float32: greedy
tokens and every prompt position's logits, batched with padding, through the offline `LLM`."""
import pytest
import torch

from flexserve import LLM, SamplingParams
from flexserve.config import load_hf_config
from flexserve.models.moe import Routing, moe_mlp, route

from ..conftest import MOE_FAMILIES, PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def padded_logits(ex, prompts):
    """Logits of every position of `prompts`, left-padded into one batch of the executor."""
    L = max(map(len, prompts))
    state = ex.new_block([len(prompts)], L)
    valid = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompts])
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return ex.forward(state, [ids], [pos], [valid], all_logits=True)[0]


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_moe_greedy_and_logits_match_transformers(tiny_model, kind):
    folder, hf = tiny_model(kind)
    with LLM(folder, dtype="float32", device="cpu") as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]
        logits = padded_logits(llm.executor, PROMPTS)
    assert got == [hf_greedy(hf, p, 8) for p in PROMPTS]
    L = max(map(len, PROMPTS))
    with torch.no_grad():
        for r, p in enumerate(PROMPTS):
            ref = hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[r, L - len(p):], ref, atol=1e-4, rtol=1e-4)


def test_config_switches_come_from_config_json(tiny_model):
    mixtral = load_hf_config(tiny_model("mixtral")[0])
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.moe_intermediate_size) == (4, 2, 32)
    assert mixtral.norm_topk_prob and not mixtral.qk_norm and not mixtral.shared_expert_intermediate_size
    qwen2 = load_hf_config(tiny_model("qwen2-moe")[0])
    assert (qwen2.num_experts, qwen2.shared_expert_intermediate_size, qwen2.norm_topk_prob) == (8, 48, False)
    assert qwen2.qkv_bias
    qwen3 = load_hf_config(tiny_model("qwen3-moe")[0])
    assert qwen3.qk_norm and qwen3.norm_topk_prob and qwen3.experts_per_token == 3 and not qwen3.qkv_bias
    shapes = qwen2.layer_weight_shapes()
    assert shapes["experts.7.up.weight"] == (64, 64) and shapes["shared.down.weight"] == (64, 48)
    assert "up.weight" not in shapes


def test_routing_groups_tokens_by_expert():
    """Grouping is a permutation of the token slots: every (token, expert) pair appears once, in its group."""
    routing = Routing(torch.tensor([[2, 0], [0, 1], [2, 1]]), torch.tensor([[.6, .4], [.7, .3], [.5, .5]], dtype=torch.float64))
    groups = routing.groups(num_experts=4)
    assert [e for e, _, _ in groups] == [0, 1, 2]
    pairs = {(e, int(t), float(w)) for e, tokens, ws in groups for t, w in zip(tokens, ws)}
    assert pairs == {(2, 0, .6), (0, 0, .4), (0, 1, .7), (1, 1, .3), (2, 2, .5),
                     (1, 2, .5)}


def test_moe_mlp_asks_the_weights_to_run_experts(tiny_model):
    """A weight mapping with `run_experts` is handed every active expert at once, and its answers are used."""
    from flexserve.weights import layer_weights, open_source

    src = open_source(tiny_model("mixtral")[0])
    cfg, w = src.config, layer_weights(src, 0)
    h = torch.randn(1, 5, cfg.hidden_size)
    calls = []

    class Doubling(dict):
        def run_experts(self, work):
            calls.append([e for e, _ in work])
            from flexserve.models.moe import run_here
            return [2 * y for y in run_here(self, work)]

    want = 2 * moe_mlp(cfg, w, h)
    got = moe_mlp(cfg, Doubling(w), h)
    torch.testing.assert_close(got, want)
    chosen = route(cfg, w, h[0]).experts.unique().tolist()
    assert calls == [sorted(chosen)]


def test_the_graph_safe_path_equals_the_grouped_one(tiny_model):
    """Under CUDA graph capture every expert runs over every token, weighted by a dense combine matrix: the
    same sums as the grouped path."""
    from flexserve.models.moe import _every_expert
    from flexserve.weights import layer_weights, open_source

    src = open_source(tiny_model("qwen2-moe")[0])
    cfg, w = src.config, layer_weights(src, 1)
    h = torch.randn(2, 3, cfg.hidden_size)
    flat = h.reshape(-1, cfg.hidden_size)
    routed = _every_expert(cfg, w, flat, route(cfg, w, flat))
    shared = torch.sigmoid(flat @ w["shared_gate.weight"].T) * torch.nn.functional.linear(
        torch.nn.functional.silu(flat @ w["shared.up.weight"][:48].T) * (flat @ w["shared.up.weight"][48:].T),
        w["shared.down.weight"])
    torch.testing.assert_close(routed + shared, moe_mlp(cfg, w, h).reshape(-1, cfg.hidden_size))


def test_dense_qwen3_with_qk_norms_matches_transformers(tmp_path):
    """Qwen3 (dense): the per-head q/k norms are the only switch it adds to the Llama family."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ..conftest import TINY, randomize_

    torch.manual_seed(3)
    hf = randomize_(Qwen3ForCausalLM(Qwen3Config(**TINY, intermediate_size=96, num_key_value_heads=2,
                                                 head_dim=16, tie_word_embeddings=False)).float().eval(), norms=True)
    hf.save_pretrained(str(tmp_path))
    assert load_hf_config(str(tmp_path)).qk_norm
    with LLM(str(tmp_path), dtype="float32", device="cpu") as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]
    assert got == [hf_greedy(hf, p, 8) for p in PROMPTS]
