"""The weight quantisation scheme names and their checks, without torch (the command line and `Policy` use
them; see `schemes` for what each scheme does)."""
from __future__ import annotations

from ..errors import PolicyError

SCHEMES = ("fp8", "int8", "rtn4", "awq", "gguf", "awq-checkpoint")
# Schemes that round nothing: they keep the quantised form a checkpoint already stores (`gguf`: a GGUF file's
# Q4_0, Q4_1 and Q8_0 projections, see `compression.ggml`; `awq-checkpoint`: an AutoAWQ folder's 4-bit
# projections, see `compression.awq_checkpoint`, the default for such a folder), so they apply only to such a
# checkpoint.
STORED_SCHEMES = ("gguf", "awq-checkpoint")
GROUPED_SCHEMES = ("rtn4", "awq")  # the schemes `--quant-group-size` applies to
CALIBRATED_SCHEMES = ("int8", "awq")
DEFAULT_GROUP_SIZE = 128
KV_CACHE_DTYPES = ("auto", "fp8")


def check_scheme(scheme: str, group_size: int | None = None) -> None:
    """Refuse an unknown scheme or a group size that does not fit it, naming the flags."""
    if scheme not in SCHEMES:
        raise PolicyError(f"--quantization must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if group_size is None or group_size == DEFAULT_GROUP_SIZE:
        return
    if scheme not in GROUPED_SCHEMES:
        raise PolicyError(f"--quant-group-size applies to the 4-bit schemes ({', '.join(GROUPED_SCHEMES)}), "
                          f"not to {scheme}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise PolicyError(f"--quant-group-size must be an even integer >= 2, got {group_size!r}")
