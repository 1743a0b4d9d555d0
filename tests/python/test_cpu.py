"""snapmla's Python API on numpy arrays (the CPU backend); needs numpy only.

The oracle is a float64 MLA decode written here over the unpaged keys, so the
paging, the bf16/fp8 handling and the Python glue are all under test.
"""

import math

import numpy as np
import pytest

import snapmla

PAGE = 64
RNG_SEED = 20260211


@pytest.fixture
def rng():
    return np.random.default_rng(RNG_SEED)


def bf16(values):
    """float32 -> (bf16 bits, the float32 values those bits hold)."""
    bits = snapmla.bf16_from_float(values)
    return bits, snapmla.float_from_bf16(bits)


def reference_decode(q, keys, softmax_scale, causal):
    """float64 MLA decode. q [b, s_q, h, 576]; keys[b] [s_k, 576]; V = keys[:, :512].

    Returns out [b, s_q, h, 512] and lse [b, h, s_q] (natural log, -inf when nothing is visible).
    """
    b, s_q, h, _ = q.shape
    out = np.zeros((b, s_q, h, 512))
    lse = np.full((b, h, s_q), -np.inf)
    for i in range(b):
        k = keys[i].astype(np.float64)
        s_k = k.shape[0]
        for t in range(s_q):
            visible = max(0, min(s_k, s_k - s_q + t + 1)) if causal else s_k
            if visible == 0:
                continue
            scores = q[i, t].astype(np.float64) @ k[:visible].T * softmax_scale  # [h, visible]
            m = scores.max(axis=1, keepdims=True)
            p = np.exp(scores - m)
            total = p.sum(axis=1, keepdims=True)
            out[i, t] = (p / total) @ k[:visible, :512]
            lse[i, :, t] = (m + np.log(total))[:, 0]
    return out, lse


def make_batch(rng, seqlens, num_pages, scale=0.5):
    """Random keys per sequence, scattered over randomly permuted pages."""
    seqlens = np.asarray(seqlens, dtype=np.int32)
    max_pages = max(1, max(math.ceil(s / PAGE) for s in seqlens))
    pages = rng.permutation(num_pages)
    block_table = np.zeros((len(seqlens), max_pages), dtype=np.int32)
    used = 0
    keys, slots = [], []
    for i, s_k in enumerate(seqlens):
        n_pages = math.ceil(s_k / PAGE)
        block_table[i, :n_pages] = pages[used:used + n_pages]
        # Unused table entries point at real pages too: the kernel must not read them.
        block_table[i, n_pages:] = pages[0]
        used += n_pages
        keys.append(rng.standard_normal((s_k, 576)).astype(np.float32) * scale)
        t = np.arange(s_k)
        slots.append(block_table[i, t // PAGE] * PAGE + t % PAGE)
    assert used <= num_pages
    return block_table, seqlens, keys, slots


def fill_bf16_cache(cache, keys, slots):
    """Writes keys (float32) into a bf16 cache; returns the bf16-rounded keys."""
    rounded = []
    flat = cache.reshape(-1, 576)
    for k, s in zip(keys, slots):
        bits, values = bf16(k)
        flat[s] = bits
        rounded.append(values)
    return rounded


def rel_l2(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def cosine(got, ref):
    return float(np.dot(got.ravel(), ref.ravel()) / (np.linalg.norm(got) * np.linalg.norm(ref)))


# ---- bf16 / e4m3 helpers ----

def test_bf16_from_float_rounds_to_nearest_even():
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf, -np.inf, np.finfo(np.float32).max], np.float32)
    bits = snapmla.bf16_from_float(values)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: the even neighbour (1.0) wins;
    # 1 + 3*2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: the even one is 1 + 2^-6;
    # float32 max lies above bf16 max by more than half an ulp: it rounds to inf.
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F80, 0xFF80, 0x7F80]
    nan_bits = snapmla.bf16_from_float(np.array([np.nan], np.float32))
    assert np.isnan(snapmla.float_from_bf16(nan_bits))[0]


def test_bf16_round_trip_error_is_within_half_an_ulp(rng):
    x = rng.standard_normal(10000).astype(np.float32) * 100
    back = snapmla.float_from_bf16(snapmla.bf16_from_float(x))
    # bf16 keeps 8 significant bits: half an ulp is at most 2^-8 of |x|.
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8)
    assert np.any(np.abs(back - x) > np.abs(x) * 2.0**-10)  # it did round


def test_e4m3_table_known_codes():
    codes = np.array([0x00, 0x01, 0x08, 0x38, 0x7E, 0xFE, 0x7F], np.uint8)
    values = snapmla.float_from_e4m3(codes)
    assert values[:6].tolist() == [0.0, 2.0**-9, 2.0**-6, 1.0, 448.0, -448.0]
    assert np.isnan(values[6])


# ---- metadata ----

@pytest.mark.parametrize("seqlens,q_rows", [([5], 16), ([0, 64, 65, 1000], 128), ([300] * 7, 256)])
def test_metadata_shapes(seqlens, q_rows):
    cache_seqlens = np.array(seqlens, np.int32)
    metadata, num_splits = snapmla.get_mla_metadata(cache_seqlens, q_rows, 1)
    assert metadata.dtype == np.int32 and metadata.ndim == 2 and metadata.shape[1] == 8
    assert metadata.shape[0] >= 1
    assert num_splits.dtype == np.int32 and num_splits.shape == (len(seqlens) + 1,)
    assert num_splits[0] == 0
    assert np.all(np.diff(num_splits) >= 0)


# ---- decode ----

@pytest.mark.parametrize("batch_seqlens,s_q,h_q,causal", [
    ([1], 1, 16, False),
    ([200, 64, 129], 1, 16, False),
    ([150, 0, 70], 2, 8, True),   # MTP with a causal mask and an empty sequence
    ([97], 4, 4, True),
])
def test_decode_bf16_matches_float64_reference(rng, batch_seqlens, s_q, h_q, causal):
    block_table, seqlens, keys, slots = make_batch(rng, batch_seqlens, num_pages=12)
    cache = snapmla.allocate_kv_cache(12, "bf16")
    cache[...] = snapmla.bf16_from_float(rng.standard_normal(cache.shape).astype(np.float32))  # not zeros
    keys = fill_bf16_cache(cache, keys, slots)
    q_bits, q = bf16(rng.standard_normal((len(seqlens), s_q, h_q, 576)).astype(np.float32) * 0.5)
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, s_q * h_q, 1)

    out, lse = snapmla.flash_mla_with_kvcache(q_bits, cache, block_table, seqlens, 512, metadata, num_splits,
                                              causal=causal)
    assert out.dtype == np.uint16 and out.shape == (len(seqlens), s_q, h_q, 512)
    assert lse.dtype == np.float32 and lse.shape == (len(seqlens), h_q, s_q)
    ref_out, ref_lse = reference_decode(q, keys, 576**-0.5, causal)
    got = snapmla.float_from_bf16(out).astype(np.float64)
    # The inputs are exactly the reference's (bf16 values); what remains is the
    # bf16 rounding of the output: at most 2^-8 = 3.9e-3 relative per entry
    # (about a third of that in rms), so 4e-3 cannot be met by a wrong result.
    assert rel_l2(got, ref_out) < 4e-3
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    assert np.max(np.abs(lse[finite] - ref_lse[finite])) < 1e-4
    empty = seqlens == 0
    assert np.all(got[empty] == 0)


def test_decode_softmax_scale_is_used(rng):
    block_table, seqlens, keys, slots = make_batch(rng, [100], num_pages=2)
    cache = snapmla.allocate_kv_cache(2, "bf16")
    keys = fill_bf16_cache(cache, keys, slots)
    q_bits, q = bf16(rng.standard_normal((1, 1, 8, 576)).astype(np.float32))
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 8)
    out, lse = snapmla.flash_mla_with_kvcache(q_bits, cache, block_table, seqlens, 512, metadata, num_splits,
                                              softmax_scale=0.1)
    ref_out, ref_lse = reference_decode(q, keys, 0.1, False)
    assert rel_l2(snapmla.float_from_bf16(out), ref_out) < 4e-3
    assert np.max(np.abs(lse - ref_lse)) < 1e-4


@pytest.mark.parametrize("h_q,s_q", [(16, 1), (8, 2)])
def test_decode_fp8_cache_matches_reference_on_unquantized_keys(rng, h_q, s_q):
    block_table, seqlens, keys, slots = make_batch(rng, [300, 33], num_pages=8)
    fp8 = snapmla.allocate_kv_cache(8, "fp8")
    for k, s in zip(keys, slots):
        snapmla.write_kv_cache(k[:, :512], k[:, 512:], s.astype(np.int32), fp8)
    q_bits, q = bf16(rng.standard_normal((2, s_q, h_q, 576)).astype(np.float32) * 0.5)
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, s_q * h_q)
    out, lse = snapmla.flash_mla_with_kvcache(q_bits, fp8, block_table, seqlens, 512, metadata, num_splits,
                                              causal=True)
    ref_out, ref_lse = reference_decode(q, keys, 576**-0.5, True)
    got = snapmla.float_from_bf16(out)
    # e4m3 keeps 3 mantissa bits (<= 6.25% relative rounding per value, ~2-3% rms):
    # the SnapMLA port's acceptance bar against the unquantized reference is
    # rel-L2 <= 5e-2, cosine distance <= 1e-3, |lse error| <= 2e-2.
    assert rel_l2(got, ref_out) < 5e-2
    assert 1 - cosine(got, ref_out) < 1e-3
    assert np.max(np.abs(lse - ref_lse)) < 2e-2


def test_quantize_kv_cache_keeps_the_tokens(rng):
    cache = snapmla.allocate_kv_cache(3, "bf16")
    bits, values = bf16(rng.standard_normal((3 * PAGE, 576)).astype(np.float32))
    cache[...] = bits.reshape(cache.shape)
    fp8 = snapmla.quantize_kv_cache(cache)
    assert isinstance(fp8, snapmla.FP8KVCache) and fp8.num_pages == 3
    nope, pe = snapmla.gather_kv_cache(fp8, np.arange(3 * PAGE, dtype=np.int32))
    back = np.concatenate([snapmla.float_from_bf16(nope), snapmla.float_from_bf16(pe)], axis=1)
    # Per-token scale amax/448 keeps normal values within e4m3's relative rounding
    # (2^-4 worst, ~2.5e-2 rms) plus the bf16 rounding of the gathered result.
    assert rel_l2(back, values) < 0.04


# ---- the fp8 cache write / gather ----

def nearest_e4m3_magnitude(x):
    """The e4m3 magnitudes nearest to |x| (both neighbours when |x| sits halfway)."""
    grid = np.unique(np.abs(snapmla.float_from_e4m3(np.arange(0, 0x7F, dtype=np.uint8))))
    a = np.minimum(np.abs(x), 448.0)
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    return grid[hi - 1], grid[hi], a


@pytest.mark.parametrize("input_dtype", ["float32", "bfloat16"])
def test_fp8_write_gather_round_trip(rng, input_dtype):
    pages = 3
    fp8 = snapmla.allocate_kv_cache(pages, "fp8")
    untouched = [t.copy() for t in fp8]
    n = 90
    c_kv = rng.standard_normal((n, 512)).astype(np.float32) * rng.uniform(0.01, 10, (n, 1)).astype(np.float32)
    k_pe = rng.standard_normal((n, 64)).astype(np.float32) * 100  # RoPE spans a wider range
    c_kv[3] = 0  # an all-zero token gets scale 1
    if input_dtype == "bfloat16":
        c_bits, c_kv = bf16(c_kv)
        p_bits, k_pe = bf16(k_pe)
        c_arg, p_arg = c_bits, p_bits
    else:
        c_arg, p_arg = c_kv, k_pe
    slots = rng.permutation(pages * PAGE)[:n].astype(np.int32)
    slots[7] = -1  # skipped
    snapmla.write_kv_cache(c_arg, p_arg, slots, fp8)

    written = slots >= 0
    nope = fp8.nope.reshape(-1, 512)
    scale = fp8.scale.reshape(-1)
    rope = fp8.rope.reshape(-1, 64)
    s = scale[slots[written]]
    amax = np.abs(c_kv[written]).max(axis=1)
    expected_scale = np.where(amax > 0, amax / np.float32(448), 1).astype(np.float32)
    np.testing.assert_allclose(s, expected_scale, rtol=1e-6)
    assert s[list(np.flatnonzero(written)).index(3)] == 1.0

    # Each stored code is a nearest e4m3 value of c_kv / scale.
    stored = snapmla.float_from_e4m3(nope[slots[written]])
    lo, hi, target = nearest_e4m3_magnitude(c_kv[written] / s[:, None])
    err = np.abs(np.abs(stored) - target)
    assert np.all(err <= np.minimum(np.abs(lo - target), np.abs(hi - target)) * (1 + 1e-6) + 1e-12)
    assert np.all((np.sign(stored) == np.sign(c_kv[written])) | (stored == 0))
    # rope = bf16(k_pe / scale): within bf16's half ulp.
    rope_values = snapmla.float_from_bf16(rope[slots[written]])
    np.testing.assert_allclose(rope_values, k_pe[written] / s[:, None], rtol=2.0**-8, atol=0)

    # Slots not written keep their contents.
    other = np.setdiff1d(np.arange(pages * PAGE), slots[written])
    assert np.array_equal(nope[other], untouched[0].reshape(-1, 512)[other])
    assert np.array_equal(scale[other], untouched[1].reshape(-1)[other])

    # The gather dequantizes exactly: bf16(e4m3 * scale) and bf16(rope * scale).
    g_nope, g_pe = snapmla.gather_kv_cache(fp8, slots[written])
    assert np.array_equal(g_nope, snapmla.bf16_from_float(stored * s[:, None]))
    assert np.array_equal(g_pe, snapmla.bf16_from_float(rope_values * s[:, None]))


def rotate(k_pe, positions, cos_sin, style):
    cos = cos_sin[positions, :32].astype(np.float64)
    sin = cos_sin[positions, 32:].astype(np.float64)
    x = k_pe.astype(np.float64)
    if style == "interleaved":
        a, b = x[:, 0::2], x[:, 1::2]
        out = np.empty_like(x)
        out[:, 0::2] = a * cos - b * sin
        out[:, 1::2] = a * sin + b * cos
    else:
        a, b = x[:, :32], x[:, 32:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)
    return out


@pytest.mark.parametrize("style", ["interleaved", "neox"])
def test_write_applies_rope(rng, style):
    cache = snapmla.allocate_kv_cache(2, "bf16")
    n = 20
    c_kv = rng.standard_normal((n, 512)).astype(np.float32)
    k_pe = rng.standard_normal((n, 64)).astype(np.float32)
    angles = np.outer(np.arange(1000), 10000.0 ** (-np.arange(32) / 32))
    cos_sin = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    positions = rng.integers(0, 1000, n).astype(np.int64)
    slots = np.arange(n, dtype=np.int32) * 3
    snapmla.write_kv_cache(c_kv, k_pe, slots, cache, rope=style, positions=positions, cos_sin=cos_sin)
    stored = snapmla.float_from_bf16(cache.reshape(-1, 576)[slots])
    expected = rotate(k_pe, positions, cos_sin, style)
    # Rotation in float32 then one bf16 rounding (<= 2^-8 relative) of values of magnitude ~1.
    np.testing.assert_allclose(stored[:, 512:], expected, rtol=2.0**-8, atol=1e-5)
    np.testing.assert_allclose(stored[:, :512], c_kv, rtol=2.0**-8, atol=0)
    other_style = "neox" if style == "interleaved" else "interleaved"
    assert not np.allclose(stored[:, 512:], rotate(k_pe, positions, cos_sin, other_style), rtol=1e-2, atol=1e-2)


# ---- SGLang-FluentLLM entry points on numpy ----

def test_fluentllm_entry_points(rng):
    pages = 7
    size = pages * PAGE
    # SGLang-FluentLLM's token-major pool tensors: fp8 stored as uint8.
    k_lora = np.zeros((size, 1, 512), np.uint8)
    k_scale = np.ones((size, 1, 1), np.float32)
    k_rope = np.zeros((size, 1, 64), np.uint16)
    block_table, seqlens, keys, slots = make_batch(rng, [130, 250], num_pages=pages, scale=1.0)
    for k, s in zip(keys, slots):
        key_bits, _ = bf16(k)
        snapmla.quantize_and_cache_k(key_bits[:, None, :], k_lora, k_scale, k_rope, s.astype(np.int32))
    keys = [bf16(k)[1] for k in keys]

    # Fused-Fetch-Dequant returns the keys (within fp8 rounding).
    k_nope, k_pe = snapmla.dequantize_ckv_fused_indexed(k_lora, k_rope, k_scale, slots[1].astype(np.int32))
    assert k_nope.shape == (250, 512) and k_pe.shape == (250, 64)
    assert rel_l2(snapmla.float_from_bf16(k_nope), keys[1][:, :512]) < 0.04
    assert rel_l2(snapmla.float_from_bf16(k_pe), keys[1][:, 512:]) < 2e-3  # rope stays bf16

    q_bits, q = bf16(rng.standard_normal((2, 1, 16, 576)).astype(np.float32) * 0.5)
    q_nope, q_scale, q_rope = snapmla.quantize_ckv_per_token_head(q_bits, 512)
    assert q_nope.dtype == np.uint8 and q_nope.shape == (2, 1, 16, 512)
    assert q_scale.dtype == np.float32 and q_scale.shape == (2, 1, 16)
    assert q_rope.dtype == np.uint16 and q_rope.shape == (2, 1, 16, 64)
    np.testing.assert_allclose(q_scale, np.abs(q[..., :512]).max(axis=-1) / 448, rtol=1e-6)
    deq = snapmla.float_from_e4m3(q_nope) * q_scale[..., None]
    assert rel_l2(deq, q[..., :512]) < 0.04
    np.testing.assert_allclose(snapmla.float_from_bf16(q_rope) * q_scale[..., None], q[..., 512:], rtol=2.0**-7)

    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 16, 1)
    out, lse = snapmla.flash_mla_ckv_fp8_per_token(q_nope, q_rope, k_lora, k_rope, q_scale, k_scale, block_table,
                                                   seqlens, 512, metadata, num_splits, None, False)
    ref_out, ref_lse = reference_decode(q, keys, 576**-0.5, False)
    got = snapmla.float_from_bf16(out)
    # Same bar as the fp8 cache test above (the port's acceptance tolerances).
    assert rel_l2(got, ref_out) < 5e-2
    assert 1 - cosine(got, ref_out) < 1e-3
    assert np.max(np.abs(lse - ref_lse)) < 2e-2

    # The FlashMLA-style call reads the same SGLang-shaped cache tensors.
    out2, lse2 = snapmla.flash_mla_with_kvcache(q_bits, (k_lora, k_scale, k_rope), block_table, seqlens, 512,
                                                metadata, num_splits)
    assert rel_l2(snapmla.float_from_bf16(out2), ref_out) < 5e-2
    assert np.max(np.abs(lse2 - ref_lse)) < 2e-2


# ---- errors name the argument ----

@pytest.fixture
def small_problem(rng):
    block_table, seqlens, keys, slots = make_batch(rng, [70, 10], num_pages=4)
    cache = snapmla.allocate_kv_cache(4, "bf16")
    fill_bf16_cache(cache, keys, slots)
    q = snapmla.bf16_from_float(rng.standard_normal((2, 1, 16, 576)).astype(np.float32))
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 16)
    return dict(q=q, k_cache=cache, block_table=block_table, cache_seqlens=seqlens, head_dim_v=512,
                tile_scheduler_metadata=metadata, num_splits=num_splits)


@pytest.mark.parametrize("change,error,argument", [
    (dict(q="float32"), TypeError, "q"),
    (dict(q="not a tensor"), TypeError, "q"),
    (dict(q="rank5"), ValueError, "q"),
    (dict(q="wide"), ValueError, "q"),
    (dict(block_table="float"), TypeError, "block_table"),
    (dict(block_table="short"), ValueError, "cache_seqlens"),
    (dict(block_table="out_of_range"), ValueError, "block_table"),
    (dict(cache_seqlens="long"), ValueError, "cache_seqlens"),
    (dict(head_dim_v=256), ValueError, "head_dim_v"),
    (dict(num_splits="wrong_batch"), ValueError, "num_splits"),
    (dict(k_cache="float32"), TypeError, "k_cache"),
    (dict(k_cache="pair"), ValueError, "k_cache"),
    (dict(k_cache="bad_page_size"), ValueError, "k_cache"),
    (dict(kv_format="fp16"), ValueError, "kv_format"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
])
def test_decode_errors_name_the_argument(small_problem, change, error, argument):
    args = dict(small_problem)
    key, value = next(iter(change.items()))
    q, cache = args["q"], args["k_cache"]
    replacements = {
        ("q", "float32"): snapmla.float_from_bf16(q),
        ("q", "not a tensor"): [[1.0, 2.0]],
        ("q", "rank5"): q[None],
        ("q", "wide"): np.zeros((2, 1, 16, 600), np.uint16),
        ("block_table", "float"): args["block_table"].astype(np.float32),
        ("block_table", "short"): np.ascontiguousarray(args["block_table"][:, :1]),
        ("block_table", "out_of_range"): np.full_like(args["block_table"], 4),
        ("cache_seqlens", "long"): np.array([70, 10_000], np.int32),
        ("num_splits", "wrong_batch"): np.zeros(7, np.int32),
        ("k_cache", "float32"): snapmla.float_from_bf16(cache),
        ("k_cache", "pair"): (cache, cache),
        ("k_cache", "bad_page_size"): cache.reshape(8, 32, 1, 576),
    }
    args[key] = replacements.get((key, value), value)
    if key == "kv_format":
        args["kv_format"] = value
    with pytest.raises(error, match=f"argument '{argument}'"):
        snapmla.flash_mla_with_kvcache(**args)


def test_write_refuses_a_read_only_cache(tmp_path):
    # A read-only memory map must be refused, not written through (or crashed on).
    path = tmp_path / "cache.npy"
    np.save(path, snapmla.allocate_kv_cache(1, "bf16"))
    read_only = np.load(path, mmap_mode="r")
    with pytest.raises(ValueError, match="argument 'cache'.*read-only"):
        snapmla.write_kv_cache(np.ones((1, 512), np.float32), np.ones((1, 64), np.float32),
                               np.array([0], np.int32), read_only)


def test_write_refuses_rope_data_without_a_rope_style():
    cache = snapmla.allocate_kv_cache(1, "bf16")
    with pytest.raises(ValueError, match="argument 'rope'"):
        snapmla.write_kv_cache(np.ones((1, 512), np.float32), np.ones((1, 64), np.float32),
                               np.array([0], np.int32), cache, positions=np.array([3], np.int32),
                               cos_sin=np.ones((8, 64), np.float32))


def test_metadata_errors_name_the_argument():
    with pytest.raises(ValueError, match="argument 'num_heads_k'"):
        snapmla.get_mla_metadata(np.array([5], np.int32), 16, 2)
    with pytest.raises(TypeError, match="argument 'cache_seqlens'"):
        snapmla.get_mla_metadata(np.array([5], np.int64), 16, 1)
    with pytest.raises(ValueError, match="argument 'cache_seqlens'"):
        snapmla.get_mla_metadata(np.array([[5]], np.int32), 16, 1)
    with pytest.raises(ValueError, match="argument 'q_rows'"):
        snapmla.get_mla_metadata(np.array([5], np.int32), 1024, 1)


def test_cache_errors_name_the_argument(rng):
    fp8 = snapmla.allocate_kv_cache(2, "fp8")
    c_kv = rng.standard_normal((4, 512)).astype(np.float32)
    k_pe = rng.standard_normal((4, 64)).astype(np.float32)
    slots = np.arange(4, dtype=np.int32)
    with pytest.raises(ValueError, match="argument 'c_kv'"):
        snapmla.write_kv_cache(c_kv[:, :500], k_pe, slots, fp8)
    with pytest.raises(ValueError, match="argument 'k_pe'"):
        snapmla.write_kv_cache(c_kv, k_pe[:3], slots, fp8)
    with pytest.raises(TypeError, match="argument 'slot_mapping'"):
        snapmla.write_kv_cache(c_kv, k_pe, slots.astype(np.float32), fp8)
    with pytest.raises(ValueError, match="argument 'slot_mapping'"):
        snapmla.write_kv_cache(c_kv, k_pe, np.array([0, 1, 2, 2 * PAGE], np.int32), fp8)
    with pytest.raises(ValueError, match="argument 'rope'"):
        snapmla.write_kv_cache(c_kv, k_pe, slots, fp8, rope="yarn")
    with pytest.raises(ValueError, match="argument 'positions'"):
        snapmla.write_kv_cache(c_kv, k_pe, slots, fp8, rope="neox",
                               cos_sin=np.zeros((8, 64), np.float32))
    with pytest.raises(TypeError, match="argument 'cache.scale'"):
        snapmla.write_kv_cache(c_kv, k_pe, slots, fp8._replace(scale=fp8.scale.astype(np.float64)))
    bad = c_kv.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="argument 'c_kv'"):
        snapmla.write_kv_cache(bad, k_pe, slots, fp8)
    with pytest.raises(ValueError, match="argument 'kv_format'"):
        snapmla.allocate_kv_cache(2, "int4")
    with pytest.raises(ValueError, match="argument 'bf16_cache'"):
        snapmla.quantize_kv_cache(np.zeros((2, 32, 1, 576), np.uint16))
    with pytest.raises(ValueError, match="argument 'k_lora_cache'"):
        snapmla.quantize_and_cache_k(np.zeros((4, 1, 576), np.uint16), np.zeros((100, 1, 512), np.uint8),
                                     np.ones((128, 1, 1), np.float32), np.zeros((128, 1, 64), np.uint16), slots)
    with pytest.raises(TypeError, match="argument 'k_scale_cache'"):
        snapmla.dequantize_ckv_fused_indexed(np.zeros((128, 1, 512), np.uint8), np.zeros((128, 1, 64), np.uint16),
                                             np.ones((128, 1, 1), np.float64), slots)


def test_kv_cache_bytes_per_page():
    assert snapmla.kv_cache_bytes_per_page("bf16") == 64 * 576 * 2
    assert snapmla.kv_cache_bytes_per_page("fp8") == 64 * (512 + 4 + 128)
    fp8 = snapmla.allocate_kv_cache(3, "fp8")
    assert sum(t.nbytes for t in fp8) == 3 * snapmla.kv_cache_bytes_per_page("fp8")
    assert snapmla.allocate_kv_cache(3, "bf16").nbytes == 3 * snapmla.kv_cache_bytes_per_page("bf16")


def test_numpy_ml_dtypes_arrays_are_accepted():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    gen = np.random.default_rng(3)
    keys = gen.standard_normal((64, 576)).astype(ml_dtypes.bfloat16)
    cache = snapmla.allocate_kv_cache(1, "fp8")
    snapmla.write_kv_cache(keys[:, :512], keys[:, 512:], np.arange(64, dtype=np.int32), cache)
    q = gen.standard_normal((1, 1, 8, 576)).astype(ml_dtypes.bfloat16)
    seqlens = np.array([64], np.int32)
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 8)
    out, _ = snapmla.flash_mla_with_kvcache(q, cache, np.zeros((1, 1), np.int32), seqlens, 512, metadata, num_splits)
    assert out.dtype == ml_dtypes.bfloat16  # outputs keep the caller's bfloat16 type
    scores = q[0, 0].astype(np.float64) @ keys.astype(np.float64).T * 576**-0.5
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ keys.astype(np.float64)[:, :512]
    assert rel_l2(out[0, 0].astype(np.float64), ref) < 5e-2  # fp8 cache: the port's bar
