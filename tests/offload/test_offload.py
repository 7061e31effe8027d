"""Every policy gives the tokens of fully resident execution; offload files are removed; bad policies fail."""
import glob
import os

import pytest

from flexserve import LLM, Policy, PolicyError, SamplingParams
from flexserve.cli import main

from ..conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
MORE_PROMPTS = PROMPTS + [[7, 8, 9], [20, 21, 22, 23, 24, 25], [30], [50, 51, 52, 53, 54, 55, 56, 57, 58]]

POLICIES = {
    "weights-3-tiers": dict(percent=(30, 30, 100, 0, 100, 0), bs=2, nb=2),
    "cache-cpu": dict(percent=(100, 0, 0, 100, 100, 0), bs=4, nb=2),
    "cache-disk": dict(percent=(100, 0, 0, 0, 100, 0), bs=3, nb=3),
    "cache-split": dict(percent=(50, 50, 25, 50, 100, 0), bs=2, nb=4),
    "act-cpu": dict(percent=(0, 100, 100, 0, 0, 100), bs=8, nb=1),
    "act-disk": dict(percent=(100, 0, 100, 0, 0, 0), bs=1, nb=3),
    "all-disk": dict(percent=(0, 0, 0, 0, 0, 0), bs=4, nb=2),
    "cpu-attention": dict(percent=(20, 80, 0, 100, 0, 100), bs=2, nb=3, cpu_cache_compute=True),
    "everything-mixed": dict(percent=(10, 40, 30, 30, 50, 25), bs=3, nb=2),
}


def teacher_forced(llm, prompt=MORE_PROMPTS[2], follow=(11, 12, 13, 14, 15)):
    """Logits of a prefill then one decode step per `follow` token (the same tokens whatever the model
    predicts, so lossy policies can be compared position by position), and the block state."""
    import torch

    ex = llm.executor
    ids = torch.tensor([prompt])
    state = ex.new_block([1], len(prompt) + len(follow))
    out = [ex.forward(state, [ids], [torch.arange(len(prompt))[None]], [None])[0]]
    for i, t in enumerate(follow):
        out.append(ex.forward(state, [torch.tensor([[t]])], [torch.tensor([[len(prompt) + i]])], [None])[0])
    return torch.cat(out), state


@pytest.fixture(scope="module")
def resident(tiny_model):
    out = {}
    for kind in ("opt", "llama-gqa", "llama-tied"):
        folder, _ = tiny_model(kind)
        with LLM(folder, dtype="float32", device="cpu") as llm:
            out[kind] = [o.outputs[0].token_ids for o in llm.generate(
                [{"prompt_token_ids": p} for p in MORE_PROMPTS], GREEDY)]
    return out


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("kind", ["opt", "llama-gqa", "llama-tied"])
def test_policy_matches_resident(tiny_model, resident, tmp_path, kind, name, overlap):
    spec = POLICIES[name]
    policy = Policy.from_percent(spec["percent"], gpu_batch_size=spec["bs"], num_gpu_batches=spec["nb"],
                                 overlap=overlap, cpu_cache_compute=spec.get("cpu_cache_compute", False))
    folder, _ = tiny_model(kind)
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in MORE_PROMPTS], GREEDY)]
        files = glob.glob(str(tmp_path / "flexserve-*" / "*.bin"))
        if policy.w_disk_percent > 0 or policy.act_disk_percent > 0:
            assert files, "disk tier holds nothing"
        assert not [f for f in files if os.path.basename(f)[0] in "kv"], "finished blocks left cache files"
    assert got == resident[kind]
    assert not glob.glob(str(tmp_path / "flexserve-*")), "offload files left behind"


def test_weights_really_spread_over_tiers(tiny_model, tmp_path):
    from flexserve.memory.tiers import Tier

    folder, _ = tiny_model("llama-gqa")
    policy = Policy.from_percent((30, 30, 100, 0, 100, 0))
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        tiers = {h.tier for layer in llm.executor.layers for h in layer.offloaded.values()}
        resident = sum(len(layer.resident) for layer in llm.executor.layers)
        assert tiers == {Tier.CPU, Tier.DISK} and resident > 0
        sizes = {t: 0 for t in Tier}
        for layer in llm.executor.layers:
            for t in layer.resident.values():
                sizes[Tier.GPU] += t.numel()
            for h in layer.offloaded.values():
                sizes[h.tier] += h.data.numel() if h.data is not None else os.path.getsize(h.path) // 4
        total = sum(sizes.values())
        assert 0.1 < sizes[Tier.GPU] / total < 0.6 and 0.1 < sizes[Tier.DISK] / total < 0.7


@pytest.mark.parametrize("kw, msg", [
    (dict(w_gpu_percent=120), "within 0..100"),
    (dict(w_gpu_percent=60, w_cpu_percent=60), "exceeds 100"),
    (dict(cache_cpu_percent=-1), "within 0..100"),
    (dict(gpu_batch_size=0), "gpu_batch_size"),
    (dict(comp_num_bits=3), "comp_num_bits"),
])
def test_bad_policy_values(kw, msg):
    with pytest.raises(PolicyError, match=msg):
        Policy(**kw)


def test_disk_share_without_offload_dir(tiny_model):
    folder, _ = tiny_model("opt")
    with pytest.raises(PolicyError, match="offload_dir"):
        LLM(folder, device="cpu", policy=Policy.from_percent((50, 0, 100, 0, 100, 0)))


def test_policy_that_cannot_fit(tiny_model):
    folder, _ = tiny_model("opt")
    with pytest.raises(PolicyError, match="needs .* on the GPU"):
        LLM("dummy:opt-175b", device="cpu", policy=Policy())
    with LLM(folder, dtype="float32", device="cpu", policy=Policy(gpu_batch_size=64), gpu_limit=1_000_000) as llm:
        with pytest.raises(PolicyError, match="KV cache"):
            llm.generate({"prompt_token_ids": [1] * 100}, SamplingParams(max_tokens=20))


def test_cli_percent_flags_and_bad_percent(capsys, tmp_path, monkeypatch):
    """The flags become the executor's policy, the disk share lives in --offload-dir while the model is loaded
    and is gone after; the text is the resident model's."""
    import flexserve.engine

    seen = []

    class Recording(LLM):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen.append({"policy": self.executor.policy, "files": glob.glob(str(tmp_path / "flexserve-*" / "*"))})

        def generate(self, *args, **kw):
            outs = super().generate(*args, **kw)
            seen[-1]["tokens"] = [c.token_ids for o in outs for c in o.outputs]
            return outs
    monkeypatch.setattr(flexserve.engine, "LLM", Recording)
    run = ["generate", "--model", "dummy:opt-125m", "--device", "cpu", "--raw", "--max-tokens", "3", "hello"]
    rc = main(run + ["--percent", "0", "50", "0", "100", "100", "0", "--gpu-batch-size", "2",
                     "--num-gpu-batches", "2", "--offload-dir", str(tmp_path)])
    offloaded = capsys.readouterr().out
    assert rc == 0 and seen[0]["policy"] == Policy.from_percent((0, 50, 0, 100, 100, 0), gpu_batch_size=2,
                                                                num_gpu_batches=2)
    assert seen[0]["files"] and os.listdir(tmp_path) == []  # weights were on disk there, and are gone
    assert main(run) == 0
    assert seen[1]["policy"].percent == (100, 0, 100, 0, 100, 0)  # no flags: resident
    assert capsys.readouterr().out == offloaded and len(seen[0]["tokens"][0]) == 3
    assert seen[0]["tokens"] == seen[1]["tokens"]
    rc = main(["generate", "--model", "dummy:opt-125m", "--percent", "50", "60", "0", "100", "100", "0", "hi"])
    err = capsys.readouterr().err
    assert rc == 1 and "exceeds 100" in err
    assert len(seen) == 2  # refused before any model was built


def bench_result(capsys, argv: list[str]) -> tuple[int, dict, str]:
    """Run `flexserve bench throughput ... --json` and check what every such run must report: each rate is
    the block's tokens over its phase's time, one prefill and one decode time for all three rates (total =
    block x G / (prefill + decode)), times that fit in the call's own wall time after the model load, and
    printed lines that show the JSON's figures."""
    import json
    import time

    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    res = json.loads(out.split("FLEXSERVE_RESULT ", 1)[1])
    block, p, g = res["block"], res["prompt_len"], res["gen_len"]
    prefill_s = block * p / res["prefill_tok_s"]
    decode_s = block * (g - 1) / res["decode_tok_s"]
    assert prefill_s > 0 and decode_s > 0
    assert res["total_tok_s"] == pytest.approx(block * g / (prefill_s + decode_s), rel=1e-9)
    assert res["load_s"] + prefill_s + decode_s < wall + 0.01  # load_s is rounded to 0.01 s
    printed = dict(line.strip().split(": ", 1) for line in out.splitlines() if line.strip().endswith(
        tuple("0123456789")) and ": " in line and not line.startswith("FLEXSERVE_RESULT"))
    for k in ("prefill_tok_s", "decode_tok_s", "total_tok_s"):
        assert float(printed[k].replace(",", "")) == pytest.approx(res[k], abs=0.006), k
    return rc, res, out


def test_bench_throughput_reports(capsys):
    from flexserve.config import preset

    flags = "--percent 0 100 0 100 100 0 --gpu-batch-size 2 --num-gpu-batches 2"
    rc, res, _ = bench_result(capsys, ["bench", "throughput", "--model", "dummy:opt-125m", "--device", "cpu",
                                       "--prompt-len", "16", "--gen-len", "4", *flags.split(), "--json"])
    assert rc == 0 and res["policy"] == flags and res["weight_placement"] == "flexgen"
    assert (res["block"], res["prompt_len"], res["gen_len"], res["dtype"]) == (4, 16, 4, "float32")
    # every weight byte is on the CPU tier (float32 on the CPU device), none on disk
    assert res["offloaded_cpu_bytes"] == preset("opt-125m").stored_weight_bytes(4) and res["offloaded_disk_bytes"] == 0
    # the bound: those bytes over the measured host-to-device rate, once per decode step for the whole block
    assert res["bound_step_s"] == pytest.approx(res["offloaded_cpu_bytes"] / (res["h2d_gbps"] * 1e9), rel=1e-9)
    assert res["bound_decode_tok_s"] == pytest.approx(res["block"] / res["bound_step_s"], rel=1e-9)
    assert res["fraction_of_bound"] == pytest.approx(res["decode_tok_s"] / res["bound_decode_tok_s"], rel=1e-9)


def test_bench_throughput_warms_up_at_the_timed_gpu_batch_size(capsys, monkeypatch):
    """Before the clock, one GPU batch of the timed size runs a short prefill and a decode step, so the timed
    decode meets no matrix shape for the first time (first-use costs stay out of the figure)."""
    from flexserve.benchmarks import throughput

    calls = []
    real = throughput.greedy_block

    def spy(ex, prompts, gen_len, gpu_batch_size, *args, **kw):
        calls.append((len(prompts), len(prompts[0]), gen_len, gpu_batch_size))
        return real(ex, prompts, gen_len, gpu_batch_size, *args, **kw)

    monkeypatch.setattr(throughput, "greedy_block", spy)
    flags = "--percent 100 0 100 0 100 0 --gpu-batch-size 3 --num-gpu-batches 2"
    rc, res, _ = bench_result(capsys, ["bench", "throughput", "--model", "dummy:opt-125m", "--device", "cpu",
                                       "--prompt-len", "24", "--gen-len", "3", *flags.split(), "--json"])
    assert rc == 0 and res["block"] == 6
    assert calls == [(3, 16, 2, 3), (6, 24, 3, 3)]  # the warm-up: one batch of 3; then the timed block of 6


def test_bench_throughput_on_the_paged_engine(capsys, tmp_path):
    """The same benchmark through the serving engine: every sequence gets its tokens, figures are reported;
    weights-only offloading works there too, cache offloading is refused."""
    flags = "--percent 50 50 100 0 100 0 --gpu-batch-size 3 --num-gpu-batches 1"
    rc, res, _ = bench_result(capsys, ["bench", "throughput", "--engine", "paged", "--model", "dummy:opt-125m",
                                       "--device", "cpu", "--dtype", "float32", "--prompt-len", "16", "--gen-len",
                                       "4", *flags.split(), "--json"])
    assert rc == 0 and res["engine"] == "paged" and res["policy"] == flags and not res["cuda_graphs"]
    assert (res["block"], res["prompt_len"], res["gen_len"], res["dtype"]) == (3, 16, 4, "float32")
    assert res["generated_tokens"] == res["block"] * res["gen_len"] == 12  # every sequence got all its tokens
    trace = tmp_path / "paged.json"
    rc, res, out = bench_result(capsys, ["bench", "throughput", "--engine", "paged", "--model", "dummy:opt-125m",
                                         "--device", "cpu", "--dtype", "float32", "--prompt-len", "16",
                                         "--gen-len", "3", "--gpu-batch-size", "2", "--profile", str(trace),
                                         "--json"])
    assert rc == 0 and res["generated_tokens"] == 6
    assert trace.stat().st_size > 0 and "Self CPU time total" in out and "aten::" in out  # the top operators
    rc = main(["bench", "throughput", "--engine", "paged", "--model", "dummy:opt-125m", "--device", "cpu",
               "--percent", "100", "0", "0", "100", "100", "0"])
    assert rc == 1 and "paged pools" in capsys.readouterr().err


@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.25)])
def test_compressed_weights_stream_and_stay_close(tiny_model, tmp_path, bits, tol):
    """Offloaded weights kept group-wise quantised: only packed bytes move, logits stay close to exact."""
    import torch

    from flexserve.benchmarks.perplexity import token_logprobs
    from flexserve.offload.placement import CompressedHandle

    folder, _ = tiny_model("llama-gqa")
    prompt = MORE_PROMPTS[2]
    with LLM(folder, dtype="float32", device="cpu") as ref:
        exact = token_logprobs(ref, prompt)
    policy = Policy.from_percent((0, 60, 100, 0, 100, 0), compress_weight=True, comp_num_bits=bits,
                                 comp_group_size=32, gpu_batch_size=2, num_gpu_batches=2)
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        handles = [h for layer in llm.executor.layers for h in layer.streamed.values()]
        packed = [h for h in handles if isinstance(h, CompressedHandle)]
        assert packed and {h.tier.value for h in packed} == {"cpu", "disk"}
        full = sum(torch.Size(h.shape).numel() * 4 for h in packed)
        assert sum(h.nbytes for h in packed) < full * (bits / 32 + 0.15)
        got = token_logprobs(llm, prompt)
        outs = llm.generate([{"prompt_token_ids": p} for p in MORE_PROMPTS], GREEDY)
    assert (got - exact).abs().max() < tol * exact.abs().max()
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


def test_unsupported_sparse_attention_is_refused_clearly(tiny_model):
    folder, _ = tiny_model("opt")
    with pytest.raises(PolicyError, match="sparse attention"):
        LLM(folder, device="cpu", policy=Policy(attn_sparsity=0.5))


def test_compressed_cache_with_cpu_attention_is_refused_clearly(tiny_model):
    folder, _ = tiny_model("opt")
    with pytest.raises(PolicyError, match="do not combine"):
        LLM(folder, device="cpu", policy=Policy.from_percent((100, 0, 0, 100, 100, 0), compress_cache=True,
                                                             cpu_cache_compute=True))


@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.3)])
@pytest.mark.parametrize("percent", [(100, 0, 0, 100, 100, 0), (100, 0, 0, 50, 100, 0)])
def test_compressed_cache_decodes_close_to_exact(tiny_model, tmp_path, bits, tol, percent):
    """KV cache on the CPU/disk tiers kept 4/8-bit: decode logits (teacher-forced) stay close to exact."""
    import torch

    from flexserve.offload.placement import CompressedHandle

    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as ref:
        exact, _ = teacher_forced(ref)
    policy = Policy.from_percent(percent, compress_cache=True, comp_num_bits=bits, comp_group_size=8)
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        got, state = teacher_forced(llm)
        assert any(isinstance(h, CompressedHandle) for h in state.batches[0].k)
    err = (got - exact).abs().max() / exact.abs().max()
    assert 0 < err < tol  # lossy, but close


@pytest.mark.parametrize("name", ["cpu-attention", "cache-disk", "weights-3-tiers", "act-disk"])
def test_slow_io_threads_do_not_change_results(tiny_model, resident, tmp_path, monkeypatch, name):
    """Make every load and store on the I/O threads slow: ordering bugs (compute reading a buffer before its
    copy landed) would change the tokens, so they must stay those of resident execution."""
    import threading
    import time

    from flexserve.memory.tiers import Tiers

    real_read, real_write = Tiers.read_rows, Tiers.write_rows

    def slow(fn, seconds):
        def wrapper(*args, **kw):
            if threading.current_thread().name.startswith(("flexserve-load", "flexserve-store")):
                time.sleep(seconds)
            return fn(*args, **kw)
        return wrapper
    monkeypatch.setattr(Tiers, "read_rows", slow(real_read, 0.002))
    monkeypatch.setattr(Tiers, "write_rows", slow(real_write, 0.03))
    spec = POLICIES[name]
    policy = Policy.from_percent(spec["percent"], gpu_batch_size=spec["bs"], num_gpu_batches=spec["nb"],
                                 cpu_cache_compute=spec.get("cpu_cache_compute", False))
    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in MORE_PROMPTS], GREEDY)]
    assert got == resident["llama-gqa"]


def test_cpu_attention_over_a_bfloat16_host_cache(tiny_model, tmp_path):
    """`cpu_attention_dtype`: the host cache CPU attention reads is kept in bf16 (fast on x86); the result is
    close to exact, and the choice shows in the cache's storage."""
    import torch

    from flexserve.memory.tiers import Tier

    folder, _ = tiny_model("llama-gqa")
    with LLM(folder, dtype="float32", device="cpu") as ref:
        exact, _ = teacher_forced(ref)
    policy = Policy.from_percent((100, 0, 0, 100, 0, 100), cpu_cache_compute=True, cpu_attention_dtype="bfloat16")
    with LLM(folder, dtype="float32", device="cpu", policy=policy) as llm:
        got, state = teacher_forced(llm)
    dtypes = {h.dtype for h, t in zip(state.batches[0].k, state.batches[0].cache_tiers) if t is Tier.CPU}
    assert dtypes == {torch.bfloat16}
    err = (got - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.05
    with pytest.raises(PolicyError, match="cpu_attention_dtype"):
        Policy(cpu_attention_dtype="int8")


def test_compressed_weights_are_packed_on_every_tier_and_placement_does_not_change_outputs(tiny_model, tmp_path):
    """With compress_weight the GPU tier keeps the packed form too (the memory the planner and the budget
    check count); quantisation is the same wherever a weight lives, so every placement gives the same
    tokens, bit for bit."""
    from flexserve.offload.placement import CompressedHandle

    folder, _ = tiny_model("llama-gqa")
    outs = {}
    expected_tiers = {(100, 0, 100, 0, 100, 0): {"gpu"}, (20, 40, 100, 0, 100, 0): {"gpu", "cpu", "disk"},
                      (0, 100, 100, 0, 100, 0): {"cpu"}}
    for percent, expected in expected_tiers.items():
        policy = Policy.from_percent(percent, compress_weight=True, comp_group_size=32, gpu_batch_size=2,
                                     num_gpu_batches=2)
        with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
            layers = llm.executor.layers
            unpacked = [n for layer in layers if layer.kind == "decoder" for n, t in layer.resident.items()
                        if t.dim() == 2]
            assert not unpacked  # no decoder matrix is kept unpacked, on any tier (norms are vectors)
            tiers = {h.tier.value for layer in layers for h in layer.streamed.values()
                     if isinstance(h, CompressedHandle)}
            assert tiers == expected
            outs[percent] = [o.outputs[0].token_ids
                             for o in llm.generate([{"prompt_token_ids": p} for p in MORE_PROMPTS], GREEDY)]
    first = next(iter(outs.values()))
    assert all(v == first for v in outs.values())


def test_activations_leave_the_device_at_prefill_only(tiny_model, tmp_path):
    """The act shares size the prefill's hidden states; a decode step's (one token per sequence) stay put, so
    their copy back never queues behind the next layer's weights."""
    import torch

    folder, _ = tiny_model("opt")
    policy = Policy.from_percent((0, 100, 100, 0, 0, 100), gpu_batch_size=1, num_gpu_batches=2)
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        logits, _ = teacher_forced(llm)
        shapes = [key[2] for key in llm.executor._act_handles]
    assert shapes and all(s[:2] == (1, len(MORE_PROMPTS[2])) for s in shapes)  # prefill's only, never [1, 1, h]
    with LLM(folder, dtype="float32", device="cpu") as llm:
        ref, _ = teacher_forced(llm)
    torch.testing.assert_close(logits, ref)
