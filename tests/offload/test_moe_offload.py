"""Mixtures of experts offloaded with the expert as the unit: dense weights on the GPU first, experts spread
over the tiers, an expert off the GPU copied in or computed where it lives. Every placement and rule gives the
greedy tokens of Hugging Face transformers; the placement rule and the copy-or-compute rule are checked alone."""
import pytest
import torch

from flexserve import LLM, Policy, SamplingParams
from flexserve.config import preset
from flexserve.memory.tiers import Tier
from flexserve.offload.experts import (EXPERT_SLOTS, ExpertRates, ExpertStreamer, assign_moe_tiers, expert_index,
                                       expert_seconds, split_experts, split_seconds)
from flexserve.offload.placement import layer_weight_shares

from ..conftest import PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
# (percent, expert rule, batch size, batches); the dense part of a tiny layer is over half its bytes
PLACEMENTS = {
    "experts-cpu-auto": ((60, 40, 100, 0, 100, 0), "auto", 2, 2),
    "experts-cpu-copied": ((60, 40, 100, 0, 100, 0), "copy", 4, 1),
    "experts-cpu-on-host": ((60, 40, 100, 0, 100, 0), "cpu", 1, 4),
    "three-tiers-copied": ((75, 10, 100, 0, 100, 0), "copy", 2, 2),
    "three-tiers-on-host": ((75, 10, 0, 100, 100, 0), "cpu", 4, 1),
    "all-off-gpu": ((0, 70, 100, 0, 100, 0), "auto", 2, 2),
}


@pytest.fixture(scope="module")
def expected(tiny_model):
    return {kind: [hf_greedy(tiny_model(kind)[1], p, 6) for p in PROMPTS] for kind in ("mixtral", "qwen2-moe")}


@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_every_expert_placement_gives_the_same_tokens(tiny_model, expected, tmp_path, kind, name):
    percent, rule, bs, nb = PLACEMENTS[name]
    policy = Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=nb, expert_compute=rule)
    with LLM(tiny_model(kind)[0], dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]
        ex = llm.executor
        decoders = [layer for layer in ex.layers if layer.kind == "decoder"]
        counts = ex.experts.counts
    assert got == expected[kind]
    assert all(layer.experts for layer in decoders), "experts off the GPU are run one by one, never streamed"
    assert not any(expert_index(n) is not None for layer in decoders for n in layer.streamed)
    if rule == "copy":
        assert counts["copied"] > 0 and counts["cpu"] == 0
    elif rule == "cpu":
        assert counts["cpu"] > 0 and counts["copied"] == 0
    if percent[0] == 0:
        assert counts["gpu"] == 0 and all(layer.offloaded for layer in decoders)
    else:  # the attention, router and norms fit in the GPU's share
        assert all("qkv.weight" in layer.resident and "router.weight" in layer.resident for layer in decoders)
    if percent[0] + percent[1] < 100:
        assert any(h.tier is Tier.DISK for layer in decoders for h in layer.experts.values())


def test_the_placement_rule_puts_dense_weights_first_and_keeps_experts_whole():
    cfg = preset("mixtral-8x7b")
    sizes = cfg.layer_weight_sizes()
    tiers = assign_moe_tiers(sizes, gpu_percent=30, cpu_percent=50)
    assert all(tiers[n] is Tier.GPU for n in sizes if expert_index(n) is None)
    by_expert = [tiers[f"experts.{e}.up.weight"] for e in range(8)]
    assert all(tiers[f"experts.{e}.down.weight"] is by_expert[e] for e in range(8))
    assert by_expert == [Tier.GPU] * 2 + [Tier.CPU] * 4 + [Tier.DISK] * 2  # 1/8 of the layer each
    shares = layer_weight_shares(cfg, Policy.from_percent((30, 50, 100, 0, 100, 0)))
    assert shares[Tier.GPU] == pytest.approx(0.272, abs=0.002) and shares[Tier.DISK] == pytest.approx(0.243, abs=0.002)
    everything = assign_moe_tiers(sizes, 100, 0)
    assert set(everything.values()) == {Tier.GPU}


def test_copy_or_compute_follows_the_rates():
    """One expert's two costs: the CPU's grows with its tokens, the copy's does not, so taken alone a decode
    token's expert is faster on the CPU and a prefill chunk's copied; the streamer refuses an unknown rule."""
    from flexserve.memory.tiers import Tiers

    cfg = preset("mixtral-8x7b")
    expert = cfg.expert_params()  # 176M parameters, 352 MB in bf16
    rates = ExpertRates(cpu_flops=1e12, host_read_bytes=100e9, pcie_bytes=25e9)
    cpu, copy = expert_seconds(1, expert, 2, rates)  # a decode token: 3.9 ms on the CPU vs 14 ms of PCIe
    assert cpu == pytest.approx(3.9e-3, rel=0.05) and copy == pytest.approx(14.1e-3, rel=0.05) and cpu < copy
    cpu, copy = expert_seconds(512, expert, 2, rates)  # a prefill chunk: 184 ms on the CPU
    assert copy < cpu == pytest.approx(184e-3, rel=0.05)
    n = next(t for t in range(1, 1000) if expert_seconds(t, expert, 2, rates)[1] < expert_seconds(t, expert, 2,
                                                                                                    rates)[0])
    assert 25 < n < 35  # the crossover: the fewest tokens for which the copy is faster alone
    with pytest.raises(ValueError, match="expert rule must be one of"):
        ExpertStreamer(cfg, Tiers(torch.device("cpu")), torch.device("cpu"), torch.float32, "sometimes")


def test_a_layers_experts_are_split_so_both_sides_finish_together():
    """The CPU and the copy lane run at the same time: two decode experts go one to each side, an expert held in
    a slot (no copy) is always copied, experts with hundreds of tokens all cross, and the split is as good as the
    best of every division (brute force) for experts of equal size and never worse than either side alone."""
    import itertools
    import random

    assert split_experts([5.6, 5.6], [6.4, 6.4]) in ([True, False], [False, True])
    assert split_experts([5.6], [6.4]) == [False]
    assert split_experts([5.6, 5.6], [0.0, 6.4]) == [True, False]
    assert split_experts([184.0] * 3, [14.0] * 3) == [True] * 3
    assert split_experts([], []) == []
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        c, p = rng.uniform(1, 10), rng.uniform(1, 10)
        cpu, copy = [c] * n, [p] * n
        if rng.random() < 0.5:  # unequal experts: a different token count each
            cpu = [c * rng.uniform(0.5, 3) for _ in range(n)]
        got = split_seconds(cpu, copy, split_experts(cpu, copy))
        best = min(split_seconds(cpu, copy, list(d)) for d in itertools.product([False, True], repeat=n))
        assert got <= min(sum(cpu), sum(copy)) + 1e-12
        if len(set(cpu)) == 1:
            assert got == pytest.approx(best)
        else:  # the prefix split is off the best by at most one expert's time
            assert got <= best + max(max(cpu), max(copy)) + 1e-12


def test_the_rule_auto_runs_experts_on_both_sides_and_keeps_the_tokens(tiny_model, tmp_path):
    """With rates under which one expert costs about the same on either side, a decode step's off-GPU experts
    are divided: some copied, some computed on the CPU at the same time, and the tokens are the resident run's;
    the streamer adds up the division's time at those rates."""
    folder = tiny_model("mixtral")[0]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(folder, dtype="float32", device="cpu", policy=Policy.from_percent((100, 0, 100, 0, 100, 0))) as llm:
        resident = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    policy = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=1, num_gpu_batches=1)
    with LLM(folder, dtype="float32", device="cpu", policy=policy) as llm:
        streamer = llm.executor.experts
        streamer.rates = ExpertRates(cpu_flops=1e15, host_read_bytes=50e9, pcie_bytes=50e9)  # equal sides
        got = [o.outputs[0].token_ids for o in llm.generate(prompts[:1], GREEDY)]
        counts, modelled = dict(streamer.counts), streamer.modelled_s
    assert got == resident[:1]
    assert counts.get("cpu", 0) > 0 and counts.get("copied", 0) + counts.get("reused", 0) > 0
    assert modelled > 0


def test_the_cpu_side_follows_the_time_it_measures(tiny_model):
    """Probed rates can be off by a large factor: the streamer times each layer's CPU share against the rates'
    time for it and scales later divisions' CPU side by the running ratio (clamped per layer); given rates are
    taken as they are, and the tokens never change."""
    from flexserve.offload.experts import CPU_FACTOR_LIMIT, CPU_FACTOR_STEP

    folder = tiny_model("mixtral")[0]
    policy = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=1, num_gpu_batches=1)
    with LLM(folder, dtype="float32", device="cpu", policy=policy) as llm:
        streamer = llm.executor.experts
        streamer.rates = ExpertRates(cpu_flops=1e15, host_read_bytes=1e15, pcie_bytes=1e3)  # all to the CPU
        reference = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY)]
        assert streamer.cpu_time_factor == 1.0  # given rates: nothing learnt
        streamer.learns_cpu_time = True  # as after a probe on this machine
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY)]
        # a CPU a thousand times slower than the rates claim, the copy slower still: the factor rose to the
        # clamp, and the division still computes on the CPU, where it is cheaper
        assert streamer.cpu_time_factor > 1.0
        assert got == reference
        streamer.cpu_time_factor = 1.0
        streamer._learn(3.0, 1.0)
        assert streamer.cpu_time_factor == pytest.approx(1.0 + CPU_FACTOR_STEP * 2.0)
        streamer._learn(1e6, 1.0)  # a stall elsewhere is not a rate: one layer moves it by at most the clamp
        assert streamer.cpu_time_factor <= CPU_FACTOR_LIMIT
        streamer._learn(0.0, 1.0)  # nothing measured: unchanged
        before = streamer.cpu_time_factor
        streamer._learn(1.0, 0.0)
        assert streamer.cpu_time_factor == before


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_packed_experts_give_the_same_logits_wherever_they_live(tiny_model, tmp_path, kind):
    """With compress_weight the experts stay packed on every tier: unpacked on the GPU, copied packed, or
    unpacked and computed on the CPU, the quantised weights and so the logits are the same."""
    from .test_offload import teacher_forced

    out = {}
    for name, percent, rule in (("gpu", (100, 0, 100, 0, 100, 0), "auto"),
                                ("copied", (60, 20, 100, 0, 100, 0), "copy"),
                                ("on-host", (60, 20, 100, 0, 100, 0), "cpu")):
        policy = Policy.from_percent(percent, compress_weight=True, expert_compute=rule)
        with LLM(tiny_model(kind)[0], dtype="float32", device="cpu", policy=policy,
                 offload_dir=str(tmp_path)) as llm:
            out[name] = teacher_forced(llm)[0]
            counts = llm.executor.experts.counts
        assert counts[{"gpu": "gpu", "copied": "copied", "on-host": "cpu"}[name]] > 0
    torch.testing.assert_close(out["copied"], out["gpu"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["on-host"], out["gpu"], atol=1e-5, rtol=1e-5)


def test_quantized_attention_with_experts_placed_one_by_one(tiny_model):
    """--quantization quantises the attention projections and leaves the experts whole in the model's dtype:
    they are still placed and run one by one, and every placement gives the resident quantised tokens."""
    folder = tiny_model("qwen3-moe")[0]
    got = {}
    for percent in ((100, 0, 100, 0, 100, 0), (60, 40, 100, 0, 100, 0)):
        policy = Policy.from_percent(percent, quantization="rtn4")
        with LLM(folder, dtype="float32", device="cpu", policy=policy) as llm:
            got[percent[0]] = [o.outputs[0].token_ids for o in llm.generate(
                [{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]
            decoders = [layer for layer in llm.executor.layers if layer.kind == "decoder"]
            assert all(layer.experts for layer in decoders) == (percent[0] < 100)
    assert got[60] == got[100]


def _spy_on_expert_copies(streamer):
    """Per layer and block forward (from the layer's first copy or run to its `release`): the experts its
    batches route off the GPU, how many (batch, expert) runs that is, and how many copies cross for it, those
    made ahead while the layer before it computed included."""
    groups, open_ = [], {}
    run, load, release = streamer.run, streamer._load, streamer.release

    def group(offloaded):
        if id(offloaded) not in open_:
            open_[id(offloaded)] = {"routed": set(), "runs": 0, "copies": 0}
            groups.append(open_[id(offloaded)])
        return open_[id(offloaded)]

    def spy_run(w, offloaded, work):
        off = {e for e, _ in work if f"experts.{e}.up.weight" not in w}
        group(offloaded)["routed"] |= off
        group(offloaded)["runs"] += len(off)
        return run(w, offloaded, work)

    def spy_load(n, offloaded, e):
        group(offloaded)["copies"] += 1
        return load(n, offloaded, e)

    def spy_release(offloaded=None):
        if offloaded is None:
            open_.clear()
        else:
            open_.pop(id(offloaded), None)
        release(offloaded)

    streamer.run, streamer._load, streamer.release = spy_run, spy_load, spy_release
    return groups


@pytest.mark.parametrize("slots", [None, 4])
def test_copied_experts_are_reused_by_the_blocks_other_batches(tiny_model, tmp_path, slots):
    """Under the zig-zag schedule a layer serves every GPU batch of the block in turn: an expert copied for
    one batch stays in its slot for the next ones, so it crosses at most once per layer and block while the
    block's copied experts fit in the slots (the budgeted `EXPERT_SLOTS`, or, raised here on the CPU past what
    the planner counts, all four experts of the tiny Mixtral), and the tokens are the resident run's."""
    folder = tiny_model("mixtral")[0]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(folder, dtype="float32", device="cpu", policy=Policy.from_percent((100, 0, 100, 0, 100, 0))) as llm:
        resident = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    policy = Policy.from_percent((50, 50, 100, 0, 100, 0), gpu_batch_size=1, num_gpu_batches=4,
                                 expert_compute="copy")
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        streamer = llm.executor.experts
        streamer.ahead = False  # the copies a batch makes itself (copying ahead has its own test)
        streamer.slots = slots or EXPERT_SLOTS
        groups = _spy_on_expert_copies(streamer)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        groups = [g for g in groups if g["runs"]]
        counts = streamer.counts
    assert got == resident
    assert groups and counts["reused"] > 0
    assert all(g["copies"] <= g["runs"] for g in groups)
    assert sum(g["copies"] for g in groups) < sum(g["runs"] for g in groups)  # the batches share experts
    limit = slots or EXPERT_SLOTS
    fitting = [g for g in groups if len(g["routed"]) <= limit]
    assert fitting and all(g["copies"] <= len(g["routed"]) for g in fitting)
    if slots is not None:
        assert len(fitting) == len(groups)  # all four experts fit: never more copies than distinct experts


def test_a_block_of_several_batches_gets_slots_for_the_blocks_experts(tiny_model, tmp_path):
    """With several GPU batches the executor gives the streamer a slot for every off-GPU expert the block is
    expected to reach (`expert_slots`, what the planner counts), so each copied expert crosses once per layer
    and block, and the tokens are the resident run's."""
    from flexserve.offload.experts import expert_slots

    folder = tiny_model("mixtral")[0]  # 4 experts, top-2: a block of 6 tokens reaches all 4
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(folder, dtype="float32", device="cpu", policy=Policy.from_percent((100, 0, 100, 0, 100, 0))) as llm:
        resident = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    # serial lanes: no copies ahead, so the slots are the block's reach (see the test after this one)
    policy = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=2, num_gpu_batches=3,
                                 expert_compute="copy").replace(overlap=False)
    assert expert_slots(llm.config, policy) == 4 and expert_slots(llm.config, policy.replace(num_gpu_batches=1)) \
        == EXPERT_SLOTS
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        streamer = llm.executor.experts
        assert streamer.slots == 4
        groups = _spy_on_expert_copies(streamer)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    groups = [g for g in groups if g["runs"]]
    assert got == resident
    assert all(g["copies"] <= len(g["routed"]) for g in groups)  # never more copies than distinct experts
    assert sum(g["copies"] for g in groups) < sum(g["runs"] for g in groups)
    assert len(streamer._slots) <= 4


def test_a_block_that_reaches_every_expert_copies_the_next_layers_ahead(tiny_model, tmp_path):
    """A block whose tokens are all but sure to reach every off-GPU expert gets twice the slots, and each layer's
    experts are copied while the layer before it computes: every copy is one made ahead, each expert crosses
    at most once per layer and block, the layers find their experts held, and the tokens are the resident
    run's."""
    from flexserve.offload.experts import expert_slots, off_gpu_experts, prefetches_next_layer

    folder = tiny_model("mixtral")[0]  # 4 experts, top-2: 6 tokens leave one unreached with chance 1/64
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(folder, dtype="float32", device="cpu", policy=Policy.from_percent((100, 0, 100, 0, 100, 0))) as llm:
        resident = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        cfg = llm.config
    policy = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=2, num_gpu_batches=3,
                                 expert_compute="auto")
    off = off_gpu_experts(cfg, policy)
    assert prefetches_next_layer(cfg, policy) and expert_slots(cfg, policy) == 2 * off == 8
    # not with one batch, a CPU rule, serial lanes, or a block small enough to miss experts often
    assert not any(prefetches_next_layer(cfg, q) for q in (policy.replace(num_gpu_batches=1),
                                                             policy.replace(expert_compute="cpu"),
                                                             policy.replace(overlap=False),
                                                             policy.replace(gpu_batch_size=1, num_gpu_batches=2)))
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        streamer = llm.executor.experts
        assert streamer.ahead and streamer.slots == 8
        groups = _spy_on_expert_copies(streamer)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        counts = streamer.counts
    assert got == resident
    assert counts["prefetched"] > 0 and counts["copied"] == counts["prefetched"] and counts["cpu"] == 0
    assert all(g["copies"] <= off for g in groups)
    ran = [g for g in groups if g["runs"]]
    assert ran and sum(g["copies"] for g in ran) < sum(g["runs"] for g in ran)
    assert len(streamer._slots) <= 8


@pytest.mark.parametrize("rule", ["auto", "copy"])
def test_the_rule_measures_its_rates_on_this_machine(tiny_model, tmp_path, rule):
    """With the rule `auto` the streamer times an off-GPU expert on the CPU and a host-to-device copy the first
    time it meets one, and decides by those rates from then on; a fixed rule measures nothing."""
    policy = Policy.from_percent((60, 40, 100, 0, 100, 0), gpu_batch_size=2, num_gpu_batches=1, expert_compute=rule)
    with LLM(tiny_model("mixtral")[0], dtype="float32", device="cpu", policy=policy,
             offload_dir=str(tmp_path)) as llm:
        assert llm.executor.experts.rates is None
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY)
        rates = llm.executor.experts.rates
    if rule == "copy":
        assert rates is None
        return
    assert rates is not None and rates != ExpertRates()
    for value in (rates.cpu_flops, rates.host_read_bytes, rates.pcie_bytes):
        assert 0 < value < float("inf")


def test_measured_rates_come_from_the_timed_runs(monkeypatch):
    """The host read rate is the expert's bytes over its 1-token time, the CPU FLOP/s the 256-token FLOPs over
    their time, the copy rate the probe's bytes (at least 1 MiB) over the copy's time."""
    from flexserve.offload import expert_rates

    timings = iter([0.008, 0.050, 0.002])  # 1 token, 256 tokens, the copy probe, in the order they are timed

    def fake_best_of(fn, sync, repeats=3):
        fn()
        return next(timings)

    monkeypatch.setattr(expert_rates, "_best_of", fake_best_of)
    calls = []
    rates = expert_rates.measure_expert_rates(calls.append, expert_params=1000, expert_bytes=2000,
                                              device=torch.device("cpu"))
    assert calls == [1, 256]
    assert rates.host_read_bytes == pytest.approx(2000 / 0.008)
    assert rates.cpu_flops == pytest.approx(2 * 256 * 1000 / 0.050)
    assert rates.pcie_bytes == pytest.approx((1 << 20) / 0.002)


def test_bench_throughput_reports_how_the_experts_ran(tiny_model, capsys):
    from .test_offload import bench_result

    flags = "--percent 60 40 100 0 100 0 --gpu-batch-size 2 --num-gpu-batches 1"
    rc, res, _ = bench_result(capsys, ["bench", "throughput", "--model", tiny_model("mixtral")[0], "--device",
                                       "cpu", "--dtype", "float32", "--prompt-len", "8", "--gen-len", "3",
                                       *flags.split(), "--json"])
    runs = res["expert_runs"]
    assert rc == 0 and runs.get("cpu", 0) + runs.get("copied", 0) + runs.get("reused", 0) > 0
    assert set(res["expert_rates"]) == {"cpu_flops", "host_read_gbps", "pcie_gbps", "cpu_time_factor"}
    assert res["expert_rates"]["cpu_time_factor"] > 0  # probed here: measured over modelled CPU time
    assert res["bound_decode_tok_s_cpu_experts"] > 0
    assert res["fraction_of_cpu_experts_bound"] == pytest.approx(
        res["decode_tok_s"] / res["bound_decode_tok_s_cpu_experts"], rel=1e-9)
    assert res["bound_decode_tok_s_split_experts"] > 0  # the division the streamer made, at its rates
    assert res["fraction_of_split_experts_bound"] == pytest.approx(
        res["decode_tok_s"] / res["bound_decode_tok_s_split_experts"], rel=1e-9)
