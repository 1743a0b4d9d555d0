"""FlashMLA-compatible decode and the paged-cache operations.

Shapes use b = batch, s_q = query tokens per sequence (1, or up to 4 with MTP),
h_q = query heads, P = cache pages of 64 tokens, n = tokens written or read.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

from . import _C
from . import _tensors as T
from ._tensors import BF16, FP8, argument_error

PAGE_SIZE = 64
NOPE_DIM = 512
ROPE_DIM = 64
HEAD_DIM = NOPE_DIM + ROPE_DIM
HEAD_DIM_V = NOPE_DIM


class FP8KVCache(NamedTuple):
    """SnapMLA's fp8 paged cache (one layer), three planar tensors:

    nope  [P, 64, 1, 512] float8_e4m3fn  c_kv / scale
    scale [P, 64, 1, 1]   float32        amax(|c_kv|) / 448 per token (1 for an all-zero token)
    rope  [P, 64, 1, 64]  bfloat16       k_pe / scale

    A plain (nope, scale, rope) tuple works wherever one of these is expected.
    """

    nope: object
    scale: object
    rope: object

    @property
    def num_pages(self) -> int:
        return int(self.nope.shape[0])


def kv_cache_bytes_per_page(kv_format: str = "fp8") -> int:
    """Bytes one 64-token page takes in `kv_format` ("bf16": 73728, "fp8": 41216)."""
    return int(_C.kv_bytes_per_page(kv_format))


def _paged(x, dim: int, name: str):
    """[P, 64, 1, dim] as given; SGLang's token-major [S, 1, dim] or [S, dim] viewed as pages."""
    if x is None:
        return None
    shape = tuple(int(s) for s in getattr(x, "shape", ()))
    if len(shape) in (2, 3) and shape[-1] == dim and all(s == 1 for s in shape[1:-1]):
        if shape[0] % PAGE_SIZE:
            raise ValueError(argument_error(
                name, f"{shape[0]} token slots are not a whole number of {PAGE_SIZE}-token pages"))
        return T.reshape(x, (shape[0] // PAGE_SIZE, PAGE_SIZE, 1, dim))
    return x


def _is_bf16(x) -> bool:
    if T.is_torch(x):
        return x.dtype == T.torch_if_loaded().bfloat16
    dtype = getattr(x, "dtype", None)
    return dtype is not None and (getattr(dtype, "name", "") == "bfloat16" or str(dtype) == "uint16")


def _cache_arrays(cache, kv_format, name: str, part_names=None, writable=False):
    """The extension's (format, data, nope, scale, rope) from a bf16 tensor or an fp8 triple.

    writable: the call writes into the cache, so a read-only array is refused.

    Also returns how to rename the native library's argument names ("cache.nope"...) to the
    caller's, so errors name what the caller passed.
    """
    if kv_format not in (None, "bf16", "fp8"):
        raise ValueError(argument_error("kv_format", f"expected \"bf16\", \"fp8\" or None, got {kv_format!r}"))
    if isinstance(cache, (tuple, list)):
        if len(cache) != 3:
            raise ValueError(argument_error(
                name, f"an fp8 cache is a (nope, scale, rope) triple; got {len(cache)} tensors"))
        if kv_format not in (None, "fp8"):
            raise ValueError(argument_error(
                "kv_format", f"a (nope, scale, rope) cache is fp8, but kv_format={kv_format!r}"))
        names = part_names or {part: f"{name}.{part}" for part in ("nope", "scale", "rope")}
        nope, scale, rope = cache
        arrays = ("fp8", None,
                  T.as_array(_paged(nope, NOPE_DIM, names["nope"]), names["nope"], FP8, writable),
                  T.as_array(_paged(scale, 1, names["scale"]), names["scale"], None, writable),
                  T.as_array(_paged(rope, ROPE_DIM, names["rope"]), names["rope"], BF16, writable))
        return arrays, {f"cache.{part}": names[part] for part in names}
    if kv_format is None:
        if not _is_bf16(cache):
            raise TypeError(argument_error(
                name, f"a single tensor must be the bfloat16 [pages, 64, 1, 576] cache (got dtype "
                      f"{getattr(cache, 'dtype', type(cache).__name__)}); pass the fp8 cache as "
                      f"snapmla.FP8KVCache(nope, scale, rope)"))
        kv_format = "bf16"
    if kv_format != "bf16":
        raise ValueError(argument_error(
            "kv_format", f"{kv_format!r} needs k_cache as a (nope, scale, rope) triple; one tensor is bf16"))
    return ("bf16", T.as_array(_paged(cache, HEAD_DIM, name), name, BF16, writable), None, None, None), {
        "cache.data": name}


@contextlib.contextmanager
def _caller_names(renames: dict):
    """Rewrites the native library's argument names in an error to the names the caller used."""
    try:
        yield
    except (ValueError, TypeError) as error:
        message = str(error)
        renamed = message
        for native, caller in renames.items():
            renamed = renamed.replace(f"argument '{native}'", f"argument '{caller}'")
        if renamed == message:
            raise
        raise type(error)(renamed) from None


_sm_parts_cache: dict = {}


def _num_sm_parts(device: tuple[str, int], q_rows: int) -> int:
    key = (device, q_rows)
    parts = _sm_parts_cache.get(key)
    if parts is None:
        parts = int(_C.decode_num_sm_parts(device[0], device[1], q_rows))
        _sm_parts_cache[key] = parts
    return parts


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int = 1):
    """Split-KV schedule for one batch shape (FlashMLA's get_mla_metadata).

    cache_seqlens: [b] int32, tokens already in each sequence's cache.
    num_q_tokens_per_head_k: s_q * h_q (query rows per KV head; MLA has one KV head).
    num_heads_k: must be 1.

    Returns (tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [b + 1] int32),
    on cache_seqlens' device. Compute it once per decode step and share it across layers.
    """
    if int(num_heads_k) != 1:
        raise ValueError(argument_error("num_heads_k", f"MLA decode has one latent KV head; expected 1, got {num_heads_k}"))
    q_rows = int(num_q_tokens_per_head_k)
    if q_rows <= 0:
        raise ValueError(argument_error("num_q_tokens_per_head_k", f"must be positive, got {q_rows}"))
    (batch,) = T.shape_of(cache_seqlens, "cache_seqlens", 1)
    parts = _num_sm_parts(T.device_of(cache_seqlens), q_rows)
    metadata = T.empty(cache_seqlens, (parts, 8), "int32")
    num_splits = T.empty(cache_seqlens, (batch + 1,), "int32")
    with T.on_device(cache_seqlens):
        _C.get_mla_metadata(T.as_array(cache_seqlens, "cache_seqlens"), q_rows,
                            T.as_array(metadata, "tile_scheduler_metadata"),
                            T.as_array(num_splits, "num_splits"), T.current_stream(cache_seqlens))
    return metadata, num_splits


def _check_head_dim_v(head_dim_v):
    if int(head_dim_v) != HEAD_DIM_V:
        raise ValueError(argument_error("head_dim_v", f"MLA's value width is {HEAD_DIM_V}, got {head_dim_v}"))


def _decode(like, b, s_q, h_q, *, q=None, q_nope=None, q_scale=None, q_rope=None, cache, renames, block_table,
            cache_seqlens, tile_scheduler_metadata, num_splits, softmax_scale, causal, check_indices):
    if softmax_scale is not None and not float(softmax_scale) > 0:
        raise ValueError(argument_error("softmax_scale", f"must be a positive number (None: 1/sqrt(576)), "
                                                         f"got {softmax_scale}"))
    out = T.empty(like, (b, s_q, h_q, HEAD_DIM_V), BF16)
    lse = T.empty(like, (b, h_q, s_q), "float32")
    stream = T.current_stream(like)
    if check_indices is None:
        check_indices = not T.capturing(like)
    work = None
    if T.is_cuda(like) and tile_scheduler_metadata is not None:
        parts = int(tile_scheduler_metadata.shape[0])
        work = T.workspace(like, int(_C.decode_workspace_bytes(b, s_q, h_q, parts)), stream)
    with T.on_device(like), _caller_names(renames):
        _C.mla_decode(
            T.as_array(q, "q", BF16), T.as_array(q_nope, "q_nope", FP8), T.as_array(q_scale, "q_scale"),
            T.as_array(q_rope, "q_rope", BF16), *cache,
            T.as_array(block_table, "block_table"), T.as_array(cache_seqlens, "cache_seqlens"),
            0.0 if softmax_scale is None else float(softmax_scale), bool(causal),
            T.as_array(out, "out", BF16), T.as_array(lse, "lse"),
            T.as_array(tile_scheduler_metadata, "tile_scheduler_metadata"), T.as_array(num_splits, "num_splits"),
            T.as_array(work, "workspace"), bool(check_indices), stream)
    return out, lse


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits, softmax_scale=None, causal=False, kv_format=None, *, check_indices=None):
    """MLA decode over a paged cache; a drop-in for flash_mla.flash_mla_with_kvcache.

    q:             [b, s_q, h_q, 576] bfloat16 (absorbed query: 512 latent + 64 RoPE dims).
    k_cache:       bf16 cache [P, 64, 1, 576] bfloat16, or the fp8 cache as snapmla.FP8KVCache /
                   a (nope, scale, rope) tuple (see FP8KVCache). SGLang's token-major [P*64, 1, dim]
                   tensors are accepted and viewed as pages.
    block_table:   [b, max_pages] int32, page indices of each sequence.
    cache_seqlens: [b] int32, tokens in each sequence's cache (0 allowed).
    head_dim_v:    512.
    tile_scheduler_metadata, num_splits: from get_mla_metadata(cache_seqlens, s_q * h_q, 1).
    softmax_scale: default 1 / sqrt(576).
    causal:        with s_q > 1, query i sees the first s_k - s_q + i + 1 tokens.
    kv_format:     "bf16" or "fp8"; inferred from k_cache when None.
    check_indices: copy block_table/cache_seqlens to the host and check them first (a sync);
                   default: on, except while a CUDA graph is being captured.

    Returns (out [b, s_q, h_q, 512] bfloat16, lse [b, h_q, s_q] float32, natural log), allocated
    with q's library on q's device. Runs on torch's current CUDA stream (CPU arrays: the CPU backend).
    """
    _check_head_dim_v(head_dim_v)
    b, s_q, h_q, _ = T.shape_of(q, "q", 4)
    cache, renames = _cache_arrays(k_cache, kv_format, "k_cache")
    return _decode(q, b, s_q, h_q, q=q, cache=cache, renames=renames, block_table=block_table, cache_seqlens=cache_seqlens,
                   tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits,
                   softmax_scale=softmax_scale, causal=causal, check_indices=check_indices)


def write_kv_cache(c_kv, k_pe, slot_mapping, cache, rope=None, positions=None, cos_sin=None, *,
                   kv_format=None, nonfinite_count=None, _part_names=None):
    """Writes n new tokens into a paged cache in place (fp8: quantizes them, SnapMLA's Fused-K-Append).

    c_kv:         [n, 512] bfloat16 or float32, the latent (content) vectors.
    k_pe:         [n, 64] bfloat16 or float32, the RoPE keys.
    slot_mapping: [n] int32/int64 cache slots (page * 64 + row); -1 skips a token.
    cache:        bf16 [P, 64, 1, 576] tensor or an fp8 FP8KVCache / (nope, scale, rope).
    rope:         None (k_pe is already rotated), "interleaved" (DeepSeek checkpoints: pairs 2i, 2i+1)
                  or "neox" (halves i, i+32): rotate k_pe by `positions` before writing.
    positions:    [n] int32/int64 token positions (with rope).
    cos_sin:      [max_pos, 64] float32, cos in [:, :32], sin in [:, 32:] (with rope).
    nonfinite_count: optional CUDA int32 [1] counter of tokens skipped for NaN/inf values
                  (the CPU backend raises ValueError instead).
    """
    cache_arrays, renames = _cache_arrays(cache, kv_format, "cache", _part_names, writable=True)
    with T.on_device(c_kv), _caller_names(renames):
        _C.write_kv_cache(
            T.as_array(c_kv, "c_kv", BF16), T.as_array(k_pe, "k_pe", BF16),
            T.as_array(slot_mapping, "slot_mapping"), *cache_arrays, rope or "none",
            T.as_array(positions, "positions"), T.as_array(cos_sin, "cos_sin"),
            T.as_array(nonfinite_count, "nonfinite_count"), T.current_stream(c_kv))


def gather_kv_cache(cache, indices, kv_format=None, *, _part_names=None):
    """Reads tokens of a paged cache back as contiguous bfloat16 (fp8: dequantized).

    cache:   bf16 [P, 64, 1, 576] tensor or an fp8 FP8KVCache / (nope, scale, rope).
    indices: [n] int32/int64 slots.
    Returns (k_nope [n, 512] bfloat16, k_pe [n, 64] bfloat16) on the cache's device.
    """
    cache_arrays, renames = _cache_arrays(cache, kv_format, "cache", _part_names)
    (n,) = T.shape_of(indices, "indices", 1)
    k_nope = T.empty(indices, (n, NOPE_DIM), BF16)
    k_pe = T.empty(indices, (n, ROPE_DIM), BF16)
    with T.on_device(indices), _caller_names(renames):
        _C.gather_kv_cache(*cache_arrays, T.as_array(indices, "indices"), T.as_array(k_nope, "k_nope", BF16),
                           T.as_array(k_pe, "k_pe", BF16), T.current_stream(indices))
    return k_nope, k_pe


def allocate_kv_cache(num_pages: int, kv_format: str = "fp8", device=None, like=None):
    """A zeroed paged cache of `num_pages` 64-token pages (fp8 scales start at 1).

    kv_format: "bf16" -> [P, 64, 1, 576] bfloat16 tensor; "fp8" -> FP8KVCache(nope, scale, rope).
    like:      a tensor whose library (and, for torch, device) the cache uses.
    device:    a torch device ("cuda", "cuda:1", "cpu", torch.device); overrides like's device.
    With neither, the cache is numpy (bfloat16 as uint16 bits, fp8 as uint8 bits).
    """
    num_pages = int(num_pages)
    if num_pages < 0:
        raise ValueError(argument_error("num_pages", f"must be non-negative, got {num_pages}"))
    if kv_format not in ("bf16", "fp8"):
        raise ValueError(argument_error("kv_format", f"expected \"bf16\" or \"fp8\", got {kv_format!r}"))
    if device is not None:
        import torch  # only when the caller asks for a torch device

        like = torch.empty(0, device=device)
    shape = (num_pages, PAGE_SIZE, 1)
    if kv_format == "bf16":
        return T.empty(like, shape + (HEAD_DIM,), BF16, fill=0)
    return FP8KVCache(nope=T.empty(like, shape + (NOPE_DIM,), FP8, fill=0),
                      scale=T.empty(like, shape + (1,), "float32", fill=1.0),
                      rope=T.empty(like, shape + (ROPE_DIM,), BF16, fill=0))


def quantize_kv_cache(bf16_cache):
    """A bf16 [P, 64, 1, 576] cache -> a new FP8KVCache holding the same tokens (every slot)."""
    pages, page, heads, dim = T.shape_of(bf16_cache, "bf16_cache", 4)
    if (page, heads, dim) != (PAGE_SIZE, 1, HEAD_DIM):
        raise ValueError(argument_error(
            "bf16_cache", f"expected shape [*, {PAGE_SIZE}, 1, {HEAD_DIM}], got {list(bf16_cache.shape)}"))
    fp8 = allocate_kv_cache(pages, "fp8", like=bf16_cache)
    slots = pages * PAGE_SIZE
    if slots == 0:
        return fp8
    rows = T.reshape(bf16_cache, (slots, HEAD_DIM))
    write_kv_cache(rows[:, :NOPE_DIM], rows[:, NOPE_DIM:], T.arange_int32(bf16_cache, slots), fp8, kv_format="fp8")
    return fp8
