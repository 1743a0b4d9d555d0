# Bisects the Python write_kv_cache crash seen on the GPU machine.
import sys
import numpy as np
mode = sys.argv[1]
if mode != "numpy":
    import torch
import snapmla
n = 8
if mode == "numpy":
    c_kv = snapmla.bf16_from_float(np.random.randn(n, 512).astype(np.float32))
    k_pe = snapmla.bf16_from_float(np.random.randn(n, 64).astype(np.float32))
    slots = np.arange(n, dtype=np.int32)
    cache = np.zeros((2, 64, 1, 576), dtype=np.uint16)
else:
    dev = "cuda" if mode == "cuda" else "cpu"
    c_kv = torch.randn(n, 512, device=dev, dtype=torch.bfloat16)
    k_pe = torch.randn(n, 64, device=dev, dtype=torch.bfloat16)
    slots = torch.arange(n, device=dev, dtype=torch.int32)
    cache = torch.zeros(2, 64, 1, 576, device=dev, dtype=torch.bfloat16)
a = snapmla._tensors.as_array(c_kv, "c_kv", "bfloat16")
print(mode, "view:", a.dtype, getattr(a, "shape", None), flush=True)
snapmla.write_kv_cache(c_kv, k_pe, slots, cache)
print(mode, "ok", flush=True)
