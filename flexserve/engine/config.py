"""`EngineConfig`: what a serving engine is asked to be (model, scheduler, pool sizes, placement, parallelism)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..offload.policy import QUANT_FIELDS, Policy
from .paged_batch import StreamingWindow
from .rank_group import JoinGroup


def flag(name: str) -> str:
    """The command-line flag that sets the config field `name`."""
    return "--" + name.replace("_", "-")


def check_int(name: str, value, least: int) -> None:
    """Refuse a field that is set (not None) but not an integer >= `least`, naming its flag."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{flag(name)} ({name}) must be an integer >= {least}, got {value!r}")


def check_scheduler_options(options: dict) -> None:
    """Refuse scheduler options out of range now, naming their flags, rather than when the engine starts."""
    import re

    from ..scheduler.config import SchedulerConfig

    try:
        SchedulerConfig(**options)
    except TypeError as e:
        raise ConfigError(f"unknown scheduler option: {e}") from None
    except ConfigError as e:
        raise ConfigError(re.sub(r"SchedulerConfig\.(\w+)", lambda m: f"{flag(m.group(1))} ({m.group(1)})",
                                 str(e))) from None


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str | None = None
    scheduler: str = "fcfs"
    # None: derived from the device, the model and measured rates at start (`defaults.derive_defaults`)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    prefill_chunk_size: int | None = None
    block_size: int = 16
    num_gpu_blocks: int | None = None  # default: free device memory after weights and one step's activations
    num_cpu_blocks: int | None = None  # default: 4 GiB of pinned host memory (1 GiB on a CPU)
    # StreamingLLM: each query sees the first `attention_sinks` tokens and its last `sliding_window` ones; the
    # KV of the rest is released, so a stream can run past the context window. 0 = full attention.
    attention_sinks: int = 0
    sliding_window: int = 0
    max_queue_len: int = 1024
    seed: int = 0
    policy: Policy | None = None  # weight placement (None: resident); the KV cache is always paged
    offload_dir: str | None = None
    scheduler_options: dict = field(default_factory=dict)  # extra SchedulerConfig fields
    cuda_graphs: bool = True  # replay decode-only steps as CUDA graphs (when the weights are resident on a GPU)
    # plan step N+1 while step N computes, its sampled tokens fed in on the device (`AsyncEngine.step`)
    async_scheduling: bool = True
    tensor_parallel: int = 1  # ranks of a torchrun group that split every layer (flexserve.parallel.serving)
    pipeline_parallel: int = 1  # stages of contiguous layers, one rank group each
    join_group: JoinGroup | None = None  # how to join that group: `ServingGroup.join` (see rank_group.py)
    # weight quantisation and KV cache storage: the `Policy` fields of the same names, folded into `policy`
    quantization: str | None = None
    quant_group_size: int | None = None
    kv_cache_dtype: str | None = None

    def __post_init__(self) -> None:
        for name, least in (("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1),
                            ("prefill_chunk_size", 1), ("num_gpu_blocks", 1), ("num_cpu_blocks", 0),
                            ("attention_sinks", 0), ("sliding_window", 0), ("max_queue_len", 1),
                            ("tensor_parallel", 1), ("pipeline_parallel", 1)):
            check_int(name, getattr(self, name), least)
        check_scheduler_options(self.scheduler_options)
        self.policy = Policy.with_quantization(self.policy, **{k: getattr(self, k) for k in QUANT_FIELDS})
        if self.sliding_window < 0 or self.attention_sinks < 0 or (self.attention_sinks and not self.sliding_window):
            raise ConfigError(f"attention sinks need a sliding window (--sliding-window W > 0); got "
                              f"sinks={self.attention_sinks}, window={self.sliding_window}")

    @property
    def streaming(self) -> StreamingWindow | None:
        """The sliding window with sinks (StreamingLLM), or None for full attention."""
        return StreamingWindow(self.attention_sinks, self.sliding_window) if self.sliding_window else None

    @property
    def parallel(self) -> bool:
        """Whether the engine spans a torchrun group (tensor or pipeline parallel)."""
        return self.tensor_parallel > 1 or self.pipeline_parallel > 1
