"""Tensor-parallel sharding, checked in one process: ranks are threads and the all-reduce is a barrier sum."""
from __future__ import annotations

import threading

import pytest
import torch

from flexserve.errors import PolicyError
from flexserve.models.attention import AttnMeta, dense_attention
from flexserve.models.layers import attention_in, attention_out, decoder_layer, rope_cos_sin, rope_inv_freq
from flexserve.parallel import check_degrees, comm_time, shard_config, shard_layer, stage_bounds
from flexserve.parallel.groups import Layout
from flexserve.weights import layer_weights, open_source

from ..conftest import FAMILIES


class ThreadAllReduce:
    """`reduce` callables for `tp` threads: each returns the sum of every thread's tensor."""

    def __init__(self, tp: int):
        self.parts: list[torch.Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=30)

    def for_rank(self, rank: int):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = x
            self.barrier.wait()
            total = torch.stack(self.parts).sum(0)  # type: ignore[arg-type]
            self.barrier.wait()  # nobody overwrites a part before every rank has summed
            return total
        return reduce


def _layer_inputs(cfg, b: int = 3, s: int = 5):
    torch.manual_seed(0)
    x = torch.randn(b, s, cfg.hidden_size)
    pos = torch.arange(s).expand(b, s)
    rope = rope_cos_sin(rope_inv_freq(cfg), pos, torch.float32) if cfg.positional == "rope" else None
    return x, rope


def _run_layer(cfg, w, x, rope, reduce=None) -> torch.Tensor:
    b, s, _ = x.shape
    kc = torch.zeros(s, b, cfg.num_kv_heads, cfg.head_dim)
    vc = torch.zeros_like(kc)
    attn = dense_attention(*attention_in(cfg, w, x, rope), kc, vc, AttnMeta(0, s, None))
    return attention_out(cfg, w, x, attn, reduce=reduce)


def _sharded_layer(cfg, w, x, rope, tp: int) -> list[torch.Tensor]:
    shard_cfg, ar = shard_config(cfg, tp), ThreadAllReduce(tp)
    outs: list[torch.Tensor | None] = [None] * tp
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            outs[r] = _run_layer(shard_cfg, shard_layer(cfg, w, r, tp), x, rope, ar.for_rank(r))
        except BaseException as e:  # surface a thread's failure in the test
            errors.append(e)
            ar.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outs  # type: ignore[return-value]


@pytest.mark.parametrize("kind", [k for k in FAMILIES if k != "mistral"])
def test_sharded_layer_equals_full_layer(tiny_model, kind):
    folder, _ = tiny_model(kind)
    source = open_source(folder, dtype=torch.float32)
    cfg = source.config
    w = layer_weights(source, 0)
    x, rope = _layer_inputs(cfg)
    full = _run_layer(cfg, w, x, rope)
    for tp in (2, 4) if cfg.num_kv_heads % 4 == 0 else (2,):
        for out in _sharded_layer(cfg, w, x, rope, tp):
            torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_reduce_default_is_unchanged(tiny_model):
    """reduce=None is the old code path; an identity reduce (one rank) adds the biases after it, same result."""
    folder, _ = tiny_model("opt")
    source = open_source(folder, dtype=torch.float32)
    cfg, w = source.config, layer_weights(source, 1)
    x, rope = _layer_inputs(cfg)
    ref = decoder_layer(cfg, w, x, rope, lambda q, k, v: dense_attention(
        q, k, v, torch.zeros(x.shape[1], x.shape[0], cfg.num_kv_heads, cfg.head_dim),
        torch.zeros(x.shape[1], x.shape[0], cfg.num_kv_heads, cfg.head_dim), AttnMeta(0, x.shape[1], None)))
    torch.testing.assert_close(_run_layer(cfg, w, x, rope), ref, atol=0, rtol=0)
    torch.testing.assert_close(_run_layer(cfg, w, x, rope, reduce=lambda t: t), ref, atol=1e-6, rtol=1e-6)


def test_shard_shapes_split_gate_and_up_separately(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    source = open_source(folder, dtype=torch.float32)
    cfg, w = source.config, layer_weights(source, 0)
    s0, s1 = (shard_layer(cfg, w, r, 2) for r in range(2))
    scfg = shard_config(cfg, 2)
    assert (scfg.num_heads, scfg.num_kv_heads, scfg.intermediate_size, scfg.head_dim) == (2, 1, 48, cfg.head_dim)
    for name, shape in scfg.layer_weight_shapes().items():
        assert tuple(s0[name].shape) == shape, name
    i = cfg.intermediate_size
    gate, up = w["up.weight"][:i], w["up.weight"][i:]
    torch.testing.assert_close(s1["up.weight"], torch.cat([gate[i // 2:], up[i // 2:]]))
    torch.testing.assert_close(torch.cat([s0["down.weight"], s1["down.weight"]], 1), w["down.weight"])


def test_bad_degrees_raise_clear_errors(tiny_model):
    folder, _ = tiny_model("mistral")  # one kv head
    cfg = open_source(folder, dtype=torch.float32).config
    with pytest.raises(PolicyError, match="does not divide the model's 1 key/value heads"):
        shard_config(cfg, 2)
    with pytest.raises(PolicyError, match="does not divide the model's 4 attention heads"):
        check_degrees(cfg, 3, 1, 3)
    with pytest.raises(PolicyError, match="needs 4 processes, but 2 were started"):
        check_degrees(cfg, 2, 2, 2)
    with pytest.raises(PolicyError, match="more stages than the model's 2 layers"):
        check_degrees(cfg, 1, 3, 3)


def test_stage_bounds_and_layout():
    assert [stage_bounds(10, 3, s) for s in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [stage_bounds(2, 2, s) for s in range(2)] == [(0, 1), (1, 2)]
    lay = Layout(tp=2, pp=3, rank=3)
    assert (lay.stage, lay.tp_rank, lay.is_first, lay.is_last, lay.sampler_rank) == (1, 1, False, False, 4)
    with pytest.raises(PolicyError):
        Layout(tp=2, pp=2, rank=4)


def test_comm_time_terms(tiny_model):
    folder, _ = tiny_model("llama-gqa")
    cfg = open_source(folder, dtype=torch.float32).config
    assert comm_time(cfg, 1, 1, 8, 1, 1e9) == 0
    hidden = 8 * 16 * cfg.hidden_size * 2
    assert comm_time(cfg, 2, 1, 8, 16, 1e9) == pytest.approx(2 * cfg.num_layers * hidden / 1e9)
    assert comm_time(cfg, 1, 2, 8, 16, 1e9) == pytest.approx((hidden + 64) / 1e9)
    assert comm_time(cfg, 4, 1, 8, 16, 1e9) > comm_time(cfg, 2, 1, 8, 16, 1e9)
