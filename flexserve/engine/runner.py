"""The serving engine's model runner: one step's device work, from a typed plan to typed sampled tokens.

In: a `StepPlan`, the scheduler's decisions as plain data (each scheduled sequence's token chunk with its block
table, and the block swaps). Under tensor/pipeline parallelism rank 0 broadcasts the plan to every rank (so it
stays picklable) and every rank `execute`s it: swaps its share of the KV pools, runs its part of the forward.
Out: on rank 0, `sample` turns the logits of the sampled rows into a `RunnerOutput`.

The forward is the shared one of `flexserve.models.forward`, over the offloading executor's layer stream (so a
served model can itself be offloaded under a `Policy`), with attention reading the paged pools
(`paged_batch.py`, a Triton kernel on a GPU) and, under pipeline parallelism, the group's messages at its two
ends. Decode-only steps replay CUDA graphs of that same forward (`decode_graphs.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch

from ..compression.kv import kv_storage_dtype
from ..errors import PolicyError
from ..kernels.paged_attention import kernel_supports
from ..models.forward import Batch, EachBatch, Ends, forward
from ..models.loading import model_config, open_model, resolve_device
from ..offload.budget import check_fits
from ..offload.executor import OffloadExecutor
from ..offload.policy import Policy
from .config import EngineConfig
from .decode_graphs import DecodeGraphs
from .defaults import ServingDefaults, derive_defaults, measure_rates
from .paged import PagedKV
from .paged_batch import PagedBatch, SeqChunk, paged_attend
from .rank_group import RankGroup
from .sampling import DeviceTokens, SamplingParams, greedy_tokens, logprob_entry, sample

GiB = 1 << 30
BlockPairs = list[tuple[int, int]]  # (source block, destination block) of each copy


@dataclass
class StepPlan:
    """One step's device work, the same on every rank: the swaps, then one forward over the chunks.

    Swaps out are (gpu block, cpu block), swaps in (cpu block, gpu block). The `_ahead` ones are not needed by
    this step (the scheduler moves them early); they run on the copy stream while this step computes."""

    seqs: list[SeqChunk]
    swap_out: BlockPairs = field(default_factory=list)
    swap_in: BlockPairs = field(default_factory=list)
    swap_out_ahead: BlockPairs = field(default_factory=list)
    swap_in_ahead: BlockPairs = field(default_factory=list)
    # (i, j): seq i's one input token is row j of the previous step's sampled tokens, which the host has not
    # read yet (asynchronous scheduling: this step was planned while that one computed)
    feed: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ExecutedStep:
    """A step whose forward is queued: its batch and the logits of its sampled rows [Ns, V] (on rank 0)."""

    batch: PagedBatch | None
    logits: torch.Tensor | None

    @property
    def sampled(self) -> list[int]:
        """Index in the plan's `seqs` of each sampled row, in the order of the logits."""
        return self.batch.sampled if self.batch is not None else []


class SamplingState(Protocol):
    """How one request samples (`output_processor.LiveRequest`)."""

    request_id: str
    params: SamplingParams
    generator: torch.Generator


@dataclass
class RunnerOutput:
    """The tokens a step sampled: one per sampled sequence, in the step's order."""

    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per token, where its request asked for them

    def __len__(self) -> int:
        return len(self.request_ids)

    def __iter__(self) -> Iterator[tuple[str, int, dict[int, float] | None]]:
        return iter(zip(self.request_ids, self.token_ids, self.logprobs))


@dataclass
class SampledStep:
    """A step's sampled tokens: on the device at once (`chosen`, what the next step can feed in), on the host
    when `output()` is asked for, which waits for the device only if they were picked there."""

    request_ids: list[str]
    chosen: torch.Tensor | None  # [Ns] int64 on the device (None when nothing was sampled)
    _pending: DeviceTokens | None = None
    _output: RunnerOutput | None = None

    def output(self) -> RunnerOutput:
        if self._output is None:
            tokens = self._pending.tolist()
            self._output = RunnerOutput(self.request_ids, tokens, [None] * len(tokens))
        return self._output


def join_rank_group(config: EngineConfig) -> RankGroup | None:
    """The torchrun group of a tensor/pipeline parallel engine (None for one rank), joined through
    `config.join_group` (the parallel layer's constructor: the engine never imports it)."""
    if not config.parallel:
        return None
    if config.join_group is None:
        raise PolicyError("a tensor/pipeline parallel engine needs EngineConfig.join_group "
                          "(flexserve.parallel.serving.ServingGroup.join, as `flexserve serve` passes)")
    return config.join_group(config.tensor_parallel, config.pipeline_parallel, model_config(config.model),
                             resolve_device(config.device))


class ModelRunner:
    """The model, its KV pools and its decode graphs on one rank (see module docstring)."""

    def __init__(self, config: EngineConfig, group: RankGroup | None = None):
        self.config, self.group = config, group
        device = resolve_device(config.device)
        if group is not None:
            device = group.device(device)  # one GPU per rank
        opened = open_model(config.model, config.dtype, device)
        source = group.shard(opened.source) if group is not None else opened.source  # this rank's share
        self.model_path, self.device, self.dtype = opened.path, opened.device, opened.dtype
        self.model_config = cfg = source.config
        self._reduce = group.reduce() if group is not None else None
        self._staged = group is not None and group.layout.pp > 1
        policy = config.policy or Policy()
        policy.require_weights_only("serving keeps the KV cache in its own paged pools (moved to host memory by "
                                    "the scheduler) and activations on the GPU", config.offload_dir)
        check_fits(cfg, policy, torch.empty((), dtype=self.dtype).element_size(), 1, self.device)
        self.executor = OffloadExecutor(source, policy, self.device, self.dtype, config.offload_dir)
        self.streaming = config.streaming
        if self.streaming is not None and self.executor.inv_freq is None:
            raise PolicyError("a sliding window with attention sinks needs rotary positions; this model's "
                              "positions are learned (a fixed table)")
        self.kv_dtype = kv_storage_dtype(policy.kv_cache_dtype, self.dtype)  # e4m3 with --kv-cache-dtype fp8
        self.settings = self._settings(config, PagedKV.bytes_per_block(cfg, config.block_size, self.kv_dtype))
        num_gpu, num_cpu = self.settings.num_gpu_blocks, self.settings.num_cpu_blocks
        if group is not None:  # block ids must mean the same on every rank
            num_gpu, num_cpu = group.agree_min(num_gpu, self.device), group.agree_min(num_cpu, self.device)
        self.num_gpu_blocks, self.num_cpu_blocks = num_gpu, num_cpu
        self.kv = PagedKV(cfg, self.device, self.kv_dtype, num_gpu, num_cpu, config.block_size)
        # Graph capture of the collectives is not wired up: parallel ranks run decode eagerly.
        self.graphs = self._decode_graphs(policy) if config.cuda_graphs and group is None else None

    def _decode_graphs(self, policy: Policy) -> DecodeGraphs | None:
        """Graphs need a GPU, resident uncompressed weights and the paged-attention kernel (no host syncs)."""
        if not (self.device.type == "cuda" and policy.w_gpu_percent == 100 and not policy.compress_weight
                and kernel_supports(self.device, self.model_config.head_dim)):
            return None
        max_blocks = -(-self.model_config.max_position // self.config.block_size)
        return DecodeGraphs(self.forward, self.settings.max_num_seqs, max_blocks, self.config.block_size,
                            self.kv.scratch_block, self.device, streaming=self.streaming,
                            inv_freq=self.executor.inv_freq)

    def _settings(self, config: EngineConfig, per_block: int) -> ServingDefaults:
        """The settings the config leaves open, derived from this device (see `defaults.py`)."""
        cuda = self.device.type == "cuda"
        num_cpu = config.num_cpu_blocks if config.num_cpu_blocks is not None else max(
            1, (4 * GiB if cuda else GiB) // per_block)
        rates = self.rates = measure_rates(self.device, self.dtype) if cuda else None  # also for job sizes
        free = torch.cuda.mem_get_info(self.device)[0] if cuda else 0
        return derive_defaults(self.model_config, per_block, config.block_size, free, rates, num_cpu,
                               max_num_seqs=config.max_num_seqs,
                               max_num_batched_tokens=config.max_num_batched_tokens,
                               prefill_chunk_size=config.prefill_chunk_size, num_gpu_blocks=config.num_gpu_blocks)

    # --- the step --------------------------------------------------------------------------------------------
    def forward(self, batch: PagedBatch, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits of the given rows of the flattened batch (every row when None; None for an empty selection,
        which skips the LM head). Runs eagerly, or inside a CUDA graph capture: no host synchronisation in
        here. Under pipeline parallelism each rank runs its stage and rank 0 gets the logits."""
        kv = self.kv
        decoders = EachBatch(self.model_config, lambda layer, _: paged_attend(kv.layer_slots(layer), batch),
                             self._reduce)
        ends = _StagedRows(self, batch, rows) if self._staged else _Rows(rows)
        return forward(self.executor, [Batch(batch.ids, batch.positions)], decoders, ends)[0]

    def execute(self, plan: StepPlan, sample: bool, fed: torch.Tensor | None = None) -> ExecutedStep:
        """A step's device work, the same on every rank: block swaps, then the forward. `sample` (rank 0)
        keeps the logits of the rows to sample; the other ranks run the LM head on nothing. `fed`: the previous
        step's sampled tokens on the device, where `plan.feed` takes inputs from.

        The copies this step needs are ordered before its compute; the copies ahead of need (blocks this
        step does not touch) are issued once the forward is queued, behind a marker of the work before it, so
        on a GPU they run on the copy stream while this step computes (issued before the forward they would
        finish while the host is still building the batch, overlapping nothing), and the next step's
        `finish_pending` waits for them."""
        kv = self.kv
        kv.finish_pending()
        kv.swap(plan.swap_out, plan.swap_in, wait=False)
        kv.order_before_compute()
        before_forward = kv.mark()
        batch, logits = None, None
        if plan.seqs:
            batch = PagedBatch.build(plan.seqs, self.config.block_size, self.device, self.streaming,
                                     self.executor.inv_freq)
            if plan.feed:
                batch.feed(fed, plan.feed)
            rows = batch.sample_rows if sample else batch.sample_rows[:0]
            if self.graphs is not None and self.graphs.applies(batch):
                logits = self.graphs.run(batch)[rows]
            else:
                logits = self.forward(batch, rows)
        kv.swap(plan.swap_out_ahead, plan.swap_in_ahead, wait=False, after=before_forward)
        return ExecutedStep(batch, logits)

    def sample(self, step: ExecutedStep, states: Sequence[SamplingState]) -> SampledStep:
        """The tokens of a step's sampled rows; `states[i]` is the request of row i (of `step.sampled`).

        All-greedy rows without log-probabilities are picked on the device and the host does not wait: the
        tokens reach it behind an event, read when `output()` is asked for. Anything else (seeded random
        draws, log-probabilities) waits for the forward here."""
        ids = [s.request_id for s in states]
        if not states:
            return SampledStep(ids, None, _output=RunnerOutput([], [], []))
        if all(s.params.greedy and s.params.logprobs is None for s in states):
            picked = greedy_tokens(step.logits)
            return SampledStep(ids, picked.chosen, _pending=picked)
        nlp = max((s.params.logprobs for s in states if s.params.logprobs is not None), default=None)
        res = sample(step.logits, [s.params for s in states], [s.generator for s in states], nlp)
        logprobs = [logprob_entry(res, i, s.params.logprobs) if s.params.logprobs is not None else None
                    for i, s in enumerate(states)]
        return SampledStep(ids, res.chosen, _output=RunnerOutput(ids, res.token_ids, logprobs))

    def capture_graphs(self) -> None:
        """Capture every decode graph now (on the thread that will replay them)."""
        if self.graphs is not None:
            self.graphs.capture_all()

    def close(self) -> None:
        """Stop the executor's I/O threads and remove its offload files."""
        self.executor.close()

    def release(self) -> None:
        """Drop the weights and KV pools now (see `AsyncEngine.release_memory`)."""
        if self.kv is not None:
            self.kv.finish_pending(sync=True)  # DMA into the pinned pool must land before it is unmapped
        self.executor = self.kv = self.graphs = None


class _Rows(Ends):
    """The LM head scores the given rows of the flat batch [1, T, D] (every row when None, none when empty)."""

    def __init__(self, rows: torch.Tensor | None):
        self.rows = rows

    def leave(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None:
            return x[0]
        return x[0, self.rows] if self.rows.numel() else None


class _StagedRows(Ends):
    """Pipeline parallel serving: a stage after the first receives the previous stage's hidden states; after
    its layers a stage sends them on, the last one sends the rows to sample to rank 0, whose LM head (rank 0
    holds the embedding and the head) scores them."""

    def __init__(self, runner: ModelRunner, batch: PagedBatch, rows: torch.Tensor):
        self.group, self.batch, self.rows = runner.group, batch, rows
        self.hidden, self.dtype, self.device = runner.model_config.hidden_size, runner.dtype, runner.device

    def enter(self, k: int, batch: Batch) -> torch.Tensor | None:
        if self.group.layout.is_first:
            return None
        return self.group.recv_hidden((*batch.ids.shape, self.hidden), self.dtype, self.device)

    def leave(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        self.group.pass_on(x, self.batch.sample_rows)
        if not self.rows.numel():  # the workers sample nothing
            return None
        return self.group.recv_sampled(self.rows.numel(), self.hidden, self.dtype, self.device)
