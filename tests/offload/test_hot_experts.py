"""The most routed experts take the GPU's share of a mixture-of-experts layer: the decayed routing counts, the
choice of residents and its schedule alone, then tiny Mixtral and Qwen2-MoE models whose routers favour the
last experts (the ones the placement leaves off the GPU): after warm-up those are the GPU residents, the
greedy tokens are the resident run's, every expert's weights survive the exchanges, and no step holds more
expert bytes on the GPU than the placement."""
import copy
import collections

import pytest
import torch

from flexserve import LLM, Policy, SamplingParams
from flexserve.config import preset
from flexserve.memory.tiers import Tier
from flexserve.offload.experts import assign_moe_tiers, expert_index, expert_slots
from flexserve.offload.hot_experts import HotExperts, RoutingCounter, choose_swaps
from flexserve.planner import profile
from flexserve.planner.moe_cost import moe_layer

from ..conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
HOT = {"mixtral": [2, 3], "qwen2-moe": [6, 7]}  # the experts the biased routers send every token to (top 2)
# (percent, compress_weight, overlap): experts on the GPU and the CPU; on all three tiers (hot ones on disk);
# one GPU expert in Mixtral's layers; packed experts; the synchronous debug mode
PLACEMENTS = {
    "gpu-cpu": ((60, 40, 100, 0, 100, 0), False, True),
    "three-tiers": ((75, 10, 100, 0, 100, 0), False, True),
    "small-gpu-share": ((50, 50, 100, 0, 100, 0), False, True),
    "packed": ((60, 40, 100, 0, 100, 0), True, True),
    "no-overlap": ((60, 40, 100, 0, 100, 0), False, False),
}


def test_the_routing_counter_decays_and_follows_the_workload():
    counter = RoutingCounter(4, decay=0.5)
    counter.observe("layer", [(0, 8), (2, 1)])
    assert counter.counts("layer") == [8, 0, 1, 0] and counter.counts("other") == [0] * 4
    counter.step()
    assert counter.counts("layer") == pytest.approx([4, 0, 0.5, 0])  # a step halves what came before
    for _ in range(3):
        counter.observe("layer", [(1, 2)])
        counter.step()
    counts = counter.counts("layer")
    assert counts[1] > counts[0]  # the workload moved to expert 1: it overtakes the old favourite
    assert counts == pytest.approx([8 / 16, 2 * (0.5 + 0.25 + 0.125), 1 / 16, 0])  # four halvings of the first
    for _ in range(40):  # past the lazy weight's rescaling: the counts stay the decayed ones
        counter.step()
    assert counter.counts("layer")[1] == pytest.approx(counts[1] * 0.5 ** 40, rel=1e-9)
    steady = RoutingCounter(4, decay=1.0)  # no decay: plain sums
    steady.observe("layer", [(3, 5)])
    steady.step()
    assert steady.counts("layer") == [0, 0, 0, 5]
    with pytest.raises(ValueError):
        RoutingCounter(4, decay=0.0)


def test_the_most_counted_experts_become_residents_and_ties_keep_them():
    counts = [1.0, 0.0, 9.0, 5.0, 5.0]
    assert choose_swaps(counts, {0, 1}, {2, 3, 4}) == [(2, 1), (3, 0)]  # best in for worst out
    assert choose_swaps(counts, {2, 3}, {0, 1, 4}) == []  # expert 4 only ties resident 3
    assert choose_swaps(counts, {0}, {1}) == []  # never a colder expert for a warmer one
    assert choose_swaps([0.0] * 4, {0, 1}, {2, 3}) == []  # nothing counted: the placement stays
    assert choose_swaps([4.5, 5.0], {0}, {1}) == []  # near-equal routing: a swap would not pay its copies
    assert choose_swaps([4.5, 5.0], {0}, {1}, margin=1.0) == [(1, 0)]


def test_the_hot_set_is_chosen_after_warm_up_then_every_period():
    hot = HotExperts(4, warmup_steps=3, period_steps=4)
    due = [step for step in range(1, 16) if hot.step()]
    assert due == [3, 7, 11, 15]
    off = HotExperts(4, warmup_steps=1, period_steps=1, enabled=False)
    assert not any(off.step() for _ in range(5)) and off.steps == 5
    with pytest.raises(ValueError):
        HotExperts(4, warmup_steps=0)


@pytest.fixture(scope="module")
def biased(tiny_model, tmp_path_factory):
    """kind -> a folder with the tiny model whose routers favour HOT[kind]: every embedding carries a large
    constant in dimension 0, which the routers weigh up for the hot experts and down for the others."""
    out = {}
    for kind, hot in HOT.items():
        model = copy.deepcopy(tiny_model(kind)[1])
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 3.0
            for layer in model.model.layers:
                layer.mlp.gate.weight[:, 0] = -1.0
                layer.mlp.gate.weight[hot, 0] = 1.0
        folder = str(tmp_path_factory.mktemp(f"biased-{kind}"))
        model.save_pretrained(folder)
        out[kind] = folder
    return out


def _generate(folder: str, policy: Policy, tmp_path, **schedule):
    """Greedy tokens of PROMPTS, with the hot set on `schedule` (HotExperts' fields) when given, and per step
    (after each `end_step`, the first entry before any): each decoder layer's GPU experts and routing counts,
    the bytes of experts on the GPU, the experts per tier, the streamer's slots; and the streamer."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(folder, dtype="float32", device="cpu", policy=policy, offload_dir=str(tmp_path)) as llm:
        streamer = llm.executor.experts
        if schedule:
            streamer.hot = HotExperts(streamer.cfg.num_experts, **schedule)
        layers = [layer for layer in llm.executor.layers if layer.experts]
        steps = [_snapshot(streamer, layers)]
        end_step = streamer.end_step

        def spy(all_layers):
            end_step(all_layers)
            steps.append(_snapshot(streamer, layers))

        streamer.end_step = spy
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        steps[-1]["weights"] = {(layer.index, n): _expert_weight(streamer, layer, n).clone()
                                for layer in llm.executor.layers if layer.kind == "decoder"
                                for n in streamer.cfg.layer_weight_sizes() if expert_index(n) is not None}
    return tokens, steps, streamer


def _expert_weight(streamer, layer, name: str) -> torch.Tensor:
    """An expert weight as its storage holds it now, wherever that is (unpacked when packed)."""
    return layer.resident[name] if name in layer.resident else streamer._host_tensor(layer.experts[name])


def _snapshot(streamer, layers) -> dict:
    def gpu_bytes(layer) -> int:  # the layer's routed experts held in the compute device's memory
        plain = sum(t.numel() * t.element_size() for n, t in layer.resident.items() if expert_index(n) is not None)
        packed = sum(p.nbytes for h in layer.experts.values() for p in getattr(h, "parts", {}).values()
                     if p.tier is Tier.GPU)
        return plain + packed

    return {"residents": [sorted(streamer._residents(layer)) for layer in layers],
            "counts": [streamer.hot.counter.counts(id(layer.experts)) for layer in layers],
            "gpu_bytes": [gpu_bytes(layer) for layer in layers],
            "tiers": [collections.Counter(h.tier for n, h in layer.experts.items() if n.endswith("up.weight"))
                      for layer in layers],
            "slots": len(streamer._slots)}


@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("kind", list(HOT))
def test_the_most_routed_experts_take_the_gpu_share_and_tokens_stay_the_same(biased, tmp_path, kind, name):
    percent, packed, overlap = PLACEMENTS[name]
    folder = biased[kind]
    resident, steps_resident, _ = _generate(folder, Policy(compress_weight=packed), tmp_path / "resident")
    policy = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=2, compress_weight=packed,
                                 overlap=overlap)
    warmup, period = 2, 3
    tokens, steps, streamer = _generate(folder, policy, tmp_path / "offloaded", warmup_steps=warmup,
                                        period_steps=period)
    assert tokens == resident
    reference = steps_resident[-1]["weights"]  # every expert's weights survive the exchanges, on every tier
    assert steps[-1]["weights"].keys() == reference.keys()
    assert all(torch.equal(steps[-1]["weights"][k], reference[k]) for k in reference)

    placed = sorted({expert_index(n) for n, t in assign_moe_tiers(streamer.cfg.layer_weight_sizes(), percent[0],
                                                                  percent[1]).items() if t is Tier.GPU} - {None})
    budget = len(placed)
    assert budget and all(residents == placed for residents in steps[0]["residents"])  # by index, at first
    assert streamer.counts["promoted"] > 0
    assert len(steps) > warmup + period  # the prefill and the decode steps: two choices at least
    for n, step in enumerate(steps):
        if n < warmup:
            assert step["residents"] == steps[0]["residents"]  # nothing moves during warm-up
        if n >= warmup and (n - warmup) % period == 0:  # a choice: the residents are the most counted
            for counts, residents in zip(step["counts"], step["residents"]):
                hottest = sorted(range(len(counts)), key=lambda e: -counts[e])[:budget]
                assert sorted(counts[e] for e in residents) == sorted(counts[e] for e in hottest)
        # never more on the GPU than the placement's share, nor fewer experts on any other tier
        assert step["gpu_bytes"] == steps[0]["gpu_bytes"] and step["tiers"] == steps[0]["tiers"]
        assert step["slots"] <= expert_slots(streamer.cfg, policy)  # the slots the planner counts
    for residents in steps[-1]["residents"]:  # the experts the router favours, as many as fit
        assert len(residents) == budget
        assert set(residents) <= set(HOT[kind]) or set(HOT[kind]) <= set(residents)


def test_without_the_hot_set_the_placement_keeps_its_experts(biased, tmp_path):
    """The contrast: with the hot set off, the experts the router favours stay off the GPU."""
    policy = Policy.from_percent((60, 40, 100, 0, 100, 0))
    _, steps, streamer = _generate(biased["mixtral"], policy, tmp_path, warmup_steps=1, period_steps=1,
                                   enabled=False)
    assert streamer.counts["promoted"] == 0 and all(step["residents"] == [[0, 1], [0, 1]] for step in steps)
    assert all(c[2] > c[0] and c[3] > c[1] for c in steps[-1]["counts"])  # the counts saw the skew all the same


def test_the_cost_model_takes_a_skew_and_defaults_to_uniform():
    """`hot_capture`: the fraction of routed tokens the GPU's experts take. Left out, or equal to their share
    of the experts, the terms are the uniform ones; a hot set that takes most tokens leaves fewer experts to
    reach off the GPU, and one that takes them all leaves none."""
    cfg, hw = preset("mixtral-8x7b"), profile("h100")
    policy = Policy.from_percent((30, 50, 100, 0, 100, 0), gpu_batch_size=4)  # 2 of 8 experts on the GPU
    uniform = moe_layer(cfg, policy, hw, tokens=4, dtype_bytes=2)
    assert moe_layer(cfg, policy, hw, 4, 2, hot_capture=2 / 8) == uniform
    skewed = moe_layer(cfg, policy, hw, 4, 2, hot_capture=0.8)
    assert skewed.hit_per_share < 0.5 * uniform.hit_per_share
    assert skewed.hit == uniform.hit and skewed.read_bytes16 == uniform.read_bytes16
    assert moe_layer(cfg, policy, hw, 4, 2, hot_capture=1.0).hit_per_share == 0
    everything = Policy.from_percent((100, 0, 100, 0, 100, 0))  # no expert off the GPU: no skew to apply
    assert moe_layer(cfg, everything, hw, 4, 2, hot_capture=0.9) == moe_layer(cfg, everything, hw, 4, 2)
    with pytest.raises(ValueError):
        moe_layer(cfg, policy, hw, 4, 2, hot_capture=1.5)
