"""The serving scheduler's step-time model for the model this engine serves, on the device it runs on.

Skip-join MLFQ places each new job by its estimated prefill time; the scheduler package is torch-free, so the
engine measures here and hands it numbers (`LinearCostModel.from_rates`): FLOPs per token and weight bytes
from the served `ModelConfig` (this rank's share under tensor/pipeline parallelism), KV bytes per cached
token in the serving dtype, and the device's matmul and memory rates. On a GPU those are the rates
`defaults.measure_rates` times; on a CPU a small matmul and a host copy (a few milliseconds).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..scheduler.cost import LinearCostModel
from .defaults import DeviceRates, measure_rates


def model_costs(config: ModelConfig, dtype_bytes: int) -> tuple[float, float, float]:
    """(matmul FLOPs per token, weight bytes read per step, KV bytes per cached token) of a model.

    A token multiplies through every decoder layer's weights and the LM head (2 FLOPs per weight); the
    embedding lookup costs no matmul."""
    head = config.hidden_size * config.vocab_size
    flops = 2.0 * (config.num_layers * config.num_layer_params() + head)
    return flops, float(config.stored_weight_bytes(dtype_bytes)), float(config.kv_bytes_per_token(dtype_bytes))


def cpu_rates(dtype: torch.dtype, n: int = 512, copy_bytes: int = 64 << 20) -> DeviceRates:
    """Matmul FLOP/s in `dtype` and memory bytes/s (read + write of a copy) of this CPU, timed briefly."""
    return measure_rates(torch.device("cpu"), dtype, n=n, copy_bytes=copy_bytes, reps=4)


def job_cost_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                   rates: DeviceRates | None = None) -> LinearCostModel:
    """The step-time model skip-join places jobs by, for `config` served in `dtype` on `device`."""
    if rates is None:
        rates = measure_rates(device, dtype) if device.type == "cuda" else cpu_rates(dtype)
    flops, weights, kv = model_costs(config, torch.empty((), dtype=dtype).element_size())
    return LinearCostModel.from_rates(flops, weights, kv, rates.matmul_flops, rates.memory_bw)
