"""Quantised models end to end: every scheme stays close to the float model on tiny Llama- and OPT-family
models, quantised weights stream from the CPU and disk tiers as their quantised bytes and give the tokens of
running resident, and bad combinations are refused with one clear error."""
import pytest
import torch

from flexserve import LLM, Policy, PolicyError, SamplingParams
from flexserve.benchmarks.perplexity import token_logprobs
from flexserve.compression.qweight import QuantWeight
from flexserve.offload.quantized import QuantHandle

from ..conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 21, 22, 23, 24]
# log-probability error allowed, relative to the largest |log p|: the 4-bit schemes round far more coarsely
TOLERANCE = {"fp8": 0.08, "int8": 0.08, "rtn4": 0.25, "awq": 0.25}
FAMILIES = ["llama-gqa", "opt", "opt-350m-like"]


@pytest.fixture(scope="module")
def exact(tiny_model):
    out = {}
    for kind in FAMILIES:
        with LLM(tiny_model(kind)[0], dtype="float32", device="cpu") as llm:
            out[kind] = token_logprobs(llm, PROMPT)
    return out


@pytest.mark.parametrize("scheme", list(TOLERANCE))
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_scheme_stays_close_to_the_float_model(tiny_model, exact, kind, scheme):
    with LLM(tiny_model(kind)[0], dtype="float32", device="cpu", quantization=scheme,
             quant_group_size=32 if scheme in ("rtn4", "awq") else None) as llm:
        weights = llm.executor.layers[1].resident
        assert all(isinstance(weights[f"{n}.weight"], QuantWeight) for n in ("qkv", "o", "up", "down"))
        got = token_logprobs(llm, PROMPT)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    ref = exact[kind]
    assert 0 < (got - ref).abs().max() < TOLERANCE[scheme] * ref.abs().max()
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)


@pytest.mark.parametrize("scheme", ["int8", "awq"])
def test_offloaded_quantized_weights_give_the_resident_tokens(tiny_model, tmp_path, scheme):
    """Weights on CPU and disk cross as their quantised parts into slots of the same type: the same math as
    resident, so the same tokens; and only the quantised bytes are stored off the device."""
    folder, _ = tiny_model("llama-gqa")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    quant = dict(quantization=scheme, quant_group_size=32 if scheme == "awq" else None)
    with LLM(folder, dtype="float32", device="cpu", **quant) as llm:
        resident = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    policy = Policy.from_percent((0, 60, 100, 0, 100, 0), gpu_batch_size=2, num_gpu_batches=2)
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path), **quant) as llm:
        handles = [h for layer in llm.executor.layers for h in layer.streamed.values()
                   if isinstance(h, QuantHandle)]
        assert handles and {h.tier.value for h in handles} == {"cpu", "disk"}
        full_bytes = sum(h.shape.numel() * 4 for h in handles)
        assert sum(h.nbytes for h in handles) < full_bytes * (0.3 if scheme == "int8" else 0.2)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == resident


def test_quantization_on_the_serving_engine(tiny_model):
    """The serving engine places its weights through the same executor: `EngineConfig(quantization=...)`."""
    from flexserve.engine.config import EngineConfig

    config = EngineConfig(model=tiny_model("opt")[0], quantization="fp8", quant_group_size=None)
    assert config.policy.quantization == "fp8" and config.policy.w_gpu_percent == 100


@pytest.mark.parametrize("kw, msg", [
    (dict(quantization="int3"), "--quantization must be one of"),
    (dict(quantization="fp8", quant_group_size=64), "applies to the 4-bit schemes"),
    (dict(quantization="rtn4", policy=Policy(compress_weight=True)), "choose one"),
    (dict(quant_group_size=64), "needs --quantization"),
    (dict(kv_cache_dtype="int4"), "--kv-cache-dtype must be one of"),
])
def test_bad_quantization_is_refused_clearly(tiny_model, kw, msg):
    with pytest.raises(PolicyError, match=msg):
        LLM(tiny_model("opt")[0], dtype="float32", device="cpu", **kw)


def test_cli_quantization_flags(cli):
    folder = "dummy:opt-125m"
    rc, out, _ = cli("generate", "--model", folder, "--device", "cpu", "--raw", "--max-tokens", "2",
                     "--quantization", "rtn4", "--quant-group-size", "64", "--kv-cache-dtype", "fp8", "hello")
    assert rc == 0 and out.strip()
    from flexserve.cli import build_parser

    for verb in (["ppl", "f.txt"], ["serve"], ["bench", "throughput"], ["bench", "serve", "--simulate"]):  # every verb has them
        args = build_parser().parse_args([*verb, "--quantization", "int8", "--kv-cache-dtype", "fp8"])
        assert (args.quantization, args.kv_cache_dtype) == ("int8", "fp8")
    with pytest.raises(SystemExit):
        cli("generate", "--model", folder, "--quantization", "int3", "hello")
    rc, _, err = cli("generate", "--model", folder, "--device", "cpu", "--quantization", "int8",
                     "--quant-group-size", "64", "hello")
    assert rc != 0 and "applies to the 4-bit schemes" in err


# --- fp8 KV cache in the offloading executor -------------------------------------------------------------------
FP8_KV_POLICIES = {
    "resident": None,
    "cache-cpu-attention": dict(percent=(100, 0, 0, 100, 100, 0), cpu_cache_compute=True),
    "cache-disk": dict(percent=(100, 0, 0, 0, 100, 0)),
}


@pytest.mark.parametrize("name", list(FP8_KV_POLICIES))
def test_fp8_kv_cache_stays_close_to_the_float_cache(tiny_model, exact, tmp_path, name):
    """The cache is stored as e4m3 on every tier (CPU attention upcasts it per block where it lies); decoding
    over it stays close to the float32 cache."""
    from ..offload.test_offload import teacher_forced

    folder, _ = tiny_model("llama-gqa")
    spec = FP8_KV_POLICIES[name]
    policy = None if spec is None else Policy.from_percent(spec["percent"], gpu_batch_size=1,
                                                           cpu_cache_compute=spec.get("cpu_cache_compute", False))
    with LLM(folder, dtype="float32", device="cpu") as ref:
        want, _ = teacher_forced(ref, PROMPT)
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path),
             kv_cache_dtype="fp8") as llm:
        got, state = teacher_forced(llm, PROMPT)
        caches = state.batches[0].k + state.batches[0].v
        assert all(h.dtype == torch.float8_e4m3fn for h in caches)
        llm.executor.release_block(state)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert 0 < (got - want).norm() < 0.1 * want.norm(), float((got - want).norm() / want.norm())
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)


def test_serving_engine_keeps_its_paged_pools_in_fp8(tiny_model):
    """`--kv-cache-dtype fp8` in the serving engine: e4m3 pools, a quarter of float32's bytes per block, and the
    greedy tokens of the offline generator over the same e4m3 cache (both round K/V to e4m3 the same way)."""
    import asyncio

    from flexserve.engine.serving import AsyncEngine, EngineConfig

    folder = tiny_model("llama-gqa")[0]
    with LLM(folder, dtype="float32", device="cpu", kv_cache_dtype="fp8") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]
    full = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=16))
    engine = AsyncEngine(EngineConfig(model=folder, dtype="float32", device="cpu", num_gpu_blocks=64,
                                      kv_cache_dtype="fp8"))
    assert engine.kv.gpu.dtype == engine.kv.cpu.dtype == torch.float8_e4m3fn
    assert engine.kv.gpu[0, 0, 0].nbytes * 4 == full.kv.gpu[0, 0, 0].nbytes
    full.runner.close()

    async def run():
        engine.start()
        try:
            async def one(p):
                toks = []
                async for out in engine.generate(p, GREEDY):
                    toks += out.new_token_ids
                return toks
            return await asyncio.gather(*[one(p) for p in PROMPTS])
        finally:
            await engine.shutdown()
    assert asyncio.run(run()) == want


def test_memory_check_and_planner_count_quantized_bytes():
    """fp8/int8 keep a byte per decoder weight, 4-bit about half a byte plus group scales; an fp8 cache a byte
    per value. The embedding and LM head stay at the model's width."""
    from flexserve.config import preset
    from flexserve.offload.budget import cache_bytes, weight_bytes
    from flexserve.planner.sizes import model_sizes

    cfg = preset("llama-3-70b")
    full = model_sizes(cfg, Policy(), 2)
    fp8 = model_sizes(cfg, Policy(quantization="fp8", kv_cache_dtype="fp8"), 2)
    awq = model_sizes(cfg, Policy(quantization="awq"), 2)
    assert fp8.layer_w == full.layer_w / 2 and fp8.kv_token == full.kv_token / 2
    assert awq.layer_w == pytest.approx(full.layer_w * (0.5 + 4 / 128) / 2)
    head = full.total_w - full.layer_w * cfg.num_layers
    assert fp8.total_w == pytest.approx(head + fp8.layer_w * cfg.num_layers)
    assert weight_bytes(cfg, Policy(quantization="int8"), 2).gpu == int(fp8.total_w)
    assert cache_bytes(cfg, Policy(kv_cache_dtype="fp8"), 2, 100).gpu * 2 == cache_bytes(cfg, Policy(), 2, 100).gpu


def test_llm_folds_quantization_into_the_policy_its_blocks_are_checked_with(tiny_model):
    """A caller's policy plus `kv_cache_dtype`: the per-block memory check and the executor see the fp8 cache;
    without a policy of the caller's, `generate` still sizes its own batch (`LLM.policy` stays None)."""
    folder = tiny_model("llama-gqa")[0]
    with LLM(folder, dtype="float32", device="cpu", policy=Policy(gpu_batch_size=2),
             kv_cache_dtype="fp8") as llm:
        assert llm.policy.kv_cache_dtype == "fp8" and llm.policy.gpu_batch_size == 2
        assert llm.executor.policy == llm.policy
    with LLM(folder, dtype="float32", device="cpu", quantization="int8") as llm:
        assert llm.policy is None and llm.executor.policy.quantization == "int8"
    assert Policy.with_quantization(None) is None
    with pytest.raises(TypeError, match="not a quantization field"):
        Policy.with_quantization(None, gpu_batch_size=4)
