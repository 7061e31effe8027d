import pytest

from flexserve.scheduler import BlockManager, NoFreeBlocksError


def test_allocate_grows_table_by_whole_blocks():
    bm = BlockManager(8, 4, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]  # 5 tokens -> 2 blocks
    assert bm.allocate("a", 8) == []  # still fits in 2 blocks
    assert bm.allocate("a", 9) == [2]
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_free_gpu_blocks == 5


def test_exhaustion_is_checked_and_raises_without_side_effects():
    bm = BlockManager(4, 0, block_size=4)
    bm.allocate("a", 12)
    assert not bm.can_allocate("b", 8)
    assert bm.can_allocate("b", 4)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", 8)
    assert bm.block_table("b") == [] and bm.num_free_gpu_blocks == 1


def test_watermark_applies_to_new_requests_only():
    bm = BlockManager(100, 0, block_size=1, watermark=0.1)
    bm.allocate("a", 85)
    assert bm.can_allocate("a", 95)  # a running job may use the watermark
    assert not bm.can_allocate("b", 6, is_new=True)  # a new one must leave 10 blocks free
    assert bm.can_allocate("b", 5, is_new=True)


def test_swap_out_and_in_return_copy_pairs_and_preserve_length():
    bm = BlockManager(6, 6, block_size=4)
    bm.allocate("x", 4)
    bm.allocate("a", 12)  # blocks 1, 2, 3
    out = bm.swap_out("a")
    assert out == [(1, 0), (2, 1), (3, 2)]
    assert bm.block_table("a") == [] and bm.is_swapped("a")
    assert bm.num_free_gpu_blocks == 5 and bm.num_free_cpu_blocks == 3
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("a", 16)  # a swapped table cannot grow
    back = bm.swap_in("a")
    assert [cpu for cpu, _ in back] == [0, 1, 2]
    assert bm.block_table("a") == [gpu for _, gpu in back] and len(back) == 3
    assert not bm.is_swapped("a")


def test_host_blocks_read_by_swap_in_are_not_reused_in_the_same_step():
    bm = BlockManager(4, 2, block_size=1)
    bm.allocate("a", 2)
    bm.swap_out("a")  # a on host blocks 0, 1
    bm.swap_in("a")
    bm.allocate("b", 2)
    assert not bm.can_swap_out("b")  # host blocks 0, 1 are still being read this step
    bm.begin_step()
    assert bm.can_swap_out("b")


def test_free_releases_blocks_on_either_tier_and_nothing_leaks():
    bm = BlockManager(16, 16, block_size=4)
    bm.allocate("a", 20)
    bm.allocate("b", 7)
    bm.swap_out("b")
    bm.allocate("c", 1)
    bm.swap_out("c")
    bm.swap_in("c")
    for rid in ("a", "b", "c"):
        bm.free(rid)
    bm.begin_step()
    assert bm.num_free_gpu_blocks == 16 and bm.num_free_cpu_blocks == 16
    usage = bm.usage()
    assert usage.num_used_gpu_blocks == 0 and usage.num_used_cpu_blocks == 0
    bm.free("unknown")  # idempotent


def test_bad_sizes_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 1, 4)
    with pytest.raises(ValueError):
        BlockManager(1, 1, 4, watermark=1.0)
