"""Paged KV-cache bookkeeping: which GPU or host block holds which request's tokens.

Only ids move here; the engine owns the real block pools (a GPU pool and a pinned-host pool, each indexed by
these ids) and performs the copies that `swap_out` / `swap_in` return. A request's blocks live wholly on one
tier: its GPU block table while it can run, its host table while it is swapped out.

With a sliding window (StreamingLLM: `sinks` first tokens plus the last `window`), blocks whose tokens no later
query can see are released as a sequence grows: its table keeps their places as `HOLE`, so the table still maps
positions to blocks and its length still counts the tokens it covers, and swaps copy only the blocks it holds.

Copy ordering (see docs/SCHEDULER.md): GPU blocks released by `swap_out` can be handed out again in the same
step, because the engine finishes swap-out copies before swap-in copies and compute. The reverse hazard, a
host block released by `swap_in` being reused by a later `swap_out` of the same step, would overwrite data
before it is read, so host blocks released by `swap_in` only return to the free list at `begin_step()`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..errors import ConfigError


HOLE = -1  # a table entry whose block was released (outside the sliding window)


class NoFreeBlocksError(RuntimeError):
    """An allocation or swap was asked for without checking `can_*` first: a scheduler bug."""


@dataclass(frozen=True)
class BlockUsage:
    """A snapshot of both pools, for metrics."""

    num_gpu_blocks: int
    num_cpu_blocks: int
    num_free_gpu_blocks: int
    num_free_cpu_blocks: int

    @property
    def num_used_gpu_blocks(self) -> int:
        return self.num_gpu_blocks - self.num_free_gpu_blocks

    @property
    def num_used_cpu_blocks(self) -> int:
        return self.num_cpu_blocks - self.num_free_cpu_blocks

    @property
    def gpu_fraction(self) -> float:
        return self.num_used_gpu_blocks / self.num_gpu_blocks if self.num_gpu_blocks else 0.0

    @property
    def cpu_fraction(self) -> float:
        return self.num_used_cpu_blocks / self.num_cpu_blocks if self.num_cpu_blocks else 0.0


class BlockManager:
    """Fixed-size KV blocks on two tiers, a block table per request, and admission by free blocks.

    `watermark` is the fraction of GPU blocks that admitting a *new* request must leave free, so that jobs
    already running can still grow by a block without an immediate preemption. `window` > 0 keeps only the
    `sinks` first and `window` last tokens of each sequence (see the module docstring).
    """

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int, watermark: float = 0.01,
                 sinks: int = 0, window: int = 0):
        if num_gpu_blocks < 1 or num_cpu_blocks < 0 or block_size < 1:
            raise ConfigError("need num_gpu_blocks >= 1, num_cpu_blocks >= 0 and block_size >= 1")
        if not 0.0 <= watermark < 1.0:
            raise ConfigError(f"watermark is a fraction in [0, 1), got {watermark}")
        if sinks < 0 or window < 0 or (sinks and not window):
            raise ConfigError(f"attention sinks need a sliding window; got sinks={sinks}, window={window}")
        self.sinks = sinks
        self.window = window
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        # FIFO free lists: a released block is reused last, which keeps tests' block ids predictable.
        self._free_gpu: deque[int] = deque(range(num_gpu_blocks))
        self._free_cpu: deque[int] = deque(range(num_cpu_blocks))
        self._cpu_released_this_step: list[int] = []
        self._gpu_tables: dict[str, list[int]] = {}
        self._cpu_tables: dict[str, list[int]] = {}

    # --- queries ---------------------------------------------------------------------------------------
    @property
    def num_free_gpu_blocks(self) -> int:
        return len(self._free_gpu)

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self._free_cpu)

    def usage(self) -> BlockUsage:
        return BlockUsage(self.num_gpu_blocks, self.num_cpu_blocks, self.num_free_gpu_blocks,
                          self.num_free_cpu_blocks + len(self._cpu_released_this_step))

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """GPU block ids of the request, in token order (empty when it holds none). A copy."""
        return list(self._gpu_tables.get(request_id, ()))

    def cpu_block_table(self, request_id: str) -> list[int]:
        return list(self._cpu_tables.get(request_id, ()))

    def num_gpu_blocks_of(self, request_id: str) -> int:
        return _num_held(self._gpu_tables.get(request_id, ()), self.window)

    def num_cpu_blocks_of(self, request_id: str) -> int:
        return _num_held(self._cpu_tables.get(request_id, ()), self.window)

    def max_blocks_held(self, num_tokens: int, chunk: int) -> int:
        """Most blocks a sequence of `num_tokens` tokens holds at once when it grows by up to `chunk` tokens a
        step: all of them, or with a window the sinks' blocks plus those the window and one chunk span."""
        full = self.num_blocks_for(num_tokens)
        if not self.window:
            return full
        return min(full, self.num_blocks_for(self.sinks) + self.num_blocks_for(self.window + chunk) + 1)

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._cpu_tables

    def num_new_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """GPU blocks to add so that the request's table covers `num_tokens` tokens in all."""
        have = len(self._gpu_tables.get(request_id, ())) + len(self._cpu_tables.get(request_id, ()))
        return max(0, self.num_blocks_for(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int, is_new: bool = False) -> bool:
        """Whether the table can grow to cover `num_tokens`; a new request must also leave the watermark."""
        need = self.num_new_blocks_needed(request_id, num_tokens)
        return need + (self.watermark_blocks if is_new else 0) <= self.num_free_gpu_blocks

    # --- allocation ------------------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's GPU table to cover `num_tokens` tokens in total; returns the blocks added.

        Called with `num_computed_tokens + num_new_tokens` before each step that computes those tokens.
        """
        if request_id in self._cpu_tables:
            raise NoFreeBlocksError(f"request {request_id!r} is swapped out; swap it in before it grows")
        need = self.num_new_blocks_needed(request_id, num_tokens)
        if need > self.num_free_gpu_blocks:
            raise NoFreeBlocksError(f"request {request_id!r} needs {need} GPU blocks, "
                                    f"{self.num_free_gpu_blocks} free")
        new_blocks = [self._free_gpu.popleft() for _ in range(need)]
        self._gpu_tables.setdefault(request_id, []).extend(new_blocks)
        return new_blocks

    def free(self, request_id: str) -> None:
        """Release every block of the request, wherever it is (finish, abort, or drop for recomputation)."""
        self._free_gpu.extend(b for b in self._gpu_tables.pop(request_id, ()) if b != HOLE)
        self._free_cpu.extend(b for b in self._cpu_tables.pop(request_id, ()) if b != HOLE)

    def release_outside_window(self, request_id: str, num_computed_tokens: int) -> int:
        """With a window: release the GPU blocks no later query of the request can see (past the sinks,
        before `num_computed_tokens - window + 1`). Returns how many were released."""
        table = self._gpu_tables.get(request_id)
        if not self.window or table is None:
            return 0
        first = self.num_blocks_for(self.sinks)
        last = min(len(table), max(0, num_computed_tokens - self.window + 1) // self.block_size)
        released = 0
        for i in range(first, last):
            if table[i] != HOLE:
                self._free_gpu.append(table[i])
                table[i] = HOLE
                released += 1
        return released

    # --- swapping --------------------------------------------------------------------------------------
    def can_swap_out(self, request_id: str) -> bool:
        return self.num_gpu_blocks_of(request_id) <= self.num_free_cpu_blocks

    def can_swap_in(self, request_id: str, extra_blocks: int = 0) -> bool:
        return self.num_cpu_blocks_of(request_id) + extra_blocks <= self.num_free_gpu_blocks

    def swap_out(self, request_id: str) -> list[tuple[int, int]]:
        """Move the request's table to host blocks; returns the (gpu_block, cpu_block) copies to perform."""
        return self._move(request_id, self._gpu_tables, self._cpu_tables, self._free_cpu, self._free_gpu, "host")

    def swap_in(self, request_id: str) -> list[tuple[int, int]]:
        """Move the request's table back to GPU blocks; returns the (cpu_block, gpu_block) copies to perform.
        The host blocks it leaves return to the free list only at the next `begin_step` (module docstring)."""
        return self._move(request_id, self._cpu_tables, self._gpu_tables, self._free_gpu,
                          self._cpu_released_this_step, "GPU")

    def _move(self, request_id: str, src_tables: dict, dst_tables: dict, dst_free: deque, src_released,
              dst_name: str) -> list[tuple[int, int]]:
        """Give the request's held blocks new ids from `dst_free` (holes stay holes), release the old ones into
        `src_released`; returns the (old, new) copies to perform."""
        src = src_tables.pop(request_id, [])
        held = _num_held(src, self.window)
        if held > len(dst_free):
            src_tables[request_id] = src
            raise NoFreeBlocksError(f"request {request_id!r} needs {held} {dst_name} blocks, {len(dst_free)} free")
        dst = [HOLE if b == HOLE else dst_free.popleft() for b in src]
        dst_tables[request_id] = dst
        src_released.extend(b for b in src if b != HOLE)
        return [(a, b) for a, b in zip(src, dst) if a != HOLE]

    def begin_step(self) -> None:
        """Return host blocks read by the previous step's swap-ins to the free list (their copies are done)."""
        self._free_cpu.extend(self._cpu_released_this_step)
        self._cpu_released_this_step.clear()


def _num_held(table, window: int) -> int:
    """Blocks a table really holds: its length, less its holes (only a windowed table has any)."""
    return len(table) - (table.count(HOLE) if window else 0)
