"""Sliding-window KV (StreamingLLM): blocks no later query can see are released, sinks stay, swaps copy only
held blocks, and a stream's footprint stays bounded however long it runs."""
import pytest

from flexserve.errors import ConfigError
from flexserve.scheduler.block_manager import HOLE, BlockManager


def test_release_keeps_sinks_and_window():
    bm = BlockManager(64, 8, block_size=4, sinks=4, window=8)
    bm.allocate("a", 30)  # positions 0..29: 8 blocks
    assert bm.num_gpu_blocks_of("a") == 8
    # the next query (position 30) sees keys 0..3 (sinks) and 23..30: blocks 1..4 (positions 4..19) go
    assert bm.release_outside_window("a", 30) == 4
    table = bm.block_table("a")
    assert table[0] != HOLE and table[1:5] == [HOLE] * 4 and HOLE not in table[5:]
    assert bm.num_gpu_blocks_of("a") == 4 and bm.num_free_gpu_blocks == 60
    assert bm.release_outside_window("a", 30) == 0  # nothing twice
    assert bm.num_new_blocks_needed("a", 33) == 1  # the table still counts the positions it covers


def test_footprint_bounded_over_a_long_stream():
    bm = BlockManager(16, 0, block_size=4, sinks=2, window=8)
    held = []
    for n in range(1, 400):
        bm.allocate("s", n)
        bm.release_outside_window("s", n)
        held.append(bm.num_gpu_blocks_of("s"))
    assert max(held) <= bm.max_blocks_held(10 ** 6, chunk=1) <= 5
    bm.free("s")
    assert bm.num_free_gpu_blocks == 16  # every block back, none lost to the holes


def test_swap_copies_only_held_blocks():
    bm = BlockManager(32, 32, block_size=4, sinks=4, window=4)
    bm.allocate("a", 24)
    bm.release_outside_window("a", 24)
    held = bm.num_gpu_blocks_of("a")
    out = bm.swap_out("a")
    assert len(out) == held and all(g != HOLE and c != HOLE for g, c in out)
    assert bm.num_cpu_blocks_of("a") == held and bm.num_free_gpu_blocks == 32
    back = bm.swap_in("a")
    assert len(back) == held
    table = bm.block_table("a")
    assert len(table) == 6 and table.count(HOLE) == 6 - held


def test_without_window_nothing_is_released_and_sinks_need_a_window():
    bm = BlockManager(8, 0, block_size=4)
    bm.allocate("a", 30)
    assert bm.release_outside_window("a", 30) == 0 and bm.max_blocks_held(30, 8) == 8
    with pytest.raises(ConfigError):
        BlockManager(8, 0, block_size=4, sinks=4)
