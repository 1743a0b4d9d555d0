"""snapmla: FP8 Multi-head Latent Attention decode (SnapMLA) for NVIDIA Hopper.

Drop-in names for FlashMLA (``get_mla_metadata``, ``flash_mla_with_kvcache``) and for
SGLang-FluentLLM's fp8 kernels (``quantize_ckv_per_token_head``,
``flash_mla_ckv_fp8_per_token``, ``quantize_and_cache_k``, ``dequantize_ckv_fused_indexed``),
plus the paged-cache helpers. Tensors are taken without a copy through DLPack:
torch CUDA tensors run the sm90 kernels on torch's current stream; CPU tensors and
numpy arrays run the CPU reference backend. numpy has no bfloat16/float8 dtypes,
so numpy arrays carry raw bits (uint16 = bfloat16, uint8 = float8_e4m3fn); see
``bf16_from_float``, ``float_from_bf16`` and ``float_from_e4m3``.

Errors name the offending argument: ValueError for shapes/values, TypeError for dtypes.
"""

from . import _C
from ._tensors import bf16_from_float, float_from_bf16, float_from_e4m3
from .api import (
    FP8KVCache,
    allocate_kv_cache,
    flash_mla_with_kvcache,
    gather_kv_cache,
    get_mla_metadata,
    kv_cache_bytes_per_page,
    quantize_kv_cache,
    write_kv_cache,
)
from .fluentllm import (
    dequantize_ckv_fused_indexed,
    flash_mla_ckv_fp8_per_token,
    quantize_and_cache_k,
    quantize_ckv_per_token_head,
)

__version__ = _C.__version__


def built_with_cuda() -> bool:
    """True when the extension was built with the sm90 CUDA kernels."""
    return bool(_C.built_with_cuda())


def hopper_available() -> bool:
    """True when a compute capability 9.x GPU can be used (False without CUDA)."""
    return bool(_C.hopper_available())


__all__ = [
    "FP8KVCache",
    "allocate_kv_cache",
    "bf16_from_float",
    "built_with_cuda",
    "dequantize_ckv_fused_indexed",
    "flash_mla_ckv_fp8_per_token",
    "flash_mla_with_kvcache",
    "float_from_bf16",
    "float_from_e4m3",
    "gather_kv_cache",
    "get_mla_metadata",
    "hopper_available",
    "kv_cache_bytes_per_page",
    "quantize_and_cache_k",
    "quantize_ckv_per_token_head",
    "quantize_kv_cache",
    "write_kv_cache",
]
