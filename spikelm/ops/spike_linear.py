"""Event-driven linear layer: y = s W^T + b for integer spikes s, reading only the weights of inputs that fired.

A dense product reads every weight for every token; at batch 1 decoding on a CPU that read is the
cost. With spikes s (integers 0..N in float storage), y = sum over the inputs j that fired of
s_j * W[:, j]: the kernel walks the non-zero entries of s and accumulates those weight columns,
each multiplied by its spike count. Batch > 1 walks the inputs that fired in any row, reading each
such column once for all rows.

Weight layout and its memory cost: nn.Linear keeps W as [out, in], where the weights of one input
are strided. The sparse paths read W^T ([in, out], row-major: one input's weights contiguous), a
copy made on the first sparse call for that weight, in the weight's dtype, and kept as long as the
weight lives; it is remade when the weight is changed in place (its version counter) or replaced.
That is one extra copy of every weight that takes the sparse path at least once: for a model whose
every linear after the embedding is spike-fed, about the model's size again (paper-137m: +563 MB
in float32, +282 MB in bfloat16; a tied LM head and embedding share one copy).

Backends, chosen per call:
- "c": csrc/spike_linear.c, built on first use by ops/cbuild.py (float32 or bfloat16 weights,
  float32 accumulation; SIMD over output features, OpenMP over output tiles where there is enough work).
- "torch": the fallback when the C kernel is unavailable (no compiler, SPIKELM_CPU_KERNEL=0) or the
  weight is another dtype: the fired columns gathered, then one dense matmul over them.
- "dense": F.linear, when more than max_density of the inputs fired (the sparse walk would not pay).
`BACKEND_CALLS` counts which one ran. `naive_spike_linear` is the float64 reference (one Python loop
per row over the inputs that fired).

`spike_linear` is the torch.library op `spikelm::spike_linear` (CPU kernel + fake kernel), so it
sits in a torch.compile graph as one node without a graph break. It is registered through
torch.library.Library rather than the @custom_op decorator: the decorator's Python dispatch cost
~60-80 us per call here against ~5 us, which at 57 calls per token would eat the saving.
"""
from __future__ import annotations

import collections
import ctypes
import threading
import weakref

import torch
import torch.nn.functional as F

from .cbuild import CSRC, CLibrary

SOURCE = CSRC / "spike_linear.c"
_C_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
BACKEND_CALLS: collections.Counter = collections.Counter()


# spike_linear's return codes (csrc/spike_linear.c); >= 0 is the number of input features that fired
_TOO_DENSE, _NEED_WEIGHTS, _NO_MEMORY = -1, -2, -3


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.spike_linear.argtypes = [P, I64, I64, P, I, I64, P, P, I64, I]
    lib.spike_linear.restype = I64


LIBRARY = CLibrary("spike_linear", SOURCE, _declare)


def c_kernel_available() -> bool:
    """Whether the compiled kernel loads here (builds it on the first call)."""
    return LIBRARY.available()


# -- the transposed layout ---------------------------------------------------------------------
_TRANSPOSED: dict[int, tuple] = {}
_TRANSPOSED_LOCK = threading.Lock()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot change outside inference mode)
        return -1


def cached_transposed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The layout transposed_weight made for this weight, if it is still current; else None."""
    entry = _TRANSPOSED.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == _version(weight):
        return entry[2]
    return None


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """W^T [in, out], contiguous, in weight's dtype: made once per weight (and again after it changes)."""
    wt = cached_transposed_weight(weight)
    if wt is not None:
        return wt
    key = id(weight)
    with _TRANSPOSED_LOCK:
        entry = _TRANSPOSED.get(key)
        wt = weight.detach().t().contiguous()
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _TRANSPOSED.pop, key, None)
        _TRANSPOSED[key] = (weakref.ref(weight), _version(weight), wt)
    return wt


def transposed_nbytes() -> int:
    """Bytes held by the transposed copies of the weights alive now."""
    return sum(e[2].numel() * e[2].element_size() for e in list(_TRANSPOSED.values()))


# -- the reference -----------------------------------------------------------------------------
def naive_spike_linear(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in float64: per row, the sum over the inputs j that fired of spikes[j] * weight[:, j]."""
    out_f, in_f = weight.shape
    s = spikes.reshape(-1, in_f).double()
    w = weight.double()
    y = torch.zeros(s.shape[0], out_f, dtype=torch.float64)
    for r in range(s.shape[0]):
        for j in torch.nonzero(s[r]).flatten().tolist():
            y[r] += s[r, j] * w[:, j]
    if bias is not None:
        y += bias.double()
    return y.reshape(*spikes.shape[:-1], out_f)


# -- the op ------------------------------------------------------------------------------------
def _check(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or spikes.dim() < 1 or spikes.shape[-1] != weight.shape[1] or (
            bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0])):
        raise ValueError(f"spike_linear: spikes [..., in_features], weight [out_features, in_features] and bias "
                         f"[out_features] do not fit: got spikes {tuple(spikes.shape)}, weight {tuple(weight.shape)}"
                         f", bias {None if bias is None else tuple(bias.shape)}")
    if spikes.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"spike_linear runs on CPU tensors, got spikes on {spikes.device}, weight on {weight.device}")


def _dense(spikes, weight, bias, dtype):
    return F.linear(spikes.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def _spike_linear_c(lib, spikes: torch.Tensor, weight, bias, max_fired: int):
    """The C kernel's product [..., out] in float32, or None when more than max_fired inputs fired."""
    out_f, in_f = weight.shape
    s32 = spikes if spikes.dtype == torch.float32 and spikes.is_contiguous() else \
        spikes.to(torch.float32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    y = torch.empty((*spikes.shape[:-1], out_f), dtype=torch.float32)
    wt = cached_transposed_weight(weight)
    for _ in range(2):  # a second pass only when the layout is made now, for a product that will run
        status = lib.spike_linear(s32.data_ptr(), s32.numel() // in_f, in_f, None if wt is None else wt.data_ptr(),
                                  weight.dtype == torch.bfloat16, out_f, None if b is None else b.data_ptr(),
                                  y.data_ptr(), max_fired, torch.get_num_threads())
        if status != _NEED_WEIGHTS:
            break
        wt = transposed_weight(weight)
    if status == _NO_MEMORY:
        raise MemoryError("spikelm: the spike_linear C kernel could not allocate its index lists")
    return None if status == _TOO_DENSE else y


def _spike_linear_torch(s: torch.Tensor, weight, bias, max_fired: int, dtype):
    """The fired columns gathered, then one matmul (float32 accumulation for 16-bit dtypes); None if too dense."""
    cols = torch.nonzero((s != 0).any(0)).flatten()
    if cols.numel() > max_fired:
        return None
    wt = transposed_weight(weight)
    compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    y = s[:, cols].to(compute) @ wt[cols].to(compute)
    return y if bias is None else y + bias.to(compute)


def _spike_linear_cpu(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      max_density: float) -> torch.Tensor:
    _check(spikes, weight, bias)
    in_f = weight.shape[1]
    dtype = torch.promote_types(spikes.dtype, weight.dtype)
    max_fired = int(max_density * in_f)
    lib = LIBRARY.load() if weight.dtype in _C_WEIGHT_DTYPES and spikes.numel() else None
    if lib is not None:
        y, backend = _spike_linear_c(lib, spikes, weight, bias, max_fired), "c"
    else:
        y, backend = _spike_linear_torch(spikes.reshape(-1, in_f), weight, bias, max_fired, dtype), "torch"
        y = y if y is None else y.reshape(*spikes.shape[:-1], weight.shape[0])
    if y is None:
        BACKEND_CALLS["dense"] += 1
        return _dense(spikes, weight, bias, dtype)
    BACKEND_CALLS[backend] += 1
    return y if y.dtype == dtype else y.to(dtype)


_LIB = torch.library.Library("spikelm", "FRAGMENT")
_LIB.define("spike_linear(Tensor spikes, Tensor weight, Tensor? bias, float max_density) -> Tensor")
_LIB.impl("spike_linear", _spike_linear_cpu, "CPU")


@torch.library.register_fake("spikelm::spike_linear", lib=_LIB)
def _spike_linear_fake(spikes, weight, bias, max_density):
    return spikes.new_empty((*spikes.shape[:-1], weight.shape[0]), dtype=torch.promote_types(spikes.dtype, weight.dtype))


def spike_linear(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 max_density: float = 1.0) -> torch.Tensor:
    """spikes [..., in] (integer spike counts, float storage) @ weight.T ([out, in], nn.Linear's layout) + bias.

    Sparse (the C kernel, else the torch fallback) when at most max_density x in of the input
    features fired in any row, else dense F.linear; 1.0 means always sparse. CPU tensors, no autograd
    (an inference op). Output dtype: promote(spikes, weight); accumulation in float32 (or float64 for
    float64 inputs on the torch path). Eager calls go straight to the CPU implementation (the
    dispatcher would add ~5 us a call); under torch.compile this is the op spikelm::spike_linear.
    """
    if torch.compiler.is_compiling():
        return torch.ops.spikelm.spike_linear.default(spikes, weight, bias, float(max_density))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (spikes, weight, bias)):
        raise ValueError("spike_linear is an inference op (no backward): call it under torch.no_grad() or "
                         "torch.inference_mode(), or use F.linear where gradients are needed")
    return _spike_linear_cpu(spikes, weight, bias, float(max_density))
