"""snapmla on PyTorch CUDA tensors (the sm90 kernels).

Skipped (reported as skipped, not passed) unless PyTorch, a compute capability
9.x GPU and a CUDA build of snapmla are all present. The oracle is a plain
PyTorch float64 MLA decode written here over the unpaged keys.
"""

import math

import pytest

import snapmla

try:
    import torch
except ImportError:  # CPU-only machines: every test below is skipped
    torch = None


def _hopper_reason():
    if torch is None:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability()[0] != 9:
        return f"needs a Hopper GPU (sm_90), found sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    if not snapmla.built_with_cuda():
        return "snapmla was built without CUDA"
    return None


SKIP_REASON = _hopper_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

PAGE = 64
DEVICE = "cuda"


def reference_decode(q, keys, softmax_scale, causal):
    """float64 MLA decode. q [b, s_q, h, 576]; keys[b] [s_k, 576]; V = keys[:, :512].

    Returns out [b, s_q, h, 512] and lse [b, h, s_q] (natural log; -inf when nothing is visible).
    """
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, 512, dtype=torch.float64, device=q.device)
    lse = torch.full((b, h, s_q), -math.inf, dtype=torch.float64, device=q.device)
    for i in range(b):
        k = keys[i].double()
        s_k = k.shape[0]
        for t in range(s_q):
            visible = max(0, min(s_k, s_k - s_q + t + 1)) if causal else s_k
            if visible == 0:
                continue
            scores = q[i, t].double() @ k[:visible].T * softmax_scale  # [h, visible]
            out[i, t] = torch.softmax(scores, dim=-1) @ k[:visible, :512]
            lse[i, :, t] = torch.logsumexp(scores, dim=-1)
    return out, lse


def rel_l2(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def cosine(got, ref):
    return torch.nn.functional.cosine_similarity(got.double().flatten(), ref.double().flatten(), dim=0).item()


def make_batch(gen, seqlens, num_pages, max_pages=None, scale=0.5):
    """Random keys (float32) per sequence over randomly permuted pages; slots per token."""
    max_pages = max_pages or max(1, max(math.ceil(s / PAGE) for s in seqlens))
    pages = torch.randperm(num_pages, generator=gen)
    block_table = torch.zeros(len(seqlens), max_pages, dtype=torch.int32)
    used, keys, slots = 0, [], []
    for i, s_k in enumerate(seqlens):
        n_pages = math.ceil(s_k / PAGE)
        block_table[i, :n_pages] = pages[used:used + n_pages].int()
        block_table[i, n_pages:] = pages[0].int()  # real pages the kernel must not read
        used += n_pages
        keys.append((torch.randn(s_k, 576, generator=gen) * scale).to(DEVICE))
        t = torch.arange(s_k)
        slots.append((block_table[i, t // PAGE] * PAGE + t % PAGE).int().to(DEVICE))
    assert used <= num_pages
    return block_table.to(DEVICE), torch.tensor(seqlens, dtype=torch.int32, device=DEVICE), keys, slots


def write_all(keys, slots, cache):
    for k, s in zip(keys, slots):
        snapmla.write_kv_cache(k[:, :512].bfloat16(), k[:, 512:].bfloat16(), s, cache)
    # What the cache holds before any fp8 rounding: the bf16 keys.
    return [k.bfloat16().float() for k in keys]


def poisoned_cache(num_pages, kv_format):
    cache = snapmla.allocate_kv_cache(num_pages, kv_format, device=DEVICE)
    if kv_format == "bf16":
        cache.normal_()  # garbage in slots nobody writes: a kernel reading them would show
    else:
        cache.nope.copy_(torch.randn(cache.nope.shape, device=DEVICE).to(torch.float8_e4m3fn))
        cache.rope.normal_()
    return cache


# (batch seqlens, s_q, h_q, causal)
SHAPES = [
    ([1], 1, 16, False),
    ([640, 64, 65, 1000], 1, 128, False),
    ([4096, 0, 129], 1, 64, False),  # an empty sequence and a long one (split-KV)
    ([300, 900], 2, 64, True),       # MTP
    ([777], 4, 32, True),
]


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("seqlens,s_q,h_q,causal", SHAPES)
def test_decode_matches_float64_reference(kv_format, seqlens, s_q, h_q, causal):
    gen = torch.Generator().manual_seed(7 + len(seqlens) * 100 + h_q)
    num_pages = sum(math.ceil(s / PAGE) for s in seqlens) + 3
    block_table, cache_seqlens, keys, slots = make_batch(gen, seqlens, num_pages)
    cache = poisoned_cache(num_pages, kv_format)
    keys = write_all(keys, slots, cache)
    q = (torch.randn(len(seqlens), s_q, h_q, 576, generator=gen) * 0.5).to(DEVICE).bfloat16()
    metadata, num_splits = snapmla.get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    assert metadata.device == q.device and metadata.dtype == torch.int32 and metadata.shape[1] == 8
    assert num_splits.shape == (len(seqlens) + 1,)

    out, lse = snapmla.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, metadata, num_splits,
                                              causal=causal)
    assert out.dtype == torch.bfloat16 and out.shape == (len(seqlens), s_q, h_q, 512) and out.device == q.device
    assert lse.dtype == torch.float32 and lse.shape == (len(seqlens), h_q, s_q)
    ref_out, ref_lse = reference_decode(q, keys, 576**-0.5, causal)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    if kv_format == "bf16":
        # bf16 inputs are the reference's inputs: the bf16 output rounding
        # (<= 2^-8 relative) and fp32 accumulation remain; FlashMLA's own bf16
        # kernel measures 2e-3 against fp32.
        assert rel_l2(out, ref_out) < 8e-3
        assert lse_err < 1e-3
    else:
        # The SnapMLA port's acceptance bar against the unquantized reference.
        assert rel_l2(out, ref_out) < 5e-2
        assert 1 - cosine(out, ref_out) < 1e-3
        assert lse_err < 2e-2
    assert torch.all(out[cache_seqlens == 0] == 0)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_decode_loop_appends_one_token_per_step(kv_format):
    """A serving loop: write each new token with write_kv_cache, then decode, every step."""
    gen = torch.Generator().manual_seed(11)
    batch, h_q, steps = 3, 128, 70  # crosses a page boundary for every sequence
    prompt = [60, 1, 200]
    max_pages = math.ceil((max(prompt) + steps) / PAGE)
    num_pages = batch * max_pages
    block_table = torch.randperm(num_pages, generator=gen).int().view(batch, max_pages).to(DEVICE)
    cache = poisoned_cache(num_pages, kv_format)
    history = [torch.empty(0, 576, device=DEVICE) for _ in range(batch)]

    def append(tokens_per_seq):
        c_kv, k_pe, slot = [], [], []
        for i, n in enumerate(tokens_per_seq):
            new = (torch.randn(n, 576, generator=gen) * 0.5).to(DEVICE).bfloat16()
            pos = torch.arange(history[i].shape[0], history[i].shape[0] + n, device=DEVICE)
            slot.append(block_table[i, pos // PAGE].long() * PAGE + pos % PAGE)
            history[i] = torch.cat([history[i], new.float()])
            c_kv.append(new[:, :512])
            k_pe.append(new[:, 512:])
        snapmla.write_kv_cache(torch.cat(c_kv), torch.cat(k_pe), torch.cat(slot).int(), cache)

    append(prompt)
    worst = 0.0
    for step in range(steps):
        append([1] * batch)
        seqlens = torch.tensor([h.shape[0] for h in history], dtype=torch.int32, device=DEVICE)
        metadata, num_splits = snapmla.get_mla_metadata(seqlens, h_q, 1)
        q = (torch.randn(batch, 1, h_q, 576, generator=gen) * 0.5).to(DEVICE).bfloat16()
        out, lse = snapmla.flash_mla_with_kvcache(q, cache, block_table, seqlens, 512, metadata, num_splits)
        if step % 10 == 0 or step == steps - 1:
            ref_out, _ = reference_decode(q, history, 576**-0.5, False)
            worst = max(worst, rel_l2(out, ref_out))
    # Same bars as test_decode_matches_float64_reference.
    assert worst < (8e-3 if kv_format == "bf16" else 5e-2)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_cuda_graph_replay_is_bitwise_identical(kv_format):
    gen = torch.Generator().manual_seed(5)
    seqlens_list = [1000, 37, 4000, 64]
    num_pages = sum(math.ceil(s / PAGE) for s in seqlens_list)
    block_table, cache_seqlens, keys, slots = make_batch(gen, seqlens_list, num_pages)
    cache = poisoned_cache(num_pages, kv_format)
    write_all(keys, slots, cache)
    q = (torch.randn(len(seqlens_list), 1, 128, 576, generator=gen) * 0.5).to(DEVICE).bfloat16()
    metadata, num_splits = snapmla.get_mla_metadata(cache_seqlens, 128, 1)

    def step():
        return snapmla.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, metadata, num_splits)

    eager_out, eager_lse = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on the capture stream, as torch requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_lse = step()
    for _ in range(2):
        graph_out.fill_(float("nan"))  # poison: the replay must overwrite every entry
        graph_lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(graph_out, eager_out)
        assert torch.equal(graph_lse, eager_lse)

    # The graph reads the live inputs: new q values give new (matching) results.
    q.copy_((torch.randn(q.shape, generator=gen) * 0.5).bfloat16())
    graph.replay()
    eager_out, eager_lse = step()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager_out)


def test_quantize_kv_cache_and_gather():
    gen = torch.Generator().manual_seed(9)
    bf16_cache = (torch.randn(5, PAGE, 1, 576, generator=gen)).to(DEVICE).bfloat16()
    fp8 = snapmla.quantize_kv_cache(bf16_cache)
    assert fp8.nope.dtype == torch.float8_e4m3fn and fp8.nope.shape == (5, PAGE, 1, 512)
    assert fp8.scale.dtype == torch.float32 and fp8.rope.dtype == torch.bfloat16
    rows = bf16_cache.view(-1, 576).float()
    scale = rows[:, :512].abs().amax(dim=1) / 448
    torch.testing.assert_close(fp8.scale.view(-1), scale, rtol=1e-6, atol=0)
    nope, pe = snapmla.gather_kv_cache(fp8, torch.arange(5 * PAGE, dtype=torch.int32, device=DEVICE))
    # Dequantization is exact up to one bf16 rounding: bf16(e4m3 * scale).
    expected_nope = (fp8.nope.view(-1, 512).float() * fp8.scale.view(-1, 1)).bfloat16()
    expected_pe = (fp8.rope.view(-1, 64).float() * fp8.scale.view(-1, 1)).bfloat16()
    assert torch.equal(nope, expected_nope)
    assert torch.equal(pe, expected_pe)
    # e4m3 rounding of the content (~2.5e-2 rms), bf16 for the rope part.
    assert rel_l2(nope, rows[:, :512]) < 4e-2
    assert rel_l2(pe, rows[:, 512:]) < 8e-3


def test_fluentllm_entry_points():
    gen = torch.Generator().manual_seed(13)
    seqlens_list = [640, 129]
    pages = sum(math.ceil(s / PAGE) for s in seqlens_list) + 1
    size = pages * PAGE
    # SGLang-FluentLLM's pool tensors: token-major, fp8 stored as uint8.
    k_lora = torch.randint(0, 120, (size, 1, 512), dtype=torch.uint8, generator=gen).to(DEVICE)
    k_scale = torch.rand(size, 1, 1, generator=gen).to(DEVICE)
    k_rope = torch.randn(size, 1, 64, generator=gen).to(DEVICE).bfloat16()
    block_table, cache_seqlens, keys, slots = make_batch(gen, seqlens_list, pages)
    for k, s in zip(keys, slots):
        snapmla.quantize_and_cache_k(k.bfloat16()[:, None, :], k_lora, k_scale, k_rope, s)
    keys = [k.bfloat16().float() for k in keys]

    # Fused-Fetch-Dequant: bf16(lora * scale), bf16(rope * scale).
    k_nope, k_pe = snapmla.dequantize_ckv_fused_indexed(k_lora, k_rope, k_scale, slots[0])
    lora = k_lora.view(torch.float8_e4m3fn)[slots[0].long(), 0].float()
    scale = k_scale[slots[0].long(), 0]
    assert torch.equal(k_nope, (lora * scale).bfloat16())
    assert torch.equal(k_pe, (k_rope[slots[0].long(), 0].float() * scale).bfloat16())
    assert rel_l2(k_nope, keys[0][:, :512]) < 4e-2

    # Fused-Q-Quant.
    q = (torch.randn(2, 1, 64, 576, generator=gen) * 0.5).to(DEVICE).bfloat16()
    q_nope, q_scale, q_rope = snapmla.quantize_ckv_per_token_head(q, 512)
    assert q_nope.dtype == torch.float8_e4m3fn and q_nope.shape == (2, 1, 64, 512)
    assert q_scale.dtype == torch.float32 and q_scale.shape == (2, 1, 64)
    assert q_rope.dtype == torch.bfloat16 and q_rope.shape == (2, 1, 64, 64)
    torch.testing.assert_close(q_scale, q[..., :512].float().abs().amax(-1) / 448, rtol=1e-6, atol=0)
    assert rel_l2(q_nope.float() * q_scale[..., None], q[..., :512]) < 4e-2
    torch.testing.assert_close(q_rope.float() * q_scale[..., None], q[..., 512:].float(), rtol=2**-7, atol=0)

    metadata, num_splits = snapmla.get_mla_metadata(cache_seqlens, 64, 1)
    out, lse = snapmla.flash_mla_ckv_fp8_per_token(q_nope, q_rope, k_lora, k_rope, q_scale, k_scale, block_table,
                                                   cache_seqlens, 512, metadata, num_splits, None, False)
    ref_out, ref_lse = reference_decode(q, keys, 576**-0.5, False)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 64, 512)
    # The SnapMLA port's acceptance bar against the unquantized reference.
    assert rel_l2(out, ref_out) < 5e-2
    assert 1 - cosine(out, ref_out) < 1e-3
    assert (lse.double() - ref_lse).abs().max().item() < 2e-2
    # SGLang's [b, s_q, h, 1] q_scale is accepted too.
    out2, _ = snapmla.flash_mla_ckv_fp8_per_token(q_nope, q_rope, k_lora, k_rope, q_scale[..., None], k_scale,
                                                  block_table, cache_seqlens, 512, metadata, num_splits)
    assert torch.equal(out2, out)


def test_errors_name_the_argument_on_cuda():
    cache = snapmla.allocate_kv_cache(2, "bf16", device=DEVICE)
    q = torch.randn(1, 1, 16, 576, device=DEVICE).bfloat16()
    block_table = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([10], dtype=torch.int32, device=DEVICE)
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 16)
    with pytest.raises(ValueError, match="argument 'cache_seqlens'"):
        snapmla.flash_mla_with_kvcache(q, cache, block_table, seqlens.cpu(), 512, metadata, num_splits)
    with pytest.raises(TypeError, match="argument 'q'"):
        snapmla.flash_mla_with_kvcache(q.half(), cache, block_table, seqlens, 512, metadata, num_splits)
    with pytest.raises(ValueError, match="argument 'block_table'"):
        snapmla.flash_mla_with_kvcache(q, cache, torch.full_like(block_table, 7), seqlens, 512, metadata,
                                       num_splits)
