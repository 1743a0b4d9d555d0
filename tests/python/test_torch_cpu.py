"""snapmla on PyTorch CPU tensors: the torch glue (DLPack capsules, bf16/fp8
dtypes, outputs allocated with torch) without a GPU. Skipped without PyTorch.
"""

import pytest

import snapmla

torch = pytest.importorskip("torch")

PAGE = 64


def reference_decode(q, keys, softmax_scale):
    """float64 MLA decode without a mask. q [b, 1, h, 576]; keys[b] [s_k, 576]."""
    outs, lses = [], []
    for i, k in enumerate(keys):
        scores = q[i, 0].double() @ k.double().T * softmax_scale
        outs.append((torch.softmax(scores, -1) @ k.double()[:, :512])[None])
        lses.append(torch.logsumexp(scores, -1)[:, None])
    return torch.stack(outs), torch.stack(lses)


def rel_l2(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(17)
    seqlens = [150, 64]
    pages = torch.randperm(6, generator=gen).int()
    block_table = torch.stack([pages[:3], pages[3:]])
    keys, slots = [], []
    for i, s_k in enumerate(seqlens):
        keys.append(torch.randn(s_k, 576, generator=gen).bfloat16().float())
        t = torch.arange(s_k)
        slots.append((block_table[i, t // PAGE] * PAGE + t % PAGE).int())
    q = (torch.randn(2, 1, 16, 576, generator=gen) * 0.5).bfloat16()
    return q, block_table, torch.tensor(seqlens, dtype=torch.int32), keys, slots


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_decode_torch_cpu(problem, kv_format):
    q, block_table, seqlens, keys, slots = problem
    cache = snapmla.allocate_kv_cache(6, kv_format, device="cpu")
    for k, s in zip(keys, slots):
        snapmla.write_kv_cache(k[:, :512].bfloat16(), k[:, 512:].bfloat16(), s, cache)
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 16, 1)
    assert metadata.dtype == torch.int32 and num_splits.shape == (3,)
    out, lse = snapmla.flash_mla_with_kvcache(q, cache, block_table, seqlens, 512, metadata, num_splits)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == (2, 1, 16, 512)
    assert lse.dtype == torch.float32 and lse.shape == (2, 16, 1)
    ref_out, ref_lse = reference_decode(q, keys, 576**-0.5)
    # bf16: only the output's bf16 rounding (<= 2^-8 relative); fp8: the SnapMLA port's bar.
    assert rel_l2(out, ref_out) < (4e-3 if kv_format == "bf16" else 5e-2)
    assert (lse.double() - ref_lse).abs().max().item() < (1e-4 if kv_format == "bf16" else 2e-2)


def test_fluentllm_torch_cpu_with_uint8_pool(problem):
    q, block_table, seqlens, keys, slots = problem
    size = 6 * PAGE
    k_lora = torch.zeros(size, 1, 512, dtype=torch.uint8)
    k_scale = torch.ones(size, 1, 1)
    k_rope = torch.zeros(size, 1, 64, dtype=torch.bfloat16)
    for k, s in zip(keys, slots):
        snapmla.quantize_and_cache_k(k.bfloat16()[:, None, :], k_lora, k_scale, k_rope, s)
    q_nope, q_scale, q_rope = snapmla.quantize_ckv_per_token_head(q, 512)
    assert q_nope.dtype == torch.float8_e4m3fn
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 16, 1)
    out, _ = snapmla.flash_mla_ckv_fp8_per_token(q_nope, q_rope, k_lora, k_rope, q_scale, k_scale, block_table,
                                                 seqlens, 512, metadata, num_splits)
    ref_out, _ = reference_decode(q, keys, 576**-0.5)
    assert rel_l2(out, ref_out) < 5e-2  # the SnapMLA port's bar against the unquantized reference
    k_nope, k_pe = snapmla.dequantize_ckv_fused_indexed(k_lora, k_rope, k_scale, slots[0])
    lora = k_lora.view(torch.float8_e4m3fn)[slots[0].long(), 0].float()
    scale = k_scale[slots[0].long(), 0]
    assert torch.equal(k_nope, (lora * scale).bfloat16())  # dequantization is one exact product + bf16 rounding


def test_torch_errors_name_the_argument(problem):
    q, block_table, seqlens, keys, slots = problem
    cache = snapmla.allocate_kv_cache(6, "bf16", device="cpu")
    metadata, num_splits = snapmla.get_mla_metadata(seqlens, 16, 1)
    with pytest.raises(TypeError, match="argument 'q'"):
        snapmla.flash_mla_with_kvcache(q.float(), cache, block_table, seqlens, 512, metadata, num_splits)
    with pytest.raises(TypeError, match="argument 'block_table'"):
        snapmla.flash_mla_with_kvcache(q, cache, block_table.long(), seqlens, 512, metadata, num_splits)
    with pytest.raises(ValueError, match="argument 'k_cache'"):
        snapmla.flash_mla_with_kvcache(q, cache[:, :32], block_table, seqlens, 512, metadata, num_splits)
    with pytest.raises(TypeError, match="argument 'k_cache'"):
        snapmla.flash_mla_with_kvcache(q, cache.half(), block_table, seqlens, 512, metadata, num_splits)

