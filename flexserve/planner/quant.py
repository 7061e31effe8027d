"""What `--quantization` and `--kv-cache-dtype` mean to the planner: the policy fields, the compute cost of a
quantised decoder layer's projections, and what a plan assumes about quality.

The bytes are counted where every other size is (`sizes.py`, through `compression.config.layer_ratio`); this
module adds the time the GPU spends on a quantised projection, which differs from a plain matmul only in the
weight bytes it reads and, for 4-bit weights at prefill sizes, a rebuild into the compute dtype:

- fp8, int8: `torch._scaled_mm` / `torch._int_mm` read one byte per weight. The FLOPs are charged at the compute
  dtype's rate: the profile has no fp8 or int8 matmul rate, and charging the dtype's is conservative (an H100
  runs both about twice as fast). The per-token quantisation of the activations (a few rows) is left out.
- rtn4, awq: up to `MAX_FUSED_ROWS` rows per GPU batch (decode) the fused kernel
  (`kernels.dequant_matmul`) reads the packed bytes once; above it every projection of every GPU batch is
  rebuilt in the compute dtype, then multiplied as a plain matrix. The rebuild is priced at the profile's
  `dequant_bw` (measured on `--compress-weight`'s 4-bit rebuild, which unpacks groups the same way), else
  bound by HBM on the bytes read and written, as `--compress-weight`'s is.
- A scheme that keeps a checkpoint's own form (`gguf`) is counted as unquantized, as its bytes are
  (`layer_ratio`: the config does not say what the file stores): an upper bound.
- The slow fallbacks (fp8 without CUDA or below compute capability 8.9, int8 without CUDA, 4-bit without
  Triton) are not modelled: plans are for a GPU that runs the fast path.
  Mixtures of experts keep their layers unquantized (`layer_ratio`), so no scheme changes their cost.
"""
from __future__ import annotations

from ..compression.names import DEFAULT_GROUP_SIZE, GROUPED_SCHEMES
from ..offload.policy import Policy
from .hardware import Hardware

# kernels.dequant_matmul.MAX_FUSED_ROWS, named here so that planning imports no kernel (a test keeps them equal)
MAX_FUSED_ROWS = 16

# The schemes that round a float checkpoint's weights, which `--quantization auto` tries.
ROUNDING_SCHEMES = ("fp8", "int8", "awq", "rtn4")
# Best quality first; equal ranks are of about the same quality (bench/RESULTS.md section 6).
QUALITY_RANK = {None: 0, "fp8": 1, "int8": 1, "awq": 2, "rtn4": 3}
QUALITY_ORDER = "none > fp8 ≈ int8 > awq > rtn4"
RESULTS_REF = "see bench/RESULTS.md section 6"
# What each choice costs in quality, as measured (perplexity of SmolLM2-135M, bench/RESULTS.md section 6).
_WEIGHT_NOTES = {
    None: "weights unquantized: the model's own quality",
    "fp8": "8-bit fp8 weights and activations: expect slightly higher perplexity (+3.4% on SmolLM2-135M)",
    "int8": "8-bit int8 weights and activations (SmoothQuant): expect slightly higher perplexity (+1.0% on "
            "SmolLM2-135M)",
    "awq": "4-bit weights (AWQ): expect higher perplexity (+21% on SmolLM2-135M, group 128)",
    "rtn4": "4-bit weights (round to nearest): expect clearly higher perplexity (+48% on SmolLM2-135M, "
            "group 128; awq loses less at the same size and speed)",
}

# The same, in a few characters for the table of `--quantization auto` (perplexity change on SmolLM2-135M).
SHORT_NOTES = {None: "reference", "fp8": "+3.4% ppl", "int8": "+1.0% ppl", "awq": "+21% ppl", "rtn4": "+48% ppl"}


def quant_policy_fields(quantization: str | None = None, quant_group_size: int | None = None,
                        kv_cache_dtype: str | None = None) -> dict:
    """The `Policy` fields of the quantization settings (None: the field's default), checked as `Policy`
    checks them, so that a bad scheme name is refused before any search with the flag's name."""
    group = DEFAULT_GROUP_SIZE if quant_group_size is None else quant_group_size
    fields = {"quantization": quantization, "quant_group_size": group, "kv_cache_dtype": kv_cache_dtype or "auto"}
    Policy(**fields)  # raises PolicyError: "--quantization must be one of fp8, int8, rtn4, awq, got 'fp4'"
    return fields


def projection_time_s(scheme: str | None, rows: float, flops_s: float, stored_bytes: float, full_bytes: float,
                      hw: Hardware) -> tuple[float, bool]:
    """Seconds one GPU batch of `rows` activation rows spends in a decoder layer's projections under `scheme`
    (module docstring), and whether reading the weights bounds it. `flops_s` is the matmul's time at the
    compute dtype's rate; `stored_bytes` the layer's weights as stored, `full_bytes` in the compute dtype."""
    if scheme in GROUPED_SCHEMES and rows > MAX_FUSED_ROWS:  # rebuilt per projection, then a plain matmul
        read = full_bytes
        rebuild = full_bytes / hw.dequant_bw if hw.dequant_bw else (stored_bytes + full_bytes) / hw.gpu_mem_bw
    elif scheme in GROUPED_SCHEMES or scheme in ("fp8", "int8"):  # the fused 4-bit kernel, or an 8-bit matmul
        read, rebuild = stored_bytes, 0.0  # the stored bytes, read once
    else:  # unquantized, or a checkpoint's own form counted as unquantized
        read, rebuild = full_bytes, 0.0
    mem_s = read / hw.gpu_mem_bw
    return max(flops_s, mem_s) + rebuild, mem_s > flops_s


def quality_note(policy: Policy) -> str:
    """What a plan with `policy` assumes about the model's quality, in one line."""
    if policy.compress_weight:
        parts = [f"{policy.comp_num_bits}-bit compressed weights (FlexGen's, group {policy.comp_group_size}): "
                 "expect higher perplexity (not measured here; rtn4 is the nearest scheme measured)"]
    else:
        note = _WEIGHT_NOTES.get(policy.quantization, f"weights in the checkpoint's own {policy.quantization} "
                                 "form: the file's quality, not measured here")
        if policy.quantization in GROUPED_SCHEMES and policy.quant_group_size != DEFAULT_GROUP_SIZE:
            note += f" (this plan: group {policy.quant_group_size})"
        parts = [note]
    if policy.kv_cache_dtype == "fp8":
        parts.append("fp8 KV cache: +0.9% perplexity on SmolLM2-135M")
    if policy.compress_cache:
        parts.append(f"{policy.comp_num_bits}-bit compressed KV cache (FlexGen's): some loss, not measured here")
    quantized = policy.compress_weight or policy.quantization or policy.kv_cache_dtype == "fp8" \
        or policy.compress_cache
    return "; ".join(parts) + (f"; {RESULTS_REF}" if quantized else "")
