"""Event-driven linear layer: y = s W^T + b for integer spikes s, reading only the weights of inputs that fired.

A dense product reads every weight for every token; at batch 1 decoding on a CPU that read is the
cost. With spikes s (integers 0..N in float storage), y = sum over the inputs j that fired of
s_j * W[:, j]: the kernel walks the non-zero entries of s and accumulates those weight columns,
each multiplied by its spike count. Batch > 1 walks the inputs that fired in any row, reading each
such column once for all rows.

Weight layout and its memory cost: nn.Linear keeps W as [out, in], where the weights of one input
are strided. The sparse paths read W^T ([in, out], row-major: one input's weights contiguous), a
copy made on the first sparse call for that weight, in the weight's dtype, and kept as long as the
weight lives (the C++ kernel's copies of freed weights go at the next garbage collection); it is
remade when the weight is changed in place (its version counter), replaced or moved to another dtype.
That is one extra copy of every weight that takes the sparse path at least once: for a model whose
every linear after the embedding is spike-fed, about the model's size again (paper-137m: +563 MB
in float32, +282 MB in bfloat16; a tied LM head and embedding share one copy).

int8=True reads instead an int8 copy with one float32 scale per output feature (quantize_int8, made
the same way: a quarter of a float32 weight's bytes plus 4 bytes per output feature): the synaptic
work is integer accumulates (spike count x int8 weight into int32, exact), scaled once per output.

Kernels. The op's CPU kernel is chosen once per process, when the op is first called or traced:
- "c": csrc/spike_linear_op.cpp around csrc/spike_linear.c, built on first use by ops/cbuild.py
  against the installed torch (float32 or bfloat16 weights, float32 accumulation; or int8 weights,
  int32 accumulation; SIMD over output features, OpenMP over output tiles where there is enough
  work). A C++ kernel, so a decoding step reaches it without a Python call: eager through the
  dispatcher, compiled straight from Inductor's C++ wrapper. Weights of other dtypes (float16,
  float64) take the dense product.
- "torch": where the C++ kernel cannot be built (no compiler, SPIKELM_CPU_KERNEL=0), a Python
  kernel: the fired columns gathered, then one dense matmul over them (any weight dtype).
Either runs "dense" (F.linear) when more than max_density of the inputs fired (the sparse walk would
not pay). Eager calls note the one that ran as ("spike_linear", "c" | "torch" | "dense", with
"_int8" for int8 products) for `spikelm.ops.record_backends`; `kernel_calls()` counts them per
thread, compiled graphs included. `naive_spike_linear` is the float64 reference (one Python loop per
row over the inputs that fired).

`spike_linear` is the torch.library op `spikelm::spike_linear` (ops/registry.py names the namespace),
with a fake kernel, so it sits in a torch.compile graph as one node without a graph break.
"""
from __future__ import annotations

import ctypes
import gc
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F

from .backends import is_recording, note_backend
from .cbuild import CSRC, CLibrary
from .registry import NAMESPACE, op_name

SOURCES = [CSRC / "spike_linear.c", CSRC / "spike_linear_op.cpp"]
_C_BACKENDS = ("c", "c_int8", "dense")  # the order of spikelm_spike_linear_backend_counts


def _declare(lib: ctypes.CDLL) -> None:
    lib.spikelm_register_spike_linear.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]
    lib.spikelm_register_spike_linear.restype = ctypes.c_int
    lib.spikelm_layouts_sweep.argtypes = []
    lib.spikelm_layouts_sweep.restype = None
    lib.spikelm_spike_linear_backend_counts.argtypes = [ctypes.c_void_p]
    lib.spikelm_spike_linear_backend_counts.restype = None
    lib.spikelm_layouts_nbytes.argtypes = []
    lib.spikelm_layouts_nbytes.restype = ctypes.c_int64


LIBRARY = CLibrary("spike_linear", SOURCES, _declare)


def c_kernel_available() -> bool:
    """Whether the compiled kernel loads here (builds it on the first call)."""
    return LIBRARY.available()


# -- the torch path's weight layouts ----------------------------------------------------------------
_LAYOUTS: dict[tuple[int, str], tuple] = {}  # (id(weight), kind) -> (weakref, _stamp(weight), layout)
_LAYOUTS_LOCK = threading.Lock()


def _stamp(t: torch.Tensor) -> tuple:
    """What a layout of t must still match: its version counter, data, dtype and shape (Module.to changes a
    Parameter's dtype in place, keeping the object and its version). An inference tensor has no version counter:
    an in-place change of one inside inference mode goes unseen."""
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return version, t.data_ptr(), t.dtype, tuple(t.shape)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output feature (a row of weight [out, in]): (q^T [in, out] int8, scale
    [out] float32), weight ~= scale[:, None] * q. A row of zeros gets scale 1. (The C++ kernel quantises the same
    way, op for op.)"""
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale.contiguous()


_MAKE = {"transposed": lambda w: w.detach().t().contiguous(), "int8": quantize_int8}


def weight_layout(weight: torch.Tensor, kind: str = "transposed"):
    """The torch path's copy of weight, made once per weight (and again after it changes): "transposed": W^T
    [in, out] contiguous in weight's dtype; "int8": quantize_int8(weight). (The C++ kernel keeps its own.)"""
    key = (id(weight), kind)
    entry = _LAYOUTS.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == _stamp(weight):
        return entry[2]
    with _LAYOUTS_LOCK:
        entry = _LAYOUTS.get(key)
        layout = _MAKE[kind](weight)
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _LAYOUTS.pop, key, None)
        _LAYOUTS[key] = (weakref.ref(weight), _stamp(weight), layout)
    return layout


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """W^T [in, out], contiguous, in weight's dtype (weight_layout(weight, "transposed"))."""
    return weight_layout(weight, "transposed")


def layouts_nbytes() -> int:
    """Bytes held by the sparse paths' weight copies of the weights alive now (both kernels')."""
    total = 0
    for entry in list(_LAYOUTS.values()):
        for t in entry[2] if isinstance(entry[2], tuple) else (entry[2],):
            total += t.numel() * t.element_size()
    if _KERNEL == "c":
        total += LIBRARY.load().spikelm_layouts_nbytes()
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


# -- the torch kernel --------------------------------------------------------------------------
_torch_calls = threading.local()


def _count(backend: str) -> None:
    counts = getattr(_torch_calls, "counts", None)
    if counts is None:
        counts = _torch_calls.counts = dict.fromkeys(("torch", "torch_int8", "dense"), 0)
    counts[backend] += 1
    note_backend("spike_linear", backend)


def _check(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or spikes.dim() < 1 or spikes.shape[-1] != weight.shape[1] or (
            bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0])):
        raise ValueError(f"spike_linear: spikes [..., in_features], weight [out_features, in_features] and bias "
                         f"[out_features] do not fit: got spikes {tuple(spikes.shape)}, weight {tuple(weight.shape)}"
                         f", bias {None if bias is None else tuple(bias.shape)}")
    if spikes.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"spike_linear runs on CPU tensors, got spikes on {spikes.device}, weight on {weight.device}")


def _sparse_torch(s: torch.Tensor, weight, bias, max_fired: int, dtype, int8: bool):
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


def torch_spike_linear(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       max_density: float, int8: bool = False) -> torch.Tensor:
    """The op's torch kernel (the CPU kernel where the C++ one cannot be built; callable directly, for tests)."""
    _check(spikes, weight, bias)
    in_f = weight.shape[1]
    dtype = torch.promote_types(spikes.dtype, weight.dtype)
    y = _sparse_torch(spikes.reshape(-1, in_f), weight, bias, int(max_density * in_f), dtype, int8)
    if y is None:
        _count("dense")
        return F.linear(spikes.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    _count("torch_int8" if int8 else "torch")
    y = y.reshape(*spikes.shape[:-1], weight.shape[0])
    return y if y.dtype == dtype else y.to(dtype)


# -- the op ------------------------------------------------------------------------------------
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("spike_linear(Tensor spikes, Tensor weight, Tensor? bias, float max_density, bool int8=False) -> Tensor")


@torch.library.register_fake(op_name("spike_linear"), lib=_LIB)
def _spike_linear_fake(spikes, weight, bias, max_density, int8=False):
    return spikes.new_empty((*spikes.shape[:-1], weight.shape[0]), dtype=torch.promote_types(spikes.dtype, weight.dtype))


_OP = getattr(torch.ops, NAMESPACE).spike_linear.default
_KERNEL: str | None = None  # "c" or "torch": the op's CPU kernel, registered by op_kernel()
_KERNEL_LOCK = threading.Lock()


def _sweep_layouts(phase: str, info: dict) -> None:
    if phase == "stop":  # a collection may have freed weights: their C++ layouts go too
        LIBRARY.load().spikelm_layouts_sweep()


def op_kernel() -> str:
    """The op's CPU kernel, "c" or "torch", registered on the first call: the C++ one where it builds."""
    global _KERNEL
    if _KERNEL is None:
        with _KERNEL_LOCK:
            if _KERNEL is None:
                lib = LIBRARY.load()
                error = ctypes.create_string_buffer(2048)
                if lib is not None and lib.spikelm_register_spike_linear(NAMESPACE.encode(), error, len(error)) == 0:
                    gc.callbacks.append(_sweep_layouts)
                    _KERNEL = "c"
                else:
                    if lib is not None:
                        warnings.warn(f"spikelm: the C++ kernel of spike_linear did not register "
                                      f"({error.value.decode(errors='replace')}); the torch kernel runs instead",
                                      RuntimeWarning, stacklevel=2)
                    _LIB.impl("spike_linear", torch_spike_linear, "CPU")
                    _KERNEL = "torch"
    return _KERNEL


def _first_call_kernel(spikes, weight, bias, max_density, int8=False):
    # the op's kernel for any device until the CPU kernel is registered (then it serves non-CPU tensors only):
    # a direct torch.ops call before any spike_linear() registers the CPU kernel and runs it
    _check(spikes, weight, bias)
    op_kernel()
    return _OP(spikes, weight, bias, max_density, int8)


_LIB.impl("spike_linear", _first_call_kernel, "CompositeExplicitAutograd")


@torch.compiler.assume_constant_result
def c_kernel_runs() -> bool:
    """Whether the op's CPU kernel is the C++ one (registering it on the first call; under torch.compile a
    constant, evaluated once while tracing, so a compiled graph finds the kernel registered)."""
    return op_kernel() == "c"


def _c_counts() -> list[int]:
    counts = (ctypes.c_int64 * len(_C_BACKENDS))()
    LIBRARY.load().spikelm_spike_linear_backend_counts(counts)
    return list(counts)


def kernel_calls() -> dict[str, int]:
    """Calls of the op by this thread since the process started, by backend ("c", "c_int8", "torch",
    "torch_int8", "dense"): eager and compiled graphs alike."""
    out = dict.fromkeys(("c", "c_int8", "torch", "torch_int8", "dense"), 0)
    for name, n in getattr(_torch_calls, "counts", {}).items():
        out[name] += n
    if _KERNEL == "c":
        for name, n in zip(_C_BACKENDS, _c_counts()):
            out[name] += n
    return out


def kernel_calls_since(before: dict[str, int]) -> dict[str, int]:
    """The backends that ran since `before` (an earlier kernel_calls()), with how many calls each."""
    return {b: n - before[b] for b, n in kernel_calls().items() if n > before[b]}


def spike_linear(spikes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 max_density: float = 1.0, int8: bool = False) -> torch.Tensor:
    """spikes [..., in] (integer spike counts, float storage) @ weight.T ([out, in], nn.Linear's layout) + bias.

    Sparse (the C++ kernel, else the torch one) when at most max_density x in of the input features
    fired in any row, else dense F.linear; 1.0 means always sparse. int8: the sparse product reads
    int8 weights with one scale per output feature (quantize_int8; integer accumulates, exact), for
    integer spikes (otherwise, and when too dense, the float dense product runs). CPU tensors, no
    autograd (an inference op). Output dtype: promote(spikes, weight); accumulation in float32 (or
    float64 for float64 inputs on the torch path). Under torch.compile this is the op spikelm::spike_linear.
    """
    if torch.compiler.is_compiling():
        c_kernel_runs()
        return _OP(spikes, weight, bias, float(max_density), bool(int8))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (spikes, weight, bias)):
        raise ValueError("spike_linear is an inference op (no backward): call it under torch.no_grad() or "
                         "torch.inference_mode(), or use F.linear where gradients are needed")
    before = _c_counts() if op_kernel() == "c" and is_recording() else None  # the C++ kernel cannot note itself
    y = _OP(spikes, weight, bias, float(max_density), bool(int8))
    if before is not None:
        note_backend("spike_linear", next(b for b, n0, n1 in zip(_C_BACKENDS, before, _c_counts()) if n1 > n0))
    return y
