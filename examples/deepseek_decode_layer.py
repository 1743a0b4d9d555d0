"""One MLA decode layer of DeepSeek-V3's shape (128 heads, 512 latent + 64 RoPE dims):
snapmla's fp8 cache against the bf16 cache, on one Hopper GPU.

Prints the median time per call (torch.cuda.Event) of each step of a decode
layer and the relative error of the fp8 output against the bf16 one.

    python examples/deepseek_decode_layer.py --batch 64 --context 4096
"""

import argparse
import math

import torch

import snapmla

HEADS = 128
PAGE = 64


def median_ms(fn, warmup=5, iters=30):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096, help="tokens already cached per sequence")
    parser.add_argument("--s-q", type=int, default=1, help="query tokens per sequence (2+ = MTP, causal)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not snapmla.hopper_available():
        raise SystemExit("needs a Hopper GPU and a CUDA build of snapmla")

    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    batch, s_k, s_q = args.batch, args.context, args.s_q
    pages_per_seq = math.ceil(s_k / PAGE)
    num_pages = batch * pages_per_seq
    block_table = torch.randperm(num_pages, device=dev, dtype=torch.int64).int().view(batch, pages_per_seq)
    cache_seqlens = torch.full((batch,), s_k, dtype=torch.int32, device=dev)

    # The latent cache as a model writes it: c_kv (content) and k_pe (RoPE keys,
    # with the wider range the SnapMLA paper measures on the RoPE part).
    tokens = torch.arange(s_k, device=dev)
    slots = (block_table[:, tokens // PAGE].long() * PAGE + tokens % PAGE).reshape(-1).int()
    c_kv = torch.randn(batch * s_k, 512, device=dev, dtype=torch.bfloat16)
    k_pe = torch.randn(batch * s_k, 64, device=dev, dtype=torch.bfloat16) * 4
    bf16_cache = snapmla.allocate_kv_cache(num_pages, "bf16", device=dev)
    fp8_cache = snapmla.allocate_kv_cache(num_pages, "fp8", device=dev)
    snapmla.write_kv_cache(c_kv, k_pe, slots, bf16_cache)
    snapmla.write_kv_cache(c_kv, k_pe, slots, fp8_cache)

    q = torch.randn(batch, s_q, HEADS, 576, device=dev, dtype=torch.bfloat16)
    causal = s_q > 1
    metadata, num_splits = snapmla.get_mla_metadata(cache_seqlens, s_q * HEADS, 1)

    def decode(cache):
        return snapmla.flash_mla_with_kvcache(q, cache, block_table, cache_seqlens, 512, metadata, num_splits,
                                              causal=causal, check_indices=False)

    def decode_fluentllm():
        q_nope, q_scale, q_rope = snapmla.quantize_ckv_per_token_head(q, 512)
        return snapmla.flash_mla_ckv_fp8_per_token(q_nope, q_rope, fp8_cache.nope, fp8_cache.rope, q_scale,
                                                   fp8_cache.scale, block_table, cache_seqlens, 512, metadata,
                                                   num_splits, None, causal, check_indices=False)

    new_slots = slots.view(batch, s_k)[:, -1].contiguous()  # one new token per sequence
    new_c_kv, new_k_pe = c_kv.view(batch, s_k, 512)[:, -1], k_pe.view(batch, s_k, 64)[:, -1]

    out_bf16, lse_bf16 = decode(bf16_cache)
    out_fp8, lse_fp8 = decode(fp8_cache)
    out_sg, _ = decode_fluentllm()
    rel = ((out_fp8.float() - out_bf16.float()).norm() / out_bf16.float().norm()).item()
    rel_sg = ((out_sg.float() - out_bf16.float()).norm() / out_bf16.float().norm()).item()
    lse_err = (lse_fp8 - lse_bf16).abs().max().item()

    timings = {
        "decode, bf16 cache": median_ms(lambda: decode(bf16_cache)),
        "decode, fp8 cache": median_ms(lambda: decode(fp8_cache)),
        "quantize q + decode, fp8 (SGLang-FluentLLM calls)": median_ms(decode_fluentllm),
        "write 1 token/seq, bf16 cache": median_ms(
            lambda: snapmla.write_kv_cache(new_c_kv, new_k_pe, new_slots, bf16_cache)),
        "write 1 token/seq, fp8 cache": median_ms(
            lambda: snapmla.write_kv_cache(new_c_kv, new_k_pe, new_slots, fp8_cache)),
    }

    print(f"DeepSeek-V3 MLA decode layer on {torch.cuda.get_device_name()}: batch {batch}, context {s_k}, "
          f"s_q {s_q}, {HEADS} heads, 512+64 dims")
    for name, ms in timings.items():
        print(f"  {name:<52s} {ms * 1000:9.1f} us")
    for fmt in ("bf16", "fp8"):
        gbytes = batch * s_k * snapmla.kv_cache_bytes_per_page(fmt) / PAGE / 1e9
        ms = timings[f"decode, {fmt} cache"]
        print(f"  {fmt} cache: {gbytes * 1e3:8.1f} MB read per call, {gbytes / (ms / 1e3):7.0f} GB/s")
    print(f"  speed-up fp8 vs bf16: {timings['decode, bf16 cache'] / timings['decode, fp8 cache']:.2f}x")
    print(f"  relative error of the fp8 output vs bf16: {rel:.4f} (pre-quantized q: {rel_sg:.4f}); "
          f"max |lse diff| {lse_err:.2e}")


if __name__ == "__main__":
    main()
