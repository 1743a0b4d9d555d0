"""Glue between array libraries and the native extension.

Every tensor goes to ``_C`` as an ``_C.Array`` (a zero-copy DLPack view). Outputs
are allocated here with the library of the inputs: ``torch.empty`` for torch
tensors (torch is only imported when the caller already uses it), numpy
otherwise. numpy has no bfloat16 or float8 dtype, so numpy arrays carry raw
bits: ``uint16`` holds bfloat16 and ``uint8`` holds float8_e4m3fn where an fp8
argument is expected. ml_dtypes' ``bfloat16``/``float8_e4m3fn`` arrays are
accepted as well (read through the same raw-bit views).
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from . import _C

BF16 = "bfloat16"
FP8 = "float8_e4m3fn"


def torch_if_loaded():
    """The torch module when the process has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    torch = torch_if_loaded()
    return torch is not None and isinstance(x, torch.Tensor)


def is_cuda(x) -> bool:
    return is_torch(x) and x.is_cuda


_to_dlpack = None


def _torch_to_dlpack():
    global _to_dlpack
    if _to_dlpack is None:
        from torch.utils.dlpack import to_dlpack

        _to_dlpack = to_dlpack
    return _to_dlpack


def argument_error(name: str, message: str) -> str:
    return f"snapmla: argument '{name}': {message}"


def as_array(x, name: str, role: str | None = None, writable: bool = False):
    """Wraps `x` for the extension; `role` (BF16 or FP8) says how raw-bit integer dtypes are read.

    writable: the call writes into `x`; a read-only numpy array (a read-only memory map, a
    view of bytes) is refused instead of being written through.

    Returns None for None (an optional argument that was not given).
    """
    if x is None:
        return None
    reinterpret = ""
    if is_torch(x):
        torch = torch_if_loaded()
        if x.dtype == torch.float8_e4m3fn:
            # Read through uint8: older torch versions refuse to export fp8 via DLPack.
            x = x.view(torch.uint8)
            reinterpret = FP8
        elif x.dtype == torch.uint8 and role == FP8:
            reinterpret = FP8  # SGLang keeps its fp8 pool as uint8
        # A capsule from to_dlpack, not Tensor.__dlpack__: some torch versions make
        # __dlpack__() without a stream argument order the default stream after the
        # current one, which breaks CUDA-graph capture; to_dlpack never touches streams.
        x = _torch_to_dlpack()(x)
    elif isinstance(x, np.ndarray):
        if writable and not x.flags.writeable:
            raise ValueError(argument_error(name, "is read-only, but this call writes into it"))
        kind = x.dtype.name
        if kind == "bfloat16":
            x = x.view(np.uint16)
            reinterpret = BF16
        elif kind == "float8_e4m3fn":
            x = x.view(np.uint8)
            reinterpret = FP8
        elif x.dtype == np.uint16:
            reinterpret = BF16
        elif x.dtype == np.uint8 and role == FP8:
            reinterpret = FP8
    elif not hasattr(x, "__dlpack__"):
        raise TypeError(argument_error(
            name, f"expected a torch.Tensor, a numpy.ndarray or an object with __dlpack__, got {type(x).__name__}"))
    try:
        return _C.Array(x, name, reinterpret)
    except TypeError as error:
        if str(error).startswith("snapmla:"):
            raise
        raise TypeError(argument_error(name, f"cannot be read through DLPack ({error})")) from None


def device_of(x) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", index)."""
    if is_cuda(x):
        return "cuda", x.device.index if x.device.index is not None else 0
    return "cpu", 0


def shape_of(x, name: str, rank: int) -> tuple[int, ...]:
    if not hasattr(x, "shape"):
        raise TypeError(argument_error(name, f"expected a tensor or array, got {type(x).__name__}"))
    shape = tuple(int(s) for s in getattr(x, "shape", ()))
    if len(shape) != rank:
        raise ValueError(argument_error(name, f"expected a rank-{rank} tensor, got shape {list(shape)}"))
    return shape


def _torch_dtype(torch, dtype: str):
    return {
        BF16: torch.bfloat16,
        FP8: torch.float8_e4m3fn,
        "float32": torch.float32,
        "int32": torch.int32,
        "uint8": torch.uint8,
    }[dtype]


def _numpy_dtype(dtype: str, like=None):
    if dtype == BF16:
        # Keep ml_dtypes' bfloat16 when the caller uses it; raw uint16 bits otherwise.
        if isinstance(like, np.ndarray) and like.dtype.name == "bfloat16":
            return like.dtype
        return np.uint16
    if dtype == FP8:
        if isinstance(like, np.ndarray) and like.dtype.name == "float8_e4m3fn":
            return like.dtype
        return np.uint8
    return np.dtype(dtype)


def empty(like, shape, dtype: str, fill=None):
    """An uninitialised (or `fill`-ed) tensor of the same library and device as `like`."""
    if is_torch(like):
        torch = torch_if_loaded()
        t = torch.empty(shape, dtype=_torch_dtype(torch, dtype), device=like.device)
        if fill is not None:
            t.fill_(fill)
        return t
    a = np.empty(shape, dtype=_numpy_dtype(dtype, like))
    if fill is not None:
        a.fill(fill)
    return a


def arange_int32(like, n: int):
    if is_torch(like):
        torch = torch_if_loaded()
        return torch.arange(n, dtype=torch.int32, device=like.device)
    return np.arange(n, dtype=np.int32)


def reshape(x, shape):
    return x.view(*shape) if is_torch(x) else x.reshape(shape)


def current_stream(x) -> int:
    """The caller's current CUDA stream for `x`'s device as an integer (0 for CPU)."""
    if is_cuda(x):
        torch = torch_if_loaded()
        return torch.cuda.current_stream(x.device).cuda_stream
    return 0


def capturing(x) -> bool:
    """Whether `x`'s device's current stream is being captured into a CUDA graph."""
    if not is_cuda(x):
        return False
    torch = torch_if_loaded()
    with torch.cuda.device(x.device):
        return bool(torch.cuda.is_current_stream_capturing())


def on_device(x):
    """Makes `x`'s GPU the current one for the call (as FlashMLA's device guard does)."""
    if is_cuda(x):
        torch = torch_if_loaded()
        if x.device.index is not None and torch.cuda.current_device() != x.device.index:
            return torch.cuda.device(x.device.index)
    return contextlib.nullcontext()


# Split-KV scratch, one buffer per (device, stream), grown to the largest size
# asked for. Eager calls reuse it (no allocation per step); inside CUDA-graph
# capture a fresh buffer comes from the graph's private pool instead, so a
# captured graph never shares scratch with eager calls on another stream.
_workspaces: dict = {}


def workspace(like, nbytes: int, stream: int):
    if not is_cuda(like) or nbytes <= 0:
        return None
    if capturing(like):
        return empty(like, (nbytes,), "uint8")
    key = (like.device.index, stream)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < nbytes:
        buffer = empty(like, (nbytes,), "uint8")
        _workspaces[key] = buffer
    return buffer[:nbytes]


# ---- numpy helpers for raw bfloat16 / float8_e4m3fn bits ----

def bf16_from_float(x) -> np.ndarray:
    """float32 values -> bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def float_from_bf16(bits) -> np.ndarray:
    """bfloat16 bits (uint16 or an ml_dtypes bfloat16 array) -> float32 values (exact)."""
    b = np.ascontiguousarray(bits)
    if b.dtype.name == "bfloat16":
        b = b.view(np.uint16)
    if b.dtype != np.uint16:
        raise TypeError(argument_error("bits", f"expected uint16 bfloat16 bits, got {b.dtype}"))
    return (b.astype(np.uint32) << 16).view(np.float32)


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    exponent = (codes >> 3) & 0xF
    mantissa = (codes & 0x7).astype(np.float64)
    normal = np.ldexp(8.0 + mantissa, exponent - 10)
    subnormal = np.ldexp(mantissa, -9)
    values = np.where(exponent == 0, subnormal, normal)
    values[(exponent == 0xF) & (codes & 0x7 == 0x7)] = np.nan
    values = np.where(codes & 0x80, -values, values)
    return values.astype(np.float32)


_E4M3_VALUES = _e4m3_table()


def float_from_e4m3(bits) -> np.ndarray:
    """float8_e4m3fn bits (uint8 or an ml_dtypes float8_e4m3fn array) -> float32 values (exact)."""
    b = np.asarray(bits)
    if b.dtype.name == "float8_e4m3fn":
        b = b.view(np.uint8)
    if b.dtype != np.uint8:
        raise TypeError(argument_error("bits", f"expected uint8 float8_e4m3fn bits, got {b.dtype}"))
    return _E4M3_VALUES[b]
