"""`Policy`: where weights, KV cache and activations live, and the shape of the zig-zag block.

Field names follow FlexGen's so that FlexGen users can carry their settings over. Each pair of percentages
gives the GPU and CPU shares; the remainder goes to disk. The planner (`flexserve.planner`) optimises this same
object.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from ..compression.names import DEFAULT_GROUP_SIZE, KV_CACHE_DTYPES, check_scheme
from ..errors import PolicyError

# How whole tensors meet the weight percentages (offload.placement.assign_tiers): FlexGen's rule, or flexserve's
# earlier largest-first rule, kept to reproduce the runs made with it.
WEIGHT_PLACEMENTS = ("flexgen", "largest-first")
# How a mixture-of-experts expert that lives off the GPU runs (offload.experts): copied in or computed on the CPU
# by the cost rule, always copied, or always on the CPU.
EXPERT_RULES = ("auto", "copy", "cpu")


# The `Policy` fields that quantize weights and the KV cache, which `LLM`, `EngineConfig` and the CLI also take
# as their own arguments (see `Policy.with_quantization`).
QUANT_FIELDS = ("quantization", "quant_group_size", "kv_cache_dtype")


@dataclass(frozen=True)
class Policy:
    """Placement and batching policy of the offloading executor.

    One block is `num_gpu_batches` GPU batches of `gpu_batch_size` sequences; each layer's weights are loaded
    once per block and reused for every GPU batch (FlexGen's zig-zag schedule).
    """

    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100
    w_cpu_percent: float = 0
    cache_gpu_percent: float = 100
    cache_cpu_percent: float = 0
    act_gpu_percent: float = 100
    act_cpu_percent: float = 0
    overlap: bool = True
    sep_layer: bool = True  # FlexGen compatibility: layers are always split at attention where it pays (CPU attention)
    pin_weight: bool = True
    cpu_cache_compute: bool = False
    attn_sparsity: float = 1.0
    compress_weight: bool = False  # every decoder/head matrix stored 4/8-bit on its tier, unpacked on the GPU per use
    compress_cache: bool = False
    comp_group_size: int = 64
    comp_num_bits: int = 4
    # Not a FlexGen field: the dtype of a host KV cache that CPU attention reads (None: the model's dtype).
    # x86 CPUs have no fast fp16 math: a bfloat16 host cache reads ~3x faster there, at bf16 precision.
    cpu_attention_dtype: str | None = None
    # How whole tensors meet the weight percentages: "flexgen" (FlexGen's rule, so the same flags place the
    # same bytes as FlexGen) or "largest-first" (flexserve's earlier rule). See offload.placement.
    weight_placement: str = "flexgen"
    # Not a FlexGen field: how experts off the GPU run, one of EXPERT_RULES (mixtures of experts only).
    expert_compute: str = "auto"
    # Not FlexGen fields: weight quantisation of the decoder projections (fp8 | int8 | rtn4 | awq, see
    # compression.schemes), its 4-bit group size, and the KV cache's storage dtype ("fp8": e4m3).
    quantization: str | None = None
    quant_group_size: int = DEFAULT_GROUP_SIZE
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"--{name.replace('_', '-')} ({name}) must be an integer >= 1, got {value!r}")
        for kind in ("w", "cache", "act"):
            gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            for label, v in (("gpu", gpu), ("cpu", cpu)):
                if not 0 <= v <= 100:
                    raise PolicyError(f"--percent: {kind}_{label}_percent must be within 0..100, got {v}")
            if gpu + cpu > 100 + 1e-9:
                raise PolicyError(f"--percent: {kind}_gpu_percent + {kind}_cpu_percent = {gpu + cpu} exceeds 100")
        if self.comp_num_bits not in (4, 8):
            raise PolicyError(f"comp_num_bits must be 4 or 8, got {self.comp_num_bits}")
        if self.comp_group_size < 2 or self.comp_group_size % 2:
            raise PolicyError(f"comp_group_size must be an even number >= 2, got {self.comp_group_size}")
        if self.weight_placement not in WEIGHT_PLACEMENTS:
            raise PolicyError(f"weight_placement must be one of {WEIGHT_PLACEMENTS}, got {self.weight_placement!r}")
        if self.expert_compute not in EXPERT_RULES:
            raise PolicyError(f"expert_compute must be one of {EXPERT_RULES}, got {self.expert_compute!r}")
        if self.cpu_attention_dtype not in (None, "bfloat16", "float32", "float16"):
            raise PolicyError(f"cpu_attention_dtype must be bfloat16, float32 or float16, got "
                              f"{self.cpu_attention_dtype!r}")
        if not 0 < self.attn_sparsity <= 1:
            raise PolicyError(f"attn_sparsity must be in (0, 1], got {self.attn_sparsity}")
        self._check_quantization()

    def _check_quantization(self) -> None:
        if self.quantization is None:
            if self.quant_group_size != DEFAULT_GROUP_SIZE:
                raise PolicyError("--quant-group-size needs --quantization rtn4 or awq")
        else:
            check_scheme(self.quantization, self.quant_group_size)
            if self.compress_weight:
                raise PolicyError(f"--quantization {self.quantization} and --compress-weight both quantise the "
                                  f"weights: choose one")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise PolicyError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                              f"{self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "fp8" and self.compress_cache:
            raise PolicyError("--kv-cache-dtype fp8 and --compress-cache both quantise the KV cache: choose one")

    @property
    def w_disk_percent(self) -> float:
        return 100 - self.w_gpu_percent - self.w_cpu_percent

    @property
    def cache_disk_percent(self) -> float:
        return 100 - self.cache_gpu_percent - self.cache_cpu_percent

    @property
    def act_disk_percent(self) -> float:
        return 100 - self.act_gpu_percent - self.act_cpu_percent

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def uses_disk(self) -> bool:
        return max(self.w_disk_percent, self.cache_disk_percent, self.act_disk_percent) > 1e-9

    @property
    def percent(self) -> tuple[float, float, float, float, float, float]:
        """The six numbers of FlexGen's `--percent` flag."""
        return (self.w_gpu_percent, self.w_cpu_percent, self.cache_gpu_percent, self.cache_cpu_percent,
                self.act_gpu_percent, self.act_cpu_percent)

    @classmethod
    def from_percent(cls, percent: Sequence[float], **kw) -> "Policy":
        if len(percent) != 6:
            raise PolicyError(f"--percent takes 6 numbers (W_GPU W_CPU C_GPU C_CPU A_GPU A_CPU), got {len(percent)}")
        names = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                 "act_gpu_percent", "act_cpu_percent")
        return cls(**dict(zip(names, (float(p) for p in percent))), **kw)

    def require_weights_only(self, why: str, offload_dir: str | None) -> None:
        """For runners that keep the KV cache and activations themselves (the serving engine's paged pools,
        pipeline stages): refuse any placement other than the weights', and a disk share without a folder.
        `why` says where the cache lives instead, for the message."""
        if (self.cache_gpu_percent, self.act_gpu_percent) != (100, 100) or self.cpu_cache_compute \
                or self.compress_cache:
            raise PolicyError(f"{why}: only the weight percentages (--percent W_GPU W_CPU 100 0 100 0) and "
                              f"--compress-weight apply")
        if self.uses_disk and not offload_dir:
            raise PolicyError("the policy puts weights on disk: give a folder for them with --offload-dir (offload_dir)")

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def with_quantization(policy: "Policy | None", **fields) -> "Policy | None":
        """`policy` with those of the `QUANT_FIELDS` given (not None) set on it, a default `Policy` standing in
        for None; `policy` unchanged (None included: resident, automatic batch) when none is given. The front
        ends take the quantization settings as their own arguments and fold them in here."""
        quant = {k: v for k, v in fields.items() if v is not None}
        if set(quant) - set(QUANT_FIELDS):
            raise TypeError(f"not a quantization field: {sorted(set(quant) - set(QUANT_FIELDS))}")
        return (policy or Policy()).replace(**quant) if quant else policy


    def percent_flags(self) -> str:
        """The policy as CLI flags, e.g. `--percent 20 80 0 100 0 100 --gpu-batch-size 16 ...`."""
        pct = " ".join(f"{p:g}" for p in self.percent)
        flags = f"--percent {pct} --gpu-batch-size {self.gpu_batch_size} --num-gpu-batches {self.num_gpu_batches}"
        if self.cpu_cache_compute:
            flags += " --cpu-cache-compute"
        if self.compress_weight:
            flags += " --compress-weight"
        if self.compress_cache:
            flags += " --compress-cache"
        if self.cpu_attention_dtype:
            flags += f" --cpu-attention-dtype {self.cpu_attention_dtype}"
        if self.weight_placement != "flexgen":
            flags += f" --weight-placement {self.weight_placement}"
        if self.expert_compute != "auto":
            flags += f" --expert-compute {self.expert_compute}"
        if self.quantization:
            flags += f" --quantization {self.quantization}"
            if self.quant_group_size != DEFAULT_GROUP_SIZE:
                flags += f" --quant-group-size {self.quant_group_size}"
        if self.kv_cache_dtype != "auto":
            flags += f" --kv-cache-dtype {self.kv_cache_dtype}"
        return flags


RESIDENT = Policy()
