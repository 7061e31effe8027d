"""`--quantization gguf`: a GGUF file's Q4_0/Q4_1/Q8_0 projections kept in their blocks, not dequantised.

Tiny GGUF files are written from a tiny random Llama with a mix of encodings per projection; what is kept must
dequantise to exactly what the plain reader gives, and the model must give the same logits and greedy tokens
as when loaded dense."""
import pytest
import torch

from flexserve.compression.qweight import Int4Weight, Int8GroupWeight
from flexserve.errors import PolicyError
from flexserve.offload.executor import OffloadExecutor
from flexserve.offload.policy import Policy
from flexserve.weights import GGUFBlocks, default_model_path, keep_quantized, layer_weights, open_source
from flexserve.weights.gguf_reader import GGUFSource
from tests.weights.test_gguf_reader import gguf_tensors, metadata, write_gguf

# per layer: GGUF projection name -> encoding (F32/F16 written as floats)
MIXED = [
    {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q4_1", "ffn_gate": "Q8_0",
     "ffn_up": "Q8_0", "ffn_down": "Q4_1"},
    {"attn_q": "Q4_1", "attn_k": "Q8_0", "attn_v": "Q4_1", "attn_output": "F16", "ffn_gate": "Q4_1",
     "ffn_up": "Q4_1", "ffn_down": "Q8_0"},  # q/k/v of two encodings: fused dense
]


def write(path, hf, types: list[dict[str, str]], embedding: str = "Q8_0") -> str:
    """A GGUF file of the tiny model, each layer's projections in `types`, embedding and head in `embedding`."""
    def encoding(name: str, t: torch.Tensor) -> str:
        parts = name.split(".")
        if parts[0] == "blk":
            return types[int(parts[1])].get(parts[2], "F32")
        return embedding if t.dim() == 2 else "F32"

    return write_gguf(path, "llama", metadata(hf), gguf_tensors(hf, tied=False), encoding=encoding)


@pytest.fixture
def mixed(tiny_model, tmp_path):
    _, hf = tiny_model("llama-gqa")
    assert hf.config.hidden_size % 32 == 0 and hf.config.intermediate_size % 32 == 0
    return write(tmp_path / "mixed.gguf", hf, MIXED), hf


def test_kept_layers_dequantize_to_exactly_the_dense_read(mixed):
    from flexserve.compression.ggml import ggml_weight

    path, hf = mixed
    dense, kept = GGUFSource(path), GGUFSource(path)
    assert kept.keep_quantized() == 13  # layer 0's seven, layer 1's six (not its F16 o)
    for i, forms in enumerate([{"qkv": Int4Weight, "o": Int4Weight, "up": Int8GroupWeight, "down": Int4Weight},
                               {"qkv": torch.Tensor, "o": torch.Tensor, "up": Int4Weight, "down": Int8GroupWeight}]):
        want, got = layer_weights(dense, i), layer_weights(kept, i)
        assert got.keys() == want.keys()
        for name, value in got.items():
            if isinstance(value, GGUFBlocks):
                value = ggml_weight(value.type_name, value.blocks, value.in_features).dequantize(torch.float32)
            assert torch.equal(value, want[name]), (i, name)  # Q/K rows permuted back as the dense ones
        for proj, form in forms.items():
            block = got[f"{proj}.weight"]
            held = ggml_weight(block.type_name, block.blocks, block.in_features) \
                if isinstance(block, GGUFBlocks) else block
            assert isinstance(held, form), (i, proj)
    assert all(isinstance(v, torch.Tensor) for v in kept.global_parts().values())  # Q8_0 embedding stays dense


def greedy(ex: OffloadExecutor, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens, and the logits of the whole final sequence (recomputed each step: the model is tiny)."""
    ids = list(prompt)
    for step in range(steps + 1):
        x = torch.tensor([ids])
        state = ex.new_block([1], len(ids))
        logits = ex.forward(state, [x], [torch.arange(len(ids))[None]], [None], all_logits=True)[0][0]  # [S, V]
        if step < steps:
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], logits


@pytest.mark.parametrize("percent", [(100, 0), (0, 100)])  # resident, and every weight streamed from the CPU tier
def test_logits_and_greedy_tokens_equal_the_dense_load(mixed, percent):
    path, hf = mixed
    base = Policy(w_gpu_percent=percent[0], w_cpu_percent=percent[1])
    prompt = [5, 17, 42, 8, 60, 3]
    out = {}
    for name, policy in (("dense", base), ("gguf", base.replace(quantization="gguf"))):
        ex = OffloadExecutor(GGUFSource(path), policy, "cpu", torch.float32)
        try:
            out[name] = greedy(ex, prompt, 6)
            if name == "gguf":  # the placed weights are the packed ones, counted at their packed size
                layer = ex.layers[1]  # decoder layer 0 (0 is the embedding)
                held = {**layer.resident, **layer.offloaded}
                assert held["qkv.weight"].nbytes == 128 * 2 * (18 + 2)  # 128 rows of two Q4_0 blocks + fp16 mins
                assert held["up.weight"].nbytes == 192 * 2 * 34  # 192 rows of two Q8_0 blocks, as in the file
        finally:
            ex.close()
    assert out["gguf"][0] == out["dense"][0]
    assert torch.equal(out["gguf"][1], out["dense"][1])


def test_a_file_without_kept_encodings_is_refused(tiny_model, tmp_path):
    _, hf = tiny_model("llama-gqa")
    path = write(tmp_path / "f16.gguf", hf, [{}, {"attn_q": "F16"}])
    with pytest.raises(PolicyError, match=r"keeps projections stored as Q4_0, Q4_1, Q8_0; f16.gguf stores them "
                                          r"as F16, F32, which are read dequantized"):
        OffloadExecutor(GGUFSource(path), Policy(quantization="gguf"), "cpu", torch.float32)


def test_a_model_that_is_not_a_gguf_file_is_refused(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    for source in (open_source(folder), open_source("dummy:smollm2-135m")):
        with pytest.raises(PolicyError, match="--quantization gguf keeps the Q4_0/Q4_1/Q8_0 weights of a .gguf"):
            OffloadExecutor(source, Policy(quantization="gguf"), "cpu", torch.float32)
    with pytest.raises(PolicyError, match="--quant-group-size applies to the 4-bit schemes"):
        Policy(quantization="gguf", quant_group_size=32)


def test_smollm2_keeps_every_projection_and_generates_the_same_tokens():
    """The real Q4_1 file: every projection kept as 4-bit, the same greedy tokens and logits as the dense load
    (a short run: each step of the CPU path rebuilds every 4-bit matrix)."""
    assert keep_quantized(GGUFSource(default_model_path())) == 30 * 7
    prompt = [1, 504, 3575, 282, 4649, 314]  # "The capital of France is"
    tokens = {}
    for quantization in (None, "gguf"):
        ex = OffloadExecutor(GGUFSource(default_model_path()), Policy(quantization=quantization), "cpu",
                             torch.float32)
        try:
            tokens[quantization] = greedy(ex, prompt, 1)  # and the argmax at every position of the logits
            assert isinstance(ex.layers[5].resident["up.weight"], Int4Weight) == bool(quantization)
        finally:
            ex.close()
    assert tokens["gguf"][0] == tokens[None][0]
    assert torch.equal(tokens["gguf"][1], tokens[None][1])
