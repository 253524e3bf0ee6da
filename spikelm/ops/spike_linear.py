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

int8=True reads instead an int8 copy with one float32 scale per output feature (quantize_int8, made
the same way: a quarter of a float32 weight's bytes plus 4 bytes per output feature): the synaptic
work is integer accumulates (spike count x int8 weight into int32, exact), scaled once per output.

Backends, chosen per call:
- "c": csrc/spike_linear.c, built on first use by ops/cbuild.py (float32 or bfloat16 weights,
  float32 accumulation; or int8 weights, int32 accumulation; SIMD over output features, OpenMP over
  output tiles where there is enough work).
- "torch": the fallback when the C kernel is unavailable (no compiler, SPIKELM_CPU_KERNEL=0) or the
  weight is another dtype: the fired columns gathered, then one dense matmul over them.
- "dense": F.linear, when more than max_density of the inputs fired (the sparse walk would not pay).
Each call notes the one that ran as ("spike_linear", "c" | "torch" | "dense", with "_int8" for int8
products) for `spikelm.ops.record_backends`. `naive_spike_linear`
is the float64 reference (one Python loop per row over the inputs that fired).

`spike_linear` is the torch.library op `spikelm::spike_linear` (ops/registry.py names the namespace) (CPU kernel + fake kernel), so it
sits in a torch.compile graph as one node without a graph break. It is registered through
torch.library.Library rather than the @custom_op decorator: the decorator's Python dispatch cost
~60-80 us per call here against ~5 us, which at 57 calls per token would eat the saving.
"""
from __future__ import annotations

import ctypes
import threading
import weakref

import torch
import torch.nn.functional as F

from .backends import note_backend
from .cbuild import CSRC, CLibrary
from .registry import NAMESPACE, op_name

SOURCE = CSRC / "spike_linear.c"
_C_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


# spike_linear's return codes (csrc/spike_linear.c); >= 0 is the number of input features that fired
_TOO_DENSE, _NEED_WEIGHTS, _NO_MEMORY, _NOT_INTEGER = -1, -2, -3, -4


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.spike_linear.argtypes = [P, I64, I64, P, I, I64, P, P, I64, I]
    lib.spike_linear_int8.argtypes = [P, I64, I64, P, P, I64, P, P, I64, I]
    lib.spike_linear.restype = lib.spike_linear_int8.restype = I64


LIBRARY = CLibrary("spike_linear", SOURCE, _declare)


def c_kernel_available() -> bool:
    """Whether the compiled kernel loads here (builds it on the first call)."""
    return LIBRARY.available()


# -- the weight layouts ------------------------------------------------------------------------
_LAYOUTS: dict[tuple[int, str], tuple] = {}  # (id(weight), kind) -> (weakref, version, layout)
_LAYOUTS_LOCK = threading.Lock()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot change outside inference mode)
        return -1


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output feature (a row of weight [out, in]): (q^T [in, out] int8, scale
    [out] float32), weight ~= scale[:, None] * q. A row of zeros gets scale 1."""
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale.contiguous()


_MAKE = {"transposed": lambda w: w.detach().t().contiguous(), "int8": quantize_int8}


def cached_layout(weight: torch.Tensor, kind: str):
    """The layout weight_layout(weight, kind) made, if it is still current (the weight unchanged); else None."""
    entry = _LAYOUTS.get((id(weight), kind))
    if entry is not None and entry[0]() is weight and entry[1] == _version(weight):
        return entry[2]
    return None


def weight_layout(weight: torch.Tensor, kind: str = "transposed"):
    """The sparse paths' copy of weight, made once per weight (and again after it changes): "transposed": W^T
    [in, out] contiguous in weight's dtype; "int8": quantize_int8(weight)."""
    layout = cached_layout(weight, kind)
    if layout is not None:
        return layout
    key = (id(weight), kind)
    with _LAYOUTS_LOCK:
        entry = _LAYOUTS.get(key)
        layout = _MAKE[kind](weight)
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _LAYOUTS.pop, key, None)
        _LAYOUTS[key] = (weakref.ref(weight), _version(weight), layout)
    return layout


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """W^T [in, out], contiguous, in weight's dtype (weight_layout(weight, "transposed"))."""
    return weight_layout(weight, "transposed")


def layouts_nbytes() -> int:
    """Bytes held by the sparse paths' weight copies alive now."""
    total = 0
    for entry in list(_LAYOUTS.values()):
        for t in entry[2] if isinstance(entry[2], tuple) else (entry[2],):
            total += t.numel() * t.element_size()
    return total


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


def _spike_linear_c(lib, spikes: torch.Tensor, weight, bias, max_fired: int, int8: bool):
    """The C kernel's product [..., out] in float32, or None when more than max_fired inputs fired (or, for int8,
    a spike is not an integer)."""
    out_f, in_f = weight.shape
    s32 = spikes if spikes.dtype == torch.float32 and spikes.is_contiguous() else \
        spikes.to(torch.float32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    y = torch.empty((*spikes.shape[:-1], out_f), dtype=torch.float32)
    rows, b_ptr, threads = s32.numel() // in_f, None if b is None else b.data_ptr(), torch.get_num_threads()
    kind = "int8" if int8 else "transposed"
    layout = cached_layout(weight, kind)
    for _ in range(2):  # a second pass only when the layout is made now, for a product that will run
        if int8:
            q, scale = layout if layout is not None else (None, None)
            status = lib.spike_linear_int8(s32.data_ptr(), rows, in_f, None if q is None else q.data_ptr(),
                                           None if scale is None else scale.data_ptr(), out_f, b_ptr, y.data_ptr(),
                                           max_fired, threads)
        else:
            status = lib.spike_linear(s32.data_ptr(), rows, in_f, None if layout is None else layout.data_ptr(),
                                      weight.dtype == torch.bfloat16, out_f, b_ptr, y.data_ptr(), max_fired, threads)
        if status != _NEED_WEIGHTS:
            break
        layout = weight_layout(weight, kind)
    if status == _NO_MEMORY:
        raise MemoryError("spikelm: the spike_linear C kernel could not allocate its index lists")
    return None if status in (_TOO_DENSE, _NOT_INTEGER) else y


def _spike_linear_torch(s: torch.Tensor, weight, bias, max_fired: int, dtype, int8: bool):
    """The fired columns gathered, then one matmul (float32 accumulation for 16-bit dtypes, exact integer sums for
    int8); None if too dense (or, for int8, a spike is not an integer)."""
    cols = torch.nonzero((s != 0).any(0)).flatten()
    if cols.numel() > max_fired:
        return None
    if int8:
        sf = s[:, cols]
        if not torch.equal(sf, torch.round(sf)):
            return None
        q, scale = weight_layout(weight, "int8")
        y = (sf.to(torch.int64) @ q[cols].to(torch.int64)).to(torch.float32) * scale
        return y if bias is None else y + bias.to(torch.float32)
    wt = weight_layout(weight, "transposed")
    compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    y = s[:, cols].to(compute) @ wt[cols].to(compute)
    return y if bias is None else y + bias.to(compute)


def _spike_linear_cpu(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      max_density: float, int8: bool = False) -> torch.Tensor:
    _check(spikes, weight, bias)
    in_f = weight.shape[1]
    dtype = torch.promote_types(spikes.dtype, weight.dtype)
    max_fired = int(max_density * in_f)
    lib = LIBRARY.load() if (int8 or weight.dtype in _C_WEIGHT_DTYPES) and spikes.numel() else None
    if lib is not None:
        y, backend = _spike_linear_c(lib, spikes, weight, bias, max_fired, int8), "c"
    else:
        y, backend = _spike_linear_torch(spikes.reshape(-1, in_f), weight, bias, max_fired, dtype, int8), "torch"
        y = y if y is None else y.reshape(*spikes.shape[:-1], weight.shape[0])
    if y is None:
        note_backend("spike_linear", "dense")
        return _dense(spikes, weight, bias, dtype)
    note_backend("spike_linear", backend + ("_int8" if int8 else ""))
    return y if y.dtype == dtype else y.to(dtype)


_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("spike_linear(Tensor spikes, Tensor weight, Tensor? bias, float max_density, bool int8=False) -> Tensor")
_LIB.impl("spike_linear", _spike_linear_cpu, "CPU")


@torch.library.register_fake(op_name("spike_linear"), lib=_LIB)
def _spike_linear_fake(spikes, weight, bias, max_density, int8=False):
    return spikes.new_empty((*spikes.shape[:-1], weight.shape[0]), dtype=torch.promote_types(spikes.dtype, weight.dtype))


_COMPILED_OP = getattr(torch.ops, NAMESPACE).spike_linear.default


def spike_linear(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 max_density: float = 1.0, int8: bool = False) -> torch.Tensor:
    """spikes [..., in] (integer spike counts, float storage) @ weight.T ([out, in], nn.Linear's layout) + bias.

    Sparse (the C kernel, else the torch fallback) when at most max_density x in of the input
    features fired in any row, else dense F.linear; 1.0 means always sparse. int8: the sparse product
    reads int8 weights with one scale per output feature (quantize_int8; integer accumulates, exact),
    for integer spikes (otherwise, and when too dense, the float dense product runs). CPU tensors, no
    autograd (an inference op). Output dtype: promote(spikes, weight); accumulation in float32 (or
    float64 for float64 inputs on the torch path). Eager calls go straight to the CPU implementation
    (the dispatcher would add ~5 us a call); under torch.compile this is the op spikelm::spike_linear.
    """
    if torch.compiler.is_compiling():
        return _COMPILED_OP(spikes, weight, bias, float(max_density), bool(int8))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (spikes, weight, bias)):
        raise ValueError("spike_linear is an inference op (no backward): call it under torch.no_grad() or "
                         "torch.inference_mode(), or use F.linear where gradients are needed")
    return _spike_linear_cpu(spikes, weight, bias, float(max_density), bool(int8))
