"""AutoAWQ (GEMM) checkpoints: their 4-bit projections read exactly, kept as 4-bit weights by default, and every
other quantised form refused.

Tiny AWQ folders are written from the tiny random Llama: random levels q and zero points z in [0, 15] and fp16
scales per projection, packed by this file's own packer (written from the format's description, independent of
the reader's unpacker). The reference is a transformers model whose `nn.Linear` weights are the dequantised
matrices W = ((q - z) * s).T in float32."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from flexserve.compression.awq_checkpoint import awq_checkpoint_weight
from flexserve.compression.qweight import Int4Weight
from flexserve.errors import ModelLoadError, PolicyError
from flexserve.offload.executor import OffloadExecutor
from flexserve.offload.policy import Policy
from flexserve.weights import AWQBlocks, keep_quantized, layer_weights, open_source
from tests.weights.test_gguf_keep_quantized import greedy

GROUP = 32
PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of packed column c holds column 8c + PACK_ORDER[i]
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}


def pack(values: torch.Tensor) -> torch.Tensor:
    """uint8 [R, N] of 4-bit values -> int32 [R, N / 8], AutoAWQ's GEMM order."""
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i, j in enumerate(PACK_ORDER):
            out[:, c] |= values[:, 8 * c + j].long() << (4 * i)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out)  # the int32 with the same bits
    return out.to(torch.int32)


def write_awq(folder: str, hf, group: int = GROUP, seed: int = 0, **config_changes) -> dict[str, torch.Tensor]:
    """Write `hf` as an AWQ checkpoint into `folder`; returns each projection's dequantised nn.Linear weight."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    dense = {}
    for i in range(hf.config.num_hidden_layers):
        for proj in PROJECTIONS:
            name = f"model.layers.{i}.{proj}"
            n, k = state.pop(f"{name}.weight").shape
            q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)  # [K, N]
            z = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.uint8)  # [K/G, N]
            s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.01).half()  # [K/G, N]
            state.update({f"{name}.qweight": pack(q), f"{name}.qzeros": pack(z), f"{name}.scales": s})
            w_t = (q.float() - z.float().repeat_interleave(group, 0)) * s.float().repeat_interleave(group, 0)
            dense[name] = w_t.t().contiguous()  # [N, K], the spec's formula
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = {**AWQ_CONFIG, "group_size": group, **config_changes}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return dense


def reference(hf, dense: dict[str, torch.Tensor]):
    """`hf` with its projections replaced by the dequantised matrices."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, w in dense.items():
            ref.get_submodule(name).weight.copy_(w)
    return ref


@pytest.fixture
def awq(tiny_model, tmp_path):
    _, hf = tiny_model("llama-gqa")
    folder = str(tmp_path / "awq")
    return folder, hf, write_awq(folder, hf)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_every_projection_dequantizes_exactly_to_the_formula(awq):
    folder, hf, dense = awq
    read_dense, kept = open_source(folder), open_source(folder)
    assert keep_quantized(kept, "awq-checkpoint") == 2 * 7
    for i in range(hf.config.num_hidden_layers):
        want = {f"{p}.weight": torch.cat([dense[f"model.layers.{i}.{proj}"] for proj in projs])
                for p, projs in (("qkv", PROJECTIONS[:3]), ("o", PROJECTIONS[3:4]), ("up", PROJECTIONS[4:6]),
                                 ("down", PROJECTIONS[6:]))}
        plain, held = layer_weights(read_dense, i), layer_weights(kept, i)
        for name, w in want.items():
            assert same_bits(plain[name], w), (i, name)  # read dense: float32, the formula's bits
            blocks = held[name]
            assert isinstance(blocks, AWQBlocks) and blocks.shape == w.shape  # fused as blocks
            weight = awq_checkpoint_weight(*blocks.unpacked())
            assert isinstance(weight, Int4Weight) and weight.group_size == GROUP
            assert same_bits(weight.dequantize(torch.float32), w), (i, name)
        for name in ("attn_norm.weight", "mlp_norm.weight"):
            assert torch.equal(held[name], hf.state_dict()[f"model.layers.{i}.{_HF_NORMS[name]}"])
    assert all(isinstance(v, torch.Tensor) for v in kept.global_parts().values())  # embedding, norm, head dense


_HF_NORMS = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}


@pytest.mark.parametrize("percent", [(100, 0), (0, 100)])  # resident, and every weight streamed from the CPU tier
def test_logits_and_greedy_tokens_equal_transformers_on_the_dequantized_weights(awq, percent):
    folder, hf, dense = awq
    ref = reference(hf, dense)
    prompt = [5, 17, 42, 8, 60, 3]
    steps = 6
    for policy in (Policy(w_gpu_percent=percent[0], w_cpu_percent=percent[1]),  # an AWQ folder keeps its weights
                   Policy(w_gpu_percent=percent[0], w_cpu_percent=percent[1], quantization="awq-checkpoint")):
        ex = OffloadExecutor(open_source(folder), policy, "cpu", torch.float32)
        try:
            tokens, logits = greedy(ex, prompt, steps)
            layer = ex.layers[1]  # decoder layer 0
            held = {**layer.resident, **layer.offloaded}
            assert held["qkv.weight"].nbytes == 128 * 2 * (GROUP // 2 + 2 + 4)  # 128 rows, 2 groups: 4-bit + s, min
        finally:
            ex.close()
        with torch.no_grad():
            want = ref(torch.tensor([prompt + tokens])).logits[0]  # [S, V] over the whole final sequence
        assert tokens == want[len(prompt) - 1:-1].argmax(-1).tolist()  # transformers' greedy choices
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_the_reader_unpacks_nibbles_in_awq_order(awq):
    """Column 8c + ORDER[i] comes from nibble i: a single set nibble lands in exactly one place."""
    from flexserve.weights.awq_blocks import unpack

    for i, col in enumerate(PACK_ORDER):
        packed = torch.tensor([[0, 7 << (4 * i)]], dtype=torch.int32)  # packed column 1, nibble i = 7
        want = torch.zeros(1, 16, dtype=torch.uint8)
        want[0, 8 + col] = 7
        assert torch.equal(unpack(packed), want), i
    assert torch.equal(unpack(torch.tensor([[-1]], dtype=torch.int32)), torch.full((1, 8), 15, dtype=torch.uint8))


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "gptq"}, "quant_method 'gptq', which flexserve does not read"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes', which flexserve does not read"),
    ({"bits": 8}, r"form is not read by flexserve: bits 8 \(only 4\)"),
    ({"version": "gemv"}, r"version 'gemv' \(only gemm\)"),
    ({"zero_point": False}, r"zero_point False \(only true\)"),
    ({"group_size": -1}, r"group_size -1 \(an even number"),
])
def test_other_quantized_forms_are_refused_when_opened(tiny_model, tmp_path, change, message):
    _, hf = tiny_model("llama-gqa")
    folder = str(tmp_path / "q")
    write_awq(folder, hf, **change)
    with pytest.raises(ModelLoadError, match=message):
        open_source(folder)


def test_tensors_that_do_not_fit_are_refused(tiny_model, tmp_path):
    _, hf = tiny_model("llama-gqa")
    folder = str(tmp_path / "g16")
    write_awq(folder, hf, group=16)  # the tensors hold groups of 16
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["group_size"] = 32  # the config says 32
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelLoadError, match=r"layer 0's down projection: AWQ tensors do not fit together "
                                             r"with group size 32: qweight \(96, 8\) torch.int32, qzeros \(6, 8\)"):
        layer_weights(open_source(folder), 0)


def test_a_projection_of_the_wrong_shape_is_refused(tiny_model, tmp_path):
    _, hf = tiny_model("llama-gqa")
    folder = str(tmp_path / "wide")
    write_awq(folder, hf)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 128  # the stored gate/up have 96 rows
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelLoadError, match=r"tensor 'up.weight' has shape \(192, 64\), the config implies"):
        layer_weights(open_source(folder), 0)


def test_a_rounding_scheme_on_an_awq_folder_and_awq_checkpoint_on_others_are_refused(awq, tiny_model):
    folder = awq[0]
    for scheme in ("rtn4", "awq"):
        with pytest.raises(PolicyError, match=f"--quantization {scheme} rounds float weights, and this "
                                              f"checkpoint's are already quantized"):
            OffloadExecutor(open_source(folder), Policy(quantization=scheme), "cpu", torch.float32)
    with pytest.raises(PolicyError, match="--quantization gguf keeps the Q4_0/Q4_1/Q8_0 weights of a .gguf"):
        OffloadExecutor(open_source(folder), Policy(quantization="gguf"), "cpu", torch.float32)
    plain = tiny_model("llama-gqa")[0]
    with pytest.raises(PolicyError, match="--quantization awq-checkpoint keeps the 4-bit weights of an AutoAWQ"):
        OffloadExecutor(open_source(plain), Policy(quantization="awq-checkpoint"), "cpu", torch.float32)
