"""SGLang-FluentLLM's kernel names and argument order (its `flash_mla_fp8` module).

SGLang-FluentLLM keeps one layer's fp8 cache as three token-major tensors of
[size, 1, dim] (size a multiple of 64; the lora part often as uint8). They are
accepted as they are and viewed as [size / 64, 64, 1, dim] pages.
"""

from __future__ import annotations

from . import _C
from . import _tensors as T
from ._tensors import BF16, FP8, argument_error
from .api import HEAD_DIM, NOPE_DIM, ROPE_DIM, _cache_arrays, _check_head_dim_v, _decode, gather_kv_cache, write_kv_cache


def quantize_ckv_per_token_head(q, head_dim_v: int = NOPE_DIM):
    """Per (token, head) fp8 quantization of the absorbed query (SnapMLA's Fused-Q-Quant).

    q: [b, s_q, h, 576] bfloat16.
    Returns (q_nope [b, s_q, h, 512] float8_e4m3fn = q[..., :512] / q_scale,
             q_scale [b, s_q, h] float32 = amax(|q[..., :512]|) / 448,
             q_rope [b, s_q, h, 64] bfloat16 = q[..., 512:] / q_scale).
    numpy inputs give uint8 (e4m3 bits) and uint16 (bfloat16 bits) outputs.
    """
    _check_head_dim_v(head_dim_v)
    b, s_q, h, _ = T.shape_of(q, "q", 4)
    q_nope = T.empty(q, (b, s_q, h, NOPE_DIM), FP8)
    q_scale = T.empty(q, (b, s_q, h), "float32")
    q_rope = T.empty(q, (b, s_q, h, ROPE_DIM), BF16)
    with T.on_device(q):
        _C.quantize_query(T.as_array(q, "q", BF16), T.as_array(q_nope, "q_nope", FP8),
                          T.as_array(q_scale, "q_scale"), T.as_array(q_rope, "q_rope", BF16),
                          T.current_stream(q))
    return q_nope, q_scale, q_rope


def flash_mla_ckv_fp8_per_token(q_nope, q_rope, k_cache_lora, k_cache_rope, q_scale, k_scale, block_table,
                                cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                                softmax_scale=None, causal=False, *, check_indices=None):
    """SnapMLA decode with an fp8 query and the fp8 cache.

    q_nope:        [b, s_q, h, 512] float8_e4m3fn (or uint8 bits), from quantize_ckv_per_token_head.
    q_rope:        [b, s_q, h, 64] bfloat16.
    k_cache_lora:  [P, 64, 1, 512] float8_e4m3fn (or uint8; [P*64, 1, 512] accepted).
    k_cache_rope:  [P, 64, 1, 64] bfloat16 ([P*64, 1, 64] accepted).
    q_scale:       [b, s_q, h] float32 ([b, s_q, h, 1] accepted).
    k_scale:       [P, 64, 1, 1] float32 ([P*64, 1, 1] accepted).
    block_table [b, max_pages] int32, cache_seqlens [b] int32, head_dim_v = 512,
    tile_scheduler_metadata / num_splits from get_mla_metadata(cache_seqlens, s_q * h, 1),
    softmax_scale (default 1/sqrt(576)), causal as in flash_mla_with_kvcache.

    Returns (out [b, s_q, h, 512] bfloat16, lse [b, h, s_q] float32).
    """
    _check_head_dim_v(head_dim_v)
    b, s_q, h, _ = T.shape_of(q_nope, "q_nope", 4)
    q_scale_shape = tuple(int(s) for s in getattr(q_scale, "shape", ()))
    if len(q_scale_shape) == 4 and q_scale_shape[-1] == 1:
        q_scale = T.reshape(q_scale, q_scale_shape[:3])
    cache, renames = _cache_arrays((k_cache_lora, k_scale, k_cache_rope), "fp8", "k_cache",
                                   {"nope": "k_cache_lora", "scale": "k_scale", "rope": "k_cache_rope"})
    return _decode(q_nope, b, s_q, h, q_nope=q_nope, q_scale=q_scale, q_rope=q_rope, cache=cache, renames=renames,
                   block_table=block_table, cache_seqlens=cache_seqlens,
                   tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits,
                   softmax_scale=softmax_scale, causal=causal, check_indices=check_indices)


def _token_rows(key, name: str):
    """[N, 1, 576] or [N, 576] -> [N, 576]."""
    shape = tuple(int(s) for s in getattr(key, "shape", ()))
    if len(shape) == 3 and shape[1] == 1:
        return T.reshape(key, (shape[0], shape[2]))
    if len(shape) == 2:
        return key
    raise ValueError(argument_error(name, f"expected shape [N, 1, {HEAD_DIM}], got {list(shape)}"))


def quantize_and_cache_k(key, k_lora_cache, k_lora_scale_cache, k_rope_cache, indices, head_dim_v: int = NOPE_DIM):
    """Quantizes N new tokens and writes them at token slots `indices` (SnapMLA's Fused-K-Append).

    key:                [N, 1, 576] bfloat16 (latent c_kv in [:512], already-rotated k_pe in [512:]).
    k_lora_cache:       [P*64, 1, 512] float8_e4m3fn / uint8 (or [P, 64, 1, 512]).
    k_lora_scale_cache: [P*64, 1, 1] float32.
    k_rope_cache:       [P*64, 1, 64] bfloat16.
    indices:            [N] int32 slots (-1 skips a token).
    """
    _check_head_dim_v(head_dim_v)
    rows = _token_rows(key, "key")
    write_kv_cache(rows[:, :NOPE_DIM], rows[:, NOPE_DIM:], indices, (k_lora_cache, k_lora_scale_cache, k_rope_cache),
                   kv_format="fp8",
                   _part_names={"nope": "k_lora_cache", "scale": "k_lora_scale_cache", "rope": "k_rope_cache"})


def dequantize_ckv_fused_indexed(k_lora_cache, k_rope_cache, k_scale_cache, indices):
    """Gathers and dequantizes tokens of the fp8 cache (SnapMLA's Fused-Fetch-Dequant).

    k_lora_cache [P*64, 1, 512] fp8/uint8, k_rope_cache [P*64, 1, 64] bfloat16,
    k_scale_cache [P*64, 1, 1] float32 (page-shaped [P, 64, 1, dim] also accepted), indices [N] int32.
    Returns (k_nope [N, 512] bfloat16 = lora * scale, k_rope [N, 64] bfloat16 = rope * scale).
    """
    return gather_kv_cache((k_lora_cache, k_scale_cache, k_rope_cache), indices, kv_format="fp8",
                           _part_names={"nope": "k_lora_cache", "scale": "k_scale_cache", "rope": "k_rope_cache"})
